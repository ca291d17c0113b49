"""Hugging Face checkpoints (config.json + safetensors) <-> jlora, for the GPT-2 and Llama families.

The key mapping is one declarative table per architecture (`LEAF_RULES`), applied to every leaf of
`jlora.model.param_shapes` and used in both directions: jlora path ``<module>.<leaf>`` <-> HF key
``<module>.<hf_leaf>``, transposed where the HF module is an ``nn.Linear`` (weight ``[out, in]``) and not where
it is GPT-2's ``Conv1D`` (weight ``[in, out]``). Every tensor's shape is checked against the config.

torch is never imported; pickle checkpoints (``pytorch_model.bin``) are refused unless ``allow_pickle=True``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jlora.config import ModelConfig
from jlora.convert.bnb import (_QS_PREFIX, _bnb_quantized_modules, _file_of, _get, bnb_quant_mode, bnb_tensors,
                                load_bnb_4bit, load_bnb_8bit, quantization_config)
from jlora.convert.stfile import SafetensorsFile, write_safetensors
from jlora.kernels import is_wrapper
from jlora.model import _is_shape, param_shapes

# jlora leaf name -> (HF leaf name, transpose). One table per architecture.
LEAF_RULES = {
    "gpt2": {"kernel": ("weight", False), "bias": ("bias", False), "scale": ("weight", False),
             "embedding": ("weight", False)},
    "llama": {"kernel": ("weight", True), "bias": ("bias", False), "scale": ("weight", False),
              "embedding": ("weight", False)},
}
# Modules that are nn.Linear even in GPT-2 (transpose regardless of the architecture rule).
_LINEAR_ALWAYS = {"lm_head"}
# HF keys that are buffers, not parameters: ignored when loading.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")

SUPPORTED_MODEL_TYPES = ("gpt2", "llama", "mistral", "qwen2")


def key_table(cfg: ModelConfig) -> List[Tuple[Tuple[str, ...], str, bool]]:
    """The mapping for ``cfg``: a list of (jlora path tuple, HF key, transpose) for every parameter.

    Example:
      >>> key_table(jlora.preset("tiny-gpt2"))[0]
      (('transformer', 'h', '0', 'attn', 'c_attn', 'bias'), 'transformer.h.0.attn.c_attn.bias', False)
    """
    rules = LEAF_RULES[cfg.arch]
    out = []
    for path, _ in jax.tree_util.tree_flatten_with_path(param_shapes(cfg), is_leaf=_is_shape)[0]:
        names = tuple(k.key for k in path)
        hf_leaf, transpose = rules[names[-1]]
        if names[0] in _LINEAR_ALWAYS and names[-1] == "kernel":
            transpose = True
        out.append((names, ".".join(names[:-1] + (hf_leaf,)), transpose))
    return out


# ----------------------------------------------------------------------------------------------------------
# config.json <-> ModelConfig


def _rope_theta(hf: dict, path: str) -> float:
    rp = hf.get("rope_parameters") or {}
    rs = hf.get("rope_scaling") or {}
    rope_type = rp.get("rope_type") or rs.get("rope_type") or rs.get("type") or "default"
    if rope_type != "default":
        raise ValueError(f"{path}: rope scaling type {rope_type!r} is not supported yet (only plain RoPE)")
    return float(rp.get("rope_theta", hf.get("rope_theta", 10000.0)))


def config_from_hf(hf: dict, path: str = "config.json") -> ModelConfig:
    """Builds a `ModelConfig` from a Hugging Face ``config.json`` dict; unsupported options raise ValueError."""
    mt = hf.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{path}: unknown or unsupported model_type {mt!r}; jlora supports "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    common = dict(vocab_size=hf["vocab_size"], bos_token_id=hf.get("bos_token_id"),
                  eos_token_id=hf.get("eos_token_id"), pad_token_id=hf.get("pad_token_id"),
                  name=hf.get("_name_or_path") or "custom")
    if mt == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"{path}: GPT-2 activation_function {act!r} is not supported (gelu_new only)")
        if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
            raise ValueError(f"{path}: GPT-2 attention scaling options other than the default are not supported")
        if hf.get("add_cross_attention"):
            raise ValueError(f"{path}: GPT-2 with cross-attention is not a decoder-only model")
        d = hf["n_embd"]
        return ModelConfig(arch="gpt2", max_positions=hf.get("n_positions", 1024), d_model=d,
                           n_layers=hf["n_layer"], n_heads=hf["n_head"], d_ff=hf.get("n_inner") or 4 * d,
                           norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                           tie_embeddings=hf.get("tie_word_embeddings", True), **common)
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{path}: hidden_act {act!r} is not supported for {mt} (silu only)")
    if mt == "qwen2" and hf.get("use_sliding_window"):
        raise ValueError(f"{path}: sliding-window attention is not supported")
    if mt == "mistral" and hf.get("sliding_window") and hf["sliding_window"] < hf.get("max_position_embeddings", 0):
        raise ValueError(f"{path}: sliding-window attention (sliding_window={hf['sliding_window']}) is not supported")
    nh = hf["num_attention_heads"]
    hd = hf.get("head_dim") or hf["hidden_size"] // nh
    attn_bias = bool(hf.get("attention_bias", mt == "qwen2"))
    return ModelConfig(arch="llama", max_positions=hf.get("max_position_embeddings", 2048),
                       d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=nh,
                       n_kv_heads=hf.get("num_key_value_heads") or nh,
                       head_dim=None if hd * nh == hf["hidden_size"] else hd,
                       d_ff=hf["intermediate_size"], norm_eps=hf.get("rms_norm_eps", 1e-6),
                       rope_theta=_rope_theta(hf, path), tie_embeddings=hf.get("tie_word_embeddings", False),
                       attn_bias=attn_bias, attn_out_bias=attn_bias and mt != "qwen2",
                       mlp_bias=bool(hf.get("mlp_bias", False)), **common)


def config_to_hf(cfg: ModelConfig, dtype: str = "float32") -> dict:
    """The Hugging Face ``config.json`` dict for ``cfg`` (GPT-2 or Llama/Qwen2)."""
    special = {"bos_token_id": cfg.bos_token_id, "eos_token_id": (list(cfg.eos_token_id)
               if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id), "pad_token_id": cfg.pad_token_id}
    if cfg.arch == "gpt2":
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
                "n_positions": cfg.max_positions, "n_embd": cfg.d_model, "n_layer": cfg.n_layers,
                "n_head": cfg.n_heads, "n_inner": cfg.d_ff, "activation_function": "gelu_new",
                "layer_norm_epsilon": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
                "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "dtype": dtype, **special}
    qwen = cfg.attn_bias and not cfg.attn_out_bias
    out = {"architectures": ["Qwen2ForCausalLM" if qwen else "LlamaForCausalLM"],
           "model_type": "qwen2" if qwen else "llama", "vocab_size": cfg.vocab_size,
           "max_position_embeddings": cfg.max_positions, "hidden_size": cfg.d_model,
           "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
           "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.dim_head, "intermediate_size": cfg.d_ff,
           "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
           "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": "default"},
           "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu", "mlp_bias": cfg.mlp_bias,
           "attention_dropout": 0.0, "dtype": dtype, **special}
    if not qwen:
        out["attention_bias"] = cfg.attn_bias
    return out


# ----------------------------------------------------------------------------------------------------------
# Loading


def _open_tensors(path: str, allow_pickle: bool) -> Dict[str, object]:
    """Returns {hf key: lazy getter} for the checkpoint files in ``path``."""
    single = os.path.join(path, "model.safetensors")
    index = os.path.join(path, "model.safetensors.index.json")
    getters = {}
    if os.path.exists(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index}: not a valid safetensors index ({e})") from None
        files = {}
        for key, fname in weight_map.items():
            fpath = os.path.join(path, fname)
            if fname not in files:
                if not os.path.exists(fpath):
                    raise FileNotFoundError(f"{index}: names shard {fname} for {key}, but {fpath} does not exist")
                files[fname] = SafetensorsFile(fpath)
            if key not in files[fname]:
                raise ValueError(f"{fpath}: the index says it holds {key}, but it does not")
            getters[key] = (files[fname], key)
        return getters
    if os.path.exists(single):
        st = SafetensorsFile(single)
        return {k: (st, k) for k in st.keys()}
    pickles = [f for f in ("pytorch_model.bin",) if os.path.exists(os.path.join(path, f))]
    if pickles and allow_pickle:
        import torch  # only when the user explicitly asks for pickle loading

        sd = torch.load(os.path.join(path, pickles[0]), map_location="cpu", weights_only=True)
        arrays = {k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy() for k, v in sd.items()}
        return {k: (arrays, k) for k in arrays}
    if pickles:
        raise ValueError(f"{path}: holds only a pickle checkpoint ({pickles[0]}); pickle files can run code, so "
                         "jlora loads them only with allow_pickle=True (or convert them to safetensors)")
    raise FileNotFoundError(f"{path}: no weights found (expected model.safetensors or "
                            "model.safetensors.index.json)")



def _shape_at(shapes, names):
    node = shapes
    for k in names:
        node = node[k]
    return tuple(node.shape if hasattr(node, "shape") else node)


def load_hf(path: str, dtype=jnp.float32, allow_pickle: bool = False, quantize=None):
    """Loads a Hugging Face GPT-2 or Llama-family checkpoint directory.

    Args:
      path: a directory with ``config.json`` and ``model.safetensors`` (or a sharded
        ``model.safetensors.index.json``). Keys may carry the ``transformer.``/``model.`` prefix or not.
      dtype: parameter dtype (float32 default; bfloat16 halves memory for a frozen base).
      allow_pickle: also accept ``pytorch_model.bin`` (needs torch; pickle can run code).
      quantize: a `jlora.quant.QuantConfig` (or None): its linear kernels are quantized one at a time as read.

    A checkpoint transformers saved with bitsandbytes (``quantization_config``: ``load_in_4bit`` NF4/FP4, with or
    without double quantization, any ``bnb_4bit_quant_storage``; or ``load_in_8bit``) loads without torch and
    stays quantized: each quantized module becomes a `jlora.quant.Quant4bit` (or `jlora.quant.Int8`) holding the
    file's arrays; modules it left float (``llm_int8_skip_modules``, lm_head by default) are read as float.
    ``quantize`` must then be None.

    Returns:
      ``(ModelConfig, params)``.

    Raises:
      ValueError: naming the file and tensor, for a missing tensor, a shape, dtype, quant type, block size or
        code table jlora cannot read, or a ``quantization_config`` other than bitsandbytes 4-bit / 8-bit.
    """
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: not a directory (expected a Hugging Face model directory or a .gguf file)")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face model directory)")
    try:
        with open(cfg_path) as f:
            hf_cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path}: not valid JSON ({e})") from None
    try:
        cfg = config_from_hf(hf_cfg, cfg_path)
    except KeyError as e:
        raise ValueError(f"{cfg_path}: missing field {e.args[0]!r}") from None
    bnb_mode = bnb_quant_mode(hf_cfg, cfg_path)
    if bnb_mode is not None and quantize is not None:
        raise ValueError(f"{cfg_path}: this checkpoint is already quantized by bitsandbytes ({bnb_mode}); load it "
                         f"with quantize=None (its quantized layers stay quantized), not quantize={quantize!r}")
    getters = _open_tensors(path, allow_pickle)

    prefix = "transformer." if cfg.arch == "gpt2" else "model."
    # Accept checkpoints saved from the base model (no "transformer."/"model." prefix).
    keymap = {}
    for k in getters:
        if k.endswith(_IGNORED_SUFFIXES):
            continue
        full = k if (k.startswith(prefix) or k.startswith("lm_head.")) else prefix + k
        keymap[full] = k
    used = set()
    leaves = {}
    table = key_table(cfg)
    shapes = param_shapes(cfg)
    # bitsandbytes checkpoints: the modules the file stores quantized become Quant4bit / Int8 kernels holding the
    # file's arrays; the others (llm_int8_skip_modules, lm_head by default) are read as float below.
    bnb_modules = set(_bnb_quantized_modules(keymap, bnb_mode)) if bnb_mode else set()
    for names, hf_key, transpose in table:
        if hf_key not in keymap:
            raise ValueError(f"{path}: missing tensor {hf_key} (needed for {'.'.join(names)})")
        module = ".".join(names[:-1])
        if names[-1] == "kernel" and module in bnb_modules:
            in_out = _shape_at(shapes, names)
            loader = load_bnb_4bit if bnb_mode == "4bit" else load_bnb_8bit
            leaves[names] = loader(getters, keymap, module, in_out, used)
            continue
        arr = _get(getters[keymap[hf_key]])
        if bnb_mode and names[-1] == "kernel" and arr.dtype in (np.uint8, np.int8):
            need = f"{module}{_QS_PREFIX}<nf4|fp4>" if bnb_mode == "4bit" else f"{module}.SCB"
            raise ValueError(f"{_file_of(getters[keymap[hf_key]])}: missing tensor {need} (the quantization state "
                             f"of {hf_key}, stored as {arr.dtype} in this bitsandbytes {bnb_mode} checkpoint)")
        if transpose:
            arr = arr.T
        leaves[names] = arr
        used.add(hf_key)
    if cfg.tie_embeddings:
        used.add("lm_head.weight")  # a tied head may be stored; it equals the embedding
    unused = sorted(set(keymap) - used)
    if unused:
        raise ValueError(f"{path}: unexpected tensor {keymap[unused[0]]} for a {cfg.arch} model"
                         + (f" (and {len(unused) - 1} more)" if len(unused) > 1 else ""))

    target = jnp.dtype(dtype)
    info = {names: (hf_key, transpose) for names, hf_key, transpose in table}

    def leaf(path_, shape):
        names = tuple(k.key for k in path_)
        arr = leaves[names]
        hf_key, transpose = info[names]
        if is_wrapper(arr):  # a bitsandbytes-quantized kernel, shapes checked when read
            return arr
        if tuple(arr.shape) != tuple(shape):
            flip = (lambda s: tuple(s)[::-1]) if transpose else tuple  # report shapes as stored in the file
            raise ValueError(f"{path}: tensor {hf_key} has shape {flip(arr.shape)}, expected {flip(shape)} "
                             f"for this config.json")
        if not (np.issubdtype(arr.dtype, np.floating) or arr.dtype == ml_dtypes.bfloat16):
            raise ValueError(f"{path}: tensor {hf_key} has non-float dtype {arr.dtype}")
        module = ".".join(names[:-1])
        if qcfg is not None and names[-1] == "kernel" and qcfg.selects(module):
            # Quantized on the host from the value transformers would quantize (the weight cast to dtype); no
            # float copy of this matrix goes to the device.
            return quantize_kernel(np.asarray(arr, np.float32).astype(target).astype(np.float32), qcfg, module)
        return jnp.asarray(arr if arr.dtype == target else np.asarray(arr, np.float32), dtype=target)

    qcfg = None
    if quantize is not None:
        from jlora.quant import QuantConfig, quantize_kernel

        qcfg = QuantConfig.of(quantize)
    params = jax.tree_util.tree_map_with_path(leaf, shapes, is_leaf=_is_shape)
    return cfg, params


# ----------------------------------------------------------------------------------------------------------
# Saving


def save_hf(cfg: ModelConfig, params, out_dir: str, dtype: Optional[str] = None, quantize=None) -> None:
    """Writes ``params`` as a Hugging Face model directory that ``transformers.from_pretrained`` loads.

    Adapter wrappers (e.g. unmerged LoRA) are refused: merge first with `jlora.merge`. Quantized kernels
    (`jlora.quant.Quant4bit`, `jlora.quant.Int8`: a base loaded with ``quantize=``, or ``quantize`` here) are
    written as a bitsandbytes checkpoint (the layout transformers saves with ``BitsAndBytesConfig``, with its
    ``quantization_config``), their bytes as they are. The files are written to a temporary folder beside
    ``out_dir`` and moved into place, so an existing ``out_dir`` is never left half-written.

    Args:
      cfg: model config.
      params: a parameter tree: plain arrays, and optionally Quant4bit / Int8 kernels.
      out_dir: destination directory (created; existing config.json/model.safetensors are replaced).
      dtype: storage dtype of the float tensors ("float32", "bfloat16", "float16"); default: the dtype of the
        embedding.
      quantize: quantize the plain kernels first (``"nf4"``, ``"fp4"``, ``"int8"``, a dict or a
        `jlora.quant.QuantConfig`; see `jlora.quant.quantize_params`), e.g. to re-quantize a merged QLoRA model.
    """
    from jlora import quant as Q

    flat = dict(jax.tree_util.tree_flatten_with_path(params, is_leaf=is_wrapper)[0])
    flat = {tuple(getattr(k, "key", k) for k in p): v for p, v in flat.items()}
    wrapped = [".".join(p) for p, v in flat.items() if is_wrapper(v) and not Q.is_quantized(v)]
    if wrapped:
        v = flat[tuple(wrapped[0].split("."))]
        hint = (" (a GGUF-quantized base: jlora.merge(params) dequantizes it to float32)" if
                type(v).__name__.startswith("GGUF") else "")
        raise ValueError(f"save_pretrained: {wrapped[0]} is a {type(v).__name__} node{hint}; call "
                         "jlora.merge(params) first (or save the adapter with jlora.save_adapter)")
    if quantize is not None:
        qcfg = Q.QuantConfig.of(quantize)
        already = [".".join(p) for p, v in flat.items() if Q.is_quantized(v)]
        if already:
            raise ValueError(f"save_pretrained(quantize={qcfg.quant!r}): {already[0]} is already quantized; "
                             "pass a float tree (jlora.merge(params) dequantizes) or leave quantize unset")
        params = Q.quantize_params(cfg, params, qcfg)
        flat = dict(jax.tree_util.tree_flatten_with_path(params, is_leaf=is_wrapper)[0])
        flat = {tuple(getattr(k, "key", k) for k in p): v for p, v in flat.items()}
    from jlora.model import check_params

    check_params(cfg, params, "save_pretrained")
    if dtype is None:
        dtype = str(jnp.dtype(next(v for v in flat.values() if not is_wrapper(v)).dtype))
    np_dtype = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}.get(dtype)
    if np_dtype is None:
        raise ValueError(f"save_pretrained: dtype must be float32, float16 or bfloat16, got {dtype!r}")
    tensors, quantized, float_linear = {}, {}, []
    for names, hf_key, transpose in key_table(cfg):
        leaf = flat[names]
        if Q.is_quantized(leaf):
            module = hf_key[: -len(".weight")]
            quantized[module] = leaf
            tensors.update(bnb_tensors(module, leaf, dtype))
            continue
        if names[-1] == "kernel":
            float_linear.append(hf_key[: -len(".weight")])
        arr = np.asarray(jax.device_get(leaf).astype(np.float32) if leaf.dtype != np_dtype
                         else jax.device_get(leaf))
        arr = arr.T if transpose else arr
        tensors[hf_key] = np.ascontiguousarray(arr.astype(np_dtype))
    hf_config = config_to_hf(cfg, dtype)
    if quantized:
        hf_config["quantization_config"] = quantization_config(quantized, float_linear, dtype)
    os.makedirs(out_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".jlora-save-", dir=out_dir)
    try:
        write_safetensors(os.path.join(tmp, "model.safetensors"), tensors)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config, f, indent=2)
        gen = {k: v for k, v in (("bos_token_id", cfg.bos_token_id), ("eos_token_id", cfg.eos_token_id),
                                  ("pad_token_id", cfg.pad_token_id)) if v is not None}
        with open(os.path.join(tmp, "generation_config.json"), "w") as f:
            json.dump(gen, f, indent=2)
        # A stale sharded index would shadow the new single file on load.
        stale = os.path.join(out_dir, "model.safetensors.index.json")
        if os.path.exists(stale):
            os.remove(stale)
        for name in ("model.safetensors", "generation_config.json", "config.json"):
            os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
