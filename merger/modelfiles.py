"""What a model folder's files must look like before merger reads a weight: each problem a named error.

`config.json`, `model.safetensors.index.json` and every safetensors header are checked here, for
local folders and (header by header) for Hub repos: UTF-8 JSON objects, a sane header length, known
dtypes, each tensor's byte range equal to its shape × dtype size, inside the file and overlapping no
other, and an index that agrees with its shards. Nothing here touches tensor data.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from .errors import (
    LfsPointerError,
    ModelFileError,
    SafetensorsHeaderError,
    TruncatedWeightsError,
    UnreadableModelFileError,
    WeightIndexError,
    excerpt,
)

MAX_JSON_BYTES = 64 * 2**20  # config.json and index files; the largest real ones are a few MB
MAX_HEADER_BYTES = 100 * 10**6  # safetensors' own reader refuses headers over 100 MB
LFS_POINTER_PREFIX = b"version https://git-lfs"

# safetensors dtype codes -> bits per element (the sub-byte float codes pack several per byte)
DTYPE_BITS = {
    "F64": 64, "F32": 32, "F16": 16, "BF16": 16, "I64": 64, "I32": 32, "I16": 16, "I8": 8, "U64": 64, "U32": 32,
    "U16": 16, "U8": 8, "BOOL": 8, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8, "F6_E2M3": 6, "F6_E3M2": 6, "F4": 4,
}

# (shape, dtype, begin, end): one tensor's entry, its byte range relative to the data section
TensorEntry = tuple[tuple[int, ...], str, int, int]


def read_bytes(path: Path, limit: int = MAX_JSON_BYTES) -> bytes:
    """A small model file's bytes, refusing what the OS will not read or what is over `limit` bytes.

    Raises:
        UnreadableModelFileError: the OS refused (symlink loop, no permission, a directory, ...).
        ModelFileError: the file is over `limit` bytes.
    """
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as err:
        raise unreadable(path, err) from None
    if len(data) > limit:
        raise ModelFileError(f"`{path.name}` is over {limit // 2**20} MB; this is not a model's {path.name}")
    return data


def unreadable(path: Path, err: OSError) -> UnreadableModelFileError:
    """The named error for an OS refusal to read `path` (its reason in words, e.g. a symlink loop)."""
    return UnreadableModelFileError(
        f"cannot read `{path}`: {err.strerror or type(err).__name__}; check the file (a broken or looping "
        "symlink, permissions), or download the model again"
    )


def parse_json_object(data: bytes, where: str, error: type[ModelFileError]) -> dict:
    """`data` as a JSON object, or `error` saying why not (not UTF-8, not JSON, not an object, an LFS pointer).

    Args:
        data: the file's bytes.
        where: the file as the message names it, e.g. "model `org/x`: `config.json`".
        error: the class raised for a malformed file.
    """
    if data.startswith(LFS_POINTER_PREFIX):
        raise LfsPointerError(f"{where} is a Git LFS pointer, not the file: {LFS_FIX}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise error(f"{where} is not UTF-8 text (bad byte at offset {err.start}); it is corrupt: download it again") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise error(f"{where} is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None
    except RecursionError:
        raise error(f"{where} nests too deeply to be a model file") from None
    if not isinstance(value, dict):
        raise error(f"{where} must be a JSON object, not a JSON {type(value).__name__}")
    return value


LFS_FIX = (
    "the folder was cloned without Git LFS. Run `git lfs pull` in it, or download the model with "
    "`hf download ORG/NAME` (huggingface_hub), then point `model` at that folder"
)


def read_safetensors_entries(path: Path, where: str) -> tuple[int, dict[str, TensorEntry]]:
    """Read and check one safetensors file's header against the file's size.

    Returns:
        (absolute offset of the data section, tensor name -> (shape, dtype, begin, end) relative to it).

    Raises:
        UnreadableModelFileError, LfsPointerError, TruncatedWeightsError (empty, or shorter than the
        header says), SafetensorsHeaderError: see :func:`header_length` and :func:`check_header`.
    """
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            length = header_length(f.read(HEADER_PROBE), size, where)
            f.seek(8)
            header = parse_header(f.read(length), where)
    except OSError as err:
        raise unreadable(path, err) from None
    return 8 + length, check_header(header, where, size - 8 - length)


HEADER_PROBE = 64  # bytes read first: the 8-byte length, and enough to tell an LFS pointer
DOWNLOAD_AGAIN = "the download was cut short or the file is corrupt; download the model again"


def header_length(head: bytes, size: int | None, where: str) -> int:
    """The header length a safetensors file's first bytes state, checked.

    Args:
        head: the file's first bytes (at least 8 unless the file is shorter; :data:`HEADER_PROBE` tells
            a Git LFS pointer).
        size: the file's size in bytes, when known.
        where: the file as messages name it.

    Raises:
        LfsPointerError: the file is a Git LFS pointer.
        TruncatedWeightsError: the file is under 8 bytes or shorter than the length says.
        SafetensorsHeaderError: the length is over :data:`MAX_HEADER_BYTES`.
    """
    if head.startswith(LFS_POINTER_PREFIX):
        raise LfsPointerError(f"{where} is a Git LFS pointer (a small text file), not the weights: {LFS_FIX}")
    if len(head) < 8:
        raise TruncatedWeightsError(f"{where} is {len(head)} bytes long, too short for a safetensors file: {DOWNLOAD_AGAIN}")
    (length,) = struct.unpack("<Q", head[:8])
    if length > MAX_HEADER_BYTES:
        raise SafetensorsHeaderError(
            f"{where}: the safetensors header claims {length:,} bytes (over the {MAX_HEADER_BYTES // 10**6} MB "
            "safetensors allows); this is not a safetensors file, or it is corrupt"
        )
    if size is not None and length > size - 8:
        raise TruncatedWeightsError(
            f"{where} is {size:,} bytes but its header alone claims {length + 8:,}: {DOWNLOAD_AGAIN}"
        )
    return length


def parse_header(data: bytes, where: str) -> dict:
    """A safetensors header's JSON bytes as an object (UTF-8, JSON, an object), unchecked otherwise."""
    return parse_json_object(data, f"{where}: the safetensors header", SafetensorsHeaderError)


def check_header(header: dict, where: str, data_size: int | None) -> dict[str, TensorEntry]:
    """Check a parsed safetensors header; `data_size` (bytes after the header) when the file is at hand.

    Each tensor needs a known dtype, a shape of non-negative integers and `data_offsets` [begin, end]
    spanning exactly numel × dtype size bytes; no two ranges may overlap, and none may end past the data.

    Returns:
        tensor name -> (shape, dtype, begin, end), `__metadata__` left out.

    Raises:
        SafetensorsHeaderError: a malformed entry, an unknown dtype, a wrong-sized or overlapping range.
        TruncatedWeightsError: a range ends past the file's end.
    """
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict):
        raise SafetensorsHeaderError(f"{where}: the header's `__metadata__` must be an object")
    entries = {name: _entry(name, info, where) for name, info in header.items() if name != "__metadata__"}
    end = max((e[3] for e in entries.values()), default=0)
    if data_size is not None and end > data_size:
        raise TruncatedWeightsError(
            f"{where} holds {data_size:,} bytes of tensor data but its header places data up to byte {end:,}: "
            f"{DOWNLOAD_AGAIN}"
        )
    ranges = sorted((e[2], e[3], name) for name, e in entries.items() if e[3] > e[2])
    for (_, prev_end, prev), (begin, _, name) in zip(ranges, ranges[1:]):
        if begin < prev_end:
            raise SafetensorsHeaderError(
                f"{where}: the byte ranges of tensors `{excerpt(prev)}` and `{excerpt(name)}` overlap; the header is corrupt"
            )
    return entries


def _entry(name: str, info: object, where: str) -> TensorEntry:
    tensor = f"{where}: tensor `{excerpt(name)}`"
    if not isinstance(info, dict):
        raise SafetensorsHeaderError(f"{tensor} must be an object with `dtype`, `shape` and `data_offsets`")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in DTYPE_BITS:
        raise SafetensorsHeaderError(
            f"{tensor} has dtype `{excerpt(dtype)}`, which safetensors does not define ({', '.join(DTYPE_BITS)})"
        )
    if not _ints(shape) or not _ints(offsets) or len(offsets) != 2 or offsets[0] > offsets[1]:
        raise SafetensorsHeaderError(
            f"{tensor}: `shape` must be a list of non-negative integers and `data_offsets` [begin, end] with "
            f"begin <= end, got {excerpt(shape)} and {excerpt(offsets)}"
        )
    numel = 1
    for d in shape:
        numel *= d
    nbytes = -(-numel * DTYPE_BITS[dtype] // 8)
    if offsets[1] - offsets[0] != nbytes:
        raise SafetensorsHeaderError(
            f"{tensor} is {dtype} {list(shape)}, which takes {nbytes:,} bytes, but its data_offsets span "
            f"{offsets[1] - offsets[0]:,}; the header is corrupt (a relabelled dtype or shape)"
        )
    return tuple(shape), dtype, offsets[0], offsets[1]


def _ints(value: object) -> bool:
    return isinstance(value, list) and all(type(v) is int and v >= 0 for v in value)


def read_index(index_path: Path, where: str) -> dict[str, str]:
    """An index file's `weight_map` (tensor name -> shard file name), each shard present beside it.

    Raises:
        WeightIndexError: malformed, a shard name with a path in it, or a shard missing from the folder.
        UnreadableModelFileError, LfsPointerError: as :func:`read_bytes` / :func:`parse_json_object`.
    """
    weight_map = parse_weight_map(read_bytes(index_path), where)
    for shard in dict.fromkeys(weight_map.values()):
        if not os.path.lexists(index_path.parent / shard):
            raise WeightIndexError(
                f"{where} names shard `{excerpt(shard)}`, which is not in the folder: {DOWNLOAD_AGAIN}"
            )
    return weight_map


def parse_weight_map(data: bytes, where: str) -> dict[str, str]:
    """The `weight_map` of an index file's bytes, its shard names plain file names (no folders, no `..`).

    Raises:
        WeightIndexError: not a JSON object with a non-empty `weight_map` of strings, or a shard path.
    """
    index = parse_json_object(data, where, WeightIndexError)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
        raise WeightIndexError(f"{where} needs a non-empty `weight_map` object of tensor name -> shard file name")
    for shard in weight_map.values():
        if not shard.endswith(".safetensors") or Path(shard).name != shard or shard.startswith("."):
            raise WeightIndexError(
                f"{where} names shard `{excerpt(shard)}`; shards must be `*.safetensors` files beside the index"
            )
    return weight_map


def check_index_matches(weight_map: dict[str, str], shards: dict[str, set[str]], where: str) -> None:
    """Check that each tensor is in exactly the shard the index names, and each shard tensor is indexed.

    Args:
        weight_map: tensor name -> shard file name, from the index.
        shards: shard file name -> the tensor names its header lists.

    Raises:
        WeightIndexError: a mapped tensor is not in its shard, or a shard holds a tensor the index
            does not map there (a stale index, or shards of another revision).
    """
    for shard, names in shards.items():
        for name in names:
            if weight_map.get(name) != shard:
                raise WeightIndexError(
                    f"{where} does not map tensor `{excerpt(name)}` to `{shard}`, which holds it; the index and the "
                    f"shards disagree (mixed revisions?): {DOWNLOAD_AGAIN}"
                )
    for name, shard in weight_map.items():
        if name not in shards.get(shard, ()):
            raise WeightIndexError(
                f"{where} maps tensor `{excerpt(name)}` to `{shard}`, which does not hold it: {DOWNLOAD_AGAIN}"
            )
