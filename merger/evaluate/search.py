"""Suggest a merge of two or three fine-tunes of one base: a budgeted search over SLERP `t`, TIES and
DARE-TIES `density`/`weight`, and task arithmetic `lambda`/`weight`, scored on a search split.

Each candidate is merged in memory, in float32, with the registry's own method functions (so the YAML
it becomes merges to the same tensors, DARE masks included: the per-tensor seeds are the engine's),
loaded into one model object and scored; nothing is written to disk. Memory: the base and every
fine-tune are held as float32 state dicts, plus the model being scored: about
`(fine-tunes + 2) × parameters × 4` bytes, checked against :attr:`SearchBudget.max_bytes` before
anything is loaded (a 7B model with two fine-tunes needs ~112 GB: search on small models).

The search: a small grid (every method at a few points), then coordinate refinement of the best
candidate (each parameter ± a step, the step halved after a round without gain) until the candidate
or time budget is spent. Scores are mean bits/token over the search texts (each text counts the same);
the judging texts, if given, are scored only for the parents, the naive 50/50 average and the best.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from merger.errors import SearchError
from merger.evaluate.score import EvalBudget, bits_per_token, bos_id, load_causal_lm, token_ids
from merger.evaluate.text import EvalText
from merger.execute.job_math import tensor_seed
from merger.methods.registry import get_method

RANGES = {"t": (0.0, 1.0), "lambda": (0.0, 2.0), "density": (0.05, 1.0), "weight": (0.0, 2.0)}
FIRST_STEP = 0.1  # refinement step of every parameter (all are of order 1)
MIN_STEP = 0.0125


@dataclass(frozen=True)
class SearchBudget:
    """Bounds of one search.

    Attributes:
        candidates: candidates merged and scored at most (the grid counts).
        seconds: wall time of the search at most (checked before each candidate).
        tokens_per_text: tokens of each search text scored per candidate.
        judge_tokens_per_text: tokens of each judging text scored per judged model.
        max_bytes: float32 memory the search may hold (see the module's docstring).
    """

    candidates: int = 24
    seconds: float = 600.0
    tokens_per_text: int = 2048
    judge_tokens_per_text: int = 8192
    max_bytes: int = 16 * 2**30


@dataclass(frozen=True)
class Candidate:
    """A merge config to try: a method and its parameters (`weight` and `density` per fine-tune).

    Attributes:
        method: `slerp`, `task_arithmetic`, `ties` or `dare_ties`.
        values: parameter -> value; per-model ones are lists (one per fine-tune).
    """

    method: str
    values: tuple[tuple[str, float | tuple[float, ...]], ...]

    def get(self, name: str):
        """The value of parameter `name`."""
        return dict(self.values)[name]

    def moved(self, name: str, index: int | None, delta: float) -> "Candidate | None":
        """This candidate with one parameter (one model's entry when `index` is set) moved by `delta`,
        or None when that leaves its range."""
        low, high = RANGES[name]
        value = self.get(name)
        old = value if index is None else value[index]
        new = round(old + delta, 6)
        if not low <= new <= high:
            return None
        if index is not None:
            new = tuple(new if i == index else v for i, v in enumerate(value))
        return Candidate(self.method, tuple((k, new if k == name else v) for k, v in self.values))

    def label(self) -> str:
        """`ties density=0.5 weight=1,1 lambda=1` for a progress line."""
        def show(v):
            return ",".join(f"{x:g}" for x in v) if isinstance(v, tuple) else f"{v:g}"
        return f"{self.method} " + " ".join(f"{k}={show(v)}" for k, v in self.values)


@dataclass(frozen=True)
class Scored:
    """A candidate and its mean bits/token on the search texts."""

    candidate: Candidate
    bits: float
    index: int

    def line(self) -> str:
        """One progress line: `#3 7.1234 bits/tok  ties density=0.5 ...`."""
        return f"#{self.index + 1:<3} {self.bits:.4f} bits/tok  {self.candidate.label()}"


@dataclass
class Suggestion:
    """The search's outcome.

    Attributes:
        best: the best scored candidate on the search texts.
        tried: every candidate, in the order tried.
        yaml: the best candidate as a mergekit YAML config.
        judged: model -> mean bits/token on the judging texts (the parents, `naive 50/50`,
            `suggested`), empty without judging texts.
        seconds: wall time of the search.
    """

    best: Scored
    tried: list[Scored]
    yaml: str
    judged: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> str:
        """The best candidate and, when judged, the table of parents, naive average and suggestion."""
        lines = [f"best of {len(self.tried)} candidates in {self.seconds:.1f}s: {self.best.candidate.label()} "
                 f"({self.best.bits:.4f} bits/tok on the search text)"]
        if self.judged:
            lines += ["", "| model | mean bits/tok (judging text) |", "|---|---:|"]
            lines += [f"| {name} | {bits:.4f} |" for name, bits in self.judged.items()]
        return "\n".join(lines)


def grid(n: int) -> list[Candidate]:
    """The first candidates for `n` fine-tunes: every method at a few points."""
    ones, halves = (1.0,) * n, (0.5,) * n
    points = [Candidate("task_arithmetic", (("weight", ones), ("lambda", lam))) for lam in (0.5, 0.7, 0.9)]
    if n == 2:
        points.append(Candidate("slerp", (("t", 0.5),)))
    points += [Candidate("ties", (("density", (d,) * n), ("weight", ones), ("lambda", 1.0))) for d in (0.5, 0.9)]
    points.append(Candidate("dare_ties", (("density", (0.7,) * n), ("weight", halves), ("lambda", 1.0))))
    return points


def neighbours(candidate: Candidate, step: float) -> list[Candidate]:
    """Every candidate one step away along one parameter (or one model's entry of it)."""
    out = []
    for name, value in candidate.values:
        indices = range(len(value)) if isinstance(value, tuple) else [None]
        for index in indices:
            for delta in (step, -step):
                moved = candidate.moved(name, index, delta)
                if moved is not None:
                    out.append(moved)
    return out


class _Models:
    """The base and fine-tunes as float32 state dicts on `device`, one model object to score merges in,
    and the search and judging texts tokenised once."""

    def __init__(self, folders: list[Path], names: list[str], device: torch.device, budget: SearchBudget, seed: int):
        self.device, self.seed, self.budget = device, seed, budget
        self.model, tokenizer = load_causal_lm(folders[0], device, names[0])
        parameters = sum(p.numel() for p in self.model.parameters())
        needed = (len(folders) + 1) * parameters * 4
        if needed > budget.max_bytes:
            raise SearchError(f"searching needs about {needed / 2**30:.1f} GiB of float32 weights, over the "
                              f"{budget.max_bytes / 2**30:.1f} GiB bound; search on smaller models")
        self.bos, self.tokenizer = bos_id(tokenizer), tokenizer
        self.states = [_state_dict(folder, device) for folder in folders]
        for model, state in zip(names[1:], self.states[1:]):
            for name, tensor in self.states[0].items():
                if name not in state or state[name].shape != tensor.shape:
                    raise SearchError(f"`{model}` does not match the base at tensor `{name}`; "
                                      "suggest needs fine-tunes of one base (same architecture and shapes)")

    def tokens(self, texts: list[EvalText], limit: int) -> list[list[int]]:
        return [token_ids(self.tokenizer, t.text, limit) for t in texts]

    def merged(self, candidate: Candidate) -> dict[str, torch.Tensor]:
        """The candidate's merge, tensor by tensor, with the registry's method function."""
        method = get_method(candidate.method)
        base, *fine_tunes = self.states
        out = {}
        for name, tensor in base.items():
            inputs = [state[name].clone() for state in fine_tunes]  # methods may work in place
            if candidate.method == "slerp":
                out[name] = method.function(inputs[1:], inputs[0], t=candidate.get("t"))
                continue
            arguments = {k.replace("lambda", "lambda_"): list(v) if isinstance(v, tuple) else v
                         for k, v in candidate.values}
            if method.uses_generator:
                arguments["generator"] = torch.Generator(device=self.device).manual_seed(tensor_seed(self.seed, name))
            out[name] = method.function(inputs, tensor.clone(), **arguments)
        return out

    def linear(self) -> dict[str, torch.Tensor]:
        """The naive 50/50 (or 1/n) average of the fine-tunes."""
        n = len(self.states) - 1
        return {name: sum(state[name] for state in self.states[1:]) / n for name in self.states[0]}

    def score(self, state: dict[str, torch.Tensor], ids: list[list[int]]) -> float:
        """Mean bits/token over the texts of the model holding `state`."""
        result = self.model.load_state_dict(state, strict=False)
        tied = {"lm_head.weight"} if getattr(self.model.config, "tie_word_embeddings", False) else set()
        if result.unexpected_keys or set(result.missing_keys) - tied:
            raise SearchError(f"the merged weights do not fit the model: missing {result.missing_keys[:3]}, "
                              f"unexpected {result.unexpected_keys[:3]}")
        budget = EvalBudget(tokens_per_text=max(len(text) for text in ids))
        return sum(bits_per_token(self.model, text, self.bos, budget, self.device) for text in ids) / len(ids)


def _state_dict(folder: Path, device: torch.device) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            out.update({name: handle.get_tensor(name).to(device, torch.float32) for name in handle.keys()})
    return out


def suggest_merge(
    base: str,
    fine_tunes: list[str],
    folders: dict[str, Path],
    search_texts: list[EvalText],
    *,
    judge_texts: list[EvalText] | None = None,
    budget: SearchBudget = SearchBudget(),
    device: torch.device = torch.device("cpu"),
    seed: int = 0,
    on_candidate: Callable[[Scored], None] | None = None,
) -> Suggestion:
    """Search a merge of 2–3 fine-tunes of `base`, scoring on `search_texts`.

    Args:
        base: the base model as the YAML should name it.
        fine_tunes: two or three fine-tunes of `base`, as the YAML should name them.
        folders: each name -> its local folder.
        search_texts: the search split; candidates are ranked on their mean bits/token.
        judge_texts: the judging split (must differ from the search split); scores the parents, the naive
            average and the best at the end. None: no judging.
        budget: candidates, time, tokens and memory.
        device: where merges and scoring run (float32).
        seed: seed of DARE masks; written into the YAML.
        on_candidate: called with each :class:`Scored` as it comes.

    Returns:
        A :class:`Suggestion` with the best candidate's mergekit YAML.

    Raises:
        SearchError: not 2–3 fine-tunes, judging text equal to the search text, shapes that differ,
            or more memory than `budget.max_bytes`.
        EvalModelError: a folder does not load.
    """
    if not 2 <= len(fine_tunes) <= 3 or len(set(fine_tunes)) != len(fine_tunes) or base in fine_tunes:
        raise SearchError(f"suggest takes two or three distinct fine-tunes of the base, got {len(fine_tunes)}")
    if judge_texts and {t.text for t in judge_texts} & {t.text for t in search_texts}:
        raise SearchError("the judging text is also a search text; judge on text the search did not see")
    started = time.monotonic()
    models = _Models([folders[base]] + [folders[f] for f in fine_tunes], [base, *fine_tunes], device, budget, seed)
    search_ids = models.tokens(search_texts, budget.tokens_per_text)
    tried: list[Scored] = []

    def attempt(candidate: Candidate) -> Scored | None:
        if len(tried) >= budget.candidates or time.monotonic() - started > budget.seconds:
            return None
        scored = Scored(candidate, models.score(models.merged(candidate), search_ids), len(tried))
        tried.append(scored)
        if on_candidate:
            on_candidate(scored)
        return scored

    for candidate in grid(len(fine_tunes)):
        attempt(candidate)
    if not tried:
        raise SearchError(f"the time budget ({budget.seconds:g} s) ran out while loading the models, before the "
                          "first candidate; give the search more time")
    best = min(tried, key=lambda s: s.bits)
    _refine(best, attempt)
    best = min(tried, key=lambda s: s.bits)
    judged = _judge(models, best.candidate, base, fine_tunes, judge_texts) if judge_texts else {}
    return Suggestion(best, tried, to_yaml(best.candidate, base, fine_tunes, seed, folders[base]),
                      judged, time.monotonic() - started)


def _refine(best: Scored, attempt: Callable[[Candidate], Scored | None]) -> None:
    """Coordinate refinement from `best`: move to the first better neighbour; halve the step when none is."""
    step, seen = FIRST_STEP, {best.candidate}
    while step >= MIN_STEP:
        improved = False
        for candidate in neighbours(best.candidate, step):
            if candidate in seen:
                continue
            seen.add(candidate)
            scored = attempt(candidate)
            if scored is None:
                return
            if scored.bits < best.bits:
                best, improved = scored, True
                break
        if not improved:
            step /= 2


def _judge(models: _Models, best: Candidate, base: str, fine_tunes: list[str],
           texts: list[EvalText]) -> dict[str, float]:
    ids = models.tokens(texts, models.budget.judge_tokens_per_text)
    judged = {name: models.score(state, ids) for name, state in zip([base, *fine_tunes], models.states)}
    judged["naive 50/50" if len(fine_tunes) == 2 else "naive average"] = models.score(models.linear(), ids)
    judged["suggested"] = models.score(models.merged(best), ids)
    return judged


def to_yaml(candidate: Candidate, base: str, fine_tunes: list[str], seed: int, base_folder: Path) -> str:
    """The candidate as a mergekit YAML config (JSON-quoted names; the dtype the base is stored in)."""
    config = json.loads((base_folder / "config.json").read_text())
    dtype = str(config.get("dtype") or config.get("torch_dtype") or "")
    lines = [f"merge_method: {candidate.method}"]
    if candidate.method == "slerp":
        lines += [f"base_model: {json.dumps(fine_tunes[0])}", "models:"]
        lines += [f"  - model: {json.dumps(name)}" for name in fine_tunes]
        lines += ["parameters:", f"  t: {candidate.get('t'):g}"]
    else:
        lines += [f"base_model: {json.dumps(base)}", "models:"]
        for i, name in enumerate(fine_tunes):
            lines += [f"  - model: {json.dumps(name)}", "    parameters:"]
            lines += [f"      {k}: {v[i]:g}" for k, v in candidate.values if isinstance(v, tuple)]
        lines += ["parameters:", f"  lambda: {candidate.get('lambda'):g}"]
        if get_method(candidate.method).uses_generator:
            lines.append(f"seed: {seed}")
    if dtype in ("float32", "float16", "bfloat16"):
        lines.append(f"dtype: {dtype}")
    return "\n".join(lines) + "\n"
