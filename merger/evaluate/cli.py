"""The command line of `merger.evaluate`: `eval`, `suggest`, `run --eval` and `validate --report`.

`merger/cli.py` adds these subcommands and flags (:mod:`merger.evaluate.flags`) and calls the handlers.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

from merger.errors import EvalModelError, SearchError, excerpt
from merger.evaluate.score import DEFAULT_PROMPTS, EvalBudget, EvalResult, evaluate_models, merge_and_parents
from merger.evaluate.text import EvalText, dataset_texts, default_texts, read_text_file, split_in_halves


def texts_of(args: argparse.Namespace, token: str | None) -> list[EvalText]:
    """The evaluation texts the flags name (default: the shipped set)."""
    if getattr(args, "dataset", None):
        return dataset_texts(args.dataset, token)
    if args.text:
        return [read_text_file(path) for path in args.text]
    return default_texts()


def budget_of(args: argparse.Namespace) -> EvalBudget:
    """The :class:`EvalBudget` the flags set."""
    if args.max_tokens < 1 or args.max_minutes <= 0:
        raise EvalModelError("`--max-tokens` and `--max-minutes` must be positive")
    return EvalBudget(tokens_per_text=args.max_tokens, seconds=60 * args.max_minutes)


def model_folder(reference: str, token: str | None) -> Path:
    """A local folder for a model folder or Hub id (downloaded: safetensors, configs, tokenizer)."""
    from merger.config.schema import ModelReference
    from merger.io.resolve import materialize

    if Path(reference).is_dir():
        return Path(reference)
    try:
        ref = ModelReference.parse(reference)
    except ValueError as err:
        raise EvalModelError(f"`{excerpt(reference)}`: {err}") from None
    return materialize([ref], token)[ref.key]


def progress_bar() -> tuple[Callable[[float, str], None], Callable[[], None]]:
    """A tqdm bar in percent: (update(fraction, what), close)."""
    from tqdm import tqdm

    bar = tqdm(total=100, unit="%", bar_format="{l_bar}{bar}| {elapsed}<{remaining} {postfix}")

    def update(fraction: float, what: str) -> None:
        bar.n = round(100 * fraction, 2)
        bar.set_postfix_str(what, refresh=False)
        bar.refresh()

    return update, bar.close


def run_eval(args: argparse.Namespace, token: str | None) -> EvalResult:
    """`python -m merger eval`: evaluate, print the table and the generations."""
    from merger.engine import pick_device

    names = list(dict.fromkeys(([args.merge] if args.merge else []) + args.models))
    texts, budget, device = texts_of(args, token), budget_of(args), pick_device(args.device)
    models = [(name, model_folder(name, token)) for name in names]
    result = _evaluate_and_print(models, texts, args.merge, args, budget, device)
    print(f"\n{sum(sum(r.tokens.values()) for r in result.rows):,} tokens scored in {result.seconds:.1f}s")
    return result


def _evaluate_and_print(models, texts, merge, args, budget, device):
    """Score `models` with a progress bar, then print the table and the greedy answers; returns the result."""
    update, close = progress_bar()
    try:
        result = evaluate_models(models, texts, merge=merge, prompts=tuple(args.prompt or DEFAULT_PROMPTS),
                                 budget=budget, device=device, progress=update)
    finally:
        close()
    print(result.table())
    print()
    print(result.generations())
    return result


def merge_evaluator(args: argparse.Namespace, token: str | None, label: str) -> Callable[[Path, dict[str, Path]], str]:
    """For `run --eval`: a callback of :func:`merger.engine.run_merge` that evaluates the staged merge
    (named `label`) against its parents, prints the table and returns it for the card."""
    from merger.engine import pick_device

    texts, budget, device = texts_of(args, token), budget_of(args), pick_device(args.device)

    def evaluate(merged: Path, parents: dict[str, Path]) -> str:
        return _evaluate_and_print(merge_and_parents(label, merged, parents), texts, label, args, budget, device).table()

    return evaluate


def run_report(config_text: str, token: str | None) -> None:
    """`python -m merger validate CONFIG --report`: print the weight report of the config's models."""
    from merger.evaluate.report import report_for_config

    print()
    print(report_for_config(config_text, token).text())


def run_suggest(args: argparse.Namespace, token: str | None) -> None:
    """`python -m merger suggest`: search a merge, print each candidate's score and the best as YAML."""
    from merger.engine import pick_device
    from merger.evaluate.search import SearchBudget, suggest_merge

    search, judge = split_in_halves(default_texts())  # by default: halves of the shipped set
    search = [read_text_file(p) for p in args.search_text] if args.search_text else search
    judge = [read_text_file(p) for p in args.text] if args.text else judge
    folders = {name: model_folder(name, token) for name in [args.base, *args.fine_tunes]}
    if args.budget_candidates < 1 or args.budget_minutes <= 0 or args.max_tokens < 1:
        raise SearchError("`--budget-candidates`, `--budget-minutes` and `--max-tokens` must be positive")
    budget = SearchBudget(candidates=args.budget_candidates, seconds=60 * args.budget_minutes,
                          tokens_per_text=args.max_tokens)
    suggestion = suggest_merge(args.base, args.fine_tunes, folders, search, judge_texts=judge, budget=budget,
                               device=pick_device(args.device), seed=args.seed,
                               on_candidate=lambda scored: print(scored.line(), flush=True))
    print()
    print(suggestion.summary())
    print()
    print(suggestion.yaml, end="")
