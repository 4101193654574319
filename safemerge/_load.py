"""Load a base model and a PEFT adapter from local directories or hub ids, with the right classes."""

from __future__ import annotations

import logging
from typing import Any

import torch
import transformers

logger = logging.getLogger(__name__)

#: PEFT task types and the transformers Auto class that builds the matching model.
_AUTO_BY_TASK = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | str | None:
    """A torch dtype from its name ("bfloat16", "torch.float16", "auto"); ValueError listing examples otherwise."""
    if name is None or isinstance(name, torch.dtype) or name == "auto":
        return name
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype {name!r} is not a floating-point torch dtype. Use one of: float32, bfloat16, float16.")
    return dtype


#: Tasks whose head the base checkpoint usually lacks: the adapter was trained on the Auto class that adds it.
_HEAD_TASKS = {"SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS"}


def model_class_for(config: Any, task_type: str | None = None) -> Any:
    """The class users load the base with for an adapter of `task_type`: the head-adding Auto class for
    classification tasks; else the architecture the checkpoint's config names; else the task's Auto class. A
    CAUSAL_LM adapter needs a class that can generate (PEFT's causal-LM model calls its generation hooks): a BERT
    checkpoint saved as BertForPreTraining loads as BertLMHeadModel then."""
    auto = getattr(transformers, _AUTO_BY_TASK.get(task_type or "", "AutoModel"))
    if task_type in _HEAD_TASKS:
        return auto
    for name in getattr(config, "architectures", None) or ():
        cls = getattr(transformers, name, None)
        if cls is not None and (task_type != "CAUSAL_LM" or cls.can_generate()):
            return cls
    return auto


def load_pretrained(
    path: str, *, task_type: str | None = None, dtype: torch.dtype | str | None = None, device_map: Any = None
) -> Any:
    """Load a transformers model from a directory or hub id with the class model_class_for() picks."""
    kwargs: dict[str, Any] = {}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if device_map is not None:
        kwargs["device_map"] = device_map
    cls = model_class_for(transformers.AutoConfig.from_pretrained(path), task_type)
    logger.info("loading %s with %s.from_pretrained", path, cls.__name__)
    return cls.from_pretrained(path, **kwargs).eval()


def load_adapter_model(
    base: str, adapter: str, *, dtype: torch.dtype | str | None = None, device_map: Any = None
) -> Any:
    """The adapter model: `base` loaded with the right class, `adapter` loaded onto it with PEFT."""
    import peft

    adapter_config = peft.PeftConfig.from_pretrained(adapter)
    model = load_pretrained(base, task_type=adapter_config.task_type, dtype=dtype, device_map=device_map)
    logger.info("loading adapter %s with PeftModel.from_pretrained", adapter)
    return peft.PeftModel.from_pretrained(model, adapter).eval()


def load_untrained_adapter_model(
    base: str, peft_config_file: str, *, dtype: torch.dtype | str | None = None, device_map: Any = None
) -> Any:
    """The PEFT model at step 0: `base` loaded with the right class, `get_peft_model` with the config in the file."""
    import peft

    config = peft.get_peft_config(peft.PeftConfig.from_json_file(peft_config_file))
    model = load_pretrained(base, task_type=config.task_type, dtype=dtype, device_map=device_map)
    logger.info("adding the adapter of %s with get_peft_model", peft_config_file)
    return peft.get_peft_model(model, config)
