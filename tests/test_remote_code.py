"""Models that ship their own code: the `auto_map`'s files reach the output byte for byte."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from merger.engine import run_merge
from merger.errors import RemoteCodeError
from merger.plan.remote_code import auto_map_modules

TINY = dict(num_hidden_layers=2, hidden_size=16, intermediate_size=32, num_attention_heads=2,
            num_key_value_heads=1, vocab_size=64, tie_word_embeddings=False)
CONFIG_MAP = {"AutoConfig": "configuration_toy.ToyConfig", "AutoModelForCausalLM": "modeling_toy.ToyForCausalLM"}
TOKENIZER_MAP = {"AutoTokenizer": ["tokenization_toy.ToyTokenizer", None]}
CODE = {
    "configuration_toy.py": "from transformers import LlamaConfig\nclass ToyConfig(LlamaConfig):\n    model_type = 'toy'\n",
    "modeling_toy.py": "from .toy_layers import Block  # a sibling file the output needs too\nX = 1\n",
    "toy_layers.py": "class Block:\n    pass\n",
    "tokenization_toy.py": "VOCAB_FILES = {'vocab_file': 'toy.vocab'}\n",
    "unrelated_script.py": "print('not named by any auto_map, not imported')\n",
}


def tiny_model(path: Path, seed: int, with_code: bool) -> Path:
    """A random tiny Llama saved by transformers; with `with_code`, an `auto_map` and its code files."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(**TINY)).save_pretrained(path)
    if with_code:
        config = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**config, "auto_map": CONFIG_MAP}))
        tokenizer_config = {"auto_map": TOKENIZER_MAP, "vocab_file": "toy.vocab", "model_max_length": 64}
        (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
        (path / "toy.vocab").write_bytes(f"seed {seed}\n".encode() + bytes(range(256)))
        for name, text in CODE.items():
            (path / name).write_text(f"# seed {seed}\n{text}")
    return path


def linear(a: Path, b: Path) -> str:
    return f"merge_method: linear\nmodels:\n  - {{model: {a}, parameters: {{weight: 0.5}}}}\n" \
           f"  - {{model: {b}, parameters: {{weight: 0.5}}}}\n"


def test_auto_map_modules_skip_other_repos_and_nulls():
    auto_map = {"AutoConfig": "configuration_a.C", "AutoModel": "org/other--modeling_b.M",
                "AutoTokenizer": ["tokenization_a.T", None], "AutoModelForCausalLM": "configuration_a.D"}
    assert auto_map_modules(auto_map) == ["configuration_a", "tokenization_a"]


def test_code_and_vocabulary_files_reach_the_output_byte_for_byte(tmp_path: Path):
    donor = tiny_model(tmp_path / "a", 0, with_code=True)
    other = tiny_model(tmp_path / "b", 1, with_code=True)
    (other / "toy.vocab").write_bytes(b"the other model's vocabulary")
    out = tmp_path / "out"
    run_merge(linear(donor, other), out, device="cpu")
    carried = ["configuration_toy.py", "modeling_toy.py", "toy_layers.py", "tokenization_toy.py", "toy.vocab"]
    for name in carried:  # the config donor (first model) supplies config and tokenizer
        assert (out / name).read_bytes() == (donor / name).read_bytes(), name
    assert not (out / "unrelated_script.py").exists()
    assert json.loads((out / "config.json").read_text())["auto_map"] == CONFIG_MAP
    card = (out / "README.md").read_text()
    assert "trust_remote_code=True" in card and card.count("trust_remote_code=True") == 3


def test_a_plain_model_gets_no_code_and_no_trust_remote_code(tmp_path: Path):
    a, b = tiny_model(tmp_path / "a", 0, with_code=False), tiny_model(tmp_path / "b", 1, with_code=False)
    out = tmp_path / "out"
    run_merge(linear(a, b), out, device="cpu")
    assert not list(out.glob("*.py")) and "trust_remote_code" not in (out / "README.md").read_text()


def test_a_missing_code_file_is_refused_naming_it_and_leaves_nothing(tmp_path: Path):
    donor = tiny_model(tmp_path / "a", 0, with_code=True)
    (donor / "modeling_toy.py").unlink()
    out = tmp_path / "out"
    with pytest.raises(RemoteCodeError, match="`modeling_toy.py`"):
        run_merge(linear(donor, tiny_model(tmp_path / "b", 1, with_code=True)), out, device="cpu")
    assert not out.exists() and not list(tmp_path.glob(".out*"))
