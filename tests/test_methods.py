"""Every merge method against a hand computation on small tensors, plus identities.

Expected values are written out by hand or computed here, in float64 plain Python, from the paper /
spec formulas (merge-methods.md section 3); the code under test is only ever called through the registry
(`get_method(name).function`), so registration, signatures and defaults are covered too.
"""

from __future__ import annotations

import math

import pytest
import torch

from merger.methods.registry import METHODS, get_method

# ---------------------------------------------------------------------------------------------------
# helpers


def run(name: str, tensors: list[torch.Tensor], base: torch.Tensor | None = None, **params) -> torch.Tensor:
    """Call a registered method as the engine does: on its own copies of the inputs (methods may work in
    place), with the base and the seeded generator only when declared."""
    method = get_method(name)
    tensors = [t.clone() for t in tensors]
    if method.base != "none" and base is not None:
        params["base"] = base.clone()
    if method.uses_generator:
        params.setdefault("generator", torch.Generator().manual_seed(0))
    return method.function(tensors, **params)


def values(t: torch.Tensor) -> list[float]:
    return [float(v) for v in t.reshape(-1).tolist()]


def close(actual: torch.Tensor, expected, rtol: float = 1e-6, atol: float = 1e-6) -> None:
    expected = torch.as_tensor(expected, dtype=torch.float64).reshape(actual.shape)
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=atol)


def norm(v: list[float]) -> float:
    return math.sqrt(sum(x * x for x in v))


def dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


def top_positions(v: list[float], k: int) -> set[int]:
    """Positions of the k largest |v|; of equal magnitudes, the lowest positions first (a stable
    descending sort, the engine's tie rule)."""
    return set(sorted(range(len(v)), key=lambda i: (-abs(v[i]), i))[:k])


def reference_task_arithmetic(
    xs: list[torch.Tensor],
    base: torch.Tensor,
    weights: list[float],
    *,
    keep: list[set[int]] | None = None,
    consensus: bool = False,
    normalize: bool = False,
    lam: float = 1.0,
) -> list[float]:
    """Spec 3.6 entry by entry: δᵢ (kept positions only), Wᵢ = wᵢδᵢ, TIES election, normalize, λ."""
    b = values(base)
    deltas = [[x - y for x, y in zip(values(xi), b)] for xi in xs]
    if keep is not None:
        deltas = [[d if j in kept else 0.0 for j, d in enumerate(delta)] for delta, kept in zip(deltas, keep)]
    out = []
    for j in range(len(b)):
        weighted = [w * delta[j] for w, delta in zip(weights, deltas)]
        if consensus:
            sign = 1 if sum(weighted) >= 0 else -1
            agree = [(v > 0 and sign > 0) or (v < 0 and sign < 0) for v in weighted]
            merged = sum(v for v, a in zip(weighted, agree) if a)
            divisor = sum(w for w, a in zip(weights, agree) if a) or 1.0
        else:
            merged = sum(weighted)
            divisor = sum(weights) if abs(sum(weights)) >= 1e-8 else 1.0
        out.append(b[j] + lam * (merged / divisor if normalize else merged))
    return out


def reference_slerp(t: float, a: list[float], b: list[float]) -> list[float]:
    """SLERP of two vectors (Shoemake), lerp when sin θ ≈ 0."""
    cos = dot(a, b) / (max(norm(a), 1e-7) * max(norm(b), 1e-7))
    theta = math.acos(min(max(cos, -1.0), 1.0))
    if abs(math.sin(theta)) < 1e-8:
        return [(1 - t) * x + t * y for x, y in zip(a, b)]
    s0, s1 = math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)
    return [s0 * x + s1 * y for x, y in zip(a, b)]


BASE = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
DELTA_1 = torch.tensor([3.0, -1.0, 0.5, 2.0, -4.0, 1.0])
DELTA_2 = torch.tensor([-2.0, 2.5, 1.0, -0.5, -1.5, 0.25])
X1, X2 = BASE + DELTA_1, BASE + DELTA_2


# ---------------------------------------------------------------------------------------------------
# registry


@pytest.mark.parametrize("name, pretty_name, url, base, min_others, max_others", [
    ("task_arithmetic", "Task Arithmetic", "https://arxiv.org/abs/2212.04089", "required", 1, None),
    ("ties", "TIES", "https://arxiv.org/abs/2306.01708", "required", 1, None),
    ("dare_ties", "DARE TIES", "https://arxiv.org/abs/2311.03099", "required", 1, None),
    ("dare_linear", "Linear DARE", "https://arxiv.org/abs/2311.03099", "required", 1, None),
    ("breadcrumbs", "Model Breadcrumbs", "https://arxiv.org/abs/2312.06795", "required", 1, None),
    ("breadcrumbs_ties", "Model Breadcrumbs with TIES", "https://arxiv.org/abs/2312.06795", "required", 1, None),
    ("della", "DELLA", "https://arxiv.org/abs/2406.11617", "required", 1, None),
    ("della_linear", "Linear DELLA", "https://arxiv.org/abs/2406.11617", "required", 1, None),
    ("sce", "SCE", "https://arxiv.org/abs/2408.07990", "required", 1, None),
    ("model_stock", "Model Stock", "https://arxiv.org/abs/2403.19522", "required", 2, None),
    ("karcher", "Karcher Mean", "https://en.wikipedia.org/wiki/Karcher_mean", "none", 1, None),
    ("multislerp", "Multi-SLERP", "https://goddard.blog/posts/multislerp-wow-what-a-cool-idea", "optional", 1, None),
    ("nuslerp", "NuSLERP", "https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md#nuslerp-nuslerp",
     "optional", 2, 2),
    ("nearswap", "NearSwap", "https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001", "required", 1, 1),
    ("arcee_fusion", "Arcee Fusion",
     "https://www.arcee.ai/blog/meet-mergekit-v0-1-arcee-fusion-expanded-model-support-multi-gpu-acceleration",
     "required", 1, 1),
])
def test_method_is_registered_with_card_metadata_and_model_counts(
    name: str, pretty_name: str, url: str, base: str, min_others: int, max_others: int | None
) -> None:
    method = get_method(name)
    assert (method.pretty_name, method.reference_url, method.base, method.min_others, method.max_others) == (
        pretty_name, url, base, min_others, max_others
    )


@pytest.mark.parametrize("name, parameters, uses_generator", [
    ("task_arithmetic", {"weight": None, "normalize": False, "int8_mask": False, "lambda": 1.0}, False),
    ("ties", {"weight": None, "density": 1.0, "normalize": True, "rescale": False, "int8_mask": False,
              "lambda": 1.0}, False),
    ("dare_ties", {"weight": None, "density": 1.0, "normalize": False, "rescale": True, "int8_mask": False,
                   "lambda": 1.0}, True),
    ("dare_linear", {"weight": None, "density": 1.0, "normalize": False, "rescale": True, "int8_mask": False,
                     "lambda": 1.0}, True),
    ("breadcrumbs", {"weight": None, "density": 1.0, "gamma": 0.01, "normalize": False, "rescale": False,
                     "int8_mask": False, "lambda": 1.0}, False),
    ("breadcrumbs_ties", {"weight": None, "density": 1.0, "gamma": 0.01, "normalize": False, "rescale": False,
                          "int8_mask": False, "lambda": 1.0}, False),
    ("della", {"weight": None, "density": 1.0, "epsilon": 0.15, "normalize": True, "rescale": True,
               "int8_mask": False, "lambda": 1.0}, True),
    ("della_linear", {"weight": None, "density": 1.0, "epsilon": 0.15, "normalize": False, "rescale": True,
                      "int8_mask": False, "lambda": 1.0}, True),
    ("sce", {"select_topk": 1.0, "int8_mask": False}, False),
    ("model_stock", {"filter_wise": False}, False),
    ("karcher", {"max_iter": 10, "tol": 1e-5}, False),
    ("multislerp", {"weight": None, "normalize_weights": True, "eps": 1e-8}, False),
    ("nuslerp", {"weight": None, "nuslerp_flatten": True, "nuslerp_row_wise": False}, False),
    ("nearswap", {"t": None}, False),
    ("arcee_fusion", {}, True),
])
def test_signature_declares_exactly_the_method_parameters(name: str, parameters: dict, uses_generator: bool) -> None:
    method = get_method(name)
    assert {p.name: p.default for p in method.parameters} == parameters
    assert {p.name for p in method.parameters if p.required} == {n for n, d in parameters.items() if d is None}
    assert {p.name for p in method.per_model_parameters} == {"weight", "density", "gamma", "epsilon"} & set(parameters)
    assert method.uses_generator is uses_generator


def test_lambda_config_key_maps_to_the_lambda_underscore_argument() -> None:
    (spec,) = [p for p in get_method("ties").parameters if p.name == "lambda"]
    assert spec.argument == "lambda_" and not spec.per_model
    assert all(p.argument == p.name for p in get_method("ties").parameters if p.name != "lambda")


# ---------------------------------------------------------------------------------------------------
# identities shared by every method


ALL_METHODS = sorted(METHODS)  # every registered method; identity_params fails on one it does not know


def identity_params(name: str, n: int) -> dict:
    """Parameters for `n` non-base inputs that exercise each method's sparsifying / weighting path."""
    per_model = {"weight": [0.6, 0.4][:n] if n == 2 else [1.0] * n}
    return {
        "linear": per_model,
        "slerp": {"t": 0.3},
        "passthrough": {"scale": [None]},
        "task_arithmetic": per_model,
        "ties": per_model | {"density": [0.5] * n},
        "dare_ties": per_model | {"density": [0.5] * n},
        "dare_linear": per_model | {"density": [0.5] * n},
        "breadcrumbs": per_model | {"density": [0.5] * n, "gamma": [0.1] * n},
        "breadcrumbs_ties": per_model | {"density": [0.5] * n, "gamma": [0.1] * n},
        "della": per_model | {"density": [0.5] * n, "epsilon": [0.1] * n},
        "della_linear": per_model | {"density": [0.5] * n, "epsilon": [0.1] * n},
        "sce": {"select_topk": 0.5},
        "model_stock": {},
        "karcher": {},
        "multislerp": per_model,
        "nuslerp": per_model,
        "nearswap": {"t": 0.01},
        "arcee_fusion": {},
        "ram": {},
        "ramplus_tl": {},
    }[name]


def identity_inputs(name: str, x: torch.Tensor) -> list[tuple[list[torch.Tensor], torch.Tensor | None]]:
    """The ways to merge `x` with itself: as every input, and as the base where the method takes one."""
    method = get_method(name)
    n = method.max_others or max(method.min_others, 2)
    if method.base == "none":
        return [([x] * n, None)]
    if method.base == "required":
        return [([x] * n, x)]
    return [([x] * n, None), ([x] * n, x)]


@pytest.mark.parametrize("name", ALL_METHODS)
@pytest.mark.parametrize("shape", [(4, 6), (5,), ()], ids=["matrix", "vector", "scalar"])
def test_merging_a_model_with_itself_returns_it(name: str, shape: tuple[int, ...]) -> None:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)) + 0.5
    for tensors, base in identity_inputs(name, x):
        out = run(name, tensors, base, **identity_params(name, len(tensors)))
        assert out.shape == x.shape and out.dtype == torch.float32
        torch.testing.assert_close(out, x)


# ---------------------------------------------------------------------------------------------------
# linear, slerp (existing methods): endpoints


def test_linear_weights_one_zero_return_the_first() -> None:
    assert torch.equal(run("linear", [X1, X2], weight=[1.0, 0.0]), X1)


@pytest.mark.parametrize("t, expected", [(0.0, X1), (1.0, X2)])
def test_slerp_endpoints(t: float, expected: torch.Tensor) -> None:
    assert torch.equal(run("slerp", [X2], X1, t=t), expected)


# ---------------------------------------------------------------------------------------------------
# task arithmetic family


def test_task_arithmetic_by_hand() -> None:
    # M = δ1 + 0.5·δ2 = [2, 0.25, 1, 1.75, -4.75, 1.125]
    close(run("task_arithmetic", [X1, X2], BASE, weight=[1.0, 0.5]), [3.0, 1.25, 2.0, 2.75, -3.75, 2.125])
    # normalize divides by Σw = 1.5; lambda scales after normalizing
    close(run("task_arithmetic", [X1, X2], BASE, weight=[1.0, 0.5], normalize=True, lambda_=3.0),
          [1 + 3 * m / 1.5 for m in [2.0, 0.25, 1.0, 1.75, -4.75, 1.125]])


def test_task_arithmetic_negative_weight_subtracts_a_task_vector() -> None:
    close(run("task_arithmetic", [X1], BASE, weight=[-1.0]), values(BASE - DELTA_1))


def test_ties_by_hand() -> None:
    # density 0.5 keeps 3 of 6: δ1 -> [3, 0, 0, 2, -4, 0]; δ2 -> [-2, 2.5, 0, 0, -1.5, 0]
    # W1 = [3, 0, 0, 2, -4, 0], W2 = 0.5·δ2 = [-1, 1.25, 0, 0, -0.75, 0]; ΣW = [2, 1.25, 0, 2, -4.75, 0]
    # elected signs + + + + - +; M = [3, 1.25, 0, 2, -4.75, 0]; D = [1, 0.5, 1, 1, 1.5, 1]
    expected = [1 + 3.0, 1 + 2.5, 1.0, 1 + 2.0, 1 - 4.75 / 1.5, 1.0]
    close(run("ties", [X1, X2], BASE, weight=[1.0, 0.5], density=[0.5, 0.5]), expected)
    close(run("ties", [X1, X2], BASE, weight=[1.0, 0.5], density=[0.5, 0.5]),
          reference_task_arithmetic([X1, X2], BASE, [1.0, 0.5], consensus=True, normalize=True,
                                    keep=[top_positions(values(DELTA_1), 3), top_positions(values(DELTA_2), 3)]))


def test_ties_per_model_density_and_lambda() -> None:
    keep = [top_positions(values(DELTA_1), 4), top_positions(values(DELTA_2), 1)]
    expected = reference_task_arithmetic([X1, X2], BASE, [0.7, 0.9], keep=keep, consensus=True, normalize=False,
                                         lam=0.5)
    out = run("ties", [X1, X2], BASE, weight=[0.7, 0.9], density=[0.7, 0.2], normalize=False, lambda_=0.5)
    close(out, expected)


def test_ties_at_density_one_is_task_arithmetic_with_sign_election() -> None:
    out = run("ties", [X1, X2], BASE, weight=[1.0, 0.5])
    close(out, reference_task_arithmetic([X1, X2], BASE, [1.0, 0.5], consensus=True, normalize=True))
    # ... which differs from plain task arithmetic where the signs conflict
    plain = run("task_arithmetic", [X1, X2], BASE, weight=[1.0, 0.5], normalize=True)
    assert not torch.allclose(out, plain)


def test_int8_mask_changes_nothing() -> None:
    for name in ("ties", "breadcrumbs_ties", "dare_ties"):
        params = {"weight": [1.0, 0.5], "density": [0.5, 0.5]}
        assert torch.equal(run(name, [X1, X2], BASE, **params, int8_mask=True), run(name, [X1, X2], BASE, **params))
    assert torch.equal(run("sce", [X1, X2], BASE, int8_mask=True), run("sce", [X1, X2], BASE))


@pytest.mark.parametrize("name", ["dare_linear", "della_linear", "breadcrumbs"])
def test_linear_variants_at_density_one_are_task_arithmetic(name: str) -> None:
    out = run(name, [X1, X2], BASE, weight=[1.0, 0.5])
    close(out, reference_task_arithmetic([X1, X2], BASE, [1.0, 0.5]))


@pytest.mark.parametrize("name", ["dare_ties", "della", "breadcrumbs_ties"])
def test_ties_variants_at_density_one_elect_signs(name: str) -> None:
    out = run(name, [X1, X2], BASE, weight=[1.0, 0.5], normalize=True)
    close(out, reference_task_arithmetic([X1, X2], BASE, [1.0, 0.5], consensus=True, normalize=True))


def test_dare_rescale_keeps_the_l1_norm_and_drops_the_rest() -> None:
    base = torch.randn(2000, generator=torch.Generator().manual_seed(0))
    delta = torch.randn(2000, generator=torch.Generator().manual_seed(1))
    out = run("dare_linear", [base + delta], base, weight=[1.0], density=[0.3]) - base
    # L1-norm matching: Σ|out − base| = Σ|δ|, every kept entry scaled by the same factor
    assert out.abs().sum().item() == pytest.approx(delta.abs().sum().item(), rel=1e-4)
    kept = out != 0
    ratios = out[kept] / delta[kept]
    torch.testing.assert_close(ratios, torch.full_like(ratios, ratios[0].item()), rtol=1e-4, atol=0)
    assert abs(kept.float().mean().item() - 0.3) < 0.05


def test_dare_without_rescale_keeps_the_expected_l1_norm_fraction() -> None:
    base = torch.zeros(100_000)
    delta = torch.randn(100_000, generator=torch.Generator().manual_seed(1))
    out = run("dare_linear", [delta], base, weight=[1.0], density=[0.4], rescale=False)
    kept = out != 0
    assert torch.equal(out[kept], delta[kept])  # unscaled
    assert out.abs().sum().item() == pytest.approx(0.4 * delta.abs().sum().item(), rel=0.02)


@pytest.mark.parametrize("name", ["dare_ties", "dare_linear", "della", "della_linear"])
def test_random_variants_are_reproducible_with_the_seeded_generator(name: str) -> None:
    tensors = [torch.randn(32, 32, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    params = {"weight": [1.0, 1.0], "density": [0.5, 0.5]}

    def merge(seed: int) -> torch.Tensor:
        return run(name, tensors[1:], tensors[0], **params, generator=torch.Generator().manual_seed(seed))

    state = torch.get_rng_state()
    assert torch.equal(merge(3), merge(3))
    assert not torch.equal(merge(3), merge(4))
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is untouched


def test_breadcrumbs_by_hand() -> None:
    # N=6, density 0.5 -> keep 3; gamma 0.2 -> n_top = 1: drop the largest, keep ascending ranks [2, 5)
    d1 = torch.tensor([3.0, -1.1, 0.5, 2.0, -4.0, 1.0])
    d2 = torch.tensor([-2.0, 2.5, 1.2, -0.5, -1.5, 0.25])
    out = run("breadcrumbs", [BASE + d1, BASE + d2], BASE, weight=[1.0, 2.0], density=[0.5, 0.5], gamma=[0.2, 0.2])
    # δ1 keeps 3, 2, -1.1 (drops -4); δ2 keeps -2, -1.5, 1.2 (drops 2.5)
    kept_1 = torch.tensor([3.0, -1.1, 0.0, 2.0, 0.0, 0.0])
    kept_2 = torch.tensor([-2.0, 0.0, 1.2, 0.0, -1.5, 0.0])
    close(out, values(BASE + kept_1 + 2 * kept_2))


def test_breadcrumbs_ties_matches_the_reference() -> None:
    def middle(v: list[float], n_bottom: int, n_top: int) -> set[int]:
        ascending = sorted(range(len(v)), key=lambda i: abs(v[i]))
        return set(ascending[n_bottom:len(v) - n_top])

    d1 = [3.0, -1.1, 0.5, 2.0, -4.0, 1.0]
    d2 = [-2.0, 2.5, 1.2, -0.5, -1.5, 0.25]
    out = run("breadcrumbs_ties", [BASE + torch.tensor(d1), BASE + torch.tensor(d2)], BASE,
              weight=[1.0, 2.0], density=[0.5, 0.5], gamma=[0.2, 0.2])
    expected = reference_task_arithmetic(
        [BASE + torch.tensor(d1), BASE + torch.tensor(d2)], BASE, [1.0, 2.0], consensus=True,
        keep=[middle(d1, 2, 1), middle(d2, 2, 1)],
    )
    close(out, expected)


def test_breadcrumbs_gamma_zero_keeps_the_task_vector() -> None:
    # density 1: identity; density 0.5 with gamma 0: the top half (docs/decisions.md: not all zeros)
    close(run("breadcrumbs", [X1], BASE, weight=[1.0], density=[1.0], gamma=[0.0]), values(X1))
    out = run("breadcrumbs", [X1], BASE, weight=[1.0], density=[0.5], gamma=[0.0])
    close(out, reference_task_arithmetic([X1], BASE, [1.0], keep=[top_positions(values(DELTA_1), 3)]))


def test_della_rejects_epsilon_outside_the_density_range() -> None:
    with pytest.raises(ValueError, match="epsilon"):
        run("della", [X1, X2], BASE, weight=[1.0, 1.0], density=[0.1, 0.1])  # default epsilon 0.15


# ---------------------------------------------------------------------------------------------------
# sce


def reference_sce(xs: list[torch.Tensor], base: torch.Tensor, select_topk: float) -> list[float]:
    b = values(base)
    taus = [[x - y for x, y in zip(values(xi), b)] for xi in xs]
    n = len(taus)
    if select_topk < 1:
        variance = [sum((t[j] - sum(u[j] for u in taus) / n) ** 2 for t in taus) / n for j in range(len(b))]
        k = int(sum(v != 0 for v in variance) * select_topk)
        selected = set(sorted(range(len(b)), key=lambda j: variance[j])[len(b) - k:]) if k else set()
        taus = [[t[j] if j in selected else 0.0 for j in range(len(b))] for t in taus]
    energies = [sum(v * v for v in t) / len(t) for t in taus]
    omegas = [1 / n] * n if sum(energies) < 1e-6 else [e / sum(energies) for e in energies]
    out = []
    for j in range(len(b)):
        sign = 1 if sum(t[j] for t in taus) >= 0 else -1
        agree = [(t[j] > 0 and sign > 0) or (t[j] < 0 and sign < 0) for t in taus]
        merged = sum(t[j] * w for t, w, a in zip(taus, omegas, agree) if a)
        divisor = max(sum(w for w, a in zip(omegas, agree) if a), 1e-6)
        out.append(b[j] + merged / divisor)
    return out


@pytest.mark.parametrize("select_topk", [1.0, 0.5, 0.25])
def test_sce_matches_the_reference(select_topk: float) -> None:
    xs = [X1, X2, BASE + torch.tensor([0.5, -3.0, 2.0, 1.0, 0.1, -0.6])]
    close(run("sce", xs, BASE, select_topk=select_topk), reference_sce(xs, BASE, select_topk))


def test_sce_by_hand() -> None:
    # one model: ω = 1, every nonzero entry agrees with itself -> the model; zero entries -> the base
    close(run("sce", [X1], BASE), values(X1))
    # two opposite task vectors of equal energy: Σ = 0 elects +, so only the positive one counts
    close(run("sce", [BASE + 1, BASE - 1], BASE), values(BASE + 1))


# ---------------------------------------------------------------------------------------------------
# model_stock


def test_model_stock_t_formula_two_models() -> None:
    w0 = torch.tensor([1.0, 2.0, 3.0])
    w1, w2 = w0 + torch.tensor([1.0, 0.0, 0.0]), w0 + torch.tensor([1.0, 1.0, 0.0])
    cos = 1 / math.sqrt(2)
    t = 2 * cos / (1 + cos)
    expected = [t * (a + b) / 2 + (1 - t) * c for a, b, c in zip(values(w1), values(w2), values(w0))]
    close(run("model_stock", [w1, w2], w0), expected)


def test_model_stock_averages_pairwise_cosines_of_three() -> None:
    gen = torch.Generator().manual_seed(5)
    w0 = torch.randn(2, 4, generator=gen)
    ws = [w0 + torch.randn(2, 4, generator=gen) for _ in range(3)]
    offsets = [[a - b for a, b in zip(values(w), values(w0))] for w in ws]
    pairs = [(0, 1), (0, 2), (1, 2)]
    cos = sum(dot(offsets[i], offsets[j]) / (norm(offsets[i]) * norm(offsets[j])) for i, j in pairs) / 3
    t = 3 * cos / (1 + 2 * cos)
    expected = [t * sum(col) / 3 + (1 - t) * b for col, b in zip(zip(*map(values, ws)), values(w0))]
    close(run("model_stock", ws, w0), expected, rtol=1e-5, atol=1e-5)


def test_model_stock_filter_wise_uses_one_t_per_row() -> None:
    w0 = torch.zeros(2, 2)
    w1 = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    w2 = torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # row 0 orthogonal (t = 0), row 1 parallel (t = 1)
    close(run("model_stock", [w1, w2], w0, filter_wise=True), [[0.0, 0.0], [1.0, 0.0]])
    # whole tensor: cos = 1/2, t = 2·0.5/1.5 = 2/3
    close(run("model_stock", [w1, w2], w0), [[1 / 3, 1 / 3], [2 / 3, 0.0]])


# ---------------------------------------------------------------------------------------------------
# nuslerp, multislerp, karcher


def test_nuslerp_of_two_without_base() -> None:
    a, b = torch.tensor([[1.0, 2.0], [0.5, -1.0]]), torch.tensor([[-1.0, 0.5], [2.0, 1.0]])
    # t = w2 / (w1 + w2) = 3/4; whole tensor is one vector
    close(run("nuslerp", [a, b], weight=[1.0, 3.0]), reference_slerp(0.75, values(a), values(b)))


def test_nuslerp_of_two_with_base_slerps_task_vectors() -> None:
    base = torch.tensor([[0.5, 0.5], [0.5, 0.5]])
    a, b = torch.tensor([[1.0, 2.0], [0.5, -1.0]]), torch.tensor([[-1.0, 0.5], [2.0, 1.0]])
    task = reference_slerp(0.4, values(a - base), values(b - base))
    close(run("nuslerp", [a, b], base, weight=[0.6, 0.4]), [x + y for x, y in zip(task, values(base))])


def test_nuslerp_rows_and_columns() -> None:
    a, b = torch.tensor([[1.0, 2.0], [0.5, -1.0]]), torch.tensor([[-1.0, 0.5], [2.0, 1.0]])
    rows = [reference_slerp(0.5, values(a[i]), values(b[i])) for i in range(2)]
    close(run("nuslerp", [a, b], weight=[1.0, 1.0], nuslerp_flatten=False), rows)
    columns = [reference_slerp(0.5, values(a[:, j]), values(b[:, j])) for j in range(2)]
    close(run("nuslerp", [a, b], weight=[1.0, 1.0], nuslerp_flatten=False, nuslerp_row_wise=True),
          [[columns[0][0], columns[1][0]], [columns[0][1], columns[1][1]]])


def test_nuslerp_zero_weight_sum_and_colinear_inputs() -> None:
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    close(run("nuslerp", [a, b], weight=[1.0, -1.0]), reference_slerp(0.5, values(a), values(b)))  # t = 0.5
    close(run("nuslerp", [a, 3 * a], weight=[1.0, 1.0]), [2.0, 0.0])  # colinear: lerp
    close(run("nuslerp", [a, b], weight=[1.0, 0.0]), values(a))  # t = 0: the first model


def reference_multislerp(xs: list[torch.Tensor], weights: list[float], base: torch.Tensor | None = None,
                         eps: float = 1e-8) -> list[float]:
    """Spec 3.4 steps in float64."""
    b = values(base) if base is not None else None
    vs = [[x - (b[j] if b else 0.0) for j, x in enumerate(values(xi))] for xi in xs]
    w = [wi / sum(weights) for wi in weights]
    norms = [norm(v) for v in vs]
    units = [[x / (n + eps) for x in v] for v, n in zip(vs, norms)]
    m = [sum(wi * u[j] for wi, u in zip(w, units)) for j in range(len(vs[0]))]
    m_hat = [x / norm(m) for x in m]
    tangents = [[u[j] - dot(u, m_hat) * m_hat[j] for j in range(len(u))] for u in units]
    tau = [sum(wi * t[j] for wi, t in zip(w, tangents)) for j in range(len(m))]
    length = norm(tau) + eps
    r = [mh * math.cos(length) + t * math.sin(length) / length for mh, t in zip(m_hat, tau)]
    scale = sum(wi * n for wi, n in zip(w, norms))
    return [x * scale + (b[j] if b else 0.0) for j, x in enumerate(r)]


def test_multislerp_of_two_with_and_without_base() -> None:
    a, b = torch.tensor([3.0, 0.0, 1.0]), torch.tensor([0.0, 2.0, 1.0])
    close(run("multislerp", [a, b], weight=[1.0, 1.0]), reference_multislerp([a, b], [1.0, 1.0]), rtol=1e-5)
    base = torch.tensor([0.5, 0.5, 0.0])
    close(run("multislerp", [a, b], base, weight=[2.0, 1.0]), reference_multislerp([a, b], [2.0, 1.0], base),
          rtol=1e-5)
    # two orthogonal vectors of norm 1 and 3 at equal weight: the 45° direction, scaled by the mean norm 2
    close(run("multislerp", [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 3.0])], weight=[1.0, 1.0]),
          [2 / math.sqrt(2), 2 / math.sqrt(2)], rtol=1e-5)


def test_multislerp_of_three_and_antipodal_inputs() -> None:
    xs = [torch.tensor([1.0, 0.2, 0.0]), torch.tensor([0.0, 2.0, 0.3]), torch.tensor([0.1, 0.0, 1.5])]
    close(run("multislerp", xs, weight=[1.0, 2.0, 3.0]), reference_multislerp(xs, [1.0, 2.0, 3.0]), rtol=1e-5)
    a = torch.tensor([1.0, 2.0])
    close(run("multislerp", [a, -a], weight=[1.0, 1.0]), [0.0, 0.0])  # two: the weighted sum
    # three whose weighted unit vectors cancel: the weighted linear mean ¼a − ½a + ¼a = 0, not an error
    close(run("multislerp", [a, -a, a], weight=[1.0, 2.0, 1.0]), [0.0, 0.0])


def test_karcher_by_hand() -> None:
    # orthogonal directions at equal weight: the geodesic midpoint, scaled by the mean norm (2 + 4)/2
    close(run("karcher", [torch.tensor([2.0, 0.0]), torch.tensor([0.0, 4.0])]),
          [3 / math.sqrt(2), 3 / math.sqrt(2)], rtol=1e-5)
    # three orthogonal directions: the diagonal; a zero input counts in the norm average only
    close(run("karcher", [torch.tensor([1.0, 0, 0]), torch.tensor([0, 2.0, 0]), torch.tensor([0, 0, 3.0])]),
          [2 / math.sqrt(3)] * 3, rtol=1e-5)
    close(run("karcher", [torch.zeros(2), torch.tensor([2.0, 0.0]), torch.tensor([0.0, 4.0])]),
          [2 / math.sqrt(2), 2 / math.sqrt(2)], rtol=1e-5)
    assert torch.equal(run("karcher", [torch.zeros(3), torch.zeros(3)]), torch.zeros(3))


def test_karcher_of_identical_inputs_is_the_input() -> None:
    x = torch.tensor([[0.3, -1.2], [2.0, 0.7]])
    close(run("karcher", [x, x, x]), values(x))


def test_karcher_mean_is_not_the_normalised_sum() -> None:
    # unequal angles: the Karcher mean minimises the squared geodesic distances, unlike the chordal mean
    xs = [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), torch.tensor([0.0, 1.0])]
    angle = math.pi / 3  # the angles 0, π/2, π/2 average to π/3
    close(run("karcher", xs, max_iter=50, tol=1e-9), [math.cos(angle), math.sin(angle)], rtol=1e-5)


# ---------------------------------------------------------------------------------------------------
# nearswap, arcee_fusion


def test_nearswap_by_hand() -> None:
    a = torch.tensor([1.0, 1.0, 1.0, 1.0])
    b = a + torch.tensor([0.05, 0.2, -1.0, 0.0])
    # |a − b| = 0.05, 0.2, 1, 0 -> wgt = t/|a − b| = 2 -> 1, 0.5, 0.1, ∞ -> 1
    close(run("nearswap", [b], a, t=0.1), [1.05, 1.1, 0.9, 1.0])
    close(run("nearswap", [b], a, t=0.0), values(a))


def reference_arcee_fusion(a: torch.Tensor, b: torch.Tensor) -> list[list[float]]:
    rows_a, rows_b = a.tolist(), b.tolist()
    importance = []
    for ra, rb in zip(rows_a, rows_b):
        p = [math.exp(x) / sum(math.exp(y) for y in rb) + 1e-8 for x in rb]
        q = [math.exp(x) / sum(math.exp(y) for y in ra) + 1e-8 for x in ra]
        kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
        importance.append([abs(y - x) * kl for x, y in zip(ra, rb)])
    ordered = sorted(v for row in importance for v in row)
    q1, median, q3 = (ordered[int(f * (len(ordered) - 1))] for f in (0.25, 0.5, 0.75))
    threshold = median + 1.5 * (q3 - q1)
    return [[y if i >= threshold else x for x, y, i in zip(ra, rb, ri)]
            for ra, rb, ri in zip(rows_a, rows_b, importance)]


def test_arcee_fusion_output() -> None:
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(6, 8, generator=gen)
    b = a + 0.01 * torch.randn(6, 8, generator=gen)
    b[2] += torch.linspace(-2, 2, 8)  # one row changes a lot: its large changes are fused
    expected = reference_arcee_fusion(a, b)
    fused = sum(x != y for ra, re in zip(a.tolist(), expected) for x, y in zip(ra, re))
    assert 0 < fused < 48
    close(run("arcee_fusion", [b], a), expected)


def test_arcee_fusion_threshold_is_median_plus_1_5_iqr_at_floor_quantile_indices() -> None:
    # 1-D: one KL for the whole vector, so importance ranks like |b − a|. n = 10: Q1, median, Q3 are
    # sorted entries 2, 4, 6 (floor(q·9)) = 3, 5, 7 -> threshold 5 + 1.5·(7 − 3) = 11 (times the KL)
    a = torch.zeros(10)
    b = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 10.8, 11.3]) / 4
    out = run("arcee_fusion", [b], a)
    assert torch.equal(out, torch.where(torch.arange(10) == 9, b, a))  # only 11.3 ≥ 11
    close(out, reference_arcee_fusion(a.view(1, -1), b.view(1, -1))[0])


def test_arcee_fusion_subsamples_large_tensors_with_the_generator() -> None:
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(1001, 1000, generator=gen)
    b = a + torch.randn(1001, 1000, generator=gen) * torch.rand(1001, 1, generator=gen)

    def merge(seed: int) -> torch.Tensor:
        return run("arcee_fusion", [b], a, generator=torch.Generator().manual_seed(seed))

    state = torch.get_rng_state()
    out = merge(0)
    assert torch.equal(out, merge(0))
    assert torch.equal(torch.get_rng_state(), state)
    assert bool(((out == a) | (out == b)).all())


# ---------------------------------------------------------------------------------------------------
# scalars


@pytest.mark.parametrize("name", [name for name in ALL_METHODS if name not in ("linear", "slerp", "passthrough")])
def test_scalar_tensors_merge_like_one_element_vectors(name: str) -> None:
    n = get_method(name).max_others or 2
    base, xs = torch.tensor(0.5), [torch.tensor(1.5), torch.tensor(-2.5)][:n]
    scalar = run(name, xs, base, **identity_params(name, n))
    vector = run(name, [x.reshape(1) for x in xs], base.reshape(1), **identity_params(name, n))
    assert scalar.shape == () and scalar.dtype == torch.float32
    assert torch.equal(scalar.reshape(1), vector)


def test_slerp_angle_does_not_depend_on_the_thread_count() -> None:
    from merger.methods.slerp import slerp_coefficients

    generator = torch.Generator().manual_seed(0)
    v0 = torch.randn(1_000_003, generator=generator)
    v1 = v0 + 0.5 * torch.randn(1_000_003, generator=generator)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            results.append(slerp_coefficients(lambda: [((v1,), v0)], tuple(v0.shape), t=0.3))
    finally:
        torch.set_num_threads(threads)
    assert results[0] == results[1] == results[2] is not None
    # and the angle is the float64 one
    cos = float(torch.dot(v0.double(), v1.double()) / (v0.double().norm() * v1.double().norm()))
    theta = math.acos(cos)
    assert results[0][1] == pytest.approx(math.sin(0.3 * theta) / math.sin(theta), rel=1e-6)


# ---------------------------------------------------------------------------------------------------
# degenerate cases (rule 2): zero norms, opposed vectors, near-zero divisors, empty masks. Each method
# has a defined fallback, stated in its docstring; the expected values below are that fallback, by hand.


def test_model_stock_of_exactly_opposed_task_vectors_is_the_base() -> None:
    # offsets (1, 0, 0) and (−1, 0, 0): cos θ = −1 = −1/(N − 1), the formula's denominator is 0.
    # Fallback t = −1: out = −mean(wᵢ) + 2·w₀, and mean(wᵢ) = w₀, so the base (mergekit writes NaN here).
    w0 = torch.tensor([1.0, 2.0, 3.0])
    out = run("model_stock", [w0 + torch.tensor([1.0, 0, 0]), w0 - torch.tensor([1.0, 0, 0])], w0)
    close(out, [1.0, 2.0, 3.0])
    # three offsets 120° apart: mean pairwise cos θ = −1/2 = −1/(N − 1); their mean is 0 -> the base
    w0 = torch.tensor([0.5, -1.0])
    offsets = [(1.0, 0.0), (-0.5, math.sqrt(3) / 2), (-0.5, -math.sqrt(3) / 2)]
    out = run("model_stock", [w0 + torch.tensor(o) for o in offsets], w0)
    assert torch.isfinite(out).all()
    close(out, [0.5, -1.0])


@pytest.mark.parametrize("cos", [-0.999, -3 / math.sqrt(10)])
def test_model_stock_near_opposed_task_vectors_clamps_t_to_minus_one(cos: float) -> None:
    # two unit offsets at angle acos(cos): the formula's t = 2c/(1 + c) is −1998 at c = −0.999 (−37 at
    # −0.949); clamped to −1, out = w₀ − mean offset, never farther from the base than the fine-tunes' mean
    sin = math.sqrt(1 - cos * cos)
    w0 = torch.tensor([1.0, 1.0])
    o1, o2 = (1.0, 0.0), (cos, sin)
    mean_offset = [(o1[0] + o2[0]) / 2, (o1[1] + o2[1]) / 2]
    out = run("model_stock", [w0 + torch.tensor(o1), w0 + torch.tensor(o2)], w0)
    close(out, [1.0 - mean_offset[0], 1.0 - mean_offset[1]], rtol=1e-5, atol=1e-6)


def test_model_stock_is_mergekits_formula_above_the_clamp() -> None:
    # cos θ = −0.2 > −1/3 (where t = −1 for N = 2): t = 2·(−0.2)/(1 − 0.2) = −0.5, unclamped
    w0 = torch.tensor([2.0, -1.0])
    o1, o2 = (1.0, 0.0), (-0.2, math.sqrt(0.96))
    out = run("model_stock", [w0 + torch.tensor(o1), w0 + torch.tensor(o2)], w0)
    close(out, [2.0 - 0.5 * (1 - 0.2) / 2, -1.0 - 0.5 * math.sqrt(0.96) / 2], rtol=1e-5, atol=1e-6)


def test_model_stock_of_models_equal_to_the_base_is_the_base_exactly() -> None:
    w0 = torch.tensor([[0.25, -3.0], [7.0, 0.5]])
    assert torch.equal(run("model_stock", [w0, w0, w0], w0), w0)
    assert torch.equal(run("model_stock", [w0, w0], w0, filter_wise=True), w0)


def test_slerp_of_a_zero_vector_or_opposed_vectors_lerps() -> None:
    zero, v = torch.zeros(2), torch.tensor([2.0, 4.0])
    close(run("slerp", [v], zero, t=0.25), [0.5, 1.0])  # 0.75·0 + 0.25·v (mergekit: sin(π/8)·v)
    close(run("slerp", [zero], v, t=0.25), [1.5, 3.0])
    close(run("slerp", [torch.tensor([-2.0, -4.0])], torch.tensor([1.0, 2.0]), t=0.25), [0.25, 0.5])


def test_nuslerp_of_opposed_or_zero_vectors_lerps() -> None:
    a = torch.tensor([1.0, 2.0])
    close(run("nuslerp", [a, -2 * a], weight=[1.0, 1.0]), [-0.5, -1.0])  # mergekit: ±2895·a
    close(run("nuslerp", [torch.zeros(2), a], weight=[1.0, 3.0]), [0.75, 1.5])
    # with a base, a model equal to it has a zero task vector: base + ¼·(other's task vector)
    base = torch.tensor([1.0, -1.0])
    close(run("nuslerp", [base, base + torch.tensor([2.0, 0.0])], base, weight=[3.0, 1.0]), [1.5, -1.0])
    # per row: row 0 opposed (lerp to 0), row 1 orthogonal (slerp midpoint, √2/2 each)
    x, y = torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[-1.0, 0.0], [0.0, 1.0]])
    half = math.sqrt(2) / 2
    close(run("nuslerp", [x, y], weight=[1.0, 1.0], nuslerp_flatten=False), [[0.0, 0.0], [half, half]])


def test_nuslerp_per_vector_of_empty_tensors_keeps_their_shape() -> None:
    for shape in ((0, 5), (3, 0)):
        for row_wise in (False, True):
            out = run("nuslerp", [torch.ones(shape), torch.ones(shape)], weight=[1.0, 1.0], nuslerp_flatten=False,
                      nuslerp_row_wise=row_wise)
            assert out.shape == shape


def test_multislerp_of_models_equal_to_the_base_is_the_base_exactly() -> None:
    base = torch.tensor([0.5, -2.0, 3.0])
    assert torch.equal(run("multislerp", [base, base, base], base, weight=[1.0, 2.0, 3.0]), base)


def test_multislerp_zero_weight_sum_is_refused_by_name(fixture_models_dir) -> None:
    from merger.errors import WeightSumError
    from merger.validate import validate_config

    p, c = fixture_models_dir / "mistral-prose", fixture_models_dir / "mistral-code"
    text = (f"merge_method: multislerp\nmodels:\n  - model: {p}\n    parameters: {{weight: 1}}\n"
            f"  - model: {c}\n    parameters: {{weight: -1}}\n")
    with pytest.raises(WeightSumError, match="normalize_weights"):
        validate_config(text)


def test_karcher_of_opposed_inputs_keeps_the_first_direction() -> None:
    # a and −3a: the mean direction is undefined; the first input's, times the mean norm (√5 + 3√5)/2
    a = torch.tensor([1.0, 2.0])
    close(run("karcher", [a, -3 * a]), [2.0, 4.0], rtol=1e-6)


@pytest.mark.parametrize("name, params", [
    ("ties", {"density": [0.1, 0.1]}),  # k = int(0.1·4) = 0: empty masks
    ("dare_ties", {"density": [0.0, 0.0]}),
    ("dare_linear", {"density": [0.0, 0.0]}),
    ("breadcrumbs", {"density": [0.0, 0.0], "gamma": [0.1, 0.1]}),
    ("breadcrumbs_ties", {"density": [0.0, 0.0], "gamma": [0.1, 0.1]}),
    ("della", {"density": [0.0, 0.0], "epsilon": [0.1, 0.1]}),
    ("della_linear", {"density": [0.0, 0.0], "epsilon": [0.1, 0.1]}),
])
def test_empty_masks_return_the_base_exactly(name: str, params: dict) -> None:
    # nothing kept: every task vector is 0; TIES's per-entry divisor Σ wᵢ·mᵢ is 0 and divides by 1
    base = torch.tensor([1.0, -2.0, 0.5, 4.0])
    xs = [base + torch.tensor([3.0, -1.0, 0.5, 2.0]), base + torch.tensor([-2.0, 2.5, 1.0, -0.5])]
    out = run(name, xs, base, weight=[1.0, 1.0], **params)
    assert torch.equal(out, base)


def test_sce_with_an_empty_selection_or_one_zero_task_vector() -> None:
    base = torch.tensor([1.0, -2.0, 0.5, 4.0])
    tau = torch.tensor([3.0, -1.0, 0.0, 2.0])
    assert torch.equal(run("sce", [base + tau, base - tau], base, select_topk=0.0), base)  # k = 0
    # ω = (0, 1); the zero task vector agrees with no sign, so each entry divides by 1: base + τ
    close(run("sce", [base, base + tau], base), values(base + tau))


def test_task_arithmetic_normalize_with_a_zero_weight_sum_divides_by_one() -> None:
    base = torch.tensor([1.0, 1.0])
    out = run("task_arithmetic", [torch.tensor([3.0, 2.0]), torch.tensor([2.0, -1.0])], base,
              weight=[1.0, -1.0], normalize=True)
    close(out, [1.0 + 2.0 - 1.0, 1.0 + 1.0 + 2.0])  # base + δ₁ − δ₂, divided by 1 instead of 0


def test_nearswap_and_arcee_fusion_of_equal_inputs_are_the_base() -> None:
    a = torch.tensor([[1.0, -2.0], [0.0, 3.0]])
    assert torch.equal(run("nearswap", [a], a, t=0.5), a)  # |a − b| = 0 floors at 1e-6: weight 1, b = a
    assert torch.equal(run("arcee_fusion", [a], a), a)  # importance 0 everywhere, threshold 0
    assert torch.equal(run("arcee_fusion", [torch.zeros(2, 2)], torch.zeros(2, 2)), torch.zeros(2, 2))


@pytest.mark.parametrize("name", ALL_METHODS)
def test_every_method_is_finite_on_zero_and_on_opposed_inputs(name: str) -> None:
    base = torch.zeros(3, 4)
    x = torch.arange(12, dtype=torch.float32).reshape(3, 4) - 5.5
    method = get_method(name)
    n = method.max_others or max(method.min_others, 2)
    for tensors in ([base] * n, [x if i % 2 == 0 else -x for i in range(n)]):
        out = run(name, tensors, base, **identity_params(name, n))
        assert torch.isfinite(out).all(), (name, out)
