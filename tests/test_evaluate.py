"""Evaluation: bits/token, KL from a merge, greedy answers, budgets, texts, and the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from helpers import bits_per_token
from merger.cli import main
from merger.errors import EvalTextError
from merger.evaluate.score import EvalBudget, evaluate_models
from merger.evaluate.text import EvalText, dataset_texts, default_texts, read_text_file

FIXTURES = Path(__file__).parent / "data" / "fixtures"
ROOT = Path(__file__).parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _slice(name: str, chars: int) -> str:
    return (FIXTURES / f"{name}_eval.txt").read_text(encoding="utf-8")[:chars]


def _log_probs(folder: Path, text: str) -> torch.Tensor:
    """float64 log-softmax `(positions, vocab)` of one window (BOS + text), by a plain forward."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].double(), dim=-1)


def test_bits_per_token_reproduce_an_independent_forward() -> None:
    texts = [EvalText("prose", _slice("prose", 3000)), EvalText("code", _slice("code", 3000))]  # > 1 window each
    models = [(name, FIXTURES / name) for name in ("llama-base", "llama-prose", "qwen2-code")]
    result = evaluate_models(models, texts, prompts=(), budget=EvalBudget(tokens_per_text=10**6))
    for row, (_, folder) in zip(result.rows, models):
        assert row.complete
        for text in texts:
            assert row.bits_per_token[text.name] == pytest.approx(bits_per_token(folder, text.text), abs=1e-4)
            assert row.tokens[text.name] > 255  # several windows were scored
    # the prose fine-tune wins on prose, the base loses to it there: the numbers are the models'
    assert result.rows[1].bits_per_token["prose"] < result.rows[0].bits_per_token["prose"]


def test_kl_from_the_merge_matches_a_hand_computation_within_the_cache_budget() -> None:
    text = _slice("prose", 600)
    merge, parent = FIXTURES / "mistral-prose", FIXTURES / "mistral-code"
    p, q = _log_probs(merge, text), _log_probs(parent, text)
    kl_per_position = (p.exp() * (p - q)).sum(-1) / math.log(2)  # KL(merge ‖ parent), bits
    positions = 40
    budget = EvalBudget(tokens_per_text=10**6, kl_cache_bytes=positions * p.shape[1] * 2)  # float16 rows
    result = evaluate_models([("parent", parent), ("merge", merge), ("same", merge)], [EvalText("prose", text)],
                             merge="merge", prompts=(), budget=budget)
    parent_row, merge_row, same_row = result.rows
    assert parent_row.kl_bits["prose"] == pytest.approx(float(kl_per_position[:positions].mean()), rel=5e-3)
    assert abs(same_row.kl_bits["prose"]) < 1e-3  # the merge against itself: only float16 rounding
    assert merge_row.kl_bits == {}
    assert "| merge |" in result.table() and "KL(prose)" in result.table()


def test_greedy_answers_are_the_models_own_and_budgets_hold() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = FIXTURES / "llama-code"
    budget = EvalBudget(tokens_per_text=100, new_tokens=12)
    result = evaluate_models([("code", folder)], [EvalText("code", _slice("code", 5000))], prompts=("def ",),
                             budget=budget)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    inputs = tokenizer("def ", return_tensors="pt")
    expected = tokenizer.decode(model.generate(**inputs, max_new_tokens=12, do_sample=False)[0, inputs["input_ids"].shape[1]:],
                                skip_special_tokens=True)
    assert result.rows[0].generations == [expected]
    assert result.rows[0].tokens == {"code": 100}
    late = evaluate_models([("code", folder)], [EvalText("code", "def f(): pass")], budget=EvalBudget(seconds=0))
    assert not late.rows[0].complete and "time budget ran out" in late.table()


def test_texts_default_set_files_and_refusals(tmp_path: Path) -> None:
    assert [t.name for t in default_texts()] == ["prose", "code", "chat"]
    assert all(len(t.text) > 3000 for t in default_texts())
    assert read_text_file(FIXTURES / "prose_train.txt.gz").name == "prose_train"
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(EvalTextError, match="not UTF-8"):
        read_text_file(tmp_path / "bad.txt")
    with pytest.raises(EvalTextError, match="is not a file"):
        read_text_file(tmp_path / "missing.txt")
    with pytest.raises(EvalTextError, match="ID:SPLIT"):
        dataset_texts("no-split")


def test_dataset_split_from_the_hub(hub, tmp_path: Path) -> None:
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub.url, token=hub.token)
    api.create_repo("alice/notes", repo_type="dataset")
    rows = [{"text": "first note"}, {"text": "second note"}, {"other": 1}]
    (tmp_path / "test.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "train.txt").write_text("not this split")
    api.upload_folder(folder_path=tmp_path, repo_id="alice/notes", repo_type="dataset")
    (text,) = dataset_texts("alice/notes:test", hub.token)
    assert text.name == "test" and text.text == "first note\nsecond note"
    with pytest.raises(EvalTextError, match="no `.txt`"):
        dataset_texts("alice/notes:validation", hub.token)


def test_a_split_file_over_the_bound_is_refused_before_it_is_downloaded(hub, tmp_path: Path, monkeypatch) -> None:
    from huggingface_hub import HfApi

    from merger.evaluate import text as text_module

    api = HfApi(endpoint=hub.url, token=hub.token)
    api.create_repo("alice/big-notes", repo_type="dataset")
    (tmp_path / "test-a.txt").write_text("small first file\n")
    (tmp_path / "test-b.txt").write_text("x" * 5000)
    api.upload_folder(folder_path=tmp_path, repo_id="alice/big-notes", repo_type="dataset")
    import huggingface_hub

    downloads, original = [], huggingface_hub.hf_hub_download
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: downloads.append(a[1]) or original(*a, **k))
    monkeypatch.setattr(text_module, "MAX_DATASET_FILE_BYTES", 4096)
    with pytest.raises(EvalTextError, match=r"`test-b.txt` is 5,000 bytes, over the 4,096 bytes"):
        dataset_texts("alice/big-notes:test", hub.token)
    assert downloads == []  # refused from the listing: nothing fetched
    monkeypatch.setattr(text_module, "MAX_DATASET_FILE_BYTES", 8192)
    monkeypatch.setattr(text_module, "MAX_TEXT_BYTES", 10)  # the first file's size already reaches it
    (text,) = dataset_texts("alice/big-notes:test", hub.token)
    assert downloads == ["test-a.txt"] and text.text.startswith("small")


def test_a_dataset_spec_never_reads_a_local_folder_or_a_model_repo(hub, monkeypatch) -> None:
    monkeypatch.chdir(FIXTURES.parent)  # `fixtures/mistral-base` is a folder here, with a `config.json`
    model = hub.upload_model(FIXTURES / "mistral-base", "alice/eval-not-a-dataset")
    for spec in ("fixtures/mistral-base:config", f"{model}:config"):
        with pytest.raises(EvalTextError, match="could not be read"):
            dataset_texts(spec, hub.token)


def test_cli_eval_prints_the_table(capsys, tmp_path: Path) -> None:
    text = tmp_path / "snippet.txt"
    text.write_text(_slice("code", 2000))
    code = main(["eval", str(FIXTURES / "qwen2-base"), "--merge", str(FIXTURES / "qwen2-code"), "--text", str(text),
                 "--max-tokens", "200", "--device", "cpu", "--prompt", "def "])
    out = capsys.readouterr().out
    assert code == 0 and "| model | snippet bits/tok | mean bits/tok | KL(snippet) bits/tok |" in out
    assert out.count("qwen2-") >= 4 and "Prompt 1: `'def '`" in out


def test_run_eval_puts_the_table_into_the_card(capsys, tmp_path: Path) -> None:
    config = tmp_path / "slerp.yml"
    config.write_text((ROOT / "templates/examples/fixture-slerp.yaml").read_text()
                      .replace("tests/data/fixtures", str(FIXTURES)))
    text = tmp_path / "code.txt"
    text.write_text(_slice("code", 1500))
    code = main(["run", str(config), str(tmp_path / "out"), "--device", "cpu", "--eval", "--text", str(text),
                 "--max-tokens", "150", "--prompt", "The "])
    out = capsys.readouterr().out
    assert code == 0
    card = (tmp_path / "out" / "README.md").read_text()
    table = card.split("## Evaluation")[1].split("## Usage")[0]
    assert "| out | " in table and "mistral-prose" in table and "mistral-code" in table and table.strip()[-1] == "|"
    assert table.strip().splitlines()[-3] in out  # the printed table is the card's
    merged_bits = float(table.split("| out | ")[1].split(" |")[0])
    assert merged_bits == pytest.approx(bits_per_token(tmp_path / "out", _tokens_text(text)), abs=1e-4)


def test_run_eval_refuses_a_multi_stage_config(capsys, tmp_path: Path) -> None:
    config = tmp_path / "stages.yml"
    config.write_text(f"name: only\nmerge_method: linear\nmodels:\n  - model: {FIXTURES}/llama-prose\n"
                      f"    parameters: {{weight: 1}}\n")
    assert main(["run", str(config), str(tmp_path / "out"), "--eval"]) == 2
    assert "multi-stage" in capsys.readouterr().err and not (tmp_path / "out").exists()


def _tokens_text(path: Path) -> str:
    """The part of a file the 150-token budget scores (the tokenizer is the fixtures' bpe4k)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(FIXTURES / "mistral-prose")
    ids = tokenizer(path.read_text(), add_special_tokens=False)["input_ids"][:150]
    return tokenizer.decode(ids)


@pytest.mark.parametrize("argv, words", [
    (["eval", "./no-such-model"], ["ModelNotFoundError", "no-such-model"]),
    (["eval", str(FIXTURES / "llama-base"), "--dataset", "nosplit"], ["EvalTextError", "ID:SPLIT"]),
    (["eval", str(FIXTURES / "llama-base"), "--max-tokens", "0"], ["--max-tokens", "positive"]),
    (["suggest", str(FIXTURES / "llama-base"), str(FIXTURES / "llama-prose")], ["SearchError", "two or three"]),
])
def test_cli_mistakes_are_one_line_errors(capsys, argv: list[str], words: list[str]) -> None:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    for word in words:
        assert word in err


@pytest.mark.parametrize("config", ['{"model_type": "no-such-family"}', '{"model_type": "llama"}'])
def test_a_model_that_does_not_load_is_named_by_its_name_never_by_the_servers_folder(tmp_path: Path,
                                                                                     config: str) -> None:
    # A job's parents live in the worker's Hub cache: the error names the model as its config does.
    folder = tmp_path / "models--org--parent" / "snapshots" / "0123abcd"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(config)
    from merger.errors import EvalModelError
    from merger.evaluate.score import evaluate_models

    with pytest.raises(EvalModelError) as refused:
        evaluate_models([("org/parent", folder)], [EvalText("prose", "a few words")])
    assert "`org/parent` does not load with transformers" in str(refused.value)
    assert str(tmp_path) not in str(refused.value) and "snapshots" not in str(refused.value)


def test_a_model_over_the_free_memory_is_refused_before_it_is_loaded(monkeypatch) -> None:
    # In float32 a 7B parent needs 28 GiB: an out-of-memory kill would take the worker (or the Space) down.
    from merger.errors import EvalModelError
    from merger.evaluate import score
    from merger.io.metadata import read_safetensors_header

    folder = FIXTURES / "mistral-base"
    need = sum(t.numel for t in read_safetensors_header(folder / "model.safetensors").values()) * 4
    monkeypatch.setattr(score, "free_memory", lambda device: need - 1)
    with pytest.raises(EvalModelError, match=r"`org/base` needs .* GiB in float32 to be evaluated, over the"):
        score.load_causal_lm(folder, torch.device("cpu"), "org/base")
    monkeypatch.setattr(score, "free_memory", lambda device: need)
    model, _ = score.load_causal_lm(folder, torch.device("cpu"), "org/base")
    assert sum(p.numel() * 4 for p in model.parameters()) <= need  # the estimate bounds what is loaded


def test_free_memory_is_known_on_the_cpu() -> None:
    from merger.evaluate.score import free_memory

    free = free_memory(torch.device("cpu"))
    assert free is not None and 0 < free < 2**50
