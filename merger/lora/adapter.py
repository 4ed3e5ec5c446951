"""A PEFT LoRA adapter folder, read and checked: which model tensors it changes, by how much.

An adapter is `adapter_config.json` plus `adapter_model.safetensors` holding, per adapted linear
layer `M`, `base_model.model.M.lora_A.weight` `(r, in)` and `base_model.model.M.lora_B.weight`
`(out, r)`. Applied, the layer's weight becomes `W + s·B@A` (transposed when `fan_in_fan_out`, GPT-2's
Conv1D layout) with `s = lora_alpha / r`, or `lora_alpha / √r` with `use_rslora`. The rank `r` is read
from each pair's shapes, so a `rank_pattern` needs nothing more.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import AdapterTargetError, LoraAdapterError
from ..metadata import TensorMeta
from ..modelfiles import excerpt, parse_json_object, read_bytes, read_safetensors_entries

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
FLOAT_DTYPES = {"F32", "F16", "BF16", "F64"}


@dataclass(frozen=True)
class LoraPair:
    """One adapted weight: the adapter's tensor names and the scale `s` of `s·B@A`."""

    a_name: str
    b_name: str
    rank: int
    scale: float


@dataclass(frozen=True)
class LoraAdapter:
    """A checked PEFT LoRA adapter.

    Attributes:
        path: the adapter folder.
        reference: the adapter as the config names it (for messages).
        pairs: model tensor name (e.g. `model.layers.0.self_attn.q_proj.weight`) -> its :class:`LoraPair`.
        fan_in_fan_out: the model stores these weights as `(in, out)` (GPT-2's Conv1D): `ΔW = (B@A)ᵀ`.
        config: the parsed `adapter_config.json`.
    """

    path: Path
    reference: str
    pairs: dict[str, LoraPair]
    fan_in_fan_out: bool
    config: dict

    def delta(self, name: str) -> torch.Tensor:
        """`s·B@A` for model tensor `name`, float32, in the model's layout (`(out, in)`, or `(in, out)`
        with `fan_in_fan_out`)."""
        pair = self.pairs[name]
        with safe_open(str(self.path / ADAPTER_WEIGHTS_FILE), framework="pt") as f:
            a = f.get_tensor(pair.a_name).float()
            b = f.get_tensor(pair.b_name).float()
        delta = (b @ a).mul_(pair.scale)
        return delta.T.contiguous() if self.fan_in_fan_out else delta

    def check_targets(self, tensors: dict[str, TensorMeta], model: str) -> None:
        """Refuse an adapter that changes a tensor `model` lacks, or one of another shape.

        Raises:
            AdapterTargetError: naming the tensor, the shapes and the model.
        """
        with safe_open(str(self.path / ADAPTER_WEIGHTS_FILE), framework="pt") as f:
            for name, pair in self.pairs.items():
                if name not in tensors:
                    raise AdapterTargetError(
                        f"LoRA `{self.reference}` changes `{name}`, which model `{model}` does not have; "
                        "use the adapter with the model it was trained on"
                    )
                out_dim, in_dim = f.get_slice(pair.b_name).get_shape()[0], f.get_slice(pair.a_name).get_shape()[1]
                expected = (in_dim, out_dim) if self.fan_in_fan_out else (out_dim, in_dim)
                if tuple(tensors[name].shape) != expected:
                    raise AdapterTargetError(
                        f"LoRA `{self.reference}` changes `{name}` as a {list(expected)} matrix, but model `{model}` "
                        f"has it as {list(tensors[name].shape)}; use the adapter with the model it was trained on"
                    )


def read_adapter(path: Path, reference: str) -> LoraAdapter:
    """Read and check a PEFT LoRA adapter folder.

    Args:
        path: a folder with `adapter_config.json` and `adapter_model.safetensors`.
        reference: the adapter as the config names it.

    Returns:
        The :class:`LoraAdapter`.

    Raises:
        LoraAdapterError: a file is missing or broken; the adapter is not a LoRA (`peft_type`), is DoRA,
            sets `alpha_pattern`, holds tensors other than `lora_A`/`lora_B` pairs (`modules_to_save`,
            embeddings), or a pair's shapes disagree.
        ModelFileError subclasses: a broken safetensors header.
    """
    where = f"LoRA `{reference}`"
    config_path, weights_path = path / ADAPTER_CONFIG_FILE, path / ADAPTER_WEIGHTS_FILE
    for needed in (config_path, weights_path):
        if not needed.is_file():
            raise LoraAdapterError(f"{where}: no `{needed.name}` in `{path}`; a PEFT LoRA adapter saved "
                                   "with safetensors (`save_pretrained(..., safe_serialization=True)`) is needed")
    config = parse_json_object(read_bytes(config_path), f"{where}: `{ADAPTER_CONFIG_FILE}`", LoraAdapterError)
    _check_config(config, where)
    _, entries = read_safetensors_entries(weights_path, f"{where}: `{ADAPTER_WEIGHTS_FILE}`")
    alpha, rslora = float(config["lora_alpha"]), bool(config.get("use_rslora", False))
    pairs = {}
    for a_name, (a_shape, a_dtype, _, _) in entries.items():
        if not a_name.endswith(LORA_SUFFIXES[0]):
            continue
        b_name = a_name[: -len(LORA_SUFFIXES[0])] + LORA_SUFFIXES[1]
        if b_name not in entries:
            raise LoraAdapterError(f"{where}: `{excerpt(a_name)}` has no `lora_B` partner; the adapter file is incomplete")
        b_shape, b_dtype = entries[b_name][0], entries[b_name][1]
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1] or a_shape[0] == 0:
            raise LoraAdapterError(f"{where}: `{excerpt(a_name)}` is {list(a_shape)} and its `lora_B` {list(b_shape)}; "
                                   "expected (r, in) and (out, r) with r ≥ 1")
        if {a_dtype, b_dtype} - FLOAT_DTYPES:
            raise LoraAdapterError(f"{where}: `{excerpt(a_name)}` is stored as {a_dtype}/{b_dtype}; a float adapter is needed")
        rank = a_shape[0]
        target = a_name.removeprefix(PEFT_PREFIX)[: -len(LORA_SUFFIXES[0])] + ".weight"
        pairs[target] = LoraPair(a_name, b_name, rank, alpha / (math.sqrt(rank) if rslora else rank))
    others = [n for n in entries if not n.endswith(LORA_SUFFIXES)]
    if others:
        raise LoraAdapterError(f"{where}: holds `{excerpt(others[0])}` ({len(others)} tensor(s) besides lora_A/lora_B "
                               "pairs: modules_to_save, embeddings or DoRA); only LoRA pairs on linear layers are applied")
    if not pairs:
        raise LoraAdapterError(f"{where}: `{ADAPTER_WEIGHTS_FILE}` holds no lora_A/lora_B pair")
    return LoraAdapter(path, reference, pairs, bool(config.get("fan_in_fan_out", False)), config)


def _check_config(config: dict, where: str) -> None:
    """Refuse adapter settings whose effect is not `W + s·B@A` with one `lora_alpha`."""
    if config.get("peft_type", "LORA") != "LORA":
        raise LoraAdapterError(f"{where}: `peft_type` is `{excerpt(config.get('peft_type'))}`; only LORA adapters are applied")
    if config.get("use_dora"):
        raise LoraAdapterError(f"{where}: `use_dora: true`; DoRA adapters are not supported, merge them with peft first")
    if config.get("alpha_pattern"):
        raise LoraAdapterError(f"{where}: sets `alpha_pattern`; per-module alphas are not supported, merge it with peft first")
    alpha = config.get("lora_alpha")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise LoraAdapterError(f"{where}: `lora_alpha` must be a number, got `{excerpt(alpha)}`")
