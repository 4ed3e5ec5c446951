"""Architecture definitions against real transformers checkpoints, and inference for unknown decoders.

Each definition is checked against a tiny random model of its class, saved by transformers the way
real checkpoints are: the names the definition expects (pre + every layer + post, optional and tied
tensors honoured) must equal the saved names exactly. Models are built once per module.
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import pytest
from transformers import AutoConfig, AutoModelForCausalLM

from merger.plan.architecture import ARCHITECTURES_DIR, Architecture, WeightInfo, load_definitions
from merger.plan.inference import infer_architecture
from merger.plan.lookup import architecture_for
from merger.errors import ArchitectureError
from merger.plan.definitions import WeightEntry
from merger.io.metadata import ModelMetadata, read_local_metadata

# Tiny sizes: 2 layers, hidden 32, vocab 160 (no other tensor has 160 rows, so shapes single out embeddings).
DECODER = dict(
    num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
    head_dim=8, vocab_size=160, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)
GPT = dict(n_layer=2, n_embd=32, n_head=4, n_positions=64, vocab_size=160, bos_token_id=1, eos_token_id=2)
NEOX = dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4, vocab_size=160)
BLOOM = dict(n_layer=2, hidden_size=32, n_head=4, vocab_size=160)

STABLELM_POST_NORM = (
    "model.layers.${layer_index}.post_attention_layernorm.weight",
    "model.layers.${layer_index}.post_attention_layernorm.bias",
)
STABLELM_QKV_BIAS = tuple(f"model.layers.${{layer_index}}.self_attn.{p}_proj.bias" for p in "qkv")

# (model_type, config overrides, optional non-head templates the checkpoint has); each runs tied and untied.
FAMILIES = [
    ("llama", DECODER, ()),
    ("mistral", DECODER, ()),
    ("mixtral", dict(DECODER, num_local_experts=2), ()),
    ("qwen2_moe", dict(DECODER, num_experts=2, num_experts_per_tok=2, moe_intermediate_size=64,
                       shared_expert_intermediate_size=64), ()),
    ("qwen3_moe", dict(DECODER, num_experts=2, num_experts_per_tok=2, moe_intermediate_size=64), ()),
    ("qwen2", DECODER, ()),
    ("qwen3", DECODER, ()),
    ("gemma", DECODER, ()),
    ("gemma2", DECODER, ()),
    ("gemma3_text", DECODER, ()),
    ("phi", DECODER, ()),
    ("phi3", DECODER, ()),
    ("olmo2", DECODER, ()),
    ("starcoder2", DECODER, ()),
    ("stablelm", DECODER, STABLELM_POST_NORM),
    ("stablelm", dict(DECODER, use_qkv_bias=True, use_parallel_residual=True), STABLELM_QKV_BIAS),
    ("granite", DECODER, ()),
    ("cohere", DECODER, ()),
    ("gpt2", GPT, ()),
    ("gpt_bigcode", GPT, ()),
    ("gpt_neox", NEOX, ()),
]
CASES = [pytest.param(*family, tied, id=f"{family[0]}-{i}-{'tied' if tied else 'untied'}")
         for i, family in enumerate(FAMILIES) for tied in (False, True)]

_saved: dict[tuple, ModelMetadata] = {}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """Build (once per module) and save a tiny random model; returns its metadata as merger reads it."""

    def build(model_type: str, overrides: dict, tied: bool) -> ModelMetadata:
        key = (model_type, json.dumps(overrides, sort_keys=True), tied)
        if key not in _saved:
            config = AutoConfig.for_model(model_type, **overrides, tie_word_embeddings=tied)
            out = tmp_path_factory.mktemp(model_type)
            AutoModelForCausalLM.from_config(config).save_pretrained(out, safe_serialization=True)
            _saved[key] = read_local_metadata(out)
        return _saved[key]

    yield build
    _saved.clear()


def expected_names(arch: Architecture, config: dict, tied: bool, present_optional: tuple[str, ...]) -> set[str]:
    """The tensor names a checkpoint of `arch` must hold: required ones, the head unless tied, and the
    listed optional templates; expert templates expanded over `num_local_experts` (Mixtral) or `num_experts`."""

    def wanted(weight: WeightInfo) -> bool:
        if not weight.optional:
            return True
        return not tied if weight.tied_names else weight.name in present_optional

    names = {w.name for w in arch.pre_weights + arch.post_weights if wanted(w)}
    for layer in range(arch.num_layers(config)):
        for template in filter(wanted, arch.layer_weights):
            if "${expert_index}" in template.name:
                experts = config.get("num_local_experts") or config["num_experts"]
                names |= {template.for_layer(layer, e).name for e in range(experts)}
            else:
                names.add(template.for_layer(layer).name)
    return names


@pytest.mark.parametrize(("model_type", "overrides", "present_optional", "tied"), CASES)
def test_definition_lists_exactly_the_saved_tensors(checkpoint, model_type, overrides, present_optional, tied):
    meta = checkpoint(model_type, overrides, tied)
    arch = architecture_for(meta.config, model_type)
    assert arch.model_type == model_type and not arch.inferred
    assert meta.config["architectures"][0] in arch.architectures
    assert expected_names(arch, meta.config, tied, present_optional) == set(meta.tensors)
    vocab = meta.config["vocab_size"]
    for weight in arch.pre_weights + arch.post_weights:
        if weight.name in meta.tensors:
            assert weight.is_embed == (meta.tensors[weight.name].shape[0] == vocab), weight.name


def test_every_definition_is_checked_against_a_checkpoint():
    assert {d.model_type for d in load_definitions(ARCHITECTURES_DIR)} == {family[0] for family in FAMILIES}


def test_gpt2_aliases_read_hub_checkpoints_without_the_transformer_prefix(checkpoint):
    """openai-community/gpt2 stores `h.0.attn.c_attn.weight`, `wte.weight`; save_pretrained adds `transformer.`."""
    for tied in (False, True):
        meta = checkpoint("gpt2", GPT, tied)
        arch = architecture_for(meta.config, "openai-community/gpt2")
        assert (arch.model_type, arch.num_layers_config_key, arch.num_layers(meta.config)) == ("gpt2", "n_layer", 2)
        hub_names = {name.removeprefix("transformer.") for name in meta.tensors}
        weights = [*arch.pre_weights, *(w for i in range(2) for w in arch.layer(i)), *arch.post_weights]
        for weight in weights:
            if weight.name in meta.tensors:
                assert weight.stored_name(hub_names) == weight.name.removeprefix("transformer."), weight.name
                assert weight.stored_name(hub_names, tied=False) is not None
            else:  # the tied head reads the un-prefixed embeddings
                assert (weight.name, weight.stored_name(hub_names)) == ("lm_head.weight", "wte.weight")
                assert weight.stored_name(hub_names, tied=False) is None


def test_for_layer_fills_aliases_and_tied_names():
    template = WeightInfo("t.h.${layer_index}.w", aliases=("h.${layer_index}.w",), tied_names=("x.${layer_index}",))
    assert template.for_layer(3) == WeightInfo("t.h.3.w", aliases=("h.3.w",), tied_names=("x.3",))


@pytest.mark.parametrize(
    ("model_type", "overrides", "prefix", "embedding", "post"),
    [
        ("falcon", dict(NEOX), "transformer.h.", "transformer.word_embeddings.weight",
         ["transformer.ln_f.bias", "transformer.ln_f.weight"]),
        ("bloom", BLOOM, "transformer.h.", "transformer.word_embeddings.weight",
         ["transformer.ln_f.bias", "transformer.ln_f.weight"]),
    ],
)
@pytest.mark.parametrize("tied", [False, True])
def test_unknown_family_is_inferred_from_its_tensors(checkpoint, model_type, overrides, prefix, embedding, post, tied):
    meta = checkpoint(model_type, overrides, tied)
    with pytest.raises(ArchitectureError, match="does not support yet"):
        architecture_for(meta.config, model_type)
    arch = architecture_for(meta.config, model_type, meta.tensors)
    assert arch.inferred and arch.model_type == model_type
    assert arch.num_layers(meta.config) == 2
    layer0 = {n.removeprefix(prefix + "0.") for n in meta.tensors if n.startswith(prefix + "0.")}
    assert [w.name for w in arch.layer_weights] == [f"{prefix}${{layer_index}}.{s}" for s in sorted(layer0)]
    assert not any(w.is_embed or w.optional for w in arch.layer_weights)
    embeddings = [w for w in arch.pre_weights if w.is_embed]
    assert [w.name for w in embeddings] == [embedding]
    head = [] if tied else [WeightInfo("lm_head.weight", is_embed=True, optional=True, tied_names=(embedding,))]
    assert list(arch.post_weights) == [WeightInfo(n) for n in post] + head
    assert expected_names(arch, meta.config, tied, ()) == set(meta.tensors)


@pytest.mark.parametrize("model_type, overrides", [("gpt_neox", NEOX), ("gpt2", GPT), ("llama", DECODER)])
def test_inference_agrees_with_the_hand_written_definitions(checkpoint, model_type, overrides):
    """gpt_neox's `final_layer_norm` sorts before `layers` yet is a post-weight; `embed_out` is its head."""
    meta = checkpoint(model_type, overrides, False)
    defined = architecture_for(meta.config, model_type)
    inferred = infer_architecture(meta.config, meta.tensors)

    def section(weights):
        return {(w.name, w.is_embed, w.optional, w.tied_names[:1]) for w in weights}

    assert inferred.num_layers_config_key == defined.num_layers_config_key
    assert section(inferred.pre_weights) == section(defined.pre_weights)
    assert section(inferred.layer_weights) == section(defined.layer_weights)
    assert section(inferred.post_weights) == section(defined.post_weights)


def test_inference_from_names_alone_spots_embeddings_by_module_name():
    names = ["tok_embeddings.weight", "layers.0.attention.wq.weight", "layers.1.attention.wq.weight",
             "norm.weight", "output.weight"]
    arch = infer_architecture({"model_type": "x", "n_layers": 2}, names)
    assert arch.num_layers_config_key == "n_layers"
    assert arch.pre_weights == (WeightInfo("tok_embeddings.weight", is_embed=True),)
    assert arch.layer_weights == (WeightInfo("layers.${layer_index}.attention.wq.weight"),)
    assert arch.post_weights == (
        WeightInfo("norm.weight"),
        WeightInfo("output.weight", is_embed=True, optional=True, tied_names=("tok_embeddings.weight",)),
    )


@pytest.mark.parametrize(
    ("config", "names", "message"),
    [
        ({"vocab_size": 8}, ["m.layers.0.w"], "no layer count"),
        ({"num_layers": 1}, ["embed.weight", "norm.weight"], "no tensor name has a layer index"),
        ({"num_layers": 1}, ["lm.layers.0.w", "vision.layers.0.w"], "more than one layer stack"),
        ({"num_layers": 3}, ["m.layers.0.w", "m.layers.1.w"], r"`num_layers: 3`.*layer indices 0\.\.1"),
        ({"num_layers": 2}, ["m.layers.0.w", "m.layers.0.b", "m.layers.1.w"], "layer 1 .*differing: `b`"),
    ],
)
def test_inference_rejects_what_it_cannot_describe(config, names, message):
    config = {"architectures": ["OddForCausalLM"], "model_type": "odd", **config}
    with pytest.raises(ArchitectureError, match=message) as error:
        architecture_for(config, "org/odd", names)
    assert "`org/odd`" in str(error.value) and "OddForCausalLM" in str(error.value)


VALID = {
    "model_type": "toy",
    "architectures": ["ToyForCausalLM"],
    "num_layers_config_key": "num_hidden_layers",
    "pre_weights": [{"name": "embed.weight", "is_embed": True}],
    "layer_templates": {"weights": [{"name": "layers.${layer_index}.w", "aliases": ["h.${layer_index}.w"]}]},
    "post_weights": [{"name": "head.weight", "optional": True, "tied_names": ["embed.weight"]}],
}


def _edited(edit) -> dict:
    data = json.loads(json.dumps(VALID))
    edit(data)
    return data


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("{not json", "is not valid JSON"),
        (_edited(lambda d: d.pop("post_weights")), "`post_weights` is required"),
        (_edited(lambda d: d.update(kind="modular")), "`kind` is not a known key"),
        (_edited(lambda d: d.update(architectures="ToyForCausalLM")), "`architectures` must be a list"),
        (_edited(lambda d: d.update(architectures=[])), "at least one"),
        (_edited(lambda d: d["pre_weights"][0].update(is_embeded=True)), r"`pre_weights\[0\]\.is_embeded` is not a known key"),
        (_edited(lambda d: d["pre_weights"][0].update(is_embed="yes")), r"`pre_weights\[0\]\.is_embed` must be a boolean"),
        (_edited(lambda d: d["post_weights"][0].update(tied_names="embed.weight")), r"`post_weights\[0\]\.tied_names` must be a list"),
        (_edited(lambda d: d["pre_weights"].append({"is_embed": True})), r"`pre_weights\[1\]\.name` is required"),
        (_edited(lambda d: d["layer_templates"]["weights"].append({"name": "layers.w"})), "must contain"),
        (_edited(lambda d: d["post_weights"].append({"name": "x.${layer_index}.w"})), "must not contain"),
        (_edited(lambda d: d.update(layer_templates=[])), "`layer_templates` must be an object"),
    ],
)
def test_malformed_definitions_are_rejected_naming_the_file(tmp_path: Path, data, message):
    (tmp_path / "toy.json").write_text(data if isinstance(data, str) else json.dumps(data))
    with pytest.raises(ArchitectureError, match=message) as error:
        load_definitions(tmp_path)
    assert str(error.value).startswith("toy.json")


def test_two_files_with_one_model_type_are_rejected(tmp_path: Path):
    for name in ("a.json", "b.json"):
        (tmp_path / name).write_text(json.dumps(VALID))
    with pytest.raises(ArchitectureError, match="b.json and a.json both define model_type `toy`"):
        load_definitions(tmp_path)


def test_a_valid_definition_loads_every_field(tmp_path: Path):
    (tmp_path / "toy.json").write_text(json.dumps(VALID))
    (arch,) = load_definitions(tmp_path)
    assert arch.layer_weights == (WeightInfo("layers.${layer_index}.w", aliases=("h.${layer_index}.w",)),)
    assert arch.post_weights == (WeightInfo("head.weight", optional=True, tied_names=("embed.weight",)),)
    assert set(WeightEntry.model_fields) == {f.name for f in fields(WeightInfo)}


# ---------------------------------------------------------------- multimodal checkpoints

MM_TEXT = dict(vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
               num_key_value_heads=1, head_dim=8)
MM_VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=8,
                 patch_size=4)
MROPE = {"type": "mrope", "mrope_section": [1, 1, 2]}
# (model_type, config, text decoder's first tensor, side modules, inferred text layout)
MULTIMODAL = [
    ("gemma3", dict(text_config=MM_TEXT, vision_config=MM_VISION, mm_tokens_per_image=4),
     "language_model.model.embed_tokens.weight", ["multi_modal_projector", "vision_tower"], False),
    ("mistral3", dict(text_config=dict(MM_TEXT, model_type="mistral"), spatial_merge_size=1,
                      vision_config=dict(MM_VISION, model_type="pixtral", head_dim=8, image_size=16)),
     "language_model.model.embed_tokens.weight", ["multi_modal_projector", "vision_tower"], False),
    ("paligemma", dict(text_config=dict(MM_TEXT, model_type="gemma"), vision_config=dict(MM_VISION, projection_dim=16)),
     "language_model.model.embed_tokens.weight", ["multi_modal_projector", "vision_tower"], False),
    ("qwen2_vl", dict(text_config=dict(MM_TEXT, rope_scaling=MROPE), vision_config=dict(
        depth=1, embed_dim=16, hidden_size=16, num_heads=2, mlp_ratio=2, patch_size=4, spatial_merge_size=1)),
     "model.embed_tokens.weight", ["visual"], True),
]


def _multimodal(tmp_path_factory, model_type: str, config: dict) -> ModelMetadata:
    from transformers import AutoModelForImageTextToText

    out = tmp_path_factory.mktemp(model_type)
    AutoModelForImageTextToText.from_config(AutoConfig.for_model(model_type, **config)).save_pretrained(out)
    return read_local_metadata(out)


@pytest.mark.parametrize(("model_type", "config", "embed", "side", "inferred"), MULTIMODAL, ids=[m[0] for m in MULTIMODAL])
def test_multimodal_checkpoints_are_their_text_decoder_plus_side_modules(tmp_path_factory, model_type, config, embed, side,
                                                                        inferred):
    from merger.plan.checks import undescribed_tensors

    meta = _multimodal(tmp_path_factory, model_type, config)
    arch = architecture_for(meta.config, model_type, meta.tensors)
    assert (arch.model_type, arch.inferred, arch.num_layers(meta.config)) == (model_type, inferred, 2)
    assert arch.num_layers_config_key == "text_config.num_hidden_layers"
    assert [w.name for w in arch.pre_weights if w.is_embed] == [embed]
    assert sorted({w.name.split(".")[0] for w in arch.post_weights if w.side_module}) == side
    assert undescribed_tensors(meta, arch) == []  # every tensor is text decoder or a side module
    layer_names = {w.for_layer(i).name for w in arch.layer_weights for i in range(2)}
    assert layer_names <= set(meta.tensors) and all(".layers." in n for n in layer_names)


def test_llama4_text_decoder_with_interleaved_experts_is_refused_by_name(tmp_path_factory):
    text = dict(MM_TEXT, intermediate_size_mlp=32, num_local_experts=2, interleave_moe_layer_step=2)
    vision = dict(MM_VISION, image_size=16, vision_output_dim=16, projector_input_dim=16, projector_output_dim=16)
    meta = _multimodal(tmp_path_factory, "llama4", dict(text_config=text, vision_config=vision))
    with pytest.raises(ArchitectureError, match=r"`llama4_text` text decoder.*layer 1 does not have the same tensors"):
        architecture_for(meta.config, "meta-llama/Llama-4-Scout", meta.tensors)


def test_text_config_without_a_layer_count_takes_the_text_class_default():
    """llava-1.5's text_config states no num_hidden_layers: transformers builds LlamaConfig's default, 32."""
    names = ["language_model.model.embed_tokens.weight", "vision_tower.w"] + [
        f"language_model.model.layers.{i}.{w}" for i in range(32) for w in ("input_layernorm.weight",)]
    config = {"model_type": "llava", "architectures": ["LlavaForConditionalGeneration"],
              "text_config": {"model_type": "llama", "vocab_size": 32064}, "vision_config": {"model_type": "clip_vision_model"}}
    arch = architecture_for(config, "llava-hf/llava-1.5-7b-hf", names)
    assert arch.num_layers(config) == 32 and arch.default_layers == 32
