"""The one dtype table: safetensors codes, their sizes, their names (torch's and the config's).

Everything else is derived from :data:`_TABLE`. Torch is imported only by :func:`torch_dtype`, so the
config layer can read the names without loading it.
"""

from __future__ import annotations

from functools import cache

# safetensors code, bytes per entry, torch's name (also the config's, for the float dtypes)
_TABLE = (
    ("F64", 8, "float64"),
    ("F32", 4, "float32"),
    ("F16", 2, "float16"),
    ("BF16", 2, "bfloat16"),
    ("I64", 8, "int64"),
    ("I32", 4, "int32"),
    ("I16", 2, "int16"),
    ("I8", 1, "int8"),
    ("U8", 1, "uint8"),
    ("BOOL", 1, "bool"),
)
DTYPE_SIZES = {code: size for code, size, _ in _TABLE}  # safetensors code -> bytes per entry
DTYPES = ("bfloat16", "float16", "float32")  # what a config's `dtype` / `out_dtype` may name
SAFETENSORS_CODES = {name: code for code, _, name in _TABLE if name in DTYPES}  # "bfloat16" -> "BF16"


@cache
def torch_dtype(code: str):
    """The torch dtype of a safetensors code (`"BF16"` -> `torch.bfloat16`).

    Raises:
        KeyError: not a code of the table.
    """
    import torch

    return getattr(torch, {c: name for c, _, name in _TABLE}[code])
