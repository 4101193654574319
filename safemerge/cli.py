"""The `safemerge` command: thin over the library, the only module that prints.

Exit codes: 0 success; 1 refused, not faithful, or not written; 2 usage error (bad arguments, an input that is missing,
damaged or overlaps the output, an occupied output); 130 interrupted (Ctrl-C), 143 terminated (SIGTERM). Whatever
the code, nothing is left half-written and no input is changed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from safemerge import _inputs
from safemerge._console import EXIT_TERMINATED, output_configured, sigterm_unwinds
from safemerge._output import write_json_atomic
from safemerge._report import MergeReport, TieInspection, TiePolicy, Verification
from safemerge._version import __version__
from safemerge.errors import InputError, OutputExistsError, SafeMergeError, failure_report

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
#: Doctor findings that mean an argument names nothing readable: a usage error, not a bad adapter.
_UNREADABLE_INPUT = {"adapter-not-found", "base-not-found"}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="safemerge",
        description="Merge a PEFT adapter into its base model without silent damage to tied weights, and prove it.",
    )
    parser.add_argument("--version", action="version", version=f"safemerge {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="library warnings, debug logs, tracebacks")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    loading = argparse.ArgumentParser(add_help=False)
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
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    commands.add_parser(
        "demo", parents=[common], help="the tied-weights bug and the three policies on a tiny model, offline"
    )

    merge = commands.add_parser(
        "merge",
        parents=[common, loading, tolerance],
        help="merge ADAPTER into BASE under a tie policy, save and verify OUT",
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
        help="keep the base's weights on disk: merge tensor by tensor into safetensors shards (models bigger than RAM)",
    )
    merge.add_argument(
        "--max-shard-size",
        default=None,
        metavar="SIZE",
        help="largest output shard, in transformers' format (e.g. 5GB, 300MB); --low-memory default 1GB",
    )
    merge.add_argument("--report", type=Path, default=None, metavar="PATH", help="write the JSON report here")

    inspect = commands.add_parser(
        "inspect",
        parents=[common, loading],
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

    doctor = commands.add_parser(
        "doctor", parents=[common], help="explain why ADAPTER would fail or load wrong on BASE; loads no weights"
    )
    doctor.add_argument("base", metavar="BASE", help="base model: local directory or hub id")
    doctor.add_argument("adapter", metavar="ADAPTER", help="PEFT adapter: local directory or hub id")
    doctor.add_argument("--json", action="store_true", help="print the findings as JSON on stdout")

    verify = commands.add_parser(
        "verify",
        parents=[common, loading, tolerance],
        help="check a merged model made by any tool against the adapter model",
    )
    verify.add_argument("merged", metavar="MERGED", help="merged model directory to check")
    verify.add_argument("--base", required=True, help="base model the adapter was trained on")
    verify.add_argument("--adapter", required=True, help="the PEFT adapter that was merged")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code. Logging, warning filters, transformers' verbosity and progress
    bars and the SIGTERM handler are set for the run and put back as they were on return."""
    args = _parser().parse_args(argv)
    with output_configured(verbose=args.verbose, quiet=args.quiet), sigterm_unwinds():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    try:
        return _COMMANDS[args.command](args)
    except SafeMergeError as error:
        if args.verbose:
            raise
        print(f"safemerge: {type(error).__name__}: {error}", file=sys.stderr)
        usage = isinstance(error, OutputExistsError | InputError) or _unreadable_input(error)
        return EXIT_USAGE if usage else EXIT_FAILED
    except (OSError, ValueError) as error:  # unknown hub id, bad dtype ...
        if args.verbose:
            raise
        print(f"safemerge: error: {error}", file=sys.stderr)
        print("Fix: check the paths or hub ids and the options (safemerge COMMAND --help).", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("safemerge: interrupted; nothing was written at the output and no input was changed.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except SystemExit as stop:
        if stop.code == EXIT_TERMINATED:
            print("safemerge: terminated; nothing was written at the output and no input was changed.", file=sys.stderr)
        raise
    except Exception as error:  # a bug: say so, without a traceback unless -v
        if args.verbose:
            raise
        print(f"safemerge: unexpected {type(error).__name__}: {error}", file=sys.stderr)
        print("This is a bug in safemerge: run again with -v and report the traceback.", file=sys.stderr)
        return EXIT_FAILED


def _unreadable_input(error: SafeMergeError) -> bool:
    findings = getattr(getattr(error, "report", None), "findings", ())
    return any(getattr(f, "code", None) in _UNREADABLE_INPUT for f in findings)


def _demo(args: argparse.Namespace) -> int:
    from safemerge._demo import run_demo

    return run_demo(print)


def _merge(args: argparse.Namespace) -> int:
    from safemerge._merge import merge_pretrained

    if args.report is not None:
        _check_report_path(args)
    try:
        report = merge_pretrained(
            args.base,
            args.adapter,
            args.out,
            policy=args.policy,
            dtype=args.dtype,
            device_map=args.device_map,
            verify=not args.no_verify,
            overwrite=args.overwrite,
            logits_tolerance=args.logits_tolerance,
            low_memory=args.low_memory,
            max_shard_size=args.max_shard_size,
            out_dtype=args.out_dtype,
            push_to_hub=args.push_to_hub,
            private=args.private,
        )
    except (SafeMergeError, OSError, ValueError) as error:  # every outcome has its report (main prints the message)
        failed = failure_report(error)
        if args.report is not None:
            write_json_atomic(args.report, failed)
        if args.json:
            print(json.dumps(failed, indent=2))
        raise
    if args.report is not None:
        write_json_atomic(args.report, report.to_dict())
    _emit(args, report.to_dict(), _merge_summary(args, report))
    return EXIT_OK if report.ok else EXIT_FAILED


def _check_report_path(args: argparse.Namespace) -> None:
    """--report must not overwrite an input or land in OUT, and must be writable, before any work is done."""
    inputs = _inputs.named_inputs(
        [
            ("base model", _inputs.local_path(args.base, "base model")),
            ("adapter", _inputs.local_path(args.adapter, "adapter")),
        ]
    )
    _inputs.check_outputs({"report": Path(args.report), "output directory": Path(args.out)}, inputs)
    parent = Path(args.report).resolve().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(
            f"The report '{args.report}' cannot be written: '{parent}' is not a writable directory. Nothing was "
            "loaded or written. Fix: choose a report path in a directory you can write to."
        )


def _merge_summary(args: argparse.Namespace, report: MergeReport) -> list[str]:
    lines = [f"merged {args.adapter} into {args.base} -> {args.out} (policy {report.policy})"]
    lines += [f"  - {action}" for action in report.actions]
    v = report.verification
    if v is None:
        lines.append("not verified (--no-verify)")
    else:
        lines.append(
            f"verified: {v.reloaded_tensors_compared} tensors bit-identical after reload; max |logits difference| vs "
            f"the adapter model {v.max_abs_logits_diff_reloaded:.3g} (tolerance {v.logits_tolerance:.3g})"
        )
    lines += [f"note: {note}" for note in report.serving_notes]
    return lines


def _checked_inputs(*pairs: tuple[str, str]) -> None:
    """Local inputs exist and their safetensors files are whole, before anything is loaded."""
    for name, role in pairs:
        path = _inputs.local_path(name, role)
        if path is not None:
            _inputs.check_files(path)


def _inspect(args: argparse.Namespace) -> int:
    from safemerge._analysis import inspect_ties
    from safemerge._merge import load_inputs

    if (args.adapter is None) == (args.peft_config is None):
        raise InputError(
            "inspect takes ADAPTER (a trained adapter) or --peft-config PATH (before training), not both and not "
            "neither. Fix: `safemerge inspect BASE ADAPTER`, or `safemerge inspect BASE --peft-config "
            "adapter_config.json --policy P`."
        )
    if args.peft_config is not None:
        return _inspect_before_training(args)
    _checked_inputs((args.base, "base model"), (args.adapter, "adapter"))
    model = load_inputs(args.base, args.adapter, dtype=args.dtype, device_map=args.device_map)
    inspection = inspect_ties(model)
    _emit(args, inspection.to_dict(), inspection_table(inspection))
    refused = args.policy is not None and not inspection.plan(args.policy).merges
    return EXIT_FAILED if refused else EXIT_OK


def _inspect_before_training(args: argparse.Namespace) -> int:
    """What --policy will do with an adapter trained from --peft-config on BASE: the check a training run makes."""
    from safemerge._forecast import forecast
    from safemerge._merge import load_untrained_inputs

    if args.policy is None:
        raise InputError(
            "inspect --peft-config answers for one policy, and none was given. Fix: add --policy keep, untie or refuse."
        )
    if not Path(args.peft_config).is_file():
        raise InputError(
            f"The PEFT config '{args.peft_config}' is not a file; nothing was loaded. Fix: pass the "
            "adapter_config.json you will train with (peft_config.save_pretrained(DIR) writes one)."
        )
    _checked_inputs((args.base, "base model"))
    model = load_untrained_inputs(args.base, args.peft_config, dtype=args.dtype, device_map=args.device_map)
    check = forecast(model, policy=args.policy)
    lines = [f"policy {check.policy!r} once trained: {check.outcome}", f"  {check.reason}"]
    lines += [f"  {action.code}: {action.detail}" for action in check.plan.actions if action.code != "peft-merge"]
    _emit(args, check.to_dict(), lines)
    return EXIT_FAILED if check.outcome == "refuses" else EXIT_OK


def inspection_table(inspection: TieInspection) -> list[str]:
    """A readable table of an inspection."""
    lines = []
    if not inspection.groups:
        lines.append("no tied weights: every policy merges this adapter like merge_and_unload()")
    for number, group in enumerate(inspection.groups, start=1):
        shape = "x".join(str(n) for n in group.shape)
        declared = "declared by the model class" if group.declared else "NOT declared by the model class"
        lines.append(f"tie group {number}: one {shape} {group.dtype} tensor, {declared}")
        width = max(len(m.name) for m in group.members)
        lines.append(f"  {'member':<{width}}  {'PEFT layer':<24} {'called':<7} max |change|")
        for m in group.members:
            called = "yes" if m.used_in_forward else ("no" if m.peft_layer else "-")
            lines.append(f"  {m.name:<{width}}  {m.peft_layer or '-':<24} {called:<7} {m.max_abs_change:.3g}")
        if group.inseparable:
            lines.append(
                "  load as one tensor whatever is saved: " + "; ".join(", ".join(c) for c in group.inseparable)
            )
    flags = ", ".join(f"{path}={value}" for path, value in inspection.config_flags) or "none"
    lines.append(f"config flags: {flags}")
    lines.append("policy  merges  why, then the plan's steps")
    for plan in inspection.plans:
        lines.append(f"{plan.policy:<7} {'yes' if plan.merges else 'no':<7} {plan.reason}")
        lines += [f"{'':<16}{action.code}: {action.detail}" for action in plan.actions if action.code != "peft-merge"]
    lines += [f"note: {note}" for note in inspection.notes]
    return lines


def _verify(args: argparse.Namespace) -> int:
    from safemerge._merge import load_inputs
    from safemerge._verify import verify_merged

    _checked_inputs((args.base, "base model"), (args.adapter, "adapter"), (args.merged, "merged model"))
    model = load_inputs(args.base, args.adapter, dtype=args.dtype, device_map=args.device_map)
    logging.getLogger("safemerge").info("loading %s and comparing it with the adapter model", args.merged)
    verification = verify_merged(args.merged, model, logits_tolerance=args.logits_tolerance)
    _emit(args, {"merged": args.merged, **verification.to_dict()}, _verdict(args, verification))
    return EXIT_OK if verification.ok else EXIT_FAILED


def _doctor(args: argparse.Namespace) -> int:
    from safemerge._doctor import doctor

    report = doctor(args.base, args.adapter)
    lines = [str(f) for f in report.findings if args.verbose or f.severity != "info"]
    verdict = "fits" if report.ok else "does NOT fit"
    lines.append(
        f"{args.adapter} {verdict} {args.base}" + (" (-v shows the info findings)" if not args.verbose else "")
    )
    _emit(args, report.to_dict(), lines)
    if any(f.code in _UNREADABLE_INPUT for f in report.findings):
        return EXIT_USAGE
    return EXIT_OK if report.ok else EXIT_FAILED


def _verdict(args: argparse.Namespace, v: Verification) -> list[str]:
    verdict = "FAITHFUL" if v.ok else "NOT FAITHFUL"
    lines = [
        f"{args.merged}: {verdict} to {args.base} + {args.adapter}",
        f"  max |logits difference| vs the adapter model: {v.max_abs_logits_diff:.3g} "
        f"(tolerance {v.logits_tolerance:.3g}, {v.probe_tokens} probe tokens)",
    ]
    lines += [
        f"  {m.name}: max |difference| from its weight in the adapter model {m.max_abs_diff_vs_adapter:.3g}"
        for m in v.members
    ]
    lines += [f"  problem: {p}" for p in v.problems]
    return lines


def _emit(args: argparse.Namespace, data: dict[str, Any], lines: list[str]) -> None:
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print("\n".join(lines))


_COMMANDS = {"demo": _demo, "merge": _merge, "inspect": _inspect, "verify": _verify, "doctor": _doctor}
