"""Model pickers: a Hub search as you type that shows only the newest query's answer.

Each keystroke takes a sequence number per (browser session, picker); an answer that comes back after
a newer keystroke's is dropped, so a slow search never replaces the list of a faster, later one.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass

import gradio as gr

from merger import constants, service
from merger.ui.common import token_of

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
    """A model box and the Hub's suggestions for what is typed in it (a click on one picks it)."""

    box: gr.Textbox
    suggestions: gr.Radio


def picker(label: str, value: str, elem_id: str, interactive: bool = True) -> Picker:
    """A model picker: free text (a Hub id) with Hub suggestions as you type; the form wires the picks."""
    with gr.Column(scale=4, min_width=200):
        box = gr.Textbox(value=value, label=label, elem_id=elem_id, interactive=interactive,
                         placeholder="org/model")
        suggestions = gr.Radio([], value=None, label="Hub matches (click one)", visible=False,
                               elem_id=f"{elem_id}-matches", interactive=interactive)
    made = Picker(box, suggestions)
    if interactive:
        wire_search(made, elem_id)
    return made


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
