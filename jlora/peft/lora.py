"""LoRA as a pure parameter-tree transform.

`init` returns a new tree in which every targeted ``<module>.kernel`` is a `LoRA` wrapper around the frozen
base kernel; the model is untouched and calls ``matmul(x, kernel)`` as always. `merge` folds the factors back
(float32 math, one cast); `strip` returns the base tree.

Beyond PEFT: on GPT-2's fused ``c_attn`` (q|k|v in one matrix) LoRA can cover chosen slices only
(``LoraConfig(fused_qkv=("q", "v"))``, as the original LoRA paper did), which PEFT's module-level targeting
cannot express (peft#706, #852). `B` then covers only those output columns; it exports to PEFT exactly by
padding `B` with zero rows for the other slices.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
from flax import struct

from jlora import tree as T
from jlora.config import ModelConfig
from jlora.kernels import KernelWrapper, is_wrapper, materialize, matmul, register_role
from jlora.peft import base as B

LORA_A = register_role("lora_a", True)
LORA_B = register_role("lora_b", True)

INITS = (True, False, "default", "gaussian", "pissa")
QKV = ("q", "k", "v")


@struct.dataclass
class LoRA(KernelWrapper):
    """A kernel ``W`` plus a low-rank update: ``x @ W + scale * ((x @ a) @ b)``.

    Attributes:
      base: the frozen kernel ``[in, out]`` (an array or another wrapper, e.g. a quantized one).
      a: ``[in, r]`` factor (trainable).
      b: ``[r, out']`` factor (trainable); ``out' = out`` unless `slices` restricts it.
      scale: ``alpha / r`` (or ``alpha / sqrt(r)`` with rsLoRA); static.
      slices: optional ``((start, stop), ...)`` output column ranges that ``b`` covers, in order; static.
      dropout: dropout rate on the LoRA input path during training (needs `rng`); static.
      rng: a PRNG key set only inside a training step (see `jlora.kernels.with_rngs`); None otherwise.
    """

    base: Any
    a: jax.Array
    b: jax.Array
    scale: float = struct.field(pytree_node=False, default=1.0)
    slices: Optional[Tuple[Tuple[int, int], ...]] = struct.field(pytree_node=False, default=None)
    dropout: float = struct.field(pytree_node=False, default=0.0)
    rng: Any = None

    @property
    def rank(self) -> int:
        return int(self.a.shape[-1])

    def _delta_columns(self, delta, y_shape_last):
        """Places the ``[..., out']`` update at its output columns (a no-op without slices)."""
        if self.slices is None:
            return delta
        parts, offset, cursor = [], 0, 0
        for start, stop in self.slices:
            if start > cursor:
                parts.append(jnp.zeros(delta.shape[:-1] + (start - cursor,), delta.dtype))
            parts.append(delta[..., offset:offset + stop - start])
            offset += stop - start
            cursor = stop
        if cursor < y_shape_last:
            parts.append(jnp.zeros(delta.shape[:-1] + (y_shape_last - cursor,), delta.dtype))
        return jnp.concatenate(parts, axis=-1)

    def matmul(self, x):
        y = matmul(x, self.base)
        h = x
        if self.dropout > 0.0 and self.rng is not None:
            keep = jax.random.bernoulli(self.rng, 1.0 - self.dropout, x.shape)
            h = jnp.where(keep, x / (1.0 - self.dropout), 0).astype(x.dtype)
        # The scale multiplies the small [.., r] intermediate; A @ B is never formed.
        low = jnp.matmul(h, self.a.astype(x.dtype)) * jnp.asarray(self.scale, x.dtype)
        delta = jnp.matmul(low, self.b.astype(x.dtype))
        return y + self._delta_columns(delta, y.shape[-1])

    def delta(self) -> jax.Array:
        """``scale * a @ b`` in float32, placed at its output columns: ``[in, out]``."""
        d = self.scale * jnp.matmul(self.a.astype(jnp.float32), self.b.astype(jnp.float32),
                                    precision=jax.lax.Precision.HIGHEST)
        return self._delta_columns(d, self.shape[-1])

    def materialize(self):
        base = materialize(self.base)
        return (base.astype(jnp.float32) + self.delta()).astype(base.dtype)

    def row_terms(self):
        b = self._delta_columns(self.b.astype(jnp.float32), self.shape[-1])  # fused-qkv slices: zero columns
        return {"base": self.base, "a": self.a.astype(jnp.float32), "b": b, "scale": float(self.scale)}

    def labels(self, label_base):
        return self.replace(base=label_base(self.base), a=LORA_A, b=LORA_B, rng=None)

    def with_rng(self, key):
        return self.replace(rng=key) if self.dropout > 0.0 else self

    def shard(self, spec_in, spec_out, fits):
        base = self.base.shard(spec_in, spec_out, fits) if isinstance(self.base, KernelWrapper) else \
            (spec_in, spec_out)
        return self.replace(base=base, a=(fits(self.a.shape[0], spec_in), None),
                            b=(None, fits(self.b.shape[1], spec_out)), rng=None)


@dataclasses.dataclass(frozen=True)
class LoraConfig(B.TargetRules):
    """Which matrices get LoRA and how (PEFT's `LoraConfig` semantics, plus fused-qkv slices).

    Args:
      r: rank (> 0).
      alpha: ``lora_alpha``; the update is scaled by ``alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``).
      target_modules: a list of module names matched exactly or as a dotted suffix, a regex string matched
        against the full dotted module name, or ``"all-linear"`` (PEFT's rules, see `jlora.peft.base.TargetRules`).
        Default: q and v projections (``c_attn`` for GPT-2), as PEFT.
      use_rslora: rank-stabilized scaling ``alpha / sqrt(r)``.
      rank_pattern: ``{regex: r}`` per-module rank overrides (matched against the end of the module name).
      alpha_pattern: ``{regex: alpha}`` per-module alpha overrides.
      dropout: ``lora_dropout`` on the LoRA input path (training only).
      init: ``True``/``"default"`` (PEFT: Kaiming-uniform A, zero B), ``"gaussian"`` (A ~ N(0, 1/r), zero B),
        ``"pissa"`` (A, B from the SVD of the base; the base becomes the residual), ``False`` (random A and B:
        a non-identity adapter, for tests).
      layers_to_transform: only these layer indices (an int or a list); with ``layers_pattern``, the name of the
        layer list to read the index after (PEFT's rule).
      fused_qkv: for GPT-2's fused ``c_attn``, LoRA on these slices only, e.g. ``("q", "v")``.
      dtype: dtype of the factors (float32 keeps trainable weights in full precision).
      exclude_modules: modules never adapted (list or regex, as ``target_modules``).
      layers_pattern: see ``layers_to_transform``.
      modules_to_save: whole modules trained in full and saved with the adapter (``["lm_head"]``).
      use_dora: weight-decomposed LoRA (`jlora.peft.dora`); PEFT's ``use_dora``.

    Example:
      >>> lcfg = LoraConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"])
      >>> lcfg.selects("model.layers.0.self_attn.v_proj"), lcfg.selects("model.layers.0.mlp.up_proj")
      (True, False)
    """

    r: int = 8
    alpha: float = 8.0
    target_modules: Union[str, Tuple[str, ...], None] = None
    use_rslora: bool = False
    rank_pattern: Dict[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: Dict[str, float] = dataclasses.field(default_factory=dict)
    dropout: float = 0.0
    init: Union[bool, str] = True
    layers_to_transform: Union[int, Tuple[int, ...], None] = None
    fused_qkv: Optional[Tuple[str, ...]] = None
    dtype: str = "float32"
    exclude_modules: Union[str, Tuple[str, ...], None] = None
    layers_pattern: Union[str, Tuple[str, ...], None] = None
    modules_to_save: Optional[Tuple[str, ...]] = None
    use_dora: bool = False

    DEFAULT_TARGETS = {"gpt2": ("c_attn",), "llama": ("q_proj", "v_proj")}

    def __post_init__(self):
        self._normalize_targets()
        if self.fused_qkv is not None:
            object.__setattr__(self, "fused_qkv", tuple(self.fused_qkv))
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoraConfig.r must be a positive integer, got {self.r!r}")
        for pat, r in self.rank_pattern.items():
            if not isinstance(r, int) or r <= 0:
                raise ValueError(f"LoraConfig.rank_pattern[{pat!r}] must be a positive integer, got {r!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.init not in INITS:
            raise ValueError(f"LoraConfig.init must be one of {INITS}, got {self.init!r}")
        if self.fused_qkv is not None and (not self.fused_qkv or set(self.fused_qkv) - set(QKV)):
            raise ValueError(f"LoraConfig.fused_qkv must be a non-empty subset of {QKV}, got {self.fused_qkv!r}")
        if not isinstance(self.use_dora, bool):
            raise ValueError(f"LoraConfig.use_dora must be true or false, got {self.use_dora!r}")
        if self.use_dora:
            # DoRA's magnitude is per output column of the whole matrix, and its norm needs the plain base.
            for opt, bad in (("fused_qkv", self.fused_qkv is not None), ("init='pissa'", self.init == "pissa")):
                if bad:
                    raise ValueError(f"LoraConfig: use_dora=True cannot be combined with {opt} (PEFT's DoRA has no "
                                     f"such variant; jlora would not compute what PEFT computes)")
        try:
            jnp.dtype(self.dtype)
        except TypeError:
            raise ValueError(f"LoraConfig.dtype {self.dtype!r} is not a dtype name") from None

    def replace(self, **changes) -> "LoraConfig":
        return dataclasses.replace(self, **changes)

    def rank_alpha_scale(self, name: str) -> Tuple[int, float, float]:
        """(r, alpha, scale) of the module ``name``, with the pattern overrides applied."""
        r = T.pattern_value(name, self.rank_pattern, self.r)
        alpha = T.pattern_value(name, self.alpha_pattern, self.alpha)
        scale = alpha / math.sqrt(r) if self.use_rslora else alpha / r
        return r, float(alpha), float(scale)


def qkv_slices(cfg: ModelConfig, parts: Sequence[str]) -> Tuple[Tuple[int, int], ...]:
    """Output-column ranges of the named parts of GPT-2's fused c_attn ([q | k | v])."""
    width = cfg.n_heads * cfg.dim_head
    return tuple((QKV.index(p) * width, (QKV.index(p) + 1) * width) for p in sorted(parts, key=QKV.index))


def init(key: jax.Array, cfg: ModelConfig, params, lcfg: LoraConfig):
    """Wraps the target kernels of ``params`` in `LoRA` (a new tree; ``params`` is not modified).

    With ``lcfg.use_dora`` the targets become `jlora.peft.dora.DoRA` kernels instead; ``modules_to_save`` modules
    are marked for full training (`jlora.peft.saved`).

    Args:
      key: PRNG key for the factor initialization.
      cfg: model config.
      params: base parameter tree.
      lcfg: the LoRA config.

    Returns:
      the parameter tree with LoRA kernels at the targets.

    Example:
      >>> tuned = jlora.lora.init(jax.random.key(0), cfg, params, jlora.LoraConfig(r=8, alpha=16))  # q, v
      >>> v = tuned["model"]["layers"]["0"]["self_attn"]["v_proj"]["kernel"]
      >>> type(v).__name__, v.a.shape, v.b.shape, float(abs(v.b).max())  # B starts at zero: the base's function
      ('LoRA', (64, 8), (8, 32), 0.0)
    """
    if lcfg.use_dora:
        from jlora.peft import dora

        return dora.init(key, cfg, params, lcfg)
    names = lcfg.select(params, cfg.arch)
    if not names:
        raise B.no_match_error(lcfg, params, cfg.arch)
    if lcfg.fused_qkv is not None:
        bad = [n for n in names if not n.endswith("c_attn")]
        if bad:
            raise ValueError(f"LoraConfig.fused_qkv applies to GPT-2's fused c_attn only, but target_modules also "
                             f"selects {bad[0]}")
    new = {}
    for i, name in enumerate(names):
        kernel = T.get_module(params, name)["kernel"]
        B.check_free(name, kernel, "lora.init")
        r, _, scale = lcfg.rank_alpha_scale(name)
        d_in, d_out = kernel.shape
        slices = qkv_slices(cfg, lcfg.fused_qkv) if lcfg.fused_qkv is not None else None
        d_sel = d_out if slices is None else sum(e - s for s, e in slices)
        if r > min(d_in, d_sel):
            raise ValueError(f"LoraConfig: rank {r} for {name} exceeds its dimensions ({d_in} x {d_sel})")
        dt = jnp.dtype(lcfg.dtype)
        base = kernel
        if lcfg.init == "pissa":
            if slices is not None or is_wrapper(kernel):
                raise ValueError(f"LoraConfig.init='pissa' needs a plain base kernel without fused_qkv ({name})")
            a, b, base = _pissa(kernel, r, scale)
        else:
            a, b = init_factors(jax.random.fold_in(key, i), lcfg.init, d_in, d_sel, r)
        new[name] = LoRA(base=base, a=a.astype(dt), b=b.astype(dt), scale=scale, slices=slices,
                         dropout=float(lcfg.dropout))
    return B.finish_init(cfg, T.replace_modules(params, new), lcfg)


def init_factors(key, how, d_in: int, d_out: int, r: int):
    """``(a [in, r], b [r, out])`` in float32 for ``LoraConfig.init`` value ``how`` (PEFT's initializations)."""
    ka, kb = jax.random.split(key)
    if how == "gaussian":
        return jax.random.normal(ka, (d_in, r), jnp.float32) / r, jnp.zeros((r, d_out), jnp.float32)
    bound_a = 1.0 / math.sqrt(d_in)  # kaiming_uniform(a=sqrt(5)) on PEFT's [r, in] lora_A
    a = jax.random.uniform(ka, (d_in, r), jnp.float32, -bound_a, bound_a)
    if how is False:  # a non-identity adapter (tests)
        bound_b = 1.0 / math.sqrt(r)
        return a, jax.random.uniform(kb, (r, d_out), jnp.float32, -bound_b, bound_b)
    return a, jnp.zeros((r, d_out), jnp.float32)


def _pissa(kernel, r, scale):
    w = kernel.astype(jnp.float32).T  # HF orientation [out, in]
    u, s, vh = jnp.linalg.svd(w, full_matrices=False)
    sr = jnp.sqrt(s[:r] / scale)
    a_hf = sr[:, None] * vh[:r]  # [r, in]
    b_hf = u[:, :r] * sr[None, :]  # [out, r]
    residual = w - scale * b_hf @ a_hf
    return a_hf.T, b_hf.T, residual.T.astype(kernel.dtype)


def strip(params):
    """The tree with every PEFT method removed (see `jlora.peft.base.strip`): ``strip(init(p)) == p`` for
    non-PiSSA inits."""
    return B.strip(params)


def adapters(params) -> Dict[str, LoRA]:
    """{module name: LoRA wrapper} for every LoRA kernel in the tree."""
    return {name: k for name, k in T.linear_modules(params).items() if isinstance(k, LoRA)}


def _claims(pconf: dict) -> bool:
    return str(pconf.get("peft_type", "LORA")).upper() == "LORA" and not pconf.get("use_dora")


METHOD = B.register(B.Method(kind="lora", config=LoraConfig, init=init, nodes=(LoRA,),
                             codec="jlora.convert.peft_lora:LORA_CODEC", claims=_claims, peft_type="LORA",
                             summary="LoRA: a low-rank update x @ W + scale * (x @ A) @ B on the target kernels"))
