"""How the form's widgets edit the config: one event per widget, one field per edit.

Every handler reads the config text and the layout (which stage of a multi-stage config the form shows),
applies its edit to that one mapping through :func:`merger.ui.config_stages.apply` (the other stages
stay byte for byte) and shows the result. Handlers take components as sets and read values from dicts.
"""

from __future__ import annotations

from typing import Any, Callable

import gradio as gr

from merger.ui import config_stages as cst
from merger.ui import config_view as cv
from merger.ui.pickers import Picker, note_pick, picker, superseded_by_pick
from merger.ui.yaml_panel import EDIT_QUEUE, ConfigViews

Edit = Callable[[dict, Any], dict]
_PRIVATE = {"api_visibility": "private", **EDIT_QUEUE}


def edited(views: ConfigViews, values: dict, edit: Callable[[dict], dict], structural: bool) -> dict:
    """The updates after `edit` of the mapping the form shows (the whole config, or the shown stage)."""
    layout, before = values[views.layout], values[views.config]
    text = cst.apply(before, (layout or {}).get("stage", 0), edit)
    # An edit that changes nothing (a widget repeating its event, a preset chosen twice) re-renders nothing:
    # a second render would replace the widgets the user is already typing in.
    return views.show(text, layout, reload=structural and text != before)


def wire(views: ConfigViews, widget: Any, kind: str, edit: Edit, structural: bool = False) -> None:
    """On a user's change of `widget`, apply `edit(config, value)` to the config."""

    def on_input(values: dict) -> dict:
        value = values[widget]
        value = (value or None) if kind == "choice" else cv.from_widget(kind, value)
        return edited(views, values, lambda d: edit(d, value), structural)

    widget.input(on_input, inputs={views.config, views.layout, widget}, outputs=views.outputs,
                 trigger_mode="always_last", show_progress="hidden", **_PRIVATE)


def click(views: ConfigViews, button: gr.Button, edit: Callable[[dict], dict], structural: bool = False) -> None:
    """On a click of `button`, apply `edit(config)` to the config."""

    def on_click(values: dict) -> dict:
        return edited(views, values, edit, structural)

    button.click(on_click, inputs={views.config, views.layout}, outputs=views.outputs, **_PRIVATE)


def click_text(views: ConfigViews, button: gr.Button, change: Callable[[str, dict], tuple[str, dict]]) -> None:
    """On a click, `change(text, layout)` gives the whole text and layout (adding, removing, picking a stage)."""

    def on_click(values: dict) -> dict:
        text, layout = change(values[views.config], dict(values[views.layout] or {}))
        return views.show(text, layout, reload=True)

    button.click(on_click, inputs={views.config, views.layout}, outputs=views.outputs, **_PRIVATE)


def wire_picker(views: ConfigViews, made: Picker, edit: Edit) -> None:
    """A typed model counts when the box loses focus or Enter is pressed; a clicked match counts at once."""
    name = made.box.elem_id or ""

    def on_commit(values: dict, request: gr.Request) -> dict:
        typed = (values[made.box] or "").strip()
        if superseded_by_pick(request, name, typed):
            return {output: gr.skip() for output in views.outputs}
        return edited(views, values, lambda d: edit(d, typed), False)

    gr.on([made.box.blur, made.box.submit], on_commit, inputs={views.config, views.layout, made.box},
          outputs=views.outputs, show_progress="hidden", **_PRIVATE)

    def on_pick(values: dict, request: gr.Request) -> dict:
        chosen = values[made.suggestions] or ""
        note_pick(request, name, chosen)
        updates = edited(views, values, lambda d: edit(d, chosen), False)
        updates[made.box] = chosen
        updates[made.suggestions] = gr.Radio(choices=[], value=None, visible=False)
        return updates

    made.suggestions.input(on_pick, inputs={views.config, views.layout, made.suggestions},
                           outputs=[*views.outputs, made.box, made.suggestions], show_progress="hidden", **_PRIVATE)


def model_picker(views: ConfigViews, label: str, row: tuple[str, str], elem_id: str, live: bool,
                 set_model: Edit, set_lora: Edit) -> None:
    """A model picker and, folded under it (open when set), the LoRA adapter applied to that model.

    Args:
        row: `(model, lora)` as the config gives them (`model+lora` or `{model, lora}`).
        set_model / set_lora: the edits of this reference's model and LoRA parts.
    """
    model, lora = row
    with gr.Column(scale=4, min_width=200):
        wire_picker(views, picker(label, model, elem_id, live), set_model)
        with gr.Accordion("LoRA adapter (model+lora)", open=bool(lora), elem_id=f"{elem_id}-lora-fold"):
            wire_picker(views, picker("LoRA adapter: a PEFT adapter on the Hub", lora, f"{elem_id}-lora", live),
                        set_lora)
