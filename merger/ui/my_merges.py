""""My merges": the signed-in user's jobs, newest first, each with its config, status, time, result and job link."""

from __future__ import annotations

import time
from html import escape

import gradio as gr

from merger import service
from merger.ui.common import app_url, one_line, token_of


def build() -> tuple[gr.HTML, gr.Button]:
    """The list and its refresh button."""
    with gr.Accordion("My merges", open=True, elem_id="my-merges-box"):
        refresh = gr.Button("Refresh", size="sm", elem_id="refresh-merges")
        listing = gr.HTML(render([], "/"), elem_id="my-merges")
    return listing, refresh


def refresh_listing(request: gr.Request, oauth_token: gr.OAuthToken | None = None) -> str:
    """The list for the caller (empty when signed out)."""
    try:
        return render(service.my_jobs(token_of(oauth_token)), app_url(request))
    except Exception as err:  # noqa: BLE001 - the list must never break the page
        return f"<p>Could not list your merges: {escape(one_line(err))}</p>"


def render(jobs: list[dict], base_url: str) -> str:
    """An HTML table: when, repo, status (with progress), the config (folded), result link, job link."""
    if not jobs:
        return "<p>No merges yet (signed in, your jobs appear here, newest first).</p>"
    rows = []
    for job in jobs:
        when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(job["created_at"]))
        status = job["status"] + (f" {job['progress'] * 100:.0f}%" if job["status"] == "running" else "")
        result = f'<a href="{escape(job["result_url"])}">{escape(job["repo_id"])}</a>' if job["result_url"] else escape(
            job["repo_id"]
        )
        link = f'<a href="{escape(base_url)}?job={escape(job["id"])}">open</a>'
        rows.append(
            f'<tr data-job="{escape(job["id"])}"><td>{when}</td><td>{result}</td><td>{escape(status)}</td>'
            f"<td>{_config_cell(job.get('config_yaml') or '')}</td><td>{link}</td></tr>"
        )
    head = "<tr><th>submitted (UTC)</th><th>repo</th><th>status</th><th>config</th><th>job</th></tr>"
    return f'<table class="my-merges">{head}{"".join(rows)}</table>'


def _config_cell(yaml_text: str) -> str:
    """The job's config folded under its method's name (`moe` for a mixture of experts)."""
    from merger.ui.config_view import method_of, parse

    method = method_of(parse(yaml_text) or {}) or "config"
    return f"<details><summary>{escape(method[:40])}</summary><pre>{escape(yaml_text)}</pre></details>"
