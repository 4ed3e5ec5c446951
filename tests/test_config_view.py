"""The form as a view of the config: every example and every method round-trips through the form's
widgets unchanged, an edit changes only its field, and what the form cannot show is kept and listed."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from merger.config.load import load_config
from merger.config.dump import dump_yaml
from merger.config.examples import load_examples
from merger.methods.registry import METHODS
from merger.ui import config_edits as ce
from merger.ui import config_edits_moe as cem
from merger.ui import config_settings as cs
from merger.ui import config_view as cv

EXAMPLES = load_examples(Path(__file__).parents[1] / "templates" / "examples")


def through_widgets(kind: str, value):
    """What a widget gives back after showing `value` (choice widgets give what they were given)."""
    if kind == "choice":
        return value
    return cv.from_widget(kind, cv.to_widget(kind, value))


def replay(data: dict) -> dict:
    """Every field the form shows, read back from its widget and written again, as a user tabbing through would."""
    view = cv.view_of(data)
    out = data
    if view.base != "none" or view.base_model:
        out = ce.set_base_lora(ce.set_base(out, view.base_model), view.base_lora)
    for group, rows in (("experts" if view.method == cv.MOE else None, view.rows), ("shared_experts", view.shared or ())):
        for i, row in enumerate(rows):
            out = ce.set_lora(ce.set_model(out, i, row.model, group), i, row.lora, group)
            for f in row.params:
                out = ce.set_model_param(out, i, f.key, through_widgets(f.kind, f.value), group)
                out = replay_points(out, i, f)
            for which, prompts in zip(cem.PROMPT_KEYS, row.prompts):
                for k, prompt in enumerate(prompts):
                    out = cem.set_prompt(out, i, which, k, cv.from_widget("string", prompt), group or "experts")
    for f in view.globals:
        out = replay_points(ce.set_global(out, f.key, through_widgets(f.kind, f.value)), None, f)
    for f in view.options:
        out = ce.set_option(out, f.key, through_widgets(f.kind, f.value))
    for sl in view.slices or ():
        for key, value in (("model", sl.model), ("lora", sl.lora), ("start", sl.start), ("end", sl.end),
                           ("scale", sl.scale)):
            out = ce.set_slice(out, sl.slice, key, value, sl.source)
    return out


def replay_points(data: dict, index: int | None, f: cv.Field) -> dict:
    """Each point and filter of a gradient or filtered field written again from its box."""
    if f.kind == cs.GRADIENT:
        for k, point in enumerate(f.value):
            data = ce.edit_setting(data, index, f.key, lambda s, k=k, point=point: cs.set_point(s, None, k, point))
    if f.kind == cs.FILTERED:
        for p, entry in enumerate(f.value):
            data = ce.edit_setting(data, index, f.key, lambda s, p=p, e=entry: cs.set_filter(s, p, e.get("filter")))
            values = entry["value"] if isinstance(entry["value"], list) else [entry["value"]]
            for k, point in enumerate(values):
                change = (lambda s, p=p, k=k, x=point: cs.set_point(s, p, k, x)) if isinstance(entry["value"], list) \
                    else (lambda s, p=p, x=point: cs.set_part_number(s, p, x))
                data = ce.edit_setting(data, index, f.key, change)
    return data


EDITOR_CONFIGS = {
    "classic t, LoRA on the base and a model": (
        "merge_method: slerp\nbase_model: org/a+org/l\nmodels:\n  - model: org/a+org/l\n"
        "  - model: {model: {path: org/b, revision: v2}, lora: org/l2}\nparameters:\n"
        "  t: [{filter: self_attn, value: [0, 0.5, 0.3, 0.7, 1]}, {filter: mlp, value: [1, 0.5, 0.7, 0.3, 0]}, {value: 0.5}]\n"
    ),
    "per-model gradients": (
        "merge_method: della\nbase_model: org/a\nmodels:\n  - model: org/b\n"
        "    parameters: {weight: [0.2, 1], density: [{filter: mlp, value: 0.4}, {value: [0.6, 0.8]}], epsilon: 0.1}\n"
    ),
    "MoE with prompts and shared experts": (
        "base_model: org/a\ngate_mode: cheap_embed\narchitecture: mixtral\nexperts:\n"
        "  - source_model: org/b+org/l\n    positive_prompts: ['', code]\n    residual_scale: 0.5\n"
        "shared_experts:\n  - source_model: org/c\n    negative_prompts: [poems]\n"
    ),
    "LoRA on a slice source": "merge_method: passthrough\nslices:\n  - sources: [{model: org/a+org/l, layer_range: [0, 2]}]\n",
}


@pytest.mark.parametrize("name", EDITOR_CONFIGS)
def test_configs_with_gradients_filters_prompts_and_loras_round_trip_through_the_form(name: str) -> None:
    data = cv.parse(EDITOR_CONFIGS[name])
    assert replay(copy.deepcopy(data)) == data
    assert cv.view_of(data).kept == ()


def method_config(name: str) -> dict:
    """A 3-model config switched to `name` through the form."""
    start = {"merge_method": "linear", "models": [{"model": f"org/m{i}", "parameters": {"weight": 1.0}} for i in range(3)]}
    return ce.set_method(start, name)


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.name for e in EXAMPLES])
def test_every_example_round_trips_through_the_form(example) -> None:
    from merger.ui import config_stages

    stages = config_stages.stage_count(example.yaml_text)  # a multi-stage config: each stage is one form
    for stage in range(max(stages, 1)):
        data = config_stages.stage_data(example.yaml_text, stage)
        assert replay(copy.deepcopy(data)) == data
        assert load_config(dump_yaml(replay(data))) if not stages else replay(data) == data


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_is_in_the_form_with_its_declared_parameters(name: str) -> None:
    spec = METHODS[name]
    assert name in [value for _, value in cv.method_choices()]
    data = method_config(name)
    view = cv.view_of(data)
    assert view.method == name and view.base == spec.base
    assert [f.key for f in view.globals] == [p.name for p in spec.global_parameters]
    for row in view.rows:
        assert [f.key for f in row.params] == [p.name for p in spec.per_model_parameters]
    # required parameters got a value; optional ones show their registry default without writing it
    for p in spec.per_model_parameters:
        for entry in data["models"]:
            assert (p.name in entry.get("parameters", {})) == p.required
    declared = {p.name: p for p in spec.parameters}
    for f in [*view.globals, *(f for row in view.rows for f in row.params)]:
        assert f.default == (None if declared[f.key].required else declared[f.key].default)
        ends = (declared[f.key].range.low, declared[f.key].range.high)
        assert (f.minimum, f.maximum) == tuple(e if e is not None and abs(e) != float("inf") else None for e in ends)
    assert replay(copy.deepcopy(data)) == data
    assert not [k for k in view.kept if not k.startswith("parameters.")]  # nothing of the method is hidden


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_round_trips_through_yaml(name: str) -> None:
    data = method_config(name)
    text = dump_yaml(data)
    assert cv.parse(text) == data
    assert cv.view_of(cv.parse(text)) == cv.view_of(data)


def test_switching_method_drops_only_the_old_methods_parameters() -> None:
    data = {
        "merge_method": "slerp",
        "base_model": "org/a",
        "models": [{"model": "org/a"}, {"model": "org/b", "parameters": {"custom": 3}}],
        "parameters": {"t": 0.3, "my_own": 1},
    }
    out = ce.set_method(data, "ties")
    assert out["parameters"] == {"my_own": 1}  # `t` was slerp's; `my_own` is nobody's and stays
    assert out["models"][1]["parameters"] == {"custom": 3, "weight": 1.0}  # required: a starter value
    assert list(out)[0] == "merge_method"
    assert "models[1].parameters.custom" in cv.view_of(out).kept


def test_number_widgets_take_the_registry_ranges() -> None:
    view = cv.view_of(method_config("ties"))
    density = view.rows[0].params[1]
    assert (density.key, density.minimum, density.maximum) == ("density", 0.0, 1.0)  # a fraction


def test_an_edit_changes_only_its_field() -> None:
    data = cv.parse(
        "merge_method: ties\nbase_model: org/a\nmodels:\n"
        "  - model: org/b\n    parameters: {weight: 1, density: [0.2, 0.8]}\n"
        "  - model: org/c\n    parameters: {weight: 0.5, density: 0.5}\n"
        "tokenizer:\n  source: union\n"
    )
    out = ce.set_model_param(data, 1, "density", cv.from_widget("number", 0.7))
    expected = copy.deepcopy(data)
    expected["models"][1]["parameters"]["density"] = 0.7
    assert out == expected and data["models"][1]["parameters"]["density"] == 0.5  # the input is not modified
    assert cv.view_of(data).kept == ("tokenizer",)
    gradient = cv.view_of(data).rows[0].params[1]
    assert gradient.kind == "gradient" and gradient.value == [0.2, 0.8]  # density may be a gradient


def test_a_slerp_over_a_layer_range_shows_its_sources_and_keeps_what_the_form_lacks() -> None:
    data = cv.parse(
        "merge_method: slerp\nbase_model: org/a\n"
        "slices:\n  - sources:\n      - {model: org/a, layer_range: [0, 4]}\n      - {model: org/b, layer_range: [0, 4]}\n"
        "    residual_weight: 0.1\n"
        "parameters:\n  t: [{filter: self_attn, value: [0, 1]}, {value: 0.5}]\n"
    )
    view = cv.view_of(data)
    assert [(s.slice, s.source, s.model, s.start, s.end) for s in view.slices] == [
        (0, 0, "org/a", 0, 4), (0, 1, "org/b", 0, 4)
    ]
    assert view.kept == ("slices[0].residual_weight",)
    assert view.globals[0].kind == "filtered"  # filtered t: values per filter
    assert replay(copy.deepcopy(data)) == data
    out = ce.set_slice(data, 0, "end", 6, source=1)
    assert out["slices"][0]["sources"][1]["layer_range"] == [0, 6] and data["slices"][0]["sources"][1]["layer_range"] == [0, 4]
    more = ce.add_slice(data)["slices"][1]["sources"]
    assert more == [{"model": "org/a", "layer_range": [4, 8]}, {"model": "org/b", "layer_range": [4, 8]}]


def test_passthrough_slices_are_rows_with_add_and_remove() -> None:
    data = ce.set_method({"merge_method": "linear", "models": []}, "passthrough")
    data = ce.add_slice(data)
    data = ce.set_slice(ce.set_slice(data, 0, "model", "org/a"), 0, "end", 8)
    data = ce.set_slice(ce.add_slice(data), 1, "model", "org/b")
    view = cv.view_of(data)
    assert [(s.model, s.start, s.end) for s in view.slices] == [("org/a", 0, 8), ("org/b", 8, 16)]
    data = ce.set_slice(data, 1, "scale", 0.5)
    assert data["slices"][1]["sources"][0]["parameters"] == {"scale": 0.5}
    data = ce.remove_slice(data, 0)
    assert [(s.model, s.start, s.end, s.scale) for s in cv.view_of(data).slices] == [("org/b", 8, 16, 0.5)]


def test_moe_in_the_form_and_back() -> None:
    data = ce.set_method(method_config("linear"), cv.MOE)
    assert data == {
        "base_model": "org/m0",
        "gate_mode": "random",
        "experts_per_token": 2,
        "experts": [{"source_model": f"org/m{i}"} for i in range(3)],
    }
    assert load_config(dump_yaml(data))
    data = ce.add_model(data)
    data = ce.set_model(data, 3, "org/m3")
    assert cv.view_of(data).rows[-1].model == "org/m3"
    back = ce.set_method(data, "linear")
    assert [m["model"] for m in back["models"]] == ["org/m0", "org/m1", "org/m2", "org/m3"]
    assert all(m["parameters"] == {"weight": 1.0} for m in back["models"])


def test_a_yaml_that_is_not_a_mapping_shows_no_form() -> None:
    assert cv.parse("- just\n- a list\n") is None
    assert cv.parse("key: [unclosed\n") is None
    assert yaml.safe_load(dump_yaml(ce.set_option({}, "seed", 3))) == {"seed": 3}
