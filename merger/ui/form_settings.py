"""The gradient and filter editor of one parameter (any the registry lets be a gradient).

A parameter is shown as a number, as gradient points across the layers (each point a number box with
✕, and "+ point"), or as values per filter (self_attn, mlp, other = the entry without a filter), each
a number or a gradient; presets fill in common schedules, the classic attention/MLP SLERP one included.
Every widget edits that one parameter through :func:`merger.ui.config_edits.edit_setting`.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import gradio as gr

from merger.ui import config_edits as ce
from merger.ui import config_settings as cs
from merger.ui import config_view as cv
from merger.ui.form_wiring import click, wire
from merger.ui.yaml_panel import ConfigViews

Change = Callable[[dict, Callable[[Any], Any]], dict]  # (config, transform of the setting) -> config

SHAPE_CHOICES = [("number", cs.NUMBER), ("gradient", cs.GRADIENT), ("per filter", cs.FILTERED)]
PART_SHAPES = [("number", cs.NUMBER), ("gradient", cs.GRADIENT)]
FILTER_CHOICES = [("other (every other tensor)", ""), *((name, name) for name in cs.FILTERS)]


def setting_editor(views: ConfigViews, f: cv.Field, index: int | None, where: str, live: bool,
                   number: Callable[[], None] | None = None) -> None:
    """The editor of parameter `f` of row `index` (None: global), its widgets' ids starting with `where`.

    Args:
        number: draws the number box when the value is a number (None: the caller shows it elsewhere).
    """
    unset = ce.starter(f.key, f.default)

    def change(data: dict, transform: Callable[[Any], Any]) -> dict:
        return ce.edit_setting(data, index, f.key, transform, unset)

    shape = f.kind if f.kind in (cs.GRADIENT, cs.FILTERED) else cs.NUMBER
    with gr.Row(equal_height=True):
        shapes = gr.Radio(SHAPE_CHOICES, value=shape, label=f"{f.key} as", elem_id=f"{where}-shape",
                          interactive=live, scale=2)
        # The shape shown chosen again changes nothing: an unset number stays unset (its default applies).
        wire(views, shapes, "choice",
             lambda d, v: d if (v or cs.NUMBER) == shape else change(d, lambda s: cs.reshaped(s, v or cs.NUMBER, unset)),
             structural=True)
        presets = gr.Dropdown([("(choose a preset)", ""), *((k, k) for k in cs.PRESETS)], value="",
                              label="preset", elem_id=f"{where}-preset", interactive=live, scale=2)
        wire(views, presets, "choice",
             lambda d, v: change(d, lambda s: copy.deepcopy(cs.PRESETS[v])) if v in cs.PRESETS else d,
             structural=True)
        if shape == cs.NUMBER and number is not None:
            number()
    if shape == cs.GRADIENT:
        _points(views, f, f.value, None, change, where, live)
    elif shape == cs.FILTERED:
        _parts(views, f, change, where, live)


def _points(views: ConfigViews, f: cv.Field, points: list, part: int | None, change: Change, where: str,
            live: bool) -> None:
    """A gradient's points, from the first layer (at 0) to the last (at 1), each removable; "+ point" adds one."""
    last = max(1, len(points) - 1)
    with gr.Row(equal_height=True):
        for k, point in enumerate(points):
            with gr.Column(min_width=80, scale=1):
                box = gr.Number(value=point, label=f"at {k / last:.2g}", elem_id=f"{where}-point-{k}",
                                minimum=f.minimum, maximum=f.maximum, interactive=live, min_width=80)
                wire(views, box, "number", lambda d, v, k=k: change(d, lambda s: cs.set_point(s, part, k, v)))
                remove = gr.Button("✕", size="sm", min_width=40, elem_id=f"{where}-remove-point-{k}",
                                   interactive=live)
                click(views, remove, lambda d, k=k: change(d, lambda s: cs.remove_point(s, part, k)), structural=True)
        add = gr.Button("+ point", size="sm", scale=0, min_width=80, elem_id=f"{where}-add-point",
                        interactive=live and len(points) < cs.MAX_POINTS)
        click(views, add, lambda d: change(d, lambda s: cs.add_point(s, part)), structural=True)


def _parts(views: ConfigViews, f: cv.Field, change: Change, where: str, live: bool) -> None:
    """Values per filter, in order (the first filter a tensor's name contains applies)."""
    gr.Markdown("The first entry whose filter is part of a tensor's name applies; `other` takes the rest.")
    for p, entry in enumerate(f.value):
        here = f"{where}-part-{p}"
        inner = cs.shape_of(entry["value"])
        with gr.Row(equal_height=True):
            name = gr.Dropdown(FILTER_CHOICES, value=entry.get("filter") or "", allow_custom_value=True,
                               label="filter", elem_id=f"{here}-filter", interactive=live, scale=2)
            wire(views, name, "choice", lambda d, v, p=p: change(d, lambda s: cs.set_filter(s, p, v)))
            shapes = gr.Radio(PART_SHAPES, value=inner, label="as", elem_id=f"{here}-shape", interactive=live,
                              scale=2)
            wire(views, shapes, "choice",
                 lambda d, v, p=p: change(d, lambda s: cs.set_part_shape(s, p, v or cs.NUMBER)), structural=True)
            if inner == cs.NUMBER:
                box = gr.Number(value=entry["value"], label="value", elem_id=f"{here}-value", minimum=f.minimum,
                                maximum=f.maximum, interactive=live, scale=1, min_width=90)
                wire(views, box, "number",
                     lambda d, v, p=p: change(d, lambda s: cs.set_part_number(s, p, v)))
            remove = gr.Button("✕", size="sm", scale=0, min_width=40, elem_id=f"{here}-remove", interactive=live)
            click(views, remove, lambda d, p=p: change(d, lambda s: cs.remove_part(s, p)), structural=True)
        if inner == cs.GRADIENT:
            _points(views, f, entry["value"], p, change, here, live)
    with gr.Row():
        has_other = any(e.get("filter") is None for e in f.value)
        for name in [*cs.FILTERS, *([] if has_other else [None])]:
            add = gr.Button(f"+ {name or 'other'}", size="sm", elem_id=f"{where}-add-{name or 'other'}",
                            interactive=live)
            click(views, add, lambda d, name=name: change(d, lambda s: cs.add_part(s, name)), structural=True)
