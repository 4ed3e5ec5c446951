"""run_merge(): plan, fetch, then merge tensor by tensor into a complete output folder. No Hub pushes, no UI."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from merger.plan.multimodal import is_multimodal
from merger.publish.card import render_model_card
from merger.config.schema import SEED, AnyConfig
from merger.config.load import load_config
from merger.constants import (
    CARD_FILE,
    CONFIG_FILE,
    DEFAULT_SHARD_SIZE,
    GENERATION_CONFIG_FILE,
    MERGE_CONFIG_FILE,
    PROCESSOR_FILES,
    SAFETENSORS_INDEX_FILE,
    TOKENIZER_FILES,
)
from merger.errors import ConfigError, DiskSpaceError, MergeCancelled, MergerError
from merger.execute.executor import Progress, execute_plan
from merger.io.metadata import ModelMetadata
from merger.plan.merge import MergePlan
from merger.plan.remote_code import needs_remote_code, remote_code_files
from merger.io.resolve import materialize, materialize_adapters, stream_sources
from merger.io.sources import WeightSource
from merger.stages import is_multi_stage, run_stages
from merger.io.tokenizer_files import write_tokenizer
from merger.plan.entry import plan_config, settling_apart
from merger.plan.settings_process import SettingsProcess
from merger.io.writer import OnShard, format_bytes, output_error

logger = logging.getLogger(__name__)

# room for what a merge writes besides tensors (headers, index, tokenizer, card), bytes
OUTPUT_EXTRA_BYTES = 16 * 2**20
_STAGING = re.compile(r"\..+\.(partial|old)-([0-9]+)")


@dataclass(frozen=True)
class MergeResult:
    """What a finished merge wrote.

    Attributes:
        out_dir: the output folder.
        method: the `merge_method` (`moe` for MoE configs).
        num_layers: decoder layers written.
        parameter_count: parameters written.
        seconds: wall time of the whole run.
    """

    out_dir: Path
    method: str
    num_layers: int
    parameter_count: int
    seconds: float


def pick_device(device: str) -> torch.device:
    """`auto` -> CUDA when available, else CPU; `cpu` / `cuda` as given.

    Raises:
        ConfigError: `cuda` was asked for on a machine without a CUDA device.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device != "cpu" and not (device == "cuda" or device.startswith("cuda:") and device[5:].isdigit()):
        raise ConfigError(f"`--device {device}` is not a device; use `auto`, `cpu`, `cuda` or `cuda:N`")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"`--device {device}`: no CUDA device is available here; use `--device cpu` or `auto`")
    return torch.device(device)


def run_merge(
    config_text: str,
    out_dir: Path,
    *,
    device: str = "auto",
    token: str | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    title: str | None = None,
    seed: int | None = None,
    progress: Progress | None = None,
    should_cancel: Callable[[], bool] | None = None,
    evaluate: Callable[[Path, dict[str, Path]], str] | None = None,
    config: AnyConfig | None = None,
    planned: tuple[MergePlan, dict[str, ModelMetadata]] | None = None,
    on_shard: OnShard | None = None,
    settings_process: SettingsProcess | None = None,
) -> MergeResult:
    """Merge the models of a YAML config into `out_dir` (a complete Hugging Face model folder).

    The config is checked against the models' metadata before any weight is read (an MoE's class settings
    run beside the merge: :func:`_planned`). Hub weights are read by byte ranges, only those the plan needs,
    ahead of the math (:mod:`merger.publish.hub_ranges`); with `evaluate`, downloaded whole (it runs the
    parents). The output is written to a temporary sibling folder, moved to `out_dir` once complete.

    Args:
        config_text: the YAML config (mergekit or mergekit-moe schema).
        out_dir: the output folder; it must not exist, be empty, or hold only files a merge writes
            (an earlier output, which is replaced as a whole).
        device: `auto`, `cpu` or `cuda[:n]`: where the math runs (float32).
        token: a Hub token for private or gated models (never logged).
        shard_size: bytes of tensor data per safetensors shard.
        title: the model card's title (defaults to the folder's name).
        seed: seed of DARE/DELLA masks and random gates; overrides the config's `seed` (default 0).
        progress: called after each tensor with (fraction done 0–1, tensor name).
        should_cancel: polled before each tensor; True stops the run with :class:`MergeCancelled`.
        evaluate: called with the staged output folder and the input folders (key -> folder; `model+lora`
            inputs, whose folder is the base's, left out) before the output is moved into place; it
            returns markdown for the card's Evaluation section (see :mod:`merger.evaluate`).
        config: `load_config(config_text)`, when the caller has parsed it already (not parsed again).
        planned: `plan_config(config, token)`, when the caller has planned it already (not planned
            again; the models must not have changed since).
        on_shard: called with each weight shard's path and sha256 once it is complete, while the next is
            merged (`StreamPush` uploads and deletes it: room for a few shards suffices, and those taken are
            absent from `out_dir`); with `evaluate`, after it (it reads them all), with None for the sha256.
        settings_process: an MoE's class settings' process forked earlier (the CLI's, forked before
            torch is imported), taken over; None: one is forked if the plan needs it.

    Returns:
        A :class:`MergeResult`.

    Raises:
        MergerError subclasses: config problems, missing models, pickle-only weights, Hub failures,
            cancellation. Nothing is left at `out_dir` on failure.
        DiskSpaceError: less free space than the output needs (checked before any download), or a full disk.
        OutputWriteError: the OS refused another write (the path and its reason).
        NonFiniteWeightsError / NonFiniteOutputError: a merged tensor would hold NaN or inf.
    """
    if config is None and is_multi_stage(config_text):  # mergekit-multi: each stage is a run_merge of its own
        if evaluate is not None:
            raise ConfigError("`--eval` does not evaluate multi-stage configs yet; after the merge, run "
                              "`python -m merger eval OUT PARENT... --merge OUT`")
        return run_stages(config_text, out_dir, run_merge, device=device, token=token, shard_size=shard_size, title=title,
                          seed=seed, progress=progress, should_cancel=should_cancel)
    started = time.monotonic()
    config = load_config(config_text) if config is None else config
    SEED.check("--random-seed", seed)
    _check_out_dir(out_dir)
    _refuse_input_folders(out_dir, config)
    plan, metadata = _planned(config, token, planned, seed, settle=evaluate is not None)
    needed = sum(job.nbytes for job in plan.jobs)  # shards handed on as they finish: a few at a time on disk
    needed = (min(needed, 3 * shard_size) if on_shard is not None else needed) + OUTPUT_EXTRA_BYTES
    remove_stale_staging(out_dir.parent)
    check_free_space(out_dir, needed)
    with settling_apart(plan, settings_process) as settle:  # forked before the merge's threads start (see there)
        folders, weights, adapters = _inputs(plan, metadata, token, whole=evaluate is not None)
        _write_through_staging(plan, settle, folders, adapters, out_dir, needed, config_text=config_text,
                               metadata=metadata, title=title or out_dir.name, device=device, shard_size=shard_size,
                               progress=progress, should_cancel=should_cancel, evaluate=evaluate, weights=weights,
                               on_shard=on_shard)
    return MergeResult(out_dir, plan.method_name, plan.num_layers, plan.parameter_count, time.monotonic() - started)



def _inputs(
    plan: MergePlan, metadata: dict[str, ModelMetadata], token: str | None, whole: bool
) -> tuple[Callable[[], dict[str, Path]], dict[str, Path | WeightSource], dict[str, Path]]:
    """Where each input is read from: a function giving its folder (its configs and tokenizer; called
    beside the merge, see :func:`merger.io.resolve.stream_sources`), its weights (a Hub model's by byte
    ranges, or downloaded whole when `whole`: an evaluation runs the parents), and its LoRA adapter's folder."""
    if whole:
        dirs = materialize(list(plan.models), token)
        return lambda: dirs, dict(dirs), materialize_adapters(list(plan.models), token)
    weights, folders = stream_sources(list(plan.models), metadata, token)
    return folders, weights, materialize_adapters(list(plan.models), token)


def _planned(
    config: AnyConfig, token: str | None, planned: tuple[MergePlan, dict[str, ModelMetadata]] | None, seed: int | None,
    *, settle: bool,
) -> tuple[MergePlan, dict[str, ModelMetadata]]:
    """The config's plan (made here unless the caller made it), its warnings logged, `seed` applied.

    An MoE's class settings (transformers' config classes, 2 s to import) are left to run beside the
    merge, in a child process (:func:`settling_apart`), unless `settle`: inputs downloaded whole first
    (an evaluation), which a late refusal would waste."""
    plan, metadata = plan_config(config, token, settle=settle) if planned is None else planned
    for warning in plan.warnings:
        logger.warning(warning)
    if seed is not None:
        plan = replace(plan, seed=seed)
    return plan, metadata


def _write_through_staging(
    plan: MergePlan,
    settle: Callable[[], MergePlan],
    folders: Callable[[], dict[str, Path]],
    adapters: dict[str, Path],
    out_dir: Path,
    needed: int,
    *,
    config_text: str,
    metadata: dict[str, ModelMetadata],
    title: str,
    device: str,
    shard_size: int,
    progress: Progress | None,
    should_cancel: Callable[[], bool] | None,
    evaluate: Callable[[Path, dict[str, Path]], str] | None,
    weights: dict[str, Path | WeightSource],
    on_shard: OnShard | None,
) -> None:
    """Merge and write the whole output into a temporary sibling of `out_dir`, then move it into place.

    `settle()` gives `plan` settled (its output config's class settings run), `folders()` the models'
    folders (configs, tokenizers), `weights` where their tensors are read from.

    Nothing is left behind on failure: the staging folder is deleted whatever happens, and an OS
    error becomes a MergerError naming the path (`needed`, in bytes, for a full disk).
    """
    staging = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        # An evaluation reads the whole output, so its shards are handed on only once it is scored.
        streamed = on_shard if evaluate is None else None
        # The folder's other files (config, tokenizer, card) need no weight: they are written beside the
        # merge, whose threads mostly wait on memory and disk, so that their downloads (a Hub input's
        # configs and tokenizer), imports (the card's Hub client, a tokenizer's library) and rendering
        # take no time of their own.
        # An MoE's class settings are waited for there, first: a refusal stops the merge at its next tensor.
        with ThreadPoolExecutor(1, thread_name_prefix="merger-files") as files:
            written = files.submit(_write_files, settle, folders, staging, config_text, metadata, title)

            def stop() -> bool:
                return _failed(written) or bool(should_cancel and should_cancel())

            try:
                execute_plan(plan, weights, staging, pick_device(device), shard_size, progress, stop, adapters,
                             streamed)
            except MergeCancelled:
                if _failed(written):  # stopped by the files' error (a refusal): that is what happened
                    written.result()
                raise
            plan = written.result()
        if evaluate is not None:  # the staged folder is a complete model: score it, then card the table
            dirs = folders()
            parents = {key: folder for key, folder in dirs.items() if key not in adapters}  # a LoRA input's folder is its base
            _write_card(plan, dirs, staging, config_text, metadata, title, evaluate(staging, parents))
            for shard in sorted(staging.glob("model-*-of-*.safetensors")) if on_shard is not None else []:
                on_shard(shard, None)
        _replace_dir(staging, out_dir)
    except OSError as err:
        if isinstance(err, MergerError):
            raise
        raise output_error(err, Path(os.fsdecode(err.filename)) if err.filename else staging, needed) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _failed(future: Future) -> bool:
    return future.done() and future.exception() is not None


def check_free_space(out_dir: Path, needed: int) -> None:
    """Refuse early when the output's file system has less free space than the output needs.

    Args:
        out_dir: the output folder (it and its parents may not exist yet).
        needed: bytes the output needs (its tensors plus :data:`OUTPUT_EXTRA_BYTES`).

    Raises:
        DiskSpaceError: `needed` is over the free space, naming both.
    """
    existing = out_dir.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if needed > free:
        raise DiskSpaceError(
            f"output `{out_dir}` needs about {format_bytes(needed)}, but `{existing}` has only {format_bytes(free)} "
            "free; free some space or choose an output folder on another disk"
        )


def remove_stale_staging(parent: Path) -> list[Path]:
    """Remove the staging folders (`.OUT.partial-PID`, `.OUT.old-PID`) of runs whose process is gone.

    A killed run cannot clean up after itself; the next run into the same folder does. Only folders
    named so, whose process id is not alive, and holding nothing but files a merge writes, are removed.

    Returns:
        The folders removed.
    """
    removed = []
    try:
        entries = list(parent.iterdir()) if parent.is_dir() else []
    except OSError:
        return removed
    for entry in entries:
        match = _STAGING.fullmatch(entry.name)
        if match is None or entry.is_symlink() or not entry.is_dir() or _process_alive(int(match.group(2))):
            continue
        try:
            ours = all(_is_merge_output(p.name) and p.is_file() and not p.is_symlink() for p in entry.iterdir())
        except OSError:
            continue
        if ours:
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
            logger.info("removed `%s`, left by a run that was stopped", entry)
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _write_files(
    settle: Callable[[], MergePlan], folders: Callable[[], dict[str, Path]], staging: Path, config_text: str,
    metadata: dict, title: str,
) -> MergePlan:
    """The output folder's files other than weights, from the settled plan (`settle()`), which is returned,
    and the inputs' folders (`folders()`: a Hub model's other files are downloaded now)."""
    plan = settle()
    dirs = folders()
    (staging / CONFIG_FILE).write_text(json.dumps(plan.output_config, indent=2, sort_keys=True) + "\n")
    donor = dirs[plan.config_donor]
    for name in (GENERATION_CONFIG_FILE, *PROCESSOR_FILES):
        if (donor / name).is_file():
            shutil.copyfile(donor / name, staging / name)
    tokenizer_dir = dirs[plan.tokenizer_donor]
    if plan.vocab is not None and plan.vocab.rewrites_tokenizer:
        write_tokenizer(plan.vocab, tokenizer_dir, staging)
    else:  # untouched by the config: the donor's files, byte for byte
        for name in TOKENIZER_FILES:
            if (tokenizer_dir / name).is_file():
                shutil.copyfile(tokenizer_dir / name, staging / name)
    for source, name in remote_code_files(plan.output_config, donor, tokenizer_dir):
        if not (staging / name).exists():  # a re-saved tokenizer keeps its own files
            shutil.copyfile(source, staging / name)
    (staging / MERGE_CONFIG_FILE).write_text(config_text)
    _write_card(plan, dirs, staging, config_text, metadata, title)
    return plan


def _write_card(plan: MergePlan, dirs: dict[str, Path], staging: Path, config_text: str, metadata: dict, title: str,
                evaluation: str | None = None) -> None:
    tokenizer_dir = dirs[plan.tokenizer_donor]
    card = render_model_card(
        title=title,
        yaml_text=config_text,
        method_name=plan.pretty_name,
        method_url=plan.reference_url,
        base_model=str(plan.base_model) if plan.base_model else None,
        models=[str(m) for m in plan.models],
        licenses=[metadata[m.key].license for m in plan.models],
        moe=plan.method_name == "moe",
        prompt_routed=any("prompts" in job.global_params for job in plan.jobs if job.method == "gate"),
        mention_base=plan.method_name != "slerp",
        remote_code=needs_remote_code(plan.output_config, tokenizer_dir),
        multimodal=is_multimodal(plan.output_config),
        evaluation=evaluation,
    )
    (staging / CARD_FILE).write_text(card)


def _check_out_dir(out_dir: Path) -> None:
    """Refuse to replace anything but an empty folder or one holding only files a merge writes."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"output `{out_dir}` is a file; give a folder path (it is created)")
    if not out_dir.exists():
        _check_creatable(out_dir)
        return
    foreign = sorted(p.name for p in out_dir.iterdir() if not _is_merge_output(p.name))
    if foreign:
        shown = ", ".join(f"`{n}`" for n in foreign[:5]) + (" ..." if len(foreign) > 5 else "")
        raise ConfigError(
            f"output folder `{out_dir}` holds files a merge does not write ({shown}); choose a new or empty "
            "folder, or move them away (an earlier merge output is replaced as a whole)"
        )


def _check_creatable(out_dir: Path) -> None:
    """Refuse, before any work, an output folder that cannot be made (under a file, `/proc`, a read-only disk).

    A folder is made and removed again in the nearest existing parent: the only test that holds for
    root and for special file systems alike. Nothing is left behind.
    """
    existing = out_dir.absolute().parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        why = f"`{existing}` is a file"
    else:
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".merger-probe-", dir=existing))
            return
        except OSError as err:
            why = f"{err.strerror or type(err).__name__} in `{existing}`"
    raise ConfigError(f"output `{out_dir}` cannot be created ({why}); choose a folder you can write to")


def _refuse_input_folders(out_dir: Path, config: AnyConfig) -> None:
    """An output must not replace a local model the merge reads (its files are all names a merge writes)."""
    out = out_dir.resolve()
    for ref in config.referenced_models():
        source = Path(os.path.expanduser(ref.model))
        try:
            same = source.is_dir() and out == source.resolve()
        except OSError:  # not a folder we could read: resolve.py reports it
            continue
        if same:
            raise ConfigError(f"output `{out_dir}` is the model `{ref}` this merge reads; choose another folder")


def _is_merge_output(name: str) -> bool:
    return (
        name in (CONFIG_FILE, GENERATION_CONFIG_FILE, MERGE_CONFIG_FILE, CARD_FILE, SAFETENSORS_INDEX_FILE)
        or name in TOKENIZER_FILES
        or name in PROCESSOR_FILES
        or (name.startswith("model") and name.endswith(".safetensors"))
        or name.endswith(".py")  # code an `auto_map` needs (merger.plan.remote_code)
    )


def _replace_dir(staging: Path, out_dir: Path) -> None:
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        out_dir.rename(old)
        staging.rename(out_dir)
        shutil.rmtree(old)
    else:
        staging.rename(out_dir)
