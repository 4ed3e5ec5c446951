"""Every method end to end on the trained Mistral fixtures (base + prose and code fine-tunes).

Each output is loaded by transformers; the task-arithmetic family's perplexities are printed beside the
parents'. Golden sha256 digests pin the bytes every method writes: speed work must never change results.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest
import torch

from merger.execute import executor, job_math
from merger.methods import sparsify
from merger.engine import run_merge
from merger.methods.registry import METHODS, SLICE
from merger.methods.reductions import LANES
from helpers import bits_per_token

W = "parameters: {weight: 0.5}"
WD = "parameters: {weight: 0.5, density: 0.5}"


def config(method: str, fx: Path) -> str:
    """A representative config for `method` over the fixtures (base = mistral-base)."""
    b, p, c = fx / "mistral-base", fx / "mistral-prose", fx / "mistral-code"
    two = f"  - model: {p}\n    {{w}}\n  - model: {c}\n    {{w}}\n"
    with_base = f"base_model: {b}\nmodels:\n" + two
    extra = {
        "linear": (f"models:\n{two}", W, ""),
        "slerp": (f"base_model: {p}\nmodels:\n  - model: {p}\n  - model: {c}\n", "", "parameters: {t: 0.4}\n"),
        "passthrough": (f"slices:\n  - sources: [{{model: {p}, layer_range: [0, 2]}}]\n"
                        f"  - sources: [{{model: {c}, layer_range: [1, 4]}}]\n", "", ""),
        "task_arithmetic": (with_base, W, ""),
        "ties": (with_base, WD, ""),
        "dare_ties": (with_base, WD, ""),
        "dare_linear": (with_base, WD, ""),
        "breadcrumbs": (with_base, "parameters: {weight: 0.5, density: 0.8, gamma: 0.05}", ""),
        "breadcrumbs_ties": (with_base, "parameters: {weight: 0.5, density: 0.8, gamma: 0.05}", ""),
        "della": (with_base, "parameters: {weight: 0.5, density: 0.6, epsilon: 0.1}", ""),
        "della_linear": (with_base, "parameters: {weight: 0.5, density: 0.6, epsilon: 0.1}", ""),
        "model_stock": (with_base, "", ""),
        "nuslerp": (with_base, W, ""),
        "multislerp": (with_base, W, ""),
        "karcher": (f"models:\n{two}", "", ""),
        "sce": (with_base, "", "parameters: {select_topk: 0.5}\n"),
        "ram": (with_base, "", "parameters: {epsilon: 0.0001}\n"),
        "ramplus_tl": (with_base, "", "parameters: {r: 0.5, alpha: 0.5, epsilon: 0.0001}\n"),
        "nearswap": (f"base_model: {b}\nmodels:\n  - model: {p}\n", "", "parameters: {t: 0.001}\n"),
        "arcee_fusion": (f"base_model: {b}\nmodels:\n  - model: {p}\n", "", "dtype: float16\n"),
    }[method]
    body, weight, tail = extra
    return f"merge_method: {method}\n{body.replace('{w}', weight) if weight else body.replace(chr(10) + '    {w}', '')}{tail}"


def sha256(out: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(out.glob("*.safetensors")) + [out / "config.json"]:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


# Digests of every method's output (torch 2.13.0, CPU), pinned before the speed work: speed never changes
# results. Re-pinned once for the four methods that select the top-k magnitudes (breadcrumbs,
# breadcrumbs_ties, sce, ties) when that selection got a defined tie rule (equal scores at the threshold:
# lowest index first) in place of `torch.topk`'s implementation-defined choice; and once for the four
# that rescale (dare_linear, dare_ties, della, della_linear) when their L1 norms moved from float32,
# which drifts with the thread count, to float64, DARE's masks also moving from `bernoulli_` to
# uniforms compared with the density (three times faster); and slerp once when its norms and dot
# product moved from whole-tensor float32 sums (which depend on the thread count) to blockwise ones;
# karcher, multislerp and sce once when their norms and dot products left `torch.dot` (MKL, whose kernel
# and last bits depend on the processor) for the same blockwise sums (merger/methods/reductions.py).
# arcee_fusion once when its KL divergence moved to float64 (torch's float32 softmax, log and row sums
# gave other bytes with AVX2 than with AVX-512 or no vector kernel; now the same with all three).
# karcher, multislerp, nuslerp, sce and slerp once more when their dot products and norms became float64
# sums in a fixed order of lanes (the blockwise float32 sums took their order from torch's vector
# width: eight floats with AVX2, sixteen with AVX-512), nuslerp's per-vector scales also moving from
# torch's float32 norms, acos and sin to those sums and Python's float64 math.
GOLDEN = {
    "arcee_fusion": "82d0cf1b7dba8c04",
    "breadcrumbs": "84bfe3f08afed59d",
    "breadcrumbs_ties": "b672aa2d0edcfcff",
    "dare_linear": "d85dbb1a241996c5",
    "dare_ties": "334990fb23dce4e2",
    "della": "f1a39f39cc1cec0d",
    "della_linear": "ae111fd1ee821267",
    "karcher": "890d1f8b5b60bcf7",
    "linear": "f626e815c9c24a04",
    "model_stock": "56eca9fc9656dee7",
    "multislerp": "dd6ee98b5b4042b3",
    "nearswap": "df6eb70b9c9e1079",
    "nuslerp": "7a4ccafc3d0a5eff",
    "passthrough": "120569ed9e4dcf3a",
    "ram": "41b8f63ba0f35bd9",
    "ramplus_tl": "51f031dbaf63d948",
    "sce": "b039f1062211f4fb",
    "slerp": "3633cc48e29a0297",
    "task_arithmetic": "f626e815c9c24a04",
    "ties": "0a642f0957c6d929",
}
# templates/examples/fixture-moe.yaml (random gate, seed 0); re-pinned once when the output's config.json
# kept the base's `sliding_window` (mergekit sets it to null, which changes the attention of a windowed base).
MOE_GOLDEN = "9ad1a8e6d822ce20"
ELEMENTWISE = sorted(name for name, method in METHODS.items() if method.elementwise)


def test_every_registered_method_has_a_case(fixture_models_dir: Path) -> None:
    for method in METHODS:
        assert config(method, fixture_models_dir).startswith(f"merge_method: {method}")


@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_merges_the_fixtures_and_loads(fixture_models_dir: Path, tmp_path: Path, method: str) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    result = run_merge(config(method, fixture_models_dir), out, device="cpu")
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 57, 301, 1200, 44]])).logits
    assert torch.isfinite(logits).all()
    assert model.config.num_hidden_layers == result.num_layers == (5 if method == "passthrough" else 4)
    if method == "arcee_fusion":  # computes with a float32 mask; `dtype: float16` must still write float16
        assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
        from safetensors import safe_open

        with safe_open(str(next(out.glob("*.safetensors"))), framework="pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    assert sha256(out) == GOLDEN[method]


def test_moe_bytes_are_pinned(tmp_path: Path) -> None:
    root = Path(__file__).parents[1]
    text = (root / "templates/examples/fixture-moe.yaml").read_text().replace("tests/data/fixtures", str(root / "tests/data/fixtures"))
    run_merge(text, tmp_path / "out", device="cpu")
    assert sha256(tmp_path / "out") == MOE_GOLDEN


def test_task_arithmetic_family_perplexities(fixture_models_dir: Path, tmp_path: Path) -> None:
    fx = fixture_models_dir
    text = {split: (fx / f"{split}_eval.txt").read_text() for split in ("prose", "code")}
    rows = {}
    for name in ("mistral-base", "mistral-prose", "mistral-code"):
        rows[name] = {s: bits_per_token(fx / name, t) for s, t in text.items()}
    for method in ("task_arithmetic", "ties", "dare_ties"):
        run_merge(config(method, fx), tmp_path / method, device="cpu")
        rows[method] = {s: bits_per_token(tmp_path / method, t) for s, t in text.items()}
    print("\nbits/token on the fixture eval splits (prose, code, mean)")
    for name, r in rows.items():
        print(f"  {name:16s} {r['prose']:.4f}  {r['code']:.4f}  {(r['prose'] + r['code']) / 2:.4f}")
    mean = {name: (r["prose"] + r["code"]) / 2 for name, r in rows.items()}
    finetunes = (mean["mistral-prose"] + mean["mistral-code"]) / 2
    for method in ("task_arithmetic", "ties", "dare_ties"):
        assert mean[method] < finetunes, method  # merging the two skills beats either fine-tune on average
        assert rows[method]["prose"] < rows["mistral-code"]["prose"] and rows[method]["code"] < rows["mistral-prose"]["code"]


def test_seed_makes_random_methods_reproducible_and_changes_them(fixture_models_dir: Path, tmp_path: Path) -> None:
    text = config("dare_ties", fixture_models_dir)
    run_merge(text + "seed: 7\n", tmp_path / "a", device="cpu")
    run_merge(text, tmp_path / "b", device="cpu", seed=7)  # `--random-seed` overrides the config's seed
    run_merge(text, tmp_path / "c", device="cpu")  # default seed 0: the golden bytes
    assert sha256(tmp_path / "a") == sha256(tmp_path / "b") != sha256(tmp_path / "c") == GOLDEN["dare_ties"]


def test_the_elementwise_methods_are_the_expected_ones() -> None:
    assert ELEMENTWISE == [
        "dare_linear", "dare_ties", "linear", "nearswap", "passthrough", "ram", "ramplus_tl", "slerp", "task_arithmetic", "ties"
    ]


@pytest.mark.parametrize("method", ELEMENTWISE)
def test_slices_write_the_bytes_of_whole_tensors(
    fixture_models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    text = config(method, fixture_models_dir)
    run_merge(text, tmp_path / "default", device="cpu")
    # small slices: many per tensor, TIES's tied magnitudes spread over several; multiples of the sums'
    # lanes for SLERP, as the real sizes are; and pieces of the tensors that go in pieces
    monkeypatch.setattr(job_math, "SLICE", 259 * LANES if method == "slerp" else 4099)
    monkeypatch.setattr(executor, "PIECE", 10_000)
    run_merge(text, tmp_path / "small", device="cpu")
    monkeypatch.setitem(METHODS, method, dataclasses.replace(METHODS[method], elementwise=False))  # whole tensors
    monkeypatch.setattr(sparsify, "SLICE", 97 * LANES if method == "slerp" else 3001)
    run_merge(text, tmp_path / "whole", device="cpu")
    assert sha256(tmp_path / "default") == sha256(tmp_path / "small") == sha256(tmp_path / "whole") == GOLDEN[method]


def test_the_slice_size_is_one_value_of_whole_lanes_of_sums() -> None:
    assert SLICE % LANES == 0 and job_math.SLICE == sparsify.SLICE == executor.PIECE == SLICE


def test_ties_with_rescale_runs_in_slices_and_rescales(
    fixture_models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`rescale: true` on TIES: L1 factors prepared over the slices, the same bytes as whole tensors."""
    text = config("ties", fixture_models_dir) + "parameters: {rescale: true}\n"
    run_merge(text, tmp_path / "default", device="cpu")
    monkeypatch.setattr(job_math, "SLICE", 4099)
    run_merge(text, tmp_path / "small", device="cpu")
    monkeypatch.setitem(METHODS, "ties", dataclasses.replace(METHODS["ties"], elementwise=False))
    run_merge(text, tmp_path / "whole", device="cpu")
    assert sha256(tmp_path / "default") == sha256(tmp_path / "small") == sha256(tmp_path / "whole") != GOLDEN["ties"]

