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

Exact counts use a streamed radix select (:class:`TopK`: linear time, ties at the threshold kept
lowest index first), never a full sort. Rescaling is mergekit's L1-norm matching over the whole tensor
(docs/decisions.md), not the papers' per-entry `1/p`, summed in float64. Random masks draw from the
`generator` passed in, so a seeded generator reproduces them.

TIES and DARE also come as prepare passes (:func:`magnitude_trims`, :func:`random_drops`, and
:func:`set_l1_factors` for `rescale`): what needs the whole tensor is decided over its slices first,
then applied slice by slice, so the engine never holds a float32 copy of a whole tensor;
:func:`slices_of` gives a whole tensor's slices.
"""

from __future__ import annotations

import os
import struct
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial

import torch
from torch import Tensor

RESCALE_EPS = 1e-7  # below this L1 norm (before or after masking) no rescale is applied
RADIX = 1 << 16  # the selection reads each 32-bit key as two 16-bit digits
CHUNK = 1 << 20  # entries per slice of a whole tensor (temporaries in cache); the engine's slice size


def ordered_key(scores: Tensor) -> Tensor:
    """int32 keys ordered as the float32 `scores` are, −0.0 and +0.0 equal (NaN is not ordered).

    Args:
        scores: contiguous float32 `(*shape)`.

    Returns:
        int32 `(N,)`.
    """
    bits = scores.reshape(-1).view(torch.int32)
    sign = bits >> 31  # −1 for negative floats, else 0
    # negative floats: reverse the order of their magnitudes, then shift up by one so −0.0 meets +0.0
    return (bits ^ (sign & 0x7FFFFFFF)).sub_(sign)


class TopK:
    """Exact selection of the `k` largest of N scores, streamed over chunks in flat order.

    A two-digit radix select, linear time and O(chunk) memory: :meth:`count_high` counts the high 16
    bits of every score's :func:`ordered_key`, :meth:`count_low` the low 16 bits of the keys in the one
    high digit that holds the k-th largest, which then is known exactly. :meth:`mask` keeps every score
    above it and, of the scores equal to it, as many as `k` still needs **in flat index order, lowest
    first**. That rule makes the selection the same on every device and for any chunking (`torch.topk`
    leaves the choice among ties to its implementation, and CPU and CUDA differ).

    Call :meth:`count_high` on every chunk, then :meth:`count_low` on the same chunks in the same order,
    then :meth:`mask` on them in that order once more.

    Args:
        k: how many to keep; clamped to `[0, N]`.
        density: instead of `k`, keep `int(density·N)` (N is known after :meth:`count_high`).
        nonnegative: the scores are ≥ +0.0 (magnitudes): their bits already are ordered keys.
    """

    def __init__(self, k: int = 0, *, density: float | None = None, nonnegative: bool = False):
        self.k = k
        self.density = density
        self._nonnegative = nonnegative
        self._offset = 0 if nonnegative else RADIX // 2  # makes the high digit a bincount index ≥ 0
        self.numel = 0
        self._counts: Tensor | None = None  # (RADIX,) int64 histogram of the digit being counted
        self._high: int | None = None  # the high digit of the k-th largest key
        self._needed = 0  # how many keys the current digit must still supply
        self._threshold: int | None = None  # the k-th largest key
        self._ties_left = 0  # keys equal to the threshold still to keep

    def _count(self, digits: Tensor) -> None:
        counts = torch.bincount(digits, minlength=RADIX)
        self._counts = counts if self._counts is None else self._counts.add_(counts)

    def _settle_digit(self) -> int:
        """The largest digit whose keys, with every larger digit's, number at least `_needed`."""
        at_least = self._counts.flip(0).cumsum(0).flip(0)  # (RADIX,): keys with this digit or larger
        digit = int(torch.nonzero(at_least >= self._needed)[-1])
        if digit + 1 < RADIX:
            self._needed -= int(at_least[digit + 1])
        self._counts = None
        return digit

    def _key(self, scores: Tensor) -> Tensor:
        return scores.reshape(-1).view(torch.int32) if self._nonnegative else ordered_key(scores)

    def count_high(self, scores: Tensor) -> None:
        """Pass 1: count the high digits of a chunk of float32 scores."""
        key = self._key(scores)
        self.numel += key.numel()
        if self._nonnegative and sys.byteorder == "little":  # the high halves as int16 (< 2¹⁵): no shift
            self._count(key.view(torch.int16)[1::2])
        else:
            self._count((key >> 16).add_(self._offset))

    def count_low(self, scores: Tensor) -> None:
        """Pass 2: count the low digits of the chunk's keys that share the k-th largest's high digit."""
        if self._high is None:
            if self.density is not None:
                self.k = int(self.density * self.numel)
            self.k = min(max(self.k, 0), self.numel)
            self._needed = self.k
            if 0 < self.k < self.numel:
                self._high = self._settle_digit()
            else:
                self._high = -1  # nothing or everything: no threshold to find
        if 0 < self.k < self.numel:
            # low digit + 1 for keys in the high digit's range; 0 below it, RADIX + 1 above (dropped)
            start = (self._high - self._offset) << 16
            low = self._key(scores).clamp(start - 1, start + RADIX).sub_(start - 1)
            counts = torch.bincount(low, minlength=RADIX + 2)[1:RADIX + 1]
            self._counts = counts if self._counts is None else self._counts.add_(counts)

    def keep(self, scores: Tensor) -> Tensor:
        """Pass 3: the chunk's kept scores as float32 1.0 (kept) / 0.0, `(*shape)` of `scores`.

        Float, not bool: comparisons writing bool, and products with bool masks, are several times
        slower here than the same work in float32.
        """
        if self._threshold is None:
            if self._high is None:
                self.count_low(scores[:0])  # settles k for a selection without pass 2 (k = 0 or N)
            if 0 < self.k < self.numel:
                low = self._settle_digit()
                self._threshold = ((self._high - self._offset) << 16) | low
                self._ties_left = self._needed
            else:
                self._threshold = 0
        if not 0 < self.k < self.numel:
            return torch.full(scores.shape, float(self.k > 0), device=scores.device)
        if self._nonnegative:  # compare the floats themselves: their order is their keys'
            values, threshold = scores.reshape(-1), struct.unpack("<f", struct.pack("<i", self._threshold))[0]
        else:
            values, threshold = ordered_key(scores), self._threshold
        kept = torch.gt(values, threshold, out=torch.empty(values.shape, device=scores.device))
        for start in range(0, values.numel(), CHUNK):
            if self._ties_left == 0:
                break
            part = values[start:start + CHUNK]
            ties = torch.eq(part, threshold, out=torch.empty(part.shape, device=scores.device))
            count = int(ties.sum())
            if count > self._ties_left:  # the cut: keep only the first ties
                ties[torch.nonzero(ties > 0).reshape(-1)[self._ties_left:]] = 0.0
                count = self._ties_left
            kept[start:start + CHUNK].add_(ties)
            self._ties_left -= count
        return kept.view(scores.shape)

    def rewind(self) -> None:
        """Start pass 3 over again (from the first chunk)."""
        if self._threshold is not None and 0 < self.k < self.numel:
            self._ties_left = self._needed

    def mask(self, scores: Tensor) -> Tensor:
        """Pass 3 as a bool mask, `(*shape)` of `scores` (see :meth:`keep`)."""
        return self.keep(scores) > 0


def top_k_mask(scores: Tensor, k: int, *, nonnegative: bool = False) -> Tensor:
    """Mask of exactly the `k` largest entries of `scores`; ties kept lowest index first (:class:`TopK`).

    Args:
        scores: float32 `(*shape)`, N entries.
        k: how many to keep; clamped to `[0, N]`.
        nonnegative: the scores are magnitudes (≥ +0.0), which selects a little faster.

    Returns:
        bool `(*shape)` with exactly `k` True entries.
    """
    chunks = scores.contiguous().reshape(-1).split(CHUNK)  # cache-sized temporaries
    selection = TopK(k, nonnegative=nonnegative)
    for chunk in chunks:
        selection.count_high(chunk)
    for chunk in chunks:
        selection.count_low(chunk)
    return torch.cat([selection.mask(chunk) for chunk in chunks]).view(scores.shape)


_helpers: ThreadPoolExecutor | None = None


@contextmanager
def single_threaded_math() -> Iterator[None]:
    """Torch's intra-op threads set to one in this thread for the block (helpers always run with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run_concurrently(calls: Sequence[Callable[[], object]]) -> None:
    """Run `calls` at once, the first on this thread, the others on helper threads (torch releases the
    GIL inside its kernels); returns when all are done, raising the first error."""
    global _helpers
    if len(calls) > 1 and _helpers is None:
        _helpers = ThreadPoolExecutor(max_workers=max(1, (os.cpu_count() or 2) - 1),
                                      thread_name_prefix="merger-math", initializer=torch.set_num_threads,
                                      initargs=(1,))
    futures = [_helpers.submit(call) for call in calls[1:]]
    try:
        calls[0]()
    finally:
        for future in futures:
            future.result()


def slices_of(tensors: Sequence[Tensor], base: Tensor) -> Iterator[tuple[list[Tensor], Tensor]]:
    """Consecutive `(tensors, base)` slices of the flattened whole tensors, `CHUNK` entries each (views)."""
    flat = [t.reshape(-1) for t in tensors]
    flat_base = base.reshape(-1)
    for start in range(0, flat_base.numel(), CHUNK):
        yield [t[start:start + CHUNK] for t in flat], flat_base[start:start + CHUNK]


class MagnitudeTrim:
    """TIES "trim" of one task vector, decided over the whole tensor (:class:`TopK` of `|δ|`) and
    applied to its slices in flat order.

    Attributes:
        factor: the L1 rescale factor (:func:`set_l1_factors`), or None not to rescale.
    """

    def __init__(self, selection: TopK):
        self.selection = selection
        self.factor: float | None = None

    def apply_(self, delta: Tensor) -> Tensor:
        """Zero (and rescale) the next slice's trimmed entries in place; returns `delta` (float32, any shape)."""
        delta.mul_(self.selection.keep(delta.abs()))
        return delta if self.factor is None else delta.mul_(self.factor)

    def rewind(self) -> None:
        """Apply from the first slice again."""
        self.selection.rewind()


class RandomDrop:
    """DARE "drop" of one task vector: its :func:`bernoulli_mask` for the whole tensor, applied to its
    slices in flat order.

    Args:
        mask: bool `(N,)`, the kept entries.

    Attributes:
        factor: the L1 rescale factor (:func:`set_l1_factors`), or None not to rescale.
    """

    def __init__(self, mask: Tensor):
        self.mask = mask
        self.factor: float | None = None
        self._offset = 0

    def apply_(self, delta: Tensor) -> Tensor:
        """Drop (and rescale) the next slice's entries in place; returns `delta` (float32, any shape)."""
        n = delta.numel()
        delta.mul_(self.mask[self._offset:self._offset + n].view(torch.uint8).view(delta.shape))  # bool: slow
        self._offset += n
        return delta if self.factor is None else delta.mul_(self.factor)

    def rewind(self) -> None:
        """Apply from the first slice again."""
        self._offset = 0


Slices = Callable[[], Iterable[tuple[Sequence[Tensor], Tensor]]]


def magnitude_trims(slices: Slices, densities: Sequence[float]) -> list[MagnitudeTrim | None]:
    """TIES "trim" as a prepare pass: per model, the :class:`TopK` of `|xᵢ − base|` keeping
    `int(densityᵢ·N)`, counted over the slices (two passes; the inputs are not modified).

    Args:
        slices: returns a fresh iterator over `(tensors, base)` float32 slices, in flat order.
        densities: one per model.

    Returns:
        One trim per model, None where `density ≥ 1` (keep everything); apply them to the same slices'
        task vectors in order.
    """
    selections = [None if density >= 1 else TopK(density=density, nonnegative=True) for density in densities]
    active = [(i, selection) for i, selection in enumerate(selections) if selection is not None]
    if not active:
        return [None] * len(selections)
    scratch: list[Tensor] = []  # |δᵢ| of one slice per model, reused
    # counting is single-threaded: the models are counted on threads of their own, each running its
    # elementwise ops single-threaded too (idle OpenMP workers would spin on the cores they need)
    with single_threaded_math():
        for count in (TopK.count_high, TopK.count_low):
            for tensors, base in slices():
                if not scratch or scratch[0].numel() < base.numel():
                    scratch = [torch.empty_like(base) for _ in active]
                run_concurrently([
                    partial(lambda selection, x, b, out: count(selection, torch.sub(x, b, out=out).abs_()),
                            selection, tensors[i], base, buffer[:base.numel()])
                    for (i, selection), buffer in zip(active, scratch)
                ])
    return [None if selection is None else MagnitudeTrim(selection) for selection in selections]


def random_drops(numel: int, densities: Sequence[float], generator: torch.Generator) -> list[RandomDrop | None]:
    """DARE "drop" as a prepare step: per model, the :func:`bernoulli_mask` over all `numel` entries,
    drawn model by model from `generator`.

    Args:
        numel: entries of the whole tensor.
        densities: keep probabilities, one per model (≤ 0 keeps nothing).
        generator: the seeded RNG, on the slices' device.

    Returns:
        One drop per model, None where `density ≥ 1`.
    """
    return [None if density >= 1 else RandomDrop(_uniform_below(numel, density, generator)) for density in densities]


def set_l1_factors(slices: Slices, steps: Sequence[MagnitudeTrim | RandomDrop | None]) -> None:
    """`rescale` for prepared sparsifiers: set each step's factor `Σ|δᵢ| / Σ|δᵢ ⊙ maskᵢ|`, summed over
    the slices in float64 (None where either sum is below 1e-7, as :func:`apply_mask_`), and rewind it.

    Args:
        slices: returns a fresh iterator over `(tensors, base)` float32 slices, in flat order.
        steps: one per model, from :func:`magnitude_trims` or :func:`random_drops`; None keeps everything.
    """
    active = [(i, step) for i, step in enumerate(steps) if step is not None]
    before, after = [0.0] * len(active), [0.0] * len(active)
    if active:
        for tensors, base in slices():
            for j, (i, step) in enumerate(active):
                magnitude = torch.sub(tensors[i], base).abs_()
                before[j] += float(torch.sum(magnitude, dtype=torch.float64))
                after[j] += float(torch.sum(step.apply_(magnitude), dtype=torch.float64))
    for (_, step), b, a in zip(active, before, after):
        step.factor = b / a if b >= RESCALE_EPS and a >= RESCALE_EPS else None
        step.rewind()


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
    return top_k_mask(delta.abs(), int(density * delta.numel()), nonnegative=True)


def bernoulli_mask(delta: Tensor, *, density: float, generator: torch.Generator) -> Tensor | None:
    """DARE "drop": keep each entry independently with probability `density` (≤ 0 keeps nothing).

    Entry j is kept when `u_j < density`, `u` being `generator`'s float32 uniform stream in flat order,
    drawn `CHUNK` entries at a time (on CPU the stream does not depend on that; on CUDA it does, so
    the chunk is fixed). Three times faster than `bernoulli_` here, with no whole-tensor temporary.

    Args:
        delta: float32 task vector `(*shape)` (only its shape and device are used).
        density: keep probability.
        generator: seeded RNG on `delta`'s device.

    Returns:
        bool `(*shape)`, or None when `density ≥ 1`.
    """
    if density >= 1:
        return None
    return _uniform_below(delta.numel(), density, generator).view(delta.shape)


def _uniform_below(numel: int, density: float, generator: torch.Generator) -> Tensor:
    """bool `(numel,)`: `u_j < density` for the generator's next `numel` uniforms, drawn by `CHUNK`."""
    mask = torch.empty(numel, dtype=torch.bool, device=generator.device)
    for piece in mask.split(CHUNK):
        torch.lt(torch.rand(piece.numel(), generator=generator, device=generator.device), density, out=piece)
    return mask


def breadcrumbs_mask(delta: Tensor, *, density: float, gamma: float) -> Tensor | None:
    """Model Breadcrumbs: drop the largest `|δ|` as outliers and the smallest, keep `int(density·N)`.

    With `keep = int(density·N)`, `n_top = int(gamma·N)` and `n_bottom = N − keep − n_top` (when negative,
    `n_top` shrinks by that much and `n_bottom = 0`), the kept entries are ranks `[n_bottom, N − n_top)`
    of `|δ|` in ascending order. `n_top = 0` keeps through the end (docs/decisions.md; mergekit's slice
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


def della_bounds_problem(density: float, epsilon: float) -> str | None:
    """Why DELLA cannot use `density ± epsilon` as keep probabilities, or None when it can.

    A density of 1 or more keeps everything and of 0 or less nothing, so epsilon is unused there.
    """
    if density >= 1 or density <= 0 or (density - epsilon > 0 and density + epsilon < 1):
        return None
    return (f"DELLA needs `density - epsilon > 0` and `density + epsilon < 1`, got density={density:g}, "
            f"epsilon={epsilon:g}; lower `epsilon` (or move `density` away from 0 and 1)")


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
    problem = della_bounds_problem(density, epsilon)
    if problem:
        raise ValueError(problem)
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


def l1_norm(tensor: Tensor) -> float:
    """`Σ|x|` accumulated in float64, `CHUNK` entries at a time.

    A float32 norm is not good enough here: over a 65M-entry embedding it is off by 6% with two
    threads and 28% with one (the running sum outgrows the addends' precision), so the rescale factor
    would depend on the machine.

    Args:
        tensor: float32 `(*shape)`.

    Returns:
        The L1 norm as a Python float.
    """
    return sum(float(torch.sum(piece.abs(), dtype=torch.float64)) for piece in tensor.reshape(-1).split(CHUNK))


def apply_mask_(delta: Tensor, mask: Tensor | None, *, rescale: bool) -> Tensor:
    """Zero the entries outside `mask`, in place; with `rescale`, restore the L1 norm.

    Rescaling multiplies by `Σ|δ| / Σ|δ ⊙ mask|` (mergekit's L1 matching over the whole tensor; equal to
    the papers' `1/density` only in expectation; the sums in float64, :func:`l1_norm`), and is skipped
    when either sum is below 1e-7.

    Args:
        delta: float32 task vector `(*shape)`; modified in place.
        mask: bool `(*shape)`, or None to keep everything (then `delta` is returned as is).
        rescale: match the L1 norm of the unmasked `delta`.

    Returns:
        `delta`, float32 `(*shape)`.
    """
    if mask is None:
        return delta
    before = l1_norm(delta) if rescale else None
    delta.mul_(mask.view(torch.uint8) if mask.dtype == torch.bool else mask)  # × 0/1: a bool operand is slow
    if before is not None:
        after = l1_norm(delta)
        if before >= RESCALE_EPS and after >= RESCALE_EPS:
            delta.mul_(before / after)
    return delta


def elect_sign(deltas: Sequence[Tensor]) -> Tensor:
    """TIES "elect": the sign of the summed task vectors, `s = +1` where `Σᵢ δᵢ ≥ 0`, else −1.

    Float arithmetic throughout (here, comparisons producing bool tensors are several times slower).

    Args:
        deltas: n float32 `(*shape)` task vectors (weighted for the GTA family, unweighted for SCE).

    Returns:
        float32 `(*shape)` of +1.0 and −1.0.
    """
    total = torch.add(deltas[0], deltas[1]) if len(deltas) > 1 else deltas[0].clone()  # (*shape)
    for delta in deltas[2:]:
        total.add_(delta)
    return total.sign_().add_(0.5).sign_()  # sign, with 0 (either zero) → +1


def agrees_with(delta: Tensor, sign: Tensor) -> Tensor:
    """TIES "disjoint" membership `mᵢ = [sign(δ) = s]`; zeros agree with neither sign.

    Args:
        delta: float32 task vector `(*shape)`.
        sign: float32 `(*shape)` of ±1 from :func:`elect_sign`.

    Returns:
        float32 `(*shape)` of 1.0 (agrees) and +0.0, so multiplying by it equals masking with a bool.
    """
    return torch.gt(delta * sign, 0, out=torch.empty_like(delta))  # δ·s > 0, written as 1.0 / +0.0
