"""Resolving a config parameter for one tensor: precedence levels, filters and layer gradients.

Semantics follow mergekit's `ConfigReader.parameter` / `evaluate_setting` (see the config reference
in README.md): the first level that yields a value wins; a filtered list that matches nothing yields
None and the lookup falls through to the next level.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

from .config import ConditionalParameter, MergeConfig, ParameterSetting
from .errors import ConfigError, ListTooLongError
from .ranges import Range

MAX_SETTING_ENTRIES = 256  # gradient points or filtered entries of one parameter


def evaluate_setting(setting: ParameterSetting | None, tensor_name: str, t: float) -> Any:
    """The value of one parameter setting for a tensor at relative depth `t`.

    Args:
        setting: a scalar; a gradient (list of numbers, interpolated piecewise-linearly over `t`);
            a list of non-numeric scalars (a step function of `t`); or a list of `{filter, value}`
            entries, of which the first whose `filter` is absent, `"*"`, or a substring of
            `tensor_name` applies (its value evaluated recursively).
        tensor_name: the name the filters are matched against.
        t: relative depth in [0, 1]: `i/(n-1)` for layer `i` of an `n`-layer output slice.

    Returns:
        The value, or None when the setting is None or no filter matches.
    """
    if not isinstance(setting, list):
        return setting
    if not setting:
        return None
    if isinstance(setting[0], ConditionalParameter):
        for entry in setting:
            if entry.filter in (None, "*") or entry.filter in tensor_name:
                return evaluate_setting(entry.value, tensor_name, t)
        return None
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in setting):
        position = t * (len(setting) - 1)
        i0 = math.floor(position)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = position - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    return setting[int(t * (len(setting) - 1))]


def resolve(
    name: str,
    levels: Iterable[dict[str, ParameterSetting] | None],
    tensor_name: str,
    t: float,
) -> Any:
    """The first non-None value of parameter `name` over precedence `levels` (most specific first).

    Args:
        name: the parameter (`weight`, `t`, ...).
        levels: parameter dicts, e.g. (source, slice, global); None entries are skipped.
        tensor_name: the name filters match (the input's for per-model, the output's for global).
        t: relative depth of the tensor's layer.
    """
    for level in levels:
        if level and name in level:
            value = evaluate_setting(level[name], tensor_name, t)
            if value is not None:
                return value
    return None


def parameter_levels(config: MergeConfig) -> list[tuple[str, dict[str, ParameterSetting] | None]]:
    """Every `parameters:` block of a config with its location (`parameters`, `slices[0].sources[1].parameters`)."""
    levels = [("parameters", config.parameters)]
    levels += [(f"models[{i}].parameters", m.parameters) for i, m in enumerate(config.models or [])]
    for i, output_slice in enumerate(config.slices or []):
        levels.append((f"slices[{i}].parameters", output_slice.parameters))
        levels += [(f"slices[{i}].sources[{j}].parameters", s.parameters) for j, s in enumerate(output_slice.sources)]
    return levels


def check_parameter_values(config: MergeConfig, ranges: dict[str, Range]) -> list[ConfigError]:
    """Type- and range-check every value of the method's parameters wherever the config sets them.

    Gradients and filtered lists are checked entry by entry (a gradient interpolates between its
    points, so the points in range keep every layer's value in range). Keys the method does not take
    are left to the planner's warning.

    Args:
        config: the parsed config.
        ranges: the method's parameters (config key -> declared :class:`Range`).

    Returns:
        One ParameterValueError or ListTooLongError per bad value, in config order.
    """
    problems: list[ConfigError] = []
    for where, level in parameter_levels(config):
        for name, setting in (level or {}).items():
            if name in ranges:
                problems += _check_setting(f"{where}.{name}", setting, ranges[name])
    return problems


def _check_setting(field: str, setting: ParameterSetting, allowed: Range) -> list[ConfigError]:
    if not isinstance(setting, list):
        return _check_value(field, setting, allowed)
    if len(setting) > MAX_SETTING_ENTRIES:
        return [ListTooLongError(f"`{field}` has {len(setting):,} entries, over the {MAX_SETTING_ENTRIES} limit; "
                                 "a gradient needs a few points")]
    problems: list[ConfigError] = []
    for index, entry in enumerate(setting):
        if isinstance(entry, ConditionalParameter):
            problems += _check_setting(f"{field}[{index}].value", entry.value, allowed)
        else:
            problems += _check_value(f"{field}[{index}]", entry, allowed)
    return problems


def _check_value(field: str, value: object, allowed: Range) -> list[ConfigError]:
    try:
        allowed.check(field, value)
    except ConfigError as err:
        return [err]
    return []
