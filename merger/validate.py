"""Check a config against the models' metadata without downloading weights (the form and `merger validate`)."""

from __future__ import annotations

from dataclasses import dataclass

from merger.config.load import load_config
from merger.plan.entry import plan_config


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
    """

    method: str
    pretty_name: str
    models: tuple[str, ...]
    num_layers: int
    parameter_count: int
    architecture: str
    warnings: tuple[str, ...] = ()

    def summary(self) -> str:
        """One line for people, e.g. `slerp of 2 models -> MistralForCausalLM, 32 layers, 7.24B parameters`."""
        n = self.parameter_count
        size = f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"
        text = (
            f"{self.pretty_name} of {len(self.models)} model(s) -> {self.architecture}, "
            f"{self.num_layers} layers, {size} parameters ({n:,})"
        )
        return "\n".join([text, *(f"warning: {w}" for w in self.warnings)])


def validate_config(text: str, token: str | None = None) -> ValidationReport:
    """Parse and check a YAML config from metadata alone (config.json, safetensors headers).

    Args:
        text: the YAML config (either schema).
        token: a Hub token for private or gated models.

    Raises:
        ConfigError / ConfigProblems, ArchitectureError, ModelNotFoundError, UnsafeWeightsError, HubError.
    """
    plan, _ = plan_config(load_config(text), token)
    return ValidationReport(
        method=plan.method_name,
        pretty_name=plan.pretty_name,
        models=tuple(str(m) for m in plan.models),
        num_layers=plan.num_layers,
        parameter_count=plan.parameter_count,
        architecture=(plan.output_config.get("architectures") or ["?"])[0],
        warnings=plan.warnings,
    )
