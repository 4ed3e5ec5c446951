"""The job queue: records, the merge task's state transitions, the consumer process, token secrecy.

In-process tests run the task through huey's immediate mode (or dequeue it by hand) with the engine
and the Hub push monkeypatched; the consumer-process test runs the real engine and pushes to the
loopback Hub (conftest's `hub` fixture), so it checks what really crosses the process boundary.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography.fernet import Fernet
from huggingface_hub import HfApi

from merger import constants, engine
from merger.publish import hub_push, stream_push
from merger.jobs import recovery, store as jobs, worker, worker_notes
from merger.jobs.supervisor import WorkerSupervisor
from merger.jobs import queue
from merger.scrub import scrub_log
from merger.errors import JobAccessError, JobLimitError, MergeCancelled, ModelNotFoundError
from merger.jobs.store import JobStatus

TOKEN = "hf_" + "Zq7" * 12  # shaped like a real user token
REPO = "alice/merged"
OWNER = "alice"
CONFIG = "merge_method: linear\nmodels:\n  - model: a\n  - model: b\n"


@pytest.fixture(autouse=True)
def data_dir(job_store: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh job store for every test (conftest's `job_store`), ten jobs per user."""
    monkeypatch.setattr(constants, "MAX_JOBS_PER_USER", 10)
    return job_store


@pytest.fixture
def immediate(data_dir: Path) -> None:
    """Run tasks synchronously inside `submit`, as the consumer would."""
    queue.get_huey().immediate = True


@pytest.fixture
def pushes(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Replace the Hub push; each commit is recorded with the files it would have uploaded."""
    calls: list[dict] = []

    class FakePush:
        def __init__(self, repo_id: str, token: str, *, private: bool = False, reuse_repo: bool = False,
                     before_create=None):
            self.target = hub_push.PushTarget(repo_id, exists=False, private=private)
            self.token = token

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            pass

        def __call__(self, shard: Path, sha256: bytes | None = None) -> None:
            pass

        def commit(self, folder: Path) -> str:
            calls.append({"files": sorted(p.name for p in folder.iterdir()), "repo_id": self.target.repo_id,
                          "token": self.token, "private": self.target.private})
            return f"https://hub.test/{self.target.repo_id}"

    monkeypatch.setattr(stream_push, "StreamPush", FakePush)
    return calls


def fake_engine(monkeypatch: pytest.MonkeyPatch, body: Callable[..., None]) -> list[dict]:
    """Replace run_merge with one that writes a config.json and then runs `body(out_dir, **kwargs)`."""
    calls: list[dict] = []

    def run_merge(config_text, out_dir, *, device="auto", token=None, title=None, progress=None, should_cancel=None,
                  evaluate=None, on_shard=None):
        assert evaluate is None  # these jobs have no options: not evaluated
        calls.append({"config": config_text, "out_dir": out_dir, "token": token, "title": title})
        out_dir.mkdir(parents=True)
        (out_dir / "config.json").write_text("{}")
        body(out_dir, progress=progress, should_cancel=should_cancel)

    monkeypatch.setattr(engine, "run_merge", run_merge)
    return calls


def job_id_of(out_dir: Path) -> str:
    """The job id, from the work folder the task gave the engine (`DATA_DIR/work/<id>/model`)."""
    return out_dir.parent.name


# ---------------------------------------------------------------- in-process: the task's transitions


def test_success_reports_progress_then_result(immediate, pushes, monkeypatch, caplog, data_dir):
    caplog.set_level(logging.INFO, logger="merger")
    seen = []

    def body(out_dir, progress, should_cancel):
        job_id = job_id_of(out_dir)
        seen.append(jobs.get_job(job_id))  # before any progress
        time.sleep(worker._WRITE_INTERVAL_S)  # since the last write (the "Merging" log line)
        progress(0.5, "model.layers.0.mlp.up_proj.weight")
        seen.append(jobs.get_job(job_id))  # written
        progress(0.75, "model.layers.1.mlp.up_proj.weight")
        seen.append(jobs.get_job(job_id))  # throttled: still the previous report
        logging.getLogger("merger.engine").info("loaded 2 models")
        assert should_cancel() is False
        progress(1.0, "lm_head.weight")

    calls = fake_engine(monkeypatch, body)
    job_id = queue.submit(CONFIG, REPO, TOKEN, OWNER, private=True)

    assert [(j.status, j.progress, j.current_tensor) for j in seen] == [
        (JobStatus.RUNNING, 0.0, ""),
        (JobStatus.RUNNING, 0.5, "model.layers.0.mlp.up_proj.weight"),
        (JobStatus.RUNNING, 0.5, "model.layers.0.mlp.up_proj.weight"),
    ]
    job = jobs.get_job(job_id)
    assert job.status is JobStatus.SUCCEEDED
    assert job.result_url == "https://hub.test/alice/merged"
    assert job.error is None
    assert (job.progress, job.current_tensor) == (1.0, "lm_head.weight")
    assert (job.config_yaml, job.repo_id, job.private) == (CONFIG, REPO, True)
    assert job.created_at <= job.updated_at
    tail = [line.split(" ", 1)[1] for line in job.log_tail.splitlines()]  # drop the HH:MM:SS stamps
    assert tail == [
        f"Job {job_id}: merging for alice/merged.",
        "loaded 2 models",
        f"Job {job_id}: uploading to alice/merged.",
        f"Job {job_id}: pushed https://hub.test/alice/merged",
    ]
    # The engine got the real token and the repo id as the card's title (its usage snippet loads it by
    # that id); the push got the folder.
    out_dir = data_dir / "work" / job_id / "model"
    assert calls == [{"config": CONFIG, "out_dir": out_dir, "token": TOKEN, "title": REPO}]
    assert pushes == [{"files": ["config.json"], "repo_id": REPO, "token": TOKEN, "private": True}]
    assert not (data_dir / "work" / job_id).exists()
    assert TOKEN.encode() not in (data_dir / "jobs.db").read_bytes() + _wal(data_dir / "jobs.db")


def test_merger_error_fails_with_its_message(immediate, pushes, monkeypatch, data_dir):
    message = "model `./missing`: no such local directory (/x/missing); check the path"

    def body(out_dir, progress, should_cancel):
        raise ModelNotFoundError(message)

    fake_engine(monkeypatch, body)
    job_id = queue.submit(CONFIG, REPO, TOKEN, OWNER)

    job = jobs.get_job(job_id)
    assert (job.status, job.error, job.result_url) == (JobStatus.FAILED, f"{message} Nothing was pushed to the Hub.", None)
    assert pushes == []
    assert not (data_dir / "work" / job_id).exists()
    assert jobs.cancel(job_id, OWNER) is False  # finished jobs cannot be cancelled


def test_unexpected_error_is_generic_and_the_token_is_scrubbed(immediate, pushes, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="merger")

    def body(out_dir, progress, should_cancel):
        raise RuntimeError(f"request with Authorization: Bearer {TOKEN} failed")

    fake_engine(monkeypatch, body)
    job_id = queue.submit(CONFIG, REPO, TOKEN, OWNER)

    job = jobs.get_job(job_id)
    assert job.status is JobStatus.FAILED
    assert job.error == "The merge failed unexpectedly (RuntimeError); the worker log has the details."
    # The traceback reached the log, scrubbed, as one record; the tail kept only its first line.
    [record] = [r for r in caplog.records if "unexpectedly" in r.getMessage()]
    assert "RuntimeError: request with Authorization: Bearer *** failed" in record.getMessage()
    assert TOKEN not in caplog.text
    assert job.log_tail.splitlines()[-1].endswith(f"Job {job_id} failed unexpectedly (RuntimeError):")
    assert TOKEN not in job.log_tail


def test_cancel_while_running_stops_at_the_next_tensor(immediate, pushes, monkeypatch):
    polls = []

    def body(out_dir, progress, should_cancel):
        job_id = job_id_of(out_dir)
        assert jobs.cancel(job_id, OWNER) is True
        job = jobs.get_job(job_id)
        assert (job.status, job.cancel_requested) == (JobStatus.RUNNING, True)
        polls.append(should_cancel())
        raise MergeCancelled("the merge was cancelled; nothing was written or pushed")

    fake_engine(monkeypatch, body)
    job_id = queue.submit(CONFIG, REPO, TOKEN, OWNER)

    assert polls == [True]
    job = jobs.get_job(job_id)
    assert (job.status, job.error, job.result_url) == (JobStatus.CANCELLED, None, None)
    assert pushes == []
    assert jobs.cancel(job_id, OWNER) is False


def test_cancel_after_the_merge_skips_the_upload(immediate, pushes, monkeypatch):
    fake_engine(monkeypatch, lambda out_dir, **_: jobs.cancel(job_id_of(out_dir), OWNER))
    job_id = queue.submit(CONFIG, REPO, TOKEN, OWNER)

    assert jobs.get_job(job_id).status is JobStatus.CANCELLED
    assert pushes == []


def test_worker_shutdown_fails_the_running_job(immediate, pushes, monkeypatch):
    def body(out_dir, progress, should_cancel):
        worker._SHUTDOWN.set()  # what SIGTERM does in the consumer
        assert should_cancel() is True
        raise MergeCancelled("the merge was cancelled; nothing was written or pushed")

    fake_engine(monkeypatch, body)
    job_id = queue.submit(CONFIG, REPO, TOKEN, OWNER)

    job = jobs.get_job(job_id)
    assert (job.status, job.error) == (JobStatus.FAILED, worker.INTERRUPTED_MESSAGE)


# ---------------------------------------------------------------- in-process: the real SQLite queue


def test_queued_job_cancelled_never_runs(pushes, monkeypatch, data_dir):
    calls = fake_engine(monkeypatch, lambda out_dir, **_: None)
    job_id = queue.submit(CONFIG, REPO, TOKEN, OWNER)
    assert jobs.get_job(job_id).status is JobStatus.QUEUED
    assert TOKEN.encode() not in (data_dir / "queue.db").read_bytes() + _wal(data_dir / "queue.db")

    assert jobs.cancel(job_id, OWNER) is True
    assert jobs.get_job(job_id).status is JobStatus.CANCELLED
    huey = queue.get_huey()
    huey.execute(huey.dequeue())  # what the consumer does next

    assert calls == [] and pushes == []
    assert jobs.get_job(job_id).status is JobStatus.CANCELLED
    assert huey.pending_count() == 0


def test_job_queued_under_another_key_fails_asking_to_resubmit(pushes, monkeypatch):
    calls = fake_engine(monkeypatch, lambda out_dir, **_: None)
    job_id = queue.submit(CONFIG, REPO, TOKEN, OWNER)
    monkeypatch.setenv(constants.QUEUE_KEY_ENV, Fernet.generate_key().decode())  # the app restarted
    huey = queue.get_huey()
    huey.execute(huey.dequeue())

    job = jobs.get_job(job_id)
    assert (job.status, job.error) == (JobStatus.FAILED, worker.TOKEN_LOST_MESSAGE)
    assert calls == []


def test_recovery_fails_jobs_left_running_and_clears_work(monkeypatch, data_dir):
    running = queue.submit(CONFIG, REPO, TOKEN, OWNER)
    queued = queue.submit(CONFIG, REPO, TOKEN, OWNER)
    assert jobs.mark_running(running) is True
    staging = data_dir / "work" / running / ".model.partial-123"
    staging.mkdir(parents=True)
    (staging / "model-00001-of-00002.safetensors").write_bytes(b"\0" * 64)

    recovery.recover_interrupted_jobs()

    failed = jobs.get_job(running)
    assert failed.status is JobStatus.FAILED
    assert failed.error == (
        "This job stopped before it finished: the worker process stopped unexpectedly (it was killed, ran out of "
        "memory, or the app restarted). Its partial output was deleted. Nothing was pushed. Submit the job again."
    )
    assert jobs.get_job(queued).status is JobStatus.QUEUED
    assert not (data_dir / "work").exists()


def test_recovery_leaves_the_jobs_of_live_workers_alone(data_dir):
    live, dead, known_dead = (queue.submit(CONFIG, REPO, TOKEN, OWNER) for _ in range(3))
    worker_notes.beat("host:1")
    worker_notes.beat("host:3")  # alive by its heartbeat, but its process is known to have exited
    for job_id, worker_id in ((live, "host:1"), (dead, "host:2"), (known_dead, "host:3")):
        assert jobs.mark_running(job_id, worker_id)
        (data_dir / "work" / job_id).mkdir(parents=True)

    assert recovery.recover_interrupted_jobs("it stopped", dead_worker="host:3") == 2

    assert [jobs.get_job(j).status for j in (live, dead, known_dead)] == [JobStatus.RUNNING, JobStatus.FAILED,
                                                                         JobStatus.FAILED]
    assert [p.name for p in (data_dir / "work").iterdir()] == [live]  # only the live worker's folder stays
    assert recovery.recover_interrupted_jobs(every_worker=True) == 1  # a lone embedded consumer starting
    assert jobs.get_job(live).status is JobStatus.FAILED and not (data_dir / "work").exists()


def test_unknown_job():
    assert jobs.get_job("0" * 32) is None
    with pytest.raises(JobAccessError, match="there is no job with this id"):
        jobs.cancel("0" * 32, OWNER)


@pytest.mark.parametrize("bad_id", ["abc123", "0" * 31, "0" * 33, "A" * 32, "../" + "0" * 29, "<b>x</b>" * 1000])
def test_malformed_job_id_is_refused_without_echo(bad_id):
    for call in (lambda: jobs.owned_job(bad_id, OWNER), lambda: jobs.cancel(bad_id, OWNER),
                 lambda: jobs.shared_config(bad_id)):
        with pytest.raises(JobAccessError) as caught:
            call()
        message = str(caught.value)
        assert message.startswith("this is not a job id: a job id is 32 hexadecimal characters")
        assert bad_id not in message and "<b>" not in message and len(message) < 150


def test_job_and_queue_databases_are_created_owner_only(data_dir):
    old = os.umask(0o022)  # the usual umask, under which a new file is world-readable
    try:
        queue.submit(CONFIG, REPO, TOKEN, OWNER)
    finally:
        os.umask(old)
    for name in ("jobs.db", "queue.db"):
        assert (data_dir / name).stat().st_mode & 0o777 == 0o600, name


@pytest.mark.parametrize("config", [f"# my token: {TOKEN}\n{CONFIG}", CONFIG + "  # hf_test_alice\n"])
def test_config_holding_a_token_is_never_recorded(config, data_dir):
    from merger.errors import TokenInConfigError

    with pytest.raises(TokenInConfigError, match=r"looks like a Hugging Face token \(`hf_...`\) on line \d") as caught:
        queue.submit(config, REPO, "hf_test_alice", OWNER)  # the parser's one check, the submitter's own token too
    assert TOKEN not in str(caught.value) and "hf_test_alice" not in str(caught.value)
    assert not (data_dir / "jobs.db").exists() or _count_jobs(data_dir) == 0


def test_only_the_owner_reads_or_cancels_a_job_others_see_its_config():
    job_id = queue.submit(CONFIG, REPO, TOKEN, "alice")

    assert jobs.owned_job(job_id, "alice").status is JobStatus.QUEUED
    for caller, words in (("bob", "only its owner sees its status"), (None, "sign in as its owner")):
        with pytest.raises(JobAccessError, match=words):
            jobs.owned_job(job_id, caller)
        with pytest.raises(JobAccessError, match="belongs to another account"):
            jobs.cancel(job_id, caller)
    assert jobs.get_job(job_id).status is JobStatus.QUEUED and not jobs.get_job(job_id).cancel_requested
    assert jobs.shared_config(f" {job_id} ") == CONFIG  # what a job link shows anyone
    assert jobs.cancel(job_id, "alice") is True
    assert jobs.get_job(job_id).status is JobStatus.CANCELLED


def test_caps_per_user_and_in_total(monkeypatch, data_dir):
    monkeypatch.setattr(constants, "MAX_JOBS_PER_USER", 2)
    monkeypatch.setattr(constants, "MAX_JOBS_TOTAL", 3)
    first = queue.submit(CONFIG, REPO, TOKEN, "alice")
    queue.submit(CONFIG, REPO, TOKEN, "alice")
    with pytest.raises(JobLimitError) as caught:
        queue.submit(CONFIG, REPO, TOKEN, "alice")
    assert str(caught.value) == (
        "you already have 2 unfinished job(s), the most one account may have here (2); "
        "wait for one to finish or cancel one, then submit again"
    )
    queue.submit(CONFIG, "bob/m", TOKEN, "bob")  # bob has his own cap; the app now holds 3
    with pytest.raises(JobLimitError, match=r"this app is full: 3 jobs are queued or running \(at most 3\)"):
        jobs.check_caps("carol")
    with pytest.raises(JobLimitError, match="this app is full"):
        queue.submit(CONFIG, "carol/m", TOKEN, "carol")
    assert _count_jobs(data_dir) == 4 - 1  # the refused submissions left no record
    assert queue.get_huey().pending_count() == 3  # nor a queue entry

    assert jobs.cancel(first, "alice") is True  # a finished job no longer counts
    queue.submit(CONFIG, REPO, TOKEN, "alice")


def test_caps_hold_for_a_burst_of_concurrent_submissions(monkeypatch, data_dir):
    monkeypatch.setattr(constants, "MAX_JOBS_PER_USER", 2)
    accepted, refused = [], []

    def submit():
        try:
            accepted.append(queue.submit(CONFIG, REPO, TOKEN, "alice"))
        except JobLimitError:
            refused.append(1)

    threads = [threading.Thread(target=submit) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert (len(accepted), len(refused)) == (2, 10)
    assert _count_jobs(data_dir) == 2


def test_queue_key_is_created_once_in_the_data_dir_for_its_owner_only(monkeypatch, data_dir):
    monkeypatch.delenv(constants.QUEUE_KEY_ENV)
    queue.ensure_queue_key()
    key_file = data_dir / "queue.key"
    key = os.environ[constants.QUEUE_KEY_ENV]
    assert key_file.read_text() == key and len(Fernet(key.encode()).encrypt(b"x")) > 0
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in data_dir.iterdir()] == ["queue.key"]  # no draft left

    monkeypatch.delenv(constants.QUEUE_KEY_ENV)  # a restarted app: same data dir, no key in its environment
    queue.ensure_queue_key()
    assert os.environ[constants.QUEUE_KEY_ENV] == key

    given = Fernet.generate_key().decode()
    monkeypatch.setenv(constants.QUEUE_KEY_ENV, given)  # a key in the environment wins
    queue.ensure_queue_key()
    assert os.environ[constants.QUEUE_KEY_ENV] == given and key_file.read_text() == key


def test_scrub_hides_tokens_of_any_job():
    assert scrub_log(f"token={TOKEN}; other=hf_{'a' * 30} short=hf_abc") == "token=***; other=*** short=hf_abc"


# ---------------------------------------------------------------- the consumer process


@pytest.fixture
def consumer(data_dir: Path) -> Iterator[tuple[subprocess.Popen, Path]]:
    """A consumer subprocess on this test's databases; stopped (SIGTERM) at the end if still running."""
    data_dir.mkdir(parents=True, exist_ok=True)
    log = data_dir.parent / "worker.log"
    process = worker.start_consumer_process(log_file=log)
    yield process, log
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_consumer_process_runs_jobs_end_to_end(hub, fixture_models_dir, consumer, data_dir, tmp_path):
    process, log = consumer
    cancelled = queue.submit(CONFIG, f"{hub.user}/never", hub.token, hub.user)
    assert jobs.cancel(cancelled, OWNER) is True
    missing = tmp_path / "no-such-model"
    bad_config = f"merge_method: linear\nmodels:\n  - model: {missing}\n    parameters: {{weight: 1.0}}\n"
    bad = queue.submit(bad_config, f"{hub.user}/bad", hub.token, hub.user)
    good_config = "merge_method: linear\nmodels:\n" + "".join(
        f"  - model: {fixture_models_dir / name}\n    parameters: {{weight: 0.5}}\n"
        for name in ("mistral-base", "mistral-code")
    )
    good = queue.submit(good_config, f"{hub.user}/merged-tiny", hub.token, hub.user)

    _wait_until(lambda: jobs.get_job(good).status.finished, log)  # FIFO: the other two ran first

    assert jobs.get_job(cancelled).status is JobStatus.CANCELLED
    failed = jobs.get_job(bad)
    assert failed.status is JobStatus.FAILED, _read(log)
    assert str(missing) in failed.error
    done = jobs.get_job(good)
    assert done.status is JobStatus.SUCCEEDED, f"{done.error}\n{_read(log)}"
    assert done.result_url == f"{hub.url}/{hub.user}/merged-tiny"
    assert done.progress == 1.0 and done.current_tensor
    assert f"Job {good}: uploading to alice/merged-tiny." in done.log_tail
    files = HfApi(endpoint=hub.url, token=hub.token).list_repo_files(f"{hub.user}/merged-tiny")
    assert {"config.json", "model.safetensors.index.json", "mergekit_config.yml"} <= set(files)
    assert not any((data_dir / "work").iterdir())
    assert queue.get_huey().pending_count() == 0
    assert time.time() - worker_notes.last_heartbeat() < 3 * constants.WORKER_HEARTBEAT_S  # it says it is alive

    # SIGTERM stops the consumer cleanly.
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0, _read(log)
    assert "Consumer exiting." in _read(log)

    # The token is in no file: neither database (nor their WAL files) nor the worker's log.
    stored = [p for p in data_dir.iterdir() if p.is_file()] + [log]
    assert {p.name for p in stored} >= {"queue.db", "jobs.db", "worker.log"}
    for path in stored:
        assert hub.token.encode() not in path.read_bytes(), path


def test_worker_alone_refuses_to_start_with_an_invalid_key(data_dir):
    env = dict(os.environ, MERGER_DATA_DIR=str(data_dir), PYTHONPATH=str(Path(__file__).parents[1]))
    env[constants.QUEUE_KEY_ENV] = "not-a-fernet-key"
    result = subprocess.run(
        [sys.executable, "-m", "merger.jobs.worker"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "MERGER_QUEUE_KEY must hold the app's Fernet key" in result.stderr
    assert "not-a-fernet-key" not in result.stderr
    assert not data_dir.exists()  # it touched nothing


# ---------------------------------------------------------------- push failures (loopback Hub, in-process task)


def _write_model_only(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """A fake merge that writes a small model folder (the push to the loopback Hub is real)."""

    def body(out_dir, progress, should_cancel):
        (out_dir / "model.safetensors").write_bytes(b"weights")

    return fake_engine(monkeypatch, body)


@pytest.mark.parametrize("failure", [503, "drop"])
def test_hub_failing_mid_push_fails_the_job_and_deletes_the_repo_it_created(
    hub, immediate, monkeypatch, data_dir, failure
):
    _write_model_only(monkeypatch)
    monkeypatch.setattr(hub.store, "fail_commits", failure)  # 503: the Hub refuses; "drop": it is gone mid-upload
    repo = f"alice/mid-push-{failure}"

    job_id = queue.submit(CONFIG, repo, hub.token, hub.user)

    job = jobs.get_job(job_id)
    assert job.status is JobStatus.FAILED
    cause = "failed on the Hub (HTTP 503" if failure == 503 else "failed: could not reach the Hub"
    assert job.error.startswith(f"pushing to `{repo}` {cause}"), job.error
    assert job.error.endswith(f"Nothing was pushed: the repo `{repo}` this job created was deleted.")
    assert ("model", repo) not in hub.store.repos
    assert worker_notes.pending_repos() == []
    assert not (data_dir / "work" / job_id).exists()


def test_job_to_an_existing_repo_without_reuse_fails_before_the_merge(hub, immediate, monkeypatch):
    calls = _write_model_only(monkeypatch)
    HfApi(token=hub.token).create_repo("alice/taken-meanwhile")  # created after submit, before the job ran
    commits = list(hub.store.repos[("model", "alice/taken-meanwhile")]["commits"])

    job_id = queue.submit(CONFIG, "alice/taken-meanwhile", hub.token, hub.user)

    job = jobs.get_job(job_id)
    assert job.status is JobStatus.FAILED
    assert job.error.startswith("`repo`: `alice/taken-meanwhile` already exists; choose a new name")
    assert calls == []  # refused before the merge
    assert hub.store.repos[("model", "alice/taken-meanwhile")]["commits"] == commits


def test_job_with_reuse_pushes_a_new_commit_and_keeps_visibility(hub, immediate, monkeypatch):
    _write_model_only(monkeypatch)
    HfApi(token=hub.token).create_repo("alice/reused-private", private=True)

    job_id = queue.submit(CONFIG, "alice/reused-private", hub.token, hub.user, private=False, reuse_repo=True)

    job = jobs.get_job(job_id)
    assert (job.status, job.error) == (JobStatus.SUCCEEDED, None)
    repo = hub.store.repos[("model", "alice/reused-private")]
    assert repo["private"] is True and "model.safetensors" in repo["commits"][-1]["files"]


def test_worker_start_sweeps_repos_created_but_never_committed(hub, monkeypatch, data_dir):
    api = HfApi(token=hub.token)
    empty, full = queue.submit(CONFIG, "alice/swept-empty", hub.token, hub.user), queue.submit(
        CONFIG, "alice/swept-full", hub.token, hub.user
    )
    for job_id, repo in ((empty, "alice/swept-empty"), (full, "alice/swept-full")):
        assert jobs.mark_running(job_id)
        worker_notes.record_pending_repo(job_id, repo, queue.seal(hub.token))
        api.create_repo(repo)
    api.upload_file(path_or_fileobj=b"{}", path_in_repo="config.json", repo_id="alice/swept-full")  # it had landed

    recovery.recover_interrupted_jobs()

    assert not api.repo_exists("alice/swept-empty") and api.repo_exists("alice/swept-full")
    assert jobs.get_job(empty).error == (
        "This job stopped before it finished: the worker process stopped unexpectedly (it was killed, ran out of "
        "memory, or the app restarted). Its partial output was deleted. Nothing was pushed: the repo "
        "`alice/swept-empty` this job created was deleted. Submit the job again."
    )
    assert "The repo `alice/swept-full` holds the uploaded files; it was kept." in jobs.get_job(full).error
    assert worker_notes.pending_repos() == []
    assert hub.token.encode() not in (data_dir / "jobs.db").read_bytes() + _wal(data_dir / "jobs.db")


def test_two_workers_sweeping_at_once_tell_the_owner_the_repo_was_deleted(hub, monkeypatch, data_dir):
    """One sweeper is held just after it forgets the repo's note; the other sweeps meanwhile."""
    job_id = queue.submit(CONFIG, "alice/raced", hub.token, hub.user)
    assert jobs.mark_running(job_id, "host:dead")
    worker_notes.record_pending_repo(job_id, "alice/raced", queue.seal(hub.token))
    HfApi(token=hub.token).create_repo("alice/raced")
    note_forgotten, go_on = threading.Event(), threading.Event()
    forget = worker_notes.clear_pending_repo

    def forget_then_hold(forgotten_job: str) -> None:
        forget(forgotten_job)
        note_forgotten.set()
        go_on.wait(30)

    monkeypatch.setattr(worker_notes, "clear_pending_repo", forget_then_hold)
    first = threading.Thread(target=recovery.recover_interrupted_jobs, args=("it stopped",))
    first.start()
    assert note_forgotten.wait(30)
    recovery.recover_interrupted_jobs("it stopped")  # the second sweeper, between the first's two steps
    go_on.set()
    first.join(30)

    assert jobs.get_job(job_id).error == (
        "This job stopped before it finished: it stopped. Its partial output was deleted. Nothing was pushed: "
        "the repo `alice/raced` this job created was deleted. Submit the job again."
    )
    assert not HfApi(token=hub.token).repo_exists("alice/raced") and worker_notes.pending_repos() == []


# ---------------------------------------------------------------- faults with real worker processes

# A consumer whose merge reports each tensor slowly, so that a test can kill it mid-merge.
_SLOW_WORKER = """
import sys, time
from merger.jobs import worker
report = worker._Reporter.progress
def slow(self, fraction, message):
    time.sleep(0.25)
    report(self, fraction, message)
worker._Reporter.progress = slow
sys.exit(worker.main([]))
"""


def _good_config(fixture_models_dir: Path) -> str:
    return "merge_method: linear\nmodels:\n" + "".join(
        f"  - model: {fixture_models_dir / name}\n    parameters: {{weight: 0.5}}\n"
        for name in ("mistral-base", "mistral-code")
    )


def _worker_env(data_dir: Path) -> dict[str, str]:
    return dict(
        os.environ,
        MERGER_DATA_DIR=str(data_dir),
        MERGER_QUEUE_DB=str(data_dir / "queue.db"),
        MERGER_JOBS_DB=str(data_dir / "jobs.db"),
        PYTHONPATH=str(Path(__file__).parents[1]),
    )


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
        process.wait(timeout=30)


def test_worker_killed_mid_merge_is_restarted_and_its_job_failed(hub, fixture_models_dir, data_dir, tmp_path):
    data_dir.mkdir(parents=True, exist_ok=True)
    log = tmp_path / "worker.log"
    starts = []

    def start() -> subprocess.Popen:  # the first worker is slow; the watchdog's restart is a normal one
        if starts:
            process = worker.start_consumer_process(log_file=log)
        else:
            with open(log, "ab") as out:
                process = subprocess.Popen([sys.executable, "-c", _SLOW_WORKER], env=_worker_env(data_dir),
                                           stdout=out, stderr=subprocess.STDOUT)
        starts.append(process)
        return process

    killed = queue.submit(_good_config(fixture_models_dir), "alice/killed-mid-merge", hub.token, hub.user)
    after = queue.submit(_good_config(fixture_models_dir), "alice/after-the-kill", hub.token, hub.user)
    supervisor = WorkerSupervisor(start=start, interval=0.2)
    try:
        work = data_dir / "work" / killed
        _wait_until(lambda: jobs.get_job(killed).progress > 0 and any(work.rglob("*.safetensors")), log)
        staged = sorted(p.name for p in work.iterdir())
        assert staged and staged[0].startswith(".model.partial-"), staged  # the merge was writing its staging folder
        os.kill(starts[0].pid, signal.SIGKILL)

        _wait_until(lambda: jobs.get_job(killed).status.finished, log, timeout=30)
        job = jobs.get_job(killed)
        assert (job.status, job.error) == (
            JobStatus.FAILED,
            "This job stopped before it finished: the worker process was killed by SIGKILL while it ran. "
            "Its partial output was deleted. Nothing was pushed. Submit the job again.",
        )
        assert not work.exists()
        _wait_until(lambda: jobs.get_job(after).status.finished, log)
        assert jobs.get_job(after).status is JobStatus.SUCCEEDED, _read(log)
        assert (supervisor.restarts, len(starts)) == (1, 2) and supervisor.process is starts[1]
        assert ("model", "alice/killed-mid-merge") not in hub.store.repos
        assert ("model", "alice/after-the-kill") in hub.store.repos
        assert not (data_dir / "work" / after).exists()  # nothing of either job stays on the app's disk
        assert worker_notes.pending_repos() == []
        assert time.time() - worker_notes.last_heartbeat() < 10  # the new worker's heartbeat
    finally:
        supervisor.stop(timeout=30)
        for process in starts:
            _stop(process)


def test_worker_killed_mid_upload_the_next_worker_deletes_the_repo(hub, fixture_models_dir, data_dir, tmp_path, monkeypatch):
    data_dir.mkdir(parents=True, exist_ok=True)
    log = tmp_path / "worker.log"
    held = threading.Event()
    monkeypatch.setattr(hub.store, "hold_commits", held)  # the upload stays in flight until the test says
    repo = "alice/killed-mid-upload"
    job_id = queue.submit(_good_config(fixture_models_dir), repo, hub.token, hub.user)
    first = worker.start_consumer_process(log_file=log)
    second = None
    try:
        _wait_until(lambda: ("model", repo) in hub.store.repos and worker_notes.pending_repos(), log)
        assert [(j, r) for j, r, _ in worker_notes.pending_repos()] == [(job_id, repo)]
        time.sleep(0.5)  # into the held commit
        first.kill()
        first.wait(timeout=30)
        monkeypatch.setattr(hub.store, "fail_commits", 503)  # the orphaned commit, once let go, must not land
        held.set()
        assert jobs.get_job(job_id).status is JobStatus.RUNNING  # nobody has noticed yet

        second = worker.start_consumer_process(log_file=log)  # a worker restart: its start sweeps
        _wait_until(lambda: jobs.get_job(job_id).status.finished, log)
        job = jobs.get_job(job_id)
        assert job.status is JobStatus.FAILED
        assert job.error == (
            "This job stopped before it finished: the worker process stopped unexpectedly (it was killed, ran out "
            f"of memory, or the app restarted). Its partial output was deleted. Nothing was pushed: the repo `{repo}` "
            "this job created was deleted. Submit the job again."
        )
        assert ("model", repo) not in hub.store.repos
        assert worker_notes.pending_repos() == []
        assert not (data_dir / "work" / job_id).exists()
    finally:
        held.set()
        _stop(first)
        if second is not None:
            _stop(second)


def test_queued_job_survives_an_app_restart_with_the_key_in_the_data_dir(
    hub, fixture_models_dir, data_dir, tmp_path, monkeypatch
):
    monkeypatch.delenv(constants.QUEUE_KEY_ENV)  # no key given: the app keeps one in its data dir
    env = {k: v for k, v in _worker_env(data_dir).items() if k != constants.QUEUE_KEY_ENV}
    submit = (
        "import sys; from merger.jobs import queue; "
        "print(queue.submit(sys.stdin.read(), 'alice/after-restart', 'hf_test_alice', 'alice'))"
    )
    # The first app process queues the job and exits (as a restart would end it), before any worker ran.
    done = subprocess.run([sys.executable, "-c", submit], input=_good_config(fixture_models_dir), env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    job_id = done.stdout.strip()
    assert jobs.get_job(job_id).status is JobStatus.QUEUED
    key_file = data_dir / "queue.key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert b"hf_test_alice" not in (data_dir / "queue.db").read_bytes() + _wal(data_dir / "queue.db")

    log = tmp_path / "worker.log"
    process = worker.start_consumer_process(log_file=log)  # the new app's worker: no key in the environment either
    try:
        _wait_until(lambda: jobs.get_job(job_id).status.finished, log)
        job = jobs.get_job(job_id)
        assert (job.status, job.error) == (JobStatus.SUCCEEDED, None), _read(log)
        assert "model.safetensors.index.json" in hub.store.repos[("model", "alice/after-restart")]["commits"][-1]["files"]
        assert not (data_dir / "work" / job_id).exists()  # the pushed output is not kept on the app's disk
        for name in ("queue.key", "queue.db", "jobs.db", "queue.db-wal", "jobs.db-wal"):  # owner-only, SQLite's too
            path = data_dir / name
            assert not path.exists() or path.stat().st_mode & 0o777 == 0o600, (name, oct(path.stat().st_mode))
    finally:
        _stop(process)


def test_a_job_on_a_full_disk_fails_naming_the_space_and_leaves_nothing(hub, fixture_models_dir, data_dir, tmp_path,
                                                                        monkeypatch):
    mount = tmp_path / "small-disk"  # a 2 MB tmpfs holds the job's work folder; the merge needs 2.4 MB
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        monkeypatch.setattr(constants, "DATA_DIR", mount)  # the records stay in data_dir: only the work is short
        queue.get_huey().immediate = True
        repo = "alice/full-disk"

        job_id = queue.submit(_good_config(fixture_models_dir), repo, hub.token, hub.user)

        job = jobs.get_job(job_id)
        assert (job.status, job.error_type) == (JobStatus.FAILED, "DiskSpaceError"), job.error
        assert "needs about" in job.error and "MB free" in job.error, job.error
        assert job.error.endswith("Nothing was pushed to the Hub.") and str(mount) not in job.error, job.error
        assert ("model", repo) not in hub.store.repos and worker_notes.pending_repos() == []
        assert [p for p in mount.rglob("*") if p.is_file()] == []  # no staging, no partial shard
    finally:
        subprocess.run(["umount", str(mount)], check=True)


# ---------------------------------------------------------------- helpers


def _count_jobs(data: Path) -> int:
    import sqlite3

    with sqlite3.connect(data / "jobs.db") as conn:
        return conn.execute("select count(*) from jobs").fetchone()[0]


def _wal(db: Path) -> bytes:
    wal = db.with_name(db.name + "-wal")
    return wal.read_bytes() if wal.exists() else b""


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def _wait_until(predicate: Callable[[], bool], log: Path, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out; worker log:\n{_read(log)}")
        time.sleep(0.1)
