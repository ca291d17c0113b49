"""Runs a team can trust: one run per directory (a lock, stale locks taken over), logs that agree with the
checkpoint after a kill (metrics.jsonl and TensorBoard, read back with TensorBoard's own reader), and a clean
stop on SIGTERM (checkpoint committed, exit status 75, bitwise resume).

Every run here is a real `jlora train` process (`jlora.cli.main` in a subprocess, on a tiny Llama directory),
driven by a small harness that can pause it, or SIGKILL it, right after it logged a given step.
"""

import json
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from test_run import model_dir  # noqa: F401 - the tiny model directory with a tokenizer and train.jsonl

from jlora.checkpoint import RunDirLockedError, lock_run_dir
from jlora.loop import PREEMPTED_EXIT_STATUS

STEPS, EVAL_EVERY, SAVE_EVERY = 8, 4, 3

# `jlora train` with hooks after the TensorBoard write of a training step's metrics (the last thing `fit` logs
# for a step; its checkpoint, if any, comes after): JLORA_TEST_KILL_AT=k sends SIGKILL to itself there;
# JLORA_TEST_PAUSE_AT=k writes its pid to $JLORA_TEST_READY and waits for the file $JLORA_TEST_GO.
HARNESS = textwrap.dedent("""
    import os, signal, sys, time
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from jlora import tbwriter
    kill_at = int(os.environ.get("JLORA_TEST_KILL_AT", "0"))
    pause_at = int(os.environ.get("JLORA_TEST_PAUSE_AT", "0"))
    original = tbwriter.SummaryWriter.scalars
    def scalars(self, step, values):
        original(self, step, values)
        if "loss" not in values:
            return
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if step == pause_at:
            with open(os.environ["JLORA_TEST_READY"], "w") as f:
                f.write(str(os.getpid()))
            t0 = time.time()
            while not os.path.exists(os.environ["JLORA_TEST_GO"]) and time.time() - t0 < 120:
                time.sleep(0.02)
    tbwriter.SummaryWriter.scalars = scalars
    from jlora.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def _config(tmp_path, model_dir, run_dir):  # noqa: F811
    path = tmp_path / f"{os.path.basename(run_dir)}.toml"
    path.write_text(f"""
[model]
path = "{model_dir}"
[method]
kind = "lora"
r = 4
alpha = 8
dropout = 0.1
target_modules = ["q_proj", "v_proj"]
[data]
train = "{model_dir / 'train.jsonl'}"
eval_fraction = 0.25
seq_len = 16
batch_size = 4
[optim]
learning_rate = 1e-2
warmup_steps = 2
[run]
dir = "{run_dir}"
steps = {STEPS}
eval_every = {EVAL_EVERY}
save_every = {SAVE_EVERY}
log_every = 1
keep_last = 5
""")
    return path


def _start(tmp_path, config, **hooks):
    script = tmp_path / "harness.py"
    script.write_text(HARNESS)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **{f"JLORA_TEST_{k.upper()}": str(v) for k, v in hooks.items()}}
    return subprocess.Popen([sys.executable, str(script), "train", "--config", str(config), "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _finish(p, timeout=300):
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out, err


def _wait_for(path, proc, timeout=120):
    t0 = time.time()
    while not os.path.exists(path):
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} before pausing: {proc.stderr.read()[-3000:]}")
        assert time.time() - t0 < timeout, f"{path} never appeared"
        time.sleep(0.05)


def _metrics(run_dir):
    """(step of each training line, step of each eval line, {step: loss}) of run_dir/metrics.jsonl."""
    entries = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    train = [e["step"] for e in entries if "loss" in e]
    evals = [e["step"] for e in entries if "eval_loss" in e]
    return train, evals, {e["step"]: e["loss"] for e in entries if "loss" in e}


def _tensorboard(run_dir):
    """{tag: [(step, value)]} as TensorBoard shows it (its own reader, over every event file of the run)."""
    from tensorboard.backend.event_processing import event_accumulator

    ea = event_accumulator.EventAccumulator(os.path.join(run_dir, "tb"))
    ea.Reload()
    return {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ("loss", "eval_loss")}


def _adapter(run_dir):
    from safetensors.numpy import load_file

    return load_file(os.path.join(run_dir, "adapter", "adapter_model.safetensors"))


def _assert_logged_once(run_dir, reference=None):
    train, evals, losses = _metrics(run_dir)
    assert train == list(range(1, STEPS + 1)), train
    assert evals == list(range(EVAL_EVERY, STEPS + 1, EVAL_EVERY)), evals
    tb = _tensorboard(run_dir)
    assert [s for s, _ in tb["loss"]] == train, tb["loss"]
    assert [s for s, _ in tb["eval_loss"]] == evals, tb["eval_loss"]
    assert [v for _, v in tb["loss"]] == [np.float32(losses[s]) for s in train]
    if reference is not None:  # the same losses, step for step, as the uninterrupted run
        assert losses == _metrics(reference)[2]


def _assert_same_adapter(a, b):
    ta, tb = _adapter(a), _adapter(b)
    assert sorted(ta) == sorted(tb) and ta
    for k in ta:
        np.testing.assert_array_equal(ta[k], tb[k])  # bitwise


@pytest.fixture(scope="module")
def contested(model_dir, tmp_path_factory):  # noqa: F811
    """Run A trains in a directory; while it is paused at step 2, run B is started on the same directory.
    A is otherwise uninterrupted: it is the reference run of the other tests."""
    tmp = tmp_path_factory.mktemp("contested")
    run_dir = tmp / "run"
    config = _config(tmp, model_dir, run_dir)
    a = _start(tmp, config, pause_at=2, ready=tmp / "a.ready", go=tmp / "a.go")
    try:
        _wait_for(tmp / "a.ready", a)
        t0 = time.time()
        b = _start(tmp, config)
        b_result = _finish(b, timeout=120)
        b_seconds = time.time() - t0
        b_metrics = open(run_dir / "metrics.jsonl").read()  # what the directory held when B gave up
    finally:
        (tmp / "a.go").write_text("")
    rc, out, err = _finish(a)
    assert rc == 0, err[-3000:]
    return {"run_dir": run_dir, "a_pid": a.pid, "b": b_result, "b_seconds": b_seconds, "b_metrics": b_metrics}


def test_second_run_on_a_directory_in_use_is_refused(contested):
    rc, out, err = contested["b"]
    assert rc != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]  # one line, no traceback
    line = lines[0]
    assert line.startswith("jlora train: error: run directory ") and str(contested["run_dir"]) in line
    assert f"pid {contested['a_pid']} on host {os.uname().nodename}" in line
    assert contested["b_seconds"] < 60  # refused before loading the model, not after training
    assert [json.loads(x)["step"] for x in contested["b_metrics"].splitlines()] == [1, 2]  # B wrote nothing
    # the first run finished, and its logs hold each step once
    _assert_logged_once(contested["run_dir"])
    assert (contested["run_dir"] / "adapter" / "adapter_model.safetensors").exists()


def test_lock_names_the_holder_and_a_stale_lock_is_taken_over(tmp_path):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from jlora.checkpoint import lock_run_dir
        with lock_run_dir({str(run_dir)!r}):
            print("locked", flush=True)
            time.sleep(120)
    """)], stdout=subprocess.PIPE, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirLockedError, match=re.escape(f"run directory {run_dir} is in use by pid "
                                                              f"{holder.pid} on host {os.uname().nodename}")):
            with lock_run_dir(run_dir):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)  # dies holding the lock: its record stays in jlora.lock
        holder.wait()
    assert json.loads((run_dir / "jlora.lock").read_text())["pid"] == holder.pid
    said = []
    with lock_run_dir(run_dir, log=said.append):
        assert json.loads((run_dir / "jlora.lock").read_text())["pid"] == os.getpid()
    assert len(said) == 1 and f"took over the stale lock of pid {holder.pid}" in said[0]
    assert (run_dir / "jlora.lock").read_text() == ""  # released: no record left to look stale
    with lock_run_dir(run_dir, log=said.append):
        pass
    assert len(said) == 1


def test_run_dir_naming_a_file_is_a_clear_error(model_dir, tmp_path, capsys):  # noqa: F811
    from jlora.cli import main

    (tmp_path / "taken").write_text("not a directory")
    config = _config(tmp_path, model_dir, tmp_path / "taken")
    assert main(["train", "--config", str(config), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert f"run.dir '{tmp_path / 'taken'}' exists and is not a directory" in err and "Traceback" not in err
    with pytest.raises(NotADirectoryError, match="exists and is not a directory"):
        with lock_run_dir(tmp_path / "taken"):
            pass


def test_sigkill_then_rerun_logs_each_step_once_and_resumes_bitwise(model_dir, contested, tmp_path):  # noqa: F811
    kill_at = int(os.environ.get("JLORA_TEST_KILL_STEP", 0)) or random.Random().randint(2, STEPS)  # to replay
    run_dir = tmp_path / "run"
    config = _config(tmp_path, model_dir, run_dir)
    killed = _start(tmp_path, config, kill_at=kill_at)
    rc, out, err = _finish(killed)
    assert rc == -signal.SIGKILL, (kill_at, err[-3000:])
    assert _metrics(run_dir)[0] == list(range(1, kill_at + 1))  # logged past its last checkpoint
    rc, out, err = _finish(_start(tmp_path, config))
    assert rc == 0, (kill_at, err[-3000:])
    restored = int(out.split("resumed from step ")[1].split()[0]) if "resumed from step" in out else 0
    # the newest checkpoint before the kill (step kill_at's own is written after its log line), or the one
    # before it, if that asynchronous write had not committed yet
    newest = (kill_at - 1) // SAVE_EVERY * SAVE_EVERY
    assert restored in (newest, max(newest - SAVE_EVERY, 0)), (kill_at, out)
    assert f"took over the stale lock of pid {killed.pid}" in out, (kill_at, out)  # the kill left the lock
    _assert_logged_once(run_dir, reference=contested["run_dir"])
    _assert_same_adapter(run_dir, contested["run_dir"])


def test_sigterm_commits_a_checkpoint_exits_75_and_resumes_bitwise(model_dir, contested, tmp_path):  # noqa: F811
    run_dir = tmp_path / "run"
    config = _config(tmp_path, model_dir, run_dir)
    p = _start(tmp_path, config, pause_at=4, ready=tmp_path / "ready", go=tmp_path / "go")
    try:
        _wait_for(tmp_path / "ready", p)
        p.send_signal(signal.SIGTERM)  # while step 4 is being logged
    finally:
        (tmp_path / "go").write_text("")
    rc, out, err = _finish(p)
    assert rc == PREEMPTED_EXIT_STATUS == 75, err[-3000:]
    assert "SIGTERM received" in err and "Traceback" not in err
    assert f"stopped at step 4 on SIGTERM: checkpoint committed in {run_dir}" in out
    assert (run_dir / "4" / "commit_success.txt").exists()  # 4 is off the save schedule (every 3)
    assert not (run_dir / "adapter").exists()
    assert (run_dir / "jlora.lock").read_text() == ""  # released on the way out
    rc, out, err = _finish(_start(tmp_path, config))
    assert rc == 0, err[-3000:]
    assert f"resumed from step 4 in {run_dir}" in out
    _assert_logged_once(run_dir, reference=contested["run_dir"])
    _assert_same_adapter(run_dir, contested["run_dir"])


def test_signal_handlers_are_restored_and_only_installed_in_the_main_thread():
    import threading

    from jlora.loop import _StopSignals

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with _StopSignals(True) as s:
        assert signal.getsignal(signal.SIGTERM) == s._handle
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert s.received == "SIGTERM"
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C twice: abort now
        with _StopSignals(True) as s:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            assert s.received == "SIGINT"
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    seen = []
    t = threading.Thread(target=lambda: seen.append(_StopSignals(True).__enter__().enabled))
    t.start()
    t.join()
    assert seen == [False]
