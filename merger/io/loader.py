"""Per-tensor reads from a model's safetensors shards into pooled buffers (local files or Hub ranges).

No memory map: a mapped file's touched pages count towards the process's resident memory until
unmapped, so reading a 1.7 GB checkpoint through mmap grows RSS by 1.7 GB. `os.preadv` into a reused
buffer keeps resident memory at the tensors in flight, and releases the GIL while the kernel copies.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from merger.io.buffers import BufferPool
from merger.io.sources import LocalWeights, WeightSource
from merger.dtypes import DTYPE_SIZES, torch_dtype

STORAGE_DTYPES = {code: torch_dtype(code) for code in DTYPE_SIZES}  # safetensors code -> torch dtype


class TensorReader:
    """Reads single tensors by name from a model without loading the rest.

    Args:
        model: a local model directory (read by :class:`~merger.io.sources.LocalWeights`), or any
            :class:`~merger.io.sources.WeightSource` (e.g. a Hub repo read by byte ranges).
        pool: where read buffers come from.

    Raises:
        ModelNotFoundError: the directory has no safetensors weights.
        ModelFileError subclasses: a truncated, unreadable or inconsistent file or index.
    """

    def __init__(self, model: Path | WeightSource, pool: BufferPool):
        self.pool = pool
        self.source: WeightSource = LocalWeights(model) if isinstance(model, (str, os.PathLike)) else model

    def nbytes(self, name: str) -> int:
        """Bytes of tensor `name` as stored."""
        return self.source.tensors[name].nbytes

    def expect(self, names: list[str]) -> None:
        """The tensors that will be read, in order: a remote source fetches them ahead."""
        self.source.expect(names)

    def read(self, name: str) -> torch.Tensor:
        """Tensor `name` as stored (dtype and shape), in a CPU buffer from the pool.

        Raises:
            KeyError: no such tensor in this model.
            TruncatedWeightsError: a local file ended early (it shrank after its header was checked).
            UnreadableModelFileError: the OS failed the read (an I/O error).
            HubError: a Hub range could not be read after retries.
        """
        stored = self.source.tensors[name]
        tensor = self.pool.take(stored.meta.shape, STORAGE_DTYPES[stored.meta.dtype])
        self.source.read_into(name, memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
        return tensor

    @property
    def reads_entries(self) -> bool:
        """Whether :meth:`read_entries` can read part of a tensor: True (every source reads parts); a
        reader that changes whole tensors as it reads them says False."""
        return True

    @property
    def rereads(self) -> bool:
        """Whether a tensor may be read again at no more cost than the first time (its source's `rereads`)."""
        return self.source.rereads

    def read_entries(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Entries `[start, stop)` of tensor `name`, flattened, as stored: 1-D, in a CPU buffer from the pool.

        Raises:
            ValueError: the reader cannot (:attr:`reads_entries`), or the range is not within the tensor.
            As :meth:`read` otherwise.
        """
        if not self.reads_entries:
            raise ValueError(f"tensor `{name}` can only be read whole from this source")
        stored = self.source.tensors[name]
        dtype = STORAGE_DTYPES[stored.meta.dtype]
        tensor = self.pool.take((stop - start,), dtype)
        self.source.read_part_into(name, start * dtype.itemsize, memoryview(tensor.view(torch.uint8).numpy()))
        return tensor

    def close(self) -> None:
        """Close the source's files, connections and threads."""
        self.source.close()
