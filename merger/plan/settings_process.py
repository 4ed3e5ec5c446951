"""A forked process that runs an output config's class settings (:class:`ClassSettings`) beside the merge.

The step imports transformers' config classes: about 1.4 s of CPU here (its package reads some 1,600
module files to list what it exports), which on a thread beside the merge held the global interpreter
lock that the merge's threads need. A process has its own interpreter on the other core. The engine
forks one as the merge starts (:func:`merger.plan.entry.settling_apart`); the command line forks one for
an MoE config before it imports torch (:mod:`merger.cli`), so that the process's imports run while this
one imports torch and plans, on a core those imports leave idle (docs/decisions.md, "MoE outputs keep
what the base computes").
"""

from __future__ import annotations

import multiprocessing
import signal
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

from merger.plan.settings import ClassSettings

# A request: the settings, and the output config they are resolved against (:meth:`ClassSettings.resolve`).
Request = tuple[ClassSettings, dict]
# Its answer: the output config with the base's class defaults stated, and the refusals.
Resolved = tuple[dict, tuple[str, ...]]


class SettingsProcess:
    """A child process that imports transformers' config classes at once, then resolves one request.

    Use :meth:`start` (with the request, or then :meth:`ask` once) and :meth:`answer`; :meth:`close`
    (or leaving a `with` block) kills it, whatever it is doing. Every failure of the child (it cannot
    fork, dies, hangs) reads as no answer: the caller then runs the step itself.
    """

    def __init__(self, process: BaseProcess, connection: Connection) -> None:
        self._process, self._connection, self._closed = process, connection, False

    @classmethod
    def start(cls, request: Request | None = None) -> SettingsProcess | None:
        """Fork the process; None where the platform cannot fork or no process can be made.

        Fork before any thread starts in this process: a thread holding a lock as the process forks
        leaves that lock held in the child, whose step could then wait forever (it is killed after the
        caller's timeout, but that costs the wait).

        Args:
            request: the settings and the output config to resolve, when known now (the child gets
                them with its copy of this process); None: :meth:`ask` sends them once they are.
        """
        if "fork" not in multiprocessing.get_all_start_methods():
            return None
        context = multiprocessing.get_context("fork")
        ours, theirs = context.Pipe(duplex=True)
        process = context.Process(target=_serve, args=(theirs, request), name="merger-class-settings", daemon=True)
        try:
            process.start()
        except (OSError, AssertionError):  # no room for a process, or this one is a daemonic multiprocessing child
            ours.close()
            return None
        finally:
            theirs.close()  # the child holds the only copy: its exit reads as EOF here
        return cls(process, ours)

    def ask(self, request: Request) -> None:
        """Send the one request of a process started without it: resolve `output_config` with `settings`.

        Blocks at most until the child has imported transformers, for a request larger than the pipe's
        buffer (a config.json of hundreds of kilobytes)."""
        try:
            self._connection.send(request)
        except OSError:  # the child is gone: :meth:`answer` reads no answer
            pass

    def answer(self, timeout_s: float) -> Resolved | None:
        """The child's :meth:`ClassSettings.resolve` result, or None: it died, failed or took `timeout_s`."""
        try:
            return self._connection.recv() if self._connection.poll(timeout_s) else None
        except (EOFError, OSError):  # the child died before answering, or while it did
            return None

    def close(self) -> None:
        """Kill the child (at once: its work is either answered or no longer wanted). Idempotent."""
        if not self._closed:
            self._closed = True
            self._process.kill()
            self._process.join()
            self._connection.close()

    def __enter__(self) -> SettingsProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _serve(connection: Connection, request: Request | None) -> None:
    """The child: answer one request, the one it was forked with or else the first it receives (after
    importing transformers' config classes, the slow part, while it waits); nothing on a failure.

    Ctrl-C is left to the parent, which kills the child as it stops: interrupted here, the child would
    answer nothing, and the parent would run the step itself before stopping."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        if request is None:
            from transformers import AutoConfig  # noqa: F401

            request = connection.recv()
        settings, output_config = request
        connection.send(settings.resolve(output_config))
    except BaseException:  # noqa: BLE001 - the parent then runs the step itself and reports what it meets
        pass
