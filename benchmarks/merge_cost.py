"""Time and peak memory of a verified safemerge merge against plain PEFT, side by side, as separate processes.

The model is Llama-3.2-1B-shaped (vocab 128256, hidden 2048, 16 layers, tied embeddings, 1.24B parameters, bf16,
random weights: no download) with a rank-16 LoRA on every linear layer plus embed_tokens and lm_head, as after
training: every LoRA factor is drawn, the embedding's included. Two adapters: "trained" (embedding and head each
with its own LoRA) and "ensure_weight_tying" (the head's LoRA is the embedding's). For each, plain PEFT is the three
lines users would write: PeftModel.from_pretrained, merge_and_unload, save_pretrained, plus the reload they would do
to use it; safemerge is `safemerge merge BASE ADAPTER OUT --policy untie` with full verification. Then, in one
process each, the adapter model as a training script holds it (no load): merge_and_unload + save_pretrained against
safe_merge. Last, `--low-memory` on the base saved as 300 MB shards (output in 300 MB shards), its output compared
tensor by tensor with the in-memory one.

Run: nox -s bench   (or: python benchmarks/merge_cost.py [--size small] [--work DIR] [--no-low-memory]); --size
small is a ~60M-parameter model of the same shape for a quick check. Models are built once into --work and reused.
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

#: The adapter model as a training script holds it (get_peft_model, then the trained factors), then the timed merge:
#: plain PEFT's merge_and_unload + save_pretrained, or safe_merge (which also verifies: reload, compare, probe).
IN_PROCESS = """
import json, sys, time
import peft
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
mode, base, adapter, out, policy = sys.argv[1:6]
config = peft.PeftConfig.from_pretrained(adapter)
model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype="auto"), config)
peft.set_peft_model_state_dict(model, load_file(f"{adapter}/adapter_model.safetensors"))
start = time.monotonic()
if mode == "plain":
    model.merge_and_unload().save_pretrained(out)
else:
    import safemerge
    safemerge.safe_merge(model, out, policy=policy, overwrite=True)
print(json.dumps({"seconds": time.monotonic() - start}))
"""


def build(size: str, work: Path, *, tying: bool = False) -> tuple[Path, Path]:
    """The base model and an adapter as after training (random weights, bf16), built once.

    Every LoRA factor is drawn, the embedding's `lora_embedding_A` and `lora_embedding_B` included: PEFT starts
    `lora_B` and `lora_embedding_A` at zero, so an untrained embedding LoRA changes nothing and the costly tied case
    (embedding and head both changed, each its own way) would never be measured. With `tying`, the adapter is
    trained with `ensure_weight_tying=True` (Unsloth's default when both sides of a tied pair are targeted): the
    head's LoRA is the embedding's, transposed.
    """
    import peft
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    # Named apart from the adapters of earlier versions (untrained embedding LoRA), which --work may still hold.
    base, adapter = work / f"base-{size}", work / f"adapter-{size}-{'tying' if tying else 'trained'}"
    if not (base / "config.json").exists():
        config = LlamaConfig(
            **SIZES[size], num_attention_heads=32 if size == "full" else 8,
            num_key_value_heads=8 if size == "full" else 4, head_dim=64, tie_word_embeddings=True, dtype="bfloat16",
        )  # fmt: skip
        torch.manual_seed(0)
        torch.set_default_dtype(torch.bfloat16)
        LlamaForCausalLM(config).save_pretrained(base)
        torch.set_default_dtype(torch.float32)
    if (adapter / "adapter_config.json").exists():
        return base, adapter
    model = LlamaForCausalLM.from_pretrained(base, dtype="auto")
    extra = {"ensure_weight_tying": True} if tying else {}
    lora = peft.LoraConfig(r=16, lora_alpha=32, target_modules=[*LINEAR, "embed_tokens", "lm_head"], **extra)
    # peft 0.21 makes the head's LoRA factors views of the embedding's, but casting a bf16 model's adapter to float32
    # (autocast_adapter_dtype, the default) copies them apart: keep them in bf16 so that they stay one.
    peft_model = peft.get_peft_model(model, lora, autocast_adapter_dtype=not tying)
    torch.manual_seed(1)
    with torch.no_grad():  # as after training: every factor non-zero, on both tied sides
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.02)
    if tying:
        head, embed = peft_model.get_base_model().lm_head, peft_model.get_base_model().model.embed_tokens
        if not torch.equal(head.lora_B["default"].weight, embed.lora_embedding_A["default"].T):
            raise SystemExit(f"peft {peft.__version__} did not tie lm_head's LoRA to the embedding's")
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
    """Run `command` in a fresh process that waits for it alone: wall seconds, CPU seconds (user + system: less
    swayed than the wall time by other work on a shared machine), its peak RSS, its stderr."""
    probe = (
        "import resource, subprocess, sys, time, json\n"
        "start = time.monotonic()\n"
        "done = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)\n"
        "usage = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
        "print(json.dumps({'wall_s': time.monotonic() - start, 'rc': done.returncode, 'stderr': done.stderr,\n"
        "    'cpu_s': usage.ru_utime + usage.ru_stime, 'peak_rss_gb': usage.ru_maxrss / 2**20}))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe, *command], capture_output=True, text=True, check=True)
    figures: dict[str, object] = json.loads(result.stdout)
    if figures["rc"] != 0:
        raise SystemExit(f"{command[:3]} failed:\n{figures['stderr']}")
    return figures


def steps(stderr: str, wall: float) -> list[tuple[str, float]]:
    """safemerge's progress lines ("[  12.3s] message") as (step, seconds until the next line), after the time before
    the first line (Python's start and the imports); the last step runs until the process exits, so they add up to
    the wall time."""
    # Progress bars end their lines with carriage returns: a step line may follow one on the same line.
    lines = [(float(t), msg) for t, msg in re.findall(r"\[\s*([0-9.]+)s\] ([^\r\n]*)", stderr)]
    if not lines:
        return [("(no step lines)", wall)]
    ends = [t for t, _ in lines[1:]] + [wall]
    timed = [(msg, end - t) for (t, msg), end in zip(lines, ends, strict=True)]
    timed[-1] = (f"{timed[-1][0]} (and the exit)", timed[-1][1])
    return [("(Python's start and the imports)", lines[0][0]), *timed]


def in_process(mode: str, base: Path, adapter: Path, out: Path, policy: str) -> float:
    """Seconds of the merge alone (plain or safe_merge) on an adapter model built in memory, as after training."""
    subprocess.run(["rm", "-rf", str(out)], check=True)
    command = [sys.executable, "-c", IN_PROCESS, mode, str(base), str(adapter), str(out), policy]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"in-process {mode} failed:\n{done.stderr}")
    return float(json.loads(done.stdout.splitlines()[-1])["seconds"])


def side_by_side(base: Path, adapter: Path, out: Path, policy: str) -> dict[str, dict[str, object]]:
    """Plain PEFT (load, merge_and_unload, save, reload) and `safemerge merge` into `out`, one after the other, each
    into an empty place: removing an earlier output (3 GB) is no part of either merge's cost."""
    plain_out, safe_out = out.with_name("out-plain"), out
    subprocess.run(["rm", "-rf", str(plain_out)], check=True)
    plain = measure([sys.executable, "-c", PLAIN, str(base), str(adapter), str(plain_out)])
    subprocess.run(["rm", "-rf", str(plain_out), str(safe_out)], check=True)
    safe_cli = [sys.executable, "-m", "safemerge", "merge", str(base), str(adapter), str(safe_out)]
    safe = measure([*safe_cli, "--policy", policy, "--overwrite"])
    return {"plain": plain, "safe": safe}


def ratios(row: dict[str, dict[str, object]]) -> tuple[float, float]:
    """(wall time, peak RSS) of safemerge over plain PEFT."""
    plain, safe = row["plain"], row["safe"]
    wall = float(safe["wall_s"]) / float(plain["wall_s"])  # type: ignore[arg-type]
    return wall, float(safe["peak_rss_gb"]) / float(plain["peak_rss_gb"])  # type: ignore[arg-type]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--work", type=Path, default=Path(".bench"))
    parser.add_argument("--policy", default="untie")
    parser.add_argument("--no-low-memory", action="store_true", help="skip the --low-memory run")
    args = parser.parse_args()
    rows = {}
    for label, tying in (("trained", False), ("ensure_weight_tying", True)):
        base, adapter = build(args.size, args.work, tying=tying)
        rows[label] = side_by_side(base, adapter, args.work / f"out-safemerge-{label}", args.policy)
    base, adapter = build(args.size, args.work)
    timed = {
        mode: in_process(mode, base, adapter, args.work / "out-in-process", args.policy) for mode in ("plain", "safe")
    }
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; size {args.size}")
    print(f"{'adapter':22}{'plain s':>9}{'safe s':>9}{'ratio':>7}{'plain GB':>10}{'safe GB':>9}{'ratio':>7}{'CPU':>7}")
    for label, row in rows.items():
        plain, safe = row["plain"], row["safe"]
        wall, rss = ratios(row)
        cpu = float(safe["cpu_s"]) / float(plain["cpu_s"])  # type: ignore[arg-type]
        print(
            f"{label:22}{plain['wall_s']:>9.1f}{safe['wall_s']:>9.1f}{wall:>6.2f}x"
            f"{plain['peak_rss_gb']:>10.2f}{safe['peak_rss_gb']:>9.2f}{rss:>6.2f}x{cpu:>6.2f}x"
        )
    print(
        "  (plain: load, merge_and_unload, save_pretrained, reload; safe: safemerge merge --policy",
        args.policy + ";",
        "CPU: the ratio of user + system seconds)",
    )
    print(
        f"in process, right after training: merge_and_unload + save_pretrained {timed['plain']:.1f}s, "
        f"safe_merge {timed['safe']:.1f}s ({timed['safe'] / timed['plain']:.2f}x)"
    )
    if not args.no_low_memory:
        low_out = args.work / "out-low-memory"
        low = measure([
            *[sys.executable, "-m", "safemerge", "merge", str(sharded(base, "300MB")), str(adapter), str(low_out)],
            *["--policy", args.policy, "--low-memory", "--max-shard-size", "300MB", "--overwrite"],
        ])  # fmt: skip
        differ = same_tensors(args.work / "out-safemerge-trained", low_out)
        print(f"low-memory: {low['wall_s']:.1f}s, {low['peak_rss_gb']:.2f} GB; output vs in-memory output: "
              f"{'equal, tensor for tensor' if not differ else differ[:5]}")  # fmt: skip
    for label, row in rows.items():
        print(f"safemerge steps ({label}):")
        for step, seconds in steps(str(row["safe"]["stderr"]), float(row["safe"]["wall_s"])):  # type: ignore[arg-type]
            print(f"  {seconds:6.1f}s  {step}")


if __name__ == "__main__":
    main()
