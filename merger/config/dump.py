"""Configs written back as YAML the way people post them (the form's edits of the config text)."""

from __future__ import annotations

from typing import Any

import yaml


def dump_yaml(data: dict[str, Any]) -> str:
    """YAML the way configs are posted: keys in insertion order, short number lists inline (`[0, 32]`)."""
    return yaml.dump(data, Dumper=_ConfigDumper, sort_keys=False, allow_unicode=True, width=120)


class _ConfigDumper(yaml.SafeDumper):
    """SafeDumper that writes lists of scalars in flow style and indents nested lists."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:  # noqa: ARG002
        super().increase_indent(flow, False)

    def ignore_aliases(self, data: Any) -> bool:  # noqa: ARG002 - a shared list is written out, never as `&id001`
        return True


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    scalar = all(isinstance(v, (int, float, str, bool)) or v is None for v in data) and data
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=bool(scalar))


_ConfigDumper.add_representer(list, _represent_list)
_ConfigDumper.add_representer(tuple, _represent_list)
