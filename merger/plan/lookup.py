"""A model's architecture: its definition, its multimodal layout, or a layout inferred from its tensors."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from merger.errors import ArchitectureError
from merger.plan.architecture import Architecture, definitions
from merger.plan.inference import infer_architecture
from merger.plan.multimodal import is_multimodal, multimodal_architecture


def architecture_for(
    config: dict, reference: str, tensor_names: Mapping[str, Any] | Iterable[str] | None = None
) -> Architecture:
    """The definition matching a model's `config.json` (`architectures[0]`, then `model_type`).

    When no definition matches and the model's tensors are given, the layout is inferred from
    them (:func:`infer_architecture`).

    Args:
        config: the model's parsed `config.json`.
        reference: the model's name, for the error message.
        tensor_names: the model's tensor names, or its tensor mapping (name -> anything with a
            `.shape`, e.g. `ModelMetadata.tensors`; shapes let inference spot embeddings).

    Returns:
        The matching or inferred :class:`Architecture`.

    Raises:
        ArchitectureError: no definition matches and the tensors were not given or their layout
            cannot be inferred; the message lists the supported architectures.
    """
    names = config.get("architectures") or []
    model_type = config.get("model_type")
    if is_multimodal(config) and tensor_names is not None:
        return multimodal_architecture(config, reference, tensor_names)
    candidates = [d for d in definitions() if names and names[0] in d.architectures]
    if len(candidates) > 1:
        candidates = [d for d in candidates if d.model_type == model_type] or candidates
    if not candidates:
        candidates = [d for d in definitions() if d.model_type == model_type]
    if candidates:
        return candidates[0]
    supported = ", ".join(sorted(a for d in definitions() for a in d.architectures))
    unsupported = f"model `{reference}` has architecture `{names[0] if names else model_type}`, which merger"
    if tensor_names is None:
        raise ArchitectureError(f"{unsupported} does not support yet; supported: {supported}")
    try:
        return infer_architecture(config, tensor_names)
    except ArchitectureError as error:
        raise ArchitectureError(
            f"{unsupported} has no definition for, and its layout could not be inferred from its tensors: "
            f"{error}. Supported: {supported}"
        ) from error
