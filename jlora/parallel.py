"""Scale-out with JAX's own distribution: a named device mesh, sharding rules, sharded and pmapped steps.

The recommended path is ``jit`` with shardings over a `jax.sharding.Mesh` whose axes are

* ``data``: data parallelism, parameters replicated;
* ``fsdp``: fully-sharded data parallelism: the batch *and* every parameter and optimizer-state leaf are split
  over it (XLA gathers a weight where it is used), so parameter + optimizer memory per device falls as 1/fsdp;
* ``tensor``: Megatron-style tensor parallelism: attention and MLP input projections (``c_attn``, ``q/k/v``,
  ``c_fc``, ``gate/up``) are split by output column, output projections (``c_proj``, ``o``, ``down``) by input
  row, embeddings by vocabulary row.

The batch is split over ``data`` x ``fsdp``. A LoRA factor follows its base matrix: ``a [in, r]`` takes the
base's input-dimension sharding and ``b [r, out]`` its output-dimension sharding, so no factor is resharded
per step. The sharding of every optimizer-state leaf is that of the parameter it belongs to (matched by tree
path), so Adam moments are co-sharded with their parameters.

Typical use (`jlora.loop.fit` does all of this when given ``mesh=``)::

    mesh = parallel.make_mesh("data=2,fsdp=4")
    state, shardings = parallel.init_sharded_state(params, tx, mesh)
    step = parallel.make_sharded_train_step(cfg, tx, labels, mesh, shardings)
    state, metrics = step(state, parallel.global_batch(batches.batch_at(0), mesh))

`make_pmap_train_step` is the classic `jax.pmap` data-parallel step (gradients summed with ``lax.psum`` over
the token-weighted loss, i.e. the token-weighted mean of the per-device gradients) for code built around
pmap; on current JAX, jit with shardings is the recommended path.

Embedding tables are split by row (vocabulary / position) where the axes divide the row count, because their
gradient is a scatter-add of batch-sharded cotangents, which then reduce-scatters. GPT-2's vocabulary (50257)
divides by nothing useful, so its table is split along ``d`` instead; XLA then replicates the ``[B, T, d]``
embedding cotangent once per step (it logs "Involuntary full rematerialization"): correct, and one activation
all-gather per step, but not free.

Multi-host: call `initialize_distributed` first in every process; each process loads its own slice of the
global batch (`jlora.data.Batches` with ``host_index=jax.process_index(), host_count=jax.process_count()``)
and `global_batch` assembles the global array; checkpoints are written by orbax from all hosts.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jlora import train
from jlora.config import ModelConfig
from jlora.kernels import KernelWrapper, LeafWrapper, is_node
from jlora.model import residual_sharding
from jlora.tree import path_parts

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Linear layers split by output column (their bias too) / by input row under tensor parallelism.
COLUMN_PARALLEL = ("c_attn", "q_proj", "k_proj", "v_proj", "c_fc", "gate_proj", "up_proj", "lm_head")
ROW_PARALLEL = ("c_proj", "o_proj", "down_proj")
VOCAB_EMBEDDINGS = ("wte", "embed_tokens")


# ----------------------------------------------------------------------------------------------------------
# Mesh


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


def make_mesh(spec: Union[str, Dict[str, int], None] = "data=-1", devices: Optional[Sequence] = None) -> Mesh:
    """A `Mesh` with axes ``("data", "fsdp", "tensor")`` over ``devices`` (default: all of `jax.devices`).

    Args:
      spec: e.g. ``"data=4,fsdp=2"``, ``"fsdp=-1"`` (all devices on one axis) or a dict; unnamed axes have
        size 1. The product of the sizes must equal the number of devices.
      devices: the devices to use (default: every device of every process).

    Raises:
      ValueError: the spec does not multiply out to the number of devices (naming both).

    Example:
      >>> mesh = make_mesh("data=2,fsdp=4")  # 8 devices
      >>> dict(mesh.shape)
      {'data': 2, 'fsdp': 4, 'tensor': 1}
    """
    sizes = parse_mesh_spec(spec)
    devs = list(jax.devices() if devices is None else devices)
    n = len(devs)
    known = math.prod(v for v in sizes.values() if v != -1)
    for name, v in sizes.items():
        if v == -1:
            if n % known:
                raise ValueError(f"mesh spec {spec!r}: the other axes use {known} devices, which does not divide "
                                 f"the {n} devices available, so {name!r}=-1 has no size")
            sizes[name] = n // known
    total = math.prod(sizes.values())
    if total != n:
        shown = ",".join(f"{a}={sizes[a]}" for a in AXES)
        raise ValueError(f"mesh spec {spec!r} ({shown}) needs {total} devices but {n} are available "
                         f"({devs[0].platform} x{n}); make the sizes multiply to {n} or use -1 for one axis")
    shape = tuple(sizes[a] for a in AXES)
    types = (jax.sharding.AxisType.Auto,) * len(AXES)
    try:
        return jax.make_mesh(shape, AXES, axis_types=types, devices=devs)
    except Exception:  # noqa: BLE001 - topology-aware placement is best effort; any order is correct
        return Mesh(np.asarray(devs, dtype=object).reshape(shape), AXES, axis_types=types)


def mesh_str(mesh: Mesh) -> str:
    """``"data=2,fsdp=4,tensor=1"``."""
    return ",".join(f"{a}={mesh.shape[a]}" for a in mesh.axis_names)


def data_parallel_size(mesh: Mesh) -> int:
    """How many ways the batch is split: ``data`` x ``fsdp``."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES if a in mesh.shape)


# ----------------------------------------------------------------------------------------------------------
# Sharding rules


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


def state_shardings(state: train.TrainState, mesh: Mesh) -> train.TrainState:
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
    return train.TrainState(step=replicated, params=p_shard, opt_state=o_shard, rng=replicated)


def _put(x, sharding):
    if jax.process_count() == 1 or (isinstance(x, jax.Array) and not x.is_fully_addressable):
        return jax.device_put(x, sharding)
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):  # typed PRNG keys (always replicated here): via their data
        data = _put(jax.random.key_data(x), NamedSharding(sharding.mesh, P()))
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    host = np.asarray(x)  # multi-host: every process holds the same full value; each takes its shards
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def shard_params(params, mesh: Mesh):
    """Places ``params`` (host or device arrays; every process passing the same values) on ``mesh``."""
    return jax.tree_util.tree_map(_put, params, param_shardings(params, mesh))


def init_sharded_state(params, tx, mesh: Mesh, seed: Union[int, jax.Array] = 0):
    """A fresh `TrainState` laid out on ``mesh``: params placed by the rules, optimizer state created directly
    in its sharding (never whole on one device).

    Returns:
      ``(state, shardings)``: the state and its `state_shardings` (for `make_sharded_train_step`).
    """
    params = shard_params(params, mesh)
    abstract = jax.eval_shape(lambda p: train.init_state(p, tx, seed), params)
    shardings = state_shardings(abstract, mesh)
    state = jax.jit(lambda p: train.init_state(p, tx, seed), out_shardings=shardings)(params)
    return state, shardings


def shard_state(state: train.TrainState, mesh: Mesh):
    """An existing `TrainState` moved onto ``mesh`` (e.g. one restored on a single device)."""
    shardings = state_shardings(state, mesh)
    return jax.tree_util.tree_map(_put, state, shardings), shardings


def per_device_bytes(tree, device=None) -> int:
    """Bytes of ``tree``'s arrays that live on ``device`` (default: the first addressable device)."""
    device = device or jax.local_devices()[0]
    total = 0
    for x in jax.tree_util.tree_leaves(tree):
        if isinstance(x, jax.Array):
            total += sum(s.data.nbytes for s in x.addressable_shards if s.device == device)
    return total


# ----------------------------------------------------------------------------------------------------------
# Batches


def _batch_axes(mesh: Mesh):
    """The mesh axes the batch rows are split over (those of ``data``/``fsdp`` larger than 1), or None."""
    return tuple(a for a in BATCH_AXES if mesh.shape.get(a, 1) > 1) or None


def batch_sharding(mesh: Mesh, accum_steps: int = 1) -> NamedSharding:
    """The batch's sharding: rows over ``data`` x ``fsdp`` (after the ``[accum_steps]`` axis if any)."""
    axes = _batch_axes(mesh)
    return NamedSharding(mesh, P(None, axes) if accum_steps > 1 else P(axes))


def global_batch(local_batch: Dict[str, Any], mesh: Mesh, accum_steps: int = 1) -> Dict[str, jax.Array]:
    """Assembles this process's slice of a batch (``[B_local, T]`` or ``[accum, B_local, T]``) into global
    arrays split over the mesh's batch axes. With one process the slice is the whole batch.

    Raises:
      ValueError: the global batch size is not divisible by ``data`` x ``fsdp``.
    """
    sharding = batch_sharding(mesh, accum_steps)
    dp = data_parallel_size(mesh)
    out = {}
    for name, x in local_batch.items():
        x = np.asarray(x)
        axis = 1 if accum_steps > 1 else 0
        if x.ndim <= axis:
            raise ValueError(f"global_batch: batch[{name!r}] has shape {x.shape}; expected a batch axis at "
                             f"position {axis} (accum_steps={accum_steps})")
        rows = x.shape[axis] * jax.process_count()
        if rows % dp:
            raise ValueError(f"batch size {rows} (batch[{name!r}] {x.shape}, {jax.process_count()} process(es)) is "
                             f"not divisible by the data-parallel size {dp} of mesh {mesh_str(mesh)} "
                             f"(data x fsdp); use a batch size that is a multiple of {dp}")
        out[name] = jax.make_array_from_process_local_data(sharding, x)
    return out


# ----------------------------------------------------------------------------------------------------------
# Steps


def residual_spec(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(_batch_axes(mesh), None, None))


def _with_residual_sharding(fn: Callable, mesh: Mesh) -> Callable:
    """``fn`` traced with the residual stream pinned to the batch sharding of ``mesh``."""
    residual = residual_spec(mesh)

    def wrapped(*args):
        with residual_sharding(residual):
            return fn(*args)

    return wrapped


def make_sharded_train_step(cfg: ModelConfig, tx, labels, mesh: Mesh, shardings: train.TrainState, *,
                            accum_steps: int = 1, **step_kwargs) -> Callable:
    """The train step (`jlora.train.make_train_step`) jitted over ``mesh``: state in and out with
    ``shardings`` and donated, batch split over ``data`` x ``fsdp``, metrics replicated.

    Args:
      cfg, tx, labels: as for `jlora.train.make_train_step`.
      mesh: the device mesh.
      shardings: the state's shardings (from `init_sharded_state` / `state_shardings`).
      accum_steps: gradient accumulation (batch arrays get a leading axis).
      **step_kwargs: ``max_grad_norm``, ``label_smoothing``.

    Returns:
      ``step(state, batch) -> (state, metrics)``; feed it batches from `global_batch`.
    """
    step = _with_residual_sharding(
        train.make_train_step(cfg, tx, labels, accum_steps=accum_steps, **step_kwargs), mesh)
    replicated = NamedSharding(mesh, P())
    return jax.jit(step, in_shardings=(shardings, batch_sharding(mesh, accum_steps)),
                   out_shardings=(shardings, replicated), donate_argnums=0)


def make_sharded_eval_step(cfg: ModelConfig, mesh: Mesh, param_shardings_tree) -> Callable:
    """``eval_step(params, batch) -> {"loss_sum", "tokens"}`` jitted over ``mesh`` (batch from `global_batch`)."""
    step = _with_residual_sharding(train.make_eval_step(cfg), mesh)
    return jax.jit(step, in_shardings=(param_shardings_tree, batch_sharding(mesh)),
                   out_shardings=NamedSharding(mesh, P()))


# -- pmap ------------------------------------------------------------------------------------------------------


def make_pmap_train_step(cfg: ModelConfig, tx, labels, *, axis_name: str = "batch", devices=None,
                         accum_steps: int = 1, **step_kwargs) -> Callable:
    """The data-parallel train step under `jax.pmap`.

    The state is replicated (`replicate`), the batch split per device (`split_batch`); token counts, loss and
    gradients are summed across devices with ``lax.psum`` so every device applies the same update, equal to
    the single-device update on the whole batch. Dropout keys differ per device.

    Returns:
      ``step(replicated_state, split_batch) -> (replicated_state, replicated_metrics)`` (state donated).
    """
    inner = train.make_train_step(cfg, tx, labels, accum_steps=accum_steps, axis_name=axis_name, **step_kwargs)
    return jax.pmap(inner, axis_name=axis_name, devices=devices, donate_argnums=0)


def replicate(tree, devices=None):
    """``tree`` with a leading device axis, one copy per device (for a pmapped step)."""
    devices = list(devices or jax.local_devices())
    sharding = NamedSharding(Mesh(np.asarray(devices, dtype=object), ("replica",)), P("replica"))
    n = len(devices)
    return jax.tree_util.tree_map(lambda x: jax.device_put(jnp.broadcast_to(x[None], (n,) + x.shape), sharding),
                                  tree)


def unreplicate(tree):
    """The first device's copy of a replicated tree."""
    return jax.tree_util.tree_map(lambda x: x[0], tree)


def split_batch(batch: Dict[str, Any], n: Optional[int] = None, accum_steps: int = 1) -> Dict[str, np.ndarray]:
    """``[B, ...]`` (or ``[accum, B, ...]``) -> ``[n, B/n, ...]`` (``[n, accum, B/n, ...]``) for `jax.pmap`.

    Raises:
      ValueError: ``B`` is not divisible by ``n`` (default: the local device count).
    """
    n = n or jax.local_device_count()
    out = {}
    for name, x in batch.items():
        x = np.asarray(x)
        axis = 1 if accum_steps > 1 else 0
        b = x.shape[axis]
        if b % n:
            raise ValueError(f"split_batch: batch size {b} (batch[{name!r}] {x.shape}) is not divisible by the "
                             f"{n} devices of the pmap; use a multiple of {n}")
        if accum_steps > 1:
            x = x.reshape((x.shape[0], n, b // n) + x.shape[2:]).swapaxes(0, 1)
        else:
            x = x.reshape((n, b // n) + x.shape[1:])
        out[name] = x
    return out


# ----------------------------------------------------------------------------------------------------------
# Multi-host


def initialize_distributed(**kwargs) -> None:
    """`jax.distributed.initialize` for multi-process runs (TPU pod slices, multi-node GPU, SLURM); call it
    first thing in every process. On a TPU VM and under SLURM/Open MPI the coordinator, process count and
    process id are detected; elsewhere pass ``coordinator_address=``, ``num_processes=``, ``process_id=``
    (or set ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``). Calling it twice is a
    no-op."""
    try:
        jax.distributed.initialize(**kwargs)
    except RuntimeError as e:
        if "already" not in str(e).lower():
            raise


def to_host(tree):
    """Every array of ``tree`` as a full numpy array on every process (a collective: call it on all processes).

    Single process: `jax.device_get`. Multi-process: arrays spanning other hosts are all-gathered first
    (`jax.experimental.multihost_utils.process_allgather`), e.g. before process 0 exports a model.
    Kernel wrappers keep their structure.
    """
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree_util.tree_map(one, tree)


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
