"""The low-memory engine on a pre-quantized bitsandbytes checkpoint (QLoRA's "-bnb-4bit" bases): each quantized weight
read from the files and dequantized when its layer is loaded, checked against the adapter on the quantized base, and
the same checkpoint as the in-memory engine writes."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file

from safemerge import InputError, QuantizedBaseError, TiedWeightsError, merge_pretrained
from safemerge.cli import main
from tests.models import logits, needs_low_memory, sample_ids
from tests.test_faults import hashes
from tests.test_qlora import as_trained, load_4bit, qlora_files

pytest.importorskip("bitsandbytes")
pytestmark = [
    needs_low_memory,
    pytest.mark.filterwarnings("ignore::UserWarning:bitsandbytes", "ignore::UserWarning:transformers"),
]
__all__ = ["qlora_files"]  # the fixture, shared with tests/test_qlora.py


#: BitsAndBytesConfig options of the quantizations load_4bit (nf4, double quantization) does not make.
OTHER_KINDS: dict[str, dict[str, Any]] = {
    "int8": {"load_in_8bit": True},
    "fp4": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4"},
}


@pytest.fixture(scope="module")
def prequantized(base_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """The tiny tied Llama loaded quantized and saved as it is, by quantization: "nf4" (double quantization, float32
    compute), "nf4-bfloat16" (bfloat16 compute), "fp4" (without double quantization), "int8" (LLM.int8)."""
    root, made = tmp_path_factory.mktemp("prequantized"), {}

    def get(kind: str) -> Path:
        if kind not in made:
            if kind in OTHER_KINDS:
                config = transformers.BitsAndBytesConfig(**OTHER_KINDS[kind])
                model = transformers.AutoModelForCausalLM.from_pretrained(
                    base_dirs["llama"], quantization_config=config, device_map="cpu", dtype=torch.float32
                )
            else:
                model = load_4bit(base_dirs["llama"], torch.bfloat16 if kind == "nf4-bfloat16" else torch.float32)
            model.save_pretrained(root / kind)
            made[kind] = root / kind
        return Path(made[kind])

    return get


def the_model_as_trained(base: Path, adapter: Path) -> torch.Tensor:
    """The logits of the adapter on the quantized base, loaded as QLoRA users load it (bitsandbytes, on the CPU)."""
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[
        json.loads((base / "config.json").read_text())["dtype"]
    ]
    quantized = transformers.AutoModelForCausalLM.from_pretrained(base, device_map="cpu", dtype=dtype)
    return as_trained(peft.PeftModel.from_pretrained(quantized, adapter).eval())


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    found = {}
    for path in directory.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as handle:
            found.update({name: handle.get_tensor(name) for name in handle.keys()})  # noqa: SIM118 (not a mapping)
    return found


@pytest.mark.parametrize(
    ("kind", "tolerance"), [("nf4", 1e-5), pytest.param("nf4-bfloat16", 1.6e-2, marks=pytest.mark.full_matrix)]
)
def test_the_cli_merges_a_pre_quantized_checkpoint_on_the_low_memory_engine(
    prequantized: Callable[[str], Path],
    qlora_files: Callable[[str], Path],
    base_dirs: dict[str, Path],
    kind: str,
    tolerance: float,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    base, adapter = prequantized(kind), qlora_files("lora-attention")
    before = hashes(base) | hashes(adapter)
    out = tmp_path / "out"
    argv = ["merge", str(base), str(adapter), str(out), "--policy", "untie", "--low-memory"]
    assert main([*argv, "--base-weights", "dequantized", "-q"]) == 0
    assert "base weights dequantized: quantization gap " in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == (kind.partition("-")[2] or "float32")
    # No companion tensors (absmax, quant_map, quant_state...): the names of the 16-bit checkpoint.
    assert set(tensors(out)) == set(tensors(base_dirs["llama"]))
    merged = transformers.AutoModelForCausalLM.from_pretrained(out)
    expected = the_model_as_trained(base, adapter)
    assert torch.allclose(logits(merged, sample_ids()), expected, atol=tolerance, rtol=0)
    assert hashes(base) | hashes(adapter) == before


@pytest.mark.parametrize(
    ("kind", "adapter_kind"),
    [
        ("nf4", "lora-head"),
        *(  # the default run keeps one: the others run with --full-matrix (CI: nox -s matrix)
            pytest.param(*case, marks=pytest.mark.full_matrix)
            for case in [("nf4", "lora-attention"), ("fp4", "lora-attention"), ("int8", "lora-attention")]
        ),
    ],
)
def test_the_low_memory_and_the_in_memory_engines_write_the_same_checkpoint(
    prequantized: Callable[[str], Path],
    qlora_files: Callable[[str], Path],
    kind: str,
    adapter_kind: str,
    tmp_path: Path,
) -> None:
    base, adapter = prequantized(kind), qlora_files(adapter_kind)
    options: dict[str, Any] = {"policy": "untie", "base_weights": "dequantized"}
    reports = {
        lm: merge_pretrained(str(base), str(adapter), tmp_path / str(lm), low_memory=lm, **options)
        for lm in (True, False)
    }
    written, in_memory = tensors(tmp_path / "True"), tensors(tmp_path / "False")
    assert set(written) == set(in_memory)
    assert all(torch.allclose(written[name], in_memory[name], atol=1e-6, rtol=0) for name in written)
    low, high = reports[True].quantized_base, reports[False].quantized_base
    assert low is not None and high is not None
    assert low.quantization_gap == pytest.approx(high.quantization_gap, abs=1e-6)
    assert low.fine_tune_effect == pytest.approx(high.fine_tune_effect, abs=1e-6)
    assert reports[True].groups_after == reports[False].groups_after
    if adapter_kind == "lora-head":  # untie: the changed head gets a tensor of its own, as on a 16-bit base
        assert reports[True].groups_after == ()
        assert not json.loads((tmp_path / "True" / "config.json").read_text())["tie_word_embeddings"]


def test_a_pre_quantized_base_without_a_choice_is_refused_on_the_low_memory_engine(
    prequantized: Callable[[str], Path], qlora_files: Callable[[str], Path], tmp_path: Path
) -> None:
    base, adapter = prequantized("nf4"), qlora_files("lora-attention")
    with pytest.raises(QuantizedBaseError, match=r"(?s)pre-quantized checkpoint.*Fix: pass base_weights='dequantized'"):
        merge_pretrained(str(base), str(adapter), tmp_path / "out", policy="untie", low_memory=True)
    assert not [p for p in tmp_path.iterdir() if p.name != "int8-tiles"]  # no output, no staging left


def test_the_tie_policies_refuse_on_the_low_memory_engine_as_on_a_16_bit_base(
    prequantized: Callable[[str], Path], qlora_files: Callable[[str], Path], tmp_path: Path
) -> None:
    base, adapter = prequantized("nf4"), qlora_files("lora-head")
    with pytest.raises(TiedWeightsError, match="Fix: use policy='untie'"):
        merge_pretrained(
            str(base), str(adapter), tmp_path / "out", policy="keep", base_weights="dequantized", low_memory=True
        )
    assert not [p for p in tmp_path.iterdir() if p.name != "int8-tiles"]  # no output, no staging left


def test_original_on_the_low_memory_engine_merges_the_16_bit_weights_and_reports_the_gap(
    prequantized: Callable[[str], Path], qlora_files: Callable[[str], Path], base_dirs: dict[str, Path], tmp_path: Path
) -> None:
    base, adapter = prequantized("nf4"), qlora_files("lora-attention")
    options: dict[str, Any] = {"policy": "untie", "base_weights": "original", "original_base": str(base_dirs["llama"])}
    low = merge_pretrained(str(base), str(adapter), tmp_path / "low", low_memory=True, **options)
    high = merge_pretrained(str(base), str(adapter), tmp_path / "high", **options)
    written, in_memory = tensors(tmp_path / "low"), tensors(tmp_path / "high")
    assert all(torch.allclose(written[name], in_memory[name], atol=1e-6, rtol=0) for name in in_memory)
    assert low.quantized_base is not None and high.quantized_base is not None
    assert str(base_dirs["llama"]) in low.quantized_base.weights_from
    assert 0.01 < low.quantized_base.quantization_gap == pytest.approx(high.quantized_base.quantization_gap)


def test_an_8_bit_weight_in_a_layout_bitsandbytes_does_not_read_is_refused_with_nothing_written(
    prequantized: Callable[[str], Path], qlora_files: Callable[[str], Path], tmp_path: Path
) -> None:
    base = tmp_path / "int8-tiles"
    shutil.copytree(prequantized("int8"), base)
    weights = tensors(base)
    weights["model.layers.0.self_attn.q_proj.weight_format"] = torch.tensor(1, dtype=torch.uint8)
    save_file(weights, str(base / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(InputError, match=r"layout 1 \(weight_format\).*Fix: merge into the 16-bit checkpoint"):
        merge_pretrained(
            str(base), str(qlora_files("lora-attention")), tmp_path / "out", policy="untie",
            base_weights="dequantized", low_memory=True,
        )  # fmt: skip
    assert not [p for p in tmp_path.iterdir() if p.name != "int8-tiles"]  # no output, no staging left
