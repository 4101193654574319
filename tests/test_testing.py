"""safemerge.testing: assert_reload_identical catches value and tie differences; assert_merge_faithful catches a
merge that does not compute what the adapter model computes; the docs' pytest how-to runs as written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import safemerge
from safemerge.testing import assert_merge_faithful, assert_reload_identical
from tests.models import ARCHS, load_base

pytest_plugins = ["pytester"]
HOW_TO = Path(__file__).resolve().parent.parent / "docs" / "how-to" / "test_merged_model.py"


def test_identical_reload_passes(base_dirs: dict[str, Path]) -> None:
    assert_reload_identical(base_dirs["llama"], load_base(ARCHS["llama"], base_dirs["llama"]))


def test_changed_tensor_is_listed(base_dirs: dict[str, Path]) -> None:
    model = load_base(ARCHS["gpt2"], base_dirs["gpt2"])
    with torch.no_grad():
        model.transformer.h[0].attn.c_attn.weight.add_(0.5)
    with pytest.raises(AssertionError, match=r"transformer\.h\.0\.attn\.c_attn\.weight: values differ"):
        assert_reload_identical(base_dirs["gpt2"], model)


def test_tie_difference_is_listed(base_dirs: dict[str, Path], tmp_path: Path) -> None:
    model = load_base(ARCHS["llama"], base_dirs["llama"])
    model.lm_head.weight = torch.nn.Parameter(model.model.embed_tokens.weight.detach().clone())
    with pytest.raises(AssertionError, match=r"tied after reload, not in the merged model"):
        assert_reload_identical(base_dirs["llama"], model)


def test_faithful_merge_passes(build, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    safemerge.safe_merge(build("gpt2", "save-head", "reloaded"), tmp_path / "m", policy="untie")
    assert_merge_faithful(tmp_path / "m", build("gpt2", "save-head", "reloaded"))


def test_plain_merge_of_a_tied_head_fails_with_the_member_and_figures(build, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    build("llama", "lora-head", "reloaded").merge_and_unload().save_pretrained(tmp_path / "plain")
    with pytest.raises(
        AssertionError,
        match=r"(?s)does not compute what the adapter model computes \(max \|logits difference\| [0-9.]+.*"
        r"model\.embed_tokens\.weight: differs from the weight the adapter model uses",
    ):
        assert_merge_faithful(tmp_path / "plain", build("llama", "lora-head", "reloaded"))


def test_the_pytest_how_to_includes_the_file() -> None:
    page = (HOW_TO.parent / "pytest.md").read_text(encoding="utf-8")
    assert '\n--8<-- "docs/how-to/test_merged_model.py"\n' in page


def test_the_pytest_how_to_runs_as_written(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_merged_model=HOW_TO.read_text(encoding="utf-8"))
    pytester.runpytest_inprocess("-p", "no:cacheprovider").assert_outcomes(passed=2)


@pytest.mark.parametrize("path", ["missing-dir", "file", "empty-dir"])
def test_a_path_that_is_no_model_directory_is_a_usage_error(build, tmp_path: Path, path: str) -> None:  # type: ignore[no-untyped-def]
    """Not an assertion about a merge but a wrong argument: InputError (a ValueError), what the path is, and the fix;
    never huggingface_hub's "Repo id must be in the form ..."."""
    (tmp_path / "file").write_text("{}")
    (tmp_path / "empty-dir").mkdir()
    where = tmp_path / path
    message = {
        "missing-dir": r"does not exist \(no such file or directory\).*Fix: check the path",
        "file": r"is a file, not a directory.*Fix: pass the directory that holds config.json",
        "empty-dir": r"is a directory without config.json.*Fix: pass the directory that holds config.json",
    }[path]
    model = build("llama", "lora-attention", "reloaded")
    with pytest.raises(safemerge.InputError, match=rf"The saved model '{where}' {message}"):
        assert_reload_identical(where, model.get_base_model())
    with pytest.raises(safemerge.InputError, match=rf"The merged model '{where}' {message}"):
        assert_merge_faithful(where, model)
