"""The executor's pipeline: two jobs merged at once (a failing job or a copy behind a running job never
stalls the read budget), and large tensors read, merged and written in pieces.

The first two hung before they were fixed (the reader waited for budget that nothing would release). The
read budget is normally the largest job or 64 MiB; here it is cut down to what each case needs, so
that tiny models reach the same condition as real ones.
"""

from __future__ import annotations

import json
import math
import threading
import time
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from merger.engine import run_merge
from merger.errors import MergeCancelled
from merger.execute import executor, whole_prepares
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
    real = executor.compute_job

    def failing(job, *args, **kwargs):
        if job.name == "model.layers.0.mlp.gate_proj.weight":  # the next job does not fit beside its bytes
            time.sleep(0.1)  # the job works a while, then fails (out of memory, say)
            raise MemoryError("the job's math failed")
        return real(job, *args, **kwargs)

    monkeypatch.setattr(executor, "compute_job", failing)
    a, b = write_llama(tmp_path / "a", 0), write_llama(tmp_path / "b", 1)
    config = f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.5}}\n  - model: {b}\n    parameters: {{weight: 0.5}}\n"
    error = within(60, lambda: run_merge(config, tmp_path / "out", device="cpu"))
    assert isinstance(error, MemoryError) and "the job's math failed" in str(error)
    assert not (tmp_path / "out").exists()


def test_a_failing_progress_callback_ends_the_merge_with_its_error(tmp_path: Path) -> None:
    """The callback runs on the writer thread (the worker records progress in its job store, which can fail):
    its error ends the merge as a job's would, instead of ending the writer thread and leaving the math
    thread waiting on a full queue."""
    calls = []

    def progress(fraction: float, name: str) -> None:
        calls.append(name)
        if len(calls) == 2:
            raise RuntimeError("the job store is unreachable")

    a, b = write_llama(tmp_path / "a", 0), write_llama(tmp_path / "b", 1)
    config = f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.5}}\n  - model: {b}\n    parameters: {{weight: 0.5}}\n"
    error = within(60, lambda: run_merge(config, tmp_path / "out", device="cpu", progress=progress))
    assert isinstance(error, RuntimeError) and "the job store is unreachable" in str(error)
    assert len(calls) == 2 and not (tmp_path / "out").exists()


def test_copies_behind_a_slow_job_are_written_in_order(tmp_path: Path, monkeypatch, two_jobs_at_once) -> None:
    monkeypatch.setattr(executor, "MIN_BUDGET", 3 * I * H)  # 1.5 MLP matrices: one fits beside a norm, two do not
    real = executor.compute_job

    def slow(job, *args, **kwargs):  # the scaled norms take a while: the MLP copies after them arrive meanwhile
        time.sleep(0.3)
        return real(job, *args, **kwargs)

    monkeypatch.setattr(executor, "compute_job", slow)
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


def test_a_job_that_fills_the_budget_is_merged_alone_on_every_thread_with_the_same_bytes(
    tmp_path: Path, monkeypatch, two_jobs_at_once
) -> None:
    a, b = write_llama(tmp_path / "a", 0), write_llama(tmp_path / "b", 1)
    config = f"merge_method: slerp\nbase_model: {a}\nmodels:\n  - model: {a}\n  - model: {b}\nparameters: {{t: 0.3}}\n"
    real, seen = executor.compute_job, {}

    def counted(job, *args, **kwargs):
        seen[job.name] = torch.get_num_threads()
        return real(job, *args, **kwargs)

    monkeypatch.setattr(executor, "compute_job", counted)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        run_merge(config, tmp_path / "shared", device="cpu")  # the budget (16 MiB) holds every job at once
        assert set(seen.values()) == {1}  # two jobs at once, one thread each
        monkeypatch.setattr(executor, "MIN_BUDGET", 1)  # the budget is the largest job: an MLP matrix of both
        seen.clear()
        run_merge(config, tmp_path / "alone", device="cpu")
    finally:
        torch.set_num_threads(threads)
    mlp = {name for name in seen if ".mlp." in name}
    assert len(mlp) == 6 and all(seen[name] == 2 for name in mlp)
    assert all(count == 1 for name, count in seen.items() if name not in mlp)  # back to one after each
    shards = [sorted((tmp_path / run).glob("*.safetensors")) for run in ("alone", "shared")]
    assert [p.name for p in shards[0]] == [p.name for p in shards[1]] and shards[0]
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(*shards))


def test_large_tensors_are_read_merged_and_written_in_pieces_with_the_same_bytes(tmp_path: Path, monkeypatch) -> None:
    """With pieces of 1,000 entries the MLP matrices (32,768 entries) go through the pipeline in 33 runs,
    the last one short; the output is the whole-tensor run's, byte for byte, and the hand computation's."""
    a, b = write_llama(tmp_path / "a", 0), write_llama(tmp_path / "b", 1)
    config = f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.3}}\n  - model: {b}\n    parameters: {{weight: 0.7}}\n"
    run_merge(config, tmp_path / "whole", device="cpu")
    split: list[str] = []
    real = executor._pieces

    def recorded(job, readers, device):
        pieces = real(job, readers, device)
        if pieces != [None]:
            split.append(job.name)
            assert len(pieces) == 33 and pieces[-1] == (32_000, I * H)
        return pieces

    monkeypatch.setattr(executor, "PIECE", 1000)
    monkeypatch.setattr(executor, "_pieces", recorded)
    run_merge(config, tmp_path / "pieces", device="cpu")
    assert sorted(split) == sorted(n for n in weights(a) if ".mlp." in n)  # 6 matrices; the rest fit in one piece
    shard = "model-00001-of-00001.safetensors"
    assert (tmp_path / "whole" / shard).read_bytes() == (tmp_path / "pieces" / shard).read_bytes()
    inputs_a, inputs_b, merged = weights(a), weights(b), weights(tmp_path / "pieces")
    w_a, w_b = (float(torch.tensor(w, dtype=torch.float32)) for w in (0.3, 0.7))  # the weights as float32 holds them
    for name in split:
        by_hand = inputs_a[name].double() * w_a + inputs_b[name].double() * w_b
        # bfloat16's rounding of the result, and float32's where the two terms cancel
        assert torch.allclose(merged[name].double(), by_hand, rtol=2**-8, atol=1e-6), name


SLERP = "merge_method: slerp\nbase_model: {a}\nmodels:\n  - model: {a}\n  - model: {b}\nparameters: {{t: 0.3}}\n"


@pytest.mark.parametrize(("method", "split"), [("slerp", True), ("ramplus_tl", True), ("ties", False)])
def test_a_method_with_a_prepare_pass_goes_in_pieces_where_its_slices_may_be_merged_apart(
        tmp_path: Path, monkeypatch, method: str, split: bool) -> None:
    """SLERP's angle and RAM+'s scales are whole-tensor values that every slice only reads: their MLP
    matrices go in pieces, each tensor's prepare pass run once, over its local inputs read once more. TIES
    counts its tied magnitudes off slice by slice, in order: it stays whole. Either way the bytes are
    the whole tensors' (a piece that prepared from itself would take its own angle and scales)."""
    a, b, c = write_llama(tmp_path / "a", 0), write_llama(tmp_path / "b", 1), write_llama(tmp_path / "c", 2)
    config = {
        "slerp": SLERP.format(a=a, b=b),
        "ramplus_tl": f"merge_method: ramplus_tl\nbase_model: {a}\nmodels:\n  - model: {b}\n  - model: {c}\n"
                      "parameters: {r: 0.5, alpha: 10, epsilon: 0.5}\n",  # alpha above the overlap ratio: uncapped
        "ties": f"merge_method: ties\nbase_model: {a}\nmodels:\n  - model: {b}\n    parameters: {{weight: 0.5, density: 0.5}}\n"
                f"  - model: {c}\n    parameters: {{weight: 0.5, density: 0.5}}\n",
    }[method]
    run_merge(config, tmp_path / "whole", device="cpu")
    prepared: list[str] = []
    real = whole_prepares.prepare_whole
    monkeypatch.setattr(whole_prepares, "prepare_whole", lambda job, *args: prepared.append(job.name) or real(job, *args))
    monkeypatch.setattr(executor, "PIECE", 1000)
    run_merge(config, tmp_path / "pieces", device="cpu")
    mlp = sorted(n for n in weights(a) if ".mlp." in n)
    assert sorted(prepared) == (mlp if split else [])
    shard = "model-00001-of-00001.safetensors"
    assert (tmp_path / "whole" / shard).read_bytes() == (tmp_path / "pieces" / shard).read_bytes()
    if method == "slerp":  # and the arc, by hand in float64 from the whole tensors
        inputs_a, inputs_b, merged = weights(a), weights(b), weights(tmp_path / "pieces")
        for name in mlp:
            v0, v1 = inputs_a[name].double().flatten(), inputs_b[name].double().flatten()
            theta = math.acos(float(v0 @ v1 / (v0.norm() * v1.norm())))
            by_hand = (math.sin(0.7 * theta) * v0 + math.sin(0.3 * theta) * v1) / math.sin(theta)
            assert torch.allclose(merged[name].double().flatten(), by_hand, rtol=2**-7, atol=1e-5), name


def test_a_failing_prepare_pass_ends_the_merge_with_its_error_and_its_threads(tmp_path: Path, monkeypatch) -> None:
    """A pass runs on a thread of its own, ahead of the pieces: its error reaches the merge through the
    piece that waits for it, and no thread of it outlives the merge."""
    real = whole_prepares.prepare_whole

    def failing(job, *args):
        if job.name == "model.layers.1.mlp.up_proj.weight":
            raise RuntimeError("the pass failed")
        return real(job, *args)

    monkeypatch.setattr(whole_prepares, "prepare_whole", failing)
    monkeypatch.setattr(executor, "PIECE", 1000)
    a, b = write_llama(tmp_path / "a", 0), write_llama(tmp_path / "b", 1)
    error = within(60, lambda: run_merge(SLERP.format(a=a, b=b), tmp_path / "out", device="cpu"))
    assert isinstance(error, RuntimeError) and "the pass failed" in str(error)
    assert not (tmp_path / "out").exists()
    assert not [t.name for t in threading.enumerate() if t.name.startswith("merger-prepare")]


def test_a_merge_cancelled_while_passes_run_waits_for_them_and_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    """The passes start with the merge, ahead of their pieces; each is held here until the merge is
    cancelled (at its third tensor, before any piece). The merge ends with MergeCancelled once the
    running passes are done (they read the inputs' files, closed after them), with no output and no
    thread left."""
    started: list[str] = []
    finished: list[str] = []
    cancelled = threading.Event()
    real = whole_prepares.prepare_whole

    def held(job, *args):
        started.append(job.name)
        assert cancelled.wait(60)
        time.sleep(0.3)  # still reading when the merge stops: the merge must wait for it
        value = real(job, *args)
        finished.append(job.name)
        return value

    monkeypatch.setattr(whole_prepares, "prepare_whole", held)
    monkeypatch.setattr(executor, "PIECE", 1000)
    a, b = write_llama(tmp_path / "a", 0), write_llama(tmp_path / "b", 1)
    polls = []

    def should_cancel() -> bool:
        polls.append(1)
        if len(polls) == 3:
            cancelled.set()
        return cancelled.is_set()

    error = within(60, lambda: run_merge(SLERP.format(a=a, b=b), tmp_path / "out", device="cpu", should_cancel=should_cancel))
    assert isinstance(error, MergeCancelled) and len(polls) == 3 and started
    assert finished == started  # every pass that started had ended when the merge returned
    assert not (tmp_path / "out").exists()
    assert not [t.name for t in threading.enumerate() if t.name.startswith("merger-prepare")]


def test_a_slerp_whose_whole_tensor_is_lerped_lerps_every_slice(monkeypatch) -> None:
    """Nearly parallel as a whole (|cos θ| > 0.9995: a lerp), though its second slice alone is not: that
    slice is lerped too, as the whole tensor is, not slerped at its own angle."""
    from merger.execute import job_math
    from merger.io.buffers import BufferPool
    from merger.plan.merge import TensorJob, TensorSource

    monkeypatch.setattr(job_math, "SLICE", 1024)
    v0 = torch.randn(2048, generator=torch.Generator().manual_seed(0))
    v1 = v0.clone()
    v0[1024:], v1[1024:] = 0.0, 0.0
    v0[1024:1034], v1[1034:1044] = 1e-2, 1e-2  # the second slice: orthogonal, and small
    job = TensorJob(name="w", method="slerp", sources=(TensorSource("b", "w"),), base=TensorSource("a", "w"),
                    per_model={}, global_params={"t": 0.5}, shape=(2048,), dtype="F32")
    plan = types.SimpleNamespace(seed=0, input_dtype=None)
    out = job_math.compute_job(job, [v1.clone(), v0.clone()], plan, torch.device("cpu"), BufferPool(max_retained=0), None)
    assert torch.equal(out, torch.lerp(v0, v1, 0.5))


def test_copies_of_large_tensors_go_in_pieces_unchanged(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(executor, "PIECE", 5000)
    model = write_llama(tmp_path / "model", 0)
    config = f"merge_method: passthrough\nslices:\n  - sources:\n      - model: {model}\n        layer_range: [0, 2]\n"
    run_merge(config, tmp_path / "out", device="cpu")
    merged, original = weights(tmp_path / "out"), weights(model)
    assert merged.keys() == original.keys()
    assert all(torch.equal(merged[name], tensor) for name, tensor in original.items())


def test_the_writer_takes_a_tensor_in_pieces_and_refuses_a_piece_past_its_end(tmp_path: Path) -> None:
    from merger.io.writer import ShardedWriter

    values = torch.arange(10, dtype=torch.float32)
    with ShardedWriter(tmp_path, [("a", (2, 5), "F32"), ("b", (3,), "F32")], 1 << 30) as writer:
        writer.write("a", values[:4], piece=True)
        writer.write("a", values[4:], piece=True)
        with pytest.raises(ValueError, match="expected `b`"):
            writer.write("b", torch.zeros(4), piece=True)  # 4 entries of a 3-entry tensor
        writer.write("b", torch.ones(3))
    written = weights(tmp_path)
    assert torch.equal(written["a"], values.view(2, 5)) and torch.equal(written["b"], torch.ones(3))
