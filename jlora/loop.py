"""The training loop: schedule, evaluation, logging, checkpoints with exact resume, a NaN guard.

`fit` drives `jlora.train.make_train_step` over `jlora.data.Batches`. The batch at step k is a pure function
of (seed, k) and the checkpoint holds the train state (step, trainable params, optimizer state, PRNG key), so
a run restarted from its last checkpoint computes bitwise the same steps as one that never stopped.

A run directory holds one run at a time (a lock, `jlora.checkpoint.lock_run_dir`); on resume the logs
(``metrics.jsonl``, TensorBoard) drop what was logged after the restored step, so each step appears once; and
SIGTERM/SIGINT stop the run cleanly after a committed checkpoint, with exit status 75 (`Preempted`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jlora import train
from jlora.checkpoint import Checkpointer, lock_run_dir
from jlora.config import ModelConfig
from jlora.tbwriter import SummaryWriter
from jlora.tree import param_report, trainable_labels

SCHEDULES = ("constant", "linear", "cosine")


class TrainingDiverged(FloatingPointError):
    """The loss or gradient norm became NaN/Inf; the run stopped without saving the bad state."""


PREEMPTED_EXIT_STATUS = 75  # EX_TEMPFAIL (sysexits.h): a temporary failure, run again to continue


class Preempted(SystemExit):
    """`fit` stopped on SIGTERM/SIGINT after committing a checkpoint at ``step``; running it again resumes.

    A ``SystemExit`` whose code is `PREEMPTED_EXIT_STATUS` (75): uncaught, the process exits with status 75
    and no traceback, which tells a job scheduler or a retry loop "preempted, rerun" apart from success (0) and
    failure (1). ``step``, ``run_dir`` and ``signal`` (e.g. ``"SIGTERM"``) say where it stopped.
    """

    def __init__(self, step: int, run_dir: str, signal_name: str):
        super().__init__(PREEMPTED_EXIT_STATUS)
        self.step, self.run_dir, self.signal = step, run_dir, signal_name

    def __str__(self):
        return (f"stopped at step {self.step} on {self.signal}: checkpoint committed in {self.run_dir}; run "
                f"again to resume")


class _StopSignals:
    """While active, SIGTERM and SIGINT set ``received`` (the signal's name) instead of ending the process; a
    second SIGINT raises KeyboardInterrupt. Only in the main thread (Python allows handlers only there)."""

    SIGNALS = ("SIGTERM", "SIGINT")

    def __init__(self, enabled: bool):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.received: Optional[str] = None
        self._prev: dict = {}

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.received is not None and name == "SIGINT":
            self._restore()
            raise KeyboardInterrupt
        if self.received is None:
            self.received = name
            try:  # a raw write: the handler may run inside a print to sys.stderr (the progress line)
                os.write(2, f"\n{name} received: finishing this step and saving a checkpoint (Ctrl-C again to "
                            f"abort)\n".encode())
            except OSError:
                pass

    def _restore(self):
        for sig, prev in self._prev.items():
            signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
        self._prev = {}

    def __enter__(self):
        if self.enabled:
            for name in self.SIGNALS:
                sig = getattr(signal, name)
                self._prev[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        self._restore()


def _distributed() -> bool:
    """Whether `jax.distributed` is initialized (its preemption service then owns SIGTERM)."""
    try:
        from jax._src import distributed

        return distributed.global_state.client is not None
    except (ImportError, AttributeError):
        return jax.process_count() > 1


def truncate_metrics(path: str, last_step: int) -> int:
    """Drops the lines of a ``metrics.jsonl`` whose step is after ``last_step`` (and unreadable lines, e.g.
    one cut short by a kill), rewriting the file atomically; returns how many were dropped.

    Example:
      >>> with open(f"{tmp}/m.jsonl", "w") as f:
      ...     _ = f.write("".join(json.dumps({"step": s, "loss": 1.0}) + "\\n" for s in (1, 2, 3)) + '{"st')
      >>> truncate_metrics(f"{tmp}/m.jsonl", 2), [json.loads(l)["step"] for l in open(f"{tmp}/m.jsonl")]
      (2, [1, 2])
    """
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        lines = f.readlines()
    keep = []
    for line in lines:
        try:
            entry = json.loads(line)
            ok = line.endswith("\n") and int(entry["step"]) <= last_step
        except (ValueError, KeyError, TypeError):
            ok = False
        if ok:
            keep.append(line)
    dropped = len(lines) - len(keep)
    if dropped:
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            f.writelines(keep)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return dropped


@dataclasses.dataclass(frozen=True)
class FitConfig:
    """Options of `fit`.

    Args:
      steps: total optimizer steps of the run (a resumed run continues up to this).
      learning_rate: peak learning rate.
      schedule: "constant", "linear" (decay to ``min_lr_ratio``) or "cosine", after ``warmup_steps`` of
        linear warm-up from 0.
      warmup_steps: warm-up length.
      min_lr_ratio: final learning rate as a fraction of the peak.
      weight_decay: AdamW decoupled weight decay (matrices only).
      adam_eps: Adam's epsilon.
      max_grad_norm: clip the global gradient norm (None: off).
      label_smoothing: see `jlora.train.lm_loss_sum`.
      lr_ratios: per-role learning-rate multipliers (e.g. ``{"lora_b": 16}`` for LoRA+).
      eval_every: evaluate every N steps (0: only at the end; needs eval batches).
      save_every: checkpoint every N steps (0: only at the end).
      keep_last: checkpoints kept (plus the best by eval loss when there are eval batches).
      log_every: print/log training metrics every N steps (also the NaN-check interval).
      seed: PRNG seed of the train state (dropout).
    """

    steps: int = 100
    learning_rate: float = 1e-4
    schedule: str = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    adam_eps: float = 1e-8
    max_grad_norm: Optional[float] = 1.0
    label_smoothing: float = 0.0
    lr_ratios: Optional[Dict[str, float]] = None
    eval_every: int = 0
    save_every: int = 0
    keep_last: int = 2
    log_every: int = 10
    seed: int = 0

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"FitConfig.steps must be >= 1, got {self.steps}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"FitConfig.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(f"FitConfig.warmup_steps must be in [0, steps], got {self.warmup_steps}")
        for name in ("eval_every", "save_every", "keep_last", "log_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"FitConfig.{name} must be >= 0, got {getattr(self, name)}")


def make_schedule(fc: FitConfig) -> Callable:
    """The learning-rate schedule of ``fc`` as an optax schedule (step -> lr)."""
    peak, end = fc.learning_rate, fc.learning_rate * fc.min_lr_ratio
    decay_steps = max(fc.steps - fc.warmup_steps, 1)
    if fc.schedule == "constant":
        after = optax.constant_schedule(peak)
    elif fc.schedule == "linear":
        after = optax.linear_schedule(peak, end, decay_steps)
    else:
        after = optax.cosine_decay_schedule(peak, decay_steps, alpha=fc.min_lr_ratio)
    if fc.warmup_steps == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, fc.warmup_steps), after], [fc.warmup_steps])


@dataclasses.dataclass
class FitResult:
    state: Any
    labels: Any
    history: list
    resumed_from: Optional[int]
    eval: Dict[str, float]


def evaluate(eval_step, params, batches, put: Callable = lambda b: b) -> Dict[str, float]:
    """Token-weighted mean loss and perplexity over every batch of ``batches`` (a `jlora.data.Batches`);
    ``put`` places each host batch (e.g. `jlora.parallel.global_batch` under a mesh)."""
    loss_sum, tokens = 0.0, 0.0
    for _, batch in batches.iterate(0, batches.steps_per_epoch):
        out = eval_step(params, put(batch))
        loss_sum += float(out["loss_sum"])
        tokens += float(out["tokens"])
    loss = loss_sum / max(tokens, 1.0)
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0)), "eval_tokens": tokens}


class _Progress:
    def __init__(self, total: int, start: int, enabled: bool):
        self.total, self.start, self.enabled = total, start, enabled
        self.t0 = time.perf_counter()
        self.tty = sys.stderr.isatty()

    def show(self, step: int, loss: float, tok_s: float):
        if not self.enabled:
            return
        done = step - self.start
        rate = done / max(time.perf_counter() - self.t0, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        width = 24
        filled = int(width * step / self.total)
        bar = "#" * filled + "-" * (width - filled)
        line = (f"[{bar}] step {step}/{self.total} | loss {loss:.4f} | {tok_s:,.0f} tok/s | "
                f"ETA {_fmt_time(eta)}")
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def close(self):
        if self.enabled and self.tty:
            print(file=sys.stderr)


def _fmt_time(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(s)
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def fit(cfg: ModelConfig, params, train_batches, *, run_dir: str, fit_config: FitConfig = FitConfig(),
        labels=None, eval_batches=None, eval_fn: Optional[Callable[[Any], Dict[str, float]]] = None,
        base_ref: Optional[str] = None, run_config: Optional[dict] = None, progress: bool = True,
        stop_at: Optional[int] = None, log: Callable[[str], None] = print, mesh=None,
        handle_signals: bool = True) -> FitResult:
    """Trains ``params`` for ``fit_config.steps`` steps, resuming automatically from ``run_dir``.

    Args:
      cfg: model config (``cfg.dtype`` = compute dtype, ``cfg.remat``).
      params: the initial parameter tree (e.g. after `jlora.lora.init`); its frozen part is also the base a
        resumed run is checked against.
      train_batches: a `jlora.data.Batches`; ``batch_at(k)`` feeds step k.
      run_dir: checkpoints, ``metrics.jsonl``, TensorBoard events (``tb/``) and ``run_config.json`` go here.
        If it already holds checkpoints, the latest good one is restored and the run continues from it.
      fit_config: the loop options.
      labels: the label tree (default `jlora.trainable_labels(params)`: adapters if any, else everything).
      eval_batches: optional `jlora.data.Batches` for evaluation (loss, perplexity).
      eval_fn: optional ``params -> {name: value}`` extra evaluation (e.g. a generation-based score).
      base_ref: a string recorded with checkpoints naming the base model.
      run_config: a JSON-able dict describing the run; a run directory made with a different one is refused.
      progress: show a progress line on stderr.
      stop_at: stop (with a checkpoint) once this step is reached, e.g. to fit a job's time limit; running
        `fit` again on the same run directory resumes and finishes the run exactly as if it had not stopped.
      log: where to print milestones.
      mesh: a `jax.sharding.Mesh` from `jlora.parallel.make_mesh` to train sharded over (data / fsdp /
        tensor parallel); None: the default device. Batches must then be this process's slice of the global
        batch (``Batches(host_index=jax.process_index(), host_count=jax.process_count())``) and their size a
        multiple of ``data`` x ``fsdp``. Checkpoints hold global arrays, so a run may resume on another mesh.

    Returns:
      `FitResult` with the final state, labels, the logged history, the step resumed from and the last eval.

    Note:
      The train step donates its state, so the arrays of ``params`` (a LoRA run's frozen base included) are
      consumed: use ``result.state.params`` afterwards (its base is ``jlora.lora.strip(result.state.params)``).
      Donation is what lets XLA reuse the frozen weights' buffers instead of copying them every step.

    One run per directory: ``run_dir`` is locked for the duration (`jlora.checkpoint.lock_run_dir`), and
    a second process on it is refused at once. On resume, ``metrics.jsonl`` and TensorBoard drop what an
    interrupted run logged after the restored step, so each step appears once in the logs.

    Preemption (``handle_signals``): on SIGTERM (how spot/preemptible VMs and TPU pods announce an eviction,
    and what ``kill`` and schedulers send) or SIGINT (Ctrl-C), the loop finishes the current step, saves a
    checkpoint, waits for it to commit and raises `Preempted`, a ``SystemExit`` with status 75
    (`PREEMPTED_EXIT_STATUS`, ``EX_TEMPFAIL``: "try again"); running `fit` again resumes bitwise. A second
    Ctrl-C interrupts at once (KeyboardInterrupt). Handlers are installed only in the main thread and the
    previous ones restored on return. Multi-host (``jax.distributed``), SIGTERM goes through JAX's preemption
    service, which picks one step for every process to save at.

    Raises:
      TrainingDiverged: the loss became NaN/Inf (the last good checkpoint is left intact).
      Preempted: a SIGTERM/SIGINT stopped the run after committing a checkpoint (exit status 75 if uncaught).
      RunDirLockedError: another process is training in ``run_dir`` (an OSError naming the holder's pid/host).
    """
    quiet = (lambda *_: None) if jax.process_index() != 0 else log
    with lock_run_dir(run_dir, quiet):
        return _fit(cfg, params, train_batches, run_dir, fit_config, labels, eval_batches, eval_fn, base_ref,
                    run_config, progress, stop_at, log, mesh, handle_signals)


def _fit(cfg, params, train_batches, run_dir, fit_config, labels, eval_batches, eval_fn, base_ref, run_config,
         progress, stop_at, log, mesh, handle_signals) -> FitResult:
    fc = fit_config
    primary = jax.process_index() == 0  # multi-host: one process logs and writes metrics; all save checkpoints
    if not primary:
        log, progress = (lambda *_: None), False
    labels = trainable_labels(params) if labels is None else labels
    schedule = make_schedule(fc)
    tx = train.make_optimizer(labels, schedule, weight_decay=fc.weight_decay, eps=fc.adam_eps,
                              lr_ratios=fc.lr_ratios)
    accum = getattr(train_batches, "accum_steps", 1)
    step_kwargs = dict(max_grad_norm=fc.max_grad_norm, label_smoothing=fc.label_smoothing, accum_steps=accum)
    if mesh is None:
        state = train.init_state(params, tx, fc.seed)
        step_fn = jax.jit(train.make_train_step(cfg, tx, labels, **step_kwargs), donate_argnums=0)
        eval_step = jax.jit(train.make_eval_step(cfg)) if eval_batches is not None else None
        put_train = put_eval = lambda b: b
    else:
        from jlora import parallel

        dp = parallel.data_parallel_size(mesh)
        for what, b in (("train", train_batches), ("eval", eval_batches)):
            size = getattr(b, "batch_size", None)
            if size is not None and size % dp:
                raise ValueError(f"{what} batch size {size} is not divisible by the data-parallel size {dp} of mesh "
                                 f"{parallel.mesh_str(mesh)} (data x fsdp); use a batch size that is a multiple "
                                 f"of {dp}")
        state, shardings = parallel.init_sharded_state(params, tx, mesh, fc.seed)
        step_fn = parallel.make_sharded_train_step(cfg, tx, labels, mesh, shardings, **step_kwargs)
        eval_step = (parallel.make_sharded_eval_step(cfg, mesh, shardings.params)
                     if eval_batches is not None else None)
        put_train = lambda b: parallel.global_batch(b, mesh, accum)  # noqa: E731
        put_eval = lambda b: parallel.global_batch(b, mesh)  # noqa: E731
        log(f"mesh {parallel.mesh_str(mesh)} over {mesh.devices.size} {mesh.devices.flat[0].platform} devices")
    del params
    data_fp = getattr(train_batches, "fingerprint", None)
    config = dict(run_config or {})
    config.setdefault("data_fingerprint", data_fp)
    ckpt = Checkpointer(run_dir, save_every=fc.save_every or fc.steps, keep_last=max(fc.keep_last, 1),
                        keep_best=1 if eval_batches is not None else 0,
                        best_metric="eval_loss" if eval_batches is not None else None,
                        base_ref=base_ref, config=config)
    try:
        resumed_from = ckpt.latest_step()
        if resumed_from is not None:
            state, extra = ckpt.restore(like_state=state, labels=labels)
            log(f"resumed from step {int(state.step)} in {run_dir}")
    except BaseException:
        ckpt.close()
        raise
    rep = param_report(state.params, labels)
    log(f"trainable params: {rep['trainable']:,} / {rep['total']:,} ({rep['percent']:.3f}%)")

    start = int(state.step)
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    tb = None
    if primary:
        # What an interrupted run logged after the checkpoint restored here is dropped (and logged again),
        # so that the logs hold each step once and agree with the checkpoint.
        dropped = truncate_metrics(metrics_path, start)
        if dropped:
            log(f"dropped {dropped} line(s) after step {start} from {metrics_path} (logged after the last "
                f"checkpoint by an interrupted run)")
        tb = SummaryWriter(os.path.join(run_dir, "tb"), purge_step=start + 1)
    history: list = []

    def record(entry, persist=True):
        history.append(entry)
        if not primary or not persist:
            return
        with open(metrics_path, "a") as f:
            f.write(json.dumps(entry) + "\n")
        tb.scalars(entry["step"], {k: v for k, v in entry.items() if k != "step" and isinstance(v, (int, float))})

    def run_eval(step, persist=True):
        out = {}
        if eval_step is not None:
            out.update(evaluate(eval_step, state.params, eval_batches, put_eval))
        if eval_fn is not None:
            out.update({k: float(v) for k, v in eval_fn(state.params).items()})
        if out:
            record({"step": step, **out}, persist)
            log(f"eval @ step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in out.items()))
        return out

    prog = _Progress(fc.steps, start, progress)
    last_eval: Dict[str, float] = {}
    pending = []  # device metrics since the last log, checked for NaN before any save
    clock = {"t": time.perf_counter(), "tokens": 0.0}

    def flush(done, step):
        """Fetches the pending metrics, stops on NaN/Inf, logs their mean."""
        host = jax.device_get(pending)
        pending.clear()
        for i, hm in enumerate(host):
            if not (np.isfinite(hm["loss"]) and np.isfinite(hm["grad_norm"])):
                bad = done - len(host) + i + 1
                good = ckpt.latest_step()
                raise TrainingDiverged(
                    f"loss became {float(hm['loss'])} (grad norm {float(hm['grad_norm'])}) at step {bad}; "
                    f"stopped without saving. The last good checkpoint is "
                    f"{'step ' + str(good) if good is not None else 'none'} in {run_dir}; lower the "
                    f"learning rate or enable max_grad_norm and rerun to resume from it.")
        clock["tokens"] += sum(float(hm["tokens"]) for hm in host)
        now = time.perf_counter()
        tok_s = clock["tokens"] / max(now - clock["t"], 1e-9)
        clock["t"], clock["tokens"] = now, 0.0
        loss = float(np.mean([hm["loss"] for hm in host]))
        record({"step": done, "loss": loss, "grad_norm": float(host[-1]["grad_norm"]),
                "lr": float(schedule(step)), "tokens_per_s": tok_s})
        prog.show(done, loss, tok_s)

    # Multi-host: JAX's preemption service catches SIGTERM and picks one step for every process to save at
    # (checked every step); one process: our own SIGTERM/SIGINT handlers set a flag read after each step.
    multi = _distributed()
    signals = _StopSignals(handle_signals and not multi)
    preempted = None
    try:
        with signals:
            for step in range(start, fc.steps):
                state, m = step_fn(state, put_train(train_batches.batch_at(step)))
                pending.append(m)
                done = step + 1
                is_last = done == fc.steps
                if multi and handle_signals and ckpt.reached_preemption(done) and not is_last:
                    preempted = "SIGTERM"
                elif signals.received and not is_last:
                    preempted = signals.received
                stopping = (stop_at is not None and done >= stop_at and not is_last) or preempted is not None
                do_eval = (fc.eval_every and done % fc.eval_every == 0) or is_last
                do_save = (fc.save_every and done % fc.save_every == 0) or is_last or stopping
                if done % max(fc.log_every, 1) == 0 or do_eval or do_save:
                    flush(done, step)
                if not multi and signals.received and not is_last and preempted is None:
                    # the signal came while this step's metrics were fetched: stop after this step too
                    preempted, stopping, do_save = signals.received, True, True
                    if pending:
                        flush(done, step)
                if do_eval:
                    last_eval = run_eval(done)
                if do_save:
                    ckpt.save(done, state, labels, metrics=last_eval if do_eval else None,
                              extra={"data_fingerprint": data_fp}, force=is_last or stopping)
                if preempted is not None:
                    ckpt.wait_until_finished()  # committed before we report it (and exit)
                    log(f"stopped at step {done} on {preempted}: checkpoint committed in {run_dir}; run again "
                        f"to resume (exit status {PREEMPTED_EXIT_STATUS})")
                    break
                if stopping:
                    log(f"stopped at step {done} (stop_at); run again to resume")
                    break
        if start >= fc.steps:
            log(f"run already complete at step {start} (FitConfig.steps = {fc.steps})")
            last_eval = run_eval(start, persist=False)  # logged when the run reached it
    finally:
        prog.close()
        if tb is not None:
            tb.close()
        ckpt.close()
    if preempted is not None:
        raise Preempted(int(state.step), run_dir, preempted)
    return FitResult(state=state, labels=labels, history=history, resumed_from=resumed_from, eval=last_eval)
