"""Per-tensor reads from a model directory's safetensors shards, by positioned reads into pooled buffers.

No memory map: a mapped file's touched pages count towards the process's resident memory until
unmapped, so reading a 1.7 GB checkpoint through mmap grows RSS by 1.7 GB. `os.preadv` into a reused
buffer keeps resident memory at the tensors in flight, and releases the GIL while the kernel copies.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from merger.dtypes import DTYPE_SIZES, torch_dtype
from merger.io.buffers import BufferPool
from merger.io.metadata import StoredTensor, read_safetensors_layout, weight_files

STORAGE_DTYPES = {code: torch_dtype(code) for code in DTYPE_SIZES}  # safetensors code -> torch dtype


class TensorReader:
    """Reads single tensors by name from a model directory without loading the rest.

    Args:
        model_dir: a directory with `*.safetensors` (and optionally `model.safetensors.index.json`).
        pool: where read buffers come from.

    Raises:
        UnsafeWeightsError: the directory has only pickle checkpoints.
    """

    def __init__(self, model_dir: Path, pool: BufferPool):
        self.pool = pool
        self._where: dict[str, tuple[int, StoredTensor]] = {}
        self._fds: list[int] = []
        for path in weight_files(model_dir):
            fd = os.open(path, os.O_RDONLY)
            self._fds.append(fd)
            for name, stored in read_safetensors_layout(path).items():
                self._where[name] = (fd, stored)

    def nbytes(self, name: str) -> int:
        """Bytes of tensor `name` as stored."""
        return self._where[name][1].nbytes

    def read(self, name: str) -> torch.Tensor:
        """Tensor `name` as stored (dtype and shape), in a CPU buffer from the pool.

        Raises:
            KeyError: no such tensor in this model.
            OSError: the file ended early (a truncated download).
        """
        fd, stored = self._where[name]
        tensor = self.pool.take(stored.meta.shape, STORAGE_DTYPES[stored.meta.dtype])
        view = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
        done = 0
        while done < stored.nbytes:
            n = os.preadv(fd, [view[done:]], stored.offset + done)
            if n == 0:
                raise OSError(f"`{name}`: file ends {stored.nbytes - done} bytes early; download the model again")
            done += n
        return tensor

    def close(self) -> None:
        """Close the shard files."""
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()
