"""Multi-stage (mergekit-multi) configs in the form: the stages of a config text, and edits of one stage.

No gradio here. A multi-stage config is several `---` separated documents; every stage but the last has
a `name:` that later stages use as a model. The form edits one stage at a time: that stage's document
is written again as YAML and every other byte of the text (the other stages, comments, separators)
stays as typed. A single-document config is edited as before (the whole text written again).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

from merger.config.dump import dump_yaml
from merger.config.parse import parse_config_documents
from merger.errors import ConfigError
from merger.ui import config_view
from merger.ui.config_text import rewritten

Edit = Callable[[dict[str, Any]], dict[str, Any]]
_SEPARATOR = re.compile(r"^---(?:[ \t].*)?(?:\r\n|\r|\n|$)", re.MULTILINE)


@dataclass(frozen=True)
class Document:
    """One document of a config text: its parsed value and where its own lines sit (`text[start:end]`)."""

    value: Any
    start: int
    end: int

    @property
    def name(self) -> str:
        """The stage's `name:` (empty for a last stage without one)."""
        return config_view.text_of(self.value.get("name")) if isinstance(self.value, dict) else ""


def documents(text: str) -> list[Document] | None:
    """The documents of `text`, in order, or None when the one parser refuses it (limits, syntax, a token)."""
    try:
        parsed = parse_config_documents(text or "")
    except ConfigError:
        return None
    found, position = [], 0
    for value, own_lines in parsed:
        start = text.find(own_lines, position)
        while start > 0 and text[start - 1] not in "\r\n":  # a document starts at a line's start
            start = text.find(own_lines, start + 1)
        if start < 0:
            return None
        found.append(Document(value, start, start + len(own_lines)))
        position = start + len(own_lines)
    return found


def stage_count(text: str) -> int:
    """How many stages the form lists: the documents of a multi-stage text (several, or one with a `name:`,
    as the engine reads it), else 0 (a plain config)."""
    docs = documents(text)
    return len(docs) if docs and (len(docs) > 1 or docs[0].name) else 0


def stage_data(text: str, stage: int) -> dict[str, Any] | None:
    """The mapping the form shows: stage `stage` of a multi-stage text (clamped), else the whole config."""
    docs = documents(text)
    if not docs or len(docs) < 2:
        return config_view.parse(text)
    value = docs[clamp(stage, len(docs))].value
    return value if isinstance(value, dict) else None


def clamp(stage: Any, count: int) -> int:
    """A stage index within `[0, count)` (0 for anything else)."""
    return min(max(int(stage), 0), count - 1) if isinstance(stage, int) and count > 0 else 0


def apply(text: str, stage: Any, edit: Edit) -> str:
    """The text after `edit` of stage `stage` (a plain config: of the whole mapping).

    Only the changed top-level keys of that stage are written again (:func:`merger.ui.config_text.rewritten`);
    the other keys, comments and every other stage stay byte for byte (docs/decisions.md, "The form's editors").

    Args:
        text: the config text (one or several documents).
        stage: the index of the stage the form shows (clamped; ignored for a plain config).
        edit: a pure edit of one mapping (:mod:`merger.ui.config_edits`), returning a new mapping.

    Returns:
        The new config text; an unreadable text is treated as an empty mapping.
    """
    docs = documents(text)
    if not docs or len(docs) < 2:
        data = config_view.parse(text)
        return dump_yaml(edit({})) if data is None else rewritten(text, data, edit(data))
    doc = docs[clamp(stage, len(docs))]
    if not isinstance(doc.value, dict):
        return text[: doc.start] + dump_yaml(edit({})) + text[doc.end:]
    return text[: doc.start] + rewritten(text[doc.start: doc.end], doc.value, edit(doc.value)) + text[doc.end:]


def labels(text: str) -> list[str]:
    """Each stage as the stage picker lists it: number, name, method (`2. mid: slerp`)."""
    docs = documents(text) or []
    shown = []
    for i, doc in enumerate(docs):
        method = config_view.method_of(doc.value) if isinstance(doc.value, dict) else "?"
        shown.append(f"{i + 1}. {doc.name or 'final'}: {method or 'no method'}")
    return shown


def add_stage(text: str) -> str:
    """A new last stage that merges the current last stage's output (a SLERP with it as base).

    The current last stage gets a `name:` line if it has none (stages but the last need one); that one
    line is inserted, the rest of the text stays as typed.
    """
    docs = documents(text) or []
    names = {d.name for d in docs}
    last = docs[-1] if docs else None
    name = last.name if last else ""
    if last is not None and not name:
        name = next(f"stage-{n}" for n in range(len(docs), len(docs) + len(names) + 2) if f"stage-{n}" not in names)
        text = _named(text, last, name)
    if text and not text.endswith("\n"):
        text += "\n"
    new: dict[str, Any] = {"merge_method": "slerp", "base_model": name, "models": [{"model": name}, {"model": ""}],
                           "parameters": {"t": 0.5}}
    if isinstance(last.value if last else None, dict) and last.value.get("dtype"):
        new["dtype"] = last.value["dtype"]
    return text + ("---\n" if text else "") + dump_yaml(new)


def _named(text: str, doc: Document, name: str) -> str:
    own = text[doc.start: doc.end]
    if isinstance(doc.value, dict) and not own.lstrip().startswith("{"):  # a block mapping: one line more
        return text[: doc.start] + dump_yaml({"name": name}) + text[doc.start:]
    value = doc.value if isinstance(doc.value, dict) else {}
    return text[: doc.start] + dump_yaml({"name": name, **value}) + text[doc.end:]


def remove_stage(text: str, stage: int) -> str:
    """The text without stage `stage`: its lines and the `---` line before it (the first stage: after it).

    Comments after a `---` belong to the stage below it and go or stay with it. A text left with one
    stage stays a valid config; a later stage that used the removed one's name is then named by validation.
    """
    docs = documents(text)
    if not docs or len(docs) < 2 or not 0 <= stage < len(docs):
        return text
    if stage == 0:
        separator = _separator(text, docs[0].end, docs[1].start)
        return text[: docs[0].start] + text[separator.end() if separator else docs[1].start:]
    separator = _separator(text, docs[stage - 1].end, docs[stage].start)
    return text[: separator.start() if separator else docs[stage - 1].end] + text[docs[stage].end:]


def _separator(text: str, start: int, end: int) -> re.Match | None:
    """The `---` line (with its line break) between two documents, or None."""
    found = list(_SEPARATOR.finditer(text, start, end))
    return found[-1] if found else None
