"""The experts' prompts of a prompt-routed MoE as token ids, within the caps its forward pass may hold.

Shared by the check before a job is queued (:func:`check_prompt_tokens`, from the base's tokenizer
files only, as validation reads tokenizers) and the forward pass itself
(:mod:`merger.execute.prompt_gates`), so a prompt over a cap is refused before any weight is downloaded.
transformers is imported only when a prompt gate is asked for.
"""

from __future__ import annotations

from pathlib import Path

from merger.errors import GatePromptError, ModelFileError, excerpt

MAX_PROMPT_TOKENS = 512  # per prompt, BOS included
MAX_TOTAL_PROMPT_TOKENS = 16_384  # all prompts of all experts: their hidden states are kept between layers

# Per expert: (positive prompts, negative prompts), as the config lists them.
ExpertPrompts = tuple[tuple[str, ...], tuple[str, ...]]


def check_prompt_tokens(model_dir: Path, prompts: tuple[ExpertPrompts, ...]) -> None:
    """Refuse prompts the base's tokenizer makes too long, before any weight is read.

    Args:
        model_dir: a folder with the base's `config.json` and tokenizer files.
        prompts: per expert, its positive and negative prompts.

    Raises:
        GatePromptError: a prompt with no tokens, over :data:`MAX_PROMPT_TOKENS` (or the base's sliding
            window), or all of them over :data:`MAX_TOTAL_PROMPT_TOKENS`.
        ModelFileError: the base's config or tokenizer does not load with transformers.
    """
    config, tokenizer = load_config_and_tokenizer(model_dir)
    tokenize_prompts(tokenizer, prompts, prompt_cap(config))


def load_config_and_tokenizer(model_dir: Path):
    """The base's transformers config (eager attention: the prompt pass builds its own mask) and tokenizer.

    Raises:
        ModelFileError: either does not load (named as `base_model`: the folder is the server's cache).
    """
    from transformers import AutoConfig, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    try:
        config = AutoConfig.from_pretrained(model_dir)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, KeyError) as err:
        why = str(err).replace(str(model_dir), "base_model")  # the folder is the server's cache: never shown
        raise ModelFileError(
            f"`base_model`: its config or tokenizer does not load with transformers "
            f"({type(err).__name__}: {excerpt(why)}), and prompt gates run the base's tokenizer and layers; "
            "use `gate_mode: random` or a base whose files load"
        ) from None
    config._attn_implementation = "eager"
    return config, tokenizer


def prompt_cap(config) -> int:
    """The most tokens a prompt may have: the cap, or the base's sliding window if smaller (one plain causal
    mask is then exact)."""
    window = getattr(config, "sliding_window", None)
    return min(MAX_PROMPT_TOKENS, window) if isinstance(window, int) and window > 0 else MAX_PROMPT_TOKENS


def tokenize_prompts(tokenizer, prompts: tuple[ExpertPrompts, ...],
                     cap: int) -> tuple[list[list[int]], list[tuple[int, float]]]:
    """Every prompt as `[BOS] + ids` (no BOS when the tokenizer has none, as mergekit), and per sequence
    its expert and signed weight (1/n for each of an expert's n positive prompts, -1/n for negative ones).

    Raises:
        GatePromptError: a prompt with no tokens or over `cap`; all prompts over the total cap.
    """
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    sequences: list[list[int]] = []
    columns: list[tuple[int, float]] = []  # (expert, signed weight) per sequence
    total = 0
    for index, (positive, negative) in enumerate(prompts):
        for field, texts, sign in (("positive_prompts", positive, 1.0), ("negative_prompts", negative, -1.0)):
            for j, text in enumerate(texts):
                ids = bos + tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
                where = f"`experts[{index}].{field}[{j}]` ({excerpt(text)})"
                if not ids:
                    raise GatePromptError(f"{where} has no tokens and the tokenizer no BOS token; write a prompt")
                if len(ids) > cap:
                    raise GatePromptError(f"{where} is {len(ids)} tokens; a prompt may have at most {cap} "
                                          "(with BOS); shorten it or split it into several prompts")
                sequences.append(ids)
                columns.append((index, sign / len(texts)))
                total += len(ids)
    if total > MAX_TOTAL_PROMPT_TOKENS:
        raise GatePromptError(f"the experts' prompts are {total} tokens in all; at most {MAX_TOTAL_PROMPT_TOKENS} "
                              "are run (their hidden states are kept between layers); use fewer or shorter prompts")
    return sequences, columns
