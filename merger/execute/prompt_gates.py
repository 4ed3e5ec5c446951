"""Router weights from prompts (mergekit-moe's `hidden`, `hidden_avg`, `hidden_last` and `cheap_embed`).

Each expert's router row is what the base model makes of that expert's positive prompts, minus what
it makes of its negative prompts, scaled to unit length (mergekit-moe's `get_gate_params`):

- `hidden` / `hidden_last`: per layer `i`, the hidden state entering decoder layer `i` (the embedding
  output for layer 0) at the prompt's last token, averaged over the prompts;
- `hidden_avg`: the same state averaged over the prompt's tokens first;
- `cheap_embed`: the sum of the prompts' token embeddings (unit length per sign), the same row for
  every layer.

The forward pass streams: the embedding rows the prompts use, then one decoder layer at a time is read
(only its tensors), converted to float32 on the chosen device, run over every prompt and freed, so one
layer and the prompts' hidden states are in memory at once (bounded by the token caps of
:mod:`merger.plan.prompt_tokens`, checked before the job is queued). Each
prompt is `[BOS] + tokens`, right-padded in batches under a causal mask, so it is computed as if alone
(see docs/decisions.md, "Prompt-routed MoE gates").
transformers is imported here only when a prompt gate is asked for: its decoder layer class for the
base's family runs each layer, so the math is the one the model runs at inference.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import torch

from merger.errors import ArchitectureError, GatePromptError, MergeCancelled, ModelFileError
from merger.io.loader import TensorReader
from merger.plan.prompt_tokens import ExpertPrompts, load_config_and_tokenizer, prompt_cap, tokenize_prompts

logger = logging.getLogger(__name__)

BATCH_TOKENS = 8192  # padded tokens run through a layer at once
HIDDEN_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")  # decoders whose forward is embed -> layers, unscaled
EMBEDDING = "model.embed_tokens.weight"


def prompt_gate_weights(
    mode: str,
    prompts: tuple[ExpertPrompts, ...],
    model_dir: Path,
    reader: TensorReader,
    device: torch.device,
    should_cancel: Callable[[], bool] | None = None,
) -> torch.Tensor:
    """Every layer's router matrix from the experts' prompts, run through the base model.

    Args:
        mode: one of :data:`~merger.config.schema.PROMPT_GATE_MODES`.
        prompts: per expert, its positive and negative prompts (at least one positive each).
        model_dir: the base model's folder (its `config.json` and tokenizer files).
        reader: the base's tensor reader (a LoRA'd base's reader applies the adapter).
        device: where the float32 forward pass runs.
        should_cancel: polled between layers; True raises :class:`MergeCancelled`.

    Returns:
        float32 CPU tensor `(layers, experts, hidden_size)`, each row of unit L2 norm (or zero where
        an expert's positive and negative prompts give the same vector).

    Raises:
        GatePromptError: a prompt with no tokens, or past the caps of :mod:`merger.plan.prompt_tokens`
            (or the base's sliding window).
        ArchitectureError: `hidden*` on a base whose family :data:`HIDDEN_FAMILIES` lacks.
        ModelFileError: the base's config or tokenizer does not load with transformers.
    """
    config, tokenizer = load_config_and_tokenizer(model_dir)
    if mode != "cheap_embed" and config.model_type not in HIDDEN_FAMILIES:
        raise ArchitectureError(
            f"`gate_mode: {mode}` runs the base's decoder layers, which is implemented for "
            f"{', '.join(HIDDEN_FAMILIES)} bases; `base_model` is a `{config.model_type}` model. "
            "Use `gate_mode: cheap_embed` or `random`"
        )
    sequences, weights = _tokenized(tokenizer, prompts, prompt_cap(config))
    embed = _embedding_rows(reader, sequences, device)
    layers = int(config.num_hidden_layers)
    with torch.no_grad():
        if mode == "cheap_embed":
            rows = _cheap_embed_rows(embed, weights)
            gates = rows.unsqueeze(0).expand(layers, -1, -1)
        else:
            gates = _hidden_rows(config, reader, embed, weights, device, mode == "hidden_avg", should_cancel)
    gates = gates.to("cpu", torch.float32).contiguous()
    _warn_degenerate(gates)
    return gates


def _tokenized(tokenizer, prompts: tuple[ExpertPrompts, ...], cap: int) -> tuple[list[list[int]], torch.Tensor]:
    """Every prompt's token ids (:func:`merger.plan.prompt_tokens.tokenize_prompts`) and the float64
    `(experts, prompts)` matrix that turns per-prompt vectors into each expert's mean of its positive
    prompts minus mean of its negative prompts.

    Raises:
        GatePromptError: a prompt with no tokens or over `cap`; all prompts over the total cap.
    """
    sequences, columns = tokenize_prompts(tokenizer, prompts, cap)
    weights = torch.zeros(len(prompts), len(sequences), dtype=torch.float64)
    for column, (expert, weight) in enumerate(columns):
        weights[expert, column] = weight
    return sequences, weights


def _embedding_rows(reader: TensorReader, sequences: list[list[int]], device: torch.device) -> list[torch.Tensor]:
    """Each prompt's embedding `(tokens, hidden)` in float32 on `device` (the matrix is read once, then freed).

    Raises:
        GatePromptError: a token id past the embedding's rows (a tokenizer larger than the base's vocabulary).
    """
    raw = reader.read(EMBEDDING)
    try:
        rows = raw.shape[0]
        past = sorted({i for ids in sequences for i in ids if i >= rows})
        if past:
            raise GatePromptError(f"the base's tokenizer gives token id(s) {past[:5]} for the prompts, past its "
                                  f"embedding's {rows} rows; use a base whose tokenizer fits its embedding")
        return [raw[torch.tensor(ids)].to(device=device, dtype=torch.float32) for ids in sequences]
    finally:
        reader.pool.give([raw])


def _cheap_embed_rows(embed: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """mergekit's `cheap_embed`: per expert, the unit-length sum of its positive prompts' token embeddings
    minus that of its negative prompts', scaled to unit length. Returns `(experts, hidden)`."""
    sums = torch.stack([e.sum(dim=0) for e in embed]).double()  # (prompts, hidden)
    rows = []
    for expert_weights in weights:
        row = torch.zeros(sums.shape[1], dtype=torch.float64, device=sums.device)
        for sign in (1.0, -1.0):
            chosen = (expert_weights * sign) > 0
            if chosen.any():
                side = sums[chosen.to(sums.device)].sum(dim=0)
                row += sign * side / side.norm().clamp(min=1e-8)
        rows.append(row)
    return _unit_rows(torch.stack(rows))


def _hidden_rows(config, reader: TensorReader, states: list[torch.Tensor], weights: torch.Tensor,
                 device: torch.device, average: bool, should_cancel: Callable[[], bool] | None) -> torch.Tensor:
    """mergekit's `hidden` gates: for each layer, the state entering it (last token, or the mean over tokens
    when `average`), combined per expert by `weights` and scaled to unit length. `(layers, experts, hidden)`.
    The last layer is never run: no router reads its output."""
    skeleton, rotary = _skeleton(config, device)
    combine = weights.to(device)
    batches = _batched(states)
    layers = []
    for index, meta_layer in enumerate(skeleton.layers):
        if should_cancel is not None and should_cancel():
            raise MergeCancelled("the merge was cancelled; nothing was written or pushed")
        reduced = torch.cat([
            torch.stack([batch[i, :n].mean(dim=0) if average else batch[i, n - 1] for i, n in enumerate(lengths)])
            for batch, lengths in batches
        ])
        layers.append(_unit_rows(combine @ reduced.double()))
        if index + 1 < len(skeleton.layers):
            layer = _load_layer(meta_layer, reader, index, device)
            batches = [(_run_layer(layer, batch, rotary), lengths) for batch, lengths in batches]
            layer.to("meta")  # frees the layer's weights before the next one is read
    return torch.stack(layers)


def _batched(states: list[torch.Tensor]) -> list[tuple[torch.Tensor, list[int]]]:
    """Consecutive prompts right-padded into batches `(prompts, tokens, hidden)` of at most
    :data:`BATCH_TOKENS` padded tokens, with each prompt's length. Under the causal mask a prompt's tokens
    see only earlier ones, so the padding after them changes none of their states."""
    groups: list[list[torch.Tensor]] = [[]]
    for state in states:
        longest = max([len(s) for s in groups[-1]] + [len(state)])
        if groups[-1] and longest * (len(groups[-1]) + 1) > BATCH_TOKENS:
            groups.append([])
        groups[-1].append(state)
    batches = []
    for group in groups:
        batch = group[0].new_zeros(len(group), max(len(s) for s in group), group[0].shape[1])
        for i, state in enumerate(group):
            batch[i, : len(state)] = state
        batches.append((batch, [len(s) for s in group]))
    return batches


def _skeleton(config, device: torch.device):
    """The base's decoder with every weight on the meta device (no memory), and its rotary embedding on `device`."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    decoder = model.base_model
    rotary = type(decoder.rotary_emb)(config=config).to(device)  # built on the CPU: its frequencies are computed
    return decoder, rotary


def _load_layer(meta_layer: torch.nn.Module, reader: TensorReader, index: int, device: torch.device) -> torch.nn.Module:
    """Decoder layer `index`'s tensors, read from the checkpoint as float32 on `device`, assigned to the module.

    Raises:
        ModelFileError: the base lacks a tensor the layer needs.
    """
    prefix = f"model.layers.{index}."
    tensors = {}
    for name, meta in meta_layer.state_dict().items():
        try:
            raw = reader.read(prefix + name)
        except KeyError:
            raise ModelFileError(f"`base_model` has no tensor `{prefix + name}`, which its decoder layer needs to run "
                                 "the prompts; use a complete checkpoint or `gate_mode: random`") from None
        tensors[name] = torch.empty(meta.shape, dtype=torch.float32, device=device).copy_(raw)
        reader.pool.give([raw])
    meta_layer.load_state_dict(tensors, assign=True)
    return meta_layer.eval()


def _run_layer(layer: torch.nn.Module, batch: torch.Tensor, rotary: torch.nn.Module) -> torch.Tensor:
    """A batch `(prompts, tokens, hidden)` through one decoder layer, under a plain causal mask."""
    tokens = batch.shape[1]
    positions = torch.arange(tokens, device=batch.device).unsqueeze(0)
    mask = torch.full((tokens, tokens), torch.finfo(torch.float32).min, device=batch.device).triu(1)
    out = layer(batch, attention_mask=mask[None, None], position_ids=positions,
                position_embeddings=rotary(batch, positions))
    return out[0] if isinstance(out, tuple) else out


def _unit_rows(rows: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm (a zero row stays zero), as mergekit (`clamp(min=1e-8)`)."""
    return (rows / rows.norm(dim=-1, keepdim=True).clamp(min=1e-8)).float()


def _warn_degenerate(gates: torch.Tensor, threshold: float = 5.0) -> None:
    """Log the layers whose router rows are nearly dependent (condition number over `threshold`, mergekit's
    test): the prompts are too alike there, and some experts will be picked rarely."""
    if gates.shape[1] < 2:
        return
    conditions = torch.linalg.cond(gates.double())
    bad = [i for i, c in enumerate(conditions.tolist()) if not c <= threshold]
    if bad:
        logger.warning("router rows of layer(s) %s are nearly linearly dependent (condition number over %s, "
                       "mergekit-moe's check): the experts' prompts are alike there, so some experts may rarely be "
                       "picked (expected for two experts that take each other's prompts as negatives)", bad, threshold)
