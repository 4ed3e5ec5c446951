"""Streaming, size-bounded safetensors shards with the Hub's names and index.

Because the plan knows every output tensor's name, shape and dtype before any math runs, each shard's
header is written first and each tensor's bytes are appended as soon as it is merged: memory holds
one tensor, never a shard. The files follow the safetensors format (8-byte little-endian header
length, JSON header padded with spaces to 8 bytes, then the raw little-endian data in header order).
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from merger.constants import SAFETENSORS_INDEX_FILE
from merger.errors import DiskSpaceError, NonFiniteOutputError, OutputWriteError
from merger.io.direct_file import DirectFile, StagingBuffer
from merger.io.loader import STORAGE_DTYPES
from merger.dtypes import DTYPE_SIZES

OnShard = Callable[[Path, "bytes | None"], None]  # (finished shard, its sha256 or None when not computed)


def is_finite(tensor: torch.Tensor) -> bool:
    """Whether every entry of a CPU tensor is finite (integer and empty tensors always are).

    One `aminmax` pass: NaN propagates to both results and ±inf is the minimum or maximum, so two
    finite results mean every entry is finite. It reads the tensor once, with no temporary; measured
    on 50M entries with one thread: 31 ms BF16, 43 ms F16, 51 ms F32 (~3 GB/s, ten times the speed of
    writing the bytes to disk here), where `isfinite(t).all()` took 0.5–1.3 s and a BF16 tensor's
    full-size bool temporary.
    """
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))


def output_error(err: OSError, path: Path, needed: int | None) -> OutputWriteError:
    """The named error for an OS refusal to write `path`: :class:`DiskSpaceError` when out of space.

    Args:
        err: what the OS raised.
        path: the file or folder being written.
        needed: bytes the whole output needs, when known.
    """
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        need = f" (the output needs about {format_bytes(needed)} in all)" if needed else ""
        return DiskSpaceError(
            f"no space left on the device while writing `{path}`{need}; free some space or choose another output folder"
        )
    return OutputWriteError(f"cannot write `{path}`: {err.strerror or type(err).__name__}; check the output folder")


def format_bytes(n: int) -> str:
    """`1_234_567` -> `1.23 MB` (decimal units, as on the Hub)."""
    for unit, size in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} bytes"



@dataclass(frozen=True)
class TensorSlot:
    """Where one output tensor goes: its shard and byte range within the shard's data section."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    shard: int
    begin: int
    end: int


def layout_shards(tensors: Sequence[tuple[str, tuple[int, ...], str]], max_shard_size: int) -> list[list[TensorSlot]]:
    """Assign tensors, in order, to shards of at most `max_shard_size` bytes (a larger tensor gets its own).

    Args:
        tensors: (name, shape, safetensors dtype code) in write order.
        max_shard_size: bytes of tensor data per shard.

    Returns:
        One list of :class:`TensorSlot` per shard.
    """
    shards: list[list[TensorSlot]] = [[]]
    used = 0
    for name, shape, dtype in tensors:
        size = DTYPE_SIZES[dtype] * math.prod(shape)
        if shards[-1] and used + size > max_shard_size:
            shards.append([])
            used = 0
        shards[-1].append(TensorSlot(name, tuple(shape), dtype, len(shards) - 1, used, used + size))
        used += size
    return shards


def shard_file_name(index: int, count: int) -> str:
    """The Hub's shard name, e.g. `model-00001-of-00003.safetensors` (index is 0-based)."""
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def _header(slots: list[TensorSlot]) -> bytes:
    header = {"__metadata__": {"format": "pt"}}
    for slot in slots:
        header[slot.name] = {"dtype": slot.dtype, "shape": list(slot.shape), "data_offsets": [slot.begin, slot.end]}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


class ShardedWriter:
    """Writes the planned tensors, in plan order, into Hub-named shards plus `model.safetensors.index.json`.

    Use as a context manager; :meth:`write` each tensor in the order given at construction. The index
    is written on a clean exit only, so an interrupted run leaves no index claiming missing tensors.

    Args:
        out_dir: the (temporary) output directory.
        tensors: (name, shape, safetensors dtype code) of every output tensor, in write order.
        max_shard_size: bytes of tensor data per shard.
        on_shard: called with each shard's path and the sha256 of its bytes (hashed as they are
            written: an upload need not read the file back to name it) as soon as its last tensor is
            written and it is closed (so before the next one is opened, and the last one before the
            index is written), e.g. to upload it while the next is merged. It may delete the file;
            what it raises stops the run.

    Raises:
        ValueError: a tensor arrives out of order or with another shape than planned.
        NonFiniteOutputError: a tensor holds NaN or inf once cast to its output dtype; nothing of it is written.
        OutputWriteError / DiskSpaceError: the OS refused a write (the path, and the space the output needs).
    """

    def __init__(
        self,
        out_dir: Path,
        tensors: Sequence[tuple[str, tuple[int, ...], str]],
        max_shard_size: int,
        on_shard: OnShard | None = None,
    ):
        self.out_dir = out_dir
        self.on_shard = on_shard
        self.shards = layout_shards(tensors, max_shard_size)
        self._order = [slot for shard in self.shards for slot in shard]
        self._next = 0
        self._filled = 0  # entries of the next tensor written so far, by pieces
        self._staging: StagingBuffer | None = None  # made at the first write, released on exit
        self._file: DirectFile | None = None
        self._file_shard = -1
        self._digest = None  # the open shard's hashlib.sha256 so far, when shards are handed on
        self.total_bytes = sum(slot.end - slot.begin for slot in self._order)

    def __enter__(self) -> "ShardedWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self._exit(exc_type)
        finally:
            if self._staging is not None:
                self._staging.close()
                self._staging = None

    def _exit(self, exc_type) -> None:
        if exc_type is None and self._next == len(self._order):
            self._finish_shard()
            self._write_index()
            return
        if self._file is not None:
            try:
                self._file.close()
            except OSError:  # the run's own error is the one to report
                pass
        if exc_type is None:
            raise ValueError(f"writer closed after {self._next} of {len(self._order)} planned tensors")

    def _finish_shard(self) -> None:
        """Close the open shard (flushing: a full disk can show only here) and hand it to `on_shard`."""
        if self._file is None:
            return
        path = Path(self._file.name)
        try:
            self._file.close()
        except OSError as err:
            raise output_error(err, path, self.total_bytes) from None
        finally:
            self._file = None
        if self.on_shard is not None:
            self.on_shard(path, self._digest.digest())

    def write(self, name: str, tensor: torch.Tensor, piece: bool = False) -> bool:
        """Cast `tensor` to its planned dtype and append its bytes to its shard; True once the tensor is complete.

        With `piece`, `tensor` is the next run of the tensor's flattened entries (1-D); the tensor is
        complete once its pieces add up to its size.
        """
        slot = self._order[self._next]
        numel = math.prod(slot.shape)
        fits = tensor.dim() == 1 and self._filled + tensor.numel() <= numel if piece else tuple(tensor.shape) == slot.shape
        if slot.name != name or not fits:
            raise ValueError(f"writer expected `{slot.name}` {list(slot.shape)}, got `{name}` {list(tensor.shape)}")
        data = tensor.detach().to(device="cpu", dtype=STORAGE_DTYPES[slot.dtype]).contiguous()
        if not is_finite(data):
            raise NonFiniteOutputError(
                f"merged tensor `{name}` holds NaN or inf as {slot.dtype}; the merge was stopped and nothing was kept."
            )
        path = self.out_dir / shard_file_name(slot.shard, len(self.shards))
        try:
            if slot.shard != self._file_shard:
                self._staging = self._staging or StagingBuffer()
                self._file = DirectFile(path, self._staging)
                self._digest = hashlib.sha256() if self.on_shard is not None else None
                self._append(_header(self.shards[slot.shard]))
                self._file_shard = slot.shard
            self._append(memoryview(data.reshape(-1).view(torch.uint8).numpy()))
        except OSError as err:
            raise output_error(err, path, self.total_bytes) from None
        self._filled += tensor.numel()
        if self._filled < numel:
            return False
        self._filled = 0
        self._next += 1
        if self._next == len(self._order) or self._order[self._next].shard != slot.shard:
            # the shard is complete: closed and handed on now, not when the next tensor arrives (a
            # streamed push starts its upload one tensor's download and merge sooner); outside the
            # try, what `on_shard` raises is its own error
            self._finish_shard()
        return True

    def _append(self, data: bytes | memoryview) -> None:
        self._file.write(data)
        if self._digest is not None:
            self._digest.update(data)  # hashlib releases the GIL for large buffers

    def _write_index(self) -> None:
        weight_map = {slot.name: shard_file_name(slot.shard, len(self.shards)) for slot in self._order}
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        path = self.out_dir / SAFETENSORS_INDEX_FILE
        try:
            path.write_text(json.dumps(index, indent=2) + "\n")
        except OSError as err:
            raise output_error(err, path, self.total_bytes) from None
