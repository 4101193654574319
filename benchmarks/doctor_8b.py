"""Time safemerge.doctor() on an 8B-shaped base (Llama 3 8B config, meta device) and a rank-16 LoRA on all linears.

Run: nox -s bench   (or: python benchmarks/doctor_8b.py). Nothing is downloaded; no base weight exists.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file

import safemerge

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def write_fixture(root: Path) -> tuple[Path, Path]:
    config = transformers.LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"],
    )
    base, adapter = root / "base", root / "adapter"
    config.save_pretrained(base)
    kv = 4096 // 32 * 8
    dims = {
        "q_proj": (4096, 4096),
        "k_proj": (4096, kv),
        "v_proj": (4096, kv),
        "o_proj": (4096, 4096),
        "gate_proj": (4096, 14336),
        "up_proj": (4096, 14336),
        "down_proj": (14336, 4096),
    }
    tensors = {}
    for layer in range(32):
        for name, (fan_in, fan_out) in dims.items():
            group = "self_attn" if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            key = f"base_model.model.model.layers.{layer}.{group}.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.zeros(16, fan_in, dtype=torch.bfloat16)
            tensors[f"{key}.lora_B.weight"] = torch.zeros(fan_out, 16, dtype=torch.bfloat16)
    adapter.mkdir()
    save_file(tensors, adapter / "adapter_model.safetensors")
    import peft

    peft.LoraConfig(
        r=16, lora_alpha=32, target_modules=TARGETS, task_type="CAUSAL_LM", base_model_name_or_path=str(base)
    ).save_pretrained(adapter)
    return base, adapter


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        base, adapter = write_fixture(Path(tmp))
        timings = []
        for _ in range(6):
            start = time.perf_counter()
            report = safemerge.doctor(str(base), str(adapter))
            timings.append(time.perf_counter() - start)
        assert report.ok, [str(f) for f in report.findings]
        print(
            f"doctor on an 8B-shaped Llama + rank-16 LoRA (448 tensors): first call {timings[0]:.3f} s "
            f"(imports included), then median {statistics.median(timings[1:]):.3f} s, "
            f"min {min(timings[1:]):.3f} s, max {max(timings[1:]):.3f} s over {len(timings) - 1} calls"
        )


if __name__ == "__main__":
    main()
