"""Threads for the methods' math: torch's intra-op threads pinned to one for a block, and helper
threads that run a prepare pass's per-model work at once (torch and the native kernels release the GIL).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch

_helpers: ThreadPoolExecutor | None = None  # while someone holds helper_threads()
_helper_users = 0
_helpers_lock = threading.Lock()


@contextmanager
def single_threaded_math() -> Iterator[None]:
    """Torch's intra-op threads set to one in this thread for the block (helpers always run with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextmanager
def helper_threads() -> Iterator[None]:
    """Keep the helper threads of :func:`run_concurrently` for the block; the last holder shuts them down.

    The executor holds them for a whole merge, so a run starts its threads once and leaves none behind;
    a call outside any holder gets threads for that call only.
    """
    global _helpers, _helper_users
    with _helpers_lock:
        if _helpers is None:
            _helpers = ThreadPoolExecutor(max_workers=max(1, (os.cpu_count() or 2) - 1),
                                          thread_name_prefix="merger-math", initializer=torch.set_num_threads,
                                          initargs=(1,))
        _helper_users += 1
    try:
        yield
    finally:
        with _helpers_lock:
            _helper_users -= 1
            pool = _helpers if _helper_users == 0 else None
            if pool is not None:
                _helpers = None
        if pool is not None:
            pool.shutdown(wait=True)


def run_concurrently(calls: Sequence[Callable[[], object]]) -> None:
    """Run `calls` at once, the first on this thread, the others on helper threads (torch releases the
    GIL inside its kernels); returns when all are done, raising the first error."""
    if len(calls) == 1:
        calls[0]()
        return
    with helper_threads():
        futures = [_helpers.submit(call) for call in calls[1:]]
        try:
            calls[0]()
        finally:
            for future in futures:
                future.result()
