"""The worker's one door to the engine: a job's push target checked, its merge, its evaluation, its push.

The worker (:mod:`merger.jobs.worker`) owns the queue and the job records; it calls :func:`run_job`
for a queued job and :func:`publish_staged` for a reviewed one, and passes :class:`JobHooks` for
everything that touches the records (progress, the cancel flag, the note of a repo about to be
created, the evaluation). This module imports nothing from `merger.jobs`, so the worker -> service
edge is the only one between the two (tests/test_module_graph.py).

Order of a job: evaluation text read (a bad dataset fails before any download) -> push target checked
(the Hub may have changed while the job was queued) -> merge into `out_dir`, the evaluation run on the
staged output before it is moved into place (its table goes into the card) -> the last cancel check ->
pushed, or moved to the review folder when the owner asked to review it first.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from merger import constants, engine
from merger.errors import EvalModelError, EvalTextError, MergeCancelled, MergerError, StagedOutputError
from merger.io.writer import OnShard
from merger.publish import hub_push, stream_push
from merger.publish.hub_push import delete_unpushed_repo  # the worker's sweep of repos never committed to
from merger.service.options import JobOptions

if TYPE_CHECKING:
    from merger.evaluate.score import EvalResult
    from merger.evaluate.text import EvalText
    from merger.jobs.store import Job

__all__ = ["JobHooks", "delete_unpushed_repo", "publish_staged", "run_job"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobHooks:
    """What the worker lets a job's run touch.

    Attributes:
        progress: called with (fraction done 0–1, what is being done).
        should_cancel: polled before each tensor (it may answer from a recent read); True stops the job.
        cancelled: the cancel flag read now: the last check before the push, which cannot be stopped.
        before_create: called with the repo id just before the push creates it (the worker notes it, so
            that a worker killed mid-upload leaves the note for the next one's sweep).
        on_evaluation: called with the evaluation as JSON-able data (:meth:`EvalResult.as_record`).
    """

    progress: Callable[[float, str], None]
    should_cancel: Callable[[], bool]
    cancelled: Callable[[], bool]
    before_create: Callable[[str], None]
    on_evaluation: Callable[[dict[str, Any]], None]


def run_job(job: Job, token: str, out_dir: Path, staged: Path, hooks: JobHooks) -> str | None:
    """Merge a job's config into `out_dir`, evaluate it if asked, then push it, or stage it for review.

    Args:
        job: the job's record (config, target repo, visibility, options).
        token: the owner's Hub token (never logged).
        out_dir: the merge's output folder (it must not exist; the worker deletes its parent afterwards).
        staged: where the output waits when the owner asked to review it (moved there whole).
        hooks: see :class:`JobHooks`.

    Returns:
        The pushed repo's URL, or None when the output was staged for review.

    Raises:
        MergerError subclasses: refusals and failures; those raised before the push carry
            `before_push = True` (the Hub was not touched). MergeCancelled: cancelled before the push.
    """
    options = JobOptions.from_record(job.options)
    if options.review:
        _merge(job, options, token, out_dir, hooks, title=None)
        _stop_if_cancelled(hooks, "its staging")
        staged.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staged, ignore_errors=True)
        out_dir.rename(staged)  # same data folder, so a rename: the staged output is whole or absent
        logger.info("Job %s: the merge awaits review; nothing was pushed.", job.id)
        return None
    # Pushed at once: each shard is uploaded while the next is merged, then deleted; the commit at the end
    # makes them visible. Leaving the block with an error deletes the repo if this push created it.
    stream = stream_push.StreamPush(job.repo_id, token, private=job.private, reuse_repo=job.reuse_repo,
                                    before_create=hooks.before_create)
    with stream:
        _merge(job, options, token, out_dir, hooks, title=stream.target.repo_id, on_shard=stream)
        _stop_if_cancelled(hooks, "its commit")
        logger.info("Job %s: uploading to %s.", job.id, stream.target.repo_id)
        url = stream.commit(out_dir)
    logger.info("Job %s: pushed %s", job.id, url)
    return url


def _merge(job: Job, options: JobOptions, token: str, out_dir: Path, hooks: JobHooks, title: str | None,
           on_shard: OnShard | None = None) -> None:
    """The merge (and its evaluation, before any shard is handed on); failures say whether the Hub was touched.
    `title`: the checked target repo's id, or None to check the target here (the Hub may have changed while
    the job was queued)."""
    try:
        evaluate = _evaluator(job, options, token, hooks)
        if title is None:
            title = hub_push.check_push_target(job.repo_id, token, private=job.private, reuse_repo=job.reuse_repo).repo_id
        logger.info("Job %s: merging for %s.", job.id, title)
        engine.run_merge(
            job.config_yaml, out_dir, token=token,
            title=title,  # the card's heading and usage snippet name the repo people load
            progress=hooks.progress, should_cancel=hooks.should_cancel, evaluate=evaluate, on_shard=on_shard,
        )
    except (EvalModelError, EvalTextError) as err:
        failed = type(err)(f"the merge's evaluation failed: {err}; submit the job again with evaluation off to push "
                           "it unevaluated")
        failed.before_push = True  # the worker's message says the Hub was not touched
        raise failed from None
    except MergerError as err:
        err.before_push = not getattr(err, "from_push", False)  # an upload's failure says what is on the Hub
        raise


def _stop_if_cancelled(hooks: JobHooks, step: str) -> None:
    """The last point where a cancel takes effect: a commit cannot be stopped half-way."""
    if hooks.cancelled():
        raise MergeCancelled(f"the merge was cancelled before {step}; nothing was pushed")


def publish_staged(job: Job, token: str, staged: Path, before_create: Callable[[str], None]) -> str:
    """Push a reviewed job's staged output (the owner published it); the target is checked again first.

    Returns:
        The pushed repo's URL. The staged folder is left for the caller (deleted once the job succeeded).

    Raises:
        PushTargetError, HubError: as :func:`merger.publish.hub_push.check_push_target` and `push_folder`.
        StagedOutputError: the staged output is gone.
    """
    if not (staged / "config.json").is_file():
        raise StagedOutputError("the staged merge is gone from the worker's data folder; submit the job again")
    hub_push.check_push_target(job.repo_id, token, private=job.private, reuse_repo=job.reuse_repo)
    return push(staged, job, token, before_create)


def push(folder: Path, job: Job, token: str, before_create: Callable[[str], None]) -> str:
    """The push step: `folder` as one commit to the job's repo; returns the repo's URL."""
    logger.info("Job %s: uploading to %s.", job.id, job.repo_id)
    url = hub_push.push_folder(folder, job.repo_id, token, private=job.private, reuse_repo=job.reuse_repo,
                               before_create=before_create)
    logger.info("Job %s: pushed %s", job.id, url)
    return url


def _evaluator(job: Job, options: JobOptions, token: str, hooks: JobHooks) -> Callable[[Path, dict[str, Path]], str] | None:
    """The `evaluate` hook of `run_merge` for this job, or None when the job is not evaluated."""
    from merger.evaluate.score import EvalBudget, merge_evaluator
    from merger.stages import is_multi_stage

    if not options.evaluate:
        return None
    if is_multi_stage(job.config_yaml):
        logger.info("Job %s: multi-stage configs are not evaluated yet; the merge is pushed without a table.", job.id)
        return None
    texts = eval_texts(options, token)
    budget = EvalBudget(tokens_per_text=constants.JOB_EVAL_TOKENS_PER_TEXT, seconds=constants.JOB_EVAL_SECONDS)

    def progress(fraction: float, what: str) -> None:
        if hooks.should_cancel():  # between models: a cancel need not wait for the whole evaluation
            raise MergeCancelled("the job was cancelled during its evaluation; nothing was pushed")
        hooks.progress(1.0, f"evaluating: {what}")

    def recorded(result: EvalResult) -> None:
        logger.info("Job %s: evaluated %d models in %.1fs.", job.id, len(result.rows), result.seconds)
        hooks.on_evaluation(result.as_record())

    return merge_evaluator(job.repo_id, texts, budget=budget, device=engine.pick_device("auto"), progress=progress,
                           on_result=recorded)


def eval_texts(options: JobOptions, token: str | None) -> list[EvalText]:
    """The texts a job is evaluated on: the pasted text, the named Hub dataset split, or the shipped set.

    Raises:
        EvalTextError: the dataset split cannot be read or holds no text.
    """
    from merger.evaluate.text import EvalText, dataset_texts, default_texts

    if options.eval_text:
        return [EvalText("pasted", options.eval_text)]
    if options.eval_dataset:
        return dataset_texts(options.eval_dataset, token)
    return default_texts()
