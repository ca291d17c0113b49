"""Train-state checkpoints on orbax-checkpoint: periodic, atomic, retained, adapter-only for PEFT runs.

A run directory holds one step directory per checkpoint (``<run_dir>/<step>/``), written by orbax's
`CheckpointManager` (to ``<step>.orbax-checkpoint-tmp-*`` first, renamed when complete, then marked with
``commit_success.txt``), plus ``run_config.json`` (see `check_run_config`). A step directory holds:

* ``params``: the *trainable* leaves only (split by the label tree). A LoRA run never re-saves the frozen base:
  its checkpoint is the adapter factors. Full fine-tuning labels everything trainable, so everything is saved.
* ``opt_state``: the optimizer state (frozen leaves hold optax ``MaskedNode``, which has no arrays).
* ``loop``: the step counter and the PRNG key data (``jax.random.key_data``; re-wrapped on restore).
* ``meta``: JSON: leaf names/shapes/dtypes/checksums of each item, the base reference (a caller-given string
  such as the HF dir, and a fingerprint of the frozen tree: names, shapes, dtypes and a bit-exact checksum of
  the values), the caller's ``extra`` (data position, ...) and metrics.

Decisions (why):

* Restore needs a ``like_state`` (e.g. a fresh `jlora.train.init_state`): it gives the tree structure, dtypes
  and shardings, and for adapter runs the frozen base, which is combined with the restored trainable leaves.
  A base whose fingerprint differs from the one saved is refused (`BaseMismatchError`): an adapter trained on
  one base is meaningless on another.
* Checksums (a wrapping uint32 sum of every leaf's bit pattern: exact, independent of sharding and reduction
  order) are stored at save and verified at restore, so a silently damaged file is detected, not trained on.
* A corrupt latest checkpoint (a file truncated or deleted, a checksum mismatch): ``restore()`` without a step
  warns and falls back to the previous good step, after moving the bad step directory to
  ``<run_dir>/corrupt/<step>`` (renamed, never deleted), so that it is no longer "latest", is not counted by
  the keep-last-K retention and does not block re-saving that step. With an explicit ``step=`` (or
  ``on_corrupt="raise"``) it raises `CorruptCheckpointError` naming the directory instead.
* Only steps whose directory is finalized (orbax lists it: not a ``*.orbax-checkpoint-tmp-*`` directory) *and*
  carries ``commit_success.txt`` count, so a half-written checkpoint is never picked up.
* Saving is asynchronous by default (orbax copies device arrays to host, then writes in a background thread);
  `Checkpointer.restore`, `latest_step` and `close` wait for pending writes. Every process calls `save` and
  `restore` (orbax coordinates multi-host writes); only file bookkeeping (run_config.json, moving a corrupt
  directory) is done by process 0.
* One run per directory: `lock_run_dir` (taken by `jlora.loop.fit` and `jlora.run.train_run`, not by
  `Checkpointer`, so that reading checkpoints of a running run stays possible) holds an ``flock`` on
  ``<run_dir>/jlora.lock``; the kernel drops it when its holder dies, so a lock is never stale for long.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import socket
import threading
import time
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from jlora import tree as T

log = logging.getLogger(__name__)

FORMAT = "jlora.checkpoint/1"
RUN_CONFIG = "run_config.json"
CORRUPT_DIR = "corrupt"
COMMIT_FILE = "commit_success.txt"  # orbax's commit marker (atomicity_types.COMMIT_SUCCESS_FILE)
ARRAY_ITEMS = ("params", "opt_state", "loop")


class BaseMismatchError(ValueError):
    """The frozen base of ``like_state`` is not the base the adapter checkpoint was trained on."""


class CorruptCheckpointError(RuntimeError):
    """A step directory exists and is committed but cannot be read back intact."""


# ----------------------------------------------------------------------------------------------------------
# Trees <-> named leaves


def _named(tree) -> Tuple[List[Tuple[str, ...]], List[Any], Any]:
    """(path tuples, leaves, treedef); ``None`` placeholders and ``MaskedNode`` have no leaves."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return [T.path_parts(p) for p, _ in flat], [x for _, x in flat], treedef


def _nest(paths, leaves) -> dict:
    """Nested string-keyed dicts (what orbax stores natively) from path tuples."""
    out: dict = {}
    for parts, x in zip(paths, leaves):
        if not parts:
            parts = ("_",)
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"checkpoint: leaf path {'.'.join(parts)} collides with another leaf")
        if parts[-1] in node:
            raise ValueError(f"checkpoint: two leaves map to the same name {'.'.join(parts)}")
        node[parts[-1]] = x
    return out


def _unnest(nested: dict, paths) -> list:
    out = []
    for parts in paths:
        node = nested
        for p in parts or ("_",):
            node = node[p]
        out.append(node)
    return out


def _spec(x):
    """Shape/dtype/sharding target for orbax's restore."""
    sharding = getattr(x, "sharding", None)
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.ShapeDtypeStruct(tuple(x.shape), x.dtype, sharding=sharding)


# Checksums: the sum, modulo 2**32, of every leaf's bit pattern read as unsigned words of its own width
# (8-byte dtypes as two 32-bit words; bool and sub-byte dtypes by value). Integer sums are exact and
# order-independent, so save and restore agree across shardings, devices and platforms.


def _word_dtype(dt):
    bits = jax.dtypes.itemsize_bits(dt)
    if dt == jnp.bool_ or bits < 8:
        return None  # by value
    return {8: jnp.uint8, 16: jnp.uint16, 32: jnp.uint32, 64: jnp.uint32}[bits]


@jax.jit
def _leaf_checksum(x):
    word = _word_dtype(jnp.dtype(x.dtype))
    u = x.astype(jnp.int32) if word is None else jax.lax.bitcast_convert_type(x, word)
    return jnp.sum(u.astype(jnp.uint32), dtype=jnp.uint32)


def _host_checksum(a: np.ndarray) -> int:
    word = _word_dtype(a.dtype)
    u = a.astype(np.int32).view(np.uint32) if word is None else a.view(np.dtype(word))
    return int(u.sum(dtype=np.uint32))


def _on_cpu(x) -> bool:
    if isinstance(x, np.ndarray):
        return True
    return (isinstance(x, jax.Array) and x.is_fully_addressable and
            all(d.platform == "cpu" for d in x.sharding.device_set))


def _checksums(leaves) -> List[int]:
    """Per-leaf checksums (see above) as Python ints.

    CPU-resident arrays are summed by numpy without a copy (XLA:CPU's integer reductions are ~15x slower than
    numpy's); accelerator arrays by a small jitted reduction per shape/dtype, fetched together.
    """
    out: List[Any] = []
    for x in leaves:
        out.append(_host_checksum(np.asarray(x)) if _on_cpu(x) else _leaf_checksum(x))
    pending = [i for i, c in enumerate(out) if not isinstance(c, int)]
    if pending:
        for i, c in zip(pending, jax.device_get([out[i] for i in pending])):
            out[i] = int(c)
    return out


def _describe(paths, leaves, checksums=None) -> dict:
    d = {"names": [".".join(p) for p in paths],
         "shapes": [list(map(int, x.shape)) for x in leaves],
         "dtypes": [str(jnp.dtype(x.dtype)) for x in leaves]}
    if checksums is not None:
        d["checksums"] = checksums
    return d


def base_fingerprint(frozen) -> dict:
    """Fingerprint of a frozen (base) tree: names, shapes, dtypes and a bit-exact value checksum per leaf.

    Args:
      frozen: the frozen half of `jlora.tree.split` (``None`` placeholders are ignored).

    Returns:
      ``{"hash": hex digest, "n_leaves", "bytes", "leaves": {name: [shape, dtype, checksum]}}``.

    Example:
      >>> lora_params = jlora.lora.init(key, cfg, params, lcfg)
      >>> trainable, frozen = jlora.split(lora_params, jlora.trainable_labels(lora_params))
      >>> fp = base_fingerprint(frozen)
      >>> fp["n_leaves"], fp["bytes"], len(fp["hash"])
      (21, 312576, 64)
    """
    paths, leaves, _ = _named(frozen)
    sums = _checksums(leaves)
    entries = {".".join(p): [list(map(int, x.shape)), str(jnp.dtype(x.dtype)), s]
               for p, x, s in zip(paths, leaves, sums)}
    digest = hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()
    nbytes = sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in leaves)
    return {"hash": digest, "n_leaves": len(leaves), "bytes": nbytes, "leaves": entries}


def _json_default(o):
    if dataclasses.is_dataclass(o) and not isinstance(o, type):
        return dataclasses.asdict(o)
    if isinstance(o, (np.generic, jax.Array, np.ndarray)):
        return np.asarray(o).tolist()
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    if isinstance(o, os.PathLike):
        return os.fspath(o)
    raise TypeError(f"{type(o).__name__} is not JSON serializable")


def _to_json(obj, what: str):
    try:
        return json.loads(json.dumps(obj, default=_json_default, sort_keys=True))
    except (TypeError, ValueError) as e:
        raise TypeError(f"checkpoint: {what} must be JSON-serializable: {e}") from None


# ----------------------------------------------------------------------------------------------------------
# Run-config guard


def _flatten_dict(d, prefix="") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten_dict(v, key + "."))
        else:
            out[key] = v
    return out


def _path(p) -> epath.Path:
    """A local path made absolute, or a cloud URL (gs://...) as is."""
    s = os.fspath(p)
    return epath.Path(s if "://" in s else os.path.abspath(s))


def _is_primary() -> bool:
    return jax.process_index() == 0


_SYNCS = [0]


def _sync(name: str):
    """A barrier across processes (a no-op on one); every process makes the same calls in the same order."""
    if jax.process_count() > 1:
        from orbax.checkpoint import multihost

        _SYNCS[0] += 1  # barrier names must be unique
        multihost.sync_global_processes(f"jlora_checkpoint:{name}:{_SYNCS[0]}")


def check_run_config(run_dir, config, *, ignore: Sequence[str] = ()) -> dict:
    """Refuses to mix runs: records ``config`` in ``<run_dir>/run_config.json`` or checks it matches.

    The first call writes the file (atomically); later calls (a resumed run) compare and raise if any key
    differs, so that checkpoints of two different runs never end up in one directory.

    Args:
      run_dir: the run directory (created if missing).
      config: a JSON-serializable dict (dataclasses, tuples, numpy scalars are converted); nested dicts are
        compared key by key (dotted names).
      ignore: dotted keys allowed to change between resumes (e.g. ``("total_steps",)``).

    Returns:
      the recorded config (as JSON values).

    Raises:
      ValueError: naming every differing key with its recorded and new value.

    Example:
      >>> check_run_config(f"{tmp}/run-b", {"model": "smollm2-135m", "lora": {"r": 8}, "lr": 2e-4})  # recorded
      {'lora': {'r': 8}, 'lr': 0.0002, 'model': 'smollm2-135m'}
      >>> check_run_config(f"{tmp}/run-b", {"model": "smollm2-135m", "lora": {"r": 16}, "lr": 2e-4})
      Traceback (most recent call last):
      ValueError: run directory ... Differing keys: lora.r: recorded 8, now 16. Use a new run directory, ...
    """
    cfg = _to_json(dict(config), "run config")
    root = _path(run_dir)
    path = root / RUN_CONFIG
    # Only process 0 looks and writes; every process then passes the same barrier and compares with the file
    # (a check of `exists()` on each host would race with process 0's write on a shared file system).
    fresh = False
    if _is_primary() and not path.exists():
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f"{RUN_CONFIG}.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(cfg, indent=2, sort_keys=True))
        tmp.rename(path)  # atomic on a local file system
        fresh = True
    _sync("run_config")
    if fresh:
        return cfg
    saved = json.loads(path.read_text())
    a, b = _flatten_dict(saved), _flatten_dict(cfg)
    skip = set(ignore)
    diffs = []
    for k in sorted(set(a) | set(b)):
        if k in skip or any(k.startswith(s + ".") for s in skip):
            continue
        if k not in b:
            diffs.append(f"{k}: recorded {a[k]!r}, now missing")
        elif k not in a:
            diffs.append(f"{k}: not recorded, now {b[k]!r}")
        elif a[k] != b[k]:
            diffs.append(f"{k}: recorded {a[k]!r}, now {b[k]!r}")
    if diffs:
        raise ValueError(f"run directory {run_dir} was created with a different config ({path}); refusing to "
                         f"mix runs. Differing keys: " + "; ".join(diffs) +
                         ". Use a new run directory, or pass ignore=[...] for keys that may change.")
    return saved


def config_hash(config) -> str:
    """A short stable hash of a JSON-serializable config (e.g. to store in ``extra``)."""
    blob = json.dumps(_to_json(dict(config), "config"), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------
# Run-directory lock


LOCK_FILE = "jlora.lock"


class RunDirLockedError(OSError):
    """Another process is training in this run directory (it holds ``<run_dir>/jlora.lock``)."""


class _Lock:
    def __init__(self, path: str, fd: int):
        self.path, self.fd = path, fd
        self.thread = threading.get_ident()
        self.count = 1


_HELD: Dict[str, _Lock] = {}
_HELD_GUARD = threading.Lock()


def _read_holder(path: str) -> dict:
    """The holder record in a lock file ({} while the holder has not written it yet)."""
    for _ in range(20):  # the holder writes its record right after taking the lock
        try:
            with open(path) as f:
                text = f.read()
        except OSError:
            return {}
        if text.strip():
            try:
                return json.loads(text)
            except ValueError:
                pass
        time.sleep(0.025)
    return {}


def _holder_str(h: dict) -> str:
    if not h:
        return "an unknown process (it has not written its pid yet)"
    since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(h["time"])) if "time" in h else "?"
    return f"pid {h.get('pid')} on host {h.get('host')} (since {since})"


def _check_run_dir(run_dir: str):
    if "://" not in run_dir and os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise NotADirectoryError(f"run directory {run_dir} exists and is not a directory; point run_dir "
                                 f"(run.dir) at a directory, new or of the same run")


def _acquire(run_dir: str, log) -> Optional[_Lock]:
    import fcntl

    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, LOCK_FILE)
    key = os.path.realpath(path)
    with _HELD_GUARD:
        held = _HELD.get(key)
        if held is not None:
            if held.thread == threading.get_ident():  # re-entrant (train_run, then fit inside it)
                held.count += 1
                return held
            raise RunDirLockedError(f"run directory {run_dir} is in use by another thread of this process "
                                    f"(pid {os.getpid()} on host {socket.gethostname()}); use another run "
                                    f"directory")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunDirLockedError(
                f"run directory {run_dir} is in use by {_holder_str(_read_holder(path))} ({path}); wait for "
                f"that run to finish or stop it, or use another run directory") from None
        except OSError as e:  # a file system without flock (some network mounts): train unlocked
            os.close(fd)
            warnings.warn(f"run directory {run_dir}: cannot lock {path} ({e}); two runs on this directory "
                          f"would not be detected")
            return None
        # The kernel drops a flock when its holder dies, so a record left in the file is a dead run's.
        prev = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        if prev:
            try:
                old = json.loads(prev)
            except ValueError:
                old = {}
            log(f"took over the stale lock of {_holder_str(old)} in {run_dir} (that run ended without "
                f"releasing it)")
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, record, 0)
        os.fsync(fd)
        lock = _HELD[key] = _Lock(key, fd)
        return lock


def _release(lock: Optional[_Lock]):
    if lock is None:
        return
    import fcntl

    with _HELD_GUARD:
        lock.count -= 1
        if lock.count:
            return
        _HELD.pop(lock.path, None)
        try:  # the file stays (deleting a locked file races with a process opening it); its record goes
            os.ftruncate(lock.fd, 0)
        finally:
            fcntl.flock(lock.fd, fcntl.LOCK_UN)
            os.close(lock.fd)


@contextlib.contextmanager
def lock_run_dir(run_dir, log: Callable[[str], None] = lambda *_: None):
    """Holds the run directory's lock for the duration of the ``with`` block: one run per directory.

    The lock is an ``flock`` on ``<run_dir>/jlora.lock``, which also records the holder's pid, host and start
    time for the message a second process gets. The kernel releases it when the holder exits, killed or not,
    so a lock left by a dead run is stale by construction and is simply taken over (``log`` says so). It is
    re-entrant within one thread (`jlora.run.train_run` takes it before loading the model, `jlora.loop.fit`
    again). Multi-host: only process 0 takes it (the processes of one run share it); whether it succeeded is
    broadcast, so every process raises together. A cloud URL (``gs://``) is not locked.

    Args:
      run_dir: the run directory (created if missing).
      log: where to report taking over a stale lock.

    Raises:
      RunDirLockedError: (an OSError) another process holds the lock; the message names the directory and
        the holder (pid, host).
      NotADirectoryError: ``run_dir`` exists and is not a directory.

    Example:
      >>> with lock_run_dir(f"{tmp}/run-l"):
      ...     with lock_run_dir(f"{tmp}/run-l"):  # re-entrant in one thread
      ...         sorted(json.load(open(f"{tmp}/run-l/jlora.lock")))
      ['host', 'pid', 'time']
    """
    run_dir = os.fspath(run_dir)
    _check_run_dir(run_dir)
    lock, error = None, None
    if "://" not in run_dir and _is_primary():
        try:
            lock = _acquire(run_dir, log)
        except (RunDirLockedError, ImportError) as e:
            if isinstance(e, ImportError):  # no fcntl (Windows): unlocked
                warnings.warn(f"run directory {run_dir}: no fcntl on this platform; not locked")
            else:
                error = e
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        ok = int(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
        if not ok and error is None:
            error = RunDirLockedError(f"run directory {run_dir} is in use by another run (process 0 of this "
                                      f"run could not lock it)")
    if error is not None:
        raise error
    try:
        yield
    finally:
        _release(lock)


# ----------------------------------------------------------------------------------------------------------
# The checkpointer


class Checkpointer:
    """Saves and restores `jlora.train.TrainState` in a run directory (orbax `CheckpointManager`).

    Args:
      run_dir: directory of this run (created if missing).
      save_every: `save` writes at steps that are multiples of this (``force=True`` writes any step).
      keep_last: keep the newest ``keep_last`` checkpoints (None: keep all).
      keep_best: also keep the best ``keep_best`` checkpoints by ``metrics[best_metric]``.
      best_metric: the metric to rank by (needed with ``keep_best``); checkpoints saved without it never
        count as best.
      best_mode: ``"min"`` (e.g. eval loss) or ``"max"`` (e.g. accuracy).
      base_ref: a string naming the frozen base (e.g. the HF directory or .gguf path), stored with each
        checkpoint for the record; the base is *checked* by fingerprint, not by this string.
      config: if given, `check_run_config` is applied to ``run_dir`` first.
      async_save: write in a background thread (default); `save` returns once arrays are on the host.
      verify: store per-leaf checksums at save and verify them at restore.

    Example:
      >>> from jlora.train import init_state, make_optimizer
      >>> params = jlora.lora.init(key, cfg, params, lcfg); labels = jlora.trainable_labels(params)
      >>> tx = make_optimizer(labels, 1e-3)
      >>> def train_step(state, batch):  # stands in for jax.jit(jlora.train.make_train_step(cfg, tx, labels))
      ...     return state.replace(step=state.step + 1), {}
      >>> state, batch, total = init_state(params, tx), {"input_ids": jnp.ones((2, 9), jnp.int32)}, 3
      >>> with Checkpointer(f"{tmp}/run-a", save_every=2, keep_last=3) as ckpt:
      ...     if ckpt.latest_step() is not None:  # a restarted run resumes from its newest checkpoint
      ...         state, extra = ckpt.restore(like_state=state, labels=labels)
      ...     for step in range(int(state.step) + 1, total + 1):
      ...         state, _ = train_step(state, batch)
      ...         saved = ckpt.save(step, state, labels, extra={"data_pos": step}, force=step == total)
      ...     ckpt.all_steps()
      [2, 3]
      >>> with Checkpointer(f"{tmp}/run-a") as ckpt:  # run again: it restores step 3 and has nothing left to do
      ...     state, extra = ckpt.restore(like_state=init_state(params, tx), labels=labels)
      >>> int(state.step), extra
      (3, {'data_pos': 3})
    """

    def __init__(self, run_dir, *, save_every: int = 1000, keep_last: Optional[int] = 3, keep_best: int = 0,
                 best_metric: Optional[str] = None, best_mode: str = "min", base_ref: Optional[str] = None,
                 config: Optional[dict] = None, async_save: bool = True, verify: bool = True):
        import orbax.checkpoint as ocp
        from orbax.checkpoint import checkpoint_managers as cm

        if save_every < 1:
            raise ValueError(f"Checkpointer: save_every must be >= 1, got {save_every}")
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"Checkpointer: keep_last must be >= 1 or None, got {keep_last}")
        if keep_best < 0 or (keep_best and not best_metric):
            raise ValueError("Checkpointer: keep_best > 0 needs best_metric (the metrics key to rank by)")
        if best_mode not in ("min", "max"):
            raise ValueError(f"Checkpointer: best_mode must be 'min' or 'max', got {best_mode!r}")
        self.run_dir = _path(run_dir)
        self.config_hash = None
        if config is not None:
            check_run_config(self.run_dir, config)
            self.config_hash = config_hash(config)
        self.base_ref = None if base_ref is None else str(base_ref)
        self.verify = verify
        self.best_metric = best_metric
        self._base_cache: Dict[Any, dict] = {}
        self._ocp = ocp

        worst = float("inf") if best_mode == "min" else float("-inf")

        def metric(m):  # checkpoints without the metric (or NaN) rank worst
            v = m.get(best_metric) if isinstance(m, dict) else None
            try:
                v = float(v)
            except (TypeError, ValueError):
                return worst
            return worst if v != v else v

        keep = [cm.LatestN(n=keep_last)]
        if keep_best:
            keep.append(cm.BestN(get_metric_fn=metric, reverse=best_mode == "min", n=keep_best,
                                 keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=cm.AnySavePolicy([cm.FixedIntervalPolicy(save_every),
                                                   cm.PreemptionCheckpointingPolicy()]),
            preservation_policy=cm.AnyPreservationPolicy(keep),
            best_fn=metric if best_metric else None, best_mode=best_mode,
            enable_async_checkpointing=async_save, create=True)
        self._mgr = ocp.CheckpointManager(self.run_dir, options=options)

    # -- bookkeeping ------------------------------------------------------------------------------------------

    def step_dir(self, step: int) -> epath.Path:
        """The directory of checkpoint ``step``."""
        return self.run_dir / str(int(step))

    def _committed(self, step: int) -> bool:
        return (self.step_dir(step) / COMMIT_FILE).exists()

    def all_steps(self) -> List[int]:
        """Committed checkpoint steps, ascending (waits for pending writes)."""
        self._mgr.wait_until_finished()
        return [s for s in sorted(self._mgr.all_steps()) if self._committed(s)]

    def latest_step(self) -> Optional[int]:
        """The newest committed step, or None; temporary and unmarked step directories are ignored."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def best_step(self) -> Optional[int]:
        """The step with the best ``best_metric`` (the latest step when no metric is tracked)."""
        self._mgr.wait_until_finished()
        return self._mgr.best_step() if self.best_metric else self.latest_step()

    def should_save(self, step: int) -> bool:
        """Whether `save` (without ``force``) would write at ``step``."""
        return self._mgr.should_save(int(step))

    def reload(self):
        """Re-reads the run directory (after another process or the user changed it)."""
        self._mgr.wait_until_finished()
        self._mgr.reload()

    def reached_preemption(self, step: int) -> bool:
        """Multi-host: whether every process has reached the step at which to save for a preemption notice
        (SIGTERM) one of them received (JAX's preemption sync point; call it at every step). False without
        `jax.distributed`."""
        return bool(self._mgr.reached_preemption(int(step)))

    def wait_until_finished(self):
        """Blocks until pending asynchronous writes are committed."""
        self._mgr.wait_until_finished()

    def close(self):
        """Waits for pending writes and releases orbax's resources."""
        self._mgr.wait_until_finished()
        self._mgr.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- save -------------------------------------------------------------------------------------------------

    def _base_info(self, frozen, paths, leaves, fresh: bool = False) -> dict:
        key = tuple((".".join(p), tuple(x.shape), str(jnp.dtype(x.dtype))) for p, x in zip(paths, leaves))
        # The base is frozen during a run: `save` hashes its values once per Checkpointer (keyed by its
        # structure); `restore` always hashes the base it is given (``fresh``) and that becomes the cached one.
        if fresh or key not in self._base_cache:
            self._base_cache[key] = base_fingerprint(frozen)
        return self._base_cache[key]

    def save(self, step: int, state, labels, *, metrics: Optional[dict] = None, extra: Optional[dict] = None,
             force: bool = False) -> bool:
        """Saves ``state`` at ``step`` if the schedule says so (or ``force``): trainable leaves, optimizer
        state, step, PRNG key data, ``extra`` and a reference to the frozen base.

        Args:
          step: the step number (names the directory; usually ``int(state.step)``).
          state: a `jlora.train.TrainState`.
          labels: the label tree (`jlora.trainable_labels`); frozen leaves are not saved.
          metrics: numbers for this step (e.g. ``{"eval_loss": 2.3}``); ranked by ``best_metric``.
          extra: JSON-serializable dict restored with the state (data position, config hash, ...).
          force: save even off the schedule (e.g. the final step). A step already saved is skipped.

        Returns:
          True if a checkpoint was written (or started, when asynchronous).
        """
        ocp = self._ocp
        step = int(step)
        extra = _to_json(dict(extra or {}), "extra")
        metrics = _to_json({k: (float(v) if isinstance(v, (int, float, np.generic, jax.Array)) else v)
                            for k, v in dict(metrics or {}).items()}, "metrics")
        if not force and not self._mgr.should_save(step):
            return False
        if step in self._mgr.all_steps():
            warnings.warn(f"Checkpointer: step {step} already exists in {self.run_dir}; not saved again")
            return False
        trainable, frozen = T.split(state.params, labels)
        p_paths, p_leaves, _ = _named(trainable)
        o_paths, o_leaves, _ = _named(state.opt_state)
        rng = state.rng
        typed = jnp.issubdtype(rng.dtype, jax.dtypes.prng_key)
        loop = {"step": jnp.asarray(state.step), "rng": jax.random.key_data(rng) if typed else rng}
        l_paths, l_leaves, _ = _named(loop)
        f_paths, f_leaves, _ = _named(frozen)
        base = self._base_info(frozen, f_paths, f_leaves)
        items = {"params": (p_paths, p_leaves), "opt_state": (o_paths, o_leaves), "loop": (l_paths, l_leaves)}
        sums = _checksums(p_leaves + o_leaves + l_leaves) if self.verify else None
        meta = {"format": FORMAT, "step": step, "kind": "adapter" if f_leaves else "full",
                "rng_typed": bool(typed), "rng_impl": str(jax.random.key_impl(rng)) if typed else None,
                "base": {"ref": self.base_ref, "hash": base["hash"], "n_leaves": base["n_leaves"],
                         "bytes": base["bytes"], "leaves": base["leaves"]},
                "extra": extra, "metrics": metrics, "config_hash": self.config_hash,
                "time": time.time(), "items": {}}
        args, offset = {}, 0
        for name, (paths, leaves) in items.items():
            chunk = None if sums is None else sums[offset:offset + len(leaves)]
            offset += len(leaves)
            meta["items"][name] = _describe(paths, leaves, chunk)
            if leaves:  # an empty pytree is not an orbax item
                args[name] = ocp.args.StandardSave(_nest(paths, leaves))
        args["meta"] = ocp.args.JsonSave(meta)
        saved = self._mgr.save(step, args=ocp.args.Composite(**args),
                               metrics=metrics if self.best_metric else None, force=True)
        return bool(saved)

    # -- restore ----------------------------------------------------------------------------------------------

    def metadata(self, step: Optional[int] = None) -> dict:
        """The JSON metadata of a checkpoint (default: the latest): items, base, extra, metrics.

        Args:
          step: the step (default `latest_step`).

        Returns:
          the metadata dict written by `save`.
        """
        step = self._pick(step)
        return self._read_meta(step)

    def _pick(self, step):
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise FileNotFoundError(f"no committed checkpoint in {self.run_dir}")
            return steps[-1]
        if int(step) not in steps:
            raise FileNotFoundError(f"no committed checkpoint for step {step} in {self.run_dir}; "
                                    f"available steps: {steps}")
        return int(step)

    def _read_meta(self, step: int) -> dict:
        ocp = self._ocp
        try:
            meta = self._mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        except Exception as e:  # noqa: BLE001 - any read failure of a committed step is corruption
            raise CorruptCheckpointError(f"checkpoint {self.step_dir(step)} is unreadable (its metadata): "
                                         f"{type(e).__name__}: {e}") from e
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise CorruptCheckpointError(f"checkpoint {self.step_dir(step)} has no valid jlora metadata")
        return meta

    @staticmethod
    def _check_item(name: str, saved: dict, paths, leaves, step_dir: str):
        want = _describe(paths, leaves)
        if saved["names"] == want["names"] and saved["shapes"] == want["shapes"] and \
                saved["dtypes"] == want["dtypes"]:
            return
        s_map = {n: (tuple(s), d) for n, s, d in zip(saved["names"], saved["shapes"], saved["dtypes"])}
        w_map = {n: (tuple(s), d) for n, s, d in zip(want["names"], want["shapes"], want["dtypes"])}
        missing = [n for n in w_map if n not in s_map]
        unexpected = [n for n in s_map if n not in w_map]
        changed = [f"{n} saved {s_map[n]} vs {w_map[n]}" for n in w_map if n in s_map and s_map[n] != w_map[n]]
        parts = []
        if missing:
            parts.append(f"{len(missing)} leaves not in the checkpoint (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} saved leaves not in like_state (e.g. {unexpected[:3]})")
        if changed:
            parts.append(f"{len(changed)} with another shape/dtype (e.g. {changed[:3]})")
        if not parts:
            parts.append("leaf order differs")
        raise ValueError(f"checkpoint {step_dir}: its {name} do not match like_state/labels: " + "; ".join(parts) +
                         ". Was it saved with another model config, PEFT config or optimizer?")

    def _check_base(self, meta: dict, frozen, step_dir: str):
        f_paths, f_leaves, _ = _named(frozen)
        mine = self._base_info(frozen, f_paths, f_leaves, fresh=True)
        saved = meta["base"]
        if mine["hash"] == saved["hash"]:
            return
        a, b = saved["leaves"], mine["leaves"]
        missing = [n for n in a if n not in b]
        unexpected = [n for n in b if n not in a]
        shape = [n for n in a if n in b and a[n][:2] != b[n][:2]]
        values = [n for n in a if n in b and a[n][:2] == b[n][:2] and a[n][2] != b[n][2]]
        detail = []
        for what, names in (("missing from this base", missing), ("not in the saved base", unexpected),
                            ("with another shape/dtype", shape), ("with other values", values)):
            if names:
                detail.append(f"{len(names)} leaves {what} (e.g. {names[:2]})")
        raise BaseMismatchError(
            f"checkpoint {step_dir} was trained on another base (saved base {saved.get('ref')!r}, fingerprint "
            f"{saved['hash'][:12]}; this base {self.base_ref!r}, fingerprint {mine['hash'][:12]}): "
            + "; ".join(detail) + ". Load the same base weights, or pass check_base=False to override.")

    def _restore_one(self, step: int, like_state, labels, check_base: bool, params_only: bool):
        ocp = self._ocp
        step_dir = self.step_dir(step)
        meta = self._read_meta(step)
        params = like_state.params if not params_only else like_state
        trainable, frozen = T.split(params, labels)
        p_paths, p_leaves, p_def = _named(trainable)
        like = {"params": (p_paths, p_leaves)}
        if not params_only:
            o_paths, o_leaves, o_def = _named(like_state.opt_state)
            rng = like_state.rng
            typed = jnp.issubdtype(rng.dtype, jax.dtypes.prng_key)
            loop = {"step": like_state.step, "rng": jax.random.key_data(rng) if typed else rng}
            l_paths, l_leaves, _ = _named(loop)
            like.update(opt_state=(o_paths, o_leaves), loop=(l_paths, l_leaves))
        # User errors (another model, PEFT config, optimizer or base) raise here, before any array is read.
        for name, (paths, leaves) in like.items():
            self._check_item(name, meta["items"][name], paths, leaves, step_dir)
        if check_base:
            self._check_base(meta, frozen, step_dir)
        args = {name: ocp.args.StandardRestore(_nest(paths, [_spec(x) for x in leaves]))
                for name, (paths, leaves) in like.items() if leaves}
        try:
            out = self._mgr.restore(step, args=ocp.args.Composite(**args)) if args else {}
            got = {name: _unnest(out[name], paths) if leaves else []
                   for name, (paths, leaves) in like.items()}
        except Exception as e:  # noqa: BLE001 - the structure was checked above: a read failure is corruption
            raise CorruptCheckpointError(f"checkpoint {step_dir} is unreadable: {type(e).__name__}: "
                                         f"{str(e)[:500]}") from e
        if self.verify:
            for name in like:
                want = meta["items"][name].get("checksums")
                if want is not None and _checksums(got[name]) != want:
                    bad = [n for n, a, b in zip(meta["items"][name]["names"], _checksums(got[name]), want)
                           if a != b]
                    raise CorruptCheckpointError(f"checkpoint {step_dir}: {name} fail their checksum (e.g. "
                                                 f"{bad[:3]}): the files were damaged after writing")
        new_params = T.combine(jax.tree_util.tree_unflatten(p_def, got["params"]), frozen, labels)
        if params_only:
            return new_params, meta
        opt_state = jax.tree_util.tree_unflatten(o_def, got["opt_state"])
        loop_vals = {parts[0]: x for parts, x in zip(l_paths, got["loop"])}
        step_arr, rng_data = loop_vals["step"], loop_vals["rng"]
        new_rng = jax.random.wrap_key_data(rng_data, impl=jax.random.key_impl(like_state.rng)) if typed \
            else rng_data
        state = like_state.replace(step=step_arr, params=new_params, opt_state=opt_state, rng=new_rng)
        return state, meta

    def _quarantine(self, step: int) -> epath.Path:
        src = self.step_dir(step)
        dst = self.run_dir / CORRUPT_DIR / str(step)
        if dst.exists():
            dst = dst.parent / f"{step}-{int(time.time())}"
        if _is_primary():
            dst.parent.mkdir(parents=True, exist_ok=True)
            src.rename(dst)
        _sync(f"quarantine_{step}")
        self._mgr.reload()
        return dst

    def _restore(self, step, like_state, labels, check_base, on_corrupt, params_only):
        if on_corrupt not in ("fallback", "raise"):
            raise ValueError(f"restore: on_corrupt must be 'fallback' or 'raise', got {on_corrupt!r}")
        if step is not None:
            return self._restore_one(self._pick(step), like_state, labels, check_base, params_only)
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(f"no committed checkpoint in {self.run_dir}")
        for s in reversed(steps):
            try:
                return self._restore_one(s, like_state, labels, check_base, params_only)
            except CorruptCheckpointError as e:
                if on_corrupt == "raise":
                    raise
                dst = self._quarantine(s)
                warnings.warn(f"{e}\nMoved it to {dst} (nothing deleted) and falling back to the previous step.")
        raise CorruptCheckpointError(f"every checkpoint in {self.run_dir} is unreadable (moved to "
                                     f"{self.run_dir / CORRUPT_DIR})")

    def restore(self, step: Optional[int] = None, *, like_state, labels, check_base: bool = True,
                on_corrupt: str = "fallback"):
        """Restores a train state: the saved trainable leaves, optimizer state, step and PRNG key, combined
        with the frozen part of ``like_state``.

        Args:
          step: the step to restore; default: the latest good one.
          like_state: a `TrainState` of the same structure (e.g. a fresh `jlora.train.init_state`): gives the
            dtypes and shardings, and the frozen base for adapter runs.
          labels: the label tree used at save.
          check_base: refuse (`BaseMismatchError`) when the frozen base differs from the saved fingerprint.
          on_corrupt: with ``step=None``, ``"fallback"`` warns, moves an unreadable step to
            ``<run_dir>/corrupt/`` and tries the previous one; ``"raise"`` raises. An explicit step raises.

        Returns:
          ``(state, extra)``: the restored `TrainState` and the ``extra`` dict given to `save`.

        Raises:
          FileNotFoundError: no checkpoint (at that step).
          ValueError: the checkpoint does not match ``like_state``/``labels`` (`BaseMismatchError` for the base).
          CorruptCheckpointError: the checkpoint cannot be read intact (naming its directory).
        """
        state, meta = self._restore(step, like_state, labels, check_base, on_corrupt, params_only=False)
        return state, meta["extra"]

    def restore_params(self, step: Optional[int] = None, *, like_params, labels, check_base: bool = True,
                       on_corrupt: str = "fallback"):
        """Restores only the parameters (e.g. for evaluation or export): saved trainable leaves + the frozen
        part of ``like_params``. Arguments as in `restore`.

        Returns:
          the parameter tree.
        """
        params, _ = self._restore(step, like_params, labels, check_base, on_corrupt, params_only=True)
        return params
