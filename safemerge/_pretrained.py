"""merge_pretrained(): a merge from files or hub ids. The request checked, the doctor (no weights loaded), the
tokenizer and the saved dtype, then the pipeline with one engine: in memory, or low memory from disk."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from safemerge import _pipeline
from safemerge._doctor import doctor
from safemerge._engines.in_memory import InMemory
from safemerge._engines.low_memory import LowMemory, freed_memory_returned
from safemerge._model import inputs as _inputs
from safemerge._model import load as _load
from safemerge._model import vocabulary as _vocabulary
from safemerge._model.offload import load_offloaded_adapter_model
from safemerge._model.prequantized import load_dequantized_adapter_model
from safemerge._model.quantized import Quantization
from safemerge._output import ship as _ship
from safemerge._records import MergeReport, TiePolicy, VocabularyResize
from safemerge._request import MergeRequest
from safemerge.errors import AdapterMismatchError

logger = logging.getLogger(__name__)


def merge_pretrained(
    base: str,
    adapter: str,
    save_directory: str | os.PathLike[str],
    *,
    policy: TiePolicy | str,
    dtype: torch.dtype | str | None = None,
    device_map: Any = None,
    verify: bool = True,
    overwrite: bool = False,
    logits_tolerance: float | None = None,
    low_memory: bool = False,
    max_shard_size: str | int | None = None,
    out_dtype: torch.dtype | str | None = None,
    push_to_hub: str | None = None,
    private: bool = False,
    revision: str | None = None,
    adapter_revision: str | None = None,
    token: str | None = None,
    trust_remote_code: bool = False,
    base_weights: Literal["dequantized", "original"] | None = None,
    original_base: str | None = None,
    serve_with: str | Sequence[str] | None = None,
) -> MergeReport:
    """Load `base` and `adapter` and merge them as safe_merge() does: the doctor runs first (an `error` or `silent`
    finding stops it); the merged model is freed once saved, and `report.model` is the one loaded back (None with
    `low_memory`: each merged tensor is computed from the files a block of rows at a time).

    Args:
        base: the base model, a local directory or hub id.
        adapter: the PEFT adapter trained on it, a local directory or hub id.
        save_directory: where the merged model goes (written into a temporary sibling, renamed into place).
        policy: "keep", "untie" or "refuse" (or a `TiePolicy`).
        dtype: the dtype to load and compute in (default "auto": the checkpoint's own).
        device_map: accelerate device map (not with `low_memory`); one that offloads weights is refused.
        verify: check the merged and the saved model against the adapter model.
        overwrite: replace a non-empty `save_directory` once the new model is verified.
        logits_tolerance: max |logits difference| accepted (default: relative to the dtype and the logits' scale).
        low_memory: keep the base's weights on disk and write the merged model a block of rows at a time.
        max_shard_size: largest output shard ("5GB", "300MB" or bytes; default: save_pretrained's).
        out_dtype: the dtype to save in (default: the checkpoint's own, whatever `dtype` is).
        push_to_hub: a hub repository to upload the verified directory to (created if missing).
        private: create that repository private.
        revision: the base's revision on the hub (branch, tag or commit).
        adapter_revision: the adapter's revision on the hub.
        token: a hub token (default: huggingface_hub's own, from HF_TOKEN or `hf auth login`).
        trust_remote_code: let transformers run the base repository's own model code (off unless asked).
        base_weights: as in safe_merge(), for a pre-quantized base (docs/how-to/qlora.md).
        original_base: as in safe_merge().
        serve_with: the runtimes the merge will be served with ("vllm", "llama.cpp"), as in safe_merge().

    Raises:
        AdapterMismatchError: the doctor found that the adapter does not fit the base (nothing was loaded).
        InputError: an input is missing, damaged or does not load; a bad option or combination of options (see
            safe_merge(); QuantizedBaseError for a pre-quantized base; VocabularyError for added tokens the adapter
            lacks rows for, or a tokenizer larger than the merged vocabulary); nothing was loaded or written.
        SafeMergeError: TiedWeightsError, ServingTargetError, UnsupportedAdapterError, OutputExistsError,
            OutputWriteError or VerificationError, as in safe_merge() (a failed verification's files are quarantined).
    """
    return merge(MergeRequest.for_pretrained(**locals()))  # every parameter, by name, checked in the documented order


def merge(request: MergeRequest) -> MergeReport:
    """merge_pretrained()'s merge of a checked request: the vocabulary (a resize as training made, the tokenizer that
    ships), the doctor, then the pipeline with the engine it asks for, the base resized as the adapter was trained."""
    assert request.base is not None and request.adapter is not None
    base, adapter, hub = request.base, request.adapter, request.source
    tokenizer, source = _ship.find_tokenizer([(adapter, hub.adapter), (base, hub.base)])
    vocabulary = _checked_vocabulary(base, adapter, hub, tokenizer, source)
    logger.info("checking that %s fits %s (doctor)", adapter, base)
    checkup = doctor(base, adapter, **dataclasses.asdict(hub))
    if not checkup.ok:
        bad = checkup.by_severity("error", "silent")
        counts = Counter(f.severity for f in bad)
        raise AdapterMismatchError(
            f"The adapter does not fit the base (doctor: {counts['error']} error, {counts['silent']} silent); "
            "nothing was loaded or merged:\n" + "\n".join(str(f) for f in bad),
            report=checkup,
        )
    extras = _ship.Extras(tokenizer=tokenizer, tokenizer_source=source, base=base, adapter=adapter)
    request = request.with_inputs(extras, request.out_dtype or _load.checkpoint_dtype(base, hub))
    request = dataclasses.replace(request, vocabulary=vocabulary)
    if request.quantization is not None and request.dtype is None:
        # The compute dtype, not the loader's default for the unquantized layers (transformers 4: float16).
        request = dataclasses.replace(request, dtype=request.quantization.compute_dtype)
    size = vocabulary.after if vocabulary is not None else None
    if not request.low_memory:
        model = load_inputs(base, adapter, dtype=request.dtype, device_map=request.device_map, hub=hub, vocab_size=size)
        return _pipeline.run(request, InMemory(model, owned=True))

    with freed_memory_returned():
        return _pipeline.run(request, _low_memory(request, base, adapter, hub, size))


def _low_memory(request: MergeRequest, base: str, adapter: str, hub: _load.Source, size: int | None) -> LowMemory:
    """The low-memory engine for `request` (`size`: the vocabulary the adapter was trained with, or None). A
    pre-quantized base: the 16-bit stand-in offloaded (the base's weights read dequantized when each layer is loaded,
    or the 16-bit original's), and the adapter on the quantized base, loaded on the CPU (about a quarter of the
    16-bit model for 4-bit) to measure against."""
    quantization = request.quantization
    if quantization is None:

        def load_offloaded(folder: str) -> Any:
            return load_inputs(base, adapter, dtype=request.dtype, hub=hub, offload_folder=folder, vocab_size=size)

        return LowMemory(load_offloaded)

    def load_stand_in(folder: str) -> Any:
        if request.base_weights == "original":
            assert request.original_base is not None
            original = dataclasses.replace(hub, revision=None)  # the revision is the quantized repository's
            dtype = quantization.compute_dtype
            return load_inputs(
                request.original_base, adapter, dtype=dtype, hub=original, offload_folder=folder, vocab_size=size
            )
        return load_inputs(base, adapter, dtype=request.dtype, hub=hub, offload_folder=folder, dequantize=quantization)

    def load_trained() -> Any:
        logger.info("loading the adapter on the quantized base (the model as trained) on the CPU, to measure against")
        return load_inputs(base, adapter, dtype=request.dtype, device_map="cpu", hub=hub, vocab_size=size)

    return LowMemory(load_stand_in, load_trained)


def _checked_vocabulary(
    base: str, adapter: str, hub: _load.Source, tokenizer: Any, source: str | None
) -> VocabularyResize | None:
    """The resize the adapter was trained with (its tensors, the tokenizer saved beside it), once every new row is
    known to come from the adapter and the tokenizer fits the merged model: VocabularyError otherwise."""
    layers, vocabulary = _read_vocabulary(base, adapter, hub, tokenizer if source == adapter else None)
    if vocabulary is not None:
        _vocabulary.refuse_missing_rows(vocabulary)
    if layers is not None:
        _vocabulary.refuse_large_tokenizer(tokenizer, vocabulary.after if vocabulary else layers.size, source)
    return vocabulary


def _read_vocabulary(
    base: str, adapter: str, hub: _load.Source, tokenizer: Any
) -> tuple[_vocabulary.VocabularyLayers | None, VocabularyResize | None]:
    """The base's vocabulary modules and the resize the adapter was trained with (`tokenizer`: the one saved beside
    it, or None), from the files (a hub adapter's config and weights are downloaded as the doctor downloads them).
    (None, None) where the files cannot be read: the doctor says why."""
    import transformers

    try:
        adapter_dir = Path(adapter)
        if not adapter_dir.is_dir():
            from huggingface_hub import snapshot_download

            names = ["adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"]
            adapter_dir = Path(snapshot_download(adapter, allow_patterns=names, **hub.adapter))
        task_type = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8")).get("task_type")
        config = transformers.AutoConfig.from_pretrained(base, **hub.base)
        layers = _vocabulary.vocabulary_layers(_load.on_meta(_load.model_class_for(config, task_type), config))
        if layers is None:
            return None, None
        return layers, _vocabulary.read_resize(adapter_dir, layers, _vocabulary.tokenizer_size(tokenizer))
    except Exception:  # unreadable inputs: the doctor, which runs next, explains them
        return None, None


def load_untrained_inputs(
    base: str,
    peft_config_file: str,
    *,
    dtype: torch.dtype | str | None = None,
    device_map: Any = None,
    hub: _load.Source | None = None,
) -> Any:
    """The PEFT model at step 0 for a config file; a load that fails is an InputError naming the inputs."""
    with _inputs.load_failures_as_input_errors(
        f"Could not build the adapter of '{peft_config_file}' on the base '{base}'",
        "Fix: check that the config is a PEFT adapter_config.json written for this base (its target_modules must name "
        "modules of it).",
    ):
        load = _load.load_untrained_adapter_model
        return load(
            base, peft_config_file, dtype=_load.parse_dtype(dtype), device_map=device_map, hub=hub or _load.Source()
        )


def load_inputs(
    base: str,
    adapter: str,
    *,
    dtype: torch.dtype | str | None = None,
    device_map: Any = None,
    hub: _load.Source | None = None,
    offload_folder: str | None = None,
    dequantize: Quantization | None = None,
    vocab_size: int | Literal["read"] | None = "read",
) -> Any:
    """The adapter model (with `offload_folder`, its base's weights offloaded there and to the checkpoint: the
    low-memory merge's; with `dequantize` too, the pre-quantized base read as a 16-bit model, its weights dequantized
    as they are loaded), its base resized to `vocab_size` ("read": the size the adapter's tensors say it was trained
    with, VocabularyError if they lack new rows); a load that fails is an InputError that names the inputs and the
    loader's reason."""
    if vocab_size == "read":
        vocabulary = _checked_vocabulary(base, adapter, hub or _load.Source(), None, None)
        vocab_size = vocabulary.after if vocabulary is not None else None
    with _inputs.load_failures_as_input_errors(
        f"Could not load the base '{base}' with the adapter '{adapter}'",
        "Nothing was written. Fix: check that both are complete and belong together (safemerge doctor BASE ADAPTER "
        "explains most mismatches).",
    ):
        hub, dtype = hub or _load.Source(), _load.parse_dtype(dtype)
        if dequantize is not None:
            dequantized = load_dequantized_adapter_model
            return dequantized(base, adapter, dequantize, dtype=dtype, hub=hub, vocab_size=vocab_size)
        if offload_folder is not None:
            offloaded = load_offloaded_adapter_model
            return offloaded(base, adapter, offload_folder=offload_folder, dtype=dtype, hub=hub, vocab_size=vocab_size)
        load = _load.load_adapter_model
        return load(base, adapter, dtype=dtype, device_map=device_map, hub=hub, vocab_size=vocab_size)
