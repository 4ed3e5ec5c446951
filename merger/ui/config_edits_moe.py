"""Edits of an MoE expert's prompt lists, one prompt at a time (pure, no gradio).

Each returns a new mapping in which only that prompt list changed; a list left empty is removed, so
an expert without prompts reads as mergekit-moe writes it.
"""

from __future__ import annotations

import copy
from typing import Any

from merger.config.schema import MAX_PROMPTS
from merger.ui.config_view_moe import PROMPT_KEYS


def _prompts(data: dict[str, Any], group: str, index: int, which: str) -> tuple[dict[str, Any], dict | None]:
    """A copy of `data` and, in it, expert `index` of `group` (None when there is none or `which` is unknown)."""
    out = copy.deepcopy(data)
    experts = out.get(group)
    if which not in PROMPT_KEYS or not isinstance(experts, list) or not 0 <= index < len(experts):
        return out, None
    expert = experts[index]
    return out, expert if isinstance(expert, dict) else None


def add_prompt(data: dict[str, Any], index: int, which: str, group: str = "experts") -> dict[str, Any]:
    """Append an empty prompt to expert `index`'s `which` list (`positive_prompts` or `negative_prompts`)."""
    out, expert = _prompts(data, group, index, which)
    if expert is not None:
        prompts = expert.get(which) if isinstance(expert.get(which), list) else []
        if len(prompts) < MAX_PROMPTS:
            expert[which] = [*prompts, ""]
    return out


def set_prompt(data: dict[str, Any], index: int, which: str, number: int, text: str,
               group: str = "experts") -> dict[str, Any]:
    """Set prompt `number` of expert `index`'s `which` list to `text` (kept as typed, blank included)."""
    out, expert = _prompts(data, group, index, which)
    prompts = expert.get(which) if expert is not None else None
    if isinstance(prompts, list) and 0 <= number < len(prompts):
        prompts[number] = "" if text is None else str(text)
    return out


def remove_prompt(data: dict[str, Any], index: int, which: str, number: int,
                  group: str = "experts") -> dict[str, Any]:
    """Remove prompt `number` of expert `index`'s `which` list (the key goes once the list is empty)."""
    out, expert = _prompts(data, group, index, which)
    prompts = expert.get(which) if expert is not None else None
    if isinstance(prompts, list) and 0 <= number < len(prompts):
        del prompts[number]
        if not prompts:
            del expert[which]
    return out
