"""`jlora compare`: full fine-tuning and every PEFT method on one model and one task, measured side by side.

Every method (a row) gets the same data, the same step budget and the same evaluation; its learning rate is
chosen by a small recorded sweep on a validation split (methods differ by orders of magnitude in their best rate),
and for LoRA the sweep then also tries the target set (q,v vs all linear layers) and the rank at the best rate.
The report shows every sweep point, not only the winners.

For each method's chosen configuration it measures:

* ``trainable_params`` / ``trainable_percent`` (of the model's own parameters, `jlora.param_report`);
* ``peak_memory_bytes``: XLA's own memory analysis of the compiled train step (arguments + outputs + scratch,
  aliased donations counted once) — one process can compare methods with it, where a process RSS cannot;
* with ``isolate`` (CLI ``--isolate``) every method's whole sweep and evaluation runs in a fresh Python
  subprocess of its own (a new interpreter, never a fork of a started JAX), which then also records
  ``peak_rss_bytes`` (that process's peak RSS at its end, `peak_rss_bytes`: the Python and JAX runtime, the host
  copy of the base model and everything the method added) and ``device_peak_bytes`` (the device's
  ``memory_stats()["peak_bytes_in_use"]`` on GPU/TPU; None on CPU, which has no such stats). Without
  ``isolate`` both are None. The numbers are the same either way (same data, same seeds), apart from timing;
  an error in a child is raised in the parent naming the method (`IsolatedRunError`, or a ValueError);
* ``step_time_s`` / ``tokens_per_s`` (input tokens) from the training loop's timed log intervals (the first
  interval, which compiles, is left out);
* ``adapter_bytes``: the files `jlora.save_adapter` writes (full fine-tuning: the whole model,
  `jlora.save_pretrained` in float32);
* ``score_before`` / ``score_after``: exact match on held-out test items (greedy);
* ``forgetting``: the change in mean token loss on general text the model was not tuned on (the Python standard
  library's documentation topics, `pydoc_data.topics`, which ship with Python), after minus before; PEFT's
  method-comparison benchmark measures forgetting the same way;
* ``overfitting_gap``: held-out loss minus training loss on the answer tokens after training (the training set
  is small and seen for several epochs by default);
* ``decode_tokens_per_s`` unmerged and merged (where the method can be merged).

The report is ``report.json`` (one record per method, and the sweep), ``report.md`` (with ``peak RSS`` and
``device peak`` columns where measured) and four PNG plots (``memory.png``: the step memory, and beside it the
per-process peaks where measured).

Example:
  >>> known_methods()
  ['adapter', 'dora', 'full', 'ia3', 'lora', 'prefix', 'prompt', 'qlora']
  >>> CompareConfig(methods=("lora", "full"), steps=30, batch_size=4).train_size()  # three epochs of 40
  40
  >>> report = compare(cfg, params, tok, "dates", "out/cmp", CompareConfig(methods=("lora", "full")))  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import shutil
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

# method row -> (registered kind, base quantization); "qlora" is LoRA on an NF4 base
ROWS = {"qlora": ("lora", "nf4")}
# default learning-rate grids per kind (AdamW, cosine decay, a few warm-up steps)
DEFAULT_LRS = {"full": (1e-5, 3e-5, 1e-4), "lora": (3e-4, 1e-3, 3e-3), "dora": (3e-4, 1e-3, 3e-3),
               "adapter": (3e-4, 1e-3, 3e-3), "ia3": (3e-3, 1e-2, 3e-2), "prefix": (3e-3, 1e-2, 3e-2),
               "prompt": (3e-3, 1e-2, 3e-2)}
DEFAULT_LR = (1e-4, 1e-3, 1e-2)  # a method registered later without an entry above


def known_methods() -> List[str]:
    """Every row `compare` can run: each registered method kind, plus ``qlora``."""
    from jlora.peft import base as B

    return sorted(B.kinds()) + sorted(ROWS)


@dataclasses.dataclass(frozen=True)
class CompareConfig:
    """What `compare` runs.

    Args:
      methods: rows (see `known_methods`); default all of them.
      steps: optimizer steps per run (every method and sweep point alike).
      batch_size, seq_len: training batch (examples are padded, one per row).
      n_train: training examples (default ``steps * batch_size // 3``: three epochs, so overfitting can show).
      n_eval: validation examples (the sweep) and, separately, test examples (the scores).
      learning_rates: per row, the learning rates swept (default `DEFAULT_LRS`).
      method_options: per row, options of its method config (e.g. ``{"lora": {"r": 16}}``).
      lora_variants: after the learning-rate sweep, LoRA (and QLoRA, DoRA) also try these option sets at the best
        rate: ``"qv"`` targets q and v only (GPT-2: ``c_attn``), ``"r16"`` doubles the rank.
      warmup_steps: linear warm-up of every run.
      general_tokens: tokens of general text for the forgetting measure.
      decode_tokens: new tokens per prompt when timing decoding.
      seed: data and initialization seed.
      keep_checkpoints: keep every sweep point's training checkpoint under ``runs/`` (default: only its
        metrics.jsonl and TensorBoard events stay; the chosen configurations are saved under ``adapters/``).
      isolate: run each method (its whole sweep, then its measurements) in a fresh Python subprocess of its
        own, so that the process's peak RSS (``peak_rss_bytes``) and, on GPU/TPU, the device's peak bytes in
        use (``device_peak_bytes``) belong to that method alone. Same data, seeds and numbers as in-process.
    """

    methods: Tuple[str, ...] = ()
    steps: int = 60
    batch_size: int = 4
    seq_len: int = 80
    n_train: Optional[int] = None
    n_eval: int = 50
    learning_rates: Dict[str, Tuple[float, ...]] = dataclasses.field(default_factory=dict)
    method_options: Dict[str, Dict] = dataclasses.field(default_factory=dict)
    lora_variants: Tuple[str, ...] = ("qv", "r16")
    warmup_steps: int = 3
    general_tokens: int = 4096
    decode_tokens: int = 16
    seed: int = 0
    keep_checkpoints: bool = False
    isolate: bool = False

    def rows(self) -> List[str]:
        rows = list(self.methods) or known_methods()
        known = known_methods()
        for m in rows:
            if m not in known:
                raise ValueError(f"compare: unknown method {m!r}; known methods: {', '.join(known)}")
        for m in set(self.learning_rates) | set(self.method_options):
            if m not in known:
                raise ValueError(f"compare: options given for unknown method {m!r}; known: {', '.join(known)}")
        for v in self.lora_variants:
            if v not in ("qv", "r16"):
                raise ValueError(f"compare: unknown LoRA variant {v!r}; known: qv, r16")
        if self.steps < 1 or self.batch_size < 1 or self.n_eval < 1:
            raise ValueError("compare: steps, batch_size and n_eval must be >= 1")
        return rows

    def train_size(self) -> int:
        return self.n_train or max(self.batch_size, self.steps * self.batch_size // 3)


def _qv(arch: str) -> List[str]:
    return ["c_attn"] if arch == "gpt2" else ["q_proj", "v_proj"]


def _default_options(kind: str) -> Dict:
    """Defaults by what the method's config declares (the registry), never by its name: a rank-based kernel
    method gets r=8, alpha 16 on every linear layer; a virtual-token method 10 tokens; others their own."""
    from jlora.peft import base as B

    config = B.get(kind).config
    fields = {f.name for f in dataclasses.fields(config)} if config is not None else set()
    if {"r", "alpha", "target_modules"} <= fields:
        return {"r": 8, "alpha": 16, "target_modules": "all-linear"}
    if "num_virtual_tokens" in fields:
        return {"num_virtual_tokens": 10}
    return {}


def _variant(options: Dict, variant: str, arch: str) -> Dict:
    if variant == "qv":
        return {**options, "target_modules": _qv(arch)}
    return {**options, "r": 2 * options.get("r", 8), "alpha": 2 * options.get("alpha", 16)}


# ----------------------------------------------------------------------------------------------------------
# Measurements


def general_text(n_tokens: int, tok) -> List[int]:
    """``n_tokens`` token ids of general English text the model is not tuned on: the Python standard library's
    documentation topics (`pydoc_data.topics`, shipped with Python), in sorted topic order."""
    from pydoc_data import topics

    ids: List[int] = []
    for name in sorted(topics.topics):
        ids += tok.encode(topics.topics[name])
        if len(ids) >= n_tokens:
            break
    return ids[:n_tokens]


def _general_batches(ids: List[int], seq_len: int, batch_size: int):
    from jlora.data import Batches

    n = seq_len + 1
    rows = [(ids[i:i + n], [1] * len(ids[i:i + n])) for i in range(0, len(ids) - 1, n) if len(ids[i:i + n]) > 1]
    return Batches(rows, seq_len=seq_len, batch_size=batch_size, pack=False, shuffle=False, drop_remainder=False)


def _example_batches(examples, tok, seq_len: int, batch_size: int, shuffle: bool, seed: int = 0):
    from jlora.data import Batches

    return Batches.from_examples([{"messages": ex["messages"]} for ex in examples], tok, seq_len=seq_len,
                                 batch_size=batch_size, pack=False, overflow="truncate", shuffle=shuffle,
                                 drop_remainder=shuffle, seed=seed)


def mean_loss(cfg, params, batches, eval_step=None) -> float:
    """Token-weighted mean loss of ``params`` over every batch (`jlora.loop.evaluate`)."""
    import jax

    from jlora import loop, train

    step = eval_step or jax.jit(train.make_eval_step(cfg))
    return float(loop.evaluate(step, params, batches)["eval_loss"])


def answers(cfg, params, tok, examples, max_new_tokens: int, batch: int = 32) -> List[str]:
    """Greedy answers to the examples' chat prompts (decoded without special tokens)."""
    import jlora
    from jlora import demo_task

    out = []
    for i in range(0, len(examples), batch):
        prompts = [tok.apply_chat_template(demo_task.prompt_messages(ex), add_generation_prompt=True, tokenize=True)
                   for ex in examples[i:i + batch]]
        ids = jlora.generate(cfg, params, prompts, max_new_tokens=max_new_tokens,
                             eos_token_id=tok.eos_token_ids or None)
        out += [tok.decode(o, skip_special_tokens=True) for o in ids]
    return out


def decode_speed(cfg, params, prompts, new_tokens: int) -> float:
    """Tokens per second of greedy decoding (``len(prompts) * new_tokens`` tokens, no early stop), after one
    untimed call that compiles."""
    import jax

    import jlora

    jax.block_until_ready(jlora.generate(cfg, params, prompts, max_new_tokens=new_tokens))
    t0 = time.perf_counter()
    jax.block_until_ready(jlora.generate(cfg, params, prompts, max_new_tokens=new_tokens))
    return len(prompts) * new_tokens / (time.perf_counter() - t0)


def step_memory(cfg, tx, labels, params, batch) -> Dict[str, int]:
    """XLA's memory analysis of the compiled train step, from shapes only (nothing allocated)."""
    import jax

    from jlora import train

    state = jax.eval_shape(lambda p: train.init_state(p, tx), params)
    ma = jax.jit(train.make_train_step(cfg, tx, labels), donate_argnums=0).lower(state, batch).compile()
    ma = ma.memory_analysis()
    total = (ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes + ma.temp_size_in_bytes)
    return {"arguments": int(ma.argument_size_in_bytes), "outputs": int(ma.output_size_in_bytes),
            "aliased": int(ma.alias_size_in_bytes), "temporaries": int(ma.temp_size_in_bytes), "total": int(total)}


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def _timing(history, batches, log_every: int, batch_tokens: int) -> Tuple[Optional[float], Optional[float]]:
    """(step seconds, input tokens/s) from the loop's log entries after the first (compiling) interval."""
    entries = [h for h in history if "tokens_per_s" in h]
    rates = []
    for prev, cur in zip(entries, entries[1:]):
        loss_tokens = sum(float(np.sum(batches.batch_at(s)["loss_mask"]))
                          for s in range(prev["step"], cur["step"]))
        if cur["tokens_per_s"] > 0 and loss_tokens > 0:
            rates.append((loss_tokens / cur["tokens_per_s"]) / (cur["step"] - prev["step"]))
    if not rates:
        return None, None
    step_s = float(np.median(rates))
    return step_s, batch_tokens / step_s


def machine() -> str:
    """The CPU model (``lscpu``'s model name) and core count, or the accelerator, for the report."""
    import jax

    dev = jax.devices()[0]
    if dev.platform != "cpu":
        return f"{dev.device_kind} x{jax.device_count()}"
    name = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores"


# ----------------------------------------------------------------------------------------------------------
# The comparison


def compare(cfg, params, tok, task: str, out_dir: str, cc: CompareConfig = CompareConfig(),
            log: Callable[[str], None] = print, model_name: str = "") -> Dict:
    """Runs every method of ``cc`` on ``task`` and writes the report to ``out_dir``.

    Args:
      cfg, params: the base model (float; ``qlora`` quantizes it to NF4 itself). Not modified.
      tok: its tokenizer (chat template used for the examples).
      task: a task name (`jlora.tasks.TASKS`).
      out_dir: report.json, report.md, the plots, ``runs/`` (one training run per sweep point) and
        ``adapters/`` (each chosen method's saved adapter).
      cc: the configuration (``cc.isolate``: every method in a fresh subprocess of its own, see `CompareConfig`).
      log: progress lines (with ``cc.isolate``, the children's lines too, as they come).
      model_name: recorded in the report.

    Returns:
      the report dict (also ``report.json``).

    Raises:
      IsolatedRunError: with ``cc.isolate``, a method's subprocess failed or died (the message names the method
        and carries the child's traceback, or its exit status and the end of its stderr); a ValueError in a
        child is raised again as a ValueError naming the method.
    """
    from jlora import tasks

    rows = cc.rows()
    t = tasks.get(task)
    splits = t.splits(cc.train_size(), cc.n_eval, cc.seed)
    train_ex, val_ex, test_ex = splits
    os.makedirs(out_dir, exist_ok=True)
    n_model = cfg.num_params()
    records, sweep = [], []
    if cc.isolate:
        records, sweep, mach = _isolated(cfg, params, tok, task, out_dir, cc, rows, log)
    else:
        run_row = _row_runner(cfg, params, tok, task, out_dir, cc, log, splits)
        for row in rows:
            rec, points = run_row(row)
            records.append(rec)
            sweep += points
        mach = machine()
    report = {"model": model_name or f"{cfg.arch} ({n_model:,} parameters)", "task": task,
              "task_description": t.description, "machine": mach,
              "date": datetime.date.today().isoformat(), "config": _jsonable(dataclasses.asdict(cc)),
              "n_train": len(train_ex), "n_val": len(val_ex), "n_test": len(test_ex),
              "epochs": cc.steps * cc.batch_size / len(train_ex), "methods": records, "sweep": sweep}
    write_report(report, out_dir)
    return report


def _row_runner(cfg, params, tok, task: str, out_dir: str, cc: CompareConfig, log, splits=None):
    """``run_row(row) -> (record, sweep points)``: one method's sweep, then the measurements of its chosen
    configuration. The same code runs in-process and (``--isolate``) in a method's own subprocess."""
    import jax
    import jax.numpy as jnp

    import jlora
    from jlora import quant as Q, tasks, train
    from jlora.loop import FitConfig, fit
    from jlora.peft import base as B

    t = tasks.get(task)
    train_ex, val_ex, test_ex = splits or t.splits(cc.train_size(), cc.n_eval, cc.seed)
    host_base = jax.device_get(params)
    bases = {None: host_base}
    n_model = cfg.num_params()
    train_b = _example_batches(train_ex, tok, cc.seq_len, cc.batch_size, shuffle=True, seed=cc.seed)
    val_b = _example_batches(val_ex, tok, cc.seq_len, cc.batch_size, shuffle=False)
    train_probe_b = _example_batches(train_ex[:cc.n_eval], tok, cc.seq_len, cc.batch_size, shuffle=False)
    general_b = _general_batches(general_text(cc.general_tokens, tok), cc.seq_len, cc.batch_size)
    eval_step = jax.jit(train.make_eval_step(cfg))
    refs = [ex["completion"] for ex in test_ex]
    log_every = max(1, cc.steps // 6)
    before: Dict[Optional[str], Dict] = {}

    def fresh(quant):
        if quant not in bases:
            bases[quant] = jax.device_get(Q.quantize_params(cfg, jax.tree.map(jnp.asarray, host_base), quant))
        return jax.tree.map(jnp.array, bases[quant])  # copies: fit donates its input

    def base_numbers(quant):
        if quant not in before:
            p = fresh(quant)
            before[quant] = {"score": t.score(answers(cfg, p, tok, test_ex, t.max_new_tokens), refs),
                             "general_loss": mean_loss(cfg, p, general_b, eval_step)}
            log(f"base{' (' + quant + ')' if quant else ''}: exact match {before[quant]['score']:.1%}, general "
                f"loss {before[quant]['general_loss']:.4f}")
        return before[quant]

    def run(row, kind, quant, options, lr):
        p = fresh(quant)
        method = B.get(kind)
        if kind != "full":
            mcfg = method.make_config(dict(options), where=f"compare {row}")
            p = method.init(jax.random.key(cc.seed + 1), cfg, p, mcfg)
        tag = f"{row}-lr{lr:g}" + "".join(f"-{k}{_short(v)}" for k, v in sorted(options.items())
                                           if k in ("r", "target_modules"))
        run_dir = os.path.join(out_dir, "runs", tag)
        shutil.rmtree(run_dir, ignore_errors=True)  # a comparison is a fresh measurement
        fc = FitConfig(steps=cc.steps, learning_rate=lr, warmup_steps=min(cc.warmup_steps, cc.steps - 1),
                       schedule="cosine", max_grad_norm=1.0, log_every=log_every, save_every=cc.steps, keep_last=1,
                       seed=cc.seed)
        labels = jlora.trainable_labels(p)
        tx = train.make_optimizer(labels, lr)
        mem = step_memory(cfg, tx, labels, p, train_b.batch_at(0))
        t0 = time.perf_counter()
        res = fit(cfg, p, train_b, run_dir=run_dir, fit_config=fc, progress=False, log=lambda *_: None,
                  run_config={"compare": tag})
        wall = time.perf_counter() - t0
        trained = res.state.params
        val = mean_loss(cfg, trained, val_b, eval_step)
        log(f"  {tag}: val loss {val:.4f} ({wall:.0f} s)")
        if not cc.keep_checkpoints:  # a full fine-tuning checkpoint is the whole model + Adam state, per point
            for name in os.listdir(run_dir):
                if name.isdigit():
                    shutil.rmtree(os.path.join(run_dir, name), ignore_errors=True)
        point = {"method": row, "kind": kind, "quantize": quant, "options": options, "learning_rate": lr,
                 "val_loss": val, "final_train_loss": res.history[-1]["loss"] if res.history else None,
                 "seconds": wall}
        return point, trained, res, mem

    def run_row(row):
        kind, quant = ROWS.get(row, (row, None))
        options = {**_default_options(kind), **cc.method_options.get(row, {})}
        lrs = tuple(cc.learning_rates.get(row) or DEFAULT_LRS.get(kind, DEFAULT_LR))
        log(f"{row}: sweep over learning rates {', '.join(f'{x:g}' for x in lrs)}")
        sweep = []
        best = None
        for lr in lrs:
            point, trained, res, mem = run(row, kind, quant, options, lr)
            sweep.append(point)
            if best is None or point["val_loss"] < best[0]["val_loss"]:
                best = (point, trained, res, mem)
        if "r" in options:  # rank-based methods (LoRA, DoRA, QLoRA): the target-set and rank variants
            for v in cc.lora_variants:
                point, trained, res, mem = run(row, kind, quant, _variant(options, v, cfg.arch),
                                               best[0]["learning_rate"])
                point["variant"] = v
                sweep.append(point)
                if point["val_loss"] < best[0]["val_loss"]:
                    best = (point, trained, res, mem)
        point, trained, res, mem = best
        rec = _measure(cfg, tok, t, row, point, trained, res, mem, base_numbers(quant), test_ex, refs, train_b,
                       val_b, train_probe_b, general_b, eval_step, cc, out_dir, n_model, log_every, log)
        return rec, sweep

    return run_row


# ----------------------------------------------------------------------------------------------------------
# --isolate: one fresh subprocess per method


class IsolatedRunError(RuntimeError):
    """A method's subprocess (``CompareConfig.isolate``) raised or died; ``method`` names it, ``child_traceback``
    is its traceback (None when it died without one) and ``returncode`` its exit status."""

    def __init__(self, message: str, method: str, child_traceback: Optional[str] = None,
                 returncode: Optional[int] = None):
        super().__init__(message)
        self.method, self.child_traceback, self.returncode = method, child_traceback, returncode


# jax settings a child takes over from the parent (the others are its defaults, or the environment it inherits)
_JAX_FLAGS = ("jax_platforms", "jax_enable_x64", "jax_default_matmul_precision", "jax_num_cpu_devices",
              "jax_threefry_partitionable", "jax_default_prng_impl")
# the child's command: the parent's import path first, then `_child_main(job_dir, row)`; a fresh interpreter
# (never a fork of a process whose JAX has started)
_CHILD_BOOT = ("import sys; sys.path[:0] = [p for p in sys.argv[3:] if p not in sys.path]; "
               "from jlora.compare import _child_main; sys.exit(_child_main(sys.argv[1], sys.argv[2]))")


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far.

    On Linux the high-water mark of this process's own address space (``VmHWM`` of ``/proc/self/status``):
    ``getrusage``'s ``ru_maxrss`` is not used there because Linux carries it across ``fork``/``exec`` (a child
    of a large parent starts at the parent's RSS, so it would measure the parent). Elsewhere
    ``getrusage(RUSAGE_SELF).ru_maxrss`` (bytes on macOS, KiB otherwise)."""
    import resource
    import sys

    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    value, unit = line.split()[1:3]
                    return int(value) * {"kB": 1024, "mB": 2**20}.get(unit, 1)
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def device_peak_bytes() -> Optional[int]:
    """``peak_bytes_in_use`` of the first device where its backend reports memory stats (GPU, TPU), else None
    (CPU)."""
    import jax

    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # a backend without memory stats
        return None
    peak = (stats or {}).get("peak_bytes_in_use")
    return None if peak is None else int(peak)


def _isolated(cfg, params, tok, task, out_dir, cc, rows, log):
    """(records, sweep, machine): each row of ``rows`` run by `_row_runner` in a subprocess of its own, one
    after the other; the inputs handed over once in a pickle (parameters as host numpy arrays)."""
    import pickle
    import tempfile

    import jax

    from jlora.peft import base as B

    modules = set()  # a method registered outside jlora must be registered in the child too
    for row in rows:
        m = B.get(ROWS.get(row, (row, None))[0])
        modules |= {getattr(f, "__module__", None) for f in (m.init, m.config) if f is not None}
    job = {"cfg": cfg, "params": jax.device_get(params), "tok": tok, "task": task, "out_dir": os.path.abspath(out_dir),
           "cc": cc, "modules": sorted(x for x in modules if x and x != "__main__"),
           "jax_flags": {k: v for k in _JAX_FLAGS if hasattr(jax.config, k) and (v := getattr(jax.config, k))
                         is not None}}
    job_dir = tempfile.mkdtemp(prefix=".isolate-", dir=out_dir)
    records, sweep, mach = [], [], None
    try:
        with open(os.path.join(job_dir, "job.pkl"), "wb") as f:
            pickle.dump(job, f, protocol=pickle.HIGHEST_PROTOCOL)
        del job
        for row in rows:
            result = _run_child(job_dir, row, log)
            records.append(result["record"])
            sweep += result["sweep"]
            mach = mach or result["machine"]
    finally:
        shutil.rmtree(job_dir, ignore_errors=True)
    return records, sweep, mach


def _run_child(job_dir: str, row: str, log) -> Dict:
    import pickle
    import signal
    import subprocess
    import sys

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # on a GPU the parent may already hold XLA's default 75% preallocation: the child allocates as it goes
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    result_path, err_path = os.path.join(job_dir, f"result-{row}.pkl"), os.path.join(job_dir, f"stderr-{row}.txt")
    cmd = [sys.executable, "-c", _CHILD_BOOT, job_dir, row] + [p for p in sys.path if p]
    log(f"{row}: in a fresh subprocess (--isolate)")
    with open(err_path, "w") as err:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, env=env,
                                text=True, bufsize=1)
        try:
            for line in proc.stdout:  # the child's log lines, as they come
                log(line.rstrip("\n"))
            rc = proc.wait()
        finally:
            if proc.poll() is None:  # interrupted here: no orphan keeps training
                proc.kill()
                proc.wait()
            proc.stdout.close()
    result = None
    if os.path.exists(result_path):
        with open(result_path, "rb") as f:
            result = pickle.load(f)
    if result is not None and "error" in result:
        where = f"compare --isolate: method {row!r} failed in its subprocess: {result['summary']}"
        cause = IsolatedRunError(f"{where}\n\nchild traceback:\n{result['error']}", row, result["error"], rc)
        if result.get("type") == "ValueError":  # bad input, as in-process: a ValueError (the CLI's plain message)
            raise ValueError(where) from cause
        raise cause
    if result is None or rc != 0:
        with open(err_path, errors="replace") as f:
            tail = "".join(f.readlines()[-20:])
        try:
            how = f"was killed by {signal.Signals(-rc).name}" if rc < 0 else f"exited with status {rc}"
        except ValueError:
            how = f"was killed by signal {-rc}"
        hint = " (out of memory?)" if rc in (-signal.SIGKILL, 137) else ""
        raise IsolatedRunError(f"compare --isolate: method {row!r}: its subprocess {how}{hint} without a result;"
                               f" the end of its stderr:\n{tail}", row, None, rc)
    return result


def _child_main(job_dir: str, row: str) -> int:
    """A method's subprocess: runs ``row`` from ``job_dir/job.pkl`` and writes ``result-{row}.pkl`` (the
    record with its peak RSS and device peak, its sweep points, the machine), or the exception and traceback."""
    import importlib
    import pickle
    import traceback

    try:
        with open(os.path.join(job_dir, "job.pkl"), "rb") as f:
            job = pickle.load(f)
        import jax

        for name, value in job["jax_flags"].items():  # before anything starts a backend
            jax.config.update(name, value)
        for mod in job["modules"]:
            importlib.import_module(mod)
        run_row = _row_runner(job["cfg"], job["params"], job["tok"], job["task"], job["out_dir"], job["cc"],
                              log=lambda line: print(line, flush=True))
        del job
        rec, points = run_row(row)
        rec["peak_rss_bytes"] = peak_rss_bytes()  # at the end: the whole sweep and measurement of this method
        rec["device_peak_bytes"] = device_peak_bytes()
        result = {"record": rec, "sweep": points, "machine": machine()}
    except BaseException as e:  # noqa: B036 - reported to the parent, whatever it is
        result = {"error": traceback.format_exc(), "summary": f"{type(e).__name__}: {e}", "type": type(e).__name__}
    path = os.path.join(job_dir, f"result-{row}.pkl")
    with open(path + ".tmp", "wb") as f:
        pickle.dump(result, f, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(path + ".tmp", path)
    return 1 if "error" in result else 0


def _short(v) -> str:
    if isinstance(v, (list, tuple)):
        return "+".join(str(x).split("_")[0] for x in v)
    return str(v)


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def _measure(cfg, tok, task, row, point, trained, res, mem, base, test_ex, refs, train_b, val_b, probe_b,
             general_b, eval_step, cc, out_dir, n_model, log_every, log):
    import jlora
    from jlora.peft import base as B

    rep = jlora.param_report(trained, res.labels)
    preds = answers(cfg, trained, tok, test_ex, task.max_new_tokens)
    score = task.score(preds, refs)
    general = mean_loss(cfg, trained, general_b, eval_step)
    train_loss = mean_loss(cfg, trained, probe_b, eval_step)
    held_loss = mean_loss(cfg, trained, val_b, eval_step)
    step_s, tok_s = _timing(res.history, train_b, log_every, cc.batch_size * cc.seq_len)
    adir = os.path.join(out_dir, "adapters", row)
    shutil.rmtree(adir, ignore_errors=True)
    if point["kind"] == "full":
        jlora.save_pretrained(cfg, trained, adir, dtype="float32")
    else:
        jlora.save_adapter(cfg, trained, adir)
    prompts = [tok.apply_chat_template([m for m in ex["messages"] if m["role"] != "assistant"],
                                       add_generation_prompt=True, tokenize=True)
               for ex in test_ex[:min(4, len(test_ex))]]
    unmerged = decode_speed(cfg, trained, prompts, cc.decode_tokens)
    mergeable = all(m.mergeable for m in B.methods_in(trained))
    merged = decode_speed(cfg, jlora.merge(trained), prompts, cc.decode_tokens) if mergeable else None
    rec = {"method": row, "kind": point["kind"], "quantize": point["quantize"], "options": point["options"],
           "learning_rate": point["learning_rate"], "trainable_params": int(rep["trainable"]),
           "trainable_percent": 100.0 * rep["trainable"] / n_model, "total_params": int(rep["total"]),
           "peak_memory_bytes": mem["total"], "memory": mem, "memory_source": "xla_memory_analysis",
           "peak_rss_bytes": None, "device_peak_bytes": None,  # measured per process: --isolate (`_isolated`)
           "step_time_s": step_s, "tokens_per_s": tok_s, "adapter_bytes": dir_bytes(adir),
           "adapter_dir": os.path.relpath(adir, out_dir), "score_before": base["score"], "score_after": score,
           "general_loss_before": base["general_loss"], "general_loss_after": general,
           "forgetting": general - base["general_loss"], "train_loss": train_loss, "heldout_loss": held_loss,
           "overfitting_gap": held_loss - train_loss, "decode_tokens_per_s_unmerged": unmerged,
           "decode_tokens_per_s_merged": merged, "val_loss": point["val_loss"],
           "loss_curve": [[h["step"], h["loss"]] for h in res.history if "loss" in h],
           "sample_predictions": list(zip([ex["prompt"] for ex in test_ex[:3]], preds[:3], refs[:3]))}
    log(f"{row}: lr {point['learning_rate']:g}, exact match {base['score']:.1%} -> {score:.1%}, forgetting "
        f"{rec['forgetting']:+.4f}, overfitting gap {rec['overfitting_gap']:+.4f}, "
        f"{rec['trainable_params']:,} trainable, step memory {mem['total'] / 2**20:.1f} MiB")
    return rec


# ----------------------------------------------------------------------------------------------------------
# The report


def _fmt_bytes(n) -> str:
    if n is None:
        return "—"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _f(x, fmt="{:.3g}") -> str:
    return "—" if x is None else fmt.format(x)


def markdown(report: Dict) -> str:
    """The report as Markdown: the table of methods, then the sweep. ``step memory`` is XLA's analysis of the
    train step; ``peak RSS`` and ``device peak`` (per-method processes, ``--isolate``) appear where measured."""
    extra = _process_memory_columns(report["methods"])
    lines = [f"# jlora compare: {report['task']} on {report['model']}", "",
             f"{report['task_description']}. Machine: {report['machine']}; {report['date']}. "
             f"{report['n_train']} training examples ({report['epochs']:.1f} epochs), {report['n_val']} "
             f"validation, {report['n_test']} test; {report['config']['steps']} steps of "
             f"{report['config']['batch_size']} each.", "",
             "| method | lr | trainable | % | step memory | " + "".join(f"{h} | " for h, _ in extra) +
             "step s | tokens/s | adapter | score before → after | forgetting | overfitting gap | "
             "decode tok/s (merged) |",
             "|---|---|---|---|---|" + "---|" * len(extra) + "---|---|---|---|---|---|---|"]
    for r in report["methods"]:
        lines.append(
            f"| {r['method']} | {r['learning_rate']:g} | {r['trainable_params']:,} | {r['trainable_percent']:.3f} | "
            f"{_fmt_bytes(r['peak_memory_bytes'])} | " + "".join(f"{_fmt_bytes(r.get(k))} | " for _, k in extra) +
            f"{_f(r['step_time_s'])} | {_f(r['tokens_per_s'], '{:.0f}')} | "
            f"{_fmt_bytes(r['adapter_bytes'])} | {r['score_before']:.1%} → {r['score_after']:.1%} | "
            f"{r['forgetting']:+.4f} | {r['overfitting_gap']:+.4f} | {_f(r['decode_tokens_per_s_unmerged'], '{:.0f}')}"
            f" ({_f(r['decode_tokens_per_s_merged'], '{:.0f}')}) |")
    lines += ["", "Sweep (validation loss on the answer tokens; the lowest is chosen):", "",
              "| method | options | lr | val loss | final train loss |", "|---|---|---|---|---|"]
    for s in report["sweep"]:
        opts = ", ".join(f"{k}={_short(v)}" for k, v in sorted(s["options"].items())) or "—"
        lines.append(f"| {s['method']} | {opts} | {s['learning_rate']:g} | {s['val_loss']:.4f} | "
                     f"{_f(s['final_train_loss'], '{:.4f}')} |")
    lines += ["", "Plots: loss_curves.png, memory.png, score_vs_params.png, forgetting_vs_score.png."]
    return "\n".join(lines) + "\n"


def _process_memory_columns(recs) -> List[Tuple[str, str]]:
    """(header, key) of the per-process memory columns some record has (``--isolate``)."""
    return [(h, k) for h, k in (("peak RSS", "peak_rss_bytes"), ("device peak", "device_peak_bytes"))
            if any(r.get(k) is not None for r in recs)]


PLOTS = ("loss_curves.png", "memory.png", "score_vs_params.png", "forgetting_vs_score.png")


def plot(report: Dict, out_dir: str) -> List[str]:
    """The four PNG plots (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = report["methods"]
    paths = []

    def save(fig, name):
        path = os.path.join(out_dir, name)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in recs:
        c = np.asarray(r["loss_curve"], float).reshape(-1, 2)
        ax.plot(c[:, 0], c[:, 1], marker=".", label=r["method"])
    ax.set(xlabel="step", ylabel="training loss", title=f"{report['task']}: training loss")
    ax.legend(fontsize=8)
    save(fig, "loss_curves.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    bars = [("train step (XLA memory analysis)", "peak_memory_bytes")] + [
        (f"{h} of the method's process" if k == "peak_rss_bytes" else h, k)
        for h, k in _process_memory_columns(recs)]
    x, width = np.arange(len(recs)), 0.8 / len(bars)
    for i, (label, key) in enumerate(bars):
        ax.bar(x + (i - (len(bars) - 1) / 2) * width, [(r.get(key) or 0) / 2**20 for r in recs], width, label=label)
    ax.set_xticks(x, [r["method"] for r in recs])
    ax.set(ylabel="MiB", title="train step memory (XLA memory analysis)" if len(bars) == 1 else "peak memory")
    if len(bars) > 1:
        ax.legend(fontsize=8)
    save(fig, "memory.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in recs:
        ax.scatter(max(r["trainable_params"], 1), r["score_after"])
        ax.annotate(r["method"], (max(r["trainable_params"], 1), r["score_after"]), fontsize=8)
    ax.set(xscale="log", xlabel="trainable parameters", ylabel="exact match after", title="score vs size")
    save(fig, "score_vs_params.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in recs:
        ax.scatter(r["forgetting"], r["score_after"])
        ax.annotate(r["method"], (r["forgetting"], r["score_after"]), fontsize=8)
    ax.set(xlabel="forgetting (general-text loss after - before)", ylabel="exact match after",
           title="learning vs forgetting")
    save(fig, "forgetting_vs_score.png")
    return paths


def write_report(report: Dict, out_dir: str) -> None:
    """report.json, report.md and the plots."""
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(markdown(report))
    plot(report, out_dir)


def parse_lrs(items: Sequence[str]) -> Dict[str, Tuple[float, ...]]:
    """``["lora=1e-3,3e-3", "full=1e-5"]`` -> ``{"lora": (1e-3, 3e-3), "full": (1e-5,)}`` (CLI ``--lr``).

    Example:
      >>> parse_lrs(["lora=1e-3,3e-3"])
      {'lora': (0.001, 0.003)}
    """
    out = {}
    for item in items:
        name, sep, values = item.partition("=")
        try:
            if not sep:
                raise ValueError
            out[name.strip()] = tuple(float(v) for v in values.split(",") if v.strip())
        except ValueError:
            raise ValueError(f"--lr {item!r}: expected METHOD=LR[,LR...], e.g. lora=1e-3,3e-3") from None
    return out
