"""The jobs database: one SQLite file at `constants.JOBS_DB`, shared by the app and the worker process.

The embedded backend of :mod:`merger.jobs.storage` (:data:`SQLITE`). Every change is one short statement
in WAL mode on a connection of its own, so neither process holds a lock for long. The file (and SQLite's
`-wal` and `-shm` files) is readable by this user only. The tables: the job records
(:mod:`merger.jobs.store`), and the workers' heartbeats and the repos a job created on the Hub but has not
yet committed to (:mod:`merger.jobs.worker_notes`).

Paths are looked up on :mod:`merger.constants` at call time, so tests can point them elsewhere.
"""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path
from typing import Any

from merger import constants

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
    updated_at real not null,
    owner text not null default '',
    reuse_repo integer not null default 0,
    error_type text,
    worker text not null default '',
    options text,
    evaluation text
);
create index if not exists jobs_status on jobs (status, owner);
create table if not exists pending_repos (
    job_id text primary key,
    repo_id text not null,
    sealed_token blob not null,
    created_at real not null
);
create table if not exists workers (
    id text primary key,
    beat_at real not null
)
"""
# Columns added after the first release: a data dir from then gets them on first use.
_ADDED_COLUMNS = {
    "owner": "alter table jobs add column owner text not null default ''",
    "reuse_repo": "alter table jobs add column reuse_repo integer not null default 0",
    "error_type": "alter table jobs add column error_type text",
    "worker": "alter table jobs add column worker text not null default ''",
    "options": "alter table jobs add column options text",
    "evaluation": "alter table jobs add column evaluation text",
}
_FORGET_WORKERS_AFTER_S = 24 * 3600  # heartbeats of workers gone this long are dropped


def execute(sql: str, params: tuple) -> int:
    """Run one write statement in its own (autocommit) transaction; returns the rows it changed."""
    conn = connect()
    try:
        return conn.execute(sql, params).rowcount
    finally:
        conn.close()


def connect() -> sqlite3.Connection:
    """A new connection to the jobs database (created, with its tables, on first use); the caller closes it."""
    # A connection per call: both processes touch this file, and short-lived connections hold no locks.
    path = Path(constants.JOBS_DB)
    create_private_file(path)
    conn = sqlite3.connect(path, timeout=_BUSY_TIMEOUT_S, isolation_level=None)
    conn.row_factory = sqlite3.Row
    try:
        _use_wal(conn)
        conn.executescript(_SCHEMA)
        _add_missing_columns(conn)
    except BaseException:
        conn.close()
        raise
    return conn


def create_private_file(path: Path) -> None:
    """Create `path` (and its folder) readable by this user only, if it does not exist yet.

    SQLite gives its `-wal` and `-shm` files the database's mode, so they are owner-only too: the records
    hold configs and owners, the queue sealed tokens.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass


def _add_missing_columns(conn: sqlite3.Connection) -> None:
    present = {row["name"] for row in conn.execute("pragma table_info(jobs)")}
    for name, statement in _ADDED_COLUMNS.items():
        if name not in present:
            try:
                conn.execute(statement)
            except sqlite3.OperationalError as err:  # the other process added it just now
                if "duplicate column" not in str(err):
                    raise


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


class SqliteBackend:
    """:class:`merger.jobs.storage.JobBackend` on the SQLite file at `constants.JOBS_DB` (one machine).

    Raises (every method): sqlite3.Error when the file cannot be read or written.
    """

    def insert(self, record: dict[str, Any], per_user: int, total: int) -> tuple[int, int] | None:
        columns = ", ".join(record)
        marks = ", ".join("?" for _ in record)
        conn = connect()
        try:
            conn.execute("begin immediate")  # the count and the insert see no other submit in between
            try:
                mine, everyone = _unfinished_counts(conn, record["owner"])
                if mine >= per_user or everyone >= total:
                    conn.execute("rollback")
                    return mine, everyone
                conn.execute(f"insert into jobs ({columns}) values ({marks})", tuple(record.values()))
            except BaseException:
                conn.execute("rollback")
                raise
            conn.execute("commit")
        finally:
            conn.close()
        return None

    def unfinished_counts(self, owner: str) -> tuple[int, int]:
        conn = connect()
        try:
            return _unfinished_counts(conn, owner)
        finally:
            conn.close()

    def get(self, job_id: str) -> dict[str, Any] | None:
        rows = _select("select * from jobs where id = ?", (job_id,))
        return rows[0] if rows else None

    def update(self, job_id: str, changes: dict[str, Any], statuses: tuple[str, ...]) -> bool:
        assignments = ", ".join(f"{column} = ?" for column in changes)
        marks = ", ".join("?" for _ in statuses)
        return bool(execute(
            f"update jobs set {assignments} where id = ? and status in ({marks})",
            (*changes.values(), job_id, *statuses),
        ))

    def unfinished(self) -> list[dict[str, Any]]:
        marks = ", ".join("?" for _ in constants.UNFINISHED_STATUSES)
        return _select(
            f"select * from jobs where status in ({marks}) order by created_at", constants.UNFINISHED_STATUSES
        )

    def owned(self, owner: str, limit: int) -> list[dict[str, Any]]:
        return _select("select * from jobs where owner = ? order by created_at desc limit ?", (owner, int(limit)))

    def beat(self, worker_id: str, at: float) -> None:
        execute("insert or replace into workers (id, beat_at) values (?, ?)", (worker_id, at))
        execute("delete from workers where beat_at < ?", (at - _FORGET_WORKERS_AFTER_S,))

    def last_beat(self) -> float | None:
        return _select("select max(beat_at) as beat_at from workers", ())[0]["beat_at"]

    def is_alive(self, worker_id: str) -> bool:
        rows = _select("select beat_at from workers where id = ?", (worker_id,))
        return bool(rows) and time.time() - rows[0]["beat_at"] <= constants.WORKER_STALE_S

    def note_repo(self, job_id: str, repo_id: str, sealed_token: bytes, at: float) -> None:
        execute(
            "insert or replace into pending_repos (job_id, repo_id, sealed_token, created_at) values (?, ?, ?, ?)",
            (job_id, repo_id, sealed_token, at),
        )

    def forget_repo(self, job_id: str) -> None:
        execute("delete from pending_repos where job_id = ?", (job_id,))

    def noted_repos(self) -> list[tuple[str, str, bytes]]:
        rows = _select("select job_id, repo_id, sealed_token from pending_repos order by created_at", ())
        return [(row["job_id"], row["repo_id"], bytes(row["sealed_token"])) for row in rows]


SQLITE = SqliteBackend()


def _select(sql: str, params: tuple) -> list[dict[str, Any]]:
    conn = connect()
    try:
        return [dict(row) for row in conn.execute(sql, params).fetchall()]
    finally:
        conn.close()


def _unfinished_counts(conn: sqlite3.Connection, owner: str) -> tuple[int, int]:
    marks = ", ".join("?" for _ in constants.UNFINISHED_STATUSES)
    rows = conn.execute(
        f"select owner = ? as mine, count(*) as n from jobs where status in ({marks}) group by owner = ?",
        (owner, *constants.UNFINISHED_STATUSES, owner),
    ).fetchall()
    counts = {bool(row["mine"]): row["n"] for row in rows}
    return counts.get(True, 0), sum(counts.values())
