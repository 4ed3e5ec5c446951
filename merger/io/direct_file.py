"""An output file written around the page cache (O_DIRECT), through a reused aligned buffer in two halves.

A merge writes each output byte once and never reads it back in the same process; going through the
page cache makes the kernel allocate and fill a fresh page per 4 KiB written, and evict the inputs'
pages (which the merge is still reading) to make room. On the virtual machines this project runs on
that allocation is the merge's largest cost: writing 1 GiB from a reused buffer took 10-16 s of
system time through the page cache and 0.6 s with O_DIRECT (`bench/README.md`, "Writing the output").

Direct I/O needs the buffer address, each write's length and its file offset aligned to the device's
block size; tensors are neither, so bytes are gathered in an aligned staging buffer (a user-space copy,
~0.1 s/GiB) and written in whole blocks. The last block is padded with zeros and the file truncated to
its true size.

A direct write returns only once the device has the bytes, so the staging buffer has two halves and a
thread of its own writes a full half while the caller fills the other: the writer's work between
writes (checking and copying the next tensors) no longer leaves the device idle (docs/decisions.md,
"Writing the output around the page cache").

Where the file system refuses O_DIRECT (tmpfs on older kernels, some FUSE mounts, any OS without it)
the same bytes go through the page cache instead: the result is identical either way.
"""

from __future__ import annotations

import errno
import mmap
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

ALIGN = 4096  # the largest logical block size in common use; any smaller one divides it
STAGE_BYTES = 16 << 20  # one staging half: each write is this long, as the benchmark floor's (bench/floor.py)
O_DIRECT = getattr(os, "O_DIRECT", 0)


class StagingBuffer:
    """Two page-aligned halves of an anonymous mapping (mmap memory is page-aligned) reused by every file of
    one writer, and the thread that writes a full half to its file while the other half fills.

    Args:
        size: bytes per half, a multiple of :data:`ALIGN` (a full half is written as whole blocks).

    Raises:
        ValueError: `size` is not a positive multiple of :data:`ALIGN`.
    """

    def __init__(self, size: int = STAGE_BYTES):
        if size <= 0 or size % ALIGN:
            raise ValueError(f"staging size {size} is not a positive multiple of {ALIGN} bytes")
        self.memory = mmap.mmap(-1, 2 * size)
        view = memoryview(self.memory)
        self.halves = (view[:size], view[size:])
        self._pending: list[Future | None] = [None, None]
        self._disk = ThreadPoolExecutor(1, thread_name_prefix="merger-disk")

    def submit(self, half: int, write) -> None:
        """Run `write()` (which writes half `half` out) on the disk thread, after the writes handed over before it."""
        self._pending[half] = self._disk.submit(write)

    def wait(self, half: int) -> None:
        """Return once half `half` may be filled again; raises the OSError its last write raised."""
        pending, self._pending[half] = self._pending[half], None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        """Wait for the writes under way, stop the disk thread and unmap the buffer."""
        self._disk.shutdown(wait=True)
        self._pending = [None, None]
        for half in self.halves:
            half.release()
        try:
            self.memory.close()
        except BufferError:  # a write error's traceback still holds a view of a half: unmapped once it goes
            pass


class DirectFile:
    """A write-only binary file: :meth:`write` appends bytes, :meth:`close` flushes and sets the size.

    Args:
        path: the file to create (truncated if it exists).
        staging: the aligned buffer to gather writes in; not shared between open files.

    Raises:
        OSError: what the OS raised when opening or writing (a full disk shows as ENOSPC), from the call
            that hands over the next half or from :meth:`close`.
    """

    def __init__(self, path: Path, staging: StagingBuffer):
        self.name = str(path)
        self._staging = staging
        self._half = 0
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
            stage = self._staging.halves[self._half]
            n = min(len(view), len(stage) - self._fill)
            stage[self._fill : self._fill + n] = view[:n]
            self._fill += n
            view = view[n:]
            if self._fill == len(stage):
                self._hand_over(self._fill)
        self._size += total
        return total

    def close(self) -> None:
        """Write what is staged (its last block zero-padded), truncate to the bytes written, close."""
        if self._fd < 0:
            return
        try:
            if self._fill:
                padded = -(-self._fill // ALIGN) * ALIGN if self._direct else self._fill
                self._staging.halves[self._half][self._fill : padded] = bytes(padded - self._fill)
                self._hand_over(padded)
            self._staging.wait(0)
            self._staging.wait(1)
            os.ftruncate(self._fd, self._size)
        finally:
            for half in (0, 1):  # the disk thread must be done with the descriptor before it is closed
                try:
                    self._staging.wait(half)
                except OSError:  # the error being raised already is the one to report
                    pass
            fd, self._fd = self._fd, -1
            os.close(fd)

    def _hand_over(self, length: int) -> None:
        """Have the disk thread write the current half's first `length` bytes; go on in the other half
        once its own last write is done."""
        half = self._half
        self._staging.submit(half, lambda: self._write_out(half, length))
        self._half, self._fill = 1 - half, 0
        self._staging.wait(self._half)

    def _write_out(self, half: int, length: int) -> None:
        """Write the first `length` bytes of staging half `half`, continuing after short writes (on the disk thread)."""
        done = 0
        while done < length:
            try:
                done += os.write(self._fd, self._staging.halves[half][done:length])
            except OSError as err:
                if err.errno != errno.EINVAL or not self._direct:
                    raise
                self._buffered_from_here()  # the file system accepted O_DIRECT at open but not at write

    def _buffered_from_here(self) -> None:
        import fcntl  # POSIX, as O_DIRECT is: importing it at the top would break the module elsewhere

        fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~O_DIRECT)
        self._direct = False
