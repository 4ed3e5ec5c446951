"""Passthrough: copy one model's tensor, optionally scaled; the building block of frankenmerges.

Source: mergekit's `passthrough` (Goddard et al. 2024, "Arcee's MergeKit", arXiv:2403.13257).
"""

from __future__ import annotations

from typing import Annotated

from torch import Tensor

from . import FACTOR, PerModel, merge_method


@merge_method(
    "passthrough",
    pretty_name="Passthrough",
    reference_url="https://arxiv.org/abs/2403.13257",
    min_others=1,
    max_others=1,
    elementwise=True,
)
def passthrough(tensors: list[Tensor], *, scale: PerModel[Annotated[float | None, FACTOR]] = None) -> Tensor:
    """Return the single input, multiplied by its `scale` when one is set.

    Args:
        tensors: exactly one float32 tensor `(*shape)` (the planner enforces one source per slice).
        scale: the model's multiplier, or None for an exact copy.

    Returns:
        float32 tensor `(*shape)`.
    """
    (x,) = tensors
    (s,) = scale if scale is not None else (None,)
    return x if s is None else x * s
