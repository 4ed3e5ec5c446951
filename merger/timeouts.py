"""Time limits for work done on a user's behalf (validation of metadata), so that no request holds a handler.

A Python thread cannot be killed, so a limited call runs in a thread of its own while the caller waits at
most its time limit, then gets :class:`~merger.errors.ValidationTimeoutError`. The abandoned call learns
that it is over at its next :func:`check_deadline` (before each model it reads, :func:`map_models`) and
stops there; at most `constants.MAX_LIMITED_CALLS` such calls run at once, abandoned ones included, each
reading at most :data:`MODEL_THREADS` models at a time, so a flood of slow requests costs a bounded
number of threads (see docs/decisions.md, "Validation time limit").
"""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from merger import constants
from merger.errors import ValidationTimeoutError

T = TypeVar("T")
Item = TypeVar("Item")

# Models read at once by one check or merge (their metadata, tokenizers, other files): each is a chain of
# Hub round trips, so a three-model merge read one model after another waited three chains (docs/decisions.md,
# "Models read at once").
MODEL_THREADS = 4

_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("merger_deadline", default=None)
_slots = threading.BoundedSemaphore(constants.MAX_LIMITED_CALLS)


def check_deadline(doing: str) -> None:
    """Stop limited work whose time is up (a no-op outside :func:`run_limited`).

    Args:
        doing: what was about to start, for the message (e.g. "reading model `org/a`").

    Raises:
        ValidationTimeoutError: the enclosing :func:`run_limited` call's time limit has passed.
    """
    deadline = _deadline.get()
    if deadline is not None and time.monotonic() >= deadline:
        raise ValidationTimeoutError(f"stopped before {doing}: the check ran out of time")


def map_models(work: Callable[[Item], T], items: Sequence[Item], doing: Callable[[Item], str]) -> list[T]:
    """`[work(item) for item in items]`, up to :data:`MODEL_THREADS` at a time, within the caller's deadline.

    Each item's work starts with :func:`check_deadline` (so an abandoned check stops before its next
    model) and runs in a copy of the caller's context, deadline included.

    Args:
        work: one item's work (e.g. reading one model's metadata from the Hub).
        items: the items, in the order of the results.
        doing: what an item's work is, for the timeout's message (e.g. "reading model `org/a`").

    Returns:
        The results in `items`' order.

    Raises:
        Whatever the first failed item in `items`' order raised (so the same error as one at a time),
        once the items already started have ended; items not started yet are not started.
        ValidationTimeoutError: as :func:`check_deadline`.
    """

    def one(item: Item) -> T:
        check_deadline(doing(item))
        return work(item)

    if len(items) <= 1:
        return [one(item) for item in items]
    with ThreadPoolExecutor(max_workers=min(MODEL_THREADS, len(items)), thread_name_prefix="merger-models") as pool:
        futures = [pool.submit(contextvars.copy_context().run, one, item) for item in items]  # a context per thread
        try:
            return [future.result() for future in futures]
        finally:
            for future in futures:
                future.cancel()


def run_limited(call: Callable[[], T], limit_s: float, what: str) -> T:
    """`call()`'s result if it finishes within `limit_s` seconds, else :class:`ValidationTimeoutError`.

    Args:
        call: the work; exceptions it raises reach the caller unchanged.
        limit_s: seconds the caller waits, including any wait for a free slot.
        what: what the work is, for the message (e.g. "checking the config against the models' metadata").

    Returns:
        What `call` returned.

    Raises:
        ValidationTimeoutError: the work (or the wait for a slot) took longer than `limit_s`.
    """
    start = time.monotonic()
    deadline = start + limit_s
    if not _slots.acquire(timeout=limit_s):
        raise ValidationTimeoutError(_too_slow(what, limit_s, busy=True))
    outcome: dict[str, object] = {}
    done = threading.Event()

    def limited() -> None:
        _deadline.set(deadline)
        try:
            outcome["value"] = call()
        except BaseException as err:  # noqa: BLE001 - handed to the caller, who re-raises it
            outcome["error"] = err
        finally:
            _slots.release()
            done.set()

    context = contextvars.copy_context()  # the caller's context (e.g. a request's) without its deadline leaking back
    threading.Thread(target=context.run, args=(limited,), name="merger-limited", daemon=True).start()
    if not done.wait(max(0.0, deadline - time.monotonic())):
        raise ValidationTimeoutError(_too_slow(what, limit_s, busy=False))
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]


def _too_slow(what: str, limit_s: float, busy: bool) -> str:
    why = "the server is busy with other checks" if busy else "the models' metadata took too long to read"
    return (
        f"{what} took longer than the {limit_s:g}-second limit ({why}); "
        "try again in a minute, or check fewer or smaller models at a time"
    )
