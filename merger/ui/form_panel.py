"""The form: a view of the config generated from the method registry (no per-method UI code).

`@gr.render` rebuilds the widgets when the config's structure changes (method, number of rows,
slices) or a config comes from outside (paste, link, example); each widget's `input` event edits one
field of the config through :mod:`merger.ui.config_view`, leaving everything else as it was.
"""

from __future__ import annotations


import gradio as gr

from merger.ui import config_edits as ce
from merger.ui import config_stages as cst
from merger.ui import config_view as cv
from merger.ui.form_moe import experts
from merger.ui.form_settings import setting_editor
from merger.ui.form_stages import add_stage_button, stage_bar
from merger.ui.form_wiring import click, model_picker, wire
from merger.ui.pickers import PICKER_HINT
from merger.ui.yaml_panel import ConfigViews

LABELS = {
    "dtype": "dtype (inputs are read in this type; blank: as stored)",
    "out_dtype": "out_dtype (the written model; blank: dtype)",
    "tokenizer_source": "tokenizer_source (base, union or a model; blank: the base model's)",
    "chat_template": "chat_template (a built-in name or a Jinja template; blank: the base model's)",
    "seed": "seed (random parts: DARE masks, random gates)",
    "gate_mode": "gate_mode (router: hidden / cheap_embed from the prompts, or random)",
    "experts_per_token": "experts_per_token",
    "architecture": "architecture (the MoE output; blank: from the experts' family)",
}


def build(views: ConfigViews, demo: gr.Blocks) -> None:
    """The form, rendered from the config state (call inside the page's form column)."""
    gr.Markdown(PICKER_HINT, elem_id="picker-hint")

    @gr.render(inputs=[views.config, views.layout], triggers=[demo.load, views.layout.change])
    def form(text: str, layout: dict) -> None:
        layout = layout or {}
        live = not layout.get("readonly")
        stage_bar(views, text, layout, live)
        data = cst.stage_data(text, layout.get("stage", 0))
        if data is None:
            gr.Markdown("The YAML is not a config mapping yet: fix it in the editor and the form follows.")
            return
        _form(views, cv.view_of(data), live)
        if not layout.get("stages"):
            add_stage_button(views, layout, live)


def _form(views: ConfigViews, view: cv.View, live: bool) -> None:
    _method_picker(views, view, live)
    if view.base != "none" or view.base_model:
        label = "Base model (attention, norms, embeddings)" if view.method == cv.MOE else "Base model"
        model_picker(views, label, (view.base_model, view.base_lora), "base-model", live, ce.set_base,
                     ce.set_base_lora)
    if view.slices is not None or (view.method == "passthrough" and not view.rows):
        _slices(views, view.slices or (), live)
    elif view.method == cv.MOE:
        experts(views, view, live)
    else:
        _rows(views, view, live)
    _globals(views, view, live)
    with gr.Accordion("Options: dtype, tokenizer, chat template, seed", open=view.method == cv.MOE):
        for f in view.options:
            widget = _widget(f, f"option-{f.key}", LABELS.get(f.key, f.key), live)
            wire(views, widget, f.kind, lambda d, v, key=f.key: ce.set_option(d, key, v))


def _method_picker(views: ConfigViews, view: cv.View, live: bool) -> None:
    choices = cv.method_choices()
    if view.method and view.method not in [name for _, name in choices]:
        choices.append((f"{view.method} (unknown)", view.method))
    method = gr.Dropdown(
        choices, value=view.method or None, label="Merge method", elem_id="method", interactive=live
    )
    wire(views, method, "choice", ce.set_method, structural=True)


def _rows(views: ConfigViews, view: cv.View, live: bool) -> None:
    for i, row in enumerate(view.rows):
        with gr.Row(equal_height=True):
            model_picker(views, f"Model {i + 1}", (row.model, row.lora), f"model-{i}", live,
                         lambda d, v, i=i: ce.set_model(d, i, v), lambda d, v, i=i: ce.set_lora(d, i, v))
            for f in row.params:
                if f.kind in ("gradient", "filtered"):  # edited in the fold below the row
                    gr.Textbox(value=cv.to_widget("text", f.value), label=f"{f.key} (below)", interactive=False,
                               elem_id=f"param-{i}-{f.key}", scale=1, min_width=90)
                    continue
                widget = _widget(f, f"param-{i}-{f.key}", f.key, live, scale=1)
                wire(views, widget, f.kind, lambda d, v, i=i, key=f.key: ce.set_model_param(d, i, key, v))
            remove = gr.Button("✕", size="sm", scale=0, min_width=40, elem_id=f"remove-model-{i}", interactive=live)
            click(views, remove, lambda d, i=i: ce.remove_model(d, i), structural=True)
        shaped = [f for f in row.params if _editable_setting(f)]
        if shaped:
            varied = any(f.kind in ("gradient", "filtered") for f in shaped)
            with gr.Accordion(f"Model {i + 1}: gradients and filters ({', '.join(f.key for f in shaped)})",
                              open=varied, elem_id=f"model-{i}-shapes"):
                for f in shaped:
                    setting_editor(views, f, i, f"param-{i}-{f.key}-editor", live)
    add = gr.Button("+ Add model", size="sm", elem_id="add-model", interactive=live)
    click(views, add, ce.add_model, structural=True)


def _slices(views: ConfigViews, rows: tuple[cv.SliceRow, ...], live: bool) -> None:
    gr.Markdown("Slices, stacked in order: layers [start, end) of each model (end is exclusive).")
    for i in sorted({r.slice for r in rows}):
        with gr.Group():
            gr.Markdown(f"Slice {i + 1}")
            for row in [r for r in rows if r.slice == i]:
                _slice_source(views, row, live)
            remove = gr.Button(f"✕ Remove slice {i + 1}", size="sm", elem_id=f"remove-slice-{i}", interactive=live)
            click(views, remove, lambda d, i=i: ce.remove_slice(d, i), structural=True)
    add = gr.Button("+ Add slice", size="sm", elem_id="add-slice", interactive=live)
    click(views, add, ce.add_slice, structural=True)


def _slice_source(views: ConfigViews, row: cv.SliceRow, live: bool) -> None:
    i, j = row.slice, row.source
    where = f"slice-{i}-{j}"
    with gr.Row(equal_height=True):
        model_picker(views, "model", (row.model, row.lora), f"{where}-model", live,
                     lambda d, v: ce.set_slice(d, i, "model", v, j), lambda d, v: ce.set_slice(d, i, "lora", v, j))
        for key, value in (("start", row.start), ("end", row.end)):
            number = gr.Number(value=value, precision=0, minimum=0, label=key, elem_id=f"{where}-{key}",
                               interactive=live, scale=1, min_width=80)
            wire(views, number, "number", lambda d, v, key=key: ce.set_slice(d, i, key, v, j))
        # unset, the source is used as is: the box shows 1 and writes nothing until edited
        scale = gr.Number(value=1 if row.scale is None else row.scale, label="scale", info="default 1",
                          elem_id=f"{where}-scale", interactive=live, scale=1, min_width=80)
        wire(views, scale, "number", lambda d, v: ce.set_slice(d, i, "scale", v, j))


def _globals(views: ConfigViews, view: cv.View, live: bool) -> None:
    plain = [f for f in view.globals if not _editable_setting(f)]
    if plain:
        with gr.Row():
            for f in plain:
                widget = _widget(f, f"global-{f.key}", f.key, live)
                wire(views, widget, f.kind, lambda d, v, key=f.key: ce.set_global(d, key, v))
    for f in view.globals:
        if not _editable_setting(f):
            continue

        def number(f: cv.Field = f) -> None:
            widget = _widget(f, f"global-{f.key}", f.key, live, scale=1)
            wire(views, widget, f.kind, lambda d, v: ce.set_global(d, f.key, v))

        with gr.Group(elem_id=f"global-{f.key}-editor"):
            setting_editor(views, f, None, f"global-{f.key}", live, number)


def _editable_setting(f: cv.Field) -> bool:
    """Whether the gradient and filter editor shows `f` (a value of another shape stays a YAML text box)."""
    return f.gradient and f.kind != "text"


def _widget(f: cv.Field, elem_id: str, label: str, live: bool, scale: int | None = None) -> gr.components.Component:
    # An unset parameter shows its default (it stays unset in the config until edited).
    shown = cv.to_widget(f.kind, f.value if f.value is not None else f.default)
    common = {"label": label, "elem_id": elem_id, "interactive": live}
    if f.default is not None:
        common["info"] = f"default {f.default}"
    if f.kind == "bool":
        return gr.Checkbox(value=bool(f.value if f.value is not None else f.default), **common)
    if f.kind == "number":
        return gr.Number(value=shown, minimum=f.minimum, maximum=f.maximum, scale=scale, min_width=90, **common)
    allow_custom = f.kind == "text"
    choices = [("(not set)", "")] + [(c, c) for c in f.choices] if f.choices else None
    if choices is not None:
        value = "" if shown is None else str(shown)
        if value not in [c for _, c in choices]:
            choices.append((value, value))
        return gr.Dropdown(choices, value=value, allow_custom_value=allow_custom, scale=scale, **common)
    return gr.Textbox(value="" if shown is None else str(shown), scale=scale, **common)
