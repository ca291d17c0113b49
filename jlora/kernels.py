"""The one matmul dispatch every linear layer of the model goes through, and the node protocols of PEFT methods.

A kernel leaf of the parameter tree is either a plain array ``[in, out]`` or a *kernel wrapper*: a registered
pytree node (a `flax.struct.dataclass`) that subclasses `KernelWrapper`. A wrapper declares everything the rest
of the library needs to know about it, so that nothing outside its own file names a method:

* ``matmul(x)``: its fast forward, ``x @ W`` without building ``W`` when that is cheaper (LoRA never forms
  ``A @ B`` here); ``linear(x, bias)`` when the method acts on the layer's output *after* its bias (IA3);
* ``materialize()``: the plain array it stands for; ``merge_linear(bias)`` folds it (and the bias, if the method
  changes it) into plain arrays; ``mergeable`` says whether that is possible at all;
* ``strip()``: the kernel without this method (a quantized base strips to itself: it is the base);
* ``labels(label_base)``: its role strings (which leaves are adapter factors), see `jlora.tree.trainable_labels`;
  the roles and their weight-decay rule are declared once with `register_role`;
* ``shard(spec_in, spec_out, fits)``: the sharding of each of its leaves relative to the base matrix's
  ``(in, out)`` axes, so `jlora.parallel` never reads field names;
* ``logical_sizes()``: how many parameters each leaf stands for (a packed 4-bit leaf stands for two per byte);
* ``shape`` / ``dtype``: those of the materialized kernel.

Methods that do not act on a kernel (bottleneck adapters, prefix and prompt tuning) place `Hook` nodes at the
generic hook sites the model reads (`HOOKS`, below); absent hooks are the identity. Leaves that are not kernels
(embeddings, norm scales, biases) may be wrapped in a `LeafWrapper` (e.g. PEFT's ``modules_to_save``); the model
reads every such leaf through `materialize`.

Wrappers compose (``LoRA(NF4(...), a, b)`` is QLoRA) because each wrapper calls `matmul` on its base.
"""

from __future__ import annotations

import functools
from typing import Callable, ClassVar, Dict, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

# ----------------------------------------------------------------------------------------------------------
# Roles: the label strings of trainable leaves, and how weight decay treats each one.

FROZEN = "frozen"
FULL = "full"
# role -> weight decay rule: True (decayed), False (never decayed) or "matrices" (leaves with ndim >= 2 only).
ROLE_DECAY: Dict[str, Union[bool, str]] = {FULL: "matrices"}


def register_role(role: str, decay: Union[bool, str]) -> str:
    """Declares a trainable role and its weight-decay rule (``True``, ``False`` or ``"matrices"``).

    Example:
      >>> register_role("lora_a", True)
      'lora_a'
    """
    if role == FROZEN:
        raise ValueError(f"register_role: {FROZEN!r} is not a trainable role")
    if decay not in (True, False, "matrices"):
        raise ValueError(f"register_role({role!r}): decay must be True, False or 'matrices', got {decay!r}")
    if ROLE_DECAY.get(role, decay) != decay:
        raise ValueError(f"register_role: role {role!r} is already declared with decay={ROLE_DECAY[role]!r}")
    ROLE_DECAY[role] = decay
    return role


def role_decays(role: str, leaf) -> bool:
    """Whether AdamW's decoupled weight decay applies to ``leaf`` of role ``role``."""
    rule = ROLE_DECAY.get(role, "matrices")
    return getattr(leaf, "ndim", 0) >= 2 if rule == "matrices" else bool(rule)


# ----------------------------------------------------------------------------------------------------------
# Node protocols


class Node:
    """Common base of every PEFT node in a parameter tree (kernel wrappers, leaf wrappers, hooks)."""

    mergeable: ClassVar[bool] = True
    method: ClassVar[str] = "?"  # the registry kind that owns this node type (for messages)

    def labels(self, label_base):  # pragma: no cover - interface
        """This node with every array replaced by its role string; ``label_base(sub)`` labels a wrapped base
        (the frozen part, or ``"full"`` in full fine-tuning); adapter leaves get their own roles."""
        raise NotImplementedError

    def with_rng(self, key):
        """This node with a PRNG key for training-time randomness (dropout); default: unchanged."""
        return self

    def with_rows(self, rows):
        """This node with per-row selector ids ``rows`` ``[B]`` (a node that computes something different for
        each batch row, e.g. an adapter set's kernel, `jlora.peft.multi`); default: unchanged."""
        return self

    def repeat_rows(self, k: int):
        """This node with its per-row ids repeated ``k`` times each (beam search runs ``k`` beams per row)."""
        return self

    def logical_sizes(self):
        """This node with every array replaced by the number of parameters it stands for (default: its size; a
        wrapped node, e.g. a quantized base under LoRA, counts its own)."""
        inner = lambda x: x is not self and is_node(x)  # noqa: E731
        return jax.tree_util.tree_map(lambda x: x.logical_sizes() if inner(x) else int(np.prod(np.shape(x))),
                                      self, is_leaf=inner)


class KernelWrapper(Node):
    """Base class of kernel wrappers (a ``<module>.kernel`` leaf). Subclasses are `flax.struct.dataclass` pytrees."""

    def matmul(self, x: jax.Array) -> jax.Array:  # pragma: no cover - interface
        raise NotImplementedError

    def linear(self, x: jax.Array, bias: Optional[jax.Array]) -> jax.Array:
        """The linear layer's output ``x @ W + bias``; override to act after the bias."""
        y = self.matmul(x)
        return y if bias is None else y + bias.astype(y.dtype)

    def materialize(self) -> jax.Array:  # pragma: no cover - interface
        raise NotImplementedError

    def merge_linear(self, bias: Optional[jax.Array]):
        """``(kernel, bias)`` as plain arrays computing what this wrapper computes (the bias unchanged here)."""
        return self.materialize(), bias

    def strip(self):
        """The kernel without this method's adapter (default: the wrapped ``base``, itself stripped)."""
        return strip_kernel(self.base)

    def row_terms(self):
        """What this wrapper adds to its base, in the one form a per-row adapter set can hold
        (`jlora.peft.multi`), or None when it has no such form (the default).

        Returns:
          None, or a dict with ``"base"`` (the wrapped kernel) and any of: ``"a"`` ``[in, r]``, ``"b"``
          ``[r, out]`` and ``"scale"`` (a float) for a low-rank update ``scale * (x @ a) @ b``; ``"col"`` ``[out]``
          multiplying ``x @ W + update`` before the bias; ``"in_scale"`` ``[in]`` multiplying the input of the
          base matmul; ``"out_scale"`` ``[out]`` multiplying the output after the bias. Arrays are float32.
        """
        return None

    def shard(self, spec_in, spec_out, fits: Callable):
        """Per-leaf shardings: this wrapper with each array replaced by a tuple of mesh axes (one per dimension).

        Args:
          spec_in, spec_out: the mesh axes of the materialized kernel's input and output dimensions.
          fits: ``fits(size, axes) -> axes or None``: the axes if they divide ``size``, else None.
        """
        raise NotImplementedError(f"{type(self).__name__} does not declare its sharding")

    @property
    def shape(self):
        return tuple(self.base.shape)

    @property
    def dtype(self):
        return self.base.dtype


class LeafWrapper(Node):
    """A wrapper at a non-kernel leaf (embedding, norm scale, bias); the model reads it via `materialize`."""

    def materialize(self) -> jax.Array:  # pragma: no cover - interface
        raise NotImplementedError

    def merged(self) -> jax.Array:
        """The plain leaf `jlora.merge` puts in its place (default: `materialize`)."""
        return self.materialize()

    def strip(self):  # pragma: no cover - interface
        raise NotImplementedError

    def shard(self, spec, fits: Callable):  # pragma: no cover - interface
        raise NotImplementedError

    @property
    def shape(self):
        return tuple(self.materialize().shape)

    @property
    def dtype(self):
        return self.materialize().dtype


class Hook(Node):
    """A node at one of the model's generic hook sites. Not a kernel: it changes the computation, so it cannot
    be folded into the weights unless it says so.

    Sites (the key under a layer's or the body's ``"hooks"`` dict) and what the model calls:

    * ``attn_out`` / ``mlp_out`` (per layer): ``hook(h, residual) -> x``: the block's new residual stream from a
      sublayer's output ``h`` and its input ``residual`` (absent: ``residual + h``);
    * ``kv_prefix`` (body): ``hook.kv(batch, dtype) -> (k, v)``, each ``[n_layers, B, P, kv_heads, dim_head]``:
      extra keys/values (no RoPE) every query of layer ``i`` attends to, placed before the sequence;
    * ``input_prefix`` (body): ``hook.embeds(batch, dtype) -> [B, P, d]``: virtual token embeddings placed
      before the first token; the model drops their outputs again, so the hidden states match the tokens.

    Both prefix hooks also say ``hook.length`` (``P``, a Python int): real tokens take positions from ``P`` on.
    """

    mergeable: ClassVar[bool] = False

    def strip(self):
        return None

    def shard(self, fits: Callable):
        """Per-leaf shardings (default: replicated)."""
        return jax.tree_util.tree_map(lambda x: (None,) * np.ndim(x), self)


HOOK_SITES_LAYER = ("attn_out", "mlp_out")
HOOK_SITES_BODY = ("input_prefix", "kv_prefix")
HOOKS = "hooks"  # the dict key of hook sites, in a layer's and in the body's sub-tree


def is_node(x) -> bool:
    """True for any PEFT node (kernel wrapper, leaf wrapper or hook): `jax.tree_util` stops there."""
    return isinstance(x, Node)


is_wrapper = is_node  # the name before hooks existed: any PEFT node


# ----------------------------------------------------------------------------------------------------------
# The dispatch


def matmul(x: jax.Array, kernel) -> jax.Array:
    """``x @ kernel`` for a plain array or a kernel wrapper, computed in ``x.dtype``.

    Args:
      x: activations ``[..., in]`` in the compute dtype.
      kernel: ``[in, out]`` array (any float dtype; cast to ``x.dtype``) or a `KernelWrapper`.

    Returns:
      ``[..., out]`` in ``x.dtype``.

    Example:
      >>> matmul(jnp.ones((2, 3)), jnp.ones((3, 4))).shape
      (2, 4)
    """
    if isinstance(kernel, KernelWrapper):
        return kernel.matmul(x)
    return jnp.matmul(x, materialize(kernel).astype(x.dtype))


def linear(x: jax.Array, kernel, bias=None) -> jax.Array:
    """A linear layer: ``x @ kernel + bias`` (a wrapper may act after the bias, e.g. IA3 scales the output).

    Example:
      >>> linear(jnp.ones((2, 3)), jnp.ones((3, 4)), jnp.ones((4,)))[0, 0].item()
      4.0
    """
    bias = None if bias is None else materialize(bias)
    if isinstance(kernel, KernelWrapper):
        return kernel.linear(x, bias)
    y = matmul(x, kernel)
    return y if bias is None else y + bias.astype(y.dtype)


def _after(codes, x):
    """``codes`` unchanged, but computed from ``x``. XLA's CPU compiler drops optimization barriers before it
    schedules, so this data dependency, which it cannot fold away (a value is never both NaN and infinite), is
    what keeps a dequantization from being hoisted ahead of its matmul."""
    x0 = jax.lax.stop_gradient(x.reshape(-1)[0])
    return codes | (jnp.isnan(x0) & jnp.isinf(x0)).astype(codes.dtype)


def _tied(arrays, x):
    """``arrays`` behind an optimization barrier with ``x``, the first integer one (the codes) made to depend
    on ``x`` (`_after`)."""
    x, arrays = jax.lax.optimization_barrier((x, arrays))
    out, done = [], False
    for a in arrays:
        if not done and a is not None and jnp.issubdtype(a.dtype, jnp.integer):
            a, done = _after(a, x), True
        out.append(a)
    return x, tuple(out)


def _dq_dot(x, w, layout):
    return jnp.einsum("...i,oi->...o" if layout == "oi" else "...i,io->...o", x, w)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _dequant_matmul(dequant, static, layout, x, arrays):
    x, arrays = _tied(arrays, x)
    return _dq_dot(x, dequant(arrays, x.dtype, static), layout)


def _dequant_matmul_fwd(dequant, static, layout, x, arrays):
    return _dequant_matmul(dequant, static, layout, x, arrays), arrays


def _dequant_matmul_bwd(dequant, static, layout, arrays, g):
    g, tied = _tied(arrays, g)
    w = dequant(tied, g.dtype, static)
    dx = jnp.einsum("...o,oi->...i" if layout == "oi" else "...o,io->...i", g, w)

    def zero(a):
        if a is None:
            return None
        if jnp.issubdtype(a.dtype, jnp.inexact):
            return jnp.zeros_like(a)
        return np.zeros(a.shape, jax.dtypes.float0)

    return dx, tuple(zero(a) for a in arrays)


_dequant_matmul.defvjp(_dequant_matmul_fwd, _dequant_matmul_bwd)


def dequant_matmul(x: jax.Array, arrays, dequant: Callable, static=(), layout: str = "io") -> jax.Array:
    """``x @ W`` for a frozen quantized ``W`` that is dequantized in ``x.dtype`` right where it is used.

    Every quantized base (`jlora.quant.Quant4bit`, `jlora.quant.Int8`, `jlora.quant_gguf.GGUFQuant`) multiplies
    through this one function. Why it exists: a dequantization does not depend on the activations, so XLA
    (measured on CPU with SmolLM2) schedules every layer's dequantization up front and keeps them all live (a
    float copy of the whole base among the step's temporaries), and autodiff keeps each dequantized matrix as a
    residual for ``dx``. Here the codes are tied to ``x`` in the forward pass and to the cotangent in the
    backward pass (an optimization barrier and a data dependency XLA cannot fold), and a custom VJP dequantizes
    again for ``dx`` instead of saving the matrix: each dequantized matrix is a short-lived temporary of its own
    matmul. The arrays are frozen: their cotangents are zeros.

    Args:
      x: activations ``[..., in]`` in the compute dtype.
      arrays: a tuple of the wrapper's arrays (codes first among the integer ones; None entries allowed).
      dequant: a module-level function ``dequant(arrays, dtype, static) -> W`` (hashable: it is static).
      static: hashable static arguments for ``dequant`` (shapes, the quantization type).
      layout: ``"io"`` when ``dequant`` returns ``[in, out]`` (jlora's kernel), ``"oi"`` for ``[out, in]``.

    Returns:
      ``[..., out]`` in ``x.dtype``.

    Example:
      >>> def deq(arrays, dtype, static):
      ...     q, scale = arrays
      ...     return q.astype(dtype) * scale.astype(dtype)
      >>> q, scale = jnp.ones((3, 2), jnp.int8), jnp.array([0.5, 2.0])
      >>> dequant_matmul(jnp.ones((1, 3)), (q, scale), deq).tolist()
      [[1.5, 6.0]]
    """
    if layout not in ("io", "oi"):
        raise ValueError(f"dequant_matmul: layout must be 'io' or 'oi', got {layout!r}")
    return _dequant_matmul(dequant, static, layout, x, tuple(arrays))


def materialize(leaf) -> jax.Array:
    """The plain array a kernel or leaf stands for (identity for plain arrays).

    Example:
      >>> materialize(jnp.ones(3)).shape
      (3,)
    """
    if isinstance(leaf, (KernelWrapper, LeafWrapper)):
        return leaf.materialize()
    return leaf


def strip_kernel(leaf):
    """A kernel or leaf without any PEFT method (quantized bases stay: they are the base)."""
    while isinstance(leaf, (KernelWrapper, LeafWrapper)):
        inner = leaf.strip()
        if inner is leaf:
            return leaf
        leaf = inner
    return leaf


def _unmergeable(params) -> list:
    out = []
    for path, x in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_node)[0]:
        if is_node(x) and not x.mergeable:
            out.append((".".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path), x))
    return out


def merge(params):
    """Folds every kernel and leaf wrapper into plain arrays: a tree with the base's structure and dtypes.

    Args:
      params: a parameter tree that may hold wrappers (LoRA, DoRA, IA3, ...).

    Returns:
      the plain tree (wrappers materialized in float32 and cast once to the base dtype; a method that acts after
      the bias, such as IA3 on an attention projection, also folds into that bias).

    Raises:
      ValueError naming the first node of a method that cannot be folded into the weights (bottleneck adapters,
      prefix and prompt tuning change the computation itself).

    Example:
      >>> merged = jlora.merge(jlora.lora.init(key, cfg, params, lcfg))
      >>> jax.tree.structure(merged) == jax.tree.structure(params)  # plain arrays again
      True
    """
    bad = _unmergeable(params)
    if bad:
        where, node = bad[0]
        raise ValueError(f"merge: {where} is a {type(node).__name__} node of the {node.method!r} method, which "
                         f"changes the computation itself (extra keys/values, inputs or layers) and cannot be folded "
                         f"into the weights; keep it as an adapter instead: use it unmerged (jlora generate/eval "
                         f"--adapter DIR) or write it as an adapter file with jlora export --format peft (save_adapter: PEFT's "
                         f"format, AdapterHub's for bottleneck adapters)")

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("kernel"), KernelWrapper):
                out = {k: walk(v) for k, v in node.items() if k not in ("kernel", "bias")}
                kernel, bias = node["kernel"].merge_linear(
                    None if node.get("bias") is None else materialize(node["bias"]))
                out["kernel"] = kernel
                if "bias" in node:
                    out["bias"] = bias
                return out
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            return type(node)(walk(v) for v in node)
        return node.merged() if isinstance(node, LeafWrapper) else materialize(node)

    return walk(params)


def with_rows(params, rows):
    """Gives every node that selects per batch row (an adapter set's kernels) the row ids ``rows`` ``[B]``.

    Example:
      >>> with_rows({"w": jnp.ones(2)}, jnp.zeros(3, jnp.int32))["w"].shape  # plain leaves are unchanged
      (2,)
    """
    return jax.tree_util.tree_map(lambda x: x.with_rows(rows) if is_node(x) else x, params, is_leaf=is_node)


def repeat_rows(params, k: int):
    """Repeats the per-row ids of every row-selecting node ``k`` times each (``jnp.repeat``): beam search."""
    return jax.tree_util.tree_map(lambda x: x.repeat_rows(k) if is_node(x) else x, params, is_leaf=is_node)


def with_rngs(params, key):
    """Gives each node that wants one (e.g. LoRA with dropout) its own PRNG key; used inside train steps."""
    leaves, treedef = jax.tree_util.tree_flatten(params, is_leaf=is_node)
    out = [x.with_rng(jax.random.fold_in(key, i)) if is_node(x) else x for i, x in enumerate(leaves)]
    return jax.tree_util.tree_unflatten(treedef, out)
