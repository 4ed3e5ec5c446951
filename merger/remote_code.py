"""Models that ship their own code: which files an output must carry so that it still loads.

A `config.json` or `tokenizer_config.json` with an `auto_map` tells transformers to import classes
from Python files in the repo (`configuration_*.py`, `modeling_*.py`, `tokenization_*.py`), which may
import sibling files and read vocabulary files their code names. The output keeps the `auto_map`, so
it must keep those files too, byte for byte (docs/decisions.md, "Remote code"). Nothing here runs or
imports the code: files are found by name and relative-import lines only.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .constants import CONFIG_FILE
from .errors import RemoteCodeError

TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
# A module an `auto_map` entry names: `configuration_foo.FooConfig` -> `configuration_foo`.
_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# `from .helpers import x` / `from . import helpers`: sibling files the code imports.
_RELATIVE_IMPORT = re.compile(r"^\s*from\s+\.([A-Za-z_][A-Za-z0-9_]*)?\s+import\s+([^\n#]+)", re.MULTILINE)
# Vocabulary files a custom tokenizer's code reads by a fixed name, beside the ones its config names.
VOCAB_SUFFIXES = (".model", ".tiktoken", ".spm", ".vocab")
VOCAB_NAMES = ("vocab.txt", "vocab.json", "merges.txt")


def _auto_map(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    auto_map = data.get("auto_map") if isinstance(data, dict) else None
    return auto_map if isinstance(auto_map, dict) else {}


def auto_map_modules(auto_map: dict) -> list[str]:
    """The local modules an `auto_map` names, in order, each once.

    Args:
        auto_map: `{"AutoConfig": "configuration_x.XConfig", "AutoTokenizer": ["tokenization_x.XTok", null]}`.
            Entries of the form `org/repo--module.Class` live in another repo and need no local file.

    Returns:
        Module names such as `configuration_x`.
    """
    modules: dict[str, None] = {}
    for value in auto_map.values():
        for entry in value if isinstance(value, list) else [value]:
            if not isinstance(entry, str) or "--" in entry or "." not in entry:
                continue
            modules.setdefault(entry.rsplit(".", 1)[0], None)
    return list(modules)


def _code_files(directory: Path, modules: list[str], where: str) -> list[str]:
    """The `.py` files of `modules` in `directory`, plus the siblings they import, transitively.

    Raises:
        RemoteCodeError: a module's file is missing or its name is not a plain module name.
    """
    pending, found = list(modules), []
    while pending:
        module = pending.pop(0)
        name = f"{module}.py"
        if name in found:
            continue
        if not _MODULE.match(module) or not (directory / name).is_file():
            raise RemoteCodeError(
                f"{where} `auto_map` names the module `{module}`, but the model has no file `{name}`; the output "
                "could not be loaded without it. Use a revision of the model that ships its code"
            )
        found.append(name)
        for match in _RELATIVE_IMPORT.finditer((directory / name).read_text(errors="replace")):
            siblings = [match.group(1)] if match.group(1) else re.findall(r"[A-Za-z_][A-Za-z0-9_]*", match.group(2))
            pending += [s for s in siblings if (directory / f"{s}.py").is_file()]
    return found


def _vocabulary_files(tokenizer_dir: Path) -> list[str]:
    """Files a custom tokenizer reads: those its config names by value, and the usual vocabulary files."""
    config = json.loads((tokenizer_dir / TOKENIZER_CONFIG_FILE).read_text())
    named = {v for v in config.values() if isinstance(v, str) and "/" not in v and v not in (".", "..")}
    return sorted(
        p.name for p in tokenizer_dir.iterdir()
        if p.is_file() and (p.name in named or p.name in VOCAB_NAMES or p.name.endswith(VOCAB_SUFFIXES))
    )


def remote_code_files(config: dict, config_dir: Path, tokenizer_dir: Path) -> list[tuple[Path, str]]:
    """Every file the output must carry for its `auto_map`s, with where to copy it from.

    Args:
        config: the output's `config.json` (its `auto_map`, if any, is the config donor's).
        config_dir: the config donor's folder (code for `AutoConfig`, `AutoModel*`).
        tokenizer_dir: the tokenizer donor's folder (code and vocabulary for `AutoTokenizer`).

    Returns:
        (source path, output file name) pairs, config donor's files first; each output name once.

    Raises:
        RemoteCodeError: an `auto_map` names a module whose file the donor lacks.
    """
    carried: dict[str, Path] = {}
    config_map = config.get("auto_map") if isinstance(config.get("auto_map"), dict) else {}
    for name in _code_files(config_dir, auto_map_modules(config_map), f"`{CONFIG_FILE}`'s"):
        carried.setdefault(name, config_dir / name)
    tokenizer_map = _auto_map(tokenizer_dir / TOKENIZER_CONFIG_FILE)
    if tokenizer_map:
        modules = auto_map_modules(tokenizer_map)
        for name in _code_files(tokenizer_dir, modules, f"`{TOKENIZER_CONFIG_FILE}`'s") + _vocabulary_files(tokenizer_dir):
            carried.setdefault(name, tokenizer_dir / name)
    return [(path, name) for name, path in carried.items()]


def needs_remote_code(config: dict, tokenizer_dir: Path) -> bool:
    """Whether loading the output takes `trust_remote_code=True` (either config has an `auto_map`)."""
    return bool(config.get("auto_map")) or bool(_auto_map(tokenizer_dir / TOKENIZER_CONFIG_FILE))
