"""Architectures as data: `architectures/*.json` list each family's tensors with `${layer_index}` templates.

A definition names the Hugging Face classes it covers, the weights before the layers (`pre_weights`),
one layer's weights (`layer_templates.weights`) and the weights after (`post_weights`). Each weight
may be `is_embed` (rows follow the vocabulary), `optional`, have `aliases` (other names the same
tensor is stored under, e.g. GPT-2's un-prefixed Hub checkpoints) and `tied_names` (where to take it
from when a model lacks it, e.g. `lm_head.weight` from the embeddings of a tied model). MoE outputs
add `expert_source` (the dense weight an expert copies, with `${expert_index}` in its name),
`residual` (the expert's write to the residual stream) and `router`.

A decoder-only model with no definition can still be merged: :func:`architecture_for`, given the
model's tensor names, infers the layout from them (:func:`infer_architecture`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Container, Iterable, Mapping
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from typing import Any

from .errors import ArchitectureError

ARCHITECTURES_DIR = Path(__file__).parent / "architectures"

LAYER_PLACEHOLDER = "${layer_index}"
EXPERT_PLACEHOLDER = "${expert_index}"

# Definition file keys: required ones, then optional ones with their expected JSON types.
_DEFINITION_KEYS: dict[str, type] = {
    "model_type": str,
    "architectures": list,
    "num_layers_config_key": str,
    "pre_weights": list,
    "layer_templates": dict,
    "post_weights": list,
}
_OPTIONAL_DEFINITION_KEYS: dict[str, type] = {"moe_from": list}
# Python type -> its JSON name, for messages.
_JSON_TYPE_NAMES = {str: "a string", bool: "a boolean", list: "a list", dict: "an object"}

# Inference heuristics for models without a definition (see :func:`infer_architecture`).
# The layer index is the first all-digit path segment: `model.layers.7.mlp...`, `transformer.h.7.attn...`.
_LAYER_INDEX = re.compile(r"\.(\d+)\.")
# Config keys that hold the layer count, most common first.
NUM_LAYERS_CONFIG_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
# Substrings of names that sit before the layers (token and position embeddings, their norms).
PRE_WEIGHT_HINTS = ("embed", "wte", "wpe", "tok_embeddings")
# Modules that are an output head (their `.weight` may be tied to the input embeddings).
LM_HEAD_MODULES = ("lm_head", "output", "embed_out")
# Modules that are token embeddings, for `is_embed` when no shapes are known.
TOKEN_EMBED_MODULES = ("embed_tokens", "wte", "tok_embeddings", "word_embeddings", "embed_in")


@dataclass(frozen=True)
class WeightInfo:
    """One tensor of an architecture (a template until :meth:`for_layer` fills it in).

    Attributes:
        name: the tensor's name, e.g. `model.layers.${layer_index}.mlp.up_proj.weight`; outputs use it.
        is_embed: rows are indexed by token id (embeddings, lm_head).
        optional: models may lack it (then it is skipped, or taken from `tied_names`).
        aliases: other names the same tensor may be stored under in an input (read, never written).
        tied_names: names to read instead when a model lacks this tensor.
        expert_source: for MoE outputs, the dense tensor an expert copies.
        residual: for MoE outputs, whether this is the expert's residual write (gets `residual_scale`).
        router: for MoE outputs, the router (gate) matrix, shape `(experts, hidden_size)`.
        side_module: a tensor beside the text decoder (a multimodal model's vision tower or
            projector): merged by the merge's method when every input has it with one shape, else
            copied from the config donor.
    """

    name: str
    is_embed: bool = False
    optional: bool = False
    aliases: tuple[str, ...] = ()
    tied_names: tuple[str, ...] = ()
    expert_source: str | None = None
    residual: bool = False
    router: bool = False
    side_module: bool = False

    def stored_name(self, tensors: Container[str], tied: bool = True) -> str | None:
        """The name this tensor is stored under in one model: its own name, else an alias, else a tied name.

        Args:
            tensors: the model's tensor names (or its name -> tensor mapping).
            tied: whether to fall back on `tied_names` (False asks whether the model has the tensor itself).

        Returns:
            The first of those names the model has, or None.
        """
        candidates = (self.name, *self.aliases, *(self.tied_names if tied else ()))
        return next((name for name in candidates if name in tensors), None)

    def for_layer(self, layer: int, expert: int | None = None) -> "WeightInfo":
        """This template with `${layer_index}` (and `${expert_index}`) filled in.

        Args:
            layer: the layer index.
            expert: the expert index, for MoE templates; None leaves `${expert_index}` as is.

        Returns:
            A copy with every name (`name`, `aliases`, `tied_names`, `expert_source`) filled in.
        """

        def fill(text: str | None) -> str | None:
            if text is None:
                return None
            text = text.replace(LAYER_PLACEHOLDER, str(layer))
            return text if expert is None else text.replace(EXPERT_PLACEHOLDER, str(expert))

        return replace(
            self,
            name=fill(self.name),
            aliases=tuple(fill(n) for n in self.aliases),
            tied_names=tuple(fill(n) for n in self.tied_names),
            expert_source=fill(self.expert_source),
        )


@dataclass(frozen=True)
class Architecture:
    """A model family's tensor layout, loaded from `architectures/<model_type>.json` or inferred.

    Attributes:
        model_type: the config's `model_type` (e.g. `mistral`).
        architectures: the Hugging Face class names it covers (e.g. `MistralForCausalLM`).
        num_layers_config_key: the config key holding the layer count.
        pre_weights / layer_weights / post_weights: the tensor templates, in file order.
        moe_from: for an MoE output, the dense `model_type`s it can be assembled from.
        inferred: True when inferred from a model's tensor names rather than read from a definition.
        default_layers: the layer count transformers assumes when a config states none (multimodal
            `text_config`s often leave the text class's default implicit); None: the count is required.
    """

    model_type: str
    architectures: tuple[str, ...]
    num_layers_config_key: str
    pre_weights: tuple[WeightInfo, ...]
    layer_weights: tuple[WeightInfo, ...]
    post_weights: tuple[WeightInfo, ...]
    moe_from: tuple[str, ...] = ()
    inferred: bool = False
    default_layers: int | None = None

    def num_layers(self, config: dict, default: int | None = None) -> int:
        """The layer count stated by a model's `config.json`.

        Args:
            config: the parsed `config.json`.
            default: returned when the config states no count; None raises instead.

        Returns:
            The value under :attr:`num_layers_config_key` (dotted keys walk nested objects, e.g.
            `text_config.num_hidden_layers`; a text-only config is read under the last part alone).

        Raises:
            KeyError: the config states no count and `default` is None.
        """
        for path in (self.num_layers_config_key.split("."), self.num_layers_config_key.split(".")[-1:]):
            value = config
            for part in path:
                value = value.get(part) if isinstance(value, dict) else None
            if isinstance(value, int):
                return value
        default = self.default_layers if default is None else default
        if default is None:
            raise KeyError(self.num_layers_config_key)
        return default

    def layer(self, index: int) -> tuple[WeightInfo, ...]:
        """The weights of layer `index` (templates filled in; expert templates left to the caller)."""
        return tuple(w.for_layer(index) if w.expert_source is None else w for w in self.layer_weights)


# ---------------------------------------------------------------- definition files

# WeightInfo field -> the JSON type its value must have (lists become tuples); kept equal to the
# dataclass's fields by a test.
_WEIGHT_FIELD_TYPES: dict[str, type] = {
    "name": str,
    "is_embed": bool,
    "optional": bool,
    "aliases": list,
    "tied_names": list,
    "expert_source": str,
    "residual": bool,
    "router": bool,
    "side_module": bool,
}


def _check_strings(value: Any, where: str, path: Path) -> None:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ArchitectureError(f"{path.name}: `{where}` must be a list of strings, got {json.dumps(value)}")


def _weights(items: list, where: str, path: Path, in_layer: bool) -> tuple[WeightInfo, ...]:
    """Validate one list of weight entries and build them.

    Args:
        items: the JSON list.
        where: its key in the file, for messages (e.g. `layer_templates.weights`).
        path: the definition file, for messages.
        in_layer: whether names must carry `${layer_index}` (layer templates) or must not (pre/post).

    Returns:
        The :class:`WeightInfo` entries, in file order.

    Raises:
        ArchitectureError: an entry is not an object, lacks `name`, has an unknown field or a
            field of the wrong type, or misuses `${layer_index}`; the message names the file.
    """
    weights = []
    for index, item in enumerate(items):
        at = f"{where}[{index}]"
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ArchitectureError(f"{path.name}: `{at}` must be an object with a string `name`, got {json.dumps(item)}")
        label = f"`{at}` (`{item['name']}`)"
        unknown = sorted(set(item) - set(_WEIGHT_FIELD_TYPES))
        if unknown:
            raise ArchitectureError(
                f"{path.name}: {label} has unknown field(s) {', '.join(f'`{k}`' for k in unknown)}; "
                f"known fields: {', '.join(_WEIGHT_FIELD_TYPES)}"
            )
        for key, value in item.items():
            expected = _WEIGHT_FIELD_TYPES[key]
            if expected is list:
                _check_strings(value, f"{at}.{key}", path)
            elif not isinstance(value, expected):
                raise ArchitectureError(
                    f"{path.name}: `{at}.{key}` must be {_JSON_TYPE_NAMES[expected]}, got {json.dumps(value)}"
                )
        if (LAYER_PLACEHOLDER in item["name"]) != in_layer:
            rule = "must contain" if in_layer else "must not contain"
            raise ArchitectureError(f"{path.name}: {label} is in `{where}`, so its name {rule} `{LAYER_PLACEHOLDER}`")
        weights.append(WeightInfo(**{k: tuple(v) if isinstance(v, list) else v for k, v in item.items()}))
    return tuple(weights)


def load_definition(path: Path) -> Architecture:
    """Read and validate one definition file.

    Args:
        path: an `architectures/*.json` file.

    Returns:
        The :class:`Architecture` it defines.

    Raises:
        ArchitectureError: the file is not valid JSON, lacks a required key, has an unknown key, or
            has a value of the wrong type; the message names the file and the key.
    """
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ArchitectureError(f"{path.name} is not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise ArchitectureError(f"{path.name}: the top level must be a JSON object")
    missing = [key for key in _DEFINITION_KEYS if key not in data]
    if missing:
        raise ArchitectureError(f"{path.name}: missing required key(s) {', '.join(f'`{k}`' for k in missing)}")
    known = {**_DEFINITION_KEYS, **_OPTIONAL_DEFINITION_KEYS}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ArchitectureError(
            f"{path.name}: unknown key(s) {', '.join(f'`{k}`' for k in unknown)}; known keys: {', '.join(known)}"
        )
    for key, expected in known.items():
        if key in data and not isinstance(data[key], expected):
            raise ArchitectureError(
                f"{path.name}: `{key}` must be {_JSON_TYPE_NAMES[expected]}, got {json.dumps(data[key])}"
            )
    for key in ("architectures", "moe_from"):
        if key in data:
            _check_strings(data[key], key, path)
    if not data["architectures"]:
        raise ArchitectureError(f"{path.name}: `architectures` must name at least one Hugging Face class")
    templates = data["layer_templates"]
    if set(templates) != {"weights"} or not isinstance(templates["weights"], list):
        raise ArchitectureError(f"{path.name}: `layer_templates` must be an object with only a `weights` list")
    return Architecture(
        model_type=data["model_type"],
        architectures=tuple(data["architectures"]),
        num_layers_config_key=data["num_layers_config_key"],
        pre_weights=_weights(data["pre_weights"], "pre_weights", path, in_layer=False),
        layer_weights=_weights(templates["weights"], "layer_templates.weights", path, in_layer=True),
        post_weights=_weights(data["post_weights"], "post_weights", path, in_layer=False),
        moe_from=tuple(data.get("moe_from", ())),
    )


def load_definitions(directory: Path) -> tuple[Architecture, ...]:
    """Read and validate every `*.json` definition in a directory, in file-name order.

    Args:
        directory: a directory of definition files.

    Returns:
        The definitions.

    Raises:
        ArchitectureError: a file is malformed (see :func:`load_definition`), or two files claim the
            same `model_type`.
    """
    definitions: dict[str, tuple[Path, Architecture]] = {}
    for path in sorted(directory.glob("*.json")):
        definition = load_definition(path)
        if definition.model_type in definitions:
            other = definitions[definition.model_type][0]
            raise ArchitectureError(f"{path.name} and {other.name} both define model_type `{definition.model_type}`")
        definitions[definition.model_type] = (path, definition)
    return tuple(definition for _, definition in definitions.values())


@cache
def _definitions() -> tuple[Architecture, ...]:
    return load_definitions(ARCHITECTURES_DIR)


def architecture_by_type(model_type: str) -> Architecture:
    """The definition for a `model_type` (e.g. `mixtral` for MoE outputs).

    Args:
        model_type: a config `model_type`.

    Returns:
        The :class:`Architecture` defined for it.

    Raises:
        ArchitectureError: no definition has that model_type.
    """
    for definition in _definitions():
        if definition.model_type == model_type:
            return definition
    raise ArchitectureError(f"no architecture definition for model_type `{model_type}`")


# ---------------------------------------------------------------- inference for unknown decoders


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
            :attr:`ModelMetadata.tensors <merger.metadata.ModelMetadata.tensors>`) so that
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

    layers: dict[int, set[str]] = {}
    prefixes: set[str] = set()
    outside: list[str] = []
    for name in names:
        match = _LAYER_INDEX.search(name)
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
    count = config[key]
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

    vocab_size = config.get("vocab_size")

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
    return Architecture(
        model_type=str(config.get("model_type") or "unknown"),
        architectures=tuple(config.get("architectures") or ()),
        num_layers_config_key=key,
        pre_weights=tuple(pre),
        layer_weights=tuple(WeightInfo(prefix + LAYER_PLACEHOLDER + suffix) for suffix in sorted(suffixes)),
        post_weights=tuple(post),
        inferred=True,
    )


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
    candidates = [d for d in _definitions() if names and names[0] in d.architectures]
    if len(candidates) > 1:
        candidates = [d for d in candidates if d.model_type == model_type] or candidates
    if not candidates:
        candidates = [d for d in _definitions() if d.model_type == model_type]
    if candidates:
        return candidates[0]
    supported = ", ".join(sorted(a for d in _definitions() for a in d.architectures))
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


# ---------------------------------------------------------------- multimodal checkpoints (text decoder + vision)

# Where a multimodal checkpoint keeps its text decoder: the prefixes that replace a text definition's
# `model.` and `lm_head.`. First the format transformers saves and the Hub holds (LLaVA, Gemma-3,
# Mistral-3: `language_model.model.layers.0...`), then the one some 4.5x versions saved, then the
# plain one of models that put vision beside an ordinary decoder (Qwen2-VL: `model.layers`, `visual.*`).
TEXT_DECODER_LAYOUTS = (
    ("language_model.model.", "language_model.lm_head."),
    ("model.language_model.", "lm_head."),
    ("model.", "lm_head."),
)


def is_multimodal(config: dict) -> bool:
    """Whether a `config.json` describes a text decoder with other modules (`text_config` / `vision_config`)."""
    return isinstance(config.get("text_config"), dict) or isinstance(config.get("vision_config"), dict)


def _moved(name: str, layout: tuple[str, str]) -> str | None:
    """A text-only name (`model.x`, `lm_head.x`) under a layout's prefixes; None for other names."""
    for plain, prefix in zip(("model.", "lm_head."), layout):
        if name.startswith(plain):
            return prefix + name[len(plain):]
    return None


def _unmoved(name: str, layout: tuple[str, str]) -> str | None:
    """The inverse of :func:`_moved`: a multimodal name back to its text-only spelling."""
    for plain, prefix in zip(("model.", "lm_head."), layout):
        if name.startswith(prefix):
            return plain + name[len(prefix):]
    return None


def _move_weight(weight: WeightInfo, layout: tuple[str, str]) -> WeightInfo:
    """A text weight under `layout`, read also under its text-only name and the other layouts' names
    (so a text-only fine-tune, or a checkpoint saved in the other format, merges with it)."""
    def spellings(name: str) -> list[str]:
        return [n for n in (_moved(name, other) for other in TEXT_DECODER_LAYOUTS) if n] + [name]

    own = _moved(weight.name, layout) or weight.name
    aliases = [n for a in (weight.name, *weight.aliases) for n in spellings(a) if n != own]
    return replace(
        weight,
        name=own,
        aliases=tuple(dict.fromkeys(aliases)),
        tied_names=tuple(dict.fromkeys(n for t in weight.tied_names for n in [_moved(t, layout) or t, *spellings(t)])),
    )


def multimodal_architecture(config: dict, reference: str, tensors: Mapping[str, Any] | Iterable[str]) -> Architecture:
    """The layout of a multimodal checkpoint: its text decoder, then every other tensor as a side module.

    The text decoder is found under one of :data:`TEXT_DECODER_LAYOUTS`; its layout is the definition
    of `text_config.model_type` (or inferred from the decoder's tensors when there is none), renamed
    into the checkpoint's prefixes. Layer counts come from `text_config` (the top level when there is
    none), so `models:` and `slices:` address the text decoder's layers. The remaining tensors (vision
    tower, projector) become `side_module` post-weights, in name order.

    Args:
        config: the parsed multimodal `config.json`.
        reference: the model's name, for messages.
        tensors: the model's tensor names, or its name -> `.shape` mapping.

    Returns:
        The :class:`Architecture` (`model_type` and `architectures` the checkpoint's own).

    Raises:
        ArchitectureError: no text decoder is found, or its layout is unknown and cannot be inferred.
    """
    text_config = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    names = list(tensors)
    layout = next((lay for lay in TEXT_DECODER_LAYOUTS if any(n.startswith(lay[0]) for n in names)), None)
    if layout is None:
        raise ArchitectureError(
            f"model `{reference}` is multimodal (`{(config.get('architectures') or ['?'])[0]}`) but no tensor "
            f"lies under a known text decoder prefix ({', '.join(f'`{lay[0]}`' for lay in TEXT_DECODER_LAYOUTS)})"
        )
    text_names = {_unmoved(n, layout): n for n in names if _unmoved(n, layout) is not None}
    text_tensors = (
        {plain: tensors[n] for plain, n in text_names.items()} if isinstance(tensors, Mapping) else list(text_names)
    )
    text = _text_definition(text_config, reference, text_tensors)
    nested = "text_config." if text_config is not config else ""
    moved = {section: tuple(_move_weight(w, layout) for w in getattr(text, section))
             for section in ("pre_weights", "layer_weights", "post_weights")}
    described = {n for ws in moved.values() for w in ws for n in (w.name, *w.aliases)}
    count = text.num_layers(text_config, default=_default_layers(text_config))
    described |= {w.for_layer(i).name for w in moved["layer_weights"] for i in range(count)}
    side = tuple(WeightInfo(n, side_module=True) for n in sorted(names) if n not in described
                 and not (_LAYER_INDEX.search(n) and n.startswith(layout[0])))
    return Architecture(
        model_type=str(config.get("model_type") or text.model_type),
        architectures=tuple(config.get("architectures") or ()),
        num_layers_config_key=nested + text.num_layers_config_key,
        pre_weights=moved["pre_weights"],
        layer_weights=moved["layer_weights"],
        post_weights=moved["post_weights"] + side,
        inferred=text.inferred,
        default_layers=_default_layers(text_config),
    )


def _text_definition(text_config: dict, reference: str, text_tensors: Mapping[str, Any] | list[str]) -> Architecture:
    """The definition of a multimodal model's text decoder, or its layout inferred from the decoder's tensors."""
    model_type = text_config.get("model_type")
    for definition in _definitions():
        if definition.model_type == model_type:
            return definition
    try:
        return infer_architecture({**text_config, **({} if "num_hidden_layers" in text_config else
                                   {"num_hidden_layers": _default_layers(text_config)})}, text_tensors)
    except ArchitectureError as error:
        raise ArchitectureError(
            f"model `{reference}` has a `{model_type}` text decoder, which merger has no definition for, and its "
            f"layout could not be inferred from its tensors: {error}"
        ) from error


def _default_layers(text_config: dict) -> int | None:
    """The text class's default layer count (what transformers assumes when the config states none)."""
    if isinstance(text_config.get("num_hidden_layers"), int):
        return text_config["num_hidden_layers"]
    from .settings import effective_text_config

    value = getattr(effective_text_config(text_config), "num_hidden_layers", None)
    return value if isinstance(value, int) else None
