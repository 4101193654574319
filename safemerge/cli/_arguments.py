"""The command line's arguments: one parser, and the options each command takes (shared groups: hub, loading,
tolerance). Imports nothing heavy, so that `--help` and usage errors answer at once."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from safemerge._records import TiePolicy
from safemerge._version import __version__


def build_parser() -> argparse.ArgumentParser:
    """The `safemerge` argument parser."""
    parser = argparse.ArgumentParser(
        prog="safemerge",
        description="Merge a PEFT adapter into its base model without silent damage to tied weights, and prove it.",
    )
    parser.add_argument("--version", action="version", version=f"safemerge {__version__}")
    common, hub, loading, tolerance = _shared_groups()
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser(
        "demo", parents=[common], help="the tied-weights bug and the three policies on a tiny model, offline"
    )
    demo.add_argument(
        "--keep",
        default=None,
        metavar="DIR",
        help="keep the tiny base, adapter and merged models in DIR (new or empty) for the tutorial's next steps",
    )
    _add_merge(commands, [common, loading, tolerance])
    _add_inspect(commands, [common, loading])
    doctor = commands.add_parser(
        "doctor", parents=[common, hub], help="explain why ADAPTER would fail or load wrong on BASE; loads no weights"
    )
    doctor.add_argument("base", metavar="BASE", help="base model: local directory or hub id")
    doctor.add_argument("adapter", metavar="ADAPTER", help="PEFT adapter: local directory or hub id")
    doctor.add_argument("--json", action="store_true", help="print the findings as JSON on stdout")
    verify = commands.add_parser(
        "verify",
        parents=[common, loading, tolerance],
        help="check a merged model made by any tool against the adapter model",
    )
    verify.add_argument(
        "merged", metavar="MERGED", help="merged model directory, or a .gguf file (llama.cpp), to check"
    )
    verify.add_argument("--base", required=True, help="base model the adapter was trained on")
    verify.add_argument("--adapter", required=True, help="the PEFT adapter that was merged")
    return parser


def _shared_groups() -> tuple[argparse.ArgumentParser, ...]:
    """The option groups commands share: common (-v, -q), hub, loading (hub + dtype, device map, --json), tolerance."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="library warnings, debug logs, tracebacks")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    hub = argparse.ArgumentParser(add_help=False)
    hub.add_argument("--revision", default=None, help="the base's revision on the hub: branch, tag or commit")
    hub.add_argument("--adapter-revision", default=None, metavar="REVISION", help="the adapter's revision on the hub")
    hub.add_argument(
        "--token", default=None, help="hub token for private repositories (default: HF_TOKEN or `hf auth login`)"
    )
    hub.add_argument(
        "--trust-remote-code", action="store_true", help="let transformers run the base repository's own code"
    )
    loading = argparse.ArgumentParser(add_help=False, parents=[hub])
    loading.add_argument(
        "--dtype", default=None, help="load and compute dtype: float32, bfloat16, float16 or auto (default: auto)"
    )
    loading.add_argument("--device-map", default=None, help="accelerate device map for big models, e.g. auto")
    loading.add_argument("--json", action="store_true", help="print the JSON report on stdout")

    tolerance = argparse.ArgumentParser(add_help=False)
    tolerance.add_argument(
        "--logits-tolerance",
        type=float,
        default=None,
        metavar="X",
        help="max |logits difference| accepted vs the adapter model (default: relative to dtype and logit scale)",
    )
    return common, hub, loading, tolerance


def _add_merge(commands: Any, parents: list[argparse.ArgumentParser]) -> None:
    merge = commands.add_parser(
        "merge", parents=parents, help="merge ADAPTER into BASE under a tie policy, save and verify OUT"
    )
    merge.add_argument("base", metavar="BASE", help="base model: local directory or hub id")
    merge.add_argument("adapter", metavar="ADAPTER", help="PEFT adapter: local directory or hub id")
    merge.add_argument("out", metavar="OUT", help="output directory (written atomically)")
    merge.add_argument("--policy", required=True, choices=[p.value for p in TiePolicy], help="tie policy (required)")
    merge.add_argument(
        "--overwrite", action="store_true", help="replace a non-empty OUT once the new model is verified"
    )
    merge.add_argument("--no-verify", action="store_true", help="skip the checks against the adapter model")
    merge.add_argument(
        "--push-to-hub",
        default=None,
        metavar="REPO",
        help="upload the merged directory to this hub repository once it is verified (with the model card)",
    )
    merge.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository private")
    merge.add_argument(
        "--out-dtype",
        default=None,
        metavar="D",
        help="dtype to save in (default: the checkpoint's own, whatever --dtype computes in)",
    )
    merge.add_argument(
        "--low-memory",
        action="store_true",
        help="keep the base's weights on disk: merge a block of rows at a time into safetensors shards (models bigger "
        "than RAM)",
    )
    merge.add_argument(
        "--max-shard-size",
        default=None,
        metavar="SIZE",
        help="largest output shard, in transformers' format (e.g. 5GB, 300MB); default: transformers' own",
    )
    merge.add_argument("--report", type=Path, default=None, metavar="PATH", help="write the JSON report here")
    _add_quantized(merge)
    _add_serve_with(merge)


def _add_serve_with(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--serve-with",
        default=None,
        metavar="RUNTIMES",
        help="where the merge will be served, comma-separated: vllm, llama.cpp; a plan one of them would serve "
        "differently or refuse to load is refused (exit 1)",
    )


def _add_quantized(merge: argparse.ArgumentParser, *, checked_only: bool = False) -> None:
    """The options of a merge onto a quantized base (QLoRA); `checked_only`: inspect's, which checks the choice as
    merge would and shows it."""
    what = "the choice to check, as merge would" if checked_only else "required for a pre-quantized (bitsandbytes) base"
    merge.add_argument(
        "--base-weights",
        choices=["dequantized", "original"],
        default=None,
        help=f"{what}: merge into its dequantized weights (the model as trained) or into the original 16-bit "
        "checkpoint (--original-base)",
    )
    merge.add_argument(
        "--original-base",
        default=None,
        metavar="PATH",
        help="with --base-weights original: the 16-bit checkpoint the base was quantized from (directory or hub id)",
    )


def _add_inspect(commands: Any, parents: list[argparse.ArgumentParser]) -> None:
    inspect = commands.add_parser(
        "inspect",
        parents=parents,
        help="tie groups, what the adapter changes, each policy's merge plan; or, with --peft-config, before training",
    )
    inspect.add_argument("base", metavar="BASE", help="base model: local directory or hub id")
    inspect.add_argument("adapter", metavar="ADAPTER", nargs="?", help="PEFT adapter: local directory or hub id")
    inspect.add_argument(
        "--peft-config",
        metavar="PATH",
        default=None,
        help="instead of ADAPTER: an adapter_config.json to train with; says what --policy will do once trained",
    )
    inspect.add_argument(
        "--policy",
        choices=[p.value for p in TiePolicy],
        default=None,
        help="the policy to answer for (with --peft-config, required); exit 1 if it will not merge",
    )
    _add_quantized(inspect, checked_only=True)
    _add_serve_with(inspect)
