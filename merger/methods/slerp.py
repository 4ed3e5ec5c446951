"""SLERP: spherical linear interpolation between two models (Shoemake 1985, "Animating rotation with
quaternion curves", doi:10.1145/325165.325242), as mergekit applies it to whole flattened tensors."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor

from merger.methods.native import kernels_for
from merger.methods.reductions import ProductSums
from merger.methods.registry import Fraction, merge_method

DOT_THRESHOLD = 0.9995  # above this |cos θ| the arc is numerically a line: use lerp
NORM_EPS = 1e-8
# the prepare pass's answer where the whole tensor is lerped; not None, which tells `slerp` to prepare
# from the tensors it is given: a slice's own angle would differ from the whole tensor's
LERP = "lerp"


def slerp_coefficients(
    slices: Callable[[], Iterable[tuple[Sequence[Tensor], Tensor]]], shape: tuple[int, ...], *, t: float, **_: object
) -> tuple[float, float] | str:
    """The prepare pass: `(s0, s1)` with `out = s0·v0 + s1·v1`, or :data:`LERP`.

    `‖v0‖²`, `‖v1‖²` and `v0·v1` are float64 sums over the slices in turn (:class:`.reductions.ProductSums`:
    the same on every machine). A vector of norm ≤ 1e-8 has no direction, so the angle is undefined:
    lerp (mergekit takes θ = π/2 there, which scales the other vector by `sin(tπ/2)`). Opposed vectors
    (`cos θ = −1`, no unique great circle) lerp by the threshold.

    Args:
        slices: returns a fresh iterator over `([v1], v0)` slices, float32 or as stored (bfloat16,
            float16: the registry's `fused` contract).
        shape: the whole tensor's shape (0-dim tensors are lerped).
        t: interpolation factor.

    Returns:
        The two coefficients, or :data:`LERP` where `t` is 0 or 1 (the endpoints), the tensor is 0-dim,
        a vector has norm ≤ 1e-8, or `|cos θ| > 0.9995`.
    """
    if t in (0, 1) or len(shape) == 0:
        return LERP
    sums = ProductSums()
    for (v1,), v0 in slices():
        sums.add(v0, v1)
    aa, bb, ab = sums.totals()
    na, nb = math.sqrt(aa), math.sqrt(bb)
    if na <= NORM_EPS or nb <= NORM_EPS:
        return LERP
    cosine = ab / (na * nb)
    if abs(cosine) > DOT_THRESHOLD:
        return LERP
    theta = math.acos(cosine)
    sin_theta = math.sin(theta)
    return math.sin((1 - t) * theta) / sin_theta, math.sin(t * theta) / sin_theta


def _slerp_fused(tensors: list[Tensor], base: Tensor, *, out: Tensor, t: float,
                 prepared: tuple[float, float] | str | None = None) -> bool:
    """:func:`slerp` on one slice of stored tensors, into `out` (the registry's `fused`): the arc's
    `v0·s0 + v1·s1` is linear's kernel with the weights `(s0, s1)`, rounded as torch's `mul` and `add`
    round it; False where the kernels cannot run it or the slice is lerped (torch's `lerp` has its own
    rounding)."""
    (v1,) = tensors
    native = kernels_for(2, v1, base, out)
    if native is None or native.add_fuses is None:
        return False
    if t in (0, 1):  # an endpoint: the input itself, cast as torch casts it
        native.linear([base if t == 0 else v1], [1.0], None, out)
        return True
    if prepared is None or prepared == LERP:
        return False
    native.linear([base, v1], list(prepared), None, out)
    return True


@merge_method(
    "slerp",
    pretty_name="SLERP",
    reference_url="https://en.wikipedia.org/wiki/Slerp",
    min_others=1,
    max_others=1,
    elementwise=True,
    prepare=slerp_coefficients,
    slices_in_any_order=True,
    fused=_slerp_fused,
)
def slerp(tensors: list[Tensor], base: Tensor, *, t: Fraction,
          prepared: tuple[float, float] | str | None = None) -> Tensor:
    """Interpolate on the great circle from `base` (t=0) to the other model (t=1).

    The whole tensor is one vector. With `θ` the angle between the normalised vectors,
    `out = sin((1−t)θ)/sin θ · v0 + sin(tθ)/sin θ · v1` on the original (unnormalised) vectors; when
    `|cos θ| > 0.9995` (parallel or opposed vectors) or either vector has norm ≤ 1e-8 (no angle) it
    falls back to `lerp = (1−t)·v0 + t·v1`. 0-dim tensors are lerped. The angle
    comes from :func:`slerp_coefficients`, so the engine can run this on slices.

    Args:
        tensors: one float32 tensor `(*shape)`, the other model (`v1`).
        base: float32 tensor `(*shape)`, the base model (`v0`).
        t: interpolation factor; 0 returns the base, 1 the other model.
        prepared: the engine's :func:`slerp_coefficients` for the whole tensor; None computes them
            from these tensors.

    Returns:
        float32 tensor `(*shape)`.
    """
    (v1,) = tensors
    v0 = base
    if t == 0:
        return v0
    if t == 1:
        return v1
    if prepared is None:
        prepared = slerp_coefficients(lambda: [((v1.reshape(-1),), v0.reshape(-1))], tuple(v0.shape), t=t)
    if prepared == LERP:
        return torch.lerp(v0, v1, t)
    s0, s1 = prepared
    return torch.add(v0 * s0, v1, alpha=s1)
