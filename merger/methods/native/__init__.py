"""The CPU kernels of linear, the task-arithmetic family and the sums of products (dot products, norms)
in C (`kernels.c`), built with the machine's compiler at first use.

torch runs TIES as a dozen elementwise passes and a `bincount` per selection pass; `kernels.c` fuses
them into one pass per step, computing the same float32 operations in the same order, so the bytes
are the same (docs/decisions.md, "Native kernels for the CPU math"; `tests/test_native_kernels.py`
compares them bit for bit). torch's code stays the reference, the path on CUDA, and the path wherever
no kernel can be built: no C compiler, a failed build, or `MERGER_NATIVE=0`.

The library is built once per source, flags, compiler and CPU into `MERGER_DATA_DIR/native/` (it is
compiled for the CPU it runs on), written to a temporary name and renamed, so concurrent first uses
by several processes never load a half-written file. Nothing from a config reaches the compiler.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import struct
import subprocess
import tempfile
import threading
from pathlib import Path

import torch
from torch import Tensor

from merger.constants import DATA_DIR

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels.c")
# -ffp-contract=off: no fused multiply-add, whose single rounding would change bytes against torch
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-shared")
BUILD_SECONDS = 120

_P = ctypes.c_void_p
_I64 = ctypes.c_int64
# the kernels' codes of the dtypes they read and write (kernels.c's F32, BF16, F16)
STORAGE_TYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


class NativeKernels:
    """Typed calls into the built library. Every tensor argument is a contiguous CPU tensor.

    Args:
        library: the loaded `kernels.c`.
    """

    def __init__(self, library: ctypes.CDLL):
        self._library = library
        library.merger_count_high.argtypes = [_P, ctypes.c_int, _P, ctypes.c_int, _I64, _P]
        library.merger_count_high.restype = ctypes.c_int
        library.merger_count_window.argtypes = [_P, ctypes.c_int, _P, ctypes.c_int, _I64, ctypes.c_uint32, _P]
        library.merger_count_window.restype = None
        library.merger_gta.argtypes = [ctypes.c_int, _P, _P, _P, ctypes.c_int, _I64, _P, _P, _P, _P, _P, _P, _P,
                                       ctypes.c_int, ctypes.c_int, ctypes.c_float, ctypes.c_int, ctypes.c_float, _P,
                                       ctypes.c_int]
        library.merger_gta.restype = ctypes.c_int
        library.merger_linear.argtypes = [ctypes.c_int, _P, _P, _I64, _P, ctypes.c_int, ctypes.c_float, ctypes.c_int,
                                          _P, ctypes.c_int]
        library.merger_linear.restype = ctypes.c_int
        library.merger_max_models.restype = ctypes.c_int
        library.merger_l1_sums.argtypes = [_P, ctypes.c_int, _P, ctypes.c_int, _I64, ctypes.c_int, ctypes.c_float, _P,
                                           _P, _P, _P]
        library.merger_l1_sums.restype = None
        library.merger_uniform_below.argtypes = [_P, _P, _I64, ctypes.c_float, _P]
        library.merger_uniform_below.restype = None
        library.merger_product_sums.argtypes = [_P, ctypes.c_int, _P, ctypes.c_int, _I64, _P]
        library.merger_product_sums.restype = None
        library.merger_sum_lanes.restype = ctypes.c_int
        self.max_models = library.merger_max_models()
        self.sum_lanes = library.merger_sum_lanes()
        self.draws_as_torch = self._draws_as_torch()
        self.add_fuses = self._add_fuses()

    @staticmethod
    def reads_stored(*tensors: Tensor) -> bool:
        """Whether the kernels take these tensors: contiguous on the CPU, float32, bfloat16 or float16
        (each read as float32, exactly; a result rounded as torch casts)."""
        return all(t.device.type == "cpu" and t.dtype in STORAGE_TYPES and t.is_contiguous() for t in tensors)

    def count_high(self, x: Tensor, base: Tensor, histogram: Tensor) -> None:
        """Add the high 16 bits of every `|x − base|` float32 key to `histogram`.

        Args:
            x, base: `(n,)`, of the dtypes :meth:`reads_stored` takes (the difference is float32's).
            histogram: int64 `(≥ 2^15,)`, added to (a magnitude's high digit is below 2^15).

        Raises:
            MemoryError: the kernel's 512 KiB of counters could not be allocated.
        """
        if self._library.merger_count_high(*_stored(x), *_stored(base), x.numel(), histogram.data_ptr()):
            raise MemoryError("no memory for the TIES counting kernel's counters (512 KiB)")

    def count_window(self, x: Tensor, base: Tensor, start: int, histogram: Tensor) -> None:
        """Add to `histogram[key − start]` each `|x − base|` key in `[start, start + 2^16)`.

        Args:
            x, base: `(n,)`, as in :meth:`count_high`.
            start: the window's first key (a multiple of 2^16).
            histogram: int64 `(2^16,)`, added to.
        """
        self._library.merger_count_window(*_stored(x), *_stored(base), x.numel(), start, histogram.data_ptr())

    def gta(self, tensors: list[Tensor], base: Tensor, steps: list[SparsifyStep], weight: list[float], *,
            consensus: bool, normalize: bool, divisor: float, lambda_: float, out: Tensor | None = None) -> Tensor:
        """`generalized_task_arithmetic` (merger/methods/task_arithmetic.py) on one slice, written to `out`
        (default: summed into `tensors[0]`), which is returned.

        Args:
            tensors: n `(m,)` of the dtypes :meth:`reads_stored` takes, the non-base models (≤ `max_models`).
            base: `(m,)`, likewise.
            steps: per model, what sparsifies its task vector (see :class:`SparsifyStep`).
            weight: n weights.
            consensus: TIES sign election; normalize: divide by the (agreeing) weight sum;
            divisor: the weight sum used without consensus; lambda_: the final scale (1 skips it).
            out: `(m,)`, float32, bfloat16 or float16: the float32 result, rounded as torch's cast rounds.

        Raises:
            ValueError: more than `max_models` models; a drop mask that does not cover the slice.
        """
        n = len(tensors)
        out = tensors[0] if out is None else out
        for step in steps:
            _check_mask(step, base.numel())
        masks = (_P * n)(*(None if s.mask is None else s.mask.data_ptr() for s in steps))
        ties = torch.tensor([s.ties for s in steps], dtype=torch.int64)
        status = self._library.merger_gta(
            n, _pointers(tensors), _ints(STORAGE_TYPES[t.dtype] for t in tensors), base.data_ptr(),
            STORAGE_TYPES[base.dtype], base.numel(),
            _ints(s.kind for s in steps), _floats(s.threshold for s in steps), ties.data_ptr(), masks,
            _ints(s.factor is not None for s in steps), _floats(s.factor or 1.0 for s in steps), _floats(weight),
            int(consensus), int(normalize), divisor, int(lambda_ != 1), lambda_, out.data_ptr(), STORAGE_TYPES[out.dtype],
        )
        if status != 0:
            raise ValueError(f"native task arithmetic takes 1 to {self.max_models} models, got {n}")
        for step, left in zip(steps, ties.tolist()):
            step.ties_kept = step.ties - left
        return out

    def linear(self, tensors: list[Tensor], weight: list[float], divisor: float | None, out: Tensor) -> Tensor:
        """`linear` (merger/methods/linear.py) on one slice: `(Σᵢ wᵢ·xᵢ) / divisor` into `out`, returned, each
        `+ wᵢ·xᵢ` rounded once or twice as torch's `add_(x, alpha=w)` rounds it here (:attr:`add_fuses`).

        Args:
            tensors: n `(m,)` of the dtypes :meth:`reads_stored` takes (≤ `max_models`).
            weight: n weights.
            divisor: the weights' sum when normalizing, else None.
            out: `(m,)`, float32, bfloat16 or float16, as in :meth:`gta`.

        Raises:
            ValueError: more than `max_models` models.
        """
        n = len(tensors)
        status = self._library.merger_linear(
            n, _pointers(tensors), _ints(STORAGE_TYPES[t.dtype] for t in tensors), out.numel(), _floats(weight),
            int(divisor is not None), 1.0 if divisor is None else divisor, int(bool(self.add_fuses)), out.data_ptr(),
            STORAGE_TYPES[out.dtype],
        )
        if status != 0:
            raise ValueError(f"native linear takes 1 to {self.max_models} models, got {n}")
        return out


    def l1_sums(self, x: Tensor, base: Tensor, step: SparsifyStep) -> tuple[float, float]:
        """`(Σ|δ|, Σ|δ ⊙ keep|)` in float64 over one slice, `δ = x − base` (DARE's `rescale`), summed in a
        fixed order (the same on every machine); `step.ties_kept` is set.

        Args:
            x, base: `(m,)`, as in :meth:`count_high`.
            step: the slice's sparsifier (its factor is not applied).
        """
        _check_mask(step, base.numel())
        sums = (ctypes.c_double * 2)()
        ties = ctypes.c_int64(step.ties)
        self._library.merger_l1_sums(*_stored(x), *_stored(base), x.numel(), step.kind, step.threshold,
                                     ctypes.byref(ties), None if step.mask is None else step.mask.data_ptr(),
                                     ctypes.byref(sums, 0), ctypes.byref(sums, 8))
        step.ties_kept = step.ties - ties.value
        return sums[0], sums[1]

    def product_sums(self, x: Tensor, y: Tensor, sums: Tensor) -> None:
        """Continue `sums` over `x` and `y`: `sums[0, l] += x_j²`, `sums[1, l] += y_j²`, `sums[2, l] += x_j·y_j`
        for every entry `j ≡ l (mod sum_lanes)`, in index order, in float64 (merger/methods/reductions.py).

        Args:
            x, y: `(m,)`, of the dtypes :meth:`reads_stored` takes.
            sums: float64 `(3, sum_lanes)`, contiguous, updated in place.
        """
        self._library.merger_product_sums(*_stored(x), *_stored(y), x.numel(), sums.data_ptr())

    def uniform_below(self, numel: int, density: float, generator: torch.Generator) -> Tensor:
        """bool `(numel,)`: `u_j < density` for the CPU `generator`'s next `numel` float32 uniforms, exactly
        as `torch.rand(numel, generator=generator) < density`, and the generator advanced as torch would
        (its state is read, then written back: no other thread may draw from it meanwhile).

        Raises:
            ValueError: the generator's state is not the layout this torch was checked with.
        """
        raw = bytearray(generator.get_state().numpy().tobytes())
        if len(raw) != _STATE_BYTES:
            raise ValueError(f"unexpected CPU generator state ({len(raw)} bytes)")
        left, _, next_ = struct.unpack_from("<iiQ", raw, 8)
        state = torch.frombuffer(raw, dtype=torch.int64, count=_MT_WORDS, offset=24).to(torch.int32)
        position = torch.tensor([left, next_], dtype=torch.int64)
        mask = torch.empty(numel, dtype=torch.bool)
        self._library.merger_uniform_below(state.data_ptr(), position.data_ptr(), numel, density, mask.data_ptr())
        struct.pack_into("<i", raw, 8, int(position[0]))
        struct.pack_into("<Q", raw, 16, int(position[1]))
        raw[24:24 + 8 * _MT_WORDS] = state.to(torch.int64).bitwise_and_(0xFFFFFFFF).numpy().tobytes()
        generator.set_state(torch.frombuffer(raw, dtype=torch.uint8).clone())
        return mask

    def _draws_as_torch(self) -> bool:
        """Whether :meth:`uniform_below` gives torch's masks and leaves the generator where torch would,
        checked once on this torch (its generator's state layout is not a public interface)."""
        try:
            ours, theirs = (torch.Generator().manual_seed(20240531) for _ in range(2))
            same = all(
                torch.equal(self.uniform_below(numel, density, ours), torch.rand(numel, generator=theirs) < density)
                for numel, density in ((1000, 0.3), (700, 1 / 3), (1, 0.9))
            )
            return same and torch.equal(ours.get_state(), theirs.get_state())
        except (ValueError, RuntimeError) as err:
            log.info("native random masks off: %s", err)
            return False


    def _add_fuses(self) -> bool | None:
        """Whether torch's CPU `add_(x, alpha=w)` is one fused multiply-add here (its AVX2, AVX-512 and
        NEON kernels: True) or a multiply then an add (its default kernel: False), asked once on values
        where the two differ; None where torch's matches neither (the linear kernel is then not used)."""
        generator = torch.Generator().manual_seed(20240531)
        x, y = torch.randn(4096, generator=generator), torch.randn(4096, generator=generator)
        theirs = x.clone().add_(y, alpha=0.3)
        for fused in (True, False):
            ours = torch.empty(4096)
            self._library.merger_linear(2, _pointers([x, y]), _ints([0, 0]), 4096, _floats([1.0, 0.3]), 0, 1.0,
                                        int(fused), ours.data_ptr(), 0)
            if torch.equal(ours, theirs):
                return fused
        log.info("native linear off: torch's add rounds neither as one fused multiply-add nor as two steps")
        return None


_MT_WORDS = 624  # ATen's mt19937 state, stored as uint64 words after the seed, left, seeded and next
_STATE_BYTES = 5056  # CPUGeneratorImplState of torch 2.x on 64-bit platforms


class SparsifyStep:
    """One model's sparsifier for one slice, as :meth:`NativeKernels.gta` takes it.

    Attributes:
        kind: 0 keep everything, 1 magnitude (`threshold`, `ties`), 2 drop mask (`mask`).
        threshold: entries with `|δ|` above it are kept (kind 1).
        ties: how many entries equal to the threshold are still kept, first in flat order (kind 1).
        mask: bool `(m,)` of the kept entries (kind 2).
        factor: the L1 rescale factor, or None.
        ties_kept: set by the call: the ties this slice kept.
    """

    def __init__(self, kind: int = 0, threshold: float = 0.0, ties: int = 0, mask: Tensor | None = None,
                 factor: float | None = None):
        self.kind, self.threshold, self.ties, self.mask, self.factor = kind, threshold, ties, mask, factor
        self.ties_kept = 0


def _check_mask(step: SparsifyStep, numel: int) -> None:
    """A drop mask covers the slice (the kernel would read past its end), as torch's shape check does."""
    if step.kind == 2 and (step.mask is None or step.mask.numel() != numel or not step.mask.is_contiguous()):
        found = "none" if step.mask is None else f"{step.mask.numel()} entries"
        raise ValueError(f"a DARE mask must cover the slice's {numel} entries, got {found}")


def _stored(tensor: Tensor) -> tuple[int, int]:
    """A tensor as the kernels take one: its address and its storage type's code."""
    return tensor.data_ptr(), STORAGE_TYPES[tensor.dtype]


def _pointers(tensors: list[Tensor]) -> ctypes.Array:
    return (_P * len(tensors))(*(t.data_ptr() for t in tensors))


def _ints(values) -> ctypes.Array:
    values = list(values)
    return (ctypes.c_int * len(values))(*map(int, values))


def _floats(values) -> ctypes.Array:
    values = list(values)
    return (ctypes.c_float * len(values))(*values)


_loading = threading.Lock()


@functools.cache
def _loaded() -> NativeKernels | None:
    if os.environ.get("MERGER_NATIVE", "").strip() == "0":
        return None
    try:
        return NativeKernels(ctypes.CDLL(str(build())))
    except (OSError, subprocess.SubprocessError, AttributeError) as err:
        log.info("native kernels unavailable (%s); the task-arithmetic family runs on torch's ops", err)
        return None


def native_kernels() -> NativeKernels | None:
    """The kernels, built (once per machine) and loaded (once per process, whichever thread asks
    first); None where they cannot be (`MERGER_NATIVE=0`, no compiler, a failed build or load: the
    reason is logged), and the callers run torch's ops, which give the same bytes."""
    with _loading:
        return _loaded()


def kernels_for(models: int, *tensors: Tensor) -> NativeKernels | None:
    """The kernels (:func:`native_kernels`) when they can merge `models` inputs held in `tensors` (at most
    `max_models`, each of a dtype :meth:`NativeKernels.reads_stored` takes), else None."""
    native = native_kernels()
    return native if native is not None and models <= native.max_models and native.reads_stored(*tensors) else None


def build(folder: Path | None = None) -> Path:
    """The built library for this machine, compiled into `folder` (default `MERGER_DATA_DIR/native`) unless there.

    Raises:
        FileNotFoundError: no C compiler (`CC`, else `cc`).
        OSError: the built file is not a library (also: the folder cannot be written).
        subprocess.CalledProcessError / TimeoutExpired: the build failed or took over BUILD_SECONDS.
    """
    compiler = shutil.which(os.environ.get("CC", "").strip() or "cc")
    if compiler is None:
        raise FileNotFoundError("no C compiler (set CC, or install one such as gcc)")
    folder = folder or DATA_DIR / "native"
    key = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), " ".join(FLAGS).encode(), compiler.encode(),
                                    _cpu_fingerprint()])).hexdigest()[:16]
    target = folder / f"kernels-{key}.so"
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=".build-", suffix=".so")
    os.close(handle)
    try:
        subprocess.run([compiler, *FLAGS, "-o", temporary, str(SOURCE)], check=True, capture_output=True,
                       timeout=BUILD_SECONDS)
        ctypes.CDLL(temporary)  # a compiler that wrote no library fails here, before the file is kept
        os.chmod(temporary, 0o755)  # mkstemp's 0600 would hide it from other users of a shared folder
        os.replace(temporary, target)
    finally:
        Path(temporary).unlink(missing_ok=True)
    return target


def _cpu_fingerprint() -> bytes:
    """What `-march=native` compiles for: the CPU's model and feature flags (Linux), else the platform's names."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    wanted = [line for line in lines if line.split(":")[0].strip() in ("model name", "flags", "Features")][:2]
    return "\n".join(wanted or [platform.machine(), platform.processor()]).encode()
