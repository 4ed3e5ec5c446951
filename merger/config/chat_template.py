"""`chat_template`: `auto`, a built-in name, or literal Jinja; never a path on the server's disk.

A built-in name is looked up in the fixed list of `templates/chat_templates/*.jinja`, never joined to
a path, so no config can read another file or learn whether one exists. Literal Jinja is compiled in
Jinja's immutable sandbox at validation, so a broken template is refused before any merge.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from jinja2 import TemplateError, pass_context
from jinja2.sandbox import ImmutableSandboxedEnvironment

from merger.errors import ChatTemplateError, excerpt

TEMPLATES_DIR = Path(__file__).parents[2] / "templates" / "chat_templates"
JINJA_MARKERS = ("{{", "{%", "{#")  # a setting holding one of these is literal Jinja


@lru_cache(maxsize=1)
def builtin_templates() -> dict[str, Path]:
    """The built-in templates: name (file stem) -> file, listed once from the project's own folder."""
    return {path.stem: path for path in sorted(TEMPLATES_DIR.glob("*.jinja"))}


def is_literal(setting: str) -> bool:
    """Whether `chat_template` holds Jinja text rather than a name."""
    return any(marker in setting for marker in JINJA_MARKERS)


class _CompileOnlyEnvironment(ImmutableSandboxedEnvironment):
    """A sandbox that compiles a template without running any of it.

    Jinja evaluates constant expressions while compiling (`{{ 9**9**9 }}`, `{{ 'a'|center(10**9) }}`),
    unbounded in time and memory. Intercepted operators, and filters and tests that take the context,
    are never constant to Jinja, so nothing is computed here (the template is never rendered).
    """

    intercepted_binops = frozenset({"+", "-", "*", "/", "//", "%", "**"})
    intercepted_unops = frozenset({"+", "-"})


def _runtime_only(function: Any) -> Any:
    @pass_context
    def runtime_only(context: Any, *args: Any, **kwargs: Any) -> Any:
        return function(*args, **kwargs)

    return runtime_only


def _compile_only_environment() -> ImmutableSandboxedEnvironment:
    environment = _CompileOnlyEnvironment(optimized=False)  # the optimizer folds constants too
    environment.filters = {name: _runtime_only(f) for name, f in environment.filters.items()}
    environment.tests = {name: _runtime_only(f) for name, f in environment.tests.items()}
    return environment


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
        _compile_only_environment().from_string(setting)
    except TemplateError as err:
        line = getattr(err, "lineno", None)
        where = f" on line {line}" if line else ""
        raise ChatTemplateError(
            f"`chat_template` is not valid Jinja{where}: {excerpt(err.message or type(err).__name__, 120)}; "
            "fix the template"
        ) from None
    except (RecursionError, SyntaxError, MemoryError, ValueError):
        raise ChatTemplateError("`chat_template` nests too deeply or holds a constant too large to compile; "
                                "simplify the template") from None


def chat_template_text(setting: str) -> str:
    """The template a checked, non-`auto` setting stands for: a built-in's text, or the literal Jinja itself."""
    check_chat_template(setting)
    path = builtin_templates().get(setting)
    return path.read_text(encoding="utf-8") if path is not None else setting
