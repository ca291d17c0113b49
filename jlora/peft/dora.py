"""DoRA (weight-decomposed LoRA, Liu et al. 2024; PEFT's ``LoraConfig(use_dora=True)``) as a kernel wrapper.

A targeted kernel ``W`` ``[in, out]`` becomes ``DoRA(W, a, b, m)``: the LoRA update gives the direction
``V = W + scale * a @ b`` and the trainable vector ``m`` ``[out]`` the length of each output column, so the layer
computes ``x @ (m * V / ||V||)`` where ``||V||`` is the L2 norm of each column (over the input dimension). As in
the paper (section 4.3) and PEFT, the norm is treated as a constant: it carries no gradient.

The forward is PEFT's (``DoraLinearVariant.forward`` + ``DoraLinearLayer.forward``), without forming ``m * V``:

* no dropout (or outside training): ``s * (x @ W + scale * (x @ a) @ b)`` with ``s = m / ||V||``;
* with dropout during training, ``d = dropout(x)``: ``x @ W + (s - 1) * (d @ W) + s * scale * (d @ a) @ b``
  (the base result is PEFT's, on the undropped input; the DoRA correction sees the dropped one).

The norm needs the ``[in, out]`` product ``a @ b`` every step (PEFT forms it too); it is done in float32. A fresh
DoRA (``b = 0``) has ``m = ||W||`` and reproduces the base exactly; ``m`` always starts at the column norm of the
initial ``V``, also with random factors (``init=False``), as in PEFT.

A DoRA tree is never plain LoRA: `DoRA` is its own node type (not a `jlora.peft.lora.LoRA`), registered as the
``"dora"`` method with its own codec (`jlora.convert.peft_dora`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict

import jax
import jax.numpy as jnp
from flax import struct

from jlora import tree as T
from jlora.config import ModelConfig
from jlora.kernels import KernelWrapper, materialize, matmul, register_role
from jlora.peft import base as B
from jlora.peft import lora as L
from jlora.peft.lora import LORA_A, LORA_B, LoraConfig

DORA_MAGNITUDE = register_role("dora_magnitude", False)  # a per-column scale: never weight-decayed


def _column_norm(w32: jax.Array) -> jax.Array:
    """L2 norm of each output column of a float32 ``[in, out]`` kernel (PEFT: ``norm(W_hf, dim=1)``)."""
    return jnp.sqrt(jnp.sum(jnp.square(w32), axis=0))


@struct.dataclass
class DoRA(KernelWrapper):
    """A kernel ``W`` with a low-rank direction update and a learned column magnitude.

    Computes ``x @ (m * V / ||V||)`` with ``V = W + scale * a @ b`` (see the module docstring for dropout).

    Attributes:
      base: the frozen kernel ``[in, out]`` (an array or another wrapper, e.g. a quantized one).
      a: ``[in, r]`` factor (trainable; PEFT's ``lora_A.weight`` transposed).
      b: ``[r, out]`` factor (trainable; PEFT's ``lora_B.weight`` transposed).
      m: ``[out]`` magnitude (trainable; PEFT's ``lora_magnitude_vector``).
      scale: ``alpha / r`` (or ``alpha / sqrt(r)`` with rsLoRA); static.
      dropout: ``lora_dropout`` during training (needs `rng`); static.
      rng: a PRNG key set only inside a training step (see `jlora.kernels.with_rngs`); None otherwise.
    """

    base: Any
    a: jax.Array
    b: jax.Array
    m: jax.Array
    scale: float = struct.field(pytree_node=False, default=1.0)
    dropout: float = struct.field(pytree_node=False, default=0.0)
    rng: Any = None

    @property
    def rank(self) -> int:
        return int(self.a.shape[-1])

    def delta(self) -> jax.Array:
        """``scale * a @ b`` in float32: ``[in, out]``."""
        return self.scale * jnp.matmul(self.a.astype(jnp.float32), self.b.astype(jnp.float32),
                                       precision=jax.lax.Precision.HIGHEST)

    def direction(self) -> jax.Array:
        """``V = W + scale * a @ b`` in float32."""
        return materialize(self.base).astype(jnp.float32) + self.delta()

    def weight_norm(self) -> jax.Array:
        """``||V||`` per output column ``[out]``, float32, without gradient (DoRA section 4.3; PEFT detaches it)."""
        return jax.lax.stop_gradient(_column_norm(self.direction()))

    def matmul(self, x):
        s = (self.m.astype(jnp.float32) / self.weight_norm()).astype(x.dtype)
        y = matmul(x, self.base)
        dropped = self.dropout > 0.0 and self.rng is not None
        h = x
        if dropped:
            keep = jax.random.bernoulli(self.rng, 1.0 - self.dropout, x.shape)
            h = jnp.where(keep, x / (1.0 - self.dropout), 0).astype(x.dtype)
        # The scale multiplies the small [.., r] intermediate; the low-rank path never forms a @ b.
        low = jnp.matmul(jnp.matmul(h, self.a.astype(x.dtype)) * jnp.asarray(self.scale, x.dtype),
                         self.b.astype(x.dtype))
        if dropped:
            # PEFT: the base result stays on the undropped x; its DoRA correction uses the dropped one.
            return y + (s - 1) * matmul(h, self.base) + s * low
        return s * (y + low)

    def materialize(self):
        base = materialize(self.base)
        v = base.astype(jnp.float32) + self.delta()
        return ((self.m.astype(jnp.float32) / _column_norm(v)) * v).astype(base.dtype)

    def row_terms(self):
        # Outside training the norm is a constant: s = m / ||V|| scales x @ W + update (before any bias).
        return {"base": self.base, "a": self.a.astype(jnp.float32), "b": self.b.astype(jnp.float32),
                "scale": float(self.scale), "col": self.m.astype(jnp.float32) / self.weight_norm()}

    def labels(self, label_base):
        return self.replace(base=label_base(self.base), a=LORA_A, b=LORA_B, m=DORA_MAGNITUDE, rng=None)

    def with_rng(self, key):
        return self.replace(rng=key) if self.dropout > 0.0 else self

    def shard(self, spec_in, spec_out, fits):
        base = self.base.shard(spec_in, spec_out, fits) if isinstance(self.base, KernelWrapper) else \
            (spec_in, spec_out)
        out = fits(self.b.shape[1], spec_out)
        return self.replace(base=base, a=(fits(self.a.shape[0], spec_in), None), b=(None, out),
                            m=(fits(self.m.shape[0], spec_out),), rng=None)


@dataclasses.dataclass(frozen=True)
class DoraConfig(LoraConfig):
    """Which matrices get DoRA and how: `jlora.LoraConfig`'s fields (PEFT's names) with ``use_dora=True``.

    ``fused_qkv`` and ``init="pissa"`` are refused (PEFT's DoRA has neither; the magnitude is per column of the
    whole matrix).

    Example:
      >>> dcfg = DoraConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"])
    """

    use_dora: bool = True

    def __post_init__(self):
        if self.use_dora is not True:
            raise ValueError(f"DoraConfig.use_dora must be True (use jlora.LoraConfig for plain LoRA), got "
                             f"{self.use_dora!r}")
        super().__post_init__()


def as_dora_config(lcfg: LoraConfig) -> DoraConfig:
    """``lcfg`` as a `DoraConfig` (same fields, ``use_dora=True``)."""
    if isinstance(lcfg, DoraConfig):
        return lcfg
    fields = {f.name: getattr(lcfg, f.name) for f in dataclasses.fields(LoraConfig) if f.init}
    return DoraConfig(**{**fields, "use_dora": True})


def magnitude(base, a, b, scale: float, dtype) -> jax.Array:
    """PEFT's initial magnitude: the column norm of ``W + scale * a @ b`` (float32 math), in ``dtype``."""
    v = materialize(base).astype(jnp.float32) + scale * jnp.matmul(
        a.astype(jnp.float32), b.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return _column_norm(v).astype(dtype)


def init(key: jax.Array, cfg: ModelConfig, params, lcfg: LoraConfig):
    """Wraps the target kernels of ``params`` in `DoRA` (a new tree; ``params`` is not modified).

    Args:
      key: PRNG key for the factors (the same factors `jlora.lora.init` draws with this key).
      cfg: model config.
      params: base parameter tree.
      lcfg: a `DoraConfig` (or a `jlora.LoraConfig` with ``use_dora=True``).

    Returns:
      the parameter tree with `DoRA` kernels at the targets; ``m`` is the column norm of ``W + scale * a @ b``,
      so with the default init (``b = 0``) the model computes exactly what the base does.

    Example:
      >>> params = jlora.peft.dora.init(jax.random.key(0), cfg, params, DoraConfig(r=8, alpha=16))
    """
    if not isinstance(lcfg, LoraConfig) or not lcfg.use_dora:
        raise ValueError(f"dora.init: expected a DoraConfig (or LoraConfig(use_dora=True)), got "
                         f"{type(lcfg).__name__}{'(use_dora=False)' if isinstance(lcfg, LoraConfig) else ''}")
    names = lcfg.select(params, cfg.arch)
    if not names:
        raise B.no_match_error(lcfg, params, cfg.arch)
    new = {}
    for i, name in enumerate(names):
        kernel = T.get_module(params, name)["kernel"]
        B.check_free(name, kernel, "dora.init")
        r, _, scale = lcfg.rank_alpha_scale(name)
        d_in, d_out = kernel.shape
        if r > min(d_in, d_out):
            raise ValueError(f"{type(lcfg).__name__}: rank {r} for {name} exceeds its dimensions ({d_in} x {d_out})")
        a, b = L.init_factors(jax.random.fold_in(key, i), lcfg.init, d_in, d_out, r)
        a, b = a.astype(lcfg.dtype), b.astype(lcfg.dtype)
        m = magnitude(kernel, a, b, scale, lcfg.dtype)
        new[name] = DoRA(base=kernel, a=a, b=b, m=m, scale=scale, dropout=float(lcfg.dropout))
    return B.finish_init(cfg, T.replace_modules(params, new), lcfg)


def strip(params):
    """The tree with every PEFT method removed (see `jlora.peft.base.strip`): ``strip(init(p)) == p``."""
    return B.strip(params)


def adapters(params) -> Dict[str, DoRA]:
    """{module name: DoRA wrapper} for every DoRA kernel in the tree."""
    return {name: k for name, k in T.linear_modules(params).items() if isinstance(k, DoRA)}


def _claims(pconf: dict) -> bool:
    return str(pconf.get("peft_type", "LORA")).upper() == "LORA" and bool(pconf.get("use_dora"))


METHOD = B.register(B.Method(kind="dora", config=DoraConfig, init=init, nodes=(DoRA,),
                             codec="jlora.convert.peft_dora:DORA_CODEC", claims=_claims, peft_type="LORA",
                             peft_label="LORA with use_dora",
                             summary="DoRA: LoRA's direction update with a learned magnitude per output column, "
                                     "x @ (m * V / ||V||), V = W + scale * A @ B"))
