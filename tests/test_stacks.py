"""What differs between the supported transformers stacks, asserted on each."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import safemerge
from safemerge._model import compat as _compat
from safemerge.testing import assert_reload_identical
from tests.models import ARCHS, adapter_model, load_base, logits, sample_ids

TRANSFORMERS_4 = _compat.TRANSFORMERS_MAJOR < 5


def test_t5_untie_keeps_logits_through_the_output_rescale(base_dirs: dict[str, Path], tmp_path: Path) -> None:
    """transformers 4's T5 rescales the decoder output only while tied: untying must fold the factor in."""
    model = adapter_model(ARCHS["t5"], base_dirs["t5"], "lora-head", tmp_path / "a")
    expected = logits(model, sample_ids())
    report = safemerge.safe_merge(model, tmp_path / "m", policy="untie")
    folded = any(a.code == "rescale-output-embedding" for a in report.actions)
    assert folded is TRANSFORMERS_4
    torch.testing.assert_close(
        logits(load_base(ARCHS["t5"], tmp_path / "m"), sample_ids()), expected, rtol=0, atol=1e-5
    )
    assert_reload_identical(tmp_path / "m", report.model)


def test_t5_embeddings_that_load_as_one_tensor_cannot_be_untied(base_dirs: dict[str, Path], tmp_path: Path) -> None:
    """modules_to_save on T5's embed_tokens trains separate encoder/decoder copies of one tensor."""
    model = adapter_model(ARCHS["t5"], base_dirs["t5"], "save-embed", tmp_path / "a")
    (group,) = safemerge.inspect_ties(model).groups
    if TRANSFORMERS_4:
        assert set(group.inseparable[0]) >= {"shared.weight", "encoder.embed_tokens.weight"}
        assert not group.separable
        with pytest.raises(
            safemerge.TiedWeightsError, match=r"load as one tensor whatever is saved.*No tie policy can merge it"
        ):
            safemerge.safe_merge(model, tmp_path / "m", policy="untie")
        assert not (tmp_path / "m").exists()
    else:
        assert group.inseparable == () and group.separable
        assert safemerge.safe_merge(model, tmp_path / "m", policy="untie").ok


def test_flag_is_set_where_this_transformers_reads_it(base_dirs: dict[str, Path], tmp_path: Path) -> None:
    """Gemma3: transformers 5 reads the top-level flag, transformers 4 reads text_config's; both are written."""
    import json

    model = adapter_model(ARCHS["gemma3"], base_dirs["gemma3"], "save-head", tmp_path / "a")
    safemerge.safe_merge(model, tmp_path / "m", policy="untie")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved.get("tie_word_embeddings", saved["text_config"].get("tie_word_embeddings")) is False
    assert saved["text_config"].get("tie_word_embeddings", False) is False


def test_whisper_is_probed_with_audio_features(tmp_path: Path) -> None:
    """Speech models take input_features: the probe feeds features to the encoder and token ids to the decoder."""
    import peft
    import transformers as tf

    from tests.models import HIDDEN, VOCAB, perturb

    config = tf.WhisperConfig(
        vocab_size=VOCAB,
        d_model=HIDDEN,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        num_mel_bins=8,
        max_source_positions=16,
        max_target_positions=32,
        decoder_start_token_id=1,
        pad_token_id=0,
        eos_token_id=2,
        bos_token_id=1,
    )
    torch.manual_seed(0)
    tf.WhisperForConditionalGeneration(config).save_pretrained(tmp_path / "base")
    trained = peft.get_peft_model(
        tf.WhisperForConditionalGeneration.from_pretrained(tmp_path / "base"),
        peft.LoraConfig(r=4, target_modules=["proj_out", "q_proj"]),
    )
    perturb(trained)
    trained.save_pretrained(tmp_path / "adapter")
    model = peft.PeftModel.from_pretrained(
        tf.WhisperForConditionalGeneration.from_pretrained(tmp_path / "base"), tmp_path / "adapter"
    )
    with pytest.raises(safemerge.TiedWeightsError):
        safemerge.safe_merge(model, tmp_path / "kept", policy="keep")
    report = safemerge.safe_merge(model, tmp_path / "m", policy="untie")
    assert report.verification is not None and report.verification.probe_tokens == 16
    assert report.verification.max_abs_logits_diff_reloaded is not None
    assert report.verification.max_abs_logits_diff_reloaded <= report.verification.logits_tolerance
    assert_reload_identical(tmp_path / "m", report.model)
