"""Multi-host for real, on one machine: two processes (4 CPU devices each, gloo collectives) joined by
`jax.distributed.initialize` train on one 8-device mesh. Each reads only its half of every batch; checkpoints
are written by both; the run then resumes in this (single) process and ends where a single-process run ends."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from multihost_common import fit_config, make_data, make_params

from jlora.loop import fit

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_two_processes(run_dir, out, stop_at):
    port = str(free_port())
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([HERE, ROOT]))
    env.pop("XLA_FLAGS", None)
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "multihost_worker.py"), str(i), port, str(run_dir),
                               str(out), str(stop_at)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for i in range(2)]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=300)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    return logs


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")
def test_two_processes_train_one_mesh_and_resume_in_one(tmp_path):
    run_dir, out = tmp_path / "run", tmp_path / "out.json"
    run_two_processes(run_dir, out, stop_at=2)
    got = json.loads(out.read_text())
    # one process wrote the metrics (no duplicate lines); both wrote the step-2 checkpoint together
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2]
    assert len(os.listdir(run_dir / "tb")) == 1
    assert (run_dir / "2").is_dir()

    cfg, params = make_params()
    rest = fit(cfg, params, make_data(cfg), run_dir=str(run_dir), fit_config=fit_config(), progress=False,
               log=lambda *_: None)
    assert rest.resumed_from == 2
    cfg, params = make_params()
    straight = fit(cfg, params, make_data(cfg), run_dir=str(tmp_path / "straight"), fit_config=fit_config(),
                   progress=False, log=lambda *_: None)
    want = [h["loss"] for h in straight.history if "loss" in h]
    np.testing.assert_allclose(got["losses"], want[:2], rtol=2e-6)
    np.testing.assert_allclose([h["loss"] for h in rest.history if "loss" in h], want[2:], rtol=2e-6)
    # the parameters the two processes gathered at step 2 (to_host) are the single-process ones at step 2
    cfg, params = make_params()
    two = fit(cfg, params, make_data(cfg), run_dir=str(tmp_path / "two"), fit_config=fit_config(), progress=False,
              stop_at=2, log=lambda *_: None)
    for x, r in zip(got["leaves"], jax.tree_util.tree_leaves(jax.device_get(two.state.params))):
        np.testing.assert_allclose(np.asarray(x), np.asarray(r), rtol=1e-5, atol=1e-5)
    for x, r in zip(jax.tree_util.tree_leaves(jax.device_get(rest.state.params)),
                    jax.tree_util.tree_leaves(jax.device_get(straight.state.params))):
        np.testing.assert_allclose(x, r, rtol=1e-5, atol=1e-5)
