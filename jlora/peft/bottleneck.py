"""Bottleneck adapters as the AdapterHub ``adapters`` library (1.3.0) defines them: Pfeiffer (``seq_bn``), Houlsby
(``double_seq_bn``) and parallel (``par_bn``) adapters, on the model's sublayer hook sites.

An adapter is a small MLP ``up(act(down(z)))`` (``down``: ``d -> d // reduction_factor``, ``up`` back to ``d``)
placed after a sublayer. It is a `jlora.kernels.Hook` at ``<layer>.hooks.attn_out`` (after attention; AdapterHub's
``mh_adapter``) and/or ``<layer>.hooks.mlp_out`` (after the feed-forward; ``output_adapter``). The model calls
``hook(h, x)`` with the sublayer's output ``h`` and the block's residual input ``x``, and the hook returns the new
residual stream -- exactly the two tensors AdapterHub's GPT-2 and Llama blocks hand to their adapter layers
(``attention_adapters(attn_output, residual, None)``, ``output_adapters(mlp_output, residual, None)``: no layer
norm is passed, so "original_ln" means only the residual sum there). What one adapter computes
(``adapters/methods/modeling.py``, ``Adapter`` and ``ParallelAdapter``):

* sequential: ``z = h + x`` if ``original_ln_before`` else ``h``; the adapter's residual ``r`` is ``h`` if
  ``residual_before_ln`` else ``z``; ``o = dropout(scaling * up(act(down(ln_before(z)))))``; then
  ``o = ln_after(o + r)`` if ``adapter_residual_before_ln`` else ``ln_after(o) + r``; finally ``o + x`` if
  ``original_ln_after`` (else ``o``: the block's residual is dropped, as AdapterHub does);
* parallel (``is_parallel``): the adapter reads the block input, ``o = ln_after(scaling * up(act(down(x)))) + h``,
  plus ``x`` if ``original_ln_after``.

So Pfeiffer is ``x + h + A(x + h)`` after the feed-forward only and Houlsby ``x + h + A(h)`` after both sublayers.
``ln_before``/``ln_after`` are the adapter's own LayerNorms (eps 1e-5); ``scaling`` is a float, ``"learned"`` (one
trained scalar) or ``"channel"`` (a trained ``[d]`` vector). Initializations as AdapterHub: ``"bert"`` (both
projections N(0, 0.02), biases 0), ``"mam_adapter"`` (``down`` Kaiming-uniform with a=sqrt(5), ``up`` and every bias
0: an exact identity at init) and ``"houlsby"`` (both projections N(0, 0.01) truncated at +-0.02, biases 0).

Options AdapterHub has that jlora does not implement are refused by name: ``phm_layer`` (Compacter),
``use_gating`` (UniPELT's gate averages over the sequence, which a causal model cannot do token by token),
``inv_adapter`` (invertible embedding adapters), ``residual_before_ln="post_add"`` (needs the model's layer norm,
which GPT-2/Llama do not pass: AdapterHub fails on it too), and activations with parameters (``prelu``,
``xielu``). ``cross_adapter`` has no effect in a decoder-only model (as in AdapterHub). Adapters are never
merged into the weights (`jlora.merge` refuses them): keep them as adapters (`jlora.save_adapter` writes
AdapterHub's format, `jlora.convert.adapterhub`).

In a run config::

    [method]
    kind = "adapter"
    preset = "double_seq_bn"     # Houlsby; "seq_bn" (Pfeiffer, the default), "par_bn", "scaled_par_bn"
    reduction_factor = 8         # or a table {"0" = 4, default = 16}; any field of BnConfig
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import jax
import jax.numpy as jnp
from flax import struct

from jlora.config import ModelConfig
from jlora.kernels import HOOKS, Hook, register_role
from jlora.peft import base as B

BN_WEIGHT = register_role("bottleneck", True)  # the projection matrices: decayed like LoRA factors
BN_BIAS = register_role("bottleneck_bias", False)  # biases, layer norms, learned scalings: never decayed

LN_EPS = 1e-5  # torch.nn.LayerNorm's default, which AdapterHub's adapter norms use
SITES = ("attn_out", "mlp_out")  # jlora's hook sites for AdapterHub's mh_adapter and output_adapter


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))


def _gelu(x):
    return jax.nn.gelu(x, approximate=False)


# AdapterHub's Activation_Function_Class: the lower-cased name, "leakyrelu", or transformers' ACT2FN (4.57).
ACTIVATIONS = {
    "relu": jax.nn.relu,
    "relu2": lambda x: jnp.square(jax.nn.relu(x)),
    "relu6": jax.nn.relu6,
    "leakyrelu": lambda x: jax.nn.leaky_relu(x, 0.01),
    "leaky_relu": lambda x: jax.nn.leaky_relu(x, 0.01),
    "gelu": _gelu,
    "gelu_python": _gelu,
    "gelu_10": lambda x: jnp.clip(_gelu(x), -10.0, 10.0),
    "gelu_new": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "gelu_accurate": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_python_tanh": _gelu_tanh,
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "sigmoid": jax.nn.sigmoid,
    "tanh": jnp.tanh,
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
    "linear": lambda x: x,
    "laplace": lambda x: 0.5 * (1.0 + jax.lax.erf((x - 0.707107) / (0.282095 * math.sqrt(2.0)))),
}
_LEARNED_ACTIVATIONS = ("prelu", "xielu")  # ACT2FN entries with parameters of their own

INITS = ("bert", "mam_adapter", "houlsby")


def _layer_norm(p: dict, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + LN_EPS)
    return (y * p["scale"].astype(jnp.float32) + p["bias"].astype(jnp.float32)).astype(x.dtype)


@struct.dataclass
class Bottleneck(Hook):
    """One bottleneck adapter at a sublayer hook site (``attn_out`` or ``mlp_out``).

    Attributes:
      down, down_bias: the down projection ``[d, r]`` and its bias ``[r]`` (AdapterHub's ``adapter_down``).
      up, up_bias: the up projection ``[r, d]`` and its bias ``[d]`` (``adapter_up``).
      scaling: the trained scaling, ``[1]`` (``"learned"``) or ``[d]`` (``"channel"``); None for a constant.
      norm_before, norm_after: ``{"scale", "bias"}`` of the adapter's own LayerNorms (``ln_before``/``ln_after``)
        or None.
      const_scaling, non_linearity, original_ln_before, original_ln_after, residual_before_ln,
        adapter_residual_before_ln, is_parallel, dropout, stochastic_depth: AdapterHub's options; static.
      rng: a PRNG key set only inside a training step (dropout, stochastic depth); None otherwise.
    """

    down: jax.Array
    down_bias: jax.Array
    up: jax.Array
    up_bias: jax.Array
    scaling: Any = None
    norm_before: Any = None
    norm_after: Any = None
    const_scaling: float = struct.field(pytree_node=False, default=1.0)
    non_linearity: str = struct.field(pytree_node=False, default="relu")
    original_ln_before: bool = struct.field(pytree_node=False, default=True)
    original_ln_after: bool = struct.field(pytree_node=False, default=True)
    residual_before_ln: bool = struct.field(pytree_node=False, default=True)
    adapter_residual_before_ln: bool = struct.field(pytree_node=False, default=False)
    is_parallel: bool = struct.field(pytree_node=False, default=False)
    dropout: float = struct.field(pytree_node=False, default=0.0)
    stochastic_depth: float = struct.field(pytree_node=False, default=0.0)
    rng: Any = None

    @property
    def rank(self) -> int:
        return int(self.down.shape[-1])

    def _bottleneck(self, z, training_key):
        dt = z.dtype
        if self.norm_before is not None:
            z = _layer_norm(self.norm_before, z)
        a = ACTIVATIONS[self.non_linearity.lower()](jnp.matmul(z, self.down.astype(dt)) + self.down_bias.astype(dt))
        up = jnp.matmul(a, self.up.astype(dt)) + self.up_bias.astype(dt)
        k_depth, k_drop = (None, None) if training_key is None else jax.random.split(training_key)
        if self.stochastic_depth > 0.0 and k_depth is not None and not self.is_parallel:
            # torchvision's StochasticDepth(mode="row"): drop the whole adapter output of a sequence
            keep = 1.0 - self.stochastic_depth
            rows = jax.random.bernoulli(k_depth, keep, up.shape[:1] + (1,) * (up.ndim - 1))
            up = jnp.where(rows, up / jnp.asarray(keep, dt), 0).astype(dt)
        up = up * (jnp.asarray(self.const_scaling, dt) if self.scaling is None else self.scaling.astype(dt))
        if self.dropout > 0.0 and k_drop is not None:
            keep = jax.random.bernoulli(k_drop, 1.0 - self.dropout, up.shape)
            up = jnp.where(keep, up / jnp.asarray(1.0 - self.dropout, dt), 0).astype(dt)
        return up

    def __call__(self, h: jax.Array, x: jax.Array) -> jax.Array:
        """The new residual stream from the sublayer output ``h`` and the block's residual input ``x``."""
        key = self.rng
        if self.is_parallel:
            out = self._bottleneck(x, key)
            if self.norm_after is not None:
                out = _layer_norm(self.norm_after, out)
            out = out + h
        else:
            z = h + x if self.original_ln_before else h
            res = h if self.residual_before_ln else z
            out = self._bottleneck(z, key)
            if self.adapter_residual_before_ln:
                out = out + res
            if self.norm_after is not None:
                out = _layer_norm(self.norm_after, out)
            if not self.adapter_residual_before_ln:
                out = out + res
        return out + x if self.original_ln_after else out

    def labels(self, label_base):
        role = lambda v: jax.tree_util.tree_map(lambda _: BN_BIAS, v)  # noqa: E731
        return self.replace(down=BN_WEIGHT, up=BN_WEIGHT, down_bias=BN_BIAS, up_bias=BN_BIAS,
                            scaling=role(self.scaling), norm_before=role(self.norm_before),
                            norm_after=role(self.norm_after), rng=None)

    def with_rng(self, key):
        return self.replace(rng=key) if (self.dropout > 0.0 or self.stochastic_depth > 0.0) else self


# ----------------------------------------------------------------------------------------------------------
# Config

# AdapterHub's named configs (ADAPTER_CONFIG_MAP) for bottleneck adapters, with their deprecated aliases.
PRESETS: Dict[str, Dict[str, Any]] = {
    "seq_bn": dict(original_ln_before=True, original_ln_after=True, residual_before_ln=True,
                   adapter_residual_before_ln=False, ln_before=False, ln_after=False, mh_adapter=False,
                   output_adapter=True, non_linearity="relu", reduction_factor=16, init_weights="bert",
                   is_parallel=False, scaling=1.0),
    "double_seq_bn": dict(original_ln_before=False, original_ln_after=True, residual_before_ln=True,
                          adapter_residual_before_ln=False, ln_before=False, ln_after=False, mh_adapter=True,
                          output_adapter=True, non_linearity="swish", reduction_factor=16, init_weights="bert",
                          is_parallel=False, scaling=1.0),
    "par_bn": dict(original_ln_before=False, original_ln_after=True, residual_before_ln=True,
                   adapter_residual_before_ln=False, ln_before=False, ln_after=False, mh_adapter=False,
                   output_adapter=True, non_linearity="relu", reduction_factor=2, init_weights="mam_adapter",
                   is_parallel=True, scaling=4.0),
}
PRESETS["scaled_par_bn"] = {**PRESETS["par_bn"], "scaling": "learned"}
ALIASES = {"pfeiffer": "seq_bn", "houlsby": "double_seq_bn", "parallel": "par_bn", "scaled_parallel": "scaled_par_bn"}
_PRESET_FIELDS = tuple(PRESETS["seq_bn"])


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclasses.dataclass(frozen=True)
class BnConfig:
    """A bottleneck adapter (AdapterHub's `BnConfig`, same field names and meaning; see the module docstring).

    Every field left at None takes the value of ``preset``; the rest override it.

    Args:
      preset: ``"seq_bn"`` (Pfeiffer, default), ``"double_seq_bn"`` (Houlsby), ``"par_bn"`` (parallel, He et
        al.), ``"scaled_par_bn"`` (parallel with a learned scaling), or the aliases ``"pfeiffer"``,
        ``"houlsby"``, ``"parallel"``, ``"scaled_parallel"``.
      mh_adapter: an adapter after attention (``attn_out``).
      output_adapter: an adapter after the feed-forward (``mlp_out``).
      reduction_factor: bottleneck size ``int(d // reduction_factor)`` (at least 1); a number, or a mapping
        ``{"<layer>": factor, ..., "default": factor}``.
      non_linearity: the activation (``relu``, ``swish``/``silu``, ``gelu``, ``gelu_new``, ``tanh``, ... as
        AdapterHub names them; case-insensitive).
      original_ln_before, original_ln_after, residual_before_ln, adapter_residual_before_ln: the residual wiring.
      ln_before, ln_after: the adapter's own LayerNorms before/after the bottleneck.
      init_weights: ``"bert"``, ``"mam_adapter"`` (identity at init) or ``"houlsby"``.
      init_weights_seed: when set (non-zero, as AdapterHub), every adapter module starts from this seed (the
        same weights in every layer); otherwise each module has its own.
      is_parallel: a parallel adapter (reads the block input, adds to the sublayer output).
      scaling: a float, ``"learned"`` (one trained scalar) or ``"channel"`` (a trained vector).
      leave_out: layer indices without adapters.
      dropout: dropout on the adapter output (training only).
      stochastic_depth: probability of dropping a sequence's whole adapter output (training only).
      use_gating, phm_layer, inv_adapter: AdapterHub options jlora does not implement (must stay off).
      cross_adapter: no effect in a decoder-only model (as in AdapterHub).
      dtype: dtype of the adapter's parameters (jlora's; float32 keeps trainable weights in full precision).

    Example:
      >>> c = BnConfig(preset="houlsby", reduction_factor=8)
      >>> c.mh_adapter, c.output_adapter, c.non_linearity, c.bottleneck_size(64, 0)
      (True, True, 'swish', 8)
    """

    preset: str = "seq_bn"
    mh_adapter: Optional[bool] = None
    output_adapter: Optional[bool] = None
    reduction_factor: Union[int, float, Mapping, None] = None
    non_linearity: Optional[str] = None
    original_ln_before: Optional[bool] = None
    original_ln_after: Optional[bool] = None
    ln_before: Optional[bool] = None
    ln_after: Optional[bool] = None
    init_weights: Optional[str] = None
    init_weights_seed: Optional[int] = None
    is_parallel: Optional[bool] = None
    scaling: Union[float, str, None] = None
    residual_before_ln: Union[bool, str, None] = None
    adapter_residual_before_ln: Optional[bool] = None
    leave_out: Tuple[int, ...] = ()
    dropout: float = 0.0
    stochastic_depth: float = 0.0
    use_gating: bool = False
    phm_layer: bool = False
    inv_adapter: Optional[str] = None
    cross_adapter: bool = False
    dtype: str = "float32"

    def __post_init__(self):
        name = type(self).__name__
        preset = ALIASES.get(self.preset, self.preset)
        if preset not in PRESETS:
            raise ValueError(f"{name}.preset must be one of {', '.join(list(PRESETS) + list(ALIASES))}, got "
                             f"{self.preset!r}")
        for k, v in PRESETS[preset].items():
            if getattr(self, k) is None:
                object.__setattr__(self, k, v)
        for k in ("mh_adapter", "output_adapter", "original_ln_before", "original_ln_after", "ln_before",
                  "ln_after", "is_parallel", "adapter_residual_before_ln", "cross_adapter"):
            if not isinstance(getattr(self, k), bool):
                raise ValueError(f"{name}.{k} must be true or false, got {getattr(self, k)!r}")
        if not (self.mh_adapter or self.output_adapter):
            raise ValueError(f"{name}: mh_adapter and output_adapter are both false: the adapter would sit nowhere")
        rf = self.reduction_factor
        if isinstance(rf, Mapping):
            rf = {str(k): v for k, v in rf.items()}
            for k, v in rf.items():
                if not (k == "default" or k.isdigit()) or not _is_number(v) or v <= 0:
                    raise ValueError(f"{name}.reduction_factor[{k!r}] = {v!r}: expected layer indices (or "
                                     f"'default') mapped to positive numbers")
            object.__setattr__(self, "reduction_factor", rf)
        elif not _is_number(rf) or rf <= 0:
            raise ValueError(f"{name}.reduction_factor must be a positive number or a mapping {{'<layer>': "
                             f"factor, 'default': factor}}, got {rf!r}")
        nl = self.non_linearity
        if not isinstance(nl, str) or nl.lower() not in ACTIVATIONS:
            why = " (it has trained parameters of its own, which jlora does not implement)" if \
                isinstance(nl, str) and nl.lower() in _LEARNED_ACTIVATIONS else ""
            raise ValueError(f"{name}.non_linearity {nl!r} is not supported{why}; jlora knows: "
                             f"{', '.join(sorted(ACTIVATIONS))}")
        if self.init_weights not in INITS:
            raise ValueError(f"{name}.init_weights must be one of {', '.join(INITS)}, got {self.init_weights!r}")
        seed = self.init_weights_seed
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise ValueError(f"{name}.init_weights_seed must be an integer or None, got {seed!r}")
        sc = self.scaling
        if _is_number(sc):
            object.__setattr__(self, "scaling", float(sc))
        elif sc not in ("learned", "channel"):
            raise ValueError(f"{name}.scaling must be a number, 'learned' or 'channel', got {sc!r}")
        rb = self.residual_before_ln
        if rb == "post_add" and not self.is_parallel:
            raise ValueError(f"{name}.residual_before_ln='post_add' is not supported: it needs the model's layer "
                             f"norm, which AdapterHub's GPT-2 and Llama blocks do not pass to the adapter (adapters "
                             f"itself fails on it there); use true or false")
        if not isinstance(rb, bool) and rb != "post_add":
            raise ValueError(f"{name}.residual_before_ln must be true or false, got {rb!r}")
        lo = self.leave_out
        if isinstance(lo, (list, tuple, set, frozenset)) and all(isinstance(i, int) and not isinstance(i, bool)
                                                                  and i >= 0 for i in lo):
            object.__setattr__(self, "leave_out", tuple(sorted(set(lo))))
        else:
            raise ValueError(f"{name}.leave_out must be a list of layer indices, got {lo!r}")
        for k in ("dropout", "stochastic_depth"):
            v = getattr(self, k)
            if not _is_number(v) or not 0.0 <= v < 1.0:
                raise ValueError(f"{name}.{k} must be a number in [0, 1), got {v!r}")
            object.__setattr__(self, k, float(v))
        if self.use_gating is not False:
            raise ValueError(f"{name}.use_gating={self.use_gating!r} is not supported: UniPELT's gate averages over "
                             f"the sequence, which a causal model cannot do token by token")
        if self.phm_layer is not False:
            raise ValueError(f"{name}.phm_layer={self.phm_layer!r} is not supported: jlora does not implement "
                             f"Compacter's PHM projections")
        if self.inv_adapter is not None:
            raise ValueError(f"{name}.inv_adapter={self.inv_adapter!r} is not supported: jlora has no invertible "
                             f"(embedding) adapters")
        try:
            jnp.dtype(self.dtype)
        except TypeError:
            raise ValueError(f"{name}.dtype {self.dtype!r} is not a dtype name") from None

    def replace(self, **changes) -> "BnConfig":
        return dataclasses.replace(self, **changes)

    def reduction_factor_for(self, layer: int):
        """The reduction factor of ``layer`` (AdapterHub's rule: the layer's own entry, else ``"default"``)."""
        rf = self.reduction_factor
        if not isinstance(rf, Mapping):
            return rf
        if str(layer) in rf:
            return rf[str(layer)]
        if "default" in rf:
            return rf["default"]
        raise ValueError(f"{type(self).__name__}.reduction_factor {rf!r} has no entry for layer {layer} and no "
                         f"'default'")

    def bottleneck_size(self, d: int, layer: int) -> int:
        """``int(d // reduction_factor)``, at least 1 (AdapterHub's rule)."""
        return max(1, int(d // self.reduction_factor_for(layer)))

    def sites(self) -> Tuple[str, ...]:
        """The hook sites this config adapts, in block order."""
        return tuple(s for s, on in zip(SITES, (self.mh_adapter, self.output_adapter)) if on)

    def layers(self, n_layers: int) -> Tuple[int, ...]:
        return tuple(i for i in range(n_layers) if i not in self.leave_out)


@dataclasses.dataclass(frozen=True)
class SeqBnConfig(BnConfig):
    """Pfeiffer et al. (2020): one adapter after the feed-forward (AdapterHub's ``SeqBnConfig``)."""

    preset: str = "seq_bn"


@dataclasses.dataclass(frozen=True)
class DoubleSeqBnConfig(BnConfig):
    """Houlsby et al. (2019): adapters after attention and after the feed-forward (``DoubleSeqBnConfig``)."""

    preset: str = "double_seq_bn"


@dataclasses.dataclass(frozen=True)
class ParBnConfig(BnConfig):
    """He et al. (2021): a parallel adapter beside the feed-forward, scaled by 4 (``ParBnConfig``)."""

    preset: str = "par_bn"


# ----------------------------------------------------------------------------------------------------------
# init / strip / inspection


def _stack(cfg: ModelConfig, params) -> Tuple[str, str, dict]:
    root, stack = ("transformer", "h") if cfg.arch == "gpt2" else ("model", "layers")
    return root, stack, params[root][stack]


def _init_module(key, d: int, r: int, bcfg: BnConfig) -> Dict[str, jax.Array]:
    """The arrays of one adapter module, drawn as AdapterHub's ``init_weights`` draws them."""
    dt = jnp.dtype(bcfg.dtype)
    kd, ku = jax.random.split(key)
    if bcfg.init_weights == "bert":  # init_bert_weights: N(0, 0.02) weights, zero biases
        down = 0.02 * jax.random.normal(kd, (d, r), jnp.float32)
        up = 0.02 * jax.random.normal(ku, (r, d), jnp.float32)
    elif bcfg.init_weights == "mam_adapter":  # kaiming_uniform_(a=sqrt(5)) on down: U(-1/sqrt(d), 1/sqrt(d)); up 0
        bound = 1.0 / math.sqrt(d)
        down = jax.random.uniform(kd, (d, r), jnp.float32, -bound, bound)
        up = jnp.zeros((r, d), jnp.float32)
    else:  # houlsby: trunc_normal_(std=1e-2, a=-2e-2, b=2e-2)
        down = 1e-2 * jax.random.truncated_normal(kd, -2.0, 2.0, (d, r), jnp.float32)
        up = 1e-2 * jax.random.truncated_normal(ku, -2.0, 2.0, (r, d), jnp.float32)
    out = {"down": down.astype(dt), "down_bias": jnp.zeros((r,), dt), "up": up.astype(dt),
           "up_bias": jnp.zeros((d,), dt)}
    if bcfg.scaling == "learned":
        out["scaling"] = jnp.ones((1,), dt)
    elif bcfg.scaling == "channel":
        out["scaling"] = jnp.ones((d,), dt)
    ln = lambda: {"scale": jnp.ones((d,), dt), "bias": jnp.zeros((d,), dt)}  # noqa: E731
    if bcfg.ln_before:
        out["norm_before"] = ln()
    if bcfg.ln_after:
        out["norm_after"] = ln()
    return out


def make_node(arrays: Dict[str, Any], bcfg: BnConfig) -> Bottleneck:
    """A `Bottleneck` from its arrays (``down``, ``down_bias``, ``up``, ``up_bias`` and the optional
    ``scaling``, ``norm_before``, ``norm_after``) with ``bcfg``'s static options."""
    return Bottleneck(
        **arrays, const_scaling=bcfg.scaling if isinstance(bcfg.scaling, float) else 1.0,
        non_linearity=bcfg.non_linearity, original_ln_before=bcfg.original_ln_before,
        original_ln_after=bcfg.original_ln_after, residual_before_ln=bcfg.residual_before_ln is True,
        adapter_residual_before_ln=bcfg.adapter_residual_before_ln, is_parallel=bcfg.is_parallel,
        dropout=bcfg.dropout, stochastic_depth=bcfg.stochastic_depth)


def init(key: jax.Array, cfg: ModelConfig, params, bcfg: BnConfig):
    """Adds bottleneck adapters to ``params`` at the hook sites ``bcfg`` chooses (a new tree).

    Args:
      key: PRNG key (each module draws from its own fold; ``init_weights_seed`` gives every module the same).
      cfg: model config.
      params: base parameter tree.
      bcfg: the adapter config.

    Returns:
      the tree with a `Bottleneck` at ``<layer>.hooks.attn_out`` (``mh_adapter``) and/or ``.mlp_out``
      (``output_adapter``) of every layer not in ``leave_out``.

    Raises:
      ValueError naming the option: ``leave_out`` leaving out every layer, a per-layer ``reduction_factor``
      without an entry for a layer, a site that already has a hook.

    Example:
      >>> tuned = jlora.peft.bottleneck.init(key, cfg, params, SeqBnConfig(reduction_factor=16))
      >>> node = tuned["model"]["layers"]["0"]["hooks"]["mlp_out"]
      >>> type(node).__name__, node.down.shape, node.up.shape
      ('Bottleneck', (64, 4), (4, 64))
    """
    root, stack, layers = _stack(cfg, params)
    chosen = bcfg.layers(cfg.n_layers)
    if not chosen:
        raise ValueError(f"{type(bcfg).__name__}.leave_out {list(bcfg.leave_out)} leaves out every layer of this "
                         f"{cfg.n_layers}-layer model")
    new_layers = dict(layers)
    n = 0
    for i in chosen:
        r = bcfg.bottleneck_size(cfg.d_model, i)
        layer = dict(layers[str(i)])
        hooks = dict(layer.get(HOOKS) or {})
        for site in bcfg.sites():
            if site in hooks:
                raise ValueError(f"bottleneck.init: {root}.{stack}.{i}.{HOOKS}.{site} already has a "
                                 f"{type(hooks[site]).__name__} hook (strip it first)")
            k = jax.random.key(bcfg.init_weights_seed) if bcfg.init_weights_seed else jax.random.fold_in(key, n)
            hooks[site] = make_node(_init_module(k, cfg.d_model, r, bcfg), bcfg)
            n += 1
        layer[HOOKS] = hooks
        new_layers[str(i)] = layer
    out = dict(params)
    out[root] = {**params[root], stack: new_layers}
    return out


def strip(params):
    """The tree without any PEFT method (hooks dropped): ``strip(init(p)) == p``."""
    return B.strip(params)


def adapters(params) -> Dict[str, Bottleneck]:
    """{``<body>.<stack>.<i>.hooks.<site>``: node} for every bottleneck adapter in the tree, in layer order.

    Example:
      >>> sorted(adapters(jlora.peft.bottleneck.init(key, cfg, params, DoubleSeqBnConfig())))[:2]
      ['model.layers.0.hooks.attn_out', 'model.layers.0.hooks.mlp_out']
    """
    from jlora import tree as T

    out = {}
    for path, x in jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda v: isinstance(v, Bottleneck))[0]:
        if isinstance(x, Bottleneck):
            out[T.path_str(path)] = x
    return dict(sorted(out.items(), key=lambda kv: T.natural_key(kv[0])))


METHOD = B.register(B.Method(
    kind="adapter", config=BnConfig, init=init, nodes=(Bottleneck,), codec=None,
    file_format="jlora.convert.adapterhub", peft_label="AdapterHub bottleneck adapter",
    summary="bottleneck adapters (AdapterHub's Pfeiffer seq_bn, Houlsby double_seq_bn, parallel par_bn) after the "
            "attention and/or feed-forward sublayers"))
