"""Sums of products that give the same float on every machine: dot products and norms.

torch's float32 sums take their order from its vector width (eight floats with AVX2, sixteen with
AVX-512) and the thread count, and `torch.dot` runs in MKL, whose kernel depends on the processor: each made merged
bytes depend on the machine. Here every product `xᵢ·yᵢ` is taken in float64, where the products of
float32, bfloat16 and float16 values are exact; entry `i` is added to accumulator `i mod LANES` in
index order, and the accumulators are added in order at the end. The only roundings are those
additions, in an order fixed by the definition: the C kernel (`native.NativeKernels.product_sums`) and
torch's ops (:func:`_add_with_torch`) both follow it, bit for bit. See docs/decisions.md ("Reductions").
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from merger.methods.native import native_kernels

LANES = 16  # accumulators per sum; kernels.c's SUM_LANES
TORCH_PIECE = LANES << 16  # entries per float64 copy on torch's path


class ProductSums:
    """`Σxᵢ²`, `Σyᵢ²` and `Σxᵢyᵢ` of two vectors given in consecutive pieces (the engine's slices), in float64.

    Every piece but the last has a multiple of :data:`LANES` entries, so the sums do not depend on how
    a vector is cut.

    Raises:
        ValueError: (from :meth:`add`) `x` and `y` of two sizes, or a piece after one that was not a
            multiple of :data:`LANES` entries.
    """

    def __init__(self) -> None:
        self._lanes = torch.zeros(3, LANES, dtype=torch.float64)
        self._open = True  # False after a piece whose size is not a multiple of LANES: that was the last

    def add(self, x: Tensor, y: Tensor) -> ProductSums:
        """Continue the sums over `x` and `y` (float32, bfloat16 or float16, any shape, equal numel)."""
        if x.numel() != y.numel():
            raise ValueError(f"sums of products need equal sizes, got {x.numel()} and {y.numel()} entries")
        if not self._open:
            raise ValueError(f"only the last piece of a vector may hold other than a multiple of {LANES} entries")
        self._open = x.numel() % LANES == 0
        x, y = x.reshape(-1), y.reshape(-1)
        native = native_kernels()
        if native is not None and native.sum_lanes == LANES and native.reads_stored(x, y):
            native.product_sums(x, y, self._lanes)
        else:
            self._lanes = _add_with_torch(self._lanes, x, y)
        return self

    def totals(self) -> tuple[float, float, float]:
        """`(Σxᵢ², Σyᵢ², Σxᵢyᵢ)`: each sum's accumulators added in lane order."""
        aa, bb, ab = (_in_order(row) for row in self._lanes.tolist())
        return aa, bb, ab


def _add_with_torch(lanes: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """The kernel's sums by torch's ops, continued from `lanes` (float64 `(3, LANES)`) over `x` and `y`."""
    lanes = lanes.to(x.device).unsqueeze(1)
    for start in range(0, x.numel(), TORCH_PIECE):
        lanes = _continued(lanes, x[start:start + TORCH_PIECE].view(1, -1), y[start:start + TORCH_PIECE].view(1, -1))
    return lanes.squeeze(1).cpu().contiguous()


def _continued(lanes: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """`lanes` (float64 `(3, r, LANES)`) continued over the rows of `x` and `y` (`(r, k)`): `cumsum` adds down
    each lane in index order (on the CPU; CUDA's `cumsum` scans in an order of its own, which agrees to
    float64 rounding)."""
    a, b = x.double(), y.double()
    products = torch.stack([a * a, b * b, a * b])  # (3, r, k), exact
    products = torch.nn.functional.pad(products, (0, -x.shape[1] % LANES))  # +0.0 leaves a lane's sum as is
    rows = torch.cat([lanes.unsqueeze(2), products.view(3, x.shape[0], -1, LANES)], dim=2)  # (3, r, 1 + k/LANES, LANES)
    return rows.cumsum(dim=2)[:, :, -1]


def row_product_sums(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """:class:`ProductSums` of each row: `(Σⱼ xᵢⱼ², Σⱼ yᵢⱼ², Σⱼ xᵢⱼyᵢⱼ)` as three float64 `(rows,)`, bit for bit
    what a :class:`ProductSums` fed the row would total.

    Args:
        x, y: `(rows, k)`, equal shapes, float32, bfloat16 or float16.
    """
    rows, k = x.shape
    if k >= TORCH_PIECE:  # few long rows: each by ProductSums, the kernel where there is one, in pieces
        return tuple(torch.tensor(sums, dtype=torch.float64)
                     for sums in zip(*(ProductSums().add(x[i], y[i]).totals() for i in range(rows))))
    per_piece = max(1, TORCH_PIECE // max(k, 1))
    totals = []
    for start in range(0, rows, per_piece):
        piece = x[start:start + per_piece], y[start:start + per_piece]
        lanes = _continued(torch.zeros(3, piece[0].shape[0], LANES, dtype=torch.float64, device=x.device), *piece)
        totals.append(torch.nn.functional.pad(lanes, (1, 0)).cumsum(dim=2)[:, :, -1])  # (0 + l₀) + l₁ + …
    aa, bb, ab = torch.cat(totals, dim=1) if totals else torch.zeros(3, 0, dtype=torch.float64)
    return aa, bb, ab


def _in_order(values: list[float]) -> float:
    """`((0 + v₀) + v₁) + …`: the lanes added in their order."""
    total = 0.0
    for value in values:
        total += value
    return total


def dot(a: Tensor, b: Tensor) -> float:
    """`Σ aᵢbᵢ` over two tensors of equal numel (any shape; float32, bfloat16 or float16), the same on every machine.

    Raises:
        ValueError: the sizes differ.
    """
    return ProductSums().add(a, b).totals()[2]


def squared_norm(a: Tensor) -> float:
    """`‖a‖²` of a tensor (any shape; float32, bfloat16 or float16), the same on every machine."""
    return ProductSums().add(a, a).totals()[0]


def norm(a: Tensor) -> float:
    """`‖a‖`: the square root of :func:`squared_norm`."""
    return math.sqrt(squared_norm(a))
