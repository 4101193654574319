"""Comparisons between tied members' merged weights: exact, and each LoRA member's weight computed once."""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import safemerge
from safemerge._decide import layer_merge
from safemerge._model.distances import Distances, _row_max
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
    assert group.uniform and group.changed and group.max_abs_spread == 0.0  # decided from the factors: one value
    report = safemerge.safe_merge(model, tmp_path / "keep", policy="keep")
    assert report.verification is not None and report.verification.ok
    merged = report.model
    assert merged.lm_head.weight is merged.model.embed_tokens.weight
    assert torch.allclose(merged.lm_head.weight, once, rtol=0, atol=1e-6)


@pytest.fixture
def computed(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """How many blocks of rows of each LoRA layer's merged weight are computed (safemerge's own Rows, counted)."""
    counts: Counter[str] = Counter()
    lora_weight = layer_merge._lora_weight

    def counted(layer: Any, weight: torch.Tensor) -> Rows:
        value = lora_weight(layer, weight)
        name = type(layer).__name__

        def rows(start: int, stop: int) -> torch.Tensor:
            counts[name] += 1
            return value.compute(start, stop)

        return dataclasses.replace(value, compute=rows)

    monkeypatch.setattr(layer_merge, "_lora_weight", counted)
    return counts


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(("kind", "policy"), [("lora-both", "untie"), ("lora-both-ensure-tying", "keep")])
def test_each_member_s_merged_weight_is_computed_once_per_merge(
    build: Callable[[str, str, str], Any], computed: Counter[str], tmp_path: Path, kind: str, policy: str, variant: str
) -> None:
    """The analysis computes each tied member's merged weight once, for every comparison and figure; the merge puts
    that tensor in the model, and the check in memory knows it by its storage: nothing is computed again."""
    model = build("llama", kind, variant)
    if kind == "lora-both-ensure-tying" and not lora_tied_by_peft(model):
        pytest.skip("this peft gives lm_head a LoRA of its own under ensure_weight_tying")
    # The tiny model's weights are one block each; ensure_weight_tying's head is the embedding's value, computed once.
    once = Counter({"Embedding": 1, "Linear": 1}) if kind == "lora-both" else Counter({"Embedding": 1})
    safemerge.inspect_ties(model)
    assert computed == once
    computed.clear()
    report = safemerge.safe_merge(model, tmp_path / "out", policy=policy)
    assert report.verification is not None and report.verification.ok
    assert computed == once


def _computed(tensor: torch.Tensor) -> Rows:
    """`tensor` as a value computed a block of rows at a time, as a LoRA member's merged weight is."""
    return Rows(tensor.shape, tensor.dtype, lambda start, stop: tensor[start:stop].clone(), tensor.device)


def test_a_kept_value_is_taken_once_and_known_by_its_storage() -> None:
    """The survey keeps computed values whole (`keep`): taken once as that tensor (then computed again where
    put), and a taken tensor's distance to any value it was compared with is the survey's, without reading it."""
    base = torch.randn(64, 16, generator=torch.Generator().manual_seed(1))
    one, other = _computed(base + 1e-3), _computed(base - 1e-3)
    distances = Distances()
    distances.survey([base, one, other], keep=True)
    whole = distances.take(one)
    assert isinstance(whole, torch.Tensor) and torch.equal(whole, base + 1e-3)
    assert distances.take(one) is one  # handed out once
    assert distances.known_diff(whole, one) == 0.0
    assert distances.known_diff(whole, other) == float(((base + 1e-3) - (base - 1e-3)).abs().max())
    assert distances.known_diff((base + 1e-3).clone(), one) is None  # equal values, but not the tensor taken
    assert distances.known_diff(whole, _computed(base)) is None  # a value the survey never saw
    assert distances.max_diff(base, one) == float(((base + 1e-3) - base).abs().max())
    distances.release()
    assert distances.take(other) is other


def test_without_keep_nothing_is_held() -> None:
    """The analysis of inspect_ties, verify_merged and the low-memory engine keeps no value whole."""
    base = torch.randn(64, 16, generator=torch.Generator().manual_seed(1))
    one = _computed(base + 1e-3)
    distances = Distances()
    distances.survey([base, one])
    assert not distances.wholes and distances.take(one) is one


def test_row_max_a_few_rows_at_a_time_gives_the_whole_block_s_figures() -> None:
    """The survey's row-wise max |a - b| in cache-sized slices (issue 26): the figures of the float32 difference
    of the whole block, exactly, NaN and inf included, and a float32 input left as it was."""
    torch.manual_seed(0)
    a, b = torch.randn(300, 700), torch.randn(300, 700).bfloat16()
    a[3, 5], a[250, 1], b[7, 2] = float("nan"), float("inf"), float("-inf")
    before = a.clone()
    got = _row_max(a, b)
    want = torch.linalg.vector_norm(a.float() - b.float(), float("inf"), dim=1)
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got.nan_to_num(), want.nan_to_num())
    assert torch.equal(a.isnan(), before.isnan()) and torch.equal(a.nan_to_num(), before.nan_to_num())
    assert torch.equal(_row_max(a[0], b[0]), (a[0] - b[0].float()).abs())
