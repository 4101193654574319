"""Where tensors live: every value a merge computes is made on its member's device, and a model whose weights
accelerate offloads is refused before anything changes (the low-memory engine is the merge for those).

The CPU tests use the `meta` device as a stand-in for a second device; the CUDA tests run where a GPU is present.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from safetensors.torch import load_file

import safemerge
from safemerge._decide.layer_merge import merged_parameters
from safemerge._engines.in_memory import Values
from safemerge._model.rows import Rows, in_dtype, materialise, max_abs_diff, scaled
from tests.models import ARCHS
from tests.test_merge import MERGES, POLICIES, expected

META = torch.device("meta")
needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device: the merge is run on the GPU and compared with the CPU's"
)


def _rows_on(device: torch.device) -> Rows:
    weight = torch.arange(12.0).reshape(4, 3)
    return Rows(weight.shape, weight.dtype, lambda start, stop: weight[start:stop] + 1, device)


def test_rows_are_made_where_they_are_computed() -> None:
    """A value computed on demand lands on its member's device, not on the CPU (torch.empty without device=)."""
    assert _rows_on(META).materialise().device == META
    assert materialise(_rows_on(torch.device("cpu")), META).device == META
    assert scaled(_rows_on(META), 2.0).device == META
    assert in_dtype(_rows_on(META), torch.float64).device == META
    assert Values().parameter(_rows_on(torch.device("cpu")), copy=False, device=META).device == META


def test_lora_merged_weight_is_computed_on_the_weight_s_device(make_adapter_model) -> None:  # type: ignore[no-untyped-def]
    """LoRA's merged weight is computed where its base weight is: on the meta device here, a GPU in use."""
    model = make_adapter_model("llama", "lora-head").to(META)
    layer = model.get_base_model().lm_head
    merged = merged_parameters(layer)["weight"]
    assert isinstance(merged, Rows) and merged.device == META
    assert materialise(merged).device == META


def test_comparisons_follow_the_first_value_s_device() -> None:
    on_cpu = torch.ones(4, 3)
    assert max_abs_diff(_rows_on(torch.device("cpu")), on_cpu) == 11.0


def _offloading_map() -> dict[str, str]:
    """The tiny Llama's modules on the CPU but one decoder layer, offloaded to disk."""
    names = ["model.embed_tokens", "model.layers.0", "model.layers.1", "model.norm", "model.rotary_emb", "lm_head"]
    return {name: "disk" if name == "model.layers.1" else "cpu" for name in names}


def test_merge_pretrained_refuses_an_offloading_device_map_before_loading(
    base_dirs: dict[str, Path], saved_adapter: Callable[[str, str], Path], tmp_path: Path
) -> None:
    out = tmp_path / "merged"
    with pytest.raises(
        safemerge.InputError,
        match=r"offloads 'model\.layers\.1'.*Nothing was loaded\. Fix: .*low_memory=True.*--low-memory",
    ):
        safemerge.merge_pretrained(
            str(base_dirs["llama"]),
            str(saved_adapter("llama", "lora-head")),
            out,
            policy="untie",
            device_map=_offloading_map(),
        )
    assert not out.exists()


def test_safe_merge_refuses_a_model_accelerate_offloaded(
    base_dirs: dict[str, Path], saved_adapter: Callable[[str, str], Path], tmp_path: Path
) -> None:
    """A PEFT model on a base loaded with an offloading device map: refused, nothing written, the model unchanged."""
    base = ARCHS["llama"].model_class.from_pretrained(
        base_dirs["llama"], device_map=_offloading_map(), offload_folder=str(tmp_path / "offload")
    )
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["lm_head"]))
    state = {name: p.clone() for name, p in model.named_parameters() if not p.is_meta}
    out = tmp_path / "merged"
    with pytest.raises(
        safemerge.InputError, match=r"offloaded by accelerate \(on the meta device: .*Nothing was changed\. Fix: "
    ):
        safemerge.safe_merge(model, out, policy="untie")
    assert not out.exists()
    assert all(torch.equal(p, state[name]) for name, p in model.named_parameters() if not p.is_meta)


# --- on a GPU -----------------------------------------------------------------------------------------------------

GPU_KINDS = ("lora-head", "lora-both", "lora-both-ensure-tying", "trainable-token-indices")


def _saved(directory: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(directory.glob("*.safetensors")) for k, v in load_file(f).items()}


def _assert_same_tensors(gpu: Path, cpu: Path) -> None:
    """The GPU merge saved what the CPU merge saved (up to the rounding of float32 matmuls on another device)."""
    on_gpu, on_cpu = _saved(gpu), _saved(cpu)
    assert on_gpu.keys() == on_cpu.keys()
    for name, tensor in on_cpu.items():
        torch.testing.assert_close(on_gpu[name], tensor, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def _assert_faithful(report: Any) -> None:
    verification = report.verification
    assert report.ok and report.verified and not verification.problems
    assert verification.max_abs_logits_diff_reloaded <= verification.logits_tolerance


@needs_cuda
@pytest.mark.parametrize("variant", ["in-memory", "reloaded"])
@pytest.mark.parametrize("policy", ["keep", "untie"])
@pytest.mark.parametrize("kind", GPU_KINDS)
def test_tied_llama_on_cuda_merges_as_on_the_cpu(build, tmp_path: Path, kind: str, policy: str, variant: str) -> None:  # type: ignore[no-untyped-def]
    category, _ = expected("llama", kind, variant)
    if not MERGES[category][POLICIES.index(policy)]:
        with pytest.raises(safemerge.TiedWeightsError, match=r"does not merge this model: .* Fix: "):
            safemerge.safe_merge(build("llama", kind, variant).to("cuda"), tmp_path / "gpu", policy=policy)
        return
    torch.manual_seed(0)  # get_peft_model draws LoRA's A from the global generator: the same adapter twice
    gpu = safemerge.safe_merge(build("llama", kind, variant).to("cuda"), tmp_path / "gpu", policy=policy)
    _assert_faithful(gpu)
    assert all(p.device.type == "cuda" for p in gpu.model.parameters()), "the merged model stays on the GPU"
    torch.manual_seed(0)
    safemerge.safe_merge(build("llama", kind, variant), tmp_path / "cpu", policy=policy)
    _assert_same_tensors(tmp_path / "gpu", tmp_path / "cpu")


@needs_cuda
def test_merge_pretrained_on_cuda(
    base_dirs: dict[str, Path], saved_adapter: Callable[[str, str], Path], tmp_path: Path
) -> None:
    base, adapter = str(base_dirs["llama"]), str(saved_adapter("llama", "lora-both"))
    report = safemerge.merge_pretrained(base, adapter, tmp_path / "gpu", policy="untie", device_map="cuda")
    _assert_faithful(report)
    safemerge.merge_pretrained(base, adapter, tmp_path / "cpu", policy="untie")
    _assert_same_tensors(tmp_path / "gpu", tmp_path / "cpu")


@needs_cuda
def test_cuda_with_modules_offloaded_to_the_cpu_is_refused(
    base_dirs: dict[str, Path], saved_adapter: Callable[[str, str], Path], tmp_path: Path
) -> None:
    """{'model.layers.1': 'cpu'} beside the GPU: accelerate offloads that layer (its weights on meta) -> refused."""
    device_map = {**dict.fromkeys(_offloading_map(), 0), "model.layers.1": "cpu"}
    base, adapter = str(base_dirs["llama"]), str(saved_adapter("llama", "lora-head"))
    with pytest.raises(safemerge.InputError, match=r"offloads 'model\.layers\.1'.*Nothing was loaded\. Fix: "):
        safemerge.merge_pretrained(base, adapter, tmp_path / "a", policy="untie", device_map=device_map)
    model = peft.PeftModel.from_pretrained(
        ARCHS["llama"].model_class.from_pretrained(base, device_map=device_map), adapter
    )
    # Whether accelerate offloaded the layer (weights on meta) or transformers kept it in place (the reload of the
    # saved model would offload it): refused before anything changes.
    with pytest.raises(safemerge.InputError, match=r"offload.*Nothing was changed\. Fix: merge with the low-memory"):
        safemerge.safe_merge(model, tmp_path / "b", policy="untie")
    assert not (tmp_path / "b").exists()


@needs_cuda
def test_a_qlora_model_on_cuda_merges_its_dequantized_weights_as_on_the_cpu(
    base_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """QLoRA where it is trained: nf4 on the GPU. The merge writes the weights the CPU merge writes, and the user's
    4-bit model still computes exactly what it did."""
    pytest.importorskip("bitsandbytes", reason="the QLoRA merge needs bitsandbytes (the safemerge[qlora] extra)")
    import transformers

    from tests.models import ADAPTERS, logits, perturb, sample_ids

    def trained(device: str) -> Any:
        config = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True
        )
        base = transformers.AutoModelForCausalLM.from_pretrained(
            base_dirs["llama"], quantization_config=config, device_map=device, dtype=torch.float32
        )
        torch.manual_seed(0)  # the same adapter on both devices
        model = peft.get_peft_model(base, ADAPTERS["lora-attention"](ARCHS["llama"]))
        perturb(model)
        return model.eval()

    model = trained("cuda")
    ids = sample_ids().to("cuda")
    before = logits(model, ids)
    report = safemerge.safe_merge(model, tmp_path / "gpu", policy="untie", base_weights="dequantized")
    _assert_faithful(report)
    assert torch.equal(logits(model, ids), before), "the user's 4-bit model computes what it did"
    safemerge.safe_merge(trained("cpu"), tmp_path / "cpu", policy="untie", base_weights="dequantized")
    _assert_same_tensors(tmp_path / "gpu", tmp_path / "cpu")
