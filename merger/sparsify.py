"""Sparsifying task vectors and electing signs: the shared parts of the task-arithmetic family and SCE.

A task vector is `δ = x − base` of one tensor, float32 `(*shape)`. Each `*_mask` function returns the
bool mask of the entries it keeps (one byte per element, whatever `int8_mask` says), or None when
`density ≥ 1` (keep everything); :func:`apply_mask_` zeroes the rest and optionally rescales.

- magnitude (TIES, Yadav et al. 2023, arXiv:2306.01708): keep the `int(density·N)` largest `|δ|`.
- bernoulli (DARE, Yu et al. 2023, arXiv:2311.03099): keep each entry with probability `density`.
- breadcrumbs (Davari & Belilovsky 2023, arXiv:2312.06795): drop the `int(gamma·N)` largest `|δ|` as
  outliers, keep the next `int(density·N)`.
- della (Deep et al. 2024, arXiv:2406.11617): keep each entry with a probability that grows linearly
  with its magnitude rank in its row, from `density − ε` to `density + ε`.

Exact counts use `torch.topk` (linear time, index memory at most N/2), never a full sort. Rescaling is
mergekit's L1-norm matching over the whole tensor (spec decision 10), not the papers' per-entry `1/p`.
Random masks draw from the `generator` passed in, so a seeded generator reproduces them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

RESCALE_EPS = 1e-7  # below this L1 norm (before or after masking) no rescale is applied


def top_k_mask(scores: Tensor, k: int) -> Tensor:
    """Mask of exactly the `k` largest entries of `scores` (ties broken by `torch.topk`).

    Selects whichever side is smaller, the `k` largest to keep or the `N − k` smallest to drop, so the
    index tensor holds at most `N/2` entries.

    Args:
        scores: float32 `(*shape)`, N entries.
        k: how many to keep; clamped to `[0, N]`.

    Returns:
        bool `(*shape)` with exactly `k` True entries.
    """
    flat = scores.reshape(-1)  # (N,)
    n = flat.numel()
    k = min(max(k, 0), n)
    if k <= n - k:
        mask = torch.zeros(n, dtype=torch.bool, device=scores.device)
        mask[flat.topk(k, sorted=False).indices] = True
    else:
        mask = torch.ones(n, dtype=torch.bool, device=scores.device)
        mask[flat.topk(n - k, largest=False, sorted=False).indices] = False
    return mask.view(scores.shape)


def magnitude_mask(delta: Tensor, *, density: float) -> Tensor | None:
    """TIES "trim": keep the `k = int(density·N)` entries of largest `|δ|`.

    mergekit asserts `k > 0`; here `k = 0` (a tiny tensor or density) keeps nothing, as its `build_mask` does.

    Args:
        delta: float32 task vector `(*shape)`.
        density: fraction to keep.

    Returns:
        bool `(*shape)` with exactly `k` True entries, or None when `density ≥ 1`.
    """
    if density >= 1:
        return None
    return top_k_mask(delta.abs(), int(density * delta.numel()))


def bernoulli_mask(delta: Tensor, *, density: float, generator: torch.Generator) -> Tensor | None:
    """DARE "drop": keep each entry independently with probability `density` (≤ 0 keeps nothing).

    Args:
        delta: float32 task vector `(*shape)` (only its shape and device are used).
        density: keep probability.
        generator: seeded RNG on `delta`'s device.

    Returns:
        bool `(*shape)`, or None when `density ≥ 1`.
    """
    if density >= 1:
        return None
    mask = torch.empty(delta.shape, dtype=torch.bool, device=delta.device)
    return mask.bernoulli_(max(density, 0.0), generator=generator)


def breadcrumbs_mask(delta: Tensor, *, density: float, gamma: float) -> Tensor | None:
    """Model Breadcrumbs: drop the largest `|δ|` as outliers and the smallest, keep `int(density·N)`.

    With `keep = int(density·N)`, `n_top = int(gamma·N)` and `n_bottom = N − keep − n_top` (when negative,
    `n_top` shrinks by that much and `n_bottom = 0`), the kept entries are ranks `[n_bottom, N − n_top)`
    of `|δ|` in ascending order. `n_top = 0` keeps through the end (spec decision 7; mergekit's slice
    `[n_bottom:-0]` is empty there and zeroes the whole task vector).

    Args:
        delta: float32 task vector `(*shape)`.
        density: fraction to keep.
        gamma: fraction of largest magnitudes to drop (the paper's β).

    Returns:
        bool `(*shape)` with exactly `keep` True entries, or None when `density ≥ 1`.
    """
    if density >= 1:
        return None
    n = delta.numel()
    keep = int(density * n)
    n_top = int(gamma * n)
    n_bottom = n - keep - n_top
    if n_bottom < 0:  # too few left for the density: drop fewer outliers
        n_top += n_bottom
    magnitudes = delta.abs()  # (*shape), ours to modify
    if n_top > 0:
        # rank the outliers below every magnitude (≥ 0), then keep the `keep` largest of the rest
        flat = magnitudes.view(-1)
        flat[flat.topk(n_top, sorted=False).indices] = -1.0
    return top_k_mask(magnitudes, keep)


def della_mask(delta: Tensor, *, density: float, epsilon: float, generator: torch.Generator) -> Tensor | None:
    """DELLA MagPrune: keep entries with probabilities linear in their magnitude rank within each row.

    Rows run along dim 1 (a matrix's rows; a 0-/1-D tensor is one row), as in mergekit. In a row of `n`
    entries, the entry of ascending rank `r ∈ [0, n)` is kept with probability
    `pᵣ = (density − ε) + r/(n − 1)·2ε`. A one-entry row, where the rank is undefined (mergekit divides
    0/0 and fails), gets `p = density`.

    Args:
        delta: float32 task vector `(*shape)`.
        density: mean keep probability; ≤ 0 keeps nothing.
        epsilon: half-width of the probability range.
        generator: seeded RNG on `delta`'s device.

    Returns:
        bool `(*shape)`, or None when `density ≥ 1`.

    Raises:
        ValueError: `density ± epsilon` not inside `(0, 1)`.
    """
    if density >= 1:
        return None
    if density <= 0:
        return torch.zeros(delta.shape, dtype=torch.bool, device=delta.device)
    if density - epsilon <= 0 or density + epsilon >= 1:
        raise ValueError(
            f"DELLA needs `density - epsilon > 0` and `density + epsilon < 1`, got density={density}, "
            f"epsilon={epsilon}; lower `epsilon`"
        )
    rows = delta if delta.dim() >= 2 else delta.reshape(1, -1)  # (R, n, ...)
    n = rows.shape[1]
    # probability of each ascending rank: (n,), shaped to broadcast along dim 1
    if n == 1:
        ladder = torch.full((1,), density, device=delta.device)
    else:
        ladder = (density - epsilon) + torch.arange(n, dtype=torch.float32, device=delta.device) / (n - 1) * 2 * epsilon
    ladder = ladder.view(1, n, *([1] * (rows.dim() - 2)))
    order = rows.abs().argsort(dim=1, stable=True)  # (R, n, ...): position of each ascending rank
    probs = torch.empty(rows.shape, dtype=torch.float32, device=delta.device)
    probs.scatter_(1, order, ladder.expand_as(order))  # probs[position] = ladder[rank]
    del order
    mask = torch.empty(rows.shape, dtype=torch.bool, device=delta.device)
    return mask.bernoulli_(probs, generator=generator).view(delta.shape)


def apply_mask_(delta: Tensor, mask: Tensor | None, *, rescale: bool) -> Tensor:
    """Zero the entries outside `mask`, in place; with `rescale`, restore the L1 norm.

    Rescaling multiplies by `Σ|δ| / Σ|δ ⊙ mask|` (mergekit's L1 matching over the whole tensor; equal to
    the papers' `1/density` only in expectation), and is skipped when either sum is below 1e-7.

    Args:
        delta: float32 task vector `(*shape)`; modified in place.
        mask: bool `(*shape)`, or None to keep everything (then `delta` is returned as is).
        rescale: match the L1 norm of the unmasked `delta`.

    Returns:
        `delta`, float32 `(*shape)`.
    """
    if mask is None:
        return delta
    before = torch.linalg.vector_norm(delta, 1) if rescale else None
    delta.mul_(mask)
    if before is not None:
        after = torch.linalg.vector_norm(delta, 1)
        if before >= RESCALE_EPS and after >= RESCALE_EPS:
            delta.mul_(before / after)
    return delta


def elect_sign(deltas: Sequence[Tensor]) -> Tensor:
    """TIES "elect": the sign of the summed task vectors, `s = +1` where `Σᵢ δᵢ ≥ 0`, else −1.

    Args:
        deltas: n float32 `(*shape)` task vectors (weighted for the GTA family, unweighted for SCE).

    Returns:
        bool `(*shape)`, True where `s = +1`.
    """
    total = deltas[0].clone()  # (*shape)
    for delta in deltas[1:]:
        total.add_(delta)
    return total >= 0


def agrees_with(delta: Tensor, positive: Tensor) -> Tensor:
    """TIES "disjoint" membership: `sign(δ) == s`; zeros agree with neither sign.

    Args:
        delta: float32 task vector `(*shape)`.
        positive: bool `(*shape)` from :func:`elect_sign`.

    Returns:
        bool `(*shape)`.
    """
    return torch.where(positive, delta > 0, delta < 0)
