"""The adapter doctor: a correct adapter, then tampered copies; each finding and its fix, before loading weights."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import peft
import pytest
import torch
from packaging.version import Version
from safetensors.torch import load_file, save_file

import safemerge
from safemerge._doctor import peft_settings as _peft_settings
from safemerge._model import compat as _compat
from safemerge.cli import main
from tests.models import (
    ADAPTERS,
    ARCHS,
    QUICK_ARCHS,
    VOCAB,
    Arch,
    adapter_model,
    load_base,
    logits,
    perturb,
    sample_ids,
    trained_and_reloaded,
)

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory, base_dirs: dict[str, Path]) -> dict[str, Path]:
    """Correct adapters on the tied Llama: attention LoRA, DoRA on lm_head, modules_to_save on lm_head."""
    root = tmp_path_factory.mktemp("good")
    for kind in ("lora-attention", "dora-head", "save-head"):
        adapter_model(ARCHS["llama"], base_dirs["llama"], kind, root / kind)
    return {"base": base_dirs["llama"], **{kind: root / kind for kind in ("lora-attention", "dora-head", "save-head")}}


def tampered(
    source: Path,
    target: Path,
    *,
    config: Callable[[dict], None] | None = None,
    tensors: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
) -> Path:
    shutil.copytree(source, target)
    if config is not None:
        data = json.loads((target / CONFIG).read_text())
        config(data)
        (target / CONFIG).write_text(json.dumps(data))
    if tensors is not None:
        save_file(tensors(load_file(target / WEIGHTS)), target / WEIGHTS)
    return target


def codes(report: safemerge.DoctorReport, *severities: str) -> set[str]:
    return {f.code for f in report.findings if not severities or f.severity in severities}


def finding(report: safemerge.DoctorReport, code: str) -> safemerge.Finding:
    return next(f for f in report.findings if f.code == code)


@pytest.mark.parametrize(
    ("arch", "kind"),
    [pytest.param(a, k, marks=() if a in QUICK_ARCHS else pytest.mark.full_matrix) for a in ARCHS for k in ADAPTERS],
)
def test_correct_adapters_are_clean(base_dirs: dict[str, Path], tmp_path: Path, arch: str, kind: str) -> None:
    """Clean exactly when PEFT's own reload computes what the trained adapter model computed.

    peft 0.21 saves lm_head/embedding LoRA weights under ensure_weight_tying on GPT-2/T5/BART that its reload does
    not inject: there the doctor must say so.
    """
    trained, reloaded = trained_and_reloaded(ARCHS[arch], base_dirs[arch], kind, tmp_path / "adapter")
    report = safemerge.doctor(str(base_dirs[arch]), str(tmp_path / "adapter"))
    if kind == "save-embed-ensure-tying" and arch in ("t5", "bart") and _compat.TRANSFORMERS_MAJOR >= 5:
        # peft 0.21 builds a model whose forward fails, and saves the embeddings as plain base-model keys.
        with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
            logits(trained, sample_ids())
        assert codes(report, "error", "silent") == {"base-weights-in-adapter"}
        return
    faithful = torch.allclose(logits(trained, sample_ids()), logits(reloaded, sample_ids()), rtol=0, atol=1e-5)
    if faithful:
        assert codes(report, "error", "silent", "warning") == set(), [str(f) for f in report.findings]
        assert report.ok
    else:
        assert not report.ok and codes(report, "silent") == {"untargeted-weights"}


def test_scaling_is_reported_as_info(good: dict[str, Path]) -> None:
    report = safemerge.doctor(str(good["base"]), str(good["lora-attention"]))
    assert (
        "lora_alpha / r" in finding(report, "scaling").message
        and "2 on 4 modules" in finding(report, "scaling").message
    )


def test_config_in_subfolder(good: dict[str, Path], tmp_path: Path) -> None:
    shutil.copytree(good["lora-attention"], tmp_path / "run" / "checkpoint-500")
    report = safemerge.doctor(str(good["base"]), str(tmp_path / "run"))
    assert "checkpoint-500" in finding(report, "config-in-subfolder").fix and not report.ok


def test_no_config(good: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert "no-config" in codes(safemerge.doctor(str(good["base"]), str(tmp_path / "empty")), "error")


@pytest.mark.parametrize("which", ["base", "adapter"])
@pytest.mark.parametrize("kind", ["missing", "file"])
def test_a_path_that_is_no_directory_is_never_looked_up_on_the_hub(
    good: dict[str, Path], tmp_path: Path, which: str, kind: str
) -> None:
    """A missing path or a file: the finding says what it is (not huggingface_hub's "Repo id must ..."), and the
    fix says what to pass."""
    role, code = ("base model", "base-not-found") if which == "base" else ("adapter", "adapter-not-found")
    if kind == "missing":
        bad, what, fix = tmp_path / "no-such-dir", "does not exist (no such file or directory).", "Check the path"
    else:
        folder = good["base"] if which == "base" else good["lora-attention"]
        bad = folder / ("config.json" if which == "base" else CONFIG)
        what, fix = "is a file, not a directory", f"Pass the directory '{folder}'."
    base, adapter = (bad, good["lora-attention"]) if which == "base" else (good["base"], bad)
    report = safemerge.doctor(str(base), str(adapter))
    assert finding(report, code).message.startswith(f"The {role} '{bad}' {what}") and not report.ok
    assert finding(report, code).fix.startswith(fix) and "Repo id" not in str(report)


@pytest.mark.parametrize("damage", ["truncated", "index-not-json"])
def test_a_damaged_base_file_is_a_finding(good: dict[str, Path], tmp_path: Path, damage: str) -> None:
    """Read from the base's files, not raised from safetensors: the file is named, with the fix."""
    base = tmp_path / "base"
    shutil.copytree(good["base"], base)
    damaged = base / ("model.safetensors" if damage == "truncated" else "model.safetensors.index.json")
    if damage == "truncated":
        damaged.write_bytes(damaged.read_bytes()[:1000])
    else:
        damaged.write_text("{not json")
    report = safemerge.doctor(str(base), str(good["lora-attention"]))
    found = finding(report, "damaged-base-file")
    assert found.message.startswith(f"This file is damaged: {damaged if damage == 'truncated' else base}")
    assert found.fix.startswith("Copy or download it again") and not report.ok


def test_no_weights_file(good: dict[str, Path], tmp_path: Path) -> None:
    target = tampered(good["lora-attention"], tmp_path / "a")
    (target / WEIGHTS).unlink()
    assert "save_pretrained" in finding(safemerge.doctor(str(good["base"]), str(target)), "no-weights").fix


@pytest.mark.parametrize(("value", "code", "severity"), [(True, "newer-peft-setting", "silent"), (False, None, None)])
def test_a_setting_of_a_newer_peft_release(good, tmp_path: Path, monkeypatch, value, code, severity) -> None:  # type: ignore[no-untyped-def]
    """Set, it changes what the adapter computes (PEFT drops it): silent, naming the release; at its default: info."""
    monkeypatch.setitem(_peft_settings.SETTINGS_ADDED, "LoraConfig", {"lora_quantum_folding": "9.0.0"})
    config = tampered(good["lora-attention"], tmp_path / "a", config=lambda d: d.update(lora_quantum_folding=value))
    report = safemerge.doctor(str(good["base"]), str(config))
    if code is None:
        assert report.ok and codes(report) == {"unused-config-keys", "scaling"}
        assert "left at their defaults" in finding(report, "unused-config-keys").message
        return
    found = finding(report, code)
    assert found.severity == severity and not report.ok
    assert "lora_quantum_folding, which peft 9.0.0 added" in found.message and "peft>=9.0.0" in found.fix


def test_a_setting_newer_than_peft_0_18_is_known_from_the_table(good, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    bdlora = {"nblocks": 1, "match_strict": False}  # BD-LoRA on no module: peft >= 0.19 computes plain LoRA
    config = tampered(good["lora-attention"], tmp_path / "a", config=lambda d: d.update(use_bdlora=bdlora))
    report = safemerge.doctor(str(good["base"]), str(config))
    if Version(peft.__version__) < Version("0.19"):
        found = finding(report, "newer-peft-setting")
        assert found.evidence == ('use_bdlora = {"nblocks": 1, "match_strict": false} (added in peft 0.19.0)',)
    else:  # this peft knows it
        assert report.ok and "use_bdlora" not in str(report.findings)


@pytest.mark.parametrize(("value", "severity"), [(True, "silent"), (None, "warning")])
def test_unknown_keys_of_a_newer_release(good, tmp_path: Path, value: object, severity: str) -> None:  # type: ignore[no-untyped-def]
    """Set, an unknown key of a config a newer peft wrote is likely one of its settings: silent; unset: a warning."""

    def future(data: dict) -> None:  # type: ignore[type-arg]
        data.update(peft_version="9.1.0", lora_quantum_folding=value)

    report = safemerge.doctor(str(good["base"]), str(tampered(good["lora-attention"], tmp_path / "a", config=future)))
    found = finding(report, "newer-peft-config")
    assert found.severity == severity and report.ok is (severity == "warning")
    assert "written by peft 9.1.0" in found.message and "peft>=9.1.0" in found.fix


def test_keys_peft_never_used_are_info_and_the_merge_runs(good, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A user's own keys and 0.2-era ones, with no peft_version: PEFT loads the file and computes the same."""

    def annotated(data: dict) -> None:  # type: ignore[type-arg]
        data.pop("peft_version", None)
        data.update(task="summaries", domain="legal", enable_lora=None, merge_weights=False)

    adapter = tampered(good["lora-attention"], tmp_path / "a", config=annotated)
    report = safemerge.doctor(str(good["base"]), str(adapter))
    found = finding(report, "unused-config-keys")
    assert report.ok and found.severity == "info"
    assert found.message.startswith("adapter_config.json has keys that peft ") and "None" not in found.message
    assert "task, domain, enable_lora, merge_weights" in found.message
    merged = safemerge.merge_pretrained(str(good["base"]), str(adapter), tmp_path / "m", policy="untie")
    assert merged.ok and merged.verified


def test_pickled_whole_model_bin(good: dict[str, Path], tmp_path: Path) -> None:
    target = tampered(good["lora-attention"], tmp_path / "a")
    (target / WEIGHTS).unlink()
    torch.save(torch.nn.Linear(2, 2), target / "adapter_model.bin")
    found = finding(safemerge.doctor(str(good["base"]), str(target)), "pickled-bin")
    assert found.severity == "error" and "save_pretrained" in found.fix


def test_weights_only_bin_is_read(good: dict[str, Path], tmp_path: Path) -> None:
    target = tampered(good["lora-attention"], tmp_path / "a")
    torch.save(load_file(target / WEIGHTS), target / "adapter_model.bin")
    (target / WEIGHTS).unlink()
    assert safemerge.doctor(str(good["base"]), str(target)).ok


def test_empty_adapter(good: dict[str, Path], tmp_path: Path) -> None:
    target = tampered(good["lora-attention"], tmp_path / "a", tensors=lambda t: {})
    assert finding(safemerge.doctor(str(good["base"]), str(target)), "empty-adapter").severity == "silent"


def test_zero3_placeholders(good: dict[str, Path], tmp_path: Path) -> None:
    target = tampered(good["lora-attention"], tmp_path / "a", tensors=lambda t: {k: torch.empty(0) for k in t})
    found = finding(safemerge.doctor(str(good["base"]), str(target)), "zero3-placeholders")
    assert found.severity == "error" and "stage3_gather_16bit_weights_on_model_save" in found.fix


@pytest.mark.parametrize(
    ("rename", "kind"),
    [
        (lambda k: k.removeprefix("base_model.model."), "missing prefix"),
        (lambda k: "base_model.model." + k, "doubled prefix"),
        (lambda k: "module." + k, "extra prefix"),
    ],
)
def test_wrong_key_prefix(good: dict[str, Path], tmp_path: Path, rename: Callable[[str], str], kind: str) -> None:
    target = tampered(good["lora-attention"], tmp_path / "a", tensors=lambda t: {rename(k): v for k, v in t.items()})
    report = safemerge.doctor(str(good["base"]), str(target))
    found = finding(report, "wrong-key-prefix")
    assert kind in found.message and found.severity == "silent" and "Rename the keys" in found.fix
    assert codes(report, "error", "silent") == {"wrong-key-prefix"}, "renamed keys must not also count as missing"


def test_adapter_name_baked_into_keys(good: dict[str, Path], tmp_path: Path) -> None:
    def bake(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {
            k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."): v for k, v in t.items()
        }

    report = safemerge.doctor(str(good["base"]), str(tampered(good["lora-attention"], tmp_path / "a", tensors=bake)))
    assert "'default'" in finding(report, "adapter-name-in-keys").message
    assert codes(report, "error", "silent") == {"adapter-name-in-keys"}


def test_non_peft_naming(good: dict[str, Path], tmp_path: Path) -> None:
    def kohya(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k.replace("lora_A", "lora_down").replace("lora_B", "lora_up"): v for k, v in t.items()}

    report = safemerge.doctor(str(good["base"]), str(tampered(good["lora-attention"], tmp_path / "a", tensors=kohya)))
    assert "lora_down -> lora_A" in finding(report, "non-peft-naming").fix


def test_merged_model_saved_as_adapter(good: dict[str, Path], tmp_path: Path) -> None:
    base_state = load_base(ARCHS["llama"], good["base"]).state_dict()
    target = tampered(
        good["lora-attention"],
        tmp_path / "a",
        tensors=lambda t: {k: v.clone() for k, v in base_state.items() if k != "lm_head.weight"},
    )
    found = finding(safemerge.doctor(str(good["base"]), str(target)), "base-weights-in-adapter")
    assert "no adapter tensors" in found.message and "from_pretrained" in found.fix


def test_full_peft_state_dict_saved_as_adapter(good: dict[str, Path], tmp_path: Path) -> None:
    """torch.save(peft_model.state_dict()) as the adapter: loading it overwrites the base weights."""
    model = peft.PeftModel.from_pretrained(load_base(ARCHS["llama"], good["base"]), good["lora-attention"])
    full = {k: v.clone() for k, v in model.state_dict().items() if "lm_head" not in k}
    target = tampered(good["lora-attention"], tmp_path / "a", tensors=lambda t: full)
    found = finding(safemerge.doctor(str(good["base"]), str(target)), "base-weights-in-adapter")
    assert "overwrite" in found.message or "writes them over" in found.message


def test_targets_absent_from_base(good: dict[str, Path], tmp_path: Path) -> None:
    target = tampered(good["lora-attention"], tmp_path / "a", config=lambda d: d.update(target_modules=["c_attn"]))
    found = finding(safemerge.doctor(str(good["base"]), str(target)), "targets-absent")
    assert found.severity == "error" and any("q_proj" in e for e in found.evidence)


def test_weights_for_untargeted_modules(good: dict[str, Path], tmp_path: Path) -> None:
    target = tampered(good["lora-attention"], tmp_path / "a", config=lambda d: d.update(target_modules=["q_proj"]))
    found = finding(safemerge.doctor(str(good["base"]), str(target)), "untargeted-weights")
    assert found.severity == "silent" and any("v_proj" in e for e in found.evidence)


def test_dora_flag_off(good: dict[str, Path], tmp_path: Path) -> None:
    target = tampered(good["dora-head"], tmp_path / "a", config=lambda d: d.update(use_dora=False))
    assert '"use_dora": true' in finding(safemerge.doctor(str(good["base"]), str(target)), "dora-flag-off").fix


def test_dora_magnitudes_missing(good: dict[str, Path], tmp_path: Path) -> None:
    target = tampered(good["lora-attention"], tmp_path / "a", config=lambda d: d.update(use_dora=True))
    assert finding(safemerge.doctor(str(good["base"]), str(target)), "dora-magnitudes-missing").severity == "silent"


def test_rank_differs_from_config(good: dict[str, Path], tmp_path: Path) -> None:
    target = tampered(good["lora-attention"], tmp_path / "a", config=lambda d: d.update(r=8))
    found = finding(safemerge.doctor(str(good["base"]), str(target)), "rank-mismatch")
    assert found.severity == "error" and '"r": 4' in found.fix and "ignore_mismatched_sizes" not in found.fix


def test_rank_pattern_given_when_ranks_differ(good: dict[str, Path], tmp_path: Path) -> None:
    def grow_q(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = dict(t)
        for k, v in t.items():
            if "q_proj.lora_A" in k:
                out[k] = torch.zeros(6, v.shape[1])
            if "q_proj.lora_B" in k:
                out[k] = torch.zeros(v.shape[0], 6)
        return out

    found = finding(
        safemerge.doctor(str(good["base"]), str(tampered(good["lora-attention"], tmp_path / "a", tensors=grow_q))),
        "rank-mismatch",
    )
    assert '"rank_pattern"' in found.fix and "q_proj" in found.fix


def _other_base(tmp_path: Path, **changes: object) -> Path:
    arch = ARCHS["llama"]
    config = arch.make_config()
    for key, value in changes.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    arch.model_class(config).save_pretrained(tmp_path / "other-base")
    return tmp_path / "other-base"


def test_deeper_and_shallower_base(good: dict[str, Path], tmp_path: Path) -> None:
    shallow = _other_base(tmp_path, num_hidden_layers=1)
    found = finding(safemerge.doctor(str(shallow), str(good["lora-attention"])), "deeper-base")
    assert "up to 1" in found.message and "only 1 layers" in found.message
    adapter_model(ARCHS["llama"], shallow, "lora-attention", tmp_path / "shallow-adapter")
    found = finding(safemerge.doctor(str(good["base"]), str(tmp_path / "shallow-adapter")), "shallower-base")
    assert found.severity == "silent"


def test_another_base_hidden_size(good: dict[str, Path], tmp_path: Path) -> None:
    other = _other_base(tmp_path, hidden_size=48, head_dim=12)
    found = finding(safemerge.doctor(str(other), str(good["lora-attention"])), "other-base")
    assert found.severity == "error" and "base_model_name_or_path" in found.fix


def test_resized_vocabulary(base_dirs: dict[str, Path], tmp_path: Path) -> None:
    arch: Arch = ARCHS["llama"]
    base = load_base(arch, base_dirs["llama"])
    base.resize_token_embeddings(VOCAB + 4)
    model = peft.get_peft_model(base, ADAPTERS["save-embed"](arch))
    perturb(model)
    model.save_pretrained(tmp_path / "a")
    report = safemerge.doctor(str(base_dirs["llama"]), str(tmp_path / "a"))
    found = finding(report, "resized-vocabulary")
    assert report.ok and found.severity == "info", "PEFT's own save of a resized vocabulary merges (issue 27)"
    assert f"resized from {VOCAB} to {VOCAB + 4} tokens" in found.message and "the merge resizes" in found.message
    assert found.fix == f"None needed: safemerge merge resizes the base to {VOCAB + 4} tokens itself, keeping its ties."


def _classifier_adapter(tmp_path: Path, base_dir: Path, num_labels: int) -> Path:
    import transformers

    base = transformers.AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=num_labels)
    base.config.pad_token_id = 0
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj"], task_type="SEQ_CLS"))
    perturb(model)
    model.save_pretrained(tmp_path / "cls")
    return tmp_path / "cls"


def test_classifier_head_size(base_dirs: dict[str, Path], tmp_path: Path) -> None:
    adapter = _classifier_adapter(tmp_path, base_dirs["llama-untied"], num_labels=5)
    found = finding(safemerge.doctor(str(base_dirs["llama-untied"]), str(adapter)), "num-labels")
    assert "num_labels=5" in found.fix


def test_head_neither_checkpoint_nor_adapter_provides(base_dirs: dict[str, Path], tmp_path: Path) -> None:
    adapter = _classifier_adapter(tmp_path, base_dirs["llama-untied"], num_labels=2)

    def drop_head(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v for k, v in t.items() if "score" not in k}

    target = tampered(adapter, tmp_path / "no-head", config=lambda d: d.update(modules_to_save=None), tensors=drop_head)
    found = finding(safemerge.doctor(str(base_dirs["llama-untied"]), str(target)), "random-head")
    assert "score.weight" in found.message and found.severity == "silent"


def test_recorded_base_name_differs(good: dict[str, Path], tmp_path: Path) -> None:
    target = tampered(
        good["lora-attention"],
        tmp_path / "a",
        config=lambda d: d.update(base_model_name_or_path="meta-llama/Llama-3.2-1B"),
    )
    report = safemerge.doctor(str(good["base"]), str(target))
    assert finding(report, "other-base-name").severity == "warning" and report.ok


def test_base_as_model_object(good: dict[str, Path]) -> None:
    base = load_base(ARCHS["llama"], good["base"])
    before = {k: v.clone() for k, v in base.state_dict().items()}
    assert safemerge.doctor(base, str(good["save-head"])).ok
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items()), "the base object is untouched"
    assert not any("lora" in n for n, _ in base.named_modules())


def test_cli_doctor_exit_codes(good: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor", str(good["base"]), str(good["lora-attention"])]) == 0
    assert "fits" in capsys.readouterr().out
    target = tampered(good["lora-attention"], tmp_path / "a", config=lambda d: d.update(r=8))
    assert main(["doctor", str(good["base"]), str(target), "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is False and data["findings"][0]["code"] == "rank-mismatch"


def test_merge_runs_the_doctor_first(good: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tampered(good["lora-attention"], tmp_path / "a", config=lambda d: d.update(r=8))
    assert main(["merge", str(good["base"]), str(target), str(tmp_path / "out"), "--policy", "keep"]) == 1
    err = capsys.readouterr().err
    assert "AdapterMismatchError" in err and '"r": 4' in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(safemerge.AdapterMismatchError) as info:
        safemerge.merge_pretrained(str(good["base"]), str(target), tmp_path / "out", policy="keep")
    assert not info.value.report.ok
