"""Where a merge will be served (safemerge/_decide/serving.py): the notes, `inspect` and the `serve_with` refusals
follow the table, on tiny models of each architecture in it, in memory and reloaded; the docs show the table.

Architectures the installed transformers lacks (Cohere2-MoE and Gemma4 on transformers 4.57) are skipped with that
reason; gemma3n (Gemma3nForConditionalGeneration: its vision tower is a timm MobileNet, not installed and never tiny)
is held to the rows of gemma3n_text, which is built."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import peft
import pytest
import torch
import transformers as tf

import safemerge
from safemerge._decide.serving import SERVING_RULES, rule_for
from safemerge.cli import main
from tests.models import perturb

ROOT = Path(__file__).parent.parent
SIZES = {
    "vocab_size": 96,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 64,
}
#: Per-layer embeddings of Gemma3n and Gemma4 at the tiny vocabulary (their defaults are 262144 x 256).
PER_LAYER = {"vocab_size_per_layer_input": 96, "hidden_size_per_layer_input": 8}
#: A SigLIP vision tower of one layer, for Gemma3's multimodal model (model_type gemma3).
VISION = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "image_size": 28,
    "patch_size": 14,
}
GEMMA4_TEXT = {"head_dim": 16, "global_head_dim": 16, **PER_LAYER, "layer_types": ["full_attention"]}
#: Tied tiny configs of the table's architectures.
CONFIGS: dict[str, Callable[[], Any]] = {
    "gemma": lambda: tf.GemmaConfig(**SIZES, head_dim=16),
    "gemma2": lambda: tf.Gemma2Config(**SIZES, head_dim=16),
    "gemma3": lambda: tf.Gemma3Config(
        text_config={**SIZES, "head_dim": 16}, vision_config=VISION, mm_tokens_per_image=4
    ),
    "gemma3_text": lambda: tf.Gemma3TextConfig(**SIZES, head_dim=16),
    "gemma3n_text": lambda: tf.Gemma3nTextConfig(
        **{**SIZES, "num_hidden_layers": 2}, **PER_LAYER, head_dim=16, laurel_rank=4, altup_num_inputs=2,
        num_kv_shared_layers=0, activation_sparsity_pattern=[0.0, 0.0], sliding_window=16,
        layer_types=["sliding_attention", "full_attention"],
    ),
    "gemma4": lambda: tf.Gemma4Config(text_config={**SIZES, **GEMMA4_TEXT}),
    "gemma4_text": lambda: tf.Gemma4TextConfig(**SIZES, **GEMMA4_TEXT),
    "cohere": lambda: tf.CohereConfig(**SIZES),
    "cohere2": lambda: tf.Cohere2Config(**SIZES),
    "cohere2_moe": lambda: tf.Cohere2MoeConfig(**SIZES),
    "llama": lambda: tf.LlamaConfig(**SIZES),
    "qwen2": lambda: tf.Qwen2Config(**SIZES),
    "mpt": lambda: tf.MptConfig(d_model=32, n_heads=2, n_layers=1, vocab_size=96, max_seq_len=64),
}  # fmt: skip
#: The config classes transformers 4.57 does not have.
NEEDS = {"gemma4": "Gemma4Config", "gemma4_text": "Gemma4TextConfig", "cohere2_moe": "Cohere2MoeConfig"}
#: What each runtime does with an untied merge (a LoRA on lm_head alone, policy untie), as the table says.
UNTIED = {
    "gemma": {"vllm": "honours-head", "llama.cpp": "head-is-embedding"},
    "gemma2": {"vllm": "refuses-untied", "llama.cpp": "head-is-embedding"},
    "gemma3": {"vllm": "honours-head", "llama.cpp": "honours-head"},
    "gemma3_text": {"vllm": "honours-head", "llama.cpp": "honours-head"},
    "gemma3n_text": {"vllm": "refuses-untied", "llama.cpp": "honours-head"},
    "gemma4": {"vllm": "honours-head", "llama.cpp": "honours-head"},
    "gemma4_text": {"vllm": "honours-head", "llama.cpp": "honours-head"},
    "cohere": {"vllm": "head-is-embedding", "llama.cpp": "refuses-untied"},
    "cohere2": {"vllm": "head-is-embedding", "llama.cpp": "refuses-untied"},
    "cohere2_moe": {"vllm": "head-is-embedding", "llama.cpp": "honours-head"},
    "llama": {"vllm": "honours-head", "llama.cpp": "honours-head"},
    "qwen2": {"vllm": "honours-head", "llama.cpp": "honours-head"},
}
#: Model types of the table held to the rows of one that is built (see the module docstring).
SAME_ROWS = {"gemma3n": "gemma3n_text"}
WORDS = {"head-is-embedding": "silently different output", "refuses-untied": "refuses to load"}


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """The tied tiny base of an architecture, saved once (skipped where transformers lacks its class)."""
    root = tmp_path_factory.mktemp("serving-bases")

    def get(name: str) -> Path:
        if name in NEEDS and not hasattr(tf, NEEDS[name]):
            pytest.skip(f"transformers {tf.__version__} has no {NEEDS[name]}")
        if not (root / name).is_dir():
            config = CONFIGS[name]()
            config.tie_word_embeddings = True
            torch.manual_seed(0)
            tf.AutoModelForCausalLM.from_config(config).save_pretrained(root / name)
        return root / name

    return get


def head_lora(
    bases: Callable[[str], Path], name: str, variant: str, tmp_path: Path, targets: tuple[str, ...] = ("lm_head",)
) -> Any:
    """A tied base with a trained LoRA on lm_head alone (untie gives it a head of its own; keep refuses), or on
    `targets`."""
    base = bases(name)
    model = peft.get_peft_model(
        tf.AutoModelForCausalLM.from_pretrained(base), peft.LoraConfig(r=2, target_modules=list(targets))
    )
    perturb(model)
    if variant == "in-memory":
        return model
    model.save_pretrained(tmp_path / "adapter")
    return peft.PeftModel.from_pretrained(tf.AutoModelForCausalLM.from_pretrained(base), tmp_path / "adapter")


@pytest.mark.parametrize("variant", ["in-memory", "reloaded"])
@pytest.mark.parametrize("name", list(UNTIED))
def test_untied_merges_get_the_tables_notes_and_refusals(
    bases: Callable[[str], Path], name: str, variant: str, tmp_path: Path
) -> None:
    expected = UNTIED[name]
    wrong = {runtime: b for runtime, b in expected.items() if b != "honours-head"}
    model = head_lora(bases, name, variant, tmp_path)
    inspection = safemerge.inspect_ties(model)
    assert {c.runtime: c.behaviour for c in inspection.serving if c.policy == "untie"} == expected
    assert {c.runtime for c in inspection.serving if c.policy == "untie" and c.ok is False} == set(wrong)
    for runtime, behaviour in wrong.items():
        fix = "no policy merges it tied: serve the base with the adapter unmerged"
        with pytest.raises(safemerge.ServingTargetError, match=rf"{name}.*Fix: {fix}") as info:
            safemerge.safe_merge(model, tmp_path / "refused", policy="untie", serve_with=(runtime,))
        assert (info.value.runtime, info.value.model_type, info.value.behaviour) == (runtime, name, behaviour)
        assert WORDS[behaviour] in str(info.value)
        assert not (tmp_path / "refused").exists() and not getattr(model.base_model.model.lm_head, "merged", False)
    report = safemerge.safe_merge(model, tmp_path / "merged", policy="untie")
    assert [n.split(" (")[0].split(", and ")[1] for n in report.serving_notes] == [
        f"{'vLLM' if runtime == 'vllm' else 'llama.cpp'}" for runtime in wrong
    ]
    assert all(note in (tmp_path / "merged" / "README.md").read_text() for note in report.serving_notes)


@pytest.mark.parametrize("name", ["gemma2", "cohere"])
def test_a_tied_merge_is_served_everywhere(bases: Callable[[str], Path], name: str, tmp_path: Path) -> None:
    """A LoRA on the attention leaves the tie: no notes, and serve_with takes every runtime."""
    model = peft.get_peft_model(
        tf.AutoModelForCausalLM.from_pretrained(bases(name)), peft.LoraConfig(r=2, target_modules=["q_proj"])
    )
    perturb(model)
    report = safemerge.safe_merge(model, tmp_path / "merged", policy="untie", serve_with="vllm,llama.cpp")
    assert report.serving_notes == () and report.plan.ties_after == (("model.embed_tokens.weight", "lm_head.weight"),)


@pytest.mark.parametrize("variant", ["in-memory", "reloaded"])
def test_vllm_serves_no_mpt_merge_at_all(bases: Callable[[str], Path], variant: str, tmp_path: Path) -> None:
    """vLLM removed MPT: even a tied merge (a LoRA on the attention) gets the note, and serve_with=vllm refuses it;
    llama.cpp's code was not read for mpt: no note, no refusal."""
    model = head_lora(bases, "mpt", variant, tmp_path, targets=("Wqkv",))
    serving = safemerge.inspect_ties(model).serving
    assert {(c.policy, c.runtime, c.behaviour, c.ok) for c in serving if c.policy != "refuse"} == {
        ("keep", "vllm", "not-served", False),
        ("keep", "llama.cpp", "not-in-table", None),
        ("untie", "vllm", "not-served", False),
        ("untie", "llama.cpp", "not-in-table", None),
    }
    fix = "Fix: serve it with transformers or another runtime."
    with pytest.raises(safemerge.ServingTargetError, match=rf"vLLM \(vllm>=0.28.0\) does not serve mpt models .*{fix}"):
        safemerge.safe_merge(model, tmp_path / "refused", policy="keep", serve_with="vllm")
    assert not (tmp_path / "refused").exists()
    report = safemerge.safe_merge(model, tmp_path / "merged", policy="keep", serve_with="llama.cpp")
    assert len(report.serving_notes) == 1 and report.serving_notes[0].startswith("vLLM (vllm>=0.28.0) does not serve")
    assert report.plan.ties_after == (("transformer.wte.weight", "lm_head.weight"),)


def test_every_model_type_of_the_table_is_built_here() -> None:
    """A row's model type gets a tiny model in this file, or is held to the rows of one that has (SAME_ROWS)."""
    assert {t for rule in SERVING_RULES for t in rule.model_types} == {*UNTIED, *SAME_ROWS, "mpt"}
    for name, built in SAME_ROWS.items():
        assert [rule_for(r, name) for r in ("vllm", "llama.cpp")] == [rule_for(r, built) for r in ("vllm", "llama.cpp")]


def test_an_unknown_runtime_is_an_input_error_listing_the_valid_ones(
    bases: Callable[[str], Path], tmp_path: Path
) -> None:
    model = head_lora(bases, "llama", "in-memory", tmp_path)
    with pytest.raises(safemerge.InputError, match=r"'ollama'.*Fix: name one or more of 'vllm', 'llama.cpp'"):
        safemerge.safe_merge(model, tmp_path / "merged", policy="untie", serve_with="vllm,ollama")
    with pytest.raises(safemerge.InputError, match="'sglang'"):
        safemerge.SafeMergeCallback(tmp_path / "merged", policy="untie", serve_with=["sglang"])


def test_check_before_training_refuses_a_target_that_would_serve_the_trained_merge_wrong(
    bases: Callable[[str], Path],
) -> None:
    model = peft.get_peft_model(
        tf.AutoModelForCausalLM.from_pretrained(bases("gemma2")), peft.LoraConfig(r=2, target_modules=["lm_head"])
    )
    assert safemerge.check_before_training(model, policy="untie").outcome == "merges"
    with pytest.raises(safemerge.ServingTargetError, match=r"vLLM .*refuses to load.*gemma2.*vLLM's LoRA support"):
        safemerge.check_before_training(model, policy="untie", serve_with="vllm")


def test_merge_pretrained_and_the_cli_refuse_with_exit_1(
    bases: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    head_lora(bases, "gemma", "reloaded", tmp_path)  # saves tmp_path/adapter
    base, adapter = str(bases("gemma")), str(tmp_path / "adapter")
    with pytest.raises(safemerge.ServingTargetError, match=r"llama.cpp .*silently different output.*gemma"):
        safemerge.merge_pretrained(base, adapter, tmp_path / "out", policy="untie", serve_with=["llama.cpp"])
    assert main(["merge", base, adapter, str(tmp_path / "out"), "--policy", "untie", "--serve-with", "llama.cpp"]) == 1
    assert "ServingTargetError" in capsys.readouterr().err and not (tmp_path / "out").exists()
    assert main(["merge", base, adapter, str(tmp_path / "out"), "--policy", "untie", "--serve-with", "tgi"]) == 2
    capsys.readouterr()
    assert main(["inspect", base, adapter, "--policy", "untie", "--serve-with", "vllm"]) == 0
    table = capsys.readouterr().out
    assert "untie   vllm: serves it as merged; llama.cpp: HEAD IS EMBEDDING" in table
    assert main(["inspect", base, adapter, "--policy", "untie", "--serve-with", "llama.cpp", "--json"]) == 1
    serving = json.loads(capsys.readouterr().out)["serving"]
    assert {(c["policy"], c["runtime"], c["ok"]) for c in serving} == {
        ("untie", "vllm", True),
        ("untie", "llama.cpp", False),
    }


def serving_table_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("serving_table", ROOT / "scripts" / "serving_table.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_docs_table_is_generated_from_the_data() -> None:
    doc = (ROOT / "docs" / "how-to" / "serving.md").read_text(encoding="utf-8")
    assert doc == serving_table_script().regenerated(doc), (
        "The serving table in docs/how-to/serving.md differs from safemerge/_decide/serving.py: run "
        "python scripts/serving_table.py"
    )
    assert {r.runtime for r in SERVING_RULES} == {"vllm", "llama.cpp"}
