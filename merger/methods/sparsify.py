"""Sparsifying task vectors and electing signs: the shared parts of the task-arithmetic family and SCE.

A task vector is `δ = x − base` of one tensor, float32 `(*shape)`.

- magnitude (TIES, Yadav et al. 2023, arXiv:2306.01708): keep the `int(density·N)` largest `|δ|`
  (:func:`magnitude_trims`).
- random drop (DARE, Yu et al. 2023, arXiv:2311.03099): keep each entry with probability `density`
  (:func:`random_drops`).

TIES and DARE run as prepare passes: what needs the whole tensor is decided over its slices first
(:func:`set_l1_factors` adds the rescale), then applied slice by slice, so the engine never holds a
float32 copy of a whole tensor; :func:`slices_of` gives a whole tensor's slices. The others are
whole-tensor `*_mask` functions returning the bool mask of the entries they keep (one byte per
element, whatever `int8_mask` says), or None when `density ≥ 1`; :func:`apply_mask_` zeroes the rest
and optionally rescales:

- breadcrumbs (Davari & Belilovsky 2023, arXiv:2312.06795): drop the `int(gamma·N)` largest `|δ|` as
  outliers, keep the next `int(density·N)`.
- della (Deep et al. 2024, arXiv:2406.11617): keep each entry with a probability that grows linearly
  with its magnitude rank in its row, from `density − ε` to `density + ε`.

Exact counts use a streamed radix select (:class:`TopK`: linear time, ties at the threshold kept
lowest index first), never a full sort. Rescaling is mergekit's L1-norm matching over the whole tensor
(docs/decisions.md), not the papers' per-entry `1/p`, summed in float64. Random masks draw from the
`generator` passed in, so a seeded generator reproduces them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import partial

import torch
from torch import Tensor

from merger.methods.native import NativeKernels, SparsifyStep, native_kernels
from merger.methods.registry import SLICE
from merger.methods.threads import run_concurrently, single_threaded_math
from merger.methods.topk import RADIX, TopK, top_k_mask

RESCALE_EPS = 1e-7  # below this L1 norm (before or after masking) no rescale is applied


def slices_of(tensors: Sequence[Tensor], base: Tensor) -> Iterator[tuple[list[Tensor], Tensor]]:
    """Consecutive `(tensors, base)` slices of the flattened whole tensors, `SLICE` entries each (views)."""
    flat = [t.reshape(-1) for t in tensors]
    flat_base = base.reshape(-1)
    for start in range(0, flat_base.numel(), SLICE):
        yield [t[start:start + SLICE] for t in flat], flat_base[start:start + SLICE]


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

    def native_step(self, numel: int) -> SparsifyStep:
        """The next slice's trim for the native kernels; hand it back to :meth:`native_done` after the call."""
        threshold, ties = self.selection.cut()
        return SparsifyStep(1, threshold=threshold, ties=ties, factor=self.factor)

    def native_done(self, step: SparsifyStep) -> None:
        """Advance past the slice `step` (from :meth:`native_step`) was applied to."""
        self.selection.took_ties(step.ties_kept)

    def rewind(self) -> None:
        """Apply from the first slice again."""
        self.selection.rewind()


class RandomDrop:
    """DARE "drop" of one task vector: its keep mask for the whole tensor (:func:`random_drops`), applied
    to its slices in flat order.

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

    def native_step(self, numel: int) -> SparsifyStep:
        """The next `numel` entries' drop for the native kernels; hand it back to :meth:`native_done`."""
        return SparsifyStep(2, mask=self.mask[self._offset:self._offset + numel], factor=self.factor)

    def native_done(self, step: SparsifyStep) -> None:
        """Advance past the slice `step` (from :meth:`native_step`) was applied to."""
        self._offset += step.mask.numel()

    def rewind(self) -> None:
        """Apply from the first slice again."""
        self._offset = 0


Slices = Callable[[], Iterable[tuple[Sequence[Tensor], Tensor]]]


def magnitude_trims(slices: Slices, densities: Sequence[float]) -> list[MagnitudeTrim | None]:
    """TIES "trim" as a prepare pass: per model, the :class:`TopK` of `|xᵢ − base|` keeping
    `int(densityᵢ·N)`, counted over the slices (two passes; the inputs are not modified).

    Args:
        slices: returns a fresh iterator over `(tensors, base)` slices, in flat order: float32, or as
            stored (bfloat16, float16), read as float32.
        densities: one per model.

    Returns:
        One trim per model, None where `density ≥ 1` (keep everything); apply them to the same slices'
        task vectors in order.
    """
    selections = [None if density >= 1 else TopK(density=density, nonnegative=True) for density in densities]
    active = [(i, selection) for i, selection in enumerate(selections) if selection is not None]
    if not active:
        return [None] * len(selections)
    native = native_kernels()
    if native is not None and _count_natively(native, slices, active):
        return [None if selection is None else MagnitudeTrim(selection) for selection in selections]
    scratch: list[Tensor] = []  # |δᵢ| of one slice per model, reused
    # counting is single-threaded: the models are counted on threads of their own, each running its
    # elementwise ops single-threaded too (idle OpenMP workers would spin on the cores they need)
    with single_threaded_math():
        for count in (TopK.count_high, TopK.count_low):
            for tensors, base in slices():
                if not scratch or scratch[0].numel() < base.numel():
                    scratch = [torch.empty(base.numel(), dtype=torch.float32, device=base.device) for _ in active]
                run_concurrently([
                    partial(lambda selection, x, b, out: count(selection, _magnitudes(x, b, out)),
                            selection, tensors[i], base, buffer[:base.numel()].view(base.shape))
                    for (i, selection), buffer in zip(active, scratch)
                ])
    return [None if selection is None else MagnitudeTrim(selection) for selection in selections]


def _magnitudes(x: Tensor, base: Tensor, out: Tensor) -> Tensor:
    """`|x − base|` in float32 into `out`, from slices stored in any float dtype (read as float32)."""
    return torch.sub(x.float(), base.float(), out=out).abs_()


def _count_natively(native: NativeKernels, slices: Slices, active: list[tuple[int, TopK]]) -> bool:
    """Both counting passes of :func:`magnitude_trims` in the native kernels, the models on threads of
    their own; False (nothing counted) when they do not take the slices."""
    histograms = [torch.zeros(RADIX, dtype=torch.int64) for _ in active]
    numel = 0
    for tensors, base in slices():
        if numel == 0 and not native.reads_stored(*(tensors[i] for i, _ in active), base):
            return False  # decided on the first slice, before anything is counted
        run_concurrently([partial(native.count_high, tensors[i], base, histogram)
                          for (i, _), histogram in zip(active, histograms)])
        numel += base.numel()
    for (_, selection), histogram in zip(active, histograms):
        selection.add_counts(histogram, numel)
    windows = [(i, selection, selection.window_start()) for i, selection in active]
    windows = [(i, selection, start) for i, selection, start in windows if start is not None]
    histograms = [torch.zeros(RADIX, dtype=torch.int64) for _ in windows]
    if windows:
        for tensors, base in slices():
            run_concurrently([partial(native.count_window, tensors[i], base, start, histogram)
                              for (i, _, start), histogram in zip(windows, histograms)])
    for (_, selection, _), histogram in zip(windows, histograms):
        selection.add_counts(histogram)
    return True


def random_drops(numel: int, densities: Sequence[float], generator: torch.Generator) -> list[RandomDrop | None]:
    """DARE "drop" as a prepare step: per model, keep each of the `numel` entries independently with
    probability `density` (entry j is kept when `u_j < density`, `u` being the generator's float32
    uniform stream in flat order, drawn `SLICE` entries at a time: on CPU the stream does not depend
    on that, on CUDA it does, so the chunk is fixed), drawn model by model from `generator`.

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
        slices: returns a fresh iterator over `(tensors, base)` slices, in flat order: float32, or as
            stored (bfloat16, float16), read as float32.
        steps: one per model, from :func:`magnitude_trims` or :func:`random_drops`; None keeps everything.
    """
    active = [(i, step) for i, step in enumerate(steps) if step is not None]
    before, after = [0.0] * len(active), [0.0] * len(active)
    native = native_kernels()
    for tensors, base in slices() if active else ():
        for j, (i, step) in enumerate(active):
            if native is not None and native.reads_stored(tensors[i], base):
                native_step = step.native_step(base.numel())
                sums = native.l1_sums(tensors[i], base, native_step)
                step.native_done(native_step)
            else:
                magnitude = torch.sub(tensors[i].float(), base.float()).abs_()  # float32, whatever is stored
                sums = (torch.sum(magnitude, dtype=torch.float64), torch.sum(step.apply_(magnitude), dtype=torch.float64))
            before[j] += float(sums[0])
            after[j] += float(sums[1])
    for (_, step), b, a in zip(active, before, after):
        step.factor = b / a if b >= RESCALE_EPS and a >= RESCALE_EPS else None
        step.rewind()


def _uniform_below(numel: int, density: float, generator: torch.Generator) -> Tensor:
    """bool `(numel,)`: `u_j < density` for the generator's next `numel` uniforms, drawn by `SLICE`."""
    native = native_kernels()
    if native is not None and native.draws_as_torch and generator.device.type == "cpu":
        return native.uniform_below(numel, density, generator)
    mask = torch.empty(numel, dtype=torch.bool, device=generator.device)
    for piece in mask.split(SLICE):
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
    """`Σ|x|` accumulated in float64, `SLICE` entries at a time.

    A float32 norm is not good enough here: over a 65M-entry embedding it is off by 6% with two
    threads and 28% with one (the running sum outgrows the addends' precision), so the rescale factor
    would depend on the machine.

    Args:
        tensor: float32 `(*shape)`.

    Returns:
        The L1 norm as a Python float.
    """
    return sum(float(torch.sum(piece.abs(), dtype=torch.float64)) for piece in tensor.reshape(-1).split(SLICE))


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
