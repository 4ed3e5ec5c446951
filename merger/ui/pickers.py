"""Model pickers: a Hub search as you type that shows only the newest query's answer.

Each keystroke takes a sequence number per (browser session, picker); an answer that comes back after
a newer keystroke's is dropped, so a slow search never replaces the list of a faster, later one.
"""

from __future__ import annotations

import itertools
import logging
import threading

import gradio as gr

from .. import constants, service
from .common import token_of

logger = logging.getLogger(__name__)

PICKER_HINT = "Type to search the Hub" + ("" if constants.ON_SPACE else " (or type a local folder)")
_MAX_TRACKED = 10_000  # (session, picker) pairs remembered; a hostile client cannot grow this without bound

_counter = itertools.count(1)
_latest: dict[tuple[str, str], int] = {}
_lock = threading.Lock()


def picker(label: str, value: str, elem_id: str, interactive: bool = True) -> gr.Dropdown:
    """A model picker: free text or a Hub suggestion; wired to the search with :func:`wire_search`."""
    box = gr.Dropdown(
        choices=[value] if value else [],
        value=value or None,
        allow_custom_value=True,
        filterable=True,
        label=label,
        elem_id=elem_id,
        interactive=interactive,
        scale=4,
    )
    wire_search(box)
    return box


def wire_search(box: gr.Dropdown) -> None:
    """Search the Hub as the user types into `box` (suggestions only; picking is the form's `input` event)."""
    name = box.elem_id or str(box._id)

    def on_search(data: gr.KeyUpData, request: gr.Request, oauth_token: gr.OAuthToken | None = None):
        seq = _begin(request, name)
        try:
            found = service.search_models(data.input_value or "", token_of(oauth_token))
        except Exception:  # noqa: BLE001 - suggestions must never break the form
            logger.warning("model search failed", exc_info=True)
            return gr.skip()
        if not found or not _is_latest(request, name, seq):
            return gr.skip()
        return gr.Dropdown(choices=found)

    box.key_up(
        on_search,
        outputs=box,
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
