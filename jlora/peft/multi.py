"""Many adapters on one frozen base: an adapter set whose batch rows each use their own adapter (or none).

This is what LoRAX, S-LoRA and vLLM do for PyTorch: one copy of the base in memory, any number of adapters
beside it, and one forward for a batch that mixes them. PEFT's ``adapter_names`` forward argument has the same
meaning (``"__base__"`` for a row without an adapter), and the logits here equal PEFT's for it.

How it works. Every adapted ``<module>.kernel`` becomes one `MultiKernel` node holding the base kernel and the
adapters' terms stacked along a leading *slot* axis (slot 0 is the base: neutral terms). A forward selects each
row's slot (``rows``, set with `jlora.kernels.with_rows`) and gathers that slot's factors, so the batch costs one
base matmul plus a rank-``R`` product per row. What a slot can hold is the form every kernel method states
through ``row_terms()`` (`jlora.kernels.KernelWrapper.row_terms`): a low-rank update (LoRA; QLoRA on a
quantized base), a column scale of the updated output (DoRA, whose weight norm is a constant outside training)
and input/output scales (IA3). Methods that change the computation elsewhere (bottleneck adapters, prefix and
prompt tuning, ``modules_to_save``) have no per-row form here and are refused by name.

Shapes are padded into buckets so that adding, replacing and removing adapters does not recompile: the slot
count grows by doubling and the rank bucket is a power of two; an adapter that fits both (and targets modules
the set already holds, in a form it already holds) is written into a free slot of the same arrays.
`AdapterSet.layout_changes` counts the times a new adapter had to grow the shapes (each one is a recompile).
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jlora import tree as T
from jlora.config import ModelConfig
from jlora.kernels import FROZEN, KernelWrapper, LeafWrapper, is_node, matmul, strip_kernel, with_rows

BASE = "__base__"  # PEFT's name for "no adapter" in adapter_names
FIELDS = ("a", "b", "scale", "col", "in_scale", "out_scale")
# Neutral value of each field (what slot 0, free slots and adapters that do not touch a module hold).
NEUTRAL = {"a": 0.0, "b": 0.0, "scale": 0.0, "col": 1.0, "in_scale": 1.0, "out_scale": 1.0}


@struct.dataclass
class MultiKernel(KernelWrapper):
    """A base kernel with many adapters stacked on a slot axis; each batch row uses the slot ``rows[i]``.

    For row ``i`` with slot ``s``: ``((x * in_scale[s]) @ W + scale[s] * (x @ a[s]) @ b[s]) * col[s] + bias``,
    then ``* out_scale[s]``; absent fields (None) are neutral for every slot.

    Attributes:
      base: the shared frozen kernel ``[in, out]`` (an array or a quantized wrapper).
      a: ``[n, in, R]``; b: ``[n, R, out]``; scale: ``[n]`` (low-rank updates, zero-padded to the rank bucket R).
      col: ``[n, out]``; in_scale: ``[n, in]``; out_scale: ``[n, out]``.
      rows: ``[B]`` int32 slot of each batch row (set per call with `jlora.kernels.with_rows`), else None.
    """

    base: Any
    a: Optional[jax.Array] = None
    b: Optional[jax.Array] = None
    scale: Optional[jax.Array] = None
    col: Optional[jax.Array] = None
    in_scale: Optional[jax.Array] = None
    out_scale: Optional[jax.Array] = None
    rows: Any = None

    mergeable = False
    method = "adapter set"

    def _rows(self, x):
        if self.rows is None:
            raise ValueError("an adapter set's kernel needs the adapter of each batch row: pass adapter_names "
                             "(AdapterSet.apply / AdapterSet.generate) or set them with jlora.kernels.with_rows")
        if self.rows.shape[0] != x.shape[0]:
            raise ValueError(f"adapter set: {self.rows.shape[0]} adapter names for a batch of {x.shape[0]} rows")
        return self.rows

    @staticmethod
    def _per_row(v, rows, x):
        """``v[rows]`` ``[B, d]`` shaped to broadcast against ``x`` ``[B, ..., d]``."""
        sel = jnp.take(v, rows, axis=0).astype(x.dtype)
        return sel.reshape((x.shape[0],) + (1,) * (x.ndim - 2) + sel.shape[-1:])

    def linear(self, x, bias):
        rows = self._rows(x)
        h = x if self.in_scale is None else x * self._per_row(self.in_scale, rows, x)
        y = matmul(h, self.base)
        if self.a is not None:
            # Each row gathers its own factors: one [in, R] and one [R, out] matrix per row, never a @ b.
            xf = x.reshape(x.shape[0], -1, x.shape[-1])
            a = jnp.take(self.a, rows, axis=0).astype(x.dtype)
            b = jnp.take(self.b, rows, axis=0).astype(x.dtype)
            low = jnp.einsum("bti,bir->btr", xf, a) * jnp.take(self.scale, rows).astype(x.dtype)[:, None, None]
            y = y + jnp.einsum("btr,bro->bto", low, b).reshape(y.shape)
        if self.col is not None:
            y = y * self._per_row(self.col, rows, y)
        if bias is not None:
            y = y + bias.astype(y.dtype)
        if self.out_scale is not None:
            y = y * self._per_row(self.out_scale, rows, y)
        return y

    def matmul(self, x):
        return self.linear(x, None)

    def materialize(self):
        raise ValueError("an adapter set's kernel stands for one kernel per adapter; take one adapter's tree "
                         "with AdapterSet.tree(name) and merge that")

    def labels(self, label_base):
        frozen = lambda v: None if v is None else FROZEN  # noqa: E731  (serving only: nothing trains)
        return self.replace(base=label_base(self.base), **{f: frozen(getattr(self, f)) for f in FIELDS}, rows=None)

    def with_rows(self, rows):
        return self.replace(rows=jnp.asarray(rows, jnp.int32))

    def repeat_rows(self, k):
        return self if self.rows is None else self.replace(rows=jnp.repeat(self.rows, k))

    def strip(self):
        return strip_kernel(self.base)

    def shard(self, spec_in, spec_out, fits):
        base = self.base.shard(spec_in, spec_out, fits) if isinstance(self.base, KernelWrapper) else \
            (spec_in, spec_out)
        d_in, d_out = self.shape
        ax = {"a": (None, fits(d_in, spec_in), None), "b": (None, None, fits(d_out, spec_out)), "scale": (None,),
              "col": (None, fits(d_out, spec_out)), "in_scale": (None, fits(d_in, spec_in)),
              "out_scale": (None, fits(d_out, spec_out))}
        return self.replace(base=base, **{f: None if getattr(self, f) is None else ax[f] for f in FIELDS},
                            rows=None)


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _same_base(mine, theirs) -> bool:
    """Whether an adapter's base kernel is the set's (the same arrays, or equal ones)."""
    la, ta = jax.tree_util.tree_flatten(mine)
    lb, tb = jax.tree_util.tree_flatten(theirs)
    if ta != tb or len(la) != len(lb):
        return False
    for x, y in zip(la, lb):
        if x is y:
            continue
        if np.shape(x) != np.shape(y) or np.asarray(x).dtype != np.asarray(y).dtype or \
                not np.array_equal(np.asarray(x), np.asarray(y)):
            return False
    return True


class AdapterSet:
    """Many adapters on one base, for mixed-adapter batches (PEFT's ``adapter_names``) and serving.

    Args:
      cfg: model config of the base.
      base_params: the base tree (plain or quantized kernels, no adapter); it is shared, never copied.
      capacity: initial number of adapter slots (grows by doubling).
      rank_bucket: initial rank bucket (grows to the next power of two that holds an adapter's rank).

    Example:
      >>> s = AdapterSet(cfg, params)  # params: the base tree
      >>> s.add("a", jlora.lora.init(jax.random.key(1), cfg, params, jlora.LoraConfig(r=4, init=False)))
      >>> s.add("b", jlora.lora.init(jax.random.key(2), cfg, params, jlora.LoraConfig(r=2, init=False)))
      >>> logits = s.apply(jnp.ones((3, 5), jnp.int32), ["a", "__base__", "b"])  # one forward, three adapters
      >>> logits.shape, s.names
      ((3, 5, 128), ['a', 'b'])
    """

    def __init__(self, cfg: ModelConfig, base_params, *, capacity: int = 8, rank_bucket: int = 8):
        for path, x in jax.tree_util.tree_flatten_with_path(base_params, is_leaf=is_node)[0]:
            if is_node(x) and strip_kernel(x) is not x:
                raise ValueError(f"AdapterSet: the base tree already holds a {type(x).__name__} node at "
                                 f"{T.path_str(path)}; pass the base without any adapter")
        if capacity < 1 or rank_bucket < 1:
            raise ValueError(f"AdapterSet: capacity and rank_bucket must be >= 1, got {capacity}, {rank_bucket}")
        self.cfg = cfg
        self.base = base_params
        self._kernels = T.linear_modules(base_params)
        self._slots = 1 + int(capacity)  # slot 0: the base
        self._rank = _pow2(rank_bucket)
        self._fields: Dict[str, set] = {}  # module -> fields present
        self._adapters: Dict[str, dict] = {}  # name -> {"slot": int, "terms": {module: {field: np array}}}
        self.layout_changes = 0
        self._params = base_params

    # -- the adapters ----------------------------------------------------------------------------------------

    @property
    def names(self) -> List[str]:
        """The loaded adapters, in slot order."""
        return sorted(self._adapters, key=lambda n: self._adapters[n]["slot"])

    @property
    def params(self):
        """The parameter tree with `MultiKernel` nodes (row ids unset)."""
        return self._params

    def __contains__(self, name) -> bool:
        return name in self._adapters

    def _terms_of(self, name: str, adapter) -> Dict[str, dict]:
        terms = {}
        for path, x in jax.tree_util.tree_flatten_with_path(adapter, is_leaf=is_node)[0]:
            if not is_node(x):
                continue
            where = T.path_str(path)
            if not (isinstance(x, KernelWrapper) and where.endswith(".kernel")):
                kind = "a leaf wrapper (modules_to_save)" if isinstance(x, LeafWrapper) else "a hook"
                raise ValueError(f"AdapterSet.add({name!r}): {where} is {kind} of the {x.method!r} method, which an "
                                 f"adapter set cannot apply per batch row (only kernel methods: low-rank updates "
                                 f"and scales); serve this adapter on its own tree")
            module = where[: -len(".kernel")]
            got = x.row_terms()
            if got is None:
                if strip_kernel(x) is x:  # a quantized base, not an adapter
                    continue
                raise ValueError(f"AdapterSet.add({name!r}): the {type(x).__name__} kernel at {module} (method "
                                 f"{x.method!r}) has no per-row form an adapter set can hold")
            if module not in self._kernels or not _same_base(self._kernels[module], got["base"]):
                raise ValueError(f"AdapterSet.add({name!r}): {module} was adapted on a different base kernel than "
                                 f"the set's (load the adapter onto the set's base: jlora.load_adapter(cfg, "
                                 f"set.base, dir))")
            if is_node(got["base"]) and got["base"].row_terms() is not None:
                raise ValueError(f"AdapterSet.add({name!r}): {module} stacks two adapters on one kernel; an adapter "
                                 f"set holds one per slot")
            t = {f: np.asarray(jax.device_get(v), np.float32) for f, v in got.items() if f != "base"}
            if "a" in t:
                t["scale"] = np.float32(got["scale"])
            terms[module] = t
        if not terms:
            raise ValueError(f"AdapterSet.add({name!r}): the tree holds no adapter kernels")
        return terms

    def add(self, name: str, adapter, *, replace: bool = False) -> None:
        """Loads an adapter into a free slot (or over the adapter of the same name with ``replace``).

        Args:
          name: the adapter's name (the ``adapter_names`` entry; not ``"__base__"``).
          adapter: a parameter tree on this set's base (`jlora.load_adapter`, `jlora.lora.init`, a trained tree)
            or a PEFT adapter directory.
          replace: allow replacing a loaded adapter of this name.
        """
        if not isinstance(name, str) or not name or name == BASE:
            raise ValueError(f"AdapterSet.add: the adapter name must be a non-empty string other than {BASE!r}, "
                             f"got {name!r}")
        if name in self._adapters and not replace:
            raise ValueError(f"AdapterSet.add: an adapter named {name!r} is already loaded (replace=True replaces "
                             f"it)")
        if isinstance(adapter, (str, os.PathLike)):
            from jlora.convert.peft import load_adapter

            adapter = load_adapter(self.cfg, self.base, os.fspath(adapter))
        terms = self._terms_of(name, adapter)
        if name in self._adapters:
            slot = self._adapters[name]["slot"]
        else:
            used = {a["slot"] for a in self._adapters.values()}
            slot = next((s for s in range(1, self._slots) if s not in used), None)
        grow = slot is None
        rank = max((t["a"].shape[1] for t in terms.values() if "a" in t), default=0)
        for module, t in terms.items():
            have = self._fields.get(module)
            need = set(t) | ({"b", "scale"} if "a" in t else set())
            if have is None or not need <= have:
                grow = True
        if rank > self._rank:
            grow = True
        saved = ({k: dict(v) for k, v in self._adapters.items()}, self._slots, self._rank,
                 {k: set(v) for k, v in self._fields.items()}, self._params, self.layout_changes)
        try:  # all or nothing: a failure (e.g. out of device memory) leaves the set as it was
            self._adapters[name] = {"slot": slot, "terms": terms, "tree": adapter}
            if grow:
                self.layout_changes += 1
                self._relayout(rank)
            else:
                self._write(slot, terms)
        except BaseException:
            self._adapters, self._slots, self._rank, self._fields, self._params, self.layout_changes = saved
            raise

    def remove(self, name: str) -> None:
        """Unloads an adapter (its slot becomes free; shapes stay, nothing recompiles)."""
        if name not in self._adapters:
            raise KeyError(f"AdapterSet.remove: no adapter named {name!r}; loaded: {self.names}")
        slot = self._adapters.pop(name)["slot"]
        self._write(slot, {})

    def _relayout(self, rank: int) -> None:
        """Rebuilds every stacked array with room for all adapters (a new shape: the next call compiles)."""
        n = len(self._adapters)
        while self._slots - 1 < n:
            self._slots = 2 * (self._slots - 1) + 1  # twice the adapter slots, plus the base's
        self._rank = max(self._rank, _pow2(rank))
        for i, name in enumerate(sorted(self._adapters, key=lambda k: (self._adapters[k]["slot"] is None,
                                                                       self._adapters[k]["slot"] or 0))):
            self._adapters[name]["slot"] = i + 1
        fields: Dict[str, set] = {}
        for a in self._adapters.values():
            for module, t in a["terms"].items():
                fields.setdefault(module, set()).update(set(t) | ({"b", "scale"} if "a" in t else set()))
        for module, have in self._fields.items():  # keep what the set held: shapes only grow
            fields.setdefault(module, set()).update(have)
        self._fields = fields
        new = {}
        for module, have in fields.items():
            kernel = self._kernels[module]
            d_in, d_out = kernel.shape
            dims = {"a": (d_in, self._rank), "b": (self._rank, d_out), "scale": (), "col": (d_out,),
                    "in_scale": (d_in,), "out_scale": (d_out,)}
            arrays = {f: np.full((self._slots,) + dims[f], NEUTRAL[f], np.float32) for f in have}
            for a in self._adapters.values():
                t = a["terms"].get(module, {})
                for f, v in t.items():
                    if f == "a":
                        arrays["a"][a["slot"], :, : v.shape[1]] = v
                    elif f == "b":
                        arrays["b"][a["slot"], : v.shape[0]] = v
                    else:
                        arrays[f][a["slot"]] = v
            new[module] = MultiKernel(base=kernel, **{f: jnp.asarray(v) for f, v in arrays.items()})
        self._params = T.replace_modules(self.base, new)

    def _write(self, slot: int, terms: Dict[str, dict]) -> None:
        """Writes one slot of every stacked array in place of its old contents (same shapes: no recompile)."""
        new = {}
        for module, node in T.linear_modules(self._params).items():
            if not isinstance(node, MultiKernel):
                continue
            t = terms.get(module, {})
            upd = {}
            for f in FIELDS:
                arr = getattr(node, f)
                if arr is None:
                    continue
                v = np.full(arr.shape[1:], NEUTRAL[f], np.float32)
                if f == "a" and "a" in t:
                    v[:, : t["a"].shape[1]] = t["a"]
                elif f == "b" and "b" in t:
                    v[: t["b"].shape[0]] = t["b"]
                elif f in t:
                    v[...] = t[f]
                upd[f] = arr.at[slot].set(jnp.asarray(v, arr.dtype))
            new[module] = node.replace(**upd)
        self._params = T.replace_modules(self._params, new)

    # -- using it --------------------------------------------------------------------------------------------

    def rows(self, adapter_names: Sequence[Optional[str]]) -> np.ndarray:
        """The slot of each name (``"__base__"`` or None: the base), as int32 ``[B]``."""
        out = []
        for n in adapter_names:
            if n is None or n == BASE:
                out.append(0)
            elif n in self._adapters:
                out.append(self._adapters[n]["slot"])
            else:
                raise ValueError(f"AdapterSet: unknown adapter {n!r}; loaded: {self.names} (or {BASE!r})")
        return np.asarray(out, np.int32)

    def select(self, adapter_names: Sequence[Optional[str]]):
        """The parameter tree with each batch row's adapter chosen (for `jlora.apply`, `jlora.forward`, ...)."""
        return with_rows(self._params, self.rows(adapter_names))

    def apply(self, tokens, adapter_names: Sequence[Optional[str]], attention_mask=None) -> jax.Array:
        """Logits ``[B, T, vocab]`` of one forward in which row ``i`` uses adapter ``adapter_names[i]``."""
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2 or tokens.shape[0] != len(adapter_names):
            raise ValueError(f"AdapterSet.apply: tokens of shape {tuple(tokens.shape)} need one adapter name per "
                             f"row, got {len(adapter_names)}")
        return _apply_jit(self.cfg, self.select(adapter_names), tokens, attention_mask)

    def generate(self, prompt_ids, adapter_names: Sequence[Optional[str]], max_new_tokens: int = 32, **kwargs):
        """`jlora.generate` over a batch of prompts, prompt ``i`` with adapter ``adapter_names[i]`` (beam search
        keeps each prompt's adapter for all of its beams)."""
        from jlora.generate import _prompt_rows, generate

        n = len(_prompt_rows(prompt_ids, kwargs.get("attention_mask"))[0])
        if n != len(adapter_names):
            raise ValueError(f"AdapterSet.generate: {n} prompts need as many adapter names, got "
                             f"{len(adapter_names)}")
        return generate(self.cfg, self.select(adapter_names), prompt_ids, max_new_tokens, **kwargs)

    def tree(self, name: Optional[str]):
        """The ordinary parameter tree of one loaded adapter (or the base for None / ``"__base__"``): for
        merging, saving or a single-adapter forward."""
        if name is None or name == BASE:
            return self.base
        if name not in self._adapters:
            raise ValueError(f"AdapterSet: unknown adapter {name!r}; loaded: {self.names}")
        return self._adapters[name]["tree"]

    def adapter_bytes(self, name: Optional[str] = None) -> int:
        """Device bytes of one slot of the stacked arrays (what each additional adapter costs), or with a name
        the bytes of that adapter's own terms."""
        if name is not None:
            return int(sum(np.asarray(v).nbytes for t in self._adapters[name]["terms"].values()
                           for v in t.values()))
        total = 0
        for node in T.linear_modules(self._params).values():
            if isinstance(node, MultiKernel):
                total += sum(getattr(node, f)[0].nbytes for f in FIELDS if getattr(node, f) is not None)
        return int(total)

    @property
    def capacity(self) -> int:
        """Adapter slots available before the shapes grow."""
        return self._slots - 1

    @property
    def rank_bucket(self) -> int:
        return self._rank


def _apply_impl(cfg, params, tokens, attention_mask):
    from jlora.model import apply

    return apply(cfg, params, tokens, attention_mask)


# One compiled forward per (config, tree shapes): new adapters in free slots change values, not shapes.
_apply_jit = jax.jit(_apply_impl, static_argnums=(0,))
