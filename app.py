"""merger's Gradio app (a Hugging Face Space): the page's layout, assembled from the panels in `merger.ui`.

Importing this module starts nothing: `build_demo()` builds the Blocks, and running the file starts
the merge worker and serves the app (http://127.0.0.1:7860 by default). The panels reach the engine
and the jobs only through `merger.service`; the named API endpoints are listed in `merger.ui.api`.
"""

import logging
import os
from html import escape
from pathlib import Path
from typing import Any

import gradio as gr

from merger import constants, service
from merger.ui import api, form_panel, insight_panel, job_panel, my_merges, page_events, preflight_panel, yaml_panel
from merger.ui.common import local_token_note

EXAMPLES_DIR = Path(__file__).resolve().parent / "templates" / "examples"

INTRO = """# merger
Merge language models on the Hub: pick models and a method, check the config, and the merged model is
pushed to your account. The config is [mergekit](https://github.com/arcee-ai/mergekit)'s YAML, so configs
from model cards paste straight in, and the result's card carries it."""


def build_demo(login: bool | None = None, examples_dir: str | os.PathLike[str] = EXAMPLES_DIR) -> gr.Blocks:
    """Build the app (nothing starts until `.launch()`).

    Args:
        login: show "Sign in with Hugging Face" (OAuth). Defaults to being on a Space; locally the
            token comes from `HF_TOKEN` instead (Gradio's local OAuth mock would need a Hub login).
        examples_dir: the folder of example configs (`*.yaml`).
    """
    login = constants.ON_SPACE if login is None else login
    examples = service.examples(examples_dir)
    with gr.Blocks(title="merger") as demo:
        gr.Markdown(INTRO)
        with gr.Row():
            if login:
                gr.LoginButton(scale=0, min_width=260)
            else:
                note = gr.Markdown(local_token_note(), elem_id="token-note")
                demo.load(local_token_note, outputs=note, api_visibility="private")  # the environment may change
        table = None
        if examples:
            table = gr.Dataset(
                label="Examples (click one to fill the form)",
                components=["html"],  # a textbox cell cuts its text at 60 characters
                headers=["example"],
                samples=[[f"<b>{escape(e.title)}</b><br>{escape(e.description)}"] for e in examples],
                type="index",
                layout="table",
                samples_per_page=20,
                elem_id="examples",
            )
        with gr.Row(equal_height=False):
            form_column = gr.Column(scale=3, elem_id="form")
            with gr.Column(scale=2):
                views = yaml_panel.build()
            with form_column:
                form_panel.build(views, demo)
        insight = insight_panel.build()
        pre = preflight_panel.build()
        job = job_panel.build()
        listing, refresh = my_merges.build()

        preflight_panel.wire(pre, views)
        insight_panel.wire(insight, views)
        job_panel.wire(job, listing)
        page_events.wire_merge(views, pre, job, listing)
        page_events.wire_load(demo, views, pre, job, listing)
        if table is not None:
            page_events.wire_examples(views, table, examples)
        refresh.click(my_merges.refresh_listing, outputs=listing, api_visibility="private")
        api.register()
    return demo


# Waiting events across the app: past it gradio answers "queue is full" at once instead of holding a
# connection for each (a burst of requests cannot grow memory without bound).
QUEUE_MAX_SIZE = 64
# gradio's cap on an uploaded file (the app takes no files; a config is text, bounded by the parser).
# gradio has no setting for the size of a JSON request body: the parser's limits bound what is read from it.
MAX_FILE_SIZE = "1mb"


def serve(demo: gr.Blocks, **launch: Any) -> tuple[Any, str, str]:
    """Queue and launch `demo` with the app's bounds (queue length, upload size); `launch` adds options."""
    demo.queue(default_concurrency_limit=4, max_size=QUEUE_MAX_SIZE)
    return demo.launch(max_file_size=MAX_FILE_SIZE, **launch)


def main() -> None:
    """Serve the app; unless the worker runs apart (`MERGER_EXTERNAL_WORKER=1`), start and supervise one."""
    from merger.jobs.supervisor import WorkerSupervisor
    from merger.jobs.queue import ensure_queue_key
    from merger.jobs.recovery import start_watching_workers
    from merger.scrub import install_log_scrubbing

    install_log_scrubbing()  # before anything logs: the app's own log (httpx's lines included) never holds a token
    logging.basicConfig(level=logging.INFO)
    ensure_queue_key()  # the data dir's key (or the given one), so jobs still queued survive a restart
    supervisor = None if constants.EXTERNAL_WORKER else WorkerSupervisor()
    # Workers that run apart (on other machines, with REDIS_URL) may all stop: the app fails their jobs too.
    stop_watching = start_watching_workers() if constants.EXTERNAL_WORKER else None
    try:
        serve(build_demo())
    finally:
        if supervisor is not None:
            supervisor.stop()
        if stop_watching is not None:
            stop_watching.set()


if __name__ == "__main__":
    main()
