"""Decode speed per PEFT method on one model: the inference cost of methods that cannot be merged, as numbers.

    python bench/method_decode.py                    # the built-in SmolLM2-135M-Instruct GGUF, batch 1
    python bench/method_decode.py --new-tokens 128 --batch 4 --frameworks jlora,torch

For each method -- the base, LoRA unmerged (r=8 on q, v), LoRA merged (the same adapter folded in), a bottleneck
adapter (AdapterHub's seq_bn defaults), prefix tuning and prompt tuning (20 virtual tokens) -- greedy decoding with
EOS disabled, so every run produces exactly --new-tokens tokens per sequence. jlora's decode is timed on its second
call (compiled; the fastest of --repeats rounds that call every method in turn); the first call is reported as compile + run. ``--frameworks jlora,torch`` also times transformers +
PEFT's ``generate`` on the same methods (no bottleneck adapter: PEFT has none) in its own subprocess. Ratios are
printed against each framework's own base, and jlora against torch per method.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

PROMPT = "Explain in a few sentences why the sky is blue."
METHODS = ("base", "lora", "lora_merged", "adapter", "prefix", "prompt")
VIRTUAL = 20


def _jlora_params(method, cfg, base):
    import jax

    import jlora
    from jlora.peft import base as B

    if method == "base":
        return base
    kind = "lora" if method.startswith("lora") else method
    opts = {"lora": {"r": 8, "alpha": 16.0, "target_modules": ["q_proj", "v_proj"], "init": False},
            "adapter": {}, "prefix": {"num_virtual_tokens": VIRTUAL}, "prompt": {"num_virtual_tokens": VIRTUAL}}[kind]
    m = B.get(kind)
    params = m.init(jax.random.key(1), cfg, base, m.make_config(opts))
    return jlora.merge(params) if method == "lora_merged" else params


def _rounds(calls: dict, repeats: int) -> dict:
    """{method: fastest seconds}: every method is called once per round, ``repeats`` rounds, so drift and other
    work on the host (a shared CPU) hit all methods alike instead of whichever happened to run first."""
    best = {m: float("inf") for m in calls}
    for _ in range(repeats):
        for m, call in calls.items():
            t0 = time.perf_counter()
            call()
            best[m] = min(best[m], time.perf_counter() - t0)
    return best


def run_jlora(a):
    import jax

    import jlora

    cfg, base = jlora.load_pretrained(a.model)
    tok = jlora.load_tokenizer(a.model)
    ids = tok.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=True)
    calls, first, counts = {}, {}, {}
    for method in a.methods.split(","):
        try:
            params = _jlora_params(method, cfg, base)
        except ValueError as e:  # e.g. a method not registered in this checkout
            print(f"jlora {method}: skipped ({e})", file=sys.stderr)
            continue
        call = (lambda p=params: jlora.generate(cfg, p, [ids] * a.batch, a.new_tokens, eos_token_id=()))
        t0 = time.perf_counter()
        counts[method] = sum(len(r) for r in call())
        first[method] = time.perf_counter() - t0
        calls[method] = call
    best = _rounds(calls, a.repeats)
    return [{"framework": "jlora", "method": m, "decode_tok_s": counts[m] / best[m], "generate_s": best[m],
             "first_call_s": first[m], "new_tokens": counts[m], "device": jax.devices()[0].device_kind}
            for m in calls]


def run_torch(a):
    import copy

    import peft
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 1)
    d, f = os.path.split(a.model)
    base = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=f)
    ids = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"].repeat(a.batch, 1)
    calls, counts = {}, {}
    for method in a.methods.split(","):
        if method == "adapter":
            continue
        model = copy.deepcopy(base)
        if method.startswith("lora"):
            model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                               init_lora_weights=False))
            if method == "lora_merged":
                model = model.merge_and_unload()
        elif method == "prefix":
            model = peft.get_peft_model(model, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL))
        elif method == "prompt":
            model = peft.get_peft_model(model, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL))
        model.eval()
        kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=a.new_tokens,
                  min_new_tokens=a.new_tokens, do_sample=False, pad_token_id=0)

        def call(model=model, kw=kw):
            with torch.no_grad():
                return model.generate(**kw)

        with torch.no_grad():
            model.generate(**{**kw, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
        counts[method] = a.new_tokens * a.batch
        calls[method] = call
    best = _rounds(calls, a.repeats)
    return [{"framework": "torch", "method": m, "decode_tok_s": counts[m] / best[m], "generate_s": best[m],
             "new_tokens": counts[m], "device": "cpu"} for m in calls]


def main(argv=None):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from jlora.model_path import find_default_model

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="a .gguf file (default: the built-in SmolLM2-135M-Instruct)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="timed calls per method; the fastest counts")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--frameworks", default="jlora")
    p.add_argument("--json", default=None)
    p.add_argument("--single", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.model = a.model or find_default_model()
    if a.single:
        print(json.dumps(run_jlora(a) if a.single == "jlora" else run_torch(a)))
        return
    results = []
    for fw in a.frameworks.split(","):
        cmd = [sys.executable, __file__, "--single", fw, "--model", a.model, "--new-tokens", str(a.new_tokens),
               "--batch", str(a.batch), "--methods", a.methods, "--repeats", str(a.repeats)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            print(f"{fw} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        results += json.loads(proc.stdout.strip().splitlines()[-1])
    by = {(r["framework"], r["method"]): r for r in results}
    print(f"model={os.path.basename(a.model)} batch={a.batch} new_tokens={a.new_tokens}")
    for r in results:
        b = by.get((r["framework"], "base"))
        rel = f"  x{r['decode_tok_s'] / b['decode_tok_s']:.2f} of base" if b else ""
        first = f"  first call {r['first_call_s']:.1f} s" if "first_call_s" in r else ""
        vs = by.get(("torch", r["method"])) if r["framework"] == "jlora" else None
        ratio = f"  jlora/torch x{r['decode_tok_s'] / vs['decode_tok_s']:.2f}" if vs else ""
        print(f"{r['framework']:>6} {r['method']:>12}: {r['decode_tok_s']:8.1f} tok/s{rel}{first}{ratio}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
