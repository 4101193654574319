"""Values computed a block of rows at a time, and the block-wise comparisons that work on them and on tensors alike.

A merged weight as big as the embedding (128256 x 2048) need never exist whole while it is analysed, compared or
written: `Rows` computes any block of its rows on demand, from the base weight and the adapter's factors. The
in-memory engine materialises it once, where it puts it in the model; the low-memory engine streams it to disk.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from safemerge._model.walk import storage_key

#: Elements per block (a 128256 x 2048 embedding is worked on in ~64 blocks).
BLOCK = 1 << 22


@dataclass(frozen=True, eq=False)
class LowRank:
    """W + the sum of `scale * u @ v` over `terms`, computed in float32 (float64 for a float64 W) and rounded once to
    W's dtype, a block of rows at a time: the rows [start, stop) of a term are `u[start:stop] @ v`."""

    weight: torch.Tensor
    terms: tuple[tuple[torch.Tensor, torch.Tensor, float], ...]

    def same_as(self, other: LowRank) -> bool:
        """Whether both are the same value: the same base tensor and equal factors, term by term (ensure_weight_tying's
        head and embedding), so that one computation of it serves both."""
        return (
            storage_key(self.weight) == storage_key(other.weight)
            and self.weight.dtype == other.weight.dtype
            and len(self.terms) == len(other.terms)
            and all(
                s == t and u.shape == x.shape and v.shape == y.shape and torch.equal(u, x) and torch.equal(v, y)
                for (u, v, s), (x, y, t) in zip(self.terms, other.terms, strict=True)
            )
        )


@dataclass(frozen=True, eq=False)
class Rows:
    """A tensor whose rows are computed a block at a time, on demand, and never held whole unless materialised.

    A live view: each block is computed from the tensors `compute` reads as they are then (the base weight, the
    adapter's factors), so those must not change while the value is in use.
    """

    shape: torch.Size
    dtype: torch.dtype
    #: The rows [start, stop) of the tensor.
    compute: Callable[[int, int], torch.Tensor]
    #: Where `compute` computes: the device of the weight it is computed from (a GPU for a model on one).
    device: torch.device
    #: What `compute` computes, where it is a base weight plus low-rank deltas (LoRA), else None.
    low_rank: LowRank | None = None

    def detach(self) -> Rows:
        return self

    def numel(self) -> int:
        return math.prod(self.shape)

    def materialise(self, device: torch.device | None = None) -> torch.Tensor:
        """The whole tensor, on `device` (default: where it is computed, so it goes into the model where its base
        weight is, without a copy through the CPU)."""
        whole = torch.empty(self.shape, dtype=self.dtype, device=device or self.device)
        for start, stop in row_blocks(self):
            whole[start:stop] = self.compute(start, stop)
        return whole


#: A tensor, or one computed on demand.
Value = torch.Tensor | Rows


def row_blocks(value: Value) -> Iterator[tuple[int, int]]:
    """(start, stop) of each block of rows of about BLOCK elements; one block for a tensor of fewer than 2 dims."""
    if len(value.shape) < 2:
        yield 0, value.shape[0] if value.shape else 1
        return
    rows = max(1, BLOCK // max(1, math.prod(value.shape[1:])))
    for start in range(0, value.shape[0], rows):
        yield start, min(start + rows, value.shape[0])


def block(value: Value, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of `value` (a 0-dim tensor whole)."""
    if isinstance(value, Rows):
        return value.compute(start, stop)
    return value.detach()[start:stop] if value.dim() else value.detach()


def materialise(value: Value, device: torch.device | None = None) -> torch.Tensor:
    """`value` as a tensor on `device` (default: where it is): computed whole if it is Rows."""
    tensor = value.materialise(device) if isinstance(value, Rows) else value
    return tensor if device is None else tensor.to(device)


def scaled(value: Value, factor: float) -> Value:
    """`value * factor`, computed block by block where `value` is."""
    if isinstance(value, Rows):
        return Rows(value.shape, value.dtype, lambda start, stop: value.compute(start, stop) * factor, value.device)
    return value.detach() * factor


def in_dtype(value: Value, dtype: torch.dtype) -> Value:
    """`value` in `dtype` (a tensor rounded once; Rows already in their base weight's dtype are kept)."""
    if isinstance(value, Rows):
        if value.dtype == dtype:
            return value
        return Rows(value.shape, dtype, lambda start, stop: value.compute(start, stop).to(dtype), value.device)
    return value.detach().to(dtype)


def value_key(value: Value) -> tuple[object, ...]:
    """Identity of what holds a value: the storage a tensor views, or the Rows object itself."""
    return ("rows", id(value)) if isinstance(value, Rows) else storage_key(value)


def equal(a: Value, b: Value) -> bool:
    """Bit for bit the same shape, dtype and values (torch.equal), block by block."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if value_key(a) == value_key(b):
        return True
    return all(torch.equal(*_on_one_device(block(a, *rows), block(b, *rows))) for rows in row_blocks(a))


def row_max_abs_diff(a: Value, b: Value) -> torch.Tensor:
    """max |a - b| of every row (every element of a 1-D tensor), in float32, a block of rows at a time."""
    if len(a.shape) < 2:
        first, second = _on_one_device(block(a, *next(row_blocks(a))), block(b, *next(row_blocks(b))))
        return (first.float() - second.float()).abs()
    diffs = []
    for rows in row_blocks(a):
        first, second = _on_one_device(block(a, *rows), block(b, *rows))
        diffs.append((first.float() - second.float()).abs().flatten(1).amax(dim=1))
    return torch.cat(diffs)


def _on_one_device(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`a`, and `b` where `a` is: a member on a GPU compared with a value computed elsewhere (a block at a time)."""
    return a, b.to(a.device)


def max_abs_diff(a: Value, b: Value) -> float:
    """max |a - b|, in float32, a block of rows at a time (no full-size temporary); inf if the shapes differ."""
    if a.shape != b.shape:
        return float("inf")
    if not a.numel():
        return 0.0
    return float(row_max_abs_diff(a, b).max())


def max_abs(value: Value) -> float:
    """max |value|, a block of rows at a time."""
    if not value.numel():
        return 0.0
    return max(float(block(value, *rows).abs().max()) for rows in row_blocks(value))


def same_weight_tolerance(reference: Value) -> float:
    """Largest |difference| that is still rounding, for two ways of computing the same merged weight.

    A few units in the last place of the largest value: two members that got the same change through different
    PEFT layers (ensure_weight_tying: an Embedding and a transposed Linear) differ by rounding only.
    """
    eps = torch.finfo(reference.dtype).eps if reference.dtype.is_floating_point else 0.0
    return 4 * eps * max_abs(reference) if eps else 0.0
