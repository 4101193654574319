"""merge_pretrained(low_memory=True): the outcome of the in-memory merge on every row of the matrix, tensor for
tensor, with the base's weights left on disk."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from safetensors.torch import load_file

import safemerge
from safemerge import _pretrained
from safemerge._engines import low_memory
from safemerge._model import compat as _compat
from safemerge._model import distances as _distances
from safemerge._model import rows as _rows
from safemerge._model.reload import fingerprint
from safemerge._model.rows import Rows
from safemerge._model.walk import tie_flags
from tests.models import ADAPTERS, ARCHS, load_base, needs_low_memory, perturb
from tests.test_merge import CASES, MERGES, POLICIES, STACK, expected

#: The default run's rows; --full-matrix runs every (architecture, adapter kind) on both stacks (CI).
QUICK = [
    ("llama", "lora-both"),
    ("llama", "lora-both-ensure-tying"),
    ("llama", "dora-head"),
    ("gpt2", "save-head"),
    ("t5", "trainable-token-indices"),
]


#: Rows whose saved adapter the doctor stops before anything is loaded: PEFT 0.21 with ensure_weight_tying saves
#: the tied embeddings' LoRA under names its own loader ignores (FACTS: T5's `target_modules=["shared"]`).
DOCTOR_REFUSES = {
    ("transformers5", arch, kind)
    for arch, kind in [
        ("gpt2", "lora-both-ensure-tying"),
        ("t5", "lora-both-ensure-tying"),
        ("bart", "lora-both-ensure-tying"),
        ("t5", "save-embed-ensure-tying"),
        ("bart", "save-embed-ensure-tying"),
    ]
}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if metafunc.definition.name == "test_low_memory_matches_in_memory":
        rows = CASES if metafunc.config.getoption("--full-matrix") else QUICK
        metafunc.parametrize(("arch", "kind"), rows)


@needs_low_memory
@pytest.mark.parametrize("policy", POLICIES)
def test_low_memory_matches_in_memory(
    base_dirs: dict[str, Path],
    saved_adapter: Callable[[str, str], Path],
    tmp_path: Path,
    arch: str,
    kind: str,
    policy: str,
) -> None:
    """Both engines merge, or both stop with the same error; merged, their models are equal tensor for tensor.

    Each row's outcome is pinned: the doctor (which merge_pretrained runs first) refuses the DOCTOR_REFUSES rows, the
    policy refuses where tests/test_merge.py's category does not merge, and every other row merges.
    """
    category, why = expected(arch, kind, "reloaded")
    if category == "unbuildable":
        with pytest.raises((ValueError, AttributeError), match=why):
            saved_adapter(arch, kind)
        return
    base, adapter = str(base_dirs[arch]), str(saved_adapter(arch, kind))
    in_memory, low = tmp_path / "in-memory", tmp_path / "low-memory"
    refusal = (
        (safemerge.AdapterMismatchError, r"does not fit the base \(doctor: .*\); nothing was loaded")
        if (STACK, arch, kind) in DOCTOR_REFUSES
        else (safemerge.TiedWeightsError, r"does not merge this model: .* Fix: ")
        if not merges(category, policy)
        else None
    )
    if refusal is not None:
        with pytest.raises(refusal[0], match=refusal[1]) as refused:
            safemerge.merge_pretrained(base, adapter, in_memory, policy=policy)
        with pytest.raises(refusal[0]) as refused_low:
            safemerge.merge_pretrained(base, adapter, low, policy=policy, low_memory=True)
        assert str(refused_low.value) == str(refused.value)
        assert not low.exists() and not list(tmp_path.glob(".low-memory*")), "a refusal writes nothing"
        return
    report = safemerge.merge_pretrained(base, adapter, in_memory, policy=policy)
    assert merges(category, policy)
    low_report = safemerge.merge_pretrained(base, adapter, low, policy=policy, low_memory=True, max_shard_size="20KB")
    assert low_report.ok and low_report.verified and low_report.model is None
    assert low_report.plan == report.plan
    assert low_report.verification is not None and low_report.verification.reloaded_tensors_compared > 0
    want, got = load_base(ARCHS[arch], in_memory), load_base(ARCHS[arch], low)
    want_state, got_state = want.state_dict(), got.state_dict()
    assert set(got_state) == set(want_state)
    different = [name for name in want_state if not torch.equal(got_state[name], want_state[name])]
    assert not different, f"the low-memory output differs from the in-memory output in {different}"
    assert tie_flags(got.config) == tie_flags(want.config)


def merges(category: str, policy: str) -> bool:
    return category in MERGES and MERGES[category][POLICIES.index(policy)]


@needs_low_memory
def test_low_memory_output_is_sharded_with_an_index(
    base_dirs: dict[str, Path], saved_adapter: Callable[[str, str], Path], tmp_path: Path
) -> None:
    out = tmp_path / "merged"
    safemerge.merge_pretrained(
        str(base_dirs["llama"]),
        str(saved_adapter("llama", "lora-both")),
        out,
        policy="untie",
        low_memory=True,
        max_shard_size="20KB",
    )
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and sorted(set(index["weight_map"].values())) == shards
    assert {"config.json", "generation_config.json"} <= {p.name for p in out.iterdir()}
    assert not list(tmp_path.glob(".merged*")), "the temporary sibling (offload folder included) is removed"


@needs_low_memory
def test_low_memory_takes_no_device_map(
    base_dirs: dict[str, Path], saved_adapter: Callable[[str, str], Path], tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match="takes no device_map"):
        safemerge.merge_pretrained(
            str(base_dirs["llama"]),
            str(saved_adapter("llama", "lora-both")),
            tmp_path / "merged",
            policy="untie",
            low_memory=True,
            device_map="cpu",
        )
    assert not (tmp_path / "merged").exists()


@needs_low_memory
def test_a_tensor_that_differs_on_disk_from_what_was_computed_fails_verification(
    base_dirs: dict[str, Path],
    saved_adapter: Callable[[str, str], Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every written tensor is read back: a byte changed on disk after the write (a faulty disk, a concurrent
    writer) fails the merge, and the files are quarantined."""
    write = low_memory.write

    def write_then_damage(*args: Any, **kwargs: Any) -> Any:
        written = write(*args, **kwargs)
        shard = sorted(Path(args[2]).glob("*.safetensors"))[-1]
        data = bytearray(shard.read_bytes())
        data[-1] ^= 0xFF  # the last byte of the last tensor
        shard.write_bytes(bytes(data))
        return written

    monkeypatch.setattr(low_memory, "write", write_then_damage)
    out = tmp_path / "merged"
    damaged = r"written \S+: values differ \(not bit-identical\)"
    with pytest.raises(safemerge.VerificationError, match=damaged) as failed:
        safemerge.merge_pretrained(
            str(base_dirs["llama"]), str(saved_adapter("llama", "lora-both")), out, policy="untie", low_memory=True
        )
    assert not out.exists()
    (quarantined,) = tmp_path.glob("merged.failed-*")
    assert failed.value.report is not None and str(quarantined) in str(failed.value)


@needs_low_memory
@pytest.mark.parametrize("kind", ["lora-both", "lora-both-ensure-tying"])
def test_no_tied_weight_is_held_whole(
    base_dirs: dict[str, Path],
    saved_adapter: Callable[[str, str], Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    kind: str,
) -> None:
    """The tied members' merged values (LoRA's W + B @ A) are analysed, checked and written a block of rows at a
    time: nothing in a low-memory merge computes one whole, which is what bounds its memory (the benchmark measures
    the figure). Under `keep` where it merges (one shared value: ensure_weight_tying on peft >= 0.19), else `untie`."""
    category, _ = expected("llama", kind, "reloaded")
    policy = next(policy for policy in ("keep", "untie") if merges(category, policy))

    def whole(rows: Rows, device: torch.device | None = None) -> torch.Tensor:
        raise AssertionError(f"a {tuple(rows.shape)} value was computed whole")

    monkeypatch.setattr(Rows, "materialise", whole)
    monkeypatch.setattr(_distances, "whole_of", whole)  # the in-memory engine's analysis keeps them whole
    base, adapter = str(base_dirs["llama"]), str(saved_adapter("llama", kind))
    report = safemerge.merge_pretrained(base, adapter, tmp_path / "low", policy=policy, low_memory=True)
    assert report.ok and report.verified
    with pytest.raises(AssertionError, match="computed whole"):  # the in-memory engine puts them in the model whole
        safemerge.merge_pretrained(base, adapter, tmp_path / "in-memory", policy=policy)


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int8, torch.bool]
)
def test_a_streamed_shard_is_what_safetensors_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype
) -> None:
    """The shards are written by hand, a block of rows at a time: safetensors' own reader loads them as the tensors
    they were computed from, and their fingerprints are those of the tensors."""
    monkeypatch.setattr(_rows, "BLOCK", 64)  # several blocks per matrix
    generator = torch.Generator().manual_seed(0)
    tensors = {
        name: (torch.randn(shape, generator=generator) * 50).to(dtype)
        for name, shape in {
            "matrix": (37, 11),
            "cube": (5, 4, 9),
            "vector": (13,),
            "scalar": (),
            "empty": (0, 3),
        }.items()
    }
    shard = tmp_path / "model.safetensors"
    with shard.open("wb") as file:
        file.write(low_memory._header(tensors))
        written = {
            name: low_memory._stream_tensor(file, name, tensor, dtype, lambda name, rows: None)
            for name, tensor in tensors.items()
        }
    loaded = load_file(str(shard))
    assert set(loaded) == set(tensors) and all(torch.equal(loaded[n], t) for n, t in tensors.items())
    assert written == {name: fingerprint(tensor) for name, tensor in tensors.items()} == low_memory.reread(tmp_path)


@needs_low_memory
@pytest.mark.parametrize("arch", ["llama", "llama-untied"])
def test_base_weights_saved_in_the_adapter_are_loaded_as_peft_loads_them(
    base_dirs: dict[str, Path], tmp_path: Path, arch: str
) -> None:
    """PEFT saves an adapted embedding's base weight in the adapter (save_embedding_layers) and loads it over the
    base's: the low-memory engine copies it in a block of rows at a time (loading an offloaded module for it), with
    the same outcome."""
    model = load_base(ARCHS[arch], base_dirs[arch])
    with torch.no_grad():  # fine-tuned on a base whose embeddings differ from the checkpoint's
        model.get_input_embeddings().weight.mul_(50.0)
        if not ARCHS[arch].tied:
            model.get_output_embeddings().weight.mul_(50.0)
    trained = peft.get_peft_model(model, ADAPTERS["lora-both"](ARCHS[arch]))
    perturb(trained)
    trained.save_pretrained(tmp_path / "adapter")
    base, adapter = str(base_dirs[arch]), str(tmp_path / "adapter")
    safemerge.merge_pretrained(base, adapter, tmp_path / "in-memory", policy="untie")
    safemerge.merge_pretrained(base, adapter, tmp_path / "low", policy="untie", low_memory=True)
    want, got = (load_file(str(tmp_path / out / "model.safetensors")) for out in ("in-memory", "low"))
    assert set(got) == set(want) and all(torch.equal(got[name], want[name]) for name in want)
    original = load_file(str(base_dirs[arch] / "model.safetensors"))
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        merged, weight = got[name], original.get(name, original["model.embed_tokens.weight"])
        assert (merged - 50 * weight).abs().max() < (merged - weight).abs().max(), f"{name}: the adapter's copy"


@pytest.mark.skipif(_compat.low_memory_unsupported() is None, reason="accelerate is recent enough: nothing to refuse")
def test_an_accelerate_too_old_for_low_memory_is_refused_before_loading(
    base_dirs: dict[str, Path], saved_adapter: Callable[[str, str], Path], tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match=r"needs accelerate >= .* Fix: pip install -U"):
        safemerge.merge_pretrained(
            str(base_dirs["llama"]),
            str(saved_adapter("llama", "lora-both")),
            tmp_path / "m",
            policy="untie",
            low_memory=True,
        )
    assert not (tmp_path / "m").exists()


def test_the_mmap_threshold_is_put_back_when_the_context_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    """mallopt has no getter: the calls made through our one wrapper are what changes glibc's setting."""
    calls: list[int] = []
    monkeypatch.setattr(low_memory, "_set_mmap_threshold", calls.append)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    with pytest.raises(KeyError), low_memory.freed_memory_returned():
        assert calls == [1 << 20]
        raise KeyError("a merge that fails")
    assert calls == [1 << 20, 128 * 1024], "glibc's default, also after a failure"
    calls.clear()
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.check=0:glibc.malloc.mmap_threshold=0x40000")
    with low_memory.freed_memory_returned():
        pass
    assert calls == [1 << 20, 0x40000], "the value the process started with"
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    with low_memory.freed_memory_returned():
        pass
    assert calls[-1] == 65536


@needs_low_memory
@pytest.mark.parametrize("policy", ["untie", "keep"])
def test_a_low_memory_merge_sets_the_threshold_only_while_it_runs(
    base_dirs: dict[str, Path],
    saved_adapter: Callable[[str, str], Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    policy: str,
) -> None:
    """Set before the model is loaded, put back when the merge ends, whether it merged or was refused."""
    calls: list[object] = []
    monkeypatch.setattr(low_memory, "_set_mmap_threshold", calls.append)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    load = _pretrained.load_inputs
    monkeypatch.setattr(_pretrained, "load_inputs", lambda *a, **k: calls.append("load") or load(*a, **k))
    arguments = (str(base_dirs["llama"]), str(saved_adapter("llama", "lora-both")), tmp_path / "merged")
    if policy == "keep":
        with pytest.raises(safemerge.TiedWeightsError, match="Fix: use policy='untie'"):
            safemerge.merge_pretrained(*arguments, policy=policy, low_memory=True)
    else:
        safemerge.merge_pretrained(*arguments, policy=policy, low_memory=True)
    assert calls == [1 << 20, "load", 128 * 1024]
