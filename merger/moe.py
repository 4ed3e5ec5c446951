"""Mixture-of-experts assembly (mergekit-moe's schema): dense models' MLPs become a Mixtral's experts.

Attention, norms, embeddings and the output head come from `base_model`; expert `j` of layer `i` is
expert `j`'s dense MLP (gate -> w1, down -> w2, up -> w3), in the Hub's per-expert layout
(`model.layers.{i}.block_sparse_moe.experts.{j}.w1.weight`, router `...block_sparse_moe.gate.weight`).
Gates are random (`gate_mode: random` / `uniform_random`): routing means nothing until fine-tuned.
Reference: Jiang et al. 2024, "Mixtral of Experts", arXiv:2401.04088; Goddard 2024, mergekit-moe.
"""

from __future__ import annotations

import math

import torch

from .architecture import architecture_by_type, architecture_for
from .config import ModelReference, MoEConfig
from .errors import ArchitectureError, ConfigError, ConfigErrors, LayerRangeError, ShapeMismatchError, VocabSizeError
from .metadata import ModelMetadata
from .plan import DEFAULT_SEED, MergePlan, TensorJob, TensorSource, output_dtype, set_config_dtype
from .tokenizer import Vocabulary

MOE_PRETTY_NAME = "Mixture of Experts (mergekit-moe)"
MOE_REFERENCE_URL = "https://arxiv.org/abs/2401.04088"


def build_moe_plan(config: MoEConfig, metadata: dict[str, ModelMetadata]) -> MergePlan:
    """Plan a Mixtral model from dense Llama/Mistral experts.

    Args:
        config: a parsed mergekit-moe config.
        metadata: canonical model key -> metadata, for the base and every expert.

    Returns:
        The :class:`~merger.plan.MergePlan`; its output config is a Mixtral config with
        `num_local_experts` = number of experts and `num_experts_per_tok` = `experts_per_token`.

    Raises:
        ArchitectureError: the base or an expert is not a Llama/Mistral decoder.
        ConfigError: `tokenizer_source` is `union` or names a model outside the MoE.
        ConfigErrors: an expert differs from the base in layer count or MLP shapes.
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
    if problems:
        raise ConfigErrors(problems)

    experts = len(config.experts)
    hidden = int(base_meta.config["hidden_size"])

    def copy(name: str) -> TensorJob:
        return _copy_job(config, base_meta, base_key, name)

    jobs: list[TensorJob] = []
    for weight in out_arch.pre_weights:
        jobs.append(copy(weight.name))
    shape_problems: list = []
    for layer in range(layers):
        for template in out_arch.layer_weights:
            if template.router:
                name = template.for_layer(layer).name
                dtype = output_dtype(config.out_dtype, config.dtype, jobs[0].dtype)
                jobs.append(TensorJob(name, "gate", (), None, {}, {"gate_mode": config.gate_mode, "layer": layer},
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
    if shape_problems:
        raise ConfigErrors(list({str(p): p for p in shape_problems}.values()))

    output_config = dict(base_meta.config)
    output_config.update(
        architectures=list(out_arch.architectures),
        model_type=out_arch.model_type,
        num_local_experts=experts,
        num_experts_per_tok=config.experts_per_token,
        sliding_window=None,
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
    )


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


def gate_weights(gate_mode: str, shape: tuple[int, int], seed: int, layer: int) -> torch.Tensor:
    """A random router matrix for one layer.

    Args:
        gate_mode: `random` (standard normal, as mergekit) or `uniform_random` (U(−1/√H, 1/√H),
            `nn.Linear`'s initialisation).
        shape: `(experts, hidden_size)`.
        seed: the run's seed; each layer draws from its own generator seeded by (seed, layer), so the
            result does not depend on the order tensors are computed in.
        layer: the layer index.

    Returns:
        float32 tensor `(experts, hidden_size)`.
    """
    generator = torch.Generator().manual_seed(seed * 100_003 + layer)
    if gate_mode == "random":
        return torch.randn(shape, generator=generator)
    bound = 1 / math.sqrt(shape[1])
    return torch.rand(shape, generator=generator) * (2 * bound) - bound
