"""The demo: a tiny tied model and an adapter that changes both its embedding and lm_head, built offline."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from safemerge._merge import safe_merge
from safemerge._records import TiePolicy
from safemerge.errors import OutputExistsError, TiedWeightsError


def _tiny_adapter_model(base_dir: Path, adapter_dir: Path) -> object:
    """A saved tiny tied Llama, and a trained-looking LoRA on embed_tokens and lm_head loaded back onto it."""
    import peft
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(base_dir)
    trained = peft.get_peft_model(
        transformers.LlamaForCausalLM.from_pretrained(base_dir),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "lm_head", "q_proj"]),
    )
    with torch.no_grad():  # stand-in for training: LoRA's B starts at zero
        for param in trained.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param))
    trained.save_pretrained(str(adapter_dir))
    base = transformers.LlamaForCausalLM.from_pretrained(base_dir)
    return peft.PeftModel.from_pretrained(base, adapter_dir).eval()


def run_demo(say: Callable[[str], None], *, keep: Path | None = None) -> int:
    """Show plain merge_and_unload() breaking a tied model, then what each policy does. Returns 0; a refusal by the
    policy (TiedWeightsError) is part of the show, and any other error of safemerge propagates (the CLI exits 1).

    `keep`: a new or empty directory that keeps the tiny base (`base/`), adapter (`adapter/`) and merged models
    (`merged-untie/`, ...) for the tutorial's next steps; by default they go with a temporary directory.
    """
    import transformers

    ids = torch.arange(100, 128).unsqueeze(0)
    if keep is not None:
        if keep.exists() and (not keep.is_dir() or any(keep.iterdir())):
            raise OutputExistsError(
                f"demo --keep: '{keep}' exists and is not an empty directory; nothing was built. Fix: choose a new or "
                "empty directory."
            )
        keep.mkdir(parents=True, exist_ok=True)
    with contextlib.nullcontext(keep) if keep is not None else tempfile.TemporaryDirectory(prefix="safemerge-") as tmp:
        work = Path(tmp)
        say("Building a tiny Llama with tied embeddings and a LoRA adapter on embed_tokens + lm_head (offline).")
        model = _tiny_adapter_model(work / "base", work / "adapter")
        with torch.no_grad():
            expected = model(input_ids=ids).logits  # type: ignore[operator]
        plain = model.merge_and_unload()  # type: ignore[attr-defined]
        plain.save_pretrained(work / "plain")
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(work / "plain")
        with torch.no_grad():
            plain_diff = float((reloaded(input_ids=ids).logits - expected).abs().max())
        say(
            "\n1. Plain PEFT: merge_and_unload() + save_pretrained() + from_pretrained()\n"
            f"   max |logits difference| vs the adapter model: {plain_diff:.4f}   <- silently wrong, no error raised"
        )
        for number, policy in enumerate(TiePolicy, start=2):
            model = _tiny_adapter_model(work / f"base-{policy}", work / f"adapter-{policy}")
            say(f"\n{number}. safe_merge(model, out, policy={policy.value!r})")
            try:
                report = safe_merge(model, work / f"merged-{policy}", policy=policy)
            except TiedWeightsError as error:  # the refusal the demo shows; any other error is a failure
                say(f"   refused ({type(error).__name__}): {error}")
                continue
            # safe_merge returns only a verified merge: a failed verification raised VerificationError.
            assert report.verification is not None
            say(f"   merged; actions: {'; '.join(str(a) for a in report.actions[:-1])}")
            say(
                f"   max |logits difference| vs the adapter model after reload: "
                f"{report.verification.max_abs_logits_diff_reloaded:.2g} "
                f"(tolerance {report.verification.logits_tolerance:.2g}); verified"
            )
        say("\nTied weights stay correct only when the policy is explicit. See 'Choose a tie policy' in the docs.")
        if keep is not None:
            kept = ", ".join(sorted(f"{p.name}/" for p in keep.iterdir() if p.is_dir()))
            say(f"Kept in {keep}: {kept} (the tutorial's next steps use base/ and adapter/).")
    return 0
