"""Jobs for the UI: submit, status, cancel, publish or discard a reviewed merge, a job's shared config,
the signed-in user's jobs."""

from __future__ import annotations

import json
import time
from typing import Any

from merger import constants
from merger.scrub import scrub
from merger.service.configs import validate
from merger.service.identity import owner
from merger.service.options import JobOptions

TERMINAL_STATUSES = ("succeeded", "failed", "cancelled", "discarded")


def submit(yaml_text: str, repo_id: str, token: str, private: bool, reuse_repo: bool,
           options: JobOptions | None = None) -> str:
    """Check caps, the push target and the config, then queue the merge. Returns the job id.

    Args:
        options: evaluate / review / evaluation text (:func:`merger.service.options.job_options`); None:
            the defaults (evaluated on the shipped set, pushed without review).

    Raises:
        JobLimitError, PushTargetError, ConfigError, HubError, ...: the first refusal, before anything is queued.
    """
    from merger.jobs import store as jobs
    from merger.jobs import queue
    from merger.publish.hub_push import check_push_target

    user = owner(token)
    jobs.check_caps(user)  # the cheap refusal first; submit checks again with the insert
    # The target is checked before the config: a repo the user may not write to fails now, not after the merge.
    target = check_push_target(repo_id, token, private=bool(private), reuse_repo=bool(reuse_repo))
    validate(yaml_text, token)
    options = JobOptions() if options is None else options
    return str(queue.submit(yaml_text, target.repo_id, token, user, bool(private), bool(reuse_repo),
                            options=options.to_json()))


def publish(job_id: str, token: str | None) -> None:
    """Push the caller's reviewed merge: the job is queued again and the worker pushes its staged output.

    Raises:
        JobAccessError: a malformed id, no such job, another user's job, or a job not awaiting review.
    """
    from merger.jobs import queue, review

    job_id = review.request_publish(job_id, owner(token))
    try:
        queue.enqueue_publish(job_id, token or "")
    except BaseException:
        review.undo_publish(job_id, "The publish could not be queued; publish again.")
        raise


def discard(job_id: str, token: str | None) -> None:
    """Discard the caller's reviewed merge: nothing is pushed and its staged output is deleted.

    Raises:
        JobAccessError: a malformed id, no such job, another user's job, or a job not awaiting review.
    """
    from merger.jobs import review

    review.discard(job_id, owner(token))


def job_status(job_id: str, token: str | None) -> dict[str, Any]:
    """The caller's own job: id, status, progress (0-1), current_tensor, log_tail, result_url, error,
    error_type (the failing error's class name), worker (a note when no worker is alive), created_at / updated_at (epoch s), elapsed_s,
    remaining_s (estimated, None until there is progress), queue_position (1 = next; None unless queued),
    options (evaluate, review, eval_dataset, eval_text), evaluation (None until evaluated: texts, prompts,
    merge, rows with name, bits_per_token, tokens, kl_bits, generations, seconds, complete; seconds; table)
    and review_expires_at (epoch s; set while the job awaits review).

    Raises:
        JobAccessError: a malformed id, no such job, or another user's job.
    """
    from merger.jobs import store as jobs

    jobs.check_job_id(job_id)  # before any Hub call: a malformed id costs nothing
    return _job_dict(jobs.owned_job(job_id, owner(token)))


def job_config(job_id: str) -> str:
    """The config of any job (what its link shares with everyone). Raises JobAccessError."""
    from merger.jobs import store as jobs

    return jobs.shared_config(job_id)


def cancel(job_id: str, token: str | None) -> bool:
    """Cancel the caller's queued or running job; False when it had already finished."""
    from merger.jobs import store as jobs

    jobs.check_job_id(job_id)
    return bool(jobs.cancel(job_id, owner(token)))


def my_jobs(token: str | None, limit: int = 50) -> list[dict[str, Any]]:
    """The signed-in user's jobs, newest first (as :func:`job_status` dicts plus repo_id and config_yaml)."""
    from merger.jobs import store as jobs

    user = owner(token)
    if not user:
        return []
    return [
        {**_job_dict(job), "repo_id": job.repo_id, "config_yaml": job.config_yaml}
        for job in jobs.list_jobs(user, limit=limit)
    ]


def worker_note() -> str | None:
    """"No worker alive since ..." when the worker's heartbeat is missing or stale, else None."""
    from merger.jobs.worker_notes import last_heartbeat

    beat = last_heartbeat()
    if beat is not None and time.time() - beat <= constants.WORKER_STALE_S:
        return None
    since = "it started" if beat is None else time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(beat))
    return f"No worker alive since {since}: queued jobs wait until a worker is running again."


def _job_dict(job: Any) -> dict[str, Any]:
    from merger.jobs import store as jobs

    status = str(getattr(job.status, "value", job.status))
    progress = float(job.progress or 0.0)
    now = time.time()
    elapsed = max(0.0, (job.updated_at if status in TERMINAL_STATUSES else now) - job.created_at)
    running = status == "running" and progress > 0
    return {
        "id": job.id,
        "status": status,
        "progress": progress,
        "current_tensor": job.current_tensor,
        "log_tail": scrub(job.log_tail or ""),
        "result_url": job.result_url,
        "error": scrub(job.error) if job.error else None,
        "error_type": job.error_type,
        "worker": None if status in TERMINAL_STATUSES else worker_note(),
        "created_at": job.created_at,
        "updated_at": job.updated_at,
        "elapsed_s": round(elapsed, 1),
        "remaining_s": round(elapsed * (1 - progress) / progress, 1) if running else None,
        "queue_position": jobs.queue_position(job.id) if status == "queued" else None,
        "options": JobOptions.from_record(job.options).model_dump(),
        "evaluation": json.loads(job.evaluation) if job.evaluation else None,
        "review_expires_at": job.updated_at + constants.REVIEW_TTL_S if status == "awaiting_review" else None,
    }
