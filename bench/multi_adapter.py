"""Many LoRA adapters on one base: the cost of a batch whose rows each use their own adapter, as numbers.

    python bench/multi_adapter.py                      # SmolLM2-135M-Instruct, 8 chat prompts, 64 new tokens
    python bench/multi_adapter.py --repeats 2 --frameworks jlora,torch

Eight LoRA adapters (ranks 4/8/16, on q, v or on every linear layer, different alphas, non-zero B) are written as
PEFT directories next to a Hugging Face copy of the base (`jlora.save_pretrained`), so that jlora and
transformers + PEFT load the very same files. Greedy decoding with EOS disabled (every row makes exactly
--new-tokens tokens) of a batch of 8 different chat questions, float32:

  mixed     the 8 rows on the 8 adapters, one batch (jlora: ``AdapterSet.generate``; PEFT: ``adapter_names``)
  single    all 8 rows on one adapter (--single-adapter) through the same set (same shapes; PEFT: adapter_names)
  unmerged  that adapter as an ordinary LoRA tree (jlora.generate; PEFT: set_adapter + generate)
  merged    that adapter folded into the base (jlora.merge; PEFT: merge_and_unload)
  base      no adapter

Throughput is new tokens/s over the batch, timed on compiled calls: the fastest of --repeats rounds, each round
calling every configuration once (a shared CPU's drift hits all alike); jlora's first call (compile + run) is
reported too. The mixed-batch token ids of both frameworks are compared row by row.

Memory, each in its own subprocess so that peak RSS is its own: the base alone vs the base with 1 or 8
adapters in an `AdapterSet` (each loads, then makes one generate call); the bytes of the parameter arrays (sum
of leaf nbytes), `AdapterSet.adapter_bytes()` (device bytes of one slot) and per adapter its own bytes vs the
size of its safetensors file.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from method_decode import _rounds  # noqa: E402  (every configuration once per round, fastest kept)

QV = ["q_proj", "v_proj"]
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# name, rank, alpha, target modules
ADAPTERS = [("a0", 8, 16.0, QV), ("a1", 4, 8.0, QV), ("a2", 16, 32.0, QV), ("a3", 8, 8.0, ALL),
            ("a4", 4, 16.0, ALL), ("a5", 16, 16.0, ALL), ("a6", 4, 4.0, QV), ("a7", 16, 64.0, ALL)]
QUESTIONS = ["Why is the sky blue?", "What is the capital of France?", "How do plants make food?",
             "Name three primary colors.", "What does a compiler do?", "Why do we need sleep?",
             "How far away is the Moon?", "What is a prime number?"]
CONFIGS = ("mixed", "single", "unmerged", "merged", "base")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _rss_now_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def _tree_bytes(tree) -> int:
    import jax

    return int(sum(getattr(x, "nbytes", 0) for x in jax.tree_util.tree_leaves(tree)))


def _prompts(work):
    with open(os.path.join(work, "prompts.json")) as f:
        return json.load(f)


# -- the subprocesses ------------------------------------------------------------------------------------------

def run_prepare(a):
    """Writes the HF copy of the base, the 8 adapters (PEFT dirs) and the prompt ids into --work."""
    import jax

    import jlora

    cfg, base = jlora.load_pretrained(a.model)
    tok = jlora.load_tokenizer(a.model)
    hf = os.path.join(a.work, "hf")
    jlora.save_pretrained(cfg, base, hf)
    tok.save(hf)
    files = {}
    for i, (name, r, alpha, targets) in enumerate(ADAPTERS):
        tree = jlora.lora.init(jax.random.key(100 + i), cfg, base,
                               jlora.LoraConfig(r=r, alpha=alpha, target_modules=targets, init=False))
        d = os.path.join(a.work, name)
        jlora.save_adapter(cfg, tree, d)
        files[name] = os.path.getsize(os.path.join(d, "adapter_model.safetensors"))
    ids = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=True) for q in QUESTIONS]
    with open(os.path.join(a.work, "prompts.json"), "w") as f:
        json.dump({"ids": ids, "pad": int(cfg.pad_token_id if cfg.pad_token_id is not None else 0)}, f)
    return {"adapter_file_bytes": files}


def run_jlora(a):
    import jax

    import jlora

    t0 = time.perf_counter()
    cfg, base = jlora.load_pretrained(a.model)
    load_s = time.perf_counter() - t0
    ids = _prompts(a.work)["ids"]
    names = [n for n, *_ in ADAPTERS]
    s = jlora.AdapterSet(cfg, base)
    for n in names:
        s.add(n, os.path.join(a.work, n))
    one = a.single_adapter
    tree = s.tree(one)
    merged = jlora.merge(tree)
    n_new = a.new_tokens
    gen = dict(eos_token_id=())
    calls = {
        "mixed": lambda: s.generate(ids, names, n_new, **gen),
        "single": lambda: s.generate(ids, [one] * len(ids), n_new, **gen),
        "unmerged": lambda: jlora.generate(cfg, tree, ids, n_new, **gen),
        "merged": lambda: jlora.generate(cfg, merged, ids, n_new, **gen),
        "base": lambda: jlora.generate(cfg, base, ids, n_new, **gen),
    }
    calls = {k: v for k, v in calls.items() if k in a.configs.split(",")}
    first, counts, texts = {}, {}, {}
    for m, call in calls.items():
        t0 = time.perf_counter()
        out = call()
        first[m] = time.perf_counter() - t0
        counts[m] = sum(len(r) for r in out)
        texts[m] = [list(map(int, r)) for r in out]
    best = _rounds(calls, a.repeats)
    rows = [{"framework": "jlora", "config": m, "tok_s": counts[m] / best[m], "generate_s": best[m],
             "first_call_s": first[m], "new_tokens": counts[m]} for m in calls]
    # An adapter replaced in place (same rank bucket, same modules): the values change, the shapes do not.
    swap = {}
    if "mixed" in calls:
        before = s.layout_changes
        new = jlora.lora.init(jax.random.key(999), cfg, base,
                              jlora.LoraConfig(r=8, alpha=16.0, target_modules=QV, init=False))
        s.add(one, new, replace=True)
        t0 = time.perf_counter()
        calls["mixed"]()
        swap = {"first_call_after_replace_s": time.perf_counter() - t0,
                "layout_changes_by_replace": s.layout_changes - before}
    return {"rows": rows, "mixed_ids": texts.get("mixed"), "load_s": load_s,
            "layout_changes": s.layout_changes - swap.get("layout_changes_by_replace", 0),
            "capacity": s.capacity, "rank_bucket": s.rank_bucket, **swap,
            "device": jax.devices()[0].device_kind, "jax": jax.__version__, "peak_rss_mb": _peak_rss_mb()}


def run_memory(a):
    """One subprocess per holding (``--single mem:base|mem:1|mem:8``): load, one generate call, peak RSS."""
    import jlora

    which = a.single.split(":")[1]
    cfg, base = jlora.load_pretrained(a.model)
    ids = _prompts(a.work)["ids"]
    out = {"holding": which, "base_param_bytes": _tree_bytes(base)}
    if which == "base":
        jlora.generate(cfg, base, ids, a.new_tokens, eos_token_id=())
        out["param_bytes"] = out["base_param_bytes"]
    else:
        names = [n for n, *_ in ADAPTERS][: int(which)]
        s = jlora.AdapterSet(cfg, base)
        for n in names:
            s.add(n, os.path.join(a.work, n))
        s.generate(ids, (names * len(ids))[: len(ids)], a.new_tokens, eos_token_id=())
        out.update(param_bytes=_tree_bytes(s.params), slot_bytes=s.adapter_bytes(), capacity=s.capacity,
                   rank_bucket=s.rank_bucket, layout_changes=s.layout_changes,
                   per_adapter_bytes={n: s.adapter_bytes(n) for n in names})
    out["peak_rss_mb"], out["rss_after_mb"] = _peak_rss_mb(), _rss_now_mb()
    return out


def run_torch(a):
    import peft
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 1)
    p = _prompts(a.work)
    hf = os.path.join(a.work, "hf")
    names = [n for n, *_ in ADAPTERS]
    one = a.single_adapter
    width = max(len(r) for r in p["ids"])
    ids = torch.tensor([[p["pad"]] * (width - len(r)) + r for r in p["ids"]])  # left-padded, masked
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in p["ids"]])
    load = lambda: transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()  # noqa: E731
    model = peft.PeftModel.from_pretrained(load(), os.path.join(a.work, names[0]), adapter_name=names[0])
    for n in names[1:]:
        model.load_adapter(os.path.join(a.work, n), adapter_name=n)
    model.eval()
    merged = peft.PeftModel.from_pretrained(load(), os.path.join(a.work, one), adapter_name=one).merge_and_unload()
    plain = load()
    # EOS disabled as in jlora (``eos_token_id=()``): EOS is an ordinary token that does not stop a row.
    # (``min_new_tokens`` would instead forbid EOS, and the greedy texts would part where jlora picks it.)
    for m in (model, model.base_model.model, merged, plain):
        m.generation_config.eos_token_id = None
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=a.new_tokens, do_sample=False,
              pad_token_id=p["pad"])

    def unmerged(**k):
        model.set_adapter(one)
        return model.generate(**kw, **k)

    fns = {"mixed": lambda **k: model.generate(**kw, adapter_names=names, **k),
           "single": lambda **k: model.generate(**kw, adapter_names=[one] * len(names), **k),
           "unmerged": unmerged,
           "merged": lambda **k: merged.generate(**kw, **k),
           "base": lambda **k: plain.generate(**kw, **k)}
    fns = {k: v for k, v in fns.items() if k in a.configs.split(",")}
    calls, out_ids = {}, {}
    for m, fn in fns.items():
        with torch.no_grad():
            out = fn()  # warm-up, and the ids
        if out.shape[1] - width != a.new_tokens:
            raise RuntimeError(f"torch {m}: {out.shape[1] - width} new tokens, not {a.new_tokens}")
        out_ids[m] = out[:, width:].tolist()

        def call(fn=fn):
            with torch.no_grad():
                return fn()
        calls[m] = call
    best = _rounds(calls, a.repeats)
    n = a.new_tokens * len(names)
    forced = _teacher_forced(a, model, ids, mask, names) if "mixed" in calls else None
    return {"rows": [{"framework": "torch", "config": m, "tok_s": n / best[m], "generate_s": best[m],
                      "new_tokens": n} for m in calls],
            "mixed_ids": out_ids.get("mixed"), "teacher_forced": forced, "torch": torch.__version__,
            "peft": peft.__version__,
            "transformers": transformers.__version__, "peak_rss_mb": _peak_rss_mb()}


def _teacher_forced(a, model, ids, mask, names):
    """PEFT's mixed-batch forward over jlora's mixed-batch sequences (prompt + jlora's new tokens): per row, how
    many of jlora's greedy tokens PEFT would also pick, and at the first it would not, by how much PEFT's own
    choice beats jlora's token (logit gap) -- a float32 near-tie or a real difference."""
    import torch

    path = os.path.join(a.work, "jlora_mixed_ids.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        new = torch.tensor(json.load(f))
    full = torch.cat([ids, new], 1)
    fmask = torch.cat([mask, torch.ones_like(new)], 1)
    pos = (fmask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=full, attention_mask=fmask, position_ids=pos, adapter_names=names).logits.float()
    pred = logits[:, ids.shape[1] - 1: -1]  # the logits that choose each new token
    chosen = pred.gather(-1, new[..., None])[..., 0]
    top2 = pred.topk(2, -1)
    out = []
    for r in range(new.shape[0]):
        bad = (top2.indices[r, :, 0] != new[r]).nonzero()
        k = int(bad[0]) if len(bad) else new.shape[1]
        row = {"agree": k}
        if k < new.shape[1]:
            row.update(gap=float(top2.values[r, k, 0] - chosen[r, k]), top1=float(top2.values[r, k, 0]),
                       jlora_token_rank2=bool(top2.indices[r, k, 1] == new[r, k]))
        out.append(row)
    return out


# -- the driver --------------------------------------------------------------------------------------------------

def _sub(a, single):
    cmd = [sys.executable, os.path.abspath(__file__), "--single", single, "--model", a.model, "--work", a.work,
           "--new-tokens", str(a.new_tokens), "--repeats", str(a.repeats), "--configs", a.configs,
           "--single-adapter", a.single_adapter]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        print(f"{single} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
        return None
    print(f"[{single}: {time.perf_counter() - t0:.0f} s]", file=sys.stderr, flush=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _agreement(x, y):
    """Per row: the number of leading new tokens on which both agree."""
    lead = []
    for r, s in zip(x, y):
        k = 0
        while k < min(len(r), len(s)) and r[k] == s[k]:
            k += 1
        lead.append(k)
    return lead


def _cpu():
    info = {}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return info
    for line in out.splitlines():
        if line.lower().startswith("model name"):
            info["model_name"] = line.split(":", 1)[1].strip()
        if line.lower().startswith("flags"):
            flags = line.split(":", 1)[1].split()
            info["avx512"] = sorted(f for f in flags if f.startswith("avx512"))
            info["amx"] = sorted(f for f in flags if f.startswith("amx"))
            info["avx2"] = "avx2" in flags
    info["cores"] = os.cpu_count()
    return info


def main(argv=None):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from jlora.model_path import find_default_model

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="a .gguf file (default: the built-in SmolLM2-135M-Instruct)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2, help="timed rounds; the fastest call of each config counts")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--single-adapter", default="a0", help="the adapter of the single/unmerged/merged rows")
    p.add_argument("--frameworks", default="jlora,torch")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-RSS subprocesses")
    p.add_argument("--work", default=None, help="where the HF base and adapter dirs go (default: a temp dir)")
    p.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "multi-adapter", "smollm2_cpu_b8.json"))
    p.add_argument("--single", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.model = a.model or find_default_model()
    if a.single:
        fn = {"prepare": run_prepare, "jlora": run_jlora, "torch": run_torch}.get(a.single, run_memory)
        print(json.dumps(fn(a)))
        return
    tmp = None
    if a.work is None:
        a.work = tmp = tempfile.mkdtemp(prefix="jlora-multi-")
    try:
        res = {"model": os.path.basename(a.model), "batch": len(QUESTIONS), "new_tokens": a.new_tokens,
               "repeats": a.repeats, "single_adapter": a.single_adapter, "cpu": _cpu(),
               "loadavg_at_start": os.getloadavg(),
               "adapters": [{"name": n, "r": r, "alpha": al, "target_modules": t} for n, r, al, t in ADAPTERS]}
        prep = _sub(a, "prepare")
        if prep is None:
            return 1
        res.update(prep)
        fws = a.frameworks.split(",")
        for fw in fws:
            res[fw] = _sub(a, fw)
            if fw == "jlora" and res[fw] and res[fw].get("mixed_ids"):
                with open(os.path.join(a.work, "jlora_mixed_ids.json"), "w") as f:
                    json.dump(res[fw]["mixed_ids"], f)
        if not a.no_memory:
            res["memory"] = {h: _sub(a, f"mem:{h}") for h in ("base", "1", "8")}
        _report(res)
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def _report(res):
    j, t = res.get("jlora"), res.get("torch")
    by = {(r["framework"], r["config"]): r for x in (j, t) if x for r in x["rows"]}
    print(f"model={res['model']} batch={res['batch']} new_tokens={res['new_tokens']} "
          f"cpu={res['cpu'].get('model_name')} avx512={'yes' if res['cpu'].get('avx512') else 'no'}")
    for fw in ("jlora", "torch"):
        if not res.get(fw):
            continue
        m = by.get((fw, "mixed"))
        for c in CONFIGS:
            r = by.get((fw, c))
            if not r:
                continue
            rel = f"  mixed/this x{m['tok_s'] / r['tok_s']:.2f}" if m and c != "mixed" else ""
            first = f"  first call {r['first_call_s']:.1f} s" if "first_call_s" in r else ""
            vs = by.get(("torch", c)) if fw == "jlora" else None
            ratio = f"  jlora/torch x{r['tok_s'] / vs['tok_s']:.2f}" if vs else ""
            print(f"{fw:>6} {c:>9}: {r['tok_s']:8.1f} tok/s{rel}{first}{ratio}")
    if j:
        print(f"jlora: layout changes for 8 adapters {j['layout_changes']} (capacity {j['capacity']}, rank bucket "
              f"{j['rank_bucket']}); replacing one in place: {j.get('layout_changes_by_replace')} layout changes, "
              f"next mixed call {j.get('first_call_after_replace_s', float('nan')):.2f} s")
    if j and t and j.get("mixed_ids") and t.get("mixed_ids"):
        lead = _agreement(j["mixed_ids"], t["mixed_ids"])
        n = res["new_tokens"]
        res["agreement_leading_tokens"] = lead
        print(f"mixed batch, jlora vs PEFT: leading tokens equal per row {lead} of {n}; "
              f"{sum(k == n for k in lead)}/{len(lead)} rows identical")
    if t and t.get("teacher_forced"):
        def row(i, r):
            if "gap" not in r:
                return f"row {i}: agrees {r['agree']}"
            second = ", jlora's token 2nd" if r["jlora_token_rank2"] else ""
            return (f"row {i}: agrees {r['agree']}, then PEFT prefers its token by {r['gap']:.2g} (top logit "
                    f"{r['top1']:.1f}{second})")
        print("PEFT forward on jlora's mixed sequences: " + "; ".join(
            row(i, r) for i, r in enumerate(t["teacher_forced"])))
    mem = res.get("memory") or {}
    for h, m in mem.items():
        if not m:
            continue
        extra = (f"  slot {m['slot_bytes'] / 2**20:.2f} MiB, capacity {m['capacity']}, rank bucket "
                 f"{m['rank_bucket']}") if "slot_bytes" in m else ""
        print(f"memory {h:>4}: params {m['param_bytes'] / 2**20:8.1f} MiB  peak RSS {m['peak_rss_mb']:7.0f} MB  "
              f"RSS after {m['rss_after_mb']:7.0f} MB{extra}")
    m8 = mem.get("8")
    if m8:
        for n, b in m8["per_adapter_bytes"].items():
            print(f"  {n}: {b / 2**20:6.2f} MiB own terms, file {res['adapter_file_bytes'][n] / 2**20:6.2f} MiB")


if __name__ == "__main__":
    sys.exit(main())
