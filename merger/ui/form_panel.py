"""The form: a view of the config generated from the method registry (no per-method UI code).

`@gr.render` rebuilds the widgets when the config's structure changes (method, number of rows,
slices) or a config comes from outside (paste, link, example); each widget's `input` event edits one
field of the config through :mod:`merger.ui.config_view`, leaving everything else as it was.
"""

from __future__ import annotations

from typing import Any, Callable

import gradio as gr

from merger.config.dump import dump_yaml
from merger.ui import config_edits as ce
from merger.ui import config_view as cv
from merger.ui.pickers import PICKER_HINT, Picker, note_pick, picker, superseded_by_pick
from merger.ui.yaml_panel import EDIT_QUEUE, ConfigViews

# The classic SLERP schedule posted on model cards: attention from one end, MLPs from the other.
CLASSIC_T: list[dict[str, Any]] = [
    {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
    {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
    {"value": 0.5},
]

Edit = Callable[[dict, Any], dict]

LABELS = {
    "dtype": "dtype (inputs are read in this type; blank: as stored)",
    "out_dtype": "out_dtype (the written model; blank: dtype)",
    "tokenizer_source": "tokenizer_source (base, union or a model; blank: the base model's)",
    "chat_template": "chat_template (blank: the base model's)",
    "seed": "seed (random parts: DARE masks, random gates)",
    "gate_mode": "gate_mode (router initialisation)",
    "experts_per_token": "experts_per_token",
}


def build(views: ConfigViews, demo: gr.Blocks) -> None:
    """The form, rendered from the config state (call inside the page's form column)."""
    gr.Markdown(PICKER_HINT, elem_id="picker-hint")

    @gr.render(inputs=[views.config, views.layout], triggers=[demo.load, views.layout.change])
    def form(text: str, layout: dict) -> None:
        data = cv.parse(text)
        if data is None:
            gr.Markdown("The YAML is not a config mapping yet: fix it in the editor and the form follows.")
            return
        view = cv.view_of(data)
        live = not (layout or {}).get("readonly")
        _method_picker(views, view, live)
        if view.base != "none" or view.base_model:
            label = "Base model (attention, norms, embeddings)" if view.method == cv.MOE else "Base model"
            _wire_picker(views, picker(label, view.base_model, "base-model", live), ce.set_base)
        if view.slices is not None or (view.method == "passthrough" and not view.rows):
            _slices(views, view.slices or (), live)
        else:
            _rows(views, view, live)
        _globals(views, view, live)
        with gr.Accordion("Options: dtype, tokenizer, chat template, seed", open=view.method == cv.MOE):
            for f in view.options:
                widget = _widget(f, f"option-{f.key}", LABELS.get(f.key, f.key), live)
                _wire(views, widget, f.kind, lambda d, v, key=f.key: ce.set_option(d, key, v))


def _method_picker(views: ConfigViews, view: cv.View, live: bool) -> None:
    choices = cv.method_choices()
    if view.method and view.method not in [name for _, name in choices]:
        choices.append((f"{view.method} (unknown)", view.method))
    method = gr.Dropdown(
        choices, value=view.method or None, label="Merge method", elem_id="method", interactive=live
    )
    _wire(views, method, "choice", ce.set_method, structural=True)


def _rows(views: ConfigViews, view: cv.View, live: bool) -> None:
    noun = "Expert" if view.method == cv.MOE else "Model"
    for i, row in enumerate(view.rows):
        with gr.Row(equal_height=True):
            box = picker(f"{noun} {i + 1}", row.model, f"model-{i}", live)
            _wire_picker(views, box, lambda d, v, i=i: ce.set_model(d, i, v))
            for f in row.params:
                widget = _widget(f, f"param-{i}-{f.key}", f.key, live, scale=1)
                _wire(views, widget, f.kind, lambda d, v, i=i, key=f.key: ce.set_model_param(d, i, key, v))
            remove = gr.Button("✕", size="sm", scale=0, min_width=40, elem_id=f"remove-model-{i}", interactive=live)
            _click(views, remove, lambda d, i=i: ce.remove_model(d, i))
    add = gr.Button(f"+ Add {noun.lower()}", size="sm", elem_id="add-model", interactive=live)
    _click(views, add, ce.add_model)


def _slices(views: ConfigViews, rows: tuple[cv.SliceRow, ...], live: bool) -> None:
    gr.Markdown("Slices, stacked in order: layers [start, end) of each model (end is exclusive).")
    for i in sorted({r.slice for r in rows}):
        with gr.Group():
            gr.Markdown(f"Slice {i + 1}")
            for row in [r for r in rows if r.slice == i]:
                _slice_source(views, row, live)
            remove = gr.Button(f"✕ Remove slice {i + 1}", size="sm", elem_id=f"remove-slice-{i}", interactive=live)
            _click(views, remove, lambda d, i=i: ce.remove_slice(d, i))
    add = gr.Button("+ Add slice", size="sm", elem_id="add-slice", interactive=live)
    _click(views, add, ce.add_slice)


def _slice_source(views: ConfigViews, row: cv.SliceRow, live: bool) -> None:
    i, j = row.slice, row.source
    where = f"slice-{i}-{j}"
    with gr.Row(equal_height=True):
        box = picker("model", row.model, f"{where}-model", live)
        _wire_picker(views, box, lambda d, v: ce.set_slice(d, i, "model", v, j))
        for key, value in (("start", row.start), ("end", row.end)):
            number = gr.Number(value=value, precision=0, minimum=0, label=key, elem_id=f"{where}-{key}",
                               interactive=live, scale=1, min_width=80)
            _wire(views, number, "number", lambda d, v, key=key: ce.set_slice(d, i, key, v, j))
        # unset, the source is used as is: the box shows 1 and writes nothing until edited
        scale = gr.Number(value=1 if row.scale is None else row.scale, label="scale", info="default 1",
                          elem_id=f"{where}-scale", interactive=live, scale=1, min_width=80)
        _wire(views, scale, "number", lambda d, v: ce.set_slice(d, i, "scale", v, j))


def _globals(views: ConfigViews, view: cv.View, live: bool) -> None:
    if not view.globals:
        return
    with gr.Row():
        for f in view.globals:
            widget = _widget(f, f"global-{f.key}", f.key, live)
            _wire(views, widget, f.kind, lambda d, v, key=f.key: ce.set_global(d, key, v))
    if any(f.key == "t" for f in view.globals):
        gr.Markdown("`t` may be a number, a gradient across the layers (`[0, 0.5, 1]`) or filtered values.")
        classic = gr.Button("Use the classic attention/MLP schedule for t", size="sm", elem_id="classic-t",
                            interactive=live)
        _click(views, classic, lambda d: ce.set_global(d, "t", CLASSIC_T), structural=True)


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


def _wire(views: ConfigViews, widget: Any, kind: str, edit: Edit, structural: bool = False) -> None:
    """On a user's change of `widget`, apply `edit(config, value)` to the config."""

    def on_input(values: dict) -> dict:
        data = cv.parse(values[views.config]) or {}
        value = values[widget]
        if kind == "choice":
            value = value or None
        else:
            value = cv.from_widget(kind, value)
        return views.show(dump_yaml(edit(data, value)), values[views.layout], reload=structural)

    widget.input(
        on_input,
        inputs={views.config, views.layout, widget},
        outputs=views.outputs,
        trigger_mode="always_last",
        show_progress="hidden",
        api_visibility="private",
        **EDIT_QUEUE,
    )


def _wire_picker(views: ConfigViews, made: Picker, edit: Edit) -> None:
    """A typed model counts when the box loses focus or Enter is pressed; a clicked match counts at once."""
    name = made.box.elem_id or ""

    def on_commit(values: dict, request: gr.Request) -> dict:
        typed = (values[made.box] or "").strip()
        if superseded_by_pick(request, name, typed):
            return {output: gr.skip() for output in views.outputs}
        data = cv.parse(values[views.config]) or {}
        return views.show(dump_yaml(edit(data, typed)), values[views.layout], reload=False)

    gr.on([made.box.blur, made.box.submit], on_commit, inputs={views.config, views.layout, made.box},
          outputs=views.outputs, show_progress="hidden", api_visibility="private", **EDIT_QUEUE)

    def on_pick(values: dict, request: gr.Request) -> dict:
        chosen = values[made.suggestions] or ""
        note_pick(request, name, chosen)
        data = cv.parse(values[views.config]) or {}
        updates = views.show(dump_yaml(edit(data, chosen)), values[views.layout], reload=False)
        updates[made.box] = chosen
        updates[made.suggestions] = gr.Radio(choices=[], value=None, visible=False)
        return updates

    made.suggestions.input(on_pick, inputs={views.config, views.layout, made.suggestions},
                           outputs=[*views.outputs, made.box, made.suggestions], show_progress="hidden",
                           api_visibility="private", **EDIT_QUEUE)


def _click(views: ConfigViews, button: gr.Button, edit: Callable[[dict], dict], structural: bool = False) -> None:
    def on_click(values: dict) -> dict:
        data = cv.parse(values[views.config]) or {}
        return views.show(dump_yaml(edit(data)), values[views.layout], reload=structural)

    button.click(on_click, inputs={views.config, views.layout}, outputs=views.outputs, api_visibility="private",
                 **EDIT_QUEUE)
