"""The Gradio page, one module per panel: form, YAML, pre-flight, job, my merges (and the API endpoints).

Every panel reaches the engine and the jobs only through :mod:`merger.service`. The page's state is
the config YAML text (`gr.State`, the single source of truth); the form and the YAML editor are two
views of it.
"""
