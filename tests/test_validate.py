"""`merger validate` on the seed configs, from metadata alone: the real Mistral configs and header-only shards
served by the loopback Hub (a header-only shard has the real names, shapes and dtypes but no data, so any
attempt to read weights would fail)."""

from __future__ import annotations

import json
import shutil
import math
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from merger.validate import validate_config

ROOT = Path(__file__).parents[1]
SEED = ROOT / "tests" / "data" / "seed"
EXAMPLES = ROOT / "templates" / "examples"
REPOS = ("mistralai/Mistral-7B-Instruct-v0.1", "mistralai/Mistral-7B-Instruct-v0.2")
# The other examples' models are fine-tunes of Mistral-7B-v0.1: stand-ins with its shapes (Instruct v0.1's config).
FIXTURE_TOKENIZER = ROOT / "tests" / "data" / "fixtures" / "mistral-base"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
V01_FAMILY = ("mistralai/Mistral-7B-v0.1", "HuggingFaceH4/zephyr-7b-beta", "Intel/neural-chat-7b-v3-3")


def mistral_shapes(config: dict) -> dict[str, list[int]]:
    """Tensor names and shapes of a Mistral checkpoint, from its config (the layout of the Hub's Mistral checkpoints)."""
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv = config["num_key_value_heads"] * h // config["num_attention_heads"]
    shapes = {"model.embed_tokens.weight": [v, h], "model.norm.weight": [h], "lm_head.weight": [v, h]}
    for n in range(config["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes.update({
            p + "self_attn.q_proj.weight": [h, h], p + "self_attn.k_proj.weight": [kv, h],
            p + "self_attn.v_proj.weight": [kv, h], p + "self_attn.o_proj.weight": [h, h],
            p + "mlp.gate_proj.weight": [i, h], p + "mlp.up_proj.weight": [i, h], p + "mlp.down_proj.weight": [h, i],
            p + "input_layernorm.weight": [h], p + "post_attention_layernorm.weight": [h],
        })
    return shapes


def write_header_only_checkpoint(config: dict, out: Path, shards: int = 3) -> None:
    """Sharded safetensors headers (bf16) plus the index, with no tensor data behind them."""
    names = list(mistral_shapes(config).items())
    per_shard = -(-len(names) // shards)
    weight_map = {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        header, offset = {}, 0
        for name, shape in names[s * per_shard:(s + 1) * per_shard]:
            size = 2 * math.prod(shape)
            header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + size]}
            offset += size
            weight_map[name] = file
        text = json.dumps(header).encode()
        (out / file).write_bytes(struct.pack("<Q", len(text)) + text)
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def seed_repos(hub, tmp_path_factory) -> None:
    for repo in REPOS:
        folder = tmp_path_factory.mktemp(repo.split("/")[1])
        write_header_only_checkpoint(json.loads((SEED / f"{repo.split('/')[1]}.config.json").read_text()), folder)
        for name in TOKENIZER_FILES:  # a stand-in tokenizer (the fixtures'): prompt gates count tokens at validation
            shutil.copy(FIXTURE_TOKENIZER / name, folder / name)
        hub.upload_model(folder, repo, token="hf_test_mistralai")
    for repo in V01_FAMILY:  # published by mistralai's token, a member of these orgs on the loopback Hub only
        hub.store.orgs.setdefault(repo.split("/")[0], {})["mistralai"] = "write"
        folder = tmp_path_factory.mktemp(repo.split("/")[1])
        write_header_only_checkpoint(json.loads((SEED / "Mistral-7B-Instruct-v0.1.config.json").read_text()), folder)
        hub.upload_model(folder, repo, token="hf_test_mistralai")


@pytest.mark.parametrize(
    "example, layers, parameters, architecture",
    [
        ("seed-slerp.yaml", 32, 7_241_732_096, "MistralForCausalLM"),
        ("seed-frankenmerge.yaml", 40, 8_986_628_096, "MistralForCausalLM"),
        ("seed-moe.yaml", 32, 12_879_138_816, "MixtralForCausalLM"),
        ("seed-linear.yaml", 32, 7_241_732_096, "MistralForCausalLM"),
        ("seed-ties.yaml", 32, 7_241_732_096, "MistralForCausalLM"),
        ("seed-moe-hidden.yaml", 32, 12_879_138_816, "MixtralForCausalLM"),
        ("seed-stages.yaml", 40, 8_986_628_096, "MistralForCausalLM"),  # the last stage: 24 + 16 layers
    ],
)
def test_seed_configs_validate_from_metadata(seed_repos, example, layers, parameters, architecture) -> None:
    report = validate_config((EXAMPLES / example).read_text())
    assert (report.num_layers, report.parameter_count, report.architecture) == (layers, parameters, architecture)


def test_validate_cli_prints_layers_and_parameters(seed_repos) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "merger", "validate", str(EXAMPLES / "seed-frankenmerge.yaml")],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "layers: 40" in done.stdout and "parameters: 8986628096" in done.stdout
    assert "8.99B" in done.stdout


def test_frankenmerge_past_the_last_layer_is_refused_before_download(seed_repos) -> None:
    text = (EXAMPLES / "seed-frankenmerge.yaml").read_text().replace("[12, 32]", "[12, 33]")
    with pytest.raises(ValueError, match=r"past the last layer .* 32 layers"):
        validate_config(text)


def test_missing_repo_is_named(seed_repos) -> None:
    text = (EXAMPLES / "seed-slerp.yaml").read_text().replace("Mistral-7B-Instruct-v0.2", "Mistral-7B-Instruct-v9")
    with pytest.raises(FileNotFoundError, match="Mistral-7B-Instruct-v9"):
        validate_config(text)


def test_every_seed_example_has_an_offline_twin_that_validates() -> None:
    """Each real-model example has a fixture twin of the same method, and every twin validates from local files."""
    from merger.config.examples import load_examples
    from merger.config.parse import parse_config_documents

    def last_method(text: str) -> str:  # a multi-stage config's method is its last stage's
        return parse_config_documents(text)[-1][0].get("merge_method", "moe")

    examples = {e.name: e for e in load_examples(EXAMPLES)}
    seeds = [name for name in examples if name.startswith("seed-")]
    assert len(seeds) >= 5
    for name in seeds:
        twin = examples[name.replace("seed-", "fixture-", 1)]
        assert last_method(twin.yaml_text) == last_method(examples[name].yaml_text), name
    for example in examples.values():
        assert example.title and example.description and ".yaml" not in example.title + example.description
        if example.name.startswith("fixture-"):
            report = validate_config(example.yaml_text)
            assert report.architecture in ("MistralForCausalLM", "MixtralForCausalLM", "LlamaForCausalLM"), example.name
