"""The three merges of a QLoRA fine-tune, measured: the quantization gap of `base_weights="original"` against the
fine-tune's own effect, the dequantized merge's difference from the model as trained, and PEFT's merge into the
4-bit layers.

The model is merge_cost.py's Llama-3.2-1B-shaped base (1.24B parameters, tied embeddings, random weights, bf16: no
download), loaded as QLoRA loads it: bitsandbytes nf4 with double quantization, bfloat16 compute, on the CPU. The
LoRA (rank 16 on the seven linear layers of every block) has every factor non-zero: A and B are drawn at random and
each layer's update `scaling * B @ A` is scaled to `--update` times the norm of the weight it changes (Frobenius;
0.02 by default, a fine-tune that moves each weight by 2 %). The quantization error of nf4 is measured the same way
and printed beside it. Then, on the PEFT model right after "training":
  - `safe_merge(..., base_weights="dequantized")` and `safe_merge(..., base_weights="original")` (the base's 16-bit
    checkpoint), both verified; their reports carry the quantization gap (max |logits difference| of the merged
    weights against the model as trained, on safemerge's probe) and the fine-tune effect (the model as trained
    against its quantized base without the adapter);
  - PEFT's `merge_and_unload()` into the 4-bit layers (last: it changes the model), against the model as trained on
    the same probe.

Run: nox -s bench_qlora   (or: python benchmarks/qlora_gap.py [--size small] [--update 0.02] [--work DIR]);
--size small is merge_cost.py's ~60M-parameter model of the same shape. Models are built once into --work.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from merge_cost import LINEAR, build  # the same synthetic base as the cost benchmark


def load_nf4(base: Path) -> Any:
    """The base as QLoRA loads it: nf4, double quantization, bfloat16 compute, on the CPU."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )  # fmt: skip
    return AutoModelForCausalLM.from_pretrained(base, quantization_config=config, device_map="cpu", dtype="bfloat16")


def fine_tuned(model: Any, update: float) -> tuple[Any, float]:
    """The LoRA after "training": random non-zero A and B, each layer's update scaled to `update` times its weight's
    norm. Also returns nf4's own relative error (||W16 - dequant(W4)|| / ||W16||, over all quantized weights)."""
    import peft
    import torch
    from safetensors import safe_open

    from safemerge._model.stand_in import dequantized_weight

    base_file = Path(model.config._name_or_path) / "model.safetensors"
    lora = peft.LoraConfig(r=16, lora_alpha=32, target_modules=LINEAR, lora_dropout=0.0)
    peft_model = peft.get_peft_model(model, lora)
    generator = torch.Generator().manual_seed(0)
    error = total = 0.0
    with torch.no_grad(), safe_open(str(base_file), framework="pt") as original:
        for name, module in peft_model.named_modules():
            if not isinstance(module, peft.tuners.lora.LoraLayer):
                continue
            weight = dequantized_weight(module.base_layer, torch.float32)
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            a.copy_(torch.randn(a.shape, generator=generator))
            b.copy_(torch.randn(b.shape, generator=generator))
            delta = module.scaling["default"] * (b.float() @ a.float())
            b.mul_(update * weight.norm() / delta.norm())
            key = name.removeprefix("base_model.model.") + ".weight"
            w16 = original.get_tensor(key).float()
            error += float((w16 - weight).norm() ** 2)
            total += float(w16.norm() ** 2)
    return peft_model.eval(), (error / total) ** 0.5


def as_trained(peft_model: Any) -> tuple[dict[str, Any], Any]:
    """safemerge's probe and the logits of the model as trained on it (bitsandbytes' CPU repacking off)."""
    from safemerge._model.probe import make_probe, run_probe

    probe = make_probe(peft_model.get_base_model(), [])
    return probe, run_probe(peft_model, probe)[0]


def saved_vs_trained(out: Path, probe: dict[str, Any], trained: Any) -> float:
    """max |logits difference| between the merged checkpoint written to `out`, loaded back, and the model as
    trained."""
    from transformers import AutoModelForCausalLM

    from safemerge._model.probe import run_probe

    merged = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    return float((run_probe(merged, probe)[0] - trained).abs().max())


def peft_into_4bit(peft_model: Any, probe: dict[str, Any], trained: Any) -> float:
    """max |logits difference| between PEFT's merge into the 4-bit layers and the model as trained (this changes
    `peft_model`: run it last)."""
    from safemerge._model.probe import run_probe

    merged = peft_model.merge_and_unload()
    return float((run_probe(merged, probe)[0] - trained).abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["full", "small"], default="full")
    parser.add_argument("--update", type=float, default=0.02, help="each LoRA update's norm / its weight's norm")
    parser.add_argument("--work", type=Path, default=Path(".bench"))
    args = parser.parse_args()
    import bitsandbytes
    import peft
    import torch
    import transformers

    from safemerge import safe_merge

    base, _ = build(args.size, args.work)
    start = time.monotonic()
    model = load_nf4(base)
    peft_model, nf4_error = fine_tuned(model, args.update)
    figures: dict[str, Any] = {"load s": time.monotonic() - start}
    probe, trained = as_trained(peft_model)
    for choice in ("dequantized", "original"):
        start = time.monotonic()
        out = args.work / f"out-qlora-{choice}"
        report = safe_merge(peft_model, out, policy="untie", base_weights=choice, overwrite=True)
        figures[f"{choice} s"] = time.monotonic() - start
        figures[choice] = report.quantized_base
        figures[f"{choice} verified"] = report.verification
        figures[f"{choice} saved"] = saved_vs_trained(out, probe, trained)
    start = time.monotonic()
    figures["peft 4-bit"] = peft_into_4bit(peft_model, probe, trained)
    figures["peft s"] = time.monotonic() - start
    show(args, figures, nf4_error, [transformers, peft, bitsandbytes, torch])


def show(args: argparse.Namespace, figures: dict[str, Any], nf4_error: float, modules: list[Any]) -> None:
    """The figures, as the how-to's table shows them."""
    dequantized, original = figures["dequantized"], figures["original"]
    effect = original.fine_tune_effect
    versions = ", ".join(f"{m.__name__} {m.__version__}" for m in modules)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; {versions}")
    print(f"size {args.size}; nf4 + double quant, bfloat16 compute; LoRA r=16 on {', '.join(LINEAR)}")
    print(f"weights: LoRA update / weight = {args.update:g}; nf4 error / weight = {nf4_error:.3g} (Frobenius)")
    print(
        f"fine-tune effect (model as trained vs its quantized base): {effect:.4g}; loaded in {figures['load s']:.0f} s"
    )
    print("max |logits difference| against the model as trained, on safemerge's probe:")
    print(f"{'merge':36}{'quantization gap':>17}{'saved merge':>12}{'/ effect':>10}{'wall s':>8}")
    for choice in ("dequantized", "original"):
        gap, saved = figures[choice].quantization_gap, figures[f"{choice} saved"]
        name = f"base_weights={choice!r}"
        print(f"{name:36}{gap:>17.4g}{saved:>12.4g}{saved / effect:>9.1%}{figures[f'{choice} s']:>8.0f}")
    peft_gap, name = figures["peft 4-bit"], "PEFT merge_and_unload() into 4-bit"
    print(f"{name:36}{'-':>17}{peft_gap:>12.4g}{peft_gap / effect:>9.1%}{figures['peft s']:>8.0f}")
    for choice in ("dequantized", "original"):
        v = figures[f"{choice} verified"]
        print(
            f"{choice}: verified, merged vs the adapter on its 16-bit weights {v.max_abs_logits_diff:.3g} "
            f"(tolerance {v.logits_tolerance:.3g})"
        )
    print(f"dequantized: gap tolerance {dequantized.gap_tolerance:.3g}")
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GB")


if __name__ == "__main__":
    main()
