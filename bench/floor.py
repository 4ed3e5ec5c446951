"""The floor a merge cannot beat: start the interpreter, import torch and safetensors, read every input
byte once, write the output's bytes once.

    python bench/floor.py [--direct] --out FILE --out-bytes N INPUT [INPUT ...]

An INPUT is a safetensors file, read whole, or `FILE::REGEX`, which reads only the tensors whose
names match REGEX (plus the header): for merges that use part of a file (an MoE takes only the MLPs of
its second expert). Reads go through a reused 16 MiB buffer (page cache -> user space, as a merge's
loads do); the write sends N bytes from that buffer to FILE, without fsync (the merge tools do not
sync either). With `--direct` the write goes around the page cache (O_DIRECT, from a page-aligned
buffer, the last block padded and the file truncated), as our engine writes: the stricter floor.
"""

from __future__ import annotations

import gc

# The same start as our CLI's (merger/__main__.py): the collector off while importing, the imported
# objects frozen out of its reach. It makes any Python program's start and exit cheaper.
gc.disable()

import argparse  # noqa: E402
import json  # noqa: E402
import mmap  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import struct  # noqa: E402

import safetensors.torch  # noqa: E402, F401  (the import cost is part of the floor)
import torch  # noqa: E402, F401

gc.freeze()
gc.enable()

CHUNK = 1 << 24


def byte_ranges(path: str, pattern: str | None) -> list[tuple[int, int]]:
    """The [start, end) byte ranges of `path` to read: the whole file, or the header + matching tensors."""
    with open(path, "rb") as f:
        if pattern is None:
            return [(0, f.seek(0, 2))]
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    data = 8 + length
    tensors = (info["data_offsets"] for name, info in header.items() if name != "__metadata__" and re.search(pattern, name))
    return [(0, data)] + sorted((data + start, data + end) for start, end in tensors)


def read(path: str, ranges: list[tuple[int, int]], buffer: bytearray) -> int:
    """Read `ranges` of `path` into `buffer`, chunk by chunk; returns the bytes read."""
    total, view = 0, memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        for start, end in ranges:
            f.seek(start)
            while start < end:
                n = f.readinto(view[: min(CHUNK, end - start)])
                start, total = start + n, total + n
    return total


def write(path: str, size: int, buffer: bytearray) -> None:
    """Write `size` bytes to `path`."""
    view = memoryview(buffer)
    with open(path, "wb", buffering=0) as f:
        while size > 0:
            size -= f.write(view[: min(CHUNK, size)])


def write_direct(path: str, size: int) -> None:
    """Write `size` bytes to `path` with O_DIRECT: whole 4 KiB blocks from an aligned buffer, then truncate."""
    buffer = mmap.mmap(-1, CHUNK)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    try:
        left = size
        while left > 0:
            n = min(CHUNK, -(-left // 4096) * 4096)
            left -= os.write(fd, memoryview(buffer)[:n])
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--out-bytes", type=int, required=True)
    parser.add_argument("--direct", action="store_true", help="write around the page cache (O_DIRECT)")
    parser.add_argument("inputs", nargs="+", metavar="INPUT")
    args = parser.parse_args()
    buffer = bytearray(CHUNK)
    for spec in args.inputs:
        path, _, pattern = spec.partition("::")
        read(path, byte_ranges(path, pattern or None), buffer)
    if args.direct:
        write_direct(args.out, args.out_bytes)
    else:
        write(args.out, args.out_bytes, buffer)


if __name__ == "__main__":
    main()
