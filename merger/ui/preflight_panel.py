"""The pre-flight checklist and the Merge button: Merge is enabled only when every line passes.

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


def build() -> Preflight:
    """The target row, the checklist and the Merge / Share buttons."""
    with gr.Row():
        repo_id = gr.Textbox(label="New model repo", placeholder="my-merge  or  your-name/my-merge", scale=3,
                             elem_id="repo-id")
        private = gr.Checkbox(value=False, label="private", scale=0, min_width=90, elem_id="private")
        reuse_repo = gr.Checkbox(value=False, label="reuse existing repo", scale=0, min_width=160, elem_id="reuse-repo")
        merge_button = gr.Button("Merge", variant="primary", scale=1, interactive=False, elem_id="merge")
        share_button = gr.Button("Share config", scale=1, elem_id="share")
    checklist = gr.HTML(render_checklist(None), elem_id="preflight")
    share_link = gr.Textbox(label="Share link (config only, never a token)", visible=False, buttons=["copy"],
                            elem_id="share-link")
    return Preflight(repo_id, private, reuse_repo, checklist, merge_button, share_button, share_link)


def wire(panel: Preflight, views: ConfigViews) -> None:
    """Re-check whenever the config or the target changes."""

    def on_check(values: dict, oauth_token: gr.OAuthToken | None = None) -> dict:
        text = values[views.config] or ""
        if not text.strip():
            return {panel.checklist: render_checklist(None), panel.merge_button: gr.Button(interactive=False)}
        result = service.preflight(
            text, token_of(oauth_token), values[panel.repo_id], values[panel.private], values[panel.reuse_repo]
        )
        return {panel.checklist: render_checklist(result), panel.merge_button: gr.Button(interactive=result.ok)}

    gr.on(
        [views.config.change, panel.repo_id.change, panel.private.change, panel.reuse_repo.change],
        on_check,
        inputs={views.config, panel.repo_id, panel.private, panel.reuse_repo},
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
