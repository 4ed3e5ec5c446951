"""An output file written around the page cache (O_DIRECT), through one reused aligned buffer.

A merge writes each output byte once and never reads it back in the same process; going through the
page cache makes the kernel allocate and fill a fresh page per 4 KiB written, and evict the inputs'
pages (which the merge is still reading) to make room. On the virtual machines this project runs on
that allocation is the merge's largest cost: writing 1 GiB from a reused buffer took 10-16 s of
system time through the page cache and 0.6 s with O_DIRECT (`bench/README.md`, "Writing the output").

Direct I/O needs the buffer address, each write's length and its file offset aligned to the device's
block size; tensors are neither, so bytes are gathered in an aligned staging buffer (a user-space copy,
~0.1 s/GiB) and written in whole blocks. The last block is padded with zeros and the file truncated to
its true size. Where the file system refuses O_DIRECT (tmpfs on older kernels, some FUSE mounts, any
OS without it) the same bytes go through the page cache instead: the result is identical either way.
"""

from __future__ import annotations

import errno
import mmap
import os
from pathlib import Path

ALIGN = 4096  # the largest logical block size in common use; any smaller one divides it
STAGE_BYTES = 8 << 20  # staging buffer: large enough that the device sees long writes
O_DIRECT = getattr(os, "O_DIRECT", 0)


class StagingBuffer:
    """A page-aligned anonymous mapping reused by every file of one writer (mmap memory is page-aligned).

    Args:
        size: bytes, a multiple of :data:`ALIGN` (a full buffer is written as whole blocks).

    Raises:
        ValueError: `size` is not a positive multiple of :data:`ALIGN`.
    """

    def __init__(self, size: int = STAGE_BYTES):
        if size <= 0 or size % ALIGN:
            raise ValueError(f"staging size {size} is not a positive multiple of {ALIGN} bytes")
        self.memory = mmap.mmap(-1, size)
        self.view = memoryview(self.memory)

    def close(self) -> None:
        """Unmap the buffer (no file may be writing through it any more)."""
        self.view.release()
        self.memory.close()


class DirectFile:
    """A write-only binary file: :meth:`write` appends bytes, :meth:`close` flushes and sets the size.

    Args:
        path: the file to create (truncated if it exists).
        staging: the aligned buffer to gather writes in; not shared between open files.

    Raises:
        OSError: what the OS raised when opening or writing (a full disk shows as ENOSPC).
    """

    def __init__(self, path: Path, staging: StagingBuffer):
        self.name = str(path)
        self._stage = staging.view
        self._fill = 0
        self._size = 0
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
        try:
            self._fd = os.open(path, flags | O_DIRECT, 0o666)  # less the umask, as open() does
            self._direct = bool(O_DIRECT)
        except OSError as err:
            if err.errno != errno.EINVAL or not O_DIRECT:
                raise
            self._fd = os.open(path, flags, 0o666)
            self._direct = False

    def write(self, data) -> int:
        """Append the bytes of `data` (any C-contiguous buffer); returns their count."""
        view = memoryview(data).cast("B")
        total = len(view)
        while view:
            n = min(len(view), len(self._stage) - self._fill)
            self._stage[self._fill : self._fill + n] = view[:n]
            self._fill += n
            view = view[n:]
            if self._fill == len(self._stage):
                self._flush(self._fill)
        self._size += total
        return total

    def close(self) -> None:
        """Write what is staged (its last block zero-padded), truncate to the bytes written, close."""
        if self._fd < 0:
            return
        try:
            if self._fill:
                padded = -(-self._fill // ALIGN) * ALIGN if self._direct else self._fill
                self._stage[self._fill : padded] = bytes(padded - self._fill)
                self._flush(padded)
                os.ftruncate(self._fd, self._size)
        finally:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def _flush(self, length: int) -> None:
        """Write the first `length` staged bytes, continuing after short writes."""
        done = 0
        while done < length:
            try:
                done += os.write(self._fd, self._stage[done:length])
            except OSError as err:
                if err.errno != errno.EINVAL or not self._direct:
                    raise
                self._buffered_from_here()  # the file system accepted O_DIRECT at open but not at write
        self._fill = 0

    def _buffered_from_here(self) -> None:
        import fcntl  # POSIX, as O_DIRECT is: importing it at the top would break the module elsewhere

        fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~O_DIRECT)
        self._direct = False
