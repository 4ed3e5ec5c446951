"""An edited config mapping written back into its text, top-level key by key (pure, no gradio).

A form edit changes one field; writing the whole mapping again would also rewrite what the user typed
around it (comments, quoting, flow lists). Here only the top-level keys whose value changed are written
again (`models:` when a model's weight changed); every other key keeps its own lines, and the comments
and blank lines between keys stay where they were. Whenever that cannot be done exactly (a flow-style
mapping, anchors, keys reordered, or a result that would not read back as the edited mapping) the
mapping is written whole, as before: the text is never wrong, only sometimes less preserved.
"""

from __future__ import annotations

from typing import Any

import yaml

from merger.config.dump import dump_yaml
from merger.config.parse import parse_config_text
from merger.errors import ConfigError


def rewritten(text: str, old: dict[str, Any], new: dict[str, Any]) -> str:
    """`text` (one YAML document holding `old`) rewritten to hold `new`, keeping the lines of unchanged keys.

    Args:
        text: one document's text, as typed (comments included); it parsed to `old` within the parser's limits.
        old: the mapping `text` holds.
        new: the edited mapping (the same keys in the same order, some values changed, added or removed).

    Returns:
        A text that parses to `new`: the unchanged keys' lines and the comments between keys as typed, the
        changed keys written by :func:`merger.config.dump.dump_yaml`; or `dump_yaml(new)` when that cannot
        be done exactly.
    """
    spans = _key_spans(text, old)
    common = [k for k in new if k in old]
    if spans is None or common != [k for k in old if k in new]:
        return dump_yaml(new)
    pieces = []
    for key, value in new.items():
        if key not in spans:
            pieces.append(dump_yaml({key: value}))
            continue
        lead_start, start, stop = spans[key]
        kept = old[key] == value and type(old[key]) is type(value)
        pieces.append(text[lead_start:start] + (text[start:stop] if kept else dump_yaml({key: value})))
    first = min((lead for lead, _, _ in spans.values()), default=0)
    last = max((stop for _, _, stop in spans.values()), default=0)
    result = text[:first] + "".join(pieces) + text[last:]
    return result if _reads_as(result, new) else dump_yaml(new)


def _key_spans(text: str, old: dict[str, Any]) -> dict[str, tuple[int, int, int]] | None:
    """Each top-level key's (lead start, own start, own end) offsets in `text`, or None when the document
    is not a plain block mapping of those keys. The lead is the comments and blank lines above the key."""
    try:
        if any(getattr(event, "anchor", None) for event in yaml.parse(text, Loader=yaml.SafeLoader)):
            return None  # an anchor's key may go while an alias to it stays
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return None
    if not isinstance(root, yaml.MappingNode) or root.flow_style or len(root.value) != len(old):
        return None
    spans: dict[str, tuple[int, int, int]] = {}
    previous_end = _line_start(text, root.start_mark.index)
    for key_node, value_node in root.value:
        if not isinstance(key_node, yaml.ScalarNode) or key_node.value not in old or key_node.value in spans:
            return None
        start = _line_start(text, key_node.start_mark.index)
        if start < previous_end:
            return None  # two keys on one line
        stop = _own_end(text, start, value_node.end_mark.index)
        spans[key_node.value] = (previous_end, start, stop)
        previous_end = stop
    return spans


def _line_start(text: str, index: int) -> int:
    return text.rfind("\n", 0, index) + 1


def _own_end(text: str, start: int, raw_end: int) -> int:
    """The end of a key's own lines: through the line its value ends on, less trailing blank and comment lines
    (those lead the next key)."""
    if raw_end > 0 and text[raw_end - 1] != "\n":
        newline = text.find("\n", raw_end)
        raw_end = len(text) if newline < 0 else newline + 1
    lines = text[start:raw_end].splitlines(keepends=True)
    while len(lines) > 1 and (not lines[-1].strip() or lines[-1].lstrip().startswith("#")):
        lines.pop()
    return start + sum(len(line) for line in lines)


def _reads_as(text: str, expected: dict[str, Any]) -> bool:
    try:
        return parse_config_text(text) == expected
    except ConfigError:
        return False
