"""A bounded load test of ``jlora serve`` on 127.0.0.1: latency p50/p99 and throughput with N concurrent clients.

    python bench/serve_load.py                              # SmolLM2-135M-Instruct, 8 LoRA adapters, 1/4/8 clients
    python bench/serve_load.py --clients 1,8,16 --requests 4 --max-tokens 32

The server runs as its own process (``jlora serve``, as a user starts it) with 8 random LoRA adapters (ranks 4-16,
q,v or all linear) written as PEFT directories; the clients are threads using the official ``openai`` client.
Each client sends ``--requests`` chat requests one after another, each to an adapter drawn in turn (so concurrent
requests mix adapters), greedy, streaming, with ``ignore_eos`` (so every request makes exactly ``--max-tokens`` tokens), and the time to first token (TTFT) and the total latency are recorded per request. The whole load
runs once unmeasured first (the compilations of each batch size and prompt bucket happen then), then measured.
The same load runs against a server with ``--max-batch 1`` (no batching) for the ratio. Results go to
bench/results/serve-load/ as JSON.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time

QUESTIONS = ["What is the capital of France?", "Name three primary colors.", "Why is the sky blue?",
             "How many legs does a spider have?", "What is 12 times 12?", "Who wrote Hamlet?",
             "What is photosynthesis?", "Give a synonym for happy.", "What does a CPU do?",
             "Translate 'good morning' to Spanish.", "What is the boiling point of water?", "Define gravity."]


def _cpu() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "?")
        flags = next((ln for ln in out.splitlines() if ln.startswith("Flags")), "")
        return f"{name} ({os.cpu_count()} cores{', AVX-512' if 'avx512f' in flags else ''})"
    except OSError:
        return platform.processor() or "?"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_adapters(model: str, out: str, n: int) -> list:
    import jax

    import jlora

    cfg, base = jlora.load_pretrained(model)
    names = []
    for i in range(n):
        r = (4, 8, 16)[i % 3]
        targets = ["q_proj", "v_proj"] if i % 2 == 0 else ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                            "up_proj", "down_proj"]
        tree = jlora.lora.init(jax.random.key(100 + i), cfg, base,
                               jlora.LoraConfig(r=r, alpha=2.0 * r, target_modules=targets, init=False))
        d = os.path.join(out, f"ad{i}")
        jlora.save_adapter(cfg, tree, d)
        names.append(f"ad{i}={d}")
    return names


def run_load(model, adapters, clients, requests, max_tokens, max_batch, log):
    import openai

    port = _free_port()
    cmd = [sys.executable, "-m", "jlora.cli", "serve", "--model", model, "--port", str(port), "--max-batch",
           str(max_batch), "--queue-size", "256", "--log-level", "warning", "--name", "base"]
    for a in adapters:
        cmd += ["--adapter", a]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)
    url = f"http://127.0.0.1:{port}/v1"
    c = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
    names = [a.split("=", 1)[0] for a in adapters]
    try:
        while True:
            try:
                c.models.list()
                break
            except openai.APIConnectionError:
                if proc.poll() is not None:
                    raise RuntimeError(f"the server exited ({proc.returncode}); see {log.name}")
                time.sleep(0.2)
        startup = time.perf_counter() - t0

        def one(k, i):
            q = QUESTIONS[(k * 7 + i) % len(QUESTIONS)]
            model_name = names[(k + i) % len(names)] if names else "base"
            t = time.perf_counter()
            ttft, n = None, 0
            for ch in c.chat.completions.create(model=model_name, messages=[{"role": "user", "content": q}],
                                                max_tokens=max_tokens, temperature=0, stream=True,
                                                stream_options={"include_usage": True},
                                                extra_body={"ignore_eos": True}):
                if ch.choices and ch.choices[0].delta.content and ttft is None:
                    ttft = time.perf_counter() - t
                if ch.usage:
                    n = ch.usage.completion_tokens
            return {"latency": time.perf_counter() - t, "ttft": ttft if ttft is not None else float("nan"),
                    "tokens": n, "adapter": model_name}

        # warm-up: compile every batch size the load will use (powers of two up to the largest)
        for b in sorted({min(1 << (k - 1).bit_length(), max_batch) for k in range(1, max(clients) + 1)}):
            with cf.ThreadPoolExecutor(b) as pool:
                list(pool.map(lambda k: one(k, 0), range(b)))
        # a whole pass of the load first: joins compile their shapes (prompt bucket x batch size) as they occur
        for n in clients:
            with cf.ThreadPoolExecutor(n) as pool:
                list(pool.map(lambda k: [one(k, i) for i in range(requests)], range(n)))
        results = {}
        for n in clients:
            t = time.perf_counter()
            with cf.ThreadPoolExecutor(n) as pool:
                futs = [pool.submit(lambda k=k: [one(k, i) for i in range(requests)]) for k in range(n)]
                recs = [r for f in futs for r in f.result()]
            wall = time.perf_counter() - t
            results[n] = {"requests": len(recs), "wall_s": wall, "records": recs,
                          "tokens_per_s": sum(r["tokens"] for r in recs) / wall}
        return {"startup_s": startup, "results": results}
    finally:
        proc.terminate()
        proc.wait(60)


def pct(xs, p):
    import numpy as np

    return float(np.percentile(np.asarray(xs, float), p))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default: the built-in SmolLM2-135M-Instruct GGUF")
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--clients", default="1,4,8")
    ap.add_argument("--requests", type=int, default=3, help="requests per client, one after another")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--no-baseline", action="store_true", help="skip the --max-batch 1 server")
    ap.add_argument("--out", default="bench/results/serve-load")
    a = ap.parse_args()
    import jlora

    model = a.model or jlora.default_model_path()
    clients = [int(x) for x in a.clients.split(",")]
    os.makedirs(a.out, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, open(os.path.join(a.out, "server.log"), "w") as log:
        adapters = make_adapters(model, tmp, a.adapters)
        runs = {"batched": run_load(model, adapters, clients, a.requests, a.max_tokens, a.max_batch, log)}
        if not a.no_baseline:
            runs["unbatched"] = run_load(model, adapters, clients, a.requests, a.max_tokens, 1, log)
    report = {"date": time.strftime("%Y-%m-%d"), "cpu": _cpu(), "model": os.path.basename(model),
              "adapters": a.adapters, "max_tokens": a.max_tokens, "requests_per_client": a.requests,
              "max_batch": a.max_batch, "runs": runs}
    with open(os.path.join(a.out, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(f"jlora serve load test: {report['model']}, {a.adapters} LoRA adapters, {a.max_tokens} tokens per "
          f"request (greedy, streamed), {a.requests} requests per client; CPU: {report['cpu']}")
    print("| server | clients | requests | latency p50 | latency p99 | TTFT p50 | TTFT p99 | tokens/s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, run in runs.items():
        for n, r in run["results"].items():
            lat = [x["latency"] for x in r["records"]]
            ttft = [x["ttft"] for x in r["records"]]
            print(f"| {name} | {n} | {r['requests']} | {pct(lat, 50):.2f} s | {pct(lat, 99):.2f} s | "
                  f"{pct(ttft, 50):.2f} s | {pct(ttft, 99):.2f} s | {r['tokens_per_s']:.1f} |")
    if "unbatched" in runs:
        for n in clients:
            b, u = runs["batched"]["results"][n], runs["unbatched"]["results"][n]
            print(f"{n} clients: batched / unbatched throughput = {b['tokens_per_s'] / u['tokens_per_s']:.2f}x")


if __name__ == "__main__":
    main()
