"""The pre-merge weight report: numbers against a hand computation, warnings, `validate --report`."""

from __future__ import annotations

import math
from itertools import combinations
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from merger.cli import main
from merger.evaluate.report import weight_report

FIXTURES = Path(__file__).parent / "data" / "fixtures"


def _folder(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    path.mkdir()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    return path


def _hand(base: list[list[float]], models: list[list[list[float]]]) -> dict:
    """Norms, relative norms, cosines and sign-conflict shares of flattened groups, in plain Python."""
    flat_base = [x for t in base for x in t]
    taus = [[m - b for m, b in zip([x for t in model for x in t], flat_base)] for model in models]
    norms = [math.sqrt(sum(x * x for x in tau)) for tau in taus]
    base_norm = math.sqrt(sum(x * x for x in flat_base))
    out = {"norms": norms, "relative": [n / base_norm for n in norms], "cos": {}, "conflicts": {}}
    for i, j in combinations(range(len(models)), 2):
        out["cos"][i, j] = sum(a * b for a, b in zip(taus[i], taus[j])) / (norms[i] * norms[j])
        both = [(a, b) for a, b in zip(taus[i], taus[j]) if a != 0 and b != 0]
        out["conflicts"][i, j] = sum(1 for a, b in both if (a > 0) != (b > 0)) / len(both)
    return out


def test_numbers_match_a_hand_computation(tmp_path: Path) -> None:
    torch.manual_seed(0)
    shapes = {"model.embed_tokens.weight": (5, 3), "model.layers.0.mlp.weight": (3, 3),
              "model.layers.0.mlp.bias": (3,), "model.layers.1.mlp.weight": (3, 3), "lm_head.weight": (5, 3)}
    base = {name: torch.randn(shape) for name, shape in shapes.items()}
    models = [{name: t + 0.3 * torch.randn(t.shape) for name, t in base.items()} for _ in range(3)]
    models[0]["model.layers.0.mlp.bias"] = base["model.layers.0.mlp.bias"].clone()  # zeros in τ: not counted
    base["model.step"] = torch.tensor([3])  # an integer tensor: not compared
    folders = [_folder(tmp_path / f"m{i}", m) for i, m in enumerate(models)]
    report = weight_report(("base", _folder(tmp_path / "base", base)), [(f"m{i}", f) for i, f in enumerate(folders)])

    assert [g.group for g in report.groups] == ["embeddings", "layer 0", "layer 1", "head"]
    assert report.skipped == ("model.step",)
    groups = {"layer 0": ["model.layers.0.mlp.weight", "model.layers.0.mlp.bias"],
              "embeddings": ["model.embed_tokens.weight"], "all": list(shapes)}
    for stats in [*report.groups, report.total]:
        if stats.group not in groups:
            continue
        names = groups[stats.group]
        hand = _hand([base[n].flatten().tolist() for n in names], [[m[n].flatten().tolist() for n in names] for m in models])
        assert stats.norms == pytest.approx(hand["norms"], rel=1e-5)
        assert stats.relative == pytest.approx(hand["relative"], rel=1e-5)
        for pair in hand["cos"]:
            assert stats.cosines[pair] == pytest.approx(hand["cos"][pair], abs=1e-5)
            assert stats.conflicts[pair] == pytest.approx(hand["conflicts"][pair], abs=1e-9)
    text = report.text()
    assert "| layer 1 |" in text and "cos M1·M3" in text and "no warnings" in text


def test_warnings_where_a_method_misbehaves(tmp_path: Path) -> None:
    torch.manual_seed(1)
    base = {f"model.layers.{i}.w": torch.randn(8, 8) for i in range(3)}
    delta = {k: 0.05 * torch.randn(8, 8) for k in base}
    tuned = _folder(tmp_path / "tuned", {k: base[k] + delta[k] for k in base})
    opposed = _folder(tmp_path / "opposed", {k: base[k] - (delta[k] if k.endswith("1.w") else -delta[k]) for k in base})
    stranger = _folder(tmp_path / "stranger", {k: torch.randn(8, 8) for k in base})
    twin = _folder(tmp_path / "twin", {k: base[k] * (1 + 1e-6) for k in base})
    base_dir = _folder(tmp_path / "base", base)

    stock = weight_report(("base", base_dir), [("tuned", tuned), ("opposed", opposed)], "model_stock")
    assert stock.groups[1].cosines[0, 1] == pytest.approx(-1.0, abs=1e-5)
    assert stock.groups[1].conflicts[0, 1] == 1.0 and stock.groups[0].conflicts[0, 1] == 0.0
    (warning,) = stock.warnings
    assert "opposite directions" in warning and "layer 1" in warning and "layer 0" not in warning

    ties = weight_report(("base", base_dir), [("tuned", tuned), ("stranger", stranger), ("twin", twin)], "ties")
    assert len(ties.warnings) == 2
    assert "`stranger` differs from the base by" in ties.warnings[0] and "fine-tune" in ties.warnings[0]
    assert "`twin` is almost its base" in ties.warnings[1]
    assert not weight_report(("base", base_dir), [("stranger", stranger), ("tuned", tuned)], "slerp").warnings


def test_validate_report_prints_the_table(capsys, tmp_path: Path) -> None:
    config = tmp_path / "stock.yml"
    config.write_text(f"merge_method: model_stock\nbase_model: {FIXTURES}/qwen2-base\n"
                      f"models:\n  - model: {FIXTURES}/qwen2-prose\n  - model: {FIXTURES}/qwen2-code\n")
    assert main(["validate", str(config), "--report"]) == 0
    out = capsys.readouterr().out
    assert "weight report against the base" in out and "| layer 3 |" in out and "| all |" in out
    assert "qwen2-prose" in out.split("| group |")[0]  # the legend names the models
