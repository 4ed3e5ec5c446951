"""The seed's three merges end to end: app (gradio_client) -> job queue -> worker process -> engine -> push
to the loopback Hub; the pushed repo is downloaded and loaded with transformers.

The fixture models are published on the loopback Hub as `alice/mistral-*`, so the merges read real Hub
ids; the worker is a real consumer subprocess sharing a temporary queue and job store.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
import torch
import yaml
from gradio_client import Client
from gradio_client.exceptions import AppError

import app
from merger import constants
from helpers import bits_per_token, free_port, weights

EXAMPLES = Path(__file__).parents[1] / "templates" / "examples"
PROMPT = torch.tensor([[1, 57, 301, 1200, 44, 9, 3000, 17, 5, 800]])
FIXTURES = ("mistral-base", "mistral-prose", "mistral-code")


@pytest.fixture(scope="module")
def published(hub, fixture_models_dir: Path, tmp_path_factory) -> dict[str, str]:
    """The fixtures on the loopback Hub with an Apache-2.0 card, plus a pickle-only repo."""
    ids = {}
    for name in FIXTURES:
        folder = tmp_path_factory.mktemp(name)
        shutil.copytree(fixture_models_dir / name, folder, dirs_exist_ok=True)
        (folder / "README.md").write_text("---\nlicense: apache-2.0\n---\n# fixture\n")
        ids[name] = hub.upload_model(folder, f"alice/{name}")
    pickled = tmp_path_factory.mktemp("pickled")
    shutil.copy(fixture_models_dir / "mistral-base" / "config.json", pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04 not really a pickle")
    ids["pickled"] = hub.upload_model(pickled, "alice/pickled")
    return ids


@pytest.fixture(scope="module")
def served(hub, published, tmp_path_factory):
    """The app on a free port and its worker process, on a temporary data directory, signed in as alice."""
    from merger.jobs.worker import start_consumer_process

    data = tmp_path_factory.mktemp("data")
    saved = (constants.DATA_DIR, constants.QUEUE_DB, constants.JOBS_DB, os.environ.get("HF_TOKEN"))
    constants.DATA_DIR, constants.QUEUE_DB, constants.JOBS_DB = data, data / "queue.db", data / "jobs.db"
    os.environ["HF_TOKEN"] = hub.token
    worker = start_consumer_process(log_file=data / "worker.log")
    demo = app.build_demo()
    demo.queue()
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(), quiet=True)
    yield Client(url, verbose=False), data
    demo.close()
    worker.terminate()
    worker.wait(timeout=60)
    constants.DATA_DIR, constants.QUEUE_DB, constants.JOBS_DB = saved[:3]
    os.environ.pop("HF_TOKEN") if saved[3] is None else os.environ.__setitem__("HF_TOKEN", saved[3])


def run_job(client: Client, text: str, repo: str, timeout: float = 180) -> dict:
    """Submit through the app (not evaluated: tests/test_review.py covers that) and poll the job view's
    endpoint until the job ends."""
    job_id = client.predict(text, repo, False, False, False, api_name="/submit")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.predict(job_id, api_name="/job_status")
        if status["status"] in ("succeeded", "failed", "cancelled"):
            return status
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} did not finish in {timeout}s: {status}")


def pushed_model(hub, repo: str) -> Path:
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(f"{hub.user}/{repo}", token=hub.token))


def load(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def logits(path: Path) -> torch.Tensor:
    with torch.no_grad():
        return load(path)(PROMPT).logits


def hub_example(name: str, published: dict[str, str]) -> str:
    """A fixture example with its local paths replaced by the published Hub ids."""
    text = (EXAMPLES / name).read_text()
    for fixture, repo in published.items():
        text = text.replace(f"tests/data/fixtures/{fixture}", repo)
    return text


def slerp(published: dict[str, str], t: float) -> str:
    text = hub_example("fixture-slerp.yaml", published)
    data = yaml.safe_load(text)
    data["parameters"] = {"t": t}
    return yaml.safe_dump(data, sort_keys=False)


@pytest.mark.parametrize("t, parent", [(0.0, "mistral-prose"), (1.0, "mistral-code")])
def test_slerp_endpoints_give_a_parents_logits(served, hub, published, fixture_models_dir, t, parent) -> None:
    client, _ = served
    status = run_job(client, slerp(published, t), f"slerp-t{int(t)}")
    assert status["status"] == "succeeded", status
    assert status["progress"] == 1.0 and status["result_url"].endswith(f"/alice/slerp-t{int(t)}")
    torch.testing.assert_close(logits(pushed_model(hub, f"slerp-t{int(t)}")), logits(fixture_models_dir / parent),
                               rtol=0, atol=0)


def test_frankenmerge_stacks_the_donors_layers(served, hub, published, fixture_models_dir) -> None:
    client, _ = served
    status = run_job(client, hub_example("fixture-frankenmerge.yaml", published), "franken")
    assert status["status"] == "succeeded", status
    out = pushed_model(hub, "franken")
    model = load(out)
    assert model.config.num_hidden_layers == 6 and len(model.model.layers) == 6
    merged = weights(out)
    prose, code = weights(fixture_models_dir / "mistral-prose"), weights(fixture_models_dir / "mistral-code")
    for out_layer, (donor, layer) in enumerate([(prose, 0), (prose, 1), (prose, 2), (code, 1), (code, 2), (code, 3)]):
        for suffix in ("self_attn.q_proj.weight", "mlp.up_proj.weight", "post_attention_layernorm.weight"):
            assert torch.equal(merged[f"model.layers.{out_layer}.{suffix}"], donor[f"model.layers.{layer}.{suffix}"])


def test_moe_of_one_model_reproduces_its_logits(served, hub, published, fixture_models_dir) -> None:
    client, _ = served
    repo = published["mistral-code"]
    text = f"base_model: {repo}\ngate_mode: random\nexperts:\n  - source_model: {repo}\n  - source_model: {repo}\n"
    status = run_job(client, text, "moe-same")
    assert status["status"] == "succeeded", status
    out = pushed_model(hub, "moe-same")
    assert type(load(out)).__name__ == "MixtralForCausalLM"
    torch.testing.assert_close(logits(out), logits(fixture_models_dir / "mistral-code"), rtol=1e-4, atol=1e-4)


def test_slerp_half_merge_perplexity_beside_the_parents(served, hub, published, fixture_models_dir) -> None:
    client, _ = served
    status = run_job(client, slerp(published, 0.5), "slerp-half")
    assert status["status"] == "succeeded", status
    rows = {}
    for name, path in [("mistral-prose", fixture_models_dir / "mistral-prose"),
                       ("mistral-code", fixture_models_dir / "mistral-code"),
                       ("slerp t=0.5", pushed_model(hub, "slerp-half"))]:
        rows[name] = {split: bits_per_token(path, (fixture_models_dir / f"{split}_eval.txt").read_text())
                      for split in ("prose", "code")}
    print("\nbits/token (perplexity) on the fixture eval splits")
    for name, r in rows.items():
        print(f"  {name:14s} prose {r['prose']:.4f} ({2 ** r['prose']:.1f})  code {r['code']:.4f} ({2 ** r['code']:.1f})")
    mean = {name: (r["prose"] + r["code"]) / 2 for name, r in rows.items()}
    assert mean["slerp t=0.5"] < (mean["mistral-prose"] + mean["mistral-code"]) / 2
    assert rows["mistral-prose"]["prose"] < rows["slerp t=0.5"]["prose"] < rows["mistral-code"]["prose"]


def test_pushed_card_front_matter(served, hub, published) -> None:
    from huggingface_hub import ModelCard

    client, _ = served
    status = run_job(client, hub_example("fixture-slerp.yaml", published), "slerp-card")
    assert status["status"] == "succeeded", status
    out = pushed_model(hub, "slerp-card")
    card = ModelCard.load(out / "README.md")
    data = card.data.to_dict()
    assert data["base_model"] == [published["mistral-prose"], published["mistral-code"]]
    assert data["base_model_relation"] == "merge"
    assert set(data["tags"]) >= {"merge", "mergekit"} and data["library_name"] == "transformers"
    assert data["license"] == "apache-2.0"
    assert "[SLERP](" in card.text and hub_example("fixture-slerp.yaml", published).strip() in card.text
    assert f'from_pretrained("{hub.user}/slerp-card")' in card.text  # the repo people load, not its bare name
    assert (out / "mergekit_config.yml").read_text() == hub_example("fixture-slerp.yaml", published)


def test_share_link_round_trips(served, published) -> None:
    client, _ = served
    text = hub_example("fixture-frankenmerge.yaml", published)
    link = client.predict(text, api_name="/share")
    payload = link.split("?config=", 1)[1]
    assert client.predict(payload, api_name="/load_link") == text
    assert "hf_test" not in link


def _slices(published, *ranges) -> str:
    sources = "\n".join(f"      - {{model: {published[m]}, layer_range: [{a}, {b}]}}" for m, a, b in ranges)
    return f"merge_method: slerp\nbase_model: {published['mistral-prose']}\nslices:\n  - sources:\n{sources}\nparameters: {{t: 0.5}}\n"


BAD_INPUTS = {
    "empty-layer-range": (lambda p: _slices(p, ("mistral-prose", 2, 2), ("mistral-code", 2, 2)), ["layer_range", "[2, 2]"]),
    "past-last-layer": (lambda p: _slices(p, ("mistral-prose", 0, 5), ("mistral-code", 0, 5)), ["layer_range", "[0, 5]", "4 layers"]),
    "unknown-method": (lambda p: f"merge_method: slurp\nmodels:\n  - model: {p['mistral-prose']}\n", ["slurp", "did you mean `slerp`"]),
    "slerp-three-models": (
        lambda p: f"merge_method: slerp\nbase_model: {p['mistral-base']}\nmodels:\n  - model: {p['mistral-prose']}\n"
                  f"  - model: {p['mistral-code']}\nparameters: {{t: 0.5}}\n", ["slerp", "exactly 2 models", "got 3"]),
    "slerp-without-base": (
        lambda p: f"merge_method: slerp\nmodels:\n  - model: {p['mistral-prose']}\n  - model: {p['mistral-code']}\n"
                  "parameters: {t: 0.5}\n", ["base_model", "required"]),
    "missing-repo": (lambda p: slerp(p, 0.5).replace(p["mistral-code"], "alice/no-such-model"), ["alice/no-such-model"]),
    "bin-only-model": (lambda p: slerp(p, 0.5).replace(p["mistral-code"], p["pickled"]), ["alice/pickled", "pickle"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_a_named_error_and_nothing_is_pushed(served, hub, published, case) -> None:
    from huggingface_hub import HfApi

    client, _ = served
    make, words = BAD_INPUTS[case]
    before = {m.id for m in HfApi(token=hub.token).list_models(author=hub.user)}
    for endpoint in ("/validate", "/submit"):
        args = (make(published),) if endpoint == "/validate" else (make(published), f"bad-{case}", False)
        with pytest.raises(AppError) as caught:
            client.predict(*args, api_name=endpoint)
        message = str(caught.value)
        assert "Traceback" not in message
        for word in words:
            assert word in message, (word, message)
    assert {m.id for m in HfApi(token=hub.token).list_models(author=hub.user)} == before
