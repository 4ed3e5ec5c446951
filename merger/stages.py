"""Multi-stage merges (mergekit-multi): several `---` separated configs run in order in one job.

Every document but the last has a `name:`; a later document names an earlier one's `name:` as a model
(`model: mid`, `base_model: mid`, `source_model: mid`, `mid+adapter`). Each intermediate is written
once, into a work folder next to the output (`.OUT.stages-PID/stage-N`: the user's names never become
paths), and the folder is deleted at the end, whatever happens. The output's card and
`mergekit_config.yml` hold the whole text, so every stage's exact YAML travels with the model.
Validation plans stage by stage from metadata alone: an intermediate's metadata is the earlier
stage's planned output (its `config.json` and tensor shapes).
"""

from __future__ import annotations

import os
import shutil
from glob import escape as glob_escape
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from merger.config.schema import AnyConfig, MoEConfig
from merger.config.load import config_from_value
from merger.errors import StageError, excerpt
from merger.io.metadata import ModelMetadata, TensorMeta
from merger.config.parse import parse_config_documents

REFERENCE_KEYS = ("model", "base_model", "source_model")
MAX_NAME_CHARS = 128


@dataclass(frozen=True)
class Stage:
    """One document of a multi-stage config.

    Attributes:
        name: its `name:` (None only for the last stage).
        text: the document's own lines of the config text.
        value: the parsed document without `name:`.
    """

    name: str | None
    text: str
    value: dict


def is_multi_stage(text: str) -> bool:
    """Whether a config is multi-stage: several documents, or one with a `name:` (parses the text).

    Raises:
        ConfigError subclasses: as :func:`merger.config.parse.parse_config_documents`.
    """
    documents = parse_config_documents(text)
    return len(documents) > 1 or (len(documents) == 1 and isinstance(documents[0][0], dict) and "name" in documents[0][0])


def split_stages(text: str) -> list[Stage]:
    """The documents of a config, checked as stages (a single document is one stage).

    Raises:
        ConfigError subclasses: as :func:`merger.config.parse.parse_config_documents`.
        StageError: a stage but the last without a `name:`, a repeated or non-text name, or a stage
            naming itself or a later stage as a model.
    """
    documents = parse_config_documents(text)
    stages: list[Stage] = []
    for index, (value, document) in enumerate(documents):
        if not isinstance(value, dict):
            raise StageError(f"stage {index + 1} is not a YAML mapping; each `---` document is one merge config")
        value = dict(value)
        name = value.pop("name", None)
        if name is not None and (not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME_CHARS):
            raise StageError(f"stage {index + 1}: `name` must be a short text, got `{excerpt(name)}`")
        if name is None and index < len(documents) - 1:
            raise StageError(f"stage {index + 1} has no `name:`; every stage but the last needs one, "
                             "so later stages can name it as a model")
        if name is not None and name in {s.name for s in stages}:
            raise StageError(f"stage {index + 1}: the name `{excerpt(name)}` is used twice; give each stage its own")
        stages.append(Stage(name, document, value))
    for index, stage in enumerate(stages):
        later = {s.name for s in stages[index:]} - {None}
        used = _references(stage.value) & later
        if used:
            raise StageError(f"stage {index + 1} uses `{excerpt(sorted(used)[0])}` as a model, which is this stage "
                             "or a later one; stages run in order, so a stage can only use earlier stages")
    return stages


def stage_config(stages: list[Stage], index: int, outputs: dict[str, Path]) -> AnyConfig:
    """Stage `index`'s config with earlier stages' names replaced by their output folders."""
    return config_from_value(_substituted(stages[index].value, {k: str(v) for k, v in outputs.items()}))


def stage_text(stages: list[Stage], index: int, outputs: dict[str, Path]) -> str:
    """Stage `index` as YAML, earlier stages' names replaced by their output folders."""
    return yaml.safe_dump(_substituted(stages[index].value, {k: str(v) for k, v in outputs.items()}), sort_keys=False)


def planned_metadata(plan: Any, path: Path) -> ModelMetadata:
    """The metadata the stage planned by `plan` will write to `path`: its `config.json` and tensors."""
    tensors = {job.name: TensorMeta(tuple(job.shape), job.dtype) for job in plan.jobs}
    return ModelMetadata(reference=str(path), config=plan.output_config, tensors=tensors)


def plan_stages(text: str, token: str | None, work: Path) -> list[tuple[Any, dict[str, ModelMetadata]] | None]:
    """Plan every stage from metadata alone, an intermediate's metadata from its stage's plan.

    A stage that reads an intermediate and also needs tokenizers (a tokenizer option or a chat
    template) cannot be planned before the intermediate exists: its entry is None, and it is checked
    when it runs. So is any later stage that reads its output.

    Args:
        text: the multi-stage config.
        token: a Hub token.
        work: where the intermediates would be written (their names in the plans).

    Returns:
        One `(plan, metadata)` per stage.

    Raises:
        ConfigError subclasses (StageError among them), ModelNotFoundError, HubError, ModelFileError: the
            first stage that fails, its number in the message.
    """
    from merger.plan.entry import plan_config

    stages = split_stages(text)
    outputs = {s.name: work / f"stage-{i}" for i, s in enumerate(stages) if s.name is not None}
    known: dict[str, ModelMetadata] = {}
    plans = []
    unplanned = {str(outputs[s.name]) for s in stages if s.name is not None}
    for index, stage in enumerate(stages):
        config = stage_config(stages, index, outputs)
        reads = {ref.base.key for ref in config.referenced_models()}
        if reads & (unplanned - set(known)) or (reads & unplanned and _needs_tokenizers(config)):
            plans.append(None)
            continue
        plan, metadata = plan_config(config, token, known=known)
        plans.append((plan, metadata))
        if stage.name is not None:
            known[str(outputs[stage.name])] = planned_metadata(plan, outputs[stage.name])
    return plans


def _needs_tokenizers(config: AnyConfig) -> bool:
    from merger.plan.build import needs_vocabularies

    return not isinstance(config, MoEConfig) and needs_vocabularies(config)


def external_models(plans: list[tuple[Any, dict[str, ModelMetadata]]], work: Path) -> list[tuple[str, str | None]]:
    """`(reference, license)` of every model the stages read that is not an intermediate, in order."""
    seen: dict[str, str | None] = {}
    for plan, metadata in plans:
        for ref in plan.models:
            if not str(ref).startswith(str(work)):
                seen.setdefault(str(ref), metadata[ref.key].license)
    return list(seen.items())


def _references(value: Any) -> set[str]:
    """Every model name a config value mentions under :data:`REFERENCE_KEYS` (the model part of `a+b` too)."""
    found: set[str] = set()
    if isinstance(value, dict):
        for key, item in value.items():
            if key in REFERENCE_KEYS and isinstance(item, str):
                found.add(item.split("+", 1)[0])
            found |= _references(item)
    elif isinstance(value, list):
        for item in value:
            found |= _references(item)
    return found


def _substituted(value: Any, outputs: dict[str, str]) -> Any:
    """A copy of `value` with every reference to a stage name replaced by that stage's folder."""
    if isinstance(value, dict):
        return {key: _replace(item, outputs) if key in REFERENCE_KEYS and isinstance(item, str)
                else _substituted(item, outputs) for key, item in value.items()}
    if isinstance(value, list):
        return [_substituted(item, outputs) for item in value]
    return value


def _replace(reference: str, outputs: dict[str, str]) -> str:
    model, plus, lora = reference.partition("+")
    return outputs[model] + plus + lora if model in outputs else reference


def run_stages(text: str, out_dir: Path, run_merge: Callable[..., Any], *, token: str | None = None,
               title: str | None = None, progress: Callable[[float, str], None] | None = None, **options: Any) -> Any:
    """Run a multi-stage config into `out_dir`: stages in order, intermediates deleted at the end.

    Args:
        text: the config (several `---` documents).
        out_dir: the final output folder (as :func:`merger.engine.run_merge`).
        run_merge: runs one stage: :func:`merger.engine.run_merge` (passed in, since the engine calls this).
        token: a Hub token.
        title: the card's title.
        progress: called with (fraction of all stages done, `stage N: tensor`).
        options: passed to every stage's :func:`merger.engine.run_merge` (`device`, `shard_size`, `seed`,
            `should_cancel`).

    Returns:
        The last stage's :class:`merger.engine.MergeResult`.

    Raises:
        As :func:`plan_stages` (before any stage runs) and :func:`merger.engine.run_merge`.
    """
    work = out_dir.resolve().parent / f".{out_dir.name}.stages-{os.getpid()}"
    _remove_stale_work(work)
    plan_stages(text, token, work)  # every stage checked (where metadata allows) before the first runs
    stages = split_stages(text)
    outputs = {s.name: work / f"stage-{i}" for i, s in enumerate(stages) if s.name is not None}
    result = None
    try:
        for index, stage in enumerate(stages):
            last = index == len(stages) - 1
            target = out_dir if last else outputs[stage.name]

            def staged(fraction: float, name: str, index: int = index) -> None:
                if progress:
                    progress((index + fraction) / len(stages), f"stage {index + 1}/{len(stages)}: {name}")

            result = run_merge(stage_text(stages, index, outputs), target, token=token, title=title,
                               progress=staged, **options)
        from merger.plan.entry import plan_config

        # every stage as it ran (the intermediates exist now), for the card's model list and licenses
        ran = [plan_config(stage_config(stages, i, outputs), token) for i in range(len(stages))]
        _write_card(out_dir, text, ran, work, title or out_dir.name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return result


def _remove_stale_work(work: Path) -> None:
    """Delete the work folders of earlier runs into the same output whose process is gone (killed runs)."""
    prefix = work.name.rsplit("-", 1)[0] + "-"
    for entry in work.parent.glob(f"{glob_escape(prefix)}*"):
        pid = entry.name.removeprefix(prefix)
        if pid.isdigit() and entry.is_dir() and not entry.is_symlink() and not _alive(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _write_card(out_dir: Path, text: str, plans: list, work: Path, title: str) -> None:
    """The card and `mergekit_config.yml` of the whole multi-stage config (not the last stage's alone)."""
    from merger.plan.multimodal import is_multimodal
    from merger.publish.card import render_model_card
    from merger.constants import CARD_FILE, MERGE_CONFIG_FILE
    from merger.plan.remote_code import needs_remote_code

    final, _ = plans[-1]
    models = external_models(plans, work)
    base = str(final.base_model) if final.base_model and not str(final.base_model).startswith(str(work)) else None
    card = render_model_card(
        title=title,
        yaml_text=text,
        method_name=f"a {len(plans)}-stage merge ending in {final.pretty_name}",
        method_url=final.reference_url,
        base_model=base,
        models=[m for m, _ in models],
        licenses=[license_ for _, license_ in models],
        moe=final.method_name == "moe",
        mention_base=final.method_name != "slerp",
        remote_code=needs_remote_code(final.output_config, out_dir),
        multimodal=is_multimodal(final.output_config),
    )
    (out_dir / CARD_FILE).write_text(card)
    (out_dir / MERGE_CONFIG_FILE).write_text(text)
