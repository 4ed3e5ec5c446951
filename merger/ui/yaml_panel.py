"""The YAML view and the page's one source of truth: the config text in a `gr.State`.

The form and this editor are two views of that text. Pasting here keeps the text byte for byte (the
form fills what it can and never rewrites the rest); a form edit changes only its field and writes
the mapping back as YAML.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr

from merger.config.dump import dump_yaml
from merger.ui import config_stages, config_view

START_CONFIG = dump_yaml(
    {
        "merge_method": "slerp",
        "base_model": "",
        "models": [{"model": ""}, {"model": ""}],
        "parameters": {"t": 0.5},
        "dtype": "bfloat16",
    }
)


# Every edit of the config runs in this one queue: gradio reads a session's state when an event starts,
# so two edits running at once (a quick second keystroke, a blur then a click) would each start from the
# same config and the later one would undo the earlier. Edits are pure and take milliseconds.
EDIT_QUEUE = {"concurrency_id": "config-edit", "concurrency_limit": 1}


@dataclass
class ConfigViews:
    """The state and the YAML widgets every other panel reads or updates.

    Attributes:
        config: the config YAML text, exactly as pasted, loaded or last written by the form.
        layout: `{"structure": ..., "stages": n, "stage": i, "revision": n, "readonly": bool}` (`stages`: the
            documents of a multi-stage config, 0 for a plain one; `stage`: the one the form shows);
            a change re-renders the form.
        yaml_code: the YAML editor.
        kept: the "kept from your YAML" note.
        copy_button: "Edit a copy" (shown while a job's config is shown read-only).
    """

    config: gr.State
    layout: gr.State
    yaml_code: gr.Code
    kept: gr.Markdown
    copy_button: gr.Button

    @property
    def outputs(self) -> list:
        """What :meth:`show` updates."""
        return [self.config, self.layout, self.yaml_code, self.kept, self.copy_button]

    def show(
        self, text: str, layout: dict | None, reload: bool = True, readonly: bool | None = None, echo: bool = True
    ) -> dict:
        """Updates that make `text` the config.

        Args:
            text: the new config text (kept byte for byte in the state).
            layout: the current layout value.
            reload: the text came from outside the form (paste, link, example): re-render the form
                even if its widgets stay the same, so they show the new values.
            readonly: show the config read-only (a job's config), or None to keep the current mode.
            echo: write the text into the editor (False when it came from the editor: the cursor stays).
        """
        layout = dict(layout or {})
        count = config_stages.stage_count(text)
        stage = config_stages.clamp(layout.get("stage", 0), count)
        data = config_stages.stage_data(text, stage)
        view = config_view.view_of(data) if data is not None else None
        new = {
            "structure": view.structure() if view else None,
            "stages": count,
            "stage": stage,
            "revision": int(layout.get("revision", 0)) + (1 if reload else 0),
            "readonly": bool(layout.get("readonly")) if readonly is None else readonly,
        }
        updates: dict[Any, Any] = {self.config: text, self.kept: kept_note(view, stage if count else None)}
        updates[self.layout] = new if new != layout else gr.skip()
        if not echo:
            updates[self.yaml_code] = gr.skip()
            updates[self.copy_button] = gr.skip()
        elif reload or readonly is not None:
            updates[self.yaml_code] = gr.Code(value=text, interactive=not new["readonly"])
            updates[self.copy_button] = gr.Button(visible=new["readonly"])
        else:
            updates[self.yaml_code] = text
            updates[self.copy_button] = gr.skip()
        return updates


def kept_note(view: config_view.View | None, stage: int | None = None) -> str:
    """The note under the form: what the config (stage `stage` of a multi-stage one) holds that the form
    does not show."""
    where = "" if stage is None else f" (stage {stage + 1})"
    if view is None:
        return f"The form cannot read this YAML{where} (it is not a config mapping); edit it here."
    if not view.kept:
        return ""
    shown = ", ".join(f"`{k}`" for k in view.kept)
    return f"**Kept from your YAML**{where} (not in the form, merged as written): {shown}"


def build(initial: str = START_CONFIG) -> ConfigViews:
    """The YAML editor, the kept note and the state (call inside a column of the page)."""
    view = config_view.view_of(config_view.parse(initial) or {})
    config = gr.State(initial)
    layout = gr.State({"structure": view.structure(), "stages": 0, "stage": 0, "revision": 0, "readonly": False})
    yaml_code = gr.Code(
        value=initial,
        language="yaml",
        interactive=True,
        lines=18,
        label="Config: exactly what will be merged (edit or paste any mergekit YAML)",
        elem_id="config-yaml",
    )
    kept = gr.Markdown(kept_note(view), elem_id="kept-note")
    copy_button = gr.Button("Edit a copy", visible=False, size="sm", elem_id="edit-copy")
    views = ConfigViews(config, layout, yaml_code, kept, copy_button)

    def on_paste(values: dict) -> dict:
        return views.show(values[yaml_code] or "", values[layout], echo=False)

    yaml_code.input(
        on_paste,
        inputs={yaml_code, layout},
        outputs=views.outputs,
        trigger_mode="always_last",
        show_progress="hidden",
        api_visibility="private",
        **EDIT_QUEUE,
    )

    def on_copy(values: dict) -> dict:
        return views.show(values[config], values[layout], readonly=False)

    copy_button.click(on_copy, inputs={config, layout}, outputs=views.outputs, api_visibility="private", **EDIT_QUEUE)
    return views
