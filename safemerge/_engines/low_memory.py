"""Execute a merge plan without holding the model: the base's weights stay on disk (accelerate's offload hooks),
and each merged tensor is computed, fingerprinted and written into a safetensors shard a block of rows at a time.

The plan's steps are the in-memory engine's own (`in_memory.execute`), with placeholders where they put values
(`Placeholders`); only its `peft-merge` step differs: PEFT's layers are unloaded without merging, and each one's
merged tensors are computed from the adapter's tensors when they are written (`_layer_merge.merged_parameters`: LoRA
in float32, rounded once; PEFT's merge of a copy for the rest).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import gc
import hashlib
import inspect
import json
import logging
import os
import struct
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import safe_open

from safemerge._checks import verify as _verify
from safemerge._checks.finite import refuse_non_finite_merged as refuse_merged
from safemerge._decide.layer_merge import merged_parameters, unloaded
from safemerge._decide.ties import TiedWeights
from safemerge._engines import in_memory
from safemerge._model.offload import load_for_good, weights_loaded
from safemerge._model.probe import model_dtype
from safemerge._model.reload import Fingerprint, LoadSpec
from safemerge._model.rows import Value, block, row_blocks
from safemerge._model.safetensors_format import dtype_name, read_blocks, torch_dtype
from safemerge._model.walk import bare_module, base_parameters, module_of, progress_bars, set_parameter
from safemerge._records import Action, MergePlan

if TYPE_CHECKING:
    from safemerge._decide.analysis import Analysis
    from safemerge._output.claim import Claim
    from safemerge._records import Verification

logger = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"


def default_shard_size() -> str | int:
    """save_pretrained's own default (50GB in transformers 5, 5GB in 4): the output is sharded as it would shard it."""
    from transformers import PreTrainedModel

    default: str | int = inspect.signature(PreTrainedModel.save_pretrained).parameters["max_shard_size"].default
    return default


class Placeholders(in_memory.Values):
    """The plan's values, put in the model as meta placeholders of their shape and dtype and computed (a block of rows
    at a time, where they are Rows) when they are written: no tied tensor is held whole."""

    def __init__(self) -> None:
        # By the placeholder's id, with the placeholder itself: kept alive, its id cannot be another's.
        self.values: dict[int, tuple[torch.nn.Parameter, Value]] = {}

    def parameter(self, value: Value, *, copy: bool, device: torch.device | None = None) -> torch.nn.Parameter:
        placeholder = torch.nn.Parameter(torch.empty(value.shape, dtype=value.dtype, device="meta"), False)
        self.values[id(placeholder)] = placeholder, value  # written under its own name: a copy costs nothing here
        return placeholder

    def value(self, param: torch.Tensor) -> Value:
        return self.values[id(param)][1] if id(param) in self.values else param.detach()

    def pop(self, param: torch.Tensor) -> Value | None:
        """The value of `param` if it is a placeholder, let go of."""
        return self.values.pop(id(param))[1] if id(param) in self.values else None


@dataclass
class Streamed:
    """The merged model's structure (weights on disk or placeholders) and what is still to compute when it is written:
    the planned values, and the PEFT layers whose merge is computed then."""

    model: torch.nn.Module
    values: Placeholders = field(default_factory=Placeholders)
    #: Merged-model name -> (PEFT layer, the name of the parameter in it) for every tensor merged when written.
    layers: dict[str, tuple[torch.nn.Module, str]] = field(default_factory=dict)


def execute(peft_model: Any, plan: MergePlan, tied: TiedWeights) -> tuple[Streamed, list[Action]]:
    """Run `plan` on the offloaded PEFT model: every planned step as in memory, PEFT's merge deferred to the write."""
    root = peft_model.get_base_model()
    # Every tensor a planned step reads or replaces is loaded first: the steps work on real tensors.
    members = {name for action in plan.actions for name in action.members}
    by_name = {p.name: p for p in base_parameters(root)}
    for owner in {id(p.owner): p.owner for n, p in by_name.items() if n in members and p.tensor.is_meta}.values():
        load_for_good(owner)
    streamed = Streamed(torch.nn.Module())

    def unload_without_merging(model: Any) -> Any:
        base = model.get_base_model()
        layers = {p.name: (p.wrapper, p.name_in_wrapper) for p in base_parameters(base)}
        streamed.layers = {name: (w, n) for name, (w, n) in layers.items() if w is not None}
        # What PEFT's unload() leaves, without its onload_layer(): that loads every offloaded base layer and keeps
        # its weights in memory, in the offload hook.
        for path, wrapper in {p.wrapper_path: p.wrapper for p in base_parameters(base) if p.wrapper}.items():
            base.set_submodule(path, bare_module(unloaded(wrapper)))
        streamed.model = base
        for name in sorted(members & set(streamed.layers)):  # a planned step reads its merged value
            layer, name_in_layer = streamed.layers.pop(name)
            set_parameter(base, name, streamed.values.parameter(merged_parameters(layer)[name_in_layer], copy=False))
        return streamed.model

    _, actions = in_memory.execute(peft_model, plan, tied, merge_rest=unload_without_merging, values=streamed.values)
    return streamed, actions


def names_to_save(model: torch.nn.Module, declared: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """The state dict save_pretrained writes: one name per shared tensor (the declared source of a tie, the loader
    restores its aliases)."""
    state = model.state_dict(keep_vars=True)
    by_tensor: dict[int, list[str]] = {}
    for name, tensor in state.items():
        by_tensor.setdefault(id(tensor), []).append(name)
    kept: dict[str, torch.Tensor] = {}
    for names in by_tensor.values():
        sources = [n for n in names if not (n in declared and declared[n] in names)]
        kept[(sources or names)[0]] = state[(sources or names)[0]]
    return {name: kept[name] for name in state if name in kept}


def write(
    streamed: Streamed,
    declared: Mapping[str, str],
    staging: Path,
    max_shard_size: str | int,
    *,
    out_dtype: torch.dtype,
    check: Callable[[str, torch.Tensor], None],
) -> dict[str, Fingerprint]:
    """Write the config, then every tensor a block of rows at a time as it is computed (`check` sees each block
    before it is written) into safetensors shards, and the index. Returns the fingerprint of every tensor written.

    What is written is consumed: the planned values and PEFT layers are let go as their tensors are written."""
    from transformers.utils import logging as transformers_logging

    model = streamed.model
    staging.mkdir(parents=True, exist_ok=True)
    _write_configs(model, staging)
    state = names_to_save(model, declared)
    # Shapes on meta, in the saved dtype: what each shard will hold, before anything is computed.
    saved = {
        name: torch.empty(t.shape, dtype=_saved_dtype(t.dtype, out_dtype), device="meta") for name, t in state.items()
    }
    split = split_torch_state_dict_into_shards(saved, max_shard_size=max_shard_size)
    written: dict[str, Fingerprint] = {}
    shards = transformers_logging.tqdm(
        split.filename_to_tensors.items(), desc="Writing merged shards", disable=not progress_bars()
    )
    for filename, tensor_names in shards:
        # Widest elements first, as safetensors lays them out: every tensor's data stays aligned to its element.
        ordered = sorted(tensor_names, key=lambda name: -saved[name].element_size())
        with (staging / filename).open("wb") as file:
            file.write(_header({name: saved[name] for name in ordered}))
            for name in ordered:
                with _computed(streamed, name, state[name]) as value:
                    written[name] = _stream_tensor(file, name, value, saved[name].dtype, check)
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (staging / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return written


@contextmanager
def freed_memory_returned() -> Iterator[None]:
    """While the context runs, have glibc's malloc give every block of 1 MiB or more back to the operating system
    when it is freed (`mallopt(M_MMAP_THRESHOLD)`; elsewhere than glibc, nothing); then put the threshold back.

    By default glibc keeps freed blocks of the sizes a merge allocates over and over (a layer's weights, a block of
    rows) in its heaps, and the process's memory grows with every layer although nothing is held: 2.0 GB in place of
    1.0 GB on the benchmark's 1.24B model. The price is a page fault per page of each large allocation.

    glibc has no getter: the threshold put back is the one the process started with (`MALLOC_MMAP_THRESHOLD_` or
    `GLIBC_TUNABLES=glibc.malloc.mmap_threshold=N`), else glibc's default, 128 KiB. What stays different without
    those: setting the threshold turns off glibc's dynamic threshold for good (no call turns it back on), so it stays
    at 128 KiB instead of rising towards 32 MiB with the blocks the program frees, and blocks of 128 KiB or more are
    still given back to the system when freed.
    """
    restore = _starting_mmap_threshold()
    _set_mmap_threshold(1 << 20)
    try:
        yield
    finally:
        _set_mmap_threshold(restore)


#: glibc's default M_MMAP_THRESHOLD (malloc.h: DEFAULT_MMAP_THRESHOLD_MIN, 128 KiB).
_GLIBC_DEFAULT_MMAP_THRESHOLD = 128 * 1024


def _starting_mmap_threshold() -> int:
    """The threshold glibc took from the environment at start-up (the later setting wins), or its default."""
    value = _GLIBC_DEFAULT_MMAP_THRESHOLD
    for tunable in os.environ.get("GLIBC_TUNABLES", "").split(":"):
        name, _, number = tunable.partition("=")
        if name == "glibc.malloc.mmap_threshold":
            value = _parse_size(number, value)
    return _parse_size(os.environ.get("MALLOC_MMAP_THRESHOLD_", ""), value)


def _parse_size(text: str, default: int) -> int:
    try:
        return int(text, 0)
    except ValueError:  # unset, or a value glibc would ignore too
        return default


def _set_mmap_threshold(value: int) -> None:
    """mallopt(M_MMAP_THRESHOLD, value) on Linux with glibc; nothing elsewhere. The one call that changes it."""
    if sys.platform != "linux":
        return
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return
    mallopt(_M_MMAP_THRESHOLD, value)


_M_MMAP_THRESHOLD = -3  # glibc's malloc.h


def _saved_dtype(dtype: torch.dtype, out_dtype: torch.dtype) -> torch.dtype:
    """Floating-point tensors are saved in `out_dtype`, others as they are."""
    return out_dtype if dtype.is_floating_point else dtype


def _header(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """The start of a safetensors file holding `tensors` in this order (https://github.com/huggingface/safetensors,
    "Format"): the header's length (u64, little-endian), then the JSON header padded to 8 bytes. Written by hand
    because safetensors' writers take whole tensors; safetensors' reader checks every file when it is read back."""
    if sys.byteorder != "little":
        raise OSError("safetensors files are little-endian; the low-memory merge writes native bytes")
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": dtype_name(tensor.dtype),
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


@contextmanager
def _computed(streamed: Streamed, name: str, param: torch.Tensor) -> Iterator[Value]:
    """The merged value of `name`: a planned value, a PEFT layer's merge (its base layer's weights loaded meanwhile),
    a tensor in memory, or an offloaded one loaded meanwhile."""
    if name in streamed.layers:
        layer, name_in_layer = streamed.layers.pop(name)
        with weights_loaded(layer):
            yield merged_parameters(layer)[name_in_layer]
    elif (value := streamed.values.pop(param)) is not None:
        yield value
    elif not param.is_meta:
        yield param.detach()
    else:
        owner = module_of(streamed.model, name)
        with weights_loaded(owner):
            yield getattr(owner, name.rpartition(".")[2]).detach()


def _stream_tensor(
    file: BinaryIO, name: str, value: Value, dtype: torch.dtype, check: Callable[[str, torch.Tensor], None]
) -> Fingerprint:
    """Write `value` in `dtype`, a block of rows at a time; its fingerprint (the digest of the bytes written)."""
    digest = hashlib.sha1(usedforsecurity=False)
    for rows in row_blocks(value):
        data = block(value, *rows).to(dtype).contiguous()
        check(name, data)
        raw = _bytes(data)
        file.write(raw)
        digest.update(raw)
    return tuple(value.shape), dtype, digest.hexdigest()


def _bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, not a copy."""
    return tensor.reshape(-1).view(torch.uint8).numpy().data


def _write_configs(model: Any, staging: Path) -> None:
    """config.json (with the plan's tie flags) and generation_config.json, as save_pretrained writes them."""
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(staging)
    if model.can_generate() and getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(staging)


def reread(staging: Path) -> dict[str, Fingerprint]:
    """The fingerprint of every tensor in the written shards, read back from disk a block of rows at a time."""
    found: dict[str, Fingerprint] = {}
    for path in sorted(staging.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as shard:
            slices = {name: shard.get_slice(name) for name in shard.keys()}  # noqa: SIM118 (not a mapping)
            layout = {name: (tuple(s.get_shape()), torch_dtype(s.get_dtype())) for name, s in slices.items()}
        for name, (shape, dtype) in layout.items():
            digest = hashlib.sha1(usedforsecurity=False)
            for _, _, data in read_blocks(str(path), name):
                digest.update(_bytes(data.contiguous()))
            found[name] = (shape, dtype, digest.hexdigest())
    return found


class LowMemory:
    """The low-memory engine (`_pipeline.Engine`): the adapter model loaded with the base's weights offloaded, the
    plan executed with placeholders, each merged tensor computed as it is written and read back from disk."""

    holds = (
        "the tied embedding, one linear layer's weights and a block of rows at a time; the base's weights stay on "
        "disk (accelerate's offload)"
    )
    owned = True
    returns_model = False
    keeps_values = False
    saved_as = " as safetensors shards, a block of rows at a time"

    def __init__(self, load_model: Callable[[str], Any], load_trained: Callable[[], Any] | None = None) -> None:
        """`load_model(offload_folder)` loads the adapter model with the base's weights offloaded; for a quantized
        base, the 16-bit stand-in (its weights read dequantized, or the original's), and `load_trained()` the
        model as trained (the adapter on the quantized base) beside it."""
        self._load_model = load_model
        self._load_trained = load_trained
        self._streamed = Streamed(torch.nn.Module())
        self._dtype: torch.dtype | None = None  # the saved dtype, if cast
        self._written: dict[str, Fingerprint] = {}

    def model(self, held: Claim) -> Any:
        return self._load_model(str(held.offload))

    def trained(self) -> Any:
        return self._load_trained() if self._load_trained is not None else None

    def execute(self, model: Any, plan: MergePlan, tied: TiedWeights) -> tuple[Any, list[Action]]:
        self._streamed, actions = execute(model, plan, tied)
        return self._streamed.model, actions

    def value_of(self, param: torch.Tensor) -> Value:
        return self._streamed.values.value(param)

    def cast(self, merged: Any, dtype: torch.dtype) -> None:
        self._dtype = dtype  # each tensor is cast as it is written

    def write(
        self, merged: Any, staging: Path, analysis: Analysis, *, max_shard_size: str | int | None, verify: bool
    ) -> None:
        analysis.drop_values()  # the planned values hold what is written
        dtype = self._dtype or model_dtype(merged)
        logger.info("writing to %s", staging)
        shard_size = max_shard_size or default_shard_size()
        declared = analysis.facts.declared
        self._written = write(self._streamed, declared, staging, shard_size, out_dtype=dtype, check=refuse_merged)
        gc.collect()  # what the write let go of, held in reference cycles (PEFT's layers), before the reload

    def check_saved(
        self, held: Claim, analysis: Analysis, plan: MergePlan, verification: Verification
    ) -> tuple[Verification, Any, list[Action]]:
        """Read the files back and probe the model loaded from them (`_verify.check_written`)."""
        merged = self._streamed.model
        load = dataclasses.replace(LoadSpec.like(merged), dtype=self._dtype or model_dtype(merged))
        checked = _verify.check_written(
            held.staging, self._written, reread, analysis, plan, verification, config=merged.config,
            load=load, offload_folder=held.offload,
        )  # fmt: skip
        return checked, merged, []
