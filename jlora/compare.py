"""`jlora compare`: full fine-tuning and every PEFT method on one model and one task, measured side by side.

Every method (a row) gets the same data, the same step budget and the same evaluation; its learning rate is
chosen by a small recorded sweep on a validation split (methods differ by orders of magnitude in their best rate),
and for LoRA the sweep then also tries the target set (q,v vs all linear layers) and the rank at the best rate.
The report shows every sweep point, not only the winners.

For each method's chosen configuration it measures:

* ``trainable_params`` / ``trainable_percent`` (of the model's own parameters, `jlora.param_report`);
* ``peak_memory_bytes``: XLA's own memory analysis of the compiled train step (arguments + outputs + scratch,
  aliased donations counted once) — one process can compare methods with it, where a process RSS cannot;
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

The report is ``report.json`` (one record per method, and the sweep), ``report.md`` and four PNG plots.

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
      cc: the configuration.
      log: progress lines.
      model_name: recorded in the report.

    Returns:
      the report dict (also ``report.json``).
    """
    import jax
    import jax.numpy as jnp

    import jlora
    from jlora import quant as Q, tasks, train
    from jlora.loop import FitConfig, fit
    from jlora.peft import base as B

    rows = cc.rows()
    t = tasks.get(task)
    train_ex, val_ex, test_ex = t.splits(cc.train_size(), cc.n_eval, cc.seed)
    os.makedirs(out_dir, exist_ok=True)
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

    records, sweep = [], []
    for row in rows:
        kind, quant = ROWS.get(row, (row, None))
        options = {**_default_options(kind), **cc.method_options.get(row, {})}
        lrs = tuple(cc.learning_rates.get(row) or DEFAULT_LRS.get(kind, DEFAULT_LR))
        log(f"{row}: sweep over learning rates {', '.join(f'{x:g}' for x in lrs)}")
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
        records.append(_measure(cfg, tok, t, row, point, trained, res, mem, base_numbers(quant), test_ex, refs,
                                train_b, val_b, train_probe_b, general_b, eval_step, cc, out_dir, n_model,
                                log_every, log))
    report = {"model": model_name or f"{cfg.arch} ({n_model:,} parameters)", "task": task,
              "task_description": t.description, "machine": machine(),
              "date": datetime.date.today().isoformat(), "config": _jsonable(dataclasses.asdict(cc)),
              "n_train": len(train_ex), "n_val": len(val_ex), "n_test": len(test_ex),
              "epochs": cc.steps * cc.batch_size / len(train_ex), "methods": records, "sweep": sweep}
    write_report(report, out_dir)
    return report


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
    """The report as Markdown: the table of methods, then the sweep."""
    lines = [f"# jlora compare: {report['task']} on {report['model']}", "",
             f"{report['task_description']}. Machine: {report['machine']}; {report['date']}. "
             f"{report['n_train']} training examples ({report['epochs']:.1f} epochs), {report['n_val']} "
             f"validation, {report['n_test']} test; {report['config']['steps']} steps of "
             f"{report['config']['batch_size']} each.", "",
             "| method | lr | trainable | % | step memory | step s | tokens/s | adapter | score before → after | "
             "forgetting | overfitting gap | decode tok/s (merged) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["methods"]:
        lines.append(
            f"| {r['method']} | {r['learning_rate']:g} | {r['trainable_params']:,} | {r['trainable_percent']:.3f} | "
            f"{_fmt_bytes(r['peak_memory_bytes'])} | {_f(r['step_time_s'])} | {_f(r['tokens_per_s'], '{:.0f}')} | "
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
    ax.bar([r["method"] for r in recs], [r["peak_memory_bytes"] / 2**20 for r in recs])
    ax.set(ylabel="MiB", title="train step memory (XLA memory analysis)")
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
