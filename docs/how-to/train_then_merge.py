"""Train a LoRA on a tied model with transformers' Trainer, and end with a verified merge (CPU, a few seconds).

Run: python docs/how-to/train_then_merge.py OUT_DIR  (the test suite runs it as it is written here).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import safemerge


def main(out: Path) -> safemerge.MergeReport:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True,
    )  # fmt: skip
    base = LlamaForCausalLM(config)  # in a real run: AutoModelForCausalLM.from_pretrained(...)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "lm_head"]))

    # Before training: what will each policy do with this adapter once trained? (LoRA on lm_head of a tied model)
    for policy in ("keep", "untie", "refuse"):
        try:
            check = safemerge.check_before_training(model, policy=policy)
            print(f"{policy}: {check.outcome}: {check.reason}")
        except safemerge.TiedWeightsError as refused:
            print(f"{policy}: refuses: {str(refused)[:120]}...")

    tokens = torch.randint(0, config.vocab_size, (16, 12))
    data = [{"input_ids": row, "labels": row} for row in tokens]
    args = TrainingArguments(
        output_dir=str(out / "checkpoints"), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
        report_to=[], save_strategy="no", use_cpu=True,
    )  # fmt: skip
    callback = safemerge.SafeMergeCallback(out / "merged", policy="untie")
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    trainer.train()  # policy="refuse" would stop here, before the first step, with the fix

    assert callback.report is not None  # a merge that fails its verification raises
    print(f"merged and verified: {out / 'merged'}; report: {callback.report_path}")
    trainer.save_model(str(out / "adapter"))  # the trainer's model is the PEFT model again
    return callback.report


if __name__ == "__main__":
    main(Path(sys.argv[1]))
