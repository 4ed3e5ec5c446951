"""A merge's evaluation in its job record, and the review before its push: staged outputs, publish, discard, expiry.

A job whose owner asked to review the merge stops at `awaiting_review` with its output staged in the
worker's data directory (`DATA_DIR/staged/<job id>`; the id is checked, so no caller's text reaches a
path). The worker returns to the queue at once. The owner then publishes (the job is queued again and
the worker's `publish` task pushes the staged folder) or discards it (the folder is deleted here). A
staged output nobody decided on within `constants.REVIEW_TTL_S` is deleted by the worker's sweep and
its job marked discarded. Every status change is a compare-and-set, so a publish racing a discard or
the expiry has exactly one winner.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from merger import constants
from merger.errors import JobAccessError
from merger.jobs.database import connect, execute
from merger.jobs.store import JobStatus, check_job_id, owned_job

STAGED_FOLDER = "staged"
EXPIRED_MESSAGE = ("The merge waited for review longer than {hours:g} h, so its staged output was deleted; nothing "
                   "was pushed. Submit the job again.")
_NOT_AWAITING = "this job is not awaiting review (it is {status}); only a job that awaits review can be {verb}"


def staged_dir(job_id: str) -> Path:
    """Where a job's merge waits for review: `DATA_DIR/staged/<job id>`.

    Raises:
        JobAccessError: a malformed id (no other text ever becomes a path here).
    """
    return Path(constants.DATA_DIR) / STAGED_FOLDER / check_job_id(job_id)


def record_evaluation(job_id: str, evaluation: dict[str, Any]) -> None:
    """Keep a job's evaluation (a JSON-able dict: the table, per model and text type, and the generations)."""
    execute("update jobs set evaluation = ?, updated_at = ? where id = ?",
            (json.dumps(evaluation, allow_nan=False), time.time(), job_id))


def mark_awaiting_review(job_id: str, log_tail: str | None = None, error: str | None = None) -> bool:
    """Move a running job to `awaiting_review` (its output is staged): after its merge, or after a failed publish.

    Args:
        job_id: the job's id.
        log_tail: the job's last log lines; None keeps the stored ones.
        error: why the last publish failed (shown with Publish and Discard), None after the merge.

    Returns:
        True if the job was running.
    """
    return bool(execute(
        "update jobs set status = ?, error = ?, log_tail = coalesce(?, log_tail), cancel_requested = 0,"
        " updated_at = ? where id = ? and status = ?",
        (JobStatus.AWAITING_REVIEW.value, error, log_tail, time.time(), job_id, JobStatus.RUNNING.value),
    ))


def request_publish(job_id: str, owner: str | None) -> str:
    """The owner's publish: `awaiting_review` -> `queued` (the caller then queues the `publish` task).

    Returns:
        The job's id (checked).

    Raises:
        JobAccessError: a malformed id, no such job, another user's job, or a job not awaiting review.
    """
    job = owned_job(job_id, owner)
    if not _move(job.id, JobStatus.AWAITING_REVIEW, JobStatus.QUEUED, error=None):
        raise JobAccessError(_NOT_AWAITING.format(status=_status_of(job.id), verb="published"))
    return job.id


def undo_publish(job_id: str, error: str) -> None:
    """A publish that could not be queued: back to `awaiting_review`, saying so."""
    _move(job_id, JobStatus.QUEUED, JobStatus.AWAITING_REVIEW, error=error)


def discard(job_id: str, owner: str | None) -> None:
    """The owner's discard: the job becomes `discarded` and its staged output is deleted.

    Raises:
        JobAccessError: a malformed id, no such job, another user's job, or a job not awaiting review.
    """
    job = owned_job(job_id, owner)
    if not _move(job.id, JobStatus.AWAITING_REVIEW, JobStatus.DISCARDED, error=None):
        raise JobAccessError(_NOT_AWAITING.format(status=_status_of(job.id), verb="discarded"))
    shutil.rmtree(staged_dir(job.id), ignore_errors=True)


def expire_reviews(now: float | None = None) -> list[str]:
    """Discard the jobs awaiting review for longer than `constants.REVIEW_TTL_S`, and delete their outputs.

    Returns:
        The ids of the jobs discarded.
    """
    cutoff = (time.time() if now is None else now) - constants.REVIEW_TTL_S
    conn = connect()
    try:
        rows = conn.execute("select id from jobs where status = ? and updated_at < ?",
                            (JobStatus.AWAITING_REVIEW.value, cutoff)).fetchall()
    finally:
        conn.close()
    message = EXPIRED_MESSAGE.format(hours=constants.REVIEW_TTL_S / 3600)
    expired = [row["id"] for row in rows
               if _move(row["id"], JobStatus.AWAITING_REVIEW, JobStatus.DISCARDED, error=message, before=cutoff)]
    for job_id in expired:
        shutil.rmtree(staged_dir(job_id), ignore_errors=True)
    return expired


def delete_orphan_staged() -> list[str]:
    """Delete staged outputs whose job no longer needs them (finished, failed by a dead worker, or unknown).

    Returns:
        The names of the folders deleted.
    """
    root = Path(constants.DATA_DIR) / STAGED_FOLDER
    names = [p.name for p in root.iterdir()] if root.is_dir() else []
    keep = (JobStatus.AWAITING_REVIEW.value, JobStatus.QUEUED.value, JobStatus.RUNNING.value)
    orphans = [name for name in names if _status_of(name) not in keep]
    for name in orphans:
        shutil.rmtree(root / name, ignore_errors=True)
    return orphans


def _move(job_id: str, current: JobStatus, new: JobStatus, *, error: str | None, before: float | None = None) -> bool:
    """Compare-and-set of the status (and, with `before`, only if not touched since)."""
    sql = "update jobs set status = ?, error = ?, updated_at = ? where id = ? and status = ?"
    params: tuple = (new.value, error, time.time(), job_id, current.value)
    if before is not None:
        sql, params = sql + " and updated_at < ?", params + (before,)
    return bool(execute(sql, params))


def _status_of(job_id: str) -> str | None:
    conn = connect()
    try:
        row = conn.execute("select status from jobs where id = ?", (job_id,)).fetchone()
    finally:
        conn.close()
    return None if row is None else row["status"]
