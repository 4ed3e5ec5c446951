"""End-to-end merges of the trained fixtures through run_merge: tensors and logits checked against the inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from merger.engine import run_merge
from merger.errors import (
    BaseModelError,
    ConfigError,
    LayerRangeError,
    MergerError,
    MissingParameterError,
    ModelCountError,
    UnknownMethodError,
    UnmergedTensorsError,
    UnsafeWeightsError,
)
from helpers import weights as tensors

PROMPT = torch.tensor([[1, 57, 301, 1200, 44, 9, 3000, 17]])


def logits(model_dir: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(PROMPT).logits


def slerp_yaml(base: Path, other: Path, t: float, layers: int = 4) -> str:
    return f"""
merge_method: slerp
base_model: {base}
slices:
  - sources:
      - {{model: {base}, layer_range: [0, {layers}]}}
      - {{model: {other}, layer_range: [0, {layers}]}}
parameters: {{t: {t}}}
"""


@pytest.fixture(scope="module")
def fx(fixture_models_dir: Path) -> Path:
    return fixture_models_dir


@pytest.mark.parametrize("t, expected", [(0.0, "mistral-prose"), (1.0, "mistral-code")])
def test_slerp_endpoints_reproduce_a_parent_exactly(fx: Path, tmp_path: Path, t: float, expected: str) -> None:
    out = tmp_path / "out"
    run_merge(slerp_yaml(fx / "mistral-prose", fx / "mistral-code", t), out, device="cpu")
    merged, parent = tensors(out), tensors(fx / expected)
    assert merged.keys() == parent.keys()
    for name, tensor in parent.items():
        assert torch.equal(merged[name], tensor), name
    torch.testing.assert_close(logits(out), logits(fx / expected), rtol=0, atol=0)


def test_slerp_midpoint_matches_hand_computation(fx: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_merge(slerp_yaml(fx / "mistral-prose", fx / "mistral-code", 0.5), out, device="cpu")
    a = tensors(fx / "mistral-prose")["model.layers.1.mlp.up_proj.weight"].double()
    b = tensors(fx / "mistral-code")["model.layers.1.mlp.up_proj.weight"].double()
    cos = (a.flatten() @ b.flatten()) / (a.norm() * b.norm())
    if cos.abs() > 0.9995:
        expected = 0.5 * a + 0.5 * b
    else:
        theta = torch.arccos(cos)
        expected = (torch.sin(0.5 * theta) * a + torch.sin(0.5 * theta) * b) / torch.sin(theta)
    merged = tensors(out)["model.layers.1.mlp.up_proj.weight"]
    assert merged.dtype == torch.bfloat16
    torch.testing.assert_close(merged.double(), expected.to(torch.bfloat16).double(), rtol=0, atol=2 ** -7)


def test_slerp_gradient_sets_t_per_layer_and_filter(fx: Path, tmp_path: Path) -> None:
    """t: self_attn [0, 1] over 4 layers -> layer 0 is the base's, layer 3 the other's; mlp fixed at 1."""
    out = tmp_path / "out"
    text = slerp_yaml(fx / "mistral-prose", fx / "mistral-code", 0).replace(
        "parameters: {t: 0}",
        "parameters:\n  t:\n    - {filter: self_attn, value: [0, 1]}\n    - {filter: mlp, value: 1}\n    - {value: 0}",
    )
    run_merge(text, out, device="cpu")
    merged, prose, code = tensors(out), tensors(fx / "mistral-prose"), tensors(fx / "mistral-code")
    q = "model.layers.{}.self_attn.q_proj.weight"
    assert torch.equal(merged[q.format(0)], prose[q.format(0)])
    assert torch.equal(merged[q.format(3)], code[q.format(3)])
    assert not torch.equal(merged[q.format(1)], prose[q.format(1)])
    assert torch.equal(merged["model.layers.2.mlp.down_proj.weight"], code["model.layers.2.mlp.down_proj.weight"])
    assert torch.equal(merged["model.norm.weight"], prose["model.norm.weight"])


def test_passthrough_stacks_donor_layers(fx: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    text = (Path(__file__).parents[1] / "templates/examples/fixture-frankenmerge.yaml").read_text()
    text = text.replace("tests/data/fixtures", str(fx))
    result = run_merge(text, out, device="cpu", shard_size=1_000_000)
    config = json.loads((out / "config.json").read_text())
    assert result.num_layers == config["num_hidden_layers"] == 6  # [0, 3) + [1, 4)
    merged, prose, code = tensors(out), tensors(fx / "mistral-prose"), tensors(fx / "mistral-code")
    origin = [(prose, 0), (prose, 1), (prose, 2), (code, 1), (code, 2), (code, 3)]
    for out_layer, (donor, layer) in enumerate(origin):
        for suffix in ("self_attn.k_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"):
            assert torch.equal(merged[f"model.layers.{out_layer}.{suffix}"], donor[f"model.layers.{layer}.{suffix}"])
    assert torch.equal(merged["model.embed_tokens.weight"], prose["model.embed_tokens.weight"])
    assert torch.equal(merged["lm_head.weight"], code["lm_head.weight"])
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in merged.values())
    assert logits(out).shape == (1, PROMPT.shape[1], 4096)


def test_passthrough_scale_multiplies_filtered_tensors(fx: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    text = f"""
merge_method: passthrough
slices:
  - sources:
      - model: {fx / 'mistral-base'}
        layer_range: [0, 4]
        parameters:
          scale:
            - {{filter: o_proj, value: 0.5}}
            - {{value: 1.0}}
dtype: float32
"""
    run_merge(text, out, device="cpu")
    merged, base = tensors(out), tensors(fx / "mistral-base")
    name = "model.layers.2.self_attn.o_proj.weight"
    assert merged[name].dtype == torch.float32
    torch.testing.assert_close(merged[name], base[name].float() * 0.5, rtol=0, atol=0)
    assert torch.equal(merged["model.layers.2.self_attn.q_proj.weight"], base["model.layers.2.self_attn.q_proj.weight"].float())


def test_moe_of_identical_experts_reproduces_the_dense_model(fx: Path, tmp_path: Path) -> None:
    """Mixtral renormalises its top-k routing weights, so E copies of one MLP give that model's logits for any gate."""
    out = tmp_path / "out"
    dense = fx / "mistral-code"
    text = f"""
base_model: {dense}
gate_mode: random
experts_per_token: 2
experts:
  - source_model: {dense}
  - source_model: {dense}
"""
    result = run_merge(text, out, device="cpu")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"] and config["num_local_experts"] == 2
    assert result.parameter_count == 1_192_800 + 4 * (3 * 96 * 256 + 2 * 96)  # + one extra MLP and a router per layer
    merged = tensors(out)
    assert merged["model.layers.0.block_sparse_moe.gate.weight"].shape == (2, 96)
    torch.testing.assert_close(logits(out), logits(dense), rtol=1e-4, atol=1e-4)


def test_moe_experts_come_from_each_model_and_gates_are_seeded(fx: Path, tmp_path: Path) -> None:
    text = (Path(__file__).parents[1] / "templates/examples/fixture-moe.yaml").read_text()
    text = text.replace("tests/data/fixtures", str(fx))
    run_merge(text, tmp_path / "a", device="cpu")
    run_merge(text, tmp_path / "b", device="cpu")
    a, prose, code = tensors(tmp_path / "a"), tensors(fx / "mistral-prose"), tensors(fx / "mistral-code")
    assert torch.equal(a["model.layers.3.block_sparse_moe.experts.0.w2.weight"], prose["model.layers.3.mlp.down_proj.weight"])
    assert torch.equal(a["model.layers.3.block_sparse_moe.experts.1.w1.weight"], code["model.layers.3.mlp.gate_proj.weight"])
    assert torch.equal(a["model.layers.3.self_attn.q_proj.weight"], code["model.layers.3.self_attn.q_proj.weight"])
    for shard in sorted((tmp_path / "a").glob("*.safetensors")):  # same config, same bytes
        assert shard.read_bytes() == (tmp_path / "b" / shard.name).read_bytes()


def test_moe_keeps_a_tied_base_tied(fx: Path, tmp_path: Path) -> None:
    """A tied-embedding Llama-family base: no lm_head is written and the config says tied."""
    tied = tmp_path / "tied"
    tied.mkdir()
    config = json.loads((fx / "mistral-base" / "config.json").read_text())
    config["tie_word_embeddings"] = True
    (tied / "config.json").write_text(json.dumps(config))
    from safetensors.torch import save_file

    weights = {k: v for k, v in tensors(fx / "mistral-base").items() if k != "lm_head.weight"}
    save_file(weights, str(tied / "model.safetensors"))
    out = tmp_path / "out"
    run_merge(f"base_model: {tied}\ngate_mode: uniform_random\nexperts:\n  - source_model: {tied}\n  - source_model: {tied}\n",
              out, device="cpu")
    assert "lm_head.weight" not in tensors(out)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    gate = tensors(out)["model.layers.0.block_sparse_moe.gate.weight"].float()
    assert gate.abs().max() <= 1 / 96 ** 0.5  # uniform_random: U(-1/sqrt(H), 1/sqrt(H))


def _variant(fx: Path, tmp_path: Path, name: str, config_changes: dict, extra: dict | None = None) -> Path:
    """A copy of `mistral-code` with its config.json changed and, optionally, extra tensors."""
    from safetensors.torch import save_file

    folder = tmp_path / name
    folder.mkdir()
    config = json.loads((fx / "mistral-code" / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **config_changes}))
    save_file({**tensors(fx / "mistral-code"), **(extra or {})}, str(folder / "model.safetensors"))
    return folder


def test_moe_keeps_the_base_sliding_window_and_computes_like_the_dense_model(fx: Path, tmp_path: Path) -> None:
    """A window of 4 over the 8-token prompt changes the logits: the MoE must keep it to match its base."""
    dense = _variant(fx, tmp_path, "windowed", {"sliding_window": 4})
    out = tmp_path / "out"
    run_merge(f"base_model: {dense}\ngate_mode: random\nexperts:\n  - source_model: {dense}\n  - source_model: {dense}\n",
              out, device="cpu")
    assert json.loads((out / "config.json").read_text())["sliding_window"] == 4
    torch.testing.assert_close(logits(out), logits(dense), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(logits(dense), logits(fx / "mistral-code"), atol=1e-3)  # the window matters here


def test_moe_base_tensors_a_mixtral_cannot_hold_are_refused_by_name(fx: Path, tmp_path: Path) -> None:
    biases = {f"model.layers.{i}.self_attn.q_proj.bias": torch.zeros(96, dtype=torch.bfloat16) for i in range(4)}
    base = _variant(fx, tmp_path, "biased", {}, biases)
    out = tmp_path / "out"
    with pytest.raises(UnmergedTensorsError, match=r"4 tensor\(s\) a Mixtral output cannot hold.*q_proj.bias"):
        run_merge(f"base_model: {base}\ngate_mode: random\nexperts_per_token: 1\nexperts:\n  - source_model: {fx / 'mistral-code'}\n", out, device="cpu")
    assert not out.exists()


def test_moe_expert_settings_that_differ_from_the_base_are_named(fx: Path, tmp_path: Path) -> None:
    from merger.validate import validate_config

    other = _variant(fx, tmp_path, "other-rope", {"rope_theta": 50000.0, "rope_parameters": {"rope_theta": 50000.0, "rope_type": "default"}})
    report = validate_config(f"base_model: {fx / 'mistral-code'}\ngate_mode: random\nexperts_per_token: 1\nexperts:\n  - source_model: {other}\n")
    assert any("rope" in w and "50000" in w for w in report.warnings), report.warnings


def test_output_folder_has_every_file_and_copies_the_tokenizer(fx: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    text = slerp_yaml(fx / "mistral-prose", fx / "mistral-code", 0.3)
    run_merge(text, out, device="cpu")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        assert (out / name).read_bytes() == (fx / "mistral-prose" / name).read_bytes()
    assert (out / "mergekit_config.yml").read_text() == text
    assert "merge_method: slerp" in (out / "README.md").read_text()
    assert not list(tmp_path.glob(".out.*"))  # no staging folder left behind


@pytest.mark.parametrize(
    "text, error, words",
    [
        ("merge_method: slerp\nbase_model: {p}\nslices:\n  - sources:\n      - {{model: {p}, layer_range: [2, 2]}}\n"
         "      - {{model: {c}, layer_range: [2, 2]}}\nparameters: {{t: 0.5}}\n",
         ConfigError, ["layer_range", "[2, 2]"]),
        ("merge_method: passthrough\nslices:\n  - sources:\n      - {{model: {p}, layer_range: [0, 5]}}\n",
         LayerRangeError, ["layer_range", "[0, 5]", "4 layers"]),
        ("merge_method: slurp\nmodels:\n  - model: {p}\n", UnknownMethodError, ["slurp", "slerp"]),
        ("merge_method: slerp\nbase_model: {p}\nmodels:\n  - model: {p}\n  - model: {c}\n  - model: {b}\nparameters: {{t: 0.5}}\n",
         ModelCountError, ["slerp", "exactly 2 models", "got 3"]),
        ("merge_method: slerp\nmodels:\n  - model: {p}\n  - model: {c}\nparameters: {{t: 0.5}}\n",
         BaseModelError, ["base_model", "required"]),
        ("merge_method: linear\nmodels:\n  - model: {p}\n    parameters: {{weight: 1}}\n  - model: {c}\n",
         MissingParameterError, ["weight", "models[1]"]),
    ],
    ids=["empty-range", "range-past-end", "unknown-method", "slerp-three", "slerp-no-base", "missing-weight"],
)
def test_bad_configs_name_the_field_and_write_nothing(fx, tmp_path, text, error, words) -> None:
    text = text.format(p=fx / "mistral-prose", c=fx / "mistral-code", b=fx / "mistral-base")
    with pytest.raises(error) as caught:
        run_merge(text, tmp_path / "out", device="cpu")
    for word in words:
        assert word in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_pickle_only_model_is_refused(fx: Path, tmp_path: Path) -> None:
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_bytes((fx / "mistral-base" / "config.json").read_bytes())
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    text = f"merge_method: passthrough\nmodels:\n  - model: {pickled}\n"
    with pytest.raises(UnsafeWeightsError, match="pickle"):
        run_merge(text, tmp_path / "out", device="cpu")


def test_missing_local_model_is_named(tmp_path: Path) -> None:
    with pytest.raises(MergerError, match="no-such-dir"):
        run_merge("merge_method: passthrough\nmodels:\n  - model: ./no-such-dir\n", tmp_path / "out", device="cpu")


def test_run_merge_takes_the_callers_parsed_config_and_plan(fx: Path, tmp_path: Path, monkeypatch) -> None:
    """A caller that validated first passes its config and plan on: the engine neither parses nor plans again."""
    from merger import engine
    from merger.config.load import load_config
    from merger.plan.entry import plan_config

    text = slerp_yaml(fx / "mistral-prose", fx / "mistral-code", 1.0)
    config = load_config(text)
    planned = plan_config(config, None)

    def refuse(*args, **kwargs):
        raise AssertionError("parsed or planned a second time")

    monkeypatch.setattr(engine, "load_config", refuse)
    monkeypatch.setattr(engine, "plan_config", refuse)
    out = tmp_path / "out"
    result = run_merge(text, out, device="cpu", config=config, planned=planned)
    parent = tensors(fx / "mistral-code")
    assert result.parameter_count == sum(t.numel() for t in parent.values())
    assert all(torch.equal(tensors(out)[name], tensor) for name, tensor in parent.items())  # t = 1: the second parent
