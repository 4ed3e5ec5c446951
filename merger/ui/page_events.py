"""Events that join panels: Merge (pre-flight -> job view), Share, examples, and reopening a page from a
`?config=` or `?job=` link."""

from __future__ import annotations

from typing import Any

import gradio as gr

from merger import constants, service
from merger.errors import JobAccessError, MergerError
from merger.config.examples import Example
from merger.links import QUERY_KEY
from merger.ui.api import api_submit
from merger.ui.common import app_url, one_line, token_of
from merger.ui.job_panel import JobView
from merger.ui.my_merges import refresh_listing
from merger.ui.preflight_panel import Preflight, SubmitGuard
from merger.ui.yaml_panel import EDIT_QUEUE, ConfigViews

_guard = SubmitGuard()


def wire_merge(views: ConfigViews, pre: Preflight, job: JobView, listing: gr.HTML) -> None:
    """Merge: disabled at once (in the browser), one submission per session, re-enabled when the id is back."""

    def on_merge(values: dict, request: gr.Request, oauth_token: gr.OAuthToken | None = None) -> dict:
        session = getattr(request, "session_hash", None) or ""
        if not _guard.enter(session):
            return {pre.share_link: gr.skip()}
        try:
            new_id = api_submit(
                values[views.config], values[pre.repo_id], values[pre.private], values[pre.reuse_repo],
                *pre.options.submit_args(values), oauth_token=oauth_token,
            )
        finally:
            _guard.leave(session)
        return {
            **job.opened(new_id, app_url(request)),
            pre.share_link: gr.Textbox(visible=False),
            listing: refresh_listing(request, oauth_token),
        }

    # The button is disabled in the browser at the click (the js), then through its own property (so the
    # later re-enabling is a real change the page applies), and enabled again once the submission is over.
    pre.merge_button.click(
        lambda: gr.Button(interactive=False),
        outputs=pre.merge_button,
        js="() => { const b = document.querySelector('#merge'); if (b) b.disabled = true; }",
        queue=False,
        api_visibility="private",
    ).then(
        on_merge,
        inputs={views.config, pre.repo_id, pre.private, pre.reuse_repo, *pre.options.inputs},
        outputs=[*job.outputs, pre.share_link, listing],
        concurrency_limit=constants.SUBMIT_CONCURRENCY,
        concurrency_id="submit",
        api_visibility="private",
    ).then(lambda: gr.Button(interactive=True), outputs=pre.merge_button, api_visibility="private", queue=False)

    def on_share(values: dict, request: gr.Request) -> Any:
        try:
            return gr.Textbox(value=service.share(app_url(request), values[views.config]), visible=True)
        except MergerError as err:
            raise gr.Error(one_line(err), print_exception=False) from None

    pre.share_button.click(on_share, inputs={views.config}, outputs=pre.share_link, api_visibility="private")


def wire_examples(views: ConfigViews, table: gr.Dataset, examples: list[Example]) -> None:
    """A click on an example makes its YAML the config (byte for byte)."""

    def on_example(values: dict) -> dict:
        return views.show(examples[values[table]].yaml_text, values[views.layout], readonly=False)

    table.click(on_example, inputs={table, views.layout}, outputs=views.outputs, api_visibility="private",
                **EDIT_QUEUE)


def wire_load(demo: gr.Blocks, views: ConfigViews, pre: Preflight, job: JobView, listing: gr.HTML) -> None:
    """Reopen a shared config (`?config=`) or a job (`?job=`: its config read-only, and for its owner the job view)."""

    def on_load(values: dict, request: gr.Request, oauth_token: gr.OAuthToken | None = None) -> dict:
        params = dict(getattr(request, "query_params", {}) or {})
        updates: dict[Any, Any] = {listing: refresh_listing(request, oauth_token)}
        if params.get(QUERY_KEY):
            try:
                updates.update(views.show(service.load_link(params[QUERY_KEY]), values[views.layout]))
            except MergerError as err:
                updates[views.kept] = f"**Not loaded:** {one_line(err)}"
        if params.get("job"):
            updates.update(_job_link(params["job"], values[views.layout], views, job, request, oauth_token))
        return updates

    demo.load(on_load, inputs={views.layout}, outputs=[*views.outputs, *job.outputs, listing],
              api_visibility="private")


def _job_link(raw_id: str, layout: dict, views: ConfigViews, job: JobView, request: gr.Request,
              oauth_token: gr.OAuthToken | None) -> dict:
    """The job's config read-only for anyone with the link; the job view for its owner only."""
    try:
        config = service.job_config(raw_id)
    except MergerError as err:
        return {views.kept: f"**Job link not opened:** {one_line(err)}"}
    updates = views.show(config, layout, readonly=True)
    try:
        service.job_status(raw_id, token_of(oauth_token))
    except JobAccessError as err:
        updates[views.kept] = f"**Job link:** {one_line(err)}."
        return updates
    except MergerError as err:
        updates[views.kept] = f"**Job link:** {one_line(err)}"
        return updates
    updates.update(job.opened(raw_id, app_url(request)))
    updates[job.state] = "**Status:** loading…"
    return updates
