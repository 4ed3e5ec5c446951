"""Parse a config's text into a validated config: the one place a config is read.

The text goes through :func:`merger.config.parse.parse_config_text` (the limits), the result through
the pydantic schemas (:mod:`merger.config.schema`), the method's parameters through their declared
ranges (:mod:`merger.config.parameters`, read from the method registry), the chat template through
the sandbox check. Every problem found is reported together.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from merger.config.chat_template import check_chat_template
from merger.config.parameters import check_parameter_values
from merger.config.parse import parse_config_text
from merger.config.schema import MAX_SHOWN_PROBLEMS, AnyConfig, MergeConfig, MoEConfig
from merger.errors import (
    ChatTemplateError,
    ConfigError,
    ListTooLongError,
    UnknownMethodError,
    excerpt,
    raise_problems,
)


# pydantic's messages for the common mistakes, in the words the rest of the errors use (field, value, fix).
PLAIN_WORDS = {
    "too_short": "must list at least {min_length}, got `{got}`; add them",
    "int_parsing": "must be a whole number, got `{got}`",
    "int_from_float": "must be a whole number, got `{got}`",
    "float_parsing": "must be a number, got `{got}`",
    "bool_parsing": "must be `true` or `false`, got `{got}`",
    "string_type": "must be text, got `{got}`",
    "list_type": "must be a list (`- item` lines or `[a, b]`), got `{got}`",
    "dict_type": "must be a mapping (`key: value` lines), got `{got}`",
    "model_type": "must be a mapping (`key: value` lines), got `{got}`",
    "tuple_type": "must be a list like `[0, 8]`, got `{got}`",
    "literal_error": "must be one of {expected}, got `{got}`",
}


def _location(error: dict) -> str:
    parts = [excerpt(p, 40) for p in error["loc"] if not str(p).startswith("function-")]
    out = ""
    for part in parts:
        out += f"[{part}]" if part.isdigit() else (f".{part}" if out else part)
    return out or "config"


def _schema_problem(error: dict) -> ConfigError:
    """One pydantic error as a named ConfigError: the class a validator raised is kept."""
    original = (error.get("ctx") or {}).get("error")
    kind = type(original) if isinstance(original, ConfigError) else ConfigError
    msg = error["msg"].removeprefix("Value error, ")
    if error["type"] == "missing":
        msg = "is required"
    elif error["type"] == "extra_forbidden":
        msg = f"is not a known key (value `{excerpt(error['input'])}`); check its spelling against the config reference"
    elif error["type"] == "too_long":
        kind = ListTooLongError
        msg = f"has more than {error['ctx']['max_length']:,} entries; that is the limit for this field"
    elif error["type"] in PLAIN_WORDS:
        msg = PLAIN_WORDS[error["type"]].format(**(error.get("ctx") or {}), got=excerpt(error.get("input")))
    location = _location(error)
    return kind(f"`{location}`: {msg}" if location == "config" else f"`{location}` {msg}")


def load_config(text: str) -> AnyConfig:
    """Parse a mergekit (or mergekit-moe) YAML config.

    An MoE config is recognised by its top-level `experts` key. The text goes through
    :func:`merger.config.parse.parse_config_text` (size, alias, nesting, length and token limits); every
    method parameter is then type- and range-checked against its declared :class:`~merger.ranges.Range`.

    Args:
        text: the YAML text.

    Returns:
        A :class:`MergeConfig` or :class:`MoEConfig`.

    Raises:
        ConfigError: the YAML is malformed or a field is invalid; the message names the field
            (e.g. `slices[0].sources[1].layer_range`), a short excerpt of the value and the fix. Named
            subclasses say which rule: ConfigTooLargeError (and its YamlAliasError, NestingTooDeepError,
            ListTooLongError, StringTooLongError), InvalidYamlError, MultiDocumentError,
            TokenInConfigError, ChatTemplateError, ParameterValueError, UnknownMethodError.
    """
    return config_from_value(parse_config_text(text))


def config_from_value(data: Any) -> AnyConfig:
    """Check an already parsed config value (one document of :func:`merger.config.parse.parse_config_documents`).

    Raises:
        ConfigError and its subclasses: as :func:`load_config`.
    """
    if not isinstance(data, dict):
        raise ConfigError("the config must be a YAML mapping with `merge_method` (or `experts` for a MoE)")
    schema = MoEConfig if "experts" in data else MergeConfig
    problems: list[ConfigError] = []
    method = None
    if schema is MergeConfig and "merge_method" in data:
        from merger.methods.registry import get_method  # lazily: the registry imports torch

        try:
            method = get_method(str(data["merge_method"]))
        except UnknownMethodError as err:
            problems.append(err)
    config = None
    try:
        config = schema.model_validate(data)
    except ValidationError as err:
        problems += [_schema_problem(e) for e in err.errors()]
    if config is not None and method is not None:
        problems += check_parameter_values(config, {p.name: p.range for p in method.parameters})
    if isinstance(config, MergeConfig):
        try:
            check_chat_template(config.chat_template)
        except ChatTemplateError as err:
            problems.append(err)
    if len(problems) > MAX_SHOWN_PROBLEMS:
        rest = len(problems) - MAX_SHOWN_PROBLEMS
        problems = problems[:MAX_SHOWN_PROBLEMS] + [ConfigError(f"... and {rest:,} more problem(s) of the same kind")]
    raise_problems(problems)
    return config
