"""Prefix tuning (Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation"; PEFT's
``PrefixTuningConfig``) as a hook at the model's ``kv_prefix`` site.

Every layer's attention gets ``P = num_virtual_tokens`` extra keys and values before the sequence, learned
directly (no RoPE is applied to them: they are stored as a KV cache is). As PEFT (0.21) computes them
(``PeftModel.get_prompt``):

* one table ``[P, n_layers * 2 * token_dim]`` holds them all, ``token_dim = kv_heads * head_dim`` (with grouped-
  query attention the prefix has the key/value heads' width, not the model's); a row splits as
  ``[n_layers, 2 (key, value), kv_heads, head_dim]``;
* with ``prefix_projection=True`` the table is computed during training by an MLP from a smaller embedding,
  ``tanh(E @ W1 + b1) @ W2 + b2`` (E ``[P, token_dim]``, hidden ``encoder_hidden_size``); PEFT saves the
  MLP's output (the folded table), and so does jlora (`Prefix.folded`);
* real tokens take positions ``P, P+1, ...`` (transformers' positions after a ``P``-token cache), and every query
  attends to every prefix position (the attention mask gets ``P`` ones in front).

The prefix cannot be folded into the weights: `jlora.merge` refuses it. Initialization as PEFT: the embedding
``N(0, 1)`` (``torch.nn.Embedding``), the MLP's linears ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``
(``torch.nn.Linear``); ``init_weights="zero"`` zeroes the table (or the MLP's last layer): zero keys and values,
which still take attention mass (not an identity).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
from flax import struct

from jlora.config import ModelConfig
from jlora.kernels import HOOKS, Hook, register_role
from jlora.peft import base as B

PREFIX = register_role("prefix", "matrices")  # as HF Trainer: the tables and matrices decay, biases do not


@struct.dataclass
class Prefix(Hook):
    """Learned per-layer key/value prefixes (the body's ``kv_prefix`` hook).

    Attributes:
      embedding: ``[P, n_layers * 2 * token_dim]`` (the table itself), or ``[P, token_dim]`` with a projection.
      w1, b1, w2, b2: the projection MLP (``prefix_projection``), or None.
      n_layers, kv_heads, head_dim: the model's layout (static).
    """

    embedding: jax.Array
    w1: Any = None
    b1: Any = None
    w2: Any = None
    b2: Any = None
    n_layers: int = struct.field(pytree_node=False, default=1)
    kv_heads: int = struct.field(pytree_node=False, default=1)
    head_dim: int = struct.field(pytree_node=False, default=1)

    @property
    def length(self) -> int:
        """``P``, the number of virtual tokens."""
        return int(self.embedding.shape[0])

    @property
    def projected(self) -> bool:
        return self.w1 is not None

    def table(self) -> jax.Array:
        """The ``[P, n_layers * 2 * token_dim]`` float32 table (the MLP's output with a projection)."""
        e = self.embedding.astype(jnp.float32)
        if not self.projected:
            return e
        hp = jax.lax.Precision.HIGHEST
        h = jnp.tanh(jnp.matmul(e, self.w1.astype(jnp.float32), precision=hp) + self.b1.astype(jnp.float32))
        return jnp.matmul(h, self.w2.astype(jnp.float32), precision=hp) + self.b2.astype(jnp.float32)

    def kv(self, batch: int, dtype):
        """``(k, v)``, each ``[n_layers, batch, P, kv_heads, head_dim]`` in ``dtype`` (PEFT casts to the base's)."""
        p = self.length
        t = self.table().astype(dtype).reshape(p, self.n_layers, 2, self.kv_heads, self.head_dim)
        t = jnp.transpose(t, (2, 1, 0, 3, 4))  # [2, L, P, K, D]
        grow = lambda a: jnp.broadcast_to(a[:, None], (a.shape[0], batch) + a.shape[1:])  # noqa: E731
        return grow(t[0]), grow(t[1])

    def folded(self) -> "Prefix":
        """The same prefix with the projection evaluated: the table alone (what PEFT saves and serves)."""
        return self.replace(embedding=self.table(), w1=None, b1=None, w2=None, b2=None)

    def labels(self, label_base):
        return jax.tree_util.tree_map(lambda _: PREFIX, self)


@dataclasses.dataclass(frozen=True)
class PrefixConfig:
    """Prefix tuning options (PEFT's ``PrefixTuningConfig`` names and meaning).

    Args:
      num_virtual_tokens: ``P`` (> 0), the prefix length of every layer.
      prefix_projection: learn the table through a two-layer tanh MLP (training only; saved folded).
      encoder_hidden_size: the MLP's hidden size (default: ``token_dim``, as PEFT).
      init_weights: None (random, PEFT's default) or ``"zero"``.
      dtype: dtype of the trainable arrays.

    Example:
      >>> PrefixConfig(num_virtual_tokens=8).num_virtual_tokens
      8
    """

    num_virtual_tokens: int = 20
    prefix_projection: bool = False
    encoder_hidden_size: Optional[int] = None
    init_weights: Optional[str] = None
    dtype: str = "float32"

    def __post_init__(self):
        n = self.num_virtual_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"num_virtual_tokens must be a positive int, got {n!r}")
        if not isinstance(self.prefix_projection, bool):
            raise ValueError(f"prefix_projection must be true or false, got {self.prefix_projection!r}")
        h = self.encoder_hidden_size
        if h is not None and (isinstance(h, bool) or not isinstance(h, int) or h < 1):
            raise ValueError(f"encoder_hidden_size must be a positive int, got {h!r}")
        if self.init_weights not in (None, "zero"):
            raise ValueError(f"init_weights must be null (random) or 'zero', got {self.init_weights!r}")
        try:
            jnp.dtype(self.dtype)
        except TypeError:
            raise ValueError(f"dtype {self.dtype!r} is not a dtype") from None

    def replace(self, **changes) -> "PrefixConfig":
        return dataclasses.replace(self, **changes)


def token_dim(cfg: ModelConfig) -> int:
    """PEFT's ``token_dim`` for prefix tuning: ``head_dim * num_key_value_heads``."""
    return cfg.kv_heads * cfg.dim_head


def set_body_hook(cfg: ModelConfig, params, site: str, hook: Hook, where: str):
    """A new tree with ``hook`` at the body's hook ``site``; refuses a tree that already has a prefix hook."""
    from jlora.model import body

    root = "transformer" if cfg.arch == "gpt2" else "model"
    tree = body(cfg, params)
    have = tree.get(HOOKS, {})
    taken = [s for s in ("kv_prefix", "input_prefix") if s in have]
    if taken:
        raise ValueError(f"{where}: params already has a {type(have[taken[0]]).__name__} hook at "
                         f"{root}.{HOOKS}.{taken[0]} (strip it first)")
    out = dict(params)
    out[root] = dict(tree, **{HOOKS: dict(have, **{site: hook})})
    return out


def init(key: jax.Array, cfg: ModelConfig, params, pcfg: PrefixConfig):
    """Adds a `Prefix` at the body's ``kv_prefix`` site (a new tree; ``params`` is not modified).

    Args:
      key: PRNG key for the random initialization.
      cfg: model config.
      params: base parameter tree.
      pcfg: the prefix config.

    Returns:
      the tree with the prefix hook (every base leaf frozen, unchanged).

    Example:
      >>> tuned = jlora.peft.prefix.init(jax.random.key(0), cfg, params, PrefixConfig(num_virtual_tokens=4))
      >>> hook = tuned["model"]["hooks"]["kv_prefix"]
      >>> hook.length, hook.embedding.shape  # 2 layers * (key, value) * 2 kv heads * 16 (head_dim)
      (4, (4, 128))
    """
    p, td, n = pcfg.num_virtual_tokens, token_dim(cfg), cfg.n_layers
    dt = jnp.dtype(pcfg.dtype)
    k_e, k_w1, k_b1, k_w2, k_b2 = jax.random.split(key, 5)
    zero = pcfg.init_weights == "zero"
    layout = dict(n_layers=n, kv_heads=cfg.kv_heads, head_dim=cfg.dim_head)
    if not pcfg.prefix_projection:
        e = jnp.zeros((p, n * 2 * td), dt) if zero else jax.random.normal(k_e, (p, n * 2 * td), jnp.float32).astype(dt)
        hook = Prefix(embedding=e, **layout)
    else:
        h = pcfg.encoder_hidden_size or td

        def uniform(k, shape, fan_in):
            bound = 1.0 / float(fan_in) ** 0.5
            return jax.random.uniform(k, shape, jnp.float32, -bound, bound).astype(dt)

        w2 = jnp.zeros((h, n * 2 * td), dt) if zero else uniform(k_w2, (h, n * 2 * td), h)
        b2 = jnp.zeros((n * 2 * td,), dt) if zero else uniform(k_b2, (n * 2 * td,), h)
        hook = Prefix(embedding=jax.random.normal(k_e, (p, td), jnp.float32).astype(dt),
                      w1=uniform(k_w1, (td, h), td), b1=uniform(k_b1, (h,), td), w2=w2, b2=b2, **layout)
    return set_body_hook(cfg, params, "kv_prefix", hook, "prefix.init")


def prefix(cfg: ModelConfig, params) -> Optional[Prefix]:
    """The tree's `Prefix` hook, or None."""
    from jlora.model import body

    hook = body(cfg, params).get(HOOKS, {}).get("kv_prefix")
    return hook if isinstance(hook, Prefix) else None


def strip(params):
    """The tree without any PEFT method (see `jlora.peft.base.strip`): ``strip(init(p)) == p``."""
    return B.strip(params)


def fold(cfg: ModelConfig, params) -> Dict[str, Any]:
    """The tree with its prefix's projection folded into the table (`Prefix.folded`): same function, fewer
    arrays, what inference needs."""
    hook = prefix(cfg, params)
    if hook is None:
        raise ValueError("prefix.fold: params has no Prefix hook")
    root = "transformer" if cfg.arch == "gpt2" else "model"
    out = dict(params)
    out[root] = dict(params[root], **{HOOKS: dict(params[root][HOOKS], kv_prefix=hook.folded())})
    return out


METHOD = B.register(B.Method(
    kind="prefix", config=PrefixConfig, init=init, nodes=(Prefix,), codec="jlora.convert.peft_prompt:PREFIX_CODEC",
    claims=lambda pconf: str(pconf.get("peft_type", "")).upper() == "PREFIX_TUNING", peft_type="PREFIX_TUNING",
    summary="prefix tuning: learned keys/values before the sequence in every layer's attention (not mergeable)"))
