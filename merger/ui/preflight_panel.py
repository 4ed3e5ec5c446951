"""The pre-flight checklist, the Merge button and the job's options: Merge is enabled only when every line passes.

The options (evaluate before the push, review before the push, the evaluation text) are not part of
the mergekit YAML: they travel with the submission (:func:`merger.service.job_options`).

The checklist is computed from metadata only (:func:`merger.service.preflight`) whenever the config
or the push target changes; Merge is disabled from its click until the job id is back, and a second
submission from the same browser session while one is in flight is dropped.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from html import escape

import gradio as gr

from merger import constants, service
from merger.ui.common import token_of
from merger.ui.yaml_panel import ConfigViews


@dataclass
class Preflight:
    """The push target widgets, the checklist and the buttons."""

    repo_id: gr.Textbox
    private: gr.Checkbox
    reuse_repo: gr.Checkbox
    checklist: gr.HTML
    merge_button: gr.Button
    share_button: gr.Button
    share_link: gr.Textbox
    options: JobOptionsForm


@dataclass
class JobOptionsForm:
    """The job's options beside Merge: evaluate, review, and the evaluation text."""

    evaluate: gr.Checkbox
    review: gr.Checkbox
    text_source: gr.Radio
    dataset: gr.Textbox
    pasted: gr.Textbox

    @property
    def inputs(self) -> set:
        """The widgets :meth:`submit_args` reads."""
        return {self.evaluate, self.review, self.text_source, self.dataset, self.pasted}

    def submit_args(self, values: dict) -> tuple[bool, bool, str, str]:
        """(evaluate, review, eval_dataset, eval_text) for `/submit`, from the widgets' values."""
        source = values[self.text_source]
        return (bool(values[self.evaluate]), bool(values[self.review]),
                values[self.dataset] if source == TEXT_SOURCES[1] else "",
                values[self.pasted] if source == TEXT_SOURCES[2] else "")


TEXT_SOURCES = ("the shipped set (prose, code, chat)", "a Hub dataset split", "pasted text")


def build() -> Preflight:
    """The target row, the checklist and the Merge / Share buttons."""
    with gr.Row():
        repo_id = gr.Textbox(label="New model repo", placeholder="my-merge  or  your-name/my-merge", scale=3,
                             elem_id="repo-id")
        private = gr.Checkbox(value=False, label="private", scale=0, min_width=90, elem_id="private")
        reuse_repo = gr.Checkbox(value=False, label="reuse existing repo", scale=0, min_width=160, elem_id="reuse-repo")
        merge_button = gr.Button("Merge", variant="primary", scale=1, interactive=False, elem_id="merge")
        share_button = gr.Button("Share config", scale=1, elem_id="share")
    options = _build_options()
    checklist = gr.HTML(render_checklist(None), elem_id="preflight")
    share_link = gr.Textbox(label="Share link (config only, never a token)", visible=False, buttons=["copy"],
                            elem_id="share-link")
    return Preflight(repo_id, private, reuse_repo, checklist, merge_button, share_button, share_link, options)


def _build_options() -> JobOptionsForm:
    """Evaluate / review before the push, and the evaluation text (the dataset or paste box shown when chosen)."""
    with gr.Row(elem_id="job-options"):
        evaluate = gr.Checkbox(value=True, label="evaluate before the push (bits/token, KL, answers vs the parents)",
                               scale=2, elem_id="evaluate")
        review = gr.Checkbox(value=False, label="let me review before the push", scale=1, elem_id="review")
        text_source = gr.Radio(list(TEXT_SOURCES), value=TEXT_SOURCES[0], label="Evaluation text", scale=3,
                               elem_id="eval-source")
    dataset = gr.Textbox(label="Hub dataset split", placeholder="org/name:test", visible=False, elem_id="eval-dataset")
    pasted = gr.Textbox(label=f"Evaluation text (at most {constants.MAX_PASTED_EVAL_BYTES // 1024} KiB)", lines=4,
                        max_length=constants.MAX_PASTED_EVAL_BYTES, visible=False, elem_id="eval-text")
    return JobOptionsForm(evaluate, review, text_source, dataset, pasted)


def _wire_options(options: JobOptionsForm) -> None:
    """The dataset or paste box shows when chosen; the text choice is greyed out while evaluation is off."""
    options.text_source.change(
        lambda source: (gr.Textbox(visible=source == TEXT_SOURCES[1]), gr.Textbox(visible=source == TEXT_SOURCES[2])),
        inputs=options.text_source, outputs=[options.dataset, options.pasted], queue=False, api_visibility="private")
    options.evaluate.change(lambda on: gr.Radio(interactive=on), inputs=options.evaluate, outputs=options.text_source,
                            queue=False, api_visibility="private")


def wire(panel: Preflight, views: ConfigViews) -> None:
    """Re-check whenever the config or the target changes; the options' boxes follow the choices."""
    _wire_options(panel.options)

    def on_check(values: dict, oauth_token: gr.OAuthToken | None = None) -> dict:
        text = values[views.config] or ""
        if not text.strip():
            return {panel.checklist: render_checklist(None), panel.merge_button: gr.Button(interactive=False)}
        result = service.preflight(
            text, token_of(oauth_token), values[panel.repo_id], values[panel.private], values[panel.reuse_repo],
            evaluate=bool(values[panel.options.evaluate]), review=bool(values[panel.options.review]),
        )
        return {panel.checklist: render_checklist(result), panel.merge_button: gr.Button(interactive=result.ok)}

    gr.on(
        [views.config.change, panel.repo_id.change, panel.private.change, panel.reuse_repo.change,
         panel.options.evaluate.change, panel.options.review.change],
        on_check,
        inputs={views.config, panel.repo_id, panel.private, panel.reuse_repo, panel.options.evaluate,
                panel.options.review},
        outputs=[panel.checklist, panel.merge_button],
        trigger_mode="always_last",
        show_progress="minimal",
        show_progress_on=panel.checklist,
        concurrency_limit=constants.VALIDATE_CONCURRENCY,
        concurrency_id="validate",
        api_visibility="private",
    )


def render_checklist(result: service.Preflight | None) -> str:
    """The checklist as HTML: one line per check, ✓ or ✗, what was found and, when failing, the fix."""
    if result is None:
        return '<div class="preflight">Pick models or paste a config to begin.</div>'
    items = []
    for line in result.lines:
        mark = "✓" if line.ok else "✗"
        fix = f'<br><span class="fix">How to fix: {escape(line.fix)}</span>' if not line.ok and line.fix else ""
        items.append(
            f'<li class="{"ok" if line.ok else "fail"}" data-check="{escape(line.name)}">'
            f"<b>{mark} {escape(line.name)}</b>: {escape(line.detail)}{fix}</li>"
        )
    head = "Ready to merge" if result.ok else "Not ready: fix the lines marked ✗"
    return f'<div class="preflight" data-ok="{str(result.ok).lower()}"><b>{head}</b><ul>{"".join(items)}</ul></div>'


class SubmitGuard:
    """One submission at a time per browser session (a double click queues one job, not two)."""

    def __init__(self) -> None:
        self._busy: set[str] = set()
        self._lock = threading.Lock()

    def enter(self, session: str) -> bool:
        """True when this session had no submission in flight (it has one now)."""
        with self._lock:
            if session in self._busy:
                return False
            self._busy.add(session)
            return True

    def leave(self, session: str) -> None:
        """The session's submission is done (queued or refused)."""
        with self._lock:
            self._busy.discard(session)
