"""Model Stock: interpolate between the base and the average of fine-tunes by their angle (Jang et al.
2024, "Model Stock: All we need is just a few fine-tuned models", arXiv:2403.19522)."""

from __future__ import annotations

import torch
from torch import Tensor

from . import merge_method

NORM_PRODUCT_EPS = 1e-6  # floor of ‖oᵢ‖·‖oⱼ‖ in the cosine
T_BOUND = 1.0  # |t| ≤ 1: the output is never farther from the base than the fine-tunes' mean is


@merge_method(
    "model_stock",
    pretty_name="Model Stock",
    reference_url="https://arxiv.org/abs/2403.19522",
    min_others=2,
)
def model_stock(tensors: list[Tensor], base: Tensor, *, filter_wise: bool = False) -> Tensor:
    """`out = t·mean(wᵢ) + (1 − t)·w₀` with `t = N·cos θ / (1 + (N − 1)·cos θ)`.

    Paper steps (N fine-tuned models around the pre-trained `w₀`):
      1. Offsets `oᵢ = wᵢ − w₀`.
      2. `cos θ` = mean over pairs `i < j` of `oᵢ·oⱼ / max(‖oᵢ‖‖oⱼ‖, 1e-6)`, each clamped to [−1, 1]
         (the paper assumes one angle; mergekit averages the pairwise ones).
      3. `t = N·cos θ / (1 + (N − 1)·cos θ)`; `out = t·mean(wᵢ) + (1 − t)·w₀`.
    Vectors are whole tensors, or each row (last axis) with `filter_wise`; a 0-/1-D tensor is one vector.

    Degenerate cases (docs/decisions.md, "model_stock near opposed task vectors"):
      - `t` is clamped to [−1, 1], so `‖out − w₀‖ ≤ ‖mean(wᵢ) − w₀‖`. The formula's `t` rises from −∞ at
        `cos θ = −1/(N − 1)` (opposed task vectors: the denominator is 0; mergekit writes NaN or inf) to
        1 at `cos θ = 1`; the clamp only acts below `cos θ = −1/(2N − 1)`, where the fine-tunes mostly
        cancel and the unclamped `t` would blow their small residual mean up. Where the denominator is
        ≤ 0 (at the pole, or past it by rounding) `t = −1`. Exactly opposed offsets have
        `mean(wᵢ) = w₀`, so the output is then the base.
      - an offset of norm 0 (a model equal to the base) has cosine 0 with every other: all equal to the
        base gives `t = 0`, the base itself.

    Args:
        tensors: N ≥ 2 float32 tensors `(*shape)`, the fine-tuned models.
        base: float32 `(*shape)`, the pre-trained model `w₀`.
        filter_wise: one `t` per row instead of one per tensor.

    Returns:
        float32 `(*shape)`.
    """

    def rows(x: Tensor) -> Tensor:
        return x.reshape(-1, x.shape[-1]) if filter_wise and x.dim() >= 2 else x.reshape(1, -1)  # (R, C)

    w0 = rows(base)
    offsets = [rows(w) - w0 for w in tensors]  # N × (R, C)
    norms = [torch.linalg.vector_norm(o, dim=-1) for o in offsets]  # N × (R,)
    cosines = [
        (torch.linalg.vecdot(offsets[i], offsets[j], dim=-1) / (norms[i] * norms[j]).clamp(min=NORM_PRODUCT_EPS))
        .clamp(-1, 1)
        for i in range(len(offsets))
        for j in range(i + 1, len(offsets))
    ]
    del offsets
    cos_theta = torch.stack(cosines).mean(dim=0).unsqueeze(-1)  # (R, 1)
    n = len(tensors)
    denominator = 1 + (n - 1) * cos_theta  # (R, 1); 0 where the offsets are opposed
    t = torch.where(denominator > 0, n * cos_theta / denominator, -T_BOUND).clamp_(-T_BOUND, T_BOUND)  # (R, 1)

    average = tensors[0].clone()
    for w in tensors[1:]:
        average.add_(w)
    average = rows(average.div_(n))  # (R, C)
    return average.mul_(t).add_(w0 * (1 - t)).view(base.shape)
