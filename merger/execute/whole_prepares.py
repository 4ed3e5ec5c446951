"""The prepare passes of tensors merged in pieces: each over its whole tensor, on threads of their own.

SLERP's angle and RAM+'s scales are whole-tensor values that every slice of the tensor only reads, so
the executor merges such a tensor in pieces (see :mod:`merger.execute.executor`) once its pass is done.
The passes read the local inputs once more, slice by slice, ahead of the pieces.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import torch

from merger.execute.job_math import prepare_whole, sources_of
from merger.io.buffers import BufferPool
from merger.io.loader import TensorReader
from merger.methods.registry import get_method
from merger.plan.merge import MergePlan, TensorJob


class WholePrepares:
    """The prepare passes of the jobs merged in pieces, each over its whole tensor
    (:func:`~merger.execute.job_math.prepare_whole`), run in plan order on threads of their own
    (`merger-prepare`, one per two cores, one torch thread each), ahead of the pieces: a piece's math
    waits only for its own job's pass, and the passes of the next jobs run while it merges.

    Args:
        plan: the merge plan.
        items: the reader thread's (job, entries) items; the jobs in pieces whose method prepares get a pass.
        readers: model key -> its reader (every input of a job in pieces reads entries).
        device: where the math runs.
        pool: where the passes' read buffers come from and go back to.
    """

    def __init__(self, plan: MergePlan, items: list[tuple[TensorJob, tuple[int, int] | None]],
                 readers: dict[str, TensorReader], device: torch.device, pool: BufferPool):
        jobs = [job for job, entries in items
                if entries is not None and entries[0] == 0 and get_method(job.method).prepare is not None]
        # half the cores: the other half merge the pieces, whose pipeline a pass must keep ahead of
        self._passes = ThreadPoolExecutor(max(1, torch.get_num_threads() // 2), thread_name_prefix="merger-prepare",
                                          initializer=torch.set_num_threads, initargs=(1,))
        self._values = {  # output tensor name -> its pass, submitted in plan order
            job.name: self._passes.submit(prepare_whole, job, plan, device, pool, partial(_read_entries, readers, job))
            for job in jobs
        }

    def of(self, job: TensorJob) -> Any:
        """The prepared value for `job`'s pieces (waiting for its pass), or None where its method has none.

        Raises:
            What reading its inputs or its pass raised.
        """
        value = self._values.get(job.name)
        return None if value is None else value.result()

    def close(self) -> None:
        """Drop the passes not started and wait for those running (the merge has ended)."""
        self._passes.shutdown(wait=True, cancel_futures=True)


def _read_entries(readers: dict[str, TensorReader], job: TensorJob, start: int, stop: int) -> list[torch.Tensor]:
    """The flattened entries `[start, stop)` of `job`'s inputs as stored, in :func:`sources_of` order."""
    return [readers[s.model].read_entries(s.name, start, stop) for s in sources_of(job)]
