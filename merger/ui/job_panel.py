"""The job view: queue position, progress with the current tensor, elapsed and remaining time, live log,
result link and cancel; the merge's evaluation, and Publish / Discard while it awaits review
(:mod:`merger.ui.evaluation_view`); polled once a second while the job runs."""

from __future__ import annotations

from dataclasses import dataclass
from html import escape
from typing import Any, Callable

import gradio as gr

from merger import service
from merger.errors import MergerError
from merger.ui import evaluation_view
from merger.ui.common import one_line, token_of
from merger.ui.evaluation_view import EvaluationView
from merger.ui.my_merges import refresh_listing

# The job's states in which nothing changes until its owner acts: the view stops polling.
_SETTLED = (*service.TERMINAL_STATUSES, "awaiting_review")


@dataclass
class JobView:
    """The job view's widgets and its timer."""

    box: gr.Group
    job_id: gr.Textbox
    job_link: gr.Markdown
    progress: gr.HTML
    state: gr.Markdown
    log: gr.Code
    result: gr.Markdown
    cancel_button: gr.Button
    timer: gr.Timer
    evaluation: EvaluationView

    @property
    def outputs(self) -> list:
        """Everything :meth:`opened` and the poll update."""
        return [self.box, self.job_id, self.job_link, self.progress, self.state, self.log, self.result,
                self.cancel_button, self.timer, *self.evaluation.outputs]

    def opened(self, job_id: str, base_url: str) -> dict:
        """Updates that show job `job_id` (queued until the first poll says otherwise)."""
        link = f"{base_url}?job={job_id}"
        return {
            self.box: gr.Group(visible=True),
            self.job_id: job_id,
            self.job_link: f"Follow it at [{link}]({link}) (the page can be closed and reopened)",
            self.progress: progress_html({"progress": 0.0, "status": "queued"}),
            self.state: "**Status:** queued",
            self.log: "",
            self.result: "",
            self.cancel_button: gr.Button(interactive=True, visible=True),
            self.timer: gr.Timer(active=True),
            **self.evaluation.hidden(),
        }


def build() -> JobView:
    """The (hidden until a job exists) job view."""
    with gr.Group(visible=False, elem_id="job-view") as box:
        with gr.Row():
            job_id = gr.Textbox(label="Job id", interactive=False, scale=2, elem_id="job-id")
            job_link = gr.Markdown()
        progress = gr.HTML(progress_html({"progress": 0.0, "status": "queued"}), elem_id="job-progress")
        state = gr.Markdown(elem_id="job-state")
        log = gr.Code(label="Log", language=None, interactive=False, lines=8, max_lines=20, elem_id="job-log")
        result = gr.Markdown(elem_id="job-result")
        cancel_button = gr.Button("Cancel job", variant="stop", size="sm", elem_id="cancel")
        evaluation = evaluation_view.build()
    timer = gr.Timer(1.0, active=False)
    return JobView(box, job_id, job_link, progress, state, log, result, cancel_button, timer, evaluation)


def wire(view: JobView, listing: gr.HTML) -> None:
    """Polling and cancel; `listing` ("My merges") is refreshed when the job ends."""

    def on_tick(values: dict, request: gr.Request, oauth_token: gr.OAuthToken | None = None) -> dict:
        the_id = (values[view.job_id] or "").strip()
        if not the_id:
            return {view.timer: gr.Timer(active=False)}
        try:
            info = service.job_status(the_id, token_of(oauth_token))
        except MergerError as err:
            return {view.state: f"**Error:** {one_line(err)}", view.timer: gr.Timer(active=False)}
        except Exception:  # noqa: BLE001 - keep polling quietly through a transient failure
            return gr.skip()
        return job_updates(view, info, listing, lambda: refresh_listing(request, oauth_token))

    view.timer.tick(on_tick, inputs={view.job_id}, outputs=[*view.outputs, listing], show_progress="hidden",
                    concurrency_limit=None, api_visibility="private")

    def on_cancel(values: dict, oauth_token: gr.OAuthToken | None = None) -> dict:
        try:
            cancelled = service.cancel(values[view.job_id], token_of(oauth_token))
        except Exception as err:  # noqa: BLE001 - shown in the view, never a traceback
            return {view.state: f"**Error:** {one_line(err)}"}
        note = "Cancelling…" if cancelled else "The job had already finished."
        return {
            view.state: f"**Status:** {note}",
            view.cancel_button: gr.Button(interactive=False),
            view.timer: gr.Timer(active=True),  # keep polling until the worker reports `cancelled`
        }

    view.cancel_button.click(on_cancel, inputs={view.job_id}, outputs=view.outputs, api_visibility="private")
    _wire_review(view, listing)


def _wire_review(view: JobView, listing: gr.HTML) -> None:
    """Publish and Discard of a merge that awaits review; the view then shows the job's new state."""

    def decide(action):
        def on_click(values: dict, request: gr.Request, oauth_token: gr.OAuthToken | None = None) -> dict:
            token = token_of(oauth_token)
            try:
                action(values[view.job_id], token)
                info = service.job_status(values[view.job_id], token)
            except Exception as err:  # noqa: BLE001 - shown in the view, never a traceback
                return {view.state: f"**Error:** {one_line(err)}", view.evaluation.publish_button: gr.Button(
                    interactive=True), view.evaluation.discard_button: gr.Button(interactive=True)}
            return job_updates(view, info, listing, lambda: refresh_listing(request, oauth_token))

        return on_click

    for button, action in ((view.evaluation.publish_button, service.publish),
                           (view.evaluation.discard_button, service.discard)):
        button.click(lambda: (gr.Button(interactive=False), gr.Button(interactive=False)),
                     outputs=[view.evaluation.publish_button, view.evaluation.discard_button], queue=False,
                     api_visibility="private").then(
            decide(action), inputs={view.job_id}, outputs=[*view.outputs, listing], api_visibility="private")


def job_updates(view: JobView, info: dict[str, Any], listing: gr.HTML, refresh: Callable[[], str]) -> dict:
    """The job view for status `info`; "My merges" (`listing`) is refreshed with `refresh()` when the job settles."""
    settled = info["status"] in _SETTLED
    return {
        listing: refresh() if settled else gr.skip(),
        view.progress: progress_html(info),
        view.state: job_markdown(info),
        view.log: info["log_tail"],
        view.result: result_markdown(info),
        view.cancel_button: gr.Button(interactive=not settled, visible=not settled),
        view.timer: gr.Timer(active=not settled),
        **view.evaluation.shown(info),
    }


def progress_html(info: dict[str, Any]) -> str:
    """A progress bar with the percentage (colour by status)."""
    percent = max(0.0, min(1.0, float(info.get("progress") or 0.0))) * 100
    status = info.get("status", "queued")
    color = {"failed": "#d33", "cancelled": "#888", "discarded": "#888", "succeeded": "#2a2",
             "awaiting_review": "#36c"}.get(status, "#f90")
    return (
        '<div style="border:1px solid #ccc;border-radius:6px;height:22px;overflow:hidden">'
        f'<div style="width:{percent:.1f}%;height:100%;background:{color}"></div></div>'
        f'<div class="percent" style="text-align:right;font-size:0.9em">{percent:.0f}%</div>'
    )


def job_markdown(info: dict[str, Any]) -> str:
    """Status, queue position, current tensor, elapsed / remaining time, error and worker note."""
    lines = [f"**Status:** {info['status']}"]
    if info.get("queue_position"):
        lines.append(f"**Queue position:** {info['queue_position']}")
    if info.get("current_tensor") and info["status"] == "running":
        lines.append(f"**Now:** `{escape(str(info['current_tensor'])).replace('`', '')}`")
    if info.get("elapsed_s") is not None:
        remaining = info.get("remaining_s")
        extra = f", about {_clock(remaining)} left" if remaining is not None else ""
        lines.append(f"**Elapsed:** {_clock(info['elapsed_s'])}{extra}")
    if info.get("error"):
        lines.append(f"**Error:** {info['error']}")
    if info.get("status") == "awaiting_review":
        lines.append(evaluation_view.review_markdown(info))
    if info.get("worker"):
        lines.append(f"**Worker:** {info['worker']}")
    return "  \n".join(lines)


def result_markdown(info: dict[str, Any]) -> str:
    """The pushed repo's link once the job succeeded."""
    url = info.get("result_url")
    return f"**Result:** [{url}]({url})" if url else ""


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}" if seconds < 3600 else f"{seconds // 3600}h{seconds % 3600 // 60:02d}"
