"""The app's watchdog over its worker process (:mod:`merger.jobs.worker`): restart it when it dies.

Runs in the app's process; the consumer runs in a child process of its own.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import threading
import time
from collections.abc import Callable

from merger import constants
from merger.jobs.recovery import recover_interrupted_jobs
from merger.jobs.worker import SHUTDOWN_TIMEOUT_S, start_consumer_process
from merger.jobs.worker_notes import worker_id

logger = logging.getLogger(__name__)


class WorkerSupervisor:
    """The app's watchdog: it keeps one consumer child alive and cleans up after each one that dies.

    A thread polls the child every `constants.WATCHDOG_INTERVAL_S`. When the child has exited (killed,
    out of memory, crashed), the jobs it left `running` are failed with the reason, their partial
    output and uncommitted Hub repos deleted (:func:`merger.jobs.recovery.recover_interrupted_jobs`;
    with Redis, the jobs of other machines' live workers are left alone), and a new child is
    started, so queued jobs run again. A child that keeps dying at once is restarted less and less
    often (doubling up to a minute).

    Args:
        start: starts a consumer child (default :func:`start_consumer_process`).
        interval: seconds between checks.
    """

    _MAX_BACKOFF_S = 60.0
    _STABLE_AFTER_S = 30.0  # a child that lived this long resets the backoff

    def __init__(self, start: Callable[[], subprocess.Popen] = start_consumer_process, interval: float | None = None):
        self._start = start
        self._interval = constants.WATCHDOG_INTERVAL_S if interval is None else interval
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.restarts = 0
        self.process = start()
        self._started_at = time.monotonic()
        self._thread = threading.Thread(target=self._watch, daemon=True, name="merger-watchdog")
        self._thread.start()

    def _watch(self) -> None:
        backoff = self._interval
        while not self._stop.wait(backoff):
            code = self.process.poll()
            if code is None:
                continue
            lived = time.monotonic() - self._started_at
            backoff = self._interval if lived >= self._STABLE_AFTER_S else min(2 * backoff, self._MAX_BACKOFF_S)
            try:
                self._restart(code)
            except Exception:  # noqa: BLE001 - the watchdog must outlive a failed restart and try again
                logger.exception("could not restart the worker; trying again in %.0fs", backoff)

    def _restart(self, code: int) -> None:
        with self._lock:
            if self._stop.is_set():
                return
            how = _exit_description(code)
            logger.error("The worker (pid %d) %s; failing its running job and starting a new worker.", self.process.pid, how)
            recover_interrupted_jobs(f"the worker process {how} while it ran", dead_worker=worker_id(self.process.pid))
            self.process = self._start()
            self._started_at = time.monotonic()
            self.restarts += 1

    def stop(self, timeout: float = SHUTDOWN_TIMEOUT_S + 5) -> None:
        """Stop watching, then stop the child (SIGTERM; SIGKILL after `timeout` seconds)."""
        with self._lock:
            self._stop.set()
        self._thread.join()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _exit_description(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"
