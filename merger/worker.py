"""The worker side of the job queue: the huey queue, the merge task, and the consumer process.

huey's SQLite queue (`constants.QUEUE_DB`) carries only a job's id and its sealed Hub token; the rest
of the job is its record (:mod:`merger.jobs`). Tokens are sealed with Fernet under a key that exists
only in the environment of the app process and of the consumer it starts (`MERGER_QUEUE_KEY`), so no
file ever holds a token in clear. The worker unseals the token when the job starts, keeps it in that
job's frame only, and scrubs it from every log line it writes.

`python -m merger.worker` runs the consumer alone. It then needs the app's key: set the same
`MERGER_QUEUE_KEY` (`python -c "from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())"`)
in both environments, e.g. as a Space secret. A key that changes (an app restart without a fixed
key) makes jobs still queued fail with a message asking to submit them again.

One consumer per data directory: on start it marks jobs left `running` by a previous one as failed.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken
from huey import SqliteHuey
from huey.api import TaskWrapper
from huey.consumer import Consumer

from . import constants, engine, hub, jobs, tokens
from .errors import MergeCancelled, MergerError
from .jobs import Job, JobStatus

logger = logging.getLogger(__name__)

_WRITE_INTERVAL_S = 0.5  # at most this often a running job writes its progress or reads its cancel flag
_LOG_TAIL_LINES = 50
_SHUTDOWN_TIMEOUT_S = 30.0  # how long a stopping consumer waits for the running merge to clean up
_PROJECT_ROOT = Path(__file__).resolve().parents[1]


TOKEN_LOST_MESSAGE = (
    "The worker could not unseal this job's Hub token: the app restarted after the job was queued, "
    "or the worker runs with another MERGER_QUEUE_KEY than the app. Submit the job again."
)
INTERRUPTED_MESSAGE = (
    "The worker stopped (the app restarted or shut down) before this merge finished; nothing was "
    "pushed. Submit the job again."
)

_SHUTDOWN = threading.Event()  # set when the consumer stops: the running merge stops at its next tensor
_active_tokens: set[str] = set()  # tokens of running jobs, scrubbed from every log line

# ---------------------------------------------------------------- tokens


def ensure_queue_key() -> None:
    """Create this process's token-sealing key if it has none; child processes inherit it."""
    if not os.environ.get(constants.QUEUE_KEY_ENV):
        os.environ[constants.QUEUE_KEY_ENV] = Fernet.generate_key().decode()


def scrub(text: str) -> str:
    """Replace every Hub token (the running jobs' and anything shaped like one) with `***`.

    Args:
        text: a log line, traceback or message.

    Returns:
        The text without tokens.
    """
    return tokens.scrub(text, tuple(_active_tokens))


class ScrubbingFormatter(logging.Formatter):
    """A log formatter whose output (message, arguments and traceback) never holds a Hub token."""

    def format(self, record: logging.LogRecord) -> str:
        """Format `record` as usual, then :func:`scrub` it."""
        return scrub(super().format(record))


def _fernet() -> Fernet:
    return Fernet(os.environ[constants.QUEUE_KEY_ENV].encode())


# ---------------------------------------------------------------- the queue


@dataclass(frozen=True)
class _Queue:
    huey: SqliteHuey
    merge: TaskWrapper  # calling it enqueues a merge task


_queues: dict[Path, _Queue] = {}
_queues_lock = threading.Lock()


def _queue() -> _Queue:
    # One huey per queue file, built on first use, so `constants.QUEUE_DB` is read at call time.
    path = Path(constants.QUEUE_DB)
    with _queues_lock:
        if path not in _queues:
            path.parent.mkdir(parents=True, exist_ok=True)
            huey = SqliteHuey("merger", filename=str(path), results=False)
            _queues[path] = _Queue(huey, huey.task(name="merge")(_run_job))
        return _queues[path]


def get_huey() -> SqliteHuey:
    """The huey instance on `constants.QUEUE_DB` (tests switch it to immediate mode).

    Returns:
        The process's SqliteHuey for that file, with the merge task registered.
    """
    return _queue().huey


def enqueue(job_id: str, token: str) -> None:
    """Queue the merge task of an existing `queued` job record; :func:`merger.jobs.submit` calls it.

    Args:
        job_id: the job's id.
        token: the job's Hub token; it is sealed before it reaches the queue.
    """
    ensure_queue_key()
    _queue().merge(job_id, _fernet().encrypt(token.encode()))


# ---------------------------------------------------------------- the task


@dataclass(frozen=True)
class _Outcome:
    status: JobStatus
    result_url: str | None = None
    error: str | None = None


class _Reporter:
    """A running job's progress and log lines, written to its record at most every _WRITE_INTERVAL_S."""

    def __init__(self, job_id: str):
        self.job_id = job_id
        self.fraction = 0.0
        self.tensor = ""
        self.lines: deque[str] = deque(maxlen=_LOG_TAIL_LINES)
        self._lock = threading.Lock()  # log lines can come from the engine's helper threads
        self._last_write = float("-inf")
        self._last_cancel_check = float("-inf")
        self._cancel_requested = False

    @property
    def log_tail(self) -> str:
        return "\n".join(self.lines)

    def progress(self, fraction: float, message: str) -> None:
        self.fraction, self.tensor = fraction, message
        self.write()

    def log(self, line: str) -> None:
        self.lines.append(line)
        self.write()

    def write(self, force: bool = False) -> None:
        with self._lock:
            now = time.monotonic()
            if not force and now - self._last_write < _WRITE_INTERVAL_S:
                return
            self._last_write = now
            jobs.record_progress(self.job_id, self.fraction, self.tensor, self.log_tail)

    def should_cancel(self) -> bool:
        if _SHUTDOWN.is_set():
            return True
        now = time.monotonic()
        if now - self._last_cancel_check >= _WRITE_INTERVAL_S:
            self._last_cancel_check = now
            self._cancel_requested = jobs.is_cancel_requested(self.job_id)
        return self._cancel_requested


class _TailHandler(logging.Handler):
    """Copies `merger.*` log records into the running job's log tail, scrubbed, one line each.

    Only a record's first line is kept: the tail is a progress view for the user; multi-line records
    (tracebacks) stay in the worker's log.
    """

    def __init__(self, reporter: _Reporter):
        super().__init__(logging.INFO)
        self.reporter = reporter
        self.setFormatter(ScrubbingFormatter("%(asctime)s %(message)s", "%H:%M:%S"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.reporter.log(self.format(record).splitlines()[0])
        except Exception:
            self.handleError(record)


def _run_job(job_id: str, sealed_token: bytes) -> None:
    """The huey task: run one job to its final status; every merge or push failure ends up there."""
    if not jobs.mark_running(job_id):
        logger.info("Job %s was cancelled before it started; skipped.", job_id)
        return
    job = jobs.get_job(job_id)
    reporter = _Reporter(job_id)
    work_dir = Path(constants.DATA_DIR) / "work" / job_id
    handler = _TailHandler(reporter)
    logging.getLogger("merger").addHandler(handler)
    try:
        outcome = _outcome(job, sealed_token, work_dir, reporter)
    finally:
        logging.getLogger("merger").removeHandler(handler)
        shutil.rmtree(work_dir, ignore_errors=True)
    reporter.write(force=True)
    jobs.mark_finished(
        job_id, outcome.status, log_tail=reporter.log_tail, result_url=outcome.result_url, error=outcome.error
    )


def _outcome(job: Job, sealed_token: bytes, work_dir: Path, reporter: _Reporter) -> _Outcome:
    """Unseal the token, merge, push; every exception becomes a status and a message for the user."""
    try:
        token = _fernet().decrypt(sealed_token).decode()
    except InvalidToken:
        logger.error("Job %s: the sealed Hub token does not match this worker's key.", job.id)
        return _Outcome(JobStatus.FAILED, error=TOKEN_LOST_MESSAGE)
    if token:
        _active_tokens.add(token)
    try:
        url = _merge_and_push(job, token, work_dir / "model", reporter)
        return _Outcome(JobStatus.SUCCEEDED, result_url=url)
    except MergeCancelled:
        if _SHUTDOWN.is_set() and not jobs.is_cancel_requested(job.id):
            logger.warning("Job %s interrupted: the worker is stopping.", job.id)
            return _Outcome(JobStatus.FAILED, error=INTERRUPTED_MESSAGE)
        logger.info("Job %s cancelled.", job.id)
        return _Outcome(JobStatus.CANCELLED)
    except MergerError as err:
        logger.info("Job %s failed: %s", job.id, err)
        return _Outcome(JobStatus.FAILED, error=scrub(str(err)))
    except Exception as err:
        # The traceback is scrubbed here, at the source, so that no handler anywhere can print the token.
        logger.error("Job %s failed unexpectedly (%s):\n%s", job.id, type(err).__name__, scrub(traceback.format_exc()))
        return _Outcome(
            JobStatus.FAILED,
            error=f"The merge failed unexpectedly ({type(err).__name__}); the worker log has the details.",
        )
    finally:
        _active_tokens.discard(token)


def _merge_and_push(job: Job, token: str, out_dir: Path, reporter: _Reporter) -> str:
    name = job.repo_id.rsplit("/", 1)[-1]
    logger.info("Job %s: merging for %s.", job.id, job.repo_id)
    engine.run_merge(
        job.config_yaml,
        out_dir,
        token=token,
        title=name,
        progress=reporter.progress,
        should_cancel=reporter.should_cancel,
    )
    # The upload cannot be stopped half-way, so this is the last point where a cancel takes effect.
    if _SHUTDOWN.is_set() or jobs.is_cancel_requested(job.id):
        raise MergeCancelled("the merge was cancelled before its upload; nothing was pushed")
    logger.info("Job %s: uploading to %s.", job.id, job.repo_id)
    url = hub.push_folder(out_dir, job.repo_id, token, private=job.private)
    logger.info("Job %s: pushed %s", job.id, url)
    return url


# ---------------------------------------------------------------- the consumer


def recover_interrupted_jobs() -> None:
    """Fail the jobs a previous consumer left `running` and delete its work folders (consumer start only)."""
    count = jobs.fail_running_jobs(INTERRUPTED_MESSAGE)
    if count:
        logger.warning("Marked %d job(s) left running by a previous worker as failed.", count)
    shutil.rmtree(Path(constants.DATA_DIR) / "work", ignore_errors=True)


class _MergeConsumer(Consumer):
    """huey's consumer, except that every stop asks the running merge to stop and waits for it.

    huey's graceful stop waits for the task, which can take an hour; its immediate stop exits in the
    middle of a write, leaving a stray work folder and a job stuck `running`. Every signal (SIGINT,
    SIGTERM, SIGHUP) comes here.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # On SIGHUP huey re-executes `sys.argv`, which under `python -m merger.worker` is this file's
        # path, and the file cannot run outside its package: stop instead, as for the other signals.
        if hasattr(signal, "SIGHUP"):
            self._signal_actions[signal.SIGHUP] = (False, True)

    def stop(self, graceful: bool = False) -> None:
        """Ask the running merge to stop at its next tensor, then wait up to _SHUTDOWN_TIMEOUT_S for it."""
        _SHUTDOWN.set()
        super().stop(graceful=True)


def _exit_with_parent(parent_pid: int) -> None:
    # A consumer orphaned by a crashed app would race the next app's consumer for the same queue.
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    logger.warning("The app (pid %d) is gone; stopping.", parent_pid)
    os.kill(os.getpid(), signal.SIGTERM)


def main(argv: list[str] | None = None) -> int:
    """Run the consumer until SIGTERM or SIGINT: `python -m merger.worker`.

    Args:
        argv: command-line arguments (default: `sys.argv[1:]`).

    Returns:
        The exit status: 0 after a clean stop, 2 without a valid MERGER_QUEUE_KEY.
    """
    parser = argparse.ArgumentParser(prog="python -m merger.worker", description="Run merger's job worker.")
    parser.add_argument("--parent-pid", type=int, help="stop when this process (the app) exits")
    args = parser.parse_args(argv)

    handler = logging.StreamHandler()
    handler.setFormatter(ScrubbingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)

    try:
        _fernet()
    except (KeyError, ValueError):
        logger.error(
            "%s must hold the app's Fernet key (32 url-safe base64 bytes); start the worker from the app, "
            "or set the same key in both environments.",
            constants.QUEUE_KEY_ENV,
        )
        return 2
    recover_interrupted_jobs()
    if args.parent_pid:
        threading.Thread(target=_exit_with_parent, args=(args.parent_pid,), daemon=True).start()
    # One worker thread: a merge holds several models' tensors in memory at once.
    consumer = _MergeConsumer(
        get_huey(), workers=1, worker_type="thread", periodic=False, max_delay=1.0, shutdown_timeout=_SHUTDOWN_TIMEOUT_S
    )
    logger.info("Worker ready: queue %s, jobs %s.", constants.QUEUE_DB, constants.JOBS_DB)
    consumer.run()
    return 0


def start_consumer_process(log_file: Path | None = None) -> subprocess.Popen:
    """Start the consumer as a child process that shares this process's queue, records and key.

    The child gets this process's data paths (whatever set them) and its queue key (created here if
    missing), and stops by itself when this process exits. Stop it with `terminate()` (SIGTERM).

    Args:
        log_file: append the worker's log there; by default it goes to this process's stderr.

    Returns:
        The child process.
    """
    ensure_queue_key()
    env = dict(
        os.environ,
        MERGER_DATA_DIR=str(constants.DATA_DIR),
        MERGER_QUEUE_DB=str(constants.QUEUE_DB),
        MERGER_JOBS_DB=str(constants.JOBS_DB),
        PYTHONPATH=os.pathsep.join(filter(None, [str(_PROJECT_ROOT), os.environ.get("PYTHONPATH")])),
    )
    command = [sys.executable, "-m", "merger.worker", "--parent-pid", str(os.getpid())]
    if log_file is None:
        return subprocess.Popen(command, env=env)
    with open(log_file, "ab") as log:
        return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)


if __name__ == "__main__":
    # Run the imported module, not this `__main__` copy: huey names tasks after their module, and the
    # app enqueues `merger.worker.merge`.
    from merger.worker import main as _main

    sys.exit(_main())
