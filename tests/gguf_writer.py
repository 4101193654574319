"""A GGUF file laid out as llama.cpp's converter lays it out (convert_hf_to_gguf.py, llama-cpp-python 0.3.36), written
with gguf's own GGUFWriter from a saved model directory: a test helper, not safemerge's code (the checker must not
check itself).

What the converter does and this mirrors: reads the checkpoint's safetensors (a tied model saved by transformers has
no lm_head.weight), names tensors with gguf's tables, permutes Llama's Q/K rows (conversion/llama.py:176-181),
adds 1 to Gemma's norm weights and drops Gemma2's lm_head.weight (conversion/gemma.py:109-120), keeps 1-D tensors in
F32 whatever the output type. Metadata: only what a reader needs to name and shape the tensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
from safetensors.numpy import load_file

ARCH = {"llama": gguf.MODEL_ARCH.LLAMA, "gemma2": gguf.MODEL_ARCH.GEMMA2}


def converter_permute(w: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """convert_hf_to_gguf's LlamaModel.permute, as it is written there."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(
    model_dir: Path, path: Path, qtype: str = "F32", *, drop: tuple[str, ...] = (), head_as_output: bool = False
) -> Path:
    """Convert the model saved in `model_dir` to `path`, 2-D tensors stored as `qtype` (F32, F16, BF16, Q8_0, Q4_0),
    without the GGUF tensors named in `drop` (a damaged or truncated conversion); `head_as_output`: a Gemma2 head
    stored as output.weight, as a tool other than the converter might."""
    config = json.loads((model_dir / "config.json").read_text())
    model_type, layers = config["model_type"], config["num_hidden_layers"]
    n_head, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    arch = gguf.MODEL_ARCH_NAMES[ARCH[model_type]]
    names = gguf.get_tensor_name_map(ARCH[model_type], layers)
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(layers)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_embedding_length(config["hidden_size"])
    for name, data in load_file(model_dir / "model.safetensors").items():
        if model_type == "gemma2" and name == "lm_head.weight" and not head_as_output:
            continue  # the converter drops it: llama.cpp's gemma2 graph uses the token embedding
        data = data.astype(np.float32)
        if model_type == "gemma2" and name.endswith("norm.weight"):
            data = data + np.float32(1)
        if model_type == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            data = converter_permute(data, n_head, n_head if "q_proj" in name else n_kv)
        new_name = (
            "output.weight" if name == "lm_head.weight" else names.get_name(name, try_suffixes=(".weight", ".bias"))
        )
        assert new_name is not None, name
        if new_name in drop:
            continue
        _add(writer, new_name, data, qtype if data.ndim == 2 else "F32")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _add(writer: gguf.GGUFWriter, name: str, data: np.ndarray, qtype: str) -> None:
    if qtype == "F32":
        writer.add_tensor(name, data)
    elif qtype == "F16":
        writer.add_tensor(name, data.astype(np.float16))
    else:
        kind = gguf.GGMLQuantizationType[qtype]
        writer.add_tensor(name, gguf.quants.quantize(data, kind), raw_dtype=kind)
