"""Check a config against the models' metadata without downloading weights (the form and `merger validate`)."""

from __future__ import annotations

from dataclasses import dataclass

from merger import constants
from merger.config.load import load_config
from merger.plan.entry import plan_config
from merger.plan.merge import MergePlan
from merger.timeouts import run_limited


@dataclass(frozen=True)
class ValidationReport:
    """What a valid config will produce.

    Attributes:
        method: the `merge_method` (`moe` for mergekit-moe configs).
        pretty_name: the method's display name.
        models: every referenced model, config order.
        num_layers: the output's decoder layers.
        parameter_count: the output's parameters.
        architecture: the output's Hugging Face class name.
        warnings: problems that do not stop the merge.
        stages: how many stages a multi-stage config runs (1 otherwise); `models` then counts every
            stage's models from outside the config (intermediates left out).
    """

    method: str
    pretty_name: str
    models: tuple[str, ...]
    num_layers: int
    parameter_count: int
    architecture: str
    warnings: tuple[str, ...] = ()
    stages: int = 1

    def summary(self) -> str:
        """One line for people, e.g. `slerp of 2 models -> MistralForCausalLM, 32 layers, 7.24B parameters`."""
        n = self.parameter_count
        size = f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"
        made = f"{self.pretty_name} of {len(self.models)} model(s)"
        if self.stages > 1:
            made = f"{self.stages} stages over {len(self.models)} model(s), the last: {self.pretty_name}"
        text = f"{made} -> {self.architecture}, {self.num_layers} layers, {size} parameters ({n:,})"
        return "\n".join([text, *(f"warning: {w}" for w in self.warnings)])


def validate_config(text: str, token: str | None = None, timeout_s: float | None = None) -> ValidationReport:
    """Parse and check a YAML config from metadata alone (config.json, safetensors headers), within a time limit.

    Args:
        text: the YAML config (either schema).
        token: a Hub token for private or gated models.
        timeout_s: seconds to wait at most; defaults to `constants.VALIDATION_TIMEOUT_S`.

    Raises:
        ConfigError / ConfigProblems, ArchitectureError, ModelNotFoundError, UnsafeWeightsError, HubError.
        ValidationTimeoutError: the check took longer than `timeout_s` (it stops at its next Hub call).
    """
    limit = constants.VALIDATION_TIMEOUT_S if timeout_s is None else timeout_s
    return run_limited(lambda: _report(text, token), limit, "checking the config against the models' metadata")


def _report(text: str, token: str | None) -> ValidationReport:
    from merger.stages import is_multi_stage

    if is_multi_stage(text):
        return _stages_report(text, token)
    plan, _ = plan_config(load_config(text), token)
    return report_for(plan)


def report_for(plan: MergePlan) -> ValidationReport:
    """The report of a planned (single-stage) config."""
    return ValidationReport(
        method=plan.method_name,
        pretty_name=plan.pretty_name,
        models=tuple(str(m) for m in plan.models),
        num_layers=plan.num_layers,
        parameter_count=plan.parameter_count,
        architecture=(plan.output_config.get("architectures") or ["?"])[0],
        warnings=plan.warnings,
    )


def _stages_report(text: str, token: str | None) -> ValidationReport:
    """A multi-stage config's report: every stage planned from metadata (intermediates from their stage's
    plan); the last stage that could be planned before running describes the output."""
    from pathlib import Path

    from merger.stages import external_models, plan_stages

    work = Path(".stages-validation").resolve()  # a name only: nothing is written
    plans = plan_stages(text, token, work)
    planned = [p for p in plans if p is not None]
    plan = planned[-1][0]
    unchecked = [f"stage {i + 1} reads an earlier stage and edits the tokenizer: it is checked when it runs"
                 for i, p in enumerate(plans) if p is None]
    return ValidationReport(
        method=plan.method_name,
        pretty_name=plan.pretty_name if plans[-1] else f"checked when it runs (stage {len(plans)})",
        stages=len(plans),
        models=tuple(m for m, _ in external_models(planned, work)),
        num_layers=plan.num_layers,
        parameter_count=plan.parameter_count,
        architecture=(plan.output_config.get("architectures") or ["?"])[0],
        warnings=tuple(w for p, _ in planned for w in p.warnings) + tuple(unchecked),
    )
