"""Merge jobs: their records, and the API the app uses to submit, poll and cancel them.

The app never merges: :func:`merger.jobs.queue.submit` writes a record here and hands the job to a
worker process (:mod:`merger.jobs.worker`) through huey's queue. The records are kept by the storage
backend (:mod:`merger.jobs.storage`: SQLite beside the app, or Redis shared by workers on several
machines), which every process reads and writes; each status change is a compare-and-set on the current
status, so a cancel racing with a worker's start can never leave a job both cancelled and running, and
of two workers handed the same job only one runs it.

Every job has an owner, the Hub user whose token submitted it: only the owner reads its status, log
and result or cancels it; anyone with its id sees only its config (what the owner shares with a job
link). Unfinished jobs are capped per owner and in total (`constants.MAX_JOBS_PER_USER`,
`constants.MAX_JOBS_TOTAL`); the check and the insert are one atomic step, so a burst cannot overshoot.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from enum import Enum
from typing import Any

from merger import constants
from merger.config.parse import refuse_tokens
from merger.errors import JobAccessError, JobLimitError
from merger.jobs.storage import backend

_JOB_ID = re.compile(f"[0-9a-f]{{{constants.JOB_ID_LENGTH}}}")


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
        worker: the worker that claimed the job (`host:pid`, see :func:`merger.jobs.worker_notes.worker_id`);
            empty before it runs.
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
    worker: str = ""
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
        sqlite3.Error, redis.RedisError: the job record could not be written.
    """
    refuse_tokens(config_yaml, token)
    refuse_tokens(options or "", token)
    now = time.time()
    job = Job(
        id=uuid.uuid4().hex, config_yaml=config_yaml, repo_id=repo_id, private=private, status=JobStatus.QUEUED,
        progress=0.0, current_tensor="", log_tail="", result_url=None, error=None, cancel_requested=False,
        created_at=now, updated_at=now, owner=owner, reuse_repo=reuse_repo, options=options,
    )
    refused = backend().insert(_record_of(job), constants.MAX_JOBS_PER_USER, constants.MAX_JOBS_TOTAL)
    if refused:
        raise _limit_error(*refused)
    return job.id


def check_caps(owner: str) -> None:
    """Refuse early (before a validation or a Hub call) when a new job of `owner` would be over a cap.

    :func:`create_record` checks again, atomically with the insert.

    Raises:
        JobLimitError: as in :func:`create_record`.
    """
    mine, total = backend().unfinished_counts(owner)
    if mine >= constants.MAX_JOBS_PER_USER or total >= constants.MAX_JOBS_TOTAL:
        raise _limit_error(mine, total)


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
    record = backend().get(job_id)
    return None if record is None else _job_of(record)


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
    if compare_and_set(job_id, (JobStatus.QUEUED,), status=JobStatus.CANCELLED):
        return True
    return compare_and_set(job_id, (JobStatus.RUNNING,), cancel_requested=True)


# ---------------------------------------------------------------- the worker's side


def mark_running(job_id: str, worker: str = "") -> bool:
    """Move a queued job to `running`: a worker's claim on it, a compare-and-set that one worker wins.

    Args:
        job_id: the job's id.
        worker: the claiming worker's id (:func:`merger.jobs.worker_notes.worker_id`): when its heartbeat
            stops, any live worker fails the job (:func:`merger.jobs.recovery.recover_interrupted_jobs`).

    Returns:
        True if the job was queued; False if it was cancelled meanwhile, or already claimed (it must then
        not run here).
    """
    return compare_and_set(job_id, (JobStatus.QUEUED,), status=JobStatus.RUNNING, worker=worker)


def record_progress(job_id: str, progress: float, current_tensor: str, log_tail: str) -> None:
    """Store a running job's progress.

    Args:
        job_id: the job's id.
        progress: fraction done, 0–1.
        current_tensor: the tensor merged last.
        log_tail: the job's last log lines.
    """
    compare_and_set(job_id, (JobStatus.RUNNING,), progress=progress, current_tensor=current_tensor, log_tail=log_tail)


def is_cancel_requested(job_id: str) -> bool:
    """Whether the owner asked this running job to stop.

    Args:
        job_id: the job's id.

    Returns:
        The job's cancel flag (False for an unknown id).
    """
    job = get_job(job_id)
    return job is not None and job.cancel_requested


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
    kept_log = {} if log_tail is None else {"log_tail": log_tail}
    return compare_and_set(job_id, (JobStatus.QUEUED, JobStatus.RUNNING), status=status, result_url=result_url, error=error,
                   error_type=error_type, **kept_log)


def fail_running_jobs(error: str, worker_is_dead: Callable[[str], bool] = lambda worker: True) -> int:
    """Mark `running` jobs failed: those of workers that died mid-job.

    Args:
        error: the message for the jobs' owners.
        worker_is_dead: called with each running job's worker id; only the jobs it says True for are
            marked (by default, every running job).

    Returns:
        How many jobs were marked.
    """
    dead = [
        record["id"] for record in backend().unfinished()
        if record["status"] == JobStatus.RUNNING.value and worker_is_dead(record.get("worker", ""))
    ]
    return sum(mark_finished(job_id, JobStatus.FAILED, error=error) for job_id in dead)


# ---------------------------------------------------------------- listings


def unfinished_jobs() -> list[Job]:
    """Every job not finished yet (queued, running, awaiting review), oldest first."""
    return [_job_of(record) for record in backend().unfinished()]


def list_jobs(owner: str, limit: int = 50) -> list[Job]:
    """An owner's jobs, newest first (for "My merges").

    Args:
        owner: the Hub username.
        limit: the most jobs returned.
    """
    return [_job_of(record) for record in backend().owned(owner, limit)]


def queue_position(job_id: str) -> int | None:
    """Where a queued job stands: 1 when it runs next (jobs run in submission order); None if not queued."""
    job = get_job(job_id)
    if job is None or job.status is not JobStatus.QUEUED:
        return None
    queued = [r for r in backend().unfinished() if r["status"] == JobStatus.QUEUED.value]
    return 1 + sum(record["created_at"] < job.created_at for record in queued)


# ---------------------------------------------------------------- records


def _record_of(job: Job) -> dict[str, Any]:
    """A job as the backends store it: every field, statuses as their string values."""
    return {name: value.value if isinstance(value, Enum) else value for name, value in asdict(job).items()}


def _job_of(record: dict[str, Any]) -> Job:
    """The inverse of :func:`_record_of` (SQLite gives booleans as 0/1)."""
    values = {f.name: record[f.name] for f in fields(Job) if f.name in record}
    for f in fields(Job):
        if f.type == "bool" and f.name in values:
            values[f.name] = bool(values[f.name])
    return Job(**{**values, "status": JobStatus(values["status"])})


def compare_and_set(job_id: str, current: tuple[JobStatus, ...], **changes: Any) -> bool:
    """Apply `changes` (fields of :class:`Job`, and a new `updated_at`) only if the job's status still is one of
    `current`: the one way a job record changes, atomic in either backend (so racing changes have one winner).

    Returns:
        Whether the job was in one of `current` (and so changed).
    """
    changes = {name: value.value if isinstance(value, Enum) else value for name, value in changes.items()}
    return backend().update(job_id, {**changes, "updated_at": time.time()}, tuple(s.value for s in current))


def _existing_job(job_id: str) -> Job:
    job = get_job(check_job_id(job_id))
    if job is None:
        raise JobAccessError("there is no job with this id on this app; check the link (jobs are kept on this app only)")
    return job


def _limit_error(mine: int, total: int) -> JobLimitError:
    if mine >= constants.MAX_JOBS_PER_USER:
        return JobLimitError(
            f"you already have {mine} unfinished job(s), the most one account may have here "
            f"({constants.MAX_JOBS_PER_USER}); wait for one to finish or cancel one, then submit again"
        )
    return JobLimitError(
        f"this app is full: {total} jobs are queued or running (at most {constants.MAX_JOBS_TOTAL}); "
        "submit again in a while"
    )
