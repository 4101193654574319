"""Load a base model and a PEFT adapter from local directories or hub ids, with the right classes."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import transformers

from safemerge.errors import InputError

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


@dataclass(frozen=True)
class Source:
    """How the base and the adapter are read: their revisions (branch, tag or commit on the hub), the token (None:
    huggingface_hub's own, from HF_TOKEN or `hf auth login`), and whether a repository's own code may run
    (`trust_remote_code`, off unless asked)."""

    revision: str | None = None
    adapter_revision: str | None = None
    token: str | None = None
    trust_remote_code: bool = False

    @property
    def base(self) -> dict[str, Any]:
        """from_pretrained options for the base, its config and its tokenizer."""
        return {"trust_remote_code": self.trust_remote_code} | _given(revision=self.revision, token=self.token)

    @property
    def original(self) -> Source:
        """How a quantized base's 16-bit original is read: the token and trust_remote_code, not the revision (that
        is the quantized repository's)."""
        return Source(token=self.token, trust_remote_code=self.trust_remote_code)

    @property
    def adapter(self) -> dict[str, Any]:
        """from_pretrained / download options for the adapter."""
        return _given(revision=self.adapter_revision, token=self.token)


def _given(**options: Any) -> dict[str, Any]:
    return {name: value for name, value in options.items() if value is not None}


def checkpoint_dtype(path: str, hub: Source = Source()) -> torch.dtype | None:
    """The dtype the checkpoint's config records (`dtype`, `torch_dtype` in transformers 4), or None."""
    config = transformers.AutoConfig.from_pretrained(path, **hub.base)
    recorded = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    parsed = parse_dtype(recorded) if recorded not in (None, "auto") else None
    return parsed if isinstance(parsed, torch.dtype) else None


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | str | None:
    """A torch dtype from its name ("bfloat16", "torch.float16", "auto"); InputError (a ValueError) listing the
    valid names otherwise."""
    if name is None or isinstance(name, torch.dtype) or name == "auto":
        return name
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise InputError(f"dtype {name!r} is not a floating-point torch dtype. Use one of: float32, bfloat16, float16.")
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
    path: str,
    *,
    task_type: str | None = None,
    dtype: torch.dtype | str | None = None,
    device_map: Any = None,
    hub: Source = Source(),
) -> Any:
    """Load a transformers model from a directory or hub id with the class model_class_for() picks."""
    kwargs: dict[str, Any] = {"dtype": dtype or "auto", **hub.base}  # the checkpoint's own dtype unless asked
    if device_map is not None:
        kwargs["device_map"] = device_map
    cls = model_class_for(transformers.AutoConfig.from_pretrained(path, **hub.base), task_type)
    logger.info("loading %s with %s.from_pretrained", path, cls.__name__)
    return cls.from_pretrained(path, **kwargs).eval()


def load_adapter_model(
    base: str,
    adapter: str,
    *,
    dtype: torch.dtype | str | None = None,
    device_map: Any = None,
    hub: Source = Source(),
    vocab_size: int | None = None,
) -> Any:
    """The adapter model: `base` loaded with the right class (its vocabulary resized to `vocab_size`, as training
    resized it), `adapter` loaded onto it with PEFT."""
    import peft

    from safemerge._model.vocabulary import resize

    adapter_config = peft.PeftConfig.from_pretrained(adapter, **hub.adapter)
    model = load_pretrained(base, task_type=adapter_config.task_type, dtype=dtype, device_map=device_map, hub=hub)
    if vocab_size is not None:
        resize(model, vocab_size)
    logger.info("loading adapter %s with PeftModel.from_pretrained", adapter)
    return peft.PeftModel.from_pretrained(model, adapter, **hub.adapter).eval()


def load_untrained_adapter_model(
    base: str,
    peft_config_file: str,
    *,
    dtype: torch.dtype | str | None = None,
    device_map: Any = None,
    hub: Source = Source(),
) -> Any:
    """The PEFT model at step 0: `base` loaded with the right class, `get_peft_model` with the config in the file."""
    import peft

    config = peft.get_peft_config(peft.PeftConfig.from_json_file(peft_config_file))
    model = load_pretrained(base, task_type=config.task_type, dtype=dtype, device_map=device_map, hub=hub)
    logger.info("adding the adapter of %s with get_peft_model", peft_config_file)
    return peft.get_peft_model(model, config)


def on_meta(cls: Any, config: Any) -> Any:
    """The model class built from `config` on the meta device: its modules and ties, no weights."""
    from accelerate import init_empty_weights

    with init_empty_weights():  # Auto classes have from_config, model classes _from_config
        return cls.from_config(config) if hasattr(cls, "from_config") else cls._from_config(config)
