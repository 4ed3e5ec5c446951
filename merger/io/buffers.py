"""A pool of reusable byte buffers for the streaming engine.

Touching fresh memory is the engine's hidden cost: every new multi-megabyte allocation page-faults
on first write (measured here: 1.2 GB of fresh float32 takes ~1 s to fill, the same copy into a
reused buffer ~0.07 s). Tensors of one model repeat the same few sizes, so reads, dtype conversions
and output casts draw their storage from this pool and give it back when written.
"""

from __future__ import annotations

import ctypes
import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
SMALL_BLOCKS = 8 << 20  # below this, allocations come from the heap: a slice's 4 MiB temporaries
KEPT_FREE = 64 << 20  # free heap kept for reuse instead of being returned to the system
GLIBC_DEFAULT_THRESHOLD = 128 << 10  # both settings' defaults (mallopt(3))


@contextmanager
def freed_memory_kept() -> Iterator[None]:
    """Have glibc reuse freed slice-sized blocks for the block, instead of returning and re-faulting them.

    By default glibc serves multi-megabyte blocks by fresh mappings, or trims the heap top as soon as
    128 KiB are free, so every slice's temporaries would page-fault anew: in a TIES merge that is
    half of the system time. Larger blocks (pooled buffers) still get their own mappings, returned on
    release. On exit both settings go back to glibc's defaults (glibc cannot report the values it had;
    its sliding mmap threshold stays off once set). Does nothing where the C library is not glibc.

    `mallopt` is looked up among the symbols the process has loaded (`CDLL(None)`): `find_library`
    runs `ldconfig -p` in a forked child, a copy of a process that already holds the model's buffers.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        yield
        return
    mallopt(M_MMAP_THRESHOLD, SMALL_BLOCKS)
    mallopt(M_TRIM_THRESHOLD, KEPT_FREE)
    try:
        yield
    finally:
        mallopt(M_MMAP_THRESHOLD, GLIBC_DEFAULT_THRESHOLD)
        mallopt(M_TRIM_THRESHOLD, GLIBC_DEFAULT_THRESHOLD)


class BufferPool:
    """Reusable uint8 buffers, matched by size; idle ones beyond `max_retained` bytes are released,
    oldest first (the embedding-sized buffers of the first job must not crowd out the layers').

    Thread-safe: the reader, compute and writer threads all take and give.

    Args:
        max_retained: bytes of idle buffers kept for reuse.
    """

    def __init__(self, max_retained: int):
        self.max_retained = max_retained
        self._idle: list[torch.Tensor] = []  # flat uint8 storages, oldest first
        self._idle_bytes = 0
        self._lock = threading.Lock()

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised CPU tensor of `shape` and `dtype`, reusing an idle buffer of the same size."""
        nbytes = math.prod(shape) * dtype.itemsize
        storage = None
        with self._lock:
            for i in range(len(self._idle) - 1, -1, -1):
                if self._idle[i].numel() == nbytes:
                    storage = self._idle.pop(i)
                    self._idle_bytes -= nbytes
                    break
            if storage is None:  # a new buffer: release idle ones first, so idle + new stays within bounds
                # an embedding-sized buffer (lm_head after the layers) releases everything idle: the
                # layers' buffers are done with, and the biggest job sets the peak
                budget = 0 if 4 * nbytes >= self.max_retained else self.max_retained - nbytes
                while self._idle and self._idle_bytes > budget:
                    self._idle_bytes -= self._idle.pop(0).numel()
        if storage is None:
            storage = torch.empty(nbytes, dtype=torch.uint8)
        return storage.view(dtype).view(shape)

    def give(self, tensors: list[torch.Tensor]) -> None:
        """Return tensors for reuse once nothing reads them any more; each storage is kept once.

        Views share their base's storage (a method may return its input), so storages, not tensors,
        are pooled: each distinct storage among `tensors` is kept at most once.
        """
        seen: set[int] = set()
        for tensor in tensors:
            storage = tensor.untyped_storage()
            if storage.data_ptr() in seen or tensor.device.type != "cpu":
                continue
            seen.add(storage.data_ptr())
            flat = torch.empty(0, dtype=torch.uint8).set_(storage)
            with self._lock:
                if flat.numel() > self.max_retained:
                    continue
                self._idle.append(flat)
                self._idle_bytes += flat.numel()
                while self._idle_bytes > self.max_retained:
                    self._idle_bytes -= self._idle.pop(0).numel()
