"""run_merge(): plan, fetch, then merge tensor by tensor into a complete output folder. No Hub pushes, no UI."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from merger.plan.architecture import is_multimodal
from merger.publish.card import render_model_card
from merger.config.load import load_config
from merger.config.schema import SEED, AnyConfig
from merger.io.metadata import ModelMetadata
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
from merger.errors import ConfigError
from merger.execute.executor import Progress, execute_plan
from merger.plan.merge import MergePlan
from merger.plan.remote_code import needs_remote_code, remote_code_files
from merger.io.resolve import materialize
from merger.io.tokenizer_files import write_tokenizer
from merger.plan.entry import plan_config

logger = logging.getLogger(__name__)


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
    config: AnyConfig | None = None,
    planned: tuple[MergePlan, dict[str, ModelMetadata]] | None = None,
) -> MergeResult:
    """Merge the models of a YAML config into `out_dir` (a complete Hugging Face model folder).

    The config is checked against the models' metadata before any weight is downloaded. The output
    is written to a temporary sibling folder and moved to `out_dir` only when complete.

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
        config: `load_config(config_text)`, when the caller has parsed it already (not parsed again).
        planned: `plan_config(config, token)`, when the caller has planned it already (not planned
            again; the models must not have changed since).

    Returns:
        A :class:`MergeResult`.

    Raises:
        MergerError subclasses: config problems, missing models, pickle-only weights, Hub failures,
            cancellation. Nothing is left at `out_dir` on failure.
    """
    started = time.monotonic()
    config = load_config(config_text) if config is None else config
    SEED.check("--random-seed", seed)
    _check_out_dir(out_dir)
    plan, metadata = plan_config(config, token) if planned is None else planned
    for warning in plan.warnings:
        logger.warning(warning)
    if seed is not None:
        plan = replace(plan, seed=seed)
    dirs = materialize(list(plan.models), token)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        execute_plan(plan, dirs, staging, pick_device(device), shard_size, progress, should_cancel)
        _write_files(plan, dirs, staging, config_text, metadata, title or out_dir.name)
        _replace_dir(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return MergeResult(out_dir, plan.method_name, plan.num_layers, plan.parameter_count, time.monotonic() - started)


def _write_files(
    plan: MergePlan, dirs: dict[str, Path], staging: Path, config_text: str, metadata: dict, title: str
) -> None:
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
    card = render_model_card(
        title=title,
        yaml_text=config_text,
        method_name=plan.pretty_name,
        method_url=plan.reference_url,
        base_model=str(plan.base_model) if plan.base_model else None,
        models=[str(m) for m in plan.models],
        licenses=[metadata[m.key].license for m in plan.models],
        moe=plan.method_name == "moe",
        mention_base=plan.method_name != "slerp",
        remote_code=needs_remote_code(plan.output_config, tokenizer_dir),
        multimodal=is_multimodal(plan.output_config),
    )
    (staging / CARD_FILE).write_text(card)


def _check_out_dir(out_dir: Path) -> None:
    """Refuse to replace anything but an empty folder or one holding only files a merge writes."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"output `{out_dir}` is a file; give a folder path (it is created)")
    if not out_dir.exists():
        return
    foreign = sorted(p.name for p in out_dir.iterdir() if not _is_merge_output(p.name))
    if foreign:
        shown = ", ".join(f"`{n}`" for n in foreign[:5]) + (" ..." if len(foreign) > 5 else "")
        raise ConfigError(
            f"output folder `{out_dir}` holds files a merge does not write ({shown}); choose a new or empty "
            "folder, or move them away (an earlier merge output is replaced as a whole)"
        )


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
