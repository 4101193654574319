"""Developer and CI sessions. `nox` alone runs the defaults; `.ci/run` runs the other stacks through here."""

from __future__ import annotations

import tarfile
from pathlib import Path

import nox

nox.options.sessions = ["tests", "lint", "typecheck", "docs"]
nox.options.default_venv_backend = "venv"

# torch first, pinned to the CPU wheel on local disk: a bare `torch` requirement pulls a multi-GB CUDA build.
TORCH = "torch==2.13.0"

#: The supported stacks besides the current releases, and the declared lower bounds of pyproject.toml.
TRANSFORMERS_4 = ["transformers==4.57.6", "peft==0.18.1"]
LOWEST = [
    "transformers==4.57.1",
    "peft==0.18.0",
    "accelerate==1.3.0",
    "safetensors==0.4.3",
    "huggingface_hub==0.34.0",
]


#: llama.cpp's converter (convert_hf_to_gguf.py) as published on PyPI: the llama-cpp-python sdist vendors llama.cpp.
#: Pinned by its hash (the serving table and safemerge's GGUF layout were read from this release).
LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
LLAMA_CPP_PYTHON_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
#: What the converter runs from: its script, its model classes, and the gguf-py it puts first on sys.path.
CONVERTER_PATHS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")


def _test(session: nox.Session, *pins: str, args: tuple[str, ...] = (), env: dict[str, str] | None = None) -> None:
    session.install(TORCH)
    session.install("-e", ".[test]", *pins)
    session.run("python", "-m", "pip", "list", "--format=freeze", silent=False)
    session.run("pytest", *args, *session.posargs, env=env)


@nox.session(python="3.11")
def tests(session: nox.Session) -> None:
    """Run the test suite on the current releases of transformers and PEFT."""
    _test(session)


@nox.session(python="3.11")
def matrix(session: nox.Session) -> None:
    """Run every merge case of the matrix (in memory and reloaded, and the low-memory engine against the in-memory
    one), the pre-training check on every case, every fault, the doctor on every case, every corpus merge, and the
    QLoRA, added-tokens, serving and GGUF cases, on the current releases."""
    tests = (
        "tests/test_merge.py",
        "tests/test_low_memory.py",
        "tests/test_training.py",
        "tests/test_faults.py",
        "tests/test_doctor.py",
        "tests/test_corpus.py",
        "tests/test_qlora.py",
        "tests/test_qlora_low_memory.py",
        "tests/test_added_tokens.py",
        "tests/test_serving.py",
        "tests/test_gguf.py",
    )
    _test(session, args=(*tests, "--full-matrix"))


@nox.session(python="3.11")
def tests_transformers4(session: nox.Session) -> None:
    """Run the test suite, with the full merge matrix, on the second supported stack: transformers 4.57.6 + peft
    0.18.1."""
    _test(session, *TRANSFORMERS_4, args=("--full-matrix",))


@nox.session(python="3.11")
def trl(session: nox.Session) -> None:
    """SafeMergeCallback under TRL's SFTTrainer (TRL is an optional dependency; the other sessions skip its test)."""
    _test(session, "trl", args=("tests/test_training.py",))


@nox.session(python="3.11")
def gguf_converter(session: nox.Session) -> None:
    """safemerge verify on GGUF files written by llama.cpp's own converter from tiny merged models (Llama untied and
    keep pass; an untied Gemma2 and a plain merge_and_unload() of a tied Llama with an lm_head LoRA fail). The
    converter comes from the llama-cpp-python sdist on PyPI, pinned by hash, kept in nox's cache."""
    converter = _llama_cpp_converter(session)
    env = {"SAFEMERGE_GGUF_CONVERTER": str(converter), "HF_HUB_OFFLINE": "1"}
    # sentencepiece: the converter reads a tokenizer.model with it (the only tokenizer Gemma2's conversion takes).
    _test(session, "sentencepiece", args=("tests/test_gguf_converter.py", "-n", "0"), env=env)


def _llama_cpp_converter(session: nox.Session) -> Path:
    """convert_hf_to_gguf.py and what it imports, extracted from the pinned llama-cpp-python sdist (downloaded with
    pip, hash-checked, once: nox's cache keeps it)."""
    name = LLAMA_CPP_PYTHON.replace("-", "_").replace("==", "-")
    root = Path(session.cache_dir) / name
    script = root / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"
    if script.is_file():
        return script
    download = Path(session.create_tmp()) / "sdist"
    download.mkdir(exist_ok=True)
    pinned = download / "requirements.txt"
    pinned.write_text(f"{LLAMA_CPP_PYTHON} --hash=sha256:{LLAMA_CPP_PYTHON_SHA256}\n")
    session.run(
        "python", "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--require-hashes",
        "-r", str(pinned), "-d", str(download),
    )  # fmt: skip
    wanted = tuple(f"{name}/vendor/llama.cpp/{path}" for path in CONVERTER_PATHS)
    unpacked = download / "unpacked"
    with tarfile.open(download / f"{name}.tar.gz") as sdist:
        members = [m for m in sdist.getmembers() if m.name.startswith(wanted) and (m.isfile() or m.isdir())]
        if any(".." in Path(m.name).parts for m in members):
            session.error(f"{name}.tar.gz names a path outside its folder: not extracted")
        sdist.extractall(unpacked, members=members)
    # Moved into the cache whole: an interrupted extraction never leaves a converter missing some of its modules.
    (unpacked / name).rename(root)
    return script


@nox.session(python="3.11")
def lowest(session: nox.Session) -> None:
    """Prove the lower bounds declared in pyproject.toml install and pass."""
    _test(session, *LOWEST)


@nox.session(python="3.11")
def lint(session: nox.Session) -> None:
    """ruff: lint and formatting."""
    session.install("ruff")
    session.run("ruff", "check", "safemerge", "tests", "docs", "scripts", "noxfile.py")
    session.run("ruff", "format", "--check", "safemerge", "tests", "docs", "scripts", "noxfile.py")


@nox.session(python="3.11")
def bench(session: nox.Session) -> None:
    """Figures: doctor time on an 8B-shaped config; plain merge vs safe_merge over the test matrix; time and peak
    memory of a verified merge of a 1.24B model against plain PEFT (`nox -s bench -- --size small` for a quick run)."""
    session.install(TORCH)
    session.install("-e", ".[test]")
    session.run("python", "benchmarks/doctor_8b.py")
    session.run("python", "benchmarks/plain_vs_safe.py")
    session.run("python", "benchmarks/merge_cost.py", *session.posargs)


@nox.session(python="3.11")
def bench_qlora(session: nox.Session) -> None:
    """Figures of docs/how-to/qlora.md: the quantization gap of `base_weights="original"` against the fine-tune's
    effect, the dequantized merge and PEFT's merge into the 4-bit layers, on the 1.24B model in nf4 on the CPU
    (`nox -s bench_qlora -- --size small` for a quick run)."""
    session.install(TORCH)
    session.install("-e", ".[test,qlora]")
    session.run("python", "benchmarks/qlora_gap.py", *session.posargs)


@nox.session(python="3.11")
def docs(session: nox.Session) -> None:
    """Build the documentation site into site/, warnings as errors (mkdocs strict mode)."""
    session.install("mkdocs>=1.6", "mkdocstrings[python]>=0.26")
    session.run("mkdocs", "build", "--strict", "-d", "site")


@nox.session(python="3.11")
def typecheck(session: nox.Session) -> None:
    """mypy, strict on the package."""
    session.install(TORCH)
    # The optional extras too: mypy reads bitsandbytes and gguf where safemerge imports them.
    session.install("-e", ".[qlora,gguf]", "mypy")
    session.run("mypy")
