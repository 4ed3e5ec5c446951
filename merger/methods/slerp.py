"""SLERP: spherical linear interpolation between two models (Shoemake 1985, "Animating rotation with
quaternion curves", doi:10.1145/325165.325242), as mergekit applies it to whole flattened tensors."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import merge_method

DOT_THRESHOLD = 0.9995  # above this |cos θ| the arc is numerically a line: use lerp
NORM_EPS = 1e-8


@merge_method(
    "slerp",
    pretty_name="SLERP",
    reference_url="https://en.wikipedia.org/wiki/Slerp",
    min_others=1,
    max_others=1,
)
def slerp(tensors: list[Tensor], base: Tensor, *, t: float) -> Tensor:
    """Interpolate on the great circle from `base` (t=0) to the other model (t=1).

    The whole tensor is one vector. With `θ` the angle between the normalised vectors,
    `out = sin((1−t)θ)/sin θ · v0 + sin(tθ)/sin θ · v1` on the original (unnormalised) vectors; when
    `|cos θ| > 0.9995` it falls back to `lerp = (1−t)·v0 + t·v1`. 0-dim tensors are lerped.

    Args:
        tensors: one float32 tensor `(*shape)`, the other model (`v1`).
        base: float32 tensor `(*shape)`, the base model (`v0`).
        t: interpolation factor; 0 returns the base, 1 the other model.

    Returns:
        float32 tensor `(*shape)`.
    """
    (v1,) = tensors
    v0 = base
    if t == 0:
        return v0
    if t == 1:
        return v1
    if v0.dim() == 0:
        return torch.lerp(v0, v1, t)
    a, b = v0.reshape(-1), v1.reshape(-1)
    # cos θ of the normalised vectors without materialising them (a vector is left as is when ~0)
    na, nb = float(a.norm()), float(b.norm())
    dot = float(torch.dot(a, b)) / ((na if na > NORM_EPS else 1.0) * (nb if nb > NORM_EPS else 1.0))
    if abs(dot) > DOT_THRESHOLD:
        return torch.lerp(v0, v1, t)
    theta = math.acos(dot)
    sin_theta = math.sin(theta)
    s0 = math.sin((1 - t) * theta) / sin_theta
    s1 = math.sin(t * theta) / sin_theta
    return torch.add(v0 * s0, v1, alpha=s1)
