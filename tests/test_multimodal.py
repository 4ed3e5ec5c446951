"""Multimodal checkpoints merge by their text decoder; the output loads with its class.

Tiny LLaVA models (Llama text decoder + CLIP vision tower + projector) with seeded random weights are
built here. References are computed independently: state dicts averaged (or layers stacked) by hand,
loaded into the class, and their logits compared with the merged output's on a prompt with an image.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from merger.engine import run_merge
from merger.errors import LayerRangeError
from merger.validate import validate_config
from helpers import weights

IMAGE_TOKEN = 63
TEXT = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
            num_key_value_heads=1, tie_word_embeddings=False)
VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=8,
              patch_size=4, projection_dim=16)


def llava_config(**text):
    from transformers import LlavaConfig

    return LlavaConfig(text_config=dict(TEXT, model_type="llama", **text), vision_config=dict(VISION, model_type="clip_vision_model"),
                       image_token_index=IMAGE_TOKEN, vision_feature_layer=-1, image_seq_length=4)


def tiny_llava(path: Path, seed: int, **text) -> Path:
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    LlavaForConditionalGeneration(llava_config(**text)).save_pretrained(path)
    return path


def logits(model) -> torch.Tensor:
    """Logits on 4 image tokens (a 8x8 image is 4 patches) followed by text."""
    torch.manual_seed(7)
    pixels = torch.randn(1, 3, 8, 8)
    ids = torch.tensor([[1, IMAGE_TOKEN, IMAGE_TOKEN, IMAGE_TOKEN, IMAGE_TOKEN, 5, 17, 33, 2]])
    with torch.no_grad():
        return model.eval()(input_ids=ids, pixel_values=pixels).logits


def load(path_or_config, state: dict | None = None):
    from transformers import LlavaForConditionalGeneration

    if state is None:
        return LlavaForConditionalGeneration.from_pretrained(path_or_config, dtype=torch.float32)
    model = LlavaForConditionalGeneration(path_or_config)
    model.load_state_dict(state)
    return model


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("llava")
    return tiny_llava(root / "a", 0), tiny_llava(root / "b", 1)


def test_linear_50_50_merges_text_vision_and_projector_and_loads_with_its_class(pair, tmp_path: Path):
    a, b = pair
    out = tmp_path / "out"
    text = f"merge_method: linear\nmodels:\n  - {{model: {a}, parameters: {{weight: 0.5}}}}\n" \
           f"  - {{model: {b}, parameters: {{weight: 0.5}}}}\n"
    assert validate_config(text).num_layers == 3
    run_merge(text, out, device="cpu")
    merged = load(out)
    assert type(merged).__name__ == "LlavaForConditionalGeneration"
    model_a, model_b = load(a), load(b)
    sa, sb = model_a.state_dict(), model_b.state_dict()
    reference = load(model_a.config, {k: (sa[k] + sb[k]) / 2 for k in sa})
    assert not torch.allclose(logits(model_a), logits(reference), atol=1e-3)  # the merge changed something
    torch.testing.assert_close(logits(merged), logits(reference), rtol=0, atol=1e-5)
    config = json.loads((out / "config.json").read_text())
    assert config["vision_config"] == json.loads((a / "config.json").read_text())["vision_config"]
    assert set(weights(out)) == set(weights(a))  # every tensor: decoder, vision tower, projector


def test_frankenmerge_counts_text_layers_and_takes_vision_from_the_first_model(pair, tmp_path: Path):
    a, b = pair
    out = tmp_path / "out"
    text = (f"merge_method: passthrough\nslices:\n  - sources: [{{model: {a}, layer_range: [0, 2]}}]\n"
            f"  - sources: [{{model: {b}, layer_range: [1, 3]}}]\n")
    report = validate_config(text)
    assert report.num_layers == 4
    assert any(w.startswith("`vision_tower.*`") and f"`{a}`'s" in w for w in report.warnings)
    run_merge(text, out, device="cpu")
    merged = load(out)
    assert merged.config.text_config.num_hidden_layers == 4
    sa, sb = load(a).state_dict(), load(b).state_dict()
    layers = [(sa, 0), (sa, 1), (sb, 1), (sb, 2)]
    state = {}
    for name, tensor in sa.items():
        prefix = "model.language_model.layers."
        if name.startswith(prefix):
            continue
        state[name] = sb[name] if name in ("model.language_model.norm.weight", "lm_head.weight") else tensor
    for index, (source, layer) in enumerate(layers):
        for name, tensor in source.items():
            if name.startswith(f"model.language_model.layers.{layer}."):
                state[name.replace(f".layers.{layer}.", f".layers.{index}.", 1)] = tensor
    reference = load(llava_config(num_hidden_layers=4), state)
    torch.testing.assert_close(logits(merged), logits(reference), rtol=0, atol=0)


def test_layer_ranges_past_the_text_decoder_are_refused(pair):
    a, b = pair
    text = f"merge_method: passthrough\nslices:\n  - sources: [{{model: {a}, layer_range: [0, 4]}}]\n"
    with pytest.raises(LayerRangeError, match="which has 3 layers"):
        validate_config(text)


def test_mergekit_modules_text_decoder_is_the_top_level_slices(pair):
    a, b = pair
    body = (f"    slices:\n      - sources: [{{model: {a}, layer_range: [0, 2]}}]\n"
            f"      - sources: [{{model: {b}, layer_range: [1, 3]}}]\n")
    plain = validate_config("merge_method: passthrough\n" + body.replace("\n    ", "\n").lstrip())
    modular = validate_config(f"merge_method: passthrough\nmodules:\n  text_decoder:\n{body}")
    assert modular == plain and modular.num_layers == 4


@pytest.mark.parametrize("modules, message", [
    ("  vision_tower:\n    models: [{model: x}]\n", "only `text_decoder`.*, not `vision_tower`.*remove their entries"),
    ("  text_decoder: [1]\n", "only `text_decoder`"),
])
def test_other_modules_are_refused_by_name(modules, message):
    from merger.config.load import load_config
    from merger.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        load_config(f"merge_method: linear\nmodules:\n{modules}")


def test_a_text_only_finetune_merges_into_a_multimodal_base(tmp_path: Path):
    """Gemma3ForCausalLM (the text decoder alone) + a Gemma-3 base: text averaged, vision kept from the base."""
    from transformers import Gemma3Config, Gemma3ForCausalLM, Gemma3ForConditionalGeneration

    text = dict(vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, head_dim=8)
    config = Gemma3Config(text_config=text, mm_tokens_per_image=4, vision_config=dict(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=8, patch_size=4))
    torch.manual_seed(0)
    Gemma3ForConditionalGeneration(config).save_pretrained(tmp_path / "base")
    torch.manual_seed(1)
    Gemma3ForCausalLM(config.text_config).save_pretrained(tmp_path / "text")
    out = tmp_path / "out"
    yaml_text = (f"merge_method: linear\nbase_model: {tmp_path / 'base'}\nmodels:\n"
                 f"  - {{model: {tmp_path / 'base'}, parameters: {{weight: 0.5}}}}\n"
                 f"  - {{model: {tmp_path / 'text'}, parameters: {{weight: 0.5}}}}\n")
    assert any(w.startswith("`vision_tower.*`") and "not in every input" in w for w in validate_config(yaml_text).warnings)
    run_merge(yaml_text, out, device="cpu")
    merged = Gemma3ForConditionalGeneration.from_pretrained(out, dtype=torch.float32)
    base = Gemma3ForConditionalGeneration.from_pretrained(tmp_path / "base", dtype=torch.float32).state_dict()
    finetune = Gemma3ForCausalLM.from_pretrained(tmp_path / "text", dtype=torch.float32).state_dict()
    prefix = "model.language_model."
    reference = {k: (v + finetune["model." + k[len(prefix):]]) / 2 if k.startswith(prefix) else v for k, v in base.items()}
    reference["lm_head.weight"] = reference[prefix + "embed_tokens.weight"]  # tied
    for name, tensor in merged.state_dict().items():
        torch.testing.assert_close(tensor, reference[name], rtol=0, atol=1e-6, msg=name)
    assert any(not torch.equal(base[k], reference[k]) for k in base if k.startswith(prefix))


def test_gemma3_frankenmerge_sets_the_text_layer_count_and_layer_types_in_text_config(tmp_path: Path):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    from merger.config.load import load_config
    from merger.plan.entry import plan_config

    config = Gemma3Config(mm_tokens_per_image=4, text_config=dict(
        vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, layer_types=["sliding_attention", "full_attention"]),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=8, patch_size=4))
    torch.manual_seed(0)
    Gemma3ForConditionalGeneration(config).save_pretrained(tmp_path / "g")
    g = tmp_path / "g"
    text = (f"merge_method: passthrough\nslices:\n  - sources: [{{model: {g}, layer_range: [0, 2]}}]\n"
            f"  - sources: [{{model: {g}, layer_range: [1, 2]}}]\n")
    plan, _ = plan_config(load_config(text), None)
    out = plan.output_config
    assert out["text_config"]["num_hidden_layers"] == 3 and "num_hidden_layers" not in out
    assert out["text_config"]["layer_types"] == ["sliding_attention", "full_attention", "full_attention"]
    assert out["vision_config"] == json.loads((g / "config.json").read_text())["vision_config"]
    assert plan.warnings == ()  # one model in every slice: its vision tower is merged (copied) as a whole-model merge
