"""Model pickers: only the newest query's Hub answer is shown; a late blur never undoes a clicked match; each
selected model's details line (architecture, parameters, license, gated state), the formats a merge cannot read
refused with the reason, and every failure as one line, from the loopback Hub."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import gradio as gr
import pytest
from safetensors import safe_open

from merger import constants, service
from merger.service import models as details_module
from merger.ui import pickers
from test_model_files import BROKEN_MODELS

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


# ---------------------------------------------------------------- the details line
TOKEN = "hf_test_alice"
BOB = "hf_test_bob"


def weights_in(folder: Path) -> int:
    """The number of weights in a folder's safetensors files, counted from the files themselves."""
    total = 0
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            for name in f.keys():
                n = 1
                for dim in f.get_slice(name).get_shape():
                    n *= dim
                total += n
    return total


@pytest.fixture(autouse=True)
def fresh_memo() -> None:
    details_module._remembered.clear()


@pytest.fixture(scope="module")
def licensed(hub, fixture_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = tmp_path_factory.mktemp("licensed") / "m"
    shutil.copytree(fixture_models_dir / "mistral-prose", folder)
    (folder / "README.md").write_text("---\nlicense: apache-2.0\ntags:\n- fixture\n---\n# prose\n")
    return hub.upload_model(folder, "alice/prose-licensed")


def test_a_model_shows_its_architecture_parameters_license_and_gated_state(
    licensed: str, fixture_models_dir: Path
) -> None:
    found = service.model_details(licensed, TOKEN)
    expected = weights_in(fixture_models_dir / "mistral-prose")
    assert (found.architecture, found.parameters, found.license, found.gated) == (
        "MistralForCausalLM", expected, "apache-2.0", None)
    assert found.ok and not found.private
    shown = pickers.details_markdown(licensed, TOKEN)
    assert shown == f"✓ MistralForCausalLM · {expected / 1e6:.2f}M parameters · license apache-2.0 · not gated"


def test_the_license_comes_from_the_readme_when_the_hub_answers_without_card_data(
    licensed: str, hub, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hub.store, "card_data", lambda commit: None)
    from huggingface_hub import HfApi

    assert HfApi(token=TOKEN).model_info(licensed).card_data is None  # the fallback is what is tested
    assert service.model_details(licensed, TOKEN).license == "apache-2.0"
    from merger.publish.hub_read import fetch_metadata

    assert fetch_metadata(licensed, TOKEN).license == "apache-2.0"  # the merged model's card reads the same


REFUSED = {
    "gptq-llama": "GPTQ",
    "awq-quantization-config": "quant_method: awq",
    "exl2": "EXL2",
    "gguf-only": "ships only GGUF files",
    "pickle-only": "ships only pickle weights",
    "peft-adapter-folder": "is a PEFT LORA adapter",
}


@pytest.mark.parametrize("case_id", sorted(REFUSED))
def test_formats_a_merge_cannot_read_are_refused_with_the_reason(
    case_id: str, hub, tmp_path: Path
) -> None:
    next(case for case in BROKEN_MODELS if case.id == case_id).build(tmp_path / "m")
    repo = hub.upload_model(tmp_path / "m", f"alice/refused-{case_id}")
    found = service.model_details(repo, TOKEN)
    assert found.refused is not None and REFUSED[case_id] in found.refused
    assert not found.ok and found.parameters is None
    shown = pickers.details_markdown(repo, TOKEN)
    assert shown.startswith("✗ refused: ") and "\n" not in shown and "Traceback" not in shown


def test_a_gated_model_says_so_before_and_after_access(hub, fixture_models_dir: Path) -> None:
    repo = hub.upload_model(fixture_models_dir / "mistral-code", "bob/gated-code", token=BOB)
    record = hub.store.repos[("model", repo)]
    record["gated"] = "manual"
    try:
        locked = service.model_details(repo, TOKEN)
        assert locked.gated == "manual" and locked.problem and "is gated: accept its terms" in locked.problem
        assert pickers.details_markdown(repo, TOKEN).startswith("⚠ gated (the owner approves access) · model ")
        record["gated_users"] = {"alice"}  # the owner approved alice: the next look shows the model
        opened = service.model_details(repo, TOKEN)
        assert opened.ok and opened.gated == "manual"
        assert opened.parameters == weights_in(fixture_models_dir / "mistral-code")
    finally:
        record.pop("gated", None)


def test_failures_are_one_line(hub, monkeypatch: pytest.MonkeyPatch, fixture_models_dir: Path) -> None:
    missing = pickers.details_markdown("alice/no-such-model", TOKEN)
    assert missing.startswith("⚠ model `alice/no-such-model` was not found on the Hub")
    assert pickers.details_markdown("", TOKEN) == ""
    assert "\n" not in pickers.details_markdown("not a/valid id here", TOKEN)
    huge = service.model_details("org/" + "x" * 5_000_000, TOKEN)
    assert huge.problem.endswith("is too long to be a model id or a folder") and len(huge.problem) < 200
    monkeypatch.setattr(constants, "ON_SPACE", True)
    local = service.model_details(str(fixture_models_dir / "mistral-prose"), None)
    assert local.problem.endswith("local folders are not read here; give a Hub id like `org/name`")  # the resolver's


def test_a_slow_hub_gives_a_reason_within_the_time_limit(licensed: str, hub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(details_module, "DETAILS_TIMEOUT_S", 0.5)
    monkeypatch.setattr(hub.store, "delay_s", 2.0)
    started = time.monotonic()
    found = service.model_details(licensed, TOKEN)
    assert time.monotonic() - started < 1.5
    assert found.problem and "time" in found.problem and not found.ok
    monkeypatch.setattr(hub.store, "delay_s", 0.0)
    assert service.model_details(licensed, TOKEN).ok  # a timeout is not remembered


def test_details_are_remembered_per_token(licensed: str, hub, monkeypatch: pytest.MonkeyPatch) -> None:
    first = service.model_details(licensed, TOKEN)
    monkeypatch.setattr(hub.store, "delay_s", 5.0)  # a second Hub call would take this long
    started = time.monotonic()
    assert service.model_details(licensed, TOKEN) is first
    assert time.monotonic() - started < 0.5


def test_the_picker_wires_its_details_line(licensed: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with gr.Blocks() as demo:
        made = pickers.picker("Model 1", licensed, "model-0")
    [shown] = [f for f in demo.fns.values() if f.name == "initial_details" and made.details in f.outputs]
    assert ("load" in [event for _, event in shown.targets]) and shown.api_visibility == "private"
    request = gr.Request()
    request.session_hash = "picker-test"
    assert shown.fn(licensed, request).startswith("✓ MistralForCausalLM")  # shown once the picker is on the page
    on_pick = next(f.fn for f in demo.fns.values() if f.name == "on_pick" and made.details in f.outputs)
    assert on_pick({made.suggestions: licensed}, request).startswith("✓ ")
    on_commit = next(f.fn for f in demo.fns.values() if f.name == "on_commit" and made.details in f.outputs)
    assert on_commit({made.box: "alice/nope"}, request).startswith("⚠ model `alice/nope` was not found")
    pickers.note_pick(request, "model-0", licensed)  # a blur carrying half the clicked match loses to it
    assert isinstance(on_commit({made.box: "prose-lic"}, request), type(gr.skip()))
