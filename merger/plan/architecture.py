"""Architectures as data: `architectures/*.json` list each family's tensors with `${layer_index}` templates.

A definition names the Hugging Face classes it covers, the weights before the layers (`pre_weights`),
one layer's weights (`layer_templates.weights`) and the weights after (`post_weights`). Each weight
may be `is_embed` (rows follow the vocabulary), `optional`, have `aliases` (other names the same
tensor is stored under, e.g. GPT-2's un-prefixed Hub checkpoints) and `tied_names` (where to take it
from when a model lacks it, e.g. `lm_head.weight` from the embeddings of a tied model). MoE outputs
add `expert_source` (the dense weight an expert copies, with `${expert_index}` in its name),
`residual` (the expert's write to the residual stream), `router`, `shared` (the shared expert's
weights and gate) and `zeros_when_missing`.

Which architecture a given model has is :func:`merger.plan.lookup.architecture_for`'s: its definition,
its multimodal layout (:mod:`merger.plan.multimodal`) or a layout inferred from its tensor names
(:mod:`merger.plan.inference`).
"""

from __future__ import annotations

from collections.abc import Container
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path

from pydantic import ValidationError

from merger.errors import ArchitectureError
from merger.plan.definitions import Definition, definition_problems

ARCHITECTURES_DIR = Path(__file__).parent / "architectures"

LAYER_PLACEHOLDER = "${layer_index}"
EXPERT_PLACEHOLDER = "${expert_index}"

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
        shared: for MoE outputs, part of the shared expert (its `expert_source` is read from
            `shared_experts[0]`; with `router`, the shared expert's gate, shape `(1, hidden_size)`).
        zeros_when_missing: for MoE outputs, written as zeros when the base lacks it (a Qwen2-MoE's
            q/k/v biases from a Llama base: a zero bias computes what no bias does).
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
    shared: bool = False
    zeros_when_missing: bool = False
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

    def checkpoint_layer_templates(self, config: dict) -> tuple[WeightInfo, ...]:
        """One layer's templates as a checkpoint of this family stores them: an MoE definition's expert
        templates expanded over the config's expert count (so MoE models merge like dense ones).

        Args:
            config: the checkpoint's parsed `config.json` (`num_local_experts` or `num_experts`).

        Returns:
            The templates, `${layer_index}` still in their names; an expert template becomes one plain
            template per expert (no `expert_source`: in a checkpoint it is an ordinary tensor).
        """
        experts = config.get("num_local_experts") or config.get("num_experts") or 0
        out: list[WeightInfo] = []
        for weight in self.layer_weights:
            if EXPERT_PLACEHOLDER not in weight.name:
                out.append(weight)
                continue
            out += [replace(weight, name=weight.name.replace(EXPERT_PLACEHOLDER, str(e)), expert_source=None,
                            residual=False) for e in range(experts if isinstance(experts, int) else 0)]
        return tuple(out)


# ---------------------------------------------------------------- definition files

def load_definition(path: Path) -> Architecture:
    """Read and validate one definition file (schema: :class:`~merger.plan.definitions.Definition`).

    Args:
        path: an `architectures/*.json` file.

    Returns:
        The :class:`Architecture` it defines.

    Raises:
        ArchitectureError: the file is not valid JSON, lacks a required key, has an unknown key, has
            a value of the wrong type, or misuses `${layer_index}`; the message names the file and the key.
    """
    try:
        data = Definition.model_validate_json(path.read_text())
    except ValidationError as error:
        raise ArchitectureError(f"{path.name}: " + "; ".join(definition_problems(error))) from None
    parts = {
        "pre_weights": (data.pre_weights, False),
        "layer_templates.weights": (data.layer_templates.weights, True),
        "post_weights": (data.post_weights, False),
    }
    for where, (entries, in_layer) in parts.items():
        for index, entry in enumerate(entries):
            if (LAYER_PLACEHOLDER in entry.name) != in_layer:
                rule = "must contain" if in_layer else "must not contain"
                raise ArchitectureError(f"{path.name}: `{where}[{index}]` (`{entry.name}`) is in `{where}`, "
                                        f"so its name {rule} `{LAYER_PLACEHOLDER}`")
    weights = {where: tuple(WeightInfo(**e.model_dump()) for e in entries) for where, (entries, _) in parts.items()}
    return Architecture(
        model_type=data.model_type,
        architectures=data.architectures,
        num_layers_config_key=data.num_layers_config_key,
        pre_weights=weights["pre_weights"],
        layer_weights=weights["layer_templates.weights"],
        post_weights=weights["post_weights"],
        moe_from=data.moe_from,
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
def definitions() -> tuple[Architecture, ...]:
    """The shipped definitions (`architectures/*.json`), read once."""
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
    for definition in definitions():
        if definition.model_type == model_type:
            return definition
    raise ArchitectureError(f"no architecture definition for model_type `{model_type}`")
