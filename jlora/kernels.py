"""The one matmul dispatch every linear layer of the model goes through, and the kernel-wrapper protocol.

A kernel leaf of the parameter tree is either a plain array ``[in, out]`` or a *kernel wrapper*: a registered
pytree node (a `flax.struct.dataclass`) that subclasses `KernelWrapper` and implements

* ``matmul(x)``: its fast forward, ``x @ W`` without building ``W`` when that is cheaper (LoRA never forms
  ``A @ B`` here);
* ``materialize()``: the plain array it stands for, used by merge and export;
* ``labels(label_base)``: its role strings (which leaves are adapter factors), see `jlora.tree.trainable_labels`;
* ``shape`` / ``dtype``: those of the materialized kernel.

The model never knows which PEFT method (if any) is active: it calls `matmul(x, kernel)` and wrappers do the
rest. Wrappers compose (``LoRA(NF4(...), a, b)`` is QLoRA) because each wrapper calls `matmul` on its base.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


class KernelWrapper:
    """Base class of kernel wrappers. Subclasses are `flax.struct.dataclass` pytrees."""

    def matmul(self, x: jax.Array) -> jax.Array:  # pragma: no cover - interface
        raise NotImplementedError

    def materialize(self) -> jax.Array:  # pragma: no cover - interface
        raise NotImplementedError

    def labels(self, label_base):  # pragma: no cover - interface
        """This wrapper with every array replaced by its role string; ``label_base(sub)`` labels wrapped
        bases (the frozen part), adapter leaves get their own roles (e.g. ``"lora_a"``)."""
        raise NotImplementedError

    def with_rng(self, key):
        """This wrapper with a PRNG key for training-time randomness (dropout); default: unchanged."""
        return self

    @property
    def shape(self):  # pragma: no cover - interface
        raise NotImplementedError

    @property
    def dtype(self):  # pragma: no cover - interface
        raise NotImplementedError


def is_wrapper(x) -> bool:
    """True for a kernel wrapper node (stops `jax.tree_util` traversal at wrappers via ``is_leaf``)."""
    return isinstance(x, KernelWrapper)


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
    return jnp.matmul(x, kernel.astype(x.dtype))


def materialize(kernel) -> jax.Array:
    """The plain array a kernel leaf stands for (identity for plain arrays)."""
    if isinstance(kernel, KernelWrapper):
        return kernel.materialize()
    return kernel


def merge(params):
    """Folds every kernel wrapper into a plain array: a tree with the base's structure and dtypes.

    Args:
      params: a parameter tree that may hold wrappers (LoRA, ...).

    Returns:
      the plain tree (wrappers materialized in float32 and cast once to the base dtype).

    Example:
      >>> merged = jlora.merge(jlora.lora.init(key, cfg, params, lcfg))
    """
    return jax.tree_util.tree_map(materialize, params, is_leaf=is_wrapper)


def with_rngs(params, key):
    """Gives each wrapper that wants one (e.g. LoRA with dropout) its own PRNG key; used inside train steps."""
    leaves, treedef = jax.tree_util.tree_flatten(params, is_leaf=is_wrapper)
    out = [x.with_rng(jax.random.fold_in(key, i)) if is_wrapper(x) else x for i, x in enumerate(leaves)]
    return jax.tree_util.tree_unflatten(treedef, out)
