"""Where job records and the workers' notes are kept: one small interface, two backends, chosen once.

Unset `REDIS_URL` (the embedded default): SQLite files in the data directory
(:class:`merger.jobs.database.SqliteBackend`), shared by the app and the one worker beside it. With
`constants.REDIS_URL`: a Redis server (:class:`merger.jobs.redis_store.RedisBackend`), shared by the app
and workers on several machines. :mod:`merger.jobs.store` (the job records' API) and
:mod:`merger.jobs.worker_notes` (heartbeats, pending Hub repos) talk to :func:`backend` only.

A record is a dict of column name -> plain value (str, int, float, bool, None), one entry per field of
:class:`merger.jobs.store.Job`; backends store every field they are given, so a new field costs its
declaration in `Job` (and a column in SQLite's schema). Statuses are their string values; the unfinished
ones are `constants.UNFINISHED_STATUSES`.
"""

from __future__ import annotations

from typing import Any, Protocol

from merger import constants

Record = dict[str, Any]


class JobBackend(Protocol):
    """The operations the job store and the workers' notes need; each is atomic on its own."""

    def insert(self, record: Record, per_user: int, total: int) -> tuple[int, int] | None:
        """Insert a new job's record unless its owner has `per_user` unfinished jobs or all owners `total`.

        The count and the insert are one atomic step: concurrent inserts never overshoot a cap.

        Returns:
            None when inserted; else (the owner's unfinished jobs, all unfinished jobs), and nothing is written.
        """

    def unfinished_counts(self, owner: str) -> tuple[int, int]:
        """(The owner's unfinished jobs, all unfinished jobs) now."""

    def get(self, job_id: str) -> Record | None:
        """A job's record, or None if no job has that id."""

    def update(self, job_id: str, changes: Record, statuses: tuple[str, ...]) -> bool:
        """Compare-and-set: apply `changes` only if the job's status is one of `statuses`.

        Returns:
            True if the job had such a status (and was changed), False otherwise (or if it does not exist).
        """

    def unfinished(self) -> list[Record]:
        """Every unfinished job's record, oldest first."""

    def owned(self, owner: str, limit: int) -> list[Record]:
        """An owner's newest `limit` records, newest first."""

    def beat(self, worker_id: str, at: float) -> None:
        """Record that worker `worker_id` was alive at `at` (epoch seconds)."""

    def last_beat(self) -> float | None:
        """The latest heartbeat of any worker (epoch seconds), or None if none ever beat."""

    def is_alive(self, worker_id: str) -> bool:
        """Whether `worker_id` beat within the last `constants.WORKER_STALE_S` seconds."""

    def note_repo(self, job_id: str, repo_id: str, sealed_token: bytes, at: float) -> None:
        """Note that the job is about to create `repo_id` on the Hub (replacing the job's earlier note)."""

    def forget_repo(self, job_id: str) -> None:
        """Drop the job's note, if any."""

    def noted_repos(self) -> list[tuple[str, str, bytes]]:
        """(job id, repo id, sealed token) of every note, oldest first."""


def backend() -> JobBackend:
    """The backend `constants.REDIS_URL` names (Redis), else SQLite at `constants.JOBS_DB`.

    Read at call time, so that tests can switch it; each Redis URL gets one client (and its connection pool).
    """
    if constants.REDIS_URL:
        from merger.jobs.redis_store import redis_backend

        return redis_backend(constants.REDIS_URL)
    from merger.jobs.database import SQLITE

    return SQLITE
