"""Edits of the config mapping, one per form widget: each returns a new mapping in which only its field changed.

No gradio here. Keys the form does not show are never touched; switching the method removes only the
old method's own parameters (and gives the new method's required ones a starter value).
"""

from __future__ import annotations

import copy
from typing import Any, Callable

from merger.config.references import split_reference
from merger.methods.registry import METHODS
from merger.ui.config_fields import reference_parts
from merger.ui.config_view import MOE, TOP_FIELDS, SliceRow, method_of, slice_rows, text_of

KEEP_ACROSS_SCHEMAS = ("name", *TOP_FIELDS)  # kept when switching between a merge and an MoE (`name`: a stage's)

# A value to start a required parameter at when a method is chosen (by parameter name, not by method).
STARTERS = {"weight": 1.0, "t": 0.5, "density": 0.5}


def set_method(data: dict[str, Any], method: str) -> dict[str, Any]:
    """Switch the method, keeping the models; required parameters the new method lacks get a starter value."""
    out = copy.deepcopy(data)
    if method == method_of(out):
        return out  # the current method chosen again: nothing changes (an MoE keeps its experts)
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
    models = [text_of(e.get("model")) for e in data.get("models") or [] if isinstance(e, dict)]
    out = {
        "base_model": data.get("base_model") or (models[0] if models else ""),
        "gate_mode": "random",
        "experts_per_token": min(2, max(1, len(models))),
        "experts": [{"source_model": m} for m in models],
    }
    out.update({k: data[k] for k in KEEP_ACROSS_SCHEMAS if k in data})
    return _front(out, "name") if "name" in out else out


def _from_moe(data: dict[str, Any]) -> dict[str, Any]:
    experts = [e for e in data.get("experts") or [] if isinstance(e, dict)]
    out: dict[str, Any] = {"base_model": data.get("base_model", "")}
    out["models"] = [{"model": e.get("source_model", "")} for e in experts]
    out.update({k: data[k] for k in KEEP_ACROSS_SCHEMAS if k in data})
    return out


def set_base(data: dict[str, Any], reference: str) -> dict[str, Any]:
    """Set (or, when blank and without a LoRA, remove) `base_model`'s model, keeping its LoRA."""
    out = copy.deepcopy(data)
    _set_or_drop(out, "base_model", with_model(out.get("base_model"), reference))
    return out


def set_base_lora(data: dict[str, Any], lora: str) -> dict[str, Any]:
    """Set (blank: remove) the LoRA adapter applied to `base_model`."""
    out = copy.deepcopy(data)
    _set_or_drop(out, "base_model", with_lora(out.get("base_model"), lora))
    return out


def with_model(value: Any, model: str) -> Any:
    """A model reference as written (`m`, `m+lora`, `{model, lora}`) with its model replaced, the form kept.

    The text is the model as the box shows it (`org/m@revision`); unchanged text leaves the value as written.
    """
    model = text_of(model)
    if reference_parts(value)[0] == model:
        return copy.deepcopy(value)
    if isinstance(value, dict):
        out = copy.deepcopy(value)
        out.pop("revision", None)  # shown as `@revision` in the box: the new text carries it, or drops it
        if isinstance(out.get("model"), dict) and "path" in out["model"]:
            path, revision = split_reference(model)
            out["model"] = {"path": path, **({"revision": revision} if revision else {})}
        else:
            out["model"] = model
        return out
    lora = reference_parts(value)[1]
    return f"{model}+{lora}" if lora else model


def with_lora(value: Any, lora: str) -> Any:
    """A model reference with its LoRA adapter replaced (blank: removed), in the form it is written in."""
    lora = text_of(lora)
    if reference_parts(value)[1] == lora:
        return copy.deepcopy(value)
    if isinstance(value, dict):
        out = copy.deepcopy(value)
        if not lora:
            out.pop("lora", None)
        elif isinstance(out.get("lora"), dict) and "path" in out["lora"]:
            out["lora"]["path"] = lora
        else:
            out["lora"] = lora
        return out
    model = reference_parts(value)[0]
    return f"{model}+{lora}" if lora else model


def _group(data: dict[str, Any], group: str | None) -> tuple[str, str]:
    """(list key, model key) of a row: `models`/`model`, or an MoE's `experts` (or `shared_experts`)/`source_model`."""
    if method_of(data) == MOE:
        return group or "experts", "source_model"
    return "models", "model"


def _row(data: dict[str, Any], index: int, group: str | None = None) -> dict[str, Any] | None:
    rows = data.get(_group(data, group)[0])
    if isinstance(rows, list) and 0 <= index < len(rows) and isinstance(rows[index], dict):
        return rows[index]
    return None


def add_model(data: dict[str, Any], group: str | None = None) -> dict[str, Any]:
    """Append a blank model row (MoE: an expert of `group`), with the method's required per-model parameters."""
    out = copy.deepcopy(data)
    if method_of(out) == MOE:
        key = _group(out, group)[0]
        if not isinstance(out.get(key), list):
            out[key] = []
        out[key].append({"source_model": ""})
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


def remove_model(data: dict[str, Any], index: int, group: str | None = None) -> dict[str, Any]:
    """Remove model row `index` (MoE: expert `index` of `group`; the group's key goes once it is empty,
    except `experts`, which a config must have)."""
    out = copy.deepcopy(data)
    key = _group(out, group)[0]
    rows = out.get(key)
    if isinstance(rows, list) and 0 <= index < len(rows):
        del rows[index]
        if not rows and key == "shared_experts":
            del out[key]
    return out


def set_model(data: dict[str, Any], index: int, reference: str, group: str | None = None) -> dict[str, Any]:
    """Set the model of row `index` (MoE: the expert's `source_model`), keeping its LoRA."""
    out = copy.deepcopy(data)
    row, key = _row(out, index, group), _group(out, group)[1]
    if row is not None:
        row[key] = with_model(row.get(key), reference)
    return out


def set_lora(data: dict[str, Any], index: int, lora: str, group: str | None = None) -> dict[str, Any]:
    """Set (blank: remove) the LoRA adapter of row `index`'s model."""
    out = copy.deepcopy(data)
    row, key = _row(out, index, group), _group(out, group)[1]
    if row is not None:
        row[key] = with_lora(row.get(key), lora)
    return out


def set_model_param(data: dict[str, Any], index: int, key: str, value: Any, group: str | None = None) -> dict[str, Any]:
    """Set (None: remove) per-model parameter `key` of row `index` (an MoE expert's keys sit in the entry itself)."""
    out = copy.deepcopy(data)
    row = _row(out, index, group)
    if row is not None and method_of(out) == MOE:
        _set_or_drop(row, key, value)
    elif row is not None:
        _set_parameter(row, key, value)
    return out


def set_global(data: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    """Set (None: remove) global parameter `key` under `parameters:`."""
    out = copy.deepcopy(data)
    _set_parameter(out, key, value)
    return out


def edit_setting(data: dict[str, Any], index: int | None, key: str, change: Callable[[Any], Any],
                 unset: Any = None) -> dict[str, Any]:
    """Apply `change` (a transform of :mod:`merger.ui.config_settings`) to one parameter's value.

    Only that parameter changes: a gradient's point, a filter, a preset replace its value and nothing else.

    Args:
        data: the config mapping (not modified).
        index: the row of `models:` whose `parameters:` hold it, or None for the global `parameters:`.
        key: the parameter (`t`, `weight`, ...).
        change: value -> new value (None removes the parameter, so its default applies).
        unset: the value `change` starts from when the config leaves the parameter out.

    Returns:
        A new mapping (unchanged when row `index` does not exist).
    """
    out = copy.deepcopy(data)
    holder = out if index is None else _row(out, index)
    if holder is None:
        return out
    params = holder.get("parameters") if isinstance(holder.get("parameters"), dict) else {}
    current = params.get(key)
    _set_parameter(holder, key, change(unset if current is None else current))
    return out


def starter(key: str, default: Any) -> Any:
    """The value an unset parameter's editor starts from: its default, else the starter for its name."""
    return default if default is not None else STARTERS.get(key, 0.5)


def _set_parameter(holder: dict[str, Any], key: str, value: Any) -> None:
    """Set (None: remove) `key` in `holder`'s `parameters:` mapping, dropping the mapping once empty."""
    params = holder.get("parameters") if isinstance(holder.get("parameters"), dict) else {}
    _set_or_drop(params, key, value)
    if params:
        holder["parameters"] = params
    else:
        holder.pop("parameters", None)


def set_option(data: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    """Set (None or blank: remove) a top-level option (`dtype`, `tokenizer_source`, `seed`, `gate_mode`, ...)."""
    out = copy.deepcopy(data)
    _set_or_drop(out, key, value)
    return out


def add_slice(data: dict[str, Any]) -> dict[str, Any]:
    """Append a slice like the last one (same models), its layer ranges continuing where the last one's ended."""
    out = copy.deepcopy(data)
    rows = slice_rows(out.get("slices")) or ()
    last = [r for r in rows if r.slice == rows[-1].slice] if rows else [SliceRow("", 0, 0)]
    sources = [
        {"model": r.model, "layer_range": [r.end, r.end + max(1, r.end - r.start)]} for r in last
    ]
    if not isinstance(out.get("slices"), list):
        out["slices"] = []
        out.pop("models", None)
    out["slices"].append({"sources": sources})
    return out


def remove_slice(data: dict[str, Any], index: int) -> dict[str, Any]:
    """Remove slice `index`."""
    out = copy.deepcopy(data)
    slices = out.get("slices")
    if isinstance(slices, list) and 0 <= index < len(slices):
        del slices[index]
    return out


def set_slice(data: dict[str, Any], index: int, key: str, value: Any, source: int = 0) -> dict[str, Any]:
    """Set `model`, `lora`, `start`, `end` or `scale` (None: remove) of `slices[index].sources[source]`."""
    out = copy.deepcopy(data)
    slices = out.get("slices")
    try:
        entry = slices[index]["sources"][source]
    except (TypeError, LookupError):
        return out
    if key == "model":
        entry["model"] = with_model(entry.get("model"), value)
    elif key == "lora":
        entry["model"] = with_lora(entry.get("model"), value)
    elif key in ("start", "end"):
        bounds = list(entry.get("layer_range") or [0, 0])
        bounds[0 if key == "start" else 1] = int(value or 0)
        entry["layer_range"] = bounds
    elif key == "scale":
        params = entry.get("parameters") if isinstance(entry.get("parameters"), dict) else {}
        _set_or_drop(params, "scale", value)
        if params:
            entry["parameters"] = params
        else:
            entry.pop("parameters", None)
    return out


def _set_or_drop(mapping: dict[str, Any], key: str, value: Any) -> None:
    if value is None or (isinstance(value, str) and not value.strip()):
        mapping.pop(key, None)
    else:
        mapping[key] = value


def _front(data: dict[str, Any], key: str) -> dict[str, Any]:
    """The mapping with `key` first (configs read from the method down; a stage's `name` above all)."""
    out = {key: data[key], **{k: v for k, v in data.items() if k != key}}
    return {"name": out.pop("name"), **out} if "name" in out and key != "name" else out
