"""Sharding rules: which mesh axes split which dimension of every parameter, optimizer-state leaf and batch.

Pure functions of shapes, tree paths and a mesh's axis sizes: nothing here places an array, builds a step or
talks to other processes (that is `jlora.parallel.runtime`). The rules themselves are described in
`jlora.parallel`'s docstring; a PEFT node (`jlora.kernels.Node`) declares its own specs relative to its base
matrix through ``shard(...)`` (see `_node_specs`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Dict, Optional, Sequence, Tuple, Union

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jlora.kernels import KernelWrapper, LeafWrapper, is_node
from jlora.tree import path_parts

if TYPE_CHECKING:
    from jlora.train import TrainState

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Linear layers split by output column (their bias too) / by input row under tensor parallelism.
COLUMN_PARALLEL = ("c_attn", "q_proj", "k_proj", "v_proj", "c_fc", "gate_proj", "up_proj", "lm_head")
ROW_PARALLEL = ("c_proj", "o_proj", "down_proj")
VOCAB_EMBEDDINGS = ("wte", "embed_tokens")


# ----------------------------------------------------------------------------------------------------------
# Mesh axes


def parse_mesh_spec(spec: Union[str, Dict[str, int], None]) -> Dict[str, int]:
    """``"data=4,fsdp=2"`` (or a dict) -> ``{"data": 4, "fsdp": 2, "tensor": 1}``; one axis may be ``-1``.

    Raises:
      ValueError: an unknown axis, a repeated axis, a size that is not a positive integer (or -1), or more
        than one ``-1``.
    """
    if spec is None or spec == "":
        items: Dict[str, Any] = {"data": -1}
    elif isinstance(spec, dict):
        items = dict(spec)
    elif isinstance(spec, str):
        items = {}
        for part in spec.split(","):
            part = part.strip()
            if not part:
                continue
            if "=" not in part:
                raise ValueError(f"mesh spec {spec!r}: {part!r} is not of the form axis=size "
                                 f"(axes: {', '.join(AXES)}; e.g. 'data=4,fsdp=2')")
            name, value = (x.strip() for x in part.split("=", 1))
            if name in items:
                raise ValueError(f"mesh spec {spec!r}: axis {name!r} is given twice")
            items[name] = value
    else:
        raise TypeError(f"mesh spec must be a string like 'data=4,fsdp=2' or a dict, got {type(spec).__name__}")
    sizes = {}
    for name, value in items.items():
        if name not in AXES:
            raise ValueError(f"mesh spec {spec!r}: unknown axis {name!r}; the axes are {', '.join(AXES)}")
        try:
            size = int(value)
        except (TypeError, ValueError):
            raise ValueError(f"mesh spec {spec!r}: the size of {name!r} must be an integer, got {value!r}") from None
        if size < 1 and size != -1:
            raise ValueError(f"mesh spec {spec!r}: the size of {name!r} must be >= 1 (or -1: the rest of the "
                             f"devices), got {size}")
        sizes[name] = size
    if sum(1 for v in sizes.values() if v == -1) > 1:
        raise ValueError(f"mesh spec {spec!r}: at most one axis may be -1")
    return {a: sizes.get(a, 1) for a in AXES}

def mesh_str(mesh: Mesh) -> str:
    """``"data=2,fsdp=4,tensor=1"``."""
    return ",".join(f"{a}={mesh.shape[a]}" for a in mesh.axis_names)

def data_parallel_size(mesh: Mesh) -> int:
    """How many ways the batch is split: ``data`` x ``fsdp``."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES if a in mesh.shape)


# ----------------------------------------------------------------------------------------------------------
# Parameters and optimizer state


def _size(mesh: Mesh, axes) -> int:
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in axes)

def _fits(mesh: Mesh, dim: int, axes) -> bool:
    return axes is not None and _size(mesh, axes) > 1 and dim % _size(mesh, axes) == 0

def _place(mesh: Mesh, shape: Tuple[int, ...], tensor_dim: Optional[int], fsdp_dims: Sequence[int]) -> Tuple:
    """Per-dimension axes: ``tensor`` on ``tensor_dim`` (if it divides), ``fsdp`` on the first of ``fsdp_dims``
    it divides (else combined with the tensor dimension when that divides, else nowhere)."""
    spec: list = [None] * len(shape)
    if tensor_dim is not None and _fits(mesh, shape[tensor_dim], "tensor"):
        spec[tensor_dim] = "tensor"
    if mesh.shape.get("fsdp", 1) > 1:
        for d in fsdp_dims:
            if spec[d] is None and _fits(mesh, shape[d], "fsdp"):
                spec[d] = "fsdp"
                break
        else:
            for d in range(len(shape)):
                if spec[d] == "tensor" and _fits(mesh, shape[d], ("tensor", "fsdp")):
                    spec[d] = ("tensor", "fsdp")
                    break
    return tuple(spec)

def _as_tuple(axes) -> tuple:
    return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)

def _largest_first(shape) -> list:
    return sorted(range(len(shape)), key=lambda d: -shape[d])

def _module_role(parts: Tuple[str, ...]) -> Optional[str]:
    names = set(parts)
    if names & set(VOCAB_EMBEDDINGS) and parts[-1] == "embedding":
        return "vocab"
    if parts[-1] == "embedding":  # position embeddings
        return "embed"
    module = parts[-2] if len(parts) >= 2 else ""
    if module in COLUMN_PARALLEL:
        return "column"
    if module in ROW_PARALLEL:
        return "row"
    return None

def _kernel_dims(mesh: Mesh, role: Optional[str], shape) -> Tuple:
    """The spec of a (materialized) kernel / embedding / vector by its module role."""
    shape = tuple(shape)
    if len(shape) == 2 and role == "column":  # [in, out]
        return _place(mesh, shape, 1, (0, 1))
    if len(shape) == 2 and role == "row":
        return _place(mesh, shape, 0, (1, 0))
    if len(shape) == 2 and role in ("vocab", "embed"):  # [rows, d]: split rows (tensor, fsdp), else d over fsdp
        # Rows, because the embedding gradient is a scatter-add of batch-sharded cotangents: with the table
        # split by row it reduce-scatters; split along d, XLA has to replicate the cotangent first.
        spec = _place(mesh, shape, 0 if role == "vocab" else None, (0,))
        if mesh.shape.get("fsdp", 1) > 1 and not any("fsdp" in _as_tuple(a) for a in spec):
            spec = (spec[0], "fsdp" if _fits(mesh, shape[1], "fsdp") else None)
        return spec
    if len(shape) == 1 and role == "column":  # a column-parallel layer's bias follows its output columns
        return _place(mesh, shape, 0, (0,))
    return _place(mesh, shape, None, _largest_first(shape))

def _leaf_spec(mesh: Mesh, parts: Tuple[str, ...], shape) -> Tuple:
    if len(shape) == 0:
        return ()
    return _kernel_dims(mesh, _module_role(parts), shape)

def _node_specs(mesh: Mesh, parts: Tuple[str, ...], node) -> Any:
    """Specs for every array inside a PEFT node, as the node declares them relative to its base matrix (a LoRA
    factor follows its base: ``a [in, r]`` the input sharding, ``b [r, out]`` the output sharding)."""

    def fits(size, axes):
        return axes if axes is not None and size % _size(mesh, axes) == 0 else None

    if isinstance(node, KernelWrapper):
        kin, kout = _kernel_dims(mesh, _module_role(parts), node.shape)
        return node.shard(kin, kout, fits)
    if isinstance(node, LeafWrapper):
        return node.shard(_leaf_spec(mesh, parts, tuple(node.shape)), fits)
    return node.shard(fits)

def param_specs(params, mesh: Mesh):
    """The `PartitionSpec` tree of ``params`` under the rules above (wrappers keep their structure).

    Dimensions an axis does not divide stay unsplit along it (e.g. GQA ``k_proj`` with 2 heads on
    ``tensor=4``); the leaf is then replicated over that axis, which is always correct.
    """
    def spec(path, x):
        parts = path_parts(path)
        if is_node(x):
            return jax.tree_util.tree_map(lambda s: P(*s), _node_specs(mesh, parts, x),
                                          is_leaf=lambda s: isinstance(s, tuple))
        return P(*_leaf_spec(mesh, parts, tuple(x.shape)))

    return jax.tree_util.tree_map_with_path(spec, params, is_leaf=is_node)

def param_shardings(params, mesh: Mesh):
    """`NamedSharding` tree of ``params`` (arrays or `jax.ShapeDtypeStruct` leaves)."""
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), param_specs(params, mesh),
                                  is_leaf=lambda s: isinstance(s, P))

def _keystr(path) -> Tuple[str, ...]:
    return tuple(str(k) for k in path)

def state_shardings(state: TrainState, mesh: Mesh) -> TrainState:
    """Shardings of a whole `TrainState`: params by the rules, every optimizer-state leaf like the parameter
    whose tree path it ends with (Adam's ``mu``/``nu``), scalars (step, counts, PRNG key) replicated."""
    p_shard = param_shardings(state.params, mesh)
    by_path = {}
    for (path, leaf), (_, sh) in zip(jax.tree_util.tree_flatten_with_path(state.params)[0],
                                     jax.tree_util.tree_flatten_with_path(p_shard)[0]):
        by_path[_keystr(path)] = (tuple(leaf.shape), sh)
    replicated = NamedSharding(mesh, P())

    def opt(path, leaf):
        key = _keystr(path)
        for i in range(len(key)):
            hit = by_path.get(key[i:])
            if hit is not None and hit[0] == tuple(leaf.shape):
                return hit[1]
        return replicated

    o_shard = jax.tree_util.tree_map_with_path(opt, state.opt_state)
    return state.replace(step=replicated, params=p_shard, opt_state=o_shard, rng=replicated)

def describe(params, mesh: Mesh, max_rows: int = 0) -> str:
    """A table of each leaf's shape and partition spec (the first ``max_rows``; 0: all)."""
    specs = param_specs(params, mesh)
    rows = []
    for (path, x), (_, s) in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                                 jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda v: isinstance(v, P))[0]):
        rows.append(f"{'.'.join(path_parts(path)):60s} {str(tuple(x.shape)):>18s}  {s}")
    if max_rows:
        rows = rows[:max_rows]
    return "\n".join(rows)


# ----------------------------------------------------------------------------------------------------------
# Batches


def _batch_axes(mesh: Mesh):
    """The mesh axes the batch rows are split over (those of ``data``/``fsdp`` larger than 1), or None."""
    return tuple(a for a in BATCH_AXES if mesh.shape.get(a, 1) > 1) or None

def batch_sharding(mesh: Mesh, accum_steps: int = 1) -> NamedSharding:
    """The batch's sharding: rows over ``data`` x ``fsdp`` (after the ``[accum_steps]`` axis if any)."""
    axes = _batch_axes(mesh)
    return NamedSharding(mesh, P(None, axes) if accum_steps > 1 else P(axes))

def residual_spec(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(_batch_axes(mesh), None, None))
