"""The native CPU kernels of the task-arithmetic family give torch's bytes, bit for bit.

Every merge below runs twice on the same inputs, as the executor runs it (prepare over the slices,
then the merge slice by slice): once through `merger/methods/native/kernels.c`, once through torch's
ops (the kernels switched off), and the float32 results must be identical. Inputs are bfloat16 values,
so many task-vector magnitudes are equal and the TIES cut falls among ties spread over several slices;
some entries have `x = base` (zero task vectors) and some bases are −0.0, where signed zeros show.
One step is not torch's to the bit by construction: `rescale`'s float64 sums are added in a fixed
order of the kernel's own, so the float32 factor can differ where that rounding straddles a float32
step (docs/decisions.md); on these inputs it does not, and the sums are checked against exact ones.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from merger.methods import native, sparsify
from merger.methods.native import build, native_kernels
from merger.methods.registry import SLICE, get_method
from merger.methods.sparsify import magnitude_trims, slices_of
from merger.methods.slerp import LERP

NUMEL = 2 * SLICE + 12_345  # three slices, the last one short
STORED = [torch.bfloat16, torch.float16, torch.float32]  # the dtypes the kernels read


@pytest.fixture(scope="module")
def kernels() -> native.NativeKernels:
    built = native_kernels()
    if built is None:
        if os.environ.get("CI") == "true":
            pytest.fail("the native kernels did not build on CI (is a C compiler installed?)")
        pytest.skip("no C compiler here: the native kernels cannot be built")
    return built


def inputs(models: int, seed: int = 0) -> tuple[list[torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(NUMEL, generator=g) * 0.02).bfloat16().float()
    base[::997] = -0.0
    tensors = []
    for _ in range(models):
        x = (base + torch.randn(NUMEL, generator=g) * 0.002).bfloat16().float()
        x[::1009] = base[::1009]  # zero task vectors
        tensors.append(x)
    return tensors, base


def merged_as_the_executor_does(method: str, tensors: list[torch.Tensor], base: torch.Tensor, **kwargs) -> torch.Tensor:
    merge = get_method(method)
    if merge.uses_generator:
        kwargs["generator"] = torch.Generator().manual_seed(7)
    if merge.prepare is not None:
        kwargs["prepared"] = merge.prepare(lambda: slices_of([t.clone() for t in tensors], base), tuple(base.shape),
                                           **kwargs)
    out = torch.empty_like(base)
    for start in range(0, NUMEL, SLICE):
        stop = min(start + SLICE, NUMEL)
        piece = merge.function([t[start:stop].clone() for t in tensors], base=base[start:stop].clone(), **kwargs)
        out[start:stop] = piece
    return out


def with_torch_ops(monkeypatch: pytest.MonkeyPatch, run):
    with monkeypatch.context() as patch:
        patch.setattr(native, "native_kernels", lambda: None)  # what `kernels_for` asks (merges, linear)
        patch.setattr(sparsify, "native_kernels", lambda: None)
        return run()


CASES = [
    ("ties", 2, {"weight": [0.5, 0.5], "density": [0.5, 0.3]}),
    ("ties", 3, {"weight": [0.7, -0.4, 1.1], "density": [0.2, 0.5, 0.9], "lambda_": 0.6}),
    ("ties", 2, {"weight": [0.5, 0.5], "density": [1.0, 0.0], "normalize": False}),
    ("ties", 2, {"weight": [1.0, 1.0], "density": [0.5, 0.5], "rescale": True}),
    ("dare_ties", 2, {"weight": [0.5, 0.5], "density": [0.5, 0.7]}),
    ("dare_linear", 3, {"weight": [0.3, 0.3, 0.4], "density": [0.4, 0.4, 1.0], "rescale": False}),
    ("task_arithmetic", 2, {"weight": [0.6, 0.9], "lambda_": 2.0}),
    ("task_arithmetic", 2, {"weight": [0.6, 0.9], "normalize": True}),
    ("task_arithmetic", 2, {"weight": [0.5, -0.5], "normalize": True}),  # weights sum to 0: divide by 1
]


@pytest.mark.parametrize(("method", "models", "params"), CASES)
def test_native_merge_equals_torch_ops_bit_for_bit(kernels, monkeypatch, method, models, params) -> None:
    tensors, base = inputs(models)
    ours = merged_as_the_executor_does(method, tensors, base, **params)
    reference = with_torch_ops(monkeypatch, lambda: merged_as_the_executor_does(method, tensors, base, **params))
    assert torch.equal(ours.view(torch.int32), reference.view(torch.int32))
    assert not torch.equal(ours, base)  # the merge did something


@pytest.mark.parametrize("stored", STORED)
def test_native_counts_select_the_same_threshold_and_ties(kernels, monkeypatch, stored) -> None:
    """The counting kernels on slices as stored against torch's ops on float32 copies of them."""
    tensors, base = inputs(3, seed=1)
    densities = [0.5, 0.01, 0.0, 1.0, 0.999]
    tensors = [t.to(stored) for t in tensors + tensors[:2]]
    base = base.to(stored)

    def cuts(tensors, base):
        trims = magnitude_trims(lambda: slices_of(tensors, base), densities)
        return [None if trim is None else trim.selection.cut() for trim in trims]

    ours = cuts(tensors, base)
    assert ours == with_torch_ops(monkeypatch, lambda: cuts([t.float() for t in tensors], base.float()))
    assert ours == with_torch_ops(monkeypatch, lambda: cuts(tensors, base))  # torch's path converts, too
    assert ours[0][1] > 0  # the median magnitude is tied: some ties are kept, in flat order
    assert ours[2] == (float("inf"), 0) and ours[3] is None  # density 0 keeps nothing, 1 everything


def test_the_build_is_kept_and_never_half_written(tmp_path: Path) -> None:
    first = build(tmp_path)
    stamp = first.stat().st_mtime_ns
    assert build(tmp_path) == first and first.stat().st_mtime_ns == stamp  # built once
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary file left


def test_without_a_compiler_torch_ops_run_and_say_why(tmp_path: Path) -> None:
    """A fresh process with no compiler: `native_kernels()` is None and a TIES merge still runs, on torch."""
    script = (
        "import logging, torch; logging.basicConfig(level=logging.INFO)\n"
        "from merger.methods.native import native_kernels\n"
        "from merger.methods.registry import get_method\n"
        "assert native_kernels() is None\n"
        "x = torch.tensor([1.0, -2.0, 3.0, 0.5]); base = torch.zeros(4)\n"
        "out = get_method('ties').function([x.clone(), -x], base=base, weight=[1.0, 0.5], density=[0.5, 1.0])\n"
        "print(out.tolist())\n"
    )
    env = dict(os.environ, CC=str(tmp_path / "no-such-compiler"), MERGER_DATA_DIR=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "no C compiler" in done.stderr
    # ties, by hand: trims keep |x| ≥ 2 of model 1 (density .5 of 4: 3.0 and -2.0) and all of -x;
    # weighted: [0, -2, 3, 0] and [-.5, 1, -1.5, -.25]; signs of the sums: [-, -, +, -];
    # agreeing: entry 0 only model 2 (-.5, w .5), 1 model 1 (-2, w 1), 2 model 1 (3, w 1), 3 model 2
    assert done.stdout.strip() == str([-1.0, -2.0, 3.0, -0.5])


def test_merger_native_0_turns_them_off(tmp_path: Path) -> None:
    script = "from merger.methods.native import native_kernels\nprint(native_kernels())"
    env = dict(os.environ, MERGER_NATIVE="0", MERGER_DATA_DIR=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "None" and not (tmp_path / "native").exists()


@pytest.mark.parametrize("seed", [0, 2**62 + 12345])
def test_native_random_masks_are_torchs_stream(kernels, seed) -> None:
    """DARE's masks: torch's `rand < density` drawn from the same seeded generator, across refills of
    the 624-word state, and the generator left where torch leaves it."""
    ours, theirs = (torch.Generator().manual_seed(seed) for _ in range(2))
    torch.rand(3, generator=ours), torch.rand(3, generator=theirs)  # not at the start of the state
    for numel, density in ((5000, 0.5), (1, 0.25), (1500, 0.9)):
        assert torch.equal(kernels.uniform_below(numel, density, ours), torch.rand(numel, generator=theirs) < density)
    assert torch.equal(ours.get_state(), theirs.get_state())
    assert kernels.draws_as_torch


def test_native_l1_sums_are_float64_sums_of_the_magnitudes(kernels) -> None:
    """The rescale sums against exact sums (math.fsum) of the same magnitudes: float64 rounding only."""
    import math

    from merger.methods.native import SparsifyStep

    tensors, base = inputs(1, seed=4)
    x = tensors[0][:300_001]
    b = base[:300_001]
    mask = torch.rand(x.numel(), generator=torch.Generator().manual_seed(1)) < 0.4
    before, after = kernels.l1_sums(x, b, SparsifyStep(2, mask=mask))
    magnitudes = (x - b).abs().double().tolist()
    assert before == pytest.approx(math.fsum(magnitudes), rel=1e-13)
    assert after == pytest.approx(math.fsum(m for m, keep in zip(magnitudes, mask.tolist()) if keep), rel=1e-13)


def test_a_mask_that_does_not_cover_the_slice_is_refused_not_read_past(kernels) -> None:
    """The kernel would read past the mask's end; torch's path refuses the shapes, and so does this one."""
    from merger.methods.native import SparsifyStep

    x, base = torch.ones(1000), torch.zeros(1000)
    short = SparsifyStep(2, mask=torch.ones(400, dtype=torch.bool))
    with pytest.raises(ValueError, match="cover the slice's 1000 entries, got 400"):
        kernels.gta([x], base, [short], [1.0], consensus=False, normalize=False, divisor=1.0, lambda_=1.0)
    with pytest.raises(ValueError, match="got 400"):
        kernels.l1_sums(x, base, short)


def test_a_compiler_that_writes_no_library_leaves_nothing_kept(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("CC", "true")  # exits 0 and writes nothing
    with pytest.raises(OSError):
        build(tmp_path)
    assert list(tmp_path.iterdir()) == []  # the next process tries again


FUSED_CASES = CASES + [
    ("linear", 2, {"weight": [0.6, 0.4]}),
    ("linear", 3, {"weight": [0.3, -1.2, 0.8], "normalize": False}),
    ("linear", 3, {"weight": [0.25, 0.7, 0.05], "normalize": True}),
    ("slerp", 1, {"t": 0.3}),  # the arc: linear's kernel with the prepared coefficients
    ("slerp", 1, {"t": 0.85}),
    ("slerp", 1, {"t": 0.0}),  # an endpoint: the base, cast
]


def prepared_for(merge, inputs: list[torch.Tensor], kwargs: dict) -> dict:
    """The method's keyword arguments as the executor passes them: a fresh generator, the prepare pass
    over slices of `inputs` (as stored for the fused path, float32 copies for torch's)."""
    kwargs = dict(kwargs)
    if merge.uses_generator:
        kwargs["generator"] = torch.Generator().manual_seed(7)
    if merge.prepare is not None:
        tensors = list(inputs)
        base = tensors.pop() if merge.base != "none" else None
        kwargs["prepared"] = merge.prepare(lambda: slices_of(tensors, base), (NUMEL,), **kwargs)
    return kwargs


@pytest.mark.parametrize(("method", "models", "params"), FUSED_CASES)
@pytest.mark.parametrize("stored", STORED)
@pytest.mark.parametrize("out_dtype", STORED)
def test_fused_slices_from_stored_dtypes_equal_float32_math_then_the_cast(
    kernels, monkeypatch, method, models, params, stored, out_dtype
) -> None:
    """The registry's `fused` path (stored inputs in, prepared from the stored slices too, the output dtype
    out) against torch's ops on float32 copies followed by torch's cast, slice by slice as the executor
    runs either."""
    merge = get_method(method)
    tensors, base = inputs(models, seed=3)
    inputs_stored = [t.to(stored) for t in tensors] + ([base.to(stored)] if merge.base != "none" else [])
    fused_out = torch.empty(NUMEL, dtype=out_dtype)
    kwargs = prepared_for(merge, inputs_stored, params)
    for start in range(0, NUMEL, SLICE):
        parts = [t[start:start + SLICE] for t in inputs_stored]
        with_base = {"base": parts.pop()} if merge.base != "none" else {}
        assert merge.fused(parts, **with_base, out=fused_out[start:start + SLICE], **kwargs)

    def reference() -> torch.Tensor:
        out = torch.empty(NUMEL, dtype=out_dtype)
        arguments = prepared_for(merge, [t.to(torch.float32, copy=True) for t in inputs_stored], params)
        for start in range(0, NUMEL, SLICE):
            parts = [t[start:start + SLICE].to(torch.float32, copy=True) for t in inputs_stored]  # worked on in place
            with_base = {"base": parts.pop()} if merge.base != "none" else {}
            out[start:start + SLICE] = merge.function(parts, **with_base, **arguments).to(out_dtype)
        return out

    expected = with_torch_ops(monkeypatch, reference)
    bits = torch.int32 if out_dtype == torch.float32 else torch.int16
    assert torch.equal(fused_out.view(bits), expected.view(bits))
    assert not torch.equal(fused_out.float(), inputs_stored[0].float())  # the merge did something


def test_fused_declines_what_the_kernels_do_not_read(kernels) -> None:
    """A dtype the kernels do not read: False, the output untouched, and the engine converts instead."""
    x = torch.ones(8, dtype=torch.float64)
    out = torch.full((8,), 7.0)
    assert get_method("linear").fused([x, x], out=out, weight=[0.5, 0.5]) is False
    assert get_method("task_arithmetic").fused([x], base=x, out=out, weight=[1.0]) is False
    y = torch.ones(8, dtype=torch.bfloat16)
    assert get_method("slerp").fused([y], base=y, out=out, t=0.5, prepared=LERP) is False  # lerped: torch's lerp
    assert torch.equal(out, torch.full((8,), 7.0))


def test_linear_rounds_as_torchs_add_rounds_on_this_cpu_kind(tmp_path: Path) -> None:
    """torch's default CPU kernel (no AVX2) adds `alpha·x` in two roundings, its vector kernels in one:
    the kernels ask which, so the fused linear gives torch's bytes under either (found in review)."""
    script = (
        "import torch\n"
        "from merger.methods.native import native_kernels\n"
        "from merger.methods.registry import get_method\n"
        "g = torch.Generator().manual_seed(5)\n"
        "x, y = (torch.randn(70_000, generator=g).bfloat16() for _ in range(2))\n"
        "out = torch.empty(70_000, dtype=torch.bfloat16)\n"
        "assert get_method('linear').fused([x, y], out=out, weight=[0.3, 0.7])\n"
        "expected = get_method('linear').function([x.float(), y.float()], weight=[0.3, 0.7]).bfloat16()\n"
        "print(native_kernels().add_fuses, torch.equal(out.view(torch.int16), expected.view(torch.int16)))\n"
    )
    for capability, fuses in (("default", "False"), (None, None)):
        env = dict(os.environ, MERGER_DATA_DIR=str(tmp_path))
        env.pop("ATEN_CPU_CAPABILITY", None)
        if capability:
            env["ATEN_CPU_CAPABILITY"] = capability
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        found, same = done.stdout.split()
        assert same == "True" and (fuses is None or found == fuses), done.stdout
