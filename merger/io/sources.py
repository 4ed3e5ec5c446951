"""Where a model's tensor bytes come from: one interface for local files and for the Hub's byte ranges.

:class:`~merger.io.loader.TensorReader` asks a :class:`WeightSource` for each tensor's bytes; the
source is a local folder (:class:`LocalWeights`, positioned reads) or a Hub repo read by HTTP range
requests (:class:`merger.publish.hub_ranges.HubWeights`, prefetched in the order the plan reads).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from merger.errors import TruncatedWeightsError
from merger.io.metadata import StoredTensor, read_checkpoint
from merger.io.modelfiles import unreadable


class WeightSource(Protocol):
    """A model's stored tensors, readable one at a time.

    Attributes:
        tensors: tensor name -> :class:`~merger.io.metadata.StoredTensor` (shape, dtype, bytes).
        rereads: whether a tensor may be read again at no more cost than the first time (a local file,
            from the page cache); a Hub source fetches each byte once, in the order `expect` gave.
    """

    tensors: dict[str, StoredTensor]
    rereads: bool

    def expect(self, names: Sequence[str]) -> None:
        """Hint: the tensors that will be read, in order (repeats included); a source may fetch ahead."""

    def read_into(self, name: str, view: memoryview) -> None:
        """Fill `view` (exactly the tensor's `nbytes`) with tensor `name`'s stored bytes.

        Raises:
            KeyError: no such tensor. MergerError subclasses: the bytes could not be read.
        """

    def read_part_into(self, name: str, start: int, view: memoryview) -> None:
        """Fill `view` with bytes `[start, start + len(view))` of tensor `name`; a tensor read in parts
        is read in order, its last part ending at its last byte.

        Raises:
            ValueError: the range is not within the tensor. As :meth:`read_into` otherwise.
        """

    def close(self) -> None:
        """Release files, connections and threads."""


def read_file_range(fd: int, path: Path, offset: int, view: memoryview, what: str) -> None:
    """Fill `view` from byte `offset` of an open file, by positioned reads (no mmap, GIL released).

    Raises:
        TruncatedWeightsError: the file ended early. UnreadableModelFileError: the OS failed the read.
    """
    done = 0
    while done < len(view):
        try:
            n = os.preadv(fd, [view[done:]], offset + done)
        except OSError as err:
            raise unreadable(path, err) from None
        if n == 0:
            raise TruncatedWeightsError(
                f"`{path}` ends {len(view) - done} bytes early, in tensor `{what}`; download the model again"
            )
        done += n


class LocalWeights:
    """A local model folder's safetensors files, every header checked against its file's size first
    (:func:`merger.io.metadata.read_checkpoint`), so a download cut short is refused before any merge.

    Args:
        model_dir: a directory with `*.safetensors` (and optionally `model.safetensors.index.json`).

    Raises:
        ModelNotFoundError: the directory has no safetensors weights.
        ModelFileError subclasses: a truncated, unreadable or inconsistent file or index.
    """

    rereads = True  # positioned reads, from the page cache once read

    def __init__(self, model_dir: Path):
        self.tensors: dict[str, StoredTensor] = {}
        self._file_of: dict[str, tuple[int, Path]] = {}
        self._fds: list[int] = []
        for path, layout in read_checkpoint(model_dir).items():
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as err:
                self.close()
                raise unreadable(path, err) from None
            self._fds.append(fd)
            for name, stored in layout.items():
                self.tensors[name] = stored
                self._file_of[name] = (fd, path)

    def expect(self, names: Sequence[str]) -> None:
        """Nothing to fetch ahead: the page cache and the executor's read-ahead suffice."""

    def read_into(self, name: str, view: memoryview) -> None:
        """Tensor `name`'s bytes into `view` (see :class:`WeightSource`)."""
        self.read_part_into(name, 0, view)

    def read_part_into(self, name: str, start: int, view: memoryview) -> None:
        """Bytes `[start, start + len(view))` of tensor `name` into `view`.

        Raises:
            ValueError: the range is not within the tensor. As :meth:`read_into` otherwise.
        """
        stored = self.tensors[name]
        if start < 0 or start + len(view) > stored.nbytes:
            raise ValueError(f"bytes [{start}, {start + len(view)}) are not within tensor `{name}` ({stored.nbytes})")
        fd, path = self._file_of[name]
        read_file_range(fd, path, stored.offset + start, view, name)

    def close(self) -> None:
        """Close the shard files."""
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()
