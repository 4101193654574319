"""save_directory safety: refused when occupied, replaced only after verification, never half-written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import safemerge
from safemerge import _reload, _verify
from safemerge._engines import in_memory
from safemerge._output import FAILED_MARKER
from tests.models import ARCHS, adapter_model, logits, sample_ids


@pytest.fixture
def model(base_dirs: dict[str, Path], tmp_path: Path):  # type: ignore[no-untyped-def]
    return adapter_model(ARCHS["llama"], base_dirs["llama"], "lora-head", tmp_path / "adapter")


def test_non_empty_directory_is_refused_before_anything_changes(model, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    expected = logits(model, sample_ids())
    with pytest.raises(safemerge.OutputExistsError, match=r"not empty.*overwrite=True"):
        safemerge.safe_merge(model, out, policy="untie")
    assert (out / "keep.txt").read_text() == "mine"
    assert torch.equal(logits(model, sample_ids()), expected)


def test_output_exists_error_is_a_file_exists_error(model, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        safemerge.safe_merge(model, target, policy="untie")


def test_overwrite_replaces_the_directory(model, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    report = safemerge.safe_merge(model, out, policy="untie", overwrite=True)
    assert report.ok
    assert not (out / "stale.txt").exists()
    assert (out / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "out"], "no staging directory may be left"


def test_empty_existing_directory_is_used(model, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "out"
    out.mkdir()
    assert safemerge.safe_merge(model, out, policy="untie").save_directory == str(out)


def test_in_memory_verification_failure_saves_nothing(model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """An engine that skips a step of the plan: found before anything is written."""
    monkeypatch.setitem(in_memory._STEPS, "own-tensors", lambda *args: None)
    with pytest.raises(
        safemerge.VerificationError,
        match=r"merged lm_head\.weight: differs from the weight the adapter.*Nothing was saved",
    ) as info:
        safemerge.safe_merge(model, tmp_path / "out", policy="untie")
    assert info.value.report.ok is False
    assert info.value.report.save_directory is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_logits_are_checked_on_the_reload_and_a_failure_quarantined(model, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(safemerge.VerificationError, match=r"reloaded logits differ.*out\.failed-") as info:
        safemerge.safe_merge(model, tmp_path / "out", policy="untie", logits_tolerance=1e-30)
    assert info.value.report.verification.max_abs_logits_diff_in_memory is None, "one forward: on the reload"
    assert not (tmp_path / "out").exists()


def test_reload_mismatch_is_quarantined(model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """A reload that differs from the merged model (here: one tensor altered after the real reload)."""
    real_reload = _reload.reload

    def reload_with_a_changed_lm_head(directory, like):  # type: ignore[no-untyped-def]
        reloaded = real_reload(directory, like)
        with torch.no_grad():
            reloaded.lm_head.weight.add_(1.0)
        return reloaded

    monkeypatch.setattr(_verify, "reload", reload_with_a_changed_lm_head)
    out = tmp_path / "out"
    with pytest.raises(safemerge.VerificationError, match=r"lm_head\.weight: values differ.*failed-") as info:
        safemerge.safe_merge(model, out, policy="untie")
    assert not out.exists()
    failed = Path(info.value.report.save_directory)
    assert failed.name.startswith("out.failed-") and (failed / FAILED_MARKER).exists()
    member = next(m for m in info.value.report.verification.members if m.name == "lm_head.weight")
    assert member.reload_bit_identical is False


def test_verify_false_saves_without_reload(model, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    report = safemerge.safe_merge(model, tmp_path / "out", policy="untie", verify=False)
    assert report.verification is None and not report.verified and report.ok
    assert (tmp_path / "out" / "config.json").exists()
