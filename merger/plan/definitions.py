"""The schema of the architecture definition files (`architectures/*.json`), as pydantic models.

Strict: a value of another JSON type is refused (no `"yes"` for a boolean), as is an unknown key.
:func:`merger.plan.architecture.load_definition` turns the first problems into an
:class:`~merger.errors.ArchitectureError` naming the file and the key.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, ValidationError

_STRICT = ConfigDict(extra="forbid", strict=True, frozen=True)


class WeightEntry(BaseModel):
    """One tensor of a definition; its fields are :class:`~merger.plan.architecture.WeightInfo`'s."""

    model_config = _STRICT
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


class LayerTemplates(BaseModel):
    """The tensors of one decoder layer, names holding `${layer_index}`."""

    model_config = _STRICT
    weights: tuple[WeightEntry, ...]


class Definition(BaseModel):
    """One definition file: a model family's tensors, in file order."""

    model_config = _STRICT
    model_type: str
    architectures: tuple[str, ...] = Field(min_length=1)
    num_layers_config_key: str
    pre_weights: tuple[WeightEntry, ...]
    layer_templates: LayerTemplates
    post_weights: tuple[WeightEntry, ...]
    moe_from: tuple[str, ...] = ()


_MESSAGES = {  # pydantic error type -> what the file must change
    "missing": "is required",
    "extra_forbidden": "is not a known key",
    "string_type": "must be a string",
    "bool_type": "must be a boolean",
    "list_type": "must be a list",
    "tuple_type": "must be a list",
    "model_type": "must be an object",
    "model_attributes_type": "must be an object",
    "dict_type": "must be an object",
    "too_short": "must name at least one Hugging Face class",
}


def definition_problems(error: ValidationError) -> list[str]:
    """The problems of a definition file, each as "`key.path[0].field` what to change".

    Args:
        error: from validating the file's text against :class:`Definition`.
    """
    problems = []
    for item in error.errors():
        if item["type"] == "json_invalid":
            problems.append(f"is not valid JSON: {item['ctx'].get('error', item['msg'])}")
            continue
        where = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in item["loc"]).lstrip(".")
        what = _MESSAGES.get(item["type"], item["msg"])
        problems.append(f"`{where}` {what}" if where else f"the top level {what}")
    return problems
