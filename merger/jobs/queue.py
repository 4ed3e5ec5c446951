"""The job queue: huey's queue, the sealing of Hub tokens on their way through it, and submit.

huey's queue carries only a job's id and its sealed Hub token; the rest of the job is its record
(:mod:`merger.jobs.store`). The queue is huey's SQLite file (`constants.QUEUE_DB`), or with
`constants.REDIS_URL` huey's Redis queue (the list `huey.redis.merger`), which workers on several
machines consume. Tokens are sealed with Fernet under the queue key: the `MERGER_QUEUE_KEY` environment
variable when set, else (SQLite only) a key created once in the data directory (`queue.key`, mode
0600), so that jobs still queued survive an app restart. With Redis the key must be in the environment
of the app and of every worker: they share no data directory.

The task's body is the worker's (:mod:`merger.jobs.worker` registers it with :func:`set_runner` when
imported): the app's side queues jobs without importing the worker or the engine.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography.fernet import Fernet
from huey import Huey, RedisHuey, SqliteHuey
from huey.api import TaskWrapper

from merger import constants
from merger.jobs.database import create_private_file
from merger.jobs.store import JobStatus, create_record, mark_finished

logger = logging.getLogger(__name__)

# The task bodies the worker registers (set_runner): `merge` runs a job, `publish` pushes a reviewed one.
_runners: dict[str, Callable[[str, bytes], None]] = {}


def submit(
    config_yaml: str,
    repo_id: str,
    token: str,
    owner: str,
    private: bool = False,
    reuse_repo: bool = False,
    options: str | None = None,
) -> str:
    """Queue a merge whose result is pushed to `repo_id`, if the owner's and the app's caps allow.

    The record is written first (:func:`merger.jobs.store.create_record`, which checks the caps and
    refuses tokens in the config), then the job is queued with its token sealed; the token is never
    written to the job record or to the queue in clear.

    Args: as :func:`merger.jobs.store.create_record`.

    Returns:
        The new job's id (uuid4 hex, `constants.JOB_ID_LENGTH` characters).

    Raises:
        TokenInConfigError, JobLimitError: as :func:`merger.jobs.store.create_record`.
        sqlite3.Error, redis.RedisError: the job record or the queue could not be written (then no job
            exists to run).
    """
    job_id = create_record(config_yaml, repo_id, token, owner, private=private, reuse_repo=reuse_repo, options=options)
    try:
        enqueue(job_id, token)
    except BaseException:
        # Without its queue entry the job would stay `queued` forever.
        mark_finished(job_id, JobStatus.FAILED, error="The job could not be queued; submit it again.")
        raise
    return job_id


# ---------------------------------------------------------------- the key


def ensure_queue_key() -> None:
    """Give this process the queue key (child processes inherit it).

    `MERGER_QUEUE_KEY` wins when set; otherwise the key is read from `DATA_DIR/queue.key`, which the
    first process to need it creates, readable by its user only (mode 0600).

    Raises:
        KeyError: `constants.REDIS_URL` is set and `MERGER_QUEUE_KEY` is not (a key in one machine's data
            directory would seal tokens that the workers on other machines cannot unseal).
    """
    if not os.environ.get(constants.QUEUE_KEY_ENV):
        if constants.REDIS_URL:
            raise KeyError(f"{constants.QUEUE_KEY_ENV} must be set for the app and every worker when REDIS_URL is set")
        os.environ[constants.QUEUE_KEY_ENV] = _stored_queue_key(Path(constants.DATA_DIR) / constants.QUEUE_KEY_FILE_NAME)


def _stored_queue_key(path: Path) -> str:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        draft = path.with_name(f".{path.name}.{os.getpid()}")
        fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as file:
            file.write(Fernet.generate_key().decode())
        try:
            os.link(draft, path)  # atomic, and fails if another process made the key first: then use theirs
        except FileExistsError:
            pass
        finally:
            draft.unlink()
    if path.stat().st_mode & 0o077:
        logger.warning("%s was readable by others; making it readable by its owner only.", path)
        path.chmod(0o600)
    return path.read_text().strip()


def seal(token: str) -> bytes:
    """The token encrypted under the queue key (call :func:`ensure_queue_key` first).

    Raises:
        KeyError: no queue key in the environment. ValueError: the key is not a Fernet key.
    """
    return _fernet().encrypt(token.encode())


def unseal(sealed_token: bytes) -> str:
    """The token :func:`seal` sealed.

    Raises:
        cryptography.fernet.InvalidToken: sealed under another key. KeyError, ValueError: as :func:`seal`.
    """
    return _fernet().decrypt(sealed_token).decode()


def _fernet() -> Fernet:
    return Fernet(os.environ[constants.QUEUE_KEY_ENV].encode())


# ---------------------------------------------------------------- the queue


@dataclass(frozen=True)
class _Queue:
    huey: Huey
    merge: TaskWrapper  # calling it enqueues a merge task
    publish: TaskWrapper  # calling it enqueues the push of a reviewed job's staged output


_queues: dict[str | Path, _Queue] = {}
_queues_lock = threading.Lock()


def _queue() -> _Queue:
    # One huey per Redis URL or queue file, built on first use, so the constants are read at call time.
    where = constants.REDIS_URL or Path(constants.QUEUE_DB)
    with _queues_lock:
        if where not in _queues:
            if constants.REDIS_URL:
                huey = RedisHuey("merger", url=constants.REDIS_URL, results=False)
            else:
                create_private_file(where)
                huey = SqliteHuey("merger", filename=str(where), results=False)
            _queues[where] = _Queue(huey, huey.task(name="merge")(_run_merge), huey.task(name="publish")(_run_publish))
        return _queues[where]


def get_huey() -> Huey:
    """The huey instance on `constants.REDIS_URL`, else on `constants.QUEUE_DB` (tests switch it to immediate mode).

    Returns:
        The process's RedisHuey or SqliteHuey for that queue, with the merge task registered.
    """
    return _queue().huey


def enqueue(job_id: str, token: str) -> None:
    """Queue the merge task of an existing `queued` job record; :func:`submit` calls it.

    Args:
        job_id: the job's id.
        token: the job's Hub token; it is sealed before it reaches the queue.
    """
    ensure_queue_key()
    _queue().merge(job_id, seal(token))


def enqueue_publish(job_id: str, token: str) -> None:
    """Queue the push of a reviewed job's staged output (:func:`merger.jobs.review.request_publish` first).

    Args:
        job_id: the job's id (now `queued` again).
        token: the owner's Hub token, sealed before it reaches the queue.
    """
    ensure_queue_key()
    _queue().publish(job_id, seal(token))


def set_runner(run: Callable[[str, bytes], None], task: str = "merge") -> None:
    """Make `run(job_id, sealed_token)` the body of `task` (`merge` or `publish`) in this process (the worker)."""
    _runners[task] = run


def _run(task: str, job_id: str, sealed_token: bytes) -> None:
    if task not in _runners:
        raise RuntimeError("this process has no job runner: import merger.jobs.worker to consume the queue")
    _runners[task](job_id, sealed_token)


def _run_merge(job_id: str, sealed_token: bytes) -> None:
    _run("merge", job_id, sealed_token)


def _run_publish(job_id: str, sealed_token: bytes) -> None:
    _run("publish", job_id, sealed_token)
