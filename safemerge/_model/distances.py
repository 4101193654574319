"""Exact comparisons between the values of one tie group, all from one pass over their rows.

A tied member's merged weight is computed on demand from the base weight and the adapter's factors (Rows): each
block costs a matmul and two roundings. Every comparison the analysis makes between a group's values (changed or
not, how much, how far apart the members are) reads the same blocks, so `Distances.survey` computes each value's
block once and derives all of them from it, with a bitwise checksum of each row that later tells, without computing
any value again, which of them a tensor holds bit for bit (and so how far it is from each of the others).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from safemerge._model.rows import Value, block, max_abs, row_blocks, row_max_abs_diff, value_key

#: Odd 64-bit multipliers, one per column, for the row checksums (odd: no single changed bit pattern cancels).
_SEED = 0x5AFE


@dataclass
class Distances:
    """Row-wise max |a - b|, bit equality, max |value| and row checksums of values, by what holds them."""

    rows: dict[tuple[object, object], torch.Tensor] = field(default_factory=dict)
    same: dict[tuple[object, object], bool] = field(default_factory=dict)
    largest: dict[object, float] = field(default_factory=dict)
    checksums: dict[object, torch.Tensor] = field(default_factory=dict)

    def survey(self, values: Sequence[Value]) -> None:
        """Compute every figure between `values` (of one shape) in one pass: each block of each value computed once."""
        distinct = list({value_key(v): v for v in values}.items())
        if not distinct or not distinct[0][1].numel() or len({(v.shape, v.dtype) for _, v in distinct}) > 1:
            return  # an empty or mixed group: the comparisons below compute what they need
        pairs = [(i, j) for i in range(len(distinct)) for j in range(i + 1, len(distinct))]
        diffs: dict[tuple[int, int], list[torch.Tensor]] = {pair: [] for pair in pairs}
        same = dict.fromkeys(pairs, True)
        largest = [0.0] * len(distinct)
        sums: list[list[torch.Tensor]] = [[] for _ in distinct]
        for start, stop in row_blocks(distinct[0][1]):
            blocks = [block(v, start, stop) for _, v in distinct]
            for i, b in enumerate(blocks):
                largest[i] = max(largest[i], float(b.abs().max())) if b.numel() else largest[i]
                sums[i].append(row_checksums(b))
            for i, j in pairs:
                first, second = blocks[i], blocks[j].to(blocks[i].device)
                same[i, j] = same[i, j] and torch.equal(first, second)
                diffs[i, j].append(_row_max(first, second))
        keys = [k for k, _ in distinct]
        for i, j in pairs:
            self.rows[keys[i], keys[j]] = self.rows[keys[j], keys[i]] = torch.cat(diffs[i, j])
            self.same[keys[i], keys[j]] = self.same[keys[j], keys[i]] = same[i, j]
        for i, key in enumerate(keys):
            self.largest[key] = largest[i]
            self.checksums[key] = torch.cat(sums[i])

    def row_diff(self, a: Value, b: Value) -> torch.Tensor:
        """max |a - b| of every row (zeros for one tensor against itself)."""
        ka, kb = value_key(a), value_key(b)
        if ka == kb:
            return torch.zeros(max(1, a.shape[0] if len(a.shape) else 1), device=a.device)
        if (ka, kb) not in self.rows:
            self.rows[ka, kb] = self.rows[kb, ka] = row_max_abs_diff(a, b)
        return self.rows[ka, kb]

    def max_diff(self, a: Value, b: Value) -> float:
        """max |a - b| (inf if the shapes differ), as `rows.max_abs_diff` computes it."""
        if a.shape != b.shape:
            return float("inf")
        return float(self.row_diff(a, b).max()) if a.numel() else 0.0

    def equal(self, a: Value, b: Value) -> bool:
        """Bit for bit the same shape, dtype and values (torch.equal)."""
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        ka, kb = value_key(a), value_key(b)
        if ka != kb and (ka, kb) not in self.same:
            self.survey([a, b])
        return ka == kb or self.same[ka, kb]

    def max_abs(self, value: Value) -> float:
        """max |value|."""
        key = value_key(value)
        if key not in self.largest:
            self.largest[key] = max_abs(value)
        return self.largest[key]

    def tolerance(self, reference: Value) -> float:
        """`rows.same_weight_tolerance(reference)`, from the max |value| found in the survey."""
        eps = torch.finfo(reference.dtype).eps if reference.dtype.is_floating_point else 0.0
        return 4 * eps * self.max_abs(reference) if eps else 0.0

    def diff_from_checksums(self, tensor: torch.Tensor, value: Value) -> float | None:
        """max |tensor - value| read from the tensor alone, where it holds bit for bit a value of the survey (its row
        checksums are that value's) that was compared with `value` there; None where it holds none of them."""
        want = value_key(value)
        if tensor.shape != value.shape or tensor.dtype != value.dtype or want not in self.checksums:
            return None
        found = torch.cat([row_checksums(block(tensor, *rows)) for rows in row_blocks(tensor)])
        for key, sums in self.checksums.items():
            if (key == want or (key, want) in self.rows) and sums.shape == found.shape and torch.equal(sums, found):
                return 0.0 if key == want else float(self.rows[key, want].max())
        return None


def row_checksums(rows: torch.Tensor) -> torch.Tensor:
    """A 64-bit checksum of the bits of each row (each element of a 1-D tensor), on the CPU.

    Sum over the row of (the element's bits) x (an odd 64-bit multiplier of its column), wrapping: any one element
    that differs changes it, and several that differ cancel out with a chance of about 2**-64.
    """
    flat = rows.detach().reshape(rows.shape[0], -1) if rows.dim() > 1 else rows.detach().reshape(-1, 1)
    bits = _bits(flat).to(torch.int64)
    return (bits * _multipliers(flat.shape[1]).to(bits.device)).sum(dim=1).cpu()


@functools.cache
def _multipliers(columns: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(_SEED)
    return torch.randint(-(2**62), 2**62, (columns,), generator=generator, dtype=torch.int64) * 2 + 1


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's elements reinterpreted as integers of the same width (bool and 8-bit types widened)."""
    width = tensor.element_size()
    if tensor.dtype == torch.bool or width == 1:
        return tensor.to(torch.int16)
    return tensor.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[width])


def _row_max(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """max |a - b| of every row (every element of a 1-D tensor), in float32."""
    diff = (a.float() - b.float()).abs()
    return diff.flatten(1).amax(dim=1) if diff.dim() > 1 else diff.reshape(-1)
