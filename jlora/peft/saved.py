"""PEFT's ``modules_to_save``: whole modules (``lm_head``, ``embed_tokens``, a classifier) trained in full next to
an adapter, and saved whole with it.

`mark` wraps every array of the selected modules in a `Saved` node (a `SavedKernel` at ``kernel``): the model
reads it like the plain array, its role is ``"full"``, it trains in float32 whatever the base's storage dtype
(the rule for every trainable leaf), and it merges and strips to the trained array cast back to the base's dtype
(as PEFT's ``merge_and_unload``/``unload`` keep the trained copy). Any method config's ``modules_to_save`` goes through
here (`jlora.peft.base.finish_init`).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax.numpy as jnp
from flax import struct

from jlora import tree as T
from jlora.kernels import FULL, KernelWrapper, LeafWrapper, is_node, matmul
from jlora.peft import base as B


@struct.dataclass
class Saved(LeafWrapper):
    """A non-kernel leaf (embedding, bias, norm scale) of a ``modules_to_save`` module: trained in full."""

    value: Any
    base_dtype: str = struct.field(pytree_node=False, default="float32")

    def materialize(self):
        return self.value

    def merged(self):
        return self.value.astype(self.base_dtype)

    def strip(self):
        return self.merged()

    def labels(self, label_base):
        return self.replace(value=FULL)

    def shard(self, spec, fits):
        return self.replace(value=tuple(spec))


@struct.dataclass
class SavedKernel(KernelWrapper):
    """The kernel of a ``modules_to_save`` module: trained in full."""

    base: Any
    base_dtype: str = struct.field(pytree_node=False, default="float32")

    def matmul(self, x):
        return matmul(x, self.base)

    def materialize(self):
        return self.base.astype(self.base_dtype)

    def strip(self):
        return self.materialize()

    def labels(self, label_base):
        return self.replace(base=FULL)

    def shard(self, spec_in, spec_out, fits):
        return self.replace(base=(spec_in, spec_out))


def module_names(params) -> list:
    """Every module (a dict holding arrays) of the tree, by dotted name."""
    out = set()
    for name in T.named_leaves(params):
        parts = name.split(".")
        for k in range(1, len(parts)):
            out.add(".".join(parts[:k]))
    return sorted(out, key=T.natural_key)


def wraps(leaf_name: str, entry: str) -> bool:
    # PEFT (peft.utils.other._set_trainable) wraps every module whose full name ends with the entry, as a plain
    # string suffix ("norm" also catches "input_layernorm"), with all the parameters below it.
    parts = leaf_name.split(".")[:-1]
    return any(".".join(parts[:k]).endswith(entry) for k in range(1, len(parts) + 1))


def mark(cfg, params, modules_to_save: Sequence[str]):
    """``params`` with every leaf of the modules that ``modules_to_save`` names wrapped for full training.

    The rule is PEFT's for the modules it wraps and saves: a module whose full dotted name ends with an entry (a
    plain string suffix, so ``"norm"`` also catches ``input_layernorm``), with every parameter below it. (PEFT's
    rule for keeping such modules out of the method's targets is the stricter whole-segment one,
    `jlora.peft.base.in_modules_to_save`.)

    Raises:
      ValueError naming the entry that selects no module (with a hint for a head tied to the embedding), or a
      module that already carries an adapter.
    """
    leaves = T.named_leaves(params)
    chosen = {}
    for entry in modules_to_save:
        hits = [n for n in leaves if wraps(n, entry)]
        if not hits:
            tied = (" (this model ties its output head to the input embedding)"
                    if entry == "lm_head" and cfg.tie_embeddings else "")
            raise ValueError(f"modules_to_save entry {entry!r} matches no module of this {cfg.arch} model{tied}")
        emb = f"{'transformer.wte' if cfg.arch == 'gpt2' else 'model.embed_tokens'}.embedding"
        if cfg.tie_embeddings and emb in hits:
            # PEFT trains a copy of the embedding while the tied head goes on reading the original (measured
            # with peft 0.21, with and without ensure_weight_tying); jlora's tied model reads one table.
            raise ValueError(f"modules_to_save entry {entry!r} selects the input embedding of a model whose output "
                             f"head is tied to it; PEFT then trains a copy that the head does not use, which jlora "
                             f"cannot reproduce. Train it with method.kind='full', or untie the head")
        for n in hits:
            chosen[n] = leaves[n]
    new = {}
    for name, leaf in chosen.items():
        if is_node(leaf):
            raise ValueError(f"modules_to_save: {name} already carries a {type(leaf).__name__} node; a module is "
                             f"either adapted or saved whole, not both")
        new[name] = wrap(name, jnp.asarray(leaf, jnp.float32), str(jnp.dtype(leaf.dtype)))
    return replace_leaves(params, new)


def wrap(name: str, value, base_dtype: str):
    """The saved node for the leaf ``name``: a `SavedKernel` at a kernel, a `Saved` elsewhere."""
    return SavedKernel(base=value, base_dtype=base_dtype) if name.endswith(".kernel") else \
        Saved(value=value, base_dtype=base_dtype)


def replace_leaves(params, new: dict):
    """A copy of ``params`` with the leaves at the given dotted names replaced (dicts copied along the paths)."""
    out = dict(params)
    for name, value in new.items():
        parts = name.split(".")
        node = out
        for p in parts[:-1]:
            node[p] = dict(node[p])
            node = node[p]
        node[parts[-1]] = value
    return out


def saved_modules(params) -> dict:
    """{dotted leaf name: Saved/SavedKernel node} of the tree."""
    return {n: v for n, v in T.named_leaves(params).items() if isinstance(v, (Saved, SavedKernel))}


METHOD = B.register(B.Method(kind="modules_to_save", config=None, init=lambda key, cfg, params, mcfg=None: params,
                             nodes=(Saved, SavedKernel), standalone=False,
                             summary="modules_to_save: whole modules trained in full beside an adapter"))
