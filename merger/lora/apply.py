"""A model's tensors with a LoRA adapter applied as they are read: no merged copy on disk."""

from __future__ import annotations

from pathlib import Path

import torch

from merger.io.buffers import BufferPool
from merger.io.loader import TensorReader
from merger.io.sources import WeightSource
from merger.lora.adapter import LoraAdapter, read_adapter


class AdaptedTensorReader(TensorReader):
    """A :class:`~merger.io.loader.TensorReader` that returns `W + s·B@A` for the tensors an adapter changes
    (or the adapter's own weight, for its `modules_to_save`).

    Shapes and dtypes are the model's (the sum is computed in float32 and stored back in the
    tensor's dtype, as peft's `merge_and_unload` does), so metadata and planning are unchanged.

    Args:
        model_dir: the model's folder.
        pool: where read buffers come from.
        adapter: the checked adapter (its targets checked against the model at validation).

    Raises:
        As :class:`~merger.io.loader.TensorReader`.
    """

    def __init__(self, model_dir: Path | WeightSource, pool: BufferPool, adapter: LoraAdapter):
        super().__init__(model_dir, pool)
        self.adapter = adapter

    @property
    def reads_entries(self) -> bool:
        """False: the adapter's change is computed on whole weights."""
        return False

    def read(self, name: str) -> torch.Tensor:
        """Tensor `name` as stored, plus the adapter's change when it has one (same dtype and shape)."""
        tensor = super().read(name)
        if name in self.adapter.pairs:
            tensor.copy_(self.adapter.adapted(name, tensor))
        return tensor


def open_reader(model_dir: Path | WeightSource, pool: BufferPool, adapter_dir: Path | None, reference: str) -> TensorReader:
    """The reader of one input: plain, or with its LoRA applied.

    Args:
        model_dir: the model's folder, or its weights' source (a Hub model read by byte ranges).
        pool: where read buffers come from.
        adapter_dir: the LoRA adapter's folder, or None.
        reference: the input as the config names it (`model+lora`), for messages.

    Raises:
        LoraAdapterError: the adapter cannot be applied (see :func:`~merger.lora.adapter.read_adapter`).
    """
    if adapter_dir is None:
        return TensorReader(model_dir, pool)
    return AdaptedTensorReader(model_dir, pool, read_adapter(adapter_dir, reference))
