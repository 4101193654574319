"""What `safemerge verify` prints: a merged model's figures, or a GGUF file's tensor by tensor."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from safemerge._records import Verification

if TYPE_CHECKING:  # the GGUF check is imported when a GGUF file is verified: it needs torch
    from safemerge._checks.gguf import GGUFTensorCheck, GGUFVerification


def verdict(args: argparse.Namespace, v: Verification) -> list[str]:
    """The logits' figure, each tied member's, and the problems."""
    said = "FAITHFUL" if v.ok else "NOT FAITHFUL"
    lines = [
        f"{args.merged}: {said} to {args.base} + {args.adapter}",
        f"  max |logits difference| vs the adapter model: {v.max_abs_logits_diff:.3g} "
        f"(tolerance {v.logits_tolerance:.3g}, {v.probe_tokens} probe tokens)",
    ]
    lines += [
        f"  {m.name}: max |difference| from its weight in the adapter model {m.max_abs_diff_vs_adapter:.3g}"
        for m in v.members
    ]
    lines += [f"  problem: {p}" for p in v.problems]
    return lines


def gguf_verdict(args: argparse.Namespace, v: GGUFVerification) -> list[str]:
    """The head and the embedding, then the other tensors summed up per type (-v: each of them)."""
    lines = [
        f"{args.merged}: {'FAITHFUL' if v.ok else 'NOT FAITHFUL'} to {args.base} + {args.adapter} ({v.architecture})"
    ]
    shown = [c for c in v.tensors if c.role != "tensor" or args.verbose]
    lines += [f"  {_tensor_line(c)}" for c in shown]
    rest = [c for c in v.tensors if c.role == "tensor" and c.max_abs_diff is not None]
    for qtype in sorted({c.qtype for c in rest}):
        of_type = [c for c in rest if c.qtype == qtype]
        worst = max(of_type, key=lambda c: c.max_abs_diff or 0.0)
        failed = sum(c.ok is False for c in of_type)
        lines.append(
            f"  other {qtype} tensors: {len(of_type)} compared, {failed} over their bound; worst {worst.gguf_name} "
            f"max |difference| {worst.max_abs_diff:.3g} (tolerance {worst.tolerance or 0.0:.3g})"
        )
    lines += [f"  note: {n}" for n in v.notes]
    lines += [f"  problem: {p}" for p in v.problems]
    return lines


def _tensor_line(c: GGUFTensorCheck) -> str:
    figures = (
        f"max |difference| {c.max_abs_diff:.3g} (tolerance {c.tolerance:.3g})"
        if c.max_abs_diff is not None and c.tolerance is not None
        else "not compared"
    )
    verdict = "MISSING" if c.qtype == "missing" else {True: "ok", False: "DIFFERS", None: "-"}[c.ok]
    note = f" [{c.note}]" if c.note else ""
    return f"{c.role:<9} {c.gguf_name} {c.qtype} vs {c.hf_name}: {figures} {verdict}{note}"
