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
from merger.jobs.store import JobStatus, check_job_id, compare_and_set, get_job, owned_job, unfinished_jobs

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
    compare_and_set(job_id, (JobStatus.RUNNING,), evaluation=json.dumps(evaluation, allow_nan=False))


def mark_awaiting_review(job_id: str, log_tail: str | None = None, error: str | None = None) -> bool:
    """Move a running job to `awaiting_review` (its output is staged): after its merge, or after a failed publish.

    Args:
        job_id: the job's id.
        log_tail: the job's last log lines; None keeps the stored ones.
        error: why the last publish failed (shown with Publish and Discard), None after the merge.

    Returns:
        True if the job was running.
    """
    kept_log = {} if log_tail is None else {"log_tail": log_tail}
    return compare_and_set(job_id, (JobStatus.RUNNING,), status=JobStatus.AWAITING_REVIEW, error=error,
                           cancel_requested=False, **kept_log)


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
    message = EXPIRED_MESSAGE.format(hours=constants.REVIEW_TTL_S / 3600)
    waiting = [job.id for job in unfinished_jobs() if job.status is JobStatus.AWAITING_REVIEW and job.updated_at < cutoff]
    expired = [job_id for job_id in waiting if _move(job_id, JobStatus.AWAITING_REVIEW, JobStatus.DISCARDED, error=message)]
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


def _move(job_id: str, current: JobStatus, new: JobStatus, *, error: str | None) -> bool:
    """Compare-and-set of the status (one winner when a publish races a discard or the expiry)."""
    return compare_and_set(job_id, (current,), status=new, error=error)


def _status_of(job_id: str) -> str | None:
    job = get_job(job_id)
    return None if job is None else job.status.value
