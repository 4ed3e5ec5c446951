"""NuSLERP: SLERP of two models by relative weights, on whole tensors or per row/column, and on task
vectors when a base is given (mergekit's `nuslerp`; SLERP after Shoemake 1985, doi:10.1145/325165.325242)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from merger.methods.reductions import row_product_sums
from merger.methods.registry import Factor, PerModel, merge_method

WEIGHT_SUM_EPS = 1e-6  # |w₁ + w₂| below this interpolates half-way
NORM_EPS = 1e-7  # floor of a vector's norm when normalising; at or below it the vector has no direction
DOT_THRESHOLD = 0.9995  # above this |cos θ| (parallel or opposed vectors) lerp, as SLERP does


@merge_method(
    "nuslerp",
    pretty_name="NuSLERP",
    reference_url="https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md#nuslerp-nuslerp",
    min_others=2,
    max_others=2,
)
def nuslerp(
    tensors: list[Tensor],
    base: Tensor | None = None,
    *,
    weight: PerModel[Factor],
    nuslerp_flatten: bool = True,
    nuslerp_row_wise: bool = False,
) -> Tensor:
    """SLERP from the first model (t=0) to the second (t=1), with `t = w₂/(w₁ + w₂)`.

    With a base, interpolates the task vectors: `out = base + slerp(t, x₁ − base, x₂ − base)`.
    Per vector: `θ = acos(clamp(â·b̂, −1, 1))`, `out = (sin((1−t)θ)·a + sin(tθ)·b)/sin θ`, and the lerp
    `(1−t)·a + t·b` where the arc is degenerate: `|cos θ| > 0.9995` (parallel, or opposed: mergekit
    divides by `sin θ` only when it is below 1e-8, so opposed vectors, whose float32 `sin θ` is ~1e-7 or
    more, come out scaled by up to 1e7) or either norm ≤ 1e-7 (no direction; a model equal to the base
    has a zero task vector).

    Args:
        tensors: two float32 tensors `(*shape)`, in config order.
        base: optional float32 `(*shape)`, a third model.
        weight: `[w₁, w₂]`; `t = 0.5` when `|w₁ + w₂| < 1e-6`.
        nuslerp_flatten: the whole tensor is one vector (0-dim tensors always are).
        nuslerp_row_wise: without flattening, interpolate along the first axis (columns `W[:, j]`)
            instead of the last (rows `W[i, :]`).

    Returns:
        float32 `(*shape)`.
    """
    a, b = tensors
    w1, w2 = weight
    t = 0.5 if abs(w1 + w2) < WEIGHT_SUM_EPS else w2 / (w1 + w2)
    if base is not None:
        a, b = a - base, b - base
    if nuslerp_flatten or a.dim() == 0:
        out = _slerp(t, a.reshape(-1), b.reshape(-1), dim=-1).view(a.shape)
    else:
        out = _slerp(t, a, b, dim=0 if nuslerp_row_wise else -1)
    return out if base is None else out.add_(base)


def _slerp(t: float, a: Tensor, b: Tensor, *, dim: int) -> Tensor:
    """Slerp of the vectors along `dim` of `a` and `b` (float32, one shape), in a new tensor; each vector's
    sums in float64 (:mod:`.reductions`) and its two scales by Python's float math: the same on every machine."""
    others = a.movedim(dim, -1).shape[:-1]  # the vectors' index, in the order of their rows below
    if others.numel() == 0:
        return a.clone()
    rows_a, rows_b = (v.movedim(dim, -1).reshape(others.numel(), v.shape[dim]) for v in (a, b))
    sums = zip(*(s.tolist() for s in row_product_sums(rows_a, rows_b)))
    scale_a, scale_b = zip(*(_scales(t, *vector) for vector in sums))
    scale_a, scale_b = (torch.tensor(s, dtype=a.dtype, device=a.device).view(others).unsqueeze(dim)
                        for s in (scale_a, scale_b))
    return (a * scale_a).add_(b * scale_b)


def _scales(t: float, aa: float, bb: float, ab: float) -> tuple[float, float]:
    """`(sin((1−t)θ)/sin θ, sin(tθ)/sin θ)` of one vector pair from `‖a‖²`, `‖b‖²` and `a·b`; `(1−t, t)` where
    the arc is degenerate (a norm ≤ NORM_EPS, or `|cos θ| > DOT_THRESHOLD`)."""
    norm_a, norm_b = math.sqrt(aa), math.sqrt(bb)
    cos_theta = min(max(ab / (max(norm_a, NORM_EPS) * max(norm_b, NORM_EPS)), -1.0), 1.0)
    if norm_a <= NORM_EPS or norm_b <= NORM_EPS or abs(cos_theta) > DOT_THRESHOLD:
        return 1 - t, t
    theta = math.acos(cos_theta)
    return math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)
