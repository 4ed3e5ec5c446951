"""Mixture-of-experts assembly (mergekit-moe's schema): dense models' MLPs become an MoE's experts.

Attention, norms, embeddings and the output head come from `base_model`; expert `j` of layer `i` is
expert `j`'s dense MLP, in the Hub's per-expert layout of the output family (Mixtral:
`block_sparse_moe.experts.{j}.w1/w2/w3`, Qwen2-MoE and Qwen3-MoE: `mlp.experts.{j}.gate_proj/up_proj/
down_proj`), with a router per layer. A Qwen2-MoE also has a shared expert (`shared_experts[0]`'s
MLP, run for every token) and its sigmoid gate. The output is chosen by :func:`select_output`
(`architecture:`, else the experts' family). Gates are random (`gate_mode: random` / `uniform_random`:
routing means nothing until fine-tuned) or computed from each expert's prompts run through the base
(`hidden*`, `cheap_embed`: execute/prompt_gates.py; a shared expert's gate from its own prompts). Every tensor of the inputs and every setting either reaches
the output or is refused by name (docs/decisions.md, "MoE outputs: Qwen2-MoE, Qwen3-MoE, and no
DeepSeek").
Reference: Jiang et al. 2024, "Mixtral of Experts", arXiv:2401.04088; Goddard 2024, mergekit-moe.
"""

from __future__ import annotations

from merger.plan.architecture import Architecture, WeightInfo, architecture_by_type
from merger.plan.lookup import architecture_for
from merger.config.schema import PROMPT_GATE_MODES, ModelReference, MoEConfig, MoEExpert, moe_architecture_choices
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
from merger.plan.settings import ClassSettings, compare_settings
from merger.plan.tokenizer import Vocabulary

MOE_PRETTY_NAME = "Mixture of Experts (mergekit-moe)"
MOE_REFERENCE_URL = "https://arxiv.org/abs/2401.04088"
# Output model_type -> its name in messages; in mergekit-moe's order of preference (Mixtral first
# where it fits, "for compatibility with older configs").
OUTPUT_NAMES = {"mixtral": "Mixtral", "qwen2_moe": "Qwen2-MoE", "qwen3_moe": "Qwen3-MoE"}
# Output model_type -> how many `shared_experts` it takes (mergekit-moe: Qwen MoE exactly one).
SHARED_EXPERTS = {"mixtral": 0, "qwen2_moe": 1, "qwen3_moe": 0}
DEEPSEEK_REFUSAL = (
    "a DeepSeek-MoE output is not built: transformers' own DeepSeek classes (`deepseek_v2`, `deepseek_v3`) use "
    "multi-head latent attention (keys and values from a normalised low-rank projection, one rotary key shared "
    "by all heads), which a Llama, Mistral or Qwen attention cannot be written as, and mergekit-moe's DeepSeek "
    "output is the older `deepseek` type that runs remote code transformers does not ship. Use `architecture: "
    "qwen` (Qwen2-MoE, which has a shared expert) or `mixtral`"
)


def select_output(config: MoEConfig, family: str) -> Architecture:
    """The output architecture: the first of Mixtral, Qwen2-MoE, Qwen3-MoE that `architecture:` allows,
    that is built from `family` and that takes the config's number of shared experts.

    Args:
        config: the MoE config (`architecture`, `shared_experts`).
        family: the base model's `model_type` (experts are checked against the output later).

    Returns:
        The output's :class:`Architecture` (`moe_from` lists the dense families it takes).

    Raises:
        ArchitectureError: no output fits; the message says, per allowed output, why not.
    """
    allowed = moe_architecture_choices(config.architecture)
    if allowed == ("deepseek",):
        raise ArchitectureError(f"`architecture: {config.architecture}`: {DEEPSEEK_REFUSAL}")
    shared = len(config.shared_experts or [])
    reasons = []
    for model_type, name in OUTPUT_NAMES.items():
        if model_type not in allowed:
            continue
        arch = architecture_by_type(model_type)
        if family not in arch.moe_from:
            reasons.append(f"a {name} is built from {' or '.join(arch.moe_from)} models")
        elif shared != SHARED_EXPERTS[model_type]:
            takes = "1 `shared_experts` entry" if SHARED_EXPERTS[model_type] else "no `shared_experts` entries"
            reasons.append(f"a {name} takes {takes} (as in mergekit-moe), got {shared}")
        else:
            return arch
    raise ArchitectureError(
        f"no MoE output fits `base_model` `{config.base_model}` (a `{family}` model) with {shared} shared "
        f"expert(s) and `architecture: {config.architecture or 'auto'}`: {'; '.join(reasons)}. Pick experts of one "
        "of those families, add or remove `shared_experts`, or set `architecture:` to an output that fits"
    )


def build_moe_plan(config: MoEConfig, metadata: dict[str, ModelMetadata]) -> MergePlan:
    """Plan an MoE model (Mixtral, Qwen2-MoE or Qwen3-MoE) from dense experts.

    Args:
        config: a parsed mergekit-moe config.
        metadata: canonical model key -> metadata, for the base, every expert and shared expert.

    Returns:
        The :class:`~merger.plan.merge.MergePlan`; its output config is the base's with the output
        family's MoE keys (expert count, `experts_per_token`, expert sizes) set, and its
        `class_settings` still to run (:func:`merger.plan.entry.settled`): the base's class defaults
        stated, a setting the output would compute otherwise refused.

    Raises:
        ArchitectureError: no output takes these models (see :func:`select_output`).
        ConfigError: `tokenizer_source` is `union` or names a model outside the MoE.
        ConfigProblems: an expert differs from the base in layer count, family or MLP shapes.
        UnmergedTensorsError / ArchitectureSettingError: an input tensor or an expert's setting the output
            cannot hold.
    """
    base_key = config.base_model.key
    tokenizer_donor = moe_tokenizer_donor(config)
    base_meta = metadata[base_key]
    dense = architecture_for(base_meta.config, str(config.base_model))
    out_arch = select_output(config, dense.model_type)
    layers = dense.num_layers(base_meta.config)
    _check_experts(config, metadata, out_arch, dense, layers)
    warnings = _check_settings(config, metadata)
    jobs = _moe_jobs(config, metadata, out_arch, layers)
    _check_inputs_reach_the_output(config, metadata, out_arch, jobs, layers)
    output_config = _output_config(config, base_meta.config, out_arch, jobs)
    return MergePlan(
        method_name="moe",
        pretty_name=MOE_PRETTY_NAME,
        reference_url=MOE_REFERENCE_URL,
        base_model=config.base_model,
        models=tuple(config.referenced_models()),
        jobs=tuple(jobs),
        output_config=output_config,
        num_layers=layers,
        config_donor=base_key,
        tokenizer_donor=tokenizer_donor,
        input_dtype=config.dtype,
        seed=DEFAULT_SEED if config.seed is None else config.seed,
        warnings=warnings,
        class_settings=ClassSettings(base_meta.config, OUTPUT_NAMES[out_arch.model_type],
                                     state_layer_types=out_arch.model_type == "qwen2_moe"),
    )


def _output_config(config: MoEConfig, base_config: dict, out_arch: Architecture, jobs: list[TensorJob]) -> dict:
    """The base's config.json with the output family's class and MoE keys (every expert is the base's size)."""
    names = {j.name: j for j in jobs}
    output_config = dict(base_config)
    output_config.update(architectures=list(out_arch.architectures), model_type=out_arch.model_type)
    if out_arch.model_type == "mixtral":
        output_config.update(num_local_experts=len(config.experts), num_experts_per_tok=config.experts_per_token)
    else:  # Qwen-MoE: every layer sparse, top-k weights renormalised to sum to 1 as in Mixtral (and mergekit-moe)
        intermediate = names["model.layers.0.mlp.experts.0.gate_proj.weight"].shape[0]
        output_config.update(num_experts=len(config.experts), num_experts_per_tok=config.experts_per_token,
                             decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True,
                             moe_intermediate_size=intermediate)
        hidden, heads = base_config.get("hidden_size"), base_config.get("num_attention_heads")
        if not output_config.get("head_dim") and isinstance(hidden, int) and isinstance(heads, int) and heads > 0:
            output_config["head_dim"] = hidden // heads  # stated: transformers 5 reads it, 4 computes the same
        if out_arch.model_type == "qwen2_moe":  # its layer types are stated by the plan's ClassSettings
            output_config.update(shared_expert_intermediate_size=intermediate, qkv_bias=True)
    output_config.update(
        tie_word_embeddings="lm_head.weight" not in names,
        vocab_size=names["model.embed_tokens.weight"].shape[0],  # rows written
    )
    set_config_dtype(output_config, config.out_dtype or config.dtype)
    return output_config


def _check_settings(config: MoEConfig, metadata: dict[str, ModelMetadata]) -> tuple[str, ...]:
    """The experts' (and shared experts') settings against the base's, whose config the output takes:
    disagreements are warnings naming the value kept, a setting the base's family lacks is refused.

    Raises:
        ConfigProblems / ArchitectureSettingError: an expert sets what the output could not compute.
    """
    configs = {str(config.base_model): metadata[config.base_model.key].config}
    configs.update({str(e.source_model): metadata[e.source_model.key].config for e in _all_experts(config)})
    settings = compare_settings(configs, str(config.base_model))
    raise_problems([ArchitectureSettingError(refusal) for refusal in settings.refusals])
    return settings.warnings


def _all_experts(config: MoEConfig) -> list[MoEExpert]:
    return list(config.experts) + list(config.shared_experts or [])


def _expert_field(config: MoEConfig, index: int) -> str:
    """`experts[i]` or, past the routed experts, `shared_experts[i]` (index into :func:`_all_experts`)."""
    routed = len(config.experts)
    return f"experts[{index}]" if index < routed else f"shared_experts[{index - routed}]"


def _check_inputs_reach_the_output(
    config: MoEConfig, metadata: dict[str, ModelMetadata], out_arch: Architecture, jobs: list[TensorJob], layers: int
) -> None:
    """Every tensor of the base is copied into the output or is one of its dense MLPs, which the experts
    replace by the method's definition (the experts' own attention and norms are likewise not used:
    the output's attention is the base's); every tensor of an expert's MLPs is in an expert. Anything
    else (attention biases in a Mixtral, MLP biases, QK norms) has no place in the output.

    Raises:
        UnmergedTensorsError: naming the tensors the output could not hold, per model.
    """
    sources = {t.for_layer(layer, 0).expert_source for layer in range(layers) for t in out_arch.layer_weights
               if t.expert_source}
    mlp_prefixes = tuple({name.rsplit(".", 2)[0] + "." for name in sources})
    read = {(s.model, s.name) for job in jobs for s in job.sources}
    problems = []
    owners = [("base_model", config.base_model, None)] + [
        (_expert_field(config, i), e.source_model, mlp_prefixes) for i, e in enumerate(_all_experts(config))]
    for field, ref, prefixes in owners:
        tensors = metadata[ref.key].tensors
        unknown = sorted(
            n for n in tensors
            if (prefixes is None or n.startswith(prefixes)) and not n.endswith(IGNORED_SUFFIXES)
            and (ref.key, n) not in read and n not in sources  # sources: the base's MLPs, replaced by the experts
        )
        if unknown:
            shown = ", ".join(f"`{n}`" for n in unknown[:6]) + (f" and {len(unknown) - 6} more" if len(unknown) > 6 else "")
            problems.append(UnmergedTensorsError(
                f"`{field}` `{ref}` has {len(unknown)} tensor(s) a {OUTPUT_NAMES[out_arch.model_type]} output cannot "
                f"hold, so it would not contain them: {shown}. Pick models whose layers that output has (for "
                "example no attention biases in a Mixtral, no MLP biases, QK norms only in a Qwen3-MoE), or set "
                "`architecture:` to an output that has them",
                model=str(ref), tensors=unknown,
            ))
    raise_problems(problems)


def _check_experts(
    config: MoEConfig, metadata: dict[str, ModelMetadata], out_arch: Architecture, dense: Architecture, layers: int
) -> None:
    """Every expert (and shared expert) is of a family the output takes, with the base's layer count;
    all problems at once."""
    problems: list = []
    for index, expert in enumerate(_all_experts(config)):
        field = _expert_field(config, index)
        meta = metadata[expert.source_model.key]
        family = architecture_for(meta.config, str(expert.source_model)).model_type
        if family not in out_arch.moe_from:
            problems.append(ArchitectureError(
                f"`{field}.source_model` `{expert.source_model}` is a `{family}` model; a "
                f"{OUTPUT_NAMES[out_arch.model_type]} output takes {' or '.join(out_arch.moe_from)} models"
            ))
        elif dense.num_layers(meta.config) != layers:
            problems.append(LayerRangeError(
                f"`{field}.source_model` `{expert.source_model}` has {dense.num_layers(meta.config)} layers, "
                f"the base `{config.base_model}` has {layers}; experts need the base's layer count"
            ))
        if expert.noise_scale:
            problems.append(ConfigError(f"`{field}.noise_scale` is not supported yet; remove it"))
    raise_problems(problems)


def _moe_jobs(config: MoEConfig, metadata: dict[str, ModelMetadata], out_arch: Architecture, layers: int) -> list[TensorJob]:
    """The output's jobs in order: the base's tensors copied, gates (random or from prompts), experts' MLPs as experts.

    Raises:
        ConfigProblems / ShapeMismatchError: an expert's MLP differs in shape from the base's.
    """
    base_meta = metadata[config.base_model.key]
    jobs = [job for weight in out_arch.pre_weights for job in _copy_job(config, base_meta, weight)]
    dtype = output_dtype(config.out_dtype, config.dtype, jobs[0].dtype)  # routers: the embedding's dtype
    shape_problems: list = []
    for layer in range(layers):
        for template in out_arch.layer_weights:
            if template.router:
                rows = 1 if template.shared else len(config.experts)
                jobs.append(gate_job(config, template.for_layer(layer).name, layer, rows,
                                     int(base_meta.config["hidden_size"]), dtype, template.shared))
            elif template.expert_source:
                jobs.extend(_expert_jobs(config, metadata, template, layer, shape_problems))
            else:
                jobs.extend(_copy_job(config, base_meta, template.for_layer(layer)))
    for weight in out_arch.post_weights:
        jobs.extend(_copy_job(config, base_meta, weight))
    raise_problems(shape_problems)
    return jobs


def gate_job(config: MoEConfig, name: str, layer: int, rows: int, hidden: int, dtype: str, shared: bool) -> TensorJob:
    """The job of one router matrix; the executor draws its weights (:mod:`merger.execute.router`).

    Args:
        config: the MoE config (`gate_mode`).
        name: the output tensor's name.
        layer: the layer index.
        rows: the number of experts it routes between (1 for a shared expert's gate).
        hidden: the hidden size.
        dtype: the output dtype code.
        shared: the shared expert's gate (drawn from its own stream, so the routers are unchanged by it).

    Returns:
        A `gate` :class:`TensorJob` of shape `(rows, hidden)`.
    """
    params = {"gate_mode": config.gate_mode, "layer": layer} | ({"shared": True} if shared else {})
    if config.gate_mode in PROMPT_GATE_MODES:  # the executor runs them through the base (plan.base_model)
        # one row per routed expert, then the shared expert's (its gate's row comes from its own prompts)
        params["prompts"] = tuple((tuple(e.positive_prompts or ()), tuple(e.negative_prompts or ()))
                                  for e in [*config.experts, *(config.shared_experts or [])])
    return TensorJob(name, "gate", (), None, {}, params, (rows, hidden), dtype)


def _expert_jobs(
    config: MoEConfig, metadata: dict[str, ModelMetadata], template: WeightInfo, layer: int, shape_problems: list
) -> list[TensorJob]:
    """One layer's copies of one dense MLP weight: into each routed expert, or into the shared expert."""
    base_meta = metadata[config.base_model.key]
    experts = config.shared_experts if template.shared else config.experts
    jobs = []
    for j, expert in enumerate(experts):
        weight = template.for_layer(layer, j)
        field = f"{'shared_experts' if template.shared else 'experts'}[{j}]"
        key = expert.source_model.key
        base_info = base_meta.tensors.get(weight.expert_source)
        info = metadata[key].tensors.get(weight.expert_source)
        if info is None or base_info is None or info.shape != base_info.shape:
            shape_problems.append(ShapeMismatchError(
                f"`{field}.source_model` `{expert.source_model}`: `{weight.expert_source}` is "
                f"{list(info.shape) if info else 'missing'}, the base's is "
                f"{list(base_info.shape) if base_info else 'missing'}; experts must be the base's size"
            ))
            continue
        scale = expert.residual_scale if weight.residual else None
        jobs.append(TensorJob(weight.name, "passthrough", (TensorSource(key, weight.expert_source),), None,
                              {"scale": (scale,)}, {}, info.shape,
                              output_dtype(config.out_dtype, config.dtype, info.dtype)))
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


def _copy_job(config: MoEConfig, base_meta: ModelMetadata, weight: WeightInfo) -> list[TensorJob]:
    """The base's tensor copied (none for an optional tensor it lacks; zeros where the output needs one
    the base does not have, e.g. a Qwen2-MoE's q/k/v biases from a Llama base)."""
    name = weight.name
    if name not in base_meta.tensors:
        if weight.zeros_when_missing and name.endswith(".bias") and name[:-4] + "weight" in base_meta.tensors:
            rows = base_meta.tensors[name[:-4] + "weight"].shape[0]
            dtype = output_dtype(config.out_dtype, config.dtype, base_meta.tensors[name[:-4] + "weight"].dtype)
            return [TensorJob(name, "zeros", (), None, {}, {}, (rows,), dtype)]
        if weight.optional:
            return []
        raise ShapeMismatchError(f"`base_model` `{config.base_model}` has no tensor `{name}`; it is not a complete checkpoint")
    info = base_meta.tensors[name]
    return [TensorJob(name, "passthrough", (TensorSource(config.base_model.key, name),), None, {"scale": (None,)}, {},
                      info.shape, output_dtype(config.out_dtype, config.dtype, info.dtype))]
