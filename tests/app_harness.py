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
