"""Two jobs merged at once: a failing job or a copy behind a running job never stalls the read budget.

Both cases hung before they were fixed (the reader waited for budget that nothing would release). The
read budget is normally the largest job or 64 MiB; here it is cut down to what each case needs, so
that tiny models reach the same condition as real ones.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from merger.engine import run_merge
from merger.execute import executor
from helpers import weights

H, I, V = 8, 4096, 32  # the MLP matrices are the largest tensors: two of them exceed the budget
CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": H, "intermediate_size": I,
    "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": V,
    "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}


def write_llama(folder: Path, seed: int) -> Path:
    generator = torch.Generator().manual_seed(seed)
    shapes = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,), "lm_head.weight": (V, H)}
    for n in range(CONFIG["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes |= {p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
                   p + "self_attn.q_proj.weight": (H, H), p + "self_attn.k_proj.weight": (H, H),
                   p + "self_attn.v_proj.weight": (H, H), p + "self_attn.o_proj.weight": (H, H),
                   p + "mlp.gate_proj.weight": (I, H), p + "mlp.up_proj.weight": (I, H),
                   p + "mlp.down_proj.weight": (H, I)}
    folder.mkdir(parents=True)
    save_file({n: torch.randn(s, generator=generator).to(torch.bfloat16) for n, s in shapes.items()},
              str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(CONFIG))
    return folder


def within(seconds: float, call) -> BaseException | None:
    """Run `call` on a thread; the error it raised, or None. Fails the test if it is still running."""
    outcome: list[BaseException | None] = [None]

    def run() -> None:
        try:
            call()
        except BaseException as err:  # handed to the test
            outcome[0] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"the merge was still running after {seconds} s"
    return outcome[0]


@pytest.fixture
def two_jobs_at_once(monkeypatch):
    monkeypatch.setattr(executor, "_jobs_at_once", lambda device: 2)  # whatever the machine's cores


def test_a_failing_job_raises_its_error_instead_of_waiting(tmp_path: Path, monkeypatch, two_jobs_at_once) -> None:
    monkeypatch.setattr(executor, "MIN_BUDGET", 1)  # the budget is the largest job: one MLP matrix of both models
    real = executor._compute

    def failing(job, *args, **kwargs):
        if job.name == "model.layers.0.mlp.gate_proj.weight":  # the next job does not fit beside its bytes
            time.sleep(0.1)  # the job works a while, then fails (out of memory, say)
            raise MemoryError("the job's math failed")
        return real(job, *args, **kwargs)

    monkeypatch.setattr(executor, "_compute", failing)
    a, b = write_llama(tmp_path / "a", 0), write_llama(tmp_path / "b", 1)
    config = f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.5}}\n  - model: {b}\n    parameters: {{weight: 0.5}}\n"
    error = within(60, lambda: run_merge(config, tmp_path / "out", device="cpu"))
    assert isinstance(error, MemoryError) and "the job's math failed" in str(error)
    assert not (tmp_path / "out").exists()


def test_copies_behind_a_slow_job_are_written_in_order(tmp_path: Path, monkeypatch, two_jobs_at_once) -> None:
    monkeypatch.setattr(executor, "MIN_BUDGET", 3 * I * H)  # 1.5 MLP matrices: one fits beside a norm, two do not
    real = executor._compute

    def slow(job, *args, **kwargs):  # the scaled norms take a while: the MLP copies after them arrive meanwhile
        time.sleep(0.3)
        return real(job, *args, **kwargs)

    monkeypatch.setattr(executor, "_compute", slow)
    model = write_llama(tmp_path / "model", 0)
    config = (
        "merge_method: passthrough\nslices:\n  - sources:\n      - model: " + str(model) + "\n        layer_range: [0, 2]\n"
        "        parameters:\n          scale:\n            - {filter: post_attention_layernorm, value: 0.5}\n"
    )
    assert within(60, lambda: run_merge(config, tmp_path / "out", device="cpu")) is None
    merged, original = weights(tmp_path / "out"), weights(model)
    assert merged.keys() == original.keys()
    for name, tensor in original.items():
        expected = tensor.float() * 0.5 if "post_attention_layernorm" in name else tensor.float()
        assert torch.equal(merged[name].float(), expected.to(torch.bfloat16).float()), name
