"""The worker side of the job queue: the merge task's body and the consumer process.

The queue and the sealing of tokens are :mod:`merger.jobs.queue`'s; importing this module makes
:func:`_run_job` the queue's merge task body and :func:`_run_publish` its publish task body
(:func:`merger.jobs.queue.set_runner`). A job's merge, evaluation and push go through
:mod:`merger.service.run_job`; this module keeps the records, the log tail and the sweeps. The worker unseals the
token when the job starts, keeps it in that job's frame only, and scrubs it from every log line.

`python -m merger.jobs.worker` runs the consumer alone; it must see the app's data directory (and the
app's `MERGER_QUEUE_KEY`, if the app has one in its environment). The app then starts no worker of
its own (`MERGER_EXTERNAL_WORKER=1`) and shows the worker's heartbeat instead. Started by the app,
the consumer is supervised by :class:`merger.jobs.supervisor.WorkerSupervisor`, which starts a new one
when it dies.

Embedded (SQLite), one consumer per data directory: on start it marks jobs left `running` by a previous
one as failed, deletes their partial output, and deletes the Hub repos they created but never committed
to. With `REDIS_URL`, any number of consumers on any number of machines share the queue and the records
(each with its own data directory for its work folders); each claims a job with a compare-and-set, beats a
heartbeat, and fails the jobs of the workers whose heartbeat stopped (:mod:`merger.jobs.recovery`).
Every consumer also deletes staged merges whose review expired
(:func:`merger.jobs.review.expire_reviews`), at start and every REVIEW_SWEEP_S.
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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cryptography.fernet import InvalidToken
from huey.consumer import Consumer

from merger import constants
from merger.jobs import review
from merger.jobs import store as jobs
from merger.jobs import worker_notes
from merger.errors import MergeCancelled, MergerError
from merger.scrub import ACTIVE_TOKENS, ScrubbingFormatter, install_log_scrubbing, scrub_log
from merger.jobs.queue import ensure_queue_key, get_huey, seal, set_runner, unseal
from merger.jobs.recovery import HEARTBEAT_LOST_REASON, recover_interrupted_jobs, start_watching_workers
from merger.jobs.store import Job, JobStatus
from merger.service import run_job  # the worker's one door to the engine, the evaluation and the Hub

logger = logging.getLogger(__name__)

_WRITE_INTERVAL_S = 0.5  # at most this often a running job writes its progress or reads its cancel flag
_LOG_TAIL_LINES = 50
SHUTDOWN_TIMEOUT_S = 30.0  # how long a stopping consumer waits for the running merge to clean up
_PROJECT_ROOT = Path(__file__).resolve().parents[2]
REVIEW_SWEEP_S = 60.0  # how often the heartbeat thread deletes staged merges whose review expired


TOKEN_LOST_MESSAGE = (
    "The worker could not unseal this job's Hub token: the queue key changed after the job was queued "
    "(MERGER_QUEUE_KEY differs between the app and the worker, or the data directory's queue.key was "
    "replaced). Submit the job again."
)
INTERRUPTED_MESSAGE = (
    "The worker stopped (the app restarted or shut down) before this merge finished; nothing was "
    "pushed. Submit the job again."
)

_SHUTDOWN = threading.Event()  # set when the consumer stops: the running merge stops at its next tensor


# ---------------------------------------------------------------- the task


@dataclass(frozen=True)
class _Outcome:
    status: JobStatus
    result_url: str | None = None
    error: str | None = None
    error_type: str | None = None  # the error's class name (what the app's API reports as `error_type`)


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
    """The huey merge task: run one job to its final status (or `awaiting_review`); every failure ends up there."""
    if not jobs.mark_running(job_id, worker_notes.worker_id()):
        logger.info("Job %s was cancelled or claimed before it started; skipped.", job_id)
        return
    work_dir = Path(constants.DATA_DIR) / "work" / job_id
    with _job_log(job_id) as reporter:
        try:
            outcome = _outcome(jobs.get_job(job_id), sealed_token, work_dir, reporter, _merge_and_push)
        finally:
            shutil.rmtree(work_dir, ignore_errors=True)
    _record(job_id, outcome, reporter)


def _run_publish(job_id: str, sealed_token: bytes) -> None:
    """The huey publish task: push a reviewed job's staged merge; a failed push leaves it awaiting review."""
    if not jobs.mark_running(job_id):
        logger.info("Job %s is no longer queued for publishing; skipped.", job_id)
        return
    staged = review.staged_dir(job_id)
    with _job_log(job_id) as reporter:
        outcome = _outcome(jobs.get_job(job_id), sealed_token, staged, reporter, _publish)
    if outcome.status is JobStatus.FAILED and staged.is_dir():  # the merge is still there: publish again, or discard
        review.mark_awaiting_review(job_id, log_tail=reporter.log_tail, error=f"Publishing failed: {outcome.error}")
        return
    _record(job_id, outcome, reporter)
    shutil.rmtree(staged, ignore_errors=True)


set_runner(_run_job)
set_runner(_run_publish, task="publish")


@contextmanager
def _job_log(job_id: str) -> Iterator[_Reporter]:
    """A running job's reporter, with the `merger.*` log lines copied into its log tail meanwhile."""
    reporter = _Reporter(job_id)
    handler = _TailHandler(reporter)
    logging.getLogger("merger").addHandler(handler)
    try:
        yield reporter
    finally:
        logging.getLogger("merger").removeHandler(handler)


def _record(job_id: str, outcome: _Outcome, reporter: _Reporter) -> None:
    reporter.write(force=True)
    if outcome.status is JobStatus.AWAITING_REVIEW:
        review.mark_awaiting_review(job_id, log_tail=reporter.log_tail)
        return
    jobs.mark_finished(
        job_id, outcome.status, log_tail=reporter.log_tail, result_url=outcome.result_url, error=outcome.error,
        error_type=outcome.error_type,
    )


_Body = Callable[[Job, str, bytes, Path, _Reporter], _Outcome]


def _outcome(job: Job, sealed_token: bytes, work_dir: Path, reporter: _Reporter, body: _Body) -> _Outcome:
    """Unseal the token and run `body` (merge and push, or publish); every exception becomes a status and a
    message for the user."""
    try:
        token = unseal(sealed_token)
    except InvalidToken:
        logger.error("Job %s: the sealed Hub token does not match this worker's key.", job.id)
        return _Outcome(JobStatus.FAILED, error=TOKEN_LOST_MESSAGE)
    if token:
        ACTIVE_TOKENS.add(token)
    try:
        return body(job, token, sealed_token, work_dir, reporter)
    except MergeCancelled:
        if _SHUTDOWN.is_set() and not jobs.is_cancel_requested(job.id):
            logger.warning("Job %s interrupted: the worker is stopping.", job.id)
            return _Outcome(JobStatus.FAILED, error=INTERRUPTED_MESSAGE)
        logger.info("Job %s cancelled.", job.id)
        return _Outcome(JobStatus.CANCELLED)
    except MergerError as err:
        logger.info("Job %s failed: %s", job.id, err)
        return _Outcome(JobStatus.FAILED, error=_job_message(err, work_dir), error_type=type(err).__name__)
    except Exception as err:
        # The traceback is scrubbed here, at the source, so that no handler anywhere can print the token.
        logger.error("Job %s failed unexpectedly (%s):\n%s", job.id, type(err).__name__, scrub_log(traceback.format_exc()))
        return _Outcome(
            JobStatus.FAILED,
            error=f"The merge failed unexpectedly ({type(err).__name__}); the worker log has the details.",
            error_type="UnexpectedError",  # as the app labels a bug
        )
    finally:
        ACTIVE_TOKENS.discard(token)


def _job_message(err: MergerError, work_dir: Path) -> str:
    """The failed job's message: tokens scrubbed, the worker's own paths hidden, and the Hub's state said
    when the merge failed before its push (push failures say it themselves)."""
    text = scrub_log(str(err)).replace(str(work_dir), "the job's output folder")
    text = text.replace(str(constants.DATA_DIR), "the worker's data folder")
    return f"{text} Nothing was pushed to the Hub." if getattr(err, "before_push", False) else text


def _merge_and_push(job: Job, token: str, sealed_token: bytes, work_dir: Path, reporter: _Reporter) -> _Outcome:
    hooks = run_job.JobHooks(
        progress=reporter.progress,
        should_cancel=reporter.should_cancel,
        cancelled=lambda: _SHUTDOWN.is_set() or jobs.is_cancel_requested(job.id),
        before_create=_noting_repo(job.id, sealed_token),
        on_evaluation=lambda evaluation: review.record_evaluation(job.id, evaluation),
    )
    try:
        url = run_job.run_job(job, token, work_dir / "model", review.staged_dir(job.id), hooks)
    finally:
        worker_notes.clear_pending_repo(job.id)  # committed, or already deleted by the push
    if url is None:
        return _Outcome(JobStatus.AWAITING_REVIEW)
    return _Outcome(JobStatus.SUCCEEDED, result_url=url)


def _publish(job: Job, token: str, sealed_token: bytes, staged: Path, reporter: _Reporter) -> _Outcome:
    try:
        url = run_job.publish_staged(job, token, staged, _noting_repo(job.id, sealed_token))
    finally:
        worker_notes.clear_pending_repo(job.id)
    return _Outcome(JobStatus.SUCCEEDED, result_url=url)


def _noting_repo(job_id: str, sealed_token: bytes) -> Callable[[str], None]:
    # Noted before the repo exists: a worker killed mid-upload leaves the note for the next one's sweep.
    return lambda repo_id: worker_notes.record_pending_repo(job_id, repo_id, sealed_token)


# ---------------------------------------------------------------- the consumer


def sweep_reviews() -> None:
    """Discard the reviews that expired and delete the staged merges no job awaits any more."""
    for job_id in review.expire_reviews():
        logger.info("Job %s: its review expired; the staged merge was deleted.", job_id)
    for name in review.delete_orphan_staged():  # e.g. a publish interrupted by a dead worker: its job failed
        logger.warning("Deleted the staged merge of job %s, which no longer awaits review.", name)


def _heartbeat(stop: threading.Event) -> None:
    # The app reads it to tell "no worker alive since ..."; other workers, to tell that this one lives. The
    # expiry of reviews rides along: the consumer runs no periodic tasks, and this thread already wakes up.
    last_sweep = time.monotonic()
    while not stop.wait(constants.WORKER_HEARTBEAT_S):
        try:
            worker_notes.beat(worker_notes.worker_id())
            if time.monotonic() - last_sweep >= REVIEW_SWEEP_S:
                last_sweep = time.monotonic()
                sweep_reviews()
        except Exception as err:  # noqa: BLE001 - a busy database must not kill the heartbeat
            logger.warning("could not write the heartbeat or sweep reviews (%s)", type(err).__name__)


class _MergeConsumer(Consumer):
    """huey's consumer, except that every stop asks the running merge to stop and waits for it.

    huey's graceful stop waits for the task, which can take an hour; its immediate stop exits in the
    middle of a write, leaving a stray work folder and a job stuck `running`. Every signal (SIGINT,
    SIGTERM, SIGHUP) comes here.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # On SIGHUP huey re-executes `sys.argv`, which under `python -m merger.jobs.worker` is this file's
        # path, and the file cannot run outside its package: stop instead, as for the other signals.
        if hasattr(signal, "SIGHUP"):
            self._signal_actions[signal.SIGHUP] = (False, True)

    def stop(self, graceful: bool = False) -> None:
        """Ask the running merge to stop at its next tensor, then wait up to SHUTDOWN_TIMEOUT_S for it."""
        _SHUTDOWN.set()
        super().stop(graceful=True)


def _exit_with_parent(parent_pid: int) -> None:
    # A consumer orphaned by a crashed app would race the next app's consumer for the same queue.
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    logger.warning("The app (pid %d) is gone; stopping.", parent_pid)
    os.kill(os.getpid(), signal.SIGTERM)


def main(argv: list[str] | None = None) -> int:
    """Run the consumer until SIGTERM or SIGINT: `python -m merger.jobs.worker`.

    Args:
        argv: command-line arguments (default: `sys.argv[1:]`).

    Returns:
        The exit status: 0 after a clean stop, 2 when the queue key (environment or key file) is invalid.
    """
    parser = argparse.ArgumentParser(prog="python -m merger.jobs.worker", description="Run merger's job worker.")
    parser.add_argument("--parent-pid", type=int, help="stop when this process (the app) exits")
    args = parser.parse_args(argv)

    handler = logging.StreamHandler()
    handler.setFormatter(ScrubbingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)

    install_log_scrubbing()
    try:
        ensure_queue_key()
        seal("")  # a key that is not a Fernet key fails here, not at the first job
    except (KeyError, ValueError):
        # With Redis the workers share no data directory, so the key must come from the environment.
        unset = "" if constants.REDIS_URL else f", or unset it in both to use {constants.QUEUE_KEY_FILE_NAME} in the shared data directory"
        logger.error(
            "%s must hold the app's Fernet key (32 url-safe base64 bytes); set the same key in the app's and "
            "the workers' environments%s.", constants.QUEUE_KEY_ENV, unset,
        )
        return 2
    worker_notes.beat(worker_notes.worker_id())  # alive before it claims a job, so no one fails that job
    # Embedded (SQLite): one consumer per data directory, so every earlier one is dead; with Redis, the
    # workers on other machines may be alive: only those whose heartbeat stopped are.
    if constants.REDIS_URL:
        recover_interrupted_jobs(HEARTBEAT_LOST_REASON)
    else:
        recover_interrupted_jobs(every_worker=True)
    sweep_reviews()
    stop_threads = start_watching_workers()
    threading.Thread(target=_heartbeat, args=(stop_threads,), daemon=True, name="merger-heartbeat").start()
    if args.parent_pid:
        threading.Thread(target=_exit_with_parent, args=(args.parent_pid,), daemon=True).start()
    # One worker thread: a merge holds several models' tensors in memory at once.
    consumer = _MergeConsumer(
        get_huey(), workers=1, worker_type="thread", periodic=False, max_delay=1.0, shutdown_timeout=SHUTDOWN_TIMEOUT_S
    )
    # The Redis URL may hold a password: it is never logged.
    where = "in Redis" if constants.REDIS_URL else f"{constants.QUEUE_DB}, jobs {constants.JOBS_DB}"
    logger.info("Worker %s ready: queue %s.", worker_notes.worker_id(), where)
    try:
        consumer.run()
    finally:
        stop_threads.set()
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
    if constants.REDIS_URL:
        env["REDIS_URL"] = constants.REDIS_URL
    command = [sys.executable, "-m", "merger.jobs.worker", "--parent-pid", str(os.getpid())]
    if log_file is None:
        return subprocess.Popen(command, env=env)
    with open(log_file, "ab") as log:
        return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)


if __name__ == "__main__":
    # Run the imported module, not this `__main__` copy: its module-level state (the running jobs'
    # tokens, the shutdown flag) is the one the registered task body uses.
    from merger.jobs.worker import main as _main

    sys.exit(_main())
