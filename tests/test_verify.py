"""Verification that keeps its promise at little cost: one forward pass of each model, the merged model freed before
the saved one is loaded when safemerge owns it, the checkpoint's dtype kept, progress bars only where asked."""

from __future__ import annotations

import gc
import json
import sys
import weakref
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from safetensors import safe_open

import safemerge
from safemerge import _pretrained
from safemerge._checks import verify as _verify
from safemerge.cli import main
from tests.models import ARCHS, adapter_model, load_base, logits, sample_ids, save_base


def test_merge_pretrained_never_holds_two_models(
    base_dirs: dict[str, Path], saved_adapter: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The model merge_pretrained loaded is freed once saved; the one loaded back from disk is returned."""
    loaded: list[weakref.ref[Any]] = []
    alive_at_reload: list[bool] = []
    real_load, real_reload = _pretrained.load_inputs, _verify.reload

    def load_inputs(*args: Any, **kwargs: Any) -> Any:
        model = real_load(*args, **kwargs)
        loaded.append(weakref.ref(model.get_base_model()))
        return model

    def reload(*args: Any, **kwargs: Any) -> Any:
        gc.collect()
        alive_at_reload.append(loaded[0]() is not None)
        return real_reload(*args, **kwargs)

    monkeypatch.setattr(_pretrained, "load_inputs", load_inputs)
    monkeypatch.setattr(_verify, "reload", reload)
    adapter = saved_adapter("llama", "lora-both")
    report = safemerge.merge_pretrained(str(base_dirs["llama"]), str(adapter), tmp_path / "m", policy="untie")
    assert report.ok and alive_at_reload == [False], "the merged model must be gone before the reload"
    assert report.verification is not None and report.verification.max_abs_logits_diff_in_memory is None
    expected = logits(
        peft.PeftModel.from_pretrained(load_base(ARCHS["llama"], base_dirs["llama"]), adapter), sample_ids()
    )
    torch.testing.assert_close(logits(report.model, sample_ids()), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("kind", "policy"), [("lora-both", "untie"), ("trainable-token-indices", "keep")])
def test_a_bf16_checkpoint_stays_bf16(tmp_path: Path, kind: str, policy: str) -> None:
    """PEFT keeps LoRA factors in float32: the merged tied weights are rounded back to the checkpoint's dtype."""
    base = save_base(ARCHS["llama"], tmp_path / "base")
    load_base(ARCHS["llama"], base).to(torch.bfloat16).save_pretrained(base)
    adapter = tmp_path / "adapter"
    adapter_model(ARCHS["llama"], base, kind, adapter)
    report = safemerge.merge_pretrained(str(base), str(adapter), tmp_path / "m", policy=policy, dtype="auto")
    assert report.ok
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as saved:
        assert {saved.get_slice(key).get_dtype() for key in saved.keys()}  # noqa: SIM118 (safe_open is not a dict) == {"BF16"}


@pytest.mark.parametrize(("quiet", "shown"), [(False, True), (True, False)])
def test_progress_bars_on_a_terminal_unless_quiet(
    base_dirs: dict[str, Path],
    saved_adapter: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    quiet: bool,
    shown: bool,
) -> None:
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    argv = ["merge", str(base_dirs["llama"]), str(saved_adapter("llama", "lora-head")), str(tmp_path / "m")]
    assert main([*argv, "--policy", "untie", "--json", *(["-q"] if quiet else [])]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["ok"] is True
    assert ("Fingerprinting tensors" in captured.err) is shown


def test_infinite_and_nan_figures_are_written_as_null(tmp_path: Path) -> None:
    """A probe or reload that failed leaves inf figures: reports stay JSON (null), and a non-finite float that
    escapes to_jsonable raises instead of writing Infinity."""
    from safemerge._output.claim import write_json_atomic
    from safemerge._records import MemberCheck, Verification

    verification = Verification(
        probe_tokens=8,
        logits_tolerance=1e-3,
        max_abs_logits_diff_in_memory=float("nan"),
        max_abs_logits_diff_reloaded=float("inf"),
        members=(MemberCheck("lm_head.weight", float("-inf"), None),),
        reloaded_tensors_compared=0,
        tensors_not_identical=(),
        ties_after_reload=None,
        problems=("the reloaded model failed on the probe batch (IndexError: index out of range)",),
    )
    write_json_atomic(tmp_path / "report.json", verification.to_dict())
    data = json.loads((tmp_path / "report.json").read_text(), parse_constant=_refuse_constant)
    assert data["max_abs_logits_diff_in_memory"] is None and data["max_abs_logits_diff_reloaded"] is None
    assert data["max_abs_logits_diff"] is None and data["members"][0]["max_abs_diff_vs_adapter"] is None
    with pytest.raises(ValueError, match="not JSON compliant"):
        write_json_atomic(tmp_path / "bad.json", {"figure": float("inf")})
    assert not list(tmp_path.glob("*bad*")), "nothing half-written"


def _refuse_constant(constant: str) -> None:
    raise ValueError(f"{constant} is not JSON")
