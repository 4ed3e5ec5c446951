"""Where each referenced model lives: a local directory, or a Hub repo (metadata first, weights later)."""

from __future__ import annotations

import os
from pathlib import Path

from merger.publish import hub
from merger.config.references import is_hub_id
from merger.config.schema import ModelReference
from merger.errors import ModelNotFoundError
from merger.io.metadata import ModelMetadata, read_local_metadata
from merger.plan.tokenizer import Vocabulary, load_vocabulary


def local_path(ref: ModelReference) -> Path | None:
    """The local directory `ref` names, or None for a Hub id.

    Relative paths resolve against the working directory; an existing directory wins over a Hub id
    of the same spelling (as in mergekit).

    Raises:
        ModelNotFoundError: `ref` is written as a path (`./`, `../`, `/`, `~`) but no such directory exists.
    """
    path = Path(os.path.expanduser(ref.model))
    if path.is_dir():
        return path.resolve()
    if not is_hub_id(ref.model):
        raise ModelNotFoundError(
            f"model `{ref}`: no such local directory ({path.resolve()}); check the path, or give a Hub id like `org/name`"
        )
    return None


def fetch_metadata(refs: list[ModelReference], token: str | None) -> dict[str, ModelMetadata]:
    """Metadata of every model without downloading weights (local headers, or the Hub's).

    Returns:
        canonical key -> :class:`ModelMetadata`.

    Raises:
        ModelNotFoundError, UnsafeWeightsError, HubError: as :func:`merger.publish.hub.fetch_metadata`.
    """
    result = {}
    for ref in refs:
        path = local_path(ref)
        result[ref.key] = read_local_metadata(path, str(ref)) if path else hub.fetch_metadata(str(ref), token=token)
    return result


def materialize(refs: list[ModelReference], token: str | None) -> dict[str, Path]:
    """Local directories for every model, downloading Hub repos (safetensors, configs, tokenizer files only)."""
    return {ref.key: local_path(ref) or hub.download_model(str(ref), token=token) for ref in refs}


def embedding_rows(meta: ModelMetadata) -> int:
    """Rows of a model's input embedding matrix (its usable vocabulary), from its metadata."""
    from merger.plan.architecture import architecture_for

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
    result = {}
    for ref in refs:
        path = local_path(ref) or hub.download_tokenizer(str(ref), token=token)
        result[ref.key] = load_vocabulary(path, embedding_rows(metadata[ref.key]))
    return result
