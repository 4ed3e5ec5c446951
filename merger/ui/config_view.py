"""The form as a view of the config: what the form shows of a config mapping, and what it keeps.

No gradio here. The config mapping (the parsed YAML) is the single source of truth: :func:`view_of`
reads what the form can show from it (generated from the method registry: every method, its per-model
and global parameters with their defaults); :mod:`merger.ui.config_edits` changes one field at a time.
Everything the form cannot show stays in the mapping untouched and is listed in :attr:`View.kept`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import yaml

from merger.dtypes import DTYPES
from merger.config.parse import parse_config_text
from merger.config.schema import SUPPORTED_GATE_MODES
from merger.errors import ConfigError
from merger.methods.registry import METHODS, ParameterSpec

MOE = "moe"  # the mergekit-moe schema (no `merge_method` key)
TOP_FIELDS = ("dtype", "out_dtype", "tokenizer_source", "chat_template", "seed")  # both schemas
MOE_FIELDS = ("gate_mode", "experts_per_token")
TOKENIZER_CHOICES = ("base", "union")  # or a model reference
CHAT_TEMPLATES = ("chatml", "llama3", "alpaca", "mistral")


@dataclass(frozen=True)
class Field:
    """One widget: a parameter or a top-level option.

    Attributes:
        key: the config key (`weight`, `density`, `t`, `dtype`, ...).
        kind: `number`, `bool`, `choice` or `text` (a gradient or filtered value, as inline YAML).
        value: the config's value, or None when the config leaves it out.
        default: what applies when left out (None: required or no default).
        choices: for `choice`, the allowed values.
        minimum / maximum: the registry's range for numbers, when it declares one.
    """

    key: str
    kind: str
    value: Any
    default: Any = None
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None


@dataclass(frozen=True)
class ModelRow:
    """One model of the merge (an expert for MoE) and its per-model parameters."""

    model: str
    params: tuple[Field, ...] = ()


@dataclass(frozen=True)
class SliceRow:
    """One source of a slice: layers `[start, end)` of `model`, with an optional `scale`.

    `slice` and `source` say where it sits: `slices[slice].sources[source]` (a passthrough slice has
    one source; a SLERP over a layer range has one slice with a source per model).
    """

    model: str
    start: int
    end: int
    scale: float | None = None
    slice: int = 0
    source: int = 0


@dataclass(frozen=True)
class View:
    """What the form shows of a config.

    Attributes:
        method: the `merge_method`, or `moe`.
        base: `required`, `optional` or `none`: whether the form shows a base model picker.
        base_model: the config's `base_model` (empty when unset).
        rows: the `models:` entries (MoE: the experts); empty when the config uses slices.
        slices: the one-source slices, or None when the config has none the form can show.
        globals: the method's global parameters.
        options: the top-level options (dtype, tokenizer, chat template, seed; MoE gate fields).
        kept: paths of what the config holds that the form cannot show (left untouched).
    """

    method: str
    base: str
    base_model: str
    rows: tuple[ModelRow, ...]
    slices: tuple[SliceRow, ...] | None
    globals: tuple[Field, ...]
    options: tuple[Field, ...]
    kept: tuple[str, ...] = field(default_factory=tuple)

    def structure(self) -> list:
        """What decides the widgets shown (not their values): a change here re-renders the form."""
        return [
            self.method,
            self.base,
            len(self.rows),
            None if self.slices is None else [(r.slice, r.source) for r in self.slices],
            [f.kind for f in self.globals],
            [[f.kind for f in row.params] for row in self.rows],
        ]


def method_choices() -> list[tuple[str, str]]:
    """(label, name) for every registered method and mergekit-moe, for the method picker."""
    found = [(f"{m.pretty_name} ({m.name})", m.name) for m in METHODS.values()]
    return [*found, ("Mixture of experts (mergekit-moe)", MOE)]


def parse(text: str) -> dict[str, Any] | None:
    """The mapping a YAML text holds, or None when it is not one or the one parser refuses it (its limits,
    several documents, a token): the form then shows nothing and validation names the problem."""
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
        return _moe_view(data)
    spec = METHODS.get(method)
    params = spec.parameters if spec else ()
    per_model = [p for p in params if p.per_model]
    entries = data.get("models") if isinstance(data.get("models"), list) else []
    rows = tuple(
        ModelRow(text_of(e.get("model")), tuple(_field(p, params_of(e).get(p.name)) for p in per_model))
        for e in entries
        if isinstance(e, dict)
    )
    slices = slice_rows(data.get("slices"))
    top_params = data.get("parameters") if isinstance(data.get("parameters"), dict) else {}
    return View(
        method=method,
        base=spec.base if spec else "optional",
        base_model=text_of(data.get("base_model")),
        rows=rows,
        slices=slices,
        globals=tuple(_field(p, top_params.get(p.name)) for p in params if not p.per_model),
        options=_options(data),
        kept=tuple(_kept(data, spec, slices is not None)),
    )


def _moe_view(data: dict[str, Any]) -> View:
    experts = data.get("experts") if isinstance(data.get("experts"), list) else []
    rows = tuple(ModelRow(text_of(e.get("source_model"))) for e in experts if isinstance(e, dict))
    options = (
        Field("gate_mode", "choice", data.get("gate_mode"), "hidden", SUPPORTED_GATE_MODES),
        Field("experts_per_token", "number", data.get("experts_per_token"), 2, minimum=1),
        *_options(data),
    )
    known = {"base_model", "experts", *MOE_FIELDS, *TOP_FIELDS}
    kept = [k for k in data if k not in known]
    for i, expert in enumerate(experts):
        if isinstance(expert, dict):
            kept += [f"experts[{i}].{k}" for k in expert if k != "source_model"]
    return View(MOE, "required", text_of(data.get("base_model")), rows, None, (), options, tuple(kept))


def _options(data: dict[str, Any]) -> tuple[Field, ...]:
    return (
        Field("dtype", "choice", data.get("dtype"), None, DTYPES),
        Field("out_dtype", "choice", data.get("out_dtype"), None, DTYPES),
        Field("tokenizer_source", "text", data.get("tokenizer_source"), None, TOKENIZER_CHOICES),
        Field("chat_template", "text", data.get("chat_template"), None, CHAT_TEMPLATES),
        Field("seed", "number", data.get("seed"), None, minimum=0),
    )


def _field(spec: ParameterSpec, value: Any) -> Field:
    default = spec.default if not spec.required else None
    shown = value if value is not None else default
    if isinstance(shown, (list, dict)):
        kind = "text"
    elif isinstance(shown, bool) or (shown is None and isinstance(default, bool)):
        kind = "bool"
    else:
        kind = "number"
    low, high = _bounds(spec)
    return Field(spec.name, kind, value, default, minimum=low, maximum=high)


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
            rows.append(SliceRow(text_of(source.get("model")), bounds[0], bounds[1], scale, i, j))
    return tuple(rows)


def _kept(data: dict[str, Any], spec: Any, slices_shown: bool) -> list[str]:
    known = {"merge_method", "base_model", "models", "parameters", *TOP_FIELDS}
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
    """A widget's value as the config stores it: numbers keep ints as ints, `text` is read as inline YAML.

    Blank values give None (the key is removed, so the default applies).
    """
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


def params_of(entry: dict[str, Any]) -> dict[str, Any]:
    """An entry's `parameters:` mapping (empty when absent or not a mapping)."""
    params = entry.get("parameters")
    return params if isinstance(params, dict) else {}


def text_of(value: Any) -> str:
    """A config value as stripped text (None: empty)."""
    return "" if value is None else str(value).strip()
