"""Check a config against the models' metadata without downloading weights (the form and `merger validate`)."""

from __future__ import annotations

from dataclasses import dataclass

from .config import AnyConfig, MoEConfig, load_config
from .metadata import ModelMetadata
from .moe import build_moe_plan
from .plan import MergePlan, build_plan, needs_vocabularies
from .resolve import fetch_metadata, fetch_vocabularies


def plan_config(
    config: AnyConfig, token: str | None, metadata: dict[str, ModelMetadata] | None = None
) -> tuple[MergePlan, dict[str, ModelMetadata]]:
    """Plan either schema (mergekit merge or mergekit-moe) from metadata, fetching no weights.

    Args:
        config: the parsed config.
        token: a Hub token for private or gated models.
        metadata: the referenced models' metadata when already fetched (else fetched here).

    Returns:
        The plan, and every referenced model's metadata (canonical key -> metadata).
    """
    refs = config.referenced_models()
    metadata = fetch_metadata(refs, token) if metadata is None else metadata
    if isinstance(config, MoEConfig):
        return build_moe_plan(config, metadata), metadata
    vocabs = fetch_vocabularies(refs, metadata, token) if needs_vocabularies(config) else None
    return build_plan(config, metadata, vocabs), metadata


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
        ConfigError / ConfigErrors, ArchitectureError, ModelNotFoundError, UnsafeWeightsError, HubError.
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
