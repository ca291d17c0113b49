"""Training throughput and MFU of full fine-tuning and LoRA at a chosen model size and device mesh.

A thin script over library calls: `jlora.parallel.make_mesh`, `init_sharded_state`, `make_sharded_train_step`
(or `make_pmap_train_step` with ``--pmap``), timed on random tokens. For each method it prints global tokens/s,
tokens/s per device, step time, compile time, parameter + optimizer bytes per device, peak device memory
(where the backend reports it) and MFU, then the LoRA / full throughput ratio.

MFU = tokens/s x FLOPs per token / (devices x per-device peak), with FLOPs per token = 6N + 12 L T d: 6N for the
forward and backward matmuls of all N parameters (the tied head's matmul counted once through the embedding), plus
the attention scores and values (2 x 2 T d per layer forward, x3 with the backward). LoRA is charged the same
model FLOPs, as the LoRA paper does, so its MFU reads as "useful work" and LoRA / full is a throughput ratio
(FLOPs bound it at ~1.5x: LoRA skips the weight-gradient third of the matmuls). The peak is the dense bf16
rate of the chip (``--peak-tflops`` overrides; CPU has none, so MFU is left out there).

One GPU host (all its GPUs; FSDP over them)::

    python experiments/throughput.py --model gpt2-medium --dtype bfloat16 --batch 32 --seq 1024 --mesh fsdp=-1

A TPU VM (single host, e.g. v5e-8) and a TPU pod slice (every worker runs the same command)::

    python experiments/throughput.py --model gpt2-medium --dtype bfloat16 --batch 64 --seq 1024 --mesh data=-1
    gcloud compute tpus tpu-vm ssh my-tpu --zone ZONE --worker=all --command "cd ~/jlora && \\
        .venv/bin/python experiments/throughput.py --distributed --model gpt2-large --dtype bfloat16 \\
        --batch 256 --seq 1024 --mesh data=4,fsdp=-1"

On CPU, simulated devices show the sharding overhead (not speed): ``--cpu-devices 8 --mesh data=2,fsdp=4``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "TPU v4": 275.0,
                    "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v6 lite": 918.0,
                    "TPU v6e": 918.0}


def peak_flops(device_kind: str, override: Optional[float]) -> Optional[float]:
    """Per-device dense bf16 peak in FLOP/s, from ``--peak-tflops`` or the device kind (None if unknown)."""
    if override:
        return override * 1e12
    for key, tf in PEAK_BF16_TFLOPS.items():
        if key.lower() in device_kind.lower():
            return tf * 1e12
    return None


def time_steps(step, state, batches, warmup: int, steps: int):
    """Runs ``step`` once (compiling), ``warmup`` more times, then times ``steps`` steps over ``batches`` (cycled).

    Returns:
      ``(state, last metrics, compile seconds, mean seconds per timed step)``.
    """
    import jax

    t0 = time.perf_counter()
    state, m = step(state, batches[0])
    jax.block_until_ready(m["loss"])
    compile_s = time.perf_counter() - t0
    for i in range(warmup):
        state, m = step(state, batches[i % len(batches)])
    jax.block_until_ready(m["loss"])
    t0 = time.perf_counter()
    for i in range(steps):
        state, m = step(state, batches[i % len(batches)])
    jax.block_until_ready(m["loss"])
    return state, m, compile_s, (time.perf_counter() - t0) / steps


def flops_per_token(cfg, seq: int) -> float:
    """Training FLOPs per token: 6N + 12 L T d (see the module docstring)."""
    return 6.0 * cfg.num_params() + 12.0 * cfg.n_layers * seq * cfg.d_model


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt2", help="preset name (random init) or an HF dir / .gguf path")
    p.add_argument("--method", default="both", choices=["full", "lora", "both"])
    p.add_argument("--mesh", default="data=-1", help="device mesh, e.g. data=8, data=2,fsdp=4, fsdp=2,tensor=4")
    p.add_argument("--pmap", action="store_true", help="time the jax.pmap data-parallel step instead")
    p.add_argument("--batch", type=int, default=8, help="global batch (rows)")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after the compiling one")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    p.add_argument("--frozen-dtype", default=None, choices=["float32", "bfloat16"],
                   help="storage of LoRA's frozen base (default: the compute dtype)")
    p.add_argument("--remat", action="store_true", help="rematerialize each block in the backward pass")
    p.add_argument("--attention", default="auto", choices=["auto", "xla", "cudnn"])
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-targets", default=None, help="comma-separated modules (default: q and v)")
    p.add_argument("--peak-tflops", type=float, default=None, help="per-device peak for MFU")
    p.add_argument("--cpu-devices", type=int, default=None, help="simulate this many CPU devices")
    p.add_argument("--distributed", action="store_true", help="multi-host: jax.distributed.initialize() first")
    p.add_argument("--json", default=None, help="append the results (one JSON object per method) to this file")
    return p


def run_method(args, method: str, mesh) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jlora
    from jlora import parallel, train

    if args.model in jlora.PRESETS:
        cfg = jlora.preset(args.model)
        params = jlora.init_params(cfg, jax.random.key(0))
    else:
        from jlora.model_path import resolve_model

        cfg, params = jlora.load_pretrained(resolve_model(args.model))
    cfg = cfg.replace(dtype=args.dtype, remat=args.remat, attention=args.attention)
    if method == "lora":
        frozen = jnp.dtype(args.frozen_dtype or args.dtype)
        params = jax.tree_util.tree_map(lambda x: x.astype(frozen), params)
        targets = args.lora_targets.split(",") if args.lora_targets else None
        params = jlora.lora.init(jax.random.key(1), cfg, params,
                                 jlora.LoraConfig(r=args.lora_r, alpha=2 * args.lora_r, target_modules=targets))
    labels = jlora.trainable_labels(params)
    tx = train.make_optimizer(labels, 1e-4)
    rng = np.random.default_rng(0)
    n_local = jax.local_device_count()
    local_rows = args.batch // jax.process_count()
    host_batches = [{"input_ids": rng.integers(0, cfg.vocab_size, (local_rows, args.seq + 1)).astype(np.int32)}
                    for _ in range(2)]
    if args.pmap:
        state = parallel.replicate(train.init_state(params, tx, 0))
        step = parallel.make_pmap_train_step(cfg, tx, labels)
        batches = [parallel.split_batch(b, n_local) for b in host_batches]
        state_bytes = parallel.per_device_bytes((state.params, state.opt_state))
        n_dev = n_local * jax.process_count()
    else:
        state, shardings = parallel.init_sharded_state(params, tx, mesh, 0)
        step = parallel.make_sharded_train_step(cfg, tx, labels, mesh, shardings)
        batches = [parallel.global_batch(b, mesh) for b in host_batches]
        state_bytes = parallel.per_device_bytes((state.params, state.opt_state))
        n_dev = mesh.devices.size
    del params
    state, m, compile_s, step_s = time_steps(step, state, batches, args.warmup, args.steps)
    tokens_s = args.batch * args.seq / step_s
    kind = jax.devices()[0].device_kind
    peak = peak_flops(kind, args.peak_tflops)
    out = {"method": method, "model": args.model, "mesh": "pmap" if args.pmap else parallel.mesh_str(mesh),
           "devices": n_dev, "device": kind, "platform": jax.devices()[0].platform, "dtype": args.dtype,
           "batch": args.batch, "seq": args.seq, "step_s": step_s, "tokens_per_s": tokens_s,
           "tokens_per_s_per_device": tokens_s / n_dev, "compile_s": compile_s,
           "loss": float(np.asarray(m["loss"]).reshape(-1)[0]), "n_params": cfg.num_params(),
           "trainable": jlora.param_report(jax.tree_util.tree_map(lambda x: x[0], state.params)
                                           if args.pmap else state.params, labels)["trainable"],
           "state_bytes_per_device": state_bytes, "flops_per_token": flops_per_token(cfg, args.seq),
           "mfu": None if peak is None else tokens_s * flops_per_token(cfg, args.seq) / (n_dev * peak)}
    try:
        stats = jax.local_devices()[0].memory_stats()
        if stats and "peak_bytes_in_use" in stats:
            out["peak_device_mb"] = stats["peak_bytes_in_use"] / 2**20
    except Exception:  # noqa: BLE001 - backends without memory stats (CPU)
        pass
    return out


def main(argv: Optional[Sequence[str]] = None) -> list:
    args = build_parser().parse_args(argv)
    import jax

    if args.cpu_devices:
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    if args.distributed:
        from jlora.parallel import initialize_distributed

        initialize_distributed()
    from jlora import parallel

    mesh = None if args.pmap else parallel.make_mesh(args.mesh)
    methods = ["full", "lora"] if args.method == "both" else [args.method]
    results = []
    for method in methods:
        r = run_method(args, method, mesh)
        results.append(r)
        if jax.process_index() == 0:
            mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
            print(f"{method:5s} {r['model']} {r['mesh']} x{r['devices']} {r['device']} {r['dtype']}: "
                  f"{r['tokens_per_s']:,.0f} tok/s ({r['tokens_per_s_per_device']:,.0f} per device), "
                  f"step {1e3 * r['step_s']:.1f} ms, compile {r['compile_s']:.1f} s, MFU {mfu}, "
                  f"params+opt {r['state_bytes_per_device'] / 2**20:.1f} MiB per device"
                  + (f", peak {r['peak_device_mb']:.0f} MiB" if "peak_device_mb" in r else ""), flush=True)
    if len(results) == 2 and jax.process_index() == 0:
        print(f"LoRA / full throughput: {results[1]['tokens_per_s'] / results[0]['tokens_per_s']:.3f}x "
              f"(LoRA paper: 1.33x on GPT-3; FLOPs bound ~1.5x)")
    if args.json and jax.process_index() == 0:
        with open(args.json, "a") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")
    return results


if __name__ == "__main__":
    main()
