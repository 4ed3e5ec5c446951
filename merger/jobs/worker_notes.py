"""The worker's notes in the jobs database: the worker's heartbeat, and the repos jobs created on the Hub.

The app reads the heartbeat to tell whether a worker is alive. A job notes a repo before creating it
(with the job's token, sealed as in the queue) and forgets it once committed to, so that a worker
starting after a crash can delete the repos still noted.
"""

from __future__ import annotations

import time

from merger.jobs.database import connect, execute


def last_heartbeat() -> float | None:
    """When a worker last said it was alive (epoch seconds), or None if none ever did on this data dir."""
    conn = connect()
    try:
        row = conn.execute("select beat_at from worker where id = 1").fetchone()
    finally:
        conn.close()
    return None if row is None else row["beat_at"]


def beat(pid: int) -> None:
    """Record that the worker `pid` is alive now (its heartbeat thread calls this periodically)."""
    execute("insert or replace into worker (id, pid, beat_at) values (1, ?, ?)", (pid, time.time()))


def record_pending_repo(job_id: str, repo_id: str, sealed_token: bytes) -> None:
    """Note, before creating it, that the job is about to create `repo_id` on the Hub.

    Kept until :func:`clear_pending_repo`: a worker starting after a crash deletes the repos still noted.

    Args:
        job_id: the job's id.
        repo_id: the full repo id (`namespace/name`).
        sealed_token: the job's token sealed with the queue key (never the token in clear).
    """
    execute(
        "insert or replace into pending_repos (job_id, repo_id, sealed_token, created_at) values (?, ?, ?, ?)",
        (job_id, repo_id, sealed_token, time.time()),
    )


def clear_pending_repo(job_id: str) -> None:
    """Forget the job's pending repo: it was committed to, or deleted."""
    execute("delete from pending_repos where job_id = ?", (job_id,))


def pending_repos() -> list[tuple[str, str, bytes]]:
    """The repos jobs created and never committed to, as (job id, repo id, sealed token), oldest first."""
    conn = connect()
    try:
        rows = conn.execute("select job_id, repo_id, sealed_token from pending_repos order by created_at").fetchall()
    finally:
        conn.close()
    return [(row["job_id"], row["repo_id"], bytes(row["sealed_token"])) for row in rows]
