"""The one table of safetensors dtypes is complete and agrees with safetensors' own reader."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import safetensors
import torch
from safetensors import SafetensorError, safe_open

from safemerge._model import safetensors_format as _safetensors


def _write(path: Path, dtype: str, shape: list[int], size: int) -> None:
    """A safetensors file of one tensor `t`, written by hand (torch cannot make every dtype the format names)."""
    header = json.dumps({"t": {"dtype": dtype, "shape": shape, "data_offsets": [0, size]}}).encode()
    header += b" " * (-len(header) % 8)
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(size))


def test_the_table_names_every_dtype_the_reader_knows(tmp_path: Path) -> None:
    """safetensors' reader lists the dtypes it knows when it meets one it does not: each is in the table."""
    _write(tmp_path / "t.safetensors", "NOT_A_DTYPE", [1], 1)
    with pytest.raises(SafetensorError) as refused:
        safe_open(str(tmp_path / "t.safetensors"), framework="pt")
    if "unknown variant" not in str(refused.value):
        pytest.skip(f"safetensors {safetensors.__version__} does not list the dtypes it knows (newer releases do)")
    known = set(re.findall(r"`(\w+)`", str(refused.value).partition("expected one of")[2]))
    assert {"I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2"} <= known
    assert known <= set(_safetensors.DTYPES)


@pytest.mark.parametrize("name", sorted(_safetensors.DTYPES))
def test_each_dtype_loads_as_the_table_says(tmp_path: Path, name: str) -> None:
    """A tensor of 8 elements holds 8 x bits / 8 bytes, and loads as the table's torch dtype (the low-memory engine
    names what it writes, and reads it back, with it)."""
    dtype, bits = _safetensors.DTYPES[name]
    _write(tmp_path / "t.safetensors", name, [8], bits)
    try:
        opened = safe_open(str(tmp_path / "t.safetensors"), framework="pt")
    except SafetensorError:
        pytest.skip(f"safetensors {safetensors.__version__} predates the dtype {name}")
    with opened as file:
        assert file.get_slice("t").get_dtype() == name
        if dtype is None:
            return  # F4, F6: no torch dtype of one value per element
        tensor = file.get_tensor("t")
    assert tensor.dtype == dtype == _safetensors.torch_dtype(name) and tensor.shape == (8,)
    assert dtype.itemsize * 8 == bits and _safetensors.dtype_name(dtype) == name


def test_no_torch_dtype_for_four_and_six_bit_floats() -> None:
    with pytest.raises(KeyError, match="no dtype of one value per element for safetensors' F4"):
        _safetensors.torch_dtype("F4")
    assert torch.float32 is _safetensors.torch_dtype("F32")
