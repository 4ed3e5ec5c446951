"""The form's view of a mergekit-moe config: experts with their prompts, gate mode, outputs (pure, no gradio).

Split from :mod:`merger.ui.config_view` (which dispatches here for configs with `experts:`); the
gate modes are the schema's own `Literal`, so a mode the engine gains appears in the form by itself.
"""

from __future__ import annotations

import typing
from typing import Any

from merger.config.schema import MoEConfig
from merger.ui.config_fields import (
    MOE,
    MOE_FIELDS,
    TOP_FIELDS,
    Field,
    ModelRow,
    View,
    reference_parts,
    options_of,
)

EXPERT_GROUPS = ("experts", "shared_experts")  # a group the schema lacks is not shown
PROMPT_KEYS = ("positive_prompts", "negative_prompts")
EXPERT_SCALES = {"residual_scale": 1, "noise_scale": 0}  # per expert, optional; unset, they change nothing
# Output architectures offered by name; the box takes any other name (the schema decides what it accepts).
MOE_OUTPUTS = ("mixtral",)


def gate_modes() -> tuple[str, ...]:
    """Every `gate_mode` the schema's `MoEConfig.gate_mode` Literal allows, in its order."""
    return tuple(str(mode) for mode in typing.get_args(MoEConfig.model_fields["gate_mode"].annotation))


def expert_groups() -> tuple[str, ...]:
    """The expert lists the schema has (`experts`, and `shared_experts` where it takes them)."""
    return tuple(g for g in EXPERT_GROUPS if g in MoEConfig.model_fields)


def expert_rows(data: dict[str, Any], group: str) -> tuple[ModelRow, ...]:
    """The rows of `experts:` or `shared_experts:`: model, LoRA, prompts and per-expert scales."""
    entries = data.get(group) if isinstance(data.get(group), list) else []
    rows = []
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        model, lora = reference_parts(entry.get("source_model"))
        prompts = tuple(_prompts(entry.get(key)) for key in PROMPT_KEYS)
        scales = tuple(Field(key, "number", entry.get(key) if _plain_number(entry.get(key)) else None, default)
                       for key, default in EXPERT_SCALES.items())
        rows.append(ModelRow(model, scales, lora, prompts))
    return tuple(rows)


def _prompts(value: Any) -> tuple[str, ...]:
    return tuple(str(p) for p in value) if isinstance(value, list) else ()


def _plain_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def moe_view(data: dict[str, Any]) -> View:
    """What the form shows of a mergekit-moe config (never raises; odd values are kept and listed)."""
    groups = expert_groups()
    rows = expert_rows(data, "experts")
    shared = expert_rows(data, "shared_experts") if "shared_experts" in groups else None
    options = (
        Field("gate_mode", "choice", data.get("gate_mode"), "hidden", gate_modes()),
        Field("experts_per_token", "number", data.get("experts_per_token"), 2, minimum=1),
        Field("architecture", "text", data.get("architecture"), None, MOE_OUTPUTS),
        *(f for f in options_of(data) if f.key in MoEConfig.model_fields),
    )
    base, base_lora = reference_parts(data.get("base_model"))
    return View(MOE, "required", base, rows, None, (), options, tuple(_moe_kept(data, groups)),
                base_lora=base_lora, shared=shared)


def _moe_kept(data: dict[str, Any], groups: tuple[str, ...]) -> list[str]:
    known = {"base_model", "name", *groups, *MOE_FIELDS, *TOP_FIELDS}
    kept = [k for k in data if k not in known or (k in TOP_FIELDS and k not in MoEConfig.model_fields)]
    for group in groups:
        entries = data.get(group)
        if group in data and not isinstance(entries, list):
            kept.append(group)
            continue
        for i, expert in enumerate(entries or []):
            if not isinstance(expert, dict):
                kept.append(f"{group}[{i}]")
                continue
            for key, value in expert.items():
                if not _shown(key, value):
                    kept.append(f"{group}[{i}].{key}")
    return kept


def _shown(key: str, value: Any) -> bool:
    if key == "source_model":
        return True
    if key in PROMPT_KEYS:
        return isinstance(value, list) and all(isinstance(p, str) for p in value)
    return key in EXPERT_SCALES and (value is None or _plain_number(value))
