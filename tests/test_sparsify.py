"""Sparsifiers and the sign election: exact kept sets against rank lists computed here, L1 rescaling,
identity at density 1, and seeded reproducibility of the random masks."""

from __future__ import annotations

import pytest
import torch

from merger.methods.sparsify import (
    agrees_with,
    apply_mask_,
    breadcrumbs_mask,
    della_mask,
    elect_sign,
    l1_norm,
    magnitude_trims,
    random_drops,
    slices_of,
)
from merger.methods.topk import TopK, top_k_mask

# distinct magnitudes, shuffled signs and order: |δ| ranks are unambiguous
DELTA = torch.tensor([0.3, -1.2, 0.05, 2.5, -0.7, 0.9, -0.01, 1.6, -3.1, 0.4])


def ascending_positions(delta: torch.Tensor) -> list[int]:
    """Positions of `delta` sorted by ascending |δ| (plain Python, independent of the code under test)."""
    values = delta.reshape(-1).tolist()
    return sorted(range(len(values)), key=lambda i: abs(values[i]))


def kept(mask: torch.Tensor) -> set[int]:
    return set(torch.nonzero(mask.reshape(-1)).reshape(-1).tolist())


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("k", [0, 1, 3, 5, 7, 10])
def test_top_k_mask_keeps_exactly_the_k_largest(k: int) -> None:
    mask = top_k_mask(DELTA.abs(), k)
    assert mask.dtype == torch.bool and mask.shape == DELTA.shape
    assert kept(mask) == set(ascending_positions(DELTA)[len(DELTA) - k:])


@pytest.mark.parametrize("k", [0, 2, 5, 8, 12])
def test_top_k_mask_count_is_exact_with_ties(k: int) -> None:
    mask = top_k_mask(torch.ones(3, 4), k)  # every score tied
    assert int(mask.sum()) == min(k, 12)


def test_top_k_keeps_tied_scores_lowest_index_first() -> None:
    scores = torch.tensor([1.0, 2.0, 2.0, 2.0, 0.5, 2.0, 3.0])
    assert kept(top_k_mask(scores, 3)) == {6, 1, 2}
    assert kept(top_k_mask(scores, 5)) == {6, 1, 2, 3, 5}


def test_top_k_orders_negative_scores_and_equates_the_zeros() -> None:
    scores = torch.tensor([-1.0, 0.0, 0.5, -0.0, -3.0, -1e-30, 1e30])
    assert kept(top_k_mask(scores, 3)) == {6, 2, 1}
    assert kept(top_k_mask(scores, 4)) == {6, 2, 1, 3}  # -0.0 ties with 0.0, after it by index
    assert kept(top_k_mask(scores, 5)) == {6, 2, 1, 3, 5}
    assert kept(top_k_mask(scores, 6)) == {6, 2, 1, 3, 5, 0}


@pytest.mark.parametrize("nonnegative", [False, True])
def test_top_k_streamed_over_slices_equals_a_stable_descending_sort(nonnegative: bool) -> None:
    generator = torch.Generator().manual_seed(3)
    scores = torch.round(torch.randn(5000, generator=generator) * 8) / 8  # many ties
    scores[::97] = torch.randn(52, generator=generator) * 1e20  # keys far apart in the high digit
    if nonnegative:
        scores = scores.abs()
    for k in (0, 1, 777, 2500, 4999, 5000, 6000):
        expected = set(sorted(range(5000), key=lambda i: (-float(scores[i]), i))[:k])  # -0.0 == 0.0 here too
        selection = TopK(k, nonnegative=nonnegative)
        slices = scores.split(613)
        for piece in slices:
            selection.count_high(piece)
        for piece in slices:
            selection.count_low(piece)
        assert kept(torch.cat([selection.mask(piece) for piece in slices])) == expected
        assert kept(top_k_mask(scores, k, nonnegative=nonnegative)) == expected


def magnitude_mask(delta: torch.Tensor, *, density: float) -> torch.Tensor | None:
    """The entries TIES keeps, through the engine's path: the prepare pass over slices, then its trim."""
    trim = magnitude_trims(lambda: slices_of([delta], torch.zeros_like(delta)), [density])[0]
    if trim is None:
        return None
    # the trim zeroes the dropped entries of δ itself (the deltas used here have no zeros)
    return (trim.apply_(delta.reshape(-1).clone()) != 0).view(delta.shape)


def bernoulli_mask(delta: torch.Tensor, *, density: float, generator: torch.Generator | None) -> torch.Tensor | None:
    """The entries DARE keeps, through the engine's path (the prepare pass's drop mask)."""
    drop = random_drops(delta.numel(), [density], generator)[0]
    return None if drop is None else drop.mask.view(delta.shape)


@pytest.mark.parametrize("density, expected", [(0.1, 1), (0.35, 3), (0.5, 5), (0.99, 9)])
def test_magnitude_keeps_int_density_n_largest(density: float, expected: int) -> None:
    mask = magnitude_mask(DELTA, density=density)
    assert kept(mask) == set(ascending_positions(DELTA)[len(DELTA) - expected:])


def test_magnitude_on_a_matrix_ranks_the_whole_tensor() -> None:
    delta = DELTA.reshape(2, 5)
    mask = magnitude_mask(delta, density=0.3)
    assert mask.shape == (2, 5)
    assert kept(mask) == set(ascending_positions(delta)[-3:])


def test_magnitude_keeps_nothing_when_int_density_n_is_zero() -> None:
    # mergekit asserts here; a 1-element (or 0-dim) tensor at density 0.5 keeps nothing instead
    assert int(magnitude_mask(torch.tensor(2.0), density=0.5).sum()) == 0
    assert magnitude_mask(torch.tensor(2.0), density=0.5).shape == ()


@pytest.mark.parametrize("mask_fn, params", [
    (magnitude_mask, {}),
    (bernoulli_mask, {"generator": None}),
    (breadcrumbs_mask, {"gamma": 0.1}),
    (della_mask, {"epsilon": 0.1, "generator": None}),
])
def test_density_one_is_identity(mask_fn, params) -> None:
    for density in (1.0, 1.5):
        assert mask_fn(DELTA, density=density, **params) is None
    delta = DELTA.clone()
    assert apply_mask_(delta, None, rescale=True) is delta
    assert torch.equal(delta, DELTA)


def test_bernoulli_same_seed_same_mask_and_other_seed_other_mask() -> None:
    delta = torch.randn(64, 64)
    a = bernoulli_mask(delta, density=0.3, generator=seeded(7))
    b = bernoulli_mask(delta, density=0.3, generator=seeded(7))
    c = bernoulli_mask(delta, density=0.3, generator=seeded(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_bernoulli_keeps_about_density() -> None:
    mask = bernoulli_mask(torch.zeros(200_000), density=0.3, generator=seeded())
    assert mask.dtype == torch.bool
    assert abs(mask.float().mean().item() - 0.3) < 0.005


def test_bernoulli_at_density_zero_keeps_nothing() -> None:
    assert int(bernoulli_mask(DELTA, density=0.0, generator=seeded()).sum()) == 0


def test_breadcrumbs_drops_top_gamma_and_keeps_the_next_density() -> None:
    # N=10, keep=int(0.5·10)=5, n_top=int(0.2·10)=2, n_bottom=3: ascending ranks [3, 8)
    mask = breadcrumbs_mask(DELTA, density=0.5, gamma=0.2)
    assert kept(mask) == set(ascending_positions(DELTA)[3:8])


def test_breadcrumbs_gamma_zero_keeps_through_the_end() -> None:
    # docs/decisions.md: n_top = 0 keeps the `keep` largest (mergekit's [n_bottom:-0] would keep none)
    mask = breadcrumbs_mask(DELTA, density=0.4, gamma=0.0)
    assert kept(mask) == set(ascending_positions(DELTA)[6:])
    # gamma·N < 1 rounds n_top to 0 too
    assert kept(breadcrumbs_mask(DELTA, density=0.4, gamma=0.05)) == set(ascending_positions(DELTA)[6:])


def test_breadcrumbs_shrinks_the_outliers_to_reach_the_density() -> None:
    # keep=8, n_top=int(0.5·10)=5 -> n_bottom=-3 -> n_top=2, n_bottom=0: ranks [0, 8)
    mask = breadcrumbs_mask(DELTA, density=0.8, gamma=0.5)
    assert kept(mask) == set(ascending_positions(DELTA)[:8])


def test_breadcrumbs_count_is_exact_with_ties() -> None:
    delta = torch.tensor([1.0, -1.0, 1.0, 2.0, -2.0, 2.0, 0.5, 0.5, 3.0, 3.0] * 10)
    assert int(breadcrumbs_mask(delta, density=0.37, gamma=0.13).sum()) == 37


def della_probabilities(n: int, density: float, epsilon: float) -> list[float]:
    """DELLA keep probability of ascending rank r: (density − ε) + r/(n − 1)·2ε."""
    return [density - epsilon + r / (n - 1) * 2 * epsilon for r in range(n)]


def test_della_keep_frequency_follows_the_magnitude_rank() -> None:
    rows, n, density, epsilon = 40_000, 5, 0.5, 0.3
    # every row holds the magnitudes 1..5 in a different order
    order = torch.rand(rows, n, generator=seeded(0)).argsort(dim=1)  # (rows, n): a permutation per row
    delta = (order + 1).float() * torch.where(torch.rand(rows, n, generator=seeded(1)) < 0.5, -1.0, 1.0)
    mask = della_mask(delta, density=density, epsilon=epsilon, generator=seeded(2))
    frequency_by_rank = [mask[order == r].float().mean().item() for r in range(n)]
    for observed, expected in zip(frequency_by_rank, della_probabilities(n, density, epsilon)):
        assert abs(observed - expected) < 0.01


def test_della_ranks_along_dim_1_of_a_3d_tensor() -> None:
    # (20000, 4, 3): each fiber delta[i, :, k] is a row; magnitudes grow along dim 1
    delta = torch.arange(1, 5).float().view(1, 4, 1).expand(20_000, 4, 3).contiguous()
    mask = della_mask(delta, density=0.5, epsilon=0.4, generator=seeded())
    frequency = mask.float().mean(dim=(0, 2)).tolist()
    for observed, expected in zip(frequency, della_probabilities(4, 0.5, 0.4)):
        assert abs(observed - expected) < 0.01


def test_della_reproducible_and_edge_cases() -> None:
    delta = torch.randn(32, 16)
    a = della_mask(delta, density=0.4, epsilon=0.1, generator=seeded(3))
    assert torch.equal(a, della_mask(delta, density=0.4, epsilon=0.1, generator=seeded(3)))
    assert int(della_mask(delta, density=0.0, epsilon=0.1, generator=seeded()).sum()) == 0
    with pytest.raises(ValueError, match="epsilon"):
        della_mask(delta, density=0.1, epsilon=0.15, generator=seeded())
    with pytest.raises(ValueError, match="epsilon"):
        della_mask(delta, density=0.9, epsilon=0.15, generator=seeded())


def test_della_one_element_rows_use_density() -> None:
    # a column vector has one entry per row (mergekit divides 0/0 here); 0-dim is one row of one
    mask = della_mask(torch.randn(50_000, 1), density=0.3, epsilon=0.1, generator=seeded())
    assert abs(mask.float().mean().item() - 0.3) < 0.01
    assert della_mask(torch.tensor(1.5), density=0.3, epsilon=0.1, generator=seeded()).shape == ()


def test_rescale_restores_the_l1_norm() -> None:
    delta = torch.randn(1000, generator=seeded())
    original_l1 = delta.abs().sum().item()
    mask = bernoulli_mask(delta, density=0.2, generator=seeded(1))
    out = apply_mask_(delta.clone(), mask, rescale=True)
    assert out.abs().sum().item() == pytest.approx(original_l1, rel=1e-5)
    assert torch.equal(out == 0, ~mask | (delta == 0))
    # the kept entries are all scaled by Σ|δ| / Σ|δ ⊙ mask|
    factor = original_l1 / delta[mask].abs().sum().item()
    torch.testing.assert_close(out[mask], delta[mask] * factor)


def test_without_rescale_the_kept_entries_are_unchanged() -> None:
    mask = magnitude_mask(DELTA, density=0.3)
    out = apply_mask_(DELTA.clone(), mask, rescale=False)
    assert torch.equal(out[mask], DELTA[mask])
    assert torch.equal(out[~mask], torch.zeros(7))


def test_rescale_is_skipped_below_1e_7() -> None:
    tiny = torch.tensor([5e-8, 1e-9, 0.0])
    out = apply_mask_(tiny.clone(), torch.tensor([True, False, False]), rescale=True)
    assert torch.equal(out, torch.tensor([5e-8, 0.0, 0.0]))
    out = apply_mask_(DELTA.clone(), torch.zeros(10, dtype=torch.bool), rescale=True)
    assert torch.equal(out.abs(), torch.zeros(10))


def test_sign_election_and_agreement() -> None:
    deltas = [torch.tensor([1.0, -2.0, 0.0, 3.0, -1.0]), torch.tensor([-2.0, 1.0, 0.0, -3.0, 0.0])]
    # sums: -1, -1, 0, 0, -1 -> s = -, -, +, +, -   (a zero sum elects +)
    sign = elect_sign(deltas)
    assert sign.tolist() == [-1.0, -1.0, 1.0, 1.0, -1.0]
    assert agrees_with(deltas[0], sign).tolist() == [0.0, 1.0, 0.0, 1.0, 1.0]
    # zeros agree with neither sign
    assert agrees_with(deltas[1], sign).tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]
    # -0.0 sums elect +, and a mask of +0.0 only: multiplying by it equals masking with a bool
    assert elect_sign([torch.tensor([-0.0]), torch.tensor([-0.0])]).tolist() == [1.0]
    assert not torch.signbit(agrees_with(torch.tensor([-3.0, -0.0, 0.0, 2.0]), torch.tensor([1.0, 1.0, -1.0, -1.0]))).any()


def test_l1_norm_is_exact_where_a_float32_sum_drifts() -> None:
    tenth = torch.full((20_000_000,), 0.1)  # float32(0.1), summed 2·10⁷ times
    assert l1_norm(-tenth) == pytest.approx(20_000_000 * float(tenth[0]), rel=1e-12)


@pytest.mark.parametrize("method", ["ties", "dare_ties", "task_arithmetic"])
def test_blocked_task_arithmetic_equals_one_whole_call(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """TIES/DARE run their elementwise steps in BLOCK-entry blocks; the bytes must equal one call over
    the whole tensor (ties at the magnitude threshold make the TIES cut depend on flat order)."""
    from merger.methods import task_arithmetic
    from merger.methods.registry import get_method

    merge = get_method(method)
    g = torch.Generator().manual_seed(3)
    base = torch.randn(3 * task_arithmetic.BLOCK + 1234, generator=g).bfloat16().float()
    # bf16 inputs make many task-vector magnitudes equal, so the TIES threshold has ties across blocks
    models = [(base + torch.randn(base.shape, generator=g) * 0.05).bfloat16().float() for _ in range(2)]
    kwargs = {"weight": [0.7, 0.4]} | ({} if method == "task_arithmetic" else {"density": [0.5, 0.3]})

    def run() -> torch.Tensor:
        extra = {"generator": torch.Generator().manual_seed(5)} if merge.uses_generator else {}
        return merge.function([m.clone() for m in models], base=base.clone(), **kwargs, **extra)

    blocked = run()
    monkeypatch.setattr(task_arithmetic, "BLOCK", base.numel())  # one block: the whole tensor at once
    whole = run()
    assert torch.equal(blocked.view(torch.int32), whole.view(torch.int32))
    assert not torch.equal(blocked, base)  # the merge did something
