"""Multi-SLERP: barycentric interpolation of several models on the hypersphere, one tangent-space step
(Charles Goddard, "Multi-SLERP", https://goddard.blog/posts/multislerp-wow-what-a-cool-idea)."""

from __future__ import annotations

import math
from typing import Annotated

import torch
from torch import Tensor

from ..ranges import Range
from . import Factor, PerModel, merge_method
from .reductions import dot, norm


@merge_method(
    "multislerp",
    pretty_name="Multi-SLERP",
    reference_url="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
)
def multislerp(
    tensors: list[Tensor],
    base: Tensor | None = None,
    *,
    weight: PerModel[Factor],
    normalize_weights: bool = True,
    eps: Annotated[float, Range(float, 0.0, 1.0, "the norms' floor")] = 1e-8,
) -> Tensor:
    """Weighted spherical mean of the flattened inputs (task vectors `xᵢ − base` when a base is given).

    Steps, with `wᵢ` divided by `Σ wᵢ` when `normalize_weights`:
      1. `nᵢ = ‖xᵢ‖`, `uᵢ = xᵢ/(nᵢ + eps)`.
      2. `m = Σ wᵢuᵢ`; if `‖m‖ < eps` the spherical mean is undefined (every input a zero vector, as
         when each model equals the base; or antipodal inputs with balancing weights): the weighted
         linear mean `Σ wᵢxᵢ` instead, for any number of inputs.
      3. Project to the tangent space at `m̂ = m/‖m‖`: `τ = Σ wᵢ(uᵢ − (uᵢ·m̂)m̂)`, `ℓ = ‖τ‖ + eps`.
      4. Map back: `r = m̂·cos ℓ + τ·sin ℓ/ℓ`; `out = r·Σ wᵢnᵢ` (+ base).

    Args:
        tensors: n float32 tensors `(*shape)`; a single one is returned as is.
        base: optional float32 `(*shape)`: the origin of the hypersphere.
        weight: n per-model weights.
        normalize_weights: divide the weights by their sum (the planner refuses a sum of 0).
        eps: numerical floor of the norms.

    Returns:
        float32 `(*shape)`.
    """
    if len(tensors) == 1:
        return tensors[0]
    weights = [w / sum(weight) for w in weight] if normalize_weights else list(weight)
    # 1. flattened inputs (task vectors with a base) and their norms
    vectors = [(x if base is None else x - base).reshape(-1) for x in tensors]  # n × (N,)
    norms = [norm(v) for v in vectors]

    # 2. weighted Euclidean mean of the unit vectors
    mean = torch.zeros_like(vectors[0])  # (N,)
    for v, n, w in zip(vectors, norms, weights):
        mean.add_(v / (n + eps), alpha=w)
    mean_norm = norm(mean)
    if mean_norm < eps:  # no direction to average around: the weighted linear mean
        result = vectors[0] * weights[0]
        for v, w in zip(vectors[1:], weights[1:]):
            result.add_(v, alpha=w)
    else:
        mean.div_(mean_norm)  # m̂
        # 3. tangent vectors at m̂, weighted (their sum vanishes in exact arithmetic: m̂ is already the
        #    direction of Σ wᵢuᵢ, so this single step stays at m̂ up to rounding, as in mergekit)
        tangent = torch.zeros_like(mean)  # (N,)
        for v, n, w in zip(vectors, norms, weights):
            unit = v / (n + eps)
            tangent.add_(unit.sub_(mean, alpha=dot(unit, mean)), alpha=w)
        length = norm(tangent) + eps
        # 4. exponential map back to the sphere, scaled to the weighted mean norm
        result = mean.mul_(math.cos(length)).add_(tangent, alpha=math.sin(length) / length)
        result.mul_(sum(n * w for n, w in zip(norms, weights)))
    result = result.view(tensors[0].shape)
    return result if base is None else result.add_(base)
