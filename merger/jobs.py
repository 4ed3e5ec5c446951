"""Merge jobs: their records, and the API the app uses to submit, poll and cancel them.

The app never merges: :func:`submit` writes a record and hands the job to the worker process
(:mod:`merger.worker`) through huey's queue. The records live in their own SQLite table at
`constants.JOBS_DB`, which both processes read and write; every change is one short statement in WAL
mode, and each status change is a compare-and-set on the current status, so a cancel racing with the
worker's start can never leave a job both cancelled and running.

Paths are looked up on :mod:`merger.constants` at call time, so tests can point them elsewhere.
"""

from __future__ import annotations

import sqlite3
import time
import uuid
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from . import constants

_BUSY_TIMEOUT_S = 10.0  # how long a statement waits for the other process's write to finish

_SCHEMA = """
create table if not exists jobs (
    id text primary key,
    config_yaml text not null,
    repo_id text not null,
    private integer not null,
    status text not null,
    progress real not null default 0,
    current_tensor text not null default '',
    log_tail text not null default '',
    result_url text,
    error text,
    cancel_requested integer not null default 0,
    created_at real not null,
    updated_at real not null
)
"""


class JobStatus(str, Enum):
    """Where a job is in its life: queued -> running -> succeeded | failed | cancelled."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        """True for the three final states."""
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


@dataclass(frozen=True)
class Job:
    """A snapshot of one job's record.

    Attributes:
        id: the job id (uuid4 hex).
        config_yaml: the merge config, as submitted.
        repo_id: the Hub repo the result is pushed to.
        private: whether a newly created repo is private.
        status: see :class:`JobStatus`.
        progress: fraction of the merge done, 0–1.
        current_tensor: the tensor merged last (empty before the first).
        log_tail: the job's last log lines, one per line, oldest first.
        result_url: the pushed repo's URL once succeeded, else None.
        error: a message for the user once failed, else None.
        cancel_requested: the owner asked a running job to stop; it is cancelled at the next tensor.
        created_at: submission time, epoch seconds.
        updated_at: last change, epoch seconds.
    """

    id: str
    config_yaml: str
    repo_id: str
    private: bool
    status: JobStatus
    progress: float
    current_tensor: str
    log_tail: str
    result_url: str | None
    error: str | None
    cancel_requested: bool
    created_at: float
    updated_at: float


# ---------------------------------------------------------------- the app's API


def submit(config_yaml: str, repo_id: str, token: str, private: bool = False) -> str:
    """Queue a merge whose result is pushed to `repo_id`.

    The token travels to the worker sealed (see :mod:`merger.worker`); it is never written to the
    job record or to the queue in clear.

    Args:
        config_yaml: the merge config (mergekit YAML); the worker validates it.
        repo_id: the Hub repo to create and push to (`namespace/name`, or `name` for the token's own).
        token: a Hub token with write access to that namespace (also used to read private models).
        private: create the repo as private.

    Returns:
        The new job's id (uuid4 hex).

    Raises:
        sqlite3.Error: the job record or the queue could not be written (then no job exists to run).
    """
    # Imported here rather than at the top: the worker imports this module for the records.
    from .worker import enqueue

    job_id = uuid.uuid4().hex
    now = time.time()
    _execute(
        "insert into jobs (id, config_yaml, repo_id, private, status, created_at, updated_at)"
        " values (?, ?, ?, ?, ?, ?, ?)",
        (job_id, config_yaml, repo_id, int(private), JobStatus.QUEUED.value, now, now),
    )
    try:
        enqueue(job_id, token)
    except BaseException:
        # Without its queue entry the job would stay `queued` forever.
        mark_finished(job_id, JobStatus.FAILED, error="The job could not be queued; submit it again.")
        raise
    return job_id


def get_job(job_id: str) -> Job | None:
    """The current state of a job.

    Args:
        job_id: an id returned by :func:`submit`.

    Returns:
        The job's snapshot, or None if no job has that id.
    """
    conn = _connect()
    try:
        row = conn.execute("select * from jobs where id = ?", (job_id,)).fetchone()
    finally:
        conn.close()
    if row is None:
        return None
    return Job(
        id=row["id"],
        config_yaml=row["config_yaml"],
        repo_id=row["repo_id"],
        private=bool(row["private"]),
        status=JobStatus(row["status"]),
        progress=row["progress"],
        current_tensor=row["current_tensor"],
        log_tail=row["log_tail"],
        result_url=row["result_url"],
        error=row["error"],
        cancel_requested=bool(row["cancel_requested"]),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def cancel(job_id: str) -> bool:
    """Cancel a job.

    A queued job is marked cancelled at once and the worker skips it. A running job gets a flag that
    the worker polls before each tensor; it becomes `cancelled` there, within a second or so. A job
    whose merge is done and whose upload has begun can no longer be stopped.

    Args:
        job_id: an id returned by :func:`submit`.

    Returns:
        True if the job was queued or running; False if it had finished or does not exist.
    """
    if _set_status(job_id, JobStatus.QUEUED, JobStatus.CANCELLED):
        return True
    return bool(
        _execute(
            "update jobs set cancel_requested = 1, updated_at = ? where id = ? and status = ?",
            (time.time(), job_id, JobStatus.RUNNING.value),
        )
    )


# ---------------------------------------------------------------- the worker's side


def mark_running(job_id: str) -> bool:
    """Move a queued job to `running` (the worker's claim on it).

    Args:
        job_id: the job's id.

    Returns:
        True if the job was queued; False if it was cancelled meanwhile (it must then not run).
    """
    return _set_status(job_id, JobStatus.QUEUED, JobStatus.RUNNING)


def record_progress(job_id: str, progress: float, current_tensor: str, log_tail: str) -> None:
    """Store a running job's progress.

    Args:
        job_id: the job's id.
        progress: fraction done, 0–1.
        current_tensor: the tensor merged last.
        log_tail: the job's last log lines.
    """
    _execute(
        "update jobs set progress = ?, current_tensor = ?, log_tail = ?, updated_at = ? where id = ? and status = ?",
        (progress, current_tensor, log_tail, time.time(), job_id, JobStatus.RUNNING.value),
    )


def is_cancel_requested(job_id: str) -> bool:
    """Whether the owner asked this running job to stop.

    Args:
        job_id: the job's id.

    Returns:
        The job's cancel flag (False for an unknown id).
    """
    conn = _connect()
    try:
        row = conn.execute("select cancel_requested from jobs where id = ?", (job_id,)).fetchone()
    finally:
        conn.close()
    return bool(row and row["cancel_requested"])


def mark_finished(
    job_id: str,
    status: JobStatus,
    *,
    log_tail: str | None = None,
    result_url: str | None = None,
    error: str | None = None,
) -> bool:
    """Give an unfinished job its final status.

    Args:
        job_id: the job's id.
        status: SUCCEEDED, FAILED or CANCELLED.
        log_tail: the job's last log lines; None keeps the stored ones.
        result_url: the pushed repo's URL (succeeded jobs).
        error: the message for the user (failed jobs).

    Returns:
        True if the job was queued or running; False if it had already finished.

    Raises:
        ValueError: `status` is not a final state.
    """
    if not status.finished:
        raise ValueError(f"mark_finished needs a final status, got `{status.value}`")
    return bool(
        _execute(
            "update jobs set status = ?, result_url = ?, error = ?, log_tail = coalesce(?, log_tail), updated_at = ?"
            " where id = ? and status in (?, ?)",
            (status.value, result_url, error, log_tail, time.time(), job_id,
             JobStatus.QUEUED.value, JobStatus.RUNNING.value),
        )
    )


def fail_running_jobs(error: str) -> int:
    """Mark every `running` job failed; for a worker that starts after another one died mid-job.

    Args:
        error: the message for the jobs' owners.

    Returns:
        How many jobs were marked.
    """
    return _execute(
        "update jobs set status = ?, error = ?, updated_at = ? where status = ?",
        (JobStatus.FAILED.value, error, time.time(), JobStatus.RUNNING.value),
    )


# ---------------------------------------------------------------- storage


def _set_status(job_id: str, current: JobStatus, new: JobStatus) -> bool:
    """Compare-and-set: change the status only if it still is `current`."""
    return bool(
        _execute(
            "update jobs set status = ?, updated_at = ? where id = ? and status = ?",
            (new.value, time.time(), job_id, current.value),
        )
    )


def _execute(sql: str, params: tuple) -> int:
    """Run one write statement in its own (autocommit) transaction; returns the rows it changed."""
    conn = _connect()
    try:
        return conn.execute(sql, params).rowcount
    finally:
        conn.close()


def _connect() -> sqlite3.Connection:
    # A connection per call: both processes touch this file, and short-lived connections hold no locks.
    path = Path(constants.JOBS_DB)
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, timeout=_BUSY_TIMEOUT_S, isolation_level=None)
    conn.row_factory = sqlite3.Row
    try:
        _use_wal(conn)
        conn.execute(_SCHEMA)
    except BaseException:
        conn.close()
        raise
    return conn


def _use_wal(conn: sqlite3.Connection) -> None:
    # Switching a new file to WAL needs an exclusive lock, which SQLite reports as "locked" at once
    # (without waiting) when the other process is switching it too; retry until the busy timeout.
    deadline = time.monotonic() + _BUSY_TIMEOUT_S
    while True:
        try:
            conn.execute("pragma journal_mode = wal")
            return
        except sqlite3.OperationalError as err:
            if "locked" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)
