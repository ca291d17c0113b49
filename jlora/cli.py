"""The ``jlora`` command. Thin: every verb parses flags and calls library functions the tests also call."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

# Model-path resolution lives in the library (`jlora.model_path`); these names stay importable from here.
# Its FileNotFoundError (default model not installed) becomes main's "jlora <command>: error: ..." line.
from jlora.model_path import (  # noqa: F401
    DEFAULT_MODEL,
    GGUF_NAME,
    default_model_path,
    find_default_model,
    resolve_model,
)


def _load(spec, adapter=None, quantize=None):
    import jlora

    path = resolve_model(spec)
    cfg, params = jlora.load_pretrained(path, quantize=quantize)
    if adapter:
        params = jlora.load_adapter(cfg, params, adapter)
    return path, cfg, params


def cmd_convert(a):
    import jlora

    src = resolve_model(a.src)
    t0 = time.perf_counter()
    cfg, params = jlora.load_pretrained(src)
    t_load = time.perf_counter() - t0
    jlora.save_pretrained(cfg, params, a.dst, dtype=a.dtype)
    try:
        jlora.load_tokenizer(src).save(a.dst)
        tok = "with its tokenizer"
    except (FileNotFoundError, ValueError) as e:
        tok = f"without a tokenizer ({e})"
    print(f"converted {src} -> {a.dst} ({cfg.arch}, {cfg.num_params():,} parameters, loaded in {t_load:.1f} s) {tok}")


def _gen_kwargs(a):
    return dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                num_beams=a.num_beams, no_repeat_ngram_size=a.no_repeat_ngram_size, seed=a.seed)


def cmd_generate(a):
    import jlora

    path, cfg, params = _load(a.model, a.adapter)
    tok = jlora.load_tokenizer(path)
    prompts = a.prompt or []
    if not prompts and not a.interactive:
        raise SystemExit("jlora generate: give --prompt TEXT (repeatable) or --interactive")
    use_chat = a.chat if a.chat is not None else bool(tok.chat_template)
    kwargs = _gen_kwargs(a)
    if a.interactive:
        prompts = _stdin_prompts()
    for prompt in prompts:
        t0 = time.perf_counter()
        if use_chat:
            messages = ([{"role": "system", "content": a.system}] if a.system else []) + [
                {"role": "user", "content": prompt}]
            text = jlora.chat(cfg, params, tok, messages, **kwargs)
        else:
            ids = jlora.generate(cfg, params, tok.encode(prompt), eos_token_id=tok.eos_token_ids or None, **kwargs)
            text = tok.decode(ids, skip_special_tokens=True)
        dt = time.perf_counter() - t0
        if a.json:
            print(json.dumps({"prompt": prompt, "completion": text, "seconds": round(dt, 3)}))
        else:
            print(f">>> {prompt}\n{text}\n")


def _stdin_prompts():
    while True:
        try:
            line = input("you> ")
        except EOFError:
            return
        if line.strip():
            yield line


def _write_merged(path, cfg, params, a):
    """Folds adapters into the base and writes an HF model dir, with the base's tokenizer when it has one.
    Returns what was written, in words (the CLI says it)."""
    import jax

    import jlora
    from jlora import quant as Q
    from jlora.quant_gguf import is_gguf_quantized

    kinds = sorted({_quant_name(b) for b in (jlora.strip(k) for k in jlora.tree.linear_modules(params).values())
                    if Q.is_quantized(b) or is_gguf_quantized(b)})
    merged = jlora.merge(params)  # quantized bases are dequantized to float32 here; LoRA folds into that
    jlora.save_pretrained(cfg, merged, a.out, dtype=a.dtype, quantize=a.out_quantize)
    try:
        jlora.load_tokenizer(path).save(a.out)
    except (FileNotFoundError, ValueError):
        pass  # a base without a tokenizer (e.g. weights only): the model dir is still complete
    base = f"the {'/'.join(kinds)} base, dequantized to float32" if kinds else "the float base"
    dtype = a.dtype or str(next(x.dtype for x in jax.tree_util.tree_leaves(merged)))
    if a.out_quantize:
        what = {"nf4": "bitsandbytes NF4 4-bit (double quantization)", "fp4": "bitsandbytes FP4 4-bit (double "
                "quantization)", "int8": "bitsandbytes int8 (LLM.int8 layout)"}[a.out_quantize]
        return f"folded into {base}; written re-quantized: {what} linear layers, other tensors {dtype}"
    return f"folded into {base}; written as {dtype} weights"


def _quant_name(kernel) -> str:
    if hasattr(kernel, "qtype"):
        return f"GGUF {kernel.qtype}"
    return kernel.quant_type.upper() if hasattr(kernel, "quant_type") else "int8"


def cmd_merge(a):
    path, cfg, params = _load(a.model, a.adapter, a.quantize)
    said = _write_merged(path, cfg, params, a)
    print(f"merged {a.adapter} into {a.model} -> {a.out} ({said})")


def cmd_export(a):
    import jlora

    path, cfg, params = _load(a.model, a.adapter, a.quantize)
    if a.format == "hf":
        said = _write_merged(path, cfg, params, a)
    else:
        if not a.adapter:
            raise SystemExit("jlora export --format peft: needs --adapter DIR")
        if a.out_quantize or a.dtype:
            raise SystemExit("jlora export --format peft: --dtype and --out-quantize apply to --format hf only "
                             "(an adapter is saved as it trained)")
        jlora.save_adapter(cfg, params, a.out)
        said = "the adapter"
    print(f"exported ({a.format}) -> {a.out} ({said})")


def cmd_compare(a):
    import jax

    import jlora
    from jlora import compare as C, tasks

    tasks.get(a.task)  # unknown task / method: refused before anything loads
    changes = {k: v for k, v in (("steps", a.steps), ("batch_size", a.batch), ("seq_len", a.seq_len),
                                 ("n_train", a.n_train), ("n_eval", a.n_eval), ("isolate", a.isolate or None))
               if v is not None}
    cc = C.CompareConfig(methods=tuple(m.strip() for m in a.methods.split(",") if m.strip()) if a.methods else (),
                         learning_rates=C.parse_lrs(a.lr or []),
                         lora_variants=tuple(v for v in (a.lora_variants or "").split(",") if v), **changes)
    cc.rows()
    if a.model in jlora.PRESETS:
        raise ValueError(f"--model {a.model}: a preset has random weights and no tokenizer; compare needs a model "
                         "with a tokenizer (an HF directory or a .gguf file, e.g. the default smollm2)")
    path = resolve_model(a.model)
    cfg, params = jlora.load_pretrained(path)
    tok = jlora.load_tokenizer(path)
    cfg = cfg.replace(dtype=a.dtype)
    print(f"compare: {os.path.basename(os.path.normpath(path))} on {a.task}, methods {', '.join(cc.rows())}; "
          f"{jax.devices()[0].platform}")
    rep = C.compare(cfg, params, tok, a.task, a.out, cc, model_name=os.path.basename(os.path.normpath(path)))
    print(C.markdown(rep))
    print(f"report: {os.path.join(a.out, 'report.md')} (+ report.json, {', '.join(C.PLOTS)})")


def cmd_train(a):
    from jlora import run

    overrides = _overrides(a) + (["run.distributed=true"] if a.distributed else [])
    conf = run.load_config(a.config, overrides)
    if a.print_config:  # the resolved config (TOML, every default filled in); no training
        print(run.print_config(conf), end="")
        return
    res = run.train_run(conf, progress=not a.no_progress, stop_at=a.stop_at)
    print(json.dumps({"step": int(res.state.step), "resumed_from": res.resumed_from, **res.eval}))


def _add_merge_flags(p):
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="dtype of the written float tensors (default: the merged model's, float32)")
    p.add_argument("--quantize", default=None, choices=["nf4", "fp4", "int8", "gguf"],
                   help="load the base quantized, as the adapter was trained (jlora train --quantize): the "
                        "adapter folds into that dequantized base")
    p.add_argument("--out-quantize", default=None, choices=["nf4", "fp4", "int8"],
                   help="write the merged linear layers re-quantized, as a bitsandbytes checkpoint transformers "
                        "loads (nf4/fp4: 4-bit with double quantization; int8: LLM.int8 layout); default: float")


def _overrides(a):
    out = list(a.set or [])
    for flag, key in (("model", "model.path"), ("data", "data.train"), ("run_dir", "run.dir"),
                      ("steps", "run.steps"), ("method", "method.kind"), ("mesh", "run.mesh"),
                      ("quantize", "model.quantize")):
        value = getattr(a, flag, None)
        if value is not None:
            out.append(f"{key}={json.dumps(value) if isinstance(value, str) else value}")
    return out


def cmd_eval(a):
    from jlora import run

    print(json.dumps(run.eval_run(a.run, data_path=a.data, which=a.checkpoint)))


def cmd_info(a):
    import jlora

    path, cfg, params = _load(a.model, a.adapter)
    rep = jlora.param_report(params)
    print(json.dumps({"path": path, "config": {k: v for k, v in cfg.__dict__.items()},
                      "parameters": rep}, indent=2, default=str))


def cmd_demo(a):
    """LoRA-fine-tunes the built-in SmolLM2-135M-Instruct on the date-extraction task, scored before/after."""
    import dataclasses

    from jlora.demo import DemoConfig, run_demo

    changes = {k: v for k, v in (("steps", a.steps), ("n_eval", a.n_eval), ("quantize", a.quantize))
               if v is not None}
    out = run_demo(a.out, dataclasses.replace(DemoConfig(), **changes), progress=not a.no_progress)
    if out["after"] <= out["before"] or out["reloaded"] != out["after"]:
        print("demo: the fine-tuned model did not beat the base model, or the reloaded adapter scored differently",
              file=sys.stderr)
        raise SystemExit(1)


def cmd_plan(a):
    """Memory planner: per-device bytes, FLOPs and step time of a run; which devices it fits, what it takes."""
    from jlora.plan import run_cli

    print(run_cli(a))


def _named_dirs(specs, flag):
    out = {}
    for spec in specs or []:
        name, eq, path = spec.partition("=")
        if not eq or not name or not path:
            raise ValueError(f"{flag} {spec!r}: expected NAME=DIR")
        if name in out:
            raise ValueError(f"{flag} {spec!r}: the name {name!r} is given twice")
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{flag} {spec!r}: no adapter directory at {path}")
        out[name] = path
    return out


def cmd_serve(a):
    """An OpenAI-compatible server: the base and every --adapter, batched across adapters (`jlora.serve`)."""
    import jlora
    from jlora import serve as S

    adapters = _named_dirs(a.adapter, "--adapter")
    for d in a.adapter_dir or []:
        if not os.path.isdir(d):
            raise FileNotFoundError(f"--adapter-dir {d}: not a directory")
    path = resolve_model(a.model)
    cfg, base = jlora.load_pretrained(path, quantize=a.quantize)
    try:
        tok = jlora.load_tokenizer(path)
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"--model {path}: jlora serve needs the model's tokenizer ({e})") from None
    name = a.name or os.path.splitext(os.path.basename(os.path.normpath(path)))[0]
    if name in adapters or name == "__base__":
        raise ValueError(f"--name {name!r}: an adapter has this name (or it is reserved); choose another --name")
    api_key = a.api_key or os.environ.get("JLORA_API_KEY") or None
    if a.host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print(f"jlora serve: warning: listening on {a.host} without an API key (--api-key or JLORA_API_KEY): "
              f"anyone who can reach this port can use it", file=sys.stderr)
    opts = S.ServeOptions(model_name=name, api_key=api_key, adapter_dirs=a.adapter_dir or [],
                          max_tokens_limit=a.max_tokens_limit, default_max_tokens=min(256, a.max_tokens_limit),
                          max_body_bytes=a.max_body_kb * 1024, max_adapter_bytes=a.max_adapter_mb << 20,
                          request_timeout_s=a.request_timeout)
    print(f"jlora serve: {name} ({cfg.arch}, {cfg.num_params():,} parameters"
          f"{', ' + a.quantize.upper() + ' base' if a.quantize else ''}) with "
          f"{len(adapters)} adapter(s) {sorted(adapters)} on http://{a.host}:{a.port}/v1"
          f"{' (API key required)' if api_key else ''}", file=sys.stderr, flush=True)
    S.serve(cfg, base, tok, adapters, host=a.host, port=a.port, options=opts, max_batch=a.max_batch,
            queue_size=a.queue_size, max_adapters=a.max_adapters, log_level=a.log_level,
            graceful_s=a.shutdown_timeout)
    print("jlora serve: stopped", file=sys.stderr)


def cmd_combine(a):
    """A weighted combination of LoRA adapters (PEFT's add_weighted_adapter), saved as a normal PEFT adapter."""
    import jax

    import jlora
    from jlora.peft.weighted import combine_adapters

    if len(a.weights) != len(a.adapter):
        raise ValueError(f"--weights: {len(a.weights)} weight(s) for {len(a.adapter)} --adapter(s); give one each")
    if os.path.exists(a.out) and os.listdir(a.out) and not a.overwrite:
        raise ValueError(f"--out {a.out}: the directory exists and is not empty (--overwrite replaces it)")
    path, cfg, base = _load(a.model)
    trees = [jlora.load_adapter(cfg, base, d) for d in a.adapter]
    out = combine_adapters(trees, a.weights, a.type, svd_rank=a.svd_rank, svd_clamp=a.svd_clamp,
                           density=a.density, majority_sign_method=a.majority_sign_method,
                           key=jax.random.key(a.seed))
    jlora.save_adapter(cfg, out, a.out, base_model_name_or_path=path)
    ranks = sorted({n.rank for n in jlora.lora.adapters(out).values()})
    print(f"combined {len(trees)} adapters ({a.type}, weights {a.weights}) -> {a.out}: LoRA on "
          f"{len(jlora.lora.adapters(out))} modules, rank {'/'.join(map(str, ranks))}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jlora", description="Fine-tune GPT-style language models in JAX: "
                                "train (full, LoRA, QLoRA, DoRA, IA3, bottleneck adapters, prefix and prompt tuning), "
                                "evaluate, convert checkpoints, generate, merge, combine and export adapters, "
                                "compare every method measured, plan memory per device, serve many adapters on "
                                "one base (OpenAI-compatible).")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")
    model_help = "HF model dir or .gguf file (default: the built-in SmolLM2-135M-Instruct)"

    c = sub.add_parser("convert", help="HF dir or GGUF file -> HF safetensors dir (plus its tokenizer)")
    c.add_argument("src", help=model_help + "; 'smollm2' for the built-in model")
    c.add_argument("dst", help="output directory")
    c.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="storage dtype (default: float32)")
    c.set_defaults(fn=cmd_convert)

    g = sub.add_parser("generate", help="generate text (chat mode for instruct models)")
    g.add_argument("--model", default=DEFAULT_MODEL, help=model_help)
    g.add_argument("--adapter", default=None, help="an adapter directory to apply (PEFT: LoRA, DoRA, IA3, prefix, prompt; AdapterHub: "
                                                      "bottleneck adapters)")
    g.add_argument("--prompt", action="append", help="prompt text (repeatable)")
    g.add_argument("--interactive", action="store_true", help="read prompts from standard input")
    g.add_argument("--chat", dest="chat", action="store_true", default=None,
                   help="apply the chat template (default when the model has one)")
    g.add_argument("--no-chat", dest="chat", action="store_false", help="plain completion of the prompt")
    g.add_argument("--system", default=None, help="system message in chat mode")
    _add_gen_flags(g)
    g.add_argument("--json", action="store_true", help="one JSON object per prompt")
    g.set_defaults(fn=cmd_generate)

    m = sub.add_parser("merge", help="fold a PEFT adapter (LoRA, DoRA, IA3) into the base -> HF model dir; prefix, "
                                   "prompt and bottleneck adapters change the computation and cannot be folded "
                                   "(use them unmerged with --adapter, or export --format peft)")
    m.add_argument("--model", default=DEFAULT_MODEL, help=model_help)
    m.add_argument("--adapter", required=True, help="PEFT adapter directory")
    m.add_argument("--out", required=True, help="output HF model directory")
    _add_merge_flags(m)
    m.set_defaults(fn=cmd_merge)

    e = sub.add_parser("export", help="export a model+adapter as a merged HF dir (--format hf) or an adapter dir "
                                    "(--format peft: PEFT's format; AdapterHub's for bottleneck adapters)")
    e.add_argument("--format", required=True, choices=["peft", "hf"])
    e.add_argument("--model", default=DEFAULT_MODEL, help=model_help)
    e.add_argument("--adapter", default=None, help="PEFT adapter directory")
    e.add_argument("--out", required=True, help="output directory")
    _add_merge_flags(e)
    e.set_defaults(fn=cmd_export)

    c = sub.add_parser("compare", help="full fine-tuning vs every PEFT method on one model and task, measured: "
                                      "parameters, memory, speed, size, score, forgetting, overfitting, decode")
    c.add_argument("--model", default=DEFAULT_MODEL, help=model_help)
    c.add_argument("--task", default="dates", help="a task that ships with jlora: dates | facts")
    c.add_argument("--methods", default=None, help="comma list (default all): adapter, dora, full, ia3, lora, "
                                                    "prefix, prompt, qlora")
    c.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 60)")
    c.add_argument("--batch", type=int, default=None, help="examples per step (default 4)")
    c.add_argument("--seq-len", type=int, default=None, help="training row length (default 80)")
    c.add_argument("--n-train", type=int, default=None, help="training examples (default: three epochs' worth)")
    c.add_argument("--n-eval", type=int, default=None, help="validation and test examples each (default 50)")
    c.add_argument("--lr", action="append", metavar="METHOD=LR[,LR...]",
                   help="learning rates swept for a method (default: a grid per method)")
    c.add_argument("--lora-variants", default="qv,r16",
                   help="LoRA/DoRA/QLoRA variants tried at the best rate: qv (q,v only), r16 (double rank); '' none")
    c.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    c.add_argument("--isolate", action="store_true", help="each method in a fresh subprocess: adds its peak RSS "
                   "(and device peak on GPU/TPU) to the report")
    c.add_argument("--out", default="out/compare", help="report directory (report.md, report.json, plots, runs)")
    c.set_defaults(fn=cmd_compare)

    t = sub.add_parser("train", help="train (any --method) from a TOML/YAML config; resumes automatically")
    t.add_argument("--config", default=None, help="run config (.toml or .yaml); see jlora/run.py for the keys")
    t.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config value")
    t.add_argument("--model", default=None, help="shortcut for --set model.path=...")
    t.add_argument("--data", default=None, help="shortcut for --set data.train=...")
    t.add_argument("--run-dir", default=None, help="shortcut for --set run.dir=...")
    t.add_argument("--steps", type=int, default=None, help="shortcut for --set run.steps=...")
    t.add_argument("--method", default=None, metavar="KIND",
                   help="shortcut for --set method.kind=KIND: adapter | dora | ia3 | lora | prefix | prompt | full "
                        "(method options go in [method])")
    t.add_argument("--quantize", default=None, choices=["nf4", "fp4", "int8", "gguf"],
                   help="shortcut for --set model.quantize=...: a quantized frozen base (with --method lora: QLoRA; "
                        "gguf keeps a .gguf file's own Q4_0/Q4_1/Q8_0 blocks; full fine-tuning of a quantized "
                        "base is refused)")
    t.add_argument("--mesh", default=None, metavar="SPEC",
                   help="device mesh, e.g. data=4,fsdp=2 or fsdp=-1 (axes data, fsdp, tensor; shortcut for "
                        "--set run.mesh=...); a run may resume on another mesh")
    t.add_argument("--distributed", action="store_true",
                   help="multi-host: jax.distributed.initialize() first (TPU pod slices, multi-node GPU)")
    t.add_argument("--stop-at", type=int, default=None, help="stop (with a checkpoint) at this step; rerun to resume")
    t.add_argument("--no-progress", action="store_true", help="no progress line")
    t.add_argument("--print-config", action="store_true",
                   help="print the resolved config (TOML, with every default) and exit without training")
    t.set_defaults(fn=cmd_train)

    v = sub.add_parser("eval", help="evaluate a trained run's best (or latest) checkpoint: loss, perplexity")
    v.add_argument("--run", required=True, help="run directory")
    v.add_argument("--data", default=None, help="evaluate on this file instead of the run's eval set")
    v.add_argument("--checkpoint", default="best", help="best | latest | STEP")
    v.set_defaults(fn=cmd_eval)

    i = sub.add_parser("info", help="print a model's config and parameter counts")
    i.add_argument("--model", default=DEFAULT_MODEL, help=model_help)
    i.add_argument("--adapter", default=None)
    i.set_defaults(fn=cmd_info)

    d = sub.add_parser("demo", help="the built-in demo: LoRA-fine-tune SmolLM2-135M-Instruct to extract dates, "
                                    "scored before and after")
    d.add_argument("--out", default="out/demo", help="run directory (checkpoints, adapter, results.json)")
    d.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's)")
    d.add_argument("--n-eval", type=int, default=None, help="held-out examples to score")
    d.add_argument("--quantize", default=None, choices=["nf4", "fp4", "int8", "gguf"],
                   help="train LoRA on a quantized frozen base (nf4: QLoRA; gguf: the file's own Q4_1 blocks)")
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(fn=cmd_demo)

    sv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server for the base and many adapters, batched "
                                      "across adapters (/v1/completions, /v1/chat/completions, /v1/models, "
                                      "/v1/adapters)")
    sv.add_argument("--model", default=DEFAULT_MODEL, help=model_help)
    sv.add_argument("--adapter", action="append", metavar="NAME=DIR",
                    help="serve this adapter (PEFT LoRA, DoRA or IA3 directory) as model NAME (repeatable)")
    sv.add_argument("--name", default=None, help="the base model's name in /v1/models (default: the model file or "
                                                 "directory name; '__base__' always works too)")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: the "
                                                    "JLORA_API_KEY environment variable; none: no key)")
    sv.add_argument("--adapter-dir", action="append", metavar="DIR",
                    help="allow POST /v1/adapters to load adapters from inside DIR (repeatable; none: run-time "
                         "loading is off)")
    sv.add_argument("--quantize", default=None, choices=["nf4", "fp4", "int8"],
                    help="hold the base quantized (QLoRA adapters are served on it)")
    sv.add_argument("--max-batch", type=int, default=8, help="requests decoded together (default 8)")
    sv.add_argument("--queue-size", type=int, default=64, help="requests waiting before 429 (default 64)")
    sv.add_argument("--max-adapters", type=int, default=256, help="the most adapters loaded at once (default 256)")
    sv.add_argument("--max-tokens-limit", type=int, default=1024, help="largest max_tokens a request may ask")
    sv.add_argument("--request-timeout", type=float, default=300.0, help="seconds a request may wait and run")
    sv.add_argument("--max-body-kb", type=int, default=1024, help="request body limit (KiB)")
    sv.add_argument("--max-adapter-mb", type=int, default=1024, help="size limit of adapters loaded at run time")
    sv.add_argument("--shutdown-timeout", type=float, default=30.0,
                    help="on SIGTERM, seconds running requests get to finish")
    sv.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    sv.set_defaults(fn=cmd_serve)

    cb = sub.add_parser("combine", help="a weighted combination of LoRA adapters (PEFT's add_weighted_adapter: "
                                        "svd, linear, cat, ties, dare_*, magnitude_prune), saved as an adapter")
    cb.add_argument("--model", default=DEFAULT_MODEL, help=model_help)
    cb.add_argument("--adapter", action="append", required=True, metavar="DIR", help="a LoRA adapter (repeatable)")
    cb.add_argument("--weights", type=float, nargs="+", required=True, help="one weight per --adapter")
    cb.add_argument("--type", default="svd", choices=list(_combination_types()), help="combination type")
    cb.add_argument("--svd-rank", type=int, default=None)
    cb.add_argument("--svd-clamp", type=float, default=None)
    cb.add_argument("--density", type=float, default=None, help="for ties, dare_* and magnitude_prune")
    cb.add_argument("--majority-sign-method", default="total", choices=["total", "frequency"])
    cb.add_argument("--seed", type=int, default=0, help="for the DARE masks")
    cb.add_argument("--out", required=True, help="output adapter directory")
    cb.add_argument("--overwrite", action="store_true")
    cb.set_defaults(fn=cmd_combine)

    from jlora.plan import add_arguments as add_plan_arguments

    pl = sub.add_parser("plan", help="memory planner: per-device memory, FLOPs and step time of a run; which "
                                     "devices it fits and what it would take (remat, FSDP, QLoRA)")
    add_plan_arguments(pl)
    pl.set_defaults(fn=cmd_plan)
    return p


def _combination_types():
    from jlora.peft.weighted import COMBINATION_TYPES

    return COMBINATION_TYPES


def _add_gen_flags(g):
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--num-beams", type=int, default=1)
    g.add_argument("--no-repeat-ngram-size", type=int, default=0)
    g.add_argument("--seed", type=int, default=0)


def main(argv=None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    if not getattr(a, "fn", None):
        parser.print_help()
        return 2
    try:
        a.fn(a)
    except (FileNotFoundError, ValueError, OSError) as e:
        print(f"jlora {a.cmd}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
