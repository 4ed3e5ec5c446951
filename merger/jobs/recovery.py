"""After a worker dies: its running jobs failed with the reason, its half-made Hub repos deleted, its files removed.

A worker is dead when the app's watchdog saw its process exit (:mod:`merger.jobs.supervisor`), or when its
heartbeat (:mod:`merger.jobs.worker_notes`) is older than `constants.WORKER_STALE_S`: every live worker,
and the app when its workers run apart, check every `constants.WORKER_STALE_S / 2` seconds
(:func:`watch_workers`), so that a worker lost on another machine has its jobs failed by one that lives.
Two of them doing it at once is harmless: the Hub sweep is idempotent, each job's status change a
compare-and-set, and a job is failed before its repo's note is forgotten. A starting consumer in the
embedded (SQLite) setup, where one consumer serves a data directory, treats every worker before it as dead.
"""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

from cryptography.fernet import InvalidToken

from merger import constants
from merger.jobs import store as jobs
from merger.jobs import worker_notes
from merger.jobs.queue import unseal
from merger.jobs.store import JobStatus
from merger.scrub import ACTIVE_TOKENS

logger = logging.getLogger(__name__)

WORKER_LOST_REASON = "the worker process stopped unexpectedly (it was killed, ran out of memory, or the app restarted)"
HEARTBEAT_LOST_REASON = (
    "its worker stopped sending heartbeats (it was killed, ran out of memory, or lost its machine or network)"
)
NOTHING_PUSHED = "Nothing was pushed."


def recover_interrupted_jobs(
    reason: str = WORKER_LOST_REASON, dead_worker: str | None = None, every_worker: bool = False
) -> int:
    """Clean up after dead workers: their Hub repos, their running jobs, their partial output here.

    Repos that their jobs created but never committed to are deleted (kept if they hold a commit); their
    jobs left `running` are marked failed with `reason` and what is on the Hub; their work folders in this
    machine's data directory (staging shards included) are deleted. The Hub repos whose check failed stay
    noted for the next sweep.

    Args:
        reason: why the jobs stopped, for their owners (a clause; the message adds the rest).
        dead_worker: a worker id known dead (its process exited), whatever its heartbeat says.
        every_worker: treat every worker as dead (a consumer starting where it is the only one).

    Returns:
        How many jobs were marked failed.
    """

    me = worker_notes.worker_id()  # a worker whose own heartbeat thread lags never fails its own jobs

    def is_dead(worker: str) -> bool:
        return every_worker or worker == dead_worker or (worker != me and not worker_notes.is_alive(worker))

    _delete_work_folders(is_dead)  # before the jobs are marked: a failed job's owner finds nothing half-made
    count = _sweep_pending_repos(is_dead, reason)
    count += jobs.fail_running_jobs(_lost_job_message(reason, NOTHING_PUSHED), is_dead)
    if count:
        logger.warning("Marked %d job(s) of a worker that stopped as failed.", count)
    return count


def watch_workers(stop: threading.Event) -> None:
    """Until `stop` is set, fail the jobs of workers whose heartbeat went stale (a thread's body)."""
    while not stop.wait(constants.WORKER_STALE_S / 2):
        try:
            recover_interrupted_jobs(HEARTBEAT_LOST_REASON)
        except Exception as err:  # noqa: BLE001 - a storage or Hub hiccup must not end the watch
            logger.warning("could not check for stopped workers (%s)", type(err).__name__)


def start_watching_workers() -> threading.Event:
    """Run :func:`watch_workers` in a daemon thread; set the returned event to stop it."""
    stop = threading.Event()
    threading.Thread(target=watch_workers, args=(stop,), daemon=True, name="merger-worker-watch").start()
    return stop


def _lost_job_message(reason: str, on_hub: str) -> str:
    return f"This job stopped before it finished: {reason}. Its partial output was deleted. {on_hub} Submit the job again."


def _sweep_pending_repos(is_dead: Callable[[str], bool], reason: str) -> int:
    """Delete the repos noted by jobs no live worker runs and fail those jobs; returns how many were marked.

    Each job is marked before its note is cleared. Another worker sweeping at the same time then finds
    either the note (and settles the repo itself) or the job already failed, never a running job without a
    note, which it would mark "Nothing was pushed." and so hide the deleted or kept repo from its owner.
    """
    count = 0
    for job_id, repo_id, sealed_token in worker_notes.pending_repos():
        job = jobs.get_job(job_id)
        if job is not None and job.status is JobStatus.RUNNING and not is_dead(job.worker):
            continue  # its worker is uploading it now
        settled, on_hub = _settle_repo(repo_id, sealed_token)
        logger.warning("Job %s: %s", job_id, on_hub)
        count += jobs.mark_finished(job_id, JobStatus.FAILED, error=_lost_job_message(reason, on_hub))
        if settled:
            worker_notes.clear_pending_repo(job_id)
    return count


def _settle_repo(repo_id: str, sealed_token: bytes) -> tuple[bool, str]:
    """Delete a repo that a job created if nothing was committed to it; returns (settled, what is on the Hub).

    Not settled when the Hub could not be asked: the note stays for the next sweep.
    """
    try:
        token = unseal(sealed_token)
    except (InvalidToken, KeyError, ValueError):
        return True, (
            f"The repo `{repo_id}` this job created could not be checked (the queue key changed); "
            "delete it on the Hub if it is empty."
        )
    from merger.service.run_job import delete_unpushed_repo  # the jobs reach the Hub through the service

    ACTIVE_TOKENS.add(token)
    try:
        return delete_unpushed_repo(repo_id, token)
    finally:
        ACTIVE_TOKENS.discard(token)


def _delete_work_folders(is_dead: Callable[[str], bool]) -> None:
    """Delete this machine's work folders (one per job, named by its id) that no live worker uses."""
    work = Path(constants.DATA_DIR) / "work"
    if not work.is_dir():
        return
    for folder in work.iterdir():
        job = jobs.get_job(folder.name)
        if job is None or job.status is not JobStatus.RUNNING or is_dead(job.worker):
            shutil.rmtree(folder, ignore_errors=True)
    try:
        work.rmdir()  # when empty
    except OSError:
        pass
