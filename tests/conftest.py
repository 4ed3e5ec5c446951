"""Shared test fixtures.

The environment block below runs first, before anything imports huggingface_hub or gradio:
huggingface_hub reads HF_ENDPOINT, HF_HOME and HF_HUB_DISABLE_XET once, at import.
"""

# ---------------------------------------------------------------- environment (keep at the very top)
import atexit
import os
import shutil
import socket
import tempfile


def _free_port() -> int:
    # Bind to port 0 so the OS picks a free port; the loopback Hub starts on it later.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


HUB_PORT = _free_port()
_HF_HOME = tempfile.mkdtemp(prefix="merger-hf-home-")
atexit.register(shutil.rmtree, _HF_HOME, ignore_errors=True)

os.environ["HF_ENDPOINT"] = f"http://127.0.0.1:{HUB_PORT}"
os.environ["HF_HOME"] = _HF_HOME
os.environ["HF_HUB_DISABLE_XET"] = "1"  # Xet uploads cannot be served by the loopback Hub
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
# Nothing from the developer's machine may leak in: no token, no cache elsewhere than HF_HOME.
for _name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
    os.environ.pop(_name, None)

# ---------------------------------------------------------------- imports (after the environment)
from collections.abc import Iterator  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from minihub import Store, serve  # noqa: E402

# ---------------------------------------------------------------- fixture models
@pytest.fixture(scope="session")
def fixture_models_dir() -> Path:
    """The directory holding the tiny trained models (`mistral-base`, `qwen2-code`, ...), in the repository."""
    return Path(__file__).parent / "data" / "fixtures"


# ---------------------------------------------------------------- loopback Hub
# mistralai's token lets tests publish stand-ins for the seed models under their real ids.
HUB_TOKENS = {"hf_test_alice": "alice", "hf_test_bob": "bob", "hf_test_mistralai": "mistralai"}


@dataclass
class LoopbackHub:
    """A running loopback Hub and the account the tests act as.

    Attributes:
        url: the endpoint (same as HF_ENDPOINT).
        token: alice's token; `HUB_TOKENS` holds bob's too.
        user: the token's username.
        store: the server's state; set `store.fail_commits` to an HTTP status to make commits fail.
    """

    url: str
    token: str
    user: str
    store: Store

    def upload_model(self, local_dir: Path, repo_id: str, token: str | None = None) -> str:
        """Push a local model directory as a (new or existing) model repo; returns `repo_id`.

        `token` defaults to alice's; pass the namespace owner's for repos outside `alice/`.
        """
        from huggingface_hub import HfApi

        api = HfApi(endpoint=self.url, token=token or self.token)
        api.create_repo(repo_id, exist_ok=True)
        api.upload_folder(folder_path=local_dir, repo_id=repo_id, commit_message="Upload fixture")
        return repo_id


@pytest.fixture(scope="session")
def hub() -> Iterator[LoopbackHub]:
    """A loopback Hub on HF_ENDPOINT for the whole session, with users alice and bob."""
    server, url = serve(HUB_PORT, tempfile.mkdtemp(prefix="minihub-", dir=_HF_HOME), HUB_TOKENS)
    assert url == os.environ["HF_ENDPOINT"]
    yield LoopbackHub(url=url, token="hf_test_alice", user="alice", store=server.store)
    server.shutdown()
    server.server_close()


@pytest.fixture
def job_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh data folder for the app's jobs (queue and job databases in it), a fresh queue key and a
    fresh worker shutdown flag; returns the folder."""
    import threading

    from cryptography.fernet import Fernet

    from merger import constants
    from merger.jobs import worker

    data = tmp_path / "data"
    monkeypatch.setattr(constants, "DATA_DIR", data)
    monkeypatch.setattr(constants, "QUEUE_DB", data / "queue.db")
    monkeypatch.setattr(constants, "JOBS_DB", data / "jobs.db")
    monkeypatch.setenv(constants.QUEUE_KEY_ENV, Fernet.generate_key().decode())
    monkeypatch.setattr(worker, "_SHUTDOWN", threading.Event())
    return data


@pytest.fixture
def one_torch_thread():
    """Torch on one thread for the test: the fixture models are tiny, so one thread is fastest, and on a
    busy machine torch's other threads wait on cores the neighbours hold."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
