"""save_directory safety: refused when occupied, replaced only after verification, never half-written."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import safemerge
from safemerge._checks import verify as _verify
from safemerge._engines import in_memory
from safemerge._model import reload as _reload
from safemerge._output import claim as _output
from safemerge._output.claim import FAILED_MARKER, work_directory
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


# --- nothing created before the merge is known to proceed (issue 22) -------------------------------------------------


@pytest.mark.parametrize("variant", ["in-memory", "reloaded"])
def test_refused_merge_leaves_no_parent_directory(build, tmp_path: Path, variant: str) -> None:  # type: ignore[no-untyped-def]
    model = build("llama", "lora-head", variant)
    with pytest.raises(safemerge.TiedWeightsError, match=r"policy='keep' does not merge.*Fix: use policy='untie'"):
        safemerge.safe_merge(model, tmp_path / "a" / "b" / "out", policy="keep")
    assert list(tmp_path.iterdir()) == []


def test_interrupted_merge_leaves_no_parent_directory(model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    def interrupted(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise KeyboardInterrupt

    monkeypatch.setattr(_verify, "check_reload", interrupted)
    with pytest.raises(KeyboardInterrupt):
        safemerge.safe_merge(model, tmp_path / "a" / "b" / "out", policy="untie")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


# --- long output names (issue 22) ------------------------------------------------------------------------------------


def test_siblings_of_long_names_fit_and_differ(tmp_path: Path) -> None:
    first, second = tmp_path / ("m" * 254 + "1"), tmp_path / ("m" * 254 + "2")
    assert work_directory(first) != work_directory(second)
    assert work_directory(first) == work_directory(tmp_path / ("m" * 254 + "1")), "the next run finds it"
    assert len(work_directory(first).name) <= 255 and work_directory(first).name.startswith(".mmm")
    assert work_directory(tmp_path / "out").name == ".out.safemerge"


def test_failed_merge_into_a_long_name_is_quarantined_beside_it(model, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / ("é" * 127)  # 254 bytes: the byte limit, not the character count, decides
    with pytest.raises(safemerge.VerificationError, match=r"reloaded logits differ.*\.failed-") as info:
        safemerge.safe_merge(model, out, policy="untie", logits_tolerance=1e-30)
    failed = Path(info.value.report.save_directory)
    assert failed.parent == tmp_path and len(os.fsencode(failed.name)) <= 255 and failed.name.startswith("éé")
    assert (failed / FAILED_MARKER).exists() and not out.exists()


# --- directories that overwrite=True must never replace (issue 22) ---------------------------------------------------


@pytest.mark.parametrize("where", ["cwd", "ancestor", "home", "root"])
def test_overwrite_never_replaces_the_current_directory_home_or_root(  # type: ignore[no-untyped-def]
    model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    here = tmp_path / "up" / "here"
    here.mkdir(parents=True)
    (here / "mine.txt").write_text("mine")
    monkeypatch.chdir(here)
    monkeypatch.setenv("HOME", str(tmp_path / "up"))
    target = {"cwd": Path("."), "ancestor": tmp_path, "home": Path("~").expanduser(), "root": Path("/")}[where]
    refused = r"safemerge replaces the whole directory.*Fix: choose a new directory"
    with pytest.raises(safemerge.InputError, match=refused):
        safemerge.safe_merge(model, target, policy="untie", overwrite=True)
    assert (here / "mine.txt").read_text() == "mine"
    assert sorted(p.name for p in here.iterdir()) == ["mine.txt"]


# --- putting the model in place without an atomic swap (issue 22) ----------------------------------------------------


def _old_output(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old model")
    return out


def _failing_rename(monkeypatch: pytest.MonkeyPatch, fails: Callable[[Path, Path], bool]) -> None:
    """os.rename that fails (EIO) for the renames `fails` picks, and renames as usual otherwise."""
    real = os.rename

    def rename(src, dst, **kwargs):  # type: ignore[no-untyped-def]
        if fails(Path(src), Path(dst)):
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(src), None, str(dst))
        real(src, dst, **kwargs)

    monkeypatch.setattr(_output, "_exchange", lambda a, b: False)  # a filesystem without renameat2's exchange
    monkeypatch.setattr(os, "rename", rename)


def test_failed_rename_without_atomic_swap_puts_the_old_output_back(  # type: ignore[no-untyped-def]
    model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = _old_output(tmp_path)
    _failing_rename(monkeypatch, lambda src, dst: src.name == "model" and dst == out)
    with pytest.raises(
        safemerge.OutputWriteError, match=r"Could not put the merged model at .*put back.*unchanged.*Fix:"
    ):
        safemerge.safe_merge(model, out, policy="untie", overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"] and (out / "old.txt").read_text() == "old model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "out"]


def test_old_output_that_cannot_be_put_back_is_kept_for_the_next_run(  # type: ignore[no-untyped-def]
    model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = _old_output(tmp_path)
    _failing_rename(monkeypatch, lambda src, dst: dst == out and src.name in ("model", "previous"))
    with pytest.raises(safemerge.OutputWriteError, match=r"old model is kept at '.*previous'.*Fix: run safemerge"):
        safemerge.safe_merge(model, out, policy="untie", overwrite=True)
    assert (work_directory(out) / "previous" / "old.txt").read_text() == "old model"
    monkeypatch.undo()
    with pytest.raises(safemerge.OutputExistsError, match="not empty"):  # the next run puts it back first
        safemerge.safe_merge(model, out, policy="untie")
    assert (out / "old.txt").read_text() == "old model" and not work_directory(out).exists()


def test_failed_swap_or_rename_is_an_output_write_error(  # type: ignore[no-untyped-def]
    model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = _old_output(tmp_path)

    def exchange_fails(a: Path, b: Path) -> bool:
        raise OSError(errno.EIO, os.strerror(errno.EIO), str(a), None, str(b))

    monkeypatch.setattr(_output, "_exchange", exchange_fails)
    with pytest.raises(safemerge.OutputWriteError, match=r"Could not put the merged model at .*unchanged.*Fix:"):
        safemerge.safe_merge(model, out, policy="untie", overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    _failing_rename(monkeypatch, lambda src, dst: src.name == "model" and dst.name == "new")
    with pytest.raises(safemerge.OutputWriteError, match=r"Could not put the merged model at .*new.*Fix:"):
        safemerge.safe_merge(model, tmp_path / "new", policy="untie")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "out"]


@pytest.mark.parametrize("variant", ["in-memory", "reloaded"])
def test_an_output_filled_by_another_program_during_the_merge_is_not_replaced(  # type: ignore[no-untyped-def]
    build, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, variant: str
) -> None:
    """Without overwrite, files another program puts at OUT while safemerge runs are never swapped out and deleted."""
    out = tmp_path / "merged"
    save = _output.write_staging

    def save_then_fill(held, write):  # type: ignore[no-untyped-def]
        result = save(held, write)
        if not out.exists():  # once, after the model is written (the tokenizer and card are written the same way)
            out.mkdir()
            (out / "users_file.txt").write_text("precious")
        return result

    monkeypatch.setattr(_output, "write_staging", save_then_fill)
    with pytest.raises(safemerge.OutputExistsError, match=r"was filled by another program .* Fix: run again"):
        safemerge.safe_merge(build("llama", "lora-attention", variant), out, policy="untie")
    assert sorted(p.name for p in out.iterdir()) == ["users_file.txt"]
    assert (out / "users_file.txt").read_text() == "precious"
