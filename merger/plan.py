"""Config + model metadata -> an ordered list of tensor jobs, with every check metadata allows.

Planning reads no weights: it needs each model's `config.json` and safetensors headers
(:class:`~merger.metadata.ModelMetadata`). Every problem found is collected and raised together as
:class:`~merger.errors.ConfigErrors`, so the form and `merger validate` show them all at once.
"""

from __future__ import annotations

import copy
import difflib
from dataclasses import dataclass, field
from typing import Any

from .architecture import Architecture, WeightInfo, architecture_for
from .config import InputSliceSource, MergeConfig, ModelReference, OutputSlice
from .errors import (
    ArchitectureSettingError,
    BaseModelError,
    ConfigErrors,
    LayerRangeError,
    MergerError,
    MissingParameterError,
    ModelCountError,
    ParameterValueError,
    ShapeMismatchError,
    UnmergedTensorsError,
    VocabSizeError,
    WeightSumError,
    excerpt,
)
from .metadata import DTYPE_SIZES, ModelMetadata
from .methods import MergeMethod, get_method
from .parameters import resolve
from .settings import compare_settings
from .sparsify import della_bounds_problem
from .tokenizer import Vocabulary, VocabPlan, plan_vocabulary

TORCH_TO_SAFETENSORS = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
DEFAULT_SEED = 0


@dataclass(frozen=True)
class TensorSource:
    """One input of an output tensor: which model (canonical key) and which of its tensors."""

    model: str
    name: str


@dataclass(frozen=True)
class TensorJob:
    """How to produce one output tensor.

    Attributes:
        name: the output tensor's name.
        method: a registered method name, or `"gate"` for an MoE router.
        sources: the inputs the method gets as `tensors`, in config order (for a method that
            treats the base specially, the base is not among them).
        base: the base model's input, for methods that take one.
        per_model: parameter name -> one value per entry of `sources`.
        global_params: parameter name -> value.
        shape: the output's shape.
        dtype: the output's safetensors dtype code (`BF16`, `F16`, `F32`).
        align_vocab: rows follow the vocabulary: permute each input onto the output vocabulary first.
    """

    name: str
    method: str
    sources: tuple[TensorSource, ...]
    base: TensorSource | None
    per_model: dict[str, tuple] = field(hash=False)
    global_params: dict[str, Any] = field(hash=False)
    shape: tuple[int, ...]
    dtype: str
    align_vocab: bool = False

    @property
    def nbytes(self) -> int:
        """Bytes of the output tensor in its output dtype."""
        n = DTYPE_SIZES[self.dtype]
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class MergePlan:
    """Everything the engine needs to write the output, in write order.

    Attributes:
        method_name / pretty_name / reference_url: the method, for progress and the model card.
        base_model: the base's reference, if any.
        models: every referenced model, in config order (canonical keys unique).
        jobs: one per output tensor, in write order.
        output_config: the output's `config.json`.
        num_layers: decoder layers in the output.
        config_donor: key of the model whose config, generation config and architecture are used.
        tokenizer_donor: key of the model whose tokenizer files are copied.
        input_dtype: the config's `dtype`, applied to inputs on load (None: as stored).
        seed: seed of the random parts (DARE masks, random gates).
        vocab: the output vocabulary and row alignment, when the config sets a tokenizer option.
        warnings: things worth a look that do not stop the merge (e.g. input tensors no job reads).
    """

    method_name: str
    pretty_name: str
    reference_url: str
    base_model: ModelReference | None
    models: tuple[ModelReference, ...]
    jobs: tuple[TensorJob, ...]
    output_config: dict
    num_layers: int
    config_donor: str
    tokenizer_donor: str
    input_dtype: str | None
    seed: int
    vocab: VocabPlan | None = None
    warnings: tuple[str, ...] = ()


    @property
    def parameter_count(self) -> int:
        """Parameters in the output (sum of the output tensors' elements)."""
        total = 0
        for job in self.jobs:
            n = 1
            for d in job.shape:
                n *= d
            total += n
        return total


def output_dtype(config_out: str | None, config_dtype: str | None, stored: str) -> str:
    """Spec decision 2: `out_dtype`, else `dtype`, else the stored dtype of the base (first) input."""
    chosen = config_out or config_dtype
    return TORCH_TO_SAFETENSORS[chosen] if chosen else stored


class _Problems:
    """Collects config problems, each once, in the order found."""

    def __init__(self) -> None:
        self.items: dict[str, MergerError] = {}

    def add(self, error: MergerError, key: object = None) -> None:
        """Record `error` once per `key` (default: its message)."""
        self.items.setdefault(str(error) if key is None else key, error)

    def raise_if_any(self) -> None:
        if len(self.items) == 1:
            raise next(iter(self.items.values()))
        if self.items:
            raise ConfigErrors(self.items.values())


def _as_slices(config: MergeConfig, meta: dict[str, ModelMetadata], arch: Architecture) -> list[OutputSlice]:
    """The config as output slices: `models:` is one slice of whole models, the base added if missing."""
    if config.slices is not None:
        return config.slices
    entries = [(m.model, m.parameters) for m in config.models]
    if config.base_model and config.base_model.key not in {ref.key for ref, _ in entries}:
        entries.append((config.base_model, None))
    sources = [
        InputSliceSource.model_construct(
            model=ref, layer_range=(0, arch.num_layers(meta[ref.key].config)), parameters=params
        )
        for ref, params in entries
    ]
    return [OutputSlice.model_construct(sources=sources, base_model=None, parameters=None)]


def _field(config: MergeConfig, slice_index: int, source_index: int) -> str:
    if config.slices is not None:
        return f"slices[{slice_index}].sources[{source_index}]"
    return f"models[{source_index}]" if source_index < len(config.models) else "base_model"


def needs_vocabularies(config: MergeConfig) -> bool:
    """Whether planning needs the models' tokenizers (a tokenizer option or a chat template is set)."""
    return config.tokenizer_choice is not None or config.chat_template is not None


def build_plan(
    config: MergeConfig, metadata: dict[str, ModelMetadata], vocabs: dict[str, Vocabulary] | None = None
) -> MergePlan:
    """Plan a merge: check the config against the models' metadata and list the output tensors.

    Args:
        config: a parsed merge config.
        metadata: canonical model key -> that model's metadata, for every referenced model.
        vocabs: model key -> tokenizer vocabulary, required when :func:`needs_vocabularies`.

    Returns:
        The :class:`MergePlan`.

    Raises:
        ConfigErrors: every problem found (layer ranges, model counts, missing parameters,
            missing base, tensor shapes, vocab sizes, architectures), each naming the field,
            the models involved and the fix.
    """
    method = get_method(config.merge_method)
    problems = _Problems()
    refs = config.referenced_models()
    donor = (config.base_model or refs[0]).key
    arch = architecture_for(metadata[donor].config, donor, metadata[donor].tensors)
    for ref in refs:  # unsupported families fail here, by name
        architecture_for(metadata[ref.key].config, str(ref), metadata[ref.key].tensors)

    _check_widths(refs, metadata)
    slices = _as_slices(config, metadata, arch)
    _check_slices(config, slices, method, metadata, arch, problems)
    input_warnings = _check_inputs(config, refs, metadata, arch, problems)
    problems.raise_if_any()

    vocab_plan = None
    if needs_vocabularies(config):
        tokens = config.tokenizer.tokens if config.tokenizer else None
        pad = config.tokenizer.pad_to_multiple_of if config.tokenizer else None
        vocab_plan = plan_vocabulary(config.tokenizer_choice or "base", vocabs, [r.key for r in refs],
                                     config.base_model.key if config.base_model else None, tokens, pad,
                                     config.chat_template)
    planner = _TensorPlanner(config, method, metadata, problems, vocab_plan, donor)
    jobs: list[TensorJob] = []
    for weight in arch.pre_weights:
        jobs += planner.plan(slices[0], 0, weight, weight, 0.0)
    layer_origins: list[tuple[str, int]] = []
    for slice_index, output_slice in enumerate(slices):
        start = output_slice.sources[0].layer_range[0]
        length = output_slice.sources[0].layer_range[1] - start
        for offset in range(length):
            t = offset / (length - 1) if length > 1 else 1.0
            out_layer = len(layer_origins)
            for template in arch.layer_weights:
                jobs += planner.plan(output_slice, slice_index, template.for_layer(out_layer), template, t, offset)
            layer_origins.append((output_slice.sources[0].model.key, start + offset))
    for weight in arch.post_weights:  # t = 0, as mergekit 0.1.5 (docs/decisions.md)
        jobs += (planner.plan_side_module(slices, weight) if weight.side_module
                 else planner.plan(slices[-1], len(slices) - 1, weight, weight, 0.0))
    problems.raise_if_any()

    written = {job.name for job in jobs}
    output_config = output_model_config(
        metadata[donor].config, arch, layer_origins, metadata, jobs, written, config.out_dtype or config.dtype
    )
    return MergePlan(
        method_name=method.name,
        pretty_name=method.pretty_name,
        reference_url=method.reference_url,
        base_model=config.base_model,
        models=tuple(refs),
        jobs=tuple(jobs),
        output_config=output_config,
        num_layers=len(layer_origins),
        config_donor=donor,
        tokenizer_donor=vocab_plan.donor if vocab_plan else donor,
        input_dtype=config.dtype,
        seed=DEFAULT_SEED if config.seed is None else config.seed,
        vocab=vocab_plan,
        warnings=(input_warnings + planner.copy_warnings() + _unknown_parameter_warnings(config, method)
                  + (vocab_plan.warnings if vocab_plan else ())),
    )


# Buffers some checkpoints store that no model reads back (recomputed at load time).
# The leading dot keeps real parameters out: GPT-2's `c_attn.bias` is a weight, `h.0.attn.bias` a causal mask.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq", ".attn.masked_bias", ".attn.bias")


def _undescribed_tensors(meta: ModelMetadata, arch: Architecture) -> list[str]:
    """A model's tensors that `arch` (the output's layout) does not describe, in every one of its layers;
    tensors of layers a slice leaves out are described, so a frankenmerge's unused layers are not reported."""
    described = {n for w in (*arch.pre_weights, *arch.post_weights) for n in (w.name, *w.aliases)}
    for layer in range(arch.num_layers(meta.config, default=0)):
        described |= {n for w in arch.layer(layer) for n in (w.name, *w.aliases)}
    return sorted(n for n in meta.tensors if n not in described and not n.endswith(IGNORED_SUFFIXES))


def _check_inputs(
    config: MergeConfig, refs: list[ModelReference], meta: dict[str, ModelMetadata], arch: Architecture,
    problems: _Problems,
) -> tuple[str, ...]:
    """Issue 10, rule 1: every input's tensors and architecture settings reach the output, or are named.

    Refusals go to `problems`; returns the warnings (settings that disagree, tensors dropped on request).
    """
    settings = compare_settings({str(ref): meta[ref.key].config for ref in refs}, str(config.base_model or refs[0]))
    for refusal in settings.refusals:
        problems.add(ArchitectureSettingError(refusal))
    return _account_for_tensors(config, refs, meta, arch, problems) + settings.warnings


def _account_for_tensors(
    config: MergeConfig, refs: list[ModelReference], meta: dict[str, ModelMetadata], arch: Architecture,
    problems: _Problems,
) -> tuple[str, ...]:
    """Rule: every input tensor is merged into the output or named. A tensor the output's layout does not
    describe is a refusal naming it, or with `drop_unknown_tensors: true` a warning naming it.

    Returns:
        The warnings (empty unless `drop_unknown_tensors` is set and tensors are dropped).
    """
    warnings = []
    for ref in refs:
        unknown = _undescribed_tensors(meta[ref.key], arch)
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
                "without them"
            ))
    return tuple(warnings)


def _unknown_parameter_warnings(config: MergeConfig, method: MergeMethod) -> tuple[str, ...]:
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


def _check_widths(refs: list[ModelReference], meta: dict[str, ModelMetadata]) -> None:
    """Models of different widths cannot merge: say so once, before listing every tensor that differs."""
    widths = {ref: meta[ref.key].config.get("hidden_size") for ref in refs}
    if len({w for w in widths.values() if w is not None}) > 1:
        listing = ", ".join(f"`{ref}` ({meta[ref.key].config.get('model_type')}, hidden size {w})" for ref, w in widths.items())
        raise ShapeMismatchError(
            f"the models differ in width: {listing}; only models of one architecture and size can be merged "
            "tensor by tensor (a frankenmerge stacks layers of equal width too)"
        )


def _check_slices(
    config: MergeConfig,
    slices: list[OutputSlice],
    method: MergeMethod,
    meta: dict[str, ModelMetadata],
    arch: Architecture,
    problems: _Problems,
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
                    f"`{_field(config, si, ji)}.layer_range` is [{start}, {end}], past the last layer of "
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


class _TensorPlanner:
    """Turns (slice, weight) into a :class:`TensorJob`: finds each input, resolves parameters, checks shapes."""

    def __init__(self, config: MergeConfig, method: MergeMethod, meta: dict[str, ModelMetadata], problems: _Problems,
                 vocab: VocabPlan | None, donor: str):
        self.donor = donor
        self.config = config
        self.method = method
        self.meta = meta
        self.problems = problems
        self.vocab = vocab
        self.copied_modules: dict[tuple[str, str], list[str]] = {}

    def _misspelt(self, name: str) -> str:
        """` (found `weigth`: did you mean `weight`?)` when a config key is a likely misspelling of `name`."""
        close = difflib.get_close_matches(name, unknown_parameters(self.config, self.method), n=1)
        return f" (found `{excerpt(close[0])}`: did you mean `{name}`?)" if close else ""

    def _find(self, key: str, weight: WeightInfo) -> str | None:
        return weight.stored_name(self.meta[key].tensors)

    def plan(
        self,
        output_slice: OutputSlice,
        slice_index: int,
        out_weight: WeightInfo,
        template: WeightInfo,
        t: float,
        offset: int | None = None,
    ) -> list[TensorJob]:
        """The job for one output tensor (empty when an optional tensor is in no model)."""
        config, method = self.config, self.method
        base_ref = output_slice.base_model or config.base_model
        found: list[tuple[int, InputSliceSource, str]] = []
        any_own_name = False
        for index, source in enumerate(output_slice.sources):
            weight = template if offset is None else template.for_layer(source.layer_range[0] + offset)
            name = self._find(source.model.key, weight)
            if name is None and not weight.optional and not weight.side_module:
                self.problems.add(ShapeMismatchError(
                    f"`{source.model}` has no tensor `{weight.name}` (and maybe more): it is not a complete "
                    f"checkpoint of the output's architecture ({self.meta[self.donor].config.get('model_type')})"
                ), key=("missing", source.model.key))
            elif name is not None:
                found.append((index, source, name))
                any_own_name |= name in (weight.name, *weight.aliases)
        # an optional tensor that no model has under its own name (a tied lm_head) is not written
        if not found or (out_weight.optional and not any_own_name):
            return []
        if out_weight.side_module and not self._same_everywhere(output_slice, found):
            return [self._copy_from_donor(out_weight, "is not in every input with one shape")]

        base_entry = None
        if method.base != "none" and base_ref is not None:
            base_entry = next((e for e in found if e[1].model.key == base_ref.key), None)
        inputs = [e for e in found if e is not base_entry]
        shapes = {e[1].model.key: self.meta[e[1].model.key].tensors[e[2]].shape for e in found}
        align = self.vocab is not None and out_weight.is_embed
        self._check_shapes(out_weight, found, shapes, align)
        first = base_entry or found[0]
        dtype = output_dtype(config.out_dtype, config.dtype, self.meta[first[1].model.key].tensors[first[2]].dtype)
        shape = shapes[first[1].model.key]
        if align:
            shape = (self.vocab.rows, *shape[1:])

        if len(inputs) < max(method.min_others, 1):  # too few inputs left for the method: copied, as mergekit does
            only = found[0]
            return [TensorJob(out_weight.name, "passthrough", (TensorSource(only[1].model.key, only[2]),), None,
                              {"scale": (None,)}, {}, shape, dtype, align)]

        per_model: dict[str, tuple] = {}
        for spec in method.per_model_parameters:
            values = []
            for index, source, name in inputs:
                levels = (source.parameters, output_slice.parameters, config.parameters)
                value = resolve(spec.name, levels, name, t)
                if value is None and spec.required:
                    field_name = _field(config, slice_index, index)
                    self.problems.add(MissingParameterError(
                        f"`{field_name}` (`{source.model}`) has no `{spec.name}` (first needed for `{name}`); "
                        f"`{method.name}` needs one per model: add `parameters: {{{spec.name}: ...}}` to it, "
                        f"or a global one{self._misspelt(spec.name)}"
                    ), key=(field_name, spec.name))
                values.append(spec.default if value is None else value)
            per_model[spec.name] = tuple(values)
        self._check_della(per_model, slice_index, inputs, out_weight.name)
        global_params = {}
        for spec in method.global_parameters:
            value = resolve(spec.name, (output_slice.parameters, config.parameters), out_weight.name, t)
            if value is None and spec.required:
                self.problems.add(MissingParameterError(
                    f"`parameters.{spec.name}` is required by `merge_method: {method.name}` (first needed for "
                    f"`{out_weight.name}`); add e.g. `parameters: {{{spec.name}: 0.5}}`{self._misspelt(spec.name)}"
                ), key=("parameters", spec.name))
            global_params[spec.name] = spec.default if value is None else value
        normalizing = {"linear": "normalize", "multislerp": "normalize_weights"}.get(method.name)
        if normalizing and global_params.get(normalizing) and per_model.get("weight"):
            if all(w is not None for w in per_model["weight"]) and abs(sum(per_model["weight"])) < 1e-12:
                self.problems.add(WeightSumError(
                    f"the `weight`s sum to 0 (first for `{out_weight.name}`), so `{normalizing}: true` would divide "
                    f"by zero; change the weights or set `parameters: {{{normalizing}: false}}`"
                ), key="weight sum")
        return [TensorJob(
            out_weight.name,
            method.name,
            tuple(TensorSource(s.model.key, n) for _, s, n in inputs),
            TensorSource(base_entry[1].model.key, base_entry[2]) if base_entry else None,
            per_model,
            global_params,
            shape,
            dtype,
            align,
        )]

    def _same_everywhere(self, output_slice: OutputSlice, found: list) -> bool:
        """Whether every source of the slice has this tensor, all with one shape."""
        shapes = {tuple(self.meta[s.model.key].tensors[n].shape) for _, s, n in found}
        return len(found) == len(output_slice.sources) and len(shapes) == 1

    def plan_side_module(self, slices: list[OutputSlice], weight: WeightInfo) -> list[TensorJob]:
        """A tensor beside the text decoder (vision tower, projector): merged like the first slice when every
        slice has the same models (a whole-model merge), else the config donor's, whose config describes it."""
        if len({frozenset(s.model.key for s in sl.sources) for sl in slices}) == 1:
            return self.plan(slices[0], 0, weight, weight, 0.0)
        return [self._copy_from_donor(weight, "belongs to no layer range of a frankenmerge")]

    def _copy_from_donor(self, weight: WeightInfo, reason: str) -> TensorJob:
        """A side module the inputs do not share: the config donor's, as is (`reason` goes in the warning)."""
        stored = self.meta[self.donor].tensors[weight.name]
        parts = weight.name.split(".")
        module = ".".join(parts[:2] if parts[0] == "model" else parts[:1])  # `model.vision_tower`, `visual`
        self.copied_modules.setdefault((module, reason), []).append(weight.name)
        dtype = output_dtype(self.config.out_dtype, self.config.dtype, stored.dtype)
        return TensorJob(weight.name, "passthrough", (TensorSource(self.donor, weight.name),), None,
                         {"scale": (None,)}, {}, tuple(stored.shape), dtype)

    def copy_warnings(self) -> tuple[str, ...]:
        """One warning per side module copied from the donor because the inputs do not all share it."""
        return tuple(
            f"`{module}.*` ({len(names)} tensor(s)) {reason}, so the output takes "
            f"`{self.meta[self.donor].reference}`'s (the config donor's) unchanged"
            for (module, reason), names in self.copied_modules.items()
        )

    def _check_della(self, per_model: dict[str, tuple], slice_index: int, inputs: list, tensor: str) -> None:
        """DELLA's keep probabilities `density ± epsilon` must lie in (0, 1) (each is range-checked alone at load)."""
        if "epsilon" not in per_model:
            return
        for (index, source, _), density, epsilon in zip(inputs, per_model["density"], per_model["epsilon"]):
            problem = della_bounds_problem(density, epsilon)
            if problem:
                self.problems.add(ParameterValueError(
                    f"`{_field(self.config, slice_index, index)}` (`{source.model}`, first for `{tensor}`): {problem}"
                ), key=("della", index))

    def _check_shapes(self, weight: WeightInfo, found: list, shapes: dict[str, tuple[int, ...]], align: bool) -> None:
        """Inputs of one tensor must agree in shape (in columns only, when a vocabulary plan re-lays rows)."""
        compared = {key: shape[1:] if align else shape for key, shape in shapes.items()}
        if len(set(compared.values())) <= 1:
            return
        rows_only = all(len(s) == 2 for s in shapes.values()) and len({s[1:] for s in shapes.values()}) == 1
        if weight.is_embed and rows_only and not align:
            # one message for embed_tokens and lm_head alike, so it is reported once
            rows = ", ".join(f"`{s.model}` {shapes[s.model.key][0]}" for _, s, _ in found)
            self.problems.add(VocabSizeError(
                f"the models' vocabularies differ (embedding rows: {rows}); they use different tokenizers. "
                "Set `tokenizer_source: base` (the base's vocabulary), `union` (every model's tokens) or a model "
                "to say which vocabulary the output gets"
            ))
            return
        # one message per pair of differing models, naming the first tensor: families or sizes differ
        first = found[0][1]
        for _, source, _ in found[1:]:
            if compared[source.model.key] != compared[first.model.key]:
                a, b = self.meta[first.model.key].config, self.meta[source.model.key].config
                self.problems.add(ShapeMismatchError(
                    f"`{first.model}` ({a.get('model_type')}, hidden size {a.get('hidden_size')}) and `{source.model}` "
                    f"({b.get('model_type')}, hidden size {b.get('hidden_size')}) differ in tensor shapes (first at "
                    f"`{weight.name}`: {list(shapes[first.model.key])} vs {list(shapes[source.model.key])}); only "
                    "models of one architecture and size can be merged tensor by tensor"
                ), key=("shape", first.model.key, source.model.key))


def output_model_config(
    donor_config: dict,
    arch: Architecture,
    layer_origins: list[tuple[str, int]],
    meta: dict[str, ModelMetadata],
    jobs: list[TensorJob],
    written: set[str],
    dtype: str | None,
) -> dict:
    """The output's `config.json`: the donor's, made to agree with the written tensors.

    Sets the layer count, per-layer lists (`layer_types`) taken from each output layer's origin,
    `vocab_size` from the written embedding rows, `tie_word_embeddings` from whether a separate
    output head was written, and `dtype`/`torch_dtype`. For a multimodal config these are set in
    its `text_config` (the section holding the layer count); the rest of the config is kept whole.
    """
    out = copy.deepcopy(donor_config)
    old_layers = arch.num_layers(donor_config)
    *path, count_key = arch.num_layers_config_key.split(".")
    text = _section(out, path)
    text[count_key] = len(layer_origins)
    if isinstance(text.get("layer_types"), list):
        donor_types = text["layer_types"]
        text["layer_types"] = [
            _section(meta[key].config, path).get("layer_types", donor_types)[layer] for key, layer in layer_origins
        ]
    if text.get("max_window_layers") == old_layers:
        text["max_window_layers"] = len(layer_origins)
    for weight in arch.pre_weights:
        job = next((j for j in jobs if j.name == weight.name), None)
        if weight.is_embed and job is not None:
            text["vocab_size"] = job.shape[0]
            if "vocab_size" in out:  # older multimodal configs state it at the top level too
                out["vocab_size"] = job.shape[0]
    tied_heads = [w for w in arch.post_weights if w.tied_names]
    if tied_heads:
        out["tie_word_embeddings"] = not any(w.name in written for w in tied_heads)
        if text is not out and "tie_word_embeddings" in text:
            text["tie_word_embeddings"] = out["tie_word_embeddings"]
    set_config_dtype(out, dtype)
    return out


def _section(config: dict, path: list[str]) -> dict:
    """The nested object at `path` (a multimodal config's `text_config`); the config itself when absent."""
    section = config
    for part in path:
        section = section.get(part) if isinstance(section.get(part), dict) else section
    return section


def set_config_dtype(config: dict, dtype: str | None) -> None:
    """Record the written dtype in a `config.json` dict (`dtype`, and the older `torch_dtype` if present)."""
    if dtype:
        config["dtype"] = dtype
        if "torch_dtype" in config:
            config["torch_dtype"] = dtype
