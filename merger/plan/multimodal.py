"""Multimodal checkpoints (a text decoder beside a vision tower): the text decoder's layout under the
checkpoint's prefixes, every other tensor a side module carried to the output.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

from merger.errors import ArchitectureError
from merger.plan.architecture import Architecture, WeightInfo, definitions
from merger.plan.inference import LAYER_INDEX, infer_architecture

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
                 and not (LAYER_INDEX.search(n) and n.startswith(layout[0])))
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
    for definition in definitions():
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
    from merger.plan.settings import effective_text_config

    value = getattr(effective_text_config(text_config), "num_hidden_layers", None)
    return value if isinstance(value, int) else None
