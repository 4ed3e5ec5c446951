"""Every input tensor and every architecture setting reaches the output or is named."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from merger.engine import run_merge
from merger.errors import ArchitectureSettingError, ConfigProblems, UnmergedTensorsError
from merger.plan.settings import compare_settings
from merger.validate import validate_config
from helpers import weights

DIMS = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, tie_word_embeddings=False)


def tiny(path: Path, model_type: str, seed: int, **overrides) -> Path:
    """A random tiny decoder of `model_type` (equal widths across families), saved by transformers."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **{**DIMS, **overrides})).save_pretrained(path)
    return path


def slerp(base: Path, other: Path) -> str:
    return f"merge_method: slerp\nbase_model: {base}\nmodels:\n  - model: {base}\n  - model: {other}\nparameters: {{t: 0.5}}\n"


def test_llama_with_qwen2_is_refused_naming_the_bias_tensors_and_the_family(tmp_path: Path):
    """Equal widths, so shapes agree: before, the output silently lost Qwen2's q/k/v biases."""
    llama, qwen = tiny(tmp_path / "llama", "llama", 0), tiny(tmp_path / "qwen", "qwen2", 1)
    with pytest.raises(ConfigProblems) as caught:
        validate_config(slerp(llama, qwen))
    kinds = {type(p) for p in caught.value.problems}
    assert {UnmergedTensorsError, ArchitectureSettingError} <= kinds
    message = str(caught.value)
    # 2 layers x q/k/v biases = 6 tensors, all named (6 fit before "and N more")
    assert "6 tensor(s)" in message and "and 0 more" not in message
    for layer in (0, 1):
        for proj in "qkv":
            assert f"`model.layers.{layer}.self_attn.{proj}_proj.bias`" in message
    assert "`qwen2` model" in message and "`llama` architecture" in message


def test_disagreeing_settings_are_warned_with_the_value_kept_and_reach_the_output(tmp_path: Path):
    base = tiny(tmp_path / "base", "llama", 0, rope_theta=10000.0, rms_norm_eps=1e-5)
    other = tiny(tmp_path / "other", "llama", 1, rope_theta=500000.0, rms_norm_eps=1e-5)
    report = validate_config(slerp(base, other))
    rope = [w for w in report.warnings if w.startswith("`rope_parameters` differs")]
    assert len(rope) == 1 and "10000.0" in rope[0] and "500000.0" in rope[0]
    assert f"keeps {{'rope_theta': 10000.0, 'rope_type': 'default'}} from `{base}`" in rope[0]
    assert not any("rms_norm_eps" in w for w in report.warnings)  # equal: nothing to say
    out = tmp_path / "out"
    run_merge(slerp(base, other), out, device="cpu")
    from transformers import AutoConfig

    written, kept = AutoConfig.from_pretrained(out), AutoConfig.from_pretrained(base)
    assert written.rope_parameters == kept.rope_parameters == {"rope_theta": 10000.0, "rope_type": "default"}


def test_a_setting_the_base_family_lacks_is_refused_by_name(tmp_path: Path):
    """Mistral's 4096-token window cannot live in a Llama config: the output would attend globally."""
    llama, mistral = tiny(tmp_path / "llama", "llama", 0), tiny(tmp_path / "mistral", "mistral", 1, sliding_window=4096)
    with pytest.raises(ArchitectureSettingError, match=r"sets `sliding_window: 4096`.*\(from `.*llama`, llama\)"):
        validate_config(slerp(llama, mistral))
    report = validate_config(slerp(mistral, llama))  # the window's owner as base: kept, and said so
    (window,) = [w for w in report.warnings if w.startswith("`sliding_window` differs")]
    assert f"`{mistral}` 4096" in window and f"keeps 4096 from `{mistral}`" in window


def test_configs_saved_by_other_transformers_versions_are_not_a_difference():
    """Old spelling (rope_theta + rope_scaling, no mlp_bias/head_dim) equals the new rope_parameters spelling."""
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 1024}
    common = dict(DIMS, model_type="llama", max_position_embeddings=8192)
    old = dict(common, rope_theta=500000.0, rope_scaling=scaling)
    new = dict(common, mlp_bias=False, attention_bias=False, head_dim=8,
               rope_parameters=dict(scaling, rope_theta=500000.0))
    assert compare_settings({"old": old, "new": new}, "old").warnings == ()
    changed = compare_settings({"old": old, "new": dict(new, rope_parameters=dict(scaling, factor=4.0, rope_theta=5e5))}, "old")
    assert len(changed.warnings) == 1 and "'factor': 8.0" in changed.warnings[0] and changed.refusals == ()


def test_configs_equal_but_for_provenance_agree_and_any_other_key_is_compared_as_transformers_reads_it():
    """The shortcut for equal configs skips only what cannot differ: a difference in a key that is not a
    setting itself (hidden_size, from which Llama derives head_dim) still reaches the full comparison."""
    config = dict(DIMS, model_type="llama")
    saved_elsewhere = dict(config, _name_or_path="someone/else", transformers_version="4.40.0", torch_dtype="float16",
                           use_cache=False)
    assert compare_settings({"a": config, "b": saved_elsewhere}, "a") == compare_settings({"a": config}, "a")
    assert compare_settings({"a": config, "b": saved_elsewhere}, "a").warnings == ()
    wider = compare_settings({"a": config, "b": dict(config, hidden_size=32)}, "a")
    assert len(wider.warnings) == 1 and "`head_dim` differs" in wider.warnings[0] and "`a` 8, `b` 16" in wider.warnings[0]
    qwen = compare_settings({"a": config, "b": dict(config, model_type="qwen2")}, "a")
    assert qwen.refusals and "`b` is a `qwen2` model" in qwen.refusals[0]


def test_drop_unknown_tensors_merges_without_them_and_names_them(tmp_path: Path):
    from safetensors.torch import save_file

    base, other = tiny(tmp_path / "base", "llama", 0), tiny(tmp_path / "other", "llama", 1)
    tensors = weights(other)
    tensors["model.layers.1.self_attn.rotary_scale"] = torch.ones(4)
    save_file(tensors, str(other / "model.safetensors"))
    with pytest.raises(UnmergedTensorsError, match=r"`model.layers.1.self_attn.rotary_scale`.*drop_unknown_tensors"):
        validate_config(slerp(base, other))
    text = slerp(base, other) + "drop_unknown_tensors: true\n"
    assert any("rotary_scale" in w and "dropped" in w for w in validate_config(text).warnings)
    run_merge(text, tmp_path / "out", device="cpu")
    assert set(weights(tmp_path / "out")) == set(weights(base))


def test_a_hostile_layer_count_builds_no_per_layer_lists():
    """Qwen2Config builds `layer_types` with one entry per layer: 10**12 layers must not reach it."""
    import time

    from merger.plan.settings import effective_text_config

    config = dict(DIMS, model_type="qwen2", num_hidden_layers=10**12)
    started = time.monotonic()
    assert effective_text_config(config) is config and time.monotonic() - started < 1
    assert effective_text_config(dict(config, num_hidden_layers=2)).layer_types == ["full_attention"] * 2
