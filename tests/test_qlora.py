"""Adapters trained on a base quantized with bitsandbytes (QLoRA), on CPU: the explicit choice of the weights merged
into, the 16-bit stand-in, the figures, and the quantized model left computing exactly what it did."""

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

from safemerge import (
    QuantizedBaseError,
    SafeMergeCallback,
    TiedWeightsError,
    VerificationError,
    check_before_training,
    doctor,
    inspect_ties,
    merge_pretrained,
    safe_merge,
)
from safemerge._model.quantized import no_cpu_packing
from safemerge._model.walk import bare_module
from safemerge.cli import main
from tests.models import ADAPTERS, ARCHS, logits, perturb, sample_ids

pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:bitsandbytes", "ignore::UserWarning:transformers")
LLAMA = ARCHS["llama"]


def load_4bit(path: Path, compute: torch.dtype = torch.float32) -> Any:
    """The base as QLoRA loads it: nf4 with double quantization, on the CPU."""
    config = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute
    )
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, quantization_config=config, device_map="cpu", dtype=compute
    ).eval()


@pytest.fixture(scope="module")
def qlora_files(base_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """The adapter of a kind trained on the 4-bit base and saved (once per module); "pre-quantized": the 4-bit base
    saved as it is ("-bnb-4bit" repositories)."""
    root, made = tmp_path_factory.mktemp("qlora"), {}

    def get(kind: str) -> Path:
        if kind not in made:
            if kind == "pre-quantized":
                load_4bit(base_dirs["llama"]).save_pretrained(root / kind)
            else:
                trained(base_dirs["llama"], kind).save_pretrained(root / kind)
            made[kind] = root / kind
        return Path(made[kind])

    return get


def trained(base: Path, kind: str, compute: torch.dtype = torch.float32) -> Any:
    """The PEFT model right after QLoRA training: the adapter on the 4-bit base, its tensors changed."""
    torch.manual_seed(0)  # LoRA's A is drawn from the global generator: the same adapter whatever ran before
    model = peft.get_peft_model(load_4bit(base, compute), ADAPTERS[kind](LLAMA))
    perturb(model)
    return model.eval()


def load_8bit(path: Path) -> Any:
    """The base loaded in 8-bit (LLM.int8), on the CPU."""
    config = transformers.BitsAndBytesConfig(load_in_8bit=True)
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, quantization_config=config, device_map="cpu", dtype=torch.float32
    ).eval()


@pytest.fixture
def qlora(base_dirs: dict[str, Path], qlora_files: Callable[[str], Path]) -> Callable[..., Any]:
    def make(variant: str, kind: str = "lora-attention", compute: torch.dtype = torch.float32, bits: int = 4) -> Any:
        if bits == 8:
            base = load_8bit(base_dirs["llama"])
            if variant == "reloaded":
                return peft.PeftModel.from_pretrained(base, qlora_files(kind)).eval()
            torch.manual_seed(0)
            model = peft.get_peft_model(base, ADAPTERS[kind](LLAMA))
            perturb(model)
            return model.eval()
        if variant == "in-memory":
            return trained(base_dirs["llama"], kind, compute)
        return peft.PeftModel.from_pretrained(load_4bit(base_dirs["llama"], compute), qlora_files(kind)).eval()

    return make


def as_trained(model: Any) -> torch.Tensor:
    """The logits of the QLoRA model as trained (bitsandbytes' CPU repacking off, as in training)."""
    with no_cpu_packing(model):
        return logits(model, sample_ids())


def quantized_state(model: Any) -> list[torch.Tensor]:
    """Every tensor of the quantized model, read without its state_dict() (which changes a CPU-packed model)."""
    tensors = [p.detach().clone() for p in model.parameters()]
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            tensors += [state.absmax.clone(), *([state.state2.absmax.clone()] if state.nested else [])]
        scales = [
            getattr(getattr(module, "weight", None), "SCB", None),
            getattr(getattr(module, "state", None), "SCB", None),
        ]
        tensors += [scale.clone() for scale in scales if scale is not None]  # 8-bit: the row scales
    return tensors


def assert_unchanged(model: Any, before: torch.Tensor, state: list[torch.Tensor]) -> None:
    assert torch.equal(as_trained(model), before)
    assert all(torch.equal(a, b) for a, b in zip(quantized_state(model), state, strict=True))


VARIANTS = ["in-memory", "reloaded"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_quantized_base_without_a_choice_is_refused_with_nothing_changed(
    qlora: Callable[..., Any], variant: str, tmp_path: Path
) -> None:
    model = qlora(variant)
    before, state = as_trained(model), quantized_state(model)
    with pytest.raises(QuantizedBaseError, match=r"(?s)bitsandbytes 4-bit nf4.*'dequantized'.*'original'.*Fix: pass "):
        safe_merge(model, tmp_path / "out", policy="untie")
    assert not (tmp_path / "out").exists()
    assert_unchanged(model, before, state)


@pytest.mark.parametrize("variant", VARIANTS)
def test_dequantized_reproduces_the_model_as_trained_in_16_bit(
    qlora: Callable[..., Any], variant: str, tmp_path: Path
) -> None:
    model = qlora(variant)
    before, state = as_trained(model), quantized_state(model)
    report = safe_merge(model, tmp_path / "out", policy="untie", base_weights="dequantized")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.allclose(logits(merged, sample_ids()), before, atol=1e-5, rtol=0)
    quantized = report.quantized_base
    assert quantized is not None and quantized.base_weights == "dequantized"
    assert quantized.quantization_gap <= 1e-5 < 0.1 < quantized.fine_tune_effect
    assert report.actions[0].code == "quantized-base" and "fine-tune effect" in report.actions[0].detail
    assert "quantization gap" in (tmp_path / "out" / "README.md").read_text()
    assert_unchanged(model, before, state)


def test_original_equals_the_adapter_on_the_16_bit_weights_and_reports_the_gap(
    qlora: Callable[..., Any], base_dirs: dict[str, Path], qlora_files: Callable[[str], Path], tmp_path: Path
) -> None:
    model = qlora("reloaded")
    before = as_trained(model)
    report = safe_merge(model, tmp_path / "out", policy="untie", base_weights="original")
    on_16_bit = LLAMA.model_class.from_pretrained(base_dirs["llama"])
    on_original = peft.PeftModel.from_pretrained(on_16_bit, qlora_files("lora-attention"))
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    expected = logits(on_original.merge_and_unload(), sample_ids())
    assert torch.allclose(logits(merged, sample_ids()), expected, atol=1e-5, rtol=0)
    quantized = report.quantized_base
    assert quantized is not None and quantized.gap_tolerance is None
    assert str(base_dirs["llama"]) in quantized.weights_from
    assert 0.01 < quantized.quantization_gap < quantized.fine_tune_effect
    assert (logits(merged, sample_ids()) - before).abs().max() > 0.01  # the price of the choice, reported


def test_a_failed_merge_leaves_the_quantized_model_computing_exactly_what_it_did(
    qlora: Callable[..., Any], tmp_path: Path
) -> None:
    # bfloat16 compute: PEFT's 4-bit layer rounds the adapter's output before adding it, the 16-bit one after, so
    # a zero tolerance fails the check of the dequantized weights.
    model = qlora("in-memory", compute=torch.bfloat16)
    before, state = as_trained(model), quantized_state(model)
    with pytest.raises(VerificationError, match=r"adapter on the dequantized weights differs from the model as traine"):
        safe_merge(model, tmp_path / "out", policy="untie", base_weights="dequantized", logits_tolerance=0.0)
    assert not (tmp_path / "out").exists()
    assert_unchanged(model, before, state)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(
    "kind",
    [
        "lora-head",
        *(  # with --full-matrix (CI: nox -s matrix)
            pytest.param(kind, marks=pytest.mark.full_matrix)
            for kind in [
                "lora-both-ensure-tying",
                "save-both",
                "save-embed-ensure-tying",
                "trainable-token-indices",
                "trainable-tokens",
            ]
        ),
    ],
)
def test_tie_policies_refuse_and_merge_as_on_a_16_bit_base(
    qlora: Callable[..., Any], base_dirs: dict[str, Path], variant: str, kind: str, tmp_path: Path
) -> None:
    """bitsandbytes keeps the embeddings and lm_head unquantized and tied: each policy does what the 16-bit matrix
    (tests/test_merge.py) says it does with this adapter, LoRA, modules_to_save copies or trainable tokens (the
    16-bit stand-in is built through each PEFT wrapper, a tied head's shared tensors loaded once)."""
    from tests.test_merge import MERGES, POLICIES, expected

    model = qlora(variant, kind=kind)
    base = model.get_base_model()
    # The tie survives quantized loading (under PEFT's wrappers, in the base modules they stand for).
    assert bare_module(base.lm_head).weight is bare_module(base.model.embed_tokens).weight
    category, why = expected("llama", kind, variant)
    before, state = as_trained(model), quantized_state(model)
    for policy, merges in zip(POLICIES, MERGES[category], strict=True):
        out = tmp_path / policy
        if not merges:
            with pytest.raises(TiedWeightsError, match=r"does not merge this model: .* Fix: .* Nothing was changed"):
                safe_merge(model, out, policy=policy, base_weights="dequantized")
            assert not out.exists()
            continue
        report = safe_merge(model, out, policy=policy, base_weights="dequantized", in_place=False)
        assert report.ok and report.quantized_base is not None, (policy, why)
        tied = json.loads((out / "config.json").read_text())["tie_word_embeddings"]
        assert tied == bool(report.groups_after), policy
        merged = transformers.AutoModelForCausalLM.from_pretrained(out)
        assert torch.allclose(logits(merged, sample_ids()), before, atol=1e-5, rtol=0)
    assert_unchanged(model, before, state)  # the stand-in's merges leave the QLoRA model as it was


def test_base_weights_on_a_16_bit_base_is_refused(
    make_adapter_model: Callable[[str, str], Any], tmp_path: Path
) -> None:
    model = make_adapter_model("llama", "lora-attention")
    with pytest.raises(QuantizedBaseError, match=r"this base is not quantized.*Fix: drop base_weights"):
        safe_merge(model, tmp_path / "out", policy="untie", base_weights="dequantized")


def test_the_cli_merges_a_pre_quantized_checkpoint_with_base_weights_dequantized(
    qlora_files: Callable[[str], Path], base_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base, adapter = qlora_files("pre-quantized"), qlora_files("lora-attention")
    assert main(["merge", str(base), str(adapter), str(tmp_path / "a"), "--policy", "untie", "-q"]) == 2
    assert "Fix: pass base_weights='dequantized'" in capsys.readouterr().err
    argv = ["merge", str(base), str(adapter), str(tmp_path / "b"), "--policy", "untie", "--base-weights", "original"]
    assert main([*argv, "-q"]) == 2
    assert "is a pre-quantized checkpoint. Nothing was loaded or changed. Fix: pass original_base=" in (
        capsys.readouterr().err
    )
    argv = ["merge", str(base), str(adapter), str(tmp_path / "c"), "--policy", "untie", "--base-weights", "dequantized"]
    assert main([*argv, "-q"]) == 0
    assert "base weights dequantized: quantization gap 0 against the model as trained" in capsys.readouterr().out
    assert "quantization_config" not in json.loads((tmp_path / "c" / "config.json").read_text())


@pytest.mark.full_matrix
def test_merge_pretrained_original_from_a_pre_quantized_checkpoint(
    qlora_files: Callable[[str], Path], base_dirs: dict[str, Path], tmp_path: Path
) -> None:
    base, adapter = qlora_files("pre-quantized"), qlora_files("lora-attention")
    report = merge_pretrained(
        str(base), str(adapter), tmp_path / "out", policy="untie", base_weights="original",
        original_base=str(base_dirs["llama"]),
    )  # fmt: skip
    assert report.quantized_base is not None and report.quantized_base.quantization_gap > 0.01


def test_other_quantization_methods_are_refused_naming_what_is_supported(
    base_dirs: dict[str, Path], saved_adapter: Callable[[str, str], Path], tmp_path: Path
) -> None:
    base = tmp_path / "gptq"
    config = json.loads((base_dirs["llama"] / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    base.mkdir()
    (base / "config.json").write_text(json.dumps(config))
    for name in ("model.safetensors",):
        (base / name).symlink_to(base_dirs["llama"] / name)
    with pytest.raises(QuantizedBaseError, match=r"quantized with 'gptq'; .* only when they are bitsandbytes 4-bit or"):
        merge_pretrained(str(base), str(saved_adapter("llama", "lora-attention")), tmp_path / "out", policy="untie")


def test_the_original_checkpoint_is_read_without_the_quantized_repositorys_revision() -> None:
    """--revision names a revision of the pre-quantized repository, not of the 16-bit original: only the token and
    trust_remote_code carry over (the hub itself is the boundary this suite cannot reach)."""
    from safemerge._model.load import Source

    given = Source(revision="4bit-branch", adapter_revision="a", token="hf_x", trust_remote_code=True)
    assert given.original == Source(token="hf_x", trust_remote_code=True)
    assert "revision" not in given.original.base and given.original.base["token"] == "hf_x"


NF4 = "bitsandbytes 4-bit nf4, double quantization (compute dtype float32)"


def step_zero(base_dirs: dict[str, Path], kind: str = "lora-attention") -> Any:
    """The QLoRA model as get_peft_model returns it, before the first training step."""
    torch.manual_seed(0)
    return peft.get_peft_model(load_4bit(base_dirs["llama"]), ADAPTERS[kind](LLAMA)).train()


def test_check_before_training_says_the_choice_will_be_needed_and_leaves_the_model_as_it_was(
    base_dirs: dict[str, Path],
) -> None:
    # Its probe forwards run in eval mode: on a CPU with AVX512-BF16, bitsandbytes would repack the 4-bit weights.
    model = step_zero(base_dirs)
    before, state = as_trained(model), quantized_state(model)
    check = check_before_training(model, policy="untie")
    assert check.outcome == "merges" and check.quantization == NF4
    assert check.to_dict()["quantization"] == NF4
    assert model.training
    assert_unchanged(model, before, state)


@pytest.mark.parametrize("variant", VARIANTS)
def test_inspect_ties_shows_the_quantization_and_leaves_the_model_as_it_was(
    qlora: Callable[..., Any], variant: str
) -> None:
    model = qlora(variant)
    before, state = as_trained(model), quantized_state(model)
    inspection = inspect_ties(model)
    assert inspection.quantization == NF4 and inspection.base_weights is None
    assert_unchanged(model, before, state)


def test_a_16_bit_base_shows_no_quantization(make_adapter_model: Callable[[str, str], Any]) -> None:
    model = make_adapter_model("llama", "lora-attention")
    assert inspect_ties(model).quantization is None
    assert check_before_training(model, policy="untie").quantization is None


def test_cli_inspect_shows_the_quantization_and_checks_the_choice(
    qlora_files: Callable[[str], Path], base_dirs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    base, adapter = str(qlora_files("pre-quantized")), str(qlora_files("lora-attention"))
    assert main(["inspect", base, adapter, "-q"]) == 0
    assert f"quantized base: {NF4}; a merge needs --base-weights (base_weights=): dequantized" in (
        capsys.readouterr().out
    )
    assert main(["inspect", base, adapter, "--base-weights", "dequantized", "--json", "-q"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["quantization"] == NF4 and out["base_weights"] == "dequantized"
    assert main(["inspect", base, adapter, "--base-weights", "dequantized", "-q"]) == 0
    assert f"quantized base: {NF4}; base weights: dequantized (chosen" in capsys.readouterr().out
    assert main(["inspect", base, adapter, "--base-weights", "original", "-q"]) == 2
    assert "is a pre-quantized checkpoint. Nothing was loaded or changed. Fix: pass original_base=" in (
        capsys.readouterr().err
    )
    on_16_bit = ["inspect", str(base_dirs["llama"]), adapter, "--base-weights", "dequantized", "-q"]
    assert main(on_16_bit) == 2
    assert "this base is not quantized" in capsys.readouterr().err


def test_cli_inspect_peft_config_says_the_merge_will_need_the_choice(
    qlora_files: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "adapter_config.json"
    config.write_text(json.dumps(ADAPTERS["lora-attention"](LLAMA).to_dict(), default=list))
    argv = ["inspect", str(qlora_files("pre-quantized")), "--peft-config", str(config), "--policy", "untie"]
    assert main([*argv, "-q"]) == 0
    out = capsys.readouterr().out
    assert "policy 'untie' once trained: merges" in out
    assert f"quantized base: {NF4}; a merge needs --base-weights" in out
    assert main([*argv, "--base-weights", "dequantized", "--json", "-q"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["quantization"] == NF4 and out["base_weights"] == "dequantized"


def test_the_doctor_reports_a_pre_quantized_base_without_blocking(qlora_files: Callable[[str], Path]) -> None:
    report = doctor(str(qlora_files("pre-quantized")), str(qlora_files("lora-attention")))
    assert report.ok
    # The adapter records the 16-bit directory it was trained from, not the pre-quantized one: another warning.
    found = {(f.code, f.severity) for f in report.findings if f.severity != "info"}
    assert found == {("quantized-base", "warning"), ("other-base-name", "warning")}
    found = next(f for f in report.findings if f.code == "quantized-base")
    assert NF4 in found.message and "--base-weights dequantized" in found.fix


def test_the_doctor_reports_a_base_of_another_quantization_method(
    base_dirs: dict[str, Path], saved_adapter: Callable[[str, str], Path], tmp_path: Path
) -> None:
    base = shutil.copytree(base_dirs["llama"], tmp_path / "awq")
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "awq"}}))
    report = doctor(str(base), str(saved_adapter("llama", "lora-attention")))
    found = next(f for f in report.findings if f.code == "quantized-base")
    assert found.severity == "warning" and "quantized with 'awq'" in found.message
    assert "bitsandbytes 4-bit or 8-bit" in found.message and "16-bit checkpoint" in found.fix


def test_a_qlora_training_run_ends_with_a_verified_merge(base_dirs: dict[str, Path], tmp_path: Path) -> None:
    """SafeMergeCallback in transformers' Trainer, on the 4-bit base: the choice is checked before the first step,
    and the merge after the last reproduces the model as trained."""
    from tests.test_training import trainer

    model = step_zero(base_dirs)
    before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    refused = trainer(model, tmp_path, SafeMergeCallback(tmp_path / "refused", policy="untie"))
    with pytest.raises(QuantizedBaseError, match=r"(?s)bitsandbytes 4-bit nf4.*Fix: pass base_weights='dequantized'"):
        refused.train()
    assert refused.state.global_step == 0 and not (tmp_path / "refused").exists()
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters() if p.requires_grad)
    callback = SafeMergeCallback(tmp_path / "merged", policy="untie", base_weights="dequantized")
    run = trainer(model, tmp_path, callback)
    run.train()
    report = callback.report
    assert report is not None and report.ok and report.verified and run.state.global_step == 3
    assert isinstance(run.model, peft.PeftModel) and callback.check and callback.check.quantization == NF4
    quantized = report.quantized_base
    assert quantized is not None and quantized.base_weights == "dequantized" and quantized.quantization_gap <= 1e-5
    assert run.state.log_history[-1]["safemerge/quantization_gap"] == quantized.quantization_gap
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert torch.allclose(logits(merged, sample_ids()), as_trained(run.model), atol=1e-5, rtol=0)


def test_the_callback_checks_original_before_training(base_dirs: dict[str, Path], tmp_path: Path) -> None:
    from tests.test_training import trainer

    model = step_zero(base_dirs)
    model.get_base_model().config._name_or_path = str(tmp_path / "gone")  # the 16-bit checkpoint was deleted
    callback = SafeMergeCallback(tmp_path / "merged", policy="untie", base_weights="original")
    with pytest.raises(QuantizedBaseError, match=r"base_weights='original' needs the 16-bit weights.*Fix: pass or"):
        trainer(model, tmp_path, callback).train()
    with pytest.raises(ValueError, match="base_weights must be one of 'dequantized', 'original', got 'int4'"):
        SafeMergeCallback(tmp_path / "merged", policy="untie", base_weights="int4")  # type: ignore[arg-type]


@pytest.mark.parametrize("variant", ["in-memory", pytest.param("reloaded", marks=pytest.mark.full_matrix)])
def test_an_8_bit_base_is_refused_without_a_choice_and_dequantized_reproduces_it(
    qlora: Callable[..., Any], variant: str, tmp_path: Path
) -> None:
    """LLM.int8 runs on the CPU (bitsandbytes >= 0.46): its matmul rounds activations to float16, so the 8-bit model
    as trained is matched within float16's tolerance."""
    model = qlora(variant, bits=8)
    before, state = as_trained(model), quantized_state(model)
    with pytest.raises(QuantizedBaseError, match=r"(?s)bitsandbytes 8-bit int8 .*'dequantized'.*Fix: pass base_weig"):
        safe_merge(model, tmp_path / "refused", policy="untie")
    assert not (tmp_path / "refused").exists()
    assert_unchanged(model, before, state)
    report = safe_merge(model, tmp_path / "out", policy="untie", base_weights="dequantized")
    quantized = report.quantized_base
    assert report.ok and quantized is not None and quantized.gap_tolerance is not None
    assert quantized.quantization == "bitsandbytes 8-bit int8 (compute dtype float32)"
    assert 0 < quantized.quantization_gap <= quantized.gap_tolerance < 0.1 < quantized.fine_tune_effect
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())
    assert (logits(merged, sample_ids()) - before).abs().max() <= quantized.gap_tolerance
    assert_unchanged(model, before, state)


def test_other_quantization_methods_are_refused_in_memory_and_by_inspect(
    make_adapter_model: Callable[[str, str], Any],
    base_dirs: dict[str, Path],
    saved_adapter: Callable[[str, str], Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    model = make_adapter_model("llama", "lora-attention")
    model.get_base_model().config.quantization_config = {"quant_method": "hqq", "nbits": 4}  # as HQQ's loader records
    with pytest.raises(QuantizedBaseError, match=r"quantized with 'hqq'; .* bitsandbytes 4-bit or 8-bit .* Fix: merge"):
        safe_merge(model, tmp_path / "out", policy="untie")
    with pytest.raises(QuantizedBaseError, match=r"quantized with 'hqq'"):
        check_before_training(model, policy="untie")
    base = shutil.copytree(base_dirs["llama"], tmp_path / "awq")
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "awq"}}))
    assert main(["inspect", str(base), str(saved_adapter("llama", "lora-attention")), "-q"]) == 2
    assert "quantized with 'awq'; safemerge merges into quantized bases only when" in capsys.readouterr().err
