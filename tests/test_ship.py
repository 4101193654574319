"""What comes out can ship: the tokenizer and the fine-tune's chat template travel with the merged weights, and a
model card says what was done."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import peft
import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

import safemerge
from safemerge._checks import verify as _verify
from safemerge._engines import in_memory
from safemerge.cli import main
from tests.models import ARCHS, load_base, needs_low_memory, perturb

#: merge_pretrained(low_memory=...) of both engines.
ENGINES = [False, pytest.param(True, marks=needs_low_memory)]

#: The fine-tune's template: differs from the base's, so the test can tell which one travelled.
FINE_TUNE_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
BASE_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


def tokenizer(vocab_size: int, template: str | None) -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer of `vocab_size` tokens, built offline."""
    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, vocab_size)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    made = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    made.chat_template = template
    return made


@pytest.fixture
def base_and_adapter(
    base_dirs: dict[str, Path], saved_adapter: Callable[[str, str], Path], tmp_path: Path
) -> tuple[Path, Path]:
    """Copies of the llama base (with a tokenizer) and of a lora-both adapter (without one)."""
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    shutil.copytree(base_dirs["llama"], base)
    shutil.copytree(saved_adapter("llama", "lora-both"), adapter)
    vocab = load_base(ARCHS["llama"], base).config.vocab_size
    tokenizer(vocab, BASE_TEMPLATE).save_pretrained(base)
    return base, adapter


@pytest.mark.parametrize(
    "low_memory", [False, pytest.param(True, marks=needs_low_memory)], ids=["in-memory", "low-memory"]
)
def test_the_fine_tunes_tokenizer_and_chat_template_travel_with_the_merge(
    base_and_adapter: tuple[Path, Path], tmp_path: Path, low_memory: bool
) -> None:
    base, adapter = base_and_adapter
    vocab = load_base(ARCHS["llama"], base).config.vocab_size
    tokenizer(vocab, FINE_TUNE_TEMPLATE).save_pretrained(adapter)  # saved with the fine-tune: this one counts
    out = tmp_path / "merged"
    report = safemerge.merge_pretrained(str(base), str(adapter), out, policy="untie", low_memory=low_memory)
    assert [a.code for a in report.actions][-3:] == ["save-tokenizer", "write-card", "save"]
    loaded = transformers.AutoTokenizer.from_pretrained(out)
    rendered = loaded.apply_chat_template([{"role": "user", "content": "w1 w2"}], tokenize=False)
    assert rendered == "<|user|>w1 w2\n"
    transformers.AutoModelForCausalLM.from_pretrained(out)  # loads as it is
    card = (out / "README.md").read_text()
    assert "library_name: transformers" in card and "safemerge" in card
    assert "tie policy `untie`" in card and "own-tensors" in card
    assert report.verification is not None and f"{report.verification.reloaded_tensors_compared} tensors" in card


def test_without_a_tokenizer_in_the_adapter_the_base_one_is_saved(
    base_and_adapter: tuple[Path, Path], tmp_path: Path
) -> None:
    base, adapter = base_and_adapter
    out = tmp_path / "merged"
    safemerge.merge_pretrained(str(base), str(adapter), out, policy="untie")
    rendered = transformers.AutoTokenizer.from_pretrained(out).apply_chat_template(
        [{"role": "user", "content": "w1"}], tokenize=False
    )
    assert rendered == "w1"


def test_a_damaged_tokenizer_stops_the_merge_before_anything_is_loaded(
    base_and_adapter: tuple[Path, Path], tmp_path: Path
) -> None:
    base, adapter = base_and_adapter
    (adapter / "tokenizer_config.json").write_text("{not json")
    out = tmp_path / "merged"
    with pytest.raises(safemerge.InputError, match=r"Could not load the tokenizer saved in .*adapter.*Fix: save"):
        safemerge.merge_pretrained(str(base), str(adapter), out, policy="untie")
    assert not out.exists()


def test_safe_merge_saves_the_tokenizer_it_is_given_and_a_card(
    make_adapter_model: Callable[[str, str], object], tmp_path: Path
) -> None:
    model = make_adapter_model("llama", "lora-both")
    vocab = model.get_base_model().config.vocab_size  # type: ignore[attr-defined]
    out = tmp_path / "merged"
    safemerge.safe_merge(model, out, policy="untie", tokenizer=tokenizer(vocab, FINE_TUNE_TEMPLATE))
    assert transformers.AutoTokenizer.from_pretrained(out).chat_template == FINE_TUNE_TEMPLATE
    assert "library_name: transformers" in (out / "README.md").read_text()


def test_without_any_tokenizer_the_card_says_so(
    base_dirs: dict[str, Path], saved_adapter: Callable[[str, str], Path], tmp_path: Path
) -> None:
    out = tmp_path / "merged"
    safemerge.merge_pretrained(str(base_dirs["llama"]), str(saved_adapter("llama", "lora-both")), out, policy="untie")
    assert "none was found or given" in (out / "README.md").read_text()
    assert not (out / "tokenizer_config.json").exists()


def test_an_untied_gemma2_merge_says_where_it_will_not_run(tmp_path: Path) -> None:
    """vLLM 0.33.0 refuses to load a Gemma2 checkpoint with a head of its own, llama.cpp's converter drops it
    (safemerge._decide.serving.SERVING_RULES): the report and the card say so."""
    config = transformers.Gemma2Config(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    transformers.Gemma2ForCausalLM(config).save_pretrained(tmp_path / "base")
    base = transformers.Gemma2ForCausalLM.from_pretrained(tmp_path / "base")
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["embed_tokens", "lm_head"]))
    perturb(model)
    report = safemerge.safe_merge(model, tmp_path / "merged", policy="untie")
    vllm, llama_cpp = report.serving_notes
    assert "vLLM (vllm==0.33.0) refuses to load (or convert) a gemma2 checkpoint" in vllm
    assert "llama.cpp (llama-cpp-python==0.3.36) computes gemma2 logits with the input embedding" in llama_cpp
    assert all("Fix: no policy merges it tied" in note for note in report.serving_notes)
    assert vllm in (tmp_path / "merged" / "README.md").read_text()
    assert report.to_dict()["serving_notes"] == [vllm, llama_cpp]


def test_an_untied_llama_merge_has_no_serving_note(
    make_adapter_model: Callable[[str, str], object], tmp_path: Path
) -> None:
    report = safemerge.safe_merge(make_adapter_model("llama", "lora-both"), tmp_path / "merged", policy="untie")
    assert report.plan.tie_flags == (("tie_word_embeddings", False),) and report.serving_notes == ()


@pytest.fixture
def bf16_base(base_dirs: dict[str, Path], tmp_path: Path) -> Path:
    """The llama base saved in bfloat16."""
    directory = tmp_path / "base-bf16"
    load_base(ARCHS["llama"], base_dirs["llama"]).to(torch.bfloat16).save_pretrained(directory)
    return directory


@pytest.mark.parametrize(
    "low_memory", [False, pytest.param(True, marks=needs_low_memory)], ids=["in-memory", "low-memory"]
)
@pytest.mark.parametrize(
    ("dtype", "out_dtype", "saved"),
    [
        (None, None, torch.bfloat16),  # the checkpoint's own dtype, in and out
        ("float32", None, torch.bfloat16),  # computed in float32, saved as the checkpoint was (rounded once)
        (None, "float32", torch.float32),  # asked for
    ],
)
def test_the_saved_dtype_is_the_checkpoints_unless_asked(
    bf16_base: Path,
    saved_adapter: Callable[[str, str], Path],
    tmp_path: Path,
    low_memory: bool,
    dtype: str | None,
    out_dtype: str | None,
    saved: torch.dtype,
) -> None:
    out = tmp_path / "merged"
    adapter = str(saved_adapter("llama", "lora-both"))
    report = safemerge.merge_pretrained(
        str(bf16_base), adapter, out, policy="untie", dtype=dtype, out_dtype=out_dtype, low_memory=low_memory
    )
    assert report.ok and report.verified
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert {p.dtype for p in reloaded.parameters()} == {saved}
    computed = torch.float32 if dtype == "float32" else torch.bfloat16
    assert ("cast-dtype" in [a.code for a in report.actions]) is (computed != saved)


class FakeHub:
    """huggingface_hub's HfApi at its API boundary: the hub cannot be reached from the tests, so its two calls
    (create_repo, upload_folder) are recorded here with what the folder held when it was uploaded."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, object]]] = []
        #: What upload_folder raises (None: it succeeds).
        self.upload_fails: Exception | None = None

    def create_repo(self, repo_id: str, **kwargs: object) -> str:
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs: object) -> None:
        files = sorted(p.name for p in Path(str(kwargs["folder_path"])).iterdir())
        self.calls.append(("upload_folder", {**kwargs, "files": files}))
        if self.upload_fails is not None:
            raise self.upload_fails


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> FakeHub:
    import huggingface_hub

    fake = FakeHub()
    monkeypatch.setattr(
        huggingface_hub.HfApi,
        "create_repo",
        lambda self, repo_id, **kw: fake.create_repo(repo_id, token=self.token, **kw),
    )
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda self, **kw: fake.upload_folder(**kw))
    return fake


def test_push_to_hub_uploads_the_verified_directory_with_its_card(
    base_and_adapter: tuple[Path, Path], tmp_path: Path, hub: FakeHub
) -> None:
    base, adapter = base_and_adapter
    out = tmp_path / "merged"
    argv = [str(base), str(adapter), str(out), "--policy", "untie", "--push-to-hub", "me/merged", "--private", "-q"]
    assert main(["merge", *argv]) == 0
    (create, created), (upload, uploaded) = hub.calls
    assert (create, created["repo_id"], created["private"]) == ("create_repo", "me/merged", True)
    assert upload == "upload_folder" and uploaded["repo_id"] == "me/merged"
    assert Path(str(uploaded["folder_path"])) == out.resolve()
    assert {"README.md", "config.json", "model.safetensors", "tokenizer_config.json"} <= set(uploaded["files"])  # type: ignore[arg-type]


def test_a_failed_upload_keeps_the_verified_merge_and_its_report(
    base_and_adapter: tuple[Path, Path], tmp_path: Path, hub: FakeHub
) -> None:
    """The merge is in place and verified before the upload: a failed upload says so, with the fix, and carries the
    merge's report; the token given is the one the upload uses."""
    base, adapter = base_and_adapter
    hub.upload_fails = ConnectionError("the hub cannot be reached")
    out = tmp_path / "merged"
    with pytest.raises(safemerge.UploadError, match=r"verified and saved in .*Fix: .*hf upload me/merged") as failed:
        safemerge.merge_pretrained(
            str(base), str(adapter), out, policy="untie", push_to_hub="me/merged", token="hf_given"
        )
    assert failed.value.report.ok and failed.value.report.verified
    assert (out / "config.json").is_file() and (out / "README.md").is_file()
    assert hub.calls[0][1]["token"] == "hf_given"
    report = safemerge.errors.failure_report(failed.value)
    assert report["outcome"] == "upload-failed" and report["ok"] is True


def test_nothing_is_pushed_unless_verified(
    base_and_adapter: tuple[Path, Path], tmp_path: Path, hub: FakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, adapter = base_and_adapter
    with pytest.raises(ValueError, match="uploads only a verified merge"):
        safemerge.merge_pretrained(
            str(base), str(adapter), tmp_path / "a", policy="untie", verify=False, push_to_hub="me/m"
        )
    monkeypatch.setitem(in_memory._STEPS, "set-tie-flags", lambda *args: None)  # an engine that strays: not faithful
    with pytest.raises(safemerge.VerificationError):
        safemerge.merge_pretrained(str(base), str(adapter), tmp_path / "b", policy="untie", push_to_hub="me/m")
    assert hub.calls == []


CUSTOM_CONFIG = """from transformers import LlamaConfig


class TinyCustomConfig(LlamaConfig):
    model_type = "tinycustom"
"""


def test_a_base_with_its_own_code_needs_trust_remote_code(
    base_dirs: dict[str, Path],
    saved_adapter: Callable[[str, str], Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A repository's own code runs only when asked (--trust-remote-code): the doctor cannot read the base without."""
    base = tmp_path / "custom"
    shutil.copytree(base_dirs["llama"], base)
    (base / "configuration_tiny.py").write_text(CUSTOM_CONFIG)
    config = json.loads((base / "config.json").read_text())
    config |= {"model_type": "tinycustom", "auto_map": {"AutoConfig": "configuration_tiny.TinyCustomConfig"}}
    (base / "config.json").write_text(json.dumps(config))
    adapter = str(saved_adapter("llama", "lora-attention"))
    argv = ["merge", str(base), adapter, str(tmp_path / "merged"), "--policy", "keep", "-q"]
    assert main(argv) == 2  # the doctor: base-not-found (a usage error): its config class is the repository's code
    assert "CLI: --trust-remote-code" in capsys.readouterr().err
    assert not (tmp_path / "merged").exists()
    assert main([*argv, "--trust-remote-code"]) == 0


def test_a_hub_adapter_is_fetched_with_snapshot_download_at_its_revision(
    base_dirs: dict[str, Path], saved_adapter: Callable[[str, str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """huggingface_hub's API boundary (the hub cannot be reached from the tests): the doctor asks snapshot_download
    for the adapter's config and weights only, at the adapter's revision, with the token."""
    import huggingface_hub

    asked: list[tuple[str, dict[str, object]]] = []

    def snapshot_download(repo_id: str, **kwargs: object) -> str:
        asked.append((repo_id, kwargs))
        return str(saved_adapter("llama", "lora-both"))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    report = safemerge.doctor(str(base_dirs["llama"]), "org/adapter", adapter_revision="v2", token="hf_x")
    assert report.ok
    ((repo_id, kwargs),) = asked
    assert repo_id == "org/adapter" and kwargs["revision"] == "v2" and kwargs["token"] == "hf_x"
    assert set(kwargs["allow_patterns"]) == {"adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"}  # type: ignore[arg-type]


def test_a_hub_bases_tensor_names_come_from_its_safetensors_headers(monkeypatch: pytest.MonkeyPatch) -> None:
    """huggingface_hub's API boundary: get_safetensors_metadata reads the headers, no weights are downloaded."""
    import huggingface_hub

    from safemerge._doctor.base_config import hub_checkpoint_keys

    class Metadata:
        weight_map: ClassVar[dict[str, str]] = {
            "model.embed_tokens.weight": "model.safetensors",
            "lm_head.weight": "model.safetensors",
        }

    asked: list[dict[str, object]] = []
    monkeypatch.setattr(
        huggingface_hub, "get_safetensors_metadata", lambda repo_id, **kw: asked.append(kw) or Metadata()
    )
    keys = hub_checkpoint_keys("org/base", revision="main", token=None)
    assert keys == {"model.embed_tokens.weight", "lm_head.weight"} and asked == [{"revision": "main", "token": None}]


def test_the_device_map_is_honoured_for_the_merge_and_the_reload(
    base_dirs: dict[str, Path],
    saved_adapter: Callable[[str, str], Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """--device-map loads the base through accelerate, and the verification's reload is spread the same way (what
    transformers records of the map: transformers 4 keeps it as hf_device_map; transformers 5 on one device does not).
    """
    adapter, device_map = str(saved_adapter("llama", "lora-both")), {"model": "cpu", "lm_head": "cpu"}
    reloaded_with: list[object] = []
    real_reload = _verify.reload
    monkeypatch.setattr(_verify, "reload", lambda *a, **kw: reloaded_with.append(kw["like"]) or real_reload(*a, **kw))
    report = safemerge.merge_pretrained(
        str(base_dirs["llama"]), adapter, tmp_path / "merged", policy="untie", device_map=device_map
    )
    assert report.ok and report.verified
    loaded = transformers.AutoModelForCausalLM.from_pretrained(base_dirs["llama"], device_map=device_map)
    assert getattr(report.model, "hf_device_map", None) == getattr(loaded, "hf_device_map", None)
    (spec,) = reloaded_with  # the verification's reload: spread as transformers recorded the merge's map
    assert getattr(spec, "device_map", None) == getattr(loaded, "hf_device_map", None)


def test_a_hub_adapter_without_a_tokenizer_falls_back_to_the_base(base_and_adapter: tuple[Path, Path]) -> None:
    """An adapter repository often holds no tokenizer: the base's is used. The hub cannot be reached from the
    tests, so the adapter is a hub id in huggingface_hub's offline mode, where it has no tokenizer either."""
    base, _ = base_and_adapter
    code = (
        "import sys\n"
        "from safemerge._output.ship import find_tokenizer\n"
        "tokenizer, source = find_tokenizer([('org/adapter-without-tokenizer', {}), (sys.argv[1], {})])\n"
        "assert source == sys.argv[1] and tokenizer.chat_template is not None, source\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code, str(base)], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("option", ["dtype", "out_dtype"])
def test_a_bad_dtype_is_refused_before_anything_runs(
    base_and_adapter: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, option: str
) -> None:
    from safemerge import _pretrained

    def doctor_ran(*args: object, **kwargs: object) -> None:
        raise AssertionError("the doctor ran before the dtype was checked")

    monkeypatch.setattr(_pretrained, "doctor", doctor_ran)
    base, adapter = base_and_adapter
    with pytest.raises(ValueError, match=r"'int8' is not a floating-point torch dtype. Use one of: float32"):
        safemerge.merge_pretrained(str(base), str(adapter), tmp_path / "m", policy="untie", **{option: "int8"})
    assert not (tmp_path / "m").exists()


def hub_cache_snapshot(source: Path, cache: Path, repo_id: str) -> Path:
    """A copy of `source` where huggingface_hub's cache keeps a snapshot of `repo_id`."""
    snapshot = cache / f"models--{repo_id.replace('/', '--')}" / "snapshots" / ("0123abcd" * 5)
    shutil.copytree(source, snapshot)
    return snapshot


def card_of(out: Path) -> tuple[str, str | None]:
    """The card's text and its base_model metadata."""
    from huggingface_hub import ModelCard

    card = ModelCard.load(out / "README.md")
    return card.content, card.data.base_model


@pytest.mark.parametrize("low_memory", ENGINES, ids=["in-memory", "low-memory"])
def test_the_card_names_hub_snapshots_by_their_id_and_no_local_path(
    base_and_adapter: tuple[Path, Path], tmp_path: Path, low_memory: bool
) -> None:
    base, adapter = base_and_adapter
    cache = tmp_path / "hf-cache" / "hub"
    base, adapter = hub_cache_snapshot(base, cache, "org/tiny-llama"), hub_cache_snapshot(adapter, cache, "me/tuned")
    out = tmp_path / "merged"
    safemerge.merge_pretrained(str(base), str(adapter), out, policy="untie", low_memory=low_memory)
    text, base_model = card_of(out)
    assert base_model == "org/tiny-llama"
    assert "# me/tuned merged into org/tiny-llama" in text
    assert str(tmp_path) not in text, "the card publishes no local directory"


def test_the_card_names_a_local_base_by_its_directory_or_its_recorded_hub_id(
    base_and_adapter: tuple[Path, Path], tmp_path: Path
) -> None:
    base, adapter = base_and_adapter
    safemerge.merge_pretrained(str(base), str(adapter), tmp_path / "plain", policy="untie")
    text, base_model = card_of(tmp_path / "plain")
    assert base_model is None and "# adapter merged into base" in text and str(tmp_path) not in text
    # A checkpoint saved by an older transformers records the hub id it came from.
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "_name_or_path": "org/tiny-llama"}))
    safemerge.merge_pretrained(str(base), str(adapter), tmp_path / "recorded", policy="untie")
    text, base_model = card_of(tmp_path / "recorded")
    assert base_model == "org/tiny-llama" and "# adapter merged into org/tiny-llama" in text
    assert str(tmp_path) not in text


def test_safe_merge_cards_name_the_base_peft_recorded_without_its_path(
    make_adapter_model: Callable[[str, str], object], base_dirs: dict[str, Path], tmp_path: Path
) -> None:
    model = make_adapter_model("llama", "lora-both")
    safemerge.safe_merge(model, tmp_path / "merged", policy="untie")
    text, base_model = card_of(tmp_path / "merged")
    assert base_model is None and "# Adapter merged into llama" in text
    assert str(base_dirs["llama"]) not in text and str(tmp_path) not in text
