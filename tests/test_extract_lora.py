"""`extract-lora`: a PEFT adapter of fine-tune − base that peft loads and that reproduces the fine-tune."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from merger.cli import main
from merger.errors import ConfigError
from merger.lora.extract import extract_lora
from helpers import weights

TOKENS = torch.tensor([[1, 57, 301, 1200, 44, 7, 99, 3000, 12]])


def causal_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits


def load(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def peft_logits(base: Path, adapter: Path) -> torch.Tensor:
    from peft import PeftModel

    return causal_logits(PeftModel.from_pretrained(load(base), adapter))


def test_full_rank_reproduces_the_finetune(fixture_models_dir: Path, tmp_path: Path) -> None:
    base, tuned = fixture_models_dir / "mistral-base", fixture_models_dir / "mistral-prose"
    rows = extract_lora(str(tuned), str(base), tmp_path / "adapter", rank=96)  # 96: every matrix's full rank
    assert all(r.energy > 1 - 1e-6 for r in rows)
    assert {r.name for r in rows} == set(weights(base))  # the fixture fine-tune changed every tensor
    expected, before = causal_logits(load(tuned)), causal_logits(load(base))
    got = peft_logits(base, tmp_path / "adapter")
    assert (before - expected).abs().max() > 1  # the fine-tune is far from its base
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def test_low_rank_error_matches_the_retained_energy(fixture_models_dir: Path, tmp_path: Path) -> None:
    base, tuned = fixture_models_dir / "mistral-base", fixture_models_dir / "mistral-prose"
    rows = extract_lora(str(tuned), str(base), tmp_path / "adapter", rank=24)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 24 and config["rank_pattern"] == {}
    # per matrix: ‖ΔW − B·A‖_F / ‖ΔW‖_F is the reported √(1 − energy) (Eckart–Young)
    adapter, w_base, w_tuned = load_file(tmp_path / "adapter" / "adapter_model.safetensors"), weights(base), weights(tuned)
    for row in rows:
        if row.rank and "embed" not in row.name:
            module = "base_model.model." + row.name.removesuffix(".weight")
            delta = w_tuned[row.name].double() - w_base[row.name].double()
            approx = adapter[f"{module}.lora_B.weight"].double() @ adapter[f"{module}.lora_A.weight"].double()
            assert row.rank == 24
            assert float((delta - approx).norm() / delta.norm()) == pytest.approx(row.relative_error, rel=1e-4)
    # the model: logits move from the base's towards the fine-tune's, the gap shrinking at most like the
    # worst matrix's relative error (first order: the logit change is linear in the weight change)
    expected, before = causal_logits(load(tuned)), causal_logits(load(base))
    got = peft_logits(base, tmp_path / "adapter")
    worst = max(r.relative_error for r in rows)
    assert 0 < worst < 1
    assert (got - expected).norm() <= worst * (before - expected).norm()


def test_energy_threshold_picks_ranks_per_matrix(fixture_models_dir: Path, tmp_path: Path) -> None:
    base, tuned = fixture_models_dir / "mistral-base", fixture_models_dir / "mistral-code"
    rows = extract_lora(str(tuned), str(base), tmp_path / "adapter", energy=0.6)
    matrices = [r for r in rows if r.rank]
    assert all(r.energy >= 0.6 for r in matrices)
    assert len({r.rank for r in matrices}) > 1  # the threshold gives different ranks
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    for row in matrices:  # the smallest rank reaching 0.6: one less would not
        s = torch.linalg.svdvals(weights(tuned)[row.name].double() - weights(base)[row.name].double())
        energies = torch.cumsum(s.square(), 0) / s.square().sum()
        assert row.rank == 1 + int((energies < 0.6).sum())
        module = row.name.removesuffix(".weight")
        assert config["rank_pattern"].get(module, config["r"]) == row.rank
    got, expected = peft_logits(base, tmp_path / "adapter"), causal_logits(load(tuned))
    assert (got - expected).norm() < (causal_logits(load(base)) - expected).norm()


def test_cli_prints_the_energy_table(fixture_models_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base, tuned = fixture_models_dir / "mistral-base", fixture_models_dir / "mistral-prose"
    assert main(["extract-lora", str(tuned), str(base), str(tmp_path / "a"), "--rank", "4"]) == 0
    out = capsys.readouterr().out
    assert "model.layers.0.self_attn.q_proj.weight" in out and "lowest retained energy" in out
    assert (tmp_path / "a" / "adapter_model.safetensors").is_file()
    assert main(["extract-lora", str(tuned), str(base), str(tmp_path / "a"), "--rank", "4"]) == 2  # not empty
    assert "ConfigError" in capsys.readouterr().err


def test_bad_targets_are_refused(fixture_models_dir: Path, tmp_path: Path) -> None:
    base, tuned = str(fixture_models_dir / "mistral-base"), str(fixture_models_dir / "mistral-prose")
    for kwargs in ({}, {"rank": 4, "energy": 0.5}, {"rank": 0}, {"energy": 1.5}):
        with pytest.raises(ConfigError):
            extract_lora(tuned, base, tmp_path / "x", **kwargs)
    with pytest.raises(ConfigError, match="identical"):
        extract_lora(base, base, tmp_path / "y", rank=4)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_extracted_adapter_applied_by_merger_is_peft_s_model(fixture_models_dir: Path, tmp_path: Path) -> None:
    """The round trip: `base+extracted` (embedding LoRA, modules_to_save norms, alpha_pattern) merged by
    merger holds peft's merged weights, rounded to the model's bfloat16 (the sum is computed in float32
    and stored in the tensor's dtype); at full rank, the fine-tune's bytes."""
    from peft import PeftModel

    from merger.engine import run_merge

    base, tuned = fixture_models_dir / "mistral-base", fixture_models_dir / "mistral-prose"
    extract_lora(str(tuned), str(base), tmp_path / "low", energy=0.5)
    assert json.loads((tmp_path / "low" / "adapter_config.json").read_text())["alpha_pattern"]
    extract_lora(str(tuned), str(base), tmp_path / "full", rank=96)
    for adapter in ("low", "full"):
        config = f"merge_method: linear\nmodels:\n  - model: {base}+{tmp_path / adapter}\n    parameters: {{weight: 1.0}}\n"
        run_merge(config, tmp_path / f"out-{adapter}", device="cpu")
    reference = PeftModel.from_pretrained(load(base), tmp_path / "low").merge_and_unload().state_dict()
    out = weights(tmp_path / "out-low")
    for name, tensor in out.items():
        assert tensor.dtype == torch.bfloat16
        expected = reference[name].to(torch.bfloat16).float()
        torch.testing.assert_close(tensor.float(), expected, rtol=2**-7, atol=1e-7)  # at most one bfloat16 step
    full, finetune = weights(tmp_path / "out-full"), weights(tuned)
    same = sum(int((full[k] == finetune[k]).sum()) for k in finetune)
    assert same / sum(t.numel() for t in finetune.values()) > 0.999  # the rest: one bfloat16 step (ties)
    torch.testing.assert_close(causal_logits(load(tmp_path / "out-full")), causal_logits(load(tuned)), rtol=0, atol=1e-2)
