"""The one-click example configs: `templates/examples/*.yaml`, each titled by its first comment line."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Example:
    """A one-click example config.

    Attributes:
        name: the file's stem (stable id).
        title: the button label: the file's first `# comment` line, else the prettified stem.
        yaml_text: the config.
    """

    name: str
    title: str
    yaml_text: str


def load_examples(directory: str | os.PathLike[str]) -> list[Example]:
    """The example configs in `directory` (`*.yaml` / `*.yml`), sorted by file name.

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
        examples.append(Example(name=path.stem, title=_example_title(path.stem, text), yaml_text=text))
    return examples


def _example_title(stem: str, text: str) -> str:
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.startswith("#"):
            title = stripped.lstrip("#").strip()
            if title:
                return title
            continue
        break
    return re.sub(r"[-_]+", " ", stem).strip().capitalize() or stem
