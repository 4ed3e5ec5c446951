"""Per-tensor reads from a model directory's safetensors shards, by positioned reads into pooled buffers.

No memory map: a mapped file's touched pages count towards the process's resident memory until
unmapped, so reading a 1.7 GB checkpoint through mmap grows RSS by 1.7 GB. `os.preadv` into a reused
buffer keeps resident memory at the tensors in flight, and releases the GIL while the kernel copies.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .buffers import BufferPool
from .errors import TruncatedWeightsError
from .metadata import StoredTensor, read_checkpoint
from .modelfiles import unreadable

STORAGE_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


class TensorReader:
    """Reads single tensors by name from a model directory without loading the rest.

    Args:
        model_dir: a directory with `*.safetensors` (and optionally `model.safetensors.index.json`).
        pool: where read buffers come from.

    Every file's header is checked against its size first (:func:`merger.metadata.read_checkpoint`),
    so a download cut short is refused before any tensor is merged.

    Raises:
        ModelNotFoundError: the directory has no safetensors weights.
        ModelFileError subclasses: a truncated, unreadable or inconsistent file or index.
    """

    def __init__(self, model_dir: Path, pool: BufferPool):
        self.pool = pool
        self._where: dict[str, tuple[int, StoredTensor]] = {}
        self._fds: list[int] = []
        self._paths: dict[int, Path] = {}
        for path, layout in read_checkpoint(model_dir).items():
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as err:
                self.close()
                raise unreadable(path, err) from None
            self._fds.append(fd)
            self._paths[fd] = path
            for name, stored in layout.items():
                self._where[name] = (fd, stored)

    def nbytes(self, name: str) -> int:
        """Bytes of tensor `name` as stored."""
        return self._where[name][1].nbytes

    def read(self, name: str) -> torch.Tensor:
        """Tensor `name` as stored (dtype and shape), in a CPU buffer from the pool.

        Raises:
            KeyError: no such tensor in this model.
            TruncatedWeightsError: the file ended early (it shrank after its header was checked).
            UnreadableModelFileError: the OS failed the read (an I/O error).
        """
        fd, stored = self._where[name]
        tensor = self.pool.take(stored.meta.shape, STORAGE_DTYPES[stored.meta.dtype])
        view = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
        done = 0
        while done < stored.nbytes:
            try:
                n = os.preadv(fd, [view[done:]], stored.offset + done)
            except OSError as err:
                raise unreadable(self._paths[fd], err) from None
            if n == 0:
                raise TruncatedWeightsError(
                    f"`{self._paths[fd]}` ends {stored.nbytes - done} bytes early, in tensor `{name}`; download the model again"
                )
            done += n
        return tensor

    def close(self) -> None:
        """Close the shard files."""
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()
