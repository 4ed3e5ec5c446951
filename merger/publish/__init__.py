"""Step 4: the model card and the Hub (the one module that talks to it: :mod:`merger.publish.hub`)."""
