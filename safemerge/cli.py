"""The `safemerge` command. The only module that prints; maps errors to exit codes (0 ok, 1 refused/failed, 2 usage)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from safemerge import __version__
from safemerge._report import TiePolicy
from safemerge._save import write_json_atomic
from safemerge.errors import SafeMergeError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="safemerge", description="Merge a PEFT adapter into its base model without silent damage, and prove it."
    )
    parser.add_argument("--version", action="version", version=f"safemerge {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress and show tracebacks")
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser("demo", help="show the tied-weights bug and the three policies on a tiny model, offline")

    merge = commands.add_parser("merge", help="merge ADAPTER into BASE under a tie policy and save to OUT")
    merge.add_argument("base", help="base model: local directory or hub id")
    merge.add_argument("adapter", help="PEFT adapter: local directory or hub id")
    merge.add_argument("out", help="output directory (written atomically)")
    merge.add_argument("--policy", required=True, choices=[p.value for p in TiePolicy], help="tie policy")
    merge.add_argument("--dtype", default=None, help="load dtype, e.g. bfloat16 (default: as saved)")
    merge.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT once verified")
    merge.add_argument("--no-verify", action="store_true", help="skip the reload verification")
    merge.add_argument("--report", type=Path, default=None, help="write the JSON report to this path")
    merge.add_argument("--json", action="store_true", help="print the JSON report on stdout")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if not args.verbose:
        _quiet_libraries()
    try:
        if args.command == "demo":
            from safemerge._demo import run_demo

            return run_demo(print)
        return _merge(args)
    except SafeMergeError as error:
        if args.verbose:
            raise
        print(f"safemerge: {type(error).__name__}: {error}", file=sys.stderr)
        report = getattr(error, "report", None)
        if report is not None and getattr(args, "report", None) is not None:
            write_json_atomic(args.report, report.to_dict())
        return EXIT_FAILED
    except (ValueError, TypeError, OSError) as error:
        if args.verbose:
            raise
        print(f"safemerge: error: {error}", file=sys.stderr)
        return EXIT_USAGE


def _quiet_libraries() -> None:
    """Hide transformers/PEFT progress bars and advice: safemerge's own summary says what matters."""
    import warnings

    import transformers

    warnings.filterwarnings("ignore", module=r"(peft|transformers)(\.|$)")
    transformers.utils.logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]


def _merge(args: argparse.Namespace) -> int:
    import peft
    import torch
    import transformers

    from safemerge._merge import safe_merge

    kwargs = {}
    if args.dtype:
        dtype = getattr(torch, args.dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"--dtype {args.dtype!r} is not a torch dtype; use e.g. float32, bfloat16, float16")
        kwargs = {"dtype": dtype}
    config = transformers.AutoConfig.from_pretrained(args.base)
    model_class = getattr(transformers, (config.architectures or ["AutoModel"])[0], transformers.AutoModel)
    base = model_class.from_pretrained(args.base, **kwargs)
    model = peft.PeftModel.from_pretrained(base, args.adapter)
    report = safe_merge(model, args.out, policy=args.policy, verify=not args.no_verify, overwrite=args.overwrite)
    if args.report is not None:
        write_json_atomic(args.report, report.to_dict())
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(f"merged {args.adapter} into {args.base} -> {args.out} (policy {args.policy})")
        for action in report.actions:
            print(f"  - {action}")
        if report.verification is not None:
            v = report.verification
            print(
                f"verified: {v.tensors_compared} tensors bit-identical after reload; max |logits difference| vs the "
                f"adapter model {v.max_abs_logits_diff_reloaded:.3g} (tolerance {v.logits_tolerance:.3g})"
            )
    return EXIT_OK if report.ok else EXIT_FAILED
