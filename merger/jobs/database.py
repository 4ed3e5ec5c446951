"""The jobs database: one SQLite file at `constants.JOBS_DB`, shared by the app and the worker process.

Every change is one short statement in WAL mode on a connection of its own, so neither process holds a
lock for long. The file (and SQLite's `-wal` and `-shm` files) is readable by this user only. The tables:
the job records (:mod:`merger.jobs.store`), and the worker's heartbeat and the repos a job created on the
Hub but has not yet committed to (:mod:`merger.jobs.worker_notes`).

Paths are looked up on :mod:`merger.constants` at call time, so tests can point them elsewhere.
"""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

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
create table if not exists worker (
    id integer primary key check (id = 1),
    pid integer not null,
    beat_at real not null
)
"""
# Columns added after the first release: a data dir from then gets them on first use.
_ADDED_COLUMNS = {
    "owner": "alter table jobs add column owner text not null default ''",
    "reuse_repo": "alter table jobs add column reuse_repo integer not null default 0",
    "error_type": "alter table jobs add column error_type text",
    "options": "alter table jobs add column options text",
    "evaluation": "alter table jobs add column evaluation text",
}


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
