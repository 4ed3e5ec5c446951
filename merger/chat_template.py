"""`chat_template`: `auto`, a built-in name, or literal Jinja; never a path on the server's disk.

A built-in name is looked up in the fixed list of `templates/chat_templates/*.jinja`, never joined to
a path, so no config can read another file or learn whether one exists. Literal Jinja is compiled in
Jinja's immutable sandbox at validation, so a broken template is refused before any merge.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import ChatTemplateError, excerpt

TEMPLATES_DIR = Path(__file__).parents[1] / "templates" / "chat_templates"
JINJA_MARKERS = ("{{", "{%", "{#")  # a setting holding one of these is literal Jinja


@lru_cache(maxsize=1)
def builtin_templates() -> dict[str, Path]:
    """The built-in templates: name (file stem) -> file, listed once from the project's own folder."""
    return {path.stem: path for path in sorted(TEMPLATES_DIR.glob("*.jinja"))}


def is_literal(setting: str) -> bool:
    """Whether `chat_template` holds Jinja text rather than a name."""
    return any(marker in setting for marker in JINJA_MARKERS)


def check_chat_template(setting: str | None) -> None:
    """Refuse a `chat_template` that is not `auto`, a built-in name or compiling Jinja.

    Raises:
        ChatTemplateError: a name that is not built in (a file path included: the same message
            whatever the disk holds), or Jinja that does not compile (its line and the parser's reason).
    """
    if setting is None or setting == "auto" or setting in builtin_templates():
        return
    if not is_literal(setting):
        raise ChatTemplateError(
            f"`chat_template: {excerpt(setting)}` is not a built-in template; use `auto`, one of "
            f"{', '.join(builtin_templates())}, or paste the template's Jinja text itself (file paths are never read)"
        )
    try:
        ImmutableSandboxedEnvironment().from_string(setting)
    except TemplateError as err:
        line = getattr(err, "lineno", None)
        where = f" on line {line}" if line else ""
        raise ChatTemplateError(
            f"`chat_template` is not valid Jinja{where}: {excerpt(err.message or type(err).__name__, 120)}; "
            "fix the template"
        ) from None
    except (RecursionError, SyntaxError, MemoryError):
        raise ChatTemplateError("`chat_template` nests too deeply to compile; simplify the template") from None


def chat_template_text(setting: str) -> str:
    """The template a checked, non-`auto` setting stands for: a built-in's text, or the literal Jinja itself."""
    check_chat_template(setting)
    path = builtin_templates().get(setting)
    return path.read_text(encoding="utf-8") if path is not None else setting
