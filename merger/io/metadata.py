"""What a model is, read from its metadata alone: config.json and safetensors headers, no weights.

Both the validator (before any download) and the planner work from :class:`ModelMetadata`; local
directories are read here, Hub repos by :func:`merger.publish.hub_read.fetch_metadata`.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from merger.constants import CONFIG_FILE, SAFETENSORS_INDEX_FILE
from merger.errors import ModelConfigFileError, ModelNotFoundError, WeightIndexError, excerpt
from merger.io.formats import refuse_non_checkpoint_files
from merger.io.modelfiles import (
    check_index_matches,
    parse_json_object,
    read_bytes,
    read_index,
    read_safetensors_entries,
    unreadable,
)

logger = logging.getLogger(__name__)

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


@dataclass(frozen=True)
class HubCheckpoint:
    """A Hub model's safetensors files at one commit, as their headers (read by byte ranges) say.

    Attributes:
        repo_id: `org/name`.
        revision: the commit sha every file is read at (the metadata's commit, so weights match it).
        files: file name in the repo -> tensor name -> :class:`StoredTensor`.
        sizes: file name -> its size in bytes, as the Hub answered the header's read (where it said).
    """

    repo_id: str
    revision: str
    files: dict[str, dict[str, StoredTensor]]
    sizes: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelMetadata:
    """A model's config and tensor directory, enough to plan and validate a merge.

    Attributes:
        reference: the model as the config names it (Hub id or local path).
        config: the parsed `config.json`.
        tensors: tensor name -> :class:`TensorMeta`, over all safetensors shards.
        license: the license from the model card's front matter, if any.
        hub: where a Hub model's tensors lie, at the commit its metadata was read from (None for a
            local folder): what the weights are later read from, by byte ranges.
    """

    reference: str
    config: dict
    tensors: dict[str, TensorMeta] = field(repr=False)
    license: str | None = None
    hub: HubCheckpoint | None = field(default=None, repr=False)


def read_safetensors_layout(path: Path, where: str | None = None) -> dict[str, StoredTensor]:
    """Read and check one safetensors file's header (8-byte length + JSON), without touching its data.

    Args:
        path: a `.safetensors` file.
        where: how error messages name the file (defaults to its path).

    Returns:
        tensor name -> :class:`StoredTensor` (shape, dtype and absolute byte range).

    Raises:
        ModelFileError subclasses: see :func:`merger.io.modelfiles.read_safetensors_entries`.
    """
    start, entries = read_safetensors_entries(path, where or f"`{path}`")
    return {
        name: StoredTensor(TensorMeta(shape, dtype), start + begin, end - begin)
        for name, (shape, dtype, begin, end) in entries.items()
    }


def read_safetensors_header(path: Path) -> dict[str, TensorMeta]:
    """Shapes and dtypes of one safetensors file's tensors (its header only, checked)."""
    return {name: stored.meta for name, stored in read_safetensors_layout(path).items()}


def read_checkpoint(model_dir: Path, reference: str | None = None) -> dict[Path, dict[str, StoredTensor]]:
    """Every safetensors file of a local model directory, its header checked, in the index's order.

    With `model.safetensors.index.json`, its shards (each present, and agreeing with the index);
    without, every `*.safetensors` file (no tensor in two of them).

    Args:
        model_dir: the model directory.
        reference: the model's name in error messages (defaults to the path).

    Returns:
        file -> tensor name -> :class:`StoredTensor`.

    Raises:
        ModelNotFoundError: the directory has no safetensors weights.
        ModelFileError subclasses: an unreadable, truncated or inconsistent file or index.
    """
    reference = reference or str(model_dir)
    names = list_model_files(model_dir)
    where = f"model `{reference}`"
    if SAFETENSORS_INDEX_FILE in names:
        weight_map = read_index(model_dir / SAFETENSORS_INDEX_FILE, f"{where}: `{SAFETENSORS_INDEX_FILE}`")
        files = [model_dir / name for name in dict.fromkeys(weight_map.values())]
    else:
        weight_map = None
        files = [model_dir / name for name in sorted(names) if name.endswith(".safetensors")]
    if not files:
        raise ModelNotFoundError(f"model `{reference}` has no `*.safetensors` weights; point `model` at a model directory.")
    layouts = {path: read_safetensors_layout(path, f"{where}: `{path.name}`") for path in files}
    if weight_map is not None:
        check_index_matches(weight_map, {p.name: set(t) for p, t in layouts.items()}, f"{where}: `{SAFETENSORS_INDEX_FILE}`")
    else:
        _refuse_duplicates(layouts, where)
    return layouts


def _refuse_duplicates(layouts: dict[Path, dict[str, StoredTensor]], where: str) -> None:
    seen: dict[str, Path] = {}
    for path, tensors in layouts.items():
        for name in tensors:
            if name in seen:
                raise WeightIndexError(
                    f"{where}: tensor `{excerpt(name)}` is in both `{seen[name].name}` and `{path.name}`; remove the "
                    f"file that does not belong, or add the `{SAFETENSORS_INDEX_FILE}` that says which to use"
                )
            seen[name] = path


def list_model_files(model_dir: Path) -> list[str]:
    """The names in a model directory.

    Raises:
        UnreadableModelFileError: the OS refused to list it.
    """
    try:
        return os.listdir(model_dir)
    except OSError as err:
        raise unreadable(model_dir, err) from None


def read_model_config(data: bytes, reference: str) -> dict:
    """A model's `config.json` from its bytes: a UTF-8 JSON object.

    Raises:
        ModelConfigFileError: not UTF-8, not JSON, or not an object. LfsPointerError: an LFS pointer.
    """
    return parse_json_object(data, f"model `{reference}`: `{CONFIG_FILE}`", ModelConfigFileError)


def read_local_metadata(model_dir: Path, reference: str | None = None) -> ModelMetadata:
    """Read a local model directory's metadata, every file checked (:func:`read_checkpoint`).

    Args:
        model_dir: directory holding `config.json` and safetensors weights.
        reference: the name to report in errors (defaults to the path).

    Raises:
        ModelNotFoundError: the directory or its `config.json` is missing.
        UnsafeWeightsError: only pickle checkpoints are present.
        ModelFileError subclasses: a broken config, header or index; an adapter or GGUF-only folder.
    """
    reference = reference or str(model_dir)
    config_path = model_dir / CONFIG_FILE
    names = list_model_files(model_dir)
    refuse_non_checkpoint_files(reference, names, lambda name: read_bytes(model_dir / name))
    if CONFIG_FILE not in names:
        raise ModelNotFoundError(
            f"model `{reference}`: no `{CONFIG_FILE}` in `{model_dir}`; give a Hub id or a model directory."
        )
    config = read_model_config(read_bytes(config_path), reference)
    tensors: dict[str, TensorMeta] = {}
    for layout in read_checkpoint(model_dir, reference).values():
        tensors.update({name: stored.meta for name, stored in layout.items()})
    return ModelMetadata(reference, config, tensors, _local_license(model_dir))


def _local_license(model_dir: Path) -> str | None:
    """The card's `license`; None without a card, or (with a warning) when its front matter is unreadable."""
    readme = model_dir / "README.md"
    if not readme.is_file():
        return None
    import yaml
    from huggingface_hub import ModelCard

    try:
        return ModelCard.load(readme).data.to_dict().get("license")
    except (OSError, ValueError, yaml.YAMLError) as err:
        logger.warning("`%s`: the model card's front matter is unreadable (%s); its license is unknown", readme, type(err).__name__)
        return None
