"""Scale-out with JAX's own distribution: a named device mesh, sharding rules, sharded and pmapped steps.

Two layers: `jlora.parallel.rules` (pure: which axes split which dimension of each parameter, optimizer-state
leaf and batch) and `jlora.parallel.runtime` (meshes, placement, global batches, the jitted/pmapped steps,
multi-host); every name of both is importable from ``jlora.parallel``.

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

from jlora.parallel.rules import (
    AXES,
    BATCH_AXES,
    COLUMN_PARALLEL,
    ROW_PARALLEL,
    VOCAB_EMBEDDINGS,
    batch_sharding,
    data_parallel_size,
    describe,
    mesh_str,
    param_shardings,
    param_specs,
    parse_mesh_spec,
    residual_spec,
    state_shardings,
)
from jlora.parallel.runtime import (
    global_batch,
    init_sharded_state,
    initialize_distributed,
    make_mesh,
    make_pmap_train_step,
    make_sharded_eval_step,
    make_sharded_train_step,
    per_device_bytes,
    replicate,
    shard_params,
    shard_state,
    split_batch,
    to_host,
    unreplicate,
)

__all__ = [
    "AXES",
    "BATCH_AXES",
    "COLUMN_PARALLEL",
    "ROW_PARALLEL",
    "VOCAB_EMBEDDINGS",
    "parse_mesh_spec",
    "mesh_str",
    "data_parallel_size",
    "param_specs",
    "param_shardings",
    "state_shardings",
    "describe",
    "batch_sharding",
    "residual_spec",
    "make_mesh",
    "shard_params",
    "init_sharded_state",
    "shard_state",
    "per_device_bytes",
    "global_batch",
    "make_sharded_train_step",
    "make_sharded_eval_step",
    "make_pmap_train_step",
    "replicate",
    "unreplicate",
    "split_batch",
    "initialize_distributed",
    "to_host",
]
