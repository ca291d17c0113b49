"""Checkpoint conversion: Hugging Face safetensors directories, GGUF files, PEFT adapters."""

from __future__ import annotations

import os

import jax.numpy as jnp


def load_pretrained(path, dtype=jnp.float32, allow_pickle: bool = False):
    """Loads a pretrained model from a Hugging Face directory or a ``.gguf`` file.

    Args:
      path: an HF model directory (config.json + safetensors) or a GGUF file (Llama architecture).
      dtype: parameter dtype (float32 by default; bfloat16 to halve the memory of a frozen base).
      allow_pickle: accept ``pytorch_model.bin`` (pickle can run code; needs torch).

    Returns:
      ``(ModelConfig, params)``.

    Example:
      >>> jlora.save_pretrained(cfg, params, f"{tmp}/tiny-hf")  # config.json + model.safetensors
      >>> cfg2, params2 = jlora.load_pretrained(f"{tmp}/tiny-hf")
      >>> cfg2.arch, cfg2.n_layers, params2["lm_head"]["kernel"].shape
      ('llama', 2, (64, 128))
      >>> jlora.load_pretrained(gguf_path)[0].d_model  # a llama.cpp file, e.g. jlora.default_model_path()
      64
    """
    path = os.fspath(path)
    if path.endswith(".gguf"):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such GGUF file")
        from jlora.convert.gguf import load_gguf

        return load_gguf(path, dtype=dtype)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such model directory or .gguf file")
    if os.path.isfile(path):
        raise ValueError(f"{path}: expected a Hugging Face model directory or a .gguf file")
    from jlora.convert.hf import load_hf

    return load_hf(path, dtype=dtype, allow_pickle=allow_pickle)


def save_pretrained(cfg, params, out_dir, dtype=None) -> None:
    """Writes a Hugging Face model directory (config.json + model.safetensors) that transformers loads.

    Args:
      cfg: model config.
      params: a plain parameter tree (merge adapters first with `jlora.merge`).
      out_dir: destination directory.
      dtype: storage dtype ("float32", "bfloat16", "float16"); default: the parameters' dtype.
    """
    from jlora.convert.hf import save_hf

    save_hf(cfg, params, os.fspath(out_dir), dtype=dtype)
