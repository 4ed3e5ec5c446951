"""Inputs that are not full-precision transformers checkpoints, recognised before merging, each by name.

A merge averages weights, so it needs the weights themselves: quantised tensors (packed integers and
their scales), GGUF files, LoRA adapters and pickle checkpoints are refused with what they are and
what to use instead. Recognition works from file names, `config.json` and safetensors headers only,
so `validate` refuses them before any weight is downloaded.
"""

from __future__ import annotations

import fnmatch
from typing import TYPE_CHECKING, Callable, Iterable

from merger.constants import CONFIG_FILE, PICKLE_WEIGHT_SUFFIXES
from merger.errors import (
    AdapterModelError,
    GgufOnlyError,
    ModelConfigFileError,
    QuantizedWeightsError,
    SafetensorsHeaderError,
    UnsafeWeightsError,
    excerpt,
)
from merger.io.modelfiles import parse_json_object

if TYPE_CHECKING:
    from merger.io.metadata import ModelMetadata

ADAPTER_CONFIG_FILE = "adapter_config.json"

# tensor name patterns -> the quantisation format they belong to, most specific first
QUANTIZED_TENSOR_PATTERNS = (
    ("*.g_idx", "GPTQ"),
    ("*.qweight", "GPTQ or AWQ"),
    ("*.qzeros", "GPTQ or AWQ"),
    ("*.q_weight", "EXL2"),
    ("*.q_invperm", "EXL2"),
    ("*.q_scale_max", "EXL2"),
    ("*.absmax", "bitsandbytes 4-bit"),
    ("*.quant_map", "bitsandbytes 4-bit"),
    ("*.quant_state.*", "bitsandbytes 4-bit"),
    ("*.SCB", "bitsandbytes 8-bit"),
    ("*.weight_format", "bitsandbytes 8-bit"),
    ("*.weight_scale", "FP8"),
    ("*.weight_scale_inv", "FP8"),
    ("*.input_scale", "FP8"),
)
# storage dtypes of low-precision float checkpoints
QUANTIZED_DTYPES = {"F8_E4M3": "FP8", "F8_E5M2": "FP8", "F8_E8M0": "FP8", "F6_E2M3": "FP6", "F6_E3M2": "FP6", "F4": "FP4"}
INTEGER_DTYPES = {"I8", "U8", "I16", "U16", "I32", "U32", "I64", "U64"}
MERGEABLE_DTYPES = ("F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL")  # merger.io.loader reads these
LORA_TENSOR_PATTERNS = ("*.lora_A.*", "*.lora_B.*", "*.lora_embedding_A*", "*.lora_embedding_B*")


def refuse_non_checkpoint_files(reference: str, names: Iterable[str], read: Callable[[str], bytes]) -> None:
    """Refuse a model folder or repo, from its file names, that is an adapter, GGUF-only or pickle-only.

    Args:
        reference: the model as the config names it.
        names: the file names of the folder or repo (relative paths).
        read: reads one of those files' bytes (for `adapter_config.json`).

    Raises:
        AdapterModelError: `adapter_config.json` and no `config.json` (a PEFT adapter).
        GgufOnlyError: `*.gguf` files and no safetensors.
        UnsafeWeightsError: pickle checkpoints and no safetensors.
    """
    names = list(names)
    if ADAPTER_CONFIG_FILE in names and CONFIG_FILE not in names:
        adapter = parse_json_object(read(ADAPTER_CONFIG_FILE), f"model `{reference}`: `{ADAPTER_CONFIG_FILE}`", AdapterModelError)
        raise AdapterModelError(adapter_message(reference, adapter))
    if any(name.endswith(".safetensors") for name in names):
        return
    ggufs = sorted(name for name in names if name.lower().endswith(".gguf"))
    if ggufs:
        raise GgufOnlyError(
            f"model `{reference}` ships only GGUF files ({', '.join(excerpt(n, 40) for n in ggufs[:3])}): GGUF is "
            "llama.cpp's quantised format and cannot be merged. Merge the original safetensors model it was converted "
            "from (the card's `base_model` usually names it), then convert the result to GGUF with llama.cpp"
        )
    pickles = sorted(name for name in names if name.endswith(PICKLE_WEIGHT_SUFFIXES))
    if pickles:
        raise UnsafeWeightsError(unsafe_weights_message(reference, pickles))


def unsafe_weights_message(reference: str, pickles: list[str]) -> str:
    """The refusal text for a model that ships only pickle checkpoints."""
    return (
        f"model `{reference}` ships only pickle weights ({', '.join(pickles[:3])}); loading them can run "
        "arbitrary code, so merger refuses them. Use a revision with `*.safetensors` weights, or convert "
        "the checkpoint yourself (e.g. with the Hub's safetensors convert Space)."
    )


def adapter_message(reference: str, adapter: dict, evidence: str = ADAPTER_CONFIG_FILE) -> str:
    """The refusal text for a PEFT adapter, naming its type and base model when the config states them."""
    kind = excerpt(adapter.get("peft_type") or "LORA", 20)
    base = adapter.get("base_model_name_or_path")
    base_text = f" for `{excerpt(base)}`" if isinstance(base, str) and base else ""
    return (
        f"model `{reference}` is a PEFT {kind} adapter{base_text} ({evidence}), not a full model. Name it "
        f"with its base as `BASE+{excerpt(reference)}` (a LoRA is applied as the base is read), or merge "
        "it into its base model first (peft: `PeftModel.from_pretrained(base, adapter).merge_and_unload()"
        ".save_pretrained(DIR)`), then use DIR or that model's repo here"
    )


def refuse_unmergeable_weights(meta: ModelMetadata) -> None:
    """Refuse a model whose config or tensors show quantised weights or LoRA adapter tensors.

    Packed integer tensors (GPTQ `qweight`, ...) would be averaged as numbers, so they are refused
    whatever the architecture, as is any integer-typed `*.weight` tensor.

    Raises:
        QuantizedWeightsError: `quantization_config` in config.json, quantised tensor names, or an
            FP8/FP6/FP4 or integer weight dtype.
        SafetensorsHeaderError: another dtype merger cannot read (`U16`, `U32`, `U64`).
        AdapterModelError: LoRA tensor names (`lora_A`, `lora_B`).
    """
    fix = (
        "merging needs the full-precision weights: use the original BF16/F16/F32 model it was quantised from "
        "(the card's `base_model` usually names it), and quantise the merged model afterwards"
    )
    quantization = meta.config.get("quantization_config")
    if quantization is not None:
        method = quantization.get("quant_method", "unknown") if isinstance(quantization, dict) else "unknown"
        raise QuantizedWeightsError(
            f"model `{meta.reference}` is quantised (`quantization_config.quant_method: {excerpt(method, 30)}` in "
            f"{CONFIG_FILE}); {fix}"
        )
    for name, tensor in meta.tensors.items():
        if any(fnmatch.fnmatchcase(name, p) for p in LORA_TENSOR_PATTERNS):
            raise AdapterModelError(adapter_message(meta.reference, {}, f"tensor `{excerpt(name)}`"))
        kind = _quantized_kind(name, tensor.dtype, len(tensor.shape))
        if kind is not None:
            raise QuantizedWeightsError(
                f"model `{meta.reference}` holds {kind} quantised weights (tensor `{excerpt(name)}`, {tensor.dtype}); {fix}"
            )
        if tensor.dtype not in MERGEABLE_DTYPES:
            raise SafetensorsHeaderError(
                f"model `{meta.reference}`: tensor `{excerpt(name)}` has dtype {tensor.dtype}, which merger cannot "
                f"read ({', '.join(MERGEABLE_DTYPES)}); use a checkpoint saved by transformers in BF16, F16 or F32"
            )


def _quantized_kind(name: str, dtype: str, ndim: int) -> str | None:
    for pattern, kind in QUANTIZED_TENSOR_PATTERNS:
        if fnmatch.fnmatchcase(name, pattern):
            return kind
    if dtype in QUANTIZED_DTYPES:
        return QUANTIZED_DTYPES[dtype]
    if dtype in INTEGER_DTYPES and ndim >= 2 and name.endswith("weight"):
        return "integer (packed)"
    return None


def check_layer_count(meta: ModelMetadata) -> None:
    """Check that `config.json` states the layer count its architecture reads.

    Raises:
        ModelConfigFileError: the key is missing or not a positive integer.
        ArchitectureError: no definition matches and none can be inferred (from
            :func:`merger.plan.lookup.architecture_for`).
    """
    from merger.plan.lookup import architecture_for

    arch = architecture_for(meta.config, meta.reference, meta.tensors)
    try:
        layers = arch.num_layers(meta.config)
    except (KeyError, TypeError, ValueError, OverflowError):
        layers = 0
    if layers < 1:
        raise ModelConfigFileError(
            f"model `{meta.reference}`: {CONFIG_FILE} states no layer count (`{arch.num_layers_config_key}` is missing "
            f"or not a positive integer); fix {CONFIG_FILE} or use the model's original one"
        )
