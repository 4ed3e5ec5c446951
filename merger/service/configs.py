"""Configs for the UI: the local-path guard, validation (checked once per text and token), examples,
share links and Hub search."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from merger import constants
from merger.config.examples import Example, load_examples
from merger.config.parse import parse_config_documents
from merger.config.references import local_paths
from merger.errors import ConfigError
from merger.links import decode_config, share_url
from merger.service.memo import Memo, digest


def check_local_paths(yaml_text: str) -> None:
    """On a Space, models must come from the Hub: a local path would read the Space's own disk.

    Raises:
        ConfigError: naming the local paths, on a Space only.
    """
    if constants.ON_SPACE:
        paths = _local_paths(yaml_text)
        if paths:
            raise ConfigError(
                f"local paths are not available here ({', '.join(f'`{p}`' for p in paths)}); "
                "use Hub model ids like `org/name`"
            )


def _local_paths(yaml_text: str) -> list[str]:
    """The local references of every stage of a config; none when the parser refuses it (validation names why)."""
    try:
        return local_paths([value for value, _ in parse_config_documents(yaml_text)])
    except ConfigError:
        return []


@dataclass(frozen=True)
class Checked:
    """A config checked against its models' metadata: what validation, pre-flight and submit share.

    Attributes:
        report: the :class:`merger.validate.ValidationReport` (None until planned).
        config: the parsed config (None for a multi-stage config, whose stages are planned in turn).
        plan: its :class:`merger.plan.merge.MergePlan` (None for a multi-stage config).
        metadata: every model's metadata by canonical key (empty for a multi-stage config).
    """

    report: Any = None
    config: Any = None
    plan: Any = None
    metadata: dict[str, Any] = field(default_factory=dict)


# the Hub may change: a check is reused for a form's few requests, not for long
_checked: Memo[Checked] = Memo(ttl_s=120.0, size=32)


def parsed(yaml_text: str, token: str | None) -> Any:
    """The config parsed: the remembered check's when there is one, else parsed now (no Hub call). A
    multi-stage config's stages are split and parsed, and None is returned (it is checked whole).

    Raises:
        ConfigError: the config does not parse (ConfigProblems: all its problems), or a local path on a Space.
    """
    check_local_paths(yaml_text)  # before the memo: a remembered check never skips the guard
    hit = _checked.get(digest(yaml_text, token or ""))
    if hit is not None:
        return hit.config
    from merger.config.load import load_config
    from merger.stages import is_multi_stage, split_stages

    if is_multi_stage(yaml_text):
        split_stages(yaml_text)
        return None
    return load_config(yaml_text)


def models_of(yaml_text: str, token: str | None, config: Any = None) -> Checked:
    """The parsed config and every model's metadata (the plan may not be there yet): the pre-flight's
    `models` line. Multi-stage configs are checked whole (:func:`checked`).

    Args:
        config: :func:`parsed`'s result for `yaml_text`, when the caller has it (not parsed again).

    Raises:
        MergerError: the config does not parse, or a model cannot be reached or read.
    """
    check_local_paths(yaml_text)  # before the memo: a remembered check never skips the guard
    key = digest(yaml_text, token or "")
    hit = _checked.get(key)
    if hit is not None:
        return hit
    from merger.stages import is_multi_stage

    if is_multi_stage(yaml_text):
        return checked(yaml_text, token)
    from merger.config.load import load_config
    from merger.io.resolve import fetch_metadata
    from merger.timeouts import run_limited

    config = load_config(yaml_text) if config is None else config
    metadata = run_limited(
        lambda: fetch_metadata(config.referenced_models(), token), constants.VALIDATION_TIMEOUT_S,
        "fetching the models' metadata",
    )
    return _checked.put(key, Checked(None, config, None, metadata))


def checked(yaml_text: str, token: str | None) -> Checked:
    """Parse and plan a config from metadata once for the requests of one form: validation, pre-flight and
    submit of the same text with the same token reuse it for two minutes (failures are not remembered).

    Raises:
        MergerError: the first problem (or all of them, as ConfigProblems); ValidationTimeoutError.
    """
    check_local_paths(yaml_text)  # before the memo: a remembered check never skips the guard
    key = digest(yaml_text, token or "")
    hit = _checked.get(key)
    if hit is not None and hit.report is not None:
        return hit
    from merger.plan.entry import plan_from_metadata  # the planner loads torch: only when asked
    from merger.stages import is_multi_stage
    from merger.timeouts import run_limited
    from merger.validate import report_for, validate_config

    if is_multi_stage(yaml_text):
        return _checked.put(key, Checked(validate_config(yaml_text, token)))
    models = hit or models_of(yaml_text, token)
    plan = run_limited(
        lambda: plan_from_metadata(models.config, models.metadata, token), constants.VALIDATION_TIMEOUT_S,
        "checking the models against each other",
    )
    return _checked.put(key, Checked(report_for(plan), models.config, plan, models.metadata))


def validate(yaml_text: str, token: str | None) -> Any:
    """Check a config against its models' metadata (no weights).

    Returns:
        A :class:`merger.validate.ValidationReport`.

    Raises:
        MergerError: the first problem (or all of them, as ConfigProblems).
    """
    return checked(yaml_text, token).report


def examples(directory: str | os.PathLike[str]) -> list[Example]:
    """The one-click example configs the page offers (fixture twins with local paths hidden on a Space)."""
    found = load_examples(directory)
    if constants.ON_SPACE:
        found = [e for e in found if not _local_paths(e.yaml_text)]
    return found


def share(base_url: str, yaml_text: str) -> str:
    """The link that reopens `yaml_text` byte for byte (see :func:`merger.links.share_url`)."""
    return share_url(base_url, yaml_text)


def load_link(payload: str) -> str:
    """The YAML a share link's payload carries. Raises ConfigError for a damaged link."""
    return decode_config(payload)


def search_models(query: str, token: str | None, limit: int = 20) -> list[str]:
    """Hub model ids matching `query` (empty on any Hub failure: a suggestion list never breaks a form)."""
    query = (query or "").strip()
    if len(query) < 2 or query.startswith(("/", ".", "~")):
        return []
    from merger.publish.hub_read import search_models as hub_search

    return list(dict.fromkeys(hub_search(query, token=token, limit=limit)))
