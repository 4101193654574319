"""Where a merged model will run: serving runtimes that load some architectures only with tied embeddings.

One table, each row with its source; the report, the model card and the command line read it through `notes()`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from safemerge._records import MergePlan, TiePolicy


@dataclass(frozen=True)
class ServingRule:
    """What a runtime requires of one architecture (transformers' `model_type`), and where that is stated."""

    runtime: str
    model_type: str
    #: True: the runtime's model code asserts tie_word_embeddings, so an untied model does not load there.
    tied_only: bool
    source: str


_VLLM_TIED_ONLY = "vLLM PR #52147 (2026-08): its model code asserts tie_word_embeddings"

SERVING_RULES: tuple[ServingRule, ...] = (
    ServingRule("vLLM", "gemma", True, _VLLM_TIED_ONLY),
    ServingRule("vLLM", "gemma2", True, _VLLM_TIED_ONLY),
    ServingRule("vLLM", "cohere", True, _VLLM_TIED_ONLY + " (Command-R, vLLM's commandr model code)"),
    ServingRule("vLLM", "cohere2_moe", True, _VLLM_TIED_ONLY),
    ServingRule("vLLM", "mpt", True, _VLLM_TIED_ONLY),
    ServingRule("vLLM", "gemma3", False, "vLLM PR #30827: Gemma3 loads with untied embeddings"),
    ServingRule("vLLM", "gemma3_text", False, "vLLM PR #30827: Gemma3 loads with untied embeddings"),
)


def notes(model_type: str, plan: MergePlan, plans: Sequence[MergePlan]) -> tuple[str, ...]:
    """What to know about serving the result of `plan`: runtimes that will not load it untied, and whether `keep`
    would merge it tied."""
    if not any(action.code == "set-tie-flags" for action in plan.actions):  # the merge leaves the flags as they were
        return ()
    keep = next((p for p in plans if p.policy == TiePolicy.KEEP.value), None)
    instead = (
        "policy='keep' merges this adapter with the embeddings tied"
        if keep is not None and keep.merges
        else "no policy keeps it tied (the adapter changes the tied members differently): serve it with "
        "transformers, or serve the base with the adapter unmerged (vLLM's LoRA support)"
    )
    return tuple(
        f"{rule.runtime} loads {model_type} models only with tie_word_embeddings=True ({rule.source}); this merge "
        f"sets it to False, so it may not load there. Instead: {instead}."
        for rule in SERVING_RULES
        if rule.model_type == model_type and rule.tied_only
    )
