"""How llama.cpp's converter lays a checkpoint out in a GGUF file, and how close each tensor type stays to its source.

Read from `convert_hf_to_gguf.py` and `conversion/*.py` as vendored in llama-cpp-python 0.3.36
(`vendor/llama.cpp/`), and from its graphs (`src/models/*.cpp`); docs/how-to/serving.md cites the lines. Only numpy
here: the `gguf` package is imported by safemerge._checks.gguf, when a GGUF file is checked.
"""

from __future__ import annotations

import numpy as np

#: Graphs without an output tensor: llama.cpp computes the logits with the token embedding (gemma.cpp:20,
#: gemma2.cpp:37, command-r.cpp:21, cohere2.cpp:29-30). Other graphs read `output.weight` when the file has one
#: (llama.cpp:41-45, qwen2.cpp:26-30, gemma3.cpp:41-45), else the token embedding. safemerge._checks.gguf adds
#: every architecture whose gguf tables have no output tensor (bitnet, openelm, lfm2moe, ... in gguf 0.19).
NO_OUTPUT_ARCHS = frozenset({"gemma", "gemma2", "command-r", "cohere2"})
#: `LlamaModel.permute` reorders the rows of Q and K (conversion/llama.py:176-181, applied at 260-264): undone here.
PERMUTED_QK = frozenset({"llama"})
#: Architectures whose converter class also calls a Q/K permutation that safemerge has not checked: their Q and K
#: tensors are skipped (and the output says so), never compared in a row order that may be wrong.
UNCHECKED_QK = frozenset(
    {"arctic", "chameleon", "deci", "deepseek", "granite", "granitemoe", "internlm2", "llada", "minicpm", "olmo"}
)
#: Every `*norm.weight` is stored + 1 (conversion/gemma.py:67-68, 119-120; Gemma3's norm_shift at 131-132, 176-179).
NORM_PLUS_ONE = frozenset({"gemma", "gemma2", "gemma3"})
_QK = ("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias")

#: The largest |difference| a tensor type's encoding leaves, as a fraction of the tensor's max |weight|. F16 and
#: BF16: one rounding (half a unit in the last place: 2^-11, 2^-8 of the value; doubled for headroom). Q8_0: half a
#: block's scale (max|block| / 127), with the scale itself rounded to F16. Q4_0..Q5_1: half a 4- or 5-bit step. The
#: k-quants' bounds are looser guesses (the converter cannot write them, so they were not measured): a file whose
#: embedding or head lost an adapter's change entirely is still caught by the comparison with the other weight.
RELATIVE_BOUND = {
    "F32": 0.0,
    "F64": 0.0,
    "F16": 2.0**-10,
    "BF16": 2.0**-7,
    "Q8_0": 1 / 127,
    "Q8_1": 1 / 127,
    "Q6_K": 1 / 40,
    "Q5_0": 1 / 20,
    "Q5_1": 1 / 20,
    "Q5_K": 1 / 20,
    "Q4_0": 1 / 10,
    "Q4_1": 1 / 10,
    "Q4_K": 1 / 10,
    "Q3_K": 1 / 5,
    "Q2_K": 1 / 2.5,
}


def permute(w: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """The converter's `LlamaModel.permute` (conversion/llama.py:176-181), rows of Q (n_head) or K (n_head_kv)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """The inverse of `permute`, bit for bit."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def head_source(names: set[str], no_output: bool) -> str:
    """The tensor llama.cpp computes the logits with, for a file holding the tensors `names` of an architecture whose
    graph has no output tensor (`no_output`) or reads one when the file has it."""
    return "output.weight" if "output.weight" in names and not no_output else "token_embd.weight"


def as_stored(
    arch: str, hf_name: str, want: np.ndarray, got: np.ndarray, heads: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, str | None]:
    """The reference and the file's tensor in one layout (the converter's transforms undone or applied), and what
    was done; (want, got, "skipped: ...") where the layout cannot be matched with certainty."""
    notes = []
    if arch in NORM_PLUS_ONE and hf_name.endswith("norm.weight"):
        want = want + np.float32(1)  # the converter's own float32 `+ 1`: `got - 1` would not be exact
        notes.append("norm + 1")
    if hf_name.endswith(_QK) and arch in UNCHECKED_QK:
        return want, got, f"skipped: the converter permutes Q/K rows for {arch}, not checked by safemerge"
    if hf_name.endswith(_QK) and arch in PERMUTED_QK:
        got = unpermute(got, heads[0], heads[0] if hf_name.split(".")[-2] == "q_proj" else heads[1])
        notes.append("Q/K rows un-permuted")
    if got.ndim == want.ndim == 2 and got.shape[0] < want.shape[0] and got.shape[1] == want.shape[1]:
        want = want[: got.shape[0]]  # Gemma3 drops the embedding rows past the tokenizer's vocabulary
        notes.append(f"first {got.shape[0]} rows")
    return want, got, ", ".join(notes)


def tolerance(qtype: str, want: np.ndarray, source_eps: float, relative: float | None) -> float | None:
    """The largest max |difference| `want` stored as `qtype` may show; None for a type without a known bound.

    `source_eps`: the relative rounding of the adapter model's dtype (another tool's merge may round once
    differently). `relative`: the user's bound, a fraction of max |weight|, instead of the type's.
    """
    bound = relative if relative is not None else RELATIVE_BOUND.get(qtype)
    if bound is None:
        return None
    peak = float(np.max(np.abs(want))) if want.size else 0.0
    return peak * (bound + 2 * source_eps) + float(np.finfo(np.float32).tiny)
