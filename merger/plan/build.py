"""The plan of a mergekit config: its output slices, every output tensor's job, the output config.

:func:`build_plan` runs the checks (:mod:`merger.plan.checks`), plans each tensor
(:mod:`merger.plan.tensors`) and collects every problem before raising them together.
"""

from __future__ import annotations

import copy

from merger.config.schema import InputSliceSource, MergeConfig, OutputSlice
from merger.io.metadata import ModelMetadata
from merger.methods.registry import get_method
from merger.plan.architecture import Architecture
from merger.plan.lookup import architecture_for
from merger.plan.checks import Problems, check_inputs, check_slices, check_widths, unknown_parameter_warnings
from merger.plan.merge import DEFAULT_SEED, MergePlan, TensorJob, set_config_dtype
from merger.plan.tensors import TensorPlanner
from merger.plan.tokenizer import Vocabulary, plan_vocabulary


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
        ConfigProblems: every problem found (layer ranges, model counts, missing parameters,
            missing base, tensor shapes, vocab sizes, architectures), each naming the field,
            the models involved and the fix.
    """
    method = get_method(config.merge_method)
    problems = Problems()
    refs = config.referenced_models()
    donor = (config.base_model or refs[0]).key
    arch = architecture_for(metadata[donor].config, donor, metadata[donor].tensors)
    for ref in refs:  # unsupported families fail here, by name
        architecture_for(metadata[ref.key].config, str(ref), metadata[ref.key].tensors)

    check_widths(refs, metadata)
    slices = _as_slices(config, metadata, arch)
    check_slices(config, slices, method, metadata, arch, problems)
    input_warnings = check_inputs(config, refs, metadata, arch, problems)
    problems.raise_if_any()

    vocab_plan = None
    if needs_vocabularies(config):
        tokens = config.tokenizer.tokens if config.tokenizer else None
        pad = config.tokenizer.pad_to_multiple_of if config.tokenizer else None
        vocab_plan = plan_vocabulary(config.tokenizer_choice or "base", vocabs, [r.key for r in refs],
                                     config.base_model.key if config.base_model else None, tokens, pad,
                                     config.chat_template)
    planner = TensorPlanner(config, method, metadata, problems, vocab_plan, donor)
    jobs: list[TensorJob] = []
    for weight in arch.pre_weights:
        jobs += planner.plan(slices[0], 0, weight, weight, 0.0)
    layer_origins: list[tuple[str, int]] = []
    layer_templates = arch.checkpoint_layer_templates(metadata[donor].config)
    for slice_index, output_slice in enumerate(slices):
        start = output_slice.sources[0].layer_range[0]
        length = output_slice.sources[0].layer_range[1] - start
        for offset in range(length):
            t = offset / (length - 1) if length > 1 else 1.0
            out_layer = len(layer_origins)
            for template in layer_templates:
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
        warnings=(input_warnings + planner.copy_warnings() + unknown_parameter_warnings(config, method)
                  + (vocab_plan.warnings if vocab_plan else ())),
    )


# Buffers some checkpoints store that no model reads back (recomputed at load time).
# The leading dot keeps real parameters out: GPT-2's `c_attn.bias` is a weight, `h.0.attn.bias` a causal mask.


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
