"""The served app through gradio_client: every pre-flight failure line (config, models, compatibility, target
repo, resources) with its fix in the form's words, the job view's cancel and My merges, on the loopback Hub.

The models are tiny and published once; the app runs in this process (tests/app_harness.py), signed in as
alice through `HF_TOKEN`, with no worker (jobs stay queued).
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import shutil  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import gradio as gr  # noqa: E402
import pytest  # noqa: E402

from app_harness import served_app  # noqa: E402
from merger.config.dump import dump_yaml  # noqa: E402
from test_model_files import gguf_only  # noqa: E402
from test_settings import tiny  # noqa: E402

BOB = "hf_test_bob"


@pytest.fixture(scope="module")
def app(hub, fixture_models_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The served app (client, demo) and the published models."""
    root = tmp_path_factory.mktemp("checks")
    for name in ("mistral-base", "mistral-prose"):
        shutil.copytree(fixture_models_dir / name, root / name)
        (root / name / "README.md").write_text("---\nlicense: apache-2.0\n---\n# fixture\n")
        hub.upload_model(root / name, f"alice/ck-{name}")
    gguf_only(root / "gguf")
    hub.upload_model(root / "gguf", "alice/ck-gguf")
    hub.upload_model(fixture_models_dir / "mistral-code", "bob/ck-gated", token=BOB)
    hub.store.repos[("model", "bob/ck-gated")]["gated"] = "manual"
    # equal widths, four layers: a Qwen2 has 12 attention biases a Llama layout cannot hold
    hub.upload_model(tiny(root / "llama", "llama", 0, num_hidden_layers=4), "alice/ck-llama")
    hub.upload_model(tiny(root / "qwen2", "qwen2", 1, num_hidden_layers=4), "alice/ck-qwen2")
    hub.upload_model(tiny(root / "llama80", "llama", 2, num_hidden_layers=4, vocab_size=80), "alice/ck-llama-v80")
    hub.upload_model(fixture_models_dir / "mistral-base", "alice/ck-taken")
    with served_app(root / "data") as served:
        yield served


def ties(base: str = "alice/ck-mistral-base", other: str = "alice/ck-mistral-prose", **extra) -> str:
    return dump_yaml({"merge_method": "ties", "base_model": base,
                      "models": [{"model": other, "parameters": {"weight": 1.0, "density": 0.5}}], **extra})


def check(app, text: str, repo: str = "ck-new", private: bool = False, reuse: bool = False) -> dict:
    client, _ = app
    return client.predict(text, repo, private, reuse, api_name="/preflight")


def failing(result: dict, name: str) -> list[dict]:
    assert not result["ok"]
    found = [line for line in result["lines"] if line["name"] == name and not line["ok"]]
    assert found, result["lines"]
    for line in found:  # every failing line says how to fix it, in one line, with no traceback
        assert line["fix"] and "\n" not in line["fix"] and "Traceback" not in line["detail"]
    return found


def test_a_mergeable_config_passes_every_line(app) -> None:
    result = check(app, ties())
    assert result["ok"], result
    assert [line["name"] for line in result["lines"]] == ["config", "models", "compatibility", "target repo", "resources"]
    assert all(line["ok"] and line["fix"] == "" for line in result["lines"])


def test_config_lines(app) -> None:
    [line] = failing(check(app, "merge_method: ties\nmodels: []\n"), "config")
    assert "`models:` is empty" in line["detail"] and line["fix"] == "fix the field it names in the form or the YAML"
    lines = failing(check(app, "merge_method: nope\nmodels: [{model: org/a}]\n"), "config")
    assert "merge_method: nope" in " ".join(line["detail"] for line in lines)


@pytest.mark.parametrize("other, detail, fix", [
    ("alice/ck-missing", "`alice/ck-missing` was not found on the Hub", "check the model ids in the form"),
    ("bob/ck-gated", "is gated: accept its terms", "accept the model's terms on its Hub page"),
    ("alice/ck-gguf", "ships only GGUF files", "pick the original safetensors model in the form"),
])
def test_models_lines(app, other: str, detail: str, fix: str) -> None:
    result = check(app, ties(other=other))
    [line] = failing(result, "models")
    assert detail in line["detail"] and line["fix"].startswith(fix)
    assert "compatibility" not in [line["name"] for line in result["lines"]]  # nothing to compare without models


def test_a_cross_family_merge_names_every_tensor_it_would_drop(app) -> None:
    lines = failing(check(app, ties(base="alice/ck-llama", other="alice/ck-qwen2")), "compatibility")
    [dropped] = [line for line in lines if "would drop them" in line["detail"]]
    biases = sorted(f"model.layers.{i}.self_attn.{p}_proj.bias" for i in range(4) for p in "qkv")
    shown = ", ".join(f"`{name}`" for name in biases[:10])
    assert dropped["detail"] == f"`alice/ck-qwen2` has 12 tensor(s) the output cannot hold, so the merge would drop " \
                                f"them: {shown} and 2 more"
    assert dropped["fix"].startswith("pick models of the base model's family in the form")
    assert any("`qwen2` model" in line["detail"] for line in lines)  # the family, a line of its own


def test_a_vocabulary_mismatch_offers_the_forms_tokenizer_option(app) -> None:
    from merger.ui import config_view

    text = ties(base="alice/ck-llama", other="alice/ck-llama-v80")
    [line] = failing(check(app, text), "compatibility")
    assert "vocabularies differ (embedding rows: `alice/ck-llama-v80` 80, `alice/ck-llama` 64)" in line["detail"]
    assert line["fix"].startswith("open the form's Options and set tokenizer_source to `union`")
    # the control the fix names is one the form shows for this config
    assert "tokenizer_source" in [f.key for f in config_view.view_of(config_view.parse(text)).options]


def test_a_layer_range_past_the_end(app) -> None:
    text = dump_yaml({"merge_method": "passthrough", "slices": [
        {"sources": [{"model": "alice/ck-mistral-prose", "layer_range": [0, 9]}]}]})
    [line] = failing(check(app, text), "compatibility")
    assert "past the last layer" in line["detail"]
    assert line["fix"].startswith("set each slice's start and end in the form")


def test_target_repo_lines(app, monkeypatch: pytest.MonkeyPatch) -> None:
    [unnamed] = failing(check(app, ties(), repo=""), "target repo")
    assert unnamed["detail"] == "no repo named" and "New model repo" in unnamed["fix"]
    [taken] = failing(check(app, ties(), repo="ck-taken"), "target repo")
    assert "reuse existing repo" in taken["fix"]
    assert check(app, ties(), repo="ck-taken", reuse=True)["ok"]
    [elsewhere] = failing(check(app, ties(), repo="bob/ck-x"), "target repo")
    assert elsewhere["fix"] == "choose another repo name"
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    [signed_out] = failing(check(app, ties()), "target repo")
    assert signed_out["detail"] == "signed out" and "sign in" in signed_out["fix"]


def test_resources_lines(app, monkeypatch: pytest.MonkeyPatch) -> None:
    from merger.service import checklist

    monkeypatch.setattr(checklist, "_available_ram", lambda: 1000)
    [ram] = failing(check(app, ties()), "resources")
    assert "1.0 KB RAM free" in ram["detail"] and ram["fix"].startswith("remove models in the form")
    real = checklist.shutil.disk_usage
    monkeypatch.setattr(checklist.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    [disk] = failing(check(app, ties()), "resources")
    assert "1.0 KB disk" in disk["detail"] and "layer range (slices)" in disk["fix"]


# ---------------------------------------------------------------- cancel and My merges
def handler(demo: gr.Blocks, name: str):
    return next(f.fn for f in demo.fns.values() if f.name == name)


def by_id(demo: gr.Blocks, elem_id: str):
    return next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == elem_id)


def test_cancel_from_the_job_view_and_my_merges_lists_the_job_with_its_config(app) -> None:
    client, demo = app
    text = ties()
    job_id = client.predict(text, "ck-cancelled", False, False, api_name="/submit")
    second_text = ties().replace("density: 0.5", "density: 0.7")
    other = client.predict(second_text, "ck-second", False, False, api_name="/submit")

    job_box = by_id(demo, "job-id")
    updates = handler(demo, "on_cancel")({job_box: job_id})
    assert updates[by_id(demo, "job-state")] == "**Status:** Cancelling…"
    assert client.predict(job_id, api_name="/job_status")["status"] == "cancelled"
    again = handler(demo, "on_cancel")({job_box: job_id})
    assert again[by_id(demo, "job-state")] == "**Status:** The job had already finished."
    stranger = handler(demo, "on_cancel")({job_box: "0" * 32})
    assert stranger[by_id(demo, "job-state")].startswith("**Error:** there is no job with this id")

    listed = client.predict(api_name="/my_jobs")
    mine = [j for j in listed if j["id"] in (job_id, other)]
    assert [(j["id"], j["status"]) for j in mine] == [(other, "queued"), (job_id, "cancelled")]
    assert mine[1]["config_yaml"] == text
    request = gr.Request()
    html = handler(demo, "refresh_listing")(request)
    first, second = html.index(f"data-job='{other}'".replace("'", '"')), html.index(f'data-job="{job_id}"')
    assert first < second  # newest first
    row = html[second:html.index("</tr>", second)]
    assert "cancelled" in row and "<summary>ties</summary>" in row and "alice/ck-cancelled" in row
    assert f"?job={job_id}" in row and "density: 0.5" in row
    assert time.strftime("%Y-%m-%d", time.gmtime()) in row


# ---------------------------------------------------------------- the header off a Space
def test_the_local_header_says_which_token_merges_use(monkeypatch: pytest.MonkeyPatch) -> None:
    import app as the_app

    demo = the_app.build_demo(login=False)
    [load] = [f for f in demo.fns.values() if by_id(demo, "token-note") in f.outputs]
    assert load.targets[0][1] == "load" and load.api_visibility == "private"
    load_fn = load.fn  # run at every page load: the line follows the environment
    monkeypatch.setenv("HF_TOKEN", "hf_test_alice")
    assert load_fn() == "Running locally: merges are pushed with the token in `HF_TOKEN`."
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr("huggingface_hub.get_token", lambda: "hf_saved_login")
    assert "your saved Hugging Face login" in load_fn()
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    signed_out = load_fn()
    assert signed_out.startswith("Running locally with no Hugging Face token") and "HF_TOKEN" in signed_out
    assert "merges are pushed with" not in signed_out
