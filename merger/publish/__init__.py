"""Step 4: the model card and the Hub (the only modules that talk to it: :mod:`merger.publish.hub_read`, :mod:`merger.publish.hub_push`)."""
