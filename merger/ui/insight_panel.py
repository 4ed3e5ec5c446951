"""Before merging: the weight report of the config's models as a heatmap, and "Suggest a merge", whose
candidates stream in as they are scored and whose best fills the form (through the config state).

Both go through `merger.service` (its `insight` module bounds them: weights read, time, memory, one search
at a time); the bounds are stated on the page.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator

import gradio as gr

from merger import service
from merger.ui.common import one_line, token_of
from merger.ui.yaml_panel import EDIT_QUEUE, ConfigViews

CANDIDATE_HEADERS = ["#", "bits/token (search split)", "method", "parameters"]
HOW_TO_READ = (
    "τ = model − base, per layer. **‖τ‖/‖base‖**: how far a model moved from the base (a fine-tune: a few "
    "percent to ~20%). **cos**: whether two models moved the same way (near 0: independent changes, which "
    "task arithmetic and TIES add well; negative: they undo each other there). **sign conflicts**: of the "
    "entries both changed, the share changed in opposite directions (50% is what unrelated changes give; "
    "TIES resolves them by a vote)."
)


@dataclass
class InsightPanel:
    """The report's and the search's widgets.

    Attributes:
        report_button / report_table / report_notes: "Weight report", the heatmap table, legend and warnings.
        candidates / minutes / text: the search's budget and evaluation text (empty: the shipped set).
        suggest_button / suggest_table / suggest_status: "Suggest a merge", the scored candidates, progress.
        suggested: the best candidate's YAML once the search ends ("" until then).
    """

    report_button: gr.Button
    report_table: gr.Dataframe
    report_notes: gr.Markdown
    candidates: gr.Number
    minutes: gr.Number
    text: gr.Textbox
    suggest_button: gr.Button
    suggest_table: gr.Dataframe
    suggest_status: gr.Markdown
    suggested: gr.State


def limits_note() -> str:
    """The bounds the app applies, in words (shown under the buttons)."""
    bounds = service.limits()
    return (f"Both read the models' weights on this server: at most {bounds.max_bytes / 1e9:.1f} GB of weights "
            f"over the config's models; a report within {bounds.report_seconds // 60} min; a search of at most "
            f"{bounds.max_candidates} candidates and {bounds.max_minutes} min, holding at most "
            f"{bounds.search_bytes / 2**30:.0f} GiB of float32 weights, one search at a time on the whole app. "
            "Bigger models: `python -m merger validate CONFIG --report` and `python -m merger suggest` locally.")


def build() -> InsightPanel:
    """The panel, in an accordion (call inside the page's Blocks)."""
    bounds = service.limits()
    with gr.Accordion("Before merging: weight report and suggested merge", open=False, elem_id="insight"):
        gr.Markdown(limits_note())
        report_button = gr.Button("Weight report", elem_id="report-button")
        report_table = gr.Dataframe(label="Per layer: task vector norms, cosines, sign conflicts (heatmap)",
                                    interactive=False, wrap=True, elem_id="report-table")
        report_notes = gr.Markdown(elem_id="report-notes")
        gr.Markdown("**Suggest a merge** of two or three fine-tunes of `base_model` (the config's other models): "
                    "candidates are scored on one half of the evaluation text, and the parents, the naive "
                    "average and the best are judged on the other half. The best fills the form.")
        with gr.Row():
            candidates = gr.Number(value=min(12, bounds.max_candidates), precision=0, minimum=1,
                                   maximum=bounds.max_candidates, label="candidates at most",
                                   elem_id="budget-candidates")
            minutes = gr.Number(value=min(5, bounds.max_minutes), minimum=0.1, maximum=bounds.max_minutes,
                                label="minutes at most", elem_id="budget-minutes")
        text = gr.Textbox(lines=3, max_lines=6, max_length=200_000, elem_id="suggest-text",
                          label="evaluation text (empty: the shipped prose, code and chat set)")
        suggest_button = gr.Button("Suggest a merge", elem_id="suggest-button")
        suggest_status = gr.Markdown(elem_id="suggest-status")
        suggest_table = gr.Dataframe(headers=CANDIDATE_HEADERS, interactive=False, label="candidates, as scored",
                                     elem_id="suggest-table")
        suggested = gr.State("")
    return InsightPanel(report_button, report_table, report_notes, candidates, minutes, text, suggest_button,
                        suggest_table, suggest_status, suggested)


def wire(panel: InsightPanel, views: ConfigViews) -> None:
    """Report and search events; the search's best fills the form through the config-edit queue."""

    def on_report(values: dict, oauth_token: gr.OAuthToken | None = None) -> Iterator[dict]:
        yield {panel.report_table: None, panel.report_notes: "Reading the models' weights, tensor by tensor…"}
        try:
            report = service.weight_report(values[views.config], token_of(oauth_token))
        except Exception as err:  # noqa: BLE001 - merger's message, or one line for a bug (logged)
            yield {panel.report_notes: f"**No report:** {one_line(err)}"}
            return
        yield {panel.report_table: heatmap(report), panel.report_notes: report_notes(report)}

    panel.report_button.click(on_report, inputs={views.config}, outputs=[panel.report_table, panel.report_notes],
                              concurrency_limit=2, concurrency_id="weight-report", api_visibility="private")

    def on_suggest(values: dict, oauth_token: gr.OAuthToken | None = None) -> Iterator[dict]:
        yield from suggest_updates(panel, values[views.config], token_of(oauth_token), values[panel.candidates],
                                   values[panel.minutes], values[panel.text])

    def on_suggested(values: dict) -> dict:
        if not values[panel.suggested]:
            return {}
        return views.show(values[panel.suggested], values[views.layout], readonly=False)

    panel.suggest_button.click(
        on_suggest, inputs={views.config, panel.candidates, panel.minutes, panel.text},
        outputs=[panel.suggest_table, panel.suggest_status, panel.suggested],
        concurrency_limit=1, concurrency_id="suggest", api_visibility="private",
    ).then(on_suggested, inputs={panel.suggested, views.layout}, outputs=views.outputs, api_visibility="private",
           **EDIT_QUEUE)


def suggest_updates(panel: InsightPanel, config: str, token: str | None, candidates: Any, minutes: Any,
                    text: str) -> Iterator[dict]:
    """The page's updates while a search runs: the candidates so far, then the summary and the best's YAML."""
    rows: list[list[Any]] = []
    yield {panel.suggest_table: None, panel.suggest_status: "Loading the models…", panel.suggested: ""}
    try:
        for event in service.suggest(config, token, candidates, minutes, text or ""):
            if isinstance(event, service.SuggestedMerge):
                yield {panel.suggest_status: f"**Suggested (now in the form):** {event.summary}",
                       panel.suggested: event.yaml}
                return
            rows.append([event.number, round(event.bits, 4), event.method, event.parameters])
            best = min(rows, key=lambda row: row[1])
            yield {panel.suggest_table: [list(row) for row in rows],
                   panel.suggest_status: f"{len(rows)} scored; best so far #{best[0]} ({best[1]:.4f} bits/token)…"}
    except Exception as err:  # noqa: BLE001 - merger's message, or one line for a bug (logged)
        yield {panel.suggest_status: f"**Not suggested:** {one_line(err)}", panel.suggested: ""}


def report_frame(report: Any) -> tuple[list[str], list[list[Any]]]:
    """(headers, rows) of the report: one row per group (layers in order, then `all`), one column per
    model's relative norm, then per model pair's cosine and sign-conflict share."""
    n = len(report.models)
    pairs = sorted(report.total.cosines)
    headers = ["group", *(f"‖τ M{i + 1}‖/‖base‖" for i in range(n)),
               *(f"cos M{i + 1}·M{j + 1}" for i, j in pairs),
               *(f"sign conflicts M{i + 1}·M{j + 1}" for i, j in pairs)]
    rows = [[g.group, *g.relative, *(g.cosines[p] for p in pairs), *(g.conflicts[p] for p in pairs)]
            for g in (*report.groups, report.total)]
    return headers, rows


def heatmap(report: Any) -> Any:
    """The report as a styled table: each cell coloured by its value (cosines blue to red through white,
    norms and conflicts by their share of the scale)."""
    import pandas as pd

    headers, rows = report_frame(report)
    frame = pd.DataFrame(rows, columns=headers)
    norm_columns = [h for h in headers if h.startswith("‖")]
    top = max((abs(v) for h in norm_columns for v in frame[h] if not math.isnan(v)), default=0.0) or 1.0

    def colour(column: pd.Series) -> list[str]:
        return [_cell_colour(str(column.name), value, top) for value in column]

    styled = frame.style.apply(colour, subset=headers[1:])
    return styled.format("{:.4f}", subset=[h for h in headers[1:] if not h.startswith("sign")], na_rep="—").format(
        "{:.1%}", subset=[h for h in headers if h.startswith("sign")], na_rep="—")  # NaN: a τ of zero


def _cell_colour(column: str, value: float, top_norm: float) -> str:
    if value is None or math.isnan(value):
        return ""
    if column.startswith("cos"):  # diverging: agreeing changes blue, opposed red; √ so that 0.1 shows
        rgb = "33, 102, 172" if value >= 0 else "178, 24, 43"
        return f"background-color: rgba({rgb}, {math.sqrt(min(1.0, abs(value))) * 0.8:.2f})"
    if column.startswith("sign"):  # 0% none, 50% as unrelated changes give
        return f"background-color: rgba(118, 42, 131, {min(1.0, value / 0.5) * 0.6:.2f})"
    return f"background-color: rgba(230, 120, 20, {min(1.0, value / top_norm) * 0.7:.2f})"


def report_notes(report: Any) -> str:
    """The legend (M1 = …), how to read the table, what was not compared and the warnings, in words."""
    lines = [f"Against the base `{report.base}`:"]
    lines += [f"- **M{i + 1}** = `{name}`" for i, name in enumerate(report.models)]
    lines += ["", HOW_TO_READ, ""]
    if report.skipped:
        lines.append(f"Not compared ({len(report.skipped)} tensors: not floating point, or missing or shaped "
                     f"differently in a model): {', '.join(f'`{s}`' for s in report.skipped[:5])}"
                     + (", …" if len(report.skipped) > 5 else ""))
    lines += [f"- ⚠️ {warning}" for warning in report.warnings] or ["No warnings for this method."]
    return "\n".join(lines)
