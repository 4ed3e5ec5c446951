"""Lazy, one-tensor-at-a-time reads from a model directory's safetensors shards (memory-mapped)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from .metadata import read_safetensors_header, weight_files


class LazyLoader:
    """Reads single tensors by name from a model directory without loading the rest.

    Shards are opened with safetensors' `safe_open` (mmap) on first use and kept open; a read copies
    only the requested tensor.

    Args:
        model_dir: a directory with `*.safetensors` (and optionally `model.safetensors.index.json`).

    Raises:
        UnsafeWeightsError: the directory has only pickle checkpoints.
    """

    def __init__(self, model_dir: Path):
        self.model_dir = model_dir
        self._file_of: dict[str, Path] = {}
        for path in weight_files(model_dir):
            for name in read_safetensors_header(path):
                self._file_of[name] = path
        self._handles: dict[Path, object] = {}

    def get(self, name: str) -> torch.Tensor:
        """The tensor `name` as stored (dtype and shape), on the CPU.

        Raises:
            KeyError: no such tensor in this model.
        """
        path = self._file_of[name]
        handle = self._handles.get(path)
        if handle is None:
            handle = self._handles[path] = safe_open(str(path), framework="pt", device="cpu")
        return handle.get_tensor(name)
