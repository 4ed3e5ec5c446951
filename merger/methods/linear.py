"""Linear: a weighted average of the models (Wortsman et al. 2022, "Model soups", arXiv:2203.05482)."""

from __future__ import annotations

from torch import Tensor

from merger.methods.native import kernels_for
from merger.methods.registry import Factor, PerModel, merge_method


def _linear_fused(tensors: list[Tensor], *, out: Tensor, weight: list[float], normalize: bool = True) -> bool:
    """:func:`linear` on one slice of stored tensors, into `out` (the registry's `fused`); False where the
    native kernels cannot run it."""
    native = kernels_for(len(tensors), *tensors, out)
    if native is None or native.add_fuses is None:
        return False
    native.linear(tensors, weight, float(sum(weight)) if normalize else None, out)
    return True


@merge_method("linear", pretty_name="Linear", reference_url="https://arxiv.org/abs/2203.05482", elementwise=True,
              fused=_linear_fused)
def linear(tensors: list[Tensor], *, weight: PerModel[Factor], normalize: bool = True) -> Tensor:
    """Weighted sum `Σᵢ wᵢ·xᵢ`, divided by `Σᵢ wᵢ` when `normalize`.

    Args:
        tensors: N float32 tensors of one shape `(*shape)`.
        weight: N weights (`wᵢ`); the planner rejects a missing weight and, with `normalize`, a zero sum.
        normalize: divide by the weights' sum (mergekit's default: true).

    Returns:
        float32 tensor `(*shape)`.
    """
    out = tensors[0].mul_(weight[0])  # the inputs are the method's own buffers: accumulate in place
    for w, x in zip(weight[1:], tensors[1:]):
        out.add_(x, alpha=w)  # fused into one rounding by torch's vector kernels (the native kernel asks which)
    if normalize:
        out.div_(sum(weight))
    return out
