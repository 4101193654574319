"""The `safemerge` command: thin over the library, the only module that prints.

Exit codes: 0 success; 1 refused, not faithful, not written, out of memory, a system error or a bug; 2 usage error
(bad arguments, a hub id that names nothing, an input that is missing, damaged, no model or adapter directory, or
overlaps the output, an occupied output); 130 interrupted (Ctrl-C), 143 terminated (SIGTERM). Whatever the code,
nothing is left half-written and no input is changed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from safemerge._model import inputs as _inputs
from safemerge._output.claim import write_json_atomic
from safemerge._records import MergeReport, TieInspection
from safemerge.cli._arguments import build_parser
from safemerge.cli._quantized import checked_choice, state_lines
from safemerge.cli._runtime import EXIT_TERMINATED, output_configured, sigterm_unwinds
from safemerge.cli._verdicts import gguf_verdict, verdict
from safemerge.errors import InputError, OutputExistsError, SafeMergeError, failure_report

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
#: Doctor findings that mean an argument names nothing readable (no model or adapter directory, a damaged file): a
#: usage error, as merge's own input check says, not an adapter that does not fit.
_UNREADABLE_INPUT = {
    "adapter-not-found",
    "base-not-found",
    "no-config",
    "config-in-subfolder",
    "bad-weights",
    "damaged-base-file",
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code. Logging, warning filters, transformers' verbosity and progress
    bars and the SIGTERM handler are set for the run and put back as they were on return."""
    args = build_parser().parse_args(argv)
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
    except KeyboardInterrupt:
        print("safemerge: interrupted; nothing was written at the output and no input was changed.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except SystemExit as stop:
        if stop.code == EXIT_TERMINATED:
            print("safemerge: terminated; nothing was written at the output and no input was changed.", file=sys.stderr)
        raise
    except Exception as error:
        if args.verbose:
            raise
        code, explanation = _explain(error)
        print(f"safemerge: {explanation}", file=sys.stderr)
        return code


def _explain(error: Exception) -> tuple[int, str]:
    """The exit code and message of an error that is not safemerge's own: a hub id that names nothing (usage), a
    lack of memory or a system error (the run failed), or else a bug."""
    what = f"{type(error).__name__}: {error}"
    if _hub_lookup_failed(error):
        return EXIT_USAGE, (
            f"error: {what}\nFix: check the paths or hub ids (a hub id has the form 'organisation/name'; "
            "--revision must name a branch, tag or commit of it; a private or gated repository needs HF_TOKEN)."
        )
    if _out_of_memory(error):
        return EXIT_FAILED, (
            f"out of memory ({what}). Nothing was written at the output and no input was changed.\nFix: run with "
            "--low-memory (merge: the base's weights stay on disk), spread the model over the devices with "
            "--device-map auto, or load and compute in a smaller dtype (--dtype bfloat16)."
        )
    if isinstance(error, OSError):  # the disk, a permission, the network: not the arguments
        return EXIT_FAILED, (
            f"error: {what}. Nothing was written at the output and no input was changed.\nFix: check free space, "
            "permissions and the network for the file named above, then run again."
        )
    return EXIT_FAILED, (f"unexpected {what}\nThis is a bug in safemerge: run again with -v and report the traceback.")


def _hub_lookup_failed(error: Exception) -> bool:
    """A hub id or revision that names nothing (or is not a valid id): the arguments are wrong."""
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError, RevisionNotFoundError

    return isinstance(error, RepositoryNotFoundError | RevisionNotFoundError | HFValidationError)


def _out_of_memory(error: Exception) -> bool:
    """CUDA's or the CPU's allocator gave up: a resource problem (torch's CPU allocator raises a RuntimeError)."""
    if isinstance(error, MemoryError):
        return True
    torch = sys.modules.get("torch")  # not imported: no tensor was allocated, so no allocator failed
    if torch is None or not isinstance(error, RuntimeError):
        return False
    return isinstance(error, torch.cuda.OutOfMemoryError) or "DefaultCPUAllocator: can't allocate memory" in str(error)


def _unreadable_input(error: SafeMergeError) -> bool:
    findings = getattr(getattr(error, "report", None), "findings", ())
    return any(getattr(f, "code", None) in _UNREADABLE_INPUT for f in findings)


def _demo(args: argparse.Namespace) -> int:
    from safemerge.cli._demo import run_demo

    return run_demo(print, keep=Path(args.keep).resolve() if args.keep else None)


def _merge(args: argparse.Namespace) -> int:
    from safemerge._pretrained import merge

    if args.report is not None:
        _check_report_path(args)
    try:
        report = merge(_merge_request(args))
    except Exception as error:  # every outcome has its report (main prints the message)
        failed = failure_report(error)
        if args.report is not None:
            write_json_atomic(args.report, failed)
        if args.json:
            print(json.dumps(failed, indent=2, allow_nan=False))
        raise
    if args.report is not None:
        write_json_atomic(args.report, report.to_dict())
    _emit(args, report.to_dict(), _merge_summary(args, report))
    return EXIT_OK  # merge_pretrained returns only a verified (or unverified, --no-verify) merge; failures raise


def _merge_request(args: argparse.Namespace) -> Any:
    """The merge the command line asks for, checked (`MergeRequest.for_pretrained`, merge_pretrained's checks)."""
    from safemerge._request import MergeRequest

    return MergeRequest.for_pretrained(
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
        revision=args.revision,
        adapter_revision=args.adapter_revision,
        token=args.token,
        trust_remote_code=args.trust_remote_code,
        base_weights=args.base_weights,
        original_base=args.original_base,
        serve_with=args.serve_with,
    )


def _hub(args: argparse.Namespace) -> Any:
    """How to read the base and the adapter, from the command line's hub options."""
    from safemerge._model.load import Source

    return Source(args.revision, args.adapter_revision, args.token, args.trust_remote_code)


def _check_report_path(args: argparse.Namespace) -> None:
    """--report must not overwrite an input or land in OUT, and must be writable, before any work is done."""
    inputs = _inputs.local_inputs(args.base, args.adapter)
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
    if (quantized := report.quantized_base) is not None:
        lines.append(
            f"quantized base ({quantized.quantization}), base weights {quantized.base_weights}: quantization gap "
            f"{quantized.quantization_gap:.3g} against the model as trained, fine-tune effect "
            f"{quantized.fine_tune_effect:.3g}"
        )
    lines += [f"note: {note}" for note in report.serving_notes]
    return lines


def _checked_inputs(*pairs: tuple[str, str]) -> None:
    """Local inputs are model (or adapter) directories and their safetensors files are whole, before anything is
    loaded."""
    for name, role in pairs:
        holds = _inputs.ADAPTER_CONFIG if role == "adapter" else _inputs.MODEL_CONFIG
        path = _inputs.local_path(name, role, holds=holds)
        if path is not None:
            _inputs.check_files(path)


def _inspect(args: argparse.Namespace) -> int:
    from safemerge._decide.analysis import inspect_ties
    from safemerge._decide.serving import parse_runtimes
    from safemerge._pretrained import load_inputs

    if (args.adapter is None) == (args.peft_config is None):
        raise InputError(
            "inspect takes ADAPTER (a trained adapter) or --peft-config PATH (before training), not both and not "
            "neither. Fix: `safemerge inspect BASE ADAPTER`, or `safemerge inspect BASE --peft-config "
            "adapter_config.json --policy P`."
        )
    if args.peft_config is not None:
        return _inspect_before_training(args)
    serve_with = parse_runtimes(args.serve_with)
    _checked_inputs((args.base, "base model"), (args.adapter, "adapter"))
    checked_choice(args, _hub(args))
    model = load_inputs(args.base, args.adapter, dtype=args.dtype, device_map=args.device_map, hub=_hub(args))
    inspection = dataclasses.replace(inspect_ties(model), base_weights=args.base_weights)
    _emit(args, inspection.to_dict(), inspection_table(inspection))
    if args.policy is None:
        return EXIT_OK
    plan = inspection.plan(args.policy)
    unservable = [
        c for c in inspection.serving if c.policy == plan.policy and c.runtime in serve_with and c.ok is False
    ]
    return EXIT_FAILED if not plan.merges or unservable else EXIT_OK


def _inspect_before_training(args: argparse.Namespace) -> int:
    """What --policy will do with an adapter trained from --peft-config on BASE: the check a training run makes."""
    from safemerge._decide.forecast import check_before_training, forecast
    from safemerge._decide.serving import parse_runtimes
    from safemerge._pretrained import load_untrained_inputs

    if args.policy is None:
        raise InputError(
            "inspect --peft-config answers for one policy, and none was given. Fix: add --policy keep, untie or refuse."
        )
    if not Path(args.peft_config).is_file():
        raise InputError(
            f"The PEFT config '{args.peft_config}' is not a file; nothing was loaded. Fix: pass the "
            "adapter_config.json you will train with (peft_config.save_pretrained(DIR) writes one)."
        )
    serve_with = parse_runtimes(args.serve_with)
    _checked_inputs((args.base, "base model"))
    checked_choice(args, _hub(args))
    model = load_untrained_inputs(
        args.base, args.peft_config, dtype=args.dtype, device_map=args.device_map, hub=_hub(args)
    )
    check = forecast(model, policy=args.policy)
    lines = [f"policy {check.policy!r} once trained: {check.outcome}", f"  {check.reason}"]
    lines += [f"  {action.code}: {action.detail}" for action in check.plan.actions if action.code != "peft-merge"]
    lines += state_lines(check.quantization, args.base_weights)
    _emit(args, {**check.to_dict(), "base_weights": args.base_weights}, lines)
    if check.outcome == "refuses":
        return EXIT_FAILED
    if serve_with:  # ServingTargetError (exit 1) when a named runtime would serve the trained merge wrong
        check_before_training(model, policy=args.policy, serve_with=serve_with)
    return EXIT_OK


def inspection_table(inspection: TieInspection) -> list[str]:
    """A readable table of an inspection."""
    lines = state_lines(inspection.quantization, inspection.base_weights)
    if not inspection.groups:
        lines.append("no tied weights: every policy merges this adapter like merge_and_unload()")
    for number, group in enumerate(inspection.groups, start=1):
        shape = "x".join(str(n) for n in group.shape)
        declared = "declared by the model class" if group.declared else "NOT declared by the model class"
        lines.append(f"tie group {number}: one {shape} {group.dtype} tensor, {declared}")
        width = max(len(m.name) for m in group.members)
        lines.append(f"  {'member':<{width}}  {'PEFT layer':<24} {'called':<7} max |change|")
        for m in group.members:
            called = "yes" if m.used_in_forward else "no"
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
    lines += _serving_lines(inspection)
    lines += [f"note: {note}" for note in inspection.notes]
    return lines


def _serving_lines(inspection: TieInspection) -> list[str]:
    """Where each merging policy's result can be served (docs/how-to/serving.md has the table)."""
    if not inspection.serving:
        return []
    words = {True: "serves it as merged", False: None, None: "not in safemerge's table"}
    lines = ["policy  where its merge can be served"]
    for plan in inspection.plans:
        found = [c for c in inspection.serving if c.policy == plan.policy]
        if found:
            said = [f"{c.runtime}: {words[c.ok] or c.behaviour.replace('-', ' ').upper()}" for c in found]
            lines.append(f"{plan.policy:<7} " + "; ".join(said))
    return lines


def _verify(args: argparse.Namespace) -> int:
    from safemerge._checks.gguf import GGUFVerification, open_gguf
    from safemerge._checks.verify import is_gguf, verify_merged
    from safemerge._pretrained import load_inputs

    gguf = is_gguf(args.merged)
    if gguf:  # before the models load: the gguf package is there and the file is one
        open_gguf(args.merged)
    merged = () if gguf else ((args.merged, "merged model"),)
    _checked_inputs((args.base, "base model"), (args.adapter, "adapter"), *merged)
    model = load_inputs(args.base, args.adapter, dtype=args.dtype, device_map=args.device_map, hub=_hub(args))
    logging.getLogger("safemerge").info("loading %s and comparing it with the adapter model", args.merged)
    verification = verify_merged(args.merged, model, logits_tolerance=args.logits_tolerance)
    lines = (
        gguf_verdict(args, verification) if isinstance(verification, GGUFVerification) else verdict(args, verification)
    )
    _emit(args, {"merged": args.merged, **verification.to_dict()}, lines)
    return EXIT_OK if verification.ok else EXIT_FAILED


def _doctor(args: argparse.Namespace) -> int:
    from safemerge._doctor import doctor

    report = doctor(
        args.base,
        args.adapter,
        revision=args.revision,
        adapter_revision=args.adapter_revision,
        token=args.token,
        trust_remote_code=args.trust_remote_code,
    )
    lines = [str(f) for f in report.findings if args.verbose or f.severity != "info"]
    unreadable = any(f.code in _UNREADABLE_INPUT for f in report.findings)
    verdict = "cannot be checked against" if unreadable else "fits" if report.ok else "does NOT fit"
    lines.append(
        f"{args.adapter} {verdict} {args.base}" + (" (-v shows the info findings)" if not args.verbose else "")
    )
    _emit(args, report.to_dict(), lines)
    if unreadable:
        return EXIT_USAGE
    return EXIT_OK if report.ok else EXIT_FAILED


def _emit(args: argparse.Namespace, data: dict[str, Any], lines: list[str]) -> None:
    if args.json:
        print(json.dumps(data, indent=2, allow_nan=False))
    else:
        print("\n".join(lines))


_COMMANDS = {"demo": _demo, "merge": _merge, "inspect": _inspect, "verify": _verify, "doctor": _doctor}
