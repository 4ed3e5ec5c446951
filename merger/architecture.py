"""Architectures as data: `architectures/*.json` list each family's tensors with `${layer_index}` templates.

A definition names the Hugging Face classes it covers, the weights before the layers (`pre_weights`),
one layer's weights (`layer_templates.weights`) and the weights after (`post_weights`). Each weight
may be `is_embed` (rows follow the vocabulary), `optional`, and have `tied_names` (where to take it
from when a model lacks it, e.g. `lm_head.weight` from the embeddings of a tied model). MoE outputs
add `expert_source` (the dense weight an expert copies, with `${expert_index}` in its name),
`residual` (the expert's write to the residual stream) and `router`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path

from .errors import ArchitectureError

ARCHITECTURES_DIR = Path(__file__).parent / "architectures"


@dataclass(frozen=True)
class WeightInfo:
    """One tensor of an architecture (a template until :meth:`for_layer` fills it in).

    Attributes:
        name: the tensor's name, e.g. `model.layers.${layer_index}.mlp.up_proj.weight`.
        is_embed: rows are indexed by token id (embeddings, lm_head).
        optional: models may lack it (then it is skipped, or taken from `tied_names`).
        tied_names: names to read instead when a model lacks this tensor.
        expert_source: for MoE outputs, the dense tensor an expert copies.
        residual: for MoE outputs, whether this is the expert's residual write (gets `residual_scale`).
        router: for MoE outputs, the router (gate) matrix, shape `(experts, hidden_size)`.
    """

    name: str
    is_embed: bool = False
    optional: bool = False
    tied_names: tuple[str, ...] = ()
    expert_source: str | None = None
    residual: bool = False
    router: bool = False

    def for_layer(self, layer: int, expert: int | None = None) -> "WeightInfo":
        """This template with `${layer_index}` (and `${expert_index}`) filled in."""

        def fill(text: str | None) -> str | None:
            if text is None:
                return None
            text = text.replace("${layer_index}", str(layer))
            return text if expert is None else text.replace("${expert_index}", str(expert))

        return replace(
            self,
            name=fill(self.name),
            tied_names=tuple(fill(n) for n in self.tied_names),
            expert_source=fill(self.expert_source),
        )


@dataclass(frozen=True)
class Architecture:
    """A model family's tensor layout, loaded from `architectures/<model_type>.json`.

    Attributes:
        model_type: the config's `model_type` (e.g. `mistral`).
        architectures: the Hugging Face class names it covers (e.g. `MistralForCausalLM`).
        num_layers_config_key: the config key holding the layer count.
        pre_weights / layer_weights / post_weights: the tensor templates, in file order.
        moe_from: for an MoE output, the dense `model_type`s it can be assembled from.
    """

    model_type: str
    architectures: tuple[str, ...]
    num_layers_config_key: str
    pre_weights: tuple[WeightInfo, ...]
    layer_weights: tuple[WeightInfo, ...]
    post_weights: tuple[WeightInfo, ...]
    moe_from: tuple[str, ...] = ()

    def num_layers(self, config: dict) -> int:
        """The layer count stated by a model's `config.json` (dotted keys allowed)."""
        value = config
        for part in self.num_layers_config_key.split("."):
            value = value[part]
        return int(value)

    def layer(self, index: int) -> tuple[WeightInfo, ...]:
        """The weights of layer `index` (templates filled in; expert templates left to the caller)."""
        return tuple(w.for_layer(index) if w.expert_source is None else w for w in self.layer_weights)


def _weights(items: list[dict]) -> tuple[WeightInfo, ...]:
    return tuple(WeightInfo(**{**item, "tied_names": tuple(item.get("tied_names", ()))}) for item in items)


@cache
def _definitions() -> tuple[Architecture, ...]:
    definitions = []
    for path in sorted(ARCHITECTURES_DIR.glob("*.json")):
        data = json.loads(path.read_text())
        definitions.append(
            Architecture(
                model_type=data["model_type"],
                architectures=tuple(data["architectures"]),
                num_layers_config_key=data["num_layers_config_key"],
                pre_weights=_weights(data["pre_weights"]),
                layer_weights=_weights(data["layer_templates"]["weights"]),
                post_weights=_weights(data["post_weights"]),
                moe_from=tuple(data.get("moe_from", ())),
            )
        )
    return tuple(definitions)


def architecture_by_type(model_type: str) -> Architecture:
    """The definition for a `model_type` (e.g. `mixtral` for MoE outputs).

    Raises:
        ArchitectureError: no definition has that model_type.
    """
    for definition in _definitions():
        if definition.model_type == model_type:
            return definition
    raise ArchitectureError(f"no architecture definition for model_type `{model_type}`")


def architecture_for(config: dict, reference: str) -> Architecture:
    """The definition matching a model's `config.json` (`architectures[0]`, then `model_type`).

    Args:
        config: the model's parsed `config.json`.
        reference: the model's name, for the error message.

    Raises:
        ArchitectureError: the architecture is not supported; the message lists the supported ones.
    """
    names = config.get("architectures") or []
    model_type = config.get("model_type")
    candidates = [d for d in _definitions() if names and names[0] in d.architectures]
    if len(candidates) > 1:
        candidates = [d for d in candidates if d.model_type == model_type] or candidates
    if not candidates:
        candidates = [d for d in _definitions() if d.model_type == model_type]
    if not candidates:
        supported = ", ".join(sorted(a for d in _definitions() for a in d.architectures))
        raise ArchitectureError(
            f"model `{reference}` has architecture `{names[0] if names else model_type}`, which merger does not "
            f"support yet; supported: {supported}"
        )
    return candidates[0]
