"""The form as a view of the config: what the form shows of a config mapping, and what it keeps.

No gradio here. The config mapping (the parsed YAML) is the single source of truth: :func:`view_of`
reads what the form can show from it (generated from the method registry: every method, its per-model
and global parameters with their defaults); :mod:`merger.ui.config_edits` changes one field at a time.
Everything the form cannot show stays in the mapping untouched and is listed in :attr:`View.kept`.
"""

from __future__ import annotations

import math
from typing import Any

import yaml

from merger.config.parse import parse_config_text
from merger.errors import ConfigError
from merger.methods.registry import METHODS, ParameterSpec
from merger.ui import config_settings as cs
from merger.ui.config_view_moe import moe_view
from merger.ui.config_fields import (
    CHAT_TEMPLATES,
    MOE,
    MOE_FIELDS,
    TOKENIZER_CHOICES,
    TOP_FIELDS,
    Field,
    ModelRow,
    SliceRow,
    View,
    options_of,
    params_of,
    reference_parts,
    text_of,
)

__all__ = [  # the form's data types live in merger.ui.config_fields; the panels reach them through here
    "CHAT_TEMPLATES", "MOE", "MOE_FIELDS", "TOKENIZER_CHOICES", "TOP_FIELDS", "Field", "ModelRow", "SliceRow",
    "View", "from_widget", "method_choices", "method_of", "options_of", "params_of", "parse", "reference_parts",
    "slice_rows", "text_of", "to_widget", "view_of",
]


def method_choices() -> list[tuple[str, str]]:
    """(label, name) for every registered method and mergekit-moe, for the method picker."""
    found = [(f"{m.pretty_name} ({m.name})", m.name) for m in METHODS.values()]
    return [*found, ("Mixture of experts (mergekit-moe)", MOE)]


def parse(text: str) -> dict[str, Any] | None:
    """The mapping a YAML text holds, or None when it is not one or the one parser refuses it (its limits,
    a token, several documents: :mod:`merger.ui.config_stages` reads those): the form then shows nothing
    and validation names the problem."""
    try:
        data = parse_config_text(text or "")
    except ConfigError:
        return None
    return data if isinstance(data, dict) else None


def method_of(data: dict[str, Any]) -> str:
    """`moe` for a mergekit-moe config, else its `merge_method` (as text)."""
    return MOE if "experts" in data else str(data.get("merge_method") or "")


# ---------------------------------------------------------------- config -> view
def view_of(data: dict[str, Any]) -> View:
    """What the form shows of `data` (never raises; odd values are left to the YAML and listed as kept)."""
    method = method_of(data)
    if method == MOE:
        return moe_view(data)
    spec = METHODS.get(method)
    params = spec.parameters if spec else ()
    per_model = [p for p in params if p.per_model]
    entries = data.get("models") if isinstance(data.get("models"), list) else []
    rows = tuple(
        ModelRow(model, tuple(_field(p, params_of(e).get(p.name)) for p in per_model), lora)
        for e in entries
        if isinstance(e, dict)
        for model, lora in [reference_parts(e.get("model"))]
    )
    slices = slice_rows(data.get("slices"))
    top_params = data.get("parameters") if isinstance(data.get("parameters"), dict) else {}
    base_model, base_lora = reference_parts(data.get("base_model"))
    return View(
        method=method,
        base=spec.base if spec else "optional",
        base_model=base_model,
        rows=rows,
        slices=slices,
        globals=tuple(_field(p, top_params.get(p.name)) for p in params if not p.per_model),
        options=options_of(data),
        kept=tuple(_kept(data, spec, slices is not None)),
        base_lora=base_lora,
    )


def _field(spec: ParameterSpec, value: Any) -> Field:
    default = spec.default if not spec.required else None
    shown = value if value is not None else default
    shape = cs.shape_of(shown)
    if spec.gradient and shape in (cs.GRADIENT, cs.FILTERED):
        kind = shape
    elif isinstance(shown, (list, dict)):
        kind = "text"
    elif isinstance(shown, bool) or (shown is None and isinstance(default, bool)):
        kind = "bool"
    else:
        kind = "number"
    low, high = _bounds(spec)
    return Field(spec.name, kind, value, default, minimum=low, maximum=high, gradient=spec.gradient)


def _bounds(spec: ParameterSpec) -> tuple[float | None, float | None]:
    """The registry's declared range for a number (`spec.range.low` / `.high`), finite ends only."""
    declared = getattr(spec, "range", None)
    ends = (getattr(declared, "low", None), getattr(declared, "high", None))
    return tuple(e if isinstance(e, (int, float)) and not isinstance(e, bool) and math.isfinite(e) else None
                 for e in ends)


def slice_rows(slices: Any) -> tuple[SliceRow, ...] | None:
    """Every slice's sources as rows, in order; None when there are none or one has a shape the form lacks."""
    if not isinstance(slices, list) or not slices:
        return None
    rows = []
    for i, sl in enumerate(slices):
        sources = sl.get("sources") if isinstance(sl, dict) else None
        if not isinstance(sources, list) or not sources:
            return None
        for j, source in enumerate(sources):
            bounds = source.get("layer_range") if isinstance(source, dict) else None
            if not (isinstance(bounds, list) and len(bounds) == 2 and all(type(b) is int for b in bounds)):
                return None
            scale = params_of(source).get("scale")
            model, lora = reference_parts(source.get("model"))
            rows.append(SliceRow(model, bounds[0], bounds[1], scale, i, j, lora))
    return tuple(rows)


def _kept(data: dict[str, Any], spec: Any, slices_shown: bool) -> list[str]:
    known = {"merge_method", "base_model", "models", "parameters", "name", *TOP_FIELDS}
    if slices_shown:
        known.add("slices")
    kept = [k for k in data if k not in known]
    names = {p.name for p in spec.parameters} if spec else set()
    per_model = {p.name for p in spec.parameters if p.per_model} if spec else set()
    top = data.get("parameters")
    if isinstance(top, dict):
        kept += [f"parameters.{k}" for k in top if k not in names or k in per_model]
    elif top is not None:
        kept.append("parameters")
    for i, entry in enumerate(data.get("models") if isinstance(data.get("models"), list) else []):
        if not isinstance(entry, dict):
            kept.append(f"models[{i}]")
            continue
        kept += [f"models[{i}].{k}" for k in entry if k not in ("model", "parameters")]
        kept += [f"models[{i}].parameters.{k}" for k in params_of(entry) if k not in per_model]
    for i, sl in enumerate(data.get("slices") if slices_shown else []):
        kept += [f"slices[{i}].{k}" for k in sl if k != "sources"]
        for j, source in enumerate(sl["sources"]):
            where = f"slices[{i}].sources[{j}]"
            kept += [f"{where}.{k}" for k in source if k not in ("model", "layer_range", "parameters")]
            kept += [f"{where}.parameters.{k}" for k in params_of(source) if k != "scale"]
    return kept


# ---------------------------------------------------------------- widget values
def from_widget(kind: str, value: Any) -> Any:
    """A widget's value as the config stores it: numbers keep ints as ints, `text` is read as inline YAML,
    `string` is kept as typed.

    Blank values give None (the key is removed, so the default applies).
    """
    if kind == "string":  # a prompt: kept as typed, blank included
        return "" if value is None else str(value)
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if kind == "bool":
        return bool(value)
    if kind == "number":
        number = float(value)
        return int(number) if number.is_integer() else number
    if kind == "text":
        try:
            parsed = parse_config_text(str(value))
        except ConfigError:
            return str(value)
        return parsed if parsed is not None else None
    return value


def to_widget(kind: str, value: Any) -> Any:
    """What a widget shows for a config value (`text` fields show inline YAML)."""
    if kind == "text" and isinstance(value, (list, dict)):
        return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return value
