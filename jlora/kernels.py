"""The one matmul dispatch every linear layer of the model goes through, and the kernel-wrapper protocol.

A kernel leaf of the parameter tree is either a plain array ``[in, out]`` or a *kernel wrapper*: a registered
pytree node (a `flax.struct.dataclass`) that subclasses `KernelWrapper` and implements

* ``matmul(x)``: its fast forward, ``x @ W`` without building ``W`` when that is cheaper (LoRA never forms
  ``A @ B`` here);
* ``materialize()``: the plain array it stands for, used by merge and export;
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
