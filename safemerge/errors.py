"""Exceptions raised by safemerge.

The tree::

    SafeMergeError                    base of everything safemerge raises on purpose
    ├── InputError                    a path cannot be used, a file is damaged, weights on meta (a ValueError)
    │   ├── QuantizedBaseError        a quantized base without base_weights, or one safemerge cannot dequantize
    │   └── VocabularyError           added tokens without their rows in the adapter, or a tokenizer the model lacks
    ├── AdapterMismatchError          the doctor found that the adapter does not fit the base (nothing loaded)
    ├── TiedWeightsError              the tie policy forbids this merge (nothing was changed)
    ├── ServingTargetError            a runtime named in serve_with would serve the merge wrong or not load it
    ├── UnsupportedAdapterError       the adapter model cannot be represented by a merged model
    ├── NonFiniteWeightsError         the adapter or the merged weights hold NaN or Inf
    ├── OutputExistsError             save_directory is not empty and overwrite=False (also a FileExistsError)
    │   └── OutputBusyError           another safemerge run is writing save_directory right now
    ├── OutputWriteError              the merged model could not be written (disk full, no permission; an OSError)
    ├── UploadError                   the verified merge is in place, but --push-to-hub failed (an OSError)
    └── VerificationError             the merged or reloaded model does not compute what the adapter model did

The command line exits with 2 for InputError, OutputExistsError and bad arguments, and with 1 for the others.

    SafeMergeWarning                  base of the warnings safemerge emits
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from safemerge._findings import DoctorReport
    from safemerge._records import MergeReport, TieGroup

__all__ = [
    "AdapterMismatchError",
    "InputError",
    "NonFiniteWeightsError",
    "OutputBusyError",
    "OutputExistsError",
    "OutputWriteError",
    "QuantizedBaseError",
    "SafeMergeError",
    "SafeMergeWarning",
    "ServingTargetError",
    "TiedWeightsError",
    "UnsupportedAdapterError",
    "UploadError",
    "VerificationError",
    "VocabularyError",
]


class SafeMergeError(Exception):
    """Base class of every error safemerge raises on purpose."""


class SafeMergeWarning(UserWarning):
    """Base class of the warnings safemerge emits."""


class AdapterMismatchError(SafeMergeError):
    """The adapter doctor found that the adapter will not load, or will load wrong, onto this base.

    `report` is the DoctorReport; nothing was loaded.

    Example message::

        The adapter does not fit the base (doctor: 1 error, 0 silent):
        [error] The adapter's LoRA rank differs from the config's r=8 on 14 modules: loading fails with 'size
        mismatch'. ... fix: Set "r": 16 in adapter_config.json (and keep lora_alpha as trained).
    """

    def __init__(self, message: str, *, report: DoctorReport) -> None:
        super().__init__(message)
        self.report = report


class TiedWeightsError(SafeMergeError):
    """The tie policy forbids this merge; the model and the disk were left untouched.

    Example message::

        policy='keep' cannot merge this adapter: tie group [model.embed_tokens.weight, lm_head.weight] shares one
        tensor, but the adapter model uses different weights for its members (max |difference| 0.0312) ...
        Fix: use policy='untie' ...
    """

    def __init__(self, message: str, *, policy: str, groups: tuple[TieGroup, ...]) -> None:
        super().__init__(message)
        self.policy = policy
        self.groups = groups


class ServingTargetError(SafeMergeError):
    """A runtime named in `serve_with` would compute the merged model differently, or refuse to load it (the table
    safemerge._decide.serving.SERVING_RULES, read from the runtimes' code); nothing was merged or changed.

    Not a TiedWeightsError: the policy allows the merge, the serving target does not. `runtime`, `model_type`,
    `behaviour` ("head-is-embedding", "refuses-untied", "not-served") and `policy` say which.

    Example message::

        policy='untie' saves lm_head.weight apart from the embedding, and vLLM (vllm==0.33.0) refuses to load (or
        convert) a gemma2 checkpoint that has a head of its own (vllm/model_executor/models/gemma2.py:...). Fix: no
        policy merges it tied: serve the base with the adapter unmerged: vLLM's LoRA support (vllm serve BASE
        --enable-lora --lora-modules name=ADAPTER); or serve it with a runtime that honours the head (transformers).
        Nothing was changed (serve_with=('vllm',)).
    """

    def __init__(self, message: str, *, runtime: str, model_type: str, behaviour: str, policy: str) -> None:
        super().__init__(message)
        self.runtime = runtime
        self.model_type = model_type
        self.behaviour = behaviour
        self.policy = policy


class UnsupportedAdapterError(SafeMergeError):
    """The adapter model cannot be represented by a merged model, or safemerge cannot tell what the merged model
    must hold; nothing was merged or changed.

    Example message::

        This adapter cannot be merged into the base weights: PromptTuningConfig is a prompt-learning method
        (virtual tokens, no weight deltas). Fix: keep using it as an adapter with PeftModel.from_pretrained().
    """


class OutputExistsError(SafeMergeError, FileExistsError):
    """`save_directory` exists and is not empty, and `overwrite=False`.

    Example message::

        save_directory 'out/merged' exists and is not empty; nothing was merged. Fix: choose another directory,
        or pass overwrite=True (CLI: --overwrite) to replace it once the new model has been verified.
    """


class VerificationError(SafeMergeError):
    """The merged or reloaded model does not compute what the adapter model computed.

    `report` holds every figure (`report.model` is None: the PEFT model was restored and computes what it did).
    The saved files, if any, were moved to a sibling directory whose name ends in `.failed-<random>` and which
    holds SAFEMERGE_VERIFICATION_FAILED.txt.

    Example message::

        Verification failed: reloaded logits differ from the adapter model's by 0.8125 (tolerance 0.0001) ...
    """

    def __init__(self, message: str, *, report: MergeReport) -> None:
        super().__init__(message)
        self.report = report


class InputError(SafeMergeError, ValueError):
    """An input or output path cannot be used as given (missing, a file where a model directory is expected, no
    config.json), an input file is damaged, or a PEFT model's weights are on the meta device; nothing was loaded,
    written or changed.

    Example message::

        This file is damaged: adapter/adapter_model.safetensors (truncated: its header says the data ends at byte
        4096, the file has 1000 bytes). Nothing was loaded or written. Fix: copy or download it again.
    """


class QuantizedBaseError(InputError):
    """The base is quantized (QLoRA) and the merge cannot go on as asked: no `base_weights` choice, a quantization
    other than bitsandbytes, no 16-bit checkpoint for `base_weights="original"`, or bitsandbytes is not installed.
    Nothing was loaded, written or changed.

    Example message::

        The base is quantized (bitsandbytes 4-bit nf4, double quantization (compute dtype float32), loaded in
        memory): the model that was trained computes dequantized weights plus the adapter, and a merge has to choose
        the 16-bit weights the adapter goes into. Nothing was loaded or changed. Choose base_weights (CLI:
        --base-weights): ... Fix: pass base_weights='dequantized' (the model you trained and evaluated) unless you
        want the adapter on the full-precision weights. ...
    """


class VocabularyError(InputError):
    """The vocabulary does not add up, and nothing was loaded or written: the adapter was trained on a resized
    vocabulary (added tokens) but holds no trained values for some new rows, or the tokenizer that would ship has
    more tokens than the merged model has rows.

    Example message::

        The adapter was trained on a vocabulary resized from 128 to 136 tokens, but it holds no values for the new
        rows 128-135 of model.embed_tokens, lm_head: merged, they would keep what resize_token_embeddings put there,
        not what training learned. Nothing was loaded or written. Fix: save the adapter again with
        peft_model.save_pretrained(path, save_embedding_layers=True), or train those rows (modules_to_save or
        trainable_token_indices).
    """


class NonFiniteWeightsError(SafeMergeError):
    """The adapter, or the merged model, holds NaN or Inf values; nothing was saved and the PEFT model is as it was.

    Example message::

        The adapter holds NaN or Inf in 2 tensors: base_model.model.lm_head.lora_B.default.weight, ... A merged model
        would compute NaN. Fix: train again from a checkpoint before the loss diverged (lower the learning rate).
    """


class OutputBusyError(OutputExistsError):
    """Another safemerge run holds `save_directory` (its temporary sibling is locked by a live process).

    Example message::

        Another safemerge run (pid 4242) is writing 'out/merged' right now; nothing was merged. Fix: wait for it to
        finish, or choose another directory.
    """


class OutputWriteError(SafeMergeError, OSError):
    """The merged model could not be written or put in place; `save_directory` is as it was (the message says where
    the old directory is if it could not be put back), the temporary files are gone.

    Example message::

        Could not write the merged model into 'out/.merged.safemerge/model' (OSError: [Errno 28] No space left on
        device); 'out/merged' was not written. Fix: free space or choose another filesystem, then run again.
    """


class UploadError(SafeMergeError, OSError):
    """The merge is verified and in place at `save_directory`, but uploading it to the hub failed.

    `report` is the verified merge's report.

    Example message::

        The merged model is verified and saved in 'out/merged', but uploading it to the hub repository 'me/merged'
        failed (HfHubHTTPError: 401 Unauthorized). Fix: check the token (HF_TOKEN or `hf auth login`) and the
        network, then upload the directory as it is: `hf upload me/merged out/merged`.
    """

    def __init__(self, message: str, *, report: MergeReport) -> None:
        super().__init__(message)
        self.report = report


#: The `outcome` of a merge that raised, by the error's class (any other error: "error").
_OUTCOMES: tuple[tuple[type[Exception], str], ...] = (
    (TiedWeightsError, "refused"),
    (ServingTargetError, "refused"),
    (UnsupportedAdapterError, "refused"),
    (VerificationError, "not-faithful"),
    (AdapterMismatchError, "doctor-failed"),
    (UploadError, "upload-failed"),
)


def failure_report(error: Exception) -> dict[str, Any]:
    """The JSON report of a merge that raised: its `outcome`, the error's kind and message, and the figures the
    error carries (a failed verification's report, the doctor's findings, the refused tie groups)."""
    from safemerge._records import REPORT_SCHEMA_VERSION, MergeReport, to_jsonable

    outcome = next((name for cls, name in _OUTCOMES if isinstance(error, cls)), "error")
    report = getattr(error, "report", None)
    figures: dict[str, Any] = {"schema_version": REPORT_SCHEMA_VERSION, "ok": False, "verified": False}
    if isinstance(report, MergeReport):
        figures = report.to_dict()
    elif report is not None:  # the doctor's findings
        figures["doctor"] = report.to_dict()
    groups = getattr(error, "groups", None)
    if groups:
        figures["groups_before"] = to_jsonable(groups)
    return {**figures, "outcome": outcome, "error": {"kind": type(error).__name__, "message": str(error)}}
