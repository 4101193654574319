"""Deciding before training: check_before_training(), SafeMergeCallback in transformers' Trainer (and TRL's
SFTTrainer where TRL is installed), and `safemerge inspect BASE --peft-config`."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import peft
import pytest
import safetensors.torch
import torch
from transformers import Trainer, TrainingArguments, default_data_collator

import safemerge
from safemerge._decide import forecast as _forecast
from safemerge.cli import main
from tests.models import ADAPTERS, ARCHS, QUICK_ARCHS, load_base, logits, sample_ids
from tests.test_merge import CASES, MERGES, POLICIES, expected

ROOT = Path(__file__).resolve().parents[1]


def step_zero(base_dirs: dict[str, Path], arch: str, kind: str) -> Any:
    """The PEFT model as get_peft_model returns it, before the first training step."""
    return peft.get_peft_model(load_base(ARCHS[arch], base_dirs[arch]), ADAPTERS[kind](ARCHS[arch])).train()


def trained_logits(run: Trainer, base_dirs: dict[str, Path], directory: Path) -> torch.Tensor:
    """The trained adapter model's logits as users get them: the adapter saved, loaded on a fresh base (without the
    mixed-precision wrapper accelerate leaves on the trainer's model)."""
    run.save_model(str(directory))
    adapter_model = peft.PeftModel.from_pretrained(load_base(ARCHS["llama"], base_dirs["llama"]), str(directory))
    return logits(adapter_model, sample_ids())


def tensors(model: Any) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def trainer(
    model: Any, tmp_path: Path, callback: safemerge.SafeMergeCallback, *, bf16: bool = False, tokenizer: Any = None
) -> Trainer:
    vocab = model.get_base_model().config.vocab_size
    rows = torch.randint(0, vocab, (8, 10), generator=torch.Generator().manual_seed(0))
    args = TrainingArguments(
        output_dir=str(tmp_path / "checkpoints"), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
        report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, bf16=bf16,
    )  # fmt: skip
    data = [{"input_ids": row, "labels": row} for row in rows]
    return Trainer(
        model=model, args=args, train_dataset=data, callbacks=[callback], processing_class=tokenizer,
        data_collator=default_data_collator,
    )  # fmt: skip


def _forecast_cases(full: bool) -> list[tuple[str, str]]:
    archs = set(ARCHS) if full else set(QUICK_ARCHS)
    return [(a, k) for a, k in CASES if a in archs and expected(a, k, "in-memory")[0] != "unbuildable"]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every (architecture, adapter kind) of the matrix with --full-matrix; four architectures by default."""
    if metafunc.definition.name == "test_the_check_predicts_every_row_of_the_matrix":
        metafunc.parametrize(("arch", "kind"), _forecast_cases(metafunc.config.getoption("--full-matrix")))


def test_the_check_predicts_every_row_of_the_matrix(base_dirs: dict[str, Path], arch: str, kind: str) -> None:
    """At step 0 the check says what the merge of the trained adapter does, as the matrix pins it."""
    category, why = expected(arch, kind, "in-memory")
    model = step_zero(base_dirs, arch, kind)
    before = tensors(model)
    for policy, merges in zip(POLICIES, MERGES.get(category, (None,) * 3), strict=True):
        if category == "unrunnable":
            with pytest.raises(safemerge.UnsupportedAdapterError, match="failed on safemerge's probe batch"):
                safemerge.check_before_training(model, policy=policy)
        elif merges:
            assert safemerge.check_before_training(model, policy=policy).outcome == "merges", (policy, why)
        else:
            with pytest.raises(safemerge.TiedWeightsError, match="will not merge this adapter once it is trained"):
                safemerge.check_before_training(model, policy=policy)
    after = tensors(model)
    assert all(torch.equal(after[name], value) for name, value in before.items()), "the check changed the model"


def test_the_check_says_when_the_trained_values_decide(
    base_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two independent moves that merge differently: the outcome is not the structure's to tell."""
    moved = _forecast._moved

    @contextmanager
    def only_the_second(trainable: Any, seed: int) -> Iterator[None]:
        if seed == _forecast._SEEDS[0]:
            yield  # as if this run left the tied members where they are
        else:
            with moved(trainable, seed):
                yield

    monkeypatch.setattr(_forecast, "_moved", only_the_second)
    check = safemerge.check_before_training(step_zero(base_dirs, "llama", "lora-head"), policy="keep")
    assert check.outcome == "depends-on-training" and "the trained values decide" in check.reason
    assert check.trainable_members == ("lm_head.weight",)


def test_refuse_stops_the_trainer_before_the_first_step(base_dirs: dict[str, Path], tmp_path: Path) -> None:
    model = step_zero(base_dirs, "llama", "lora-head")
    before = tensors(model)
    run = trainer(model, tmp_path, safemerge.SafeMergeCallback(tmp_path / "merged", policy="refuse"))
    with pytest.raises(safemerge.TiedWeightsError, match=r"once it is trained.*Fix: use policy='untie'"):
        run.train()
    assert run.state.global_step == 0
    assert all(torch.equal(tensors(model)[name], value) for name, value in before.items()), "no optimizer step"
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("bf16", [False, True], ids=["float32", "bf16-autocast"])
def test_untie_ends_the_run_with_a_verified_merge(base_dirs: dict[str, Path], tmp_path: Path, bf16: bool) -> None:
    """bf16=True: accelerate wraps the model's forward in autocast; the checks compare the weights, not the wrapper."""
    model = step_zero(base_dirs, "llama", "lora-head")
    callback = safemerge.SafeMergeCallback(tmp_path / "merged", policy="untie")
    run = trainer(model, tmp_path, callback, bf16=bf16)
    run.train()
    assert run.state.global_step == 3 and callback.check is not None and callback.check.outcome == "merges"
    assert isinstance(run.model, peft.PeftModel) and run.model.get_base_model().lm_head.lora_B, "PEFT model again"
    trained = trained_logits(run, base_dirs, tmp_path / "adapter")
    merged = load_base(ARCHS["llama"], tmp_path / "merged")
    torch.testing.assert_close(logits(merged, sample_ids()), trained, rtol=1e-4, atol=1e-4)
    # Beside the merged directory, not in it: that directory may be pushed as it is, and the report names local paths.
    assert callback.report_path == tmp_path / "merged.safemerge-report.json"
    report = json.loads(callback.report_path.read_text())
    assert report["ok"] is True and report["plan"]["policy"] == "untie"
    assert report["save_directory"] == str(tmp_path / "merged")
    assert "safemerge-report.json" not in {p.name for p in (tmp_path / "merged").iterdir()}
    logged = next(entry for entry in run.state.log_history if "safemerge/ok" in entry)
    assert (
        logged["safemerge/ok"] is True
        and logged["safemerge/max_abs_logits_diff"] <= logged["safemerge/logits_tolerance"]
    )


def test_a_failed_merge_at_the_end_keeps_the_trained_adapter(base_dirs: dict[str, Path], tmp_path: Path) -> None:
    model = step_zero(base_dirs, "llama", "lora-head")
    callback = safemerge.SafeMergeCallback(tmp_path / "merged", policy="untie", logits_tolerance=0.0)
    run = trainer(model, tmp_path, callback)
    with pytest.raises(safemerge.VerificationError, match=r"(?s)adapter was saved to .*adapter-before-failed-merge"):
        run.train()
    assert run.model.get_base_model().lm_head.lora_B, "the PEFT layers are back"
    assert not (tmp_path / "merged").exists()
    kept = tmp_path / "checkpoints" / "adapter-before-failed-merge"
    # The trained tensors themselves (logits of the trainer's model may run under accelerate's autocast wrapper).
    saved = safetensors.torch.load_file(str(kept / "adapter_model.safetensors"))
    trained = peft.get_peft_model_state_dict(model, save_embedding_layers=False)
    assert trained and all(torch.equal(saved[key], value) for key, value in trained.items())


def test_what_would_fail_at_the_end_fails_before_the_first_step(base_dirs: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"does not take.*logit_tolerance"):
        safemerge.SafeMergeCallback(tmp_path / "merged", policy="untie", logit_tolerance=1e-3)
    with pytest.raises(ValueError, match="logits_tolerance must be a finite number"):
        safemerge.SafeMergeCallback(tmp_path / "merged", policy="untie", logits_tolerance=-1.0)
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "config.json").write_text("{}")
    model = step_zero(base_dirs, "llama", "lora-head")
    run = trainer(model, tmp_path, safemerge.SafeMergeCallback(tmp_path / "merged", policy="untie"))
    with pytest.raises(safemerge.OutputExistsError):
        run.train()
    assert run.state.global_step == 0


def test_a_tokenizer_larger_than_the_vocabulary_stops_the_trainer_before_the_first_step(
    base_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """The merge after training would refuse the trainer's tokenizer (ids past the embedding): the run stops at step 0,
    not after training."""
    from tests.test_added_tokens import tokenizer

    model = step_zero(base_dirs, "llama", "lora-attention")
    rows = model.get_base_model().config.vocab_size
    callback = safemerge.SafeMergeCallback(tmp_path / "merged", policy="untie")
    run = trainer(model, tmp_path, callback, tokenizer=tokenizer(rows + 8))
    with pytest.raises(safemerge.VocabularyError, match=rf"has {rows + 8} tokens.*Fix: .*resize_token_embeddings"):
        run.train()
    assert run.state.global_step == 0
    assert not (tmp_path / "merged").exists()


def test_the_how_to_script_runs_as_written(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("train_then_merge", ROOT / "docs/how-to/train_then_merge.py")
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    report = script.main(tmp_path)
    assert report.ok and (tmp_path / "merged" / "model.safetensors").exists()
    assert (tmp_path / "adapter" / "adapter_config.json").exists()


@pytest.mark.parametrize(("policy", "code"), [("untie", 0), ("refuse", 1)])
def test_cli_inspect_with_a_peft_config_answers_before_training(
    base_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], policy: str, code: int
) -> None:
    config = tmp_path / "adapter_config.json"
    config.write_text(json.dumps(ADAPTERS["lora-head"](ARCHS["llama"]).to_dict(), default=list))
    argv = ["inspect", str(base_dirs["llama"]), "--peft-config", str(config), "--policy", policy, "--json", "-q"]
    assert main(argv) == code
    out = json.loads(capsys.readouterr().out)
    assert out["policy"] == policy and out["outcome"] == ("merges" if code == 0 else "refuses")
    assert (out["plan"]["groups"][0]["decision"]) == ("own-tensors" if code == 0 else "refuse")


def test_trl_sft_trainer_is_checked_before_and_merged_after(base_dirs: dict[str, Path], tmp_path: Path) -> None:
    """TRL's SFTTrainer (bf16 autocast by default; it refuses LoRA on lm_head, so the embedding is adapted)."""
    pytest.importorskip("trl", reason="TRL is an optional dependency: `nox -s trl` installs it and runs this test")
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from trl import SFTConfig, SFTTrainer

    vocab = Tokenizer(models.WordLevel({f"t{i}": i for i in range(96)}, unk_token="t0"))
    vocab.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=vocab, unk_token="t0", pad_token="t1", eos_token="t2")
    rows = torch.randint(3, 96, (8, 10), generator=torch.Generator().manual_seed(0)).tolist()
    data = Dataset.from_dict({"text": [" ".join(f"t{i}" for i in row) for row in rows]})

    def sft(policy: str, out: Path) -> tuple[Any, safemerge.SafeMergeCallback]:
        model = step_zero(base_dirs, "llama", "lora-embed")
        callback = safemerge.SafeMergeCallback(out, policy=policy)
        args = SFTConfig(
            output_dir=str(tmp_path / "checkpoints"), max_steps=2, per_device_train_batch_size=4, report_to=[],
            save_strategy="no", use_cpu=True, max_length=16, disable_tqdm=True,
        )  # fmt: skip
        return SFTTrainer(
            model=model, args=args, train_dataset=data, processing_class=tokenizer, callbacks=[callback]
        ), callback

    refused, _ = sft("refuse", tmp_path / "refused")
    with pytest.raises(safemerge.TiedWeightsError, match="once it is trained"):
        refused.train()
    assert refused.state.global_step == 0 and not (tmp_path / "refused").exists()
    run, callback = sft("untie", tmp_path / "merged")
    run.train()
    assert callback.report is not None and callback.report.ok
    merged = load_base(ARCHS["llama"], tmp_path / "merged")
    trained = trained_logits(run, base_dirs, tmp_path / "adapter")
    torch.testing.assert_close(logits(merged, sample_ids()), trained, rtol=1e-4, atol=1e-4)


def test_cli_inspect_usage_errors_and_the_policy_exit_code(
    base_dirs: dict[str, Path], saved_adapter: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base, adapter = str(base_dirs["llama"]), str(saved_adapter("llama", "lora-head"))
    config = str(Path(adapter) / "adapter_config.json")
    assert main(["inspect", base, adapter, "--peft-config", config, "--policy", "untie"]) == 2
    err = capsys.readouterr().err
    assert "not both" in err and "Fix: `safemerge inspect BASE ADAPTER`" in err
    assert main(["inspect", base, "--peft-config", config]) == 2
    assert "Fix: add --policy" in capsys.readouterr().err
    assert main(["inspect", base, "--peft-config", str(tmp_path / "missing.json"), "--policy", "keep"]) == 2
    assert "is not a file" in capsys.readouterr().err
    assert main(["inspect", base, adapter, "--policy", "keep", "-q"]) == 1, "keep's plan for this adapter refuses"
    assert main(["inspect", base, adapter, "--policy", "untie", "-q"]) == 0
