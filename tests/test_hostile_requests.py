"""Every hostile request of the catalogue, through every channel that takes it, is refused with its named
error, in bounded time, memory and words, echoing no more than a short excerpt, and leaving nothing
behind: no output folder, no staging, no job record, no repo on the (loopback) Hub.

How the error's class reaches each channel (see docs/decisions.md, "Error labels"):
- the app: `gradio_client`'s `AppError.title` is the class name (`merger.ui.common.user_errors`), the message the sentence;
- the CLI: stderr is one line, `error: ClassName: message`, and the exit status 2.

The CLI channels call `merger.cli.main` in this process (a fresh `python -m merger` costs seconds
per entry on a shared machine); `test_the_cli_process_prints_one_line` runs a few entries as real
processes to show the same answer reaches a terminal.
"""

from __future__ import annotations

import contextlib
import io
import resource
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from gradio_client.exceptions import AppError

import merger.errors
from app_harness import TOKEN, served_app
from hostile_requests import (CATALOGUE, GOOD_HUB_MODEL, LOCAL_MODELS, LOCAL_ONLY, MODEL_BUILDERS, HostileRequest,
                              broken_model_reference)
from test_model_files import write_model

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "data" / "fixtures"
VALID_CONFIG = (
    "merge_method: slerp\nbase_model: tests/data/fixtures/mistral-prose\nmodels:\n"
    "  - model: tests/data/fixtures/mistral-prose\n  - model: tests/data/fixtures/mistral-code\n"
    "parameters:\n  t: 0.5\n"
)
SUGGEST_CONFIG = (  # what /suggest would search: a base and two fine-tunes of it
    "merge_method: ties\nbase_model: tests/data/fixtures/mistral-base\nmodels:\n"
    "  - model: tests/data/fixtures/mistral-prose\n    parameters: {weight: 1, density: 0.5}\n"
    "  - model: tests/data/fixtures/mistral-code\n    parameters: {weight: 1, density: 0.5}\n"
)
SUGGEST_BUDGET = (2, 0.5)  # candidates, minutes
SUBMIT_REPO = "hostile-target"  # a new repo alice may create: only the entry's own fault refuses the job
MAX_SECONDS = {"cli": 20.0, "app": 10.0, "job": 90.0}  # the CLI's first call imports torch; a job starts a worker
MAX_MESSAGE = 1000  # characters of an error message
MAX_ECHO = 120  # the longest run of the hostile input an error may repeat
MAX_RSS_GROWTH = 300 * 2**20  # bytes the process's peak memory may grow by, per entry


@dataclass
class Answer:
    """What a channel answered: the error's class name (None: no error), its message, the seconds taken,
    and who answered (`cli`, `app`, or `job`: a queued job's final status)."""

    error: str | None
    message: str
    seconds: float
    kind: str


@dataclass
class Context:
    """What the channels need: the app's client, the loopback Hub, a scratch folder, the app's data folder."""

    client: object
    hub: object
    tmp: Path
    data: Path


# ---------------------------------------------------------------- channels
def _cli(args: list[str]) -> Answer:
    from merger.cli import main

    err, out = io.StringIO(), io.StringIO()
    start = time.monotonic()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = main(args)
    seconds = time.monotonic() - start
    text = err.getvalue()
    assert code == 2, f"exit status {code}; stderr: {text[:300]!r}; stdout: {out.getvalue()[:300]!r}"
    assert text.endswith("\n"), f"not one line: {text[:500]!r}"
    # Before the error a run may draw progress bars (downloads, tensors): lines a terminal redraws (`\r`).
    *bars, line = text[:-1].split("\n")
    assert all(bar.startswith("\r") for bar in bars), f"not one line: {text[:500]!r}"
    assert line.startswith("error: ") and "Traceback" not in text
    name, _, message = line[len("error: "):].partition(": ")
    return Answer(name, message, seconds, "cli")


def _run_args(entry: HostileRequest, ctx: Context) -> list[str]:
    config = _write_config(entry.value if entry.field == "config" else VALID_CONFIG, ctx)
    out = ctx.tmp / "out"
    if entry.field == "out":
        out = Path(entry.value.format(tmp=ctx.tmp, fixtures=FIXTURES))
    args = ["run", str(config), str(out), "--device", "cpu"]
    if entry.field == "repo":
        args += ["--push-to", entry.value] + ["--private"] * entry.private + ["--reuse-repo"] * entry.reuse
    return args


def _app(ctx: Context, *args: object, api_name: str) -> Answer:
    start = time.monotonic()
    try:
        result = ctx.client.predict(*args, api_name=api_name)
    except AppError as err:
        return Answer(err.title, err.message, time.monotonic() - start, "app")
    return Answer(None, str(result), time.monotonic() - start, "app")


def _submit(entry: HostileRequest, ctx: Context) -> Answer:
    """`/submit`; when it queued a job, the job's own answer, from the module's worker.

    An entry with a `while_queued` action gets a worker of its own, started after the action: the job
    must still be queued when it happens.
    """
    if entry.while_queued:
        _stop_worker()
    elif _WORKER.get("process") is None:
        from merger.jobs.worker import start_consumer_process

        _WORKER["process"] = start_consumer_process(log_file=ctx.data / "worker.log")  # one for the module
    if entry.field == "repo":
        answer = _app(ctx, VALID_CONFIG, entry.value, entry.private, entry.reuse, api_name="/submit")
    elif entry.field in ("eval_dataset", "eval_text", "eval_both"):
        dataset = {"eval_dataset": entry.value, "eval_both": "org/name:test"}.get(entry.field, "")
        text = "" if entry.field == "eval_dataset" else entry.value
        answer = _app(ctx, VALID_CONFIG, SUBMIT_REPO, False, False, True, False, dataset, text, api_name="/submit")
    else:
        answer = _app(ctx, entry.value, SUBMIT_REPO, False, False, api_name="/submit")
    if answer.error is not None or not entry.while_queued:
        return answer if answer.error is not None else _final_status(ctx, job_id=answer.message)
    from merger.jobs.worker import start_consumer_process

    WHILE_QUEUED[entry.while_queued](ctx)
    _WORKER["process"] = start_consumer_process(log_file=ctx.data / "worker.log")
    try:
        return _final_status(ctx, job_id=answer.message)
    finally:
        _stop_worker()


_WORKER: dict[str, object] = {}  # the worker process that runs this module's jobs, started at the first


def _stop_worker() -> None:
    process = _WORKER.pop("process", None)
    if process is not None:
        process.terminate()
        process.wait(timeout=60)


def _final_status(ctx: Context, job_id: str) -> Answer:
    start = time.monotonic()
    while time.monotonic() - start < MAX_SECONDS["job"]:
        status = ctx.client.predict(job_id, api_name="/job_status")
        if status["status"] in ("succeeded", "failed", "cancelled"):
            assert status["status"] == "failed", status
            return Answer(status["error_type"], status["error"], time.monotonic() - start, "job")
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not end in {MAX_SECONDS['job']}s")


def _revoke_write_role(ctx: Context) -> None:
    ctx.hub.store.orgs["hostile-writers"]["alice"] = "read"


WHILE_QUEUED = {"revoke-write-role": _revoke_write_role}


def _preflight(entry: HostileRequest, ctx: Context) -> Answer:
    """`/preflight`: the checklist has lines, not error classes, so a failing line stands for the entry's error
    (its detail and fix are the message the other rules check)."""
    config, repo = (VALID_CONFIG, entry.value) if entry.field == "repo" else (entry.value, SUBMIT_REPO)
    start = time.monotonic()
    try:
        result = ctx.client.predict(config, repo, entry.private, entry.reuse, api_name="/preflight")
    except AppError as err:
        return Answer(err.title, err.message, time.monotonic() - start, "app")
    failing = [f"{line['name']}: {line['detail']} {line.get('fix') or ''}" for line in result["lines"] if not line["ok"]]
    assert result["ok"] == (not failing)
    return Answer(entry.error if failing else None, "\n".join(failing), time.monotonic() - start, "app")


def _suggest(entry: HostileRequest, ctx: Context) -> Answer:
    """`/suggest` with the entry's config, text or budget (the others valid)."""
    config, (candidates, minutes), text = SUGGEST_CONFIG, SUGGEST_BUDGET, ""
    if entry.field == "config":
        config = entry.value
    elif entry.field == "suggest_text":
        text = entry.value
    elif entry.field == "budget":
        candidates, minutes = (_number(part) for part in entry.value.split())
    return _app(ctx, config, candidates, minutes, text, api_name="/suggest")


def _number(text: str) -> object:
    try:
        return float(text) if "." in text else int(text)
    except ValueError:
        return text


CHANNELS = {
    "cli_validate": lambda e, ctx: _cli(["validate", str(_write_config(e.value, ctx))]),
    "cli_run": lambda e, ctx: _cli(_run_args(e, ctx)),
    "app_validate": lambda e, ctx: _app(ctx, e.value, api_name="/validate"),
    "app_submit": _submit,
    "app_share": lambda e, ctx: _app(ctx, e.value, api_name="/share"),
    "app_load_link": lambda e, ctx: _app(ctx, e.value, api_name="/load_link"),
    "app_job_status": lambda e, ctx: _app(ctx, e.value, api_name="/job_status"),
    "app_job_config": lambda e, ctx: _app(ctx, e.value, api_name="/job_config"),
    "app_cancel": lambda e, ctx: _app(ctx, e.value, api_name="/cancel"),
    "app_publish": lambda e, ctx: _app(ctx, e.value, api_name="/publish"),
    "app_discard": lambda e, ctx: _app(ctx, e.value, api_name="/discard"),
    "app_preflight": _preflight,
    "app_weight_report": lambda e, ctx: _app(ctx, e.value, api_name="/weight_report"),
    "app_suggest": _suggest,
}


def _write_config(text: str, ctx: Context) -> Path:
    path = ctx.tmp / "config.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))  # a lone surrogate becomes the bytes a file would hold
    return path


# ---------------------------------------------------------------- what must hold
def _longest_echo(message: str, value: str) -> int:
    """Length of the longest run of `value` repeated in `message`, up to MAX_ECHO + 1."""
    width = MAX_ECHO + 1
    if len(value) < width:
        return len(value) if value and value in message else 0
    return width if any(message[i : i + width] in value for i in range(len(message) - width + 1)) else 0


def _state(ctx: Context) -> dict[str, object]:
    """Everything a refused request must leave as it was: files, job records, staging, Hub repos."""
    jobs_db = ctx.data / "jobs.db"
    jobs = 0
    if jobs_db.exists():
        with contextlib.closing(sqlite3.connect(jobs_db)) as conn:
            jobs = conn.execute("select count(*) from jobs").fetchone()[0]
    work = ctx.data / "work"
    return {
        "scratch": sorted((str(p), p.stat().st_size) for p in ctx.tmp.rglob("*") if p.name != "config.yaml"),
        "fixtures": sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in FIXTURES.rglob("*")),
        "jobs": jobs,
        "staging": sorted(p.name for p in work.iterdir()) if work.exists() else [],
        "hub": sorted((str(key), len(repo["commits"])) for key, repo in ctx.hub.store.repos.items()),  # no new commit
    }


def send_through_channels(entry: HostileRequest, ctx: Context) -> dict[str, Answer]:
    """Send `entry` through each of its channels and check every rule for each answer.

    Returns:
        channel name -> the answer (for reports).
    """
    answers, before = {}, _state(ctx)
    for channel in entry.routes():
        peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        answer = CHANNELS[channel](entry, ctx)
        where = f"{entry.id} via {channel}"
        assert answer.error == entry.error, f"{where}: {answer.error}: {answer.message[:300]!r}"
        assert answer.seconds < MAX_SECONDS[answer.kind], f"{where}: {answer.seconds:.1f}s"
        assert len(answer.message) <= MAX_MESSAGE, f"{where}: {len(answer.message)} characters"
        assert _longest_echo(answer.message, entry.value) <= MAX_ECHO, f"{where} echoes: {answer.message[:300]!r}"
        assert "Traceback" not in answer.message and 'File "' not in answer.message
        after = _state(ctx)
        if answer.kind == "job":  # the failed job's record stays, and says what happened
            before["jobs"] = int(before["jobs"]) + 1
        assert after == before, f"{where} left something behind"
        assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - peak_before < MAX_RSS_GROWTH, where
        answers[channel] = answer
    return answers


# ---------------------------------------------------------------- the tests
@pytest.fixture(scope="module")
def app_client(hub, tmp_path_factory):
    import shutil

    from huggingface_hub import HfApi

    HfApi(token=hub.token).create_repo("alice/hostile-existing", exist_ok=True)
    hub.store.orgs["hostile-readers"] = {"alice": "read"}
    hub.upload_model(write_model(tmp_path_factory.mktemp("good")), GOOD_HUB_MODEL)
    LOCAL_MODELS.mkdir(parents=True, exist_ok=True)
    try:
        with served_app(tmp_path_factory.mktemp("data")) as (client, _):
            yield client
    finally:
        _stop_worker()
        shutil.rmtree(LOCAL_MODELS, ignore_errors=True)


def _build_broken_model(model: str, hub, scratch: Path) -> None:
    """Build the entry's broken model where its config names it: on the loopback Hub, or in LOCAL_MODELS."""
    if model in LOCAL_ONLY:
        MODEL_BUILDERS[model](LOCAL_MODELS / model)
        return
    MODEL_BUILDERS[model](scratch / model)
    hub.upload_model(scratch / model, broken_model_reference(model))


@pytest.fixture
def ctx(app_client, hub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Context:
    hub.store.orgs["hostile-writers"] = {"alice": "write"}  # until an entry revokes it
    monkeypatch.chdir(ROOT)  # the configs name the fixtures relative to the repo
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    (tmp_path / "file").write_text("not a folder")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("keep me")
    from merger import constants

    return Context(app_client, hub, tmp_path, constants.DATA_DIR)


@pytest.mark.parametrize("entry", CATALOGUE, ids=[e.id for e in CATALOGUE])
def test_hostile_request_is_refused_by_name_quickly_briefly_and_leaves_nothing(
    entry: HostileRequest, ctx: Context, monkeypatch: pytest.MonkeyPatch, tmp_path_factory
) -> None:
    if entry.requires and not hasattr(merger.errors, entry.requires):
        pytest.skip(f"needs {entry.requires} (the bounded parser's branch)")  # its limits come first
    if entry.space:
        from merger import constants
        from merger.ui import api, common

        monkeypatch.setattr(constants, "ON_SPACE", True)
        for module in (api, common):  # a signed-in visitor, wherever the endpoints read the token
            monkeypatch.setattr(module, "token_of", lambda oauth_token=None: TOKEN)
    if entry.model:
        _build_broken_model(entry.model, ctx.hub, tmp_path_factory.mktemp("broken"))
    send_through_channels(entry, ctx)


# The kinds of hostile input, each with the catalogue's categories that hold it and how many it needs.
KINDS = {
    "YAML bombs": ({"alias bomb", "yaml", "multi-document"}, 10),
    "depth": ({"depth"}, 4),
    "size": ({"size", "echo"}, 12),
    "links": ({"share link", "link"}, 15),
    "paths": ({"local path on a Space", "CLI output"}, 12),
    "templates": ({"template"}, 6),
    "parameters": ({"parameter"}, 30),
    "files": ({"model file"}, 40),
    "repos": ({"push target", "token"}, 12),
    "ids": ({"job id", "model id"}, 18),
    "options": ({"evaluation option", "suggest input"}, 20),
}


def test_catalogue_counts_per_kind_cannot_silently_shrink() -> None:
    counts = {kind: sum(e.category in categories for e in CATALOGUE) for kind, (categories, _) in KINDS.items()}
    print("\nhostile catalogue:", ", ".join(f"{kind} {n}" for kind, n in counts.items()), f"; total {len(CATALOGUE)}")
    assert all(counts[kind] >= least for kind, (_, least) in KINDS.items()), counts
    assert sum(counts.values()) == len(CATALOGUE) >= 180  # every entry is of one kind
    channels = [c for e in CATALOGUE for c in e.routes()]
    assert sum(c.startswith("cli_") for c in channels) >= 150 and channels.count("app_validate") >= 120
    assert channels.count("app_submit") >= 150


def test_catalogue_is_large_ids_unique_and_channels_known() -> None:
    assert len(CATALOGUE) >= 30
    assert len({e.id for e in CATALOGUE}) == len(CATALOGUE)
    assert all(set(e.routes()) <= set(CHANNELS) for e in CATALOGUE)
    assert all(hasattr(merger.errors, e.error) or e.requires == e.error for e in CATALOGUE)


def test_an_echo_check_that_can_fail() -> None:
    value = "x" * 500
    assert _longest_echo("error: `" + "x" * 100 + "…`", value) <= MAX_ECHO
    assert _longest_echo("error: `" + "x" * 300 + "`", value) > MAX_ECHO
    assert _longest_echo("model `org/a` not found", "org/a") == 5


@pytest.mark.parametrize("entry_id", ["repo-other-user", "out-proc", "model-too-long-for-a-file-name",
                                      "config-billion-laughs"])
def test_the_cli_process_prints_one_line(entry_id: str, hub, tmp_path: Path) -> None:
    entry = next(e for e in CATALOGUE if e.id == entry_id)
    (tmp_path / "file").write_text("not a folder")
    ctx = Context(None, hub, tmp_path, tmp_path / "data")
    args = _run_args(entry, ctx)
    env = {**__import__("os").environ, "HF_TOKEN": TOKEN}
    done = subprocess.run([sys.executable, "-m", "merger", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(f"error: {entry.error}: "), done.stderr[-2000:]
    assert "Traceback" not in done.stderr and not (tmp_path / "out").exists()


def test_model_and_repo_echoes_use_the_one_excerpt() -> None:
    from merger.config.schema import ModelReference
    from merger.errors import ConfigError, ModelNotFoundError, excerpt
    from merger.publish.hub_push import check_repo_id
    from merger.io.resolve import local_path

    hostile = "./x`y\n" + "z" * 500
    with pytest.raises(ModelNotFoundError) as missing:
        local_path(ModelReference(model=hostile))
    assert f"model `{excerpt(hostile, 100)}`" in str(missing.value)
    with pytest.raises(ConfigError) as invalid:
        check_repo_id("alice/`" + "\n" * 300)
    assert f"`repo`: `{excerpt('alice/`' + chr(10) * 300, 100)}` is not" in str(invalid.value)
