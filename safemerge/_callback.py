"""SafeMergeCallback: the tie decision checked before the first training step, a verified merge after the last."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from safemerge._forecast import check_before_training
from safemerge._merge import safe_merge
from safemerge._output import write_json_atomic
from safemerge._policy import parse_policy
from safemerge._report import MergeReport, TiePolicy, TrainingCheck

logger = logging.getLogger(__name__)

#: File name of the report, written into the merged model's directory.
REPORT_NAME = "safemerge-report.json"


class SafeMergeCallback(TrainerCallback):
    """Decide the tie policy before training, end it with a verified merge (`transformers.Trainer`, TRL trainers).

    `on_train_begin` runs `safemerge.check_before_training` on the trainer's PEFT model: a run the policy would
    refuse to merge stops there, before the first optimizer step, with the policy's `TiedWeightsError` and its fix.
    `on_train_end`, on the main process only, runs `safe_merge(model, output_dir, policy=..., in_place=False,
    **merge_options)`: the merged model is saved and verified, the report is written into it as
    `safemerge-report.json`, the verification figures go into the trainer's log history (`trainer.state.log_history`,
    saved in `trainer_state.json`) and the `safemerge` logger, and the trainer's model is the PEFT model again
    (so `trainer.save_model()` still saves the adapter). A merge that fails raises, and the PEFT model is put back.

    Args:
        output_dir: where the merged model goes (not the trainer's `output_dir`: checkpoints live there).
        policy: "keep", "untie" or "refuse".
        merge_options: more keyword arguments for `safe_merge` (`verify`, `overwrite`, `logits_tolerance`, ...).
    """

    def __init__(self, output_dir: str | os.PathLike[str], *, policy: TiePolicy | str, **merge_options: Any) -> None:
        self.output_dir = Path(output_dir)
        self.policy = parse_policy(policy)
        self.merge_options = merge_options
        #: The check made in on_train_begin, and the report of the merge made in on_train_end.
        self.check: TrainingCheck | None = None
        self.report: MergeReport | None = None

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.check = check_before_training(kwargs.get("model"), policy=self.policy)
        logger.info(
            "safemerge: policy %r %s once trained: %s", self.policy.value, self.check.outcome, self.check.reason
        )

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if not state.is_world_process_zero:
            return  # one process merges and writes; the others' models are the same
        self.report = safe_merge(
            kwargs.get("model"), self.output_dir, policy=self.policy, in_place=False, **self.merge_options
        )
        write_json_atomic(self.output_dir / REPORT_NAME, self.report.to_dict())
        figures = _figures(self.report)
        state.log_history.append({**figures, "step": state.global_step})
        logger.info(
            "safemerge: merged into %s (%s)", self.output_dir, ", ".join(f"{k}={v}" for k, v in figures.items())
        )


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
    return figures
