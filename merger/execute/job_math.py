"""One job's math: an output tensor computed from the inputs the executor read for it, on its device.

A method's inputs are converted to float32 (whole tensors, or slice by slice for an elementwise
method, or not at all where the method's native `fused` path reads them as stored), the method runs,
and the result is cast once to the output dtype in a pooled CPU buffer. See
:mod:`merger.execute.executor` for the threads around it.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch

from merger.execute.router import router_weights
from merger.io.buffers import BufferPool
from merger.io.loader import STORAGE_DTYPES
from merger.methods.registry import SLICE, MergeMethod, get_method
from merger.plan.merge import MergePlan, TensorJob, TensorSource
from merger.plan.tokenizer import align_embeddings


def tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed from the run's seed and the tensor's name: results do not depend on order."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & (2**63 - 1)


def sources_of(job: TensorJob) -> list[TensorSource]:
    """The inputs `job` reads, in the order its read tensors come: the sources, then the base."""
    return list(job.sources) + ([job.base] if job.base is not None else [])


def is_plain_copy(job: TensorJob, raw: list[torch.Tensor], plan: MergePlan) -> bool:
    """A copy with nothing to compute: one source, no scale, no re-layout, stored dtype = output dtype."""
    return (
        job.method == "passthrough"
        and job.per_model.get("scale", (None,)) == (None,)
        and not job.align_vocab
        and raw[0].dtype == STORAGE_DTYPES[job.dtype]
        and (plan.input_dtype is None or getattr(torch, plan.input_dtype) == raw[0].dtype)
    )


def compute_job(job: TensorJob, raw: list[torch.Tensor], plan: MergePlan, device: torch.device, pool: BufferPool,
                prompt_gates: torch.Tensor | None, prepared: Any = None) -> torch.Tensor:
    """One output tensor, cast to its output dtype in a pooled CPU buffer.

    Args:
        job: what to compute (for a piece, the job over its 1-D entries: see the executor's pieces).
        raw: the inputs as read, in :func:`sources_of` order; given back to `pool` once used.
        plan: the merge plan (its seed, the config's input `dtype`, the vocabulary).
        device: where the float32 math runs.
        pool: where buffers come from and go back to.
        prompt_gates: the routers computed from prompts, for `gate` jobs, or None.
        prepared: for a piece of a tensor, its method's prepare pass over the whole tensor
            (:func:`prepare_whole`); None prepares from `raw`.

    Returns:
        `job.shape` in the output dtype (bfloat16, float16 or float32), on the CPU.
    """
    if job.method == "gate":
        out = pool.take(job.shape, STORAGE_DTYPES[job.dtype])
        return out.copy_(router_weights(job, plan.seed, prompt_gates))
    if job.method == "zeros":  # a tensor the output needs and no input has (a Qwen2-MoE's q/k/v biases)
        return pool.take(job.shape, STORAGE_DTYPES[job.dtype]).zero_()
    method = get_method(job.method)
    kwargs = _arguments(job, method, plan, device)
    if device.type == "cpu" and not job.align_vocab and method.elementwise:
        return _compute_in_slices(job, method, raw, plan, kwargs, pool, prepared)
    input_dtype = getattr(torch, plan.input_dtype) if plan.input_dtype else None
    inputs = {}
    for source, tensor in zip(sources_of(job), raw):
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


def prepare_whole(job: TensorJob, plan: MergePlan, device: torch.device, pool: BufferPool,
                  read_slice: Callable[[int, int], list[torch.Tensor]]) -> Any:
    """The prepare pass of `job`'s method over the whole tensor, for a job merged in pieces.

    The inputs are read once more, `SLICE` entries at a time, and taken by the method as
    :func:`_compute_in_slices` takes a whole tensor's slices (the same slices, in the same order, as
    stored or converted alike), so the value, and the pieces' bytes, are a whole-tensor run's.

    Args:
        job: the whole job (its method has a `prepare` pass and no random draw).
        plan: the merge plan (the config's input `dtype`).
        device: where the math runs (the CPU: only it merges in pieces).
        pool: where `read_slice`'s buffers go back once used.
        read_slice: `(start, stop)` -> the inputs' flattened entries `[start, stop)` as stored, 1-D, in
            :func:`sources_of` order, in buffers from `pool`.

    Returns:
        What the method's `prepare` returns (never None).
    """
    method = get_method(job.method)
    kwargs = _arguments(job, method, plan, device)

    def slices() -> Iterator[tuple[list[torch.Tensor], torch.Tensor | None]]:
        inputs = None
        for start, stop in _slice_ranges(math.prod(job.shape)):
            parts = read_slice(start, stop)
            inputs = inputs or _SliceInputs(job, method, plan, [part.dtype for part in parts], stop - start)
            yield inputs.for_prepare(parts)
            pool.give(parts)  # drawn past: the method is done with this slice

    return method.prepare(slices, job.shape, **kwargs)


def _slice_ranges(numel: int) -> list[tuple[int, int]]:
    """The `[start, stop)` slices of a flattened tensor of `numel` entries, `SLICE` each (the last shorter)."""
    return [(start, min(start + SLICE, numel)) for start in range(0, numel, SLICE)]


def _arguments(job: TensorJob, method: MergeMethod, plan: MergePlan, device: torch.device) -> dict[str, Any]:
    """The method's keyword arguments for `job`: its parameters, and its seeded `generator` if it draws."""
    argument = {spec.name: spec.argument for spec in method.parameters}  # config key -> Python name (`lambda_`)
    kwargs = {argument[name]: list(values) for name, values in job.per_model.items()}
    kwargs.update({argument[name]: value for name, value in job.global_params.items()})
    if method.uses_generator:
        kwargs["generator"] = torch.Generator(device=device).manual_seed(tensor_seed(plan.seed, job.name))
    return kwargs


class _SliceInputs:
    """One job's input slices as its elementwise method takes them: as stored where its `fused` path
    reads them, else converted to float32 in reused buffers (the config's `dtype` cast first, as
    mergekit casts the inputs; only the conversion does that, so `fused` is off unless every input is
    stored in that dtype already).

    Args:
        job: the job (how many sources, and whether a base follows them).
        method: its method.
        plan: the merge plan (the config's input `dtype`).
        dtypes: the inputs' stored dtypes, in :func:`sources_of` order.
        size: the largest slice, in entries.
    """

    def __init__(self, job: TensorJob, method: MergeMethod, plan: MergePlan, dtypes: list[torch.dtype], size: int):
        self.input_dtype = getattr(torch, plan.input_dtype) if plan.input_dtype else None
        self.fused = method.fused if self.input_dtype is None or all(d == self.input_dtype for d in dtypes) else None
        self.others = len(job.sources)
        self.has_base = job.base is not None
        self.work = [torch.empty(size, dtype=torch.float32) for _ in dtypes]

    def stored(self, parts: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """`(tensors, base)` of one slice as stored (1-D views, in :func:`sources_of` order)."""
        return parts[:self.others], parts[self.others] if self.has_base else None

    def converted(self, parts: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """`(tensors, base)` of one slice in float32, in the reused buffers (valid until the next call)."""
        copies = []
        for buffer, part in zip(self.work, parts):
            if self.input_dtype is not None and part.dtype != self.input_dtype:
                part = part.to(self.input_dtype)
            copies.append(buffer[: part.numel()].copy_(part))
        return self.stored(copies)

    def for_prepare(self, parts: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """`(tensors, base)` of one slice as the prepare pass takes it: as stored where `fused` runs, as
        the slices' calls do (the registry's `fused` contract), else converted."""
        return self.converted(parts) if self.fused is None else self.stored(parts)


def _compute_in_slices(job: TensorJob, method: MergeMethod, raw: list[torch.Tensor], plan: MergePlan, kwargs: dict,
                       pool: BufferPool, prepared: Any) -> torch.Tensor:
    """An elementwise method's output, computed `SLICE` entries at a time.

    Each slice goes straight from the stored inputs into the output where the method has a `fused`
    path that takes them; otherwise each input's slice is converted to float32 in a small reused
    buffer, so no float32 copy of a whole tensor exists and the method's temporaries stay in cache.
    Either way the bytes equal a whole-tensor run's. `prepared`: see :func:`compute_job`.
    """
    flat = [tensor.reshape(-1) for tensor in raw]  # sources in config order, then the base
    numel = flat[0].numel()
    inputs = _SliceInputs(job, method, plan, [tensor.dtype for tensor in flat], min(SLICE, numel))
    ranges = _slice_ranges(numel)
    if method.prepare is not None:
        kwargs["prepared"] = prepared if prepared is not None else method.prepare(
            lambda: (inputs.for_prepare([tensor[start:stop] for tensor in flat]) for start, stop in ranges),
            job.shape, **kwargs)
    out = pool.take(job.shape, STORAGE_DTYPES[job.dtype])
    flat_out = out.view(-1)
    for start, stop in ranges:
        parts = [tensor[start:stop] for tensor in flat]
        tensors, base = inputs.stored(parts)
        if inputs.fused is not None and inputs.fused(tensors, **_with_base(base), out=flat_out[start:stop], **kwargs):
            continue
        tensors, base = inputs.converted(parts)
        flat_out[start:stop].copy_(method.function(tensors, **_with_base(base), **kwargs).reshape(-1))
    pool.give(raw)
    return out


def _with_base(base: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The `base` keyword of a method's call: given only to a job that has one."""
    return {} if base is None else {"base": base}


def _own(values: list[torch.Tensor]) -> torch.Tensor:
    """The next input of a model; a model listed twice gets its own copy, since methods may work in place."""
    tensor = values.pop(0)
    return tensor.clone() if any(v.data_ptr() == tensor.data_ptr() for v in values) else tensor
