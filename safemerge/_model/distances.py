"""Exact comparisons between the values of one tie group, all from one pass over their rows.

A tied member's merged weight is computed on demand from the base weight and the adapter's factors (Rows): each
block costs a matmul and two roundings. Every comparison the analysis makes between a group's values (changed or
not, how much, how far apart the members are) reads the same blocks, so `Distances.survey` computes each value's
block once and derives all of them from it. For the in-memory engine it also keeps the whole value it computed
(`keep`): the engine puts that very tensor in the model (`take`), and the check in memory then knows, from the
tensor's storage, which value it holds and how far that is from any other value of the survey.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from safemerge._model.rows import Rows, Value, block, max_abs, row_blocks, row_max_abs_diff, value_key


@dataclass
class Distances:
    """Row-wise max |a - b|, bit equality and max |value| of values, by what holds them; whole values kept for the
    engine to put in the model."""

    rows: dict[tuple[object, object], torch.Tensor] = field(default_factory=dict)
    same: dict[tuple[object, object], bool] = field(default_factory=dict)
    largest: dict[object, float] = field(default_factory=dict)
    #: Values computed on demand, kept whole by the survey (`keep`) until the engine takes them, by value key.
    wholes: dict[object, torch.Tensor] = field(default_factory=dict)
    #: The storage of every kept tensor taken, with the key of the value it was computed as.
    taken: dict[object, object] = field(default_factory=dict)

    def survey(self, values: Sequence[Value], *, keep: bool = False) -> None:
        """Compute every figure between `values` (of one shape) in one pass: each block of each value computed once.
        With `keep`, the values computed on demand are kept whole, as computed, for `take`."""
        distinct = list({value_key(v): v for v in values}.items())
        if not distinct or not distinct[0][1].numel() or len({(v.shape, v.dtype) for _, v in distinct}) > 1:
            return  # an empty or mixed group: the comparisons below compute what they need
        keys = [k for k, _ in distinct]
        # Figures of their own only for values computed on demand: a tensor's max is read from it when asked.
        computed = {i: v for i, (_, v) in enumerate(distinct) if isinstance(v, Rows)}
        wholes = {i: whole_of(v) for i, v in computed.items() if keep}
        pairs = [(i, j) for i in range(len(distinct)) for j in range(i + 1, len(distinct))]
        diffs: dict[tuple[int, int], list[torch.Tensor]] = {pair: [] for pair in pairs}
        same = dict.fromkeys(pairs, True)
        largest = dict.fromkeys(computed, 0.0)
        for start, stop in row_blocks(distinct[0][1]):
            blocks = [block(v, start, stop) for _, v in distinct]
            for i in computed:
                largest[i] = max(largest[i], _largest(blocks[i]))
            for i, whole in wholes.items():
                whole[start:stop] = blocks[i]
            for i, j in pairs:
                rows = _row_max(blocks[i], blocks[j].to(blocks[i].device))
                diffs[i, j].append(rows)
                # |a - b| is 0 exactly where a == b, but NaN where both are the same infinity: torch.equal there.
                if bool(rows.isnan().any()):
                    same[i, j] = same[i, j] and torch.equal(blocks[i], blocks[j].to(blocks[i].device))
                else:
                    same[i, j] = same[i, j] and not bool(rows.any())
        for i, j in pairs:
            self.rows[keys[i], keys[j]] = self.rows[keys[j], keys[i]] = torch.cat(diffs[i, j])
            self.same[keys[i], keys[j]] = self.same[keys[j], keys[i]] = same[i, j]
        self.largest.update((keys[i], value) for i, value in largest.items())
        self.wholes.update((keys[i], whole) for i, whole in wholes.items())

    def take(self, value: Value) -> Value:
        """`value` as the tensor the survey computed and kept, handed out once (the next taker gets `value`, computed
        again where it is put); `value` itself where none was kept."""
        whole = self.wholes.pop(value_key(value), None)
        if whole is None:
            return value
        self.taken[value_key(whole)] = value_key(value)
        return whole

    def release(self) -> None:
        """Let go of the kept values nobody took."""
        self.wholes.clear()

    def known_diff(self, tensor: torch.Tensor, value: Value) -> float | None:
        """max |tensor - value| without reading either, where `tensor` is a kept value the engine took (its storage
        says which) and the survey compared that value with `value`; None otherwise."""
        held = self.taken.get(value_key(tensor))
        want = value_key(value)
        if held is None or tensor.shape != value.shape or tensor.dtype != value.dtype:
            return None
        if held == want:
            return 0.0
        return float(self.rows[held, want].max()) if (held, want) in self.rows else None

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


def whole_of(value: Rows) -> torch.Tensor:
    """Room for the whole of `value`, where it is computed (the one place the survey holds a value whole)."""
    return torch.empty(value.shape, dtype=value.dtype, device=value.device)


def _largest(rows: torch.Tensor) -> float:
    """max |rows| (0 for none), without a temporary as big as the block."""
    if not rows.numel():
        return 0.0
    low, high = torch.aminmax(rows)
    return max(-float(low), float(high))


#: Elements of each slice `_row_max` computes at once: its float32 temporary (1 MB) stays in the CPU's cache.
_SLICE = 1 << 18


def _row_max(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """max |a - b| of every row (every element of a 1-D tensor), in float32.

    A few rows at a time, in place in one temporary: on a whole block the float32 copies, the difference and |.|
    each went through memory (issue 26). The max of the same float32 differences: the same figures, NaN included.
    """
    if a.dim() < 2:
        return (a.float() - b.float()).abs().reshape(-1)
    out = torch.empty(a.shape[0], dtype=torch.float32, device=a.device)
    step = max(1, _SLICE // max(1, a[0].numel()))
    for start in range(0, a.shape[0], step):
        # A copy even of a float32 block: `a` may be the model's own weight.
        diff = a[start : start + step].to(torch.float32, copy=True).sub_(b[start : start + step].float())
        torch.amax(diff.abs_().flatten(1), dim=1, out=out[start : start + step])
    return out
