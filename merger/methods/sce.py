"""SCE (Select, Calculate, Erase): variance-selected, energy-weighted, sign-agreeing task vectors
(Wan et al. 2024, "FuseChat: Knowledge Fusion of Chat Models", arXiv:2408.07990)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..sparsify import agrees_with, elect_sign, top_k_mask
from . import Fraction, merge_method
from .reductions import squared_norm

UNIFORM_BELOW = 1e-6  # total task-vector energy below which every model weighs the same
DIVISOR_MIN = 1e-6  # floor of the per-entry weight sum


@merge_method("sce", pretty_name="SCE", reference_url="https://arxiv.org/abs/2408.07990")
def sce(tensors: list[Tensor], base: Tensor, *, select_topk: Fraction = 1.0, int8_mask: bool = False) -> Tensor:
    """`base + Σᵢ τᵢ·ωᵢ·mᵢ / max(Σᵢ ωᵢ·mᵢ, 1e-6)` over the task vectors `τᵢ = xᵢ − base`.

    Paper steps:
      1. Select: if `select_topk < 1`, keep in every `τᵢ` only the `k = int(count_nonzero(v)·select_topk)`
         entries of highest variance `v = Varᵢ(τᵢ)` (population variance across models; `k = 0` keeps none).
      2. Calculate: `ωᵢ = mean(τᵢ²)`, normalised to sum to 1 (uniform when the sum is below 1e-6).
      3. Erase: `mᵢ = [sign(τᵢ) = s]`, `s = sign(Σᵢ τᵢ)`: the TIES election on unweighted task vectors.

    Args:
        tensors: n float32 tensors `(*shape)`, the non-base models.
        base: float32 `(*shape)`.
        select_topk: fraction of entries kept by variance (1: all).
        int8_mask: accepted for mergekit configs; masks here are always one-byte bool, so it changes nothing.

    Returns:
        float32 `(*shape)`.
    """
    task_vectors = [x - base for x in tensors]  # n × (*shape)
    n = len(task_vectors)

    # 1. Select the highest-variance entries
    if select_topk < 1:
        mean = task_vectors[0].clone()
        for tau in task_vectors[1:]:
            mean.add_(tau)
        mean.div_(n)
        variance = torch.zeros_like(base)  # (*shape)
        for tau in task_vectors:
            variance.add_((tau - mean).square_())
        variance.div_(n)
        del mean
        keep = top_k_mask(variance, int(int(torch.count_nonzero(variance)) * select_topk))
        del variance
        for tau in task_vectors:
            tau.mul_(keep)

    # 2. Calculate the matrix-level coefficients ωᵢ = mean(τᵢ²)
    energies = [squared_norm(tau) / tau.numel() for tau in task_vectors]
    total = sum(energies)
    omegas = [1 / n] * n if total < UNIFORM_BELOW else [e / total for e in energies]

    # 3. Erase the entries that disagree with the elected sign, then the weighted disjoint mean
    sign = elect_sign(task_vectors)  # (*shape) ±1.0
    merged = torch.zeros_like(base)
    divisor = torch.zeros_like(base)
    for omega in omegas:
        tau = task_vectors.pop(0)  # freed after use
        agree = agrees_with(tau, sign)  # (*shape) 1.0/0.0
        merged.add_(tau.mul_(agree), alpha=omega)
        divisor.add_(agree, alpha=omega)
    return merged.div_(divisor.clamp_(min=DIVISOR_MIN)).add_(base)
