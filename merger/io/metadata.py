"""What a model is, read from its metadata alone: config.json and safetensors headers, no weights.

Both the validator (before any download) and the planner work from :class:`ModelMetadata`; local
directories are read here, Hub repos by :func:`merger.publish.hub.fetch_metadata`.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path

from merger.constants import CONFIG_FILE, PICKLE_WEIGHT_SUFFIXES, SAFETENSORS_INDEX_FILE
from merger.errors import ModelNotFoundError, UnsafeWeightsError

# safetensors dtype codes -> bytes per element


@dataclass(frozen=True)
class TensorMeta:
    """Shape and storage dtype of one stored tensor.

    Attributes:
        shape: the tensor's dimensions (`()` for a 0-dim scalar).
        dtype: the safetensors dtype code, e.g. `"BF16"`, `"F32"`.
    """

    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        """Number of elements (1 for a 0-dim tensor)."""
        return math.prod(self.shape)


@dataclass(frozen=True)
class ModelMetadata:
    """A model's config and tensor directory, enough to plan and validate a merge.

    Attributes:
        reference: the model as the config names it (Hub id or local path).
        config: the parsed `config.json`.
        tensors: tensor name -> :class:`TensorMeta`, over all safetensors shards.
        license: the license from the model card's front matter, if any.
    """

    reference: str
    config: dict
    tensors: dict[str, TensorMeta] = field(repr=False)
    license: str | None = None


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor's bytes lie in a safetensors file.

    Attributes:
        meta: shape and dtype.
        offset: absolute byte offset of the data in the file.
        nbytes: length of the data in bytes.
    """

    meta: TensorMeta
    offset: int
    nbytes: int


def read_safetensors_layout(path: Path) -> dict[str, StoredTensor]:
    """Read one safetensors file's header (8-byte length + JSON), without touching its data.

    Args:
        path: a `.safetensors` file.

    Returns:
        tensor name -> :class:`StoredTensor` (shape, dtype and absolute byte range).
    """
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    start = 8 + length
    return {
        name: StoredTensor(
            TensorMeta(tuple(info["shape"]), info["dtype"]),
            start + info["data_offsets"][0],
            info["data_offsets"][1] - info["data_offsets"][0],
        )
        for name, info in header.items()
    }


def read_safetensors_header(path: Path) -> dict[str, TensorMeta]:
    """Shapes and dtypes of one safetensors file's tensors (its header only)."""
    return {name: stored.meta for name, stored in read_safetensors_layout(path).items()}


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a local model directory, in the index's order.

    Raises:
        UnsafeWeightsError: the directory has only pickle checkpoints (`.bin`, `.pt`).
        ModelNotFoundError: the directory has no weights at all.
    """
    index = model_dir / SAFETENSORS_INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [model_dir / name for name in dict.fromkeys(weight_map.values())]
    files = sorted(model_dir.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in PICKLE_WEIGHT_SUFFIXES)
    if pickles:
        raise UnsafeWeightsError(unsafe_weights_message(str(model_dir), pickles))
    raise ModelNotFoundError(f"model `{model_dir}` has no `*.safetensors` weights; point `model` at a model directory.")


def unsafe_weights_message(reference: str, pickles: list[str]) -> str:
    """The refusal text for a model that ships only pickle checkpoints."""
    return (
        f"model `{reference}` ships only pickle weights ({', '.join(pickles[:3])}); loading them can run "
        "arbitrary code, so merger refuses them. Use a revision with `*.safetensors` weights, or convert "
        "the checkpoint yourself (e.g. with the Hub's safetensors convert Space)."
    )


def read_local_metadata(model_dir: Path, reference: str | None = None) -> ModelMetadata:
    """Read a local model directory's metadata.

    Args:
        model_dir: directory holding `config.json` and safetensors weights.
        reference: the name to report in errors (defaults to the path).

    Raises:
        ModelNotFoundError: the directory or its `config.json` is missing.
        UnsafeWeightsError: only pickle checkpoints are present.
    """
    reference = reference or str(model_dir)
    config_path = model_dir / CONFIG_FILE
    if not config_path.is_file():
        raise ModelNotFoundError(
            f"model `{reference}`: no `{CONFIG_FILE}` in `{model_dir}`; give a Hub id or a model directory."
        )
    tensors: dict[str, TensorMeta] = {}
    for path in weight_files(model_dir):
        tensors.update(read_safetensors_header(path))
    return ModelMetadata(reference, json.loads(config_path.read_text()), tensors, _local_license(model_dir))


def _local_license(model_dir: Path) -> str | None:
    readme = model_dir / "README.md"
    if not readme.is_file():
        return None
    from huggingface_hub import ModelCard

    return ModelCard.load(readme).data.to_dict().get("license")
