"""Weighted combinations of LoRA adapters: PEFT's ``LoraModel.add_weighted_adapter``, as a pure tree function.

`combine_adapters` takes several jlora LoRA trees on one base (from `jlora.load_adapter` or `jlora.lora.init`)
and returns a new tree whose LoRA kernels hold the combined adapter; `jlora.save_adapter` writes it as a normal
PEFT LoRA adapter. The semantics are PEFT's (0.21), module by module, in PEFT's orientation (``A = a.T``
``[r, in]``, ``B = b.T`` ``[out, r]``, ``s`` = an adapter's scale, ``w`` = its weight):

* ``cat``: ``A = [w_1 s_1 A_1; w_2 s_2 A_2; ...]``, ``B = [B_1, B_2, ...]``, at rank ``sum(r_i)`` (zero rows and
  columns where an adapter lacks the module or has a lower rank there): the delta is exactly ``sum w_i s_i B_i A_i``.
* ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``: A and B are merged separately, with
  weights ``sign(w s) sqrt(|w s|)`` for A and ``sqrt(|w s|)`` for B (an approximation: the product of sums is not
  the sum of products); every adapter must have the same rank.
* ``svd``, ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``, ``magnitude_prune_svd``: the deltas
  ``s_i B_i A_i`` are merged (task arithmetic, TIES, DARE or magnitude pruning with the weights), then
  ``U, S, Vh = svd(delta)``: ``B = U[:, :k] diag(S[:k])``, ``A = Vh[:k]`` with ``k = svd_rank`` (default: the
  largest input rank), each entry of both clamped to ``±quantile([U S, Vh], svd_clamp)`` when ``svd_clamp`` is set.
* The new adapter has ``r`` = the new rank and ``lora_alpha = r`` (scale 1.0) on every module, and covers the union
  of the modules any input adapts (an adapter without a module contributes nothing there). With one adapter the
  type is ``linear`` (PEFT's rule).
* The merge functions are PEFT's ``merge_utils``: magnitude pruning keeps the ``int(density * n)`` largest
  ``|x|``; DARE keeps each entry with probability ``density`` and divides the kept ones by ``density``; TIES elects
  the sign per entry from the pruned, unweighted tensors (``"total"``: the sign of their sum, ``"frequency"``: of
  their sign count; ties go to +) and averages the weighted entries that agree with it. ``density >= 1`` prunes
  nothing (and draws nothing).
* ``modules_to_save``: at most one adapter may save a module (else PEFT refuses); the new adapter saves the
  modules that the *first* adapter saves, holding the *base* values (PEFT gives the new adapter fresh copies of
  the original modules; the trained copies are not combined).

Where jlora differs, on purpose: PEFT draws DARE masks with ``torch.bernoulli`` (global RNG); jlora draws them
from ``key`` (or takes them from ``dare_mask``). PEFT copies ``use_rslora`` from the first adapter's config, so a
combination of rsLoRA adapters gets scale ``sqrt(r)`` instead of 1 (its delta is not the combined one); jlora's
trees carry scales, not configs, and the new adapter always has scale 1.0 (saved with ``use_rslora=false``).
PEFT also keeps the first adapter's ``layers_to_transform``/``exclude_modules`` for the union, which can drop
modules or fail ("No matching LoRAs found"); jlora takes the union of the adapted modules. Arguments PEFT would
ignore or crash on (a density for ``linear``, a weight list of the wrong length, NaN-producing ``density=0`` for
DARE, an SVD rank above a matrix's dimensions) are ValueErrors here.
"""

from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jlora import tree as T
from jlora.kernels import Hook, KernelWrapper, is_node, strip_kernel
from jlora.peft import base as B
from jlora.peft import saved as S
from jlora.peft.lora import LoRA

COMBINATION_TYPES = ("svd", "linear", "cat", "ties", "ties_svd", "dare_ties", "dare_linear", "dare_ties_svd",
                     "dare_linear_svd", "magnitude_prune", "magnitude_prune_svd")
SAME_RANK_TYPES = ("linear", "ties", "dare_ties", "dare_linear", "magnitude_prune")
SVD_TYPES = tuple(t for t in COMBINATION_TYPES if t.endswith("svd"))
DENSITY_TYPES = tuple(t for t in COMBINATION_TYPES if t.startswith(("ties", "dare", "magnitude_prune")))
SIGN_TYPES = tuple(t for t in COMBINATION_TYPES if "ties" in t)
SIGN_METHODS = ("total", "frequency")


# ----------------------------------------------------------------------------------------------------------
# The merge functions (PEFT's merge_utils), on lists of float32 numpy arrays of one shape


def _stack(tensors, weights):
    t = np.stack([np.asarray(x, np.float32) for x in tensors])
    w = np.asarray(weights, np.float32).reshape((-1,) + (1,) * (t.ndim - 1))
    return t, w


def prune_magnitude(x, density: float) -> np.ndarray:
    """``x`` with all but its ``int(density * x.size)`` largest-magnitude entries set to zero (none with
    ``density >= 1``)."""
    x = np.asarray(x, np.float32)
    if density >= 1:
        return x
    k = int(density * x.size)
    keep = np.zeros(x.size, np.float32)
    keep[np.argsort(-np.abs(x).reshape(-1), kind="stable")[:k]] = 1.0
    return x * keep.reshape(x.shape)


def prune_random(x, density: float, mask) -> np.ndarray:
    """DARE's drop-and-rescale: ``x * mask / density`` (``mask``: 0/1 entries, kept with probability
    ``density``); ``x`` itself with ``density >= 1``."""
    x = np.asarray(x, np.float32)
    if density >= 1:
        return x
    return x * np.asarray(mask, np.float32) / np.float32(density)


def majority_sign_mask(stacked, method: str = "total") -> np.ndarray:
    """Per entry, whether each tensor's sign (``stacked``: ``[n, ...]``) is the elected one: the sign of the sum
    (``"total"``) or of the sign count (``"frequency"``), + on ties."""
    sign = np.sign(stacked)
    votes = stacked.sum(axis=0) if method == "total" else sign.sum(axis=0)
    return sign == np.where(votes >= 0, 1.0, -1.0).astype(np.float32)


def disjoint_merge(weighted, mask) -> np.ndarray:
    """The mean over the tensors of the entries that ``mask`` keeps (a zero where it keeps none)."""
    return (weighted * mask).sum(axis=0) / np.maximum(mask.sum(axis=0), 1.0).astype(np.float32)


def task_arithmetic(tensors, weights) -> np.ndarray:
    """``sum_i w_i t_i``."""
    t, w = _stack(tensors, weights)
    return (t * w).sum(axis=0)


def magnitude_prune(tensors, weights, density: float) -> np.ndarray:
    """Task arithmetic over the magnitude-pruned tensors."""
    return task_arithmetic([prune_magnitude(x, density) for x in tensors], weights)


def ties(tensors, weights, density: float, majority_sign_method: str = "total") -> np.ndarray:
    """TIES: magnitude pruning, sign election on the pruned tensors, disjoint mean of the weighted ones."""
    t, w = _stack([prune_magnitude(x, density) for x in tensors], weights)
    return disjoint_merge(t * w, majority_sign_mask(t, majority_sign_method))


def dare_linear(tensors, weights, density: float, masks) -> np.ndarray:
    """DARE: drop-and-rescale each tensor with its 0/1 mask (``masks[i]``), then task arithmetic."""
    return task_arithmetic([prune_random(x, density, m) for x, m in zip(tensors, masks)], weights)


def dare_ties(tensors, weights, density: float, masks, majority_sign_method: str = "total") -> np.ndarray:
    """DARE's drop-and-rescale, then TIES' sign election and disjoint mean."""
    t, w = _stack([prune_random(x, density, m) for x, m in zip(tensors, masks)], weights)
    return disjoint_merge(t * w, majority_sign_mask(t, majority_sign_method))


def _merge(kind: str, tensors, weights, density, sign_method, masks: Callable[[int, tuple], np.ndarray]):
    kind = kind[: -len("_svd")] if kind.endswith("_svd") else kind
    if kind in ("svd", "linear"):
        return task_arithmetic(tensors, weights)
    if kind == "magnitude_prune":
        return magnitude_prune(tensors, weights, density)
    if kind == "ties":
        return ties(tensors, weights, density, sign_method)
    drawn = [masks(i, np.shape(x)) if density < 1 else None for i, x in enumerate(tensors)]
    if kind == "dare_linear":
        return dare_linear(tensors, weights, density, drawn)
    return dare_ties(tensors, weights, density, drawn, sign_method)


# ----------------------------------------------------------------------------------------------------------
# Reading the inputs


def _fail(msg: str):
    raise ValueError(f"combine_adapters: {msg}")


def _read(i: int, tree):
    """({module: LoRA}, {leaf name: saved node}) of adapters[i]; refuses any other method's node."""
    loras, saved = {}, {}
    for path, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_node)[0]:
        if not is_node(x):
            continue
        where = T.path_str(path)
        if isinstance(x, (S.Saved, S.SavedKernel)):
            saved[where] = x
        elif type(x) is LoRA and where.endswith(".kernel"):
            if strip_kernel(x.base) is not x.base:
                _fail(f"adapters[{i}] stacks two adapters on {where} (a LoRA around a "
                      f"{type(x.base).__name__}); pass one plain LoRA adapter per tree")
            loras[where[: -len(".kernel")]] = x
        elif isinstance(x, KernelWrapper) and not isinstance(x, Hook) and strip_kernel(x) is x:
            continue  # a quantized base kernel: part of the base
        else:
            _fail(f"adapters[{i}] holds a {type(x).__name__} node (method {getattr(x, 'method', '?')!r}) at "
                  f"{where}; only plain LoRA adapters (with modules_to_save) can be combined, as in PEFT's "
                  f"add_weighted_adapter")
    if not loras:
        _fail(f"adapters[{i}] holds no LoRA kernel (expected a tree from jlora.load_adapter or jlora.lora.init)")
    return loras, saved


def _same(x, y) -> bool:
    if x is y:
        return True
    la, ta = jax.tree_util.tree_flatten(x)
    lb, tb = jax.tree_util.tree_flatten(y)
    if ta != tb:
        return False
    for p, q in zip(la, lb):
        if p is q:
            continue
        p, q = np.asarray(p), np.asarray(q)
        if p.shape != q.shape or p.dtype != q.dtype or not np.array_equal(p, q):
            return False
    return True


def _common_base(adapters, saved: List[dict]):
    """The base tree (plain leaves; quantized kernels stay) all adapters share; modules a tree saves
    (modules_to_save) hold trained values there, so their base values come from another adapter."""
    stripped = [B.strip(t) for t in adapters]
    leaves = [T.named_leaves(s) for s in stripped]
    ref = jax.tree_util.tree_structure(stripped[0], is_leaf=is_node)
    for i in range(1, len(adapters)):
        if jax.tree_util.tree_structure(stripped[i], is_leaf=is_node) != ref:
            _fail(f"adapters[{i}] is on a different base than adapters[0] (its parameter tree has another "
                  f"structure: another architecture or size); all adapters must be loaded onto one base")
    base = {}
    for name in leaves[0]:
        values = [lv[name] for lv, sv in zip(leaves, saved) if name not in sv]
        if not values:
            _fail(f"{name} is saved whole (modules_to_save) by the only adapter, so its base value is unknown "
                  f"(PEFT's combined adapter saves the base's copy); combine at least two adapters, or drop "
                  f"modules_to_save")
        for v in values[1:]:
            if not _same(values[0], v):
                _fail(f"the adapters are on different bases: {name} differs between them (load every adapter "
                      f"onto one base tree)")
        base[name] = values[0]
    return stripped[0], base


# ----------------------------------------------------------------------------------------------------------
# The combination


def _check_options(n, weights, combination_type, svd_rank, svd_clamp, density, majority_sign_method, key,
                   dare_mask):
    if combination_type not in COMBINATION_TYPES:
        _fail(f"combination_type must be one of {list(COMBINATION_TYPES)}, got {combination_type!r}")
    if n == 0:
        _fail("adapters is empty: expected a list of one or more jlora LoRA trees")
    if len(weights) != n:
        _fail(f"weights must have one entry per adapter: expected {n}, got {len(weights)}")
    for i, w in enumerate(weights):
        try:
            ok = not isinstance(w, (bool, str)) and math.isfinite(float(w))
        except (TypeError, ValueError):
            ok = False
        if not ok:
            _fail(f"weights[{i}] must be a finite number, got {w!r}")
    svd = combination_type in SVD_TYPES
    if svd_rank is not None and (not svd or isinstance(svd_rank, bool) or not isinstance(svd_rank, int)
                                 or svd_rank <= 0):
        _fail(f"svd_rank must be a positive integer and applies to {list(SVD_TYPES)} only; got "
              f"{svd_rank!r} with combination_type={combination_type!r}")
    if svd_clamp is not None and (not svd or isinstance(svd_clamp, bool) or not isinstance(svd_clamp, (int, float))
                                  or not 0.0 <= float(svd_clamp) <= 1.0):
        _fail(f"svd_clamp must be a quantile in [0, 1] and applies to {list(SVD_TYPES)} only; got "
              f"{svd_clamp!r} with combination_type={combination_type!r}")
    if combination_type in DENSITY_TYPES:
        ok = isinstance(density, (int, float)) and not isinstance(density, bool)
        low_ok = ok and (density > 0.0 if combination_type.startswith("dare") else density >= 0.0)
        if not (low_ok and density <= 1.0):
            rng = "(0, 1]" if combination_type.startswith("dare") else "[0, 1]"
            _fail(f"combination_type={combination_type!r} needs density in {rng} (the fraction of entries kept), "
                  f"got {density!r}")
    elif density is not None:
        _fail(f"density applies to {list(DENSITY_TYPES)} only, got density={density!r} with "
              f"combination_type={combination_type!r}")
    if majority_sign_method not in SIGN_METHODS:
        _fail(f"majority_sign_method must be one of {list(SIGN_METHODS)}, got {majority_sign_method!r}")
    if combination_type.startswith("dare") and density is not None and density < 1 and n > 1:
        if key is None and dare_mask is None:
            _fail(f"combination_type={combination_type!r} draws random masks: pass key=jax.random.key(...) (or "
                  f"dare_mask)")
    if dare_mask is not None and not callable(dare_mask):
        _fail(f"dare_mask must be a callable (module, factor, index, shape) -> 0/1 array, got {dare_mask!r}")


def combine_adapters(adapters: Sequence, weights: Sequence[float], combination_type: str = "svd", *,
                     svd_rank: Optional[int] = None, svd_clamp: Optional[float] = None,
                     svd_full_matrices: bool = True, density: Optional[float] = None,
                     majority_sign_method: str = "total", key: Optional[jax.Array] = None,
                     dare_mask: Optional[Callable] = None):
    """A new LoRA adapter from a weighted combination of LoRA adapters, as PEFT's ``add_weighted_adapter``.

    Args:
      adapters: jlora parameter trees with plain LoRA kernels (and optionally ``modules_to_save``), all on the
        same base (e.g. ``[jlora.load_adapter(cfg, base, d) for d in dirs]`` or `jlora.lora.init` results; GPT-2
        fused-qkv slices are expanded to full columns). DoRA, IA3 or other methods' nodes are refused.
      weights: one number per adapter (negative values subtract).
      combination_type: one of `COMBINATION_TYPES` (see the module docstring).
      svd_rank: rank of the result for the ``*svd`` types (default: the largest input rank).
      svd_clamp: for the ``*svd`` types, clamp both factors to ``±`` this quantile of their entries.
      svd_full_matrices: passed to the SVD (as PEFT; ``False`` needs far less memory for large matrices).
      density: fraction of entries kept, for the ``ties``, ``dare`` and ``magnitude_prune`` types.
      majority_sign_method: ``"total"`` or ``"frequency"``, for the ``ties`` types.
      key: PRNG key for the DARE masks.
      dare_mask: optional ``(module, factor, index, shape) -> 0/1 array`` that replaces the random DARE draw
        (``factor``: ``"lora_A"``, ``"lora_B"`` or ``"delta"``; ``index``: the position among the adapters that
        have the module; ``shape``: PEFT's orientation), e.g. to reproduce another implementation's masks.

    Returns:
      the base tree with a `LoRA` kernel (scale 1.0) on every module that any input adapts; ``modules_to_save``
      of the first adapter hold the base values (PEFT's rule). `jlora.save_adapter` writes it as PEFT LoRA.

    Raises:
      ValueError naming the option, for an unknown type, a weights length mismatch, unequal ranks for the types
      that need equal ones, a missing or out-of-range density, a non-LoRA node, adapters on different bases, or a
      module saved by more than one adapter.

    Example:
      >>> a = jlora.lora.init(jax.random.key(1), cfg, params, jlora.LoraConfig(r=4, alpha=8, init=False))
      >>> b = jlora.lora.init(jax.random.key(2), cfg, params,
      ...                     jlora.LoraConfig(r=2, alpha=4, init=False, target_modules=["q_proj", "up_proj"]))
      >>> c = combine_adapters([a, b], [0.7, 0.3], "cat")  # exact: the weighted sum of the deltas
      >>> q = "model.layers.0.self_attn.q_proj"
      >>> cq = jlora.lora.adapters(c)[q]
      >>> cq.rank, cq.scale, len(jlora.lora.adapters(c))  # q, v (a) and q, up (b) in both layers
      (6, 1.0, 6)
      >>> want = 0.7 * jlora.lora.adapters(a)[q].delta() + 0.3 * jlora.lora.adapters(b)[q].delta()
      >>> bool(jnp.allclose(cq.delta(), want, atol=1e-6))
      True
      >>> jlora.lora.adapters(combine_adapters([a, b], [1.0, 1.0], "svd", svd_rank=3))[q].rank
      3
    """
    adapters, weights = list(adapters), list(weights)
    _check_options(len(adapters), weights, combination_type, svd_rank, svd_clamp, density, majority_sign_method,
                   key, dare_mask)
    read = [_read(i, t) for i, t in enumerate(adapters)]
    loras = [r[0] for r in read]
    saved = [r[1] for r in read]
    for name in set().union(*saved):
        owners = [i for i, s in enumerate(saved) if name in s]
        if len(owners) > 1:
            _fail(f"adapters {owners} all save {name.rsplit('.', 1)[0]} whole (modules_to_save); PEFT cannot "
                  f"combine adapters that save the same module")
    for i, lo in enumerate(loras):
        for m in lo:
            if f"{m}.kernel" in saved[0]:
                _fail(f"{m} has LoRA in adapters[{i}] but is saved whole (modules_to_save) by adapters[0]")
    base_tree, base_leaves = _common_base(adapters, saved)

    kind = "linear" if len(adapters) == 1 else combination_type  # PEFT's rule
    ranks = [max(n.rank for n in lo.values()) for lo in loras]
    if kind in SAME_RANK_TYPES and len(set(ranks)) != 1:
        _fail(f"combination_type={kind!r} needs adapters of equal rank (A and B are merged separately), got "
              f"ranks {ranks}; use 'cat' or an svd type")
    if kind == "cat":
        new_rank = sum(ranks)  # zero-padded where an adapter lacks the module or has a lower rank there
    elif kind in SVD_TYPES:
        new_rank = svd_rank or max(ranks)
    else:
        new_rank = ranks[0]
    modules = sorted(set().union(*loras), key=T.natural_key)
    dropout = float(next(iter(loras[0].values())).dropout)
    new = {}
    for mi, m in enumerate(modules):
        present = [(w, lo[m]) for w, lo in zip(weights, loras) if m in lo]
        terms = [n.row_terms() for _, n in present]
        a_list = [np.asarray(jax.device_get(t["a"]), np.float32).T for t in terms]  # PEFT's A [r, in]
        b_list = [np.asarray(jax.device_get(t["b"]), np.float32).T for t in terms]  # PEFT's B [out, r]
        scales = [float(n.scale) for _, n in present]
        ws = [float(w) for w, _ in present]
        d_out, d_in = b_list[0].shape[0], a_list[0].shape[1]

        def masks(factor, mi=mi, m=m):
            def draw(index, shape):
                if dare_mask is not None:
                    return np.asarray(dare_mask(m, factor, index, tuple(shape)), np.float32)
                k = jax.random.fold_in(key, mi)
                k = jax.random.fold_in(jax.random.fold_in(k, ("lora_A", "lora_B", "delta").index(factor)), index)
                return np.asarray(jax.random.bernoulli(k, density, tuple(shape)), np.float32)
            return draw

        if kind == "cat":
            A = np.zeros((new_rank, d_in), np.float32)
            Bm = np.zeros((d_out, new_rank), np.float32)
            at = 0
            for a, b, w, s in zip(a_list, b_list, ws, scales):
                r = a.shape[0]
                A[at:at + r] = a * np.float32(w) * np.float32(s)
                Bm[:, at:at + r] = b
                at += r
        elif kind in SVD_TYPES:
            if new_rank > min(d_in, d_out):
                _fail(f"svd_rank {new_rank} exceeds the dimensions of {m} ({d_out} x {d_in})")
            deltas = [(b @ a) * np.float32(s) for a, b, s in zip(a_list, b_list, scales)]
            delta = _merge(kind, deltas, ws, density, majority_sign_method, masks("delta"))
            U, Sv, Vh = np.linalg.svd(delta, full_matrices=bool(svd_full_matrices))
            Bm = U[:, :new_rank] @ np.diag(Sv[:new_rank])
            A = Vh[:new_rank, :]
            if svd_clamp is not None:
                hi = np.quantile(np.concatenate([Bm.reshape(-1), A.reshape(-1)]), float(svd_clamp))
                Bm, A = np.clip(Bm, -hi, hi), np.clip(A, -hi, hi)
        else:
            if len({a.shape[0] for a in a_list}) != 1:
                _fail(f"combination_type={kind!r} needs equal ranks in every module, but {m} has ranks "
                      f"{[a.shape[0] for a in a_list]}")
            ws_scaled = [w * s for w, s in zip(ws, scales)]
            wa = [math.sqrt(abs(x)) * (1 if x >= 0 else -1) for x in ws_scaled]
            wb = [math.sqrt(abs(x)) for x in ws_scaled]
            A = _merge(kind, a_list, wa, density, majority_sign_method, masks("lora_A"))
            Bm = _merge(kind, b_list, wb, density, majority_sign_method, masks("lora_B"))
        dt = jnp.result_type(*[n.a.dtype for _, n in present])
        new[m] = LoRA(base=T.get_module(base_tree, m)["kernel"], a=jnp.asarray(np.ascontiguousarray(A.T), dt),
                      b=jnp.asarray(np.ascontiguousarray(Bm.T), dt), scale=1.0, dropout=dropout)
    out = T.replace_modules(base_tree, new)
    restore = {}  # the first adapter's modules_to_save, with the base's values (base_tree holds its trained ones)
    for name in saved[0]:
        v = base_leaves[name]
        restore[name] = S.wrap(name, jnp.asarray(v, jnp.float32), str(jnp.dtype(v.dtype)))
    return S.replace_leaves(out, restore) if restore else out
