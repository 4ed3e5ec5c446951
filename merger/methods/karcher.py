"""Karcher mean: the Riemannian barycentre of the models' directions on the unit hypersphere, scaled by
their mean norm (Karcher 1977, "Riemannian center of mass and mollifier smoothing",
doi:10.1002/cpa.3160300502; https://en.wikipedia.org/wiki/Karcher_mean)."""

from __future__ import annotations

import math
from typing import Annotated

import torch
from torch import Tensor

from ..ranges import Range
from . import merge_method
from .reductions import dot, norm


@merge_method("karcher", pretty_name="Karcher Mean", reference_url="https://en.wikipedia.org/wiki/Karcher_mean")
def karcher(
    tensors: list[Tensor],
    *,
    max_iter: Annotated[int, Range(int, 1, 10_000, "iterations")] = 10,
    tol: Annotated[float, Range(float, 0.0, 1.0, "the convergence tolerance")] = 1e-5,
) -> Tensor:
    """Equal-weight Karcher mean of the flattened inputs' directions, times their mean norm.

    Steps, every input weighted `αᵢ = 1/N` (a configured base is one more input):
      1. `nᵢ = ‖xᵢ‖`, `uᵢ = xᵢ/nᵢ`; inputs with `nᵢ ≤ tol` are left out and the α renormalised
         (none left: zeros).
      2. `u = normalize(Σ αᵢuᵢ)`, or the first unit vector if that norm is below `tol`.
      3. Up to `max_iter` times: `θᵢ = acos(clamp(u·uᵢ, −1, 1))` (terms with `θᵢ < tol` skipped, and
         those with `θᵢ > π − tol`: the direction towards an antipode is undefined and `θ/sin θ`
         unbounded, so two opposed inputs keep the first one's direction),
         `T = Σ αᵢ(θᵢ/sin θᵢ)(uᵢ − cos θᵢ·u)`; stop if `‖T‖ < tol`; else
         `u ← cos‖T‖·u + sin‖T‖·T/‖T‖`, renormalised.
      4. `out = (Σᵢ nᵢ/N)·u`, over all inputs.
    The unit vectors are never materialised: `uᵢ = xᵢ/nᵢ` enters each sum as a scaled `xᵢ`.

    Args:
        tensors: N float32 tensors `(*shape)`; a single one is returned as is.
        max_iter: iteration limit.
        tol: convergence and zero-norm tolerance.

    Returns:
        float32 `(*shape)`.
    """
    if len(tensors) == 1:
        return tensors[0]
    vectors = [x.reshape(-1) for x in tensors]  # N × (M,), views
    norms = [norm(v) for v in vectors]
    scale = sum(norms) / len(norms)  # Σ αᵢnᵢ with the original α
    valid = [(v, n) for v, n in zip(vectors, norms) if n > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    alpha = 1 / len(valid)

    # 2. initial direction: the normalised Euclidean mean of the unit vectors
    u = torch.zeros_like(valid[0][0])  # (M,)
    for v, n in valid:
        u.add_(v, alpha=alpha / n)
    u_norm = norm(u)
    if u_norm < tol:
        u = valid[0][0] / valid[0][1]
    else:
        u.div_(u_norm)

    # 3. Riemannian gradient steps: T = Σ αᵢ(θᵢ/sin θᵢ)(uᵢ − cos θᵢ·u)
    for _ in range(max_iter):
        tangent = torch.zeros_like(u)
        along_u = 0.0  # Σ αᵢ(θᵢ/sin θᵢ)cos θᵢ, the coefficient of −u
        for v, n in valid:
            cos_theta = min(max(dot(u, v) / n, -1.0), 1.0)
            theta = math.acos(cos_theta)
            if theta < tol or theta > math.pi - tol:
                continue
            coefficient = alpha * theta / math.sin(theta)
            tangent.add_(v, alpha=coefficient / n)
            along_u += coefficient * cos_theta
        tangent.sub_(u, alpha=along_u)
        step = norm(tangent)
        if step < tol:
            break
        u = u.mul_(math.cos(step)).add_(tangent, alpha=math.sin(step) / step)
        u_norm = norm(u)
        if u_norm > tol:
            u.div_(u_norm)

    # 4. back to the inputs' scale
    return u.mul_(scale).view(tensors[0].shape)
