"""One parameter's setting as the form edits it: a number, a gradient, or values per filter.

No gradio here. mergekit lets a parameter be a number (`t: 0.5`), a gradient across the layers (a list
of numbers, interpolated: `t: [0, 0.5, 1]`), or a list of `{filter, value}` entries whose first match
on the tensor's name applies (`filter: self_attn`, `filter: mlp`, and an entry without `filter` for every
other tensor), each value a number or a gradient. The functions here are pure transforms of such a
value: each returns a new value and leaves its argument unchanged; :mod:`merger.ui.config_edits` writes
the result back into the one field it came from.
"""

from __future__ import annotations

import copy
from typing import Any

NUMBER, GRADIENT, FILTERED = "number", "gradient", "filtered"
SHAPES = (NUMBER, GRADIENT, FILTERED)
FILTERS = ("self_attn", "mlp")  # the filters people use; an entry without one is "other" (the default)
MAX_POINTS = 64  # points the form adds (the config's own limit is merger.config.parameters.MAX_SETTING_ENTRIES)

# Presets of the gradient editor, by label. The classic SLERP schedule posted on model cards: attention
# taken from one end, MLPs from the other, everything else halfway.
CLASSIC = [
    {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
    {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
    {"value": 0.5},
]
PRESETS: dict[str, Any] = {
    "classic attention/MLP schedule (SLERP)": CLASSIC,
    "ramp 0 → 1 across the layers": [0, 1],
    "ramp 1 → 0 across the layers": [1, 0],
    "peak in the middle layers": [0, 0.5, 1, 0.5, 0],
    "constant 0.5": 0.5,
}


def is_number(value: Any) -> bool:
    """A YAML number (not a flag: `true` is not 1 here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def shape_of(value: Any) -> str | None:
    """`number` (None too: unset), `gradient` or `filtered`; None when the form cannot edit it point by point."""
    if value is None or is_number(value):
        return NUMBER
    if not isinstance(value, list) or not value:
        return None
    if all(is_number(v) for v in value):
        return GRADIENT
    if all(_is_part(e) for e in value):
        return FILTERED
    return None


def _is_part(entry: Any) -> bool:
    return (
        isinstance(entry, dict)
        and set(entry) <= {"filter", "value"}
        and (entry.get("filter") is None or isinstance(entry["filter"], str))
        and entry.get("value") is not None
        and shape_of(entry["value"]) in (NUMBER, GRADIENT)
    )


def layout_of(value: Any) -> Any:
    """What decides the widgets of a setting (shape and point counts, not values or filter names)."""
    shape = shape_of(value)
    if shape == GRADIENT:
        return [GRADIENT, len(value)]
    if shape == FILTERED:
        return [FILTERED, [layout_of(e["value"]) for e in value]]
    return shape


def _number(value: Any, fallback: float) -> float:
    """A number standing for `value`: itself, a gradient's first point, a filtered setting's default entry."""
    if is_number(value):
        return value
    if shape_of(value) == GRADIENT:
        return value[0]
    if shape_of(value) == FILTERED:
        other = [e["value"] for e in value if e.get("filter") is None] or [value[-1]["value"]]
        return _number(other[0], fallback)
    return fallback


def _points(value: Any, fallback: float) -> list:
    if shape_of(value) == GRADIENT:
        return list(value)
    if shape_of(value) == FILTERED:
        other = [e["value"] for e in value if e.get("filter") is None] or [value[-1]["value"]]
        return _points(other[0], fallback)
    number = _number(value, fallback)
    return [number, number]


def reshaped(value: Any, shape: str, fallback: float) -> Any:
    """`value` turned into `shape`, keeping what it can.

    A number becomes a flat gradient of two points, or the same number for self_attn, mlp and the rest;
    a gradient becomes its first point, or the same gradient for each filter; filtered values become
    their default entry's value. `fallback` stands in for an unset value.
    """
    if shape == shape_of(value) and value is not None:
        return copy.deepcopy(value)
    if shape == NUMBER:
        return _number(value, fallback)
    if shape == GRADIENT:
        return _points(value, fallback)
    inner = copy.deepcopy(value) if shape_of(value) == GRADIENT else _number(value, fallback)
    return [*({"filter": name, "value": copy.deepcopy(inner)} for name in FILTERS), {"value": inner}]


def _part_value(value: Any, part: int | None) -> Any:
    return value if part is None else value[part]["value"]


def _with_part_value(value: Any, part: int | None, inner: Any) -> Any:
    if part is None:
        return inner
    out = copy.deepcopy(value)
    out[part]["value"] = inner
    return out


def set_point(value: Any, part: int | None, point: int, number: float) -> Any:
    """Point `point` of the gradient (of filtered entry `part`; None: the setting itself) set to `number`."""
    points = list(_part_value(value, part))
    if 0 <= point < len(points) and number is not None:
        points[point] = number
    return _with_part_value(value, part, points)


def add_point(value: Any, part: int | None) -> Any:
    """One more point at the end of the gradient, repeating the last one (the schedule's end is unchanged)."""
    points = list(_part_value(value, part))
    if len(points) < MAX_POINTS:
        points.append(points[-1])
    return _with_part_value(value, part, points)


def remove_point(value: Any, part: int | None, point: int) -> Any:
    """The gradient without point `point`; a gradient left with one point becomes that number."""
    points = list(_part_value(value, part))
    if 0 <= point < len(points):
        del points[point]
    return _with_part_value(value, part, points[0] if len(points) == 1 else points)


def set_part_number(value: Any, part: int, number: float) -> Any:
    """Filtered entry `part`'s value set to the number `number`."""
    return value if number is None else _with_part_value(value, part, number)


def set_part_shape(value: Any, part: int, shape: str) -> Any:
    """Filtered entry `part`'s value turned into a number or a gradient (see :func:`reshaped`)."""
    inner = _part_value(value, part)
    return _with_part_value(value, part, reshaped(inner, shape, _number(inner, 0.5)))


def set_filter(value: Any, part: int, name: str | None) -> Any:
    """Filtered entry `part` applied to tensors whose name contains `name` (blank or None: every other tensor)."""
    out = copy.deepcopy(value)
    name = (name or "").strip()
    entry = {"filter": name, "value": out[part]["value"]} if name else {"value": out[part]["value"]}
    out[part] = entry
    return out


def add_part(value: Any, name: str | None) -> Any:
    """A new filtered entry for `name` (None: every other tensor), with the default entry's value.

    A named filter goes before the entry without a filter, since the first match applies and that entry
    matches every tensor.
    """
    out = copy.deepcopy(value)
    new = {"filter": name, "value": _number(value, 0.5)} if name else {"value": _number(value, 0.5)}
    defaults = [i for i, e in enumerate(out) if e.get("filter") is None]
    out.insert(defaults[0] if name and defaults else len(out), new)
    return out


def remove_part(value: Any, part: int) -> Any:
    """The filtered setting without entry `part`; None once empty, a plain value once only the default is left."""
    out = copy.deepcopy(value)
    if 0 <= part < len(out):
        del out[part]
    if not out:
        return None
    if len(out) == 1 and out[0].get("filter") is None:  # a filtered entry alone still leaves other tensors unset
        return out[0]["value"]
    return out


def filter_label(entry: dict) -> str:
    """How the form names a filtered entry: its filter, or `other` for the entry without one."""
    return entry.get("filter") or "other"
