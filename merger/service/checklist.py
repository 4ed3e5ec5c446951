"""The pre-flight checklist: everything that can be known before Merge, from metadata only."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from merger import constants
from merger.errors import (
    AdapterModelError,
    ArchitectureSettingError,
    BaseModelError,
    ConfigProblems,
    GgufOnlyError,
    HubError,
    LayerRangeError,
    MergerError,
    ModelCountError,
    ModelNotFoundError,
    QuantizedWeightsError,
    ShapeMismatchError,
    UnmergedTensorsError,
    UnsafeWeightsError,
    ValidationTimeoutError,
    VocabSizeError,
    excerpt,
)
from merger.scrub import scrub
from merger.service.configs import checked, models_of, parsed

# What the time estimate assumes (the worker's measured order of magnitude, see README "speed").
DOWNLOAD_BYTES_PER_S = 50e6
MERGE_BYTES_PER_S = 200e6


@dataclass(frozen=True)
class CheckLine:
    """One line of the pre-flight checklist.

    Attributes:
        name: what was checked (`models`, `compatibility`, `target repo`, `resources`).
        ok: whether it passes.
        detail: what was found (a passing line says what; a failing one what is wrong).
        fix: for a failing line, what to change in the form.
    """

    name: str
    ok: bool
    detail: str
    fix: str = ""


@dataclass(frozen=True)
class Preflight:
    """The checklist shown before Merge is enabled; Merge is enabled only when `ok`."""

    lines: tuple[CheckLine, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        """Every line passes (and there is at least one)."""
        return bool(self.lines) and all(line.ok for line in self.lines)


def preflight(yaml_text: str, token: str | None, repo_id: str, private: bool, reuse_repo: bool,
              evaluate: bool = True, review: bool = False) -> Preflight:
    """The checklist for a config and a push target, from metadata only (no weights are fetched).

    `evaluate`: the job will be evaluated before its push (its inputs are then downloaded whole; without,
    the merge streams from and to the Hub: see the `resources` line). `review`: the merge waits on the
    worker's disk for its owner's publish (its output is kept whole).

    Lines: `config` (parses), `models` (every model reachable with the caller's rights),
    `compatibility` (architectures, shapes, layer ranges, vocabularies), `target repo` (valid,
    writable, new or explicitly reused) and `resources` (download, output, peak memory and time
    next to the worker's free disk and RAM). Each problem is a failing line of its own with the fix in
    the form's words; tensors a merge would drop are named one by one (the first ten, then a count). A
    line that cannot be checked because an earlier one failed is left out.
    """
    lines: list[CheckLine] = []
    try:
        config = parsed(yaml_text, token)  # parsing alone is cheap: a broken config is named before any Hub call
    except MergerError as err:
        lines.extend(CheckLine("config", False, _short(p), "fix the field it names in the form or the YAML")
                     for p in _each_problem(err))
        return Preflight((*lines, _target_line(repo_id, token, private, reuse_repo)))
    lines.append(CheckLine("config", True, "the config parses"))
    try:
        models = models_of(yaml_text, token, config)
    except MergerError as err:
        lines.append(CheckLine("models", False, _short(err), _models_fix(err)))
        return Preflight((*lines, _target_line(repo_id, token, private, reuse_repo)))
    if models.config is None:  # multi-stage: checked whole; each stage is planned from the one before it
        report = models.report
        lines.append(CheckLine("models", True, f"{len(report.models)} model(s) reachable: " + ", ".join(f"`{m}`" for m in report.models)))
        lines.append(CheckLine("compatibility", True, report.summary().replace("\n", "; ")))
        return Preflight((*lines, _target_line(repo_id, token, private, reuse_repo)))
    lines.append(CheckLine("models", True, _models_summary(models.metadata)))
    try:
        result = checked(yaml_text, token)
    except MergerError as err:
        lines.extend(_compatibility_lines(err))
        return Preflight((*lines, _target_line(repo_id, token, private, reuse_repo)))
    lines.append(CheckLine("compatibility", True, _plan_summary(result.plan)))
    lines.append(_target_line(repo_id, token, private, reuse_repo))
    lines.append(_resources_line(result.plan, result.metadata, evaluate, review))
    return Preflight(tuple(lines))


def _models_summary(metadata: dict[str, Any]) -> str:
    """`N model(s) reachable: `id` (architecture, parameters, license), ...`."""
    parts = []
    for meta in metadata.values():
        architecture = (meta.config.get("architectures") or ["unknown architecture"])[0]
        count = sum(t.numel for t in meta.tensors.values())
        parts.append(f"`{meta.reference}` ({architecture}, {_count(count)} parameters, license {meta.license or 'unknown'})")
    return f"{len(metadata)} model(s) reachable: " + ", ".join(parts)


def _plan_summary(plan: Any) -> str:
    architecture = (plan.output_config.get("architectures") or ["?"])[0]
    text = f"{plan.pretty_name}: {architecture}, {plan.num_layers} layers, {_count(plan.parameter_count)} parameters"
    return "; ".join([text, *(f"note: {w}" for w in plan.warnings)])


SHOWN_TENSORS = 10  # tensors a line names before "and N more"

# The fix in the form's own words for each kind of problem, most specific class first.
FORM_FIXES: tuple[tuple[type[MergerError], str], ...] = (
    (VocabSizeError, "open the form's Options and set tokenizer_source to `union` (every model's tokens) or "
                     "`base` (the base model's), so the vocabularies are aligned"),
    (UnmergedTensorsError, "pick models of the base model's family in the form (or, to merge without those "
                           "tensors, add `drop_unknown_tensors: true` to the YAML)"),
    (ArchitectureSettingError, "pick models of one family in the form, or make the base model one of the "
                               "same family as the others"),
    (ShapeMismatchError, "pick models of one architecture and size in the form"),
    (LayerRangeError, "set each slice's start and end in the form within the models' layers (the end is "
                      "exclusive), or pick models with equal layer counts"),
    (BaseModelError, "pick a Base model in the form (one of the models merged)"),
    (ModelCountError, "add models (+ Add model) or remove them (✕) in the form, or pick another method"),
    (GgufOnlyError, "pick the original safetensors model in the form (its card's `base_model` usually names it)"),
    (QuantizedWeightsError, "pick the full-precision model it was quantised from in the form"),
    (UnsafeWeightsError, "pick a revision or model with `*.safetensors` weights in the form"),
    (AdapterModelError, "write the adapter after its base in the model box, as `BASE+ADAPTER`, or pick a full model"),
    (ValidationTimeoutError, "try again in a moment; fewer or smaller models check faster"),
    (HubError, "nothing to change in the form: the Hub did not answer; try again in a moment"),
)


def _form_fix(err: MergerError, default: str) -> str:
    for kind, fix in FORM_FIXES:
        if isinstance(err, kind):
            return fix
    return default


def _models_fix(err: MergerError) -> str:
    if isinstance(err, ModelNotFoundError) and "is gated" in str(err):
        return "accept the model's terms on its Hub page and sign in with that account, or pick another model"
    return _form_fix(err, "check the model ids in the form (the suggestions list what exists); for a private "
                          "model, sign in with an account that can read it")


def _compatibility_lines(err: MergerError) -> list[CheckLine]:
    """One failing `compatibility` line per problem, each with its fix; dropped tensors named one by one."""
    default = "change the models, layer ranges or parameters the message names, in the form"
    return [CheckLine("compatibility", False, _problem_text(p), _form_fix(p, default)) for p in _each_problem(err)]


def _each_problem(err: MergerError) -> list[MergerError]:
    return list(err.problems) if isinstance(err, ConfigProblems) else [err]


def _problem_text(err: MergerError) -> str:
    if isinstance(err, UnmergedTensorsError) and err.tensors:
        names = ", ".join(f"`{excerpt(n, 120)}`" for n in err.tensors[:SHOWN_TENSORS])
        more = f" and {len(err.tensors) - SHOWN_TENSORS} more" if len(err.tensors) > SHOWN_TENSORS else ""
        return (f"`{excerpt(err.model, 120)}` has {len(err.tensors)} tensor(s) the output cannot hold, so the merge "
                f"would drop them: {names}{more}")
    return _short(err)


def _target_line(repo_id: str, token: str | None, private: bool, reuse_repo: bool) -> CheckLine:
    repo_id = (repo_id or "").strip()
    if not repo_id:
        return CheckLine("target repo", False, "no repo named", "type a name in “New model repo”, e.g. `my-merge`")
    if not token:
        return CheckLine("target repo", False, "signed out", "sign in with Hugging Face to push the result")
    from merger.publish.hub_push import check_push_target

    try:
        target = check_push_target(repo_id, token, private=bool(private), reuse_repo=bool(reuse_repo))
    except MergerError as err:
        fix = "tick “reuse existing repo” or choose a new name" if "exists" in str(err) else "choose another repo name"
        return CheckLine("target repo", False, _short(err), fix)
    state = "exists, a new commit will be pushed (reuse)" if target.exists else "new"
    visibility = "private" if target.private else "public"
    return CheckLine("target repo", True, f"`{target.repo_id}`: {state}, {visibility}")


def _resources_line(plan: Any, metadata: dict[str, Any], evaluate: bool = True, review: bool = False) -> CheckLine:
    """Download, disk, memory and time next to the worker's free disk and RAM.

    Without an evaluation the worker reads only the tensors the plan uses (by byte ranges) and, unless the
    merge waits for review (kept whole), uploads each shard as it is written, so its disk holds the shard
    being written and those waiting to upload; an evaluation runs the parents and the merge, so the
    inputs are downloaded whole and the output is kept.
    """
    from merger.dtypes import DTYPE_SIZES
    from merger.publish.stream_push import MAX_PENDING_SHARDS

    def size(meta: Any, name: str) -> int:
        return meta.tensors[name].numel * DTYPE_SIZES.get(meta.tensors[name].dtype, 4)

    output = sum(job.nbytes for job in plan.jobs)
    if evaluate:
        download = sum(size(meta, name) for meta in metadata.values() for name in meta.tensors)
        on_disk = download + output
    else:
        read = {(s.model, s.name) for job in plan.jobs for s in [*job.sources, *([job.base] if job.base else [])]}
        download = sum(size(metadata[key], name) for key, name in read)
        on_disk = output if review else min(output, (MAX_PENDING_SHARDS + 1) * constants.DEFAULT_SHARD_SIZE)
    largest = max((job.nbytes // max(1, DTYPE_SIZES.get(job.dtype, 4)) for job in plan.jobs), default=0)
    inputs = max((len(job.sources) + (job.base is not None) for job in plan.jobs), default=1)
    peak = largest * 4 * (inputs + 2)  # float32 copies of one tensor's inputs, the output and a temporary
    if evaluate:  # the evaluation loads one model at a time in float32: the largest of the parents and the merge
        counts = [plan.parameter_count, *(sum(t.numel for t in meta.tensors.values()) for meta in metadata.values())]
        peak = max(peak, 4 * max(counts))
    seconds = download / DOWNLOAD_BYTES_PER_S + output / MERGE_BYTES_PER_S
    disk = shutil.disk_usage(_existing_parent(constants.DATA_DIR)).free
    ram = _available_ram()
    detail = (
        f"download {_bytes(download)}, output {_bytes(output)} ({_bytes(on_disk)} on disk at once), peak memory "
        f"~{_bytes(peak)}, about {_duration(seconds)}; the worker has {_bytes(disk)} disk and {_bytes(ram)} RAM free"
    )
    if on_disk > disk:
        fix = "remove models in the form (✕), pick smaller ones, or merge a layer range (slices)"
        return CheckLine("resources", False, detail, fix + ("; or untick “evaluate” (the merge then streams)" if evaluate else ""))
    if ram and peak > ram:
        fix = "remove models in the form (✕) or pick smaller ones"
        return CheckLine("resources", False, detail, fix + ("; or untick “evaluate”" if evaluate else ""))
    return CheckLine("resources", True, detail)


def _existing_parent(path: Path) -> Path:
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _available_ram() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def _short(err: Exception, limit: int = 600) -> str:
    text = scrub(str(err))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{max(1, round(seconds))} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
