"""bitsandbytes-quantized Hugging Face checkpoints (``quantization_config.quant_method == "bitsandbytes"``),
read and written without torch: the 4-bit (NF4/FP4) and 8-bit layouts transformers saves.

4-bit (``load_in_4bit``): each quantized ``nn.Linear`` (GPT-2's ``Conv1D`` too, transposed to ``[out, in]`` by
transformers before quantizing) is stored as bnb's ``Params4bit`` + ``QuantState.as_dict(packed=True)``:

=========================================  ===================================================================
``<m>.weight``                             packed codes, uint8 ``[ceil(n/2), 1]`` (or those bytes viewed as the
                                           ``bnb_4bit_quant_storage`` dtype)
``<m>.weight.absmax``                      float32 ``[n_blocks]``, or uint8 with double quantization
``<m>.weight.quant_map``                   float32 ``[16]``, the NF4/FP4 table
``<m>.weight.nested_absmax``               float32 ``[ceil(n_blocks/256)]`` (double quantization only)
``<m>.weight.nested_quant_map``            float32 ``[256]``, the signed dynamic map (double quantization only)
``<m>.weight.quant_state.bitsandbytes__``  uint8: the UTF-8 JSON ``{"quant_type", "blocksize", "dtype",
``nf4`` (or ``fp4``)                       "shape": [out, in], "nested_blocksize", "nested_dtype",
                                           "nested_offset"}`` (bnb ``pack_dict_to_tensor``)
=========================================  ===================================================================

That is exactly `jlora.quant.Quant4bit`'s layout, so the arrays are taken as they are (no requantization), and
written back as they are. Modules left unquantized (``llm_int8_skip_modules``; lm_head by default) are plain float
tensors. 8-bit (``load_in_8bit``): ``<m>.weight`` int8 ``[out, in]``, ``<m>.SCB`` float32 ``[out]`` (the row
absmax) and ``<m>.weight_format`` (uint8 0: row-major): `jlora.quant.Int8` with ``scale = SCB / 127``.
"""

from __future__ import annotations

import json
from typing import Dict, List, Optional

import jax
import jax.numpy as jnp
import numpy as np


def _get(getter) -> np.ndarray:
    src, key = getter
    return src[key] if isinstance(src, dict) else src.get(key)


_QS_PREFIX = ".weight.quant_state.bitsandbytes__"


def _file_of(getter) -> str:
    src, _ = getter
    return getattr(src, "path", "the checkpoint")


def bnb_quant_mode(hf_cfg: dict, path: str) -> Optional[str]:
    """``None`` (no quantization_config), ``"4bit"`` or ``"8bit"`` for a bitsandbytes checkpoint; anything else
    raises ValueError naming the option.

    Example:
      >>> bnb_quant_mode({"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}}, "c.json")
      '4bit'
    """
    qc = hf_cfg.get("quantization_config")
    if not qc:
        return None
    method = qc.get("quant_method", "bitsandbytes")
    if method != "bitsandbytes":
        raise ValueError(f"{path}: quantization_config.quant_method {method!r} is not supported (jlora reads "
                         "bitsandbytes 4-bit and 8-bit checkpoints; dequantize others first)")
    if qc.get("load_in_4bit"):
        storage = qc.get("bnb_4bit_quant_storage", "uint8")
        if storage not in ("uint8", "int8", "float16", "bfloat16", "float32"):
            raise ValueError(f"{path}: quantization_config.bnb_4bit_quant_storage {storage!r} is not supported "
                             "(expected uint8, int8, float16, bfloat16 or float32)")
        return "4bit"
    if qc.get("load_in_8bit"):
        if qc.get("llm_int8_has_fp16_weight"):
            raise ValueError(f"{path}: quantization_config.llm_int8_has_fp16_weight=true checkpoints keep float "
                             "weights in an int8 layout jlora does not read")
        return "8bit"
    raise ValueError(f"{path}: quantization_config has neither load_in_4bit nor load_in_8bit set")


def _bnb_tensor(getters, keymap, full_key, module, what, dtypes=None):
    """The array ``full_key`` (a module's quantization tensor), with errors naming file, key, expected, found."""
    if full_key not in keymap:
        near = keymap.get(module + ".weight") or next(iter(keymap.values()), None)
        where = _file_of(getters[near]) if near is not None else "the checkpoint"
        raise ValueError(f"{where}: missing tensor {full_key} (the {what} of bitsandbytes-quantized {module})")
    getter = getters[keymap[full_key]]
    arr = _get(getter)
    if dtypes is not None and arr.dtype not in [np.dtype(d) for d in dtypes]:
        raise ValueError(f"{_file_of(getter)}: tensor {keymap[full_key]} ({what} of {module}) has dtype "
                         f"{arr.dtype}, expected {' or '.join(str(np.dtype(d)) for d in dtypes)}")
    return arr, _file_of(getter)


def load_bnb_4bit(getters, keymap, module: str, in_out, used: set):
    """The `jlora.quant.Quant4bit` of one module of a bnb 4-bit checkpoint, holding the file's arrays."""
    from jlora import quant as Q

    qs_keys = [k for k in keymap if k.startswith(module + _QS_PREFIX)]
    if len(qs_keys) != 1:
        raise ValueError(f"{_file_of(getters[keymap[module + '.weight']])}: {module} has "
                         f"{len(qs_keys)} quant_state entries ({', '.join(qs_keys)}), expected one")
    qs_key = qs_keys[0]
    blob, fname = _bnb_tensor(getters, keymap, qs_key, module, "quant_state", ["uint8"])
    try:
        state = json.loads(bytes(np.asarray(blob, np.uint8).reshape(-1)).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{fname}: tensor {keymap[qs_key]} is not bitsandbytes' packed quant_state JSON "
                         f"({e})") from None
    qt = state.get("quant_type")
    suffix = qs_key[len(module + _QS_PREFIX):]
    if qt not in Q.CODES or suffix != qt:
        raise ValueError(f"{fname}: tensor {keymap[qs_key]}: quant_type {qt!r} (key suffix {suffix!r}) is not "
                         f"supported; expected 'nf4' or 'fp4'")
    bs = state.get("blocksize")
    if bs not in Q.BLOCK_SIZES:
        raise ValueError(f"{fname}: tensor {keymap[qs_key]}: blocksize {bs!r}, expected one of {Q.BLOCK_SIZES}")
    n_in, n_out = in_out
    if list(state.get("shape") or []) != [n_out, n_in]:
        raise ValueError(f"{fname}: tensor {keymap[qs_key]}: shape {state.get('shape')!r}, expected "
                         f"[{n_out}, {n_in}] for this config.json")
    n = n_in * n_out
    nb = -(-n // bs)
    codes, fname = _bnb_tensor(getters, keymap, module + ".weight", module, "packed 4-bit codes")
    if codes.dtype.name not in ("uint8", "int8", "float16", "bfloat16", "float32"):
        raise ValueError(f"{fname}: tensor {keymap[module + '.weight']} has dtype {codes.dtype}, expected uint8 "
                         "packed codes")
    codes = np.ascontiguousarray(codes).view(np.uint8).reshape(-1)  # bnb_4bit_quant_storage is a byte view
    if codes.size < -(-n // 2) or codes.size > -(-n // 2) + 3:
        raise ValueError(f"{fname}: tensor {keymap[module + '.weight']} holds {codes.size} bytes, expected "
                         f"{-(-n // 2)} packed 4-bit codes for shape [{n_out}, {n_in}]")
    codes = codes[: -(-n // 2)]
    qmap, fname = _bnb_tensor(getters, keymap, module + ".weight.quant_map", module, "quant_map", ["float32"])
    if not np.array_equal(np.asarray(qmap).reshape(-1), Q.CODES[qt]):
        raise ValueError(f"{fname}: tensor {keymap[module + '.weight.quant_map']} is not bitsandbytes' {qt} "
                         f"table (expected {Q.CODES[qt].tolist()}, found {np.asarray(qmap).reshape(-1).tolist()})")
    used.update({module + ".weight", qs_key, module + ".weight.quant_map", module + ".weight.absmax"})
    nested = "nested_absmax" in state or module + ".weight.nested_absmax" in keymap
    absmax, fname = _bnb_tensor(getters, keymap, module + ".weight.absmax", module, "absmax",
                                ["uint8"] if nested else ["float32"])
    if absmax.size != nb:
        raise ValueError(f"{fname}: tensor {keymap[module + '.weight.absmax']} has {absmax.size} values, "
                         f"expected {nb} (one per block of {bs})")
    kw = dict(in_out=(n_in, n_out), quant_type=qt, block_size=bs)
    if not nested:
        return Q.Quant4bit(codes=jnp.asarray(codes), absmax=jnp.asarray(np.asarray(absmax).reshape(-1)), **kw)
    for field in ("nested_blocksize", "nested_offset"):
        if field not in state:
            raise ValueError(f"{fname}: tensor {keymap[qs_key]}: the quant_state has no {field!r} (expected "
                             "with double quantization)")
    if state["nested_blocksize"] != Q.NESTED_BLOCK:
        raise ValueError(f"{fname}: tensor {keymap[qs_key]}: nested_blocksize {state['nested_blocksize']!r}, "
                         f"expected {Q.NESTED_BLOCK}")
    nested_absmax, fname = _bnb_tensor(getters, keymap, module + ".weight.nested_absmax", module,
                                       "nested_absmax", ["float32"])
    if nested_absmax.size != -(-nb // Q.NESTED_BLOCK):
        raise ValueError(f"{fname}: tensor {keymap[module + '.weight.nested_absmax']} has {nested_absmax.size} "
                         f"values, expected {-(-nb // Q.NESTED_BLOCK)}")
    nmap, fname = _bnb_tensor(getters, keymap, module + ".weight.nested_quant_map", module, "nested_quant_map",
                              ["float32"])
    if not np.array_equal(np.asarray(nmap).reshape(-1), Q.DYNAMIC_MAP):
        raise ValueError(f"{fname}: tensor {keymap[module + '.weight.nested_quant_map']} is not bitsandbytes' "
                         "signed dynamic map (create_dynamic_map(signed=True))")
    used.update({module + ".weight.nested_absmax", module + ".weight.nested_quant_map"})
    return Q.Quant4bit(codes=jnp.asarray(codes), absmax=jnp.asarray(np.asarray(absmax).reshape(-1)),
                       nested_absmax=jnp.asarray(np.asarray(nested_absmax).reshape(-1)),
                       offset=jnp.asarray(np.float32(state["nested_offset"])), **kw)


def load_bnb_8bit(getters, keymap, module: str, in_out, used: set):
    """The `jlora.quant.Int8` of one module of a bnb 8-bit (LLM.int8) checkpoint: ``q = weight.T``,
    ``scale = SCB / 127`` (bnb dequantizes ``weight * SCB / 127``)."""
    from jlora import quant as Q

    n_in, n_out = in_out
    w, fname = _bnb_tensor(getters, keymap, module + ".weight", module, "int8 weight", ["int8"])
    if tuple(w.shape) != (n_out, n_in):
        raise ValueError(f"{fname}: tensor {keymap[module + '.weight']} has shape {tuple(w.shape)}, expected "
                         f"{(n_out, n_in)} for this config.json")
    scb, fname = _bnb_tensor(getters, keymap, module + ".SCB", module, "SCB row scales", ["float32"])
    if scb.size != n_out:
        raise ValueError(f"{fname}: tensor {keymap[module + '.SCB']} has {scb.size} values, expected {n_out}")
    used.update({module + ".weight", module + ".SCB"})
    if module + ".weight_format" in keymap:
        fmt, fname = _bnb_tensor(getters, keymap, module + ".weight_format", module, "weight_format")
        if int(np.asarray(fmt).reshape(-1)[0]) != 0:
            raise ValueError(f"{fname}: tensor {keymap[module + '.weight_format']} is {int(np.asarray(fmt))}, "
                             "expected 0 (row-major int8; other layouts are GPU-specific)")
        used.add(module + ".weight_format")
    scale = (np.asarray(scb, np.float32).reshape(-1) / np.float32(127.0)).astype(np.float32)
    return Q.Int8(q=jnp.asarray(np.ascontiguousarray(np.asarray(w).T)), scale=jnp.asarray(scale))


def _bnb_quantized_modules(keymap, mode: str) -> List[str]:
    """Module names the file stores quantized: a quant_state blob (4-bit) or an SCB (8-bit) beside the weight."""
    if mode == "4bit":
        return sorted({k.split(_QS_PREFIX)[0] for k in keymap if _QS_PREFIX in k})
    return sorted({k[: -len(".SCB")] for k in keymap if k.endswith(".SCB")})


# ----------------------------------------------------------------------------------------------------------
# Writing: jlora's quantized kernels as the tensors transformers + bitsandbytes load (the reader's inverse)


def _scb_of(scale: np.ndarray) -> np.ndarray:
    """float32 SCB with ``SCB / 127 == scale`` bit for bit where a neighbour of ``scale * 127`` gives it (so a
    written file reads back to the same `Int8`); else the nearest, ``scale * 127``."""
    scale = np.asarray(scale, np.float32)
    c = (scale * np.float32(127.0)).astype(np.float32)
    out = c.copy()
    for cand in (np.nextafter(c, np.float32(np.inf)), np.nextafter(c, np.float32(-np.inf))):
        bad = (out / np.float32(127.0)).astype(np.float32) != scale
        ok = (cand / np.float32(127.0)).astype(np.float32) == scale
        out = np.where(bad & ok, cand, out).astype(np.float32)
    return out


def bnb_tensors(module: str, kernel, dtype: str = "float32") -> Dict[str, np.ndarray]:
    """The safetensors entries of one quantized module, as transformers saves a bnb ``Linear4bit`` /
    ``Linear8bitLt``: a `jlora.quant.Quant4bit` (its bytes as they are) or a `jlora.quant.Int8`.

    Args:
      module: the HF module name (``model.layers.0.self_attn.q_proj``).
      kernel: the quantized kernel.
      dtype: the float dtype bnb records in a 4-bit quant state (the dtype it dequantizes to).

    Example:
      >>> from jlora import quant as Q
      >>> k = Q.quantize_kernel(np.ones((64, 32), np.float32), Q.QuantConfig("nf4"))
      >>> sorted(bnb_tensors("fc", k))[:2], bnb_tensors("fc", k)["fc.weight"].shape
      (['fc.weight', 'fc.weight.absmax'], (1024, 1))
    """
    from jlora import quant as Q

    if isinstance(kernel, Q.Int8):
        w = np.ascontiguousarray(np.asarray(jax.device_get(kernel.q)).T)
        return {module + ".weight": w, module + ".SCB": _scb_of(np.asarray(jax.device_get(kernel.scale))),
                module + ".weight_format": np.zeros((), np.uint8)}
    if not isinstance(kernel, Q.Quant4bit):
        raise TypeError(f"bnb_tensors: {module} is a {type(kernel).__name__}, not a Quant4bit or Int8 kernel")
    n_in, n_out = kernel.in_out
    g = lambda x: np.asarray(jax.device_get(x))  # noqa: E731
    out = {module + ".weight": g(kernel.codes).reshape(-1, 1),
           module + ".weight.absmax": g(kernel.absmax).reshape(-1),
           module + ".weight.quant_map": Q.CODES[kernel.quant_type].copy()}
    state = {"quant_type": kernel.quant_type, "blocksize": int(kernel.block_size), "dtype": dtype,
             "shape": [int(n_out), int(n_in)]}
    if kernel.double_quant:
        out[module + ".weight.nested_absmax"] = g(kernel.nested_absmax).reshape(-1).astype(np.float32)
        out[module + ".weight.nested_quant_map"] = Q.DYNAMIC_MAP.copy()
        state.update(nested_blocksize=Q.NESTED_BLOCK, nested_dtype="float32",
                     nested_offset=float(g(kernel.offset)))
    blob = np.frombuffer(json.dumps(state).encode("utf-8"), np.uint8).copy()
    out[module + _QS_PREFIX + kernel.quant_type] = blob
    return out


def quantization_config(kernels: Dict[str, object], float_modules: List[str], compute_dtype: str) -> dict:
    """config.json's ``quantization_config`` for a model whose quantized kernels are ``kernels`` (HF module ->
    kernel) and whose other linear modules are ``float_modules`` (listed in ``llm_int8_skip_modules`` so that
    transformers leaves them float). One format per file, as a ``BitsAndBytesConfig`` describes: a mix of 4-bit
    and int8, of NF4 and FP4 or of double quantization on and off is refused, naming two such modules."""
    from jlora import quant as Q

    def kind(k):
        if isinstance(k, Q.Int8):
            return ("8bit",)
        return ("4bit", k.quant_type, k.double_quant)

    kinds = {}
    for name, k in kernels.items():
        kinds.setdefault(kind(k), name)
    if len(kinds) != 1:
        (k1, n1), (k2, n2) = list(kinds.items())[:2]
        raise ValueError(f"save_pretrained: one bitsandbytes checkpoint holds one quantization, but {n1} is "
                         f"{_describe(k1)} and {n2} is {_describe(k2)}")
    (k,) = kinds
    four = k[0] == "4bit"
    return {"quant_method": "bitsandbytes", "load_in_4bit": four, "load_in_8bit": not four,
            "_load_in_4bit": four, "_load_in_8bit": not four,
            "bnb_4bit_quant_type": k[1] if four else "fp4", "bnb_4bit_use_double_quant": bool(four and k[2]),
            "bnb_4bit_compute_dtype": compute_dtype, "bnb_4bit_quant_storage": "uint8",
            "llm_int8_skip_modules": sorted(float_modules) or None, "llm_int8_threshold": 6.0,
            "llm_int8_has_fp16_weight": False, "llm_int8_enable_fp32_cpu_offload": False}


def _describe(kind) -> str:
    if kind[0] == "8bit":
        return "int8"
    return f"{kind[1]} ({'with' if kind[2] else 'without'} double quantization)"
