"""The form as a view of the config: what the form shows of a config mapping, and edits that change only that.

No gradio here. The config mapping (the parsed YAML) is the single source of truth: :func:`view_of`
reads what the form can show from it (generated from the method registry: every method, its per-model
and global parameters with their defaults), and each edit function returns a new mapping in which
only the edited field changed. Everything the form cannot show stays in the mapping untouched and is
listed in :attr:`View.kept`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import yaml

from ..config import DTYPES, SUPPORTED_GATE_MODES
from ..methods import METHODS, ParameterSpec

MOE = "moe"  # the mergekit-moe schema (no `merge_method` key)
TOP_FIELDS = ("dtype", "out_dtype", "tokenizer_source", "chat_template", "seed")  # both schemas
MOE_FIELDS = ("gate_mode", "experts_per_token")
TOKENIZER_CHOICES = ("base", "union")  # or a model reference
CHAT_TEMPLATES = ("chatml", "llama3", "alpaca", "mistral")
# A value to start a required parameter at when a method is chosen (by parameter name, not by method).
STARTERS = {"weight": 1.0, "t": 0.5, "density": 0.5}


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
    """A one-source slice: layers `[start, end)` of `model`, with an optional `scale`."""

    model: str
    start: int
    end: int
    scale: float | None = None


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
            -1 if self.slices is None else len(self.slices),
            [f.kind for f in self.globals],
            [[f.kind for f in row.params] for row in self.rows],
        ]


def method_choices() -> list[tuple[str, str]]:
    """(label, name) for every registered method and mergekit-moe, for the method picker."""
    found = [(f"{m.pretty_name} ({m.name})", m.name) for m in METHODS.values()]
    return [*found, ("Mixture of experts (mergekit-moe)", MOE)]


def parse(text: str) -> dict[str, Any] | None:
    """The mapping a YAML text holds, or None when it is not a mapping (the form then shows nothing)."""
    try:
        data = yaml.safe_load(text or "")
    except yaml.YAMLError:
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
        ModelRow(_text(e.get("model")), tuple(_field(p, _params(e).get(p.name)) for p in per_model))
        for e in entries
        if isinstance(e, dict)
    )
    slices = _slice_rows(data.get("slices"))
    top_params = data.get("parameters") if isinstance(data.get("parameters"), dict) else {}
    return View(
        method=method,
        base=spec.base if spec else "optional",
        base_model=_text(data.get("base_model")),
        rows=rows,
        slices=slices,
        globals=tuple(_field(p, top_params.get(p.name)) for p in params if not p.per_model),
        options=_options(data),
        kept=tuple(_kept(data, spec, slices is not None)),
    )


def _moe_view(data: dict[str, Any]) -> View:
    experts = data.get("experts") if isinstance(data.get("experts"), list) else []
    rows = tuple(ModelRow(_text(e.get("source_model"))) for e in experts if isinstance(e, dict))
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
    return View(MOE, "required", _text(data.get("base_model")), rows, None, (), options, tuple(kept))


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
    """The registry's declared range for a parameter, when it declares one (older registries do not)."""
    declared = getattr(spec, "range", None)
    if isinstance(declared, (tuple, list)) and len(declared) == 2:
        return declared[0], declared[1]
    return getattr(spec, "minimum", None), getattr(spec, "maximum", None)


def _slice_rows(slices: Any) -> tuple[SliceRow, ...] | None:
    """One-source slices as rows; None when there are none or any slice has another shape."""
    if not isinstance(slices, list) or not slices:
        return None
    rows = []
    for sl in slices:
        sources = sl.get("sources") if isinstance(sl, dict) else None
        if not isinstance(sources, list) or len(sources) != 1 or not isinstance(sources[0], dict):
            return None
        source = sources[0]
        bounds = source.get("layer_range")
        if not (isinstance(bounds, list) and len(bounds) == 2 and all(isinstance(b, int) for b in bounds)):
            return None
        scale = _params(source).get("scale")
        rows.append(SliceRow(_text(source.get("model")), bounds[0], bounds[1], scale))
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
        kept += [f"models[{i}].parameters.{k}" for k in _params(entry) if k not in per_model]
    for i, sl in enumerate(data.get("slices") if slices_shown else []):
        kept += [f"slices[{i}].{k}" for k in sl if k != "sources"]
        source = sl["sources"][0]
        kept += [f"slices[{i}].sources[0].{k}" for k in source if k not in ("model", "layer_range", "parameters")]
        kept += [f"slices[{i}].sources[0].parameters.{k}" for k in _params(source) if k != "scale"]
    return kept


# ---------------------------------------------------------------- edits (each returns a new mapping)
def set_method(data: dict[str, Any], method: str) -> dict[str, Any]:
    """Switch the method, keeping the models; required parameters the new method lacks get a starter value."""
    out = copy.deepcopy(data)
    if method == MOE:
        return _to_moe(out)
    if method_of(out) == MOE:
        out = _from_moe(out)
    _drop_parameters_of(out, METHODS.get(method_of(out)), METHODS.get(method))
    out["merge_method"] = method
    spec = METHODS.get(method)
    if spec is None:
        return _front(out, "merge_method")
    if spec.base == "none":
        out.pop("base_model", None)
    entries = [e for e in out.get("models") or [] if isinstance(e, dict)]
    if out.get("slices") is None:
        out["models"] = entries
    for p in spec.parameters:
        if not p.required:
            continue
        if p.per_model:
            for entry in entries:
                entry.setdefault("parameters", {}).setdefault(p.name, STARTERS.get(p.name, 0.5))
        else:
            params = out.setdefault("parameters", {})
            if isinstance(params, dict):
                params.setdefault(p.name, STARTERS.get(p.name, 0.5))
    return _front(out, "merge_method")


def _drop_parameters_of(data: dict[str, Any], old: Any, new: Any) -> None:
    """Remove the old method's parameters that the new one does not take (any other key stays as written)."""
    if old is None:
        return
    taken = {p.name for p in new.parameters} if new else set()
    dropped = {p.name for p in old.parameters} - taken
    holders = [data] + [e for e in data.get("models") or [] if isinstance(e, dict)]
    for holder in holders:
        params = holder.get("parameters")
        if isinstance(params, dict):
            for name in dropped:
                params.pop(name, None)
            if not params:
                holder.pop("parameters", None)


def _to_moe(data: dict[str, Any]) -> dict[str, Any]:
    models = [_text(e.get("model")) for e in data.get("models") or [] if isinstance(e, dict)]
    out = {
        "base_model": data.get("base_model") or (models[0] if models else ""),
        "gate_mode": "random",
        "experts_per_token": min(2, max(1, len(models))),
        "experts": [{"source_model": m} for m in models],
    }
    out.update({k: data[k] for k in TOP_FIELDS if k in data})
    return out


def _from_moe(data: dict[str, Any]) -> dict[str, Any]:
    experts = [e for e in data.get("experts") or [] if isinstance(e, dict)]
    out: dict[str, Any] = {"base_model": data.get("base_model", "")}
    out["models"] = [{"model": e.get("source_model", "")} for e in experts]
    out.update({k: data[k] for k in TOP_FIELDS if k in data})
    return out


def set_base(data: dict[str, Any], reference: str) -> dict[str, Any]:
    """Set (or, when blank, remove) `base_model`."""
    out = copy.deepcopy(data)
    _set_or_drop(out, "base_model", _text(reference))
    return out


def add_model(data: dict[str, Any]) -> dict[str, Any]:
    """Append a blank model row (MoE: an expert), with the method's required per-model parameters."""
    out = copy.deepcopy(data)
    if method_of(out) == MOE:
        out.setdefault("experts", []).append({"source_model": ""})
        return out
    entry: dict[str, Any] = {"model": ""}
    spec = METHODS.get(method_of(out))
    required = [p for p in (spec.per_model_parameters if spec else ()) if p.required]
    if required:
        entry["parameters"] = {p.name: STARTERS.get(p.name, 0.5) for p in required}
    if not isinstance(out.get("models"), list):
        out["models"] = []
    out["models"].append(entry)
    return out


def remove_model(data: dict[str, Any], index: int) -> dict[str, Any]:
    """Remove model row `index` (MoE: expert `index`)."""
    out = copy.deepcopy(data)
    key = "experts" if method_of(out) == MOE else "models"
    rows = out.get(key)
    if isinstance(rows, list) and 0 <= index < len(rows):
        del rows[index]
    return out


def set_model(data: dict[str, Any], index: int, reference: str) -> dict[str, Any]:
    """Set the model of row `index` (MoE: the expert's `source_model`)."""
    out = copy.deepcopy(data)
    key, name = ("experts", "source_model") if method_of(out) == MOE else ("models", "model")
    rows = out.get(key)
    if isinstance(rows, list) and 0 <= index < len(rows) and isinstance(rows[index], dict):
        rows[index][name] = _text(reference)
    return out


def set_model_param(data: dict[str, Any], index: int, key: str, value: Any) -> dict[str, Any]:
    """Set (None: remove) per-model parameter `key` of row `index`."""
    out = copy.deepcopy(data)
    rows = out.get("models")
    if isinstance(rows, list) and 0 <= index < len(rows) and isinstance(rows[index], dict):
        entry = rows[index]
        params = entry.get("parameters") if isinstance(entry.get("parameters"), dict) else {}
        _set_or_drop(params, key, value)
        if params:
            entry["parameters"] = params
        else:
            entry.pop("parameters", None)
    return out


def set_global(data: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    """Set (None: remove) global parameter `key` under `parameters:`."""
    out = copy.deepcopy(data)
    params = out.get("parameters") if isinstance(out.get("parameters"), dict) else {}
    _set_or_drop(params, key, value)
    if params:
        out["parameters"] = params
    else:
        out.pop("parameters", None)
    return out


def set_option(data: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    """Set (None or blank: remove) a top-level option (`dtype`, `tokenizer_source`, `seed`, `gate_mode`, ...)."""
    out = copy.deepcopy(data)
    _set_or_drop(out, key, value)
    return out


def add_slice(data: dict[str, Any]) -> dict[str, Any]:
    """Append a slice copying the previous one's model, starting where it ended."""
    out = copy.deepcopy(data)
    rows = _slice_rows(out.get("slices")) or ()
    last = rows[-1] if rows else SliceRow("", 0, 1)
    start = last.end if rows else 0
    source = {"model": last.model, "layer_range": [start, start + max(1, last.end - last.start)]}
    if not isinstance(out.get("slices"), list):
        out["slices"] = []
        out.pop("models", None)
    out["slices"].append({"sources": [source]})
    return out


def remove_slice(data: dict[str, Any], index: int) -> dict[str, Any]:
    """Remove slice `index`."""
    out = copy.deepcopy(data)
    slices = out.get("slices")
    if isinstance(slices, list) and 0 <= index < len(slices):
        del slices[index]
    return out


def set_slice(data: dict[str, Any], index: int, key: str, value: Any) -> dict[str, Any]:
    """Set `model`, `start`, `end` or `scale` (None: remove) of one-source slice `index`."""
    out = copy.deepcopy(data)
    slices = out.get("slices")
    if not (isinstance(slices, list) and 0 <= index < len(slices)):
        return out
    source = slices[index]["sources"][0]
    if key == "model":
        source["model"] = _text(value)
    elif key in ("start", "end"):
        bounds = list(source.get("layer_range") or [0, 0])
        bounds[0 if key == "start" else 1] = int(value or 0)
        source["layer_range"] = bounds
    elif key == "scale":
        params = source.get("parameters") if isinstance(source.get("parameters"), dict) else {}
        _set_or_drop(params, "scale", value)
        if params:
            source["parameters"] = params
        else:
            source.pop("parameters", None)
    return out


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
            parsed = yaml.safe_load(str(value))
        except yaml.YAMLError:
            return str(value)
        return parsed if parsed is not None else None
    return value


def to_widget(kind: str, value: Any) -> Any:
    """What a widget shows for a config value (`text` fields show inline YAML)."""
    if kind == "text" and isinstance(value, (list, dict)):
        return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return value


def _set_or_drop(mapping: dict[str, Any], key: str, value: Any) -> None:
    if value is None or (isinstance(value, str) and not value.strip()):
        mapping.pop(key, None)
    else:
        mapping[key] = value


def _front(data: dict[str, Any], key: str) -> dict[str, Any]:
    """The mapping with `key` first (configs read from the method down)."""
    return {key: data[key], **{k: v for k, v in data.items() if k != key}}


def _params(entry: dict[str, Any]) -> dict[str, Any]:
    params = entry.get("parameters")
    return params if isinstance(params, dict) else {}


def _text(value: Any) -> str:
    return "" if value is None else str(value).strip()
