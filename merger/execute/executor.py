"""Runs a merge plan tensor by tensor: reading, math and writing overlap on three threads.

- the reader thread reads each job's inputs (positioned reads into pooled buffers), up to a byte
  budget ahead of the writer, so the next tensors arrive while the current ones are merged;
- the calling thread converts inputs to float32 (on the chosen device), runs the method and casts
  the result to the output dtype once;
- the writer thread appends each result to its shard and returns the buffers to the pool.

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

import hashlib
import queue
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import torch

from merger.io.buffers import BufferPool, freed_memory_kept
from merger.errors import MergeCancelled, NonFiniteOutputError, NonFiniteWeightsError
from merger.io.loader import STORAGE_DTYPES, TensorReader
from merger.io.sources import WeightSource
from merger.lora.apply import open_reader
from merger.methods.threads import helper_threads
from merger.methods.registry import SLICE, MergeMethod, get_method
from merger.execute.router import prompt_routers, router_weights
from merger.plan.merge import MergePlan, TensorJob, TensorSource
from merger.plan.tokenizer import align_embeddings
from merger.io.writer import OnShard, ShardedWriter, is_finite

Progress = Callable[[float, str], None]
MIN_BUDGET = 64 * 2**20  # read-ahead and idle-buffer floor, bytes; both also scale with the largest job
_DONE = object()


def tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed from the run's seed and the tensor's name: results do not depend on order."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & (2**63 - 1)


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
    largest = max((sum(readers[s.model].nbytes(s.name) for s in _sources(j)) for j in plan.jobs), default=0)
    pool.max_retained = max(MIN_BUDGET, largest)  # idle buffers kept: a few layers' working sets
    budget = _Budget(max(MIN_BUDGET, largest))
    stop = threading.Event()
    read_queue: queue.Queue = queue.Queue()
    write_queue: queue.Queue = queue.Queue(maxsize=4)
    errors: list[BaseException] = []

    def read_all() -> None:
        try:
            for job in plan.jobs:
                sources = _sources(job)
                nbytes = sum(readers[s.model].nbytes(s.name) for s in sources)
                if not budget.acquire(nbytes, stop):
                    return
                read_queue.put((job, [readers[s.model].read(s.name) for s in sources], nbytes))
        except BaseException as err:  # handed to the calling thread, which raises it
            read_queue.put(err)

    with ShardedWriter(out_dir, [(j.name, j.shape, j.dtype) for j in plan.jobs], shard_size, on_shard) as writer:

        def write_all() -> None:
            done = 0
            while (item := write_queue.get()) is not _DONE:
                job, tensor, release = item
                try:
                    if not errors:
                        writer.write(job.name, tensor)
                except NonFiniteOutputError as err:
                    errors.append(_explain_non_finite(job, err, readers, pool))
                except BaseException as err:
                    errors.append(err)
                pool.give([tensor])
                if release:
                    budget.release(release)
                done += 1
                if progress is not None and not errors:
                    progress(done / len(plan.jobs), job.name)

        reader = threading.Thread(target=read_all, name="merger-reader", daemon=True)
        writer_thread = threading.Thread(target=write_all, name="merger-writer", daemon=True)
        reader.start()
        writer_thread.start()
        try:
            _merge_in_order(plan, device, pool, budget, read_queue, write_queue, errors, should_cancel, prompt_gates)
        finally:
            stop.set()
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
    """A reader for every model the plan reads (model key -> reader), told its reads in the order the
    reader thread makes them (a remote source fetches ahead); on failure none is left open."""
    readers: dict[str, TensorReader] = {}
    order: dict[str, list[str]] = {}
    for job in plan.jobs:
        for source in _sources(job):
            order.setdefault(source.model, []).append(source.name)
    try:
        for key in sorted(order):
            readers[key] = open_reader(dirs[key], pool, adapters.get(key), key)
            readers[key].expect(order[key])
    except BaseException:  # a broken file or adapter: the files opened so far are closed
        for r in readers.values():
            r.close()
        raise
    return readers


def _merge_in_order(
    plan: MergePlan,
    device: torch.device,
    pool: BufferPool,
    budget: _Budget,
    read_queue: queue.Queue,
    write_queue: queue.Queue,
    errors: list[BaseException],
    should_cancel: Callable[[], bool] | None,
    prompt_gates: torch.Tensor | None,
) -> None:
    """The math loop: each job's read tensors from `read_queue`, merged (or passed through when a plain
    copy) by `_jobs_at_once` compute threads, onto `write_queue` in plan order; raises the reader's,
    the writer's or a job's error. `prompt_gates`: the routers computed from prompts
    (:func:`merger.execute.router.prompt_routers`)."""
    at_once = _jobs_at_once(device)
    in_flight: deque[tuple[TensorJob, Future]] = deque()  # computed jobs, in plan order

    def compute(job: TensorJob, raw: list[torch.Tensor], nbytes: int) -> torch.Tensor:
        try:
            return _compute(job, raw, plan, device, pool, prompt_gates)  # gives the read buffers back once converted
        finally:  # a job that fails frees its budget too: the reader must not wait for it
            budget.release(nbytes)

    def hand_over_done(keep: int) -> None:  # the oldest jobs to the writer, in order, until `keep` are left
        while len(in_flight) > keep or (in_flight and in_flight[0][1].done()):
            job, future = in_flight.popleft()
            write_queue.put((job, future.result(), 0))

    threads = max(1, torch.get_num_threads() // at_once)
    with ThreadPoolExecutor(at_once, thread_name_prefix="merger-math-job", initializer=torch.set_num_threads,
                            initargs=(threads,)) as computing:
        try:
            for _ in plan.jobs:
                if should_cancel is not None and should_cancel():
                    raise MergeCancelled("the merge was cancelled; nothing was written or pushed")
                item = read_queue.get()
                if isinstance(item, BaseException):
                    raise item
                job, raw, nbytes = item
                if _is_plain_copy(job, raw, plan):
                    # handed over at once, after the jobs before it: only the writer releases a copy's
                    # budget, so a copy left waiting here could starve the reader of the next job
                    hand_over_done(keep=0)
                    write_queue.put((job, raw[0], nbytes))
                else:
                    in_flight.append((job, computing.submit(compute, job, raw, nbytes)))
                    hand_over_done(keep=at_once)
                if errors:
                    raise errors[0]
            hand_over_done(keep=0)
        finally:
            for _, future in in_flight:
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
    for source in _sources(job):
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


def _sources(job: TensorJob) -> list[TensorSource]:
    return list(job.sources) + ([job.base] if job.base is not None else [])


def _is_plain_copy(job: TensorJob, raw: list[torch.Tensor], plan: MergePlan) -> bool:
    """A copy with nothing to compute: one source, no scale, no re-layout, stored dtype = output dtype."""
    return (
        job.method == "passthrough"
        and job.per_model.get("scale", (None,)) == (None,)
        and not job.align_vocab
        and raw[0].dtype == STORAGE_DTYPES[job.dtype]
        and (plan.input_dtype is None or getattr(torch, plan.input_dtype) == raw[0].dtype)
    )


def _compute(job: TensorJob, raw: list[torch.Tensor], plan: MergePlan, device: torch.device, pool: BufferPool,
             prompt_gates: torch.Tensor | None) -> torch.Tensor:
    """One output tensor, cast to its output dtype in a pooled CPU buffer."""
    if job.method == "gate":
        out = pool.take(job.shape, STORAGE_DTYPES[job.dtype])
        return out.copy_(router_weights(job, plan.seed, prompt_gates))
    if job.method == "zeros":  # a tensor the output needs and no input has (a Qwen2-MoE's q/k/v biases)
        return pool.take(job.shape, STORAGE_DTYPES[job.dtype]).zero_()
    method = get_method(job.method)
    argument = {spec.name: spec.argument for spec in method.parameters}  # config key -> Python name (`lambda_`)
    kwargs = {argument[name]: list(values) for name, values in job.per_model.items()}
    kwargs.update({argument[name]: value for name, value in job.global_params.items()})
    if method.uses_generator:
        kwargs["generator"] = torch.Generator(device=device).manual_seed(tensor_seed(plan.seed, job.name))
    if device.type == "cpu" and not job.align_vocab and method.elementwise:
        return _compute_in_slices(job, method, raw, plan, kwargs, pool)
    input_dtype = getattr(torch, plan.input_dtype) if plan.input_dtype else None
    inputs = {}
    for source, tensor in zip(_sources(job), raw):
        if input_dtype is not None and tensor.dtype != input_dtype:  # the config's `dtype`, as mergekit
            tensor = tensor.to(input_dtype)
        work = pool.take(tuple(tensor.shape), torch.float32).copy_(tensor)
        inputs.setdefault(source.model, []).append(work.to(device) if device.type != "cpu" else work)
    pool.give(raw)  # the stored-dtype copies are no longer needed: free them before the math
    if job.align_vocab:
        aligned = align_embeddings({key: values[0] for key, values in inputs.items()}, plan.vocab)
        inputs = {key: [tensor] * len(inputs[key]) for key, tensor in aligned.items()}
    if job.base is not None:
        kwargs["base"] = inputs[job.base.model].pop()
    tensors = [_own(inputs[s.model]) for s in job.sources]
    result = method.function(tensors, **kwargs)
    to_release = [t for values in inputs.values() for t in values] + tensors + [kwargs.get("base")]
    out = pool.take(job.shape, STORAGE_DTYPES[job.dtype])
    out.copy_(result.reshape(job.shape))
    pool.give([t for t in to_release if t is not None])
    return out


def _compute_in_slices(
    job: TensorJob, method: MergeMethod, raw: list[torch.Tensor], plan: MergePlan, kwargs: dict, pool: BufferPool
) -> torch.Tensor:
    """An elementwise method's output, computed `SLICE` entries at a time.

    Each slice goes straight from the stored inputs into the output where the method has a `fused`
    path that takes them; otherwise each input's slice is converted to float32 in a small reused
    buffer, so no float32 copy of a whole tensor exists and the method's temporaries stay in cache.
    Either way the bytes equal a whole-tensor run's.
    """
    input_dtype = getattr(torch, plan.input_dtype) if plan.input_dtype else None
    flat = [tensor.reshape(-1) for tensor in raw]  # sources in config order, then the base
    numel = flat[0].numel()
    work = [torch.empty(min(SLICE, numel), dtype=torch.float32) for _ in flat]
    others = len(job.sources)
    split = (lambda parts: (parts[:others], parts[others] if job.base is not None else None))
    # the config's `dtype` (as mergekit) casts the inputs first, which only the conversion does
    fused = method.fused if input_dtype is None or all(t.dtype == input_dtype for t in flat) else None

    def converted(start: int, stop: int) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        parts = []
        for buffer, tensor in zip(work, flat):
            part = tensor[start:stop]
            if input_dtype is not None and part.dtype != input_dtype:
                part = part.to(input_dtype)
            parts.append(buffer[: stop - start].copy_(part))
        return split(parts)

    ranges = [(start, min(start + SLICE, numel)) for start in range(0, numel, SLICE)]
    if method.prepare is not None:
        kwargs["prepared"] = method.prepare(lambda: (converted(*r) for r in ranges), job.shape, **kwargs)
    out = pool.take(job.shape, STORAGE_DTYPES[job.dtype])
    flat_out = out.view(-1)
    for start, stop in ranges:
        tensors, base = split([t[start:stop] for t in flat])
        with_base = {} if base is None else {"base": base}
        if fused is not None and fused(tensors, **with_base, out=flat_out[start:stop], **kwargs):
            continue
        tensors, base = converted(start, stop)
        with_base = {} if base is None else {"base": base}
        flat_out[start:stop].copy_(method.function(tensors, **with_base, **kwargs).reshape(-1))
    pool.give(raw)
    return out


def _own(values: list[torch.Tensor]) -> torch.Tensor:
    """The next input of a model; a model listed twice gets its own copy, since methods may work in place."""
    tensor = values.pop(0)
    return tensor.clone() if any(v.data_ptr() == tensor.data_ptr() for v in values) else tensor
