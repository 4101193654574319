"""Check a GGUF file (llama.cpp's converter's output) against the weights the adapter model computes with. Read-only.

Every tensor of the file is mapped to its transformers name with the `gguf` package's own tables
(`gguf.get_tensor_name_map`), dequantized with `gguf.quants.dequantize`, and compared with the adapter model's
effective weight (the base weight plus what each PEFT layer's merge adds; a tied member's own effective weight), the
converter's transforms undone (safemerge._checks.gguf_layout). The head is the one llama.cpp will compute the logits
with, which is not always the tensor the file stores under that role.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from safemerge._checks import gguf_layout as _layout
from safemerge._decide.analysis import analyse, require_peft_model
from safemerge._decide.layer_merge import merged_parameters
from safemerge._model.rows import Value, materialise
from safemerge._model.walk import base_parameters, output_embedding_name
from safemerge._records import REPORT_SCHEMA_VERSION, to_jsonable
from safemerge._text import listed
from safemerge.errors import InputError

if TYPE_CHECKING:
    from gguf import GGUFReader, ReaderTensor

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GGUFTensorCheck:
    """One tensor of the GGUF file against the adapter model's weight."""

    gguf_name: str
    #: The adapter model's parameter it holds (None: no parameter maps to it).
    hf_name: str | None
    #: "head" (the tensor llama.cpp computes the logits with), "embedding" or "tensor".
    role: str
    #: The GGUF tensor type: "F32", "F16", "BF16", "Q8_0", "Q4_K", ...; "missing" for a tensor of the adapter model
    #: that gguf's tables name but the file lacks.
    qtype: str
    #: max |dequantized tensor - effective weight| (None when not compared).
    max_abs_diff: float | None
    tolerance: float | None
    #: None when not compared (`note` says why).
    ok: bool | None
    #: What was done to compare it ("Q/K rows un-permuted", "norm + 1") or why it was skipped.
    note: str = ""


@dataclass(frozen=True)
class GGUFVerification:
    """What `verify_gguf` compared, the figures, and what is wrong (`problems`; empty when faithful)."""

    path: str
    #: `general.architecture` of the file ("llama", "gemma2", ...).
    architecture: str
    #: The tensor llama.cpp computes the logits with: "output.weight", or "token_embd.weight".
    head_source: str
    #: Head and embedding first, then the file's tensors in order.
    tensors: tuple[GGUFTensorCheck, ...]
    notes: tuple[str, ...]
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": REPORT_SCHEMA_VERSION, **to_jsonable(self), "ok": self.ok}


def _gguf() -> Any:
    try:
        import gguf
    except ImportError as exc:
        raise InputError(
            "Checking a GGUF file needs the `gguf` package (llama.cpp's own reader), which is not installed. "
            "Nothing was loaded. Fix: pip install 'safemerge[gguf]'."
        ) from exc
    return gguf


def open_gguf(path: str | os.PathLike[str]) -> GGUFReader:
    """The reader of the GGUF file `path` (its tensors are memory-mapped, not read); InputError if it is none."""
    gguf = _gguf()
    file = Path(path).expanduser()
    if not file.is_file():
        what = "is a directory" if file.is_dir() else "does not exist"
        raise InputError(f"The GGUF file '{path}' {what}. Nothing was loaded. Fix: pass the .gguf file itself.")
    try:
        reader: GGUFReader = gguf.GGUFReader(file)
    except Exception as exc:  # the reader's own errors name the damage
        raise InputError(
            f"'{path}' cannot be read as a GGUF file ({type(exc).__name__}: {str(exc)[:300]}). Nothing was loaded. "
            "Fix: convert the merged model again (convert_hf_to_gguf.py) or copy the file again."
        ) from exc
    return reader


def verify_gguf(
    path: str | os.PathLike[str], adapter_model: Any, *, tolerance: float | None = None
) -> GGUFVerification:
    """Compare the GGUF file `path` with the weights `adapter_model` (a `peft.PeftModel`) computes with.

    Args:
        tolerance: a bound for every tensor, as a fraction of its max |weight|, instead of each tensor type's
            (safemerge._checks.gguf_layout.RELATIVE_BOUND).

    Raises:
        InputError: the `gguf` package is missing, or `path` is no readable GGUF file.
    """
    reader = open_gguf(path)
    peft_model = require_peft_model(adapter_model)
    root = peft_model.get_base_model()
    tied = analyse(peft_model, None).tied.effective
    layout = _FileLayout.read(reader, [p.name for p in base_parameters(root)])
    effective = _effective_weights(root, tied)
    before = _base_weights(root)
    eps = float(torch.finfo(_dtype(root)).eps) if _dtype(root).is_floating_point else 0.0
    embed, head = _embedding_name(root), output_embedding_name(root)
    checks: list[GGUFTensorCheck] = []
    problems: list[str] = []
    for gname, hf_name, role in layout.order(embed, head):
        others = {n: effective for n in (embed, head) if n and n != hf_name and role != "tensor"}
        if hf_name is not None:  # the weight without the adapter: a file nearer it lacks the adapter's change
            others[f"{hf_name} without the adapter"] = functools.partial(_without_adapter, before, hf_name)
        check = _check(layout, gname, hf_name, role, effective, others, (eps, tolerance))
        checks.append(check)
        if check.ok is False or (check.ok is None and role != "tensor"):
            problems.append(_problem(check, layout))
    # The head's weight is checked in the tensor llama.cpp uses for it, whatever the file lacks; an alias (a tied
    # member) is saved once, under the name of the tensor it shares.
    skip = _aliases(root) | ({head} if any(c.role == "head" for c in checks) and head else set())
    for gname, hf_name in layout.missing(skip):
        role = "head" if hf_name == head else "embedding" if hf_name == embed else "tensor"
        checks.append(GGUFTensorCheck(gname, hf_name, role, "missing", None, None, False, "missing from the file"))
        problems.append(_problem(checks[-1], layout))
    return GGUFVerification(
        path=os.fspath(path),
        architecture=layout.arch,
        head_source=layout.head,
        tensors=tuple(checks),
        notes=tuple(layout.notes(checks)),
        problems=tuple(problems),
    )


def _aliases(root: torch.nn.Module) -> set[str]:
    """The parameters that share their tensor with one named before them (a tied head)."""
    seen: set[int] = set()
    found = set()
    for p in base_parameters(root):
        if id(p.tensor) in seen:
            found.add(p.name)
        seen.add(id(p.tensor))
    return found


def _without_adapter(before: Callable[[str], np.ndarray], name: str, _: str) -> np.ndarray:
    return before(name)


def _base_weights(root: torch.nn.Module) -> Callable[[str], np.ndarray]:
    """The weight each parameter holds without the adapter (the base layer's), as float32."""
    params = {p.name: p for p in base_parameters(root)}
    return lambda name: params[name].tensor.detach().float().cpu().numpy()


def _dtype(root: torch.nn.Module) -> torch.dtype:
    return next((p.dtype for p in root.parameters() if p.is_floating_point()), torch.float32)


def _embedding_name(root: torch.nn.Module) -> str | None:
    try:
        embedding = root.get_input_embeddings()  # type: ignore[operator]
    except (AttributeError, NotImplementedError, TypeError):
        return None
    return next((f"{path}.weight" for path, m in root.named_modules() if m is embedding), None)


def _effective_weights(root: torch.nn.Module, tied: Mapping[str, Value]) -> Callable[[str], np.ndarray]:
    """The weight the adapter model computes with, by parameter name, as float32: a tied member's effective weight,
    else what PEFT's merge of its layer would leave (computed on demand; the model is not changed)."""
    params = {p.name: p for p in base_parameters(root)}
    last: dict[int, dict[str, Value]] = {}  # the layer of the previous call (its bias follows its weight)

    def value(name: str) -> np.ndarray:
        p = params[name]
        if name in tied:
            found = tied[name]
        elif p.wrapper is None:
            found = p.tensor.detach()
        else:
            if id(p.wrapper) not in last:
                last.clear()
                last[id(p.wrapper)] = merged_parameters(p.wrapper)
            found = last[id(p.wrapper)][p.name_in_wrapper]
        with torch.no_grad():
            return materialise(found, torch.device("cpu")).float().numpy()

    return value


@dataclass
class _FileLayout:
    """The file's tensors, its architecture's figures, and the parameter each tensor holds."""

    reader: Any
    arch: str
    heads: tuple[int, int]
    tensors: dict[str, ReaderTensor]
    #: GGUF name -> parameter name, from gguf's tables.
    hf_of: dict[str, str]
    unmapped: list[str]
    #: GGUF name -> parameter name for every parameter gguf's tables name, in the file or not.
    expected: dict[str, str]
    #: llama.cpp's graph of `arch` has no output tensor (gguf's tables have none for it either).
    no_output: bool

    @property
    def head(self) -> str:
        return _layout.head_source(set(self.tensors), self.no_output)

    def missing(self, skip: set[str]) -> Iterator[tuple[str, str]]:
        """(GGUF name, parameter name) of each parameter gguf's tables name that the file lacks."""
        return ((g, n) for g, n in self.expected.items() if g not in self.tensors and n not in skip)

    @classmethod
    def read(cls, reader: Any, names: list[str]) -> _FileLayout:
        gguf = _gguf()

        def field(key: str) -> Any:
            found = reader.fields.get(key)
            return None if found is None else found.contents()

        arch = str(field("general.architecture"))
        by_name = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
        if arch not in by_name:
            raise InputError(
                f"The GGUF file's architecture '{arch}' is not in the tables of the installed gguf package "
                f"({gguf.__name__} {_version()}). Nothing was compared. Fix: pip install -U gguf."
            )
        tmap = gguf.get_tensor_name_map(by_name[arch], int(field(f"{arch}.block_count") or 0))
        n_head = int(field(f"{arch}.attention.head_count") or 0)
        n_kv = int(field(f"{arch}.attention.head_count_kv") or n_head)
        tensors = {t.name: t for t in reader.tensors}
        expected: dict[str, str] = {}
        for name in names:  # the first parameter wins: the embedding comes before a head tied to it
            mapped = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
            if mapped is not None:
                expected.setdefault(mapped, name)
        hf_of = {g: n for g, n in expected.items() if g in tensors}
        unmapped = [n for n in tensors if n not in hf_of]
        # llama.cpp's graphs read an output tensor exactly where gguf's tables (the same commit's) name one
        no_output = arch in _layout.NO_OUTPUT_ARCHS or gguf.MODEL_TENSOR.OUTPUT not in gguf.MODEL_TENSORS[by_name[arch]]
        return cls(reader, arch, (n_head, n_kv), tensors, hf_of, unmapped, expected, no_output)

    def order(self, embed: str | None, head: str | None) -> Iterator[tuple[str, str | None, str]]:
        """(GGUF name, parameter name, role): the head as llama.cpp computes it, the embedding, then the rest."""
        if head is not None and self.head in self.tensors:
            yield self.head, head, "head"
        if "token_embd.weight" in self.tensors and embed is not None:
            yield "token_embd.weight", embed, "embedding"
        for gname in self.tensors:
            if (gname == "token_embd.weight" and embed is not None) or (gname == self.head and head is not None):
                continue  # yielded above
            yield gname, self.hf_of.get(gname), "tensor"

    def notes(self, checks: list[GGUFTensorCheck]) -> Iterator[str]:
        if self.head == "token_embd.weight":
            why = (
                f"llama.cpp's {self.arch} graph has no output tensor"
                if self.no_output
                else "the file has no output.weight"
            )
            yield f"{why}: the logits are computed with token_embd.weight"
        if any("un-permuted" in c.note for c in checks):
            yield "the converter permutes the rows of Q and K for llama: they were un-permuted to compare"
        skipped = [c.gguf_name for c in checks if c.note.startswith("skipped")]
        if skipped:
            yield f"not compared: {listed(skipped)}"


def _version() -> str:
    from importlib.metadata import version

    return version("gguf")


def _check(
    layout: _FileLayout,
    gname: str,
    hf_name: str | None,
    role: str,
    effective: Callable[[str], np.ndarray],
    others: Mapping[str, Callable[[str], np.ndarray]],
    bounds: tuple[float, float | None],
) -> GGUFTensorCheck:
    """One tensor against its parameter's effective weight; the head and the embedding also against the other of
    the two (a quantized file whose tensor is nearer the other weight holds the wrong one, however coarse its type)."""
    t = layout.tensors[gname]
    qtype = t.tensor_type.name
    if hf_name is None:
        return GGUFTensorCheck(gname, None, role, qtype, None, None, None, "skipped: no parameter maps to it")
    gguf = _gguf()
    shape = tuple(int(x) for x in reversed(t.shape))  # GGUF lists the fastest dimension first
    raw = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32)
    want, got, note = _layout.as_stored(layout.arch, hf_name, effective(hf_name), raw.copy(), layout.heads)
    if note and note.startswith("skipped"):
        return GGUFTensorCheck(gname, hf_name, role, qtype, None, None, None, note)
    if got.shape != want.shape:
        return GGUFTensorCheck(gname, hf_name, role, qtype, None, None, False, f"shape {got.shape}, not {want.shape}")
    diff = float(np.max(np.abs(got - want))) if got.size else 0.0
    tol = _layout.tolerance(qtype, want, *bounds)
    if tol is None:
        return GGUFTensorCheck(gname, hf_name, role, qtype, diff, None, None, f"skipped: no known bound for {qtype}")
    ok = diff <= tol
    for other, value in others.items():
        alternative = _layout.as_stored(layout.arch, hf_name, value(other), raw.copy(), layout.heads)[0]
        if alternative.shape == want.shape and _nearer(got, alternative, want):
            ok, note = False, f"nearer {other} than {hf_name}"
    return GGUFTensorCheck(gname, hf_name, role, qtype, diff, tol, ok, note or "")


def _nearer(got: np.ndarray, alternative: np.ndarray, want: np.ndarray) -> bool:
    """Whether `got` is nearer `alternative` than `want`, where the two differ (mean squared difference)."""
    if np.array_equal(alternative, want):
        return False
    return float(np.mean((got - alternative) ** 2)) < float(np.mean((got - want) ** 2))


def _problem(check: GGUFTensorCheck, layout: _FileLayout) -> str:
    """What is wrong with `check`, why it matters, and the fix."""
    if check.qtype == "missing":
        return (
            f"{check.gguf_name} (the adapter model's {check.hf_name}) is missing from the file: llama.cpp refuses a "
            f"file without a tensor its {layout.arch} graph needs, or computes without this weight. Fix: convert the "
            "merged model again, from the directory `safemerge verify` passes."
        )
    figures = (
        f"by {check.max_abs_diff:.3g} (tolerance {check.tolerance:.3g})"
        if check.max_abs_diff is not None and check.tolerance is not None
        else f"({check.note})"
    )
    near = f", {check.note}" if check.note.startswith("nearer") else ""
    if check.role == "head":
        why = (
            f"llama.cpp's {layout.arch} graph computes the logits with the token embedding"
            if layout.no_output
            else "the file has no output.weight, so llama.cpp computes the logits with the token embedding"
            if check.gguf_name == "token_embd.weight"
            else "the file's output head is not the adapter model's"
        )
        return (
            f"the head llama.cpp uses ({check.gguf_name}) differs from the adapter model's {check.hf_name} "
            f"{figures}{near}: {why}, so the served model computes other logits. Fix: merge with a policy whose "
            "plan llama.cpp serves as merged (`safemerge inspect --serve-with llama.cpp`), or serve the adapter "
            "unmerged (a GGUF LoRA adapter, convert_lora_to_gguf.py)."
        )
    if check.role == "embedding":
        return (
            f"the embedding {check.gguf_name} differs from the adapter model's {check.hf_name} {figures}{near}: "
            "every input token is embedded differently (a tied head's change folded into the shared embedding, "
            "as a plain merge_and_unload() does). Fix: merge with safemerge (safemerge merge) and convert again."
        )
    near = f" ({check.note})" if check.note.startswith("nearer") else ""
    return (
        f"{check.gguf_name} differs from the adapter model's {check.hf_name} {figures}{near}: the file does not hold "
        "the merged weights. Fix: convert the merged model again, from the directory `safemerge verify` passes."
    )
