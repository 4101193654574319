"""Time and peak memory of a verified safemerge merge against plain PEFT, side by side, as separate processes.

The model is Llama-3.2-1B-shaped (vocab 128256, hidden 2048, 16 layers, tied embeddings, 1.24B parameters, bf16,
random weights: no download) with a rank-16 LoRA on every linear layer plus embed_tokens and lm_head. Plain PEFT is
the three lines users would write: PeftModel.from_pretrained, merge_and_unload, save_pretrained, plus the reload
they would do to use it. safemerge is `safemerge merge BASE ADAPTER OUT --policy untie` with full verification, and
the same with `--low-memory` on the base saved as 300 MB shards (output in 300 MB shards); the two outputs are
compared tensor by tensor.

Run: nox -s bench   (or: python benchmarks/merge_cost.py [--size small] [--work DIR]); --size small is a
~60M-parameter model of the same shape for a quick check. Models are built once into --work and reused.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

SIZES = {
    "full": {"vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16},
    "small": {"vocab_size": 32000, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 4},
}
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

PLAIN = """
import sys
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
base, adapter, out = sys.argv[1:4]
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype="auto"), adapter)
model.merge_and_unload().save_pretrained(out)
AutoModelForCausalLM.from_pretrained(out, dtype="auto")
"""


def build(size: str, work: Path) -> tuple[Path, Path]:
    """The base model and the adapter, built once (random weights, bf16)."""
    import peft
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    base, adapter = work / f"base-{size}", work / f"adapter-{size}"
    if (adapter / "adapter_config.json").exists():
        return base, adapter
    config = LlamaConfig(
        **SIZES[size], num_attention_heads=32 if size == "full" else 8, num_key_value_heads=8 if size == "full" else 4,
        head_dim=64, tie_word_embeddings=True, dtype="bfloat16",
    )  # fmt: skip
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    model = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(base)
    lora = peft.LoraConfig(r=16, lora_alpha=32, target_modules=[*LINEAR, "embed_tokens", "lm_head"])
    peft_model = peft.get_peft_model(model, lora)
    with torch.no_grad():  # as after training: LoRA's B starts at zero
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                param.normal_(0, 0.01)
    peft_model.save_pretrained(adapter)
    return base, adapter


def sharded(base: Path, size: str) -> Path:
    """The base saved again in shards of `size` (built once)."""
    from transformers import AutoModelForCausalLM

    out = base.with_name(f"{base.name}-{size}")
    if not (out / "config.json").exists():
        AutoModelForCausalLM.from_pretrained(base, dtype="auto").save_pretrained(out, max_shard_size=size)
    return out


def same_tensors(a: Path, b: Path) -> list[str]:
    """Names whose tensors differ (or exist on one side only) between two saved models, read one at a time."""
    import torch
    from safetensors import safe_open

    def where(directory: Path) -> dict[str, Path]:
        found = {}
        for path in sorted(directory.glob("*.safetensors")):
            with safe_open(str(path), framework="pt") as f:
                found.update(dict.fromkeys(f.keys(), path))
        return found

    left, right = where(a), where(b)
    differ = sorted(set(left) ^ set(right))
    for name in sorted(set(left) & set(right)):
        with safe_open(str(left[name]), framework="pt") as f, safe_open(str(right[name]), framework="pt") as g:
            if not torch.equal(f.get_tensor(name), g.get_tensor(name)):
                differ.append(name)
    return differ


def measure(command: list[str]) -> dict[str, object]:
    """Run `command` in a fresh process that waits for it alone: wall seconds, its peak RSS, its stderr."""
    probe = (
        "import resource, subprocess, sys, time, json\n"
        "start = time.monotonic()\n"
        "done = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)\n"
        "print(json.dumps({'wall_s': time.monotonic() - start, 'rc': done.returncode, 'stderr': done.stderr,\n"
        "    'peak_rss_gb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20}))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe, *command], capture_output=True, text=True, check=True)
    figures: dict[str, object] = json.loads(result.stdout)
    if figures["rc"] != 0:
        raise SystemExit(f"{command[:3]} failed:\n{figures['stderr']}")
    return figures


def steps(stderr: str, wall: float) -> list[tuple[str, float]]:
    """safemerge's progress lines ("[  12.3s] message") as (step, seconds until the next line); the rest of the wall
    time is Python's start, the imports before the first line, and the exit."""
    lines = [(float(t), msg) for t, msg in re.findall(r"^\[\s*([0-9.]+)s\] (.*)$", stderr, re.M)]
    timed = [(msg, lines[i + 1][0] - t) for i, (t, msg) in enumerate(lines[:-1])]
    return [*timed, ("(start, imports, exit)", wall - lines[-1][0])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--work", type=Path, default=Path(".bench"))
    parser.add_argument("--policy", default="untie")
    args = parser.parse_args()
    base, adapter = build(args.size, args.work)
    runs = {}
    plain_out, safe_out = str(args.work / "out-plain"), str(args.work / "out-safemerge")
    low_out = str(args.work / "out-low-memory")
    safemerge = [sys.executable, "-m", "safemerge", "merge", str(base), str(adapter), safe_out, "--policy", args.policy]
    low_memory = [
        *[sys.executable, "-m", "safemerge", "merge", str(sharded(base, "300MB")), str(adapter), low_out],
        *["--policy", args.policy, "--low-memory", "--max-shard-size", "300MB", "--overwrite"],
    ]
    for name, command in {
        "plain PEFT": [sys.executable, "-c", PLAIN, str(base), str(adapter), plain_out],
        "safemerge": [*safemerge, "--overwrite"],
        "low-memory": low_memory,
    }.items():
        subprocess.run(["rm", "-rf", str(args.work / "out-plain")], check=True)
        runs[name] = measure(command)
    plain, safe = runs["plain PEFT"], runs["safemerge"]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; size {args.size}")
    print(f"{'':12}{'wall s':>10}{'peak RSS GB':>14}")
    for name, figures in runs.items():
        print(f"{name:12}{figures['wall_s']:>10.1f}{figures['peak_rss_gb']:>14.2f}")
    wall = float(safe["wall_s"]) / float(plain["wall_s"])  # type: ignore[arg-type]
    rss = float(safe["peak_rss_gb"]) / float(plain["peak_rss_gb"])  # type: ignore[arg-type]
    print(f"{'ratio':12}{wall:>10.2f}x{rss:>13.2f}x  (safemerge / plain PEFT)")
    differ = same_tensors(Path(safe_out), Path(low_out))
    print(f"low-memory output vs in-memory output: {'equal, tensor for tensor' if not differ else differ[:5]}")
    print("safemerge steps:")
    for step, seconds in steps(str(safe["stderr"]), float(safe["wall_s"])):  # type: ignore[arg-type]
        print(f"  {seconds:6.1f}s  {step}")


if __name__ == "__main__":
    main()
