"""safemerge.testing.assert_reload_identical catches value and tie differences."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from safemerge.testing import assert_reload_identical
from tests.models import ARCHS, load_base


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
