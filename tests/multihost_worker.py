"""One process of the 2-process CPU run in tests/test_multihost.py (not a test module itself).

argv: process_id port run_dir out_json stop_at. Each process has 4 CPU devices; the mesh spans all 8.
"""

import json
import sys

import jax

jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_cpu_collectives_implementation", "gloo")

from jlora import parallel  # noqa: E402

pid, port, run_dir, out, stop_at = sys.argv[1:6]
parallel.initialize_distributed(coordinator_address=f"localhost:{port}", num_processes=2, process_id=int(pid))
assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4

import numpy as np  # noqa: E402

from multihost_common import fit_config, make_data, make_params  # noqa: E402

from jlora.loop import fit  # noqa: E402

cfg, params = make_params()
data = make_data(cfg, host_index=jax.process_index(), host_count=jax.process_count())
res = fit(cfg, params, data, run_dir=run_dir, fit_config=fit_config(), progress=False, stop_at=int(stop_at),
          mesh=parallel.make_mesh("data=2,fsdp=4"))
host = parallel.to_host(res.state.params)  # a collective: every process gathers
if jax.process_index() == 0:
    leaves = [np.asarray(x).tolist() for x in jax.tree_util.tree_leaves(host)]
    with open(out, "w") as f:
        json.dump({"losses": [h["loss"] for h in res.history if "loss" in h], "leaves": leaves}, f)
