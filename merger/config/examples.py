"""The one-click example configs: `templates/examples/*.yaml`, each titled by its first comment line and
described by the comment lines right after it (plain words for the page, never the file's name)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from merger.config.parse import parse_config_documents
from merger.config.references import local_paths
from merger.errors import ConfigError


@dataclass(frozen=True)
class Example:
    """A one-click example config.

    Attributes:
        name: the file's stem (stable id).
        title: the button label: the file's first `# comment` line, else the prettified stem.
        description: the comment lines right after the title, joined into one sentence ("" without).
        yaml_text: the config.
    """

    name: str
    title: str
    yaml_text: str
    description: str = ""


def load_examples(directory: str | os.PathLike[str]) -> list[Example]:
    """The example configs in `directory` (`*.yaml` / `*.yml`): those on Hub models first, then those that
    name local folders (the offline twins), each group sorted by file name.

    A missing directory gives no examples; an unreadable file is skipped.
    """
    folder = Path(directory)
    if not folder.is_dir():
        return []
    examples = []
    for path in sorted(p for p in folder.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file()):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        comments = _leading_comments(text)
        title = comments[0] if comments else re.sub(r"[-_]+", " ", path.stem).strip().capitalize() or path.stem
        examples.append(Example(name=path.stem, title=title, yaml_text=text, description=" ".join(comments[1:])))
    return sorted(examples, key=lambda e: bool(_local_references(e.yaml_text)))  # stable: names stay in order


def _local_references(text: str) -> list[str]:
    """The local folders a config names (none when it does not parse: validation names why)."""
    try:
        return local_paths([value for value, _ in parse_config_documents(text)])
    except ConfigError:
        return []


def _leading_comments(text: str) -> list[str]:
    """The text of the `# comment` lines before the config's first key (blank lines and bare `#` skipped)."""
    found = []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped:
            continue
        if not stripped.startswith("#"):
            break
        comment = stripped.lstrip("#").strip()
        if comment:
            found.append(comment)
    return found
