"""Task arithmetic and its sparsifying / sign-electing variants: eight configurations of one function.

Task arithmetic (Ilharco et al. 2022, arXiv:2212.04089) adds weighted task vectors `δᵢ = xᵢ − base` to the
base. TIES (Yadav et al. 2023, arXiv:2306.01708), DARE (Yu et al. 2023, arXiv:2311.03099), Model
Breadcrumbs (Davari & Belilovsky 2023, arXiv:2312.06795) and DELLA (Deep et al. 2024, arXiv:2406.11617)
first sparsify each task vector and, in their `ties` forms, keep only the entries that agree with an
elected sign. :func:`generalized_task_arithmetic` is that one algorithm (mergekit's
`GeneralizedTaskArithmeticMerge`); :data:`VARIANTS` lists the registered configurations, each registered
under its own name with a signature holding only the parameters it uses.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor

from merger.methods.native import NativeKernels, SparsifyStep, kernels_for
from merger.methods.sparsify import (
    agrees_with,
    apply_mask_,
    breadcrumbs_mask,
    della_mask,
    elect_sign,
    magnitude_trims,
    random_drops,
    set_l1_factors,
    slices_of,
)
from merger.methods.registry import Factor, Fraction, PerModel, merge_method
from merger.methods.threads import single_threaded_math

Sparsifier = Callable[..., "Tensor | None"]

# defaults of the sparsifiers' per-model parameters (mergekit's)
PER_MODEL_DEFAULTS = {"density": 1.0, "gamma": 0.01, "epsilon": 0.15}
DIVISOR_EPS = 1e-8  # without consensus, a weight sum below this divides by 1 instead
# Entries per run of the elementwise steps when the masks come slice by slice (or there are none):
# the dozen passes of a TIES block then stay in the core's cache (measured on a 1 Mi slice, one
# thread: 11.1 → 8.0 ns per entry for TIES, 7.1 → 5.8 for DARE-TIES; 16 Ki blocks lose to call overhead).
BLOCK = 1 << 16


def generalized_task_arithmetic(
    tensors: list[Tensor],
    base: Tensor,
    *,
    weight: Sequence[float],
    sparsifiers: Sequence[Callable[[Tensor], Tensor]] | None = None,
    consensus: bool = False,
    normalize: bool = False,
    lambda_: float = 1.0,
) -> Tensor:
    """`base + λ·M/D`: the weighted (sparsified, sign-agreeing) task vectors, optionally normalised.

    Steps:
      1. `δᵢ = xᵢ − base`.
      2. Sparsify: `δᵢ ← δᵢ ⊙ maskᵢ`, L1-rescaled when `rescale`.
      3. Weight: `Wᵢ = wᵢ·δᵢ`.
      4. With `consensus` (TIES): `s = sign(Σᵢ Wᵢ)` (+1 at 0), `mᵢ = [sign(Wᵢ) = s]`, `M = Σᵢ Wᵢ·mᵢ`,
         `D = Σᵢ wᵢ·mᵢ` per entry (1 where 0). Without: `M = Σᵢ Wᵢ`, `D = Σᵢ wᵢ` (1 when |D| < 1e-8).
      5. `M ← M/D` if `normalize`.  6. `M ← λ·M`.  7. `out = base + M`.

    Args:
        tensors: n float32 tensors `(*shape)`, the non-base models.
        base: float32 `(*shape)`.
        weight: n weights `wᵢ` (negative ones subtract a task vector).
        sparsifiers: n functions sparsifying a task vector in place (mask, L1 rescale), or None.
        consensus: TIES sign election and disjoint mean.
        normalize: divide by the (agreeing) weight sum.
        lambda_: final scale of the merged task vector.

    Returns:
        float32 `(*shape)`.
    """

    def weighted_task_vectors():
        for i, (x, w) in enumerate(zip(tensors, weight)):
            delta = x.sub_(base)  # (*shape); the input is the method's own buffer (see the registry)
            if sparsifiers is not None:
                sparsifiers[i](delta)
            yield delta.mul_(w)

    task_vectors = weighted_task_vectors()
    if consensus:
        task_vectors = list(task_vectors)  # n × (*shape)
        sign = elect_sign(task_vectors)  # (*shape) ±1.0: s
        divisor = torch.zeros_like(base) if normalize else None  # D = Σᵢ wᵢ·mᵢ per entry, 1 where 0
        for task_vector, w in zip(task_vectors, weight):  # one agreement mask alive at a time
            agree = agrees_with(task_vector, sign)  # (*shape) 1.0/0.0: mᵢ
            task_vector.mul_(agree)  # Wᵢ·mᵢ
            if divisor is not None:
                divisor.add_(agree, alpha=w)
            del agree
        del sign
        if divisor is not None:
            divisor.add_(torch.eq(divisor, 0, out=torch.empty_like(divisor)))  # + 1 where D = 0, + 0 elsewhere
        task_vectors = iter(task_vectors)
    else:
        divisor = weight_sum_divisor(weight)
    merged = next(task_vectors)  # (*shape): M, summed into the first task vector
    for task_vector in task_vectors:
        merged.add_(task_vector)
    if normalize:
        merged.div_(divisor)
    if lambda_ != 1:  # × 1 changes no bit: skip the pass
        merged.mul_(lambda_)
    return merged.add_(base)


def weight_sum_divisor(weight: Sequence[float]) -> float:
    """`D = Σᵢ wᵢ` without consensus, or 1 when `|D| < 1e-8` (no division by about zero)."""
    total = sum(weight)
    return total if abs(total) >= DIVISOR_EPS else 1.0


@dataclass(frozen=True)
class Variant:
    """A registered configuration of :func:`generalized_task_arithmetic`.

    Attributes:
        name: the `merge_method` key.
        pretty_name: the name on the card.
        reference_url: the paper.
        summary: the first line of the registered function's docstring.
        sparsifier: a whole-tensor mask function of `merger.methods.sparsify`, or None; its keyword
            parameters become per-model config parameters (defaults in `PER_MODEL_DEFAULTS`), and a
            `generator` parameter makes the method take the run's seeded RNG.
        elementwise: the engine may run it on slices (no sparsifier, or one decided by `prepare`).
        prepare: the whole-tensor pass deciding the masks slice by slice (TIES's
            :func:`magnitude_trims`, DARE's :func:`random_drops`; `rescale` adds :func:`set_l1_factors`),
            or None; used instead of a sparsifier.
        random: `prepare` draws from the run's seeded RNG (DARE).
        consensus: TIES sign election.
        normalize: the default of `normalize`.
        rescale: the default of `rescale` (declared only with a sparsifier).
    """

    name: str
    pretty_name: str
    reference_url: str
    summary: str
    sparsifier: Sparsifier | None
    consensus: bool
    normalize: bool
    rescale: bool = False
    elementwise: bool = False
    prepare: Callable[..., list[Any]] | None = None
    random: bool = False

    def mask_parameters(self) -> list[str]:
        """The per-model parameters of its masks (`density`, `gamma`, `epsilon`), in order."""
        if self.prepare is not None:
            return ["density"]
        if self.sparsifier is None:
            return []
        return [n for n in inspect.signature(self.sparsifier).parameters if n not in ("delta", "generator")]

    @property
    def draws(self) -> bool:
        """It takes the run's seeded RNG."""
        if self.prepare is not None:
            return self.random
        return self.sparsifier is not None and "generator" in inspect.signature(self.sparsifier).parameters


def _magnitude_trims(slices: Callable[[], Any], shape: tuple[int, ...], density: list[float],
                     generator: torch.Generator | None) -> list[Any]:
    return magnitude_trims(slices, density)


def _random_drops(slices: Callable[[], Any], shape: tuple[int, ...], density: list[float],
                  generator: torch.Generator | None) -> list[Any]:
    return random_drops(math.prod(shape), density, generator)


VARIANTS = (
    Variant("task_arithmetic", "Task Arithmetic", "https://arxiv.org/abs/2212.04089",
            "Add the weighted task vectors to the base.",
            None, consensus=False, normalize=False, elementwise=True),
    Variant("ties", "TIES", "https://arxiv.org/abs/2306.01708",
            "Trim each task vector to its largest magnitudes, elect signs, take the disjoint mean.",
            None, consensus=True, normalize=True, elementwise=True, prepare=_magnitude_trims),
    Variant("dare_ties", "DARE TIES", "https://arxiv.org/abs/2311.03099",
            "Drop task-vector entries at random (rescaled), then elect signs as TIES does.",
            None, consensus=True, normalize=False, rescale=True, elementwise=True, prepare=_random_drops, random=True),
    Variant("dare_linear", "Linear DARE", "https://arxiv.org/abs/2311.03099",
            "Drop task-vector entries at random (rescaled) and add the weighted sum.",
            None, consensus=False, normalize=False, rescale=True, elementwise=True, prepare=_random_drops,
            random=True),
    Variant("breadcrumbs", "Model Breadcrumbs", "https://arxiv.org/abs/2312.06795",
            "Drop the largest (outliers) and smallest task-vector entries and add the weighted sum.",
            breadcrumbs_mask, consensus=False, normalize=False),
    Variant("breadcrumbs_ties", "Model Breadcrumbs with TIES", "https://arxiv.org/abs/2312.06795",
            "Drop the largest and smallest task-vector entries, then elect signs as TIES does.",
            breadcrumbs_mask, consensus=True, normalize=False),
    Variant("della", "DELLA", "https://arxiv.org/abs/2406.11617",
            "Drop entries with magnitude-rank probabilities (rescaled), then elect signs as TIES does.",
            della_mask, consensus=True, normalize=True, rescale=True),
    Variant("della_linear", "Linear DELLA", "https://arxiv.org/abs/2406.11617",
            "Drop entries with magnitude-rank probabilities (rescaled) and add the weighted sum.",
            della_mask, consensus=False, normalize=False, rescale=True),
)


def signature(variant: Variant) -> inspect.Signature:
    """The registered signature of `variant`: exactly the parameters it uses, with its defaults.

    In order: `tensors`, `base`, `weight` (per-model, required), the sparsifier's per-model parameters
    (`density`, `gamma`, `epsilon`), `normalize`, `rescale` (with a sparsifier), `int8_mask` (accepted for
    mergekit configs; masks here are always one-byte bool, so it changes nothing), `lambda_` (config key
    `lambda`), `generator` when the sparsifier is random, and `prepared` (the engine's result of
    `variant.prepare`, None to prepare from the whole tensors) when it has a prepare pass.
    """
    keyword = inspect.Parameter.KEYWORD_ONLY
    parameters = [
        inspect.Parameter("tensors", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=list[Tensor]),
        inspect.Parameter("base", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Tensor),
        inspect.Parameter("weight", keyword, annotation=PerModel[Factor]),
        *(inspect.Parameter(name, keyword, annotation=PerModel[Fraction], default=PER_MODEL_DEFAULTS[name])
          for name in variant.mask_parameters()),
        inspect.Parameter("normalize", keyword, annotation=bool, default=variant.normalize),
    ]
    if variant.sparsifier is not None or variant.prepare is not None:
        parameters.append(inspect.Parameter("rescale", keyword, annotation=bool, default=variant.rescale))
    parameters.append(inspect.Parameter("int8_mask", keyword, annotation=bool, default=False))
    parameters.append(inspect.Parameter("lambda_", keyword, annotation=Factor, default=1.0))
    if variant.draws:
        parameters.append(inspect.Parameter("generator", keyword, annotation=torch.Generator))
    if variant.prepare is not None:
        parameters.append(inspect.Parameter("prepared", keyword, annotation=list, default=None))
    return inspect.Signature(parameters, return_annotation=Tensor)


def register(variant: Variant) -> Callable[..., Tensor]:
    """Register `variant` under its name; calls are bound to (and checked against) :func:`signature`."""
    variant_signature = signature(variant)

    def bound(args: tuple, kwargs: dict) -> dict[str, Any]:
        arguments = variant_signature.bind(*args, **kwargs)
        arguments.apply_defaults()
        for name, value in arguments.arguments.items():  # a per-model default applies to every model
            if name in PER_MODEL_DEFAULTS and not isinstance(value, (list, tuple)):
                arguments.arguments[name] = [value] * len(arguments.arguments["tensors"])
        return arguments.arguments

    def merge(*args: Any, **kwargs: Any) -> Tensor:
        return _merge_variant(variant, **bound(args, kwargs))

    def fused(*args: Any, out: Tensor, **kwargs: Any) -> bool:
        return _fuse_variant(variant, out=out, **bound(args, kwargs))

    merge.__signature__ = variant_signature
    merge.__annotations__ = {p.name: p.annotation for p in variant_signature.parameters.values()} | {"return": Tensor}
    merge.__name__ = merge.__qualname__ = variant.name
    merge.__doc__ = (
        f"{variant.pretty_name}: {variant.summary}\n\n"
        f"See :func:`generalized_task_arithmetic` ({variant.reference_url}) and :func:`signature` for the "
        "parameters. Takes n float32 `(*shape)` tensors and a float32 base; returns float32 `(*shape)`."
    )
    prepare = None if variant.prepare is None else partial(_prepare_variant, variant)
    return merge_method(
        variant.name, pretty_name=variant.pretty_name, reference_url=variant.reference_url,
        elementwise=variant.elementwise, prepare=prepare, fused=fused if variant.elementwise else None,
    )(merge)


def _prepare_variant(
    variant: Variant, slices: Callable[[], Any], shape: tuple[int, ...], *, density: list[float],
    rescale: bool | None = None, generator: torch.Generator | None = None, **_: Any,
) -> list[Any]:
    """`variant.prepare` called as the engine calls a method's prepare pass (its keyword arguments),
    followed by the L1 rescale factors when `rescale` (default: the variant's)."""
    steps = variant.prepare(slices, shape, density, generator)
    if variant.rescale if rescale is None else rescale:
        set_l1_factors(slices, steps)
    return steps


def _merge_variant(
    variant: Variant,
    tensors: list[Tensor],
    base: Tensor,
    *,
    weight: list[float],
    normalize: bool,
    lambda_: float,
    int8_mask: bool,
    rescale: bool = False,
    generator: torch.Generator | None = None,
    prepared: list[Any] | None = None,
    **per_model: list[float],
) -> Tensor:
    """Run `variant` on arguments bound to its signature; `per_model` holds the sparsifier's lists."""
    merge = partial(generalized_task_arithmetic, weight=weight, consensus=variant.consensus, normalize=normalize,
                    lambda_=lambda_)
    if variant.sparsifier is not None:  # its masks need the whole tensor
        random = {} if generator is None else {"generator": generator}
        sparsifiers = [
            partial(_sparsify_, partial(variant.sparsifier, **{name: values[i] for name, values in per_model.items()},
                                        **random), rescale=rescale)
            for i in range(len(tensors))
        ]
        return merge(tensors, base, sparsifiers=sparsifiers)
    if variant.prepare is not None and prepared is None:  # a call on whole tensors: prepare from them
        prepared = _prepare_variant(variant, lambda: slices_of(tensors, base), tuple(base.shape),
                                    density=per_model["density"], rescale=rescale, generator=generator)
    native = kernels_for(len(tensors), *tensors, base)
    if native is not None and all(t.dtype == torch.float32 for t in (*tensors, base)):  # the float32 contract
        return _merge_natively(native, tensors, base, weight, prepared, consensus=variant.consensus,
                               normalize=normalize, lambda_=lambda_)
    if prepared is not None:
        merge = partial(merge, sparsifiers=[(lambda delta: delta) if step is None else step.apply_ for step in prepared])
    return _in_blocks(merge, tensors, base)


def _fuse_variant(variant: Variant, tensors: list[Tensor], base: Tensor, *, out: Tensor, weight: list[float],
                  normalize: bool, lambda_: float, prepared: list[Any] | None = None, **_: Any) -> bool:
    """`variant` on one slice of stored tensors, into `out` (the registry's `fused`); False, having
    touched nothing, where the native kernels cannot run it."""
    native = kernels_for(len(tensors), *tensors, base, out)
    if native is None or (variant.prepare is not None and prepared is None):
        return False
    _merge_natively(native, tensors, base, weight, prepared, consensus=variant.consensus, normalize=normalize,
                    lambda_=lambda_, out=out)
    return True


def _merge_natively(native: NativeKernels, tensors: list[Tensor], base: Tensor, weight: list[float],
                    prepared: list[Any] | None, *, consensus: bool, normalize: bool, lambda_: float,
                    out: Tensor | None = None) -> Tensor:
    """:func:`generalized_task_arithmetic` with the prepared masks, in the native kernels (same bytes),
    into `out` (default: summed into `tensors[0]`)."""
    numel = base.numel()
    steps = [SparsifyStep() if p is None else p.native_step(numel) for p in (prepared or [None] * len(tensors))]
    flat = native.gta([t.view(-1) for t in tensors], base.view(-1), steps, weight, consensus=consensus,
                      normalize=normalize, divisor=weight_sum_divisor(weight), lambda_=lambda_,
                      out=None if out is None else out.view(-1))
    for step, p in zip(steps, prepared or []):
        if p is not None:
            p.native_done(step)
    return flat.view(tensors[0].shape)


def _in_blocks(merge: Callable[[list[Tensor], Tensor], Tensor], tensors: list[Tensor], base: Tensor) -> Tensor:
    """`merge` run on consecutive `BLOCK`-entry blocks of contiguous tensors, in flat order.

    Every step of :func:`generalized_task_arithmetic` is elementwise (prepared masks are applied in
    flat order, in pieces of any size), so the bytes equal one whole call's. It sums into the first
    tensor in place, so that tensor, filled block by block, is the result.
    """
    if base.numel() <= BLOCK or not all(t.is_contiguous() for t in (*tensors, base)):
        return merge(tensors, base)
    flat = [t.view(-1) for t in tensors]
    flat_base = base.view(-1)
    with single_threaded_math():  # a block is too small to share: the other core reads and writes
        for start in range(0, flat_base.numel(), BLOCK):
            block = merge([t[start:start + BLOCK] for t in flat], flat_base[start:start + BLOCK])
            assert block.data_ptr() == flat[0][start:].data_ptr()  # summed in place into the first tensor
    return tensors[0]


def _sparsify_(mask_of: Callable[[Tensor], Tensor | None], delta: Tensor, *, rescale: bool) -> Tensor:
    return apply_mask_(delta, mask_of(delta), rescale=rescale)


for _variant in VARIANTS:
    register(_variant)
