"""Helpers the test modules share: reading a model folder's tensors, scoring text, free ports."""

from __future__ import annotations

import math
import socket
from pathlib import Path

import torch


def free_port() -> int:
    """A port the OS says is free on 127.0.0.1 (bind to 0, read it back)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model folder, over all its safetensors shards."""
    from safetensors import safe_open

    out = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            out.update({name: f.get_tensor(name) for name in f.keys()})
    return out


def bits_per_token(model_dir: Path, text: str, context: int = 256) -> float:
    """Mean −log2 p(token) of `text` under a model folder, scored in windows of `context` tokens with BOS
    in front of each (the protocol the fixtures' published perplexities use): 2 ** result is the perplexity."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids), context - 1):
            window = torch.tensor([[tokenizer.bos_token_id] + ids[start:start + context - 1]])
            logp = torch.log_softmax(model(window).logits[0, :-1], dim=-1)
            total -= float(logp.gather(-1, window[0, 1:, None]).sum())
            count += window.shape[1] - 1
    return total / count / math.log(2)
