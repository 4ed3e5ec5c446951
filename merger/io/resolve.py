"""Where each referenced model lives: a local directory, or a Hub repo (metadata first, weights later)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from merger import constants
from merger.publish import hub_read
from merger.config.schema import ModelReference
from merger.errors import ModelNotFoundError, excerpt
from merger.io.formats import check_layer_count, refuse_unmergeable_weights
from merger.lora.adapter import read_adapter
from merger.io.metadata import ModelMetadata, read_local_metadata
from merger.io.sources import WeightSource
from merger.timeouts import map_models
from merger.plan.tokenizer import Vocabulary, load_vocabulary
from merger.config.references import PATH_PREFIXES, is_hub_id, looks_like_hub_id


def local_path(ref: ModelReference) -> Path | None:
    """The local directory `ref` names, or None for a Hub id.

    Relative paths resolve against the working directory; an existing directory wins over a Hub id
    of the same spelling (as in mergekit). On a Space the only local folders are the jobs' own work
    folders (a multi-stage merge's intermediates): anything else is a Hub id or refused, so no config
    reads the Space's own disk, whichever entry point it came through.

    Raises:
        ModelNotFoundError: `ref` is written as a path (`./`, `../`, `/`, `~`) but no such directory exists
            (on a Space: outside the jobs' work folders).
    """
    path = Path(os.path.expanduser(ref.model))
    if constants.ON_SPACE and not _in_work_folders(path):
        if ref.model.startswith(PATH_PREFIXES) or not looks_like_hub_id(ref.model):
            raise ModelNotFoundError(
                f"model `{excerpt(str(ref), 100)}`: local folders are not read here; give a Hub id like `org/name`"
            )
        return None  # spelled like a Hub id: the Hub's, whatever the Space's own disk holds
    try:
        if path.is_dir():
            return path.resolve()
        hub_id = is_hub_id(ref.model)
    except OSError:  # e.g. a name too long for the filesystem: neither a folder nor a Hub id
        hub_id = False
    if not hub_id:
        raise ModelNotFoundError(
            f"model `{excerpt(str(ref), 100)}`: no such local directory ({excerpt(str(path.resolve()), 100)}); "
            "check the path, or give a Hub id like `org/name`"
        )
    return None


def _in_work_folders(path: Path) -> bool:
    """Whether a folder is inside the jobs' work folders (where a multi-stage merge writes its intermediates)."""
    try:
        return path.resolve().is_relative_to((Path(constants.DATA_DIR) / "work").resolve())
    except (OSError, RuntimeError):  # a name too long, a symlink loop: not a work folder
        return False


def fetch_metadata(refs: list[ModelReference], token: str | None) -> dict[str, ModelMetadata]:
    """Metadata of every model without downloading weights (local headers, or the Hub's).

    Returns:
        canonical key -> :class:`ModelMetadata`.

    Every model is also checked to be mergeable: no quantised or adapter tensors, a layer count. A
    `model+lora` input takes its model's metadata, after its adapter (downloaded: adapter files only)
    is checked to change only tensors the model has, with their shapes.

    Raises:
        ModelNotFoundError, UnsafeWeightsError, HubError: as :func:`merger.publish.hub_read.fetch_metadata`.
        ModelFileError subclasses: a broken file, or weights that cannot be merged (quantised, GGUF,
            a PEFT adapter); see :mod:`merger.io.modelfiles` and :mod:`merger.io.formats`.
        LoraAdapterError / AdapterTargetError: a `+lora` adapter that cannot be applied to its model.
    """

    def one(ref: ModelReference) -> ModelMetadata:
        path = local_path(ref.base)
        meta = read_local_metadata(path, str(ref.base)) if path else hub_read.fetch_metadata(str(ref.base), token=token)
        refuse_unmergeable_weights(meta)
        check_layer_count(meta)
        if ref.lora:  # the adapter changes values only: the model's metadata stands, once its targets fit
            read_adapter(adapter_path(ref, token), ref.lora).check_targets(meta.tensors, str(ref.base))
        return meta

    found = map_models(one, refs, lambda ref: f"reading model `{excerpt(str(ref), 100)}`")
    return {ref.key: meta for ref, meta in zip(refs, found)}


def materialize(refs: list[ModelReference], token: str | None) -> dict[str, Path]:
    """Local directories for every model, downloading Hub repos (safetensors, configs, tokenizer files only)."""
    return {ref.key: local_path(ref.base) or hub_read.download_model(str(ref.base), token=token) for ref in refs}


def stream_sources(
    refs: list[ModelReference], metadata: dict[str, ModelMetadata], token: str | None
) -> tuple[dict[str, Path | WeightSource], Callable[[], dict[str, Path]]]:
    """Every model's weights, with no Hub weights downloaded (they are read by byte ranges), and a
    function that gives every model's folder.

    A Hub model's weights are a :class:`~merger.publish.hub_ranges.HubWeights` at the commit its
    metadata was read from (which reads files already in the local HF cache from there), and its
    folder, made when the function is called, holds its other files (configs, tokenizer, code) at
    that commit: the merge needs none of them, so their downloads wait for the function, which runs
    beside the merge. A local model is its folder twice. A Hub model whose metadata has no
    checkpoint (planned elsewhere) is downloaded whole now.

    Returns:
        (model key -> folder or weight source, () -> model key -> folder).

    Raises:
        ModelNotFoundError, HubError: as :func:`merger.publish.hub_read.download_model` (the function too).
    """
    weights: dict[str, Path | WeightSource] = {}
    pinned: dict[str, str] = {}  # model key -> the `repo@commit` whose other files the folder needs
    for ref in refs:
        path = local_path(ref.base)
        hub = metadata[ref.key].hub if path is None else None
        if hub is None:
            weights[ref.key] = path or hub_read.download_model(str(ref.base), token=token)
        else:
            # Imported here: its HTTP stack (urllib3, huggingface_hub's trust store) takes 0.1 s to import,
            # which a merge of local folders never needs.
            from merger.publish.hub_ranges import HubWeights

            weights[ref.key] = HubWeights(hub, token, str(ref.base))
            pinned[ref.key] = f"{hub.repo_id}@{hub.revision}"

    def folders() -> dict[str, Path]:
        return {
            key: hub_read.download_model(pinned[key], token=token, weights=False) if key in pinned else source
            for key, source in weights.items()
        }

    return weights, folders


def adapter_path(ref: ModelReference, token: str | None) -> Path:
    """The local folder of `ref`'s LoRA adapter, downloading a Hub adapter (its two adapter files only).

    Raises:
        ModelNotFoundError: neither a folder nor a Hub id; HubError: as :func:`merger.publish.hub_read.download_adapter`.
    """
    lora = ModelReference.parse(ref.lora)  # `org/adapter@rev` or a folder
    return local_path(lora) or hub_read.download_adapter(str(lora), token=token)


def materialize_adapters(refs: list[ModelReference], token: str | None) -> dict[str, Path]:
    """model key -> local adapter folder, for every `model+lora` input."""
    return {ref.key: adapter_path(ref, token) for ref in refs if ref.lora}


def embedding_rows(meta: ModelMetadata) -> int:
    """Rows of a model's input embedding matrix (its usable vocabulary), from its metadata."""
    from merger.plan.lookup import architecture_for

    arch = architecture_for(meta.config, meta.reference, meta.tensors)
    name = next(w for w in arch.pre_weights if w.is_embed).stored_name(meta.tensors)
    return meta.tensors[name].shape[0]


def fetch_vocabularies(
    refs: list[ModelReference], metadata: dict[str, ModelMetadata], token: str | None
) -> dict[str, Vocabulary]:
    """Every model's tokenizer vocabulary (Hub models: tokenizer files only, no weights).

    Returns:
        canonical key -> :class:`~merger.plan.tokenizer.Vocabulary`.
    """

    def one(ref: ModelReference) -> Vocabulary:
        path = local_path(ref.base) or hub_read.download_tokenizer(str(ref.base), token=token)
        return load_vocabulary(path, embedding_rows(metadata[ref.key]), str(ref.base))

    found = map_models(one, refs, lambda ref: f"reading the tokenizer of `{excerpt(str(ref.base), 100)}`")
    return {ref.key: vocabulary for ref, vocabulary in zip(refs, found)}
