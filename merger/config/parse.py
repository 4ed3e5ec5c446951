"""The one parser of config text: YAML read with limits that hold before anything is expanded.

Every config the project reads (the editor, `merger validate`/`run`, a job, a share link, the form)
goes through :func:`parse_config_text`. It refuses, each with a named error saying which limit, the
value and the fix:

- text over :attr:`Limits.max_bytes`, and text holding anything shaped like a Hub token (comments too);
- nesting deeper than :attr:`Limits.max_depth`, counted while composing, so 20,000 brackets stop at
  the limit instead of exhausting Python's stack;
- more than :attr:`Limits.max_aliases` aliases, an alias inside its own anchor, or a document whose
  alias-expanded size (values counted as if every alias were copied out) exceeds
  :attr:`Limits.max_nodes`: measured on the composed node graph, where each anchor is one shared
  node, so a "billion laughs" bomb costs a few thousand steps and no memory;
- lists or mappings over :attr:`Limits.max_entries`, keys over :attr:`Limits.max_key_chars`, strings
  over :attr:`Limits.max_string_chars` (:attr:`Limits.max_text_chars` for `chat_template`);
- several documents in one text, where one config is expected (:func:`parse_config_documents`
  reads multi-stage configs).

Events come from libyaml's C parser (no recursion); PyYAML's Python composer, where the counts hook
in, builds the node graph; PyYAML's safe constructor builds the value.

Numbers like `1e-5` and `1e300`, which YAML 1.1 reads as strings, are read as floats (as YAML 1.2
and mergekit's users expect); range checks then refuse what is out of range.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

import yaml
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.cyaml import CParser
from yaml.resolver import Resolver

from merger.errors import (
    ConfigError,
    ConfigTooLargeError,
    InvalidYamlError,
    ListTooLongError,
    MultiDocumentError,
    NestingTooDeepError,
    StringTooLongError,
    TokenInConfigError,
    YamlAliasError,
    excerpt,
)
from merger.scrub import TOKEN_PATTERN


@dataclass(frozen=True)
class Limits:
    """Bounds on a config's text and its parsed value; far above any real mergekit config.

    Attributes:
        max_bytes: UTF-8 size of the text.
        max_aliases: `*alias` uses in the text.
        max_nodes: values (scalars, lists, mappings) after expanding every alias.
        max_depth: nesting of lists and mappings, aliases expanded.
        max_entries: items of one list or mapping.
        max_key_chars: characters of a mapping key.
        max_string_chars: characters of a string value.
        max_text_chars: characters of a string under a key of :data:`LONG_TEXT_KEYS` (literal Jinja).
    """

    max_bytes: int = 256 * 1024
    max_aliases: int = 100
    max_nodes: int = 10_000
    max_depth: int = 32
    max_entries: int = 4096
    max_key_chars: int = 128
    max_string_chars: int = 4096
    max_text_chars: int = 64 * 1024


LIMITS = Limits()
LONG_TEXT_KEYS = frozenset({"chat_template"})  # keys whose value may be a long literal text

_TOKEN_MESSAGE = (
    "the config contains what looks like a Hugging Face token (`hf_...`){where}; remove it (comments "
    "included): a config is stored, shared and pushed with the model, so it must never hold a token. "
    "Sign in, or pass the token with `--token`/`HF_TOKEN`, instead"
)


class _LimitedLoader(Composer, CParser, SafeConstructor, Resolver):
    """libyaml's parser (C, no recursion) feeding PyYAML's Python composer, which here counts nodes,
    depth and aliases, refusing as soon as a limit is passed; then the safe constructor."""

    def __init__(self, text: str, limits: Limits):
        CParser.__init__(self, text)
        Composer.__init__(self)
        SafeConstructor.__init__(self)
        Resolver.__init__(self)
        self.limits = limits
        self.depth = 0
        self.aliases = 0
        self.nodes = 0
        self.open_anchors: set[str] = set()

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > self.limits.max_aliases:
                raise YamlAliasError(
                    f"the config uses more than {self.limits.max_aliases} YAML aliases (`*name`, line "
                    f"{event.start_mark.line + 1}); write the values out instead of repeating anchors"
                )
            if event.anchor in self.open_anchors:
                raise YamlAliasError(
                    f"the YAML alias `*{excerpt(event.anchor)}` (line {event.start_mark.line + 1}) is inside its "
                    "own anchor, which would make the config infinite; remove the alias"
                )
            return super().compose_node(parent, index)
        self.nodes += 1
        if self.nodes > self.limits.max_nodes:  # stops early: composing is the Python part
            raise ConfigTooLargeError(
                f"the config holds more than {self.limits.max_nodes:,} values (line {event.start_mark.line + 1}); "
                "a merge config needs far fewer: remove what is not part of it"
            )
        self.depth += 1
        if self.depth > self.limits.max_depth:
            raise NestingTooDeepError(
                f"the config nests lists or mappings more than {self.limits.max_depth} levels deep (line "
                f"{event.start_mark.line + 1}); a merge config needs a handful: remove the extra brackets"
            )
        anchor = getattr(event, "anchor", None)
        if anchor:
            self.open_anchors.add(anchor)
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1
            self.open_anchors.discard(anchor)


# Floats YAML 1.1 misses: an exponent without a dot (`1e-5`, `1e300`); they are read as floats.
_LimitedLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_config_text(text: str | bytes, limits: Limits = LIMITS) -> Any:
    """Parse config YAML with every limit checked before the value is built.

    Args:
        text: the YAML (bytes must be UTF-8).
        limits: the bounds (the defaults suit every caller; tests pass smaller ones).

    Returns:
        The parsed value (a dict for a config; None for empty text). Aliases share one object.

    Raises:
        ConfigTooLargeError: the text is over `max_bytes`; its subclasses YamlAliasError,
            NestingTooDeepError, ListTooLongError, StringTooLongError name the other limits.
        TokenInConfigError: the text holds something shaped like a Hub token.
        MultiDocumentError: the text holds several `---` separated documents.
        InvalidYamlError: a YAML syntax error, a non-UTF-8 text, or a tag a safe loader refuses.
    """
    text = _checked_text(text, limits)
    loader = _LimitedLoader(text, limits)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expanded(node, limits)
        return loader.construct_document(node)
    except ConfigError:
        raise
    except yaml.composer.ComposerError as err:
        if "expected a single document" in str(err.context):
            raise MultiDocumentError(
                "the text holds several YAML documents separated by `---` (a multi-stage, mergekit-multi config) "
                "where one config is expected; run it with `python -m merger run`, or keep one document here"
            ) from None
        raise _invalid(err) from None
    except yaml.YAMLError as err:
        raise _invalid(err) from None
    except (ValueError, OverflowError) as err:  # a scalar the constructor cannot convert (e.g. a bad date)
        raise InvalidYamlError(f"the config holds a value YAML cannot read ({excerpt(str(err))}); quote it") from None
    finally:
        loader.dispose()


MAX_STAGES = 16  # documents of a multi-stage (mergekit-multi) config


def parse_config_documents(text: str | bytes, limits: Limits = LIMITS) -> list[tuple[Any, str]]:
    """Parse a config of one or several `---` separated documents (mergekit-multi), every limit checked.

    The text's size is limited as a whole; nodes and aliases are counted over all documents together
    (a document is never allowed more than a single config), depth and lengths per value.

    Args:
        text: the YAML (bytes must be UTF-8).
        limits: the bounds.

    Returns:
        One `(value, text)` per non-empty document, in order: its parsed value and its own lines of the text.

    Raises:
        ConfigTooLargeError, TokenInConfigError, InvalidYamlError: as :func:`parse_config_text`.
        MultiDocumentError: more than :data:`MAX_STAGES` documents.
    """
    text = _checked_text(text, limits)
    lines = text.splitlines(keepends=True)
    loader = _LimitedLoader(text, limits)
    documents: list[tuple[Any, str]] = []
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is None or (isinstance(node, yaml.ScalarNode) and node.value == ""):
                continue
            if len(documents) == MAX_STAGES:
                raise MultiDocumentError(f"the config holds more than {MAX_STAGES} YAML documents (stages); "
                                         f"a multi-stage merge takes at most {MAX_STAGES}: split it into several runs")
            _check_expanded(node, limits)
            end = node.end_mark.line + (1 if node.end_mark.column else 0)
            documents.append((loader.construct_document(node), "".join(lines[node.start_mark.line:end])))
        return documents
    except ConfigError:
        raise
    except yaml.YAMLError as err:
        raise _invalid(err) from None
    except (ValueError, OverflowError) as err:
        raise InvalidYamlError(f"the config holds a value YAML cannot read ({excerpt(str(err))}); quote it") from None
    finally:
        loader.dispose()


def read_config_file(path: str | os.PathLike[str], limits: Limits = LIMITS) -> str:
    """A config file's text, reading at most one byte past the size limit (a huge file is not loaded).

    Raises:
        ConfigTooLargeError, InvalidYamlError (not UTF-8), TokenInConfigError: as :func:`parse_config_text`.
        OSError: the file cannot be read.
    """
    with open(path, "rb") as handle:
        data = handle.read(limits.max_bytes + 1)
        if len(data) > limits.max_bytes:
            size = os.fstat(handle.fileno()).st_size  # 0 for a device or a pipe: then "more than" what was read
            endless = size <= limits.max_bytes
            raise ConfigTooLargeError(_too_large(len(data) if endless else size, limits, more=endless))
    return _checked_text(data, limits)


def _checked_text(text: str | bytes, limits: Limits) -> str:
    """The text as `str`, refused when too large, not UTF-8, or holding a token."""
    if len(text) > limits.max_bytes:
        raise ConfigTooLargeError(_too_large(len(text), limits))
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as err:
            raise InvalidYamlError(f"the config is not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError as err:
        raise InvalidYamlError(f"the config holds a character that is not valid Unicode (position {err.start}); "
                               "remove it") from None
    if size > limits.max_bytes:
        raise ConfigTooLargeError(_too_large(size, limits))
    refuse_tokens(text)
    return text


def refuse_tokens(text: str, secret: str | None = None) -> None:
    """Refuse text holding anything shaped like a Hub token, or `secret` itself (comments included).

    The one token check for config text: the parser, the job queue and share links all call it.

    Args:
        text: the config YAML.
        secret: a token known to the caller (e.g. the submitter's), refused even if not token-shaped.

    Raises:
        TokenInConfigError: naming the line, never the token.
    """
    found = TOKEN_PATTERN.search(text)
    start = found.start() if found else (text.find(secret) if secret else -1)
    if start >= 0:
        line = text.count("\n", 0, start) + 1
        raise TokenInConfigError(_TOKEN_MESSAGE.format(where=f" on line {line}"))


def _too_large(size: int, limits: Limits, more: bool = False) -> str:
    return (f"the config is {'more than ' if more else ''}{size:,} bytes, over the {limits.max_bytes:,}-byte limit; a merge config is a few "
            "hundred bytes: remove what is not part of it")


def _invalid(err: yaml.YAMLError) -> InvalidYamlError:
    """A YAML error without the parser's snippet of the input (which repeats user text at length)."""
    parts = [getattr(err, "context", None), getattr(err, "problem", None)]
    problem = "; ".join(str(p) for p in parts if p) or str(err)  # a ReaderError has neither: its own text
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return InvalidYamlError(f"the config is not valid YAML: {excerpt(problem, 120)}{where}; fix the YAML there")


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _check_expanded(root: yaml.Node, limits: Limits) -> None:
    """Refuse a node graph too large, deep, long or wordy once aliases are expanded.

    Each distinct node is visited once (an anchor is one node however many aliases use it), with an
    explicit stack, so the cost is linear in the text and no recursion limit is reached.
    """
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    _check_string(root, limits.max_string_chars)
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if id(node) in size:
            continue
        children = _children(node)
        if not children_done:
            _check_node(node, limits)
            stack.append((node, True))
            stack.extend((child, False) for child in children if id(child) not in size)
            continue
        size[id(node)] = 1 + sum(size[id(c)] for c in children)
        depth[id(node)] = 1 + max((depth[id(c)] for c in children), default=0)
        line = node.start_mark.line + 1
        if size[id(node)] > limits.max_nodes:
            raise YamlAliasError(
                f"the config expands to more than {limits.max_nodes:,} values once its YAML aliases are copied "
                f"out (at line {line}: a \"billion laughs\" bomb); write the config without nested aliases"
            )
        if depth[id(node)] > limits.max_depth + 1:  # +1: the scalar leaves
            raise NestingTooDeepError(
                f"the config nests more than {limits.max_depth} levels deep once its YAML aliases are copied "
                f"out (at line {line}); write the config without nested aliases"
            )


def _check_node(node: yaml.Node, limits: Limits) -> None:
    """One list or mapping: its length, its keys' and its strings' lengths (a scalar is checked by its parent)."""
    line = node.start_mark.line + 1
    if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)) and len(node.value) > limits.max_entries:
        kind = "mapping" if isinstance(node, yaml.MappingNode) else "list"
        raise ListTooLongError(
            f"a {kind} at line {line} has {len(node.value):,} entries, over the {limits.max_entries:,} limit; "
            "a merge config needs far fewer"
        )
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode) and len(key.value) > limits.max_key_chars:
                raise StringTooLongError(
                    f"the key `{excerpt(key.value)}` at line {key.start_mark.line + 1} is {len(key.value):,} "
                    f"characters, over the {limits.max_key_chars} limit; use the config reference's key names"
                )
            long_text = isinstance(key, yaml.ScalarNode) and key.value in LONG_TEXT_KEYS
            _check_string(value, limits.max_text_chars if long_text else limits.max_string_chars)
    elif isinstance(node, yaml.SequenceNode):
        for value in node.value:
            _check_string(value, limits.max_string_chars)


def _check_string(node: yaml.Node, limit: int) -> None:
    if not isinstance(node, yaml.ScalarNode):
        return
    if len(node.value) > limit:
        raise StringTooLongError(
            f"the value `{excerpt(node.value)}` at line {node.start_mark.line + 1} is {len(node.value):,} "
            f"characters, over the {limit:,} limit; shorten it"
        )
    if TOKEN_PATTERN.search(node.value):  # a token spelt with YAML escapes (`\x68f_...`)
        raise TokenInConfigError(_TOKEN_MESSAGE.format(where=f" on line {node.start_mark.line + 1}"))
