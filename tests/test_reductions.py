"""Dot products and norms are float64 sums in one fixed order: the same bits as that order added by hand
in Python, from the C kernel, from torch's ops, and from any cut of a vector into pieces."""

from __future__ import annotations

import math
import os

import pytest
import torch

from merger.methods import reductions
from merger.methods.native import native_kernels
from merger.methods.reductions import LANES, ProductSums, dot, norm, row_product_sums, squared_norm

NUMEL = 3 * (1 << 20) + 12_345
STORED = [torch.bfloat16, torch.float16, torch.float32]


def vectors(dtype: torch.dtype, numel: int = NUMEL, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(numel, generator=g) * 0.02
    y = x + torch.randn(numel, generator=g) * 0.01
    x[::997] = -0.0
    return x.to(dtype), y.to(dtype)


def by_hand(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float, float]:
    """The definition, one lane at a time, with Python's float additions."""
    a, b = x.double().tolist(), y.double().tolist()
    lanes = [[0.0] * LANES for _ in range(3)]
    for i, (p, q) in enumerate(zip(a, b)):
        lanes[0][i % LANES] += p * p
        lanes[1][i % LANES] += q * q
        lanes[2][i % LANES] += p * q
    totals = []
    for sums in lanes:
        total = 0.0
        for value in sums:
            total += value
        totals.append(total)
    return tuple(totals)


def in_pieces(x: torch.Tensor, y: torch.Tensor, size: int) -> tuple[float, float, float]:
    sums = ProductSums()
    for start in range(0, x.numel(), size):
        sums.add(x[start:start + size], y[start:start + size])
    return sums.totals()


@pytest.mark.parametrize("dtype", STORED)
def test_the_sums_are_the_definition_by_hand(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    x, y = vectors(dtype, numel=20_011)
    expected = by_hand(x, y)
    assert ProductSums().add(x, y).totals() == expected  # the kernel where one builds
    monkeypatch.setattr(reductions, "native_kernels", lambda: None)
    assert ProductSums().add(x, y).totals() == expected  # torch's ops


@pytest.mark.parametrize("dtype", STORED)
def test_kernel_and_torch_give_the_same_bits_whatever_the_pieces(dtype: torch.dtype, monkeypatch) -> None:
    if native_kernels() is None:
        if os.environ.get("CI") == "true":
            pytest.fail("the native kernels did not build on CI (is a C compiler installed?)")
        pytest.skip("no C compiler here: the native kernels cannot be built")
    x, y = vectors(dtype)
    whole = ProductSums().add(x, y).totals()
    assert in_pieces(x, y, 1 << 20) == in_pieces(x, y, 4099 * LANES) == whole
    monkeypatch.setattr(reductions, "native_kernels", lambda: None)
    monkeypatch.setattr(reductions, "TORCH_PIECE", 1000 * LANES)
    assert in_pieces(x, y, 1 << 20) == ProductSums().add(x, y).totals() == whole
    exact = [math.fsum(v) for v in ((x.double() ** 2).tolist(), (y.double() ** 2).tolist(), (x.double() * y.double()).tolist())]
    for ours, truth in zip(whole, exact):
        assert abs(ours - truth) <= 1e-11 * abs(truth)  # float64 additions of ~2^18 terms per lane


def test_dot_and_norms_are_the_sums() -> None:
    x, y = vectors(torch.float32, numel=1000)
    xx, yy, xy = by_hand(x, y)
    assert (dot(x, y), squared_norm(y), norm(x)) == (xy, yy, math.sqrt(xx))
    assert dot(x.view(10, 100), y.view(100, 10)) == xy  # any shapes of one size


def test_only_the_last_piece_may_be_short() -> None:
    x, y = vectors(torch.float32, numel=100)
    sums = ProductSums().add(x[:LANES + 3], y[:LANES + 3])
    with pytest.raises(ValueError, match="only the last piece"):
        sums.add(x[LANES + 3:], y[LANES + 3:])
    with pytest.raises(ValueError, match="equal sizes"):
        ProductSums().add(x, y[:50])


@pytest.mark.parametrize("k", [1, LANES - 1, LANES, 1000, 5 * LANES + 3])
def test_row_sums_are_each_rows_sums(k: int) -> None:
    x, y = vectors(torch.bfloat16, numel=37 * k, seed=k)
    x, y = x.view(37, k), y.view(37, k)
    aa, bb, ab = row_product_sums(x, y)
    assert [(a, b, c) for a, b, c in zip(aa.tolist(), bb.tolist(), ab.tolist())] == [
        ProductSums().add(x[i], y[i]).totals() for i in range(37)
    ]


def test_long_rows_are_summed_in_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reductions, "TORCH_PIECE", 4 * LANES)
    x, y = vectors(torch.float32, numel=3 * 200)
    aa, bb, ab = row_product_sums(x.view(3, 200), y.view(3, 200))
    assert (aa[1].item(), bb[1].item(), ab[1].item()) == by_hand(x[200:400], y[200:400])

