"""Generate the benchmark's synthetic Mistral models, deterministically, under bench/work/models/.

Each set holds a base and two "fine-tunes" (base + small Gaussian noise) with the widths of a small
Mistral (hidden 2048, intermediate 5632, 32 heads / 8 KV heads, vocab 32000, bfloat16, untied
lm_head); the sets differ only in depth:

- full: 16 layers, ~0.85B parameters, ~1.7 GB per model;
- half: 8 layers, ~0.49B parameters, ~0.98 GB per model (embeddings and lm_head do not shrink).

Weights are N(0, 0.02), norms 1; each fine-tune adds N(0, 0.002) to every tensor. Every tensor is
drawn from its own seeded torch.Generator, so a file's bytes depend only on this spec and the torch
version, and the three files are written tensor by tensor (memory stays at one tensor). The config is
a real MistralForCausalLM config; the tokenizer files are copied from the repo's tiny fixture (its
4k-token vocabulary is smaller than vocab_size, which merging does not mind).

Idempotent: a set is regenerated only when its stamp (spec + each file's size and sha256) is missing
or no longer matches the files.

    python bench/make_models.py [--set full|half|both]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import struct
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
WORK = BENCH / "work"
MODELS = WORK / "models"
FIXTURE = BENCH.parent / "tests" / "data" / "fixtures" / "mistral-base"
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, VOCAB = 2048, 5632, 32, 8, 32000
HEAD_DIM = HIDDEN // HEADS
LAYERS = {"full": 16, "half": 8}
MODEL_NAMES = ("base", "ft1", "ft2")
WEIGHT_STD, NOISE_STD = 0.02, 0.002
STAMP = ".bench-stamp.json"
SPEC_VERSION = 1  # bump when the generation below changes


def mistral_config(layers: int) -> dict:
    """A MistralForCausalLM config.json for `layers` layers of this benchmark's widths."""
    return {
        "architectures": ["MistralForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "head_dim": HEAD_DIM,
        "hidden_act": "silu",
        "hidden_size": HIDDEN,
        "initializer_range": WEIGHT_STD,
        "intermediate_size": INTERMEDIATE,
        "max_position_embeddings": 32768,
        "model_type": "mistral",
        "num_attention_heads": HEADS,
        "num_hidden_layers": layers,
        "num_key_value_heads": KV_HEADS,
        "rms_norm_eps": 1e-05,
        "rope_theta": 1000000.0,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.57.0",
        "use_cache": True,
        "vocab_size": VOCAB,
    }


def tensor_shapes(layers: int) -> dict[str, tuple[int, ...]]:
    """Every tensor of the model, name -> shape, in file order (sorted by name, as the Hub writes)."""
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,), "lm_head.weight": (VOCAB, HIDDEN)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (HIDDEN,),
            p + "post_attention_layernorm.weight": (HIDDEN,),
            p + "self_attn.q_proj.weight": (HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.k_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.v_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.o_proj.weight": (HIDDEN, HEADS * HEAD_DIM),
            p + "mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN),
            p + "mlp.up_proj.weight": (INTERMEDIATE, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, INTERMEDIATE),
        }
    return dict(sorted(shapes.items()))


def safetensors_header(shapes: dict[str, tuple[int, ...]]) -> bytes:
    """The 8-byte length + JSON header of a bfloat16 safetensors file holding `shapes`, in order."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in shapes.items():
        size = 2 * torch.Size(shape).numel()
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    body = json.dumps(header, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)  # align the data to 8 bytes, as safetensors does
    return struct.pack("<Q", len(body)) + body


def draw(name: str, stream: str, shape: tuple[int, ...], std: float) -> torch.Tensor:
    """N(0, std) float32 noise for one tensor, from a generator seeded by (tensor name, stream)."""
    seed = int.from_bytes(hashlib.sha256(f"{stream}/{name}".encode()).digest()[:8], "little") >> 1
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * std


def sha256(path: Path) -> str:
    """The sha256 of a file, read in 16 MiB chunks."""
    digest, buffer = hashlib.sha256(), bytearray(1 << 24)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(memoryview(buffer)[:n])
    return digest.hexdigest()


def spec(set_name: str) -> dict:
    """What determines a set's bytes; a stamp with a different spec forces regeneration."""
    return {"version": SPEC_VERSION, "set": set_name, "layers": LAYERS[set_name], "torch": torch.__version__}


def stamp_matches(folder: Path, set_name: str) -> bool:
    """Whether `folder` holds a complete set whose files still have their stamped size and sha256."""
    try:
        stamp = json.loads((folder / STAMP).read_text())
    except (OSError, ValueError):
        return False
    if stamp.get("spec") != spec(set_name):
        return False
    for rel, info in stamp["files"].items():
        path = folder / rel
        if not path.is_file() or path.stat().st_size != info["size"] or sha256(path) != info["sha256"]:
            return False
    return True


def generate(folder: Path, layers: int) -> None:
    """Write base, ft1 and ft2 into `folder`, tensor by tensor."""
    shapes = tensor_shapes(layers)
    header = safetensors_header(shapes)
    for model in MODEL_NAMES:
        (folder / model).mkdir(parents=True)
        (folder / model / "config.json").write_text(json.dumps(mistral_config(layers), indent=2) + "\n")
        for file in COPIED_FILES:
            shutil.copyfile(FIXTURE / file, folder / model / file)
    files = [open(folder / model / "model.safetensors", "wb") for model in MODEL_NAMES]
    try:
        for f in files:
            f.write(header)
        for name, shape in shapes.items():
            is_norm = len(shape) == 1
            base = torch.ones(shape) if is_norm else draw(name, "base", shape, WEIGHT_STD)
            tensors = [base] + [base + draw(name, model, shape, NOISE_STD) for model in MODEL_NAMES[1:]]
            for f, tensor in zip(files, tensors):
                f.write(tensor.to(torch.bfloat16).view(torch.uint8).numpy().tobytes())
    finally:
        for f in files:
            f.close()


def ensure_set(set_name: str) -> Path:
    """The folder of `set_name`'s models (base/, ft1/, ft2/), generated unless already valid."""
    folder = MODELS / set_name
    if stamp_matches(folder, set_name):
        print(f"[models] {set_name}: present, hashes verified ({folder})", file=sys.stderr)
        return folder
    print(f"[models] {set_name}: generating {LAYERS[set_name]}-layer models into {folder} ...", file=sys.stderr)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    generate(partial, LAYERS[set_name])
    files = {str(p.relative_to(partial)): p for p in sorted(partial.rglob("*")) if p.is_file()}
    stamp = {"spec": spec(set_name), "files": {rel: {"size": p.stat().st_size, "sha256": sha256(p)} for rel, p in files.items()}}
    (partial / STAMP).write_text(json.dumps(stamp, indent=2) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    for model in MODEL_NAMES:
        print(f"[models]   {model}/model.safetensors sha256 {stamp['files'][f'{model}/model.safetensors']['sha256']}", file=sys.stderr)
    return folder


def parameter_count(set_name: str) -> int:
    """The number of parameters of each model of `set_name`."""
    return sum(torch.Size(shape).numel() for shape in tensor_shapes(LAYERS[set_name]).values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", choices=["full", "half", "both"], default="both")
    args = parser.parse_args()
    for set_name in ["full", "half"] if args.set == "both" else [args.set]:
        ensure_set(set_name)


if __name__ == "__main__":
    main()
