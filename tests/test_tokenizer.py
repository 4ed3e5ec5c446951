"""Vocabulary options: refusal without one, `union` / `base` / model alignment, overrides, padding, chat templates.

Models are tiny random Llamas with word-level tokenizers whose vocabularies the tests choose, so every
aligned row can be computed by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from merger.engine import run_merge
from merger.errors import VocabSizeError
from merger.validate import validate_config
from helpers import weights

SPECIALS = ["<unk>", "<s>", "</s>"]


def make_model(path: Path, words: list[str], seed: int, rows: int | None = None, tied: bool = False) -> Path:
    """A 1-layer Llama (hidden 8) whose tokenizer knows SPECIALS + `words`, with `rows` embedding rows."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    config = LlamaConfig(vocab_size=rows or len(vocab), hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tied,
                         bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def linear(a: Path, b: Path, extra: str = "", base: Path | None = None) -> str:
    head = f"base_model: {base}\n" if base else ""
    return (f"merge_method: linear\n{head}models:\n  - model: {a}\n    parameters: {{weight: 0.5}}\n"
            f"  - model: {b}\n    parameters: {{weight: 0.5}}\ndtype: float32\n{extra}")


def test_different_vocab_sizes_without_a_tokenizer_option_are_refused_before_download(tmp_path: Path) -> None:
    big = make_model(tmp_path / "big", [f"w{i}" for i in range(20)], 0, rows=120_128)
    small = make_model(tmp_path / "small", [f"w{i}" for i in range(20)], 1, rows=32_000)
    text = f"merge_method: slerp\nbase_model: {big}\nmodels:\n  - model: {big}\n  - model: {small}\nparameters: {{t: 0.5}}\n"
    with pytest.raises(VocabSizeError) as caught:
        validate_config(text)
    message = str(caught.value)
    assert "120128" in message and "32000" in message
    assert "tokenizer_source" in message and "union" in message and "base" in message


def test_union_takes_each_token_row_from_the_models_that_have_it(tmp_path: Path) -> None:
    base = make_model(tmp_path / "base", ["apple", "banana", "cherry"], 0)
    other = make_model(tmp_path / "other", ["cherry", "durian", "apple"], 1)
    out = tmp_path / "out"
    run_merge(linear(base, other, "tokenizer_source: union\n", base=base), out, device="cpu")
    a, b, merged = weights(base), weights(other), weights(out)
    emb, ea, eb = merged["model.embed_tokens.weight"], a["model.embed_tokens.weight"], b["model.embed_tokens.weight"]
    # output vocabulary: the base's 6 tokens, then `durian` (the only token the base lacks)
    assert emb.shape == (7, 8)
    torch.testing.assert_close(emb[3], 0.5 * ea[3] + 0.5 * eb[5])  # apple: both models' own rows
    torch.testing.assert_close(emb[5], 0.5 * ea[5] + 0.5 * eb[3])  # cherry
    torch.testing.assert_close(emb[4], ea[4])  # banana: base only -> its row is every model's default
    torch.testing.assert_close(emb[6], eb[4])  # durian: other only
    lm = merged["lm_head.weight"]
    torch.testing.assert_close(lm[6], b["lm_head.weight"][4])
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == 7
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.convert_tokens_to_ids("durian") == 6 and tokenizer.convert_tokens_to_ids("apple") == 3
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.get_input_embeddings().weight.shape == (7, 8)


def test_union_is_the_same_bytes_every_run(tmp_path: Path) -> None:
    base = make_model(tmp_path / "base", ["apple", "banana"], 0)
    other = make_model(tmp_path / "other", ["kiwi", "apple", "fig", "lime"], 1)
    text = linear(base, other, "tokenizer_source: union\n", base=base)
    run_merge(text, tmp_path / "a", device="cpu")
    run_merge(text, tmp_path / "b", device="cpu")
    for name in ("model-00001-of-00001.safetensors", "tokenizer.json", "config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    tokenizer = json.loads((tmp_path / "a" / "tokenizer.json").read_text())
    new = [token for token, i in sorted(tokenizer["model"]["vocab"].items(), key=lambda item: item[1]) if i >= 5]
    assert new == ["kiwi", "fig", "lime"]  # config order of the other model's ids, in the model vocabulary
    assert [t["content"] for t in tokenizer["added_tokens"] if t["id"] >= 5] == []  # not cut out of words


def test_slerp_of_32007_and_32000_rows_writes_the_vocab_size_it_writes(tmp_path: Path) -> None:
    words = [f"w{i}" for i in range(40)]
    big = make_model(tmp_path / "big", words, 0, rows=32_007)
    small = make_model(tmp_path / "small", words, 1, rows=32_000)
    out = tmp_path / "out"
    text = (f"merge_method: slerp\nbase_model: {big}\nmodels:\n  - model: {big}\n  - model: {small}\n"
            "parameters: {t: 0.5}\ntokenizer_source: base\n")
    run_merge(text, out, device="cpu")
    rows = weights(out)["model.embed_tokens.weight"].shape[0]
    assert rows == 32_007 == json.loads((out / "config.json").read_text())["vocab_size"]
    assert (out / "tokenizer.json").read_bytes() == (big / "tokenizer.json").read_bytes()  # untouched: copied


def test_tokenizer_source_model_uses_that_models_vocabulary(tmp_path: Path) -> None:
    a = make_model(tmp_path / "a", ["apple", "banana"], 0)
    b = make_model(tmp_path / "b", ["banana", "apple", "fig"], 1)
    out = tmp_path / "out"
    run_merge(linear(a, b, f"tokenizer_source: {b}\n"), out, device="cpu")
    ea, eb, emb = weights(a)["model.embed_tokens.weight"], weights(b)["model.embed_tokens.weight"], weights(out)["model.embed_tokens.weight"]
    assert emb.shape == (6, 8)
    torch.testing.assert_close(emb[3], 0.5 * eb[3] + 0.5 * ea[4])  # banana is id 3 in b, 4 in a
    torch.testing.assert_close(emb[5], eb[5])  # fig: only b has it (a's default is b's row: mean of those that have it)
    assert (out / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()


def test_token_overrides_force_zero_and_padding(tmp_path: Path) -> None:
    base = make_model(tmp_path / "base", ["apple", "banana"], 0)
    other = make_model(tmp_path / "other", ["apple", "banana"], 1)
    out = tmp_path / "out"
    extra = (f"tokenizer:\n  source: base\n  pad_to_multiple_of: 8\n  tokens:\n"
             f"    apple: {{source: {other}, force: true}}\n    banana: {{source: {{kind: zero}}}}\n"
             f"    <|new|>: {{source: {{kind: model_token, model: {base}, token: apple}}}}\n")
    run_merge(linear(base, other, extra, base=base), out, device="cpu")
    ea, eb = weights(base)["model.embed_tokens.weight"], weights(other)["model.embed_tokens.weight"]
    emb = weights(out)["model.embed_tokens.weight"]
    assert emb.shape == (8, 8)  # 5 tokens + <|new|> = 6, padded to 8
    torch.testing.assert_close(emb[3], eb[3])  # forced: every model takes the other's apple row
    torch.testing.assert_close(emb[4], 0.5 * ea[4] + 0.5 * eb[4])  # not forced: models keep their own rows
    torch.testing.assert_close(emb[5], ea[3])  # new token: the base's apple row for both
    torch.testing.assert_close(emb[6], 0.5 * emb[:6].mean(0) + 0.5 * emb[:6].mean(0), rtol=1e-5, atol=1e-6)


def test_chat_template_by_name_is_written(tmp_path: Path) -> None:
    a = make_model(tmp_path / "a", ["apple"], 0)
    b = make_model(tmp_path / "b", ["apple"], 1)
    out = tmp_path / "out"
    run_merge(linear(a, b, "chat_template: chatml\n"), out, device="cpu")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n"
