"""A PEFT LoRA adapter folder, read and checked: which model tensors it changes, by how much.

An adapter is `adapter_config.json` plus `adapter_model.safetensors` holding, per adapted linear
layer `M`, `base_model.model.M.lora_A.weight` `(r, in)` and `base_model.model.M.lora_B.weight`
`(out, r)`. Applied, the layer's weight becomes `W + s·B@A` (transposed when `fan_in_fan_out`, GPT-2's
Conv1D layout) with `s = lora_alpha / r`, or `lora_alpha / √r` with `use_rslora`. The rank `r` is read
from each pair's shapes, so a `rank_pattern` needs nothing more; `alpha_pattern` keys are module names
(or name suffixes), matched literally. Token embeddings may carry peft's embedding LoRA
(`lora_embedding_A` `(r, vocab)`, `lora_embedding_B` `(hidden, r)`, `ΔE = s·(B@A)ᵀ`), and
`modules_to_save` modules their whole new weight (`base_model.model.M.weight`), which replaces the
model's (what `extract-lora` writes for changed norms).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..errors import AdapterTargetError, LoraAdapterError
from ..metadata import TensorMeta
from ..modelfiles import excerpt, parse_json_object, read_bytes, read_safetensors_entries

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
EMBEDDING_SUFFIXES = (".lora_embedding_A", ".lora_embedding_B")
PATTERN_KEY = re.compile(r"[A-Za-z0-9_.]{1,256}")  # alpha_pattern keys taken literally: never a user regex
FLOAT_DTYPES = {"F32", "F16", "BF16", "F64"}


@dataclass(frozen=True)
class LoraPair:
    """One adapted weight: the adapter's tensor names and the scale `s` of `s·B@A`.

    Attributes:
        a_name / b_name: the adapter's tensors (`b_name` is "" for a replaced weight).
        rank: the pair's rank (0 for a replaced weight).
        scale: `s`.
        kind: `linear` (`ΔW = s·B@A`), `embedding` (`ΔE = s·(B@A)ᵀ`) or `replace` (the weight itself).
    """

    a_name: str
    b_name: str
    rank: int
    scale: float
    kind: str = "linear"


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

    def adapted(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """Model tensor `name` with the adapter applied: float32, the model's shape and layout.

        Args:
            name: a key of :attr:`pairs`.
            weight: the model's tensor as stored.
        """
        pair = self.pairs[name]
        with safe_open(str(self.path / ADAPTER_WEIGHTS_FILE), framework="pt") as f:
            if pair.kind == "replace":
                return f.get_tensor(pair.a_name).float()
            a = f.get_tensor(pair.a_name).float()
            b = f.get_tensor(pair.b_name).float()
        delta = (b @ a).mul_(pair.scale)
        if pair.kind == "embedding" or self.fan_in_fan_out:
            delta = delta.T
        return weight.float().add_(delta)

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
                expected = self._shape(f, pair)
                if tuple(tensors[name].shape) != expected:
                    raise AdapterTargetError(
                        f"LoRA `{self.reference}` changes `{name}` as a {list(expected)} matrix, but model `{model}` "
                        f"has it as {list(tensors[name].shape)}; use the adapter with the model it was trained on"
                    )

    def _shape(self, f: Any, pair: LoraPair) -> tuple[int, ...]:
        """The model weight's shape the pair implies."""
        if pair.kind == "replace":
            return tuple(f.get_slice(pair.a_name).get_shape())
        out_dim, in_dim = f.get_slice(pair.b_name).get_shape()[0], f.get_slice(pair.a_name).get_shape()[1]
        return (in_dim, out_dim) if self.fan_in_fan_out or pair.kind == "embedding" else (out_dim, in_dim)


def read_adapter(path: Path, reference: str) -> LoraAdapter:
    """Read and check a PEFT LoRA adapter folder.

    Args:
        path: a folder with `adapter_config.json` and `adapter_model.safetensors`.
        reference: the adapter as the config names it.

    Returns:
        The :class:`LoraAdapter`.

    Raises:
        LoraAdapterError: a file is missing or broken; the adapter is not a LoRA (`peft_type`), is DoRA,
            has an `alpha_pattern` key that is not a module name, holds a tensor that is neither a LoRA
            pair nor a `modules_to_save` weight, or a pair's shapes or dtypes are wrong.
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
    pairs = {}
    for a_name in entries:
        for (a_suffix, b_suffix), kind in ((LORA_SUFFIXES, "linear"), (EMBEDDING_SUFFIXES, "embedding")):
            if a_name.endswith(a_suffix):
                module = a_name.removeprefix(PEFT_PREFIX)[: -len(a_suffix)]
                pairs[module + ".weight"] = _pair(entries, a_name, a_name[: -len(a_suffix)] + b_suffix, kind,
                                                  _alpha(config, module), bool(config.get("use_rslora")), where)
    pairs.update(_saved_weights(entries, {n for p in pairs.values() for n in (p.a_name, p.b_name)}, config, where))
    if not pairs:
        raise LoraAdapterError(f"{where}: `{ADAPTER_WEIGHTS_FILE}` holds no lora_A/lora_B pair")
    return LoraAdapter(path, reference, pairs, bool(config.get("fan_in_fan_out", False)), config)


def _saved_weights(entries: dict, lora_names: set[str], config: dict, where: str) -> dict[str, LoraPair]:
    """The adapter's other tensors, each a `modules_to_save` module's whole weight (`base_model.model.M.weight`)."""
    saved = tuple(config.get("modules_to_save") or ())
    pairs = {}
    for name in entries.keys() - lora_names:
        module = name.removeprefix(PEFT_PREFIX).removesuffix(".weight")
        listed = any(module == m or module.endswith("." + m) for m in saved)
        if not name.endswith(".weight") or not listed:
            raise LoraAdapterError(f"{where}: holds `{excerpt(name)}`, neither a LoRA pair nor a weight of its "
                                   "`modules_to_save`; only those are applied (DoRA and other PEFT types are not)")
        if entries[name][1] not in FLOAT_DTYPES:
            raise LoraAdapterError(f"{where}: `{excerpt(name)}` is stored as {entries[name][1]}; a float weight is needed")
        pairs[module + ".weight"] = LoraPair(name, "", 0, 1.0, "replace")
    return pairs


def _pair(entries: dict, a_name: str, b_name: str, kind: str, alpha: float, rslora: bool, where: str) -> LoraPair:
    """One checked `lora_A`/`lora_B` pair: `A` `(r, in)`, `B` `(out, r)`, float, r ≥ 1."""
    if b_name not in entries:
        raise LoraAdapterError(f"{where}: `{excerpt(a_name)}` has no `B` partner; the adapter file is incomplete")
    (a_shape, a_dtype, _, _), (b_shape, b_dtype, _, _) = entries[a_name], entries[b_name]
    if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1] or a_shape[0] == 0:
        raise LoraAdapterError(f"{where}: `{excerpt(a_name)}` is {list(a_shape)} and its B {list(b_shape)}; "
                               "expected (r, in) and (out, r) with r ≥ 1")
    if {a_dtype, b_dtype} - FLOAT_DTYPES:
        raise LoraAdapterError(f"{where}: `{excerpt(a_name)}` is stored as {a_dtype}/{b_dtype}; a float adapter is needed")
    rank = a_shape[0]
    return LoraPair(a_name, b_name, rank, alpha / (math.sqrt(rank) if rslora else rank), kind)


def _alpha(config: dict, module: str) -> float:
    """The module's alpha: the first `alpha_pattern` key naming it (whole, or as a `.`-suffix), else `lora_alpha`."""
    for key, value in (config.get("alpha_pattern") or {}).items():
        if module == key or module.endswith("." + key):
            return float(value)
    return float(config["lora_alpha"])


def _check_config(config: dict, where: str) -> None:
    """Refuse adapter settings whose effect is not `W + s·B@A` with one `lora_alpha`."""
    if config.get("peft_type", "LORA") != "LORA":
        raise LoraAdapterError(f"{where}: `peft_type` is `{excerpt(config.get('peft_type'))}`; only LORA adapters are applied")
    if config.get("use_dora"):
        raise LoraAdapterError(f"{where}: `use_dora: true`; DoRA adapters are not supported, merge them with peft first")
    pattern = config.get("alpha_pattern") or {}
    if not isinstance(pattern, dict) or len(pattern) > 100_000:
        raise LoraAdapterError(f"{where}: `alpha_pattern` must be a mapping of module names to numbers")
    for key, value in pattern.items():
        if not PATTERN_KEY.fullmatch(str(key)) or isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value):
            raise LoraAdapterError(f"{where}: `alpha_pattern` entry `{excerpt(key)}: {excerpt(value)}` is not a module "
                                   "name and a number; regular expressions are not accepted, write module names")
    saved = config.get("modules_to_save") or []
    if not isinstance(saved, list) or not all(isinstance(m, str) for m in saved):
        raise LoraAdapterError(f"{where}: `modules_to_save` must be a list of module names, got `{excerpt(saved)}`")
    alpha = config.get("lora_alpha")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise LoraAdapterError(f"{where}: `lora_alpha` must be a number, got `{excerpt(alpha)}`")
