"""The form's stage bar for multi-stage (mergekit-multi) configs: pick the stage the form edits, name it,
add a stage after the last, remove the shown one. A plain config shows only "+ Add a stage", under the form."""

from __future__ import annotations

import gradio as gr

from merger.ui import config_edits as ce
from merger.ui import config_stages as cst
from merger.ui.form_wiring import click_text, wire
from merger.ui.yaml_panel import ConfigViews


def stage_bar(views: ConfigViews, text: str, layout: dict, live: bool) -> None:
    """The stages of `text` as a picker (one button per stage), the shown stage's name, add and remove
    (nothing for a plain config)."""
    count = int(layout.get("stages") or 0)
    shown = cst.clamp(layout.get("stage", 0), count)
    if not count:
        return
    gr.Markdown("**Stages** (run in order; a later stage names an earlier one's `name` as a model). "
                "The form edits the selected stage; the others stay as typed.")
    with gr.Row():
        for i, label in enumerate(cst.labels(text)):
            pick = gr.Button(label, size="sm", variant="primary" if i == shown else "secondary",
                             elem_id=f"stage-{i}")
            click_text(views, pick, lambda t, lay, i=i: (t, {**lay, "stage": i}))
    with gr.Row(equal_height=True):
        name = gr.Textbox(value=cst.documents(text)[shown].name, label=f"name of stage {shown + 1}",
                          info="later stages use it as a model; the last stage needs none",
                          elem_id="stage-name", interactive=live, scale=3)
        wire(views, name, "string", lambda d, v: ce.set_option(d, "name", v.strip()))
        if count > 1:
            remove = gr.Button(f"✕ Remove stage {shown + 1}", size="sm", elem_id="remove-stage",
                               interactive=live, scale=1)
            click_text(views, remove,
                       lambda t, lay: (cst.remove_stage(t, shown), {**lay, "stage": max(shown - 1, 0)}))
    add_stage_button(views, layout, live)


def add_stage_button(views: ConfigViews, layout: dict, live: bool) -> None:
    """"+ Add a stage": a new last stage merging the current last one's output; the form then shows it."""
    count = int(layout.get("stages") or 0)
    add = gr.Button("+ Add a stage (merge this result further)", size="sm", elem_id="add-stage", interactive=live)
    click_text(views, add, lambda t, lay: (cst.add_stage(t), {**lay, "stage": max(count, 1)}))
