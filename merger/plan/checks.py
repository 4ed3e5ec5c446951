"""The checks of a mergekit config against the models' metadata, each problem collected, all raised together.

Widths, layer counts and ranges, model counts, every input tensor accounted for, the architecture
settings compared; :class:`Problems` collects them so that the form and `merger validate` show them
all at once (:func:`merger.errors.raise_problems`).
"""

from __future__ import annotations

from merger.config.schema import MergeConfig, ModelReference, OutputSlice
from merger.errors import (
    ArchitectureSettingError,
    BaseModelError,
    LayerRangeError,
    MergerError,
    ModelCountError,
    ShapeMismatchError,
    UnmergedTensorsError,
    excerpt,
    raise_problems,
)
from merger.io.metadata import ModelMetadata
from merger.methods.registry import MergeMethod
from merger.plan.architecture import Architecture
from merger.plan.settings import compare_settings


class Problems:
    """Collects config problems, each once, in the order found."""

    def __init__(self) -> None:
        self.items: dict[str, MergerError] = {}

    def add(self, error: MergerError, key: object = None) -> None:
        """Record `error` once per `key` (default: its message)."""
        self.items.setdefault(str(error) if key is None else key, error)

    def raise_if_any(self) -> None:
        raise_problems(self.items.values())


def field_path(config: MergeConfig, slice_index: int, source_index: int) -> str:
    """Where a source stands in the config, for messages: `slices[i].sources[j]`, `models[j]` or `base_model`
    (the base added to `models:` when not listed sits past the listed models)."""
    if config.slices is not None:
        return f"slices[{slice_index}].sources[{source_index}]"
    return f"models[{source_index}]" if source_index < len(config.models) else "base_model"


IGNORED_SUFFIXES = (".rotary_emb.inv_freq", ".attn.masked_bias", ".attn.bias")


def undescribed_tensors(meta: ModelMetadata, arch: Architecture) -> list[str]:
    """A model's tensors that `arch` (the output's layout) does not describe, in every one of its layers;
    tensors of layers a slice leaves out are described, so a frankenmerge's unused layers are not reported."""
    described = {n for w in (*arch.pre_weights, *arch.post_weights) for n in (w.name, *w.aliases)}
    templates = arch.checkpoint_layer_templates(meta.config)
    for layer in range(arch.num_layers(meta.config, default=0)):
        described |= {n for t in templates for w in (t.for_layer(layer),) for n in (w.name, *w.aliases)}
    return sorted(n for n in meta.tensors if n not in described and not n.endswith(IGNORED_SUFFIXES))


def check_inputs(
    config: MergeConfig, refs: list[ModelReference], meta: dict[str, ModelMetadata], arch: Architecture,
    problems: Problems,
) -> tuple[str, ...]:
    """Every input's tensors and architecture settings reach the output, or are named.

    Refusals go to `problems`; returns the warnings (settings that disagree, tensors dropped on request).
    """
    settings = compare_settings({str(ref): meta[ref.key].config for ref in refs}, str(config.base_model or refs[0]))
    for refusal in settings.refusals:
        problems.add(ArchitectureSettingError(refusal))
    return _account_for_tensors(config, refs, meta, arch, problems) + settings.warnings


def _account_for_tensors(
    config: MergeConfig, refs: list[ModelReference], meta: dict[str, ModelMetadata], arch: Architecture,
    problems: Problems,
) -> tuple[str, ...]:
    """Rule: every input tensor is merged into the output or named. A tensor the output's layout does not
    describe is a refusal naming it, or with `drop_unknown_tensors: true` a warning naming it.

    Returns:
        The warnings (empty unless `drop_unknown_tensors` is set and tensors are dropped).
    """
    warnings = []
    for ref in refs:
        unknown = undescribed_tensors(meta[ref.key], arch)
        if not unknown:
            continue
        shown = ", ".join(f"`{n}`" for n in unknown[:6]) + (f" and {len(unknown) - 6} more" if len(unknown) > 6 else "")
        what = (f"`{ref}` has {len(unknown)} tensor(s) the output's `{arch.model_type}` layout (from "
                f"`{config.base_model or refs[0]}`) does not describe, so the output would not contain them: {shown}")
        if config.drop_unknown_tensors:
            warnings.append(f"{what}; dropped, as `drop_unknown_tensors: true` asks")
        else:
            problems.add(UnmergedTensorsError(
                f"{what}. Merge models of the base's architecture, or set `drop_unknown_tensors: true` to merge "
                "without them", model=str(ref), tensors=unknown,
            ))
    return tuple(warnings)


def unknown_parameter_warnings(config: MergeConfig, method: MergeMethod) -> tuple[str, ...]:
    """One warning per ignored parameter key, at most 10 (the keys are user input)."""
    unknown = unknown_parameters(config, method)
    takes = ", ".join(p.name for p in method.parameters) or "none"
    warnings = [f"`{excerpt(key)}` is not a parameter of `{method.name}` and is ignored (it takes: {takes})"
                for key in unknown[:10]]
    if len(unknown) > 10:
        warnings.append(f"... and {len(unknown) - 10} more keys `{method.name}` does not take are ignored")
    return tuple(warnings)


def unknown_parameters(config: MergeConfig, method: MergeMethod) -> list[str]:
    """Parameter keys anywhere in the config that `method` does not take (mergekit ignores them silently)."""
    levels = [config.parameters] + [sl.parameters for sl in config.slices or []]
    levels += [m.parameters for m in config.models or []]
    levels += [src.parameters for sl in config.slices or [] for src in sl.sources]
    known = {p.name for p in method.parameters}
    return sorted({key for level in levels if level for key in level if key not in known})


def check_widths(refs: list[ModelReference], meta: dict[str, ModelMetadata]) -> None:
    """Models of different widths cannot merge: say so once, before listing every tensor that differs."""
    widths = {ref: meta[ref.key].config.get("hidden_size") for ref in refs}
    if len({w for w in widths.values() if w is not None}) > 1:
        listing = ", ".join(f"`{ref}` ({meta[ref.key].config.get('model_type')}, hidden size {w})" for ref, w in widths.items())
        raise ShapeMismatchError(
            f"the models differ in width: {listing}; only models of one architecture and size can be merged "
            "tensor by tensor (a frankenmerge stacks layers of equal width too)"
        )


def check_slices(
    config: MergeConfig,
    slices: list[OutputSlice],
    method: MergeMethod,
    meta: dict[str, ModelMetadata],
    arch: Architecture,
    problems: Problems,
) -> None:
    """Layer ranges within each model, model counts per method, base presence, equal layer counts."""
    if config.models is not None:
        counts = {str(s.model): s.layer_range[1] for s in slices[0].sources}
        if len(set(counts.values())) > 1:
            listing = ", ".join(f"`{m}`: {n}" for m, n in counts.items())
            problems.add(LayerRangeError(
                f"`models` have different layer counts ({listing}); a whole-model merge needs equal counts. "
                "Use `slices:` with equally long `layer_range`s instead"
            ))
    for si, output_slice in enumerate(slices):
        base = output_slice.base_model or config.base_model
        keys = [s.model.key for s in output_slice.sources]
        for ji, source in enumerate(output_slice.sources):
            layers = arch.num_layers(meta[source.model.key].config)
            start, end = source.layer_range
            if end > layers:
                problems.add(LayerRangeError(
                    f"`{field_path(config, si, ji)}.layer_range` is [{start}, {end}], past the last layer of "
                    f"`{source.model}`, which has {layers} layers; the end is exclusive, so use an end of at most {layers}"
                ))
        if method.base == "required" and base is None:
            problems.add(BaseModelError(
                f"`base_model` is required by `merge_method: {method.name}`; set it to one of the models "
                f"({', '.join(f'`{s.model}`' for s in output_slice.sources)})"
            ))
        if method.base == "required" and base is not None and base.key not in keys and config.slices is not None:
            problems.add(BaseModelError(
                f"`slices[{si}]` has no source for the base model `{base}`; add it with the same `layer_range` "
                "as the other sources, or change `base_model`"
            ))
        if method.base == "required" and base is None:
            continue  # counted once the base is named: without it, "others" is meaningless
        others = len(keys) - (1 if method.base != "none" and base is not None and base.key in keys else 0)
        if others < method.min_others or (method.max_others is not None and others > method.max_others):
            problems.add(ModelCountError(_count_message(method, len(keys), config.slices is not None, si)))


def _count_message(method: MergeMethod, total: int, slices: bool, index: int) -> str:
    where = f"`slices[{index}].sources`" if slices else "`models`"
    if method.base == "none":
        wanted = (
            f"exactly {method.min_others}" if method.min_others == method.max_others
            else f"at least {method.min_others}"
        )
        return f"{where}: `{method.name}` takes {wanted} model(s) per slice, got {total}"
    if method.min_others == method.max_others:
        wanted = f"exactly {method.min_others + 1} models, one of them the `base_model`"
    else:
        wanted = f"the `base_model` plus at least {method.min_others} other model(s)"
    return f"{where}: `{method.name}` takes {wanted}; got {total}. Adjust the model list or pick another method"
