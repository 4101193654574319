"""The command line as a user drives it: every command and exit code, on tiny models saved to disk."""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from safemerge._engines import in_memory
from safemerge._model import compat as _compat
from safemerge.cli import main
from tests.models import ARCHS, adapter_model


@pytest.fixture
def dirs(base_dirs: dict[str, Path], tmp_path: Path) -> dict[str, Path]:
    """A tied base, an adapter on embed_tokens + lm_head, and a plain merge_and_unload() of it."""
    adapter = tmp_path / "adapter"
    model = adapter_model(ARCHS["llama"], base_dirs["llama"], "lora-both", adapter)
    model.merge_and_unload().save_pretrained(tmp_path / "plain")
    return {"base": base_dirs["llama"], "adapter": adapter, "plain": tmp_path / "plain", "tmp": tmp_path}


def run(*argv: object) -> int:
    return main([str(a) for a in argv])


def test_demo_shows_the_bug_and_the_policies(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "silently wrong" in out
    assert "policy='keep'" in out and "refused (TiedWeightsError)" in out
    assert re.search(r"after reload: \S+ \(tolerance \S+\); verified\n", out)


def test_merge_untie_writes_model_and_report(dirs: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    out, report = dirs["tmp"] / "out", dirs["tmp"] / "reports" / "merge.json"
    assert run("merge", dirs["base"], dirs["adapter"], out, "--policy", "untie", "--report", report) == 0
    assert (out / "config.json").exists()
    data = json.loads(report.read_text())
    assert data["ok"] is True and data["policy"] == "untie"
    captured = capsys.readouterr()
    assert "verified:" in captured.out
    assert "reloading" in captured.err, "progress goes to stderr"


def test_merge_json_on_stdout(dirs: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert run("merge", dirs["base"], dirs["adapter"], dirs["tmp"] / "out", "--policy", "untie", "--json", "-q") == 0
    assert json.loads(capsys.readouterr().out)["verification"]["ok"] is True


@pytest.mark.parametrize(
    ("policy", "damage", "code", "outcome", "kind"),
    [
        ("untie", None, 0, "merged", None),
        ("keep", None, 1, "refused", "TiedWeightsError"),
        ("untie", "adapter_config", 1, "doctor-failed", "AdapterMismatchError"),
    ],
)
def test_every_outcome_writes_one_report_schema_and_prints_it_with_json(
    dirs: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
    policy: str,
    damage: str | None,
    code: int,
    outcome: str,
    kind: str | None,
) -> None:
    """`--report` and `--json` give the same object for every outcome, failures included."""
    if damage == "adapter_config":  # a rank the tensors do not have: the doctor stops it
        config = dirs["adapter"] / "adapter_config.json"
        config.write_text(json.dumps({**json.loads(config.read_text()), "r": 3}))
    report = dirs["tmp"] / "report.json"
    argv = ["merge", dirs["base"], dirs["adapter"], dirs["tmp"] / "out", "--policy", policy, "--json", "-q"]
    assert run(*argv, "--report", report) == code
    written, printed = json.loads(report.read_text()), json.loads(capsys.readouterr().out)
    assert written == printed
    assert written["outcome"] == outcome and written["ok"] is (code == 0) and "schema_version" in written
    if kind is None:
        assert "error" not in written and written["verification"]["ok"] is True
        return
    assert written["error"]["kind"] == kind and "fix" in written["error"]["message"].lower()
    assert ("doctor" in written) is (outcome == "doctor-failed")
    assert bool(written.get("groups_before")) is (outcome == "refused")


def test_merge_refused_exits_1_without_traceback(dirs: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert run("merge", dirs["base"], dirs["adapter"], dirs["tmp"] / "out", "--policy", "keep") == 1
    err = capsys.readouterr().err
    assert "Fix: use policy='untie'" in err and "Traceback" not in err
    assert not (dirs["tmp"] / "out").exists()


def test_merge_into_occupied_directory_is_usage_error(
    dirs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    (dirs["tmp"] / "out").mkdir()
    (dirs["tmp"] / "out" / "x").write_text("x")
    assert run("merge", dirs["base"], dirs["adapter"], dirs["tmp"] / "out", "--policy", "untie") == 2
    assert "--overwrite" in capsys.readouterr().err


def test_merge_bad_dtype_is_usage_error(dirs: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert run("merge", dirs["base"], dirs["adapter"], dirs["tmp"] / "o", "--policy", "untie", "--dtype", "int8") == 2
    assert "bfloat16" in capsys.readouterr().err


def test_missing_local_base_is_usage_error(dirs: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert run("merge", dirs["tmp"] / "no-such-base", dirs["adapter"], dirs["tmp"] / "o", "--policy", "untie") == 2
    assert "fix:" in capsys.readouterr().err.lower()
    assert run("doctor", dirs["tmp"] / "no-such-base", dirs["adapter"]) == 2


@pytest.mark.parametrize(
    "argv", [["merge", "a", "b", "c"], ["merge", "a", "b", "c", "--policy", "tie"], ["verify", "m"]]
)
def test_bad_arguments_are_usage_errors(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2


def test_inspect_table_and_json(dirs: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert run("inspect", dirs["base"], dirs["adapter"]) == 0
    table = capsys.readouterr().out
    assert "model.embed_tokens.weight" in table and "lora.Embedding" in table
    assert "keep    no" in table and "untie   yes" in table
    assert run("inspect", dirs["base"], dirs["adapter"], "--json") == 0
    data = json.loads(capsys.readouterr().out)
    assert [o["merges"] for o in data["plans"]] == [False, True, False]
    assert sorted(p.name for p in dirs["tmp"].iterdir()) == ["adapter", "plain"], "inspect writes nothing"


def test_verify_flags_a_plain_merge(dirs: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert run("verify", dirs["plain"], "--base", dirs["base"], "--adapter", dirs["adapter"]) == 1
    out = capsys.readouterr().out
    assert "NOT FAITHFUL" in out and "merged logits differ" in out


def test_verify_accepts_a_safemerge_output(dirs: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    out = dirs["tmp"] / "out"
    assert run("merge", dirs["base"], dirs["adapter"], out, "--policy", "untie", "-q") == 0
    capsys.readouterr()
    assert run("verify", out, "--base", dirs["base"], "--adapter", dirs["adapter"], "--json") == 0
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is True and data["max_abs_logits_diff"] <= data["logits_tolerance"]


def test_python_dash_m_and_version() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "safemerge", "--version"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0 and result.stdout.startswith("safemerge ")


def test_merge_loads_a_classification_base_with_its_head(base_dirs: dict[str, Path], tmp_path: Path) -> None:
    """A SEQ_CLS adapter on a causal-LM checkpoint: merge loads the base as it was trained, with its `score` head."""
    import peft
    import transformers

    from tests.models import perturb

    base = transformers.AutoModelForSequenceClassification.from_pretrained(base_dirs["llama-untied"])
    trained = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj"], task_type="SEQ_CLS"))
    perturb(trained)
    trained.save_pretrained(tmp_path / "cls-adapter")
    out = tmp_path / "out"
    assert run("merge", base_dirs["llama-untied"], tmp_path / "cls-adapter", out, "--policy", "refuse", "-q") == 0
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForSequenceClassification"]


def test_help_answers_without_importing_torch() -> None:
    """`--help` and argument errors must answer at once: the heavy imports wait for a command that needs them."""
    code = (
        "import sys\n"
        "from safemerge.cli import main\n"
        "try:\n"
        "    main(['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, sorted(sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "merge" in done.stdout


def test_main_puts_logging_and_warning_filters_back(base_dirs: dict[str, Path], capsys: pytest.CaptureFixture[str]):  # type: ignore[no-untyped-def]
    """Running main() (twice) in one process leaves no handler, filter or transformers setting behind."""
    import warnings

    from transformers.utils import logging as hf_logging

    library = logging.getLogger("safemerge")
    before = (library.handlers[:], library.level, library.propagate, warnings.filters[:], hf_logging.get_verbosity())
    for _ in range(2):
        assert main(["doctor", str(base_dirs["llama"]), str(base_dirs["llama"]), "-q"]) == 2  # no adapter: usage
    after = (library.handlers[:], library.level, library.propagate, warnings.filters[:], hf_logging.get_verbosity())
    assert after == before


def test_the_tutorial_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every `safemerge ...` line of docs/tutorial.md's code blocks, in order, in one directory: each exits 0."""
    tutorial = (Path(__file__).resolve().parents[1] / "docs" / "tutorial.md").read_text()
    commands = [
        line
        for block in re.findall(r"```bash\n(.*?)```", tutorial, re.S)
        for line in block.splitlines()
        if line.startswith("safemerge ")
    ]
    assert [c.split()[1] for c in commands] == ["demo", "inspect", "merge"]
    monkeypatch.chdir(tmp_path)
    for command in commands:
        assert main([*shlex.split(command)[1:], "-q"]) == 0, command
    assert (tmp_path / "merged" / "README.md").exists() and (tmp_path / "merge-report.json").exists()


def test_demo_keep_refuses_an_occupied_directory(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("mine")
    assert main(["demo", "--keep", str(tmp_path), "-q"]) == 2
    assert (tmp_path / "file").read_text() == "mine"


def test_every_option_of_every_command_is_in_the_cli_reference() -> None:
    """--help and docs/reference/cli.md list the same options."""
    from safemerge.cli._arguments import build_parser

    reference = (Path(__file__).resolve().parents[1] / "docs" / "reference" / "cli.md").read_text()
    commands = next(a for a in build_parser()._actions if a.dest == "command").choices
    assert commands is not None
    options = {s for sub in commands.values() for a in sub._actions for s in a.option_strings if s.startswith("--")}
    missing = sorted(o for o in options - {"--help"} if f"`{o}" not in reference)
    assert not missing, f"options missing from docs/reference/cli.md: {missing}"


def test_merge_options_reach_the_merge(dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """The flags of `merge` as a user types them: low-memory shards of the given size, the saved dtype, the hub
    options (a local directory has no revisions: transformers and PEFT accept and ignore them, so what reaches
    the merge's request, as merge_pretrained takes it, is recorded), a device map."""
    from safemerge._request import MergeRequest

    received: list[dict[str, object]] = []
    real = MergeRequest.for_pretrained
    recorded = staticmethod(lambda *a, **kw: received.append(kw) or real(*a, **kw))
    monkeypatch.setattr(MergeRequest, "for_pretrained", recorded)
    out = dirs["tmp"] / "low"
    argv = ["merge", dirs["base"], dirs["adapter"], out, "--policy", "untie", "-q", "--dtype", "float32"]
    hub = ["--revision", "main", "--adapter-revision", "r1", "--token", "hf_unused"]
    low = ["--low-memory", "--max-shard-size", "20KB", "--out-dtype", "bfloat16"]
    if _compat.low_memory_unsupported() is None:
        assert run(*argv, *hub, *low) == 0
        assert len(list(out.glob("model-*.safetensors"))) > 1
        assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    else:  # accelerate too old: refused before anything loads
        assert run(*argv, *hub, *low) == 2 and not out.exists()
    wanted = {"revision": "main", "adapter_revision": "r1", "token": "hf_unused", "dtype": "float32"}
    assert {k: received[0][k] for k in wanted} == wanted
    assert (received[0]["low_memory"], received[0]["max_shard_size"], received[0]["out_dtype"]) == (
        True,
        "20KB",
        "bfloat16",
    )
    assert run("merge", dirs["base"], dirs["adapter"], dirs["tmp"] / "mapped", "--policy", "untie", "-q",
               "--device-map", "auto") == 0  # fmt: skip


def strict_json(text: str) -> Any:
    """JSON as a strict parser reads it: NaN and Infinity are not JSON."""

    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_a_verify_whose_probe_fails_prints_strict_json(
    dirs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """A merged model with a smaller vocabulary fails on the probe batch: its figures are infinite, printed as null."""
    import transformers

    small = transformers.AutoModelForCausalLM.from_pretrained(dirs["plain"])
    small.resize_token_embeddings(16)
    small.save_pretrained(dirs["tmp"] / "small")
    argv = ["verify", dirs["tmp"] / "small", "--base", dirs["base"], "--adapter", dirs["adapter"], "--json"]
    assert run(*argv) == 1
    data = strict_json(capsys.readouterr().out)
    assert data["ok"] is False and data["max_abs_logits_diff"] is None
    assert any("failed on the probe batch" in problem for problem in data["problems"])


@pytest.mark.parametrize(
    "error",
    [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), MemoryError()],
    ids=["cuda", "cpu"],
)
def test_out_of_memory_is_a_resource_failure_with_the_fixes(
    dirs: dict[str, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    def run_out_of_memory(*args: object, **kwargs: object) -> None:
        raise error

    monkeypatch.setattr(in_memory, "execute", run_out_of_memory)
    report = dirs["tmp"] / "report.json"
    out = dirs["tmp"] / "out"
    assert run("merge", dirs["base"], dirs["adapter"], out, "--policy", "untie", "--report", report) == 1
    err = capsys.readouterr().err
    assert f"safemerge: out of memory ({type(error).__name__}" in err
    assert "Fix: run with --low-memory" in err and "--device-map auto" in err and "--dtype bfloat16" in err
    assert "bug" not in err and "Traceback" not in err
    assert not out.exists()
    assert strict_json(report.read_text())["error"]["kind"] == type(error).__name__


def test_a_failed_rename_into_place_is_a_write_failure_not_a_usage_error(
    dirs: dict[str, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The merge is verified, then the rename that puts it in place fails (EIO): exit 1, and no advice on paths."""
    out = dirs["tmp"] / "out"
    rename = os.rename

    def failing_rename(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        if Path(dst) == out:
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(src), None, str(dst))
        rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "rename", failing_rename)
    assert run("merge", dirs["base"], dirs["adapter"], out, "--policy", "untie", "-q") == 1
    err = capsys.readouterr().err
    assert "Input/output error" in err and "check the paths" not in err and "bug" not in err
    assert "Fix:" in err
    assert not out.exists()


def test_a_hub_id_that_names_nothing_is_a_usage_error(
    dirs: dict[str, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """huggingface_hub's refusal of an id (HFValidationError, RepositoryNotFoundError) reaching the command: exit 2."""
    from huggingface_hub.utils import validate_repo_id

    from safemerge._model import load as _load

    monkeypatch.setattr(_load, "checkpoint_dtype", lambda *args, **kwargs: validate_repo_id("org/bad name!"))
    assert run("merge", dirs["base"], dirs["adapter"], dirs["tmp"] / "out", "--policy", "untie", "-q") == 2
    err = capsys.readouterr().err
    assert "safemerge: error: HFValidationError" in err and "Fix: check the paths or hub ids" in err


def test_the_demo_fails_loudly_when_a_verification_fails(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only a TiedWeightsError is the demo's expected refusal; a failed verification stops it with exit 1."""
    from safemerge._checks import verify as _verify

    check_reload = _verify.check_reload

    def failing_check(*args: Any, **kwargs: Any) -> Any:
        verification, reloaded, retie = check_reload(*args, **kwargs)
        return dataclasses.replace(verification, problems=("lm_head.weight: planted problem",)), reloaded, retie

    monkeypatch.setattr(_verify, "check_reload", failing_check)
    assert main(["demo"]) == 1
    captured = capsys.readouterr()
    assert "safemerge: VerificationError: Verification failed: lm_head.weight: planted problem" in captured.err
    assert "policy='untie'" in captured.out and "merged; actions" not in captured.out
