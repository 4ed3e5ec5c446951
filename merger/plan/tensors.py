"""Plan each output tensor: find its inputs in every model, resolve its parameters, check its shapes."""

from __future__ import annotations

import difflib
from typing import Any

from merger.config.parameters import resolve
from merger.config.schema import InputSliceSource, MergeConfig, OutputSlice
from merger.errors import (
    MissingParameterError,
    ParameterValueError,
    ShapeMismatchError,
    VocabSizeError,
    WeightSumError,
    excerpt,
)
from merger.io.metadata import ModelMetadata
from merger.methods.registry import MergeMethod
from merger.methods.sparsify import della_bounds_problem
from merger.plan.architecture import WeightInfo
from merger.plan.checks import Problems, field_path, unknown_parameters
from merger.plan.merge import TensorJob, TensorSource, output_dtype
from merger.plan.tokenizer import VocabPlan


class TensorPlanner:
    """Turns (slice, weight) into a :class:`TensorJob`: finds each input, resolves parameters, checks shapes."""

    def __init__(self, config: MergeConfig, method: MergeMethod, meta: dict[str, ModelMetadata], problems: Problems,
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
        found, any_own_name = self._found_inputs(output_slice, template, offset)
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

        per_model = self._per_model_parameters(output_slice, slice_index, inputs, t)
        self._check_della(per_model, slice_index, inputs, out_weight.name)
        global_params = self._global_parameters(output_slice, out_weight, t)
        self._check_weight_sum(per_model, global_params, out_weight)
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

    def _found_inputs(
        self, output_slice: OutputSlice, template: WeightInfo, offset: int | None
    ) -> tuple[list[tuple[int, InputSliceSource, str]], bool]:
        """The sources that have the tensor, as (source index, source, stored name), and whether any
        has it under its own name (not only as a tied alias); a missing required tensor is a problem."""
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
        return found, any_own_name

    def _per_model_parameters(
        self, output_slice: OutputSlice, slice_index: int, inputs: list, t: float
    ) -> dict[str, tuple]:
        """Each per-model parameter's value for every input (source, slice, global precedence)."""
        config, method = self.config, self.method
        per_model: dict[str, tuple] = {}
        for spec in method.per_model_parameters:
            values = []
            for index, source, name in inputs:
                levels = (source.parameters, output_slice.parameters, config.parameters)
                value = resolve(spec.name, levels, name, t)
                if value is None and spec.required:
                    field_name = field_path(config, slice_index, index)
                    self.problems.add(MissingParameterError(
                        f"`{field_name}` (`{source.model}`) has no `{spec.name}` (first needed for `{name}`); "
                        f"`{method.name}` needs one per model: add `parameters: {{{spec.name}: ...}}` to it, "
                        f"or a global one{self._misspelt(spec.name)}"
                    ), key=(field_name, spec.name))
                values.append(spec.default if value is None else value)
            per_model[spec.name] = tuple(values)
        return per_model

    def _global_parameters(self, output_slice: OutputSlice, out_weight: WeightInfo, t: float) -> dict[str, Any]:
        """Each global parameter's value for this tensor (slice, then global)."""
        config, method = self.config, self.method
        global_params = {}
        for spec in method.global_parameters:
            value = resolve(spec.name, (output_slice.parameters, config.parameters), out_weight.name, t)
            if value is None and spec.required:
                self.problems.add(MissingParameterError(
                    f"`parameters.{spec.name}` is required by `merge_method: {method.name}` (first needed for "
                    f"`{out_weight.name}`); add e.g. `parameters: {{{spec.name}: 0.5}}`{self._misspelt(spec.name)}"
                ), key=("parameters", spec.name))
            global_params[spec.name] = spec.default if value is None else value
        return global_params

    def _check_weight_sum(
        self, per_model: dict[str, tuple], global_params: dict[str, Any], out_weight: WeightInfo
    ) -> None:
        """Weights summing to 0 would make a normalizing method divide by zero."""
        method = self.method
        normalizing = {"linear": "normalize", "multislerp": "normalize_weights"}.get(method.name)
        if normalizing and global_params.get(normalizing) and per_model.get("weight"):
            if all(w is not None for w in per_model["weight"]) and abs(sum(per_model["weight"])) < 1e-12:
                self.problems.add(WeightSumError(
                    f"the `weight`s sum to 0 (first for `{out_weight.name}`), so `{normalizing}: true` would divide "
                    f"by zero; change the weights or set `parameters: {{{normalizing}: false}}`"
                ), key="weight sum")

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
                    f"`{field_path(self.config, slice_index, index)}` (`{source.model}`, first for `{tensor}`): {problem}"
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
