"""The workers' notes in the job storage (:mod:`merger.jobs.storage`): heartbeats, and the repos jobs create.

Each worker process beats under its id (:func:`worker_id`); the app reads the latest beat to tell whether
any worker is alive, and a worker that stopped beating is dead: its running jobs are failed by whoever
notices (:mod:`merger.jobs.recovery`). A job notes a repo before creating it (with the job's token, sealed
as in the queue) and forgets it once committed to, so that the repos of a worker that died mid-upload
can be deleted by another.
"""

from __future__ import annotations

import os
import socket
import time

from merger.jobs.storage import backend


def worker_id(pid: int | None = None) -> str:
    """The id a worker process beats and claims jobs under: `host:pid`.

    Args:
        pid: the worker's process id on this machine (default: this process's).
    """
    return f"{socket.gethostname()}:{os.getpid() if pid is None else pid}"


def last_heartbeat() -> float | None:
    """When a worker last said it was alive (epoch seconds), or None if none ever did on this storage."""
    return backend().last_beat()


def beat(worker: str) -> None:
    """Record that the worker `worker` (a :func:`worker_id`) is alive now; its heartbeat thread calls this."""
    backend().beat(worker, time.time())


def is_alive(worker: str) -> bool:
    """Whether `worker` beat within the last `constants.WORKER_STALE_S` seconds (False for an empty id)."""
    return bool(worker) and backend().is_alive(worker)


def record_pending_repo(job_id: str, repo_id: str, sealed_token: bytes) -> None:
    """Note, before creating it, that the job is about to create `repo_id` on the Hub.

    Kept until :func:`clear_pending_repo`: when the job's worker dies, whoever fails the job deletes the
    repo if it holds no commit.

    Args:
        job_id: the job's id.
        repo_id: the full repo id (`namespace/name`).
        sealed_token: the job's token sealed with the queue key (never the token in clear).
    """
    backend().note_repo(job_id, repo_id, sealed_token, time.time())


def clear_pending_repo(job_id: str) -> None:
    """Forget the job's pending repo: it was committed to, or deleted."""
    backend().forget_repo(job_id)


def pending_repos() -> list[tuple[str, str, bytes]]:
    """The repos jobs created and never committed to, as (job id, repo id, sealed token), oldest first."""
    return backend().noted_repos()
