"""The decoder-only Transformer: GPT-2 and Llama families, as pure functions over a parameter tree.

The parameter tree is a nested dict whose paths are exactly the Hugging Face module paths of the
``*ForCausalLM`` model, so a PEFT ``target_modules`` entry selects the same matrices here as in PEFT:

* GPT-2: ``transformer.wte``, ``transformer.wpe``, ``transformer.h.<i>.{ln_1, attn.c_attn, attn.c_proj, ln_2,
  mlp.c_fc, mlp.c_proj}``, ``transformer.ln_f``; the head is tied to ``wte``.
* Llama: ``model.embed_tokens``, ``model.layers.<i>.{input_layernorm, self_attn.{q,k,v,o}_proj,
  post_attention_layernorm, mlp.{gate,up,down}_proj}``, ``model.norm``, and ``lm_head`` when untied.

Leaves: linear layers hold ``kernel`` (``[in, out]``, so ``x @ kernel``) and optionally ``bias``; norms hold
``scale`` (and ``bias`` for LayerNorm); embeddings hold ``embedding`` (``[vocab, d]``).

Why functions and not Flax linen modules: a kernel leaf may be a PEFT wrapper (a pytree node holding several
arrays); linen's ``self.param`` checks every leaf's shape against its initializer and rejects such nodes, and
linen's auto-generated names (``h_0``) would not match Hugging Face's (``h.0``). Plain functions keep the tree
itself as the API, which is what the PEFT transforms operate on. Every linear layer goes through
`jlora.kernels.matmul`, the single dispatch point for wrappers.

The functions are pure; `apply` is jitted with the config static.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jlora.config import ModelConfig
from jlora.kernels import (HOOK_SITES_BODY, HOOK_SITES_LAYER, HOOKS, Hook, KernelWrapper, is_wrapper, linear,
                           materialize, matmul)

Params = dict
Cache = dict

# The sharding of the residual stream ``[B, T, d]`` while a sharded step is traced (set by
# `jlora.parallel`): the batch over the data-parallel axes, ``d`` replicated. Pinning it at every block boundary
# makes XLA gather FSDP-sharded weights instead of splitting activations along ``d``.
_RESIDUAL_SHARDING: contextvars.ContextVar = contextvars.ContextVar("jlora_residual_sharding", default=None)


@contextlib.contextmanager
def residual_sharding(sharding):
    """While active (at trace time), the residual stream is constrained to ``sharding`` (None: no constraint)."""
    token = _RESIDUAL_SHARDING.set(sharding)
    try:
        yield
    finally:
        _RESIDUAL_SHARDING.reset(token)


def _constrain(x: jax.Array) -> jax.Array:
    sharding = _RESIDUAL_SHARDING.get()
    return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


# ----------------------------------------------------------------------------------------------------------
# Building blocks


def _linear(p: dict, x: jax.Array) -> jax.Array:
    return linear(x, p["kernel"], p.get("bias"))


def _hook(p: dict, site: str):
    """The hook node at ``site`` of a layer or body sub-tree, or None (the identity)."""
    hooks = p.get(HOOKS)
    return None if hooks is None else hooks.get(site)


def _layer_norm(p: dict, x: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    y = y * materialize(p["scale"]).astype(jnp.float32) + materialize(p["bias"]).astype(jnp.float32)
    return y.astype(x.dtype)


def _rms_norm(p: dict, x: jax.Array, eps: float) -> jax.Array:
    # As Hugging Face's LlamaRMSNorm: normalize in float32, cast back, then scale.
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + eps)
    return materialize(p["scale"]).astype(x.dtype) * y.astype(x.dtype)


def _norm(cfg: ModelConfig, p: dict, x: jax.Array) -> jax.Array:
    if cfg.arch == "gpt2":
        return _layer_norm(p, x, cfg.norm_eps)
    return _rms_norm(p, x, cfg.norm_eps)


def _rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding in the "rotate half" layout Hugging Face Llama uses. x: [B, T, H, D]; positions: [B, T]."""
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, T, 1, D]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x * cos.astype(x.dtype) + rotated * sin.astype(x.dtype)).astype(x.dtype)


def attention_impl(cfg: ModelConfig, dtype, masked: bool) -> str:
    """Which `jax.nn.dot_product_attention` implementation to use (its own default is always XLA).

    cuDNN's fused (flash) attention never materializes the [B, N, T, T] scores; it needs a GPU, a 16-bit
    dtype and a head size that is a multiple of 8 up to 128, and here is used only for the plain causal case.
    """
    if cfg.attention != "auto":
        return cfg.attention
    ok = (not masked and jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
          and cfg.dim_head % 8 == 0 and cfg.dim_head <= 128)
    return "cudnn" if ok else "xla"


def _attention(cfg: ModelConfig, q, k, v, mask: Optional[jax.Array]) -> jax.Array:
    """q: [B, T, N, D], k/v: [B, S, K, D]; mask: bool broadcastable to [B, N, T, S] or None for plain causal."""
    impl = attention_impl(cfg, q.dtype, mask is not None)
    if mask is None:
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=impl)


def _attn_block(cfg: ModelConfig, p: dict, x, positions, mask, layer_cache, cache_index, prefix):
    b, t, _ = x.shape
    nh, kh, hd = cfg.n_heads, cfg.kv_heads, cfg.dim_head
    if cfg.arch == "gpt2":
        a = p["attn"]
        qkv = _linear(a["c_attn"], x)
        q, k, v = jnp.split(qkv, 3, axis=-1)
        out_proj = a["c_proj"]
    else:
        a = p["self_attn"]
        q, k, v = _linear(a["q_proj"], x), _linear(a["k_proj"], x), _linear(a["v_proj"], x)
        out_proj = a["o_proj"]
    q = q.reshape(b, t, nh, hd)
    k = k.reshape(b, t, kh, hd)
    v = v.reshape(b, t, kh, hd)
    if cfg.arch == "llama":
        q = _rope(q, positions, cfg.rope_theta)
        k = _rope(k, positions, cfg.rope_theta)
    new_cache = None
    if layer_cache is not None:
        ck = jax.lax.dynamic_update_slice_in_dim(layer_cache["k"], k.astype(layer_cache["k"].dtype), cache_index, 1)
        cv = jax.lax.dynamic_update_slice_in_dim(layer_cache["v"], v.astype(layer_cache["v"].dtype), cache_index, 1)
        new_cache = dict(layer_cache, k=ck, v=cv)
        k, v = ck.astype(q.dtype), cv.astype(q.dtype)
        if "pk" in layer_cache:  # the virtual tokens' keys/values (prompt tuning), computed once by init_cache
            prefix = (layer_cache["pk"], layer_cache["pv"])
    if prefix is not None:  # keys/values before the sequence that every query attends to (as stored: no RoPE)
        pk, pv = prefix
        k = jnp.concatenate([pk.astype(q.dtype), k], axis=1)
        v = jnp.concatenate([pv.astype(q.dtype), v], axis=1)
        if mask is None:
            mask = jnp.tril(jnp.ones((t, t), bool))[None, None]
        mask = jnp.concatenate([jnp.ones(mask.shape[:-1] + (pk.shape[1],), bool), mask], axis=-1)
    y = _attention(cfg, q, k, v, mask).reshape(b, t, nh * hd)
    return _linear(out_proj, y), new_cache


def _mlp_block(cfg: ModelConfig, p: dict, x):
    m = p["mlp"]
    if cfg.arch == "gpt2":
        return _linear(m["c_proj"], jax.nn.gelu(_linear(m["c_fc"], x), approximate=True))
    return _linear(m["down_proj"], jax.nn.silu(_linear(m["gate_proj"], x)) * _linear(m["up_proj"], x))


def _block(cfg: ModelConfig, p: dict, x, positions, mask, layer_cache, cache_index, prefix=None):
    if cfg.arch == "gpt2":
        ln1, ln2 = p["ln_1"], p["ln_2"]
    else:
        ln1, ln2 = p["input_layernorm"], p["post_attention_layernorm"]
    h, new_cache = _attn_block(cfg, p, _norm(cfg, ln1, x), positions, mask, layer_cache, cache_index, prefix)
    hook = _hook(p, "attn_out")  # a sublayer hook (bottleneck adapter) owns the residual sum; absent: x + h
    x = x + h if hook is None else hook(h, x)
    h = _mlp_block(cfg, p, _norm(cfg, ln2, x))
    hook = _hook(p, "mlp_out")
    x = x + h if hook is None else hook(h, x)
    return x, new_cache


# ----------------------------------------------------------------------------------------------------------
# Tree access helpers shared by the model, converters and PEFT code


def body(cfg: ModelConfig, params: Params) -> dict:
    """The sub-tree holding embeddings, layers and the final norm (``transformer`` or ``model``)."""
    return params["transformer" if cfg.arch == "gpt2" else "model"]


def layers(cfg: ModelConfig, params: Params) -> list:
    """The per-layer sub-trees in order."""
    sub = body(cfg, params)["h" if cfg.arch == "gpt2" else "layers"]
    return [sub[str(i)] for i in range(cfg.n_layers)]


def embedding(cfg: ModelConfig, params: Params) -> jax.Array:
    return materialize(body(cfg, params)["wte" if cfg.arch == "gpt2" else "embed_tokens"]["embedding"])


# ----------------------------------------------------------------------------------------------------------
# Forward


def virtual_tokens(cfg: ModelConfig, params: Params) -> int:
    """How many virtual positions the tree's prefix hooks put before the first real token (prefix or prompt
    tuning; 0 without). Real tokens take positions from this number on, as in transformers with a prefix cache."""
    tree = body(cfg, params)
    prompt, kvp = _hook(tree, "input_prefix"), _hook(tree, "kv_prefix")
    if prompt is not None and kvp is not None:
        raise ValueError("params has both an input_prefix hook (prompt tuning) and a kv_prefix hook (prefix "
                         "tuning); use one of them")
    hook = prompt if prompt is not None else kvp
    return 0 if hook is None else int(hook.length)


def check_context(cfg: ModelConfig, n_virtual: int, n_tokens: int, what: str = "the input") -> None:
    """ValueError when ``n_virtual`` virtual tokens plus ``n_tokens`` do not fit a model with learned positions
    (GPT-2's ``max_positions``); RoPE models have no such bound."""
    if cfg.arch == "gpt2" and n_virtual + n_tokens > cfg.max_positions:
        lead = f"{n_virtual} virtual tokens (num_virtual_tokens) + " if n_virtual else ""
        raise ValueError(f"{lead}{what} of {n_tokens} tokens = {n_virtual + n_tokens} positions exceeds the "
                         f"model's context of {cfg.max_positions} positions")


def forward(cfg: ModelConfig, params: Params, tokens: jax.Array, *, positions: Optional[jax.Array] = None,
            attention_mask: Optional[jax.Array] = None, cache: Optional[Cache] = None):
    """Runs the Transformer body and returns the final hidden states (before the LM head).

    Prefix hooks (`jlora.kernels.Hook` at the body's ``kv_prefix`` / ``input_prefix`` sites: prefix and prompt
    tuning) put ``P`` virtual positions before the sequence; ``positions`` stay those of the real tokens and the
    model adds ``P`` (`virtual_tokens`), as transformers does with a prefix cache. With an ``input_prefix`` hook a
    cache must come from ``init_cache(..., params=params)``, which holds the virtual tokens' keys and values.

    Args:
      cfg: model config.
      params: parameter tree (plain arrays or kernel wrappers).
      tokens: int ``[B, T]``.
      positions: int ``[B, T]``; default ``0..T-1`` (or continuing from the cache).
      attention_mask: bool/int ``[B, T]``, 1 for real tokens (padding may sit anywhere, typically left).
      cache: a KV cache from `init_cache`; when given, the new keys/values are written at ``cache["index"]``.

    Returns:
      ``(hidden [B, T, d] in cfg.dtype, new_cache or None)``.
    """
    dt = jnp.dtype(cfg.dtype)
    b, t = tokens.shape
    tree = body(cfg, params)
    emb = embedding(cfg, params)
    x = jnp.take(emb, tokens, axis=0).astype(dt)
    n_virtual = virtual_tokens(cfg, params)
    prompt, kvp = _hook(tree, "input_prefix"), _hook(tree, "kv_prefix")

    cache_index = None
    if cache is not None:
        if prompt is not None and "pk" not in cache["layers"][0]:
            raise ValueError("forward: params has an input_prefix hook (prompt tuning) but the cache holds no "
                             "virtual tokens; make it with init_cache(cfg, batch, max_len, params=params)")
        cache_index = cache["index"]
        key_mask = cache["key_mask"]
        new_valid = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
        key_mask = jax.lax.dynamic_update_slice_in_dim(key_mask, new_valid, cache_index, 1)
        if positions is None:
            positions = cache["next_pos"][:, None] + jnp.cumsum(new_valid, axis=1) - 1
            positions = jnp.maximum(positions, 0)
        s = key_mask.shape[1]
        q_slot = cache_index + jnp.arange(t)
        causal = jnp.arange(s)[None, :] <= q_slot[:, None]  # [T, S]
        diag = jnp.arange(s)[None, :] == q_slot[:, None]  # a padded query still attends to itself (no NaN rows)
        mask = ((key_mask[:, None, :] & causal[None]) | diag[None])[:, None]  # [B, 1, T, S]
    else:
        check_context(cfg, n_virtual, t)
        if attention_mask is not None:
            valid = attention_mask.astype(bool)
            if positions is None:
                positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
            causal = jnp.tril(jnp.ones((t, t), bool))
            mask = ((valid[:, None, :] & causal[None]) | jnp.eye(t, dtype=bool)[None])[:, None]
        else:
            mask = None
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], (b, t))
    real_positions = positions
    positions = positions + n_virtual  # where the real tokens sit (they follow the virtual ones)

    n_drop = 0
    if prompt is not None and cache is None:  # virtual token embeddings before the first token, dropped after
        pe = prompt.embeds(b, dt)
        n_drop = pe.shape[1]
        x = jnp.concatenate([pe.astype(dt), x], axis=1)
        full = t + n_drop
        valid = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
        valid = jnp.concatenate([jnp.ones((b, n_drop), bool), valid], axis=1)
        causal = jnp.tril(jnp.ones((full, full), bool))
        mask = ((valid[:, None, :] & causal[None]) | jnp.eye(full, dtype=bool)[None])[:, None]
        positions = jnp.concatenate([jnp.broadcast_to(jnp.arange(n_drop, dtype=positions.dtype)[None],
                                                      (b, n_drop)), positions], axis=1)
    prefix_kv = None if kvp is None else kvp.kv(b, dt)  # ([L, B, P, kv_heads, dim_head],) * 2
    x, new_layers = _run_layers(cfg, params, x, positions, mask, cache, cache_index, prefix_kv)
    if n_drop:
        x = x[:, n_drop:]

    new_cache = None
    if cache is not None:
        new_cache = dict(cache, layers=new_layers, index=cache_index + t, key_mask=key_mask,
                         next_pos=real_positions[:, -1] + 1)
    return x, new_cache


def _run_layers(cfg: ModelConfig, params: Params, x, positions, mask, cache, cache_index, prefix_kv):
    """Position embeddings (GPT-2), the layers and the final norm over embedded inputs ``x`` ``[B, T, d]``."""
    tree = body(cfg, params)
    dt = jnp.dtype(cfg.dtype)
    if cfg.arch == "gpt2":
        x = x + jnp.take(materialize(tree["wpe"]["embedding"]), positions, axis=0).astype(dt)
    x = _constrain(x)
    block = functools.partial(_block, cfg)
    if cfg.remat:
        block = jax.checkpoint(block, policy=jax.checkpoint_policies.nothing_saveable)
    new_layers = []
    for i, lp in enumerate(layers(cfg, params)):
        layer_cache = None if cache is None else cache["layers"][i]
        prefix = None if prefix_kv is None else (prefix_kv[0][i], prefix_kv[1][i])
        x, lc = block(lp, x, positions, mask, layer_cache, cache_index, prefix)
        x = _constrain(x)
        new_layers.append(lc)
    x = _constrain(_norm(cfg, tree["ln_f" if cfg.arch == "gpt2" else "norm"], x))
    return x, new_layers


def lm_head(cfg: ModelConfig, params: Params, hidden: jax.Array, pad_to: int = 1) -> jax.Array:
    """Projects hidden states to vocabulary logits (in the compute dtype).

    Args:
      cfg: model config.
      params: parameter tree.
      hidden: ``[..., d]`` final hidden states.
      pad_to: round the vocabulary up to a multiple of this (e.g. 128) so the head matmul has aligned shapes
        (GPT-2's 50257 is not); the extra logits are ``-inf``-like and must be ignored or sliced by the caller.
        A head that is a kernel wrapper (e.g. LoRA on ``lm_head``) is not padded.

    Returns:
      ``[..., vocab]`` logits, or ``[..., padded vocab]`` when ``pad_to`` > 1.
    """
    v = cfg.vocab_size
    extra = (-v) % pad_to
    if cfg.tie_embeddings:
        w = embedding(cfg, params).astype(hidden.dtype)
        if extra:
            w = jnp.pad(w, ((0, extra), (0, 0)))
        logits = jnp.matmul(hidden, w.T)
    else:
        kernel = params["lm_head"]["kernel"]
        if extra and not isinstance(kernel, KernelWrapper):
            logits = jnp.matmul(hidden, jnp.pad(materialize(kernel).astype(hidden.dtype), ((0, 0), (0, extra))))
        else:
            logits, extra = matmul(hidden, kernel), 0
    if extra:
        pad_mask = jnp.arange(v + extra) >= v
        logits = jnp.where(pad_mask, jnp.asarray(-1e9, logits.dtype), logits)
    return logits


@functools.partial(jax.jit, static_argnames=("cfg",))
def apply(cfg: ModelConfig, params: Params, tokens: jax.Array, attention_mask: Optional[jax.Array] = None,
          positions: Optional[jax.Array] = None) -> jax.Array:
    """Logits of a causal LM.

    Args:
      cfg: model config (static).
      params: parameter tree.
      tokens: int32 ``[B, T]``.
      attention_mask: optional ``[B, T]``, 1 for real tokens.
      positions: optional int ``[B, T]``.

    Returns:
      float32 logits ``[B, T, vocab]``.

    Example:
      >>> cfg = jlora.preset("tiny-llama"); params = jlora.init_params(cfg, jax.random.key(0))
      >>> jlora.apply(cfg, params, jnp.zeros((1, 5), jnp.int32)).shape
      (1, 5, 128)
    """
    hidden, _ = forward(cfg, params, tokens, positions=positions, attention_mask=attention_mask)
    return lm_head(cfg, params, hidden).astype(jnp.float32)


# ----------------------------------------------------------------------------------------------------------
# KV cache


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: Any = None, *, params: Params = None) -> Cache:
    """An empty KV cache for ``batch`` sequences of up to ``max_len`` tokens (prompt + generated).

    With ``params`` that carry an ``input_prefix`` hook (prompt tuning) the cache also holds the virtual tokens'
    keys and values (``layers[i]["pk"/"pv"]``, computed here once: they depend on no real token), so decoding
    never recomputes them; `forward` requires such a cache for those params.
    """
    n_virtual = 0 if params is None else virtual_tokens(cfg, params)
    check_context(cfg, n_virtual, max_len, "a KV cache")
    dtype = jnp.dtype(dtype or cfg.dtype)
    shape = (batch, max_len, cfg.kv_heads, cfg.dim_head)
    cache = {
        "layers": [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(cfg.n_layers)],
        "index": jnp.array(0, jnp.int32),
        "key_mask": jnp.zeros((batch, max_len), bool),
        "next_pos": jnp.zeros((batch,), jnp.int32),
    }
    prompt = None if params is None else _hook(body(cfg, params), "input_prefix")
    if prompt is not None:
        dt = jnp.dtype(cfg.dtype)
        x = prompt.embeds(batch, dt).astype(dt)
        p = x.shape[1]
        positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32)[None], (batch, p))
        tmp = {"layers": [{"k": jnp.zeros((batch, p) + shape[2:], dtype), "v": jnp.zeros((batch, p) + shape[2:], dtype)}
                          for _ in range(cfg.n_layers)]}
        _, virt = _run_layers(cfg, params, x, positions, None, tmp, jnp.array(0, jnp.int32), None)
        for lc, vc in zip(cache["layers"], virt):
            lc["pk"], lc["pv"] = vc["k"], vc["v"]
    return cache


# ----------------------------------------------------------------------------------------------------------
# Initialization


def param_shapes(cfg: ModelConfig) -> Params:
    """The parameter tree of ``cfg`` as nested dicts of shape tuples (the single description of the layout)."""
    d, f, hd, v = cfg.d_model, cfg.d_ff, cfg.dim_head, cfg.vocab_size
    q, kv = cfg.n_heads * hd, cfg.kv_heads * hd

    def lin(i, o, bias):
        return {"kernel": (i, o), "bias": (o,)} if bias else {"kernel": (i, o)}

    if cfg.arch == "gpt2":
        ln = {"scale": (d,), "bias": (d,)}
        layer = {"ln_1": ln, "attn": {"c_attn": lin(d, 3 * q, True), "c_proj": lin(q, d, True)}, "ln_2": ln,
                 "mlp": {"c_fc": lin(d, f, True), "c_proj": lin(f, d, True)}}
        return {"transformer": {"wte": {"embedding": (v, d)}, "wpe": {"embedding": (cfg.max_positions, d)},
                                "h": {str(i): layer for i in range(cfg.n_layers)}, "ln_f": ln}}
    layer = {
        "input_layernorm": {"scale": (d,)},
        "self_attn": {"q_proj": lin(d, q, cfg.attn_bias), "k_proj": lin(d, kv, cfg.attn_bias),
                      "v_proj": lin(d, kv, cfg.attn_bias), "o_proj": lin(q, d, cfg.attn_out_bias)},
        "post_attention_layernorm": {"scale": (d,)},
        "mlp": {"gate_proj": lin(d, f, cfg.mlp_bias), "up_proj": lin(d, f, cfg.mlp_bias),
                "down_proj": lin(f, d, cfg.mlp_bias)},
    }
    tree = {"model": {"embed_tokens": {"embedding": (v, d)}, "layers": {str(i): layer for i in range(cfg.n_layers)},
                      "norm": {"scale": (d,)}}}
    if not cfg.tie_embeddings:
        tree["lm_head"] = {"kernel": (d, v)}
    return tree


def _is_shape(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(i, int) for i in x)


def init_params(cfg: ModelConfig, key: jax.Array, dtype: Any = jnp.float32, std: float = 0.02) -> Params:
    """Random parameters (normal(0, std) matrices, unit norm scales, zero biases), as Hugging Face initializes.

    Args:
      cfg: model config.
      key: a `jax.random.key`.
      dtype: parameter dtype.
      std: standard deviation of matrices and embeddings.

    Returns:
      the parameter tree.
    """
    shapes = param_shapes(cfg)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=_is_shape)
    keys = jax.random.split(key, len(leaves))
    out = []
    for (path, shape), k in zip(leaves, keys):
        name = path[-1].key
        if name == "scale":
            out.append(jnp.ones(shape, dtype))
        elif name == "bias":
            out.append(jnp.zeros(shape, dtype))
        else:
            out.append((std * jax.random.normal(k, shape, jnp.float32)).astype(dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


def check_params(cfg: ModelConfig, params: Params, source: str = "params") -> None:
    """Raises ValueError naming the first missing, unexpected or misshaped leaf of ``params`` for ``cfg``."""
    expected = dict(jax.tree_util.tree_flatten_with_path(param_shapes(cfg), is_leaf=_is_shape)[0])
    got = dict(jax.tree_util.tree_flatten_with_path(params, is_leaf=is_wrapper)[0])
    fmt = lambda p: ".".join(str(getattr(k, "key", k)) for k in p)  # noqa: E731
    # Hook nodes of PEFT methods sit at the generic hook sites (<layer>.hooks.<site>, <body>.hooks.<site>).
    root = "transformer" if cfg.arch == "gpt2" else "model"
    stack = "h" if cfg.arch == "gpt2" else "layers"
    for p, v in got.items():
        parts = fmt(p).split(".")
        if HOOKS not in parts:
            continue
        where = fmt(p)
        if not isinstance(v, Hook):
            raise ValueError(f"{source}: {where} sits under a '{HOOKS}' site but is not a jlora.kernels.Hook")
        i = parts.index(HOOKS)
        head, site = parts[:i], ".".join(parts[i + 1:])
        layer_site = len(head) == 3 and head[:2] == [root, stack] and head[2].isdigit()
        sites = HOOK_SITES_LAYER if layer_site else HOOK_SITES_BODY if head == [root] else ()
        if site not in sites:
            raise ValueError(f"{source}: hook {where} is at no hook site the model reads (layer sites "
                             f"{root}.{stack}.<i>.{HOOKS}.{{{','.join(HOOK_SITES_LAYER)}}}, body sites "
                             f"{root}.{HOOKS}.{{{','.join(HOOK_SITES_BODY)}}})")
    got = {p: v for p, v in got.items() if HOOKS not in fmt(p).split(".")}
    exp_names = {fmt(p): s for p, s in expected.items()}
    got_names = {fmt(p): np.shape(v) if not is_wrapper(v) else tuple(v.shape) for p, v in got.items()}
    missing = sorted(set(exp_names) - set(got_names))
    if missing:
        raise ValueError(f"{source}: missing parameter {missing[0]} (expected shape {exp_names[missing[0]]})"
                         + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    extra = sorted(set(got_names) - set(exp_names))
    if extra:
        raise ValueError(f"{source}: unexpected parameter {extra[0]}" +
                         (f" and {len(extra) - 1} more" if len(extra) > 1 else ""))
    for name, shape in exp_names.items():
        if tuple(got_names[name]) != tuple(shape):
            raise ValueError(f"{source}: parameter {name} has shape {tuple(got_names[name])}, expected {shape}")
