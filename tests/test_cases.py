"""The engine issue's "cases that must behave", each with the value that would be wrong if the code were wrong."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from merger.engine import run_merge
from merger.errors import LayerRangeError, MissingParameterError, WeightSumError
from merger.validate import validate_config
from helpers import weights


def tiny(path: Path, model_type: str, seed: int, layers: int = 2, tied: bool = False) -> Path:
    """A random tiny Llama or Mistral (same dims for both, so they merge tensor by tensor)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, vocab_size=64, hidden_size=16, intermediate_size=32,
                                  num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                                  tie_word_embeddings=tied)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


def test_same_model_listed_twice_is_honoured_twice(fixture_models_dir: Path, tmp_path: Path) -> None:
    m = fixture_models_dir / "mistral-base"
    text = (f"merge_method: linear\nmodels:\n  - model: {m}\n    parameters: {{weight: 0.1}}\n"
            f"  - model: {m}\n    parameters: {{weight: 1.0}}\nparameters: {{normalize: false}}\ndtype: float32\n")
    run_merge(text, tmp_path / "out", device="cpu")
    merged, base = weights(tmp_path / "out"), weights(m)
    name = "model.layers.1.mlp.up_proj.weight"
    torch.testing.assert_close(merged[name], base[name].float() * 1.1, rtol=1e-6, atol=0)


def test_slice_base_spelled_with_a_trailing_slash_is_recognised(fixture_models_dir: Path, tmp_path: Path) -> None:
    p, c = fixture_models_dir / "mistral-prose", fixture_models_dir / "mistral-code"
    text = (f"merge_method: slerp\nbase_model: {p}/\nslices:\n  - sources:\n      - {{model: {p}, layer_range: [0, 4]}}\n"
            f"      - {{model: ./{c.relative_to(Path.cwd()) if c.is_relative_to(Path.cwd()) else c}, layer_range: [0, 4]}}\n"
            "parameters: {t: 0}\n")
    run_merge(text, tmp_path / "out", device="cpu")
    assert torch.equal(weights(tmp_path / "out")["model.layers.2.self_attn.q_proj.weight"],
                       weights(p)["model.layers.2.self_attn.q_proj.weight"])  # t=0 is the base: it was found


@pytest.mark.parametrize("base_type, other_type", [("llama", "mistral"), ("mistral", "llama")])
def test_cross_family_output_takes_the_base_architecture(tmp_path: Path, base_type: str, other_type: str) -> None:
    """Llama and Mistral compute alike when Mistral's sliding window is off (compared as a setting)."""
    base, other = tiny(tmp_path / "base", base_type, 0), tiny(tmp_path / "other", other_type, 1)
    for path in (base, other):  # MistralConfig defaults to a 4096-token window: turn it off
        config = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**config, "sliding_window": None}))
    text = (f"merge_method: linear\nbase_model: {base}\nmodels:\n  - model: {other}\n    parameters: {{weight: 0.5}}\n"
            f"  - model: {base}\n    parameters: {{weight: 0.5}}\n")
    for run in ("a", "b"):
        run_merge(text, tmp_path / run, device="cpu")
        assert json.loads((tmp_path / run / "config.json").read_text())["model_type"] == base_type
    assert (tmp_path / "a" / "config.json").read_bytes() == (tmp_path / "b" / "config.json").read_bytes()


def test_different_layer_counts_are_refused_before_download(tmp_path: Path) -> None:
    a, b = tiny(tmp_path / "a", "llama", 0, layers=2), tiny(tmp_path / "b", "llama", 1, layers=3)
    text = (f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 1}}\n"
            f"  - model: {b}\n    parameters: {{weight: 1}}\n")
    with pytest.raises(LayerRangeError, match=r"different layer counts .*: 2, .*: 3"):
        validate_config(text)


def test_linear_base_without_weight_and_zero_weight_sum_are_clear_errors(tmp_path: Path) -> None:
    a, b = tiny(tmp_path / "a", "llama", 0), tiny(tmp_path / "b", "llama", 1)
    no_weight = f"merge_method: linear\nbase_model: {a}\nmodels:\n  - model: {b}\n    parameters: {{weight: 1}}\n"
    with pytest.raises(MissingParameterError, match=r"base_model.*has no `weight`"):
        validate_config(no_weight)
    zero = (f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 1}}\n"
            f"  - model: {b}\n    parameters: {{weight: -1}}\n")
    with pytest.raises(WeightSumError, match="sum to 0"):
        validate_config(zero)


def test_tied_base_with_untied_finetune_writes_a_head_and_unties(fixture_models_dir: Path, tmp_path: Path) -> None:
    """qwen2-base is tied; a fine-tune given its own lm_head makes the output untied, and transformers keeps it."""
    base = fixture_models_dir / "qwen2-base"
    untied = tmp_path / "untied"
    untied.mkdir()
    tensors = weights(fixture_models_dir / "qwen2-prose")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone() * 0.5
    save_file(tensors, str(untied / "model.safetensors"))
    config = json.loads((fixture_models_dir / "qwen2-prose" / "config.json").read_text())
    (untied / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    out = tmp_path / "out"
    text = (f"merge_method: linear\nmodels:\n  - model: {base}\n    parameters: {{weight: 0.5}}\n"
            f"  - model: {untied}\n    parameters: {{weight: 0.5}}\ndtype: float32\n")
    run_merge(text, out, device="cpu")
    merged = weights(out)
    expected = 0.5 * weights(base)["model.embed_tokens.weight"].float() + 0.5 * tensors["lm_head.weight"].float()
    torch.testing.assert_close(merged["lm_head.weight"], expected)  # the base's tied head is its embedding
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert torch.equal(model.lm_head.weight.detach(), merged["lm_head.weight"])
    assert not torch.equal(model.lm_head.weight.detach(), model.get_input_embeddings().weight.detach())


def test_tied_inputs_stay_tied(fixture_models_dir: Path, tmp_path: Path) -> None:
    b, p = fixture_models_dir / "qwen2-base", fixture_models_dir / "qwen2-prose"
    text = f"merge_method: slerp\nbase_model: {b}\nmodels:\n  - model: {b}\n  - model: {p}\nparameters: {{t: 0.5}}\n"
    run_merge(text, tmp_path / "out", device="cpu")
    assert "lm_head.weight" not in weights(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is True


def test_tensors_the_output_would_drop_are_refused_or_with_opt_in_reported(fixture_models_dir: Path, tmp_path: Path) -> None:
    extra = tmp_path / "extra"
    extra.mkdir()
    tensors = weights(fixture_models_dir / "mistral-base")
    tensors["model.layers.0.self_attn.q_norm.weight"] = torch.ones(24)
    save_file(tensors, str(extra / "model.safetensors"))
    (extra / "config.json").write_bytes((fixture_models_dir / "mistral-base" / "config.json").read_bytes())
    from merger.errors import UnmergedTensorsError

    with pytest.raises(UnmergedTensorsError, match=r"1 tensor\(s\).*`model.layers.0.self_attn.q_norm.weight`"):
        validate_config(f"merge_method: passthrough\nmodels:\n  - model: {extra}\n")
    report = validate_config(f"merge_method: passthrough\nmodels:\n  - model: {extra}\ndrop_unknown_tensors: true\n")
    assert report.warnings and "model.layers.0.self_attn.q_norm.weight" in report.warnings[0]
    assert "dropped" in report.warnings[0] and "warning: " in report.summary()
    clean = validate_config(f"merge_method: passthrough\nmodels:\n  - model: {fixture_models_dir / 'mistral-base'}\n")
    assert clean.warnings == ()


def test_several_problems_are_reported_together(fixture_models_dir: Path) -> None:
    from merger.errors import BaseModelError, ConfigErrors

    p, c = fixture_models_dir / "mistral-prose", fixture_models_dir / "mistral-code"
    text = (f"merge_method: ties\nslices:\n  - sources:\n      - {{model: {p}, layer_range: [0, 6]}}\n"
            f"      - {{model: {c}, layer_range: [2, 8]}}\n")
    with pytest.raises(ConfigErrors) as caught:
        validate_config(text)
    kinds = [type(problem) for problem in caught.value.problems]
    assert kinds == [LayerRangeError, LayerRangeError, BaseModelError]
    assert "[0, 6]" in str(caught.value) and "[2, 8]" in str(caught.value)


def test_models_of_different_width_get_one_clear_error(fixture_models_dir: Path) -> None:
    from merger.errors import ShapeMismatchError

    q, m = fixture_models_dir / "qwen2-prose", fixture_models_dir / "mistral-prose"
    text = (f"merge_method: linear\nmodels:\n  - model: {q}\n    parameters: {{weight: 1}}\n"
            f"  - model: {m}\n    parameters: {{weight: 1}}\ntokenizer_source: union\n")
    with pytest.raises(ShapeMismatchError) as caught:
        validate_config(text)
    message = str(caught.value)
    assert "hidden size 128" in message and "hidden size 96" in message and "\n" not in message


def test_method_typo_is_refused_before_download_with_a_suggestion(fixture_models_dir: Path) -> None:
    from merger.errors import UnknownMethodError

    text = "merge_method: dare-ties\nbase_model: org/never-downloaded\nmodels:\n  - model: org/never-downloaded\n"
    with pytest.raises(UnknownMethodError, match="did you mean `dare_ties`"):
        validate_config(text)  # the method is checked before any model is looked up


def test_model_stock_needs_two_models_besides_the_base(fixture_models_dir: Path) -> None:
    from merger.errors import ModelCountError

    b, p = fixture_models_dir / "mistral-base", fixture_models_dir / "mistral-prose"
    with pytest.raises(ModelCountError, match="at least 2 other"):
        validate_config(f"merge_method: model_stock\nbase_model: {b}\nmodels:\n  - model: {p}\n")


def test_scalar_parameters_merge_under_slerp(fixture_models_dir: Path, tmp_path: Path) -> None:
    """A decoder of unknown family (layout inferred from tensor names) with a 0-dim gain per layer."""
    models = []
    for name, gain in (("a", 0.5), ("b", 2.0)):
        folder = tmp_path / name
        folder.mkdir()
        tensors = weights(fixture_models_dir / f"mistral-{'prose' if name == 'a' else 'code'}")
        for layer in range(4):
            tensors[f"model.layers.{layer}.residual_gain"] = torch.tensor(gain)
        save_file(tensors, str(folder / "model.safetensors"))
        config = json.loads((fixture_models_dir / "mistral-base" / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "architectures": ["ToyForCausalLM"], "model_type": "toy"}))
        models.append(folder)
    out = tmp_path / "out"
    text = (f"merge_method: slerp\nbase_model: {models[0]}\nmodels:\n  - model: {models[0]}\n  - model: {models[1]}\n"
            "parameters: {t: 0.25}\n")
    run_merge(text, out, device="cpu")
    merged = weights(out)
    assert merged["model.layers.2.residual_gain"].shape == ()
    assert float(merged["model.layers.2.residual_gain"]) == pytest.approx(0.75 * 0.5 + 0.25 * 2.0)  # lerp on scalars
