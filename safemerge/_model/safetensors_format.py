"""The safetensors format: every dtype it names, and a tensor of a file read a block of rows at a time."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from safetensors import safe_open

from safemerge._model.rows import row_blocks

#: Every dtype the format names (all that safetensors 0.8's reader accepts), as (torch's dtype, bits per element).
#: None where torch has no dtype of one value per element: F4 loads as float4_e2m1fn_x2 (two values each), F6 not at
#: all. The input check sizes every tensor with it, the low-memory engine names what it writes with it.
DTYPES: dict[str, tuple[torch.dtype | None, int]] = {
    "BOOL": (torch.bool, 8),
    "F4": (None, 4),
    "F6_E2M3": (None, 6),
    "F6_E3M2": (None, 6),
    "U8": (torch.uint8, 8),
    "I8": (torch.int8, 8),
    "F8_E5M2": (torch.float8_e5m2, 8),
    "F8_E4M3": (torch.float8_e4m3fn, 8),
    "F8_E8M0": (torch.float8_e8m0fnu, 8),
    "F8_E4M3FNUZ": (torch.float8_e4m3fnuz, 8),
    "F8_E5M2FNUZ": (torch.float8_e5m2fnuz, 8),
    "I16": (torch.int16, 16),
    "U16": (torch.uint16, 16),
    "F16": (torch.float16, 16),
    "BF16": (torch.bfloat16, 16),
    "I32": (torch.int32, 32),
    "U32": (torch.uint32, 32),
    "F32": (torch.float32, 32),
    "C64": (torch.complex64, 64),
    "F64": (torch.float64, 64),
    "I64": (torch.int64, 64),
    "U64": (torch.uint64, 64),
}
_NAMES = {dtype: name for name, (dtype, _) in DTYPES.items() if dtype is not None}


def torch_dtype(name: str) -> torch.dtype:
    """torch's dtype for the safetensors dtype `name`.

    Raises:
        KeyError: the format names no such dtype, or torch has none of one value per element (F4, F6).
    """
    dtype = DTYPES[name][0]
    if dtype is None:
        raise KeyError(f"torch has no dtype of one value per element for safetensors' {name}")
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of torch's `dtype` (KeyError for one the format cannot hold)."""
    return _NAMES[dtype]


def read_blocks(path: str, name: str) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(start, stop, rows) of the tensor `name` in the safetensors file `path`, read a block of rows at a time. The
    file is opened again for each block: a memory-mapped file's pages count as the process's memory while it is open.
    """
    with safe_open(path, framework="pt") as file:
        layout = file.get_slice(name)
        shape, dtype = layout.get_shape(), layout.get_dtype()
    if len(shape) < 2:
        with safe_open(path, framework="pt") as file:
            yield 0, shape[0] if shape else 1, file.get_tensor(name)
        return
    for start, stop in row_blocks(torch.empty(shape, dtype=torch_dtype(dtype), device="meta")):
        with safe_open(path, framework="pt") as file:
            yield start, stop, file.get_slice(name)[start:stop]
