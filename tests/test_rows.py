"""Rows (a tensor computed a block of rows at a time) compares, scales and reads back as the tensor it stands for."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from safemerge._model import rows as _rows
from safemerge._model import safetensors_format as _safetensors
from safemerge._model.rows import Rows


def lazy(tensor: torch.Tensor) -> Rows:
    """`tensor` as Rows, computed from it a block at a time."""
    return Rows(tensor.shape, tensor.dtype, lambda start, stop: tensor[start:stop].clone(), tensor.device)


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of 64 elements: every 2-D tensor here takes several blocks."""
    monkeypatch.setattr(_rows, "BLOCK", 64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_rows_compare_as_the_tensor_they_stand_for(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(37, 11, generator=generator).to(dtype)
    b = a.clone()
    b[29, 3] += 1
    assert len(list(_rows.row_blocks(a))) > 1
    assert torch.equal(lazy(a).materialise(), a)
    assert _rows.equal(lazy(a), a) and not _rows.equal(lazy(a), b) and not _rows.equal(lazy(a), a.half())
    assert _rows.max_abs_diff(lazy(a), lazy(b)) == pytest.approx(float((a.float() - b.float()).abs().max()))
    assert torch.equal(_rows.row_max_abs_diff(lazy(a), b), (a.float() - b.float()).abs().amax(dim=1))
    assert _rows.max_abs_diff(lazy(a), a[:30]) == float("inf")
    assert _rows.same_weight_tolerance(lazy(a)) == 4 * torch.finfo(dtype).eps * float(a.abs().max())
    assert torch.equal(_rows.materialise(_rows.scaled(lazy(a), 0.5)), a * 0.5)
    assert torch.equal(_rows.materialise(_rows.in_dtype(lazy(a), torch.float16)), a.to(torch.float16))


def test_tensors_of_fewer_than_two_dims_are_one_block() -> None:
    vector, scalar = torch.arange(200.0), torch.tensor(3.0)
    assert list(_rows.row_blocks(vector)) == [(0, 200)] and list(_rows.row_blocks(scalar)) == [(0, 1)]
    assert _rows.max_abs_diff(vector, vector + 1) == 1.0 and _rows.max_abs_diff(scalar, scalar * 2) == 3.0
    assert _rows.equal(lazy(vector), vector)


def test_read_blocks_reads_a_saved_tensor_back(tmp_path: Path) -> None:
    tensors = {"matrix": torch.randn(50, 7).to(torch.bfloat16), "vector": torch.arange(9), "scalar": torch.tensor(2.5)}
    save_file(tensors, str(tmp_path / "t.safetensors"))
    for name, tensor in tensors.items():
        blocks = list(_safetensors.read_blocks(str(tmp_path / "t.safetensors"), name))
        assert [(start, stop) for start, stop, _ in blocks] == list(_rows.row_blocks(tensor))
        assert torch.equal(torch.cat([rows.reshape(-1) for _, _, rows in blocks]), tensor.reshape(-1))
