"""YAML ⇄ form through the app's own handlers: the page's form is rendered for a config (gradio's render, as
for a browser session), then every widget sends back the value it shows through its own event, as a user
tabbing through the form would. The config must come back unchanged, for every example and every method.

tests/test_config_view.py checks the view's functions alone; this checks the wiring that the page runs
(widget values as gradio hands them to the handlers, the pickers' commit events, the method dropdown).
"""

from __future__ import annotations

import asyncio
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402
import pytest  # noqa: E402
from gradio.state_holder import SessionState  # noqa: E402

import app  # noqa: E402
from merger.config.dump import dump_yaml  # noqa: E402
from merger.config.examples import load_examples  # noqa: E402
from merger.methods.registry import METHODS  # noqa: E402
from merger.ui import config_stages, config_view as cv  # noqa: E402

EXAMPLES = load_examples(app.EXAMPLES_DIR)
LAYOUT = {"structure": None, "revision": 0, "readonly": False}
TWO_MODELS = dump_yaml({"merge_method": "linear", "models": [
    {"model": "org/a", "parameters": {"weight": 1.0}}, {"model": "org/b", "parameters": {"weight": 1.0}}]})


@pytest.fixture(scope="module")
def demo() -> gr.Blocks:
    return app.build_demo()


class RenderedForm:
    """The form as one browser session sees it after the config `text` arrived."""

    def __init__(self, demo: gr.Blocks, text: str) -> None:
        self.render = next(f for f in demo.fns.values() if f.renderable is not None)
        self.config, self.layout = self.render.inputs  # the config text and layout states
        state = SessionState(demo)
        state[self.config._id], state[self.layout._id] = text, LAYOUT  # gradio reads a State's value from here
        asyncio.run(demo.process_api(block_fn=self.render, inputs=[text, LAYOUT], state=state, request=None))
        self.fns = [f for f in state.blocks_config.fns.values() if f.rendered_in is self.render.renderable]

    def edits(self) -> list:
        """(handler, widget) of every widget that writes into the config: field edits and committed model boxes."""
        found = []
        for f in self.fns:
            if self.config not in f.outputs or f.name not in ("on_input", "on_commit"):
                continue
            widgets = [c for c in f.inputs if c not in (self.config, self.layout)]
            found.extend((f, w) for w in widgets)
        return found

    def send_back(self, handler, widget, text: str) -> str:
        """The config after `widget` sends the value it shows through its own event (as the browser sends it)."""
        values = {self.config: text, self.layout: LAYOUT, widget: widget.preprocess(widget.value)}
        request = gr.Request()
        request.session_hash = "round-trip"
        updates = handler.fn(values, request) if handler.name == "on_commit" else handler.fn(values)
        return updates[self.config]


def without_defaults(data: dict) -> dict:
    """`data` without the parameter entries that only restate what an unset one means: the registry's
    default, or `scale: 1` (a slice used as is). A widget shows that value for an unset field, so sending it
    back may write it; the merge is the same."""
    method = METHODS.get(str(data.get("merge_method")))
    defaults = {p.name: p.default for p in method.parameters if p.default is not None} if method else {}
    defaults.setdefault("scale", 1)

    def strip(level: object) -> object:
        if isinstance(level, list):
            return [strip(item) for item in level]
        if not isinstance(level, dict):
            return level
        out = {key: strip(value) for key, value in level.items()}
        if isinstance(out.get("parameters"), dict):
            kept = {k: v for k, v in out["parameters"].items() if defaults.get(k, object()) != v}
            out.pop("parameters") if not kept else out.__setitem__("parameters", kept)
        return out

    return strip(data)


def round_trip(demo: gr.Blocks, text: str) -> tuple[str, int]:
    """Every widget sends its value back in turn; returns the final config text and how many widgets did."""
    form = RenderedForm(demo, text)
    edits = form.edits()
    for handler, widget in edits:
        text = form.send_back(handler, widget, text)
    return text, len(edits)


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.name for e in EXAMPLES])
def test_every_example_comes_back_from_the_form_unchanged(demo: gr.Blocks, example) -> None:
    back, widgets = round_trip(demo, example.yaml_text)
    assert widgets >= 4  # models, their parameters and the options were all sent back
    stages = config_stages.stage_count(example.yaml_text)  # a multi-stage config shows (and edits) its first stage
    assert config_stages.stage_count(back) == stages
    for stage in range(max(stages, 1)):
        assert without_defaults(config_stages.stage_data(back, stage)) == without_defaults(
            config_stages.stage_data(example.yaml_text, stage)), stage


@pytest.mark.parametrize("name", [*sorted(METHODS), cv.MOE])
def test_every_method_chosen_in_the_form_round_trips(demo: gr.Blocks, name: str) -> None:
    form = RenderedForm(demo, TWO_MODELS)
    [(pick_method, method_box)] = [(f, w) for f, w in form.edits() if isinstance(w, gr.Dropdown)
                                   and name in [value for _, value in w.choices]]
    values = {form.config: TWO_MODELS, form.layout: LAYOUT, method_box: name}
    chosen = pick_method.fn(values)[form.config]
    data = cv.parse(chosen)
    assert cv.method_of(data) == name
    back, _ = round_trip(demo, chosen)
    assert without_defaults(cv.parse(back)) == without_defaults(data)
