"""SafeMergeCallback: the tie decision checked before the first training step, a verified merge after the last."""

from __future__ import annotations

import inspect
import logging
import os
from pathlib import Path
from typing import Any, Literal

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from safemerge._decide.forecast import check_before_training
from safemerge._decide.rules import parse_policy
from safemerge._decide.serving import parse_runtimes
from safemerge._merge import safe_merge
from safemerge._model import inputs as _inputs
from safemerge._model import quantized as _quantized
from safemerge._model import undo as _undo
from safemerge._output import claim as _output
from safemerge._output.claim import write_json_atomic
from safemerge._records import MergeReport, TiePolicy, TrainingCheck
from safemerge._request import checked_base_weights, checked_tokenizer
from safemerge.errors import InputError

logger = logging.getLogger(__name__)

#: Added to the merged directory's name for the report's file, beside it: `merged` -> `merged.safemerge-report.json`.
#: Not inside: the merged directory may be pushed to the hub as it is, and the report names local paths.
REPORT_SUFFIX = ".safemerge-report.json"
#: Where a failed merge leaves the trained adapter, inside the trainer's output_dir.
KEPT_ADAPTER = "adapter-before-failed-merge"


class SafeMergeCallback(TrainerCallback):
    """Decide the tie policy before training, end it with a verified merge (`transformers.Trainer`, TRL trainers).

    `on_train_begin` runs `safemerge.check_before_training` on the trainer's PEFT model: a run the policy would
    refuse to merge stops there, before the first optimizer step, with the policy's `TiedWeightsError` and its fix.
    `on_train_end`, on the main process only, runs `safe_merge(model, output_dir, policy=..., in_place=False,
    **merge_options)`: the merged model is saved and verified, the report is written beside it as
    `<output_dir>.safemerge-report.json` (`report_path`; not inside, where it would be pushed to the hub with the
    model and publish local paths), the verification figures go into the trainer's log history
    (`trainer.state.log_history`, saved in `trainer_state.json`) and the `safemerge` logger, and the trainer's model
    is the PEFT model again (so `trainer.save_model()` still saves the adapter). A merge that fails raises, after
    putting the PEFT model back and saving the trained adapter to
    `<trainer output_dir>/adapter-before-failed-merge`.

    Checked before the first step too: the options (a name safe_merge does not take, a bad tolerance), an occupied
    `output_dir` (unless `overwrite=True`), a tokenizer with more tokens than the model's vocabulary (VocabularyError),
    and FSDP / DeepSpeed ZeRO-3 runs (sharded weights cannot be merged by one process). In DDP runs the other
    processes wait at the trainer's next barrier while the main one merges; a merge longer than `ddp_timeout` needs a
    larger one.

    QLoRA (the trainer's model on a bitsandbytes 4-bit or 8-bit base): `base_weights` is required, and checked before
    the first step with `original_base` (the 16-bit checkpoint found, or QuantizedBaseError); the merge is written in
    16 bits and verified against the model as trained (docs/how-to/qlora.md).

    Args:
        output_dir: where the merged model goes (not the trainer's `output_dir`: checkpoints live there).
        policy: "keep", "untie" or "refuse".
        base_weights: a quantized base's weights to merge into, "dequantized" or "original" (safe_merge's).
        original_base: with "original", the 16-bit checkpoint the base was quantized from (default: the one it was
            loaded from).
        merge_options: more keyword arguments for `safe_merge` (`verify`, `overwrite`, `logits_tolerance`, ...);
            `serve_with=("vllm", "llama.cpp")` is also checked before training (check_before_training's).
    """

    def __init__(
        self,
        output_dir: str | os.PathLike[str],
        *,
        policy: TiePolicy | str,
        base_weights: Literal["dequantized", "original"] | None = None,
        original_base: str | None = None,
        **merge_options: Any,
    ) -> None:
        self.output_dir = Path(output_dir)
        #: Where on_train_end writes the merge's report: beside the merged directory, not inside it.
        merged = Path(os.path.abspath(self.output_dir))
        self.report_path = merged.with_name(merged.name + REPORT_SUFFIX)
        self.policy = parse_policy(policy)
        _check_options(merge_options)
        _quantized.check_value(base_weights)
        parse_runtimes(merge_options.get("serve_with"))  # a misspelt runtime stops the script now
        self.merge_options = {**merge_options, "base_weights": base_weights, "original_base": original_base}
        #: The check made in on_train_begin, and the report of the merge made in on_train_end.
        self.check: TrainingCheck | None = None
        self.report: MergeReport | None = None

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        _refuse_sharded_training(args)
        # An occupied output directory stops the run now, not after it.
        _output.check_target(_output.resolved(self.output_dir), overwrite=bool(self.merge_options.get("overwrite")))
        serve_with = self.merge_options.get("serve_with")
        self.check = check_before_training(kwargs.get("model"), policy=self.policy, serve_with=serve_with)
        logger.info(
            "safemerge: policy %r %s once trained: %s", self.policy.value, self.check.outcome, self.check.reason
        )
        # A QLoRA run without base_weights (or without the 16-bit checkpoint "original" needs) stops now.
        options = self.merge_options
        checked_base_weights(kwargs.get("model"), options["base_weights"], options["original_base"])
        # So does a tokenizer the merge would refuse to ship (more tokens than the model's vocabulary).
        checked_tokenizer(kwargs.get("model"), self._tokenizer(kwargs))
        if self.check.quantization is not None:
            logger.info(
                "safemerge: quantized base (%s): merging into its %s weights",
                self.check.quantization,
                options["base_weights"],
            )

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if not state.is_world_process_zero:
            return  # one process merges and writes; the others' models are the same
        model = kwargs.get("model")
        # The tokenizer or processor (its chat template included) travels with the merged model.
        options = {**self.merge_options, "tokenizer": self._tokenizer(kwargs)}
        try:
            self.report = safe_merge(model, self.output_dir, policy=self.policy, in_place=False, **options)
        except Exception as exc:  # the run's result must survive a failed merge
            _undo.say_first(exc, _keep_adapter(model, Path(args.output_dir or ".") / KEPT_ADAPTER))
            raise
        write_json_atomic(self.report_path, self.report.to_dict())
        figures = _figures(self.report)
        state.log_history.append({**figures, "step": state.global_step})
        logger.info(
            "safemerge: merged into %s (%s)", self.output_dir, ", ".join(f"{k}={v}" for k, v in figures.items())
        )

    def _tokenizer(self, kwargs: dict[str, Any]) -> Any:
        """The tokenizer that ships with the merge: safe_merge's `tokenizer=` option if given, else the trainer's
        tokenizer or processor, as its callbacks get it (`tokenizer` before transformers 4.46)."""
        if "tokenizer" in self.merge_options:
            return self.merge_options["tokenizer"]
        return kwargs.get("processing_class") or kwargs.get("tokenizer")


def _check_options(options: dict[str, Any]) -> None:
    """A mistyped or misplaced safe_merge option stops the script at once, not after training."""
    if "in_place" in options:
        raise TypeError("SafeMergeCallback keeps the trainer's model a PEFT model (in_place=False); drop in_place.")
    try:
        inspect.signature(safe_merge).bind(None, "", policy="untie", **options)
    except TypeError as exc:
        raise TypeError(f"SafeMergeCallback got an option safe_merge does not take: {exc}.") from None
    _inputs.check_tolerance(options.get("logits_tolerance"))


def _refuse_sharded_training(args: TrainingArguments) -> None:
    from transformers import integrations

    if getattr(args, "fsdp", None) or integrations.is_deepspeed_zero3_enabled():  # type: ignore[attr-defined,no-untyped-call]
        raise InputError(
            "SafeMergeCallback cannot merge a model trained with FSDP or DeepSpeed ZeRO-3: every process holds only a "
            "shard of the weights, so no process can merge or verify the whole model. Nothing was trained. Fix: "
            "drop the callback, save the adapter at the end (trainer.save_model()) and merge it afterwards with "
            "`safemerge merge BASE ADAPTER OUT --policy P`; check the policy now with `safemerge inspect BASE "
            "--peft-config adapter_config.json --policy P`."
        )


def _keep_adapter(model: Any, directory: Path) -> str:
    """Save the trained adapter where the trainer keeps its checkpoints; say where (or why not)."""
    try:
        model.save_pretrained(str(directory))
    except Exception as exc:  # a full disk, say: the error that follows matters more
        return f"The merge failed, and the trained adapter could not be saved either ({type(exc).__name__}: {exc})."
    return f"The merge failed; the trained adapter was saved to '{directory}' first (the PEFT model was put back)."


def _figures(report: MergeReport) -> dict[str, Any]:
    """The report's figures, as flat log entries."""
    figures: dict[str, Any] = {"safemerge/ok": report.ok, "safemerge/verified": report.verified}
    v = report.verification
    if v is not None:
        figures |= {
            "safemerge/max_abs_logits_diff": v.max_abs_logits_diff,
            "safemerge/logits_tolerance": v.logits_tolerance,
            "safemerge/reloaded_tensors_compared": v.reloaded_tensors_compared,
        }
    if (quantized := report.quantized_base) is not None:
        figures |= {
            "safemerge/base_weights": quantized.base_weights,
            "safemerge/quantization_gap": quantized.quantization_gap,
            "safemerge/fine_tune_effect": quantized.fine_tune_effect,
        }
    return figures
