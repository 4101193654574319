"""The probe batch: one forward pass of the adapter model, its merge and its reload, and the tolerance."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from safemerge._model.quantized import no_cpu_packing
from safemerge._model.walk import config_levels

#: Relative logits tolerance per dtype: merging rounds W + dW once to the weight dtype, the adapter model does not.
_LOGITS_RTOL = {torch.float64: 1e-8, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}

#: Token ids that need extra inputs (an image token needs pixel values), read from config attributes like these.
_MULTIMODAL_TOKEN = re.compile(r"(image|video|audio|boi|eoi|boa|eoa|vision)\w*_token_(id|index)$")

#: Token ids in a probe: room for the 8 highest ids and 8 rows the adapter changes (seeded random ids fill what these
#: leave). Each position costs a forward through every layer and a row of logits over the whole vocabulary.
PROBE_LENGTH = 16


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def model_device(model: torch.nn.Module) -> torch.device:
    """Where the model computes: its first parameter's device (weights offloaded by accelerate are on `meta`)."""
    return next((p.device for p in model.parameters() if not p.is_meta), torch.device("cpu"))


def logits_tolerance(reference: torch.Tensor, dtype: torch.dtype) -> float:
    """Largest max |logits difference| accepted between the adapter model and the merged model."""
    scale = max(1.0, float(reference.abs().max())) if reference.numel() else 1.0
    return _LOGITS_RTOL.get(dtype, 1e-2) * scale


def make_probe(model: Any, extra_token_ids: list[int]) -> dict[str, torch.Tensor]:
    """One sequence of PROBE_LENGTH ids: the 8 highest token ids, up to 8 ids whose embedding rows the adapter
    changes, then seeded random ids for the rest.

    The highest ids are where resized or re-trained rows live and where vocabulary off-by-one bugs show. Every
    position's logits cover every row of the output embedding.
    """
    config = model.config
    try:
        vocab = int(model.get_input_embeddings().weight.shape[0])
    except (AttributeError, NotImplementedError):
        vocab = int(config.get_text_config().vocab_size)
    reserved = {
        int(value)
        for _, level in config_levels(config)
        for key, value in vars(level).items()
        if isinstance(value, int) and _MULTIMODAL_TOKEN.search(key)
    }
    usable = [i for i in range(vocab - 1, -1, -1) if i not in reserved]
    highest = usable[:8]
    changed = [i for i in extra_token_ids if i not in reserved][:8]
    generator = torch.Generator().manual_seed(0)
    random_ids = [usable[int(i)] for i in torch.randint(len(usable), (PROBE_LENGTH,), generator=generator)]
    ids = (highest + changed + random_ids)[:PROBE_LENGTH]
    input_ids = torch.tensor([ids], dtype=torch.long)
    if getattr(model, "main_input_name", "input_ids") == "input_features":
        # Speech encoder-decoders (Whisper): log-mel features in, the token ids go to the decoder.
        frames = 2 * int(config.max_source_positions)  # the encoder's convolutions halve the frames
        features = torch.randn(1, int(config.num_mel_bins), frames, generator=generator)
        return {"input_features": features.to(model_dtype(model)), "decoder_input_ids": input_ids}
    probe = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    if getattr(config, "is_encoder_decoder", False):
        probe["decoder_input_ids"] = input_ids.flip(-1)
    return probe


def probe_size(probe: Mapping[str, torch.Tensor]) -> int:
    """Number of token ids in a probe."""
    ids = probe.get("input_ids", probe.get("decoder_input_ids"))
    return int(ids.numel()) if ids is not None else 0


@contextmanager
def _without_autocast_wrapper(model: torch.nn.Module) -> Iterator[None]:
    """Run the forward the weights define, not accelerate's mixed-precision wrapper of it, then put the wrapper back.

    accelerate's `prepare` (Trainer with bf16/fp16=True; TRL's SFTTrainer by default) wraps the model's forward in
    autocast and keeps the plain one as `_original_forward`. The probe compares weights: run under autocast, the
    adapter model's logits would carry bf16 rounding that the merged model (not wrapped) does not, and a faithful
    merge would fail verification.
    """
    plain, wrapped = vars(model).get("_original_forward"), vars(model).get("forward")
    if plain is None or wrapped is None:
        yield
        return
    model.forward = plain
    try:
        yield
    finally:
        model.forward = wrapped


def run_probe(
    model: torch.nn.Module,
    probe: Mapping[str, torch.Tensor],
    *,
    watch: Sequence[torch.nn.Module] = (),
) -> tuple[torch.Tensor, set[int]]:
    """The model's logits on `probe` (eval mode, no grad) and the ids of the `watch` modules its forward called."""
    called: set[int] = set()
    handles = [m.register_forward_hook(lambda mod, _args, _out: called.add(id(mod))) for m in watch]
    was_training = model.training
    device = model_device(model)
    try:
        model.eval()
        # A 4-bit base (QLoRA) computes as in training, and its weights are not repacked in place by the forward.
        with torch.no_grad(), _without_autocast_wrapper(model), no_cpu_packing(model):
            output = model(**{k: v.to(device) for k, v in probe.items()})
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    logits = output.logits if getattr(output, "logits", None) is not None else output[0]
    return logits.detach().float().cpu(), called
