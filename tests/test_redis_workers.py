"""Many workers on one queue: the Redis job store and huey's Redis queue, with real worker processes.

A redis-server is started on a free loopback port for this module (no persistence, in a temporary
folder). The unit tests run the Redis backend in-process (caps under a burst, the exactly-once claim,
every field round-tripped); the process test runs three `python -m merger.jobs.worker` processes
against it and the loopback Hub: one killed mid-upload, whose job a live worker fails and whose
half-made repo it deletes, then two that drain ten jobs, each run exactly once.

Skipped only when redis-server is missing outside CI (`.ci/run` installs Debian's).
"""

from __future__ import annotations

import json

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from helpers import free_port
from merger import constants
from merger.errors import JobLimitError
from merger.jobs import queue, worker_notes
from merger.jobs import store as jobs
from merger.jobs import review
from merger.jobs.recovery import recover_interrupted_jobs
from merger.jobs.store import JobStatus

CONFIG = "merge_method: linear\nmodels:\n  - model: a\n  - model: b\n"
TOKEN = "hf_" + "Rd5" * 12
STALE_S = 6  # the workers' heartbeat timeout in the process test: a killed worker is noticed within seconds

if shutil.which("redis-server") is None:
    if os.environ.get("CI") == "true":
        raise RuntimeError("redis-server is missing: .ci/run installs it (apt-get install redis-server)")
    pytest.skip("redis-server is not installed (CI installs it)", allow_module_level=True)

import redis  # noqa: E402 - after the skip: the package is only needed when a server runs


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A redis-server on a free loopback port, with no persistence, for this module's tests."""
    port = free_port()
    folder = tmp_path_factory.mktemp("redis")
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(folder)],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                raise
            time.sleep(0.05)
    yield url
    server.terminate()
    server.wait(timeout=10)


@pytest.fixture(autouse=True)
def on_redis(redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> redis.Redis:
    """This process's jobs and queue in the (emptied) Redis; a fresh queue key and data folder."""
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    monkeypatch.setattr(constants, "REDIS_URL", redis_url)
    monkeypatch.setattr(constants, "DATA_DIR", tmp_path / "app-data")
    monkeypatch.setenv(constants.QUEUE_KEY_ENV, Fernet.generate_key().decode())
    return client


# ---------------------------------------------------------------- the Redis store, in-process


def test_caps_hold_for_a_burst_of_concurrent_submissions(monkeypatch, on_redis):
    monkeypatch.setattr(constants, "MAX_JOBS_PER_USER", 2)
    monkeypatch.setattr(constants, "MAX_JOBS_TOTAL", 5)
    accepted, refused = _burst(lambda i: queue.submit(CONFIG, "alice/m", TOKEN, "alice"), 12)
    assert (len(accepted), len(refused)) == (2, 10)
    assert {str(err) for err in refused} == {
        "you already have 2 unfinished job(s), the most one account may have here (2); "
        "wait for one to finish or cancel one, then submit again"
    }
    # Twelve other owners at once: the total cap (5) admits three more, whoever they are.
    accepted_total, refused_total = _burst(lambda i: queue.submit(CONFIG, f"u{i}/m", TOKEN, f"u{i}"), 12)
    assert (len(accepted_total), len(refused_total)) == (3, 9)
    assert all("this app is full: 5 jobs are queued or running (at most 5)" in str(e) for e in refused_total)
    assert on_redis.zcard("merger:unfinished") == 5 and queue.get_huey().pending_count() == 5
    assert len(on_redis.keys("merger:job:*")) == 5  # the refused left no record

    assert jobs.cancel(accepted[0], "alice") is True  # a finished job no longer counts
    jobs.check_caps("alice")
    assert on_redis.zcard("merger:unfinished") == 4


def test_mark_running_is_a_compare_and_set_that_one_worker_wins(on_redis):
    job_id = jobs.create_record(CONFIG, "alice/m", TOKEN, "alice")
    claims, _ = _burst(lambda i: f"w{i}" if jobs.mark_running(job_id, f"w{i}") else None, 16)
    winners = [claim for claim in claims if claim]
    assert len(winners) == 1
    job = jobs.get_job(job_id)
    assert (job.status, job.worker) == (JobStatus.RUNNING, winners[0])
    assert jobs.mark_running(job_id, "late") is False  # running already: nobody else claims it

    cancelled = jobs.create_record(CONFIG, "alice/n", TOKEN, "alice")
    assert jobs.cancel(cancelled, "alice") is True
    assert jobs.mark_running(cancelled, "w") is False  # a cancelled job never starts
    assert jobs.get_job(cancelled).status is JobStatus.CANCELLED


def test_every_field_round_trips_and_listings_match_sqlite_semantics(on_redis):
    first = jobs.create_record(CONFIG, "alice/a", TOKEN, "alice", private=True)
    second = jobs.create_record(CONFIG, "alice/b", TOKEN, "alice", reuse_repo=True)
    third = jobs.create_record(CONFIG, "bob/c", TOKEN, "bob")
    assert [jobs.queue_position(j) for j in (first, second, third)] == [1, 2, 3]

    assert jobs.mark_running(first, "host:1")
    jobs.record_progress(first, 0.25, "model.layers.0.mlp.up_proj.weight", "line 1\nline 2")
    assert jobs.queue_position(first) is None and jobs.queue_position(second) == 1
    assert jobs.cancel(first, "alice") is True  # running: only the flag
    assert jobs.is_cancel_requested(first) and not jobs.is_cancel_requested(second)
    assert jobs.mark_finished(first, JobStatus.CANCELLED) is True
    assert jobs.mark_finished(first, JobStatus.FAILED, error="late") is False  # final states are final
    record_progress_after_finish = jobs.get_job(first).updated_at
    jobs.record_progress(first, 0.9, "x", "y")  # ignored: not running
    job = jobs.get_job(first)
    assert job.updated_at == record_progress_after_finish
    assert asdict(job) | {"created_at": 0, "updated_at": 0} == {
        "id": first, "config_yaml": CONFIG, "repo_id": "alice/a", "private": True, "status": JobStatus.CANCELLED,
        "progress": 0.25, "current_tensor": "model.layers.0.mlp.up_proj.weight", "log_tail": "line 1\nline 2",
        "result_url": None, "error": None, "cancel_requested": True, "created_at": 0, "updated_at": 0,
        "owner": "alice", "reuse_repo": False, "error_type": None, "worker": "host:1", "options": None,
        "evaluation": None,
    }
    assert [j.id for j in jobs.list_jobs("alice")] == [second, first]  # newest first
    assert [j.id for j in jobs.list_jobs("alice", limit=1)] == [second]
    assert jobs.get_job(second).reuse_repo is True and jobs.get_job("0" * 32) is None

    assert jobs.mark_running(second, "host:dead") and jobs.mark_running(third, "host:alive")
    assert jobs.fail_running_jobs("gone", lambda worker: worker == "host:dead") == 1
    assert [jobs.get_job(j).status for j in (second, third)] == [JobStatus.FAILED, JobStatus.RUNNING]
    assert jobs.get_job(second).error == "gone"
    assert on_redis.zrange("merger:unfinished", 0, -1) == [third.encode()]

    # a review's changes go through the same compare-and-set: the evaluation kept, awaiting review unfinished
    review.record_evaluation(third, {"table": "| model | bits/token |", "models": {"merge": 7.25}})
    assert review.mark_awaiting_review(third, log_tail="merged")
    staged = jobs.get_job(third)
    assert json.loads(staged.evaluation)["models"] == {"merge": 7.25} and staged.status is JobStatus.AWAITING_REVIEW
    assert on_redis.zrange("merger:unfinished", 0, -1) == [third.encode()]  # it still holds the worker's disk
    assert review.request_publish(third, "bob") == third and jobs.get_job(third).status is JobStatus.QUEUED


def test_heartbeats_expire_on_the_server_and_dead_workers_jobs_are_failed(monkeypatch, on_redis, tmp_path):
    monkeypatch.setattr(constants, "WORKER_STALE_S", 1)
    alive, dead = jobs.create_record(CONFIG, "alice/a", TOKEN, "alice"), jobs.create_record(CONFIG, "alice/b", TOKEN, "alice")
    worker_notes.beat("host:1")
    worker_notes.beat("host:2")
    assert jobs.mark_running(alive, "host:1") and jobs.mark_running(dead, "host:2")
    work = constants.DATA_DIR / "work"
    for job_id in (alive, dead):
        (work / job_id).mkdir(parents=True)
    time.sleep(0.6)
    worker_notes.beat("host:1")
    time.sleep(0.6)  # host:2's beat is 1.2 s old: its key expired
    assert worker_notes.is_alive("host:1") and not worker_notes.is_alive("host:2")
    assert 0 <= time.time() - worker_notes.last_heartbeat() < 1

    assert recover_interrupted_jobs("its worker vanished") == 1
    assert jobs.get_job(alive).status is JobStatus.RUNNING and (work / alive).is_dir()
    failed = jobs.get_job(dead)
    assert (failed.status, failed.error) == (
        JobStatus.FAILED,
        "This job stopped before it finished: its worker vanished. Its partial output was deleted. "
        "Nothing was pushed. Submit the job again.",
    )
    assert not (work / dead).exists()
    assert TOKEN.encode() not in b"".join(on_redis.dump(key) or b"" for key in on_redis.keys("merger:*"))


def test_with_redis_the_queue_key_must_come_from_the_environment(monkeypatch):
    monkeypatch.delenv(constants.QUEUE_KEY_ENV)
    with pytest.raises(KeyError, match="MERGER_QUEUE_KEY must be set for the app and every worker"):
        queue.ensure_queue_key()
    assert not constants.DATA_DIR.exists()  # no key file made that other machines could not read


# ---------------------------------------------------------------- real worker processes


@pytest.fixture
def workers(redis_url: str, tmp_path: Path) -> Iterator[Callable[[str], tuple[subprocess.Popen, Path]]]:
    """Start `python -m merger.jobs.worker` processes on the Redis; each machine has its own data folder."""
    started: list[subprocess.Popen] = []

    def start(name: str, machine: str) -> tuple[subprocess.Popen, Path]:
        log = tmp_path / f"{name}.log"
        env = dict(
            os.environ, REDIS_URL=redis_url, MERGER_DATA_DIR=str(tmp_path / f"data-{machine}"),
            MERGER_WORKER_STALE_S=str(STALE_S), PYTHONPATH=str(Path(__file__).parents[1]),
        )
        with open(log, "ab") as out:
            process = subprocess.Popen([sys.executable, "-m", "merger.jobs.worker"], env=env, stdout=out,
                                       stderr=subprocess.STDOUT)
        started.append(process)
        return process, log

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)


def test_two_workers_drain_ten_jobs_once_each_after_a_third_is_killed_mid_upload(
    hub, fixture_models_dir, workers, tmp_path, monkeypatch
):
    monkeypatch.setattr(constants, "MAX_JOBS_PER_USER", 20)
    config = "merge_method: linear\nmodels:\n" + "".join(
        f"  - model: {fixture_models_dir / name}\n    parameters: {{weight: 0.5}}\n"
        for name in ("mistral-base", "mistral-code")
    )
    held = threading.Event()
    monkeypatch.setattr(hub.store, "hold_commits", held)  # the first upload stays in flight

    # 1. Worker A takes the only job and is killed while its commit is in flight. B and C start once A
    # has claimed it (a worker's start takes seconds: they start while A merges); C on A's machine.
    a, log_a = workers("a", machine="one")
    killed_repo = "alice/redis-killed"
    killed = queue.submit(config, killed_repo, hub.token, hub.user)
    _wait_until(lambda: jobs.get_job(killed).status is JobStatus.RUNNING, [log_a])
    (b, log_b), (c, log_c) = workers("b", machine="two"), workers("c", machine="one")
    _wait_until(lambda: ("model", killed_repo) in hub.store.repos and worker_notes.pending_repos(), [log_a])
    assert jobs.get_job(killed).worker == worker_notes.worker_id(a.pid)
    a.send_signal(signal.SIGKILL)
    a.wait(timeout=30)
    killed_at = time.monotonic()

    assert (tmp_path / "data-one" / "work" / killed).is_dir()  # its merge output, on its machine

    # 2. B or C notices A's heartbeat stopped, fails its job and deletes its repo; C deletes A's work
    # folder once the job is failed.
    _wait_until(lambda: jobs.get_job(killed).status.finished, [log_b, log_c], timeout=30)
    job = jobs.get_job(killed)
    assert (job.status, job.error) == (
        JobStatus.FAILED,
        "This job stopped before it finished: its worker stopped sending heartbeats (it was killed, ran out of "
        "memory, or lost its machine or network). Its partial output was deleted. Nothing was pushed: the repo "
        f"`{killed_repo}` this job created was deleted. Submit the job again.",
    )
    assert ("model", killed_repo) not in hub.store.repos and worker_notes.pending_repos() == []
    print(f"killed worker's job failed {time.monotonic() - killed_at:.1f} s after the kill")
    held.set()  # A's orphaned commit arrives now, to a repo that no longer exists
    monkeypatch.setattr(hub.store, "hold_commits", None)

    # 3. B and C drain ten jobs: each runs exactly once.
    ids = {worker_notes.worker_id(b.pid), worker_notes.worker_id(c.pid)}
    _wait_until(lambda: all(worker_notes.is_alive(w) for w in ids), [log_b, log_c])
    started = time.monotonic()
    submitted = {queue.submit(config, f"alice/redis-drain-{i}", hub.token, hub.user): f"alice/redis-drain-{i}"
                 for i in range(10)}
    twice = next(iter(submitted))
    queue.enqueue(twice, hub.token)  # huey hands this job out a second time: the claim must refuse it
    _wait_until(lambda: all(jobs.get_job(j).status.finished for j in submitted), [log_b, log_c])
    drained_s = time.monotonic() - started
    logs = _read(log_b) + _read(log_c)
    for job_id, repo in submitted.items():
        job = jobs.get_job(job_id)
        assert (job.status, job.error) == (JobStatus.SUCCEEDED, None), logs
        assert logs.count(f"Job {job_id}: merging for {repo}.") == 1  # one worker ran it, once
        commits = hub.store.repos[("model", repo)]["commits"]
        assert [c["title"] for c in commits][0] == "initial commit" and len(commits) == 2  # created, pushed once
    assert logs.count(f"Job {twice} was cancelled or claimed before it started; skipped.") == 1
    assert {jobs.get_job(j).worker for j in submitted} == ids, "both workers took jobs"
    assert ("model", killed_repo) not in hub.store.repos
    assert queue.get_huey().pending_count() == 0
    assert not (tmp_path / "data-one" / "work" / killed).exists()
    print(f"ten jobs drained by two workers in {drained_s:.1f} s")

    for process in (b, c):  # a clean stop
        process.send_signal(signal.SIGTERM)
    assert (b.wait(timeout=30), c.wait(timeout=30)) == (0, 0), logs
    assert hub.token not in _read(log_a) + _read(log_b) + _read(log_c)


# ---------------------------------------------------------------- helpers


def _burst(call: Callable[[int], object], count: int) -> tuple[list, list[Exception]]:
    """Run `call(i)` in `count` threads released together; returns (results, JobLimitErrors raised)."""
    results, refused = [], []
    barrier = threading.Barrier(count)

    def run(i: int) -> None:
        barrier.wait()
        try:
            results.append(call(i))
        except JobLimitError as err:
            refused.append(err)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return results, refused


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def _wait_until(predicate: Callable[[], bool], logs: list[Path], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out; worker logs:\n" + "\n".join(_read(log)[-3000:] for log in logs))
        time.sleep(0.1)
