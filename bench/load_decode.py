"""Load time, forward compile time and greedy decode speed: jlora vs transformers, side by side in one run.

    python bench/load_decode.py                      # the built-in SmolLM2-135M-Instruct GGUF
    python bench/load_decode.py --model DIR_OR_GGUF --new-tokens 128 --batch 1

Each framework runs in its own subprocess (separate peak RSS). Decoding is greedy with EOS disabled so both
produce exactly --new-tokens tokens; jlora's decode is timed on its second call (compiled) and its first call
is reported separately as compile + run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

PROMPT = "Explain in a few sentences why the sky is blue."


def _rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_jlora(a):
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jlora

    t0 = time.perf_counter()
    cfg, params = jlora.load_pretrained(a.model)
    jax.block_until_ready(params)
    load_s = time.perf_counter() - t0
    tok = jlora.load_tokenizer(a.model)
    ids = tok.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=True)
    x = jnp.asarray([ids] * a.batch, jnp.int32)
    t0 = time.perf_counter()
    jax.block_until_ready(jlora.apply(cfg, params, x))
    fwd_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    jax.block_until_ready(jlora.apply(cfg, params, x))
    fwd = time.perf_counter() - t0
    prompts = [ids] * a.batch
    t0 = time.perf_counter()
    out = jlora.generate(cfg, params, prompts, a.new_tokens, eos_token_id=())
    gen_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = jlora.generate(cfg, params, prompts, a.new_tokens, eos_token_id=())
    gen = time.perf_counter() - t0
    n = sum(len(o) for o in out)
    return {"framework": "jlora", "load_s": load_s, "forward_first_s": fwd_first, "forward_s": fwd,
            "generate_first_s": gen_first, "generate_s": gen, "new_tokens": n, "decode_tok_s": n / gen,
            "text": tok.decode(out[0], skip_special_tokens=True), "peak_rss_mb": _rss_mb(),
            "device": jax.devices()[0].device_kind}


def run_torch(a):
    import torch
    import transformers

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.perf_counter()
    if a.model.endswith(".gguf"):
        d, f = os.path.split(a.model)
        model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
        tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=f)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
        tok = transformers.AutoTokenizer.from_pretrained(a.model)
    model.to(dev).eval()
    load_s = time.perf_counter() - t0
    ids = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                  tokenize=True, return_dict=False)
    x = torch.tensor([list(ids)] * a.batch, device=dev)
    with torch.no_grad():
        t0 = time.perf_counter()
        model(x)
        fwd_first = time.perf_counter() - t0
        t0 = time.perf_counter()
        model(x)
        fwd = time.perf_counter() - t0
        kw = dict(max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, do_sample=False,
                  attention_mask=torch.ones_like(x), pad_token_id=tok.eos_token_id)
        t0 = time.perf_counter()
        model.generate(x, **kw)
        gen_first = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = model.generate(x, **kw)
        gen = time.perf_counter() - t0
    n = (out.shape[1] - x.shape[1]) * a.batch
    return {"framework": "transformers", "load_s": load_s, "forward_first_s": fwd_first, "forward_s": fwd,
            "generate_first_s": gen_first, "generate_s": gen, "new_tokens": n, "decode_tok_s": n / gen,
            "text": tok.decode(out[0, x.shape[1]:], skip_special_tokens=True), "peak_rss_mb": _rss_mb(),
            "device": dev}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="HF dir or .gguf (default: the built-in SmolLM2 GGUF)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--frameworks", default="jlora,torch")
    p.add_argument("--json", default=None)
    p.add_argument("--single", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.model is None:
        from jlora.model_path import default_model_path

        try:
            a.model = default_model_path()
        except FileNotFoundError as e:
            raise SystemExit(f"load_decode: {e}") from None
    if a.single:
        print(json.dumps(run_jlora(a) if a.single == "jlora" else run_torch(a)))
        return
    results = {}
    for fw in a.frameworks.split(","):
        cmd = [sys.executable, __file__, "--single", fw, "--model", a.model, "--new-tokens", str(a.new_tokens),
               "--batch", str(a.batch)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            print(f"{fw} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        results[fw] = r
        print(f"{r['framework']:>12}: load {r['load_s']:6.2f} s | forward first call {r['forward_first_s']:6.2f} s, "
              f"then {r['forward_s'] * 1000:7.1f} ms | generate {r['new_tokens']} tokens: first call "
              f"{r['generate_first_s']:6.2f} s, then {r['generate_s']:6.2f} s = {r['decode_tok_s']:7.1f} tok/s | "
              f"peak RSS {r['peak_rss_mb']:6.0f} MB", flush=True)
        print(f"{'':>14}{r['text'][:100]!r}")
    if "jlora" in results and "torch" in results:
        j, t = results["jlora"], results["torch"]
        print(f"ratios jlora/transformers: load time x{j['load_s'] / t['load_s']:.2f}, decode tokens/s "
              f"x{j['decode_tok_s'] / t['decode_tok_s']:.2f}, peak RSS x{j['peak_rss_mb'] / t['peak_rss_mb']:.2f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
