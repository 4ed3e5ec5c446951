"""The worker side of the job queue: the merge task's body and the consumer process.

The queue and the sealing of tokens are :mod:`merger.jobs.queue`'s; importing this module makes
:func:`_run_job` the queue's task body (:func:`merger.jobs.queue.set_runner`). The worker unseals the
token when the job starts, keeps it in that job's frame only, and scrubs it from every log line.

`python -m merger.jobs.worker` runs the consumer alone; it must see the app's data directory (and the
app's `MERGER_QUEUE_KEY`, if the app has one in its environment). The app then starts no worker of
its own (`MERGER_EXTERNAL_WORKER=1`) and shows the worker's heartbeat instead. Started by the app,
the consumer is supervised by :class:`merger.jobs.supervisor.WorkerSupervisor`, which starts a new one
when it dies.

One consumer per data directory: on start it marks jobs left `running` by a previous one as failed,
deletes their partial output, and deletes the Hub repos they created but never committed to.
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

from cryptography.fernet import InvalidToken
from huey.consumer import Consumer

from merger import constants, engine
from merger.publish import hub_push, stream_push
from merger.jobs import store as jobs
from merger.jobs import worker_notes
from merger.errors import MergeCancelled, MergerError
from merger.scrub import ACTIVE_TOKENS, ScrubbingFormatter, install_log_scrubbing, scrub_log
from merger.jobs.queue import ensure_queue_key, get_huey, seal, set_runner, unseal
from merger.jobs.store import Job, JobStatus

logger = logging.getLogger(__name__)

_WRITE_INTERVAL_S = 0.5  # at most this often a running job writes its progress or reads its cancel flag
_LOG_TAIL_LINES = 50
SHUTDOWN_TIMEOUT_S = 30.0  # how long a stopping consumer waits for the running merge to clean up
_PROJECT_ROOT = Path(__file__).resolve().parents[2]


TOKEN_LOST_MESSAGE = (
    "The worker could not unseal this job's Hub token: the queue key changed after the job was queued "
    "(MERGER_QUEUE_KEY differs between the app and the worker, or the data directory's queue.key was "
    "replaced). Submit the job again."
)
INTERRUPTED_MESSAGE = (
    "The worker stopped (the app restarted or shut down) before this merge finished; nothing was "
    "pushed. Submit the job again."
)
WORKER_LOST_REASON = "the worker process stopped unexpectedly (it was killed, ran out of memory, or the app restarted)"
NOTHING_PUSHED = "Nothing was pushed."

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
        job_id, outcome.status, log_tail=reporter.log_tail, result_url=outcome.result_url, error=outcome.error,
        error_type=outcome.error_type,
    )


set_runner(_run_job)


def _outcome(job: Job, sealed_token: bytes, work_dir: Path, reporter: _Reporter) -> _Outcome:
    """Unseal the token, merge, push; every exception becomes a status and a message for the user."""
    try:
        token = unseal(sealed_token)
    except InvalidToken:
        logger.error("Job %s: the sealed Hub token does not match this worker's key.", job.id)
        return _Outcome(JobStatus.FAILED, error=TOKEN_LOST_MESSAGE)
    if token:
        ACTIVE_TOKENS.add(token)
    try:
        url = _merge_and_push(job, token, sealed_token, work_dir / "model", reporter)
        return _Outcome(JobStatus.SUCCEEDED, result_url=url)
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


def _merge_and_push(job: Job, token: str, sealed_token: bytes, out_dir: Path, reporter: _Reporter) -> str:
    # The target is checked again before the merge: the Hub may have changed while the job was queued. Each
    # shard is uploaded while the next is merged, then deleted; the commit at the end makes them visible.
    # The repo is noted before it is created: a worker killed mid-merge leaves the note for the next one's sweep.
    push = stream_push.StreamPush(
        job.repo_id, token, private=job.private, reuse_repo=job.reuse_repo,
        before_create=lambda repo_id: worker_notes.record_pending_repo(job.id, repo_id, sealed_token),
    )
    logger.info("Job %s: merging for %s.", job.id, push.target.repo_id)
    try:
        with push:
            try:
                engine.run_merge(
                    job.config_yaml,
                    out_dir,
                    token=token,
                    title=push.target.repo_id,  # the card's heading and usage snippet name the repo people load
                    progress=reporter.progress,
                    should_cancel=reporter.should_cancel,
                    on_shard=push,
                )
            except MergerError as err:
                err.before_push = not getattr(err, "from_push", False)  # read by _job_message: nothing is visible
                raise
            # The commit cannot be stopped half-way, so this is the last point where a cancel takes effect.
            if _SHUTDOWN.is_set() or jobs.is_cancel_requested(job.id):
                raise MergeCancelled("the merge was cancelled before its commit; nothing was pushed")
            logger.info("Job %s: uploading to %s.", job.id, push.target.repo_id)
            url = push.commit(out_dir)
    finally:
        worker_notes.clear_pending_repo(job.id)  # committed, or already deleted when the push was left
    logger.info("Job %s: pushed %s", job.id, url)
    return url


# ---------------------------------------------------------------- the consumer


def recover_interrupted_jobs(reason: str = WORKER_LOST_REASON) -> None:
    """Clean up after a consumer that died: its Hub repos, its running jobs, its partial output.

    Repos that jobs created but never committed to are deleted (kept if they hold a commit); jobs left
    `running` are marked failed with `reason` and what is on the Hub; the work folders (staging
    shards included) are deleted. Called when a consumer starts, and by the app's watchdog before it
    starts a new one. The Hub repos whose check failed stay noted for the next sweep.

    Args:
        reason: why the jobs stopped, for their owners (a clause; the message adds the rest).
    """
    # The partial output goes first, so that a job's message ("its partial output was deleted") is true when read.
    shutil.rmtree(Path(constants.DATA_DIR) / "work", ignore_errors=True)
    for job_id, on_hub in _sweep_pending_repos().items():
        jobs.mark_finished(job_id, JobStatus.FAILED, error=_lost_job_message(reason, on_hub))
    count = jobs.fail_running_jobs(_lost_job_message(reason, NOTHING_PUSHED))
    if count:
        logger.warning("Marked %d job(s) left running by a previous worker as failed.", count)


def _lost_job_message(reason: str, on_hub: str) -> str:
    return f"This job stopped before it finished: {reason}. Its partial output was deleted. {on_hub} Submit the job again."


def _sweep_pending_repos() -> dict[str, str]:
    """Delete the repos noted as created but not committed; returns job id -> what is on the Hub now."""
    outcomes = {}
    for job_id, repo_id, sealed_token in worker_notes.pending_repos():
        try:
            token = unseal(sealed_token)
        except (InvalidToken, KeyError, ValueError):
            outcomes[job_id] = (
                f"The repo `{repo_id}` this job created could not be checked (the queue key changed); "
                "delete it on the Hub if it is empty."
            )
            worker_notes.clear_pending_repo(job_id)
            continue
        ACTIVE_TOKENS.add(token)
        try:
            settled, outcomes[job_id] = hub_push.delete_unpushed_repo(repo_id, token)
        finally:
            ACTIVE_TOKENS.discard(token)
        if settled:
            worker_notes.clear_pending_repo(job_id)
        logger.warning("Job %s: %s", job_id, outcomes[job_id])
    return outcomes


def _heartbeat(stop: threading.Event) -> None:
    # The app reads it to tell "no worker alive since ..." when the worker runs apart.
    while True:
        try:
            worker_notes.beat(os.getpid())
        except Exception as err:  # noqa: BLE001 - a busy database must not kill the heartbeat
            logger.warning("could not write the heartbeat (%s)", type(err).__name__)
        if stop.wait(constants.WORKER_HEARTBEAT_S):
            return


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
        logger.error(
            "%s must hold the app's Fernet key (32 url-safe base64 bytes); set the same key in the app's and "
            "the worker's environments, or unset it in both to use %s in the shared data directory.",
            constants.QUEUE_KEY_ENV,
            constants.QUEUE_KEY_FILE_NAME,
        )
        return 2
    recover_interrupted_jobs()
    stop_heartbeat = threading.Event()
    threading.Thread(target=_heartbeat, args=(stop_heartbeat,), daemon=True, name="merger-heartbeat").start()
    if args.parent_pid:
        threading.Thread(target=_exit_with_parent, args=(args.parent_pid,), daemon=True).start()
    # One worker thread: a merge holds several models' tensors in memory at once.
    consumer = _MergeConsumer(
        get_huey(), workers=1, worker_type="thread", periodic=False, max_delay=1.0, shutdown_timeout=SHUTDOWN_TIMEOUT_S
    )
    logger.info("Worker ready: queue %s, jobs %s.", constants.QUEUE_DB, constants.JOBS_DB)
    try:
        consumer.run()
    finally:
        stop_heartbeat.set()
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
