"""The catalogue of bad inputs, misuses and injected faults: each gets its documented exit code and a clear message,
writes nothing at OUT, changes no input file (hashes before and after), and leaves no temporary file behind.

Faults are real: damaged files on disk, signals to a real `safemerge` process, a file-size limit that makes a write
fail half-way (EFBIG, as a full disk would), a location the kernel refuses (/proc), two runs at once.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from safemerge._output import claim as _output
from safemerge._output.claim import work_directory
from safemerge.cli import main
from tests.models import ARCHS, needs_low_memory, save_adapter

WEIGHTS = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def originals(base_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("originals")
    return {"base": base_dirs["llama"], "adapter": save_adapter(ARCHS["llama"], base_dirs["llama"], "lora-head", root)}


@pytest.fixture
def work(originals: dict[str, Path], tmp_path: Path) -> Path:
    """A run directory holding its own copies of the base and the adapter."""
    shutil.copytree(originals["base"], tmp_path / "base")
    shutil.copytree(originals["adapter"], tmp_path / "adapter")
    return tmp_path


def hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def run(work: Path, capsys: pytest.CaptureFixture[str], *args: str, stdout: bool = False) -> tuple[int, str]:
    """`safemerge ARGS` in this process, from `work`; returns (exit code, stderr), with stdout after it if asked."""
    cwd = Path.cwd()
    os.chdir(work)
    try:
        code = main(list(args))
    finally:
        os.chdir(cwd)
    said = capsys.readouterr()
    return code, said.err + said.out if stdout else said.err


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".safemerge" in p.name or p.name.endswith(".tmp"))


def assert_untouched(work: Path, before: dict[str, str], out: Path | None = None) -> None:
    assert hashes(work / "base") == {k.removeprefix("base/"): v for k, v in before.items() if k.startswith("base/")}
    assert hashes(work / "adapter") == {
        k.removeprefix("adapter/"): v for k, v in before.items() if k.startswith("adapter/")
    }
    if out is not None:
        assert not out.exists(), f"{out} must not be written"
    assert leftovers(work) == [], "no temporary file may be left"


def merge(*extra: str) -> list[str]:
    return ["merge", "base", "adapter", "out", "--policy", "untie", *extra]


# --- damaged files: exit 2, "This file is damaged: NAME", before anything is loaded --------------------------------


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _huge_header(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes((2**40).to_bytes(8, "little") + data[8:])


def _not_json(path: Path) -> None:
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    path.write_bytes(data[:8] + b"{" * length + data[8 + length :])


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _few_bytes(path: Path) -> None:
    path.write_bytes(b"\x01\x02\x03")


def _rewrite_header(path: Path, change: Callable[[dict], None]) -> None:  # type: ignore[type-arg]
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    change(header)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(len(encoded).to_bytes(8, "little") + encoded + data[8 + length :])


def _swapped_offsets(path: Path) -> None:
    def swap(header: dict) -> None:  # type: ignore[type-arg]
        name = next(k for k in header if k != "__metadata__")
        header[name]["data_offsets"] = header[name]["data_offsets"][::-1]

    _rewrite_header(path, swap)


def _wrong_byte_count(path: Path) -> None:
    def grow(header: dict) -> None:  # type: ignore[type-arg]
        name = next(k for k in header if k != "__metadata__" and header[k]["shape"])
        header[name]["shape"] = [header[name]["shape"][0] * 2, *header[name]["shape"][1:]]

    _rewrite_header(path, grow)


DAMAGE = {
    "truncated": (_truncate, "truncated"),
    "header-length-2^40": (_huge_header, "header length is 1099511627776"),
    "header-not-json": (_not_json, "not readable JSON"),
    "empty": (_empty, "too short"),
    "three-bytes": (_few_bytes, "too short"),
    "offsets-swapped": (_swapped_offsets, "data offsets"),
    "bytes-disagree-with-shape": (_wrong_byte_count, "bytes for shape"),
}


@pytest.mark.parametrize("command", ["merge", "doctor"])
@pytest.mark.parametrize("which", ["base/model.safetensors", f"adapter/{WEIGHTS}"])
@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_safetensors(work: Path, capsys, which: str, damage: str, command: str) -> None:  # type: ignore[no-untyped-def]
    """merge says so before anything is loaded; the doctor reports it as a finding (damaged-base-file, bad-weights),
    a usage error too."""
    corrupt, detail = DAMAGE[damage]
    corrupt(work / which)
    before = hashes(work)
    code, said = run(work, capsys, *(merge() if command == "merge" else ["doctor", "base", "adapter"]), stdout=True)
    assert code == 2
    assert f"This file is damaged: {work / which}" in said or f"This file is damaged: {which}" in said
    assert detail in said and re.search("fix: copy or download it again", said, re.I) and "Traceback" not in said
    assert "unexpected" not in said
    assert_untouched(work, before, work / "out")


@pytest.mark.parametrize("command", ["merge", "doctor"])
@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2])
def test_a_cut_one_byte_tensor(work: Path, capsys, dtype: torch.dtype, command: str) -> None:  # type: ignore[no-untyped-def]
    """A tensor of one byte an element (I8, U8, BOOL, F8) whose bytes fall short of its shape is found like any other:
    the input check sizes every dtype the format names."""
    path = work / "adapter" / WEIGHTS
    save_file({**load_file(path), "extra": torch.zeros(4, 8, dtype=dtype)}, path, metadata={"format": "pt"})

    def cut(header: dict) -> None:  # type: ignore[type-arg]
        header["extra"]["shape"] = [8, 8]  # 64 elements in the 32 bytes the offsets give it

    _rewrite_header(path, cut)
    before = hashes(work)
    code, said = run(work, capsys, *(merge() if command == "merge" else ["doctor", "base", "adapter"]), stdout=True)
    assert code == 2, said
    assert f"This file is damaged: adapter/{WEIGHTS} (tensor extra holds 32 bytes for shape [8, 8])" in said
    assert re.search("fix: copy or download it again", said, re.I) and "Traceback" not in said
    assert_untouched(work, before, work / "out")


def test_tensor_shape_that_disagrees_with_the_config(work: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    """A whole, readable file whose embedding has another shape than the config says."""
    tensors = load_file(work / "base" / "model.safetensors")
    tensors["model.embed_tokens.weight"] = torch.zeros(96, 16)
    save_file(tensors, work / "base" / "model.safetensors", metadata={"format": "pt"})
    before = hashes(work)
    code, err = run(work, capsys, *merge())
    assert code == 2 and "Could not load the base 'base' with the adapter 'adapter'" in err and "Fix:" in err
    assert_untouched(work, before, work / "out")


@pytest.mark.parametrize("command", ["merge", "inspect", "verify"])
def test_unreadable_pickle(work: Path, capsys, command: str) -> None:  # type: ignore[no-untyped-def]
    """An adapter .bin that cannot be unpickled, wherever it would be loaded."""
    (work / "adapter" / WEIGHTS).unlink()
    (work / "adapter" / "adapter_model.bin").write_bytes(b"\x80\x04not a pickle at all")
    before = hashes(work)
    args = {
        "merge": merge(),
        "inspect": ["inspect", "base", "adapter"],
        "verify": ["verify", "base", "--base", "base", "--adapter", "adapter"],
    }[command]
    code, err = run(work, capsys, *args)
    assert code == 2 and "This file is damaged: adapter/adapter_model.bin (UnpicklingError" in err
    assert "Traceback" not in err
    assert_untouched(work, before)


# --- outputs that would overwrite an input: exit 2 before anything is loaded -----------------------------------------


@pytest.mark.parametrize(
    ("out", "role", "relation"),
    [
        ("adapter", "adapter", "is"),
        ("base", "base model", "is"),
        ("adapter/merged", "adapter", "is inside"),
        ("base/sub/merged", "base model", "is inside"),
        (".", "base model", "contains"),
    ],
)
def test_output_overlapping_an_input(work: Path, capsys, out: str, role: str, relation: str) -> None:  # type: ignore[no-untyped-def]
    before = hashes(work)
    code, err = run(work, capsys, "merge", "base", "adapter", out, "--policy", "untie", "--overwrite")
    assert code == 2 and f"The output directory '{out}' {relation} the {role}" in err and "Fix:" in err
    assert_untouched(work, before)


@pytest.mark.parametrize(
    ("report", "message"),
    [
        ("base/config.json", "is the base model|is inside the base model"),
        ("adapter/report.json", "is inside the adapter"),
        ("out", "is the output directory or inside it"),
        ("out/report.json", "is the output directory or inside it"),
        ("somedir", "is a directory"),
        ("afile/report.json", "cannot be written"),
    ],
)
def test_report_path_that_cannot_be_used(work: Path, capsys, report: str, message: str) -> None:  # type: ignore[no-untyped-def]
    (work / "somedir").mkdir()
    (work / "afile").write_text("x")
    before = hashes(work)
    code, err = run(work, capsys, *merge("--report", report))
    assert code == 2 and pytest.importorskip("re").search(message, err), err
    assert_untouched(work, before, work / "out")
    assert (work / "afile").read_text() == "x"


@pytest.mark.parametrize(("base", "adapter"), [("./missing", "adapter"), ("base", "/no/such/adapter/dir")])
def test_missing_local_path_never_goes_to_the_hub(work: Path, capsys, base: str, adapter: str) -> None:  # type: ignore[no-untyped-def]
    started = time.monotonic()
    code, err = run(work, capsys, "merge", base, adapter, "out", "--policy", "untie")
    assert code == 2 and "does not exist" in err and "Repo id" not in err
    assert time.monotonic() - started < 10, "a local path must not be retried on the hub"
    assert not (work / "out").exists()


# A path where a model directory is expected: what it is and the fix, exit 2, never a hub lookup ("Repo id ...").
MISSING = "does not exist \\(no such file or directory\\).*Fix: check the path"
NOT_A_DIRECTORY = {
    "base/config.json": r"The base model 'base/config.json' is a file, not a directory.*Fix: pass the directory 'base'",
    "adapter/adapter_config.json": r"The adapter 'adapter/adapter_config.json' is a file, not a directory.*Fix: pass "
    r"the directory 'adapter'",
    "empty-base": r"The base model 'empty' is a directory without config.json.*Fix: pass the directory that holds "
    r"config.json",
    "empty-adapter": r"The adapter 'empty' is a directory without adapter_config.json.*Fix: pass the directory that "
    r"holds adapter_config.json",
    "./nope-base": rf"The base model './nope' {MISSING}",
    "./nope-adapter": rf"The adapter './nope' {MISSING}",
}


def _with(case: str) -> tuple[str, str]:
    """(base, adapter) for a case of NOT_A_DIRECTORY: the bad one in its place, the good one in the other."""
    name = case.removesuffix("-base").removesuffix("-adapter")
    if case.endswith("-base") or case.startswith("base/"):
        return name, "adapter"
    return "base", name


@pytest.mark.parametrize("command", ["merge", "inspect", "doctor"])
@pytest.mark.parametrize("case", sorted(NOT_A_DIRECTORY))
def test_input_that_is_no_model_directory(work: Path, capsys, command: str, case: str) -> None:  # type: ignore[no-untyped-def]
    (work / "empty").mkdir()
    base, adapter = _with(case)
    before = hashes(work)
    args = {"merge": merge(), "inspect": ["inspect", "base", "adapter"], "doctor": ["doctor", "base", "adapter"]}
    argv = [base if a == "base" else adapter if a == "adapter" else a for a in args[command]]
    code, said = run(work, capsys, *argv, stdout=True)
    assert code == 2 and re.search(NOT_A_DIRECTORY[case], said, re.S | re.I), said
    assert "Repo id" not in said and "Traceback" not in said
    assert_untouched(work, before, work / "out")


@pytest.mark.parametrize(
    ("merged", "message"),
    [
        (
            "adapter/adapter_model.safetensors",
            r"The merged model 'adapter/adapter_model.safetensors' is a file, not a "
            r"directory.*Fix: pass the directory that holds config.json",
        ),
        ("./nope", rf"The merged model './nope' {MISSING}"),
        ("empty", r"The merged model 'empty' is a directory without config.json.*Fix: pass the directory that holds"),
    ],
)
def test_verify_a_merged_model_that_is_no_model_directory(work: Path, capsys, merged: str, message: str) -> None:  # type: ignore[no-untyped-def]
    (work / "empty").mkdir()
    code, err = run(work, capsys, "verify", merged, "--base", "base", "--adapter", "adapter")
    assert code == 2 and re.search(message, err, re.S) and "Repo id" not in err, err


def test_adapter_directory_of_checkpoints_names_them(work: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    """A training run's output directory: the adapters are in its checkpoint sub-folders, and the fix names them."""
    shutil.copytree(work / "adapter", work / "run" / "checkpoint-500")
    code, err = run(work, capsys, "merge", "base", "run", "out", "--policy", "untie")
    assert code == 2 and "The adapter 'run' is a directory without adapter_config.json" in err
    assert (
        "Fix: pass the directory that holds adapter_config.json (sub-folders that have one: run/checkpoint-500)" in err
    )


def test_output_is_a_file(work: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    (work / "out").write_text("mine")
    code, err = run(work, capsys, *merge())
    assert code == 2 and "is a file" in err and (work / "out").read_text() == "mine"


def test_output_not_empty_without_overwrite(work: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    (work / "out").mkdir()
    (work / "out" / "keep.txt").write_text("mine")
    code, err = run(work, capsys, *merge())
    assert code == 2 and "not empty" in err and "--overwrite" in err
    assert (work / "out" / "keep.txt").read_text() == "mine" and leftovers(work) == []


@pytest.mark.parametrize("length", [250, 255])
def test_output_name_as_long_as_the_filesystem_allows(work: Path, capsys, length: int) -> None:  # type: ignore[no-untyped-def]
    """safemerge's siblings of a long OUT get a shortened name with a hash of OUT's (NAME_MAX is 255 here)."""
    name = "m" * length
    code, err = run(work, capsys, "merge", "base", "adapter", name, "--policy", "untie")
    assert code == 0, err
    assert (work / name / "config.json").exists() and leftovers(work) == []


def test_output_name_longer_than_the_filesystem_allows(work: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    name = "m" * 256
    code, err = run(work, capsys, "merge", "base", "adapter", name, "--policy", "untie")
    assert code == 2 and "InputError" in err and "Fix: choose a name of at most 255 bytes" in err
    assert leftovers(work) == [] and not any(p.name.startswith("m") for p in work.iterdir())


def test_leftovers_of_a_killed_run_into_a_long_output_are_found(work: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    name = "m" * 255
    sibling = work_directory(work / name)
    assert len(sibling.name) <= 255 and sibling.name.endswith(".safemerge")
    (sibling / "model").mkdir(parents=True)
    (sibling / "lock").write_text('{"pid": 999999}')
    code, err = run(work, capsys, "merge", "base", "adapter", name, "--policy", "untie")
    assert code == 0 and "removed what a killed safemerge run left" in err
    assert (work / name / "config.json").exists() and leftovers(work) == []


@pytest.mark.parametrize("low_memory", [False, pytest.param(True, marks=needs_low_memory)])
def test_refused_merge_leaves_no_parent_directory(work: Path, capsys, low_memory: bool) -> None:  # type: ignore[no-untyped-def]
    """`keep` refuses LoRA on the tied lm_head after the output is claimed: the parents it created go too."""
    before = hashes(work)
    extra = ["--low-memory"] if low_memory else []
    code, err = run(work, capsys, "merge", "base", "adapter", "a/b/out", "--policy", "keep", *extra)
    assert code == 1 and "TiedWeightsError" in err
    assert not (work / "a").exists()
    assert_untouched(work, before)


def test_refused_merge_keeps_existing_parents(work: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    (work / "a").mkdir()
    code, err = run(work, capsys, "merge", "base", "adapter", "a/b/out", "--policy", "keep")
    assert code == 1 and "TiedWeightsError" in err
    assert (work / "a").is_dir() and not (work / "a" / "b").exists()


@pytest.mark.parametrize("out", [".", "..", "home"])
def test_output_that_is_the_current_directory_an_ancestor_or_home(  # type: ignore[no-untyped-def]
    work: Path, capsys, monkeypatch: pytest.MonkeyPatch, out: str
) -> None:
    """`--overwrite` would replace the directory the user stands in (or home) by the merged model. (`/` holds the
    inputs: refused as containing them.)"""
    here = work / "up" / "here"
    here.mkdir(parents=True)
    (here / "mine.txt").write_text("mine")
    (work / "home").mkdir()
    (work / "home" / "notes.txt").write_text("mine")
    monkeypatch.setenv("HOME", str(work / "home"))
    target = str(work / "home") if out == "home" else out
    before = hashes(work)
    code, err = run(here, capsys, "merge", "../../base", "../../adapter", target, "--policy", "untie", "--overwrite")
    assert code == 2 and "InputError" in err, err
    assert "safemerge replaces the whole directory" in err and "Fix: choose a new directory" in err
    assert hashes(work) == before and leftovers(here) == [] and leftovers(work) == []


def test_output_where_the_kernel_refuses_to_write(work: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    before = hashes(work)
    code, err = run(work, capsys, "merge", "base", "adapter", "/proc/safemerge-out", "--policy", "untie")
    assert code == 2 and "Traceback" not in err and "/proc" in err
    assert_untouched(work, before)


# --- numbers and options: exit 2 before anything is loaded ---------------------------------------------------------


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "-0.5"])
def test_bad_logits_tolerance(work: Path, capsys, value: str) -> None:  # type: ignore[no-untyped-def]
    started = time.monotonic()
    code, err = run(work, capsys, *merge("--logits-tolerance", value))
    assert code == 2 and "logits_tolerance must be a finite number >= 0" in err
    assert time.monotonic() - started < 5 and not (work / "out").exists()


def test_bad_dtype(work: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    code, err = run(work, capsys, *merge("--dtype", "int8"))
    assert code == 2 and "not a floating-point torch dtype" in err and not (work / "out").exists()


# --- NaN / Inf: exit 1, named, with or without verification -----------------------------------------------------------


@pytest.mark.parametrize(("value", "verify"), [("nan", True), ("nan", False), ("inf", True)])
def test_non_finite_adapter(work: Path, capsys, value: str, verify: bool) -> None:  # type: ignore[no-untyped-def]
    tensors = load_file(work / "adapter" / WEIGHTS)
    name = next(k for k in tensors if "lora_B" in k)
    tensors[name][0, 0] = float(value)
    save_file(tensors, work / "adapter" / WEIGHTS)
    before = hashes(work)
    code, err = run(work, capsys, *merge(*([] if verify else ["--no-verify"])))
    assert code == 1 and "NonFiniteWeightsError" in err and "holds NaN or Inf in 1 tensor(s)" in err
    assert "lm_head.lora_B" in err and "Fix:" in err
    assert_untouched(work, before, work / "out")


# --- concurrent runs, stale leftovers ------------------------------------------------------------------------------


def test_output_claimed_by_a_live_run(work: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    sibling = work / ".out.safemerge"
    sibling.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
            "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'{\"pid\": %d}' % os.getpid()); print('held', flush=True); "
            "time.sleep(60)",
            str(sibling / "lock"),
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
        code, err = run(work, capsys, *merge())
        assert code == 2 and f"Another safemerge run (pid {holder.pid}) is writing" in err
        assert not (work / "out").exists()
    finally:
        holder.kill()
        holder.wait()


def test_leftovers_of_a_killed_run_are_removed(work: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    sibling = work / ".out.safemerge"
    (sibling / "model").mkdir(parents=True)
    (sibling / "model" / "model.safetensors").write_bytes(b"half")
    (sibling / "lock").write_text('{"pid": 999999}')
    code, err = run(work, capsys, *merge())
    assert code == 0 and "removed what a killed safemerge run left" in err
    assert (work / "out" / "config.json").exists() and leftovers(work) == []


def test_an_interrupted_swap_is_put_back(work: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    """Where no atomic swap exists, the old output waits in the sibling; a crash there leaves OUT absent."""
    (work / ".out.safemerge" / "previous").mkdir(parents=True)
    (work / ".out.safemerge" / "previous" / "old.txt").write_text("old model")
    code, err = run(work, capsys, *merge())
    assert code == 2 and "put back" in err and "not empty" in err
    assert (work / "out" / "old.txt").read_text() == "old model" and leftovers(work) == []


def test_failed_rename_without_atomic_swap_exits_1_with_the_old_output_back(  # type: ignore[no-untyped-def]
    work: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No renameat2 exchange (network filesystem, macOS), and the rename of the new model onto OUT fails."""
    (work / "out").mkdir()
    (work / "out" / "old.txt").write_text("old model")
    before = hashes(work)
    real = os.rename

    def rename(src, dst, **kwargs):  # type: ignore[no-untyped-def]
        if Path(src).name == "model" and Path(dst).name == "out":
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(src), None, str(dst))
        real(src, dst, **kwargs)

    monkeypatch.setattr(_output, "_exchange", lambda a, b: False)
    monkeypatch.setattr(os, "rename", rename)
    code, err = run(work, capsys, *merge("--overwrite"))
    assert code == 1 and "OutputWriteError: Could not put the merged model at" in err and "Traceback" not in err
    assert "put back" in err and (work / "out" / "old.txt").read_text() == "old model"
    assert hashes(work) == before and leftovers(work) == []


def _cli(work: Path, *args: str, limit_bytes: int | None = None) -> subprocess.Popen[str]:
    def limits() -> None:
        if limit_bytes is not None:  # a write past the limit fails with EFBIG, as on a full disk
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.Popen(
        [sys.executable, "-m", "safemerge", *args],
        cwd=work,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=limits,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )


def test_two_runs_at_once_into_one_new_output(work: Path) -> None:
    first, second = _cli(work, *merge()), _cli(work, *merge())
    results = sorted([(first.wait(), first.stderr.read()), (second.wait(), second.stderr.read())])  # type: ignore[union-attr]
    (ok, _), (refused, err) = results
    assert ok == 0 and refused == 2, results
    assert "Another safemerge run" in err or "not empty" in err
    assert (work / "out" / "config.json").exists() and leftovers(work) == []


def _interrupt_at(work: Path, step: str, sig: int, *extra: str) -> tuple[int, str]:
    """Start a merge, send `sig` once it logs `step`, return (exit code, stderr)."""
    process = _cli(work, *merge(*extra))
    assert process.stderr is not None
    lines = []
    for line in process.stderr:
        lines.append(line)
        if step in line:
            process.send_signal(sig)
            break
    lines.append(process.stderr.read())
    return process.wait(), "".join(lines)


STEPS = ["checking that", "inspecting tied weights", "merging under policy", "saving to", "reloading"]
SIGNALS = [(signal.SIGTERM, 143), (signal.SIGINT, 130)]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every signal at every step with --full-matrix (CI); otherwise SIGTERM while saving."""
    if metafunc.definition.name == "test_terminated_or_interrupted_at_each_step":
        cases = [(step, *s) for step in STEPS for s in SIGNALS]
        if not metafunc.config.getoption("--full-matrix"):
            cases = [("saving to", *SIGNALS[0])]
        metafunc.parametrize(("step", "sig", "code"), cases)


def test_terminated_or_interrupted_at_each_step(work: Path, step: str, sig: int, code: int) -> None:
    before = hashes(work)
    exit_code, err = _interrupt_at(work, step, sig)
    if exit_code == 0:  # the signal came after the model was in place: a complete, verified model
        assert (work / "out" / "config.json").exists() and leftovers(work) == []
        return
    assert exit_code == code, err
    assert "nothing was written at the output and no input was changed" in err and "Traceback" not in err
    assert_untouched(work, before, work / "out")


@pytest.mark.full_matrix
@pytest.mark.parametrize("step", ["saving to", "reloading"])
def test_killed_at_a_step_then_run_again(work: Path, capsys, step: str) -> None:  # type: ignore[no-untyped-def]
    before = hashes(work)
    exit_code, _ = _interrupt_at(work, step, signal.SIGKILL)
    assert exit_code in (-signal.SIGKILL, 0)
    if exit_code != 0:
        assert not (work / "out").exists() or not any((work / "out").iterdir())
    code, _ = run(work, capsys, *merge("--overwrite"))
    assert code == 0 and (work / "out" / "config.json").exists() and leftovers(work) == []
    assert hashes(work / "base") == {k.removeprefix("base/"): v for k, v in before.items() if k.startswith("base/")}


@pytest.mark.full_matrix
def test_terminated_while_overwriting_keeps_the_old_output(work: Path) -> None:
    (work / "out").mkdir()
    (work / "out" / "old.txt").write_text("old model")
    exit_code, _ = _interrupt_at(work, "reloading", signal.SIGTERM, "--overwrite")
    if exit_code == 0:
        assert not (work / "out" / "old.txt").exists() and (work / "out" / "config.json").exists()
    else:
        assert exit_code == 143 and (work / "out" / "old.txt").read_text() == "old model"
    assert leftovers(work) == []


def test_write_fails_half_way(work: Path) -> None:
    """Writing the merged model stops at a file-size limit (EFBIG), as a full disk stops it (ENOSPC)."""
    before = hashes(work)
    process = _cli(work, *merge(), limit_bytes=50_000)
    code, err = process.wait(), process.stderr.read()  # type: ignore[union-attr]
    assert code == 1 and "OutputWriteError: Could not write the merged model" in err and "Traceback" not in err
    assert "partial files were removed" in err
    assert_untouched(work, before, work / "out")


# --- what a successful run leaves ------------------------------------------------------------------------------------


def test_files_follow_the_umask(work: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    old = os.umask(0o022)
    try:
        code, _ = run(work, capsys, *merge("--report", "report.json"))
    finally:
        os.umask(old)
    assert code == 0
    assert (work / "out").stat().st_mode & 0o777 == 0o755
    assert (work / "out" / "config.json").stat().st_mode & 0o777 == 0o644
    assert (work / "report.json").stat().st_mode & 0o777 == 0o644
    assert leftovers(work) == []


def test_output_symlink_to_a_directory_is_replaced_where_it_points(work: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    (work / "real").mkdir()
    (work / "real" / "old.txt").write_text("old")
    (work / "out").symlink_to(work / "real")
    code, _ = run(work, capsys, *merge("--overwrite"))
    assert code == 0 and (work / "out").is_symlink() and (work / "real" / "config.json").exists()
    assert not (work / "real" / "old.txt").exists() and leftovers(work) == []


def test_overwrite_swaps_in_one_step(work: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    (work / "out").mkdir()
    (work / "out" / "old.txt").write_text("old")
    before = hashes(work / "adapter")
    code, _ = run(work, capsys, *merge("--overwrite"))
    assert code == 0 and not (work / "out" / "old.txt").exists() and (work / "out" / "config.json").exists()
    assert hashes(work / "adapter") == before and leftovers(work) == []


def test_lock_of_a_finished_run_is_free(work: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    assert run(work, capsys, *merge())[0] == 0
    sibling = work / ".out.safemerge"
    assert not sibling.exists()
    sibling.mkdir()
    fd = os.open(sibling / "lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)
        shutil.rmtree(sibling)
