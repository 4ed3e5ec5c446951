"""Model pickers: only the newest query's Hub answer is shown; a late blur never undoes a clicked match."""

from __future__ import annotations

import gradio as gr
import pytest

from merger.ui import pickers


def request(session: str) -> gr.Request:
    req = gr.Request()
    req.session_hash = session
    return req


def test_an_answer_older_than_the_last_keystroke_is_dropped() -> None:
    alice, bob = request("s-alice"), request("s-bob")
    first = pickers._begin(alice, "model-0")
    second = pickers._begin(alice, "model-0")
    other_box = pickers._begin(alice, "model-1")
    other_user = pickers._begin(bob, "model-0")
    assert not pickers._is_latest(alice, "model-0", first)  # a slow first answer comes back last: dropped
    assert pickers._is_latest(alice, "model-0", second)
    assert pickers._is_latest(alice, "model-1", other_box) and pickers._is_latest(bob, "model-0", other_user)


def test_a_blur_carrying_part_of_a_clicked_match_loses_to_it(monkeypatch: pytest.MonkeyPatch) -> None:
    me = request("s-pick")
    pickers.note_pick(me, "base-model", "alice/mistral-base")
    assert pickers.superseded_by_pick(me, "base-model", "mistral-ba")  # the query typed before the click
    assert not pickers.superseded_by_pick(me, "base-model", "alice/mistral-base")  # the match itself
    assert not pickers.superseded_by_pick(me, "base-model", "org/other")  # typed afresh: it counts
    assert not pickers.superseded_by_pick(me, "model-0", "mistral-ba")  # another box
    assert not pickers.superseded_by_pick(request("s-else"), "base-model", "mistral-ba")  # another session
    now = pickers.time.monotonic()
    monkeypatch.setattr(pickers.time, "monotonic", lambda: now + pickers.PICK_WINS_S + 1)
    assert not pickers.superseded_by_pick(me, "base-model", "mistral-ba")  # later typing is a new edit
