"""The app's named API endpoints (stable names for gradio_client), thin wrappers over :mod:`merger.service`.

All take the Hugging Face token from the signed-in user (OAuth) or, off a Space, from `HF_TOKEN`:

- `/validate` (yaml_text: str) -> str: the report's one-line summary; invalid -> error with the message.
- `/submit` (yaml_text: str, repo_id: str, private: bool, reuse_repo: bool = False, evaluate: bool = True,
  review: bool = False, eval_dataset: str = "", eval_text: str = "") -> str: the job id.
  The push target is checked first (your namespace or an org where you have the write role; an
  existing repo only with `reuse_repo`, and never made private or public here); caps on unfinished
  jobs apply per user and in total. `evaluate`: score the merge and its parents before the push (on
  the shipped texts, the Hub dataset split `eval_dataset` = `ID:SPLIT`, or the pasted `eval_text`);
  `review`: stop at `awaiting_review` until `/publish` or `/discard`.
- `/preflight` (yaml_text: str, repo_id: str, private: bool, reuse_repo: bool = False) -> dict: the
  pre-flight checklist, `{"ok": bool, "lines": [{"name", "ok", "detail", "fix"}, ...]}` (what the page
  shows before Merge is enabled; metadata only).
- `/job_status` (job_id: str) -> dict: see :func:`merger.service.job_status` (error_type: the failing
  error's class name, e.g. `PushTargetError`). The job's owner only.
- `/job_config` (job_id: str) -> str: the job's config YAML, for anyone with the id (what a job link shares).
- `/cancel` (job_id: str) -> bool: whether the job was cancelled. The job's owner only.
- `/publish` (job_id: str) -> dict: push a job awaiting review (it is queued again); its new status. Owner only.
- `/discard` (job_id: str) -> dict: delete a job's merge awaiting review, push nothing; its new status. Owner only.
- `/my_jobs` () -> list[dict]: the signed-in user's jobs, newest first.
- `/share` (yaml_text: str) -> str: the share link (`...?config=<payload>`).
- `/load_link` (payload: str) -> str: the YAML a share payload carries.
- `/weight_report` (yaml_text: str) -> dict: the pre-merge weight report of the config's models: `base`,
  `models`, `headers` and `rows` (one per layer group, then `all`: relative norms, cosines, sign
  conflicts; the page's heatmap), `warnings`, `skipped`. Bounded: see :mod:`merger.service.insight`.
- `/suggest` (yaml_text: str, candidates: int, minutes: float, text: str = "") -> dicts as they come:
  `{"candidate": {number, bits, method, parameters}}` per scored candidate, then
  `{"best": {...}, "yaml": str, "summary": str, "tried": int}`. One search at a time on the app.

Errors reach gradio_client as `AppError` whose `title` is the error's class name (e.g. `ConfigError`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict
from typing import Iterator

import gradio as gr

from merger import constants, service
from merger.ui.common import app_url, require_token, token_of, user_errors
from merger.ui.insight_panel import report_frame


def api_validate(yaml_text: str, oauth_token: gr.OAuthToken | None = None) -> str:
    """Check a config against the models' metadata. Returns the one-line summary; raises the problem."""
    with user_errors():
        return service.validate(yaml_text, token_of(oauth_token)).summary()


def api_submit(
    yaml_text: str,
    repo_id: str,
    private: bool,
    reuse_repo: bool = False,
    evaluate: bool = True,
    review: bool = False,
    eval_dataset: str = "",
    eval_text: str = "",
    oauth_token: gr.OAuthToken | None = None,
) -> str:
    """Check the push target and the config, then queue a merge that pushes to `repo_id`. Returns the job id.

    A bare name goes under your account; an existing repo is used only with `reuse_repo`. With
    `evaluate` the merge is scored against its parents before the push (on the shipped texts, the Hub
    dataset split `eval_dataset`, or the pasted `eval_text`); with `review` it waits for /publish.
    """
    token = require_token(oauth_token)
    repo_id = (repo_id or "").strip()
    if not repo_id:
        raise gr.Error("name the repo to create, e.g. `my-merge` or `your-name/my-merge`", print_exception=False)
    with user_errors():
        options = service.job_options(bool(evaluate), bool(review), eval_dataset or "", eval_text or "", token)
        return service.submit(yaml_text, repo_id, token, bool(private), bool(reuse_repo), options)


def api_preflight(
    yaml_text: str,
    repo_id: str,
    private: bool,
    reuse_repo: bool = False,
    oauth_token: gr.OAuthToken | None = None,
) -> dict:
    """The pre-flight checklist for a config and a push target: every line, passing or failing, with its fix."""
    with user_errors():
        result = service.preflight(yaml_text or "", token_of(oauth_token), repo_id or "", bool(private),
                                   bool(reuse_repo))
    return {"ok": result.ok, "lines": [dataclasses.asdict(line) for line in result.lines]}


def api_job_status(job_id: str, oauth_token: gr.OAuthToken | None = None) -> dict:
    """Your job's state: id, status, progress (0-1), current_tensor, log_tail, result_url, error, worker, times."""
    with user_errors():
        return service.job_status(job_id, token_of(oauth_token))


def api_job_config(job_id: str) -> str:
    """The config of any job (what its link shares with everyone); never its status, log or result."""
    with user_errors():
        return service.job_config(job_id)


def api_cancel(job_id: str, oauth_token: gr.OAuthToken | None = None) -> bool:
    """Cancel your queued or running job. Returns whether it was cancelled (False: it had finished)."""
    with user_errors():
        return service.cancel(job_id, token_of(oauth_token))


def api_publish(job_id: str, oauth_token: gr.OAuthToken | None = None) -> dict:
    """Push your merge that awaits review (the job is queued again). Returns the job's status."""
    with user_errors():
        token = token_of(oauth_token)
        service.publish(job_id, token)
        return service.job_status(job_id, token)


def api_discard(job_id: str, oauth_token: gr.OAuthToken | None = None) -> dict:
    """Delete your merge that awaits review; nothing is pushed. Returns the job's status."""
    with user_errors():
        token = token_of(oauth_token)
        service.discard(job_id, token)
        return service.job_status(job_id, token)


def api_my_jobs(oauth_token: gr.OAuthToken | None = None) -> list[dict]:
    """Your jobs, newest first (empty when signed out)."""
    with user_errors():
        return service.my_jobs(token_of(oauth_token))


def api_share(yaml_text: str, request: gr.Request) -> str:
    """A link that reopens the app with this config, byte for byte (it carries the YAML only, never a token)."""
    with user_errors():
        return service.share(app_url(request), yaml_text or "")  # refused if /load_link would refuse the link


def api_load_link(payload: str) -> str:
    """The config YAML a share link's `config` payload carries."""
    with user_errors():
        return service.load_link(payload)


def api_weight_report(yaml_text: str, oauth_token: gr.OAuthToken | None = None) -> dict:
    """The weight report of the config's models (reads their weights, within the app's bounds)."""
    with user_errors():
        report = service.weight_report(yaml_text, token_of(oauth_token))
    headers, rows = report_frame(report)
    return {"base": report.base, "models": list(report.models), "headers": headers, "rows": rows,
            "warnings": list(report.warnings), "skipped": list(report.skipped)}


def api_suggest(yaml_text: str, candidates: int, minutes: float, text: str = "",
                oauth_token: gr.OAuthToken | None = None) -> Iterator[dict]:
    """Search a merge of the config's 2-3 fine-tunes of its base; yields each candidate, then the best's YAML."""
    with user_errors():
        for event in service.suggest(yaml_text, token_of(oauth_token), candidates, minutes, text or ""):
            if isinstance(event, service.SuggestedMerge):
                yield {"best": asdict(event.best), "yaml": event.yaml, "summary": event.summary, "tried": event.tried}
            else:
                yield {"candidate": asdict(event)}


def register() -> None:
    """Add the named endpoints to the Blocks being built (call inside `with gr.Blocks()`)."""
    # Validation and submission share bounded pools (the UI's events too), each call time-limited
    # (constants.VALIDATION_TIMEOUT_S); status, config, share and link reads never wait behind them.
    gr.api(api_validate, api_name="validate", concurrency_limit=constants.VALIDATE_CONCURRENCY,
           concurrency_id="validate")
    gr.api(api_preflight, api_name="preflight", concurrency_limit=constants.VALIDATE_CONCURRENCY,
           concurrency_id="validate")
    gr.api(api_submit, api_name="submit", concurrency_limit=constants.SUBMIT_CONCURRENCY, concurrency_id="submit")
    gr.api(api_job_status, api_name="job_status", concurrency_limit=None)
    gr.api(api_job_config, api_name="job_config", concurrency_limit=None)
    gr.api(api_cancel, api_name="cancel")
    gr.api(api_publish, api_name="publish")
    gr.api(api_discard, api_name="discard")
    gr.api(api_my_jobs, api_name="my_jobs", concurrency_limit=None)
    gr.api(api_share, api_name="share", concurrency_limit=8, concurrency_id="links")
    gr.api(api_load_link, api_name="load_link", concurrency_limit=8, concurrency_id="links")
    # They share the page's queues: the report reads weights (two at a time), a search holds models (one).
    gr.api(api_weight_report, api_name="weight_report", concurrency_limit=2, concurrency_id="weight-report")
    gr.api(api_suggest, api_name="suggest", concurrency_limit=1, concurrency_id="suggest")
