"""Comparisons between tied members' merged weights: exact, and each LoRA member's weight computed once."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import safemerge
from safemerge._decide import layer_merge
from safemerge._model.distances import Distances, row_checksums
from safemerge._model.rows import Rows
from tests.models import lora_tied_by_peft

VARIANTS = ["in-memory", "reloaded"]
#: The token whose row of the head's LoRA update is made to differ from the embedding's.
TOKEN = 7


def _same_update_but_one_row(model: Any, bump: float) -> None:
    """Give lm_head's LoRA the embedding LoRA's update exactly (its factors, transposed, as ensure_weight_tying
    does), then change one factor entry: the two low-rank updates differ in row TOKEN only, by bump x a row of A."""
    root = model.get_base_model()
    embed, head = root.model.embed_tokens, root.lm_head
    with torch.no_grad():
        head.lora_A["default"].weight.copy_(embed.lora_embedding_B["default"].T)
        head.lora_B["default"].weight.copy_(embed.lora_embedding_A["default"].T)
        head.lora_B["default"].weight[TOKEN, 0] += bump


def _merged(layer: Any) -> torch.Tensor:
    """PEFT's own merge of one LoRA layer (its base weight plus get_delta_weight), in float32."""
    with torch.no_grad():
        return layer.get_base_layer().weight.float() + layer.get_delta_weight("default").float()


@pytest.mark.parametrize("variant", VARIANTS)
def test_low_rank_updates_that_differ_in_one_row_are_told_apart(
    build: Callable[[str, str, str], Any], tmp_path: Path, variant: str
) -> None:
    """Two rank-4 updates equal but for one row of 64 of 128 x 64 entries: the members differ (an average over
    the whole update would hide it), by exactly the row's difference; keep refuses, untie merges them apart."""
    model = build("llama", "lora-both", variant)
    _same_update_but_one_row(model, bump=1e-3)
    root = model.get_base_model()
    expected = _merged(root.lm_head) - _merged(root.model.embed_tokens)
    assert int((expected.abs().amax(dim=1) > 0).sum()) == 1, "the updates must differ in one row only"
    group = safemerge.inspect_ties(model).groups[0]
    assert not group.uniform
    assert group.max_abs_spread == pytest.approx(float(expected.abs().max()), rel=1e-4)
    with pytest.raises(safemerge.TiedWeightsError, match=r"Fix: use policy='untie'"):
        safemerge.safe_merge(model, tmp_path / "keep", policy="keep")
    report = safemerge.safe_merge(model, tmp_path / "untie", policy="untie")
    assert report.verification is not None and report.verification.ok
    merged = report.model
    assert not torch.equal(merged.lm_head.weight[TOKEN], merged.model.embed_tokens.weight[TOKEN])


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_difference_below_rounding_keeps_the_members_together(
    build: Callable[[str, str, str], Any], variant: str
) -> None:
    """The same two updates with the one row apart by less than the rounding of the merged weights: one change."""
    model = build("llama", "lora-both", variant)
    _same_update_but_one_row(model, bump=1e-9)
    group = safemerge.inspect_ties(model).groups[0]
    assert group.uniform and group.changed
    assert group.max_abs_spread <= 4 * torch.finfo(torch.float32).eps * 1.0


@pytest.mark.parametrize("variant", VARIANTS)
def test_ensure_weight_tying_s_shared_factors_are_one_change(
    build: Callable[[str, str, str], Any], tmp_path: Path, variant: str
) -> None:
    """ensure_weight_tying (every factor trained, the embedding's A included): lm_head's LoRA is the embedding's,
    transposed, so both members hold one change, applied once under keep."""
    model = build("llama", "lora-both-ensure-tying", variant)
    if not lora_tied_by_peft(model):
        pytest.skip("this peft gives lm_head a LoRA of its own under ensure_weight_tying")
    root = model.get_base_model()
    once = _merged(root.model.embed_tokens)
    group = safemerge.inspect_ties(model).groups[0]
    assert group.uniform and group.changed and group.max_abs_spread <= 4 * torch.finfo(torch.float32).eps
    report = safemerge.safe_merge(model, tmp_path / "keep", policy="keep")
    assert report.verification is not None and report.verification.ok
    merged = report.model
    assert merged.lm_head.weight is merged.model.embed_tokens.weight
    assert torch.allclose(merged.lm_head.weight, once, rtol=0, atol=1e-6)


@pytest.fixture
def computed(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """How many blocks of rows of each LoRA layer's merged weight are computed (safemerge's own Rows, counted)."""
    counts: Counter[str] = Counter()
    lora_delta = layer_merge._lora_delta

    def counted(layer: Any, adapter: str) -> Any:
        delta = lora_delta(layer, adapter)
        if delta is None:
            return None
        name = type(layer).__name__

        def rows(block: torch.Tensor, start: int, stop: int) -> torch.Tensor:
            counts[name] += 1
            return delta(block, start, stop)

        return rows

    monkeypatch.setattr(layer_merge, "_lora_delta", counted)
    return counts


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(("kind", "policy"), [("lora-both", "untie"), ("lora-both-ensure-tying", "keep")])
def test_each_member_s_merged_weight_is_computed_once_per_step(
    build: Callable[[str, str, str], Any], computed: Counter[str], tmp_path: Path, kind: str, policy: str, variant: str
) -> None:
    """The analysis computes each tied member's merged weight once for every comparison and figure; the merge
    computes it once more where it puts it in the model; the check in memory reads the model's tensors only."""
    model = build("llama", kind, variant)
    if kind == "lora-both-ensure-tying" and not lora_tied_by_peft(model):
        pytest.skip("this peft gives lm_head a LoRA of its own under ensure_weight_tying")
    safemerge.inspect_ties(model)
    assert computed == Counter({"Embedding": 1, "Linear": 1})  # the tiny model's weights are one block each
    computed.clear()
    report = safemerge.safe_merge(model, tmp_path / "out", policy=policy)
    assert report.verification is not None and report.verification.ok
    # untie: each member's own tensor; keep: the one shared value, computed from the first changed member.
    assert computed == (Counter({"Embedding": 2, "Linear": 2}) if policy == "untie" else Counter(Embedding=2, Linear=1))


def test_row_checksums_tell_a_one_ulp_change_and_a_swap() -> None:
    """The checksum of a row changes with any one element's last bit, and with two elements swapped."""
    rows = torch.randn(3, 1000, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    nudged = rows.clone()
    nudged[1, 500] = torch.nextafter(nudged[1, 500].float(), torch.tensor(10.0)).to(torch.bfloat16)
    if torch.equal(nudged, rows):  # a float32 step below bfloat16's: step bfloat16's own
        nudged[1, 500] = (nudged[1, 500].view(torch.int16) + 1).view(torch.bfloat16)
    swapped = rows.clone()
    swapped[2, [3, 4]] = rows[2, [4, 3]]
    assert torch.equal(row_checksums(rows), row_checksums(rows.clone()))
    assert (row_checksums(nudged) != row_checksums(rows)).tolist() == [False, True, False]
    assert (row_checksums(swapped) != row_checksums(rows)).tolist() == [False, False, True]


def _computed(tensor: torch.Tensor) -> Rows:
    """`tensor` as a value computed a block of rows at a time, as a LoRA member's merged weight is."""
    return Rows(tensor.shape, tensor.dtype, lambda start, stop: tensor[start:stop].clone(), tensor.device)


def test_a_tensor_s_distance_is_read_from_the_survey() -> None:
    """A tensor bit-identical to a surveyed computed value: its distance to each value compared with that one,
    without computing either again; None for a tensor a bit off, or a value the survey never saw."""
    base = torch.randn(64, 16, generator=torch.Generator().manual_seed(1))
    one, other = _computed(base + 1e-3), _computed(base - 1e-3)
    distances = Distances()
    distances.survey([base, one, other])
    assert distances.diff_from_checksums(base + 1e-3, one) == 0.0
    assert distances.diff_from_checksums(base + 1e-3, other) == float(((base + 1e-3) - (base - 1e-3)).abs().max())
    off = base + 1e-3
    off[5, 5] = torch.nextafter(off[5, 5], torch.tensor(10.0))
    assert distances.diff_from_checksums(off, one) is None
    assert distances.diff_from_checksums(base + 1e-3, _computed(base)) is None  # never surveyed
    assert distances.max_diff(base, one) == float(((base + 1e-3) - base).abs().max())
