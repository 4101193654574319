"""merge_pretrained(low_memory=True): the in-memory merge's analysis, plan and checks, with the base's weights left
on disk and the merged model written a block of rows at a time (`_engines/low_memory`)."""

from __future__ import annotations

import dataclasses
import gc
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from safemerge import _outcome, _output, _plan, _ship, _verify
from safemerge._analysis import analyse
from safemerge._engines import low_memory as low_memory_engine
from safemerge._reload import LoadSpec
from safemerge._report import Action, MergeReport, TiePolicy

logger = logging.getLogger(__name__)


def merge_low_memory(
    target: Path,
    *,
    policy: TiePolicy,
    load_model: Callable[[str], Any],
    verify: bool,
    overwrite: bool,
    tolerance: float | None,
    max_shard_size: str | int,
    extras: _ship.Extras,
    out_dtype: torch.dtype | None,
) -> MergeReport:
    """merge_pretrained(low_memory=True): the same analysis and plan, executed a block of rows at a time from disk.

    `load_model(offload_folder)` loads the adapter model with the base's weights offloaded
    (`_pretrained.load_inputs`)."""
    with low_memory_engine.freed_memory_returned(), _output.claim(target, overwrite=overwrite) as held:
        model = load_model(str(held.offload))
        _outcome.refuse_non_finite_adapter(model)
        logger.info("inspecting tied weights and probing the adapter model (weights offloaded)")
        analysis = analyse(model, None)
        plan = analysis.plan_or_refuse(policy)
        logger.info("merging under policy %r, a block of rows at a time: %s", policy.value, plan.reason)
        streamed, actions = low_memory_engine.execute(model, plan, analysis.tied)
        merged = streamed.model
        verification = None
        if verify:
            expected = _plan.expected_values(plan, analysis.tied)
            verification = _verify.check_in_memory(
                merged, analysis, plan, expected, tolerance, saved_dtype=out_dtype, value_of=streamed.values.value
            )
            del expected
            if not verification.ok:
                _outcome.fail(verification, plan, analysis, merged, actions, owned=True)
        analysis.drop_values()  # the planned values hold what is written
        load = LoadSpec.like(merged)
        if out_dtype is not None and out_dtype != load.dtype:  # each tensor is cast as it is written
            actions.append(_outcome.cast_dtype(merged.config, load.dtype, out_dtype))
            load = dataclasses.replace(load, dtype=out_dtype)
        logger.info("writing to %s", held.staging)
        written = _output.write_staging(
            held,
            lambda staging: low_memory_engine.write(
                streamed,
                analysis.facts.declared,
                staging,
                max_shard_size,
                out_dtype=load.dtype,
                check=lambda name, tensor: _outcome.refuse_non_finite("merged model", [(name, tensor)]),
            ),
        )
        gc.collect()  # what the write let go of, held in reference cycles (PEFT's layers), before the reload
        if verify:
            assert verification is not None
            verification = _verify.check_written(
                held.staging,
                written,
                analysis,
                plan,
                verification,
                config=merged.config,
                load=load,
                offload_folder=held.offload,
            )
            if not verification.ok:
                _outcome.fail(verification, plan, analysis, merged, actions, owned=True, held=held)
        actions += _outcome.commit(held, extras, plan, actions, verification, analysis)
    actions.append(Action("save", (), f"saved to {target} as safetensors shards, a block of rows at a time"))
    return _outcome.merge_report(plan, str(target), analysis, merged, actions, verification, with_model=False)
