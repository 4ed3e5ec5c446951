"""A job's evaluation after its merge and its review before the push: the worker's path through
merger/service/run_job.py with the real engine on the fixtures, pushing to the loopback Hub.

Jobs run in-process through huey's immediate mode (the task bodies are the worker's); the parents'
bits/token and KL are computed again here, independently, with transformers.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch
from huggingface_hub import snapshot_download

from helpers import bits_per_token
from merger import constants, service
from merger.errors import EvalTextError, JobAccessError, JobLimitError
from merger.jobs import queue, review, store as jobs, worker
from merger.jobs.store import JobStatus
from merger.service.options import JobOptions, job_options
from merger.ui import evaluation_view

FIXTURES = Path(__file__).parent / "data" / "fixtures"
PARENTS = [str(FIXTURES / "mistral-base"), str(FIXTURES / "mistral-code")]
CONFIG = "merge_method: linear\nmodels:\n" + "".join(f"  - model: {p}\n    parameters: {{weight: 0.5}}\n" for p in PARENTS)
TEXT = (FIXTURES / "prose_eval.txt").read_text()[:1500]  # a few hundred tokens: scored whole within the budget


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def data_dir(job_store: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh job store (conftest's `job_store`); tasks run synchronously inside submit and publish, as
    the consumer would."""
    monkeypatch.setattr(constants, "JOB_EVAL_TOKENS_PER_TEXT", 4096)
    queue.get_huey().immediate = True
    return job_store


def submit(hub, repo: str, options: JobOptions) -> str:
    return queue.submit(CONFIG, f"{hub.user}/{repo}", hub.token, hub.user, options=options.to_json())


def commits(hub, repo: str) -> list[dict]:
    return hub.store.repos[("model", f"{hub.user}/{repo}")]["commits"]


def kl_bits(merge_dir: str | Path, parent_dir: str | Path, text: str, context: int = 256) -> float:
    """KL(merge ‖ parent) in bits/token over `text`, windows of `context` with BOS in front, float32 throughout."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merge_dir)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    models = [AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval() for d in (merge_dir, parent_dir)]
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids), context - 1):
            window = torch.tensor([[tokenizer.bos_token_id] + ids[start:start + context - 1]])
            merge, parent = (torch.log_softmax(m(window).logits[0, :-1], dim=-1) for m in models)
            total += float((merge.exp() * (merge - parent)).sum())
            count += window.shape[1] - 1
    return total / count / math.log(2)


# ---------------------------------------------------------------- evaluation


def test_an_evaluated_job_records_the_table_and_pushes_it_in_the_card(hub) -> None:
    job_id = submit(hub, "evaluated", job_options(eval_text=TEXT))

    job = jobs.get_job(job_id)
    assert job.status is JobStatus.SUCCEEDED, job.error
    evaluation = json.loads(job.evaluation)
    rows = {row["name"]: row for row in evaluation["rows"]}
    assert list(rows) == ["alice/evaluated", *PARENTS] and evaluation["texts"] == ["pasted"]
    pushed = Path(snapshot_download("alice/evaluated", token=hub.token))
    for name, folder in [("alice/evaluated", pushed)] + [(p, p) for p in PARENTS]:
        assert rows[name]["bits_per_token"]["pasted"] == pytest.approx(bits_per_token(folder, TEXT), rel=1e-5)
        assert rows[name]["complete"] and len(rows[name]["generations"]) == len(evaluation["prompts"]) == 3
    for parent in PARENTS:  # the merge's log-probs are cached in float16: a few 1e-3 relative
        assert rows[parent]["kl_bits"]["pasted"] == pytest.approx(kl_bits(pushed, parent, TEXT), rel=5e-3)
    # the card carries the same table, one line per model
    card = (pushed / "README.md").read_text()
    assert evaluation["table"] in card
    for name in rows:
        assert f"| {name} | {rows[name]['bits_per_token']['pasted']:.4f} |" in card
    assert len(commits(hub, "evaluated")) == 2  # the repo's creation and the one upload


def test_a_job_without_evaluation_records_none_and_its_card_has_no_table(hub) -> None:
    job_id = submit(hub, "unevaluated", job_options(evaluate=False))

    job = jobs.get_job(job_id)
    assert (job.status, job.evaluation) == (JobStatus.SUCCEEDED, None)
    card = (Path(snapshot_download("alice/unevaluated", token=hub.token)) / "README.md").read_text()
    assert "bits/tok" not in card


# ---------------------------------------------------------------- review before the push


@pytest.fixture
def awaiting(hub) -> tuple[str, str]:
    """A job that merged, evaluated nothing, and waits for review; (job id, repo name)."""
    repo = f"reviewed-{time.monotonic_ns()}"
    job_id = submit(hub, repo, job_options(evaluate=False, review=True))
    assert jobs.get_job(job_id).status is JobStatus.AWAITING_REVIEW, jobs.get_job(job_id).error
    return job_id, repo


def test_a_reviewed_job_waits_with_nothing_on_the_hub_then_publish_pushes_one_commit(hub, awaiting, data_dir) -> None:
    job_id, repo = awaiting
    staged = data_dir / "staged" / job_id
    files = sorted(p.name for p in staged.iterdir())
    assert {"config.json", "README.md", "mergekit_config.yml"} <= set(files)
    assert ("model", f"alice/{repo}") not in hub.store.repos
    assert not (data_dir / "work" / job_id).exists()
    status = service.job_status(job_id, hub.token)
    assert status["review_expires_at"] == pytest.approx(status["updated_at"] + constants.REVIEW_TTL_S)

    service.publish(job_id, hub.token)  # queued again; immediate mode runs the publish task here

    job = jobs.get_job(job_id)
    assert (job.status, job.error, job.result_url) == (JobStatus.SUCCEEDED, None, f"{hub.url}/alice/{repo}")
    assert len(commits(hub, repo)) == 2  # the repo's creation and the one upload
    assert set(files) <= set(commits(hub, repo)[-1]["files"])
    assert not staged.exists()
    with pytest.raises(JobAccessError, match="not awaiting review"):
        service.discard(job_id, hub.token)


def test_discard_deletes_the_staged_merge_and_pushes_nothing(hub, awaiting, data_dir) -> None:
    job_id, repo = awaiting

    service.discard(job_id, hub.token)

    assert jobs.get_job(job_id).status is JobStatus.DISCARDED
    assert not (data_dir / "staged" / job_id).exists()
    assert ("model", f"alice/{repo}") not in hub.store.repos
    with pytest.raises(JobAccessError, match="not awaiting review"):
        service.publish(job_id, hub.token)


def test_only_the_owner_publishes_or_discards(hub, awaiting, data_dir) -> None:
    job_id, repo = awaiting
    for decide in (service.publish, service.discard):
        with pytest.raises(JobAccessError, match="belongs to another account"):
            decide(job_id, "hf_test_bob")
        with pytest.raises(JobAccessError, match="sign in as its owner"):
            decide(job_id, None)
    assert jobs.get_job(job_id).status is JobStatus.AWAITING_REVIEW
    assert (data_dir / "staged" / job_id / "config.json").is_file()
    assert ("model", f"alice/{repo}") not in hub.store.repos


def test_a_failed_publish_keeps_the_merge_for_another_try(hub, awaiting, data_dir, monkeypatch) -> None:
    job_id, repo = awaiting
    monkeypatch.setattr(hub.store, "fail_commits", 503)

    service.publish(job_id, hub.token)

    job = jobs.get_job(job_id)
    assert job.status is JobStatus.AWAITING_REVIEW
    assert job.error.startswith(f"Publishing failed: pushing to `alice/{repo}` failed on the Hub (HTTP 503"), job.error
    assert ("model", f"alice/{repo}") not in hub.store.repos  # the repo it created was deleted
    monkeypatch.setattr(hub.store, "fail_commits", None)

    service.publish(job_id, hub.token)

    assert jobs.get_job(job_id).status is JobStatus.SUCCEEDED
    assert not (data_dir / "staged" / job_id).exists()


def test_undecided_reviews_expire_and_their_merges_are_deleted(hub, awaiting, data_dir) -> None:
    job_id, _ = awaiting
    assert review.expire_reviews() == []  # not yet

    assert review.expire_reviews(now=time.time() + constants.REVIEW_TTL_S + 1) == [job_id]

    job = jobs.get_job(job_id)
    assert job.status is JobStatus.DISCARDED
    assert job.error == review.EXPIRED_MESSAGE.format(hours=24)
    assert not (data_dir / "staged" / job_id).exists()


def test_worker_start_deletes_staged_merges_no_job_awaits(hub, awaiting, data_dir) -> None:
    job_id, _ = awaiting
    stray = data_dir / "staged" / ("0" * constants.JOB_ID_LENGTH)  # a publish whose worker died: its job failed
    stray.mkdir()
    (stray / "config.json").write_text("{}")

    worker.recover_interrupted_jobs(every_worker=True)  # what a worker does when it starts (worker.main)
    worker.sweep_reviews()

    assert not stray.exists()
    assert (data_dir / "staged" / job_id / "config.json").is_file()


def test_a_merge_awaiting_review_counts_against_the_cap(hub, awaiting, monkeypatch) -> None:
    monkeypatch.setattr(constants, "MAX_JOBS_PER_USER", 1)
    with pytest.raises(JobLimitError):
        submit(hub, "over-the-cap", job_options(evaluate=False))


# ---------------------------------------------------------------- options


@pytest.mark.parametrize("kwargs, message", [
    ({"eval_dataset": "org/name:test", "eval_text": "some text"}, "choose one evaluation text"),
    ({"eval_dataset": "no-split"}, "is not a dataset split"),
    ({"eval_dataset": "../etc/passwd:x"}, "is not a dataset split"),
    ({"eval_text": "x" * (constants.MAX_PASTED_EVAL_BYTES + 1)}, "over the 65,536-byte limit"),
    ({"eval_text": "a text with hf_" + "a" * 30 + " inside"}, "looks like a Hugging Face token"),
    ({"eval_text": "the submitter's secret", "token": "secret"}, "looks like a Hugging Face token"),
    ({"eval_dataset": "hf_" + "a" * 30 + "/notes:test"}, "looks like a Hugging Face token"),  # a valid split's shape
    ({"eval_dataset": "alice/secret:test", "token": "secret"}, "looks like a Hugging Face token"),
])
def test_bad_evaluation_options_are_refused_naming_the_field(kwargs: dict, message: str) -> None:
    with pytest.raises(EvalTextError, match=message):
        job_options(**kwargs)


def test_options_round_trip_through_the_record_and_old_records_are_not_evaluated() -> None:
    options = job_options(review=True, eval_dataset=" org/name:test ")
    assert JobOptions.from_record(options.to_json()) == options
    assert options.eval_dataset == "org/name:test" and options.evaluate
    assert JobOptions.from_record(None) == JobOptions(evaluate=False)


# ---------------------------------------------------------------- the job view, through gradio_client


def test_the_job_view_shows_the_evaluation_and_publishes_through_the_api(hub, tmp_path) -> None:
    import gradio as gr
    from app_harness import served_app

    with served_app(tmp_path / "app") as (client, demo):
        queue.get_huey().immediate = True  # the app's queue file: its jobs run inside /submit and /publish
        job_id = client.predict(CONFIG, "viewed", False, False, True, True, "", TEXT, api_name="/submit")
        status = client.predict(job_id, api_name="/job_status")
        assert status["status"] == "awaiting_review", status["error"]
        assert status["options"] == {"evaluate": True, "review": True, "eval_dataset": "", "eval_text": TEXT}
        evaluation = status["evaluation"]
        models = ["alice/viewed", *PARENTS]

        table = evaluation_view.evaluation_table(evaluation)
        assert list(table["model"]) == models
        for parent in PARENTS:
            row = table[table["model"] == parent].iloc[0]
            assert row["pasted bits/tok"] == pytest.approx(bits_per_token(Path(parent), TEXT), abs=1e-4)
            assert row["KL(pasted)"] > 0
        assert table[table["model"] == "alice/viewed"].iloc[0]["KL(pasted)"] == "merge"
        bars = evaluation_view.bits_bars(evaluation)
        assert list(bars[evaluation_view.BAR_X]) == [f"{m} · pasted" for m in models]
        generations = evaluation_view.generations_table(evaluation)
        assert list(generations.columns) == ["prompt", *models] and len(generations) == 3
        assert generations.iloc[0]["alice/viewed"] == evaluation["rows"][0]["generations"][0]
        assert ("model", "alice/viewed") not in hub.store.repos

        published = client.predict(job_id, api_name="/publish")

        assert published["status"] == "succeeded" and published["result_url"].endswith("/alice/viewed")
        card = (Path(snapshot_download("alice/viewed", token=hub.token)) / "README.md").read_text()
        assert evaluation["table"] in card

        # the page's Discard button, on another job awaiting review
        other = client.predict(CONFIG, "discarded-in-page", False, False, False, True, api_name="/submit")
        publish_click, discard_click = [f.fn for f in demo.fns.values() if f.name == "on_click"]
        job_box = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "job-id")
        updates = discard_click({job_box: other}, gr.Request())
        shown = {getattr(block, "elem_id", None): update for block, update in updates.items()}
        assert "**Status:** discarded" in shown["job-state"]
        assert shown["job-review"].visible is False
        assert jobs.get_job(other).status is JobStatus.DISCARDED
        refused = publish_click({job_box: other}, gr.Request())  # too late: said in the view, buttons usable
        shown = {getattr(block, "elem_id", None): update for block, update in refused.items()}
        assert "not awaiting review (it is discarded)" in shown["job-state"] and shown["publish"].interactive


def test_the_view_shows_publish_and_discard_only_while_the_job_awaits_review() -> None:
    import gradio as gr

    evaluation = {
        "texts": ["prose", "code"], "prompts": ["The "], "merge": "m", "seconds": 1.5,
        "rows": [
            {"name": "m", "bits_per_token": {"prose": 7.0, "code": 6.5}, "tokens": {"prose": 10, "code": 12},
             "kl_bits": {}, "generations": ["cat"], "seconds": 1.0, "complete": True},
            {"name": "p", "bits_per_token": {"prose": 7.5}, "tokens": {"prose": 10}, "kl_bits": {"prose": 0.25},
             "generations": [], "seconds": 0.5, "complete": False},
        ],
    }
    with gr.Blocks():
        view = evaluation_view.build()
    waiting = view.shown({"status": "awaiting_review", "evaluation": evaluation})
    assert waiting[view.review].visible is True and waiting[view.publish_button].interactive is True
    assert waiting[view.box].visible is True
    table = waiting[view.table]
    assert list(table["model"]) == ["m", "p (time budget ran out)"]
    assert list(table["mean bits/tok"]) == [6.75, 7.5]  # the mean of the texts scored
    assert list(table["KL(prose)"]) == ["merge", 0.25] and table["KL(code)"].iloc[1] == "-"
    assert list(waiting[view.bars][evaluation_view.BAR_Y]) == [7.0, 6.5, 7.5]  # one bar per model and text scored
    generations = waiting[view.generations]
    assert (generations.value["headers"], generations.value["data"]) == (["prompt", "m", "p"], [["The ", "cat", ""]])
    assert "32 tokens scored in 1.5s" in waiting[view.summary]

    done = view.shown({"status": "succeeded", "evaluation": None})
    assert done[view.review].visible is False and done[view.box].visible is False
    assert done[view.publish_button].interactive is False


def test_publishing_a_merge_whose_staged_folder_is_gone_fails_the_job(hub, awaiting, data_dir) -> None:
    import shutil

    job_id, repo = awaiting
    shutil.rmtree(data_dir / "staged" / job_id)  # e.g. the data folder was cleaned by hand

    service.publish(job_id, hub.token)

    job = jobs.get_job(job_id)
    assert (job.status, job.error_type) == (JobStatus.FAILED, "StagedOutputError")
    assert "the staged merge is gone" in job.error
    assert ("model", f"alice/{repo}") not in hub.store.repos


def test_a_cancel_during_the_evaluation_stops_the_job_before_the_push(hub, monkeypatch) -> None:
    from merger.evaluate import score

    evaluate_models = score.evaluate_models
    scored = []

    def cancelled_first(models, texts, **kwargs):  # the owner cancels as the evaluation begins
        jobs.cancel(jobs.list_jobs(hub.user, limit=1)[0].id, hub.user)
        progress = kwargs.pop("progress")

        def slow_progress(fraction, what):
            time.sleep(worker._WRITE_INTERVAL_S)  # past the cancel flag's read interval
            scored.append(what)
            progress(fraction, what)

        return evaluate_models(models, texts, progress=slow_progress, **kwargs)

    monkeypatch.setattr(score, "evaluate_models", cancelled_first)
    job_id = submit(hub, "cancelled-in-eval", job_options(eval_text=TEXT))

    job = jobs.get_job(job_id)
    assert (job.status, job.evaluation) == (JobStatus.CANCELLED, None)
    assert scored == ["alice/cancelled-in-eval"]  # stopped before the first model was scored
    assert ("model", "alice/cancelled-in-eval") not in hub.store.repos


def test_review_with_workers_on_several_machines_needs_a_shared_staging_folder(monkeypatch) -> None:
    from merger.errors import ConfigError

    monkeypatch.setattr(constants, "REDIS_URL", "redis://127.0.0.1:1/0")
    with pytest.raises(ConfigError, match="MERGER_SHARED_STAGING"):
        job_options(review=True)
    assert job_options(review=False).review is False  # pushing at once needs no staging
    monkeypatch.setattr(constants, "SHARED_STAGING", True)
    assert job_options(review=True).review is True
