"""Load what was saved with transformers' own loader, and compare models tensor by tensor without holding both."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
import transformers
from transformers.utils import logging as transformers_logging

from safemerge._model.probe import model_device, model_dtype
from safemerge._model.rows import max_abs_diff
from safemerge._model.walk import progress_bars, storage_key, tie_groups

#: The Auto classes a merged model may be loaded with, most specific first.
_AUTO_CLASSES = (
    "AutoModelForCausalLM",
    "AutoModelForSeq2SeqLM",
    "AutoModelForImageTextToText",
    "AutoModelForSequenceClassification",
    "AutoModelForTokenClassification",
    "AutoModelForQuestionAnswering",
    "AutoModelForMaskedLM",
    "AutoModelForVision2Seq",
    "AutoModel",
)


def auto_class_for(model: torch.nn.Module) -> Any:
    """The transformers Auto class that maps this model's config to this model's class."""
    config_class = type(model.config)
    for name in _AUTO_CLASSES:
        mapping = getattr(getattr(transformers, name, None), "_model_mapping", None)
        if mapping is None:
            continue
        try:
            mapped = mapping[config_class]
        except (KeyError, ValueError):
            continue
        if type(model) in (mapped if isinstance(mapped, tuple | list) else (mapped,)):
            return getattr(transformers, name)
    return type(model)  # a class the Auto mappings do not know: its own loader


@dataclass(frozen=True)
class LoadSpec:
    """How to load a saved model as another one was: its loader class, dtype and device."""

    loader: Any
    dtype: torch.dtype
    device: torch.device
    #: The accelerate device map the model was loaded with (None: one device); the reload uses it too.
    device_map: Any = None

    @classmethod
    def like(cls, model: torch.nn.Module) -> LoadSpec:
        device_map = getattr(model, "hf_device_map", None)
        return cls(auto_class_for(model), model_dtype(model), model_device(model), device_map)


def reload(
    save_directory: str | os.PathLike[str], like: torch.nn.Module | LoadSpec, *, offload_folder: str | None = None
) -> Any:
    """Load `save_directory` with transformers' own loader, in `like`'s class, dtype and device; with
    `offload_folder`, its weights stay on disk and accelerate loads each layer's when the layer runs."""
    spec = like if isinstance(like, LoadSpec) else LoadSpec.like(like)
    if offload_folder is not None:
        from safemerge._model.offload import all_on_disk, load_tie_groups

        on_disk = all_on_disk(spec.loader, str(save_directory))
        offloaded = spec.loader.from_pretrained(
            str(save_directory), dtype=spec.dtype, device_map=on_disk, offload_folder=offload_folder
        )
        # transformers 4's offload hooks look a tied alias up under its own name, which the checkpoint does not hold
        load_tie_groups(offloaded)
        return offloaded.eval()
    if spec.device_map is not None:  # spread over devices as the merged model was
        return spec.loader.from_pretrained(str(save_directory), dtype=spec.dtype, device_map=spec.device_map).eval()
    model = spec.loader.from_pretrained(str(save_directory), dtype=spec.dtype)
    return model.to(spec.device).eval()


#: (shape, dtype, digest of the bytes) of a tensor.
Fingerprint = tuple[tuple[int, ...], torch.dtype, str]


def fingerprints(model: torch.nn.Module) -> dict[str, Fingerprint]:
    """A fingerprint of every state-dict tensor: enough to tell bit-identical tensors apart once the model is gone.

    Hashing reads each tensor once, in threads (hashlib releases the GIL), and copies only tensors off the CPU.
    """
    state = model.state_dict()
    unique = {storage_key(t): t for t in state.values()}  # tied names share one tensor: hash it once
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        hashed = pool.map(fingerprint, unique.values())
        shown = transformers_logging.tqdm(
            hashed, total=len(unique), desc="Fingerprinting tensors", disable=not progress_bars()
        )
        by_storage = dict(zip(unique, shown, strict=True))
    return {name: by_storage[storage_key(t)] for name, t in state.items()}


def fingerprint(tensor: torch.Tensor) -> Fingerprint:
    data = tensor.detach().cpu().contiguous()
    raw: Any = data.reshape(-1).view(torch.uint8).numpy()  # a buffer over the tensor's bytes, not a copy
    digest = hashlib.sha1(raw, usedforsecurity=False).hexdigest()
    return tuple(data.shape), data.dtype, digest


def compare_with_fingerprints(
    expected: Mapping[str, Fingerprint], actual: torch.nn.Module
) -> tuple[int, dict[str, str]]:
    """Compare every state-dict tensor of `actual` with the fingerprints of another model; (number, {name: what})."""
    return compare_fingerprints(expected, fingerprints(actual))


def compare_fingerprints(
    expected: Mapping[str, Fingerprint], got: Mapping[str, Fingerprint]
) -> tuple[int, dict[str, str]]:
    """Compare two sets of fingerprints by name; returns (number compared, {name: what differs})."""
    problems = {name: "missing after reload" for name in expected if name not in got}
    problems |= {name: "not in the merged model" for name in got if name not in expected}
    for name, (shape, dtype, digest) in expected.items():
        if name not in got:
            continue
        other_shape, other_dtype, other_digest = got[name]
        if (other_shape, other_dtype) != (shape, dtype):
            problems[name] = f"{other_shape} {other_dtype} instead of {shape} {dtype}"
        elif other_digest != digest:
            problems[name] = "values differ (not bit-identical)"
    return sum(name in got for name in expected), problems


def compare_state(expected: torch.nn.Module, actual: torch.nn.Module) -> tuple[int, dict[str, str]]:
    """Compare every state-dict tensor bit for bit; returns (number compared, {name: what differs})."""
    want, got = expected.state_dict(), actual.state_dict()
    problems = {name: "missing after reload" for name in want if name not in got}
    problems |= {name: "not in the merged model" for name in got if name not in want}
    compared = 0
    for name, tensor in want.items():
        other = got.get(name)
        if other is None:
            continue
        compared += 1
        if other.shape != tensor.shape or other.dtype != tensor.dtype:
            problems[name] = f"{tuple(other.shape)} {other.dtype} instead of {tuple(tensor.shape)} {tensor.dtype}"
        elif not torch.equal(other.to(tensor.device), tensor):
            problems[name] = f"values differ (max |difference| {max_abs_diff(other.cpu(), tensor.cpu()):.3g})"
    return compared, problems


def compare_ties(expected: torch.nn.Module, actual: torch.nn.Module) -> list[str]:
    """Differences between the tie groups of two models."""
    want = {frozenset(g) for g in tie_groups(expected)}
    got = {frozenset(g) for g in tie_groups(actual)}
    problems = [f"tied in the merged model, not after reload: {sorted(g)}" for g in want - got]
    problems += [f"tied after reload, not in the merged model: {sorted(g)}" for g in got - want]
    return problems
