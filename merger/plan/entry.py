"""The one entry to planning: a parsed config (either schema) and the models' metadata -> a plan.

The engine, the validator and the worker all plan through :func:`plan_config`; nothing here reads
weights (metadata are config.json and safetensors headers; tokenizers only where the config needs them).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace

from merger.config.schema import PROMPT_GATE_MODES, AnyConfig, ModelReference, MoEConfig
from merger.io.metadata import ModelMetadata
from merger.io.resolve import embedding_rows, fetch_metadata, fetch_vocabularies, local_path
from merger.plan.build import build_plan, needs_vocabularies
from merger.plan.merge import MergePlan
from merger.plan.moe import build_moe_plan, check_tokenizer_fits
from merger.plan.prompt_tokens import check_prompt_tokens
from merger.plan.settings_process import SettingsProcess
from merger.plan.tokenizer import Vocabulary, load_vocabulary
from merger.publish import hub_read


def plan_config(
    config: AnyConfig, token: str | None, known: dict[str, ModelMetadata] | None = None, *, settle: bool = True
) -> tuple[MergePlan, dict[str, ModelMetadata]]:
    """Plan either schema (mergekit merge or mergekit-moe) from metadata, fetching no weights.

    Args:
        config: a config from :func:`merger.config.load.load_config`.
        token: a Hub token for private or gated models, or None.
        known: metadata of models not written yet (a multi-stage config's intermediates), by model key.
        settle: run the plan's `class_settings` now (:func:`settled`); False leaves them to the caller
            (the engine runs them beside the merge).

    Returns:
        The plan, and every referenced model's metadata (canonical key -> metadata).

    Raises:
        ConfigProblems / ConfigError, ArchitectureError: the config does not fit the models.
        ModelNotFoundError, UnsafeWeightsError, HubError: a model could not be read.
    """
    refs = config.referenced_models()
    known = known or {}
    metadata = fetch_metadata([r for r in refs if r.base.key not in known], token)
    metadata.update({r.key: known[r.base.key] for r in refs if r.base.key in known})
    return plan_from_metadata(config, metadata, token, settle=settle), metadata


def plan_from_metadata(
    config: AnyConfig, metadata: dict[str, ModelMetadata], token: str | None, *, settle: bool = True
) -> MergePlan:
    """The second half of :func:`plan_config`, for a caller that fetched every model's metadata itself
    (the service reports reaching the models and fitting them together as two checklist lines);
    `settle` as there.

    Raises:
        ConfigProblems / ConfigError, ArchitectureError: the config does not fit the models.
        HubError: a tokenizer the config needs could not be read.
    """
    refs = config.referenced_models()
    if isinstance(config, MoEConfig):
        plan = build_moe_plan(config, metadata)
        vocabulary = _tokenizer_if_any(next(ref for ref in refs if ref.key == plan.tokenizer_donor), metadata, token)
        if vocabulary is not None:  # a donor without a tokenizer writes none
            check_tokenizer_fits(plan, vocabulary)
        _check_prompts(plan, token)
        return settled(plan) if settle else plan
    vocabs = fetch_vocabularies(refs, metadata, token) if needs_vocabularies(config) else None
    return build_plan(config, metadata, vocabs)


def settled(plan: MergePlan) -> MergePlan:
    """`plan` with its output config's `class_settings` run (:class:`merger.plan.settings.ClassSettings`),
    or `plan` itself when none are pending.

    Raises:
        ArchitectureSettingError / ConfigProblems: the output would compute a setting of the base otherwise.
    """
    if plan.class_settings is None:
        return plan
    return replace(plan, output_config=plan.class_settings.apply(plan.output_config), class_settings=None)


# How long :func:`settling_apart`'s child may take before the step runs in this process instead (seconds).
# It takes about 2 s (4 s forked before torch, which it then imports too); a child that never answers
# (stuck on a lock a thread of this process held as it forked) then costs this wait, never a wrong config.
SETTLE_CHILD_TIMEOUT_S = 60.0


@contextmanager
def settling_apart(plan: MergePlan, process: SettingsProcess | None = None) -> Iterator[Callable[[], MergePlan]]:
    """Run the plan's `class_settings` in a child process (:class:`SettingsProcess`) while this one merges.

    Enter before the merge starts its threads, so that none of them holds a lock as the child forks.

    Args:
        plan: a plan from :func:`plan_config` with `settle=False`.
        process: a child started earlier (the command line forks one before importing torch); taken
            over here, and killed at once when the plan has no step pending. None: one is forked now.

    Yields:
        A function that waits for the child and returns :func:`settled`'s plan (the same config). Where
        the child cannot be forked, dies, or does not answer within `SETTLE_CHILD_TIMEOUT_S`, the step
        runs in this process, where any error it meets is raised as from :func:`settled`.
        Nothing to wait for when no step is pending. The child is killed on exit.

    Raises:
        ArchitectureSettingError / ConfigProblems: from the yielded function, as :func:`settled`.
    """
    if plan.class_settings is None:
        if process is not None:
            process.close()  # its imports would take a core from the merge for nothing
        yield lambda: settled(plan)
        return
    request = (plan.class_settings, plan.output_config)
    if process is not None:
        process.ask(request)
    else:
        process = SettingsProcess.start(request)
    if process is None:
        yield lambda: settled(plan)
        return

    def wait() -> MergePlan:
        answered = process.answer(SETTLE_CHILD_TIMEOUT_S)
        if answered is None:
            return settled(plan)
        config, refusals = answered
        plan.class_settings.refuse(refusals)
        return replace(plan, output_config=config, class_settings=None)

    with process:
        yield wait


def _check_prompts(plan: MergePlan, token: str | None) -> None:
    """A prompt-routed MoE's prompts through the base's tokenizer (its tokenizer files only): a prompt over
    the caps is refused now, not on the worker after every model is downloaded."""
    gate = next((job for job in plan.jobs if job.method == "gate"
                 and job.global_params["gate_mode"] in PROMPT_GATE_MODES), None)
    if gate is None:
        return
    base = plan.base_model.base
    check_prompt_tokens(local_path(base) or hub_read.download_tokenizer(str(base), token=token),
                        gate.global_params["prompts"])


TOKENIZER_VOCABULARY_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")


def _tokenizer_if_any(ref: ModelReference, metadata: dict[str, ModelMetadata], token: str | None) -> Vocabulary | None:
    """The model's tokenizer vocabulary (Hub: tokenizer files only), or None when it ships no tokenizer."""
    path = local_path(ref.base) or hub_read.download_tokenizer(str(ref.base), token=token)
    if not any((path / name).is_file() for name in TOKENIZER_VOCABULARY_FILES):
        return None
    return load_vocabulary(path, embedding_rows(metadata[ref.key]), str(ref.base))
