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

from safemerge._model.rows import Rows, Value, block, max_abs, row_blocks, row_max_abs_diff, value_key

#: Seed of the random multipliers of the row checksums (fixed: the analysis's and the check's must be the same).
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
        keys = [k for k, _ in distinct]
        # Figures of their own only for values computed on demand: a tensor's max is read from it when asked.
        computed = [i for i, (_, v) in enumerate(distinct) if isinstance(v, Rows)]
        pairs = [(i, j) for i in range(len(distinct)) for j in range(i + 1, len(distinct))]
        diffs: dict[tuple[int, int], list[torch.Tensor]] = {pair: [] for pair in pairs}
        same = dict.fromkeys(pairs, True)
        largest = dict.fromkeys(computed, 0.0)
        sums: dict[int, list[torch.Tensor]] = {i: [] for i in computed}
        for start, stop in row_blocks(distinct[0][1]):
            blocks = [block(v, start, stop) for _, v in distinct]
            wide = [b.float() for b in blocks]  # once per block, for every pair it is in
            for i in computed:
                largest[i] = max(largest[i], _largest(blocks[i]))
                sums[i].append(row_checksums(blocks[i]))
            for i, j in pairs:
                rows = _row_max(wide[i], wide[j].to(wide[i].device))
                diffs[i, j].append(rows)
                # |a - b| is 0 exactly where a == b, but NaN where both are the same infinity: torch.equal there.
                nan = bool(rows.isnan().any())
                same[i, j] = same[i, j] and (
                    torch.equal(blocks[i], blocks[j].to(blocks[i].device)) if nan else not rows.any()
                )
        for i, j in pairs:
            self.rows[keys[i], keys[j]] = self.rows[keys[j], keys[i]] = torch.cat(diffs[i, j])
            self.same[keys[i], keys[j]] = self.same[keys[j], keys[i]] = same[i, j]
        for i in computed:
            self.largest[keys[i]] = largest[i]
            self.checksums[keys[i]] = torch.cat(sums[i])

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
    """A checksum of the bits of each row (each element of a 1-D tensor), on the CPU.

    The row's bits as 16-bit integers, each times a random multiplier in [1, 2) of its column, summed in float64:
    the integers and the sum are exact to well under 1, so any one element that differs changes it by at least 1,
    and several that differ cancel out only by a coincidence of the random multipliers. A float64 matrix-vector
    product: a few times cheaper than integer arithmetic.
    """
    flat = rows.detach().reshape(rows.shape[0], -1) if rows.dim() > 1 else rows.detach().reshape(-1, 1)
    bits = _halfwords(flat)
    return (bits.to(torch.float64) @ _multipliers(bits.shape[1]).to(bits.device)).cpu()


@functools.cache
def _multipliers(columns: int) -> torch.Tensor:
    return torch.rand(columns, generator=torch.Generator().manual_seed(_SEED), dtype=torch.float64) + 1.0


def _halfwords(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bits as 16-bit integers, its last dimension widened to hold them (bool and 8-bit types as
    16-bit integers of their value or bits)."""
    if tensor.dtype == torch.bool or tensor.element_size() == 1:
        return (tensor.view(torch.uint8) if tensor.dtype != torch.bool else tensor).to(torch.int16)
    return tensor.contiguous().view(torch.int16)


def _largest(rows: torch.Tensor) -> float:
    """max |rows| (0 for none), without a temporary as big as the block."""
    if not rows.numel():
        return 0.0
    low, high = torch.aminmax(rows)
    return max(-float(low), float(high))


def _row_max(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """max |a - b| of every row (every element of a 1-D tensor), in float32."""
    diff = a.float() - b.float()
    return torch.linalg.vector_norm(diff.flatten(1), float("inf"), dim=1) if diff.dim() > 1 else diff.abs().reshape(-1)
