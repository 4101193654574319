"""The output: the claim on OUT, atomic commit, tokenizer and card."""
