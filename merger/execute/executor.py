"""Runs a merge plan tensor by tensor: reading, math and writing overlap on three threads.

- the reader thread reads each job's inputs (positioned reads into pooled buffers), up to a byte
  budget ahead of the writer, so the next tensors arrive while the current ones are merged;
- the calling thread converts inputs to float32 (on the chosen device), runs the method and casts
  the result to the output dtype once;
- the writer thread appends each result to its shard and returns the buffers to the pool.

Where nothing needs a whole tensor at once (an elementwise method, or a copy, on the CPU), a tensor
goes through the three threads in pieces of a million entries (:func:`_pieces`): its read, merge and
write overlap (read from the Hub, a piece is merged as soon as its bytes arrive), and a piece's buffers
stay in the processor's cache from one thread to the next. A method whose slices need a whole-tensor
value first (SLERP's angle) gets it from threads of their own, which read the local inputs once more,
slice by slice, ahead of the pieces (:class:`~merger.execute.whole_prepares.WholePrepares`).

An elementwise method (linear, task arithmetic, TIES, ...) runs on slices of a million entries: the
inputs stay in their stored dtype and only one slice of each is converted to float32 at a time, or
none where the method's native `fused` path reads the stored slices and writes the output's directly.
A copy of a tensor whose stored dtype is already the output's (frankenmerge layers, MoE experts) skips
the math: its bytes go from the read buffer to the shard unchanged. The order of the output never
depends on timing: jobs run and are written strictly in plan order. Memory is bounded by the budget
plus one job's working set.

No NaN or inf is ever written: the writer checks each tensor, cast to its output dtype, as it streams
(:func:`merger.io.writer.is_finite`, one cheap pass). Input weights are not checked when read: a NaN or
inf in an input that reaches the output shows there, and only then are that tensor's inputs read
again to say whether a model's weights (which model, which tensor) or the merge itself (an overflow
of the output dtype) made it. Inputs that never reach the output cost nothing.
"""

from __future__ import annotations

import bisect
import itertools
import math
import queue
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch

from merger.io.buffers import BufferPool, freed_memory_kept
from merger.errors import MergeCancelled, NonFiniteOutputError, NonFiniteWeightsError
from merger.io.loader import TensorReader
from merger.io.sources import WeightSource
from merger.lora.apply import open_reader
from merger.methods.threads import helper_threads
from merger.methods.registry import SLICE, get_method
from merger.execute.job_math import compute_job, is_plain_copy, sources_of
from merger.execute.router import prompt_routers
from merger.execute.whole_prepares import WholePrepares
from merger.plan.merge import MergePlan, TensorJob
from merger.io.writer import OnShard, ShardedWriter, is_finite

Progress = Callable[[float, str], None]
# read-ahead and idle-buffer floor, bytes; both also scale with the largest job (or piece). Small, so
# that the buffers of pieces cycle within the processor's cache: measured on the half benchmark set,
# linear 2.72 -> 2.46 s and task arithmetic 3.08 -> 2.72 s (median of 5) against whole tensors and 64 MiB
MIN_BUDGET = 16 * 2**20
# bytes of reads ahead of a model's first read at which its reader is told its reads (a Hub source
# starts fetching then): two of a Hub source's fetch groups, what it holds ahead once started
SOURCE_LEAD = 128 * 2**20
PIECE = SLICE  # entries per piece of a tensor merged piece by piece (2 MiB per bfloat16 input)
_DONE = object()


class _Budget:
    """Bytes read but not yet released; the reader waits while the budget is spent."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self._cond = threading.Condition()

    def acquire(self, nbytes: int, stop: threading.Event) -> bool:
        with self._cond:
            while self.used and self.used + nbytes > self.limit and not stop.is_set():
                self._cond.wait(0.1)
            self.used += nbytes
            return not stop.is_set()

    def release(self, nbytes: int) -> None:
        with self._cond:
            self.used -= nbytes
            self._cond.notify_all()


def execute_plan(
    plan: MergePlan,
    dirs: dict[str, Path | WeightSource],
    out_dir: Path,
    device: torch.device,
    shard_size: int,
    progress: Progress | None = None,
    should_cancel: Callable[[], bool] | None = None,
    adapters: dict[str, Path] | None = None,
    on_shard: OnShard | None = None,
) -> None:
    """Write every tensor of `plan` into safetensors shards in `out_dir`.

    Args:
        plan: the merge plan.
        dirs: model key -> local model directory, or a :class:`~merger.io.sources.WeightSource` (a Hub
            model read by byte ranges); each is told the order its tensors will be read in.
        out_dir: the (staging) output directory.
        device: where the float32 math runs.
        shard_size: bytes of tensor data per shard.
        progress: called after each tensor is written with (fraction done, tensor name).
        should_cancel: polled before each tensor; True raises :class:`MergeCancelled`.
        adapters: model key -> local LoRA adapter folder, for `model+lora` inputs (applied as read).
        on_shard: called on the writer thread with each shard's path and sha256 once the shard is complete
            (see :class:`~merger.io.writer.ShardedWriter`); it may upload and delete the file.

    Raises:
        MergeCancelled: `should_cancel()` returned True.
        NonFiniteWeightsError: an input tensor that reaches the output holds NaN or inf (names both).
        NonFiniteOutputError: a merged tensor holds NaN or inf though its inputs are finite.
        OutputWriteError / DiskSpaceError: the OS refused a write.
        MergerError: from reading inputs; the writer leaves no index behind.
    """
    # The process's settings are changed for the run only: torch's thread count, glibc's reuse of
    # freed memory, and the helper threads of the methods' prepare passes (shut down at the end).
    threads = torch.get_num_threads()
    torch.set_num_threads(_math_threads(plan, threads))
    try:
        with freed_memory_kept(), helper_threads():
            _execute(plan, dirs, out_dir, device, shard_size, progress, should_cancel, adapters or {}, on_shard)
    finally:
        torch.set_num_threads(threads)


def _math_threads(plan: MergePlan, cores: int) -> int:
    """Threads for the math: a streaming plan (copies and elementwise methods with no prepare pass,
    such as linear and task arithmetic) is bound by reading and writing, so it leaves a core to the
    reader and writer threads (measured: linear 4.5 → 4.1 s on two cores); heavier math takes all."""
    methods = {get_method(job.method) for job in plan.jobs if job.method not in ("gate", "zeros")}
    streaming = all(method.elementwise and method.prepare is None for method in methods)
    return max(1, cores - 1) if streaming else cores


def _execute(
    plan: MergePlan,
    dirs: dict[str, Path | WeightSource],
    out_dir: Path,
    device: torch.device,
    shard_size: int,
    progress: Progress | None,
    should_cancel: Callable[[], bool] | None,
    adapters: dict[str, Path],
    on_shard: OnShard | None,
) -> None:
    pool = BufferPool(max_retained=0)
    prompt_gates = prompt_routers(plan, dirs, adapters, pool, device, should_cancel)  # before the streaming starts
    readers = _open_readers(plan, dirs, pool, adapters)
    items = [(job, entries) for job in plan.jobs for entries in _pieces(job, readers, device)]
    read_order = _ReadOrder(plan, items, readers)
    largest = max((_read_bytes(job, entries, readers) for job, entries in items), default=0)
    pool.max_retained = max(MIN_BUDGET, largest)  # idle buffers kept: a few layers' working sets
    budget = _Budget(max(MIN_BUDGET, largest))
    stop = threading.Event()
    read_queue: queue.Queue = queue.Queue()
    write_queue: queue.Queue = queue.Queue(maxsize=4)
    errors: list[BaseException] = []

    def read_all() -> None:
        try:
            for index, (job, entries) in enumerate(items):
                read_order.reaching(index)
                nbytes = _read_bytes(job, entries, readers)
                if not budget.acquire(nbytes, stop):
                    return
                if entries is None:
                    raw = [readers[s.model].read(s.name) for s in sources_of(job)]
                else:
                    raw = [readers[s.model].read_entries(s.name, *entries) for s in sources_of(job)]
                read_queue.put((job, entries, raw, nbytes))
        except BaseException as err:  # handed to the calling thread, which raises it
            read_queue.put(err)

    with ShardedWriter(out_dir, [(j.name, j.shape, j.dtype) for j in plan.jobs], shard_size, on_shard) as writer:

        def write_all() -> None:
            done, complete = 0, False
            while (item := write_queue.get()) is not _DONE:
                job, piece, tensor, release = item
                try:
                    if not errors:
                        complete = writer.write(job.name, tensor, piece)
                except NonFiniteOutputError as err:
                    errors.append(_explain_non_finite(job, err, readers, pool))
                except BaseException as err:
                    errors.append(err)
                pool.give([tensor])
                if release:
                    budget.release(release)
                done += 1
                if progress is not None and not errors and complete:  # once per tensor, not per piece
                    try:
                        progress(done / len(items), job.name)
                    except BaseException as err:  # it ends the merge as any error here: the queue is still drained
                        errors.append(err)

        reader = threading.Thread(target=read_all, name="merger-reader", daemon=True)
        writer_thread = threading.Thread(target=write_all, name="merger-writer", daemon=True)
        prepares = WholePrepares(plan, items, readers, device, pool)
        reader.start()
        writer_thread.start()
        try:
            _merge_in_order(plan, len(items), device, pool, budget, read_queue, write_queue, errors, should_cancel,
                            prompt_gates, prepares)
        finally:
            stop.set()
            prepares.close()
            write_queue.put(_DONE)
            writer_thread.join()
            reader.join()
            for r in readers.values():
                r.close()
        if errors:
            raise errors[0]



def _open_readers(
    plan: MergePlan, dirs: dict[str, Path | WeightSource], pool: BufferPool, adapters: dict[str, Path]
) -> dict[str, TensorReader]:
    """A reader for every model the plan reads (model key -> reader); on failure none is left open."""
    readers: dict[str, TensorReader] = {}
    try:
        for key in sorted({source.model for job in plan.jobs for source in sources_of(job)}):
            readers[key] = open_reader(dirs[key], pool, adapters.get(key), key)
    except BaseException:  # a broken file or adapter: the files opened so far are closed
        for r in readers.values():
            r.close()
        raise
    return readers


class _ReadOrder:
    """Tells each reader its reads in the reader thread's order (`expect`: a Hub source fetches ahead),
    once the reads come within :data:`SOURCE_LEAD` bytes of its first: a model read later (the second
    half of a frankenmerge) then does not take the network from the one read now. Its first read is
    never waited for, as it is told before the reader reaches it.

    Args:
        plan: the merge plan (each model's reads, job by job).
        items: the reader thread's (job, entries) items, in order.
        readers: model key -> its reader.
    """

    def __init__(self, plan: MergePlan, items: list[tuple[TensorJob, tuple[int, int] | None]],
                 readers: dict[str, TensorReader]):
        self.readers = readers
        self.names: dict[str, list[str]] = {}
        for job in plan.jobs:
            for source in sources_of(job):
                self.names.setdefault(source.model, []).append(source.name)
        starts = list(itertools.accumulate((_read_bytes(job, entries, readers) for job, entries in items), initial=0))
        first: dict[str, int] = {}  # model key -> the index of the first item that reads it
        for index, (job, _) in enumerate(items):
            for source in sources_of(job):
                first.setdefault(source.model, index)
        self.due: dict[int, list[str]] = {}  # item index -> the models told before that item is read
        for key, index in first.items():
            self.due.setdefault(bisect.bisect_left(starts, starts[index] - SOURCE_LEAD), []).append(key)
        self.reaching(0)

    def reaching(self, index: int) -> None:
        """The reader thread is about to read item `index`: tell the readers whose first read is near."""
        for key in self.due.pop(index, []):
            self.readers[key].expect(self.names[key])


def _merge_in_order(
    plan: MergePlan,
    count: int,
    device: torch.device,
    pool: BufferPool,
    budget: _Budget,
    read_queue: queue.Queue,
    write_queue: queue.Queue,
    errors: list[BaseException],
    should_cancel: Callable[[], bool] | None,
    prompt_gates: torch.Tensor | None,
    prepares: WholePrepares,
) -> None:
    """The math loop: the `count` items of read tensors from `read_queue` (jobs, or pieces of jobs),
    merged (or passed through when a plain copy) by `_jobs_at_once` compute threads, onto `write_queue`
    in plan order; raises the reader's, the writer's or a job's error. `prompt_gates`: the routers
    computed from prompts (:func:`merger.execute.router.prompt_routers`); `prepares`: the whole-tensor
    prepare passes of pieces."""
    at_once = _jobs_at_once(device)
    in_flight: deque[tuple[TensorJob, Future]] = deque()  # computed jobs, in plan order
    cores = torch.get_num_threads()
    threads = max(1, cores // at_once)  # each job's share while `at_once` are computed together

    def compute(job: TensorJob, entries: tuple[int, int] | None, raw: list[torch.Tensor], nbytes: int) -> torch.Tensor:
        # A job whose reads fill the whole budget was read once every job before it was merged, and no
        # job after it is read until it is: it is merged alone, so it takes every thread.
        alone = nbytes >= budget.limit
        try:
            if alone:
                torch.set_num_threads(cores)
            prepared = None if entries is None else prepares.of(job)
            # gives the read buffers back once converted
            return compute_job(_piece_job(job, entries), raw, plan, device, pool, prompt_gates, prepared)
        finally:  # a job that fails frees its budget too: the reader must not wait for it
            if alone:
                torch.set_num_threads(threads)
            budget.release(nbytes)

    def hand_over_done(keep: int) -> None:  # the oldest jobs to the writer, in order, until `keep` are left
        while len(in_flight) > keep or (in_flight and in_flight[0][2].done()):
            job, piece, future = in_flight.popleft()
            write_queue.put((job, piece, future.result(), 0))

    with ThreadPoolExecutor(at_once, thread_name_prefix="merger-math-job", initializer=torch.set_num_threads,
                            initargs=(threads,)) as computing:
        try:
            for _ in range(count):
                if should_cancel is not None and should_cancel():
                    raise MergeCancelled("the merge was cancelled; nothing was written or pushed")
                item = read_queue.get()
                if isinstance(item, BaseException):
                    raise item
                job, entries, raw, nbytes = item
                piece = entries is not None
                if is_plain_copy(job, raw, plan):
                    # handed over at once, after the jobs before it: only the writer releases a copy's
                    # budget, so a copy left waiting here could starve the reader of the next job
                    hand_over_done(keep=0)
                    write_queue.put((job, piece, raw[0], nbytes))
                else:
                    in_flight.append((job, piece, computing.submit(compute, job, entries, raw, nbytes)))
                    hand_over_done(keep=at_once)
                if errors:
                    raise errors[0]
            hand_over_done(keep=0)
        finally:
            for _, _, future in in_flight:
                future.cancel()


def _jobs_at_once(device: torch.device) -> int:
    """Jobs computed at the same time: on CPU one per core, up to two, each on its own thread with its
    share of torch's threads. A single job's math leaves cores idle between its steps, its slices'
    conversions and its single-threaded parts (TIES's blocks, the prepare passes' merging); a second
    job beside it fills them. Each job's bytes do not depend on that (its steps are the same)."""
    return min(2, torch.get_num_threads()) if device.type == "cpu" else 1


def _explain_non_finite(
    job: TensorJob, err: NonFiniteOutputError, readers: dict[str, TensorReader], pool: BufferPool
) -> NonFiniteOutputError | NonFiniteWeightsError:
    """Which input of `job` holds NaN or inf (re-read now), else the output's overflow, as a named error."""
    for source in sources_of(job):
        tensor = readers[source.model].read(source.name)
        finite = is_finite(tensor)
        pool.give([tensor])
        if not finite:
            return NonFiniteWeightsError(
                f"model `{source.model}`: its tensor `{source.name}` holds NaN or inf, so merged tensor `{job.name}` "
                "would too; the merge was stopped and nothing was kept. Use an intact copy of that model"
            )
    return NonFiniteOutputError(
        f"{err} Every input of it is finite, so the merge itself overflowed: `{job.method}` gave values beyond "
        f"{job.dtype}'s range (F16 stops at 65504). Check the parameters (e.g. large `weight`s), or use "
        "`out_dtype: bfloat16` or `float32`"
    )


def _pieces(job: TensorJob, readers: dict[str, TensorReader], device: torch.device) -> list[tuple[int, int] | None]:
    """How `job` is read and merged: whole (`[None]`), or in runs of `PIECE` flattened entries.

    A large tensor read whole waits for all its inputs before its merge starts, and its merge for all
    of it before its write: at the start and the end of a merge (the embeddings, the output head) the
    other threads idle meanwhile, and its buffers are the merge's largest. Pieces flow through the
    pipeline as jobs do, so reading, merging and writing overlap within the tensor. Only what needs no
    whole-tensor view is split: an elementwise method with no random draw (or a copy) on the CPU, no
    input with a LoRA adapter (applied to whole weights), no vocabulary alignment. A method with a
    prepare pass is split where its slices may be merged apart (the registry's `slices_in_any_order`)
    and every input may be read again cheaply (a local file, not the Hub): its pass reads them once
    more (:class:`~merger.execute.whole_prepares.WholePrepares`).
    """
    numel = math.prod(job.shape)
    if numel <= PIECE or device.type != "cpu" or job.align_vocab or job.method in ("gate", "zeros"):
        return [None]
    method = get_method(job.method)
    if not method.elementwise or method.uses_generator:
        return [None]
    inputs = [readers[s.model] for s in sources_of(job)]
    if not all(reader.reads_entries for reader in inputs):
        return [None]
    if method.prepare is not None and not (method.slices_in_any_order and all(reader.rereads for reader in inputs)):
        return [None]
    return [(start, min(start + PIECE, numel)) for start in range(0, numel, PIECE)]


def _piece_job(job: TensorJob, entries: tuple[int, int] | None) -> TensorJob:
    """`job` as the math sees one of its pieces: the same job over 1-D entries `[start, stop)`."""
    return job if entries is None else replace(job, shape=(entries[1] - entries[0],))


def _read_bytes(job: TensorJob, entries: tuple[int, int] | None, readers: dict[str, TensorReader]) -> int:
    """Bytes read for `job`, or for its entries `[start, stop)`."""
    total = sum(readers[s.model].nbytes(s.name) for s in sources_of(job))
    return total if entries is None else total * (entries[1] - entries[0]) // math.prod(job.shape)
