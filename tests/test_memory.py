"""Memory is bounded by the tensors in flight, not by model size: a CLI merge of two 512 MB models stays
far below the inputs' size (the kernel's peak-RSS count of the merge process, mapped pages included)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).parents[1]
HIDDEN, INTER, LAYERS, VOCAB = 1024, 2816, 24, 8000
BUDGET_BYTES = 512 * 2**20  # the interpreter and torch alone take ~250 MB of it; measured ~420 MB


def make_model(path: Path, seed: int) -> int:
    """A bfloat16 Mistral-shaped checkpoint of about 512 MB; returns its size in bytes."""
    generator = torch.Generator().manual_seed(seed)
    block = torch.randn(1 << 20, generator=generator).bfloat16()

    def tensor(*shape: int) -> torch.Tensor:  # cheap to build: tiles of one random block
        n = 1
        for d in shape:
            n *= d
        return block.repeat(-(-n // block.numel()))[:n].reshape(shape).clone()

    tensors = {"model.embed_tokens.weight": tensor(VOCAB, HIDDEN), "lm_head.weight": tensor(VOCAB, HIDDEN),
               "model.norm.weight": tensor(HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        tensors.update({
            p + "self_attn.q_proj.weight": tensor(HIDDEN, HIDDEN), p + "self_attn.k_proj.weight": tensor(256, HIDDEN),
            p + "self_attn.v_proj.weight": tensor(256, HIDDEN), p + "self_attn.o_proj.weight": tensor(HIDDEN, HIDDEN),
            p + "mlp.gate_proj.weight": tensor(INTER, HIDDEN), p + "mlp.up_proj.weight": tensor(INTER, HIDDEN),
            p + "mlp.down_proj.weight": tensor(HIDDEN, INTER), p + "input_layernorm.weight": tensor(HIDDEN),
            p + "post_attention_layernorm.weight": tensor(HIDDEN),
        })
    path.mkdir()
    save_file(tensors, str(path / "model.safetensors"))
    config = {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": HIDDEN,
              "intermediate_size": INTER, "num_hidden_layers": LAYERS, "num_attention_heads": 16,
              "num_key_value_heads": 4, "vocab_size": VOCAB, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    (path / "config.json").write_text(json.dumps(config))
    return (path / "model.safetensors").stat().st_size


def test_cli_merge_peak_rss_is_bounded_by_tensors_in_flight(tmp_path: Path) -> None:
    sizes = [make_model(tmp_path / name, seed) for seed, name in enumerate(("a", "b"))]
    assert min(sizes) > 500e6
    config = tmp_path / "linear.yml"
    config.write_text(f"merge_method: linear\nmodels:\n  - model: {tmp_path / 'a'}\n    parameters: {{weight: 0.3}}\n"
                      f"  - model: {tmp_path / 'b'}\n    parameters: {{weight: 0.7}}\ndtype: bfloat16\n")
    # a wrapper process whose only child is the merge: its RUSAGE_CHILDREN peak is the merge's own
    wrapper = (
        "import resource, subprocess, sys;"
        f"subprocess.run([sys.executable, '-m', 'merger', 'run', {str(config)!r}, {str(tmp_path / 'out')!r},"
        " '--device', 'cpu'], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL);"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)"
    )
    done = subprocess.run([sys.executable, "-c", wrapper], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    peak = int(done.stdout.strip())
    print(f"\npeak RSS {peak / 2**20:.0f} MiB for inputs of {sum(sizes) / 2**20:.0f} MiB")
    assert peak < BUDGET_BYTES < sum(sizes) / 2
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()


def test_keeping_freed_memory_starts_no_process(monkeypatch):
    """glibc's `mallopt` is found among the loaded symbols: `ctypes.util.find_library` would fork the
    merge's process (already holding its buffers) to run `ldconfig`."""
    from merger.io import buffers

    def refuse(*args, **kwargs):
        raise AssertionError(f"a process was started: {args[:1]}")

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)
    with buffers.freed_memory_kept():
        block = torch.empty(4 << 20, dtype=torch.uint8).fill_(7)  # a slice-sized block, now from the heap
    assert int(block.sum()) == 7 * (4 << 20)
