"""NearSwap: take the other model's value where it is already close to the base's (alchemonaut,
https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001)."""

from __future__ import annotations

from typing import Annotated

from torch import Tensor

from ..ranges import MAX_FACTOR, Range
from . import merge_method

DIFF_MIN = 1e-6  # floor of |a − b|, so equal entries get weight 1 instead of t/0


@merge_method(
    "nearswap",
    pretty_name="NearSwap",
    reference_url="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
    min_others=1,
    max_others=1,
    elementwise=True,
)
def nearswap(tensors: list[Tensor], base: Tensor, *, t: Annotated[float, Range(float, 0.0, MAX_FACTOR, "the sameness threshold")]) -> Tensor:
    """Per entry `wgt = clamp(t / max(|a − b|, 1e-6), 0, 1)` and `out = wgt·b + (1 − wgt)·a`.

    Entries that differ by at most `t` are swapped to `b`; larger differences stay near the base `a`
    (the weight falls off as `t/|a − b|`). `t ≤ 0` returns the base.

    Args:
        tensors: one float32 tensor `(*shape)`, the other model `b`.
        base: float32 `(*shape)`, the base `a`.
        t: the sameness threshold.

    Returns:
        float32 `(*shape)`.
    """
    (b,) = tensors
    a = base
    wgt = t / (a - b).abs_().clamp_(min=DIFF_MIN)  # (*shape)
    wgt.clamp_(0, 1)
    out = b * wgt
    return out.add_(wgt.neg_().add_(1).mul_(a))  # + (1 − wgt)·a
