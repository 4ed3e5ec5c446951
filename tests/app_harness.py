"""The app served in this process for tests that drive it with gradio_client: a temporary data folder
(job records, queue, staging), a queue key, and alice's token as `HF_TOKEN`; no worker runs."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

from gradio_client import Client

from helpers import free_port

TOKEN = "hf_test_alice"


@contextlib.contextmanager
def served_app(data: Path) -> Iterator[tuple[Client, object]]:
    """Serve `app.build_demo()` on a free port with its data in `data`; yields (client, demo).

    The constants and environment it changes are restored on exit.
    """
    import app
    from cryptography.fernet import Fernet

    from merger import constants

    saved = (constants.DATA_DIR, constants.QUEUE_DB, constants.JOBS_DB)
    saved_env = {name: os.environ.get(name) for name in ("HF_TOKEN", constants.QUEUE_KEY_ENV)}
    constants.DATA_DIR, constants.QUEUE_DB, constants.JOBS_DB = data, data / "queue.db", data / "jobs.db"
    os.environ["HF_TOKEN"] = TOKEN
    os.environ[constants.QUEUE_KEY_ENV] = Fernet.generate_key().decode()
    demo = app.build_demo()
    try:
        _, url, _ = app.serve(demo, prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(),
                              quiet=True)
        yield Client(url, verbose=False), demo
    finally:
        demo.close()
        constants.DATA_DIR, constants.QUEUE_DB, constants.JOBS_DB = saved
        for name, value in saved_env.items():
            os.environ.pop(name, None) if value is None else os.environ.__setitem__(name, value)


def render_form(demo, text: str, layout: dict):
    """The form one browser session sees for `text` and `layout`: gradio's per-session copy of the page's
    blocks with the form rendered into it (what the page's `gr.render` does on a config change).

    Returns the session's blocks config; :func:`fire` runs the events of the widgets in it.
    """
    from copy import copy

    from gradio.context import LocalContext

    session = copy(demo.default_config)
    token = LocalContext.blocks_config.set(session)
    try:
        session.renderables[0].apply(text, layout)
    finally:
        LocalContext.blocks_config.reset(token)
    return session


def widget(session, elem_id: str):
    """The rendered widget with `elem_id`."""
    return next(b for b in session.blocks.values() if getattr(b, "elem_id", None) == elem_id)


def fire(session, elem_id: str, event: str, values: dict, *request) -> dict:
    """Run the handler of `event` (`input`, `click`, `blur`) on widget `elem_id` with `values` (component ->
    value) and, for handlers that take one, a `gr.Request`; returns its updates (component -> value), as
    the page would apply them."""
    target = widget(session, elem_id)
    handlers = [f for f in session.fns.values() if (target._id, event) in [tuple(t) for t in f.targets]]
    # A model box's commit also refreshes its details line (merger.ui.pickers): the config's edit is the
    # handler that reads a value given here besides the widget itself.
    editing = [f for f in handlers if len(handlers) == 1 or set(f.inputs) & (set(values) - {target})]
    assert len(editing) == 1, f"{elem_id}.{event}: {len(editing)} handlers"
    return editing[0].fn(values, *request)
