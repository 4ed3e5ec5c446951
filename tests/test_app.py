"""The Gradio app: it builds without starting anything, and its API endpoints work through gradio_client.

The app is launched in this process (`prevent_thread_lock=True`) on a free port, so the tests can
switch its environment (HF_TOKEN, data paths, Space mode) with monkeypatch.
"""

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from urllib.parse import parse_qs, urlsplit  # noqa: E402

import gradio as gr  # noqa: E402
import pytest  # noqa: E402
from gradio_client import Client  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

import app  # noqa: E402
from merger import constants  # noqa: E402
from merger.links import decode_config, encode_config  # noqa: E402
from merger.ui.common import token_of  # noqa: E402
from merger.ui.job_panel import job_markdown  # noqa: E402
from app_harness import fire, render_form, widget  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "hf_test_alice"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def slerp_yaml(fixture_models_dir: Path) -> str:
    prose, code = fixture_models_dir / "mistral-prose", fixture_models_dir / "mistral-code"
    return (f"merge_method: slerp\nbase_model: {prose}\nmodels:\n  - model: {prose}\n  - model: {code}\n"
            "parameters:\n  t: 0.5\n")


@pytest.fixture(scope="module")
def served() -> tuple[gr.Blocks, str]:
    demo = app.build_demo()
    _, url, _ = app.serve(demo, prevent_thread_lock=True, server_name="127.0.0.1", server_port=_free_port(), quiet=True)
    yield demo, url
    demo.close()


@pytest.fixture(scope="module")
def client(served: tuple[gr.Blocks, str]) -> Client:
    return Client(served[1], verbose=False)


@pytest.fixture
def no_token(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)


@pytest.fixture
def job_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Job records and queue in a temporary folder (no worker runs: jobs stay queued)."""
    pytest.importorskip("merger.jobs.store")
    from cryptography.fernet import Fernet

    data = tmp_path / "data"
    monkeypatch.setattr(constants, "DATA_DIR", data)
    monkeypatch.setattr(constants, "QUEUE_DB", data / "queue.db")
    monkeypatch.setattr(constants, "JOBS_DB", data / "jobs.db")
    monkeypatch.setenv(getattr(constants, "QUEUE_KEY_ENV", "MERGER_QUEUE_KEY"), Fernet.generate_key().decode())
    return data


def handler(demo: gr.Blocks, name: str):
    """The Python function behind a UI event (they are private: not callable through the client)."""
    return next(f.fn for f in demo.fns.values() if f.name == name)


def by_id(demo: gr.Blocks, elem_id: str):
    return next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == elem_id)


def state_of(demo: gr.Blocks, name: str) -> gr.State:
    """The page's config (`name="config"`, the YAML text) or layout state: the first / second gr.State."""
    states = [b for b in demo.blocks.values() if isinstance(b, gr.State)]
    return states[{"config": 0, "layout": 1}[name]]


def load_page(demo: gr.Blocks, **query: str) -> dict:
    """What the page's load event returns for a URL with `query`."""
    layout = state_of(demo, "layout")
    return handler(demo, "on_load")({layout: layout.value}, gr.Request(query_params=query))


def value_of(update):
    """The value an update sets (gr.Code shows its text stripped, as the browser gets it)."""
    value = update.get("value") if isinstance(update, dict) else getattr(update, "value", update)
    return value.strip() if isinstance(value, str) else value


# ---------------------------------------------------------------- building
def test_importing_app_starts_nothing() -> None:
    code = (
        "import sys, threading, multiprocessing; import app;"
        "assert 'merger.jobs.worker' not in sys.modules, 'worker imported';"
        "assert not multiprocessing.active_children();"
        "assert threading.active_count() == 1, threading.enumerate();"
        "d = app.build_demo(); assert d.server is None if hasattr(d, 'server') else True;"
        "assert 'merger.jobs.worker' not in sys.modules; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")


def test_build_demo_wires_the_named_endpoints() -> None:
    demo = app.build_demo()
    assert isinstance(demo, gr.Blocks)
    public = {f.api_name for f in demo.fns.values() if f.api_visibility == "public"}
    assert public == {"validate", "preflight", "submit", "job_status", "job_config", "cancel", "publish", "discard",
                      "my_jobs", "share", "load_link", "weight_report", "suggest"}
    # locally the token comes from HF_TOKEN: no LoginButton, whose local mock needs a Hub login
    assert not any(isinstance(b, gr.LoginButton) for b in demo.blocks.values())


@pytest.mark.filterwarnings("ignore:Gradio does not support OAuth features outside of a Space")
def test_sign_in_button(monkeypatch: pytest.MonkeyPatch) -> None:
    # Off a Space, Gradio mocks OAuth with the machine's Hub login; stand in for that lookup.
    monkeypatch.setattr("gradio.oauth._get_mocked_oauth_info", lambda: {"access_token": "mock"})
    demo = app.build_demo(login=True)
    assert any(isinstance(b, gr.LoginButton) for b in demo.blocks.values())


def test_api_lists_the_endpoints(client: Client) -> None:
    info = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert [p["parameter_name"] for p in info["/validate"]["parameters"]] == ["yaml_text"]
    assert [p["parameter_name"] for p in info["/submit"]["parameters"]] == [
        "yaml_text", "repo_id", "private", "reuse_repo", "evaluate", "review", "eval_dataset", "eval_text"]
    assert [p["parameter_name"] for p in info["/preflight"]["parameters"]] == ["yaml_text", "repo_id", "private", "reuse_repo"]
    assert [p["parameter_name"] for p in info["/job_status"]["parameters"]] == ["job_id"]
    assert [p["parameter_name"] for p in info["/job_config"]["parameters"]] == ["job_id"]
    assert [p["parameter_name"] for p in info["/cancel"]["parameters"]] == ["job_id"]
    assert [p["parameter_name"] for p in info["/publish"]["parameters"]] == ["job_id"]
    assert [p["parameter_name"] for p in info["/discard"]["parameters"]] == ["job_id"]
    assert [p["parameter_name"] for p in info["/share"]["parameters"]] == ["yaml_text"]
    assert [p["parameter_name"] for p in info["/weight_report"]["parameters"]] == ["yaml_text"]
    assert [p["parameter_name"] for p in info["/suggest"]["parameters"]] == ["yaml_text", "candidates", "minutes", "text"]


# ---------------------------------------------------------------- share
def test_share_round_trips_and_never_carries_the_token(
    client: Client, served: tuple[gr.Blocks, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    text = "# Ünïcødé 模型\n" + (
        "merge_method: passthrough\nslices:\n  - sources:\n      - model: org/a\n        layer_range: [0, 2]\n")
    link = client.predict(text, api_name="/share")
    assert link.startswith(served[1].rstrip("/") + "/?config=")
    assert TOKEN not in link
    payload = parse_qs(urlsplit(link).query)["config"][0]
    assert decode_config(payload) == text
    assert client.predict(payload, api_name="/load_link") == text


def test_share_uses_the_space_address(client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPACE_HOST", "alice-merger.hf.space")
    link = client.predict("merge_method: linear\n", api_name="/share")
    assert link.startswith("https://alice-merger.hf.space/?config=")


def test_damaged_link(client: Client) -> None:
    with pytest.raises(AppError, match="the shared link is damaged"):
        client.predict("definitely-not-a-config", api_name="/load_link")


# ---------------------------------------------------------------- validate
def test_validate_reports_the_summary(client: Client, fixture_models_dir: Path) -> None:
    summary = client.predict(slerp_yaml(fixture_models_dir), api_name="/validate")
    assert "4 layers" in summary and "SLERP" in summary.upper()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("merge_method: nope\nmodels:\n  - model: org/a\n", "merge_method: nope"),
        (
            "merge_method: passthrough\nslices:\n  - sources:\n      - model: org/a\n        layer_range: [4, 2]\n",
            "slices[0].sources[0].layer_range",
        ),
        ("base_model: org/a\ngate_mode: hidden\nexperts:\n  - source_model: org/b\n", "gate_mode"),
        ("merge_method: slerp\nmodels: [unclosed\n", "not valid YAML"),
    ],
)
def test_validate_names_the_field_without_a_traceback(client: Client, text: str, expected: str) -> None:
    with pytest.raises(AppError) as caught:
        client.predict(text, api_name="/validate")
    message = str(caught.value)
    assert expected in message
    assert "Traceback" not in message and 'File "' not in message


def test_the_preflight_shows_the_problem_and_keeps_merge_disabled(served: tuple[gr.Blocks, str]) -> None:
    demo = served[0]
    on_check = handler(demo, "on_check")
    values = {
        state_of(demo, "config"): "merge_method: nope\nmodels: [{model: org/a}]\n",
        by_id(demo, "repo-id"): "",
        by_id(demo, "private"): False,
        by_id(demo, "reuse-repo"): False,
        by_id(demo, "evaluate"): True,
        by_id(demo, "review"): False,
    }
    updates = on_check(values, None)
    shown = updates[by_id(demo, "preflight")]
    assert "✗ config" in shown and "merge_method: nope" in shown and "How to fix" in shown
    assert "Traceback" not in shown
    assert updates[by_id(demo, "merge")].interactive is False


def test_a_space_refuses_local_paths(
    client: Client, fixture_models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(constants, "ON_SPACE", True)
    with pytest.raises(AppError, match="local paths are not available here"):
        client.predict(slerp_yaml(fixture_models_dir), api_name="/validate")


def test_a_space_never_falls_back_to_its_own_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert token_of(None) == TOKEN
    monkeypatch.setattr(constants, "ON_SPACE", True)
    assert token_of(None) is None
    assert token_of(gr.OAuthToken(token="hf_oauth_user", scope="", expires_at=0)) == "hf_oauth_user"


# ---------------------------------------------------------------- submit, status, cancel
def test_submit_without_a_token_asks_to_sign_in(client: Client, fixture_models_dir: Path, no_token: None) -> None:
    with pytest.raises(AppError, match="sign in with Hugging Face first"):
        client.predict(slerp_yaml(fixture_models_dir), "my-merge", False, api_name="/submit")


def test_submit_rejects_an_invalid_config_before_queueing(
    client: Client, monkeypatch: pytest.MonkeyPatch, job_store: Path, hub
) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with pytest.raises(AppError, match="merge_method: nope"):
        client.predict("merge_method: nope\nmodels: [{model: org/a}]\n", "my-merge", False, api_name="/submit")
    assert not (job_store / "jobs.db").exists() or _job_count(job_store) == 0


def _job_count(data: Path) -> int:
    import sqlite3

    with sqlite3.connect(data / "jobs.db") as conn:
        return conn.execute("select count(*) from jobs").fetchone()[0]


@pytest.mark.parametrize("how", ["env", "oauth"])
def test_submit_status_cancel(
    served: tuple[gr.Blocks, str], fixture_models_dir: Path, monkeypatch: pytest.MonkeyPatch, job_store: Path, how: str,
    hub,
) -> None:
    if how == "env":
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        caller = Client(served[1], verbose=False)
    else:  # what a signed-in caller's token looks like to the handlers
        for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
        caller = Client(served[1], verbose=False, oauth_token=TOKEN)
    job_id = caller.predict(slerp_yaml(fixture_models_dir), "my-merge", True, api_name="/submit")
    assert isinstance(job_id, str) and job_id

    status = caller.predict(job_id, api_name="/job_status")
    assert status["id"] == job_id and status["status"] == "queued" and status["progress"] == 0.0
    assert set(status) == {
        "id", "status", "progress", "current_tensor", "log_tail", "result_url", "error", "error_type", "worker",
        "created_at", "updated_at", "elapsed_s", "remaining_s", "queue_position", "options", "evaluation",
        "review_expires_at",
    }
    assert status["options"] == {"evaluate": True, "review": False, "eval_dataset": "", "eval_text": ""}
    assert status["queue_position"] == 1 and status["remaining_s"] is None  # nothing ahead; no progress yet
    # No worker runs in this test: the status says so (the heartbeat has never been written).
    assert status["worker"] == "No worker alive since it started: queued jobs wait until a worker is running again."
    assert TOKEN not in str(status)

    assert caller.predict(job_id, api_name="/cancel") is True
    assert caller.predict(job_id, api_name="/job_status")["status"] == "cancelled"
    assert caller.predict(job_id, api_name="/cancel") is False


def test_unknown_job(client: Client, job_store: Path) -> None:
    with pytest.raises(AppError, match="this is not a job id"):
        client.predict("nope", api_name="/job_status")
    for endpoint in ("/job_status", "/job_config", "/cancel"):
        with pytest.raises(AppError, match="there is no job with this id on this app"):
            client.predict("0" * 32, api_name=endpoint)


# ---------------------------------------------------------------- reopening from links, examples, the form
def test_config_link_reopens_the_config_byte_for_byte(served: tuple[gr.Blocks, str]) -> None:
    demo = served[0]
    text = "# my merge\nmerge_method: linear\nmodels:\n  - model: org/a\n    parameters: {weight: 0.7}\n" \
        "  - model: org/b\n    parameters: {weight: 0.3}\n\n"
    updates = load_page(demo, config=encode_config(text))
    assert updates[state_of(demo, "config")] == text  # the state keeps every byte, comments and blank lines too
    assert value_of(updates[by_id(demo, "config-yaml")]) == text.strip()
    assert updates[state_of(demo, "layout")]["structure"][0] == "linear"
    assert updates[by_id(demo, "kept-note")] == ""


def test_a_ties_link_stays_ties_and_lists_what_the_form_cannot_show(served: tuple[gr.Blocks, str]) -> None:
    """The issue's bug: a pasted TIES config reopened as a 2-model linear merge."""
    demo = served[0]
    text = (
        "merge_method: ties\nbase_model: org/a\n"
        "models:\n  - model: org/b\n    parameters: {weight: 1, density: 0.5}\n"
        "tokenizer:\n  source: union\n"
    )
    updates = load_page(demo, config=encode_config(text))
    assert updates[state_of(demo, "config")] == text
    assert updates[state_of(demo, "layout")]["structure"][0] == "ties"
    assert "`tokenizer`" in updates[by_id(demo, "kept-note")]


def test_damaged_config_link_says_so(served: tuple[gr.Blocks, str]) -> None:
    demo = served[0]
    updates = load_page(demo, config="garbage!")
    assert "the shared link is damaged" in updates[by_id(demo, "kept-note")]
    assert state_of(demo, "config") not in updates


def test_job_link_reopens_the_job_view_for_its_owner_only(
    served: tuple[gr.Blocks, str], job_store: Path, monkeypatch: pytest.MonkeyPatch, hub
) -> None:
    from merger.jobs import queue

    demo = served[0]
    text = (
        "merge_method: linear\nmodels:\n  - model: org/a\n    parameters: {weight: 0.7}\n"
        "  - model: org/b\n    parameters: {weight: 0.3}\n")
    the_id = queue.submit(text, "alice/m", TOKEN, "alice")

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    updates = load_page(demo, job=the_id)
    assert updates[by_id(demo, "job-id")] == the_id
    assert updates[by_id(demo, "job-view")].visible
    timer = next(b for b in demo.blocks.values() if isinstance(b, gr.Timer))
    assert updates[timer].active is True
    assert updates[state_of(demo, "config")] == text  # the job's own config, read-only ("edit a copy")
    assert updates[state_of(demo, "layout")]["readonly"] is True
    assert updates[by_id(demo, "config-yaml")].interactive is False
    assert updates[by_id(demo, "edit-copy")].visible is True

    monkeypatch.setenv("HF_TOKEN", "hf_test_bob")  # someone else opens the link: the config only
    updates = load_page(demo, job=the_id)
    assert by_id(demo, "job-id") not in updates and by_id(demo, "job-view") not in updates
    assert updates[state_of(demo, "config")] == text
    assert updates[by_id(demo, "kept-note")] == (
        "**Job link:** this job belongs to another account: only its owner sees its status, log and result; "
        "its link shows you its config only."
    )


@pytest.mark.parametrize("raw", ["abc123", "<img src=x onerror=alert(1)>" * 300, "[x](javascript:alert(1))", "0" * 31])
def test_hostile_job_link_is_refused_without_echo(served: tuple[gr.Blocks, str], raw: str) -> None:
    demo = served[0]
    updates = load_page(demo, job=raw)
    assert updates[by_id(demo, "kept-note")] == (
        "**Job link not opened:** this is not a job id: a job id is 32 hexadecimal characters (0-9, a-f); "
        "copy the job link again"
    )
    assert by_id(demo, "job-view") not in updates


def test_plain_page_load_leaves_the_config_alone(served: tuple[gr.Blocks, str]) -> None:
    demo = served[0]
    load = next(f for f in demo.fns.values() if f.name == "on_load")
    updates = load_page(demo)
    assert isinstance(updates, dict) and updates
    assert set(updates) <= set(load.outputs)
    assert state_of(demo, "config") not in updates and by_id(demo, "job-view") not in updates


def test_examples_fill_the_config_byte_for_byte(served: tuple[gr.Blocks, str]) -> None:
    from merger.config.load import load_config
    from merger.config.examples import load_examples
    from merger.stages import is_multi_stage, split_stages

    demo = served[0]
    on_example = handler(demo, "on_example")
    table, layout = by_id(demo, "examples"), state_of(demo, "layout")
    for index, example in enumerate(load_examples(app.EXAMPLES_DIR)):
        updates = on_example({table: index, layout: layout.value})
        text = updates[state_of(demo, "config")]
        assert text == example.yaml_text, example.name
        assert split_stages(text) if is_multi_stage(text) else load_config(text)


def test_cancel_of_an_unknown_job_says_so(client: Client, job_store: Path) -> None:
    with pytest.raises(AppError, match="this is not a job id"):
        client.predict("nope", api_name="/cancel")
    with pytest.raises(AppError, match="there is no job with this id"):
        client.predict("f" * 32, api_name="/cancel")


# ---------------------------------------------------------------- owners, caps and push targets


def test_only_the_owner_reads_or_cancels_others_get_the_config(
    client: Client, fixture_models_dir: Path, monkeypatch: pytest.MonkeyPatch, job_store: Path, hub
) -> None:
    text = slerp_yaml(fixture_models_dir)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    job_id = client.predict(text, "owned-merge", False, api_name="/submit")

    monkeypatch.setenv("HF_TOKEN", "hf_test_bob")
    for endpoint in ("/job_status", "/cancel", "/publish", "/discard"):  # the owner check comes before any other
        with pytest.raises(AppError) as caught:
            client.predict(job_id, api_name=endpoint)
        assert str(caught.value) == (
            "this job belongs to another account: only its owner sees its status, log and result; "
            "its link shows you its config only"
        )
    assert client.predict(job_id, api_name="/job_config") == text
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    for endpoint in ("/job_status", "/publish", "/discard"):
        with pytest.raises(AppError, match="sign in as its owner"):
            client.predict(job_id, api_name=endpoint)

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    status = client.predict(job_id, api_name="/job_status")
    assert status["status"] == "queued"  # bob's cancel changed nothing
    assert client.predict(job_id, api_name="/cancel") is True


def test_caps_refuse_the_next_submission_with_the_reason(
    client: Client, fixture_models_dir: Path, monkeypatch: pytest.MonkeyPatch, job_store: Path, hub
) -> None:
    monkeypatch.setattr(constants, "MAX_JOBS_PER_USER", 2)
    monkeypatch.setattr(constants, "MAX_JOBS_TOTAL", 3)
    text = slerp_yaml(fixture_models_dir)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    for i in range(2):
        client.predict(text, f"capped-{i}", False, api_name="/submit")
    with pytest.raises(AppError, match=r"you already have 2 unfinished job\(s\), the most one account may have here \(2\)"):
        client.predict(text, "capped-2", False, api_name="/submit")
    monkeypatch.setenv("HF_TOKEN", "hf_test_bob")
    client.predict(text, "bobs", False, api_name="/submit")
    monkeypatch.setenv("HF_TOKEN", "hf_test_mistralai")
    with pytest.raises(AppError, match=r"this app is full: 3 jobs are queued or running \(at most 3\)"):
        client.predict(text, "full", False, api_name="/submit")
    assert _job_count(job_store) == 3


@pytest.mark.parametrize(
    ("repo", "private", "reuse", "expected"),
    [
        ("bob/theirs", False, False, "you may not create or push to `bob/theirs`: `bob` is neither your account"),
        ("alice/app-existing", False, False, "`alice/app-existing` already exists; choose a new name, or allow reusing it"),
        ("alice/app-existing", True, True, "`alice/app-existing` exists and is public, but a private repo was asked for"),
        ("alice/bad--name", False, False, "`alice/bad--name` is not a valid Hub repo id"),
    ],
)
def test_submit_checks_the_push_target_before_anything_is_queued(
    client: Client, monkeypatch: pytest.MonkeyPatch, job_store: Path, hub, repo, private, reuse, expected
) -> None:
    from huggingface_hub import HfApi

    HfApi(token=TOKEN).create_repo("alice/app-existing", exist_ok=True)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    # An invalid config too: the target is refused first, so it must be the message.
    with pytest.raises(AppError) as caught:
        client.predict("merge_method: nope\n", repo, private, reuse, api_name="/submit")
    assert expected in str(caught.value)
    assert not (job_store / "jobs.db").exists() or _job_count(job_store) == 0


def test_submit_to_an_existing_repo_with_reuse(
    client: Client, fixture_models_dir: Path, monkeypatch: pytest.MonkeyPatch, job_store: Path, hub
) -> None:
    from huggingface_hub import HfApi

    from merger.jobs import store as jobs

    HfApi(token=TOKEN).create_repo("alice/app-reused", exist_ok=True)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    job_id = client.predict(slerp_yaml(fixture_models_dir), "app-reused", False, True, api_name="/submit")
    job = jobs.get_job(job_id)
    assert (job.repo_id, job.reuse_repo, job.private, job.owner) == ("alice/app-reused", True, False, "alice")


def test_the_app_log_is_scrubbed_httpx_lines_included() -> None:
    import logging

    from merger.scrub import install_log_scrubbing

    secret = "hf_" + "Tk9" * 12
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(logging.Formatter("%(name)s %(message)s").format(record))

    previous = logging.getLogRecordFactory()
    keep = Keep()
    logger = logging.getLogger("httpx")
    logger.addHandler(keep)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        install_log_scrubbing()
        install_log_scrubbing()  # twice is harmless
        logger.info('HTTP Request: %s %s "%s %d %s"', "GET", f"https://hf.co/api/models/{secret}", "HTTP/1.1", 401, "")
        try:
            raise RuntimeError(f"Authorization: Bearer {secret}")
        except RuntimeError:
            logging.getLogger("uvicorn.error").addHandler(keep)
            logging.getLogger("uvicorn.error").exception("request failed")
    finally:
        logging.setLogRecordFactory(previous)
        logger.removeHandler(keep)
        logger.setLevel(level)
        logging.getLogger("uvicorn.error").removeHandler(keep)
    assert lines[0] == 'httpx HTTP Request: GET https://hf.co/api/models/*** "HTTP/1.1 401 "'
    assert "RuntimeError: Authorization: Bearer ***" in lines[1]
    assert secret not in "".join(lines)


def test_job_status_says_when_no_worker_is_alive(
    client: Client, monkeypatch: pytest.MonkeyPatch, job_store: Path, hub
) -> None:
    import time

    from merger.jobs import queue
    from merger.jobs import worker_notes

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    the_id = queue.submit("merge_method: linear\n", "alice/waiting", TOKEN, "alice")
    worker_notes.beat(worker_notes.worker_id(4242))
    assert client.predict(the_id, api_name="/job_status")["worker"] is None  # a fresh heartbeat

    beat = worker_notes.last_heartbeat()
    monkeypatch.setattr(constants, "WORKER_STALE_S", 0)
    time.sleep(0.05)
    since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(beat))
    status = client.predict(the_id, api_name="/job_status")
    assert status["worker"] == f"No worker alive since {since}: queued jobs wait until a worker is running again."
    assert job_markdown(status).endswith(f"**Worker:** {status['worker']}")


# ---------------------------------------------------------------- one config, two views
def _method_yamls() -> list[str]:
    from merger.methods.registry import METHODS
    from merger.config.dump import dump_yaml
    from merger.ui import config_edits

    start = {"merge_method": "linear", "models": [{"model": "org/a", "parameters": {"weight": 1.0}},
                                                    {"model": "org/b", "parameters": {"weight": 1.0}}]}
    return [dump_yaml(config_edits.set_method(start, name)) for name in [*sorted(METHODS), "moe"]]


def test_pasting_any_example_or_method_keeps_its_bytes_and_shows_its_form(served: tuple[gr.Blocks, str]) -> None:
    from merger.config.examples import load_examples
    from merger.ui import config_stages, config_view

    demo = served[0]
    on_paste = handler(demo, "on_paste")
    code, layout = by_id(demo, "config-yaml"), state_of(demo, "layout")
    texts = [e.yaml_text for e in load_examples(app.EXAMPLES_DIR)] + _method_yamls()
    for text in texts:
        pasted = text + "# a trailing comment\n"
        updates = on_paste({code: pasted, layout: layout.value})
        assert updates[state_of(demo, "config")] == pasted
        assert isinstance(updates[code], type(gr.skip()))  # the editor is left alone while being typed in
        shown = updates[state_of(demo, "layout")]["structure"]
        first_stage = config_stages.stage_data(text, 0)  # a multi-stage config shows its first stage
        assert shown == config_view.view_of(first_stage).structure()
        assert updates[by_id(demo, "kept-note")] == ""  # the form shows every field of these configs


def test_a_second_merge_click_while_one_is_submitting_queues_nothing(
    served: tuple[gr.Blocks, str], job_store: Path, monkeypatch: pytest.MonkeyPatch, hub
) -> None:
    from merger.jobs import store as jobs
    from merger.ui import page_events

    demo = served[0]
    on_merge = handler(demo, "on_merge")
    values = {
        state_of(demo, "config"): "merge_method: linear\n",
        by_id(demo, "repo-id"): "twice",
        by_id(demo, "private"): False,
        by_id(demo, "reuse-repo"): False,
        by_id(demo, "evaluate"): True,
        by_id(demo, "review"): False,
        by_id(demo, "eval-source"): by_id(demo, "eval-source").value,
        by_id(demo, "eval-dataset"): "",
        by_id(demo, "eval-text"): "",
    }
    req = gr.Request()
    req.session_hash = "double-clicker"
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert page_events._guard.enter("double-clicker")  # the first click's submission is in flight
    try:
        updates = on_merge(values, req)
    finally:
        page_events._guard.leave("double-clicker")
    assert all(isinstance(u, type(gr.skip())) for u in updates.values())
    assert jobs.list_jobs("alice") == []
    with pytest.raises(gr.Error):  # once it is over, the next click is handled (here: refused, bad config)
        on_merge(values, req)
    assert page_events._guard.enter("double-clicker")  # and a refusal leaves the guard free
    page_events._guard.leave("double-clicker")


def test_my_jobs_lists_the_callers_jobs_newest_first(
    client: Client, job_store: Path, monkeypatch: pytest.MonkeyPatch, hub
) -> None:
    from merger.jobs import store as jobs
    from merger.jobs import queue

    first = queue.submit("merge_method: linear\n", "alice/first", TOKEN, "alice")
    second = queue.submit("merge_method: linear\n", "alice/second", TOKEN, "alice")
    queue.submit("merge_method: linear\n", "bob/theirs", "hf_test_bob", "bob")
    assert jobs.cancel(first, "alice")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    listed = client.predict(api_name="/my_jobs")
    assert [(j["id"], j["repo_id"], j["status"]) for j in listed] == [
        (second, "alice/second", "queued"),
        (first, "alice/first", "cancelled"),
    ]
    assert listed[0]["config_yaml"] == "merge_method: linear\n" and listed[0]["queue_position"] == 1


def test_the_served_app_caps_its_queue_and_uploads(served: tuple[gr.Blocks, str]) -> None:
    demo, _ = served
    assert demo._queue.max_size == app.QUEUE_MAX_SIZE == 64
    assert demo.max_file_size == 2**20  # gradio reads "1mb" as 1 MiB


def test_a_full_queue_is_refused_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    release = threading.Event()
    monkeypatch.setattr(app, "QUEUE_MAX_SIZE", 1)
    with gr.Blocks() as demo:  # one slow event, one at a time: the second call waits, the third finds the queue full
        box = gr.Textbox()
        box.submit(lambda text: (release.wait(20), text)[1], box, box, api_name="slow", concurrency_limit=1)
    app.serve(demo, prevent_thread_lock=True, server_name="127.0.0.1", server_port=_free_port(), quiet=True)
    try:
        client = Client(demo.local_url, verbose=False)
        running, waiting = client.submit("a", api_name="/slow"), None
        deadline = time.monotonic() + 10
        while running.status().code.name not in ("PROCESSING", "PROGRESS") and time.monotonic() < deadline:
            time.sleep(0.05)
        waiting = client.submit("b", api_name="/slow")
        while waiting.status().code.name != "IN_QUEUE" and time.monotonic() < deadline:
            time.sleep(0.05)
        started = time.monotonic()
        with pytest.raises(Exception, match="(?i)queue is full"):
            client.predict("c", api_name="/slow")
        assert time.monotonic() - started < 5
    finally:
        release.set()
        demo.close()


# ---------------------------------------------------------------- the form's editors in a session
def test_the_gradient_editor_in_a_session_edits_only_t_and_the_result_validates(
    served: tuple[gr.Blocks, str], client: Client, fixture_models_dir: Path
) -> None:
    """The classic preset, one point, one filter removed, each through its widget's own event in a rendered
    session; then `/validate` (gradio_client) plans the edited YAML with the fixture models."""
    from merger.ui import config_settings, config_view

    demo = served[0]
    config, layout = state_of(demo, "config"), state_of(demo, "layout")
    text = slerp_yaml(fixture_models_dir)
    before = config_view.parse(text)
    shown = {"stages": 0, "stage": 0, "revision": 0, "readonly": False}
    session = render_form(demo, text, shown)
    preset = widget(session, "global-t-preset")
    updates = fire(session, "global-t-preset", "input",
                   {config: text, layout: shown, preset: "classic attention/MLP schedule (SLERP)"})
    text, shown = updates[config], updates[layout]
    assert config_view.parse(text) == {**before, "parameters": {"t": config_settings.CLASSIC}}
    assert value_of(updates[by_id(demo, "config-yaml")]) == text.strip()  # the YAML view shows the edit
    assert shown["structure"][4] == [["filtered", [["gradient", 5], ["gradient", 5], "number"]]]

    # the same preset again (the browser repeats a dropdown's event): nothing changes, nothing re-renders
    again = fire(session, "global-t-preset", "input",
                 {config: text, layout: shown, preset: "classic attention/MLP schedule (SLERP)"})
    assert again[config] == text and isinstance(again[layout], type(gr.skip()))

    session = render_form(demo, text, shown)  # the layout changed: the page renders the points
    point = widget(session, "global-t-part-0-point-2")
    assert point.value == 0.3 and point.label == "at 0.5"
    text = fire(session, "global-t-part-0-point-2", "input", {config: text, layout: shown, point: 0.4})[config]
    updates = fire(session, "global-t-part-1-remove", "click", {config: text, layout: shown})
    text = updates[config]
    assert config_view.parse(text)["parameters"]["t"] == [{"filter": "self_attn", "value": [0, 0.5, 0.4, 0.7, 1]},
                                                          {"value": 0.5}]
    assert {k: v for k, v in config_view.parse(text).items() if k != "parameters"} == {
        k: v for k, v in before.items() if k != "parameters"}
    assert "SLERP" in client.predict(text, api_name="/validate").upper()


def test_a_multi_stage_config_in_a_session_edits_the_picked_stage_only(served: tuple[gr.Blocks, str]) -> None:
    demo = served[0]
    config, layout = state_of(demo, "config"), state_of(demo, "layout")
    first = "# stage one\nname: mid\nmerge_method: linear\nmodels:\n  - {model: org/a, parameters: {weight: 0.5}}\n" \
        "  - {model: org/b, parameters: {weight: 0.5}}\n"
    second = "---\nmerge_method: slerp   # the final\nbase_model: mid\nmodels: [{model: mid}, {model: org/c}]\n" \
        "parameters: {t: 0.3}\n"
    text = first + second
    shown = {"stages": 2, "stage": 1, "revision": 0, "readonly": False}
    session = render_form(demo, text, shown)
    assert widget(session, "method").value == "slerp" and widget(session, "stage-name").value == ""
    shown = fire(session, "stage-0", "click", {config: text, layout: shown})[layout]
    assert shown["stage"] == 0 and shown["stages"] == 2
    session = render_form(demo, text, shown)
    assert widget(session, "method").value == "linear" and widget(session, "stage-name").value == "mid"
    weight = widget(session, "param-1-weight")
    edited = fire(session, "param-1-weight", "input", {config: text, layout: shown, weight: 0.25})[config]
    assert edited.endswith(second)  # the other stage, its comment and the separator: byte for byte
    assert "weight: 0.25" in edited and edited.count("weight: 0.5") == 1
    updates = fire(session, "add-stage", "click", {config: edited, layout: shown})
    assert updates[layout]["stages"] == 3 and updates[layout]["stage"] == 2
    stage_one = edited[: -len(second)]
    assert stage_one.startswith("# stage one\nname: mid\n")  # the comment above the edited stage stays too
    assert updates[config].startswith(stage_one + "---\nname: stage-2\nmerge_method: slerp   # the final\n")


def test_moe_prompts_in_a_session(served: tuple[gr.Blocks, str]) -> None:
    """An expert's prompt added and typed through its widgets; every gate mode of the schema is offered."""
    from merger.ui import config_view

    demo = served[0]
    config, layout = state_of(demo, "config"), state_of(demo, "layout")
    text = "base_model: org/a\ngate_mode: random\nexperts:\n  - source_model: org/b\n  - source_model: org/c\n"
    shown = {"stages": 0, "stage": 0, "revision": 0, "readonly": False}
    session = render_form(demo, text, shown)
    modes = [value for _, value in widget(session, "option-gate_mode").choices]
    assert {"random", "uniform_random", "hidden", "cheap_embed"} <= set(modes)
    updates = fire(session, "model-1-positive_prompts-add", "click", {config: text, layout: shown})
    text, shown = updates[config], updates[layout]
    session = render_form(demo, text, shown)
    box = widget(session, "model-1-positive_prompts-0")
    text = fire(session, "model-1-positive_prompts-0", "input", {config: text, layout: shown, box: "def main():"})[config]
    assert config_view.parse(text)["experts"] == [{"source_model": "org/b"},
                                                  {"source_model": "org/c", "positive_prompts": ["def main():"]}]


def test_a_lora_typed_next_to_a_model_in_a_session(served: tuple[gr.Blocks, str]) -> None:
    """The LoRA box under a model: typed and committed, the reference becomes `model+lora`; cleared, plain."""
    demo = served[0]
    config, layout = state_of(demo, "config"), state_of(demo, "layout")
    text = "merge_method: linear  # two models\nmodels:\n  - model: org/a\n    parameters: {weight: 1}\n" \
        "  - model: {model: org/b, lora: org/old}\n    parameters: {weight: 1}\n"
    shown = {"stages": 0, "stage": 0, "revision": 0, "readonly": False}
    session = render_form(demo, text, shown)
    assert widget(session, "model-1-lora").value == "org/old" and widget(session, "model-0-lora").value == ""
    request = gr.Request(session_hash="lora-test")
    box = widget(session, "model-0-lora")
    text = fire(session, "model-0-lora", "blur", {config: text, layout: shown, box: " org/adapter "}, request)[config]
    assert text.startswith("merge_method: linear  # two models\n")  # the untouched key stays as typed
    assert "model: org/a+org/adapter" in text
    box = widget(session, "model-1-lora")
    text = fire(session, "model-1-lora", "blur", {config: text, layout: shown, box: ""}, request)[config]
    from merger.ui import config_view

    assert [m["model"] for m in config_view.parse(text)["models"]] == ["org/a+org/adapter", {"model": "org/b"}]
