"""One flow for both engines: the in-memory and the low-memory engine run through the same pipeline
(`safemerge._pipeline.run`) on the same saved base and adapter, and their reports agree field by field."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import safemerge
from safemerge import _pipeline
from safemerge._engines.in_memory import InMemory
from safemerge._engines.low_memory import LowMemory
from safemerge._output import ship as _ship
from safemerge._pretrained import load_inputs
from safemerge._request import MergeRequest
from tests.models import needs_low_memory

#: Report fields that legitimately differ between the engines, and why. Every other field must be equal.
ENGINE_SPECIFIC = {
    # Each run writes its own output directory (each is compared with its own).
    "save_directory": "each engine writes its own OUT",
    # The "save" action (the last) says how the files were written: save_pretrained, or safetensors shards streamed a
    # block of rows at a time (`Engine.saved_as`). The in-memory engine may add "retie-like-loader" actions for the
    # model it hands back (none on this row); the actions are compared without those, and the "save" detail below.
    "actions": "the last action says how the files were written",
    # The low-memory engine hands back no model, so it loads none with transformers' tie detection: its
    # `ties_after_reload` is None where the in-memory engine's lists the reloaded model's ties.
    "verification": "ties_after_reload: only the in-memory engine reloads the whole model",
}


def _run_both(base: str, adapter: str, tmp_path: Path, policy: str) -> tuple[Callable[[], Any], Callable[[], Any]]:
    def request(out: Path) -> MergeRequest:
        checked = MergeRequest.for_pretrained(base, adapter, out, policy=policy)
        return checked.with_inputs(_ship.Extras(base=base, adapter=adapter), None)

    def in_memory() -> Any:
        return _pipeline.run(request(tmp_path / "in-memory"), InMemory(load_inputs(base, adapter), owned=True))

    def low_memory() -> Any:
        engine = LowMemory(lambda folder: load_inputs(base, adapter, offload_folder=folder))
        return _pipeline.run(request(tmp_path / "low-memory"), engine)

    return in_memory, low_memory


@needs_low_memory
def test_both_engines_run_one_flow_and_report_the_same(
    base_dirs: dict[str, Path], saved_adapter: Callable[[str, str], Path], tmp_path: Path
) -> None:
    base, adapter = str(base_dirs["llama"]), str(saved_adapter("llama", "lora-both"))
    in_memory, low_memory = _run_both(base, adapter, tmp_path, "untie")
    want, got = in_memory().to_dict(), low_memory().to_dict()
    assert want["save_directory"] == str(tmp_path / "in-memory")
    assert got["save_directory"] == str(tmp_path / "low-memory")
    same = {key for key in want if key not in ENGINE_SPECIFIC}
    assert {key: got[key] for key in same} == {key: want[key] for key in same}
    assert set(got) == set(want)
    assert [a for a in want["actions"] if a["code"] != "retie-like-loader"][:-1] == got["actions"][:-1]
    assert (want["actions"][-1]["code"], got["actions"][-1]["code"]) == ("save", "save")
    assert got["actions"][-1]["detail"] == want["actions"][-1]["detail"].replace("in-memory", "low-memory") + (
        " as safetensors shards, a block of rows at a time"
    )
    assert (want["verification"].pop("ties_after_reload"), got["verification"].pop("ties_after_reload")) == ([], None)
    assert got["verification"] == want["verification"]
    assert want["verification"]["ok"] and want["verification"]["reloaded_tensors_compared"] > 0


@needs_low_memory
def test_both_engines_refuse_the_same_way_in_the_same_flow(
    base_dirs: dict[str, Path], saved_adapter: Callable[[str, str], Path], tmp_path: Path
) -> None:
    base, adapter = str(base_dirs["llama"]), str(saved_adapter("llama", "lora-both"))
    in_memory, low_memory = _run_both(base, adapter, tmp_path, "keep")
    with pytest.raises(safemerge.TiedWeightsError, match=r"does not merge this model: .* Fix: ") as refused:
        in_memory()
    with pytest.raises(safemerge.TiedWeightsError) as refused_low:
        low_memory()
    assert str(refused_low.value) == str(refused.value)
    assert not list(tmp_path.iterdir()), "a refusal writes nothing, and the claim leaves no sibling"
