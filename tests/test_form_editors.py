"""The form's editors as pure edits of the config: gradients, values per filter, MoE prompts and gate modes,
LoRA references, multi-stage configs. Each edit changes only its field: the rest of the YAML is compared
byte for byte (a multi-stage config's other stages exactly as typed)."""

from __future__ import annotations

import difflib
import typing

import pytest

from merger.config.dump import dump_yaml
from merger.config.load import load_config
from merger.config.parameters import evaluate_setting
from merger.config.schema import MoEConfig
from merger.methods.registry import METHODS
from merger.stages import split_stages
from merger.ui import config_edits as ce
from merger.ui import config_edits_moe as cem
from merger.ui import config_settings as cs
from merger.ui import config_stages as cst
from merger.ui import config_view as cv
from merger.ui.config_view_moe import gate_modes

SLERP = "merge_method: slerp\nbase_model: org/a\nmodels:\n  - model: org/a\n  - model: org/b\nparameters:\n  t: 0.5\ndtype: bfloat16\n"


def changed_lines(before: str, after: str) -> tuple[list[str], list[str]]:
    """(lines only in `before`, lines only in `after`): everything else is byte-identical and in place."""
    diff = list(difflib.ndiff(before.splitlines(keepends=True), after.splitlines(keepends=True)))
    return [d[2:] for d in diff if d.startswith("- ")], [d[2:] for d in diff if d.startswith("+ ")]


def edit_t(data: dict, change) -> dict:
    return ce.edit_setting(data, None, "t", change, 0.5)


# ---------------------------------------------------------------- gradients
def test_the_registry_marks_float_parameters_as_gradient_capable() -> None:
    for spec in METHODS.values():
        for p in spec.parameters:
            assert p.gradient == (p.range.kind is float), (spec.name, p.name)
    view = cv.view_of(cv.parse("merge_method: ties\nbase_model: org/a\nmodels:\n  - model: org/b\n"
                               "    parameters: {weight: [0, 1], density: 0.5}\nparameters: {normalize: [true]}\n"))
    weight, density = view.rows[0].params[:2]
    assert (weight.kind, weight.gradient, density.kind, density.gradient) == ("gradient", True, "number", True)
    normalize = next(f for f in view.globals if f.key == "normalize")
    assert (normalize.kind, normalize.gradient) == ("text", False)  # a flag is never a gradient: kept as YAML


def test_gradient_points_are_added_set_and_removed_and_only_t_changes() -> None:
    data = cv.parse(SLERP)
    data = edit_t(data, lambda s: cs.reshaped(s, cs.GRADIENT, 0.5))
    assert data["parameters"]["t"] == [0.5, 0.5]
    data = edit_t(data, lambda s: cs.add_point(s, None))
    data = edit_t(data, lambda s: cs.set_point(s, None, 0, 0))
    data = edit_t(data, lambda s: cs.set_point(s, None, 2, 1))
    assert data["parameters"]["t"] == [0, 0.5, 1]
    view = cv.view_of(data)
    assert view.globals[0].kind == "gradient" and view.globals[0].layout() == ["gradient", 3]
    gone, new = changed_lines(dump_yaml(cv.parse(SLERP)), dump_yaml(data))
    assert (gone, new) == (["  t: 0.5\n"], ["  t: [0, 0.5, 1]\n"])
    cfg = load_config(dump_yaml(data))
    # the engine reads the form's gradient: halfway between the points at depth 0.25 and 0.75
    assert evaluate_setting(cfg.parameters["t"], "model.layers.1.mlp.up_proj.weight", 0.25) == pytest.approx(0.25)
    assert evaluate_setting(cfg.parameters["t"], "model.layers.1.mlp.up_proj.weight", 0.75) == pytest.approx(0.75)
    data = edit_t(data, lambda s: cs.remove_point(s, None, 1))
    assert data["parameters"]["t"] == [0, 1]
    assert edit_t(data, lambda s: cs.remove_point(s, None, 0))["parameters"]["t"] == 1  # one point: a number


def test_a_per_model_gradient_changes_only_that_models_parameter() -> None:
    text = ("merge_method: ties\nbase_model: org/a\nmodels:\n  - model: org/b\n    parameters:\n      weight: 1\n"
            "      density: 0.5\n  - model: org/c\n    parameters:\n      weight: 1\n      density: 0.5\n")
    data = ce.edit_setting(cv.parse(text), 1, "density", lambda s: cs.reshaped(s, cs.GRADIENT, 1.0))
    data = ce.edit_setting(data, 1, "density", lambda s: cs.set_point(s, None, 1, 0.9))
    gone, new = changed_lines(dump_yaml(cv.parse(text)), dump_yaml(data))
    assert (gone, new) == (["      density: 0.5\n"], ["      density: [0.5, 0.9]\n"])
    # an unset parameter starts from its registry default
    fresh = ce.edit_setting(cv.parse(text), 0, "gamma", lambda s: cs.reshaped(s, cs.GRADIENT, 0.01), 0.01)
    assert fresh["models"][0]["parameters"]["gamma"] == [0.01, 0.01]


def test_the_classic_preset_is_the_attention_mlp_schedule_and_the_engine_reads_it() -> None:
    data = edit_t(cv.parse(SLERP), lambda s: cs.PRESETS["classic attention/MLP schedule (SLERP)"])
    assert data["parameters"]["t"] == [
        {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
        {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
        {"value": 0.5},
    ]
    t = load_config(dump_yaml(data)).parameters["t"]
    # depth 0.375 lies halfway between points 1 and 2 (positions 0.25 and 0.5 of 5 points)
    assert evaluate_setting(t, "model.layers.3.self_attn.q_proj.weight", 0.375) == pytest.approx(0.4)
    assert evaluate_setting(t, "model.layers.3.mlp.down_proj.weight", 0.375) == pytest.approx(0.6)
    assert evaluate_setting(t, "model.layers.3.input_layernorm.weight", 0.375) == 0.5
    view = cv.view_of(data)
    assert view.globals[0].kind == "filtered"
    assert view.globals[0].layout() == ["filtered", [["gradient", 5], ["gradient", 5], "number"]]


def test_values_per_filter_are_added_reshaped_renamed_and_removed() -> None:
    data = edit_t(cv.parse(SLERP), lambda s: cs.reshaped(s, cs.FILTERED, 0.5))
    assert data["parameters"]["t"] == [{"filter": "self_attn", "value": 0.5}, {"filter": "mlp", "value": 0.5},
                                       {"value": 0.5}]
    data = edit_t(data, lambda s: cs.set_part_number(s, 0, 0.2))
    data = edit_t(data, lambda s: cs.set_part_shape(s, 1, cs.GRADIENT))
    data = edit_t(data, lambda s: cs.set_point(s, 1, 1, 0.9))
    data = edit_t(data, lambda s: cs.add_part(s, "lm_head"))  # a named filter goes before `other`
    data = edit_t(data, lambda s: cs.set_filter(s, 3, "lm_head"))  # renaming `other` gives it a filter
    data = edit_t(data, lambda s: cs.set_filter(s, 2, ""))  # and a blank filter makes `other`
    assert data["parameters"]["t"] == [{"filter": "self_attn", "value": 0.2}, {"filter": "mlp", "value": [0.5, 0.9]},
                                       {"value": 0.5}, {"filter": "lm_head", "value": 0.5}]
    assert load_config(dump_yaml(data))
    for part in (3, 1, 0):
        data = edit_t(data, lambda s, part=part: cs.remove_part(s, part))
    assert data["parameters"]["t"] == 0.5  # only `other` left: a plain number
    back = edit_t(edit_t(cv.parse(SLERP), lambda s: cs.reshaped(s, cs.FILTERED, 0.5)),
                  lambda s: cs.reshaped(s, cs.NUMBER, 0.5))
    assert back == cv.parse(SLERP)


# ---------------------------------------------------------------- MoE
MOE = ("base_model: org/base\ngate_mode: hidden\nexperts_per_token: 2\nexperts:\n"
       "  - source_model: org/prose\n    positive_prompts: [write a story, a poem]\n"
       "  - source_model: org/code\n    positive_prompts: [def main()]\n    negative_prompts: [once upon a time]\n"
       "    residual_scale: 0.5\n")


def test_the_form_offers_every_gate_mode_of_the_schema() -> None:
    modes = typing.get_args(MoEConfig.model_fields["gate_mode"].annotation)
    assert gate_modes() == modes and {"hidden", "cheap_embed", "random", "uniform_random"} <= set(modes)
    gate = cv.view_of(cv.parse(MOE)).options[0]
    assert (gate.key, gate.choices, gate.value) == ("gate_mode", modes, "hidden")


def test_moe_prompts_are_shown_and_edited_one_at_a_time() -> None:
    data = cv.parse(MOE)
    view = cv.view_of(data)
    assert [r.prompts for r in view.rows] == [(("write a story", "a poem"), ()), (("def main()",), ("once upon a time",))]
    assert [f.value for f in view.rows[1].params] == [0.5, None] and view.kept == ()
    out = cem.set_prompt(cem.add_prompt(data, 0, "negative_prompts"), 0, "negative_prompts", 0, "import numpy")
    out = cem.set_prompt(out, 1, "positive_prompts", 0, "class Foo:")
    out = cem.remove_prompt(out, 0, "positive_prompts", 1)
    gone, new = changed_lines(dump_yaml(data), dump_yaml(out))
    assert gone == ["    positive_prompts: [write a story, a poem]\n", "    positive_prompts: [def main()]\n"]
    assert new == ["    positive_prompts: [write a story]\n", "    negative_prompts: [import numpy]\n",
                   "    positive_prompts: ['class Foo:']\n"]
    assert cem.remove_prompt(data, 1, "negative_prompts", 0)["experts"][1].keys() == {
        "source_model", "positive_prompts", "residual_scale"}  # an emptied list is removed
    assert data == cv.parse(MOE)  # inputs are never modified
    out = ce.set_model_param(out, 0, "residual_scale", 0.25)
    assert out["experts"][0]["residual_scale"] == 0.25 and "parameters" not in out["experts"][0]


def test_moe_options_shared_experts_and_what_the_form_keeps() -> None:
    data = ce.set_option(cv.parse(MOE), "architecture", "mixtral")
    assert load_config(dump_yaml(ce.set_option(data, "gate_mode", "random"))).architecture == "mixtral"
    view = cv.view_of(data)
    assert [f.key for f in view.options[:3]] == ["gate_mode", "experts_per_token", "architecture"]
    assert "chat_template" not in [f.key for f in view.options]  # mergekit-moe has none
    assert view.shared == ()  # the schema takes shared experts: the form shows the (empty) list
    shared = ce.set_model(ce.add_model(data, "shared_experts"), 0, "org/general", "shared_experts")
    assert shared["shared_experts"] == [{"source_model": "org/general"}]
    shared = cem.add_prompt(shared, 0, "positive_prompts", "shared_experts")
    assert cv.view_of(shared).shared[0].prompts == (("",), ())
    assert "shared_experts" not in ce.remove_model(shared, 0, "shared_experts")
    odd = {**cv.parse(MOE), "chat_template": "chatml"}
    odd["experts"][0]["positive_prompts"] = [{"not": "text"}]
    assert cv.view_of(odd).kept == ("chat_template", "experts[0].positive_prompts")


# ---------------------------------------------------------------- LoRA
@pytest.mark.parametrize("written, model, lora", [
    ("org/m", "org/m", ""),
    ("org/m+org/adapter", "org/m", "org/adapter"),
    ({"model": "org/m", "lora": "org/adapter@v1"}, "org/m", "org/adapter@v1"),
    ({"model": {"path": "org/m", "revision": "main"}, "lora": {"path": "org/adapter"}}, "org/m@main", "org/adapter"),
])
def test_lora_references_in_both_forms_are_shown_and_edited_in_their_form(written, model, lora) -> None:
    data = {"merge_method": "linear", "models": [{"model": written, "parameters": {"weight": 1}},
                                                 {"model": "org/x", "parameters": {"weight": 1}}]}
    row = cv.view_of(data).rows[0]
    assert (row.model, row.lora) == (model, lora)
    out = ce.set_lora(data, 0, "org/new-adapter")
    assert (cv.view_of(out).rows[0].model, cv.view_of(out).rows[0].lora) == (model, "org/new-adapter")
    assert type(out["models"][0]["model"]) is type(written)  # `m+lora` stays a string, `{model, lora}` a mapping
    assert out["models"][1] == data["models"][1]
    reference = load_config(dump_yaml(out)).models[0].model
    assert (reference.lora, reference.model) == ("org/new-adapter", "org/m")
    plain = ce.set_lora(out, 0, "")
    assert cv.view_of(plain).rows[0].lora == "" and load_config(dump_yaml(plain)).models[0].model.lora is None
    renamed = ce.set_model(out, 0, "org/other")
    assert (cv.view_of(renamed).rows[0].model, cv.view_of(renamed).rows[0].lora) == ("org/other", "org/new-adapter")


def test_lora_on_the_base_a_slice_source_and_an_expert() -> None:
    data = ce.set_base_lora(cv.parse(SLERP), "org/l")
    assert data["base_model"] == "org/a+org/l" and cv.view_of(data).base_model == "org/a"
    assert ce.set_base(data, "org/z")["base_model"] == "org/z+org/l"
    gone, new = changed_lines(dump_yaml(cv.parse(SLERP)), dump_yaml(data))
    assert (gone, new) == (["base_model: org/a\n"], ["base_model: org/a+org/l\n"])
    sliced = ce.set_slice(cv.parse("merge_method: passthrough\nslices:\n  - sources: [{model: org/a, layer_range: [0, 2]}]\n"),
                          0, "lora", "org/l")
    assert sliced["slices"][0]["sources"][0]["model"] == "org/a+org/l" and cv.view_of(sliced).slices[0].lora == "org/l"
    moe = ce.set_lora(cv.parse(MOE), 1, "org/l")
    assert moe["experts"][1]["source_model"] == "org/code+org/l" and cv.view_of(moe).rows[1].lora == "org/l"


# ---------------------------------------------------------------- multi-stage
MULTI = (
    "# a two-stage merge\n"
    "name: mid   # the intermediate\n"
    "merge_method: linear\n"
    "models:\n"
    "  - model: org/a\n    parameters: {weight: 0.5}\n"
    "  - model: org/b\n    parameters: {weight: 0.5}\n"
    "---\n"
    "# the final stage\n"
    "merge_method: slerp\n"
    "base_model: mid\n"
    "models: [{model: mid}, {model: org/c}]\n"
    "parameters: {t: 0.3}\n"
)
FIRST, SECOND = MULTI.split("---\n")


def test_a_multi_stage_config_is_a_list_of_stages_each_a_config_view() -> None:
    assert cst.stage_count(MULTI) == 2 and cst.stage_count(SLERP) == 0
    assert cst.stage_count("name: only\n" + SLERP) == 1  # one named document is a stage, as the engine reads it
    assert cst.labels(MULTI) == ["1. mid: linear", "2. final: slerp"]
    first, second = cv.view_of(cst.stage_data(MULTI, 0)), cv.view_of(cst.stage_data(MULTI, 1))
    assert (first.method, [r.model for r in first.rows], first.kept) == ("linear", ["org/a", "org/b"], ())
    assert (second.method, second.base_model, second.globals[0].value) == ("slerp", "mid", 0.3)
    assert cst.stage_data(MULTI, 7) == cst.stage_data(MULTI, 1)  # clamped


def test_editing_one_stage_keeps_every_other_byte() -> None:
    out = cst.apply(MULTI, 1, lambda d: ce.set_global(d, "t", 0.7))
    assert out.startswith(FIRST + "---\n# the final stage\n")  # stage 1, its comments and the separator as typed
    assert cst.stage_data(out, 1)["parameters"]["t"] == 0.7
    assert cst.stage_data(out, 1) == {**cst.stage_data(MULTI, 1), "parameters": {"t": 0.7}}
    out = cst.apply(MULTI, 0, lambda d: ce.set_model(d, 1, "org/b2"))
    assert out.endswith("---\n" + SECOND) and cst.stage_data(out, 0)["name"] == "mid"
    assert [s.name for s in split_stages(out)] == ["mid", None]
    # switching a stage's method keeps its name first
    moe = cst.apply(MULTI, 0, lambda d: ce.set_method(d, cv.MOE))
    assert list(cst.stage_data(moe, 0))[:2] == ["name", "base_model"] and moe.endswith("---\n" + SECOND)


def test_stages_are_added_and_removed_around_untouched_text() -> None:
    added = cst.add_stage(MULTI)
    assert added.startswith(FIRST + "---\n# the final stage\nname: stage-2\n" + SECOND.split("\n", 1)[1])
    stages = split_stages(added)
    assert [s.name for s in stages] == ["mid", "stage-2", None]
    assert stages[2].value["base_model"] == "stage-2" and stages[2].value["models"][0] == {"model": "stage-2"}
    assert cst.remove_stage(added, 2) == FIRST + "---\n# the final stage\nname: stage-2\n" + SECOND.split("\n", 1)[1]
    assert cst.remove_stage(MULTI, 1) == FIRST
    assert cst.remove_stage(MULTI, 0) == "# a two-stage merge\n" + SECOND  # the comment under `---` stays with it
    assert cst.remove_stage("a: 1\n--- # two\nb: 2\n---\nc: 3\n", 1) == "a: 1\n---\nc: 3\n"
    plain = cst.add_stage(SLERP)
    assert plain.startswith("name: stage-1\n" + SLERP + "---\n") and len(split_stages(plain)) == 2


# ---------------------------------------------------------------- the typed text around an edit
TYPED = """# my merge, from a card
merge_method: ties   # sign election
base_model: org/a
models:
  - model: org/b
    parameters: {weight: 1, density: 0.5}   # keep half

  # the coder
  - model: org/c
    parameters: {weight: 0.5, density: 0.5}
parameters:
  normalize: true
tokenizer:
  source: union   # wider vocab
dtype: bfloat16
# end
"""


def test_an_edit_rewrites_only_the_changed_top_level_key_of_the_typed_text() -> None:
    data = cv.parse(TYPED)
    out = cst.apply(TYPED, 0, lambda d: ce.set_option(d, "dtype", "float16"))
    assert changed_lines(TYPED, out) == (["dtype: bfloat16\n"], ["dtype: float16\n"])
    out = cst.apply(TYPED, 0, lambda d: ce.set_option(d, "seed", 3))
    assert changed_lines(TYPED, out) == ([], ["seed: 3\n"]) and out.endswith("seed: 3\n# end\n")
    out = cst.apply(TYPED, 0, lambda d: ce.edit_setting(d, 1, "density", lambda s: cs.reshaped(s, cs.GRADIENT, 1.0)))
    models = TYPED[TYPED.index("models:"):TYPED.index("parameters:\n  normalize")]
    assert out.replace(out[out.index("models:"):out.index("parameters:\n  normalize")], models) == TYPED
    assert cv.parse(out)["models"][1]["parameters"]["density"] == [0.5, 0.5]
    assert cv.parse(out) == {**data, "models": cv.parse(out)["models"]}
    out = cst.apply(TYPED, 0, lambda d: ce.set_method(d, "dare_ties"))  # `normalize` is dare_ties's too
    assert changed_lines(TYPED, out) == (["merge_method: ties   # sign election\n"], ["merge_method: dare_ties\n"])


@pytest.mark.parametrize("text", [
    "{merge_method: linear, models: [{model: org/a, parameters: {weight: 1}}], dtype: float16}\n",  # flow mapping
    "merge_method: linear\nshared: &w {weight: 1}\nmodels:\n  - {model: org/a, parameters: *w}\ndtype: float16\n",
])
def test_a_text_that_cannot_be_kept_key_by_key_is_written_whole_and_still_right(text: str) -> None:
    out = cst.apply(text, 0, lambda d: ce.set_option(d, "dtype", "bfloat16"))
    assert out == dump_yaml({**cv.parse(text), "dtype": "bfloat16"})
