"""Mixture-of-experts assembly (mergekit-moe's schema): dense models' MLPs become a Mixtral's experts.

Attention, norms, embeddings and the output head come from `base_model`; expert `j` of layer `i` is
expert `j`'s dense MLP (gate -> w1, down -> w2, up -> w3), in the Hub's per-expert layout
(`model.layers.{i}.block_sparse_moe.experts.{j}.w1.weight`, router `...block_sparse_moe.gate.weight`).
Gates are random (`gate_mode: random` / `uniform_random`: routing means nothing until fine-tuned) or
computed from each expert's prompts run through the base (`hidden*`, `cheap_embed`: execute/prompt_gates.py).
Reference: Jiang et al. 2024, "Mixtral of Experts", arXiv:2401.04088; Goddard 2024, mergekit-moe.
"""

from __future__ import annotations

from merger.plan.architecture import Architecture, architecture_by_type
from merger.plan.lookup import architecture_for
from merger.config.schema import PROMPT_GATE_MODES, ModelReference, MoEConfig
from merger.errors import (
    ArchitectureError,
    ArchitectureSettingError,
    ConfigError,
    LayerRangeError,
    ShapeMismatchError,
    UnmergedTensorsError,
    VocabSizeError,
    raise_problems,
)
from merger.io.metadata import ModelMetadata
from merger.plan.checks import IGNORED_SUFFIXES
from merger.plan.merge import DEFAULT_SEED, MergePlan, TensorJob, TensorSource, output_dtype, set_config_dtype
from merger.plan.settings import compare_settings
from merger.plan.tokenizer import Vocabulary

MOE_PRETTY_NAME = "Mixture of Experts (mergekit-moe)"
MOE_REFERENCE_URL = "https://arxiv.org/abs/2401.04088"


def build_moe_plan(config: MoEConfig, metadata: dict[str, ModelMetadata]) -> MergePlan:
    """Plan a Mixtral model from dense Llama/Mistral experts.

    Args:
        config: a parsed mergekit-moe config.
        metadata: canonical model key -> metadata, for the base and every expert.

    Returns:
        The :class:`~merger.plan.merge.MergePlan`; its output config is a Mixtral config with
        `num_local_experts` = number of experts and `num_experts_per_tok` = `experts_per_token`.

    Raises:
        ArchitectureError: the base or an expert is not a Llama/Mistral decoder.
        ConfigError: `tokenizer_source` is `union` or names a model outside the MoE.
        ConfigProblems: an expert differs from the base in layer count or MLP shapes.
    """
    out_arch = architecture_by_type("mixtral")
    base_key = config.base_model.key
    tokenizer_donor = moe_tokenizer_donor(config)
    base_meta = metadata[base_key]
    dense = architecture_for(base_meta.config, str(config.base_model))
    if dense.model_type not in out_arch.moe_from:
        raise ArchitectureError(
            f"`base_model` `{config.base_model}` is a `{dense.model_type}` model; a Mixtral MoE is built from "
            f"{' or '.join(out_arch.moe_from)} models. Pick a base of one of those families"
        )
    layers = dense.num_layers(base_meta.config)
    _check_experts(config, metadata, dense, layers)
    warnings = _check_settings(config, metadata)
    jobs = _moe_jobs(config, metadata, layers)
    _check_base_tensors_reach_the_output(config, base_meta, jobs, layers)

    output_config = dict(base_meta.config)
    output_config.update(
        architectures=list(out_arch.architectures),
        model_type=out_arch.model_type,
        num_local_experts=len(config.experts),
        num_experts_per_tok=config.experts_per_token,
        tie_word_embeddings="lm_head.weight" not in {j.name for j in jobs},
        vocab_size=next(j.shape[0] for j in jobs if j.name == "model.embed_tokens.weight"),  # rows written
    )
    set_config_dtype(output_config, config.out_dtype or config.dtype)
    refs = config.referenced_models()
    return MergePlan(
        method_name="moe",
        pretty_name=MOE_PRETTY_NAME,
        reference_url=MOE_REFERENCE_URL,
        base_model=config.base_model,
        models=tuple(refs),
        jobs=tuple(jobs),
        output_config=output_config,
        num_layers=layers,
        config_donor=base_key,
        tokenizer_donor=tokenizer_donor,
        input_dtype=config.dtype,
        seed=DEFAULT_SEED if config.seed is None else config.seed,
        warnings=warnings,
    )


def _check_settings(config: MoEConfig, metadata: dict[str, ModelMetadata]) -> tuple[str, ...]:
    """The experts' settings against the base's, whose config the output takes: disagreements are
    warnings naming the value kept, a setting the base's family lacks is refused.

    Raises:
        ConfigProblems / ArchitectureSettingError: an expert sets what the output could not compute.
    """
    configs = {str(config.base_model): metadata[config.base_model.key].config}
    configs.update({str(e.source_model): metadata[e.source_model.key].config for e in config.experts})
    settings = compare_settings(configs, str(config.base_model))
    raise_problems([ArchitectureSettingError(refusal) for refusal in settings.refusals])
    return settings.warnings


def _check_base_tensors_reach_the_output(
    config: MoEConfig, base_meta: ModelMetadata, jobs: list[TensorJob], layers: int
) -> None:
    """Every tensor of the base is copied into the output, or is one of its dense MLPs, which the experts
    replace by the method's definition (the experts' own attention and norms are likewise not used: the
    output's attention is the base's). Anything else (attention biases, say) has no place in a Mixtral.

    Raises:
        UnmergedTensorsError: naming the base's tensors the output could not hold.
    """
    read = {source.name for job in jobs for source in job.sources if source.model == config.base_model.key}
    experts_replace = {
        template.for_layer(layer, 0).expert_source
        for layer in range(layers)
        for template in architecture_by_type("mixtral").layer_weights
        if template.expert_source
    }
    unknown = sorted(n for n in base_meta.tensors if n not in read | experts_replace and not n.endswith(IGNORED_SUFFIXES))
    if unknown:
        shown = ", ".join(f"`{n}`" for n in unknown[:6]) + (f" and {len(unknown) - 6} more" if len(unknown) > 6 else "")
        raise UnmergedTensorsError(
            f"`base_model` `{config.base_model}` has {len(unknown)} tensor(s) a Mixtral output cannot hold, so it "
            f"would not contain them: {shown}. Pick a base whose layers a Mixtral has (no attention biases)",
            model=str(config.base_model), tensors=unknown,
        )


def _check_experts(config: MoEConfig, metadata: dict[str, ModelMetadata], dense: Architecture, layers: int) -> None:
    """Every expert is of a family the output takes, with the base's layer count; all problems at once."""
    out_arch = architecture_by_type("mixtral")
    problems: list = []
    for index, expert in enumerate(config.experts):
        meta = metadata[expert.source_model.key]
        family = architecture_for(meta.config, str(expert.source_model)).model_type
        if family not in out_arch.moe_from:
            problems.append(ArchitectureError(
                f"`experts[{index}].source_model` `{expert.source_model}` is a `{family}` model; experts must be "
                f"{' or '.join(out_arch.moe_from)} models like the base"
            ))
        elif dense.num_layers(meta.config) != layers:
            problems.append(LayerRangeError(
                f"`experts[{index}].source_model` `{expert.source_model}` has {dense.num_layers(meta.config)} layers, "
                f"the base `{config.base_model}` has {layers}; experts need the base's layer count"
            ))
        if expert.noise_scale:
            problems.append(ConfigError(f"`experts[{index}].noise_scale` is not supported yet; remove it"))
    raise_problems(problems)


def _moe_jobs(config: MoEConfig, metadata: dict[str, ModelMetadata], layers: int) -> list[TensorJob]:
    """The output's jobs in order: the base's tensors copied, gates (random or from prompts), experts' MLPs.

    Raises:
        ConfigProblems / ShapeMismatchError: an expert's MLP differs in shape from the base's.
    """
    out_arch = architecture_by_type("mixtral")
    base_key = config.base_model.key
    base_meta = metadata[base_key]
    experts = len(config.experts)
    hidden = int(base_meta.config["hidden_size"])

    def copy(name: str) -> TensorJob:
        return _copy_job(config, base_meta, base_key, name)

    gate_params = {"gate_mode": config.gate_mode}
    if config.gate_mode in PROMPT_GATE_MODES:  # the executor runs them through the base (plan.base_model)
        gate_params["prompts"] = tuple((tuple(e.positive_prompts or ()), tuple(e.negative_prompts or ()))
                                       for e in config.experts)
    jobs: list[TensorJob] = []
    for weight in out_arch.pre_weights:
        jobs.append(copy(weight.name))
    shape_problems: list = []
    for layer in range(layers):
        for template in out_arch.layer_weights:
            if template.router:
                name = template.for_layer(layer).name
                dtype = output_dtype(config.out_dtype, config.dtype, jobs[0].dtype)
                jobs.append(TensorJob(name, "gate", (), None, {}, {**gate_params, "layer": layer},
                                      (experts, hidden), dtype))
            elif template.expert_source:
                for j, expert in enumerate(config.experts):
                    weight = template.for_layer(layer, j)
                    key = expert.source_model.key
                    meta, base_info = metadata[key], base_meta.tensors[weight.expert_source]
                    info = meta.tensors.get(weight.expert_source)
                    if info is None or info.shape != base_info.shape:
                        shape_problems.append(ShapeMismatchError(
                            f"`experts[{j}].source_model` `{expert.source_model}`: `{weight.expert_source}` is "
                            f"{list(info.shape) if info else 'missing'}, the base's is {list(base_info.shape)}; "
                            "experts must be the base's size"
                        ))
                        continue
                    scale = expert.residual_scale if weight.residual else None
                    jobs.append(TensorJob(weight.name, "passthrough", (TensorSource(key, weight.expert_source),), None,
                                          {"scale": (scale,)}, {}, info.shape,
                                          output_dtype(config.out_dtype, config.dtype, info.dtype)))
            else:
                jobs.append(copy(template.for_layer(layer).name))
    for weight in out_arch.post_weights:
        if weight.name in base_meta.tensors or not weight.optional:
            jobs.append(copy(weight.name))
    raise_problems(shape_problems)
    return jobs


def moe_tokenizer_donor(config: MoEConfig) -> str:
    """The key of the model whose tokenizer files the MoE output gets (`tokenizer_source`, default the base).

    Raises:
        ConfigError: `union` (an MoE's embedding is the base's: new tokens would have no rows), or a
            model that is neither the base nor an expert.
    """
    source = config.tokenizer_source
    base_key = config.base_model.key
    if source in (None, "base"):
        return base_key
    members = [str(config.base_model)] + [str(e.source_model) for e in config.experts]
    if source == "union":
        raise ConfigError("`tokenizer_source: union` is not supported for MoE configs (the embedding is the base's, "
                          f"so new tokens would have no rows); use `base` or one of: {', '.join(members)}")
    key = ModelReference.parse(source).key
    if key not in {base_key} | {e.source_model.key for e in config.experts}:
        raise ConfigError(f"`tokenizer_source: {source}` is not a model of this MoE; use `base` or one of: "
                          f"{', '.join(members)}")
    return key


def check_tokenizer_fits(plan: MergePlan, vocabulary: Vocabulary) -> None:
    """Refuse an MoE whose tokenizer has ids past the embedding it copies from the base.

    Args:
        plan: the MoE plan (its embedding job's rows are the base's).
        vocabulary: the tokenizer donor's vocabulary.

    Raises:
        VocabSizeError: a token id ≥ the embedding rows (it would index past the matrix at inference).
    """
    rows = next(job.shape[0] for job in plan.jobs if job.name == "model.embed_tokens.weight")
    past = sorted((i, token) for token, i in vocabulary.ids.items() if i >= rows)
    if past:
        shown = ", ".join(f"`{token}` ({i})" for i, token in past[:5]) + (" ..." if len(past) > 5 else "")
        raise VocabSizeError(
            f"the tokenizer of `{plan.tokenizer_donor}` (`tokenizer_source`) has {len(past)} token id(s) at or past "
            f"the embedding's {rows} rows (from `base_model`): {shown}; they would index past the matrix at "
            "inference. Use a `tokenizer_source` whose tokenizer fits the base's embedding, or a base model "
            "whose embedding has rows for those tokens"
        )


def _copy_job(config: MoEConfig, base_meta: ModelMetadata, base_key: str, name: str) -> TensorJob:
    if name not in base_meta.tensors:
        raise ShapeMismatchError(f"`base_model` `{config.base_model}` has no tensor `{name}`; it is not a complete checkpoint")
    info = base_meta.tensors[name]
    return TensorJob(name, "passthrough", (TensorSource(base_key, name),), None, {"scale": (None,)}, {},
                     info.shape, output_dtype(config.out_dtype, config.dtype, info.dtype))
