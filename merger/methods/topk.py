"""Exact top-k selection by a streamed radix select: linear time, no sort, ties kept lowest index first.

Scores are read as 32-bit keys ordered as the floats are (:func:`ordered_key`), in two 16-bit digits:
one pass counts the high digits, one the low digits within the threshold's high digit, a last one
keeps what is above the threshold (and the first ties at it). Each pass reads the scores slice by
slice, so a whole tensor's selection never needs a float32 copy of it.
"""

from __future__ import annotations

import math
import struct
import sys

import torch
from torch import Tensor

from merger.methods.registry import SLICE

RADIX = 1 << 16  # the selection reads each 32-bit key as two 16-bit digits


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
        if self._nonnegative and sys.byteorder == "little":  # the high halves as int16 (< 2¹⁵): no shift
            self.add_counts(torch.bincount(key.view(torch.int16)[1::2], minlength=RADIX), key.numel())
        else:
            self.add_counts(torch.bincount((key >> 16).add_(self._offset), minlength=RADIX), key.numel())

    def count_low(self, scores: Tensor) -> None:
        """Pass 2: count the low digits of the chunk's keys that share the k-th largest's high digit."""
        start = self.window_start()
        if start is not None:
            # low digit + 1 for keys in the high digit's range; 0 below it, RADIX + 1 above (dropped)
            low = self._key(scores).clamp(start - 1, start + RADIX).sub_(start - 1)
            self.add_counts(torch.bincount(low, minlength=RADIX + 2)[1:RADIX + 1])

    def add_counts(self, counts: Tensor, numel: int = 0) -> None:
        """Add a histogram counted elsewhere (the native kernels) to the pass under way; the first of a
        pass is kept and added to, so it must not be used after.

        Args:
            counts: int64 `(RADIX,)`: pass 1, the high digits (offset as :meth:`count_high` does) of
                `numel` scores; pass 2, the low digits of the keys in :meth:`window_start`'s window.
            numel: the scores counted (pass 1; 0 in pass 2).
        """
        self.numel += numel
        self._counts = counts if self._counts is None else self._counts.add_(counts)  # the first is kept

    def window_start(self) -> int | None:
        """The first key of pass 2's window, `[start, start + 2¹⁶)`: the keys that share the k-th largest's
        high digit; None when there is no threshold to find (k = 0 or N). Ends pass 1 at its first call."""
        if self._high is None:
            if self.density is not None:
                self.k = int(self.density * self.numel)
            self.k = min(max(self.k, 0), self.numel)
            self._needed = self.k
            if 0 < self.k < self.numel:
                self._high = self._settle_digit()
            else:
                self._high = -1  # nothing or everything: no threshold to find
        return (self._high - self._offset) << 16 if 0 < self.k < self.numel else None

    def keep(self, scores: Tensor) -> Tensor:
        """Pass 3: the chunk's kept scores as float32 1.0 (kept) / 0.0, `(*shape)` of `scores`.

        Float, not bool: comparisons writing bool, and products with bool masks, are several times
        slower here than the same work in float32.
        """
        self._settle_threshold()
        if not 0 < self.k < self.numel:
            return torch.full(scores.shape, float(self.k > 0), device=scores.device)
        if self._nonnegative:  # compare the floats themselves: their order is their keys'
            values, threshold = scores.reshape(-1), self._threshold_score()
        else:
            values, threshold = ordered_key(scores), self._threshold
        kept = torch.gt(values, threshold, out=torch.empty(values.shape, device=scores.device))
        for start in range(0, values.numel(), SLICE):
            if self._ties_left == 0:
                break
            part = values[start:start + SLICE]
            ties = torch.eq(part, threshold, out=torch.empty(part.shape, device=scores.device))
            count = int(ties.sum())
            if count > self._ties_left:  # the cut: keep only the first ties
                ties[torch.nonzero(ties > 0).reshape(-1)[self._ties_left:]] = 0.0
                count = self._ties_left
            kept[start:start + SLICE].add_(ties)
            self._ties_left -= count
        return kept.view(scores.shape)

    def _settle_threshold(self) -> None:
        """End pass 2 (at the first call): the k-th largest key, and the ties at it still to keep."""
        if self._threshold is None:
            self.window_start()  # settles k for a selection without pass 2 (k = 0 or N)
            if 0 < self.k < self.numel:
                low = self._settle_digit()
                self._threshold = ((self._high - self._offset) << 16) | low
                self._ties_left = self._needed
            else:
                self._threshold = 0

    def cut(self) -> tuple[float, int]:
        """Pass 3 for a caller that applies it itself (the native kernels), magnitudes only: the next
        chunk keeps its scores above the returned threshold and the first `ties` equal to it; report the
        ties it kept with :meth:`took_ties`. Keeping everything is `(-inf, 0)`, nothing `(inf, 0)`."""
        if not self._nonnegative:
            raise ValueError("TopK.cut is for magnitudes (nonnegative=True)")
        self._settle_threshold()
        if not 0 < self.k < self.numel:
            return (-math.inf if self.k > 0 else math.inf), 0
        return self._threshold_score(), self._ties_left

    def _threshold_score(self) -> float:
        """The k-th largest magnitude itself (a nonnegative float's key is its bits)."""
        return struct.unpack("<f", struct.pack("<i", self._threshold))[0]

    def took_ties(self, count: int) -> None:
        """`count` of the ties :meth:`cut` offered were kept."""
        self._ties_left -= count

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
    chunks = scores.contiguous().reshape(-1).split(SLICE)  # cache-sized temporaries
    selection = TopK(k, nonnegative=nonnegative)
    for chunk in chunks:
        selection.count_high(chunk)
    for chunk in chunks:
        selection.count_low(chunk)
    return torch.cat([selection.mask(chunk) for chunk in chunks]).view(scores.shape)
