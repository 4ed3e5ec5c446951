"""Score causal LMs on evaluation texts: bits per token, the KL divergence of a merge from each parent,
and greedy answers to a few prompts. One model in memory at a time; token, time and memory budgets.

Protocol (the fixtures' `perplexity.py`): a text is tokenised as one stream without special tokens
(a literal `</s>` becomes the EOS token), cut into windows of `context - 1` tokens, and each window is
scored with the BOS token in front, so every scored token is predicted exactly once. Weights are
upcast to float32.

KL: with `merge` set, its log-softmax at each scored position is kept (float16, up to
`EvalBudget.kl_cache_bytes`); each other model's KL is `KL(merge ‖ model) = Σ_v p_merge(v) ·
(log p_merge(v) − log p_model(v))`, averaged over the cached positions, in bits/token.
"""

from __future__ import annotations

import gc
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from merger.errors import EvalModelError, excerpt
from merger.evaluate.text import EvalText

DEFAULT_PROMPTS = ("The ", "def ", "User: What does a merge of two language models do?\nAssistant:")
LN2 = math.log(2)


@dataclass(frozen=True)
class EvalBudget:
    """Bounds of one evaluation.

    Attributes:
        tokens_per_text: tokens scored per text and model at most (the text's first ones).
        seconds: wall time of the whole evaluation; models not finished by then are reported as such.
        kl_cache_bytes: memory for the merge's float16 log-probs (positions × vocab × 2 bytes); KL is
            computed on the positions that fit.
        context: window length in tokens, BOS included.
        new_tokens: tokens generated greedily per prompt.
        batch_size: windows per forward pass.
    """

    tokens_per_text: int = 4096
    seconds: float = 600.0
    kl_cache_bytes: int = 256 * 2**20
    context: int = 256
    new_tokens: int = 32
    batch_size: int = 8


@dataclass
class ModelScore:
    """One model's row of the table.

    Attributes:
        name: the model as given.
        bits_per_token: text name -> mean −log2 p(token) over its scored tokens.
        tokens: text name -> tokens scored.
        kl_bits: text name -> KL(merge ‖ this model) in bits/token (empty for the merge itself, or
            when the tokenizers or vocabularies differ).
        generations: greedy continuation of each prompt (the new text only).
        seconds: wall time spent on this model (loading included).
        complete: False when the time budget ran out before this model was done (its row is partial).
    """

    name: str
    bits_per_token: dict[str, float] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    kl_bits: dict[str, float] = field(default_factory=dict)
    generations: list[str] = field(default_factory=list)
    seconds: float = 0.0
    complete: bool = True

    @property
    def mean_bits(self) -> float:
        """Mean of the per-text bits/token (each text type counts the same), NaN when nothing was scored."""
        values = list(self.bits_per_token.values())
        return sum(values) / len(values) if values else math.nan


@dataclass
class EvalResult:
    """The evaluation of several models on the same texts.

    Attributes:
        texts: the text names, in column order.
        prompts: the prompts answered greedily.
        merge: the name of the model KL is measured from, or None.
        rows: one :class:`ModelScore` per model, in the order given.
        seconds: wall time of the whole evaluation.
    """

    texts: list[str]
    prompts: list[str]
    merge: str | None
    rows: list[ModelScore]
    seconds: float = 0.0

    def table(self) -> str:
        """A markdown table: bits/token per text and their mean, and KL from the merge per text."""
        head = ["model", *(f"{t} bits/tok" for t in self.texts), "mean bits/tok"]
        if self.merge is not None:
            head += [f"KL({t}) bits/tok" for t in self.texts]
        lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
        for row in self.rows:
            cells = [row.name + ("" if row.complete else " (time budget ran out)")]
            cells += [_cell(row.bits_per_token.get(t)) for t in self.texts] + [_cell(row.mean_bits)]
            if self.merge is not None:
                cells += ["merge" if row.name == self.merge else _cell(row.kl_bits.get(t)) for t in self.texts]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def generations(self) -> str:
        """Each prompt with every model's greedy continuation, as markdown."""
        lines = []
        for i, prompt in enumerate(self.prompts):
            lines.append(f"Prompt {i + 1}: `{prompt!r}`")
            lines += [f"- {row.name}: `{row.generations[i]!r}`" for row in self.rows if i < len(row.generations)]
        return "\n".join(lines)


    def as_record(self) -> dict:
        """The result as JSON-able data (a job record keeps it): texts, prompts, merge, rows (each a
        :class:`ModelScore`'s fields), seconds, and `table`, the markdown the card shows."""
        return {**asdict(self), "table": self.table()}


def merge_evaluator(
    label: str,
    texts: list[EvalText],
    *,
    budget: EvalBudget,
    device: torch.device,
    prompts: tuple[str, ...] = DEFAULT_PROMPTS,
    progress: Callable[[float, str], None] | None = None,
    on_result: Callable[[EvalResult], None] | None = None,
) -> Callable[[Path, dict[str, Path]], str]:
    """The `evaluate` hook of :func:`merger.engine.run_merge` (`run --eval`, the worker's jobs): it scores the
    staged merge, named `label`, and each parent on `texts`, hands the result to `on_result`, and returns
    the markdown table the card shows (:meth:`EvalResult.table`)."""

    def evaluate(merged: Path, parents: dict[str, Path]) -> str:
        result = evaluate_models(merge_and_parents(label, merged, parents), texts, merge=label, prompts=prompts, budget=budget, device=device,
                                 progress=progress)
        if on_result is not None:
            on_result(result)
        return result.table()

    return evaluate


def merge_and_parents(label: str, merged: Path, parents: dict[str, Path]) -> list[tuple[str, Path]]:
    """The `models` of :func:`evaluate_models` for a merge named `label` and its parents (key -> folder)."""
    return [(label, merged)] + [(key, folder) for key, folder in parents.items() if key != label]


def _cell(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.4f}"


def load_causal_lm(path: Path, device: torch.device, name: str | None = None):
    """A model folder as a float32 causal LM in eval mode, and its tokenizer.

    Args:
        name: how errors name the model (its Hub id or the path its user gave); None: the folder. A job's
            or the app's folders are the server's cache, which its errors must not show.

    Raises:
        EvalModelError: not a folder with config.json, or transformers cannot load it.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # one bar, ours: per-tensor loading bars would break it
    path = Path(path)
    name = name or str(path)
    if not (path / "config.json").is_file():
        raise EvalModelError(f"`{excerpt(name)}` is not a model folder (no config.json); give a local model folder")
    _check_memory(path, name, device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as err:
        why = str(err).replace(str(path), name)  # transformers names the folder it read
        raise EvalModelError(f"`{excerpt(name)}` does not load with transformers "
                             f"({type(err).__name__}: {excerpt(why)})") from None
    return model.to(device).eval(), tokenizer


def _check_memory(path: Path, name: str, device: torch.device) -> None:
    """Refuse, before loading, a model whose float32 weights exceed the memory free on `device` (on a
    worker, an out-of-memory kill would take the worker, or the whole Space, down with the job).

    Raises:
        EvalModelError: the safetensors headers' parameters × 4 bytes are over the free memory.
    """
    from merger.io.metadata import read_safetensors_header

    parameters = sum(t.numel for file in sorted(path.glob("*.safetensors"))
                     for t in read_safetensors_header(file).values())
    free = free_memory(device)
    if free is not None and parameters * 4 > free:
        raise EvalModelError(f"`{excerpt(name)}` needs {parameters * 4 / 2**30:.1f} GiB in float32 to be evaluated, "
                             f"over the {free / 2**30:.1f} GiB free on this machine's {device.type}; evaluate "
                             "smaller models, or turn the evaluation off (`evaluate`)")


def free_memory(device: torch.device) -> int | None:
    """Bytes free for a new model on `device`: the GPU's free memory, else the smaller of the system's
    available memory and what the process's cgroup (a container's limit) still allows; None if unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    import psutil

    free = int(psutil.virtual_memory().available)
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
    except (OSError, ValueError):
        return free
    return min(free, int(limit) - used) if limit.isdigit() else free


def token_ids(tokenizer, text: str, limit: int) -> list[int]:
    """The first `limit` token ids of `text`, no special tokens added (`</s>` in the text is parsed)."""
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"][:limit]


def bos_id(tokenizer) -> int:
    """The id put in front of every window: BOS, else EOS."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if bos is None:
        raise EvalModelError("the tokenizer has neither a BOS nor an EOS token to start a window with")
    return bos


@torch.no_grad()
def window_log_probs(
    model, ids: list[int], bos: int, *, context: int, batch_size: int, device: torch.device,
    deadline: float = math.inf,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield `(log_probs, targets)` batch by batch: float32 `(n, vocab)` log-softmax at each scored
    position and int64 `(n,)` the token that followed, in text order.

    Raises:
        TimeoutError: `time.monotonic()` passed `deadline` (checked before each batch).
    """
    step = context - 1
    windows = [ids[i:i + step] for i in range(0, len(ids), step)]
    # equal-length windows batch without padding; a shorter last one runs alone
    full = [w for w in windows if len(w) == step]
    groups = [full[i:i + batch_size] for i in range(0, len(full), batch_size)]
    groups += [[w] for w in windows if len(w) < step]
    for group in groups:
        if time.monotonic() > deadline:
            raise TimeoutError
        x = torch.tensor([[bos] + w for w in group], device=device)
        logits = model(input_ids=x).logits[:, :-1].float()
        yield torch.log_softmax(logits, dim=-1).reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)


def bits_per_token(model, ids: list[int], bos: int, budget: EvalBudget, device: torch.device,
                   deadline: float = math.inf) -> float:
    """Mean −log2 p(token) of `ids` under `model` (windows of `budget.context`, BOS in front)."""
    total, count = 0.0, 0
    for log_probs, targets in window_log_probs(model, ids, bos, context=budget.context,
                                                batch_size=budget.batch_size, device=device, deadline=deadline):
        total -= float(log_probs.gather(-1, targets[:, None]).double().sum())
        count += targets.numel()
    return total / count / LN2


class _MergeCache:
    """The merge's float16 log-probs per text, for as many leading positions as the byte budget allows."""

    def __init__(self, budget_bytes: int):
        self.left = budget_bytes
        self.log_probs: dict[str, list[torch.Tensor]] = {}
        self.ids: dict[str, list[int]] = {}

    def keep(self, text: str, log_probs: torch.Tensor) -> None:
        rows = min(log_probs.shape[0], self.left // (2 * log_probs.shape[1]))
        if rows > 0:
            self.log_probs.setdefault(text, []).append(log_probs[:rows].to("cpu", torch.float16))
            self.left -= rows * log_probs.shape[1] * 2


def evaluate_models(
    models: list[tuple[str, Path]],
    texts: list[EvalText],
    *,
    merge: str | None = None,
    prompts: tuple[str, ...] = DEFAULT_PROMPTS,
    budget: EvalBudget = EvalBudget(),
    device: torch.device = torch.device("cpu"),
    progress: Callable[[float, str], None] | None = None,
) -> EvalResult:
    """Score each model on each text, one model loaded at a time.

    Args:
        models: `(name, folder)` pairs, in table order.
        texts: the texts to score on (each cut to `budget.tokens_per_text` tokens).
        merge: the name (among `models`) KL is measured from; it is scored first. None: no KL.
        prompts: answered greedily by every model (`budget.new_tokens` new tokens each).
        budget: token, time and KL-memory bounds.
        device: where the models run (float32).
        progress: called with (fraction done 0–1, what is being done).

    Returns:
        An :class:`EvalResult`; rows whose model ran out of time are marked incomplete.

    Raises:
        EvalModelError: a model folder does not load.
        ValueError: `merge` is not one of the names.
    """
    names = [name for name, _ in models]
    if merge is not None and merge not in names:
        raise ValueError(f"merge {merge!r} is not among the models")
    started = time.monotonic()
    deadline = started + budget.seconds
    order = sorted(range(len(models)), key=lambda i: names[i] != merge)  # the merge first: its log-probs feed KL
    rows = {name: ModelScore(name) for name in names}
    cache = _MergeCache(budget.kl_cache_bytes) if merge is not None else None
    for done, index in enumerate(order):
        name, path = models[index]
        if progress:
            progress(done / len(models), name)
        row = rows[name]
        if time.monotonic() > deadline:
            row.complete = False
            continue
        began = time.monotonic()
        try:
            _score_model(row, path, texts, prompts, budget, device, deadline, cache, is_merge=name == merge)
        except TimeoutError:
            row.complete = False
        row.seconds = time.monotonic() - began
        gc.collect()  # one model in memory at a time
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if progress:
        progress(1.0, "done")
    return EvalResult([t.name for t in texts], list(prompts), merge, [rows[n] for n in names],
                      time.monotonic() - started)


def _score_model(row: ModelScore, path: Path, texts: list[EvalText], prompts: tuple[str, ...], budget: EvalBudget,
                 device: torch.device, deadline: float, cache: _MergeCache | None, is_merge: bool) -> None:
    model, tokenizer = load_causal_lm(path, device, row.name)
    bos = bos_id(tokenizer)
    for text in texts:
        ids = token_ids(tokenizer, text.text, budget.tokens_per_text)
        if not ids:
            continue
        if is_merge and cache is not None:
            cache.ids[text.name] = ids
        cached = cache.log_probs.get(text.name) if cache is not None and not is_merge else None
        merge_log_probs = torch.cat(cached) if cached and cache.ids.get(text.name) == ids else None
        total, count, kl_total, kl_count = 0.0, 0, 0.0, 0
        for log_probs, targets in window_log_probs(model, ids, bos, context=budget.context,
                                                    batch_size=budget.batch_size, device=device, deadline=deadline):
            total -= float(log_probs.gather(-1, targets[:, None]).double().sum())
            count += targets.numel()
            if is_merge and cache is not None:
                cache.keep(text.name, log_probs)
            elif merge_log_probs is not None and kl_count < merge_log_probs.shape[0]:
                kl, n = _kl_against(merge_log_probs[kl_count:], log_probs)
                kl_total, kl_count = kl_total + kl, kl_count + n
        row.bits_per_token[text.name] = total / count / LN2
        row.tokens[text.name] = count
        if kl_count:
            row.kl_bits[text.name] = kl_total / kl_count / LN2
    row.generations = [_greedy(model, tokenizer, prompt, budget.new_tokens, device) for prompt in prompts]
    del model


def _kl_against(merge_log_probs: torch.Tensor, log_probs: torch.Tensor) -> tuple[float, int]:
    """Σ of KL(merge ‖ model) in nats over the batch's leading positions the merge's cache covers, and how many.

    Args:
        merge_log_probs: float16 `(m, vocab)`, the merge's log-probs from this batch's first position on.
        log_probs: float32 `(n, vocab)`, the model's log-probs at the batch's positions.
    """
    merge = merge_log_probs[:log_probs.shape[0]].to(log_probs.device, torch.float32)
    if merge.shape[1] != log_probs.shape[1]:
        return 0.0, 0  # vocabularies differ: no position-wise KL
    mine = log_probs[:merge.shape[0]]
    kl = (merge.exp() * (merge - mine)).sum(-1)
    return float(kl.double().sum()), merge.shape[0]


@torch.no_grad()
def _greedy(model, tokenizer, prompt: str, new_tokens: int, device: torch.device) -> str:
    inputs = tokenizer(prompt, return_tensors="pt").to(device)
    out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
