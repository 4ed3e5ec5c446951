"""Layouts inferred for decoder-only models that have no definition, from their tensor names.

Names with a `.<digits>.` segment are one layer stack's tensors; the rest sit before or after the
layers (see :func:`infer_architecture`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from merger.errors import ArchitectureError
from merger.plan.architecture import LAYER_PLACEHOLDER, Architecture, WeightInfo

# Inference heuristics for models without a definition (see :func:`infer_architecture`).
# The layer index is the first all-digit path segment: `model.layers.7.mlp...`, `transformer.h.7.attn...`.
LAYER_INDEX = re.compile(r"\.(\d+)\.")
# Config keys that hold the layer count, most common first.
NUM_LAYERS_CONFIG_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
# Substrings of names that sit before the layers (token and position embeddings, their norms).
PRE_WEIGHT_HINTS = ("embed", "wte", "wpe", "tok_embeddings")
# Modules that are an output head (their `.weight` may be tied to the input embeddings).
LM_HEAD_MODULES = ("lm_head", "output", "embed_out")
# Modules that are token embeddings, for `is_embed` when no shapes are known.
TOKEN_EMBED_MODULES = ("embed_tokens", "wte", "tok_embeddings", "word_embeddings", "embed_in")


def _module(name: str) -> str:
    """The module a parameter belongs to: `lm_head` for `lm_head.weight`, `wte` for `transformer.wte.weight`."""
    parts = name.split(".")
    return parts[-2] if len(parts) > 1 else ""


def _is_head(name: str) -> bool:
    # Only the head's weight can be tied to the embeddings; a head bias (Phi-2) is a plain tensor.
    return _module(name) in LM_HEAD_MODULES and name.endswith(".weight")


def infer_architecture(config: dict, tensors: Mapping[str, Any] | Iterable[str]) -> Architecture:
    """Infer a decoder-only model's layout from its tensor names.

    Names with a `.<digits>.` segment are layer tensors: the first such segment splits a name into
    the layer stack's prefix, the index and a suffix, and the template is
    `prefix + ${layer_index} + suffix`. The rest are pre-weights when they look like embeddings
    (:data:`PRE_WEIGHT_HINTS`), else post-weights. A tensor outside the layers is `is_embed` when
    it is 2-D with `vocab_size` rows (or, without shapes, when its module is a token embedding or
    an output head). An output head's weight (:data:`LM_HEAD_MODULES`) is optional, with the
    embeddings as `tied_names`.

    Args:
        config: the model's parsed `config.json` (`model_type`, `architectures`, the layer count
            under one of :data:`NUM_LAYERS_CONFIG_KEYS`, `vocab_size`).
        tensors: the model's tensor names, or a mapping name -> anything with a `.shape` (e.g.
            :attr:`ModelMetadata.tensors <merger.io.metadata.ModelMetadata.tensors>`) so that
            embeddings are recognised by shape.

    Returns:
        The inferred :class:`Architecture` (`inferred` set), templates sorted by name.

    Raises:
        ArchitectureError: the config states no layer count, there are no layer tensors or more
            than one layer stack, the layer indices disagree with the config, or the layers do
            not all have the same tensors.
    """
    shapes = {n: tuple(t.shape) for n, t in tensors.items()} if isinstance(tensors, Mapping) else None
    names = sorted(tensors)
    key = next((k for k in NUM_LAYERS_CONFIG_KEYS if isinstance(config.get(k), int)), None)
    if key is None:
        raise ArchitectureError(
            f"the config states no layer count (none of {', '.join(f'`{k}`' for k in NUM_LAYERS_CONFIG_KEYS)})"
        )
    prefix, suffixes, outside = _layer_stack(names, config[key], key)
    pre, post = _weights_outside_layers(outside, config.get("vocab_size"), shapes)
    return Architecture(
        model_type=str(config.get("model_type") or "unknown"),
        architectures=tuple(config.get("architectures") or ()),
        num_layers_config_key=key,
        pre_weights=tuple(pre),
        layer_weights=tuple(WeightInfo(prefix + LAYER_PLACEHOLDER + suffix) for suffix in sorted(suffixes)),
        post_weights=tuple(post),
        inferred=True,
    )


def _layer_stack(names: list[str], count: int, key: str) -> tuple[str, set[str], list[str]]:
    """The one layer stack of an inferred model: its name prefix, each layer's name suffixes, and the
    names outside the layers.

    Raises:
        ArchitectureError: no layer tensors, more than one stack, indices other than `0..count-1`
            (the config's `key`), or layers with different tensors.
    """
    layers: dict[int, set[str]] = {}
    prefixes: set[str] = set()
    outside: list[str] = []
    for name in names:
        match = LAYER_INDEX.search(name)
        if match is None:
            outside.append(name)
            continue
        prefixes.add(name[: match.start(1)])
        layers.setdefault(int(match.group(1)), set()).add(name[match.end(1):])
    if not prefixes:
        raise ArchitectureError("no tensor name has a layer index (a `.<number>.` segment)")
    if len(prefixes) > 1:
        raise ArchitectureError(
            f"the tensors form more than one layer stack ({', '.join(f'`{p}<n>`' for p in sorted(prefixes))}); "
            "only single-stack decoder-only models can be inferred"
        )
    if sorted(layers) != list(range(count)):
        found = sorted(layers)
        raise ArchitectureError(
            f"the config says `{key}: {count}` but the tensors have layer indices {found[0]}..{found[-1]} "
            f"({len(found)} distinct)"
        )
    suffixes = layers[0]
    for index, other in sorted(layers.items()):
        if other != suffixes:
            differing = sorted(suffixes ^ other)
            raise ArchitectureError(
                f"layer {index} does not have the same tensors as layer 0 (differing: "
                f"{', '.join(f'`{s[1:]}`' for s in differing[:5])}); inference needs every layer to have the same tensors"
            )
    (prefix,) = prefixes
    return prefix, suffixes, outside


def _weights_outside_layers(
    outside: list[str], vocab_size: int | None, shapes: dict[str, tuple[int, ...]] | None
) -> tuple[list[WeightInfo], list[WeightInfo]]:
    """The pre- and post-weights of an inferred model (see :func:`infer_architecture`)."""

    def is_embed(name: str) -> bool:
        if shapes is None:
            return _module(name) in TOKEN_EMBED_MODULES + LM_HEAD_MODULES and name.endswith(".weight")
        shape = shapes[name]
        return len(shape) == 2 and shape[0] == vocab_size

    pre, post, heads = [], [], []
    for name in outside:
        if _is_head(name):
            heads.append(name)
        elif is_embed(name) or any(hint in name for hint in PRE_WEIGHT_HINTS):
            pre.append(WeightInfo(name, is_embed=is_embed(name)))
        else:
            post.append(WeightInfo(name, is_embed=is_embed(name)))
    embeddings = tuple(w.name for w in pre if w.is_embed)
    # Heads go last: they read the final norm's output.
    post += [WeightInfo(name, is_embed=is_embed(name), optional=True, tied_names=embeddings) for name in heads]
    return pre, post
