"""The form's MoE part: experts (and shared experts, where the schema takes them) with their prompts.

Each expert is a model picker (with its LoRA), its `residual_scale` / `noise_scale`, and its positive
and negative prompt lists (a box per prompt with ✕, and "+ prompt"); the prompts steer the `hidden`
and `cheap_embed` gates. The gate mode, experts per token and output architecture are options.
"""

from __future__ import annotations

import gradio as gr

from merger.ui import config_edits as ce
from merger.ui import config_edits_moe as cem
from merger.ui import config_view as cv
from merger.ui.form_wiring import click, model_picker, wire
from merger.ui.yaml_panel import ConfigViews

PROMPT_LABELS = {"positive_prompts": "Positive prompts (what this expert is for)",
                 "negative_prompts": "Negative prompts (what it is not for)"}
GROUP_NOUNS = {"experts": ("Expert", "expert"), "shared_experts": ("Shared expert", "shared")}


def experts(views: ConfigViews, view: cv.View, live: bool) -> None:
    """Every expert group of an MoE view, each with add and remove."""
    _group(views, "experts", view.rows, live)
    if view.shared is None:
        return  # the schema takes no shared experts: nothing to show
    with gr.Accordion("Shared experts (Qwen-MoE / DeepSeek outputs: used for every token)",
                      open=bool(view.shared), elem_id="shared-experts"):
        _group(views, "shared_experts", view.shared, live)


def _group(views: ConfigViews, group: str, rows: tuple[cv.ModelRow, ...], live: bool) -> None:
    noun, short = GROUP_NOUNS[group]
    for i, row in enumerate(rows):
        where = f"{short}-{i}" if group != "experts" else f"model-{i}"
        with gr.Group():
            with gr.Row(equal_height=True):
                model_picker(views, f"{noun} {i + 1}", (row.model, row.lora), where, live,
                             lambda d, v, i=i: ce.set_model(d, i, v, group),
                             lambda d, v, i=i: ce.set_lora(d, i, v, group))
                for f in row.params:
                    # unset, the box shows the default and writes nothing until edited to another value
                    box = gr.Number(value=f.default if f.value is None else f.value, label=f.key,
                                    info=f"default {f.default}", elem_id=f"{where}-{f.key}", interactive=live,
                                    min_width=90, scale=1)
                    wire(views, box, "number",
                         lambda d, v, i=i, f=f: d if f.value is None and v == f.default
                         else ce.set_model_param(d, i, f.key, v, group))
                remove = gr.Button("✕", size="sm", scale=0, min_width=40, elem_id=f"remove-{where}", interactive=live)
                click(views, remove, lambda d, i=i: ce.remove_model(d, i, group), structural=True)
            for which, prompts in zip(cem.PROMPT_KEYS, row.prompts):
                _prompts(views, group, i, which, prompts, f"{where}-{which}", live)
    add = gr.Button(f"+ Add {noun.lower()}", size="sm", elem_id=f"add-{short}" if group != "experts" else "add-model",
                    interactive=live)
    click(views, add, lambda d: ce.add_model(d, group), structural=True)


def _prompts(views: ConfigViews, group: str, index: int, which: str, prompts: tuple[str, ...], where: str,
             live: bool) -> None:
    gr.Markdown(PROMPT_LABELS[which])
    for k, prompt in enumerate(prompts):
        with gr.Row(equal_height=True):
            box = gr.Textbox(value=prompt, show_label=False, placeholder="a prompt", elem_id=f"{where}-{k}",
                             interactive=live, scale=8)
            wire(views, box, "string", lambda d, v, k=k: cem.set_prompt(d, index, which, k, v, group))
            remove = gr.Button("✕", size="sm", scale=0, min_width=40, elem_id=f"{where}-{k}-remove", interactive=live)
            click(views, remove, lambda d, k=k: cem.remove_prompt(d, index, which, k, group), structural=True)
    add = gr.Button("+ prompt", size="sm", elem_id=f"{where}-add", interactive=live)
    click(views, add, lambda d: cem.add_prompt(d, index, which, group), structural=True)
