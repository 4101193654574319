"""Where a merged model will be served: what vLLM and llama.cpp do with each architecture's head, read from their code.

One table (`SERVING_RULES`), each row with the runtime's version and the file and lines it was read from; the report
(`serving_notes`), the model card, `inspect` and the `serve_with` refusal all read it. docs/how-to/serving.md shows it
(tests/test_serving.py keeps the two the same).

A merge matters to a runtime when its result has a head of its own (`lm_head.weight` saved apart from the
embedding): `untie` on a tied model, or any merge of an untied one. Runtimes that compute the logits with the input
embedding whatever the config says serve such a checkpoint silently wrong, or refuse to load it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from safemerge._records import MergePlan, ServingCheck, TiePolicy
from safemerge.errors import InputError, ServingTargetError

Runtime = Literal["vllm", "llama.cpp"]
#: The runtimes `serve_with` names, as the command line spells them.
RUNTIMES: tuple[Runtime, ...] = ("vllm", "llama.cpp")

#: honours-head: an untied head is served as saved. head-is-embedding: the logits come from the input embedding, so an
#: untied checkpoint loads and computes something else, silently. refuses-untied: a checkpoint with a head of its own
#: does not load (or convert). not-served: the runtime has no model code for this architecture at all.
Behaviour = Literal["honours-head", "head-is-embedding", "refuses-untied", "not-served"]
#: Behaviours that make a merge with a head of its own unservable (not-served makes every merge unservable).
_WRONG: frozenset[str] = frozenset({"head-is-embedding", "refuses-untied"})


@dataclass(frozen=True)
class ServingRule:
    """What one runtime, in the versions read, does with the head of some architectures (transformers' model_type)."""

    runtime: Runtime
    #: The versions whose code was read (a PEP 440 specifier of the package named), e.g. "vllm==0.33.0".
    versions: str
    model_types: tuple[str, ...]
    behaviour: Behaviour
    #: The file and lines in the runtime's code that do it.
    source: str


_VLLM = "vllm==0.33.0"
_VLLM_MODELS = "vllm/model_executor/models/"
#: llama.cpp as vendored in this llama-cpp-python sdist (converter and graphs of the same commit).
_LLAMA_CPP = "llama-cpp-python==0.3.36"

SERVING_RULES: tuple[ServingRule, ...] = (
    ServingRule(
        "vllm", _VLLM, ("gemma2",), "refuses-untied",
        f"{_VLLM_MODELS}gemma2.py:332-348,364-373 (no lm_head module; logits from embed_tokens) and utils.py:427-447 "
        "(AutoWeightsLoader: \"There is no module or parameter named 'lm_head'\")",
    ),
    ServingRule(
        "vllm", _VLLM, ("gemma3n", "gemma3n_text"), "refuses-untied",
        f"{_VLLM_MODELS}gemma3n.py:1103-1110,1159-1168 (no lm_head module or mapping; logits from embed_tokens)",
    ),
    ServingRule(
        "vllm", _VLLM, ("cohere", "cohere2"), "head-is-embedding",
        f"{_VLLM_MODELS}commandr.py:417 (drops lm_head on load), 460-472 (logits from embed_tokens)",
    ),
    ServingRule(
        "vllm", _VLLM, ("cohere2_moe",), "head-is-embedding",
        f"{_VLLM_MODELS}cohere2_moe.py:710 (drops lm_head on load), 758-762 (logits from embed_tokens)",
    ),
    ServingRule(
        "vllm", _VLLM, ("gemma", "gemma3", "gemma3_text", "gemma4", "gemma4_text", "llama", "qwen2"), "honours-head",
        f"{_VLLM_MODELS}gemma.py:358-365, gemma3.py:392-399, gemma4.py:1447-1454, llama.py:503-510, qwen2.py:480-487 "
        "(a ParallelLMHead, tied only if tie_word_embeddings)",
    ),
    ServingRule(
        "vllm", "vllm>=0.28.0", ("mpt",), "not-served",
        "vllm/model_executor/models/registry.py:889-890 (MPTForCausalLM removed in 0.28.0)",
    ),
    ServingRule(
        "llama.cpp", _LLAMA_CPP, ("gemma", "gemma2"), "head-is-embedding",
        "vendor/llama.cpp/conversion/gemma.py:57-61,109-113 (convert_hf_to_gguf drops lm_head.weight); "
        "src/models/gemma.cpp:20, gemma2.cpp:37 (the head is token_embd)",
    ),
    ServingRule(
        "llama.cpp", _LLAMA_CPP, ("cohere", "cohere2"), "refuses-untied",
        "vendor/llama.cpp/conversion/base.py:627-631 (convert_hf_to_gguf: \"Can not map tensor 'lm_head.weight'\"; "
        "gguf's command-r/cohere2 tables have no output tensor); src/models/command-r.cpp:21, cohere2.cpp:29-30",
    ),
    ServingRule(
        "llama.cpp", _LLAMA_CPP,
        ("cohere2_moe", "gemma3", "gemma3_text", "gemma3n", "gemma3n_text", "gemma4", "gemma4_text", "llama", "qwen2"),
        "honours-head",
        "vendor/llama.cpp/src/models/cohere2moe.cpp:60-65, gemma3.cpp:41-45, gemma3n.cpp:28-32, gemma4.cpp:50-54, "
        "llama.cpp:41-45, qwen2.cpp:26-30 (output.weight when the file has one, else token_embd; the converter "
        "keeps lm_head.weight for these)",
    ),
)  # fmt: skip

_NAMES = {"vllm": "vLLM", "llama.cpp": "llama.cpp"}
_UNMERGED = {
    "vllm": "vLLM's LoRA support (vllm serve BASE --enable-lora --lora-modules name=ADAPTER)",
    "llama.cpp": "llama.cpp's GGUF LoRA adapters (convert_lora_to_gguf.py ADAPTER --base BASE, then llama-server -m "
    "BASE.gguf --lora ADAPTER.gguf)",
}


def parse_runtimes(serve_with: str | Iterable[str] | None) -> tuple[Runtime, ...]:
    """The runtimes `serve_with` names ("vllm,llama.cpp" or a sequence), in the table's order; InputError listing
    the valid names for one that is not a runtime of the table."""
    if serve_with is None:
        return ()
    names = serve_with.split(",") if isinstance(serve_with, str) else list(serve_with)
    wanted = {str(name).strip().lower() for name in names if str(name).strip()}
    unknown = sorted(wanted - set(RUNTIMES))
    if unknown:
        raise InputError(
            f"serve_with names {', '.join(repr(n) for n in unknown)}, which is not a runtime safemerge knows; nothing "
            f"was loaded. Fix: name one or more of {', '.join(repr(r) for r in RUNTIMES)} (CLI: --serve-with "
            "vllm,llama.cpp), or leave it out."
        )
    return tuple(r for r in RUNTIMES if r in wanted)


def rule_for(runtime: str, model_type: str) -> ServingRule | None:
    """The table's row for this runtime and architecture, or None when its code was not read for it."""
    return next((r for r in SERVING_RULES if r.runtime == runtime and model_type in r.model_types), None)


def own_head(plan: MergePlan, head: str | None) -> bool:
    """Whether the merged model of `plan` saves its head apart from every other tensor (a head of its own)."""
    if not plan.merges or head is None:
        return False
    return not any(head in names and len(names) > 1 for names in plan.ties_after)


def checks(model_type: str, plan: MergePlan, head: str | None) -> tuple[ServingCheck, ...]:
    """What each runtime of the table does with the merged model of `plan` (none for a plan that does not merge)."""
    if not plan.merges:
        return ()
    separate = own_head(plan, head)
    found = []
    for runtime in RUNTIMES:
        rule = rule_for(runtime, model_type)
        if rule is None:
            found.append(ServingCheck(plan.policy, runtime, "not-in-table", None, ""))
            continue
        bad = rule.behaviour == "not-served" or (separate and rule.behaviour in _WRONG)
        found.append(ServingCheck(plan.policy, runtime, rule.behaviour, not bad, rule.source))
    return tuple(found)


def notes(model_type: str, plan: MergePlan, plans: Sequence[MergePlan], head: str | None) -> tuple[str, ...]:
    """What each runtime that would serve the result of `plan` wrong (or not at all) does, and the fix."""
    return tuple(
        _problem(check, model_type, plans, head) for check in checks(model_type, plan, head) if check.ok is False
    )


def refuse_unservable(
    model_type: str, plan: MergePlan, plans: Sequence[MergePlan], head: str | None, serve_with: Sequence[str]
) -> None:
    """ServingTargetError when a runtime named in `serve_with` would serve the result of `plan` wrong or not at all."""
    for check in checks(model_type, plan, head):
        if check.runtime in serve_with and check.ok is False:
            raise ServingTargetError(
                f"{_problem(check, model_type, plans, head)} Nothing was changed (serve_with={tuple(serve_with)!r}).",
                runtime=check.runtime,
                model_type=model_type,
                behaviour=check.behaviour,
                policy=plan.policy,
            )


def _problem(check: ServingCheck, model_type: str, plans: Sequence[MergePlan], head: str | None) -> str:
    """The runtime's behaviour with this merge, where it is in its code, and the fix."""
    rule = rule_for(check.runtime, model_type)
    assert rule is not None  # a failed check comes from a row
    name = f"{_NAMES[check.runtime]} ({rule.versions})"
    if rule.behaviour == "not-served":
        return (
            f"{name} does not serve {model_type} models ({rule.source}). Fix: serve it with transformers or "
            "another runtime."
        )
    what = (
        f"computes {model_type} logits with the input embedding whatever tie_word_embeddings says, so it would "
        "serve this merge's separate head as the embedding: silently different output"
        if rule.behaviour == "head-is-embedding"
        else f"refuses to load (or convert) a {model_type} checkpoint that has a head of its own"
    )
    fix = _fix(check.runtime, model_type, plans, head)
    saves = f"policy={check.policy!r} saves {head} apart from the embedding"
    return f"{saves}, and {name} {what} ({rule.source}). Fix: {fix}."


def _fix(runtime: str, model_type: str, plans: Sequence[MergePlan], head: str | None) -> str:
    """keep where keep merges tied; else serve the adapter unmerged, or use a runtime that honours the head."""
    keep = next((p for p in plans if p.policy == TiePolicy.KEEP.value), None)
    honour = [_NAMES[r.runtime] for r in SERVING_RULES if model_type in r.model_types and r.behaviour == "honours-head"]
    elsewhere = f"serve it with a runtime that honours the head ({', '.join([*honour, 'transformers'])})"
    unmerged = f"serve the base with the adapter unmerged: {_UNMERGED[runtime]}"
    if keep is not None and keep.merges and not own_head(keep, head):
        return f"policy='keep' merges this adapter with the embeddings tied; or {unmerged}; or {elsewhere}"
    return f"no policy merges it tied: {unmerged}; or {elsewhere}"
