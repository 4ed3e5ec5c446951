"""Re-saved tokenizers (rule 3) and MoE tokenizer checks, on the trained fixtures.

The output tokenizer must tokenise the base's text exactly as the base did, keep every file the config
does not change byte for byte, stay as small as its content, carry the chat template where transformers
4.x and chat servers read it (`tokenizer_config.json`), and load with the current transformers and the
last 4.x release (run by `tests/tokenizer_4x_check.py` in the `.venv-tf4` that `.ci/run` prepares).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from merger.engine import run_merge
from merger.errors import ConfigError, VocabSizeError
from merger.validate import validate_config

ROOT = Path(__file__).parents[1]
VENV_TF4 = ROOT / ".venv-tf4" / "bin" / "python"
CHATML = (ROOT / "templates" / "chat_templates" / "chatml.jinja").read_text()


def eval_texts(fx: Path) -> list[Path]:
    return [fx / "prose_eval.txt", fx / "code_eval.txt"]


def retokenized_copy(fx: Path, path: Path, source: str = "mistral-prose") -> Path:
    """A copy of a fixture model whose tokenizer is a byte-level BPE trained here on other text (the
    fixture's special tokens first, then a vocabulary that differs from the fixture's), so a `union`
    adds hundreds of tokens the base lacks."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    shutil.copytree(fx / source, path)
    original = json.loads((path / "tokenizer.json").read_text())
    specials = [t["content"] for t in original["added_tokens"]]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1500, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = (fx / "code_eval.txt").read_text()  # a code vocabulary: many tokens the base lacks
    tokenizer.train_from_iterator([text[i:i + 2000] for i in range(0, len(text), 2000)], trainer)
    (path / "tokenizer.json").write_text(tokenizer.to_str())
    return path


def linear(base: Path, other: Path, extra: str) -> str:
    return (f"merge_method: linear\nbase_model: {base}\nmodels:\n  - model: {base}\n    parameters: {{weight: 0.5}}\n"
            f"  - model: {other}\n    parameters: {{weight: 0.5}}\ndtype: float32\n{extra}")


def encode(folder: Path, texts: list[Path]) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    return [tokenizer.encode(p.read_text(encoding="utf-8"), add_special_tokens=False) for p in texts]


def test_union_tokens_leave_the_base_tokenisation_and_files_alone(fixture_models_dir: Path, tmp_path: Path) -> None:
    fx = fixture_models_dir
    base, other = fx / "mistral-base", retokenized_copy(fx, tmp_path / "other")
    out = tmp_path / "out"
    run_merge(linear(base, other, "tokenizer_source: union\n"), out, device="cpu")
    written = json.loads((out / "tokenizer.json").read_text())
    original = json.loads((base / "tokenizer.json").read_text())
    new = {t: i for t, i in written["model"]["vocab"].items() if t not in original["model"]["vocab"]}
    assert len(new) > 100  # the code vocabulary really adds tokens
    assert sorted(new.values()) == list(range(4096, 4096 + len(new)))  # ids after the base's, no gaps
    # the same eval text gives the very same ids (added tokens would cut `new` out of every word: +21-29%)
    assert encode(out, eval_texts(fx)) == encode(base, eval_texts(fx))
    # content unchanged apart from the new vocabulary entries, and written compactly as it came
    for token in new:
        del written["model"]["vocab"][token]
    assert written == original
    size, base_size = (out / "tokenizer.json").stat().st_size, (base / "tokenizer.json").stat().st_size
    entries = sum(len(json.dumps(t, ensure_ascii=False)) + len(str(i)) + 2 for t, i in new.items())
    assert size <= 1.05 * (base_size + entries)
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # nothing in them changes
        assert (out / name).read_bytes() == (base / name).read_bytes()
    rows = json.loads((out / "config.json").read_text())["vocab_size"]
    assert rows == 4096 + len(new)  # every token id of the written tokenizer has an embedding row


def test_added_token_and_chat_template_are_written_where_tools_read_them(fixture_models_dir: Path,
                                                                         tmp_path: Path) -> None:
    fx = fixture_models_dir
    base = fx / "qwen2-base"
    out = tmp_path / "out"
    extra = "tokenizer:\n  source: base\n  tokens:\n    <|tool|>: {source: {kind: zero}}\nchat_template: chatml\n"
    run_merge(linear(base, fx / "qwen2-prose", extra), out, device="cpu")
    size, base_size = (out / "tokenizer.json").stat().st_size, (base / "tokenizer.json").stat().st_size
    assert size <= 1.05 * base_size  # was 2.5x: pretty-printed by save_pretrained
    assert (out / "special_tokens_map.json").read_bytes() == (base / "special_tokens_map.json").read_bytes()
    config, base_config = (json.loads((d / "tokenizer_config.json").read_text()) for d in (out, base))
    assert config["chat_template"] == CHATML == (out / "chat_template.jinja").read_text()
    assert config["tokenizer_class"] == base_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["added_tokens_decoder"]["4096"] == {"content": "<|tool|>", "lstrip": False, "normalized": True,
                                                      "rstrip": False, "single_word": False, "special": False}
    assert {k: v for k, v in config.items() if k not in ("chat_template", "added_tokens_decoder")} == \
        {k: v for k, v in base_config.items() if k not in ("chat_template", "added_tokens_decoder")}
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.convert_tokens_to_ids("<|tool|>") == 4096
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == \
        "<|im_start|>user\nhi<|im_end|>\n"
    assert encode(out, eval_texts(fx)) == encode(base, eval_texts(fx))


def test_a_donor_with_vocabulary_files_only_gets_a_tokenizer_json(fixture_models_dir: Path, tmp_path: Path) -> None:
    # GPT-2 style vocab.json + merges.txt (the fixture's byte-level BPE) and no tokenizer.json
    from tokenizers import Tokenizer

    from merger.plan.tokenizer import load_vocabulary, plan_vocabulary
    from merger.io.tokenizer_files import write_tokenizer

    fx = fixture_models_dir
    donor, out = tmp_path / "donor", tmp_path / "out"
    donor.mkdir(), out.mkdir()
    bpe = json.loads((fx / "mistral-base" / "tokenizer.json").read_text())["model"]
    (donor / "vocab.json").write_text(json.dumps(bpe["vocab"], ensure_ascii=False))
    (donor / "merges.txt").write_text("#version: 0.2\n" + "".join(" ".join(m) + "\n" for m in bpe["merges"]))
    (donor / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer", "unk_token": "<unk>",
                                                             "bos_token": "<s>", "eos_token": "</s>"}))
    vocabulary = load_vocabulary(donor, rows=4096, reference="donor")
    tokens = {"<|tool|>": {"source": {"kind": "zero"}}}
    plan = plan_vocabulary("base", {"donor": vocabulary}, ["donor"], None, tokens=tokens)
    write_tokenizer(plan, donor, out)
    for name in ("vocab.json", "merges.txt"):
        assert (out / name).read_bytes() == (donor / name).read_bytes()
    assert Tokenizer.from_file(str(out / "tokenizer.json")).token_to_id("<|tool|>") == 4096
    assert encode(out, eval_texts(fx)) == encode(donor, eval_texts(fx))  # the donor's own tokenisation


def test_chat_template_alone_leaves_tokenizer_json_byte_identical(fixture_models_dir: Path, tmp_path: Path) -> None:
    fx = fixture_models_dir
    out = tmp_path / "out"
    run_merge(linear(fx / "mistral-base", fx / "mistral-prose", "chat_template: chatml\n"), out, device="cpu")
    for name in ("tokenizer.json", "special_tokens_map.json"):
        assert (out / name).read_bytes() == (fx / "mistral-base" / name).read_bytes()


def test_template_replaces_an_old_chat_template_json_and_fills_a_missing_config(fixture_models_dir: Path,
                                                                                tmp_path: Path) -> None:
    fx = fixture_models_dir
    base = tmp_path / "base"  # an older layout: chat_template.json, and no tokenizer_config.json
    shutil.copytree(fx / "mistral-base", base)
    (base / "tokenizer_config.json").unlink()
    (base / "chat_template.json").write_text(json.dumps({"chat_template": "{{ messages[0]['content'] }}"}, indent=2))
    out = tmp_path / "out"
    run_merge(linear(base, fx / "mistral-prose", "chat_template: chatml\n"), out, device="cpu")
    assert json.loads((out / "chat_template.json").read_text()) == {"chat_template": CHATML}
    assert json.loads((out / "tokenizer_config.json").read_text()) == {"tokenizer_class": "PreTrainedTokenizerFast",
                                                                        "chat_template": CHATML}
    assert (out / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()


def test_template_tokens_the_output_lacks_are_warned(fixture_models_dir: Path, tmp_path: Path) -> None:
    fx = fixture_models_dir
    # ChatML's <|im_start|> / <|im_end|> are not tokens of the fixtures (they have <|user|>, ...)
    report = validate_config(linear(fx / "mistral-base", fx / "mistral-prose", "chat_template: chatml\n"))
    assert any("`<|im_start|>`, `<|im_end|>`" in w and "lacks" in w for w in report.warnings)
    # `auto` picks the most common template: here the other model's ChatML, which the base's tokenizer lacks
    base, other = tmp_path / "base", tmp_path / "other"
    for folder, template in ((base, None), (other, CHATML)):
        shutil.copytree(fx / "mistral-base", folder)
        config = json.loads((folder / "tokenizer_config.json").read_text())
        config.pop("chat_template", None)
        if template:
            config["chat_template"] = template
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    report = validate_config(linear(base, other, "chat_template: auto\n"))
    assert any("<|im_start|>" in w for w in report.warnings)
    # the fixtures' own template writes only tokens they have: no warning
    report = validate_config(linear(fx / "mistral-base", fx / "mistral-prose", "chat_template: auto\n"))
    assert not any("lacks" in w for w in report.warnings)


def test_resaved_tokenizer_loads_with_transformers_4(fixture_models_dir: Path, tmp_path: Path) -> None:
    if not VENV_TF4.is_file():
        if os.environ.get("CI") == "true":
            pytest.fail(".venv-tf4 is missing in CI: `.ci/run` must create it (transformers 4.x check)")
        pytest.skip(".venv-tf4 (the last transformers 4.x release) is not prepared; `.ci/run` creates it")
    fx = fixture_models_dir
    out = tmp_path / "out"
    other = retokenized_copy(fx, tmp_path / "other", "qwen2-prose")
    base = tmp_path / "base"  # as transformers 5 saves it: a class name 4.x cannot import
    shutil.copytree(fx / "qwen2-base", base)
    config = json.loads((base / "tokenizer_config.json").read_text())
    (base / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "TokenizersBackend"}))
    extra = "tokenizer:\n  source: union\n  tokens:\n    <|tool|>: {source: {kind: zero}}\nchat_template: chatml\n"
    run_merge(linear(base, other, extra), out, device="cpu")
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    done = subprocess.run([str(VENV_TF4), str(ROOT / "tests" / "tokenizer_4x_check.py"), str(out),
                           *map(str, eval_texts(fx))], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert result["version"].startswith("4.") and result["class"] == "PreTrainedTokenizerFast"
    assert result["ids"] == encode(fx / "qwen2-base", eval_texts(fx)) == encode(out, eval_texts(fx))
    assert result["chat"] == "<|im_start|>user\nhi<|im_end|>\n"


# ---------------------------------------------------------------------------------------------------
# MoE: the output copies the base's embedding, so its tokenizer must fit it


def moe(base: Path, experts: list[Path], extra: str = "") -> str:
    listed = "".join(f"  - source_model: {e}\n" for e in experts)
    return f"base_model: {base}\ngate_mode: random\nexperts_per_token: 1\nexperts:\n{listed}{extra}"


def test_moe_tokenizer_source_outside_the_moe_is_refused_at_validate(fixture_models_dir: Path) -> None:
    fx = fixture_models_dir
    outside = f"tokenizer_source: {fx / 'qwen2-base'}\n"
    text = moe(fx / "mistral-base", [fx / "mistral-prose", fx / "mistral-code"], outside)
    with pytest.raises(ConfigError, match=r"`tokenizer_source: .*qwen2-base` is not a model of this MoE"):
        validate_config(text)
    with pytest.raises(ConfigError, match="union` is not supported for MoE"):
        validate_config(moe(fx / "mistral-base", [fx / "mistral-prose"], "tokenizer_source: union\n"))


def test_moe_tokenizer_with_ids_past_the_embedding_is_refused(fixture_models_dir: Path, tmp_path: Path) -> None:
    fx = fixture_models_dir
    expert = tmp_path / "expert"
    shutil.copytree(fx / "mistral-prose", expert)
    data = json.loads((expert / "tokenizer.json").read_text())
    data["added_tokens"] += [{"id": 4096 + i, "content": f"<|extra{i}|>", "single_word": False, "lstrip": False,
                              "rstrip": False, "normalized": False, "special": True} for i in range(2)]
    (expert / "tokenizer.json").write_text(json.dumps(data))
    text = moe(fx / "mistral-base", [fx / "mistral-code", expert], f"tokenizer_source: {expert}\n")
    with pytest.raises(VocabSizeError, match=r"2 token id\(s\) .* 4096 rows.*`<\|extra0\|>` \(4096\)"):
        validate_config(text)
    # its own tokenizer source (an expert that fits) is fine, and the run writes that expert's files
    out = tmp_path / "out"
    run_merge(moe(fx / "mistral-base", [fx / "mistral-code", expert], f"tokenizer_source: {fx / 'mistral-code'}\n"),
              out, device="cpu")
    assert (out / "tokenizer.json").read_bytes() == (fx / "mistral-code" / "tokenizer.json").read_bytes()
    from safetensors import safe_open

    with safe_open(str(next(out.glob("*.safetensors"))), framework="pt") as f:
        rows = f.get_slice("model.embed_tokens.weight").get_shape()[0]
    assert rows == json.loads((out / "config.json").read_text())["vocab_size"] == 4096


@pytest.mark.parametrize("broken", ["tokenizer.json", "tokenizer_config.json"])
def test_broken_tokenizer_files_are_named_by_the_model_never_by_the_servers_folder(
        fixture_models_dir: Path, tmp_path: Path, broken: str) -> None:
    from merger.plan.tokenizer import load_vocabulary

    folder = tmp_path / "models--org--donor" / "snapshots" / "0123abcd"
    shutil.copytree(fixture_models_dir / "mistral-base", folder)
    (folder / broken).write_text("{ not json")
    with pytest.raises(ConfigError) as refused:
        load_vocabulary(folder, rows=4096, reference="org/donor")
    assert str(refused.value).startswith("model `org/donor` has no tokenizer merger can read")
    assert "snapshots" not in str(refused.value)
