"""RAM and RAM+ (tensor-local): task vectors kept where one model changed an entry, averaged where
several did (arXiv:2601.13572, "Reinforced Agent Merging"; mergekit 0.1.5's `ram` and `ramplus_tl`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Annotated

import torch
from torch import Tensor

from merger.ranges import MAX_FACTOR, Range
from merger.methods.registry import merge_method

Epsilon = Annotated[float, Range(float, 0.0, 1.0, "the smallest change that counts")]
NonNegative = Annotated[float, Range(float, 0.0, MAX_FACTOR, "a non-negative number")]


def _active_and_counts(tensors: Sequence[Tensor], base: Tensor, epsilon: float) -> tuple[list[Tensor], list[Tensor], Tensor]:
    """Task vectors `τᵢ = xᵢ − base`, masks `|τᵢ| > ε` and the count `c` of models changing each entry."""
    task_vectors = [x - base for x in tensors]
    active = [tau.abs() > epsilon for tau in task_vectors]
    count = torch.zeros(base.shape, dtype=torch.int32)
    for mask in active:
        count.add_(mask)
    return task_vectors, active, count


def _ram_sum(tensors: Sequence[Tensor], base: Tensor, epsilon: float, unique_scales: Sequence[float]) -> Tensor:
    """`base + Σᵢ τᵢ·activeᵢ·(λᵢ·[c = 1] + [c > 1]/max(c, 1))`."""
    task_vectors, active, count = _active_and_counts(tensors, base, epsilon)
    unique = count == 1
    shared_divisor = torch.where(count > 1, count.clamp(min=1).float(), torch.inf)  # 1/inf = 0 outside shared
    out = base.clone()
    for tau, mask, scale in zip(task_vectors, active, unique_scales):
        tau.mul_(mask)
        out.add_(tau * unique, alpha=scale).add_(tau / shared_divisor)
    return out


@merge_method("ram", pretty_name="RAM", reference_url="https://arxiv.org/abs/2601.13572", elementwise=True)
def ram(tensors: list[Tensor], base: Tensor, *, epsilon: Epsilon = 1e-5) -> Tensor:
    """`b + Σᵢ [τᵢ·aᵢ·[c = 1] + τᵢ·aᵢ·[c > 1] / c]`, `τᵢ = xᵢ − b`, `aᵢ = |τᵢ| > ε`, `c = Σᵢ aᵢ`.

    An entry only one model changed takes that model's change whole; an entry several changed takes
    their mean change; an entry no model changed (beyond `epsilon`) keeps the base.

    Args:
        tensors: n float32 tensors `(*shape)`, the non-base models.
        base: float32 `(*shape)`, the base model.
        epsilon: |change| at or below which an entry counts as unchanged.

    Returns:
        float32 `(*shape)`.
    """
    return _ram_sum(tensors, base, epsilon, [1.0] * len(tensors))


def ramplus_scales(
    slices: Callable[[], Iterable[tuple[Sequence[Tensor], Tensor]]],
    shape: tuple[int, ...],  # noqa: ARG001 - the prepare protocol passes it
    *,
    epsilon: float,
    r: float,
    alpha: float,
    **_: object,
) -> list[float]:
    """The prepare pass of `ramplus_tl`: `λᵢ = 1 + r·clamp(ρᵢ, 0, α)` over the whole tensor.

    `ρᵢ = |aᵢ ∧ [c > 1]| / max(|aᵢ ∧ [c = 1]|, ε)`: how many of model i's changed entries are shared
    with another model, per entry it changed alone (counted in int64 over every slice).

    Returns:
        n floats, one per non-base model.
    """
    shared_total: list[int] | None = None
    unique_total: list[int] = []
    for tensors, base in slices():
        _, active, count = _active_and_counts(tensors, base, epsilon)
        shared = [int((mask & (count > 1)).sum()) for mask in active]
        unique = [int((mask & (count == 1)).sum()) for mask in active]
        if shared_total is None:
            shared_total, unique_total = shared, unique
        else:
            shared_total = [a + b for a, b in zip(shared_total, shared)]
            unique_total = [a + b for a, b in zip(unique_total, unique)]
    assert shared_total is not None  # a tensor has at least one slice
    return [1 + r * min(max(s / max(u, epsilon), 0.0), alpha) for s, u in zip(shared_total, unique_total)]


@merge_method(
    "ramplus_tl",
    pretty_name="RAM+ (tensor-local)",
    reference_url="https://arxiv.org/abs/2601.13572",
    elementwise=True,
    prepare=ramplus_scales,
    slices_in_any_order=True,
)
def ramplus_tl(
    tensors: list[Tensor],
    base: Tensor,
    *,
    r: NonNegative = 0.1,
    alpha: NonNegative = 0.2,
    epsilon: Epsilon = 1e-5,
    prepared: list[float] | None = None,
) -> Tensor:
    """RAM with each model's unique changes scaled by `λᵢ` (see :func:`ramplus_scales`).

    `b + Σᵢ [λᵢ·τᵢ·aᵢ·[c = 1] + τᵢ·aᵢ·[c > 1] / c]`: a model whose changes mostly overlap others'
    gets its few unique changes boosted by up to `r·alpha`.

    Args:
        tensors: n float32 tensors `(*shape)`, the non-base models.
        base: float32 `(*shape)`, the base model.
        r: the boost per unit of overlap ratio.
        alpha: the cap on the overlap ratio.
        epsilon: |change| at or below which an entry counts as unchanged; also the ratio's denominator floor.
        prepared: the engine's per-model `λᵢ` for the whole tensor; None computes them from these tensors.

    Returns:
        float32 `(*shape)`.
    """
    if prepared is None:
        whole = [x.reshape(-1) for x in tensors]
        prepared = ramplus_scales(lambda: [(whole, base.reshape(-1))], tuple(base.shape), epsilon=epsilon, r=r, alpha=alpha)
    return _ram_sum(tensors, base, epsilon, prepared)
