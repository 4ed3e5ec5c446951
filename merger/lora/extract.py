"""A PEFT LoRA adapter from a fine-tune and its base: truncated SVD of each changed matrix.

For every 2-D weight `W` the fine-tune changed, `ΔW = W_ft − W_base = U·S·Vᵀ` (float32, one tensor at a
time) is cut to rank `r`: `lora_B = U_r·S_r` `(out, r)`, `lora_A = V_rᵀ` `(r, in)`, with `lora_alpha = r`
so peft's scale is 1. Token embeddings get peft's embedding LoRA (`lora_embedding_A` `(r, vocab)`,
`lora_embedding_B` `(hidden, r)`, `ΔE = (B·A)ᵀ`). A changed 1-D weight (a norm) is stored whole as a
`modules_to_save` module. The retained energy `Σ_{i<r} sᵢ² / Σ sᵢ²` of each matrix is reported: the
adapter's relative Frobenius error on that matrix is `√(1 − energy)`.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from merger.plan.lookup import architecture_for
from merger.io.buffers import BufferPool
from merger.config.schema import ModelReference
from merger.errors import ConfigError, ShapeMismatchError
from merger.io.loader import TensorReader
from merger.io.resolve import fetch_metadata, materialize
from merger.lora.adapter import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, PEFT_PREFIX

MAX_RANK = 65_536


@dataclass(frozen=True)
class ExtractedTensor:
    """One tensor's row of the report.

    Attributes:
        name: the model tensor (`model.layers.0.self_attn.q_proj.weight`).
        shape: its shape.
        rank: the rank kept (0 for a 1-D tensor stored whole).
        energy: the retained share of `‖ΔW‖²_F`, 0 to 1 (1 for a tensor stored whole).
    """

    name: str
    shape: tuple[int, ...]
    rank: int
    energy: float

    @property
    def relative_error(self) -> float:
        """`‖ΔW − B·A‖_F / ‖ΔW‖_F = √(1 − energy)`."""
        return math.sqrt(max(0.0, 1.0 - self.energy))


def chosen_rank(singular: torch.Tensor, rank: int | None, energy: float | None) -> int:
    """The rank kept for one matrix: `rank` (at most the matrix's), or the smallest whose retained energy
    reaches `energy`.

    Args:
        singular: the singular values, descending, float32 `(k,)`.
        rank / energy: exactly one of them is set.
    """
    if rank is not None:
        return min(rank, singular.numel())
    cumulative = torch.cumsum(singular.double().square(), 0)
    total = float(cumulative[-1])
    if total == 0:
        return 1
    return min(int(torch.searchsorted(cumulative / total, torch.tensor([energy], dtype=torch.float64))[0]) + 1,
               singular.numel())


def factorize(delta: torch.Tensor, rank: int | None, energy: float | None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """`(B, A, energy)` with `B·A` the best rank-r approximation of `delta` `(out, in)` (Eckart–Young).

    Returns:
        B float32 `(out, r)`, A float32 `(r, in)`, the retained energy.
    """
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
    r = chosen_rank(s, rank, energy)
    total = float(s.double().square().sum())
    kept = float(s[:r].double().square().sum()) / total if total > 0 else 1.0
    return (u[:, :r] * s[:r]).contiguous(), vh[:r].contiguous(), kept


def extract_lora(
    finetune: str,
    base: str,
    out_dir: Path,
    *,
    rank: int | None = None,
    energy: float | None = None,
    token: str | None = None,
    progress: Callable[[ExtractedTensor], None] | None = None,
) -> list[ExtractedTensor]:
    """Write a PEFT LoRA adapter reproducing `finetune` from `base` to `out_dir`.

    Memory: one tensor of each model and its float32 SVD at a time, plus the factors kept so far
    (`r·(in + out)` float32 values per matrix, the adapter's own size), written once at the end.

    Args:
        finetune / base: Hub ids or local folders of one architecture and shapes.
        out_dir: the adapter folder; must not exist or be empty (written whole, or not at all).
        rank: the rank per matrix (at most the matrix's own); or
        energy: the retained energy per matrix, in (0, 1].
        token: a Hub token for private models.
        progress: called with each tensor's report row as it is done.

    Returns:
        One row per changed tensor, in file order.

    Raises:
        ConfigError: neither or both of rank/energy, or a value out of range; `out_dir` not empty;
            nothing changed.
        ShapeMismatchError: the models' tensor names or shapes differ.
        ModelNotFoundError, HubError, ModelFileError subclasses: as :func:`merger.io.resolve.fetch_metadata`.
    """
    _check_target(rank, energy, out_dir)
    refs = [ModelReference.parse(finetune), ModelReference.parse(base)]
    metadata = fetch_metadata(refs, token)
    ft_meta, base_meta = metadata[refs[0].key], metadata[refs[1].key]
    _check_same_layout(ft_meta.tensors, base_meta.tensors, finetune, base)
    arch = architecture_for(base_meta.config, base, base_meta.tensors)
    embeddings = {w.stored_name(base_meta.tensors) for w in arch.pre_weights if w.is_embed} - {None}
    dirs = materialize(refs, token)
    pool = BufferPool(max_retained=0)
    ft_reader, base_reader = TensorReader(dirs[refs[0].key], pool), TensorReader(dirs[refs[1].key], pool)
    tensors: dict[str, torch.Tensor] = {}
    report: list[ExtractedTensor] = []
    ranks: dict[str, int] = {}
    saved: list[str] = []
    try:
        for name in ft_meta.tensors:
            tuned = ft_reader.read(name).float()
            delta = tuned - base_reader.read(name).float()
            if not bool(delta.any()):
                continue
            row = _extract_one(name, delta, name in embeddings, rank, energy, tensors, ranks)
            if row.rank == 0:  # a norm: peft's modules_to_save holds the fine-tune's weight itself
                saved.append(name.removesuffix(".weight"))
                tensors[PEFT_PREFIX + name] = tuned
            report.append(row)
            if progress:
                progress(row)
    finally:
        ft_reader.close()
        base_reader.close()
    if not report:
        raise ConfigError(f"`{finetune}` and `{base}` have identical weights: there is no change to extract")
    _write_adapter(out_dir, tensors, ranks, saved, embeddings, base)
    return report


def _extract_one(name: str, delta: torch.Tensor, is_embedding: bool, rank: int | None, energy: float | None,
                 tensors: dict[str, torch.Tensor], ranks: dict[str, int]) -> ExtractedTensor:
    """Factor one changed 2-D weight into `tensors`; a changed 1-D weight gets rank 0 (kept whole by the caller).

    Raises:
        ConfigError: a changed tensor that is neither (a bias, a 3-D weight): no adapter can carry it.
    """
    module = name.removesuffix(".weight")
    if not name.endswith(".weight") or delta.ndim not in (1, 2):
        raise ConfigError(f"tensor `{name}` changed but is not a 1-D or 2-D module weight (a bias?); a LoRA "
                          "adapter cannot carry it, so the adapter would not reproduce the fine-tune")
    if delta.ndim == 1:
        return ExtractedTensor(name, tuple(delta.shape), 0, 1.0)
    if is_embedding:  # peft: ΔE = (B·A)ᵀ with A (r, vocab), B (hidden, r)
        b, a, kept = factorize(delta.T, rank, energy)
        tensors[f"{PEFT_PREFIX}{module}.lora_embedding_A"], tensors[f"{PEFT_PREFIX}{module}.lora_embedding_B"] = a, b
    else:
        b, a, kept = factorize(delta, rank, energy)
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"], tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = a, b
    ranks[module] = a.shape[0]
    return ExtractedTensor(name, tuple(delta.shape), a.shape[0], kept)


def _write_adapter(out_dir: Path, tensors: dict[str, torch.Tensor], ranks: dict[str, int], saved: list[str],
                   embeddings: set[str], base: str) -> None:
    """adapter_model.safetensors + adapter_config.json, staged next to `out_dir` and moved in whole."""
    top = max(ranks.values(), default=1)
    differing = {m: r for m, r in ranks.items() if r != top}
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": top,
        "lora_alpha": top,  # scale = alpha / r = 1: B·A is ΔW itself
        "rank_pattern": differing,
        "alpha_pattern": dict(differing),  # each module's alpha equals its rank: scale 1 everywhere
        "target_modules": sorted(ranks),
        "modules_to_save": saved or None,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    staging = out_dir.parent / f".{out_dir.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        save_file(tensors, str(staging / ADAPTER_WEIGHTS_FILE), metadata={"format": "pt"})
        (staging / ADAPTER_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        if out_dir.exists():
            out_dir.rmdir()  # checked empty before any work
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _check_target(rank: int | None, energy: float | None, out_dir: Path) -> None:
    if (rank is None) == (energy is None):
        raise ConfigError("give exactly one of `--rank R` (e.g. 16) and `--energy E` (e.g. 0.9)")
    if rank is not None and not 1 <= rank <= MAX_RANK:
        raise ConfigError(f"`--rank` must be a whole number from 1 to {MAX_RANK:,}, got {rank}")
    if energy is not None and not (0 < energy <= 1):
        raise ConfigError(f"`--energy` must be a number above 0 and at most 1, got {energy}")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ConfigError(f"output `{out_dir}` exists and is not an empty folder; choose a new folder")


def _check_same_layout(ft: dict, base: dict, finetune: str, base_name: str) -> None:
    missing = sorted(set(ft) ^ set(base))
    if missing:
        raise ShapeMismatchError(f"`{finetune}` and `{base_name}` hold different tensors (e.g. `{missing[0]}`, "
                                 f"{len(missing)} in all); extract a LoRA only between a fine-tune and its own base")
    for name, meta in ft.items():
        if tuple(meta.shape) != tuple(base[name].shape):
            raise ShapeMismatchError(f"`{name}` is {list(meta.shape)} in `{finetune}` but {list(base[name].shape)} "
                                     f"in `{base_name}`; extract a LoRA only between a fine-tune and its own base")
