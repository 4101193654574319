"""Effective weights from the adapter's own tensors: what PEFT's merge would give, without copying a PEFT layer."""

from __future__ import annotations

from typing import Any

import peft
import pytest
import torch

import safemerge
from safemerge._decide.layer_merge import merged_parameters
from safemerge._model.rows import materialise
from tests.models import ARCHS, load_base, perturb

#: (architecture, target module, what PEFT wraps it with)
LAYERS = [
    ("llama", "lm_head", "lora.Linear"),
    ("llama", "embed_tokens", "lora.Embedding"),
    ("gpt2", "c_attn", "lora.Linear on Conv1D (fan_in_fan_out)"),
    ("gpt2", "wte", "lora.Embedding"),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("arch", "target", "kind"), LAYERS)
def test_lora_weight_is_peft_s_merge(
    base_dirs: dict[str, Any], arch: str, target: str, kind: str, dtype: torch.dtype
) -> None:
    """W + scaling * B @ A, a block of rows at a time in float32: PEFT's own merge of the layer, rounded once."""
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=[target], fan_in_fan_out=target == "c_attn")
    model = peft.get_peft_model(load_base(ARCHS[arch], base_dirs[arch]).to(dtype), config)
    perturb(model)
    layer = next(m for name, m in model.named_modules() if name.endswith(target) and hasattr(m, "get_delta_weight"))
    base_weight = layer.get_base_layer().weight.detach().clone()
    ours = materialise(merged_parameters(layer)["weight"])
    assert torch.equal(layer.get_base_layer().weight, base_weight), "the base weight must not change"
    wide = torch.promote_types(dtype, torch.float32)
    peft_s = (base_weight.to(wide) + layer.get_delta_weight("default").to(wide)).to(dtype)
    assert ours.dtype == dtype and ours.shape == base_weight.shape
    ulp = torch.finfo(dtype).eps * float(peft_s.abs().max())
    assert float((ours.to(wide) - peft_s.to(wide)).abs().max()) <= ulp, kind


def test_a_lora_variant_is_merged_by_peft_or_refused(base_dirs: dict[str, Any], tmp_path: Any) -> None:
    """aLoRA is a lora.Linear whose merge is not W + B @ A (PEFT cannot merge it at all): never the fast path."""
    config = peft.LoraConfig(r=4, target_modules=["lm_head", "q_proj"], alora_invocation_tokens=[5, 6])
    model = peft.get_peft_model(load_base(ARCHS["llama"], base_dirs["llama"]), config)
    perturb(model)
    with pytest.raises(safemerge.UnsupportedAdapterError, match=r"lm_head\.weight.*aLoRA does not support merging"):
        safemerge.safe_merge(model, tmp_path / "m", policy="untie")
    assert not (tmp_path / "m").exists()
