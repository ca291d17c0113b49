"""Checkpoints: bitwise round trips (full and LoRA, after real train steps), adapter-only size, retention,
atomicity, the run-config guard, base fingerprints and corrupt-checkpoint fallback. Tiny configs only."""

import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora import train
from jlora.checkpoint import (BaseMismatchError, Checkpointer, CorruptCheckpointError, base_fingerprint,
                              check_run_config)

CFG = jlora.preset("tiny-llama").replace(n_layers=1)  # one layer keeps the two train-step compiles short


def _host(tree):
    """Leaves as numpy, typed PRNG keys as their key data (so trees can be compared bitwise)."""
    def f(x):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.asarray(x)
    return jax.tree_util.tree_map(f, tree)


def assert_bitwise(a, b):
    a, b = _host(a), _host(b)
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert np.array_equal(x.reshape(-1).view(np.uint8), y.reshape(-1).view(np.uint8))


def _random_params(cfg, seed=0):
    """Random weights drawn with numpy (jlora.init_params compiles one random op per shape: slow on CPU)."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda s: jnp.asarray(0.02 * rng.standard_normal(s, np.float32)),
                                  jlora.param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))


def _run(params, seed=0):
    """(labels, tx, fresh state, state after 2 real train steps, jitted step, batch)."""
    labels = jlora.trainable_labels(params)
    tx = train.make_optimizer(labels, 1e-2)
    fresh = train.init_state(params, tx, seed)
    step = jax.jit(train.make_train_step(CFG, tx, labels))
    batch = {"input_ids": jax.random.randint(jax.random.key(7), (2, 12), 0, CFG.vocab_size)}
    state = fresh
    for _ in range(2):
        state, _ = step(state, batch)
    return labels, tx, fresh, state, step, batch


@pytest.fixture(scope="module")
def base():
    return _random_params(CFG)


@pytest.fixture(scope="module")
def full_run(base):
    return _run(base)


@pytest.fixture(scope="module")
def lora_run(base):
    lcfg = jlora.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], dropout=0.1)
    return _run(jlora.lora.init(jax.random.key(1), CFG, base, lcfg))


def _dir_bytes(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_round_trip_bitwise(kind, full_run, lora_run, tmp_path):
    labels, tx, fresh, state, step, batch = full_run if kind == "full" else lora_run
    with Checkpointer(tmp_path, save_every=2) as ck:
        assert ck.save(2, state, labels, extra={"data_pos": 24, "note": kind}, metrics={"loss": 1.5})
    with Checkpointer(tmp_path, save_every=2) as ck:  # a new process resuming
        assert ck.latest_step() == 2
        restored, extra = ck.restore(like_state=fresh, labels=labels)
        assert extra == {"data_pos": 24, "note": kind}
        meta = ck.metadata()
    assert_bitwise(restored, state)  # params, optimizer state (Adam moments and counts), step, rng
    assert jax.random.key_impl(restored.rng) == jax.random.key_impl(state.rng)
    assert meta["kind"] == ("full" if kind == "full" else "adapter") and meta["metrics"] == {"loss": 1.5}


def test_adapter_checkpoint_holds_no_base(tmp_path):
    cfg = CFG.replace(vocab_size=512, d_model=128, d_ff=256, n_layers=2)  # big enough to dwarf file overhead
    params = _random_params(cfg)
    lparams = jlora.lora.init(jax.random.key(1), cfg, params, jlora.LoraConfig(r=4, alpha=8))
    sizes, reports = {}, {}
    for kind, p in (("full", params), ("lora", lparams)):
        labels = jlora.trainable_labels(p)
        state = train.init_state(p, train.make_optimizer(labels, 1e-3))
        with Checkpointer(tmp_path / kind, async_save=False) as ck:
            ck.save(1, state, labels, force=True)
            names = ck.metadata(1)["items"]["params"]["names"]
        sizes[kind] = _dir_bytes(tmp_path / kind / "1")
        reports[kind] = jlora.param_report(p, labels)
        if kind == "lora":
            assert names and all(n.endswith((".a", ".b")) for n in names)  # adapter factors only
    base_bytes = reports["lora"]["bytes"] - reports["lora"]["trainable_bytes"]
    assert sizes["full"] > 0.95 * reports["full"]["bytes"]  # (Adam moments are zeros here: compressed)
    assert sizes["lora"] < 0.1 * base_bytes
    assert sizes["lora"] < 0.05 * sizes["full"]


def test_schedule_and_keep_last(lora_run, tmp_path):
    labels, _, fresh, state, _, _ = lora_run
    with Checkpointer(tmp_path, save_every=2, keep_last=2) as ck:
        saved = [s for s in range(1, 8) if ck.save(s, state, labels)]
        assert saved == [2, 4, 6]
        assert ck.save(7, state, labels, force=True)  # the final step, off the schedule
        with pytest.warns(UserWarning, match="already exists"):
            assert not ck.save(7, state, labels, force=True)
        assert ck.all_steps() == [6, 7]
    assert sorted(os.listdir(tmp_path)) == ["6", "7"]


def test_keep_best_by_metric(lora_run, tmp_path):
    labels, _, fresh, state, _, _ = lora_run
    losses = {1: 3.0, 2: 1.0, 3: 2.0, 4: None, 5: 2.5}
    with Checkpointer(tmp_path, save_every=1, keep_last=1, keep_best=1, best_metric="eval_loss") as ck:
        for s, loss in losses.items():
            ck.save(s, state, labels, metrics=None if loss is None else {"eval_loss": loss})
        assert ck.all_steps() == [2, 5]  # the best and the latest
        assert ck.best_step() == 2
    with Checkpointer(tmp_path, save_every=1, keep_last=1, keep_best=1, best_metric="eval_loss") as ck:
        assert ck.best_step() == 2 and ck.latest_step() == 5  # metrics are read back from disk
    with pytest.raises(ValueError, match="best_metric"):
        Checkpointer(tmp_path, keep_best=1)


def test_latest_step_ignores_uncommitted(lora_run, tmp_path):
    labels, _, fresh, state, _, _ = lora_run
    with Checkpointer(tmp_path, save_every=1) as ck:
        ck.save(2, state, labels)
    assert os.path.isfile(tmp_path / "2" / "commit_success.txt")  # orbax marks finished steps
    # A crash mid-write leaves orbax's temporary directory; a copy in progress lacks the commit marker.
    shutil.copytree(tmp_path / "2", tmp_path / "5.orbax-checkpoint-tmp-1700000000")
    shutil.copytree(tmp_path / "2", tmp_path / "7")
    os.remove(tmp_path / "7" / "commit_success.txt")
    with Checkpointer(tmp_path, save_every=1) as ck:
        assert ck.latest_step() == 2 and ck.all_steps() == [2]
        restored, _ = ck.restore(like_state=fresh, labels=labels)
    assert int(restored.step) == int(state.step)
    assert os.path.isdir(tmp_path / "7")  # nothing of the user's is touched


def test_run_config_guard(tmp_path):
    cfg = {"model": "tiny-llama", "lora": {"r": 4, "targets": ("q_proj", "v_proj")}, "lr": 1e-3, "steps": 10}
    assert check_run_config(tmp_path, cfg)["lora"]["targets"] == ["q_proj", "v_proj"]
    check_run_config(tmp_path, dict(cfg))  # same config: a resumed run
    with pytest.raises(ValueError) as e:
        check_run_config(tmp_path, {**cfg, "lr": 2e-3, "lora": {"r": 8, "targets": ("q_proj", "v_proj")}})
    assert "lr" in str(e.value) and "lora.r" in str(e.value) and "steps" not in str(e.value)
    check_run_config(tmp_path, {**cfg, "steps": 20}, ignore=["steps"])
    with pytest.raises(ValueError, match="different config"):
        Checkpointer(tmp_path, config={**cfg, "model": "gpt2"})
    assert json.load(open(tmp_path / "run_config.json"))["lr"] == 1e-3


def test_base_mismatch_refused(base, lora_run, tmp_path):
    labels, tx, fresh, state, _, _ = lora_run
    with Checkpointer(tmp_path, save_every=1, base_ref="hf/tiny-llama") as ck:
        ck.save(2, state, labels)
    other_base = _random_params(CFG, seed=42)  # same shapes, other weights
    lcfg = jlora.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], dropout=0.1)
    other = train.init_state(jlora.lora.init(jax.random.key(1), CFG, other_base, lcfg), tx)
    with Checkpointer(tmp_path, save_every=1, base_ref="hf/other") as ck:
        with pytest.raises(BaseMismatchError, match="other values") as e:
            ck.restore(like_state=other, labels=labels)
        assert str(tmp_path) in str(e.value) and "hf/tiny-llama" in str(e.value)
        restored, _ = ck.restore(like_state=other, labels=labels, check_base=False)  # explicit override
        ck.restore(like_state=fresh, labels=labels)  # the right base, after a refusal, in the same Checkpointer
        assert ck.all_steps() == [2]  # a refused restore is not "corruption": nothing moved
        # Another PEFT config (rank) is a clear error too, raised before any array is read.
        lcfg8 = lcfg.replace(r=8)
        p8 = jlora.lora.init(jax.random.key(1), CFG, base, lcfg8)
        like8 = train.init_state(p8, train.make_optimizer(jlora.trainable_labels(p8), 1e-2))
        with pytest.raises(ValueError, match="another shape"):
            ck.restore(like_state=like8, labels=jlora.trainable_labels(p8))
    f_restored = jlora.split(restored.params, labels)[1]
    assert_bitwise(f_restored, jlora.split(other.params, labels)[1])  # the frozen part comes from like_state
    assert base_fingerprint(jlora.split(state.params, labels)[1])["hash"] != \
        base_fingerprint(f_restored)["hash"]


def _data_files(item_dir):
    """Tensorstore's OCDBT data files of an orbax item (in ``d/`` directories)."""
    return [os.path.join(d, f) for d, _, fs in os.walk(item_dir) for f in fs if os.path.basename(d) == "d"]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax's aborted reads
@pytest.mark.filterwarnings("ignore:coroutine:RuntimeWarning")
@pytest.mark.parametrize("damage", ["truncate", "delete", "checksum"])
def test_corrupt_latest_falls_back(damage, lora_run, tmp_path):
    labels, _, fresh, state, step, batch = lora_run
    later, _ = step(state, batch)
    with Checkpointer(tmp_path, save_every=1) as ck:
        ck.save(1, state, labels, extra={"pos": 1})
        ck.save(2, later, labels, extra={"pos": 2})
    if damage == "checksum":  # a silently flipped value: the data decodes but is not what was written
        meta_file = tmp_path / "2" / "meta" / "metadata"
        meta = json.load(open(meta_file))
        meta["items"]["params"]["checksums"][0] ^= 1
        json.dump(meta, open(meta_file, "w"))
    else:
        for victim in _data_files(tmp_path / "2" / "params"):
            if damage == "truncate":
                with open(victim, "r+b") as f:
                    f.truncate(os.path.getsize(victim) // 2)
            else:
                os.remove(victim)
    with Checkpointer(tmp_path, save_every=1) as ck:
        with pytest.raises(CorruptCheckpointError, match=re.escape(str(tmp_path / "2"))):
            ck.restore(2, like_state=fresh, labels=labels)  # an explicit step raises, naming the directory
        with pytest.raises(CorruptCheckpointError):
            ck.restore(like_state=fresh, labels=labels, on_corrupt="raise")
        assert ck.latest_step() == 2  # raising moved nothing
        with pytest.warns(UserWarning, match="falling back"):
            restored, extra = ck.restore(like_state=fresh, labels=labels)
        assert extra == {"pos": 1} and ck.latest_step() == 1
        assert_bitwise(restored, state)
        assert ck.save(2, later, labels)  # the step can be written again
    assert os.path.isdir(tmp_path / "corrupt" / "2")  # moved aside, not deleted


def test_checksum_same_on_host_and_device():
    """Save on an accelerator and restore on CPU (or back) must agree: numpy and XLA checksums are equal."""
    from jlora.checkpoint import _host_checksum, _leaf_checksum

    a = np.random.default_rng(0).standard_normal((33, 7)) * 4
    for dt in (jnp.float32, jnp.bfloat16, jnp.int8, jnp.bool_):
        x = jnp.asarray(a).astype(dt)
        assert int(_leaf_checksum(x)) == _host_checksum(np.asarray(x)), dt
