"""RAM and RAM+ (tensor-local) against hand computations on small tensors (arXiv:2601.13572)."""

from __future__ import annotations

import pytest
import torch

from merger.methods import get_method
from merger.methods.ram import ramplus_scales

BASE = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, -1.0])
# entry 0: models 1 and 2 changed it (shared); 1: models 1 and 3 (shared); 2: nobody; 3: model 1 by 1e-6,
# below ε = 1e-5 (unchanged); 4: only model 2 (unique); 5: only model 1 (unique)
TAUS = [
    torch.tensor([1.0, 2.0, 0.0, 1e-6, 0.0, 5.0]),
    torch.tensor([3.0, 0.0, 0.0, 0.0, -4.0, 0.0]),
    torch.tensor([0.0, 4.0, 0.0, 0.0, 0.0, 0.0]),
]


def run(name: str, **params) -> torch.Tensor:
    models = [BASE + tau for tau in TAUS]
    return get_method(name).function([m.clone() for m in models], base=BASE.clone(), **params)


def test_ram_keeps_unique_changes_and_averages_shared_ones() -> None:
    # shared: (1 + 3)/2 = 2 and (2 + 4)/2 = 3; unique: −4 and 5 whole; the 1e-6 change is ignored
    expected = BASE + torch.tensor([2.0, 3.0, 0.0, 0.0, -4.0, 5.0])
    torch.testing.assert_close(run("ram"), expected, rtol=0, atol=1e-6)


def test_ram_epsilon_decides_what_counts_as_a_change() -> None:
    # ε = 2.5: only |τ| > 2.5 counts: entry 0 (3 alone), 1 (4 alone), 4 (−4), 5 (5)
    expected = BASE + torch.tensor([3.0, 4.0, 0.0, 0.0, -4.0, 5.0])
    torch.testing.assert_close(run("ram", epsilon=2.5), expected, rtol=0, atol=1e-6)


def test_ramplus_scales_each_models_unique_changes_by_its_overlap_ratio() -> None:
    # model 1: 2 shared entries, 1 unique → ρ = 2, λ = 1 + 0.5·2 = 2 on its unique 5
    # model 2: 1 shared, 1 unique → ρ = 1, λ = 1.5 on its unique −4; model 3 has no unique entry
    out = run("ramplus_tl", r=0.5, alpha=5.0)
    torch.testing.assert_close(out, BASE + torch.tensor([2.0, 3.0, 0.0, 0.0, -6.0, 10.0]), rtol=0, atol=1e-6)
    # α = 1 caps model 1's ratio: λ = 1 + 0.5·1 = 1.5 for both
    out = run("ramplus_tl", r=0.5, alpha=1.0)
    torch.testing.assert_close(out, BASE + torch.tensor([2.0, 3.0, 0.0, 0.0, -6.0, 7.5]), rtol=0, atol=1e-6)


def test_ramplus_defaults_and_zero_r_are_ram() -> None:
    # defaults r = 0.1, α = 0.2: ρ₁ = 2 and ρ₂ = 1 both capped at 0.2, λ = 1.02
    expected = BASE + torch.tensor([2.0, 3.0, 0.0, 0.0, -4.0 * 1.02, 5.0 * 1.02])
    torch.testing.assert_close(run("ramplus_tl"), expected, rtol=0, atol=1e-6)
    assert torch.equal(run("ramplus_tl", r=0.0), run("ram"))


def test_ramplus_scales_count_over_every_slice() -> None:
    models = [(BASE + tau) for tau in TAUS]

    def halves():
        return [([m[:3] for m in models], BASE[:3]), ([m[3:] for m in models], BASE[3:])]

    scales = ramplus_scales(halves, (6,), epsilon=1e-5, r=0.5, alpha=5.0)
    assert scales == pytest.approx([2.0, 1.5, 3.5])  # model 3: 1 shared / max(0, ε) → capped at α = 5


def test_ram_registration() -> None:
    for name in ("ram", "ramplus_tl"):
        method = get_method(name)
        assert method.base == "required" and method.elementwise
    assert {p.name: p.default for p in get_method("ramplus_tl").parameters} == {"r": 0.1, "alpha": 0.2, "epsilon": 1e-5}
    assert get_method("ram").parameters[0].range.problem(2.0)  # ε is at most 1
