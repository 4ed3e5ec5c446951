"""Merge jobs: their records, and the API the app uses to submit, poll and cancel them.

The app never merges: :func:`merger.jobs.queue.submit` writes a record here and hands the job to the
worker process (:mod:`merger.jobs.worker`) through huey's queue. The records are a table of the jobs
database (:mod:`merger.jobs.database`, beside the worker's notes, :mod:`merger.jobs.worker_notes`),
which both processes read and write; each status change is a compare-and-set on the current status,
so a cancel racing with the worker's start can never leave a job both cancelled and running.

Every job has an owner, the Hub user whose token submitted it: only the owner reads its status, log
and result or cancels it; anyone with its id sees only its config (what the owner shares with a job
link). Unfinished jobs are capped per owner and in total (`constants.MAX_JOBS_PER_USER`,
`constants.MAX_JOBS_TOTAL`); the check and the insert are one transaction, so a burst cannot overshoot.
"""

from __future__ import annotations

import re
import sqlite3
import time
import uuid
from dataclasses import dataclass
from enum import Enum

from merger import constants
from merger.config.parse import refuse_tokens
from merger.errors import JobAccessError, JobLimitError
from merger.jobs.database import connect, execute

_JOB_ID = re.compile(f"[0-9a-f]{{{constants.JOB_ID_LENGTH}}}")
_UNFINISHED = ("queued", "running", "awaiting_review")  # a staged output holds the worker's disk: it counts


class JobStatus(str, Enum):
    """queued -> running -> succeeded | failed | cancelled | awaiting_review (:mod:`merger.jobs.review`)."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    AWAITING_REVIEW = "awaiting_review"
    DISCARDED = "discarded"

    @property
    def finished(self) -> bool:
        """True for the four final states."""
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.DISCARDED)


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
        owner: the Hub username that submitted the job.
        reuse_repo: the owner allowed pushing to an existing repo.
        error_type: the class name of the error that failed the job (e.g. `PushTargetError`), else None.
        options: the job's options as JSON (:class:`merger.service.options.JobOptions`), None for older jobs.
        evaluation: the merge's evaluation as JSON (see :mod:`merger.jobs.review`), None until evaluated.
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
    owner: str
    reuse_repo: bool
    error_type: str | None = None
    options: str | None = None
    evaluation: str | None = None


# ---------------------------------------------------------------- the app's API


def create_record(
    config_yaml: str,
    repo_id: str,
    token: str,
    owner: str,
    private: bool = False,
    reuse_repo: bool = False,
    options: str | None = None,
) -> str:
    """Write the `queued` record of a merge whose result is pushed to `repo_id`, if the caps allow.

    :func:`merger.jobs.queue.submit` calls it, then queues the job. The token is only checked
    against the config here; it is never written to the record.

    Args:
        config_yaml: the merge config (mergekit YAML); the worker validates it.
        repo_id: the Hub repo to push to (`namespace/name`, or `name` for the token's own).
        token: a Hub token with write access to that namespace (also used to read private models).
        owner: the Hub username the token belongs to (from whoami); only they may read or cancel the job.
        private: create the repo as private.
        reuse_repo: the owner allows pushing a new commit to an existing repo.
        options: the job's options as JSON (checked by the service; the token is refused in it here too).

    Returns:
        The new job's id (uuid4 hex, `constants.JOB_ID_LENGTH` characters).

    Raises:
        TokenInConfigError: the config holds the token or anything shaped like a Hub token (comments
            included): the record keeps the config, and the card and `mergekit_config.yml` carry it.
        JobLimitError: the owner has `constants.MAX_JOBS_PER_USER` unfinished jobs, or the app
            `constants.MAX_JOBS_TOTAL`.
        sqlite3.Error: the job record could not be written.
    """
    refuse_tokens(config_yaml, token)
    refuse_tokens(options or "", token)
    job_id = uuid.uuid4().hex
    now = time.time()
    conn = connect()
    try:
        conn.execute("begin immediate")  # the count and the insert see no other submit in between
        try:
            _check_caps(conn, owner)
            conn.execute(
                "insert into jobs (id, config_yaml, repo_id, private, status, created_at, updated_at, owner, reuse_repo,"
                " options) values (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job_id, config_yaml, repo_id, int(private), JobStatus.QUEUED.value, now, now, owner, int(reuse_repo),
                 options),
            )
        except BaseException:
            conn.execute("rollback")
            raise
        conn.execute("commit")
    finally:
        conn.close()
    return job_id


def check_caps(owner: str) -> None:
    """Refuse early (before a validation or a Hub call) when a new job of `owner` would be over a cap.

    :func:`create_record` checks again, atomically with the insert.

    Raises:
        JobLimitError: as in :func:`create_record`.
    """
    conn = connect()
    try:
        _check_caps(conn, owner)
    finally:
        conn.close()


def check_job_id(job_id: str) -> str:
    """Check a job id's shape (as typed or taken from a `?job=` link) without echoing it.

    Args:
        job_id: the id; surrounding blanks are ignored.

    Returns:
        The id, stripped.

    Raises:
        JobAccessError: it is not `constants.JOB_ID_LENGTH` lowercase hexadecimal characters.
    """
    job_id = (job_id or "").strip()
    if not _JOB_ID.fullmatch(job_id):
        raise JobAccessError(
            f"this is not a job id: a job id is {constants.JOB_ID_LENGTH} hexadecimal characters "
            "(0-9, a-f); copy the job link again"
        )
    return job_id


def get_job(job_id: str) -> Job | None:
    """The current state of a job, whoever owns it (for the worker; the app uses :func:`owned_job`).

    Args:
        job_id: an id returned by :func:`create_record`.

    Returns:
        The job's snapshot, or None if no job has that id.
    """
    conn = connect()
    try:
        row = conn.execute("select * from jobs where id = ?", (job_id,)).fetchone()
    finally:
        conn.close()
    return None if row is None else _job_from_row(row)


def shared_config(job_id: str) -> str:
    """What a job link shows anyone: the job's config, nothing else.

    Args:
        job_id: a job id (its shape is checked).

    Returns:
        The config YAML as submitted.

    Raises:
        JobAccessError: the id is malformed or no job has it.
    """
    return _existing_job(job_id).config_yaml


def owned_job(job_id: str, owner: str | None) -> Job:
    """A job, for its owner only: status, log, result.

    Args:
        job_id: a job id (its shape is checked).
        owner: the caller's Hub username (None when not signed in).

    Returns:
        The job's snapshot.

    Raises:
        JobAccessError: the id is malformed, no job has it, or it belongs to another user.
    """
    job = _existing_job(job_id)
    if owner is None or job.owner != owner:
        who = "sign in as its owner to see it" if owner is None else "only its owner sees its status, log and result"
        raise JobAccessError(f"this job belongs to another account: {who}; its link shows you its config only")
    return job


def cancel(job_id: str, owner: str | None) -> bool:
    """Cancel a job of `owner`.

    A queued job is marked cancelled at once and the worker skips it. A running job gets a flag that
    the worker polls before each tensor; it becomes `cancelled` there, within a second or so. A job
    whose merge is done and whose upload has begun can no longer be stopped.

    Args:
        job_id: a job id (its shape is checked).
        owner: the caller's Hub username.

    Returns:
        True if the job was queued or running; False if it had finished.

    Raises:
        JobAccessError: as in :func:`owned_job`.
    """
    job_id = owned_job(job_id, owner).id
    if _set_status(job_id, JobStatus.QUEUED, JobStatus.CANCELLED):
        return True
    return bool(
        execute(
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
    execute(
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
    conn = connect()
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
    error_type: str | None = None,
) -> bool:
    """Give an unfinished job its final status.

    Args:
        job_id: the job's id.
        status: SUCCEEDED, FAILED or CANCELLED.
        log_tail: the job's last log lines; None keeps the stored ones.
        result_url: the pushed repo's URL (succeeded jobs).
        error: the message for the user (failed jobs).
        error_type: the failing error's class name, a stable label for scripts (failed jobs).

    Returns:
        True if the job was queued or running; False if it had already finished.

    Raises:
        ValueError: `status` is not a final state.
    """
    if not status.finished:
        raise ValueError(f"mark_finished needs a final status, got `{status.value}`")
    return bool(
        execute(
            "update jobs set status = ?, result_url = ?, error = ?, error_type = ?, log_tail = coalesce(?, log_tail),"
            " updated_at = ? where id = ? and status in (?, ?)",
            (status.value, result_url, error, error_type, log_tail, time.time(), job_id,
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
    return execute(
        "update jobs set status = ?, error = ?, updated_at = ? where status = ?",
        (JobStatus.FAILED.value, error, time.time(), JobStatus.RUNNING.value),
    )


# ---------------------------------------------------------------- storage


def list_jobs(owner: str, limit: int = 50) -> list[Job]:
    """An owner's jobs, newest first (for "My merges").

    Args:
        owner: the Hub username.
        limit: the most jobs returned.
    """
    conn = connect()
    try:
        rows = conn.execute(
            "select * from jobs where owner = ? order by created_at desc limit ?", (owner, int(limit))
        ).fetchall()
    finally:
        conn.close()
    return [_job_from_row(row) for row in rows]


def queue_position(job_id: str) -> int | None:
    """Where a queued job stands: 1 when it runs next (jobs run in submission order); None if not queued."""
    conn = connect()
    try:
        row = conn.execute("select created_at, status from jobs where id = ?", (job_id,)).fetchone()
        if row is None or row["status"] != JobStatus.QUEUED.value:
            return None
        ahead = conn.execute(
            "select count(*) from jobs where status = ? and created_at < ?",
            (JobStatus.QUEUED.value, row["created_at"]),
        ).fetchone()[0]
    finally:
        conn.close()
    return int(ahead) + 1


def _job_from_row(row: sqlite3.Row) -> Job:
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
        owner=row["owner"],
        reuse_repo=bool(row["reuse_repo"]),
        error_type=row["error_type"],
        options=row["options"],
        evaluation=row["evaluation"],
    )


def _existing_job(job_id: str) -> Job:
    job = get_job(check_job_id(job_id))
    if job is None:
        raise JobAccessError("there is no job with this id on this app; check the link (jobs are kept on this app only)")
    return job


def _check_caps(conn: sqlite3.Connection, owner: str) -> None:
    marks = ", ".join("?" for _ in _UNFINISHED)
    total = conn.execute(f"select count(*) from jobs where status in ({marks})", _UNFINISHED).fetchone()[0]
    mine = conn.execute(
        f"select count(*) from jobs where status in ({marks}) and owner = ?", (*_UNFINISHED, owner)
    ).fetchone()[0]
    if mine >= constants.MAX_JOBS_PER_USER:
        raise JobLimitError(
            f"you already have {mine} unfinished job(s), the most one account may have here "
            f"({constants.MAX_JOBS_PER_USER}); wait for one to finish or cancel one, then submit again"
        )
    if total >= constants.MAX_JOBS_TOTAL:
        raise JobLimitError(
            f"this app is full: {total} jobs are queued or running (at most {constants.MAX_JOBS_TOTAL}); "
            "submit again in a while"
        )


def _set_status(job_id: str, current: JobStatus, new: JobStatus) -> bool:
    """Compare-and-set: change the status only if it still is `current`."""
    return bool(
        execute(
            "update jobs set status = ?, updated_at = ? where id = ? and status = ?",
            (new.value, time.time(), job_id, current.value),
        )
    )
