"""merger's Gradio app (a Hugging Face Space): a form that writes mergekit YAML, validation, jobs, share links.

Layout and event wiring only; the logic lives in `merger.*` (`form`, `links`, `validate`, `jobs`, `hub`).
Importing this module starts nothing: `build_demo()` builds the Blocks, and running the file starts
the merge worker and serves the app.

API endpoints (stable names for gradio_client and the end-to-end tests), all taking the Hugging Face
token from the signed-in user (OAuth) or, when not running on a Space, from `HF_TOKEN`:

- `/validate` (yaml_text: str) -> str: the report's one-line summary; invalid -> error with the message.
- `/submit` (yaml_text: str, repo_id: str, private: bool, reuse_repo: bool = False) -> str: the job id.
  The push target is checked first (your namespace or an org where you have the write role; an
  existing repo only with `reuse_repo`, and never made private or public here); caps on unfinished
  jobs apply per user and in total.
- `/job_status` (job_id: str) -> dict: id, status, progress, current_tensor, log_tail, result_url,
  error, error_type (the failing error's class name, e.g. `PushTargetError`), worker (a note when no
  worker is alive, else None). The job's owner only.

Errors reach gradio_client as `AppError` whose `title` is the error's class name (e.g. `ConfigError`).
- `/job_config` (job_id: str) -> str: the job's config YAML, for anyone with the id (what a job link shares).
- `/cancel` (job_id: str) -> bool: whether the job was cancelled. The job's owner only.
- `/share` (yaml_text: str) -> str: the share link (`...?config=<payload>`).
- `/load_link` (payload: str) -> str: the YAML a share payload carries.
"""

import contextlib
import hashlib
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import gradio as gr

from merger import constants
from merger.errors import ConfigError, MergerError
from merger.scrub import scrub
from merger.form import (
    DTYPE_CHOICES,
    FORM_METHODS,
    GATE_MODES,
    GRADIENT_POINTS,
    MAX_MODELS,
    METHOD_LABELS,
    T_CLASSIC,
    T_CONSTANT,
    T_GRADIENT,
    T_MODES,
    FormValues,
    build_yaml,
    load_examples,
    local_paths,
    parse_yaml,
)
from merger.links import QUERY_KEY, decode_config, share_url

logger = logging.getLogger(__name__)

EXAMPLES_DIR = Path(__file__).resolve().parent / "templates" / "examples"
TERMINAL_STATUSES = ("succeeded", "failed", "cancelled")
SIGN_IN_FIRST = "sign in with Hugging Face first"

INTRO = """# merger
Merge language models on the Hub: pick models and a method, check the config, and the merged model is
pushed to your account. The config is [mergekit](https://github.com/arcee-ai/mergekit)'s YAML, so configs
from model cards paste straight in, and the result's card carries it."""


# ================================================================ small helpers (no layout)
def _token(oauth_token: gr.OAuthToken | None) -> str | None:
    """The caller's Hub token: the OAuth token when signed in; off a Space, else `HF_TOKEN`.

    On a Space the Space's own token must never act for a visitor, so there is no fallback.
    """
    if oauth_token is not None and getattr(oauth_token, "token", None):
        return oauth_token.token
    if constants.ON_SPACE:
        return None
    token = os.environ.get("HF_TOKEN")
    if token:
        return token
    try:
        from huggingface_hub import get_token

        return get_token()
    except Exception:  # noqa: BLE001 - no token is a normal state here
        return None


def _require_token(oauth_token: gr.OAuthToken | None) -> str:
    token = _token(oauth_token)
    if not token:
        hint = "" if constants.ON_SPACE else " (running locally: set the HF_TOKEN environment variable)"
        raise gr.Error(f"{SIGN_IN_FIRST}{hint}", print_exception=False)
    return token


def _scrub(text: str) -> str:
    return scrub(text)


_OWNER_TTL_S = 300.0
_OWNER_CACHE_SIZE = 1024
_owners: dict[str, tuple[str, float]] = {}  # sha256 of a token -> (its Hub username, when it expires)
_owners_lock = threading.Lock()


def _owner(token: str | None) -> str | None:
    """The Hub username a token belongs to (whoami, remembered a few minutes per token); None without one."""
    if not token:
        return None
    key = hashlib.sha256(token.encode()).hexdigest()  # the cache never holds the token itself
    now = time.monotonic()
    with _owners_lock:
        cached = _owners.get(key)
    if cached and cached[1] > now:
        return cached[0]
    from merger.publish.hub import whoami

    name = whoami(token)
    with _owners_lock:
        if len(_owners) >= _OWNER_CACHE_SIZE:
            _owners.clear()
        _owners[key] = (name, now + _OWNER_TTL_S)
    return name


def _worker_note() -> str | None:
    """"No worker alive since ..." when the worker's heartbeat is missing or stale, else None."""
    from merger.jobs import store as jobs

    beat = jobs.last_heartbeat()
    if beat is not None and time.time() - beat <= constants.WORKER_STALE_S:
        return None
    since = "it started" if beat is None else time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(beat))
    return f"No worker alive since {since}: queued jobs wait until a worker is running again."


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    """Turn merger's errors into a gr.Error with their message; anything else into a short error, never a traceback.

    The error's class name is the gr.Error's title (gradio_client's `AppError.title`, the UI's pop-up
    heading), a stable label for scripts and tests; the message stays the user's sentence.
    """
    try:
        yield
    except gr.Error:
        raise
    except MergerError as err:
        raise gr.Error(_scrub(str(err)), title=type(err).__name__, print_exception=False) from None
    except Exception as err:  # noqa: BLE001 - a bug must still reach the user as one line
        logger.exception("unexpected error in a handler")
        raise gr.Error(
            _scrub(f"unexpected error ({type(err).__name__}); the details are in the app's log"),
            title="UnexpectedError",
            print_exception=False,
        ) from None


def _check_local_paths(yaml_text: str) -> None:
    """On a Space, models must come from the Hub: a local path would read the Space's own disk."""
    if constants.ON_SPACE:
        paths = local_paths(yaml_text)
        if paths:
            raise ConfigError(
                f"local paths are not available here ({', '.join(f'`{p}`' for p in paths)}); "
                "use Hub model ids like `org/name`"
            )


def _validate(yaml_text: str, token: str | None) -> Any:
    from merger.validate import validate_config  # imported lazily: the engine loads torch

    _check_local_paths(yaml_text)
    return validate_config(yaml_text, token)


def _app_url(request: gr.Request | None) -> str:
    """The app's public address (for share and job links), ending in `/`."""
    host = os.environ.get("SPACE_HOST")
    if host:
        return f"https://{host.split(',')[0].strip()}/"
    raw = getattr(request, "request", None) if request is not None else None
    if raw is not None:
        try:
            from gradio.route_utils import get_root_url

            return get_root_url(raw, route_path=raw.url.path, root_path=raw.scope.get("root_path") or None) + "/"
        except Exception:  # noqa: BLE001 - fall back to a relative link
            logger.debug("could not work out the app's URL", exc_info=True)
    return "/"


def _job_dict(job: Any) -> dict[str, Any]:
    status = getattr(job.status, "value", job.status)
    return {
        "id": job.id,
        "status": str(status),
        "progress": float(job.progress or 0.0),
        "current_tensor": job.current_tensor,
        "log_tail": _scrub(job.log_tail or ""),
        "result_url": job.result_url,
        "error": _scrub(job.error) if job.error else None,
        "error_type": job.error_type,
        "worker": None if str(status) in TERMINAL_STATUSES else _worker_note(),
    }


def _get_job(job_id: str, token: str | None) -> dict[str, Any]:
    """The caller's own job as a dict; raises JobAccessError for a bad id or another user's job."""
    from merger.jobs import store as jobs

    jobs.check_job_id(job_id)  # before any Hub call: a malformed id costs nothing
    return _job_dict(jobs.owned_job(job_id, _owner(token)))


def _progress_html(fraction: float, status: str) -> str:
    percent = max(0.0, min(1.0, fraction)) * 100
    color = {"failed": "#d33", "cancelled": "#888", "succeeded": "#2a2"}.get(status, "#f90")
    return (
        '<div style="border:1px solid #ccc;border-radius:6px;height:22px;overflow:hidden">'
        f'<div style="width:{percent:.1f}%;height:100%;background:{color}"></div></div>'
        f"<div style=\"text-align:right;font-size:0.9em\">{percent:.0f}%</div>"
    )


def _job_markdown(info: dict[str, Any]) -> str:
    lines = [f"**Status:** {info['status']}"]
    if info.get("current_tensor") and info["status"] == "running":
        lines.append(f"**Now:** `{str(info['current_tensor']).replace('`', '')}`")
    if info.get("error"):
        lines.append(f"**Error:** {info['error']}")
    if info.get("worker"):
        lines.append(f"**Worker:** {info['worker']}")
    return "  \n".join(lines)


def _result_markdown(info: dict[str, Any]) -> str:
    url = info.get("result_url")
    return f"**Result:** [{url}]({url})" if url else ""


# ================================================================ API functions (thin)
def api_validate(yaml_text: str, oauth_token: gr.OAuthToken | None = None) -> str:
    """Check a config against the models' metadata. Returns the one-line summary; raises the problem."""
    with _user_errors():
        return _validate(yaml_text, _token(oauth_token)).summary()


def api_submit(
    yaml_text: str,
    repo_id: str,
    private: bool,
    reuse_repo: bool = False,
    oauth_token: gr.OAuthToken | None = None,
) -> str:
    """Check the push target and the config, then queue a merge that pushes to `repo_id`. Returns the job id.

    A bare name goes under your account; an existing repo is used only with `reuse_repo`.
    """
    token = _require_token(oauth_token)
    repo_id = (repo_id or "").strip()
    if not repo_id:
        raise gr.Error("name the repo to create, e.g. `my-merge` or `your-name/my-merge`", print_exception=False)
    with _user_errors():
        from merger.jobs import store as jobs
        from merger.jobs import queue
        from merger.publish.hub import check_push_target

        owner = _owner(token)
        jobs.check_caps(owner)  # the cheap refusal first; submit checks again with the insert
        # The target is checked before the config: a repo the user may not write to fails now, not after the merge.
        target = check_push_target(repo_id, token, private=bool(private), reuse_repo=bool(reuse_repo))
        _validate(yaml_text, token)
        return str(queue.submit(yaml_text, target.repo_id, token, owner, bool(private), bool(reuse_repo)))


def api_job_status(job_id: str, oauth_token: gr.OAuthToken | None = None) -> dict:
    """Your job's state: id, status, progress (0-1), current_tensor, log_tail, result_url, error, error_type, worker."""
    with _user_errors():
        return _get_job(job_id, _token(oauth_token))


def api_job_config(job_id: str) -> str:
    """The config of any job (what its link shares with everyone); never its status, log or result."""
    with _user_errors():
        from merger.jobs import store as jobs

        return jobs.shared_config(job_id)


def api_cancel(job_id: str, oauth_token: gr.OAuthToken | None = None) -> bool:
    """Cancel your queued or running job. Returns whether it was cancelled (False: it had finished)."""
    with _user_errors():
        from merger.jobs import store as jobs

        jobs.check_job_id(job_id)
        return bool(jobs.cancel(job_id, _owner(_token(oauth_token))))


def api_share(yaml_text: str, request: gr.Request) -> str:
    """A link that reopens the app with this config filled in (it carries the YAML only, never a token)."""
    with _user_errors():
        return share_url(_app_url(request), yaml_text or "")  # refused if /load_link would refuse the link


def api_load_link(payload: str) -> str:
    """The config YAML a share link's `config` payload carries."""
    with _user_errors():
        return decode_config(payload)


# ================================================================ the app
def build_demo(login: bool | None = None, examples_dir: str | os.PathLike[str] = EXAMPLES_DIR) -> gr.Blocks:
    """Build the app (nothing starts until `.launch()`).

    Args:
        login: show "Sign in with Hugging Face" (OAuth). Defaults to being on a Space; locally the
            token comes from `HF_TOKEN` instead (Gradio's local OAuth mock would need a Hub login).
        examples_dir: the folder of example configs (`*.yaml`).
    """
    login = constants.ON_SPACE if login is None else login
    examples = load_examples(examples_dir)
    if constants.ON_SPACE:  # fixture twins name local folders, which a Space refuses
        examples = [e for e in examples if not local_paths(e.yaml_text)]

    with gr.Blocks(title="merger") as demo:
        gr.Markdown(INTRO)
        with gr.Row():
            if login:
                gr.LoginButton(scale=0, min_width=260)
            gr.Markdown(
                "" if login else "Running locally: merges are pushed with the token in `HF_TOKEN`."
            )

        if examples:
            example_table = gr.Dataset(
                label="Examples (click one to fill the form)",
                components=["textbox", "textbox"],
                headers=["example", "what it does"],
                samples=[[e.name, e.title] for e in examples],
                type="index",
                layout="table",
                samples_per_page=20,
            )

        with gr.Row(equal_height=False):
            # ---------------------------------------------------------------- the form
            with gr.Column(scale=3, elem_id="form") as form_column:
                method = gr.Radio(
                    [(METHOD_LABELS[m], m) for m in FORM_METHODS], value="slerp", label="Merge method", elem_id="method"
                )
                gr.Markdown(
                    "Type to search the Hub" + ("" if constants.ON_SPACE else " (or type a local folder)"),
                    elem_id="picker-hint",
                )
                picker_rows, pickers, weights = [], [], []
                for i in range(MAX_MODELS):
                    with gr.Row(visible=i < 2) as row:
                        pickers.append(
                            gr.Dropdown(
                                choices=[],
                                value=None,
                                allow_custom_value=True,
                                filterable=True,
                                label=_picker_label("slerp", i),
                                scale=4,
                            )
                        )
                        weights.append(gr.Number(value=1.0, label="weight", visible=False, scale=1, min_width=90))
                    picker_rows.append(row)

                with gr.Group(visible=True) as slerp_group:
                    t_mode = gr.Radio(list(T_MODES), value=T_CONSTANT, label="t (0 = base model, 1 = second model)")
                    t_value = gr.Slider(0, 1, value=0.5, step=0.01, label="t for every layer")
                    with gr.Row(visible=False) as gradient_row:
                        gradient = [
                            gr.Number(value=v, minimum=0, maximum=1, step=0.05, label=_gradient_label(i), min_width=70)
                            for i, v in enumerate((0.0, 0.25, 0.5, 0.75, 1.0))
                        ]
                    classic_note = gr.Markdown(
                        "Attention layers go 0 → 0.5 → 0.3 → 0.7 → 1 across the depth, MLPs the reverse, "
                        "everything else 0.5.",
                        visible=False,
                    )
                    classic_button = gr.Button("Use the classic attention/MLP schedule", size="sm")
                    with gr.Row():
                        range_start = gr.Number(value=None, precision=0, minimum=0, label="first layer (optional)")
                        range_end = gr.Number(
                            value=None, precision=0, minimum=0, label="end layer, exclusive (blank or 0: whole models)"
                        )

                with gr.Group(visible=False) as linear_group:
                    normalize = gr.Checkbox(value=True, label="normalize (divide by the sum of the weights)")

                with gr.Group(visible=False) as passthrough_group:
                    slices = gr.Dataframe(
                        value=[["", None, None]],
                        headers=["model", "start", "end"],
                        datatype=["str", "number", "number"],
                        type="array",
                        column_count=3,
                        interactive=True,
                        label="Slices, stacked in order: layers [start, end) of each model (end is exclusive)",
                    )

                with gr.Group(visible=False) as moe_group:
                    moe_base = gr.Dropdown(
                        choices=[],
                        value=None,
                        allow_custom_value=True,
                        filterable=True,
                        label="Base model (attention, norms, embeddings)",
                    )
                    gate_mode = gr.Radio(list(GATE_MODES), value="random", label="Router (gate) initialisation")
                    experts_per_token = gr.Number(value=2, precision=0, minimum=1, label="experts per token")

                dtype = gr.Dropdown(list(DTYPE_CHOICES), value="bfloat16", label="dtype")

            # ---------------------------------------------------------------- the YAML and checks
            with gr.Column(scale=2):
                yaml_code = gr.Code(
                    value=build_yaml(FormValues()),
                    language="yaml",
                    interactive=False,
                    lines=18,
                    label="Config: exactly what will be merged",
                    elem_id="config-yaml",
                )
                edit_mode = gr.Checkbox(
                    value=False, label="Edit YAML by hand (paste any mergekit config)", elem_id="edit-yaml"
                )
                status = gr.Markdown("Pick models to begin.", elem_id="validation-status")

        with gr.Row():
            repo_id = gr.Textbox(label="New model repo", placeholder="my-merge  or  your-name/my-merge", scale=3)
            private = gr.Checkbox(value=False, label="private", scale=0, min_width=90)
            merge_button = gr.Button("Merge", variant="primary", scale=1)
            share_button = gr.Button("Share config", scale=1)
        share_link = gr.Textbox(
            label="Share link (config only, never a token)", visible=False, buttons=["copy"], elem_id="share-link"
        )

        # ---------------------------------------------------------------- the job view
        with gr.Group(visible=False, elem_id="job-view") as job_box:
            with gr.Row():
                job_id = gr.Textbox(label="Job id", interactive=False, scale=2, elem_id="job-id")
                job_link = gr.Markdown()
            progress = gr.HTML(_progress_html(0.0, "queued"))
            job_state = gr.Markdown()
            job_log = gr.Code(label="Log", language=None, interactive=False, lines=8, max_lines=20)
            result = gr.Markdown()
            cancel_button = gr.Button("Cancel job", variant="stop", size="sm")
        timer = gr.Timer(1.0, active=False)

        # ---------------------------------------------------------------- component groups
        form_inputs = [
            method,
            *pickers,
            *weights,
            normalize,
            moe_base,
            t_mode,
            t_value,
            *gradient,
            range_start,
            range_end,
            slices,
            gate_mode,
            experts_per_token,
            dtype,
        ]
        fill_outputs = [*form_inputs, yaml_code, edit_mode, form_column, status]
        job_outputs = [job_box, job_id, job_link, progress, job_state, job_log, result, cancel_button, timer]

        def values_of(args: tuple) -> FormValues:
            n = MAX_MODELS
            it = iter(args)
            return FormValues.from_widgets(
                method=next(it),
                models=[next(it) for _ in range(n)],
                weights=[next(it) for _ in range(n)],
                normalize=next(it),
                base_model=next(it),
                t_mode=next(it),
                t=next(it),
                t_gradient=[next(it) for _ in range(GRADIENT_POINTS)],
                range_start=next(it),
                range_end=next(it),
                slice_rows=next(it),
                gate_mode=next(it),
                experts_per_token=next(it),
                dtype=next(it),
            )

        def widget_updates(values: FormValues) -> dict:
            w = values.to_widgets(MAX_MODELS)
            updates = {method: w["method"], normalize: w["normalize"], moe_base: w["base_model"] or None}
            updates.update({t_mode: w["t_mode"], t_value: w["t"]})
            updates.update({range_start: w["range_start"], range_end: w["range_end"]})
            updates.update({gate_mode: w["gate_mode"], experts_per_token: w["experts_per_token"], dtype: w["dtype"]})
            updates[slices] = w["slice_rows"] or [["", None, None]]
            for box, value in zip(pickers, w["models"]):
                updates[box] = value or None
            for box, value in zip(weights, w["weights"]):
                updates[box] = value if value is not None else 1.0
            for box, value in zip(gradient, w["t_gradient"]):
                updates[box] = value
            return updates

        def fill_from_yaml(text: str, origin: str) -> dict:
            """Updates that show `text` in the form (exact) or in the raw editor (best effort)."""
            parsed = parse_yaml(text)
            updates = widget_updates(parsed.values)
            if parsed.exact:
                updates.update(
                    {
                        yaml_code: gr.Code(value=build_yaml(parsed.values), interactive=False),
                        edit_mode: False,
                        form_column: gr.Column(visible=True),
                        status: f"Loaded {origin}; checking…",
                    }
                )
            else:
                updates.update(
                    {
                        yaml_code: gr.Code(value=text, interactive=True),
                        edit_mode: True,
                        form_column: gr.Column(visible=False),
                        status: f"Loaded {origin} into the YAML editor: {parsed.note}.",
                    }
                )
            return updates

        # ---------------------------------------------------------------- form -> YAML
        def on_form_change(*args):
            *form_args, editing = args
            if editing:
                return gr.skip()
            return build_yaml(values_of(tuple(form_args)))

        gr.on(
            [c.change for c in form_inputs],
            on_form_change,
            inputs=[*form_inputs, edit_mode],
            outputs=yaml_code,
            trigger_mode="always_last",
            show_progress="hidden",
            api_visibility="private",
        )

        # ---------------------------------------------------------------- which widgets show
        def on_layout(method_value, t_mode_value, *models):
            filled = [i for i, m in enumerate(models) if m]
            shown = 2 if method_value == "slerp" else min(MAX_MODELS, max(2, (filled[-1] + 2) if filled else 2))
            updates: dict = {}
            for i, (row, box, weight) in enumerate(zip(picker_rows, pickers, weights)):
                updates[row] = gr.Row(visible=method_value != "passthrough" and i < shown)
                updates[box] = gr.Dropdown(label=_picker_label(method_value, i))
                updates[weight] = gr.Number(visible=method_value == "linear")
            updates[slerp_group] = gr.Group(visible=method_value == "slerp")
            updates[linear_group] = gr.Group(visible=method_value == "linear")
            updates[passthrough_group] = gr.Group(visible=method_value == "passthrough")
            updates[moe_group] = gr.Group(visible=method_value == "moe")
            updates[t_value] = gr.Slider(visible=t_mode_value == T_CONSTANT)
            updates[gradient_row] = gr.Row(visible=t_mode_value == T_GRADIENT)
            updates[classic_note] = gr.Markdown(visible=t_mode_value == T_CLASSIC)
            return updates

        gr.on(
            [method.change, t_mode.change, *(p.change for p in pickers)],
            on_layout,
            inputs=[method, t_mode, *pickers],
            outputs=[
                *picker_rows,
                *pickers,
                *weights,
                slerp_group,
                linear_group,
                passthrough_group,
                moe_group,
                t_value,
                gradient_row,
                classic_note,
            ],
            trigger_mode="always_last",
            show_progress="hidden",
            queue=False,
            api_visibility="private",
        )
        classic_button.click(lambda: T_CLASSIC, outputs=t_mode, queue=False, api_visibility="private")

        # ---------------------------------------------------------------- Hub search as you type
        def on_search(data: gr.KeyUpData, oauth_token: gr.OAuthToken | None = None):
            query = (data.input_value or "").strip()
            if len(query) < 2 or query.startswith(("/", ".", "~")):
                return gr.skip()
            from merger.publish.hub import search_models

            try:
                found = search_models(query, token=_token(oauth_token), limit=20)
            except Exception:  # noqa: BLE001 - suggestions must never break the form
                logger.warning("model search failed", exc_info=True)
                return gr.skip()
            return gr.Dropdown(choices=list(dict.fromkeys(found)))

        for box in [*pickers, moe_base]:
            box.key_up(
                on_search,
                outputs=box,
                trigger_mode="always_last",
                show_progress="hidden",
                concurrency_limit=8,
                concurrency_id="search",
                api_visibility="private",
            )

        # ---------------------------------------------------------------- validation
        def on_yaml_change(yaml_text: str, oauth_token: gr.OAuthToken | None = None) -> str:
            if not (yaml_text or "").strip():
                return "Pick models or paste a config to begin."
            try:
                report = _validate(yaml_text, _token(oauth_token))
            except MergerError as err:
                return f"**Not ready:** {_scrub(str(err))}"
            except Exception as err:  # noqa: BLE001 - a bug shows as one line, never a traceback
                logger.exception("validation crashed")
                return f"**Could not check the config** ({type(err).__name__}); see the app's log."
            return f"**Ready:** {report.summary()}"

        yaml_code.change(
            on_yaml_change,
            inputs=yaml_code,
            outputs=status,
            trigger_mode="always_last",
            show_progress="minimal",
            show_progress_on=status,
            concurrency_limit=constants.VALIDATE_CONCURRENCY,
            concurrency_id="validate",
            api_visibility="private",
        )

        # ---------------------------------------------------------------- YAML editing
        def on_edit_toggle(editing: bool, yaml_text: str) -> dict:
            if editing:
                return {yaml_code: gr.Code(interactive=True), form_column: gr.Column(visible=False)}
            parsed = parse_yaml(yaml_text or "")
            if not parsed.exact:
                return {
                    edit_mode: True,
                    status: f"The form cannot show this config ({parsed.note}); keep editing the YAML.",
                }
            updates = widget_updates(parsed.values)
            updates.update(
                {
                    yaml_code: gr.Code(value=build_yaml(parsed.values), interactive=False),
                    form_column: gr.Column(visible=True),
                }
            )
            return updates

        edit_mode.input(
            on_edit_toggle, inputs=[edit_mode, yaml_code], outputs=fill_outputs, api_visibility="private"
        )

        # ---------------------------------------------------------------- examples
        if examples:

            def on_example(index: int) -> dict:
                example = examples[index]
                return fill_from_yaml(example.yaml_text, f"the example `{example.name}`")

            example_table.click(on_example, inputs=example_table, outputs=fill_outputs, api_visibility="private")

        # ---------------------------------------------------------------- merge and the job view
        def on_merge(yaml_text, repo, is_private, request: gr.Request, oauth_token: gr.OAuthToken | None = None):
            # No "reuse existing repo" box in the layout yet: the form only creates new repos.
            new_id = api_submit(yaml_text, repo, is_private, False, oauth_token)
            return {
                **_job_view(new_id, _app_url(request)),
                share_link: gr.Textbox(visible=False),
            }

        def _job_view(the_id: str, base_url: str) -> dict:
            link = f"{base_url}?job={the_id}"
            return {
                job_box: gr.Group(visible=True),
                job_id: the_id,
                job_link: f"Follow it at [{link}]({link}) (the page can be closed and reopened)",
                progress: _progress_html(0.0, "queued"),
                job_state: "**Status:** queued",
                job_log: "",
                result: "",
                cancel_button: gr.Button(interactive=True, visible=True),
                timer: gr.Timer(active=True),
            }

        merge_button.click(
            on_merge,
            inputs=[yaml_code, repo_id, private],
            outputs=[*job_outputs, share_link],
            concurrency_limit=constants.SUBMIT_CONCURRENCY,
            concurrency_id="submit",
            api_visibility="private",
        )

        def on_tick(the_id: str, oauth_token: gr.OAuthToken | None = None) -> dict:
            if not (the_id or "").strip():
                return {timer: gr.Timer(active=False)}
            try:
                info = _get_job(the_id, _token(oauth_token))
            except MergerError as err:
                return {job_state: f"**Error:** {err}", timer: gr.Timer(active=False)}
            except Exception:  # noqa: BLE001 - keep polling quietly through a transient failure
                logger.warning("could not read the job", exc_info=True)
                return gr.skip()
            done = info["status"] in TERMINAL_STATUSES
            return {
                progress: _progress_html(info["progress"], info["status"]),
                job_state: _job_markdown(info),
                job_log: info["log_tail"],
                result: _result_markdown(info),
                cancel_button: gr.Button(interactive=not done, visible=not done),
                timer: gr.Timer(active=not done),
            }

        timer.tick(
            on_tick,
            inputs=job_id,
            outputs=job_outputs,
            show_progress="hidden",
            concurrency_limit=None,
            api_visibility="private",
        )

        def on_cancel(the_id: str, oauth_token: gr.OAuthToken | None = None) -> dict:
            cancelled = api_cancel(the_id, oauth_token)
            note = "Cancelling…" if cancelled else "The job had already finished."
            return {
                job_state: f"**Status:** {note}",
                cancel_button: gr.Button(interactive=False),
                timer: gr.Timer(active=True),  # keep polling until the worker reports `cancelled`
            }

        cancel_button.click(on_cancel, inputs=job_id, outputs=job_outputs, api_visibility="private")

        # ---------------------------------------------------------------- share
        def on_share(yaml_text: str, request: gr.Request):
            return gr.Textbox(value=api_share(yaml_text, request), visible=True)

        share_button.click(on_share, inputs=yaml_code, outputs=share_link, api_visibility="private")

        # ---------------------------------------------------------------- reopening from a link
        def on_job_link(raw_id: str, request: gr.Request, token: str | None) -> dict:
            """The owner gets the job view; anyone else only the config the link shares."""
            from merger.jobs import store as jobs
            from merger.errors import JobAccessError

            try:
                the_id = jobs.check_job_id(raw_id)
                config = jobs.shared_config(the_id)
                try:
                    jobs.owned_job(the_id, _owner(token))
                except JobAccessError as err:
                    updates = fill_from_yaml(config, "the config of a shared job")
                    updates[status] = f"**Job link:** {err}."
                    return updates
            except MergerError as err:
                return {status: f"**Job link not opened:** {_scrub(str(err))}"}
            updates = _job_view(the_id, _app_url(request))
            updates[job_state] = "**Status:** loading…"
            return updates

        def on_load(request: gr.Request, oauth_token: gr.OAuthToken | None = None) -> dict:
            params = dict(getattr(request, "query_params", {}) or {})
            updates: dict = {}
            payload = params.get(QUERY_KEY)
            if payload:
                try:
                    updates.update(fill_from_yaml(decode_config(payload), "the shared config"))
                except MergerError as err:
                    updates[status] = f"**Not loaded:** {err}"
            if params.get("job"):
                updates.update(on_job_link(params["job"], request, _token(oauth_token)))
            return updates or {status: gr.skip()}  # an empty dict would read as one output value

        demo.load(on_load, outputs=[*fill_outputs, *job_outputs], api_visibility="private")

        # ---------------------------------------------------------------- API endpoints
        # Validation and submission share bounded pools (the UI's events too), each call time-limited
        # (constants.VALIDATION_TIMEOUT_S); status, config, share and link reads never wait behind them.
        gr.api(api_validate, api_name="validate", concurrency_limit=constants.VALIDATE_CONCURRENCY, concurrency_id="validate")
        gr.api(api_submit, api_name="submit", concurrency_limit=constants.SUBMIT_CONCURRENCY, concurrency_id="submit")
        gr.api(api_job_status, api_name="job_status", concurrency_limit=None)
        gr.api(api_job_config, api_name="job_config", concurrency_limit=None)
        gr.api(api_cancel, api_name="cancel")
        gr.api(api_share, api_name="share", concurrency_limit=8, concurrency_id="links")
        gr.api(api_load_link, api_name="load_link", concurrency_limit=8, concurrency_id="links")

    return demo


def _picker_label(method: str, index: int) -> str:
    if method == "slerp":
        return ("Base model (t = 0)", "Second model (t = 1)")[index] if index < 2 else f"Model {index + 1}"
    if method == "moe":
        return f"Expert {index + 1}"
    return f"Model {index + 1}"


def _gradient_label(index: int) -> str:
    names = ("first layer", "25%", "middle", "75%", "last layer")
    return names[index] if GRADIENT_POINTS == len(names) else f"point {index + 1}"


# Waiting events across the app: past it gradio answers "queue is full" at once instead of holding a
# connection for each (a burst of requests cannot grow memory without bound).
QUEUE_MAX_SIZE = 64
# gradio's cap on an uploaded file (the app takes no files; a config is text, bounded by the parser).
# gradio has no setting for the size of a JSON request body: the parser's limits bound what is read from it.
MAX_FILE_SIZE = "1mb"


def serve(demo: gr.Blocks, **launch: Any) -> tuple[Any, str, str]:
    """Queue and launch `demo` with the app's bounds (queue length, upload size); `launch` adds options."""
    demo.queue(default_concurrency_limit=4, max_size=QUEUE_MAX_SIZE)
    return demo.launch(max_file_size=MAX_FILE_SIZE, **launch)


def main() -> None:
    """Serve the app; unless the worker runs apart (`MERGER_EXTERNAL_WORKER=1`), start and supervise one."""
    from merger.jobs.worker import WorkerSupervisor
    from merger.jobs.queue import ensure_queue_key
    from merger.scrub import install_log_scrubbing

    install_log_scrubbing()  # before anything logs: the app's own log (httpx's lines included) never holds a token
    logging.basicConfig(level=logging.INFO)
    ensure_queue_key()  # the data dir's key (or the given one), so jobs still queued survive a restart
    supervisor = None if constants.EXTERNAL_WORKER else WorkerSupervisor()
    try:
        serve(build_demo())
    finally:
        if supervisor is not None:
            supervisor.stop()


if __name__ == "__main__":
    main()
