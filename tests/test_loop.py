"""The training loop: exact resume across processes, a kill during a checkpoint write, the NaN guard, logs."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

import jlora
from jlora import loop
from jlora.data import Batches
from jlora.tbwriter import read_scalars

SCRIPT = textwrap.dedent("""
    import os, sys, signal, json
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import numpy as np, jax
    import jlora
    from jlora import loop, checkpoint
    from jlora.data import Batches
    method, run_dir, stop_at, kill_at = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    cfg = jlora.preset("tiny-llama")
    params = jlora.init_params(cfg, jax.random.key(0))
    if method == "lora":
        params = jlora.lora.init(jax.random.key(1), cfg, params, jlora.LoraConfig(r=4, alpha=8, dropout=0.1))
    rng = np.random.default_rng(0)
    seqs = [(rng.integers(1, 128, n).astype(np.int32), np.ones(n, np.int32)) for n in rng.integers(5, 30, 40)]
    batches = Batches(seqs, seq_len=16, batch_size=4, seed=3)
    if kill_at:
        original = checkpoint.Checkpointer.save
        def save(self, step, *a, **k):
            out = original(self, step, *a, **k)
            if step == kill_at:  # the asynchronous write of this checkpoint is in flight
                os.kill(os.getpid(), signal.SIGKILL)
            return out
        checkpoint.Checkpointer.save = save
    fc = loop.FitConfig(steps=6, learning_rate=1e-2, warmup_steps=2, save_every=2, log_every=1, keep_last=5)
    res = loop.fit(cfg, params, batches, run_dir=run_dir, fit_config=fc, progress=False,
                   stop_at=stop_at or None, run_config={"method": method})
    leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(res.state.params)]
    if int(res.state.step) == fc.steps:
        np.savez(os.path.join(run_dir, "final.npz"), *leaves)
""")


def _run(tmp_path, *args):
    script = tmp_path / "fit_script.py"
    script.write_text(SCRIPT)
    return subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})


def _final(d):
    z = np.load(os.path.join(d, "final.npz"))
    return [z[k] for k in sorted(z.files, key=lambda s: int(s.split("_")[1]))]


def _losses(d):
    out = {}
    for line in open(os.path.join(d, "metrics.jsonl")):
        e = json.loads(line)
        if "loss" in e:
            out[e["step"]] = e["loss"]
    return out


@pytest.fixture(scope="module")
def straight_runs(tmp_path_factory):
    """Uninterrupted 6-step runs (full and LoRA), each in its own process."""
    root = tmp_path_factory.mktemp("straight")
    out = {}
    for method in ("full", "lora"):
        r = _run(root, method, root / method, 0, 0)
        assert r.returncode == 0, r.stderr[-2000:]
        out[method] = root / method
    return out


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "lora"])
def test_exact_resume_in_a_fresh_process(tmp_path, method, straight_runs):
    straight, split = straight_runs[method], tmp_path / "split"
    r = _run(tmp_path, method, split, 3, 0)  # stops after step 3 with a checkpoint
    assert r.returncode == 0, r.stderr[-2000:]
    assert not (split / "final.npz").exists()  # the first process stopped at step 3
    r = _run(tmp_path, method, split, 0, 0)  # a new process resumes from step 3
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from step 3" in r.stdout
    for a, b in zip(_final(straight), _final(split)):
        np.testing.assert_array_equal(a, b)  # bitwise
    ls, lp = _losses(straight), _losses(split)
    assert all(ls[s] == lp[s] for s in range(1, 7))


@pytest.mark.slow
def test_killed_during_checkpoint_write_resumes_from_last_complete(tmp_path, straight_runs):
    straight, killed = straight_runs["lora"], tmp_path / "killed"
    r = _run(tmp_path, "lora", killed, 0, 4)
    assert r.returncode == -9  # SIGKILL while step 4's checkpoint was being written
    r = _run(tmp_path, "lora", killed, 0, 0)
    assert r.returncode == 0, r.stderr[-2000:]
    resumed = int(r.stdout.split("resumed from step ")[1].split()[0])
    assert resumed in (2, 4)  # 4 only if the write had committed before the kill landed
    for a, b in zip(_final(straight), _final(killed)):
        np.testing.assert_array_equal(a, b)


def _tiny_batches(seed=0):
    rng = np.random.default_rng(seed)
    seqs = [(rng.integers(1, 128, n).astype(np.int32), np.ones(n, np.int32)) for n in rng.integers(5, 30, 40)]
    return Batches(seqs, seq_len=16, batch_size=4, seed=3)


def test_nan_guard_keeps_last_good_checkpoint_and_config_guard(tmp_path):
    import jlora.checkpoint as ck

    cfg = jlora.preset("tiny-gpt2")
    params = jlora.init_params(cfg, jax.random.key(0))
    batches = _tiny_batches()
    loop.fit(cfg, params, batches, run_dir=str(tmp_path), progress=False,
             fit_config=loop.FitConfig(steps=1, learning_rate=1e-3, save_every=1), run_config={"x": 1})
    with pytest.raises(ValueError, match="different config .* Differing keys: x: recorded 1, now 2"):
        loop.fit(cfg, params, batches, run_dir=str(tmp_path), progress=False,
                 fit_config=loop.FitConfig(steps=2), run_config={"x": 2})
    # Resume the same run with a learning rate so large that the parameters overflow.
    with pytest.raises(loop.TrainingDiverged, match=r"at step \d+; stopped without saving. The last good "
                                                    r"checkpoint is step \d+ in "):
        loop.fit(cfg, params, batches, run_dir=str(tmp_path), progress=False, run_config={"x": 1},
                 fit_config=loop.FitConfig(steps=8, learning_rate=1e30, max_grad_norm=None, save_every=1,
                                           log_every=1, schedule="constant"))
    labels = jlora.trainable_labels(params)
    with ck.Checkpointer(str(tmp_path)) as c:  # only finite checkpoints were written
        assert c.latest_step() >= 1
        restored = c.restore_params(like_params=params, labels=labels)
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(restored))


def test_logs_metrics_tensorboard_and_eval(tmp_path):
    cfg = jlora.preset("tiny-llama")
    params = jlora.lora.init(jax.random.key(1), cfg, jlora.init_params(cfg, jax.random.key(0)),
                             jlora.LoraConfig(r=4, alpha=8))
    res = loop.fit(cfg, params, _tiny_batches(), eval_batches=_tiny_batches(1), run_dir=str(tmp_path),
                   progress=True, fit_config=loop.FitConfig(steps=4, learning_rate=1e-2, eval_every=2, log_every=2),
                   eval_fn=lambda p: {"custom": 1.5})
    assert res.eval["eval_perplexity"] == pytest.approx(np.exp(res.eval["eval_loss"]))
    entries = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    assert [e["step"] for e in entries if "loss" in e] == [2, 4]
    assert [e["step"] for e in entries if "eval_loss" in e] == [2, 4]
    assert all(e["custom"] == 1.5 for e in entries if "eval_loss" in e)
    tb_file = next((tmp_path / "tb").iterdir())
    tags = {t for _, t, _ in read_scalars(str(tb_file))}
    assert {"loss", "grad_norm", "lr", "eval_loss", "eval_perplexity"} <= tags
    with pytest.raises(ValueError, match="FitConfig.schedule"):
        loop.FitConfig(schedule="exp")


def test_schedule_warmup_and_cosine():
    s = loop.make_schedule(loop.FitConfig(steps=10, learning_rate=1.0, warmup_steps=2, schedule="cosine"))
    assert float(s(0)) == 0.0 and float(s(2)) == pytest.approx(1.0) and float(s(10)) == pytest.approx(0.0, abs=1e-6)
    lin = loop.make_schedule(loop.FitConfig(steps=10, learning_rate=1.0, schedule="linear", min_lr_ratio=0.1))
    assert float(lin(10)) == pytest.approx(0.1)
