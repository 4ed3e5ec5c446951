"""Suggest a merge: on every fixture family the suggestion, searched on the train text, beats
both parents and the naive 50/50 average on the eval text, written by the real merger and scored by a
plain forward pass in the test."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import bits_per_token
from merger.cli import main
from merger.config.load import load_config
from merger.engine import run_merge
from merger.errors import SearchError
from merger.evaluate.search import Candidate, SearchBudget, neighbours, suggest_merge
from merger.evaluate.text import EvalText, read_text_file

FIXTURES = Path(__file__).parent / "data" / "fixtures"
JUDGE_CHARS = 24_000  # of each eval split (~6k tokens): the judging text, never seen by the search


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _search_texts() -> list[EvalText]:
    return [read_text_file(FIXTURES / "prose_train.txt.gz"), read_text_file(FIXTURES / "code_train.txt.gz")]


def _judge(folder: Path) -> float:
    """Mean bits/token over the prose and code eval text, by a plain forward pass (tests/helpers.py)."""
    texts = [(FIXTURES / f"{split}_eval.txt").read_text(encoding="utf-8")[:JUDGE_CHARS] for split in ("prose", "code")]
    return sum(bits_per_token(folder, text) for text in texts) / len(texts)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_suggestion_beats_both_parents_and_the_naive_average(family: str, tmp_path: Path) -> None:
    base, prose, code = (str(FIXTURES / f"{family}-{kind}") for kind in ("base", "prose", "code"))
    folders = {name: Path(name) for name in (base, prose, code)}
    suggestion = suggest_merge(base, [prose, code], folders, _search_texts(), device=torch.device("cpu"),
                               budget=SearchBudget(candidates=9, tokens_per_text=4096))
    assert len(suggestion.tried) == 9 and suggestion.best.bits == min(s.bits for s in suggestion.tried)
    run_merge(suggestion.yaml, tmp_path / "suggested", device="cpu")  # the YAML merges with the real engine
    naive = f"merge_method: linear\nmodels:\n  - model: {prose}\n    parameters: {{weight: 0.5}}\n" \
            f"  - model: {code}\n    parameters: {{weight: 0.5}}\ndtype: bfloat16\n"
    run_merge(naive, tmp_path / "naive", device="cpu")
    scores = {name: _judge(Path(folder)) for name, folder in
              [("prose", prose), ("code", code), ("naive", tmp_path / "naive"), ("suggested", tmp_path / "suggested")]}
    print(family, suggestion.best.candidate.label(), scores)
    assert scores["naive"] < min(scores["prose"], scores["code"])  # the bar, as the fixtures promise
    assert scores["suggested"] < scores["naive"]


def test_refinement_moves_one_parameter_by_one_step_within_range() -> None:
    start = Candidate("ties", (("density", (0.5, 1.0)), ("weight", (1.0, 1.0)), ("lambda", 1.0)))
    moved = {c.label() for c in neighbours(start, 0.1)}
    assert "ties density=0.6,1 weight=1,1 lambda=1" in moved and "ties density=0.5,0.9 weight=1,1 lambda=1" in moved
    assert "ties density=0.5,1.1 weight=1,1 lambda=1" not in moved  # density is a fraction
    assert len(moved) == 9  # 6 per-model entries × 2 directions + lambda × 2, minus the one out of range


def test_refusals(tmp_path: Path) -> None:
    names = [str(FIXTURES / f"llama-{kind}") for kind in ("base", "prose", "code")]
    folders = {name: Path(name) for name in names}
    with pytest.raises(SearchError, match="two or three"):
        suggest_merge(names[0], names[1:2], folders, _search_texts())
    with pytest.raises(SearchError, match="judging text is also a search text"):
        suggest_merge(names[0], names[1:], folders, _search_texts(), judge_texts=_search_texts()[:1])
    with pytest.raises(SearchError, match="GiB bound"):
        suggest_merge(names[0], names[1:], folders, _search_texts(), budget=SearchBudget(max_bytes=2**20))
    folders[str(FIXTURES / "mistral-code")] = FIXTURES / "mistral-code"
    with pytest.raises(SearchError, match="does not match the base"):
        suggest_merge(names[0], [names[1], str(FIXTURES / "mistral-code")], folders, _search_texts())


def test_cli_suggest_prints_scores_and_a_config_that_loads(capsys, tmp_path: Path) -> None:
    search, judge = tmp_path / "search.txt", tmp_path / "judge.txt"
    search.write_text((FIXTURES / "code_eval.txt").read_text()[:3000])
    judge.write_text((FIXTURES / "prose_eval.txt").read_text()[:3000])
    code = main(["suggest", *(str(FIXTURES / f"qwen2-{kind}") for kind in ("base", "prose", "code")),
                 "--budget-candidates", "3", "--search-text", str(search), "--text", str(judge), "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0 and out.count(" bits/tok  ") == 3 and "| naive 50/50 |" in out and "| suggested |" in out
    config = load_config(out[out.index("merge_method:"):])
    assert config.merge_method in ("task_arithmetic", "slerp", "ties", "dare_ties")
