"""Arcee Fusion: keep the base except where the other model's change is important, by a dynamic
threshold on `|Δ| ⊙ KL` (Arcee AI, "Meet MergeKit v0.1: Arcee Fusion, expanded model support,
multi-GPU acceleration", the blog post linked as `reference_url`)."""

from __future__ import annotations

import torch
from torch import Tensor

from merger.methods.registry import merge_method

SOFTMAX_EPS = 1e-8  # added to both distributions before the KL divergence
QUANTILE_SAMPLE = 1_000_000  # larger tensors estimate the quartiles from this many random entries


@merge_method(
    "arcee_fusion",
    pretty_name="Arcee Fusion",
    reference_url=(
        "https://www.arcee.ai/blog/meet-mergekit-v0-1-arcee-fusion-expanded-model-support-multi-gpu-acceleration"
    ),
    min_others=1,
    max_others=1,
)
def arcee_fusion(tensors: list[Tensor], base: Tensor, *, generator: torch.Generator) -> Tensor:
    """`out = a + (b − a) ⊙ [I ≥ thr]`: the base `a`, with the other model's most important changes.

    Steps:
      1. Importance `I = |b − a| ⊙ KL_row`, `KL_row = Σ_last p·log(p/q)` with `p = softmax(b) + 1e-8`,
         `q = softmax(a) + 1e-8` over the last axis (one scalar for a 0-/1-D tensor), broadcast along rows.
      2. Quartiles of `I`, from a uniform sample (with replacement, drawn with `generator`) of 1,000,000
         entries when larger: quantile `q` = entry `floor(q·(n − 1))` of the sorted values.
      3. `thr = median + 1.5·(Q3 − Q1)`; fuse where `I ≥ thr`.

    Args:
        tensors: one float32 tensor `(*shape)`, the other model `b`.
        base: float32 `(*shape)`, the base `a`.
        generator: seeded RNG on the tensors' device, for the quartile sample.

    Returns:
        float32 `(*shape)`.
    """
    (b,) = tensors
    a = base
    shape = a.shape
    if a.dim() == 0:
        a, b = a.reshape(1), b.reshape(1)

    # 1. importance: |b − a| scaled by each row's KL divergence between the softmaxes
    # in float64, rounded once: torch's vector exp, log and sums round the last bits by the CPU's vector
    # width and thread count, which float32 KLs kept (other bytes on an AVX2 and an AVX-512 machine)
    p = torch.softmax(b.double(), dim=-1).add_(SOFTMAX_EPS)  # (*shape) float64
    q = torch.softmax(a.double(), dim=-1).add_(SOFTMAX_EPS)
    kl = torch.div(p, q, out=q).log_().mul_(p).sum(dim=-1, keepdim=True).float()  # (*shape[:-1], 1)
    del p, q
    delta = b - a  # (*shape)
    importance = delta.abs().mul_(kl)

    # 2–3. dynamic threshold from the quartiles
    flat = importance.reshape(-1)
    if flat.numel() > QUANTILE_SAMPLE:
        flat = flat[torch.randint(flat.numel(), (QUANTILE_SAMPLE,), generator=generator, device=flat.device)]
    ordered = flat.sort().values
    q1, median, q3 = (ordered[int(f * (ordered.numel() - 1))] for f in (0.25, 0.5, 0.75))  # 0-dim float32
    del flat, ordered
    fuse = importance >= median + 1.5 * (q3 - q1)
    del importance
    return delta.mul_(fuse).add_(a).view(shape)
