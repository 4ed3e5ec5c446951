"""Broken and unmergeable model folders, each refused by name at `validate` (never a traceback), plus the
faults of a run: NaN in an input, an output that overflows its dtype, a full disk, a killed run's staging.

`BROKEN_MODELS` is the catalogue: (id, builder, expected error class). Each builder writes a tiny Llama
folder by hand (safetensors headers byte by byte where the case needs a broken one) and breaks one thing.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import save_file

from merger.engine import remove_stale_staging, run_merge
from merger.errors import (
    AdapterModelError,
    DiskSpaceError,
    GgufOnlyError,
    LfsPointerError,
    ModelConfigFileError,
    NonFiniteOutputError,
    NonFiniteWeightsError,
    QuantizedWeightsError,
    SafetensorsHeaderError,
    TruncatedWeightsError,
    UnreadableModelFileError,
    UnsafeWeightsError,
    WeightIndexError,
)
from merger.validate import validate_config

ROOT = Path(__file__).parents[1]
FIXTURES = ROOT / "tests" / "data" / "fixtures"
H, I, V, LAYERS = 8, 16, 32, 2  # hidden, intermediate, vocabulary, layers of the tiny Llama
CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": H, "intermediate_size": I,
    "num_hidden_layers": LAYERS, "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": V,
    "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}
LFS_POINTER = b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"0" * 64 + b"\nsize 123456\n"


def llama_shapes() -> dict[str, tuple[int, ...]]:
    shapes = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,), "lm_head.weight": (V, H)}
    for n in range(LAYERS):
        p = f"model.layers.{n}."
        shapes.update({
            p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
            p + "self_attn.q_proj.weight": (H, H), p + "self_attn.k_proj.weight": (H, H),
            p + "self_attn.v_proj.weight": (H, H), p + "self_attn.o_proj.weight": (H, H),
            p + "mlp.gate_proj.weight": (I, H), p + "mlp.up_proj.weight": (I, H), p + "mlp.down_proj.weight": (H, I),
        })
    return shapes


def llama_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {n: (torch.randn(s, generator=generator) * 0.1).to(torch.bfloat16) for n, s in llama_shapes().items()}


def write_model(folder: Path, tensors: dict[str, torch.Tensor] | None = None, config: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(llama_tensors() if tensors is None else tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(CONFIG if config is None else config))
    return folder


def write_sharded(folder: Path) -> dict[str, str]:
    """The tiny Llama in two shards plus its index; returns the index's weight_map."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = llama_tensors()
    names = sorted(tensors)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        file = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, str(folder / file))
        weight_map.update({n: file for n in part})
    write_index(folder, weight_map)
    (folder / "config.json").write_text(json.dumps(CONFIG))
    return weight_map


def write_index(folder: Path, weight_map: dict) -> None:
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def split_file(path: Path) -> tuple[dict, bytes]:
    """A safetensors file's header (parsed) and data section, read by hand."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + length]), raw[8 + length:]


def write_raw(path: Path, header: dict | bytes, data: bytes, length: int | None = None) -> None:
    """A safetensors file from a header (dict or raw bytes) and data, the 8-byte length overridable."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + data)


def edit_header(edit: Callable[[dict], object]) -> Callable[[Path], None]:
    """A builder: the intact model, then `edit` applied to its header (in place)."""
    def build(folder: Path) -> None:
        write_model(folder)
        header, data = split_file(folder / "model.safetensors")
        edit(header)
        write_raw(folder / "model.safetensors", header, data)
    return build


def with_config(config: dict | bytes) -> Callable[[Path], None]:
    def build(folder: Path) -> None:
        write_model(folder)
        (folder / "config.json").write_bytes(config if isinstance(config, bytes) else json.dumps(config).encode())
    return build


def with_tensors(rename: Callable[[str], str], dtype: torch.dtype | None = None, config: dict | None = None,
                 extra: dict[str, torch.Tensor] | None = None) -> Callable[[Path], None]:
    """A builder: the tiny model's tensors renamed (and recast), plus `extra` tensors."""
    def build(folder: Path) -> None:
        tensors = {rename(n): (t if dtype is None else t.to(dtype)) for n, t in llama_tensors().items()}
        write_model(folder, {**tensors, **(extra or {})}, config)
    return build


def gptq_tensors(folder: Path, config: dict) -> None:
    """Packed GPTQ projections: int32 `qweight`/`qzeros`, `scales`, `g_idx` in place of each linear's weight."""
    tensors = {}
    for name, shape in llama_shapes().items():
        if "_proj" in name and len(shape) == 2:
            stem = name.removesuffix(".weight")
            out_f, in_f = shape
            tensors[stem + ".qweight"] = torch.zeros(in_f // 8, out_f, dtype=torch.int32)
            tensors[stem + ".qzeros"] = torch.zeros(1, out_f // 8, dtype=torch.int32)
            tensors[stem + ".scales"] = torch.ones(1, out_f, dtype=torch.float16)
            tensors[stem + ".g_idx"] = torch.zeros(in_f, dtype=torch.int32)
        else:
            tensors[name] = torch.zeros(shape, dtype=torch.float16)
    write_model(folder, tensors, config)


def relabel_bf16_as_f32(header: dict) -> None:
    header["model.norm.weight"]["dtype"] = "F32"  # bytes unchanged: H BF16 values read as H/2 floats


def overlap(header: dict) -> None:
    a, b = header["model.norm.weight"], header["model.layers.0.input_layernorm.weight"]
    b["data_offsets"] = list(a["data_offsets"])


def truncate(folder: Path, keep: int) -> None:
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:keep])


def missing_shard(folder: Path) -> None:
    weight_map = write_sharded(folder)
    (folder / "model-00002-of-00002.safetensors").unlink()
    assert "model-00002-of-00002.safetensors" in weight_map.values()


def stale_index(folder: Path) -> None:
    weight_map = write_sharded(folder)
    weight_map["model.layers.9.mlp.up_proj.weight"] = "model-00001-of-00002.safetensors"
    write_index(folder, weight_map)


def index_moved_tensor(folder: Path) -> None:
    weight_map = write_sharded(folder)
    first = next(n for n, f in weight_map.items() if f.startswith("model-00001"))
    weight_map[first] = "model-00002-of-00002.safetensors"
    write_index(folder, weight_map)


def index_escapes(folder: Path) -> None:
    weight_map = write_sharded(folder)
    write_index(folder, {name: "../../etc/model.safetensors" for name in weight_map})


def symlink_loop(name: str) -> Callable[[Path], None]:
    def build(folder: Path) -> None:
        write_model(folder)
        (folder / name).unlink()
        os.symlink(name, folder / name)  # points at itself
    return build


def lfs_pointer(folder: Path) -> None:
    write_model(folder)
    (folder / "model.safetensors").write_bytes(LFS_POINTER)


def gguf_only(folder: Path) -> None:
    folder.mkdir(parents=True)
    (folder / "model-Q4_K_M.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(64))
    (folder / "README.md").write_text("---\nbase_model: org/model\n---\n")


def adapter(folder: Path) -> None:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": "org/base", "r": 8}))
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(8, H)},
              str(folder / "adapter_model.safetensors"))


def pickle_only(folder: Path) -> None:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(CONFIG))
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x02}q\x00.")


def duplicate_files(folder: Path) -> None:
    write_model(folder)
    save_file({"model.norm.weight": torch.ones(H, dtype=torch.bfloat16)}, str(folder / "extra.safetensors"))


def config_without(key: str) -> dict:
    return {k: v for k, v in CONFIG.items() if k != key}


def header_bytes(text: bytes) -> Callable[[Path], None]:
    def build(folder: Path) -> None:
        write_model(folder)
        _, data = split_file(folder / "model.safetensors")
        write_raw(folder / "model.safetensors", text, data)
    return build


def header_length(length: int) -> Callable[[Path], None]:
    def build(folder: Path) -> None:
        write_model(folder)
        header, data = split_file(folder / "model.safetensors")
        write_raw(folder / "model.safetensors", header, data, length=length)
    return build


@dataclass(frozen=True)
class Broken:
    """One catalogue entry: how to build the folder, and the error `validate` must raise."""

    id: str
    build: Callable[[Path], None]
    error: type[Exception]


BROKEN_MODELS = [
    # config.json
    Broken("config-not-json", with_config(b'{"model_type": "llama",'), ModelConfigFileError),
    Broken("config-is-a-list", with_config([CONFIG]), ModelConfigFileError),
    Broken("config-not-utf8", with_config(b'{"model_type": "ll\xff\xfeama"}'), ModelConfigFileError),
    Broken("config-no-layer-count", with_config(config_without("num_hidden_layers")), ModelConfigFileError),
    Broken("config-layer-count-text", with_config({**CONFIG, "num_hidden_layers": "two"}), ModelConfigFileError),
    Broken("config-lfs-pointer", with_config(LFS_POINTER), LfsPointerError),
    Broken("config-symlink-loop", symlink_loop("config.json"), UnreadableModelFileError),
    # safetensors headers
    Broken("header-length-2^40", header_length(2**40), SafetensorsHeaderError),
    Broken("header-length-past-file", header_length(10**6), TruncatedWeightsError),
    Broken("header-not-utf8", header_bytes(b'{"a\xff": 1}'), SafetensorsHeaderError),
    Broken("header-not-json", header_bytes(b'{"model.norm.weight": {'), SafetensorsHeaderError),
    Broken("header-is-a-list", header_bytes(b"[1, 2, 3]"), SafetensorsHeaderError),
    Broken("header-entry-not-object", edit_header(lambda h: h.update({"model.norm.weight": [1]})), SafetensorsHeaderError),
    Broken("header-unknown-dtype", edit_header(lambda h: h["model.norm.weight"].update(dtype="Q4")), SafetensorsHeaderError),
    Broken("header-shape-negative", edit_header(lambda h: h["model.norm.weight"].update(shape=[-8])), SafetensorsHeaderError),
    Broken("header-offsets-reversed", edit_header(lambda h: h["model.norm.weight"].update(
        data_offsets=h["model.norm.weight"]["data_offsets"][::-1])), SafetensorsHeaderError),
    Broken("header-bf16-relabelled-f32", edit_header(relabel_bf16_as_f32), SafetensorsHeaderError),
    Broken("header-ranges-overlap", edit_header(overlap), SafetensorsHeaderError),
    Broken("header-metadata-not-object", edit_header(lambda h: h.update(__metadata__=[1])), SafetensorsHeaderError),
    Broken("weights-truncated", lambda d: (write_model(d), truncate(d, (d / "model.safetensors").stat().st_size - 100)),
           TruncatedWeightsError),
    Broken("weights-cut-inside-header", lambda d: (write_model(d), truncate(d, 40)), TruncatedWeightsError),
    Broken("weights-zero-bytes", lambda d: (write_model(d), truncate(d, 0)), TruncatedWeightsError),
    Broken("weights-symlink-loop", symlink_loop("model.safetensors"), UnreadableModelFileError),
    Broken("weights-lfs-pointer", lfs_pointer, LfsPointerError),
    Broken("weights-duplicate-tensor", duplicate_files, WeightIndexError),
    # index
    Broken("index-missing-shard", missing_shard, WeightIndexError),
    Broken("index-names-absent-tensor", stale_index, WeightIndexError),
    Broken("index-maps-to-wrong-shard", index_moved_tensor, WeightIndexError),
    Broken("index-shard-outside-folder", index_escapes, WeightIndexError),
    Broken("index-not-json", lambda d: (write_sharded(d), (d / "model.safetensors.index.json").write_text("{")),
           WeightIndexError),
    # not a full-precision checkpoint
    Broken("gptq-llama", lambda d: gptq_tensors(d, CONFIG), QuantizedWeightsError),
    Broken("gptq-unknown-architecture", lambda d: gptq_tensors(d, {**CONFIG, "architectures": ["FooForCausalLM"],
                                                                   "model_type": "foo"}), QuantizedWeightsError),
    Broken("int32-weights-unknown-architecture", with_tensors(lambda n: n, dtype=torch.int32, config={
        **CONFIG, "architectures": ["FooForCausalLM"], "model_type": "foo"}), QuantizedWeightsError),
    Broken("uint32-norm", with_tensors(lambda n: n, extra={"model.norm.scale": torch.zeros(H, dtype=torch.uint32)}),
           SafetensorsHeaderError),
    Broken("awq-quantization-config", with_config({**CONFIG, "quantization_config": {"quant_method": "awq"}}),
           QuantizedWeightsError),
    Broken("exl2", with_tensors(lambda n: n.replace(".weight", ".q_weight") if "_proj" in n else n), QuantizedWeightsError),
    Broken("bitsandbytes-4bit", with_tensors(lambda n: n, extra={"model.layers.0.mlp.up_proj.weight.absmax": torch.ones(4)}),
           QuantizedWeightsError),
    Broken("bitsandbytes-8bit", with_tensors(lambda n: n, extra={"model.layers.0.mlp.up_proj.SCB": torch.ones(I)}),
           QuantizedWeightsError),
    Broken("fp8-dtype", with_tensors(lambda n: n, dtype=torch.float8_e4m3fn), QuantizedWeightsError),
    Broken("fp8-weight-scale", with_tensors(lambda n: n, extra={"model.layers.0.mlp.up_proj.weight_scale": torch.ones(1)}),
           QuantizedWeightsError),
    Broken("gguf-only", gguf_only, GgufOnlyError),
    Broken("peft-adapter-folder", adapter, AdapterModelError),
    Broken("lora-tensors-in-model", with_tensors(lambda n: n, extra={
        "model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, H)}), AdapterModelError),
    Broken("pickle-only", pickle_only, UnsafeWeightsError),
]


def linear_config(*folders: Path | str) -> str:
    models = "".join(f"  - model: {folder}\n    parameters:\n      weight: 1.0\n" for folder in folders)
    return f"merge_method: linear\nmodels:\n{models}"


def test_the_catalogue_s_intact_model_validates(tmp_path: Path) -> None:
    report = validate_config(linear_config(write_model(tmp_path / "a"), write_model(tmp_path / "b")))
    assert (report.num_layers, report.architecture) == (LAYERS, "LlamaForCausalLM")
    (tmp_path / "b" / "README.md").write_bytes(b"---\nlicense: [unclosed\n---\n")  # a card is not a weight file
    assert validate_config(linear_config(tmp_path / "a", tmp_path / "b")).num_layers == LAYERS
    write_sharded(tmp_path / "sharded")
    assert validate_config(linear_config(tmp_path / "a", tmp_path / "sharded")).num_layers == LAYERS


@pytest.mark.parametrize("case", BROKEN_MODELS, ids=lambda case: case.id)
def test_broken_model_gets_its_named_error_at_validate(case: Broken, tmp_path: Path) -> None:
    case.build(tmp_path / "broken")
    started = time.monotonic()
    with pytest.raises(case.error) as caught:
        validate_config(linear_config(write_model(tmp_path / "good"), tmp_path / "broken"))
    assert type(caught.value) is case.error
    assert str(tmp_path / "broken") in str(caught.value)
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 600
    assert time.monotonic() - started < 5


def cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "merger", *args], capture_output=True, text=True, timeout=120,
                          cwd=cwd, env={**os.environ, "PYTHONPATH": str(ROOT)})


def assert_one_line_error(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    assert all(word in lines[0] for word in words), lines[0]


@pytest.mark.parametrize("case_id, words", [
    ("header-length-2^40", ["safetensors header claims", "not a safetensors file"]),
    ("weights-lfs-pointer", ["Git LFS pointer", "git lfs pull"]),
    ("peft-adapter-folder", ["LORA adapter", "org/base", "merge_and_unload"]),
])
def test_cli_validate_says_one_line(case_id: str, words: list[str], tmp_path: Path, capsys) -> None:
    from merger.cli import main

    next(case for case in BROKEN_MODELS if case.id == case_id).build(tmp_path / "broken")
    config = tmp_path / "merge.yml"
    config.write_text(linear_config(write_model(tmp_path / "good"), tmp_path / "broken"))
    code = main(["validate", str(config)])
    assert_one_line_error(subprocess.CompletedProcess([], code, "", capsys.readouterr().err), *words)


# ---------------------------------------------------------------- faults of a run


def test_packed_gptq_tensors_of_an_unknown_architecture_are_never_merged(tmp_path: Path) -> None:
    foo = {**CONFIG, "architectures": ["FooForCausalLM"], "model_type": "foo"}
    gptq_tensors(tmp_path / "a", foo)
    gptq_tensors(tmp_path / "b", foo)
    with pytest.raises(QuantizedWeightsError, match="GPTQ"):
        run_merge(linear_config(tmp_path / "a", tmp_path / "b"), tmp_path / "out", device="cpu")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


def test_nan_in_an_input_names_the_model_and_tensor(tmp_path: Path) -> None:
    tensors = llama_tensors(1)
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    bad = write_model(tmp_path / "nan-model", tensors)
    out = tmp_path / "out"
    with pytest.raises(NonFiniteWeightsError, match=r"nan-model.*`model\.layers\.1\.mlp\.up_proj\.weight` holds NaN"):
        run_merge(linear_config(write_model(tmp_path / "good"), bad), out, device="cpu")
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["good", "nan-model"]


def test_an_overflowing_merge_is_refused_naming_the_tensor(tmp_path: Path) -> None:
    # 0.1·N(0,1) weights times 1e6 exceed float16's 65504; the first tensor in plan order is the embedding
    a, b = write_model(tmp_path / "a"), write_model(tmp_path / "b", llama_tensors(2))
    config = linear_config(a, b).replace("weight: 1.0", "weight: 1000000.0") + "parameters:\n  normalize: false\nout_dtype: float16\n"
    out = tmp_path / "out"
    with pytest.raises(NonFiniteOutputError, match=r"`model\.embed_tokens\.weight` holds NaN or inf as F16.*overflowed"):
        run_merge(config, out, device="cpu")
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]
    # the same merge within float16's range is written
    run_merge(config.replace("1000000.0", "1.0"), out, device="cpu")
    assert (out / "model.safetensors.index.json").is_file()


def test_a_hub_file_cut_short_is_refused_before_merging(hub, good_hub_model: str, tmp_path: Path) -> None:
    # validate reads only the header on the Hub, so the size check falls to the reader, before any tensor
    folder = write_model(tmp_path / "cut")
    truncate(folder, (folder / "model.safetensors").stat().st_size - 100)
    repo = hub.upload_model(folder, "alice/cut-short")
    validate_config(linear_config(good_hub_model, repo), token=hub.token)
    with pytest.raises(TruncatedWeightsError, match="header places data up to byte"):
        run_merge(linear_config(good_hub_model, repo), tmp_path / "out", token=hub.token, device="cpu")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut"]


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 2 MB tmpfs (the fixture models' merge needs 2.4 MB); skipped only where mounting is not permitted."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def fixture_linear(tmp_path: Path) -> Path:
    config = tmp_path / "linear.yml"
    config.write_text(linear_config(FIXTURES / "mistral-base", FIXTURES / "mistral-code"))
    return config


def test_a_full_disk_is_refused_before_merging_by_the_cli(small_disk: Path, tmp_path: Path, hub, monkeypatch) -> None:
    monkeypatch.setenv("HF_TOKEN", hub.token)
    repos = sorted(map(str, hub.store.repos))
    result = cli("run", str(fixture_linear(tmp_path)), str(small_disk / "out"), "--device", "cpu",
                 "--push-to", "alice/full-disk-cli")
    assert_one_line_error(result, "needs about", "free", str(small_disk))
    assert list(small_disk.iterdir()) == []
    assert sorted(map(str, hub.store.repos)) == repos  # nothing pushed, no repo made


def test_running_out_of_space_mid_write_is_named(small_disk: Path, tmp_path: Path, monkeypatch) -> None:
    import shutil

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=10**12))  # the early check passes
    with pytest.raises(DiskSpaceError, match=r"no space left on the device while writing `.*disk/\.out\.partial-"):
        run_merge(fixture_linear(tmp_path).read_text(), small_disk / "out", device="cpu")
    assert list(small_disk.iterdir()) == []


def test_stale_staging_of_dead_runs_is_removed(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale, live, foreign = tmp_path / f".out.partial-{dead.pid}", tmp_path / f".out.partial-{os.getpid()}", tmp_path / f".x.partial-{dead.pid}"
    for folder in (stale, live, foreign):
        folder.mkdir()
        (folder / "model-00001-of-00002.safetensors").write_bytes(b"partial")
    (foreign / "notes.txt").write_text("not ours")  # a folder holding other files is left alone
    assert remove_stale_staging(tmp_path) == [stale]
    assert not stale.exists() and live.exists() and foreign.exists()
    # a run into the same folder does it too
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    run_merge(linear_config(write_model(tmp_path / "models" / "a"), write_model(tmp_path / "models" / "b")),
              tmp_path / "out", device="cpu")
    assert not stale.exists() and (tmp_path / "out" / "model.safetensors.index.json").is_file()


# ---------------------------------------------------------------- on the Hub (headers read by range)
# tests/test_hostile_requests.py serves every entry of BROKEN_MODELS from the loopback Hub (the two symlink
# loops, which a repo cannot hold, from a local folder) and sends it through the CLI, /validate and /submit.


@pytest.fixture(scope="module")
def good_hub_model(hub, tmp_path_factory) -> str:
    return hub.upload_model(write_model(tmp_path_factory.mktemp("good")), "alice/tiny-llama")


def test_a_zero_byte_hub_file_is_truncated_weights_not_an_http_error(hub, good_hub_model: str, tmp_path: Path) -> None:
    from huggingface_hub import get_session, hf_hub_url

    folder = write_model(tmp_path / "empty")
    truncate(folder, 0)
    repo = hub.upload_model(folder, "alice/zero-byte-weights")
    answer = get_session().get(hf_hub_url(repo, "model.safetensors"), headers={"range": "bytes=0-99"})
    assert answer.status_code == 416  # as the Hub answers a range of an empty file
    with pytest.raises(TruncatedWeightsError, match="alice/zero-byte-weights"):
        validate_config(linear_config(good_hub_model, repo), token=hub.token)
