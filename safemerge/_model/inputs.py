"""Check every input and output path, and the numbers, before any weight is loaded or any byte is written."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from safemerge._text import listed
from safemerge.errors import InputError, SafeMergeError

#: A safetensors header larger than this is not a header (the format's own readers cap it at 100 MB).
_MAX_HEADER = 100_000_000


#: The file that makes a directory a model's (transformers) or an adapter's (PEFT).
MODEL_CONFIG, ADAPTER_CONFIG = "config.json", "adapter_config.json"
#: What writes each kind of directory, by the file that marks it: named in the fix.
_WRITERS = {MODEL_CONFIG: "model.save_pretrained(DIR)", ADAPTER_CONFIG: "peft_model.save_pretrained(DIR)"}


def local_path(name: str | os.PathLike[str], role: str, *, holds: str) -> Path | None:
    """The local directory `name` names, or None for a hub id. A name that looks like a path must be a directory
    here that holds `holds` (config.json, adapter_config.json): it is never looked up on the hub (that would only
    answer with a confusing repo-id error, after retries).

    Raises:
        InputError: `name` looks like a path and does not exist, is a file, or is a directory without `holds`.
    """
    problem = path_problem(name, role, holds=holds)
    if problem is not None:
        what, fix = problem
        raise InputError(f"{what} Nothing was loaded or written. Fix: {fix[0].lower()}{fix[1:]}")
    path = Path(name).expanduser()
    return path if path.exists() else None


def path_problem(name: str | os.PathLike[str], role: str, *, holds: str) -> tuple[str, str] | None:
    """Why `name` cannot be the directory of a `role` that holds `holds`, as (what is wrong, the fix); None for a
    usable directory or a hub id. The doctor reports the same text as a finding."""
    path = Path(name).expanduser()
    text = os.fspath(name)
    if not path.exists():
        # Hub ids are "name" or "organisation/name"; anything else can only be a local path.
        looks_local = text.startswith(("/", ".", "~")) or text.endswith("/") or text.count("/") > 1 or "\\" in text
        if not looks_local:
            return None
        return (
            f"The {role} '{text}' does not exist (no such file or directory).",
            "Check the path (a hub id has the form 'organisation/name').",
        )
    writer = _WRITERS.get(holds, "save_pretrained(DIR)")
    if not path.is_dir():
        folder = path.parent
        where = f"'{folder}'" if (folder / holds).is_file() else f"that holds {holds}"
        return (
            f"The {role} '{text}' is a file, not a directory: {writer} writes a directory, with {holds} in it.",
            f"Pass the directory {where}.",
        )
    if not (path / holds).is_file():
        nested = sorted({p.parent for p in [*path.glob(f"*/{holds}"), *path.glob(f"*/*/{holds}")]})
        inside = f" (sub-folders that have one: {', '.join(str(n) for n in nested[:4])})" if nested else ""
        return (
            f"The {role} '{text}' is a directory without {holds}: not what {writer} writes.",
            f"Pass the directory that holds {holds}{inside}.",
        )
    return None


def check_tolerance(value: float | None) -> None:
    if value is not None and not (math.isfinite(value) and value >= 0):
        raise InputError(
            f"logits_tolerance must be a finite number >= 0, got {value!r}; nothing was loaded. Fix: leave it unset "
            "(the default follows the dtype) or pass e.g. 1e-3."
        )


def check_outputs(outputs: dict[str, Path], inputs: dict[str, Path]) -> None:
    """Refuse an output that is, or is inside, or contains an input (or another output): it would overwrite it."""
    resolved_inputs = {role: path.resolve() for role, path in inputs.items()}
    for role, path in outputs.items():
        where = path.resolve()
        for other, source in resolved_inputs.items():
            if where == source or source in where.parents or where in source.parents:
                relation = "is" if where == source else "is inside" if source in where.parents else "contains"
                raise InputError(
                    f"The {role} '{path}' {relation} the {other} '{inputs[other]}': writing it would overwrite or "
                    f"delete the {other}. Nothing was loaded or written. Fix: choose an {role} outside the inputs."
                )
    if "report" in outputs and "output directory" in outputs:
        report, out = outputs["report"].resolve(), outputs["output directory"].resolve()
        if report == out or out in report.parents:
            raise InputError(
                f"The report '{outputs['report']}' is the output directory or inside it, where only the verified "
                "model may go. Nothing was loaded or written. Fix: write the report beside the output directory."
            )
        if report.is_dir():
            raise InputError(
                f"The report '{outputs['report']}' is a directory. Fix: give a file name, e.g. report.json."
            )


def check_files(directory: Path) -> None:
    """Every safetensors file in `directory` is whole (a readable header whose tensors lie inside the file), and an
    adapter's pickled weights load as plain tensors (adapters are small; a base's .bin is left to the loader)."""
    for path in sorted(directory.glob("*.safetensors")):
        problem = safetensors_problem(path)
        if problem is not None:
            raise damaged(path, problem)
    adapter_bin = directory / "adapter_model.bin"
    if adapter_bin.is_file() and not (directory / "adapter_model.safetensors").is_file():
        import torch

        try:
            torch.load(adapter_bin, map_location="cpu", weights_only=True)
        except Exception as exc:
            if _whole_pickle(adapter_bin):
                return  # a pickle of Python objects beyond tensors, not a damaged one: the doctor explains it
            raise damaged(adapter_bin, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from exc


def _whole_pickle(path: Path) -> bool:
    """Whether `path` is an intact pickle stream (torch's zip format or a bare pickle), whatever it holds."""
    import pickletools
    import zipfile

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                name = next(n for n in archive.namelist() if n.endswith("data.pkl"))
                data = archive.read(name)
        else:
            data = path.read_bytes()
        for _ in pickletools.genops(data):
            pass
    except Exception:  # truncated, not a pickle, a broken zip
        return False
    return True


#: The fix for a damaged input file (the doctor's finding says it too).
DAMAGED_FIX = "Copy or download it again (an interrupted copy or a full disk leaves files like this)."


def damaged(path: Path, problem: str) -> InputError:
    return InputError(
        f"This file is damaged: {path} ({problem}). Nothing was loaded or written. Fix: c{DAMAGED_FIX[1:]}"
    )


def safetensors_problem(path: Path) -> str | None:
    """What is wrong with a safetensors file's header, or None (reads the header only)."""
    size = path.stat().st_size
    try:
        with path.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                return f"{size} bytes: too short for a safetensors header"
            length = int.from_bytes(prefix, "little")
            if length > min(_MAX_HEADER, size - 8):
                return f"its header length is {length} bytes, the file has {size}"
            header = json.loads(handle.read(length))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"its header is not readable JSON: {exc}"
    if not isinstance(header, dict):
        return "its header is not a JSON object"
    return _tensor_problem(header, size - 8 - length)


def _tensor_problem(header: dict[str, Any], data_size: int) -> str | None:
    # Imported here, as torch with it: `--help` and argument errors answer before any heavy import.
    from safemerge._model.safetensors_format import DTYPES

    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = entry["data_offsets"]
            count = math.prod(entry["shape"])
            known = DTYPES.get(str(entry.get("dtype")))  # (torch dtype, bits); None: left to the reader
        except (TypeError, KeyError, ValueError, AttributeError):
            return f"tensor {name} has no valid data_offsets / shape"
        if not 0 <= start <= end:
            return f"tensor {name} has data offsets {start}..{end}"
        if end > data_size:
            return f"truncated: its header says the data ends at byte {end}, the file holds {data_size}"
        if known is not None and (end - start) * 8 != count * known[1]:
            return f"tensor {name} holds {end - start} bytes for shape {entry['shape']}"
    return None


def named_inputs(pairs: Iterable[tuple[str, Path | None]]) -> dict[str, Path]:
    return {role: path for role, path in pairs if path is not None}


def local_inputs(base: str | os.PathLike[str], adapter: str | os.PathLike[str]) -> dict[str, Path]:
    """The local base and adapter directories by role (hub ids left out), each checked by local_path."""
    return named_inputs(
        [
            ("base model", local_path(base, "base model", holds=MODEL_CONFIG)),
            ("adapter", local_path(adapter, "adapter", holds=ADAPTER_CONFIG)),
        ]
    )


@contextmanager
def load_failures_as_input_errors(what: str, fix: str) -> Iterator[None]:
    """transformers / PEFT / safetensors / torch.load: every way a file can fail to load, as one InputError."""
    try:
        yield
    except SafeMergeError:
        raise
    except Exception as exc:
        raise InputError(f"{what} ({type(exc).__name__}: {str(exc).strip()[:400]}). {fix}") from exc


_OFFLOAD_FIX = (
    "Fix: merge with the low-memory engine, made for models bigger than memory (merge_pretrained(..., "
    "low_memory=True); CLI: --low-memory, without --device-map), or give a device map that puts every module on a "
    "device with room for it (device_map='cuda', or {'': 'cpu'})."
)


def check_device_map(device_map: Any, *, nothing: str = "Nothing was loaded.") -> None:
    """Refuse a device map that offloads weights: the in-memory merge cannot use it (`nothing`: what was not done)."""
    if not isinstance(device_map, dict):
        return  # "auto" and the like: known once loaded (check_not_offloaded)
    places = {str(place) for place in device_map.values()}
    # "cpu" is where the weights stay unless accelerate also runs layers elsewhere: then it offloads them there
    on_accelerator = bool(places - {"cpu", "disk"})
    offloaded = sorted(
        name for name, place in device_map.items() if str(place) == "disk" or (str(place) == "cpu" and on_accelerator)
    )
    if offloaded:
        shown = listed([repr(n) for n in offloaded], limit=3)
        raise InputError(
            f"The device map offloads {shown} ('disk', or 'cpu' beside other devices): accelerate then keeps those "
            "weights out of the model and loads them only while a layer runs, so the in-memory merge would compute "
            f"its merged weights from empty placeholders. {nothing} {_OFFLOAD_FIX}"
        )


def check_not_offloaded(model: Any) -> None:
    """Refuse a model whose weights accelerate offloaded (they sit on the `meta` device): the in-memory merge reads
    and writes every weight in the model."""
    offloaded = [name for name, param in model.named_parameters() if param.is_meta]
    if offloaded:
        shown = listed(offloaded, limit=3)
        raise InputError(
            f"{len(offloaded)} weights of this model are offloaded by accelerate (on the meta device: {shown}), as a "
            "device map with 'cpu'/'disk' entries or device_map='auto' on a model bigger than the devices leaves them; "
            "the in-memory merge would compute its merged weights from empty placeholders. Nothing was changed. "
            + _OFFLOAD_FIX
        )
    # transformers may keep such weights in place while loading, but the reload of the saved model (with the map the
    # base was loaded with; PEFT's own map is {'base_model': device}) offloads them
    check_device_map(getattr(model.get_base_model(), "hf_device_map", None), nothing="Nothing was changed.")
