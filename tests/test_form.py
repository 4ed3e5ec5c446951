"""The form's pure mapping: form values -> mergekit YAML -> form values."""

import math
from pathlib import Path

import pytest
import yaml

from merger.config.load import load_config
from merger.config.schema import MergeConfig, MoEConfig
from merger.form import (
    CLASSIC_T,
    MAX_MODELS,
    T_CLASSIC,
    T_CONSTANT,
    T_GRADIENT,
    FormValues,
    build_yaml,
    load_examples,
    local_paths,
    parse_yaml,
)

V1 = "mistralai/Mistral-7B-Instruct-v0.1"
V2 = "mistralai/Mistral-7B-Instruct-v0.2"
EXAMPLES = Path(__file__).resolve().parent.parent / "templates" / "examples"


def keys(text: str) -> list[str]:
    return list(yaml.safe_load(text))


# ---------------------------------------------------------------- form -> YAML, per method
def test_slerp_constant_t() -> None:
    text = build_yaml(FormValues(method="slerp", models=[V1, V2], t=0.4, dtype="float16"))
    assert yaml.safe_load(text) == {
        "merge_method": "slerp",
        "base_model": V1,
        "models": [{"model": V1}, {"model": V2}],
        "parameters": {"t": 0.4},
        "dtype": "float16",
    }
    assert keys(text) == ["merge_method", "base_model", "models", "parameters", "dtype"]
    config = load_config(text)
    assert isinstance(config, MergeConfig) and str(config.base_model) == V1
    assert [str(m.model) for m in config.models] == [V1, V2]


def test_slerp_gradient_and_layer_range() -> None:
    values = FormValues(
        method="slerp", models=[V1, V2], t_mode=T_GRADIENT, t_gradient=[0, 0.2, 0.5, 0.8, 1], layer_range=(0, 32)
    )
    text = build_yaml(values)
    assert yaml.safe_load(text) == {
        "merge_method": "slerp",
        "base_model": V1,
        "slices": [{"sources": [{"model": V1, "layer_range": [0, 32]}, {"model": V2, "layer_range": [0, 32]}]}],
        "parameters": {"t": [0, 0.2, 0.5, 0.8, 1]},
        "dtype": "bfloat16",
    }
    assert "layer_range: [0, 32]" in text and "t: [0, 0.2, 0.5, 0.8, 1]" in text  # posted style
    assert keys(text) == ["merge_method", "base_model", "slices", "parameters", "dtype"]
    assert load_config(text).slices[0].sources[1].layer_range == (0, 32)


def test_slerp_classic_schedule() -> None:
    text = build_yaml(FormValues(method="slerp", models=[V1, V2], t_mode=T_CLASSIC))
    t = yaml.safe_load(text)["parameters"]["t"]
    assert t == [
        {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
        {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
        {"value": 0.5},
    ]
    assert t == CLASSIC_T
    config = load_config(text)
    assert config.parameters["t"][0].filter == "self_attn"


def test_linear_weights_and_normalize() -> None:
    values = FormValues(method="linear", models=[V1, V2, "org/third"], weights=[0.5, 0.3, 0.2], normalize=False)
    text = build_yaml(values)
    assert yaml.safe_load(text) == {
        "merge_method": "linear",
        "models": [
            {"model": V1, "parameters": {"weight": 0.5}},
            {"model": V2, "parameters": {"weight": 0.3}},
            {"model": "org/third", "parameters": {"weight": 0.2}},
        ],
        "parameters": {"normalize": False},
        "dtype": "bfloat16",
    }
    assert keys(text) == ["merge_method", "models", "parameters", "dtype"]
    config = load_config(text)
    assert [m.parameters["weight"] for m in config.models] == [0.5, 0.3, 0.2]


def test_passthrough_slices_end_exclusive() -> None:
    text = build_yaml(FormValues(method="passthrough", slices=[(V1, 0, 20), (V2, 12, 32)], dtype="auto"))
    assert yaml.safe_load(text) == {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": V1, "layer_range": [0, 20]}]},
            {"sources": [{"model": V2, "layer_range": [12, 32]}]},
        ],
    }
    config = load_config(text)
    assert [s.sources[0].layer_range for s in config.slices] == [(0, 20), (12, 32)]


def test_moe_schema() -> None:
    values = FormValues(
        method="moe", base_model=V2, models=[V1, V2], gate_mode="uniform_random", experts_per_token=1, dtype="bfloat16"
    )
    text = build_yaml(values)
    assert yaml.safe_load(text) == {
        "base_model": V2,
        "gate_mode": "uniform_random",
        "dtype": "bfloat16",
        "experts_per_token": 1,
        "experts": [{"source_model": V1}, {"source_model": V2}],
    }
    assert keys(text) == ["base_model", "gate_mode", "dtype", "experts_per_token", "experts"]
    config = load_config(text)
    assert isinstance(config, MoEConfig)
    assert [str(e.source_model) for e in config.experts] == [V1, V2]
    assert config.gate_mode == "uniform_random" and config.experts_per_token == 1


def test_blank_models_are_skipped_and_incomplete_forms_still_give_yaml() -> None:
    text = build_yaml(FormValues(method="linear", models=["", V1, ""], weights=[None, 1.0, None]))
    assert yaml.safe_load(text)["models"] == [{"model": V1, "parameters": {"weight": 1.0}}]
    empty = yaml.safe_load(build_yaml(FormValues()))
    assert empty["merge_method"] == "slerp" and empty["models"] == []


def test_unicode_is_written_as_is() -> None:
    text = build_yaml(FormValues(method="passthrough", slices=[("./modèles/ü", 0, 2)]))
    assert "./modèles/ü" in text
    assert yaml.safe_load(text)["slices"][0]["sources"][0]["model"] == "./modèles/ü"


# ---------------------------------------------------------------- widgets
def test_from_widgets_tolerates_blanks_nans_and_floats() -> None:
    values = FormValues.from_widgets(
        method="passthrough",
        models=[V1, None, "  ", V2, None, None],
        weights=[0.7, None, None, 0.3],
        normalize=True,
        base_model=None,
        t_mode="nonsense",
        t=None,
        t_gradient=[0, None, 0.5, "", 1],
        range_start=None,
        range_end=12.0,
        slice_rows=[[V1, 0.0, 20.0], ["", None, None], [V2, "12", float("nan")], [None, "", ""]],
        gate_mode="hidden",
        experts_per_token=None,
        dtype="torch.float64",
    )
    assert values.models == [V1, V2] and values.weights == [0.7, 0.3]
    assert values.t_mode == T_CONSTANT and values.t == 0.5
    assert values.t_gradient == [0.0, 0.0, 0.5, 0.0, 1.0]
    assert values.layer_range == (0, 12)  # a blank first layer is layer 0; a blank (or 0) end means whole models
    assert values.slices == [(V1, 0, 20), (V2, 12, 0)]
    assert values.gate_mode == "random" and values.experts_per_token == 2 and values.dtype == "auto"


def test_from_widgets_reads_a_dataframe() -> None:
    pandas = pytest.importorskip("pandas")
    frame = pandas.DataFrame([[V1, 0, 4], [V2, 2, math.nan]], columns=["model", "start", "end"])
    values = FormValues.from_widgets(
        "passthrough", [], [], True, "", T_CONSTANT, 0.5, [0] * 5, None, None, frame, "random", 2, "bfloat16"
    )
    assert values.slices == [(V1, 0, 4), (V2, 2, 0)]


def test_to_widgets_is_the_inverse_of_from_widgets() -> None:
    values = FormValues(method="linear", models=[V1, V2], weights=[0.25, 0.75], normalize=False, dtype="float32")
    widgets = values.to_widgets()
    assert widgets["models"] == [V1, V2] + [""] * (MAX_MODELS - 2)
    assert FormValues.from_widgets(**widgets) == values


def test_a_half_finished_slice_row_is_reported_by_the_config_check() -> None:
    text = build_yaml(FormValues(method="passthrough", slices=[(V1, 0, 20), (V2, 5, 0)]))
    with pytest.raises(Exception, match=r"slices\[1\]\.sources\[0\]\.layer_range"):
        load_config(text)


# ---------------------------------------------------------------- YAML -> form
ROUND_TRIPS = [
    FormValues(method="slerp", models=[V1, V2], t=0.3),
    FormValues(method="slerp", models=[V1, V2], t_mode=T_GRADIENT, t_gradient=[1, 0.75, 0.5, 0.25, 0]),
    FormValues(method="slerp", models=[V1, V2], t_mode=T_CLASSIC, layer_range=(0, 32), dtype="float16"),
    FormValues(method="linear", models=[V1, V2], weights=[0.6, 0.4], normalize=True, dtype="auto"),
    FormValues(method="passthrough", slices=[(V1, 0, 20), (V2, 12, 32)], dtype="bfloat16"),
    FormValues(method="moe", base_model=V2, models=[V1, V2, "org/c"], gate_mode="random", experts_per_token=2),
]


@pytest.mark.parametrize("values", ROUND_TRIPS, ids=lambda v: f"{v.method}-{v.t_mode}")
def test_reverse_mapping_round_trips(values: FormValues) -> None:
    parsed = parse_yaml(build_yaml(values))
    assert parsed.exact, parsed.note
    assert build_yaml(parsed.values) == build_yaml(values)
    assert parsed.values.method == values.method
    assert parsed.values.models == (values.models if values.method != "passthrough" else [V1, V2])


def test_posted_config_spellings_are_read_exactly() -> None:
    # base last in models:, `torch.` dtype, linear without normalize (default true), ints as weights
    text = f"""
merge_method: linear
models:
  - model: {V1}
    parameters:
      weight: 1
  - model: {V2}
    parameters:
      weight: 2
dtype: torch.bfloat16
"""
    parsed = parse_yaml(text)
    assert parsed.exact, parsed.note
    assert parsed.values.weights == [1.0, 2.0] and parsed.values.normalize is True
    assert parsed.values.dtype == "bfloat16"


def test_moe_defaults_are_filled() -> None:
    parsed = parse_yaml(f"base_model: {V1}\ngate_mode: random\nexperts:\n  - source_model: {V1}\n  - source_model: {V2}\n")
    assert parsed.exact and parsed.values.experts_per_token == 2 and parsed.values.dtype == "auto"


@pytest.mark.parametrize(
    ("text", "method", "models", "note"),
    [
        (
            f"merge_method: ties\nbase_model: {V1}\nmodels:\n  - model: {V2}\n    parameters: {{weight: 0.5, density: 0.5}}\n",
            "linear",
            [V2],
            "no `ties` method",
        ),
        (
            f"merge_method: slerp\nbase_model: {V1}\nmodels: [{{model: {V1}}}, {{model: {V2}}}]\nparameters: {{t: 0.5}}\n"
            "tokenizer_source: union\n",
            "slerp",
            [V1, V2],
            "`tokenizer_source`",
        ),
        (
            f"merge_method: linear\nmodels:\n  - model: {V1}\n    parameters:\n      weight: [{{filter: mlp, value: 1}}, {{value: 0}}]\n",
            "linear",
            [V1],
            "options the form lacks",
        ),
        (
            f"base_model: {V1}\ngate_mode: hidden\nexperts:\n  - source_model: {V2}\n    positive_prompts: [code]\n",
            "moe",
            [V2],
            "gate_mode: hidden",
        ),
        (
            f"merge_method: passthrough\nslices:\n  - sources:\n      - {{model: {V1}, layer_range: [0, 8], parameters: {{scale: 0.5}}}}\n",
            "passthrough",
            [V1],
            "options the form lacks",
        ),
        (
            f"merge_method: slerp\nbase_model: {V1}\nmodels: [{{model: {V1}}}, {{model: {V2}}}]\nparameters: {{t: [0, 1]}}\n",
            "slerp",
            [V1, V2],
            "options the form lacks",
        ),
    ],
)
def test_configs_the_form_cannot_express_stay_in_the_editor(text: str, method: str, models: list, note: str) -> None:
    parsed = parse_yaml(text)
    assert not parsed.exact
    assert parsed.values.method == method
    assert parsed.values.models == models
    assert note in parsed.note


def test_slerp_base_comes_first_in_the_form() -> None:
    parsed = parse_yaml(f"merge_method: slerp\nbase_model: {V2}\nmodels: [{{model: {V1}}}, {{model: {V2}}}]\nparameters: {{t: 0.5}}\n")
    assert parsed.values.models == [V2, V1]


@pytest.mark.parametrize("text", ["", "just a string", "[1, 2]", "key: [unclosed", "merge_method: slerp\nmodels: 3\n"])
def test_unreadable_yaml_gives_defaults_not_an_exception(text: str) -> None:
    parsed = parse_yaml(text)
    assert not parsed.exact and parsed.note


# ---------------------------------------------------------------- examples and local paths
def test_load_examples(tmp_path: Path) -> None:
    (tmp_path / "b-linear.yaml").write_text("# Two models averaged\nmerge_method: linear\nmodels: [{model: a/b}]\n")
    (tmp_path / "a_slerp.yml").write_text("merge_method: slerp\n")
    (tmp_path / "notes.txt").write_text("ignored")
    examples = load_examples(tmp_path)
    assert [(e.name, e.title) for e in examples] == [("a_slerp", "A slerp"), ("b-linear", "Two models averaged")]
    assert examples[1].yaml_text.startswith("# Two models averaged")
    assert load_examples(tmp_path / "missing") == []


def test_shipped_examples_fill_the_form_exactly() -> None:
    examples = load_examples(EXAMPLES)
    if not examples:
        pytest.skip("no examples shipped yet")
    for example in examples:
        parsed = parse_yaml(example.yaml_text)
        assert parsed.exact, f"{example.name}: {parsed.note}"
        assert load_config(build_yaml(parsed.values))


def test_local_paths() -> None:
    text = f"""
merge_method: passthrough
slices:
  - sources: [{{model: ./models/a, layer_range: [0, 2]}}]
  - sources: [{{model: /data/b, layer_range: [0, 2]}}]
  - sources: [{{model: "{V1}@main", layer_range: [0, 2]}}]
  - sources: [{{model: ~/c, layer_range: [0, 2]}}]
  - sources: [{{model: "..\\\\d", layer_range: [0, 2]}}]
tokenizer_source: union
"""
    assert local_paths(text) == ["./models/a", "/data/b", "~/c", "..\\d"]
    assert local_paths(f"base_model: {V1}\nexperts: [{{source_model: tests/data/fixtures/mistral-code}}]\n") == [
        "tests/data/fixtures/mistral-code"
    ]
    assert local_paths(f"base_model: {V1}\nexperts: [{{source_model: {V2}}}]\n") == []
    assert local_paths("not: [valid") == []
