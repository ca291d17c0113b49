"""Checkpoint conversion: Hugging Face safetensors directories, GGUF files, PEFT adapters."""

from __future__ import annotations

import os

import jax.numpy as jnp


def load_pretrained(path, dtype=jnp.float32, allow_pickle: bool = False, quantize=None):
    """Loads a pretrained model from a Hugging Face directory or a ``.gguf`` file.

    Args:
      path: an HF model directory (config.json + safetensors) or a GGUF file (Llama architecture).
      dtype: parameter dtype (float32 by default; bfloat16 to halve the memory of a frozen base).
      allow_pickle: accept ``pytorch_model.bin`` (pickle can run code; needs torch).
      quantize: ``None``, ``"nf4"``, ``"fp4"``, ``"int8"`` or a `jlora.quant.QuantConfig` (or a dict of its
        fields): the linear layers (all but ``lm_head`` by default) become frozen quantized bases, bitsandbytes'
        format (`jlora.quant`); an HF checkpoint is quantized one matrix at a time as it is read (after the cast
        to ``dtype``, as transformers does), a GGUF file after loading. Put LoRA on top for QLoRA. A checkpoint
        transformers saved with bitsandbytes 4-bit (NF4/FP4) or 8-bit loads as it is, staying quantized
        (`jlora.convert.hf.load_hf`); ``quantize`` must then be None.
        ``"gguf"`` (GGUF files only): keep the file's Q4_0 / Q4_1 / Q8_0 matrices and embedding quantized as
        they are stored (`jlora.quant_gguf`; ``dtype`` applies to the plain tensors), for LoRA on that base.

    Returns:
      ``(ModelConfig, params)``.

    Example:
      >>> jlora.save_pretrained(cfg, params, f"{tmp}/tiny-hf")  # config.json + model.safetensors
      >>> cfg2, params2 = jlora.load_pretrained(f"{tmp}/tiny-hf")
      >>> cfg2.arch, cfg2.n_layers, params2["lm_head"]["kernel"].shape
      ('llama', 2, (64, 128))
      >>> jlora.load_pretrained(gguf_path)[0].d_model  # a llama.cpp file, e.g. jlora.default_model_path()
      64
      >>> _, qparams = jlora.load_pretrained(f"{tmp}/tiny-hf", quantize="nf4")  # QLoRA's base
      >>> type(qparams["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]).__name__
      'Quant4bit'
    """
    path = os.fspath(path)
    keep_gguf = isinstance(quantize, str) and quantize == "gguf"
    if keep_gguf:
        quantize = None
        if not path.endswith(".gguf"):
            raise ValueError(f"{path}: quantize='gguf' keeps the quantized tensors of a .gguf file; this is not one "
                             f"(use quantize='nf4', 'fp4' or 'int8')")
    if quantize is not None:
        from jlora.quant import QuantConfig

        quantize = QuantConfig.of(quantize)
    if path.endswith(".gguf"):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such GGUF file")
        from jlora.convert.gguf import load_gguf

        return load_gguf(path, dtype=dtype, keep_quantized=keep_gguf, quantize=quantize)  # quantized as it reads
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such model directory or .gguf file")
    if os.path.isfile(path):
        raise ValueError(f"{path}: expected a Hugging Face model directory or a .gguf file")
    from jlora.convert.hf import load_hf

    return load_hf(path, dtype=dtype, allow_pickle=allow_pickle, quantize=quantize)


def save_pretrained(cfg, params, out_dir, dtype=None, quantize=None) -> None:
    """Writes a Hugging Face model directory (config.json + model.safetensors) that transformers loads.

    Args:
      cfg: model config.
      params: a parameter tree: plain arrays (merge adapters first with `jlora.merge`), and optionally quantized
        kernels (`jlora.quant.Quant4bit` / `Int8`), written as a bitsandbytes 4-bit / 8-bit checkpoint.
      out_dir: destination directory.
      dtype: storage dtype of the float tensors ("float32", "bfloat16", "float16"); default: the parameters'.
      quantize: write the linear layers quantized: ``"nf4"``, ``"fp4"`` (bitsandbytes 4-bit, double
        quantization on), ``"int8"`` (bitsandbytes 8-bit), a dict or a `jlora.quant.QuantConfig`.

    Example:
      >>> jlora.save_pretrained(cfg, params, tmp + "/nf4", quantize="nf4")  # e.g. params = jlora.merge(qlora)
      >>> _, back = jlora.load_pretrained(tmp + "/nf4")
      >>> type(back["model"]["layers"]["0"]["mlp"]["up_proj"]["kernel"]).__name__
      'Quant4bit'
    """
    from jlora.convert.hf import save_hf

    save_hf(cfg, params, os.fspath(out_dir), dtype=dtype, quantize=quantize)
