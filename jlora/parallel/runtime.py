"""The runtime of scale-out: device meshes, placing trees on them, global batches, sharded and pmapped steps,
multi-host initialization and gathering. The sharding decisions themselves are `jlora.parallel.rules`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jlora import train
from jlora.config import ModelConfig
from jlora.model import residual_sharding
from jlora.parallel.rules import (
    AXES,
    batch_sharding,
    data_parallel_size,
    mesh_str,
    param_shardings,
    parse_mesh_spec,
    residual_spec,
    state_shardings,
)



# ----------------------------------------------------------------------------------------------------------
# Mesh


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


# ----------------------------------------------------------------------------------------------------------
# Placing trees


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
