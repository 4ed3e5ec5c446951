"""Model pickers: a Hub search as you type that shows only the newest query's answer, and under each
selected model one line of its metadata (architecture, parameters, license, gated state) or why a merge
cannot use it (GGUF, quantised or pickle-only weights, an adapter).

Each keystroke takes a sequence number per (browser session, picker); an answer that comes back after
a newer keystroke's is dropped, so a slow search never replaces the list of a faster, later one. The
details line follows the same rule.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass

import gradio as gr

from merger import constants, service
from merger.errors import excerpt
from merger.ui.common import one_line, token_of

logger = logging.getLogger(__name__)

PICKER_HINT = "Type to search the Hub" + ("" if constants.ON_SPACE else " (or type a local folder)")
_MAX_TRACKED = 10_000  # (session, picker) pairs remembered; a hostile client cannot grow this without bound

PICK_WINS_S = 5.0  # a blur this soon after a click on a match, typing part of it, is that same gesture

_counter = itertools.count(1)
_latest: dict[tuple[str, str], int] = {}
_picked: dict[tuple[str, str], tuple[str, float]] = {}  # (session, picker) -> (match clicked, when)
_lock = threading.Lock()


@dataclass
class Picker:
    """A model box, the Hub's suggestions for what is typed in it (a click on one picks it), and the
    selected model's details line."""

    box: gr.Textbox
    suggestions: gr.Radio
    details: gr.Markdown


def picker(label: str, value: str, elem_id: str, interactive: bool = True) -> Picker:
    """A model picker: free text (a Hub id) with Hub suggestions as you type; the form wires the picks.

    The details line of `value` is filled once the picker is on the page (a load event: the render is
    not held up by the Hub), then again whenever a model is picked or typed.
    """
    with gr.Column(scale=4, min_width=200):
        box = gr.Textbox(value=value, label=label, elem_id=elem_id, interactive=interactive,
                         placeholder="org/model")
        suggestions = gr.Radio([], value=None, label="Hub matches (click one)", visible=False,
                               elem_id=f"{elem_id}-matches", interactive=interactive)
        shown = gr.State(value)
        details = gr.Markdown(elem_id=f"{elem_id}-details", elem_classes=["model-details"])

    def initial_details(reference: str, request: gr.Request, oauth_token: gr.OAuthToken | None = None):
        # in the same sequence as a pick's: a slow first answer never replaces a later pick's line
        return _latest_details(request, f"{elem_id}#details", reference, oauth_token)

    # no triggers: runs once the picker is on the page (and were `shown` to change); not an API endpoint
    gr.on(None, initial_details, inputs=[shown], outputs=details, show_progress="hidden", concurrency_limit=4,
          concurrency_id="details", api_visibility="private")
    made = Picker(box, suggestions, details)
    if interactive:
        wire_search(made, elem_id)
        wire_details(made, elem_id)
    return made


def details_markdown(reference: str, token: str | None) -> str:
    """The details line of one model as Markdown: ✓ and its metadata, ✗ and why a merge cannot use it,
    or ⚠ and why it could not be read. Empty for an empty box. Never raises."""
    reference = (reference or "").strip()
    if not reference:
        return ""
    try:
        found = service.model_details(reference, token)
    except Exception as err:  # noqa: BLE001 - a details line must never break the form
        return f"⚠ `{excerpt(reference, 80)}`: {one_line(err)}"
    mark = "✓" if found.ok else ("✗" if found.refused else "⚠")
    return f"{mark} {found.summary()}"


def wire_details(made: Picker, name: str) -> None:
    """Refresh the details line when a match is clicked, or typed text is committed (blur, Enter)."""
    key = f"{name}#details"

    def on_pick(values: dict, request: gr.Request, oauth_token: gr.OAuthToken | None = None):
        return _latest_details(request, key, values[made.suggestions], oauth_token)

    def on_commit(values: dict, request: gr.Request, oauth_token: gr.OAuthToken | None = None):
        typed = (values[made.box] or "").strip()
        if superseded_by_pick(request, name, typed):
            return gr.skip()  # the half-typed text lost to the match clicked (its own event shows that one)
        return _latest_details(request, key, typed, oauth_token)

    common = {"outputs": made.details, "show_progress": "hidden", "concurrency_limit": 4,
              "concurrency_id": "details", "api_visibility": "private"}
    made.suggestions.input(on_pick, inputs={made.suggestions}, **common)
    gr.on([made.box.blur, made.box.submit], on_commit, inputs={made.box}, **common)


def _latest_details(request: gr.Request | None, key: str, reference: str | None,
                    oauth_token: gr.OAuthToken | None) -> str:
    seq = _begin(request, key)
    text = details_markdown(reference or "", token_of(oauth_token))
    return text if _is_latest(request, key, seq) else gr.skip()


def wire_search(made: Picker, name: str) -> None:
    """Search the Hub as the user types; only the newest keystroke's answer is shown."""

    def on_search(values: dict, request: gr.Request, oauth_token: gr.OAuthToken | None = None):
        seq = _begin(request, name)
        try:
            found = service.search_models(values[made.box] or "", token_of(oauth_token))
        except Exception:  # noqa: BLE001 - suggestions must never break the form
            logger.warning("model search failed", exc_info=True)
            return gr.skip()
        if not _is_latest(request, name, seq):
            return gr.skip()  # a later keystroke's answer is (or will be) shown instead
        return gr.Radio(choices=found, value=None, visible=bool(found))

    made.box.input(
        on_search,
        inputs={made.box},
        outputs=made.suggestions,
        trigger_mode="always_last",
        show_progress="hidden",
        concurrency_limit=8,
        concurrency_id="search",
        api_visibility="private",
    )


def _begin(request: gr.Request | None, name: str) -> int:
    key = (getattr(request, "session_hash", None) or "", name)
    seq = next(_counter)
    with _lock:
        if len(_latest) >= _MAX_TRACKED:
            _latest.clear()
        _latest[key] = seq
    return seq


def _is_latest(request: gr.Request | None, name: str, seq: int) -> bool:
    key = (getattr(request, "session_hash", None) or "", name)
    with _lock:
        return _latest.get(key, seq) == seq


def note_pick(request: gr.Request | None, name: str, value: str) -> None:
    """Remember a click on a match (see :func:`superseded_by_pick`)."""
    key = (getattr(request, "session_hash", None) or "", name)
    with _lock:
        if len(_picked) >= _MAX_TRACKED:
            _picked.clear()
        _picked[key] = (value, time.monotonic())


def superseded_by_pick(request: gr.Request | None, name: str, typed: str) -> bool:
    """Whether a box's typed text lost to a match the user clicked.

    Clicking a match blurs the box first, and the browser may deliver that blur after the click: the
    blur then carries the half-typed query (`mistral-ba`) and must not replace the match
    (`alice/mistral-base`) that contains it.
    """
    key = (getattr(request, "session_hash", None) or "", name)
    with _lock:
        picked = _picked.get(key)
    if picked is None or time.monotonic() - picked[1] > PICK_WINS_S:
        return False
    return typed != picked[0] and typed.lower() in picked[0].lower()
