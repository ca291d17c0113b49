"""Training throughput and peak memory: jlora vs PyTorch (transformers + PEFT), side by side in one run.

Each (framework, method) configuration runs in its own subprocess so that its peak RSS is its own. Prints a
table and the ratios; ``--json FILE`` writes the raw numbers.

    python bench/train_throughput.py --model smollm2-135m --batch 8 --seq 128 --steps 5
    python bench/train_throughput.py --model gpt2 --dtype bfloat16 --batch 16 --seq 1024   # on a GPU

Model: a preset name (random init, same shapes as the real model) or a path (.gguf / HF dir). Methods
(``--methods lora,dora,ia3,prefix,prompt,adapter,full``): LoRA and DoRA are r=8, alpha 16 on q and v (PEFT's
``c_attn`` for GPT-2, which holds q, k and v); IA3 uses PEFT's default targets (GPT-2 ``c_attn``, ``mlp.c_proj``;
Llama ``k_proj``, ``v_proj``, ``down_proj``, the last one feed-forward); prefix and prompt tuning 20 virtual tokens;
the same configs on both sides (bottleneck adapters: jlora only, AdapterHub's default config). FLOPs per token for MFU: 6N + 12 L T d
(training, attention included; LoRA counted with the same model FLOPs, as the LoRA paper does).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments.throughput import peak_flops, time_steps  # noqa: E402  (the shared timing loop and peak table)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _targets(arch):
    return ["c_attn"] if arch == "gpt2" else ["q_proj", "v_proj"]


VIRTUAL = 20  # prefix / prompt tuning: num_virtual_tokens


def _jlora_options(method: str, arch: str) -> dict:
    """The [method] options of each benchmarked method (the same configs as the PEFT side)."""
    if method == "ia3":
        return {}
    if method in ("prefix", "prompt"):
        return {"num_virtual_tokens": VIRTUAL}
    if method == "adapter":
        return {}  # AdapterHub's defaults (no PEFT counterpart: jlora only)
    return {"r": 8, "alpha": 16.0, "target_modules": _targets(arch)}


def run_jlora(a) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jlora
    from jlora import train

    if a.model in jlora.PRESETS:
        cfg = jlora.preset(a.model)
        params = jlora.init_params(cfg, jax.random.key(0))
    else:  # a quantized frozen base (QLoRA) is quantized as it loads ("gguf": the file's own blocks kept)
        cfg, params = jlora.load_pretrained(a.model, quantize=a.quantize)
    cfg = cfg.replace(dtype=a.dtype, remat=a.remat, attention=a.attention)
    if a.quantize and a.model in jlora.PRESETS:
        from jlora.quant import quantize_params

        params = quantize_params(cfg, params, a.quantize)
    if a.method != "full":
        from jlora.peft import base as B

        method = B.get(a.method)
        opts = _jlora_options(a.method, cfg.arch)
        params = method.init(jax.random.key(1), cfg, params, method.make_config(opts))
        if a.frozen_dtype != "float32":  # a frozen base may be stored in bf16
            labels = jlora.trainable_labels(params)
            tr, fr = jlora.split(params, labels)
            fr = jax.tree_util.tree_map(lambda x: x.astype(a.frozen_dtype), fr)
            params = jlora.combine(tr, fr, labels)
    labels = jlora.trainable_labels(params)
    tx = train.make_optimizer(labels, 1e-4)
    state = train.init_state(params, tx)
    del params
    step = jax.jit(train.make_train_step(cfg, tx, labels), donate_argnums=0)
    rng = np.random.default_rng(0)
    batches = [{"input_ids": jnp.asarray(rng.integers(0, cfg.vocab_size, (a.batch, a.seq + 1)), jnp.int32)}
               for _ in range(2)]
    state, m, compile_s, dt = time_steps(step, state, batches, a.warmup, a.steps)
    out = {"framework": "jlora", "method": a.method, "step_s": dt, "tokens_per_s": a.batch * a.seq / dt,
           "compile_s": compile_s, "loss": float(m["loss"]), "peak_rss_mb": _peak_rss_mb(),
           "n_params": cfg.num_params(), "trainable": jlora.param_report(state.params, labels)["trainable"],
           "device": jax.devices()[0].device_kind, "L": cfg.n_layers, "d": cfg.d_model,
           "attention": jlora.model.attention_impl(cfg, jnp.dtype(cfg.dtype), False)}
    try:
        stats = jax.devices()[0].memory_stats()
        if stats and "peak_bytes_in_use" in stats:
            out["peak_device_mb"] = stats["peak_bytes_in_use"] / 2**20
    except Exception:  # CPU has no memory stats
        pass
    return out


def run_torch(a) -> dict:
    import numpy as np
    import torch
    import transformers

    import jlora
    from jlora.convert.hf import config_to_hf

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    if a.model in jlora.PRESETS:
        cfg = jlora.preset(a.model)
        d = config_to_hf(cfg)
        hf_cfg = transformers.AutoConfig.for_model(d.pop("model_type"), **d)
        model = transformers.AutoModelForCausalLM.from_config(hf_cfg)
    elif a.model.endswith(".gguf"):
        d, f = os.path.split(a.model)
        model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    model.config.use_cache = False
    model.to(dev).train()
    if a.remat:
        model.gradient_checkpointing_enable()
    if a.method != "full":
        import peft

        arch = "gpt2" if model.config.model_type == "gpt2" else "llama"
        if a.method == "ia3":
            pcfg = peft.IA3Config(task_type="CAUSAL_LM")
        elif a.method == "prefix":
            pcfg = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL)
        elif a.method == "prompt":
            pcfg = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL)
        else:
            pcfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=_targets(arch), lora_dropout=0.0,
                                   use_dora=a.method == "dora")
        model = peft.get_peft_model(model, pcfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
    rng = np.random.default_rng(0)
    vocab = model.config.vocab_size
    batches = [torch.from_numpy(rng.integers(0, vocab, (a.batch, a.seq + 1))).to(dev) for _ in range(2)]
    amp = torch.autocast(dev, dtype=torch.bfloat16, enabled=a.dtype == "bfloat16")

    def step(ids):
        with amp:
            out = model(input_ids=ids[:, :-1], labels=ids[:, :-1])
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss

    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    loss = step(batches[0])
    sync()
    first = time.perf_counter() - t0
    for i in range(a.warmup):
        step(batches[i % 2])
    sync()
    t0 = time.perf_counter()
    for i in range(a.steps):
        loss = step(batches[i % 2])
    sync()
    dt = (time.perf_counter() - t0) / a.steps
    out = {"framework": "torch+peft" if a.method != "full" else "torch", "method": a.method, "step_s": dt,
           "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
           "tokens_per_s": a.batch * a.seq / dt, "compile_s": first, "loss": float(loss),
           "peak_rss_mb": _peak_rss_mb(), "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu"}
    if dev == "cuda":
        out["peak_device_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def _mfu(r, a):
    peak = peak_flops(str(r.get("device", "")), None)
    if not peak or "n_params" not in r:
        return None
    flops_per_token = 6 * r["n_params"] + 12 * r["L"] * a.seq * r["d"]
    return r["tokens_per_s"] * flops_per_token / peak


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--frozen-dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--remat", action="store_true")
    p.add_argument("--quantize", default=None, help="jlora only: nf4 | fp4 | int8 | gguf frozen base (QLoRA)")
    p.add_argument("--attention", default="auto", choices=["auto", "xla", "cudnn"])
    p.add_argument("--methods", default="lora,full", help="comma list of lora, dora, ia3, prefix, prompt, adapter, full")
    p.add_argument("--frameworks", default="jlora,torch")
    p.add_argument("--json", default=None)
    p.add_argument("--single", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.single:
        fw, a.method = a.single.split(":")
        print(json.dumps(run_jlora(a) if fw == "jlora" else run_torch(a)))
        return
    results = []
    for method in a.methods.split(","):
        for fw in a.frameworks.split(","):
            if fw == "torch" and (method == "adapter" or a.quantize):
                continue  # bottleneck adapters are AdapterHub's, not PEFT's: jlora's numbers only
            cmd = [sys.executable, __file__, "--single", f"{fw}:{method}"] + [
                x for x in (argv if argv is not None else sys.argv[1:])]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                print(f"{fw}/{method} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            r["mfu"] = _mfu(r, a)
            results.append(r)
            mfu = f"  MFU {100 * r['mfu']:.1f}%" if r.get("mfu") else ""
            dev_mem = f"  device peak {r['peak_device_mb']:.0f} MB" if "peak_device_mb" in r else ""
            print(f"{fw:>10} {method:>5}: {r['trainable']:>11,} trainable  {r['tokens_per_s']:9.1f} tok/s  step {r['step_s'] * 1000:8.1f} ms  "
                  f"first step {r['compile_s']:6.1f} s  peak RSS {r['peak_rss_mb']:7.0f} MB{dev_mem}{mfu}",
                  flush=True)
    by = {(r["framework"].split("+")[0], r["method"]): r for r in results}
    print(f"model={a.model} batch={a.batch} seq={a.seq} dtype={a.dtype} device={results[0]['device'] if results else '?'}")
    for method in a.methods.split(","):
        j, t = by.get(("jlora", method)), by.get(("torch", method))
        if j and t:
            print(f"ratio jlora/torch {method}: tokens/s x{j['tokens_per_s'] / t['tokens_per_s']:.2f}, "
                  f"peak RSS x{j['peak_rss_mb'] / t['peak_rss_mb']:.2f}")
    jl, jf = by.get(("jlora", "lora")), by.get(("jlora", "full"))
    if jl and jf:
        print(f"jlora LoRA step / full step: {jl['step_s'] / jf['step_s']:.3f} (FLOPs floor ~0.67)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
