"""The output file written around the page cache: the same bytes as a plain write, whatever the sizes."""

from __future__ import annotations

import errno
import os
import random
import threading
from pathlib import Path

import pytest

from merger.io import direct_file
from merger.io.direct_file import ALIGN, DirectFile, StagingBuffer

STAGE = 3 * ALIGN  # a small staging buffer, so that the writes below cross its end many times


def _write_pieces(path: Path, pieces: list[bytes], stage_bytes: int = STAGE) -> None:
    staging = StagingBuffer(stage_bytes)
    try:
        out = DirectFile(path, staging)
        for piece in pieces:
            assert out.write(piece) == len(piece)
        out.close()
    finally:
        staging.close()


def _pieces(sizes: list[int], seed: int) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(size) for size in sizes]


@pytest.mark.parametrize(
    "sizes",
    [
        [],  # an empty file
        [1],
        [ALIGN - 1],
        [ALIGN],
        [ALIGN + 1],
        [STAGE],  # exactly one full staging buffer, nothing left for close
        [STAGE + 1],
        [8, 4088, 4096, 1, 12287, 3 * STAGE + 17],  # a header, then tensors across every boundary
        [777] * 40,
    ],
)
def test_the_file_holds_exactly_the_bytes_written(tmp_path: Path, sizes: list[int]) -> None:
    pieces = _pieces(sizes, seed=len(sizes))
    path = tmp_path / "out.bin"
    _write_pieces(path, pieces)
    expected = b"".join(pieces)
    assert path.stat().st_size == len(expected)  # the padded last block is cut off
    assert path.read_bytes() == expected


def test_one_staging_buffer_serves_files_one_after_another(tmp_path: Path) -> None:
    staging = StagingBuffer(STAGE)
    contents = _pieces([5000, 20000, 3], seed=1)
    for i, data in enumerate(contents):
        out = DirectFile(tmp_path / f"{i}.bin", staging)
        out.write(data[:1234])
        out.write(memoryview(data)[1234:])  # any buffer, not only bytes
        out.close()
        out.close()  # closing twice is harmless
    staging.close()
    assert [(tmp_path / f"{i}.bin").read_bytes() for i in range(3)] == contents


def test_a_file_system_refusing_direct_io_at_open_gets_the_same_bytes(tmp_path: Path, monkeypatch) -> None:
    real_open = os.open

    def refuse_direct(path, flags, *args):
        if flags & direct_file.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(direct_file.os, "open", refuse_direct)
    pieces = _pieces([10, ALIGN + 3, STAGE + 5], seed=2)
    _write_pieces(tmp_path / "out.bin", pieces)
    assert (tmp_path / "out.bin").read_bytes() == b"".join(pieces)


@pytest.mark.skipif(not direct_file.O_DIRECT, reason="no O_DIRECT on this OS")
def test_a_file_system_refusing_direct_io_at_write_gets_the_same_bytes(tmp_path: Path, monkeypatch) -> None:
    import fcntl

    real_write = os.write

    def refuse_direct(fd, data):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & direct_file.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(direct_file.os, "write", refuse_direct)
    pieces = _pieces([ALIGN + 3, STAGE + 5, 9], seed=3)
    _write_pieces(tmp_path / "out.bin", pieces)
    assert (tmp_path / "out.bin").read_bytes() == b"".join(pieces)


def test_a_full_half_is_written_while_the_next_one_fills(tmp_path: Path, monkeypatch) -> None:
    # The device's write of the first half is held until the caller has gone on past it: a writer that
    # waited for the device (one buffer, written in the caller's thread) would never get there.
    went_on = threading.Event()
    real_write = os.write

    def held_write(fd, data):
        assert went_on.wait(10), "the caller waited for the device before filling the next half"
        return real_write(fd, data)

    monkeypatch.setattr(direct_file.os, "write", held_write)
    data = _pieces([STAGE + 100, 200], seed=4)
    staging = StagingBuffer(STAGE)
    out = DirectFile(tmp_path / "out.bin", staging)
    out.write(data[0])  # one full half handed over, 100 bytes in the other
    went_on.set()
    out.write(data[1])
    out.close()
    staging.close()
    assert (tmp_path / "out.bin").read_bytes() == b"".join(data)


def test_a_write_error_on_the_disk_thread_is_raised_to_the_writer(tmp_path: Path, monkeypatch) -> None:
    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(direct_file.os, "write", full)
    staging = StagingBuffer(STAGE)
    open_before = len(os.listdir("/proc/self/fd"))
    out = DirectFile(tmp_path / "out.bin", staging)
    with pytest.raises(OSError) as raised:
        out.write(bytes(3 * STAGE))  # the second hand-over waits for the first half, whose write failed
    assert raised.value.errno == errno.ENOSPC
    with pytest.raises(OSError) as raised:
        out.close()  # the second half's write failed too
    assert raised.value.errno == errno.ENOSPC
    assert len(os.listdir("/proc/self/fd")) == open_before  # the file is closed all the same
    staging.close()


@pytest.mark.parametrize("size", [0, ALIGN + 1, ALIGN // 2])
def test_a_staging_size_that_is_not_whole_blocks_is_refused(size: int) -> None:
    with pytest.raises(ValueError, match=f"staging size {size} is not a positive multiple of {ALIGN}"):
        StagingBuffer(size)


def test_other_open_errors_are_raised(tmp_path: Path) -> None:
    staging = StagingBuffer(STAGE)
    with pytest.raises(FileNotFoundError):
        DirectFile(tmp_path / "missing" / "out.bin", staging)
    staging.close()
