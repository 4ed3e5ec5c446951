"""Whole-tensor sums that give the same float on every machine: dot products and norms.

`torch.dot` runs in the BLAS library (MKL here), which picks its kernel by the processor, so the same
inputs give other last bits on another CPU; a whole-tensor float32 reduction also depends on the
thread count. Both made merged bytes depend on the machine. Here every product is summed in float32
over blocks of `BLOCK` entries (each block by one thread, below torch's parallel grain of 32768), and
the block sums are added in float64. See docs/decisions.md ("Reductions").
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

BLOCK = 1 << 14  # entries summed by one thread


def _blocks(a: Tensor, b: Tensor):
    """`a`, `b` flattened into `(n, BLOCK)` views plus one `(1, rest)` tail (views, no copies)."""
    a, b = a.reshape(-1), b.reshape(-1)
    full = a.numel() // BLOCK * BLOCK
    return [(a[:full].view(-1, BLOCK), b[:full].view(-1, BLOCK)), (a[full:].view(1, -1), b[full:].view(1, -1))]


def dot(a: Tensor, b: Tensor) -> float:
    """`Σ aᵢbᵢ` over two float32 tensors of equal numel (any shape), reproducible across machines.

    Args:
        a, b: float32 tensors with the same number of entries.

    Returns:
        The dot product as a Python float.
    """
    return sum(float((x * y).sum(dim=1).double().sum()) for x, y in _blocks(a, b))


def squared_norm(a: Tensor) -> float:
    """`‖a‖²` of a float32 tensor (any shape), reproducible across machines.

    Args:
        a: a float32 tensor.

    Returns:
        The squared Euclidean norm as a Python float.
    """
    return sum(float(torch.linalg.vector_norm(x, dim=1).double().square().sum()) for x, _ in _blocks(a, a))


def norm(a: Tensor) -> float:
    """`‖a‖` of a float32 tensor (any shape): the square root of :func:`squared_norm`."""
    return math.sqrt(squared_norm(a))
