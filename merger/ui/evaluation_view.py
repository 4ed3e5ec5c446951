"""The job view's evaluation: the table, a bar chart of bits/token per model and text type, the greedy
generations side by side, and Publish / Discard for a merge that awaits review.

The frames are built from the `evaluation` of :func:`merger.service.job_status` (pure functions, tested
without a browser); the widgets live in the job view (:mod:`merger.ui.job_panel`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import gradio as gr
import pandas as pd

BAR_X, BAR_Y, BAR_COLOR = "model · text", "bits/token", "text"


@dataclass
class EvaluationView:
    """The evaluation's widgets and the review buttons."""

    box: gr.Column
    summary: gr.Markdown
    table: gr.Dataframe
    bars: gr.BarPlot
    generations: gr.Dataframe
    review: gr.Row
    publish_button: gr.Button
    discard_button: gr.Button

    @property
    def outputs(self) -> list:
        """Every widget an update of the job view may change."""
        return [self.box, self.summary, self.table, self.bars, self.generations, self.review, self.publish_button,
                self.discard_button]

    def hidden(self) -> dict:
        """Updates for a job not evaluated (yet) and not awaiting review."""
        return {self.box: gr.Column(visible=False), self.review: gr.Row(visible=False)}

    def shown(self, info: dict[str, Any]) -> dict:
        """Updates for the job status `info`: the evaluation once there is one, the buttons while it awaits review."""
        evaluation = info.get("evaluation")
        awaiting = info.get("status") == "awaiting_review"
        updates: dict[Any, Any] = {
            self.review: gr.Row(visible=awaiting),
            self.publish_button: gr.Button(interactive=awaiting),
            self.discard_button: gr.Button(interactive=awaiting),
        }
        if not evaluation:
            return {**updates, self.box: gr.Column(visible=False)}
        return {
            **updates,
            self.box: gr.Column(visible=True),
            self.summary: summary_markdown(evaluation),
            self.table: evaluation_table(evaluation),
            self.bars: bits_bars(evaluation),
            self.generations: _side_by_side(generations_table(evaluation)),
        }


def build() -> EvaluationView:
    """The evaluation section (hidden until there is one) and the review buttons (hidden until needed)."""
    with gr.Column(visible=False, elem_id="job-evaluation") as box:
        summary = gr.Markdown(elem_id="job-evaluation-summary")
        table = gr.Dataframe(label="Evaluation: bits per token (lower is better) and KL(merge ‖ parent)",
                             interactive=False, wrap=True, elem_id="job-evaluation-table")
        bars = gr.BarPlot(x=BAR_X, y=BAR_Y, color=BAR_COLOR, label="Bits per token by model and text type",
                          x_label_angle=-30, sort=None, elem_id="job-evaluation-bars")
        generations = gr.Dataframe(label="Greedy answers: one row per prompt, one column per model",
                                   interactive=False, wrap=True, elem_id="job-generations")
    with gr.Row(visible=False, elem_id="job-review") as review:
        publish_button = gr.Button("Publish to the Hub", variant="primary", size="sm", elem_id="publish")
        discard_button = gr.Button("Discard", variant="stop", size="sm", elem_id="discard")
    return EvaluationView(box, summary, table, bars, generations, review, publish_button, discard_button)


def evaluation_table(evaluation: dict[str, Any]) -> pd.DataFrame:
    """One row per model: bits/token per text type and their mean, then KL(merge ‖ model) per text type
    (`merge` in the merge's own row, `-` where not measured, as in the card). Bits/token, rounded to 4 places."""
    texts, merge = evaluation["texts"], evaluation.get("merge")
    rows = []
    for row in evaluation["rows"]:
        bits = [row["bits_per_token"].get(t) for t in texts]
        scored = [b for b in bits if b is not None]
        cells = {"model": row["name"] + ("" if row.get("complete", True) else " (time budget ran out)")}
        cells.update({f"{t} bits/tok": _round(b) for t, b in zip(texts, bits)})
        cells["mean bits/tok"] = _round(sum(scored) / len(scored) if scored else None)
        if merge is not None:
            cells.update({f"KL({t})": "merge" if row["name"] == merge else _round(row["kl_bits"].get(t))
                          for t in texts})
        rows.append(cells)
    return pd.DataFrame(rows)


def bits_bars(evaluation: dict[str, Any]) -> pd.DataFrame:
    """The bar chart's data: one bar per (model, text type), its height the bits/token, coloured by text type."""
    bars = [
        {BAR_X: f"{row['name']} · {text}", BAR_Y: round(row["bits_per_token"][text], 4), BAR_COLOR: text}
        for row in evaluation["rows"] for text in evaluation["texts"] if text in row["bits_per_token"]
    ]
    return pd.DataFrame(bars, columns=[BAR_X, BAR_Y, BAR_COLOR])


def generations_table(evaluation: dict[str, Any]) -> pd.DataFrame:
    """The greedy answers side by side: one row per prompt, one column per model (the new text only)."""
    rows = []
    for i, prompt in enumerate(evaluation["prompts"]):
        cells = {"prompt": prompt}
        cells.update({row["name"]: row["generations"][i] if i < len(row["generations"]) else ""
                      for row in evaluation["rows"]})
        rows.append(cells)
    return pd.DataFrame(rows)


def _side_by_side(frame: pd.DataFrame) -> gr.Dataframe:
    # equal columns, so that every model's answer shows without scrolling sideways
    return gr.Dataframe(value=frame, column_widths=[f"{100 / len(frame.columns):.0f}%"] * len(frame.columns))


def summary_markdown(evaluation: dict[str, Any]) -> str:
    """How much was scored, and in how long."""
    tokens = sum(sum(row["tokens"].values()) for row in evaluation["rows"])
    return (f"**Evaluation:** {len(evaluation['rows'])} models on {', '.join(evaluation['texts'])}: "
            f"{tokens:,} tokens scored in {evaluation['seconds']:.1f}s.")


def review_markdown(info: dict[str, Any]) -> str:
    """What a job awaiting review asks of its owner, and until when."""
    if info.get("status") != "awaiting_review":
        return ""
    until = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(info["review_expires_at"]))
    return (f"**Awaiting your review:** the merge is staged on the worker, nothing is on the Hub yet. Publish it "
            f"or discard it; undecided, it is deleted at {until}.")


def _round(value: float | None) -> float | str:
    return "-" if value is None or math.isnan(value) else round(value, 4)
