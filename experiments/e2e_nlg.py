"""E2E NLG with GPT-2 medium: the LoRA paper's setting (Hu et al. 2021, section 5.5 and table 11), in jlora.

A thin script over library calls: read the E2E files, tokenize them as prompt/completion pairs
(`jlora.data`), LoRA-wrap the model (`jlora.lora.init`), train with `jlora.loop.fit` (resumes automatically from
``<out>/run``), beam-decode one prediction per unique meaning representation (`jlora.generate`) and write
``predictions.txt`` / ``references.txt`` for the official scorer (github.com/tuetschek/e2e-metrics).

Defaults are the paper's GPT-2 M recipe: LoRA r=4, alpha=32 on the query and value slices of the fused
``c_attn`` only, LoRA dropout 0.1, AdamW lr 2e-4 (epsilon 1e-6), weight decay 0.01, batch 8, 5 epochs, 500
warm-up steps then linear decay to 0, label smoothing 0.1, no gradient clipping; beam 10, no-repeat n-gram 4, length penalty 0.9,
at most 64 new tokens. ``--method full`` is the full fine-tuning baseline with the same loop (lr 5e-5 unless
``--lr`` is given, no LoRA). Every value is a flag (``--help``).

Data: the files of microsoft/LoRA ``examples/NLG/data/e2e/{train,valid,test}.txt``, one example per line,
``<meaning representation>||<reference>``, e.g.::

    name : Blue Spice | Type : coffee shop | area : city centre||Blue Spice is a coffee shop in city centre .

Formatting, as in that repository (``src/format_converting_e2e.py``, ``src/gpt2_encode.py --add_bos --add_eos``,
``src/data_utils.py``): the context is ``MR`` followed by one separator token (GPT-2's ``<|endoftext|>``, id 50256:
the BOS), the completion is ``" " + reference`` followed by EOS (50256 again), the text encoded without other
special tokens; the loss covers the completion and its EOS only (`jlora.data.Batches` over these
``(ids, target_mask)`` pairs, one example per padded row unless ``--pack``). Decoding stops at EOS or at
``"\\n\\n"`` (GPT-2 id 628, the repository's ``--eos_token_id 628``); a prediction is the decoded text cut at the
first blank line and stripped (``src/gpt2_decode.py``). References are grouped by identical MR in order of first
appearance: ``references.txt`` holds each group's references one per line followed by a blank line,
``predictions.txt`` one line per group, which is what ``measure_scores.py REF PRED`` reads.

Getting the model and data (once)::

    huggingface-cli download openai-community/gpt2-medium --local-dir models/gpt2-medium \\
        --include config.json model.safetensors tokenizer.json tokenizer_config.json vocab.json merges.txt
    git clone https://github.com/microsoft/LoRA && cp -r LoRA/examples/NLG/data/e2e data/e2e
    git clone https://github.com/tuetschek/e2e-metrics && pip install -r e2e-metrics/requirements.txt

A single GPU host (one GPU; with several, add e.g. ``--mesh data=8``)::

    python experiments/e2e_nlg.py --model models/gpt2-medium --data data/e2e --out runs/e2e-lora
    python experiments/e2e_nlg.py --model models/gpt2-medium --data data/e2e --out runs/e2e-full --method full
    python e2e-metrics/measure_scores.py runs/e2e-lora/references.txt runs/e2e-lora/predictions.txt -p

A TPU VM, single host (e.g. v4-8: 4 chips; the batch of 8 is split 2 per chip)::

    python experiments/e2e_nlg.py --model models/gpt2-medium --data data/e2e --out runs/e2e-lora \\
        --mesh data=4

A TPU pod slice (e.g. v4-16: 8 chips on 2 hosts). Every worker runs the same command, with this repository
(and its ``.venv``), the model and the data at the same paths; each process reads its share of every batch, so
the batch must divide by the data-parallel size (``data`` x ``fsdp``) and by the number of hosts. ``--out`` must
be one directory that every worker sees (an NFS / Filestore mount, or a bucket mounted with gcsfuse): the
checkpoints are written by all hosts together::

    gcloud compute tpus tpu-vm ssh my-tpu --zone us-central2-b --worker=all --command "
        cd ~/jlora && .venv/bin/python experiments/e2e_nlg.py --distributed --mesh data=8 \\
            --model models/gpt2-medium --data data/e2e --out /mnt/shared/runs/e2e-lora"

(``--mesh data=2,fsdp=4`` shards the weights and optimizer state too; on TPU, ``--dtype bfloat16`` computes
in bfloat16 with float32 trainable weights and optimizer state.)

Running the same command again resumes from the last checkpoint in ``<out>/run`` (or, for a finished run, only
decodes again); a run directory made with other training settings is refused. ``--stop-at STEP`` stops (with a
checkpoint) at a step, e.g. to fit a preemptible VM's time limit. In multi-host runs every process decodes the
whole test set on its own first local device (the trained parameters are gathered first) and process 0 alone
writes files.

Known differences from the original PyTorch code: the loss is the token-weighted mean over the batch (the original
averaged per sequence, then over the batch); the no-repeat-n-gram rule also sees the prompt (as transformers
does; the original looked at the generated tokens only); the README of the original uses length penalty 0.8 in
its decoding command, the paper's table 11 0.9 (the default here).

Test: ``tests/test_e2e_experiment.py`` runs `main` end to end on CPU with the ``tiny-gpt2`` preset and the
made-up data set ``experiments/data/e2e_tiny``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import List, NamedTuple, Optional, Sequence, Tuple

SPLITS = ("train", "valid", "test")
FULL_FT_LR = 5e-5
LORA_LR = 2e-4


# --------------------------------------------------------------------------------------------------------------
# Data: the LoRA repository's E2E text format
# --------------------------------------------------------------------------------------------------------------


class E2ELine(NamedTuple):
    """One line of an E2E file: meaning representation, reference text, and ``"path:line"``."""

    mr: str
    ref: str
    source: str


def read_e2e(path: str) -> List[E2ELine]:
    """Reads ``MR||reference`` lines (blank lines are skipped).

    Args:
      path: an E2E ``.txt`` file in the microsoft/LoRA format.

    Returns:
      the lines in file order.

    Raises:
      FileNotFoundError: no such file.
      ValueError: a line without exactly one ``||``, or with an empty MR or reference; the message names the
        file and line.

    Example:
      >>> read_e2e("experiments/data/e2e_tiny/test.txt")[0].mr
      'name : The Copper Kettle | Type : coffee shop | food : English | customer rating : high'
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such E2E data file")
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            line = line.strip()
            if not line:
                continue
            where = f"{path}:{n}"
            parts = line.split("||")
            if len(parts) != 2:
                raise ValueError(f"{where}: expected 'meaning representation||reference' with exactly one '||', "
                                 f"found {len(parts) - 1}: {line[:80]!r}")
            mr, ref = parts[0].strip(), parts[1].strip()
            if not mr or not ref:
                raise ValueError(f"{where}: empty {'meaning representation' if not mr else 'reference'}: "
                                 f"{line[:80]!r}")
            out.append(E2ELine(mr, ref, where))
    if not out:
        raise ValueError(f"{path}: no examples")
    return out


def group_by_mr(lines: Sequence[E2ELine]) -> List[Tuple[str, List[str]]]:
    """``[(mr, [references...]), ...]`` for the unique MRs, in order of first appearance."""
    groups: dict = {}
    for ln in lines:
        groups.setdefault(ln.mr, []).append(ln.ref)
    return list(groups.items())


def special_ids(tok, cfg) -> Tuple[int, int]:
    """``(separator id, EOS id)``: GPT-2's ``<|endoftext|>`` (50256) for both. The tokenizer's named BOS/EOS
    tokens, else the model config's ids (the hub's ``openai-community/gpt2-medium`` tokenizer files name no
    special tokens; its ``config.json`` has ``bos_token_id = eos_token_id = 50256``)."""
    eos = tok.eos_token_id
    if eos is None:
        eos = next(iter(tuple(tok.eos_token_ids) + cfg.eos_ids), None)
    if eos is None:
        raise ValueError(f"neither the tokenizer {tok.name!r} nor the model config names an EOS token; the E2E "
                         "format needs one (it ends every reference)")
    sep = tok.bos_token_id if tok.bos_token_id is not None else cfg.bos_token_id
    return (eos if sep is None else int(sep)), int(eos)


def tokenize(lines: Sequence[E2ELine], tok, sep: int, eos: int, vocab_size: int):
    """``(ids, target_mask)`` per line, as the original ``gpt2_encode.py --add_bos --add_eos`` and
    ``data_utils.FT_Dataset``: ``MR <sep>`` (not targets) then ``" " + reference <eos>`` (the targets), text
    encoded without special tokens."""
    import numpy as np

    seqs = []
    for ln in lines:
        mr = tok.encode(ln.mr, add_special_tokens=False)
        ref = tok.encode(" " + ln.ref, add_special_tokens=False)
        ids = np.asarray(mr + [sep] + ref + [eos], np.int32)
        if ids.max() >= vocab_size:
            raise ValueError(f"{ln.source}: token id {int(ids.max())} is outside the model's vocabulary of "
                             f"{vocab_size}; the tokenizer does not belong to this model")
        seqs.append((ids, np.asarray([0] * (len(mr) + 1) + [1] * (len(ref) + 1), np.int32)))
    return seqs


def prompt_ids(seq) -> List[int]:
    """The prompt part (``MR <sep>``) of a tokenized example: everything before the first target."""
    ids, mask = seq
    return [int(i) for i in ids[: int(mask.argmax())]]


def clean_prediction(text: str) -> str:
    """The repository's post-processing: cut at the first blank line, strip; one line for the scorer."""
    return " ".join(text.split("\n\n")[0].split())


def write_outputs(out_dir: str, groups, predictions: Sequence[str]) -> Tuple[str, str]:
    """Writes ``references.txt`` (each group's references, then a blank line) and ``predictions.txt`` (one line
    per group) in the format of e2e-metrics' ``measure_scores.py``, plus ``predictions.jsonl`` to read."""
    if len(groups) != len(predictions):
        raise ValueError(f"{len(predictions)} predictions for {len(groups)} meaning representations")
    ref_path, pred_path = os.path.join(out_dir, "references.txt"), os.path.join(out_dir, "predictions.txt")
    with open(ref_path, "w", encoding="utf-8") as f:
        for _, refs in groups:
            f.write("".join(" ".join(r.split()) + "\n" for r in refs) + "\n")
    with open(pred_path, "w", encoding="utf-8") as f:
        f.write("".join(p + "\n" for p in predictions))
    with open(os.path.join(out_dir, "predictions.jsonl"), "w", encoding="utf-8") as f:
        for (mr, refs), p in zip(groups, predictions):
            f.write(json.dumps({"mr": mr, "prediction": p, "references": refs}, ensure_ascii=False) + "\n")
    return ref_path, pred_path


# --------------------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------------------


def load_model(spec: str, seed: int, dtype: str = "float32"):
    """``(path or None, cfg, params)``: an existing HF dir / .gguf path, else a preset name (random init, for
    tests), else what the ``jlora`` command resolves (``smollm2``)."""
    import jax
    import jax.numpy as jnp

    import jlora
    from jlora.model_path import resolve_model

    if not os.path.exists(spec) and spec in jlora.PRESETS:
        cfg = jlora.preset(spec)
        params = jlora.init_params(cfg, jax.random.key(seed))
        params = jax.tree_util.tree_map(lambda x: x.astype(jnp.dtype(dtype)), params)
        return None, cfg, params
    path = resolve_model(spec)
    cfg, params = jlora.load_pretrained(path, dtype=jnp.dtype(dtype))
    return path, cfg, params


def lora_config(args, cfg):
    import jlora

    fused = tuple(p for p in args.fused_qkv.split(",") if p) if args.fused_qkv else None
    if cfg.arch != "gpt2":
        fused = None  # fused q|k|v slices exist only in GPT-2's c_attn
    targets = [t for t in args.lora_targets.split(",") if t] if args.lora_targets else None
    return jlora.LoraConfig(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                            target_modules=targets, fused_qkv=fused)


def host_copy(params):
    """Parameters every process can use alone: in a multi-host run, gathered (a collective: every process
    calls it) onto this process's first device; otherwise unchanged."""
    import jax

    import jlora.parallel

    if jax.process_count() == 1:
        return params
    return jax.device_put(jlora.parallel.to_host(params), jax.local_devices()[0])


def decode(cfg, params, tok, prompts: Sequence[List[int]], eos: int, args, log=print) -> List[str]:
    """Beam-decodes every prompt (batched by similar length, the last batch padded so shapes repeat); stops at
    ``eos``, the tokenizer's other EOS ids, and ``"\\n\\n"`` when it is one token (GPT-2: 628)."""
    import jlora

    stop = list(dict.fromkeys([eos, *tok.eos_token_ids]))
    nl2 = tok.encode("\n\n", add_special_tokens=False)
    if len(nl2) == 1 and nl2[0] not in stop:
        stop.append(nl2[0])  # the original's --eos_token_id 628
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: List[Optional[str]] = [None] * len(prompts)
    bs = max(1, args.decode_batch)
    t0 = time.perf_counter()
    for start in range(0, len(order), bs):
        idx = order[start:start + bs]
        batch = [prompts[i] for i in idx]
        batch += [batch[-1]] * (bs - len(batch)) if len(order) > bs else []
        new = jlora.generate(cfg, params, batch, max_new_tokens=args.max_new_tokens, num_beams=args.beam,
                             length_penalty=args.length_penalty, no_repeat_ngram_size=args.no_repeat_ngram,
                             eos_token_id=stop)
        for i, ids in zip(idx, new):
            ids = ids[:next((k for k, t in enumerate(ids) if t in stop), len(ids))]
            out[i] = clean_prediction(tok.decode(ids, skip_special_tokens=True))
        log(f"decoded {min(start + bs, len(order))}/{len(order)} ({time.perf_counter() - t0:.0f} s)")
    return out  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="LoRA / full fine-tuning of GPT-2 on E2E NLG (the LoRA paper's setup).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="HF model dir, .gguf file, or a preset name (random init)")
    p.add_argument("--tokenizer", help="tokenizer dir/file (default: the model's; required for a preset)")
    p.add_argument("--data", required=True, help="directory with train.txt, test.txt and optionally valid.txt")
    p.add_argument("--out", required=True, help="output dir: run/ (checkpoints), predictions, references")
    p.add_argument("--method", choices=("lora", "full"), default="lora")
    g = p.add_argument_group("LoRA")
    g.add_argument("--lora-r", type=int, default=4)
    g.add_argument("--lora-alpha", type=float, default=32.0)
    g.add_argument("--lora-dropout", type=float, default=0.1)
    g.add_argument("--lora-targets", default="", help="comma-separated module names (default: c_attn for GPT-2, "
                   "q_proj,v_proj otherwise)")
    g.add_argument("--fused-qkv", default="q,v", help="GPT-2 c_attn slices to adapt ('' for all of c_attn)")
    g = p.add_argument_group("training")
    g.add_argument("--lr", type=float, default=None, help=f"peak learning rate (default {LORA_LR} for LoRA, "
                   f"{FULL_FT_LR} for full)")
    g.add_argument("--epochs", type=int, default=5)
    g.add_argument("--steps", type=int, default=0, help="total steps; 0: epochs x steps per epoch")
    g.add_argument("--batch-size", type=int, default=8, help="global batch (all hosts)")
    g.add_argument("--accum-steps", type=int, default=1)
    g.add_argument("--warmup-steps", type=int, default=500)
    g.add_argument("--schedule", choices=("linear", "cosine", "constant"), default="linear")
    g.add_argument("--min-lr-ratio", type=float, default=0.0)
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--adam-eps", type=float, default=1e-6, help="Adam epsilon (the original code's 1e-6)")
    g.add_argument("--max-grad-norm", type=float, default=0.0, help="0: no clipping (as the original)")
    g.add_argument("--label-smoothing", type=float, default=0.1)
    g.add_argument("--seq-len", type=int, default=0, help="row length; 0: the longest example (rounded up to 8)")
    g.add_argument("--pack", action="store_true", help="pack several examples per row (they then attend to "
                   "one another; the original padded one per row)")
    g.add_argument("--eval-batch-size", type=int, default=0, help="0: --batch-size")
    g.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    g.add_argument("--base-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="storage of the frozen base (LoRA)")
    g.add_argument("--remat", action="store_true")
    g.add_argument("--seed", type=int, default=110, help="init, dropout and data order (the original's 110)")
    g = p.add_argument_group("run")
    g.add_argument("--eval-every", type=int, default=-1, help="valid loss every N steps; -1: every epoch; "
                   "0: at the end")
    g.add_argument("--save-every", type=int, default=1000)
    g.add_argument("--keep-last", type=int, default=2)
    g.add_argument("--log-every", type=int, default=100)
    g.add_argument("--stop-at", type=int, default=None, help="stop with a checkpoint at this step (resume later)")
    g.add_argument("--no-progress", action="store_true")
    g = p.add_argument_group("decoding")
    g.add_argument("--beam", type=int, default=10)
    g.add_argument("--length-penalty", type=float, default=0.9)
    g.add_argument("--no-repeat-ngram", type=int, default=4)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--decode-batch", type=int, default=16, help="MRs per generate call")
    g.add_argument("--no-decode", action="store_true", help="train only")
    g = p.add_argument_group("devices")
    g.add_argument("--mesh", default="", help='device mesh, e.g. "data=4,fsdp=2" (default: no mesh)')
    g.add_argument("--distributed", action="store_true", help="multi-host: call jax.distributed.initialize() "
                   "first (run the same command on every host)")
    return p


# Training settings recorded with the run: a run directory made with other values is refused (decoding,
# logging and device options may change between runs).
_RUN_KEYS = ("model", "tokenizer", "method", "lora_r", "lora_alpha", "lora_dropout", "lora_targets", "fused_qkv",
             "lr", "epochs", "steps", "batch_size", "accum_steps", "warmup_steps", "schedule", "min_lr_ratio",
             "weight_decay", "adam_eps", "max_grad_norm", "label_smoothing", "seq_len", "pack", "dtype", "base_dtype", "remat",
             "seed")


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Runs the experiment; returns a dict of results (also written to ``<out>/results.json`` by process 0)."""
    args = build_parser().parse_args(argv)
    if args.distributed:  # before anything touches a device
        import jlora.parallel

        jlora.parallel.initialize_distributed()

    import jax

    import jlora
    from jlora import data
    from jlora.loop import FitConfig, fit

    t_start = time.perf_counter()
    rank, n_proc = jax.process_index(), jax.process_count()

    def log(msg):
        if rank == 0:
            print(msg, flush=True)

    if args.lr is None:
        args.lr = LORA_LR if args.method == "lora" else FULL_FT_LR
    files = {s: os.path.join(args.data, f"{s}.txt") for s in SPLITS}
    lines = {s: read_e2e(f) for s, f in files.items() if s != "valid" or os.path.isfile(f)}

    preset = not os.path.exists(args.model) and args.model in jlora.PRESETS
    if preset and not args.tokenizer:
        raise SystemExit(f"e2e_nlg: --model {args.model} is a preset with random weights and no tokenizer; "
                         "pass --tokenizer DIR")
    path, cfg, params = load_model(args.model, args.seed,
                                   args.base_dtype if args.method == "lora" else "float32")
    cfg = cfg.replace(dtype=args.dtype, remat=bool(args.remat))
    tok = jlora.load_tokenizer(args.tokenizer or path)
    sep_id, eos_id = special_ids(tok, cfg)
    seqs = {s: tokenize(ls, tok, sep_id, eos_id, cfg.vocab_size) for s, ls in lines.items()}

    longest = max(len(ids) for s in ("train", "valid") if s in seqs for ids, _ in seqs[s])
    seq_len = args.seq_len or -(-(longest - 1) // 8) * 8
    if cfg.arch == "gpt2" and seq_len > cfg.max_positions:
        log(f"seq_len {seq_len} capped at the model's {cfg.max_positions} positions (longer rows are truncated)")
        seq_len = cfg.max_positions
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else eos_id
    common = dict(seq_len=seq_len, pack=args.pack, pad_id=pad_id, host_index=rank, host_count=n_proc)
    train_b = data.Batches(seqs["train"], batch_size=args.batch_size, accum_steps=args.accum_steps,
                           seed=args.seed, sources=[ln.source for ln in lines["train"]], **common)
    eval_b = None
    if "valid" in seqs:
        eval_b = data.Batches(seqs["valid"], batch_size=args.eval_batch_size or args.batch_size, shuffle=False,
                              drop_remainder=False, sources=[ln.source for ln in lines["valid"]], **common)

    if args.method == "lora":
        lcfg = lora_config(args, cfg)
        params = jlora.lora.init(jax.random.key(args.seed + 1), cfg, params, lcfg)
    steps = args.steps or args.epochs * train_b.steps_per_epoch
    warmup = min(args.warmup_steps, steps)
    if warmup < args.warmup_steps:
        log(f"warm-up shortened to the run's {steps} steps")
    fc = FitConfig(steps=steps, learning_rate=args.lr, schedule=args.schedule, warmup_steps=warmup,
                   min_lr_ratio=args.min_lr_ratio, weight_decay=args.weight_decay, adam_eps=args.adam_eps,
                   max_grad_norm=args.max_grad_norm or None, label_smoothing=args.label_smoothing,
                   eval_every=train_b.steps_per_epoch if args.eval_every < 0 else args.eval_every,
                   save_every=args.save_every, keep_last=args.keep_last, log_every=args.log_every, seed=args.seed)
    run_config = {k: getattr(args, k) for k in _RUN_KEYS} | {"seq_len": seq_len}
    name = path or f"{args.model} (preset, random weights)"
    log(f"model {name}: {cfg.arch}, {cfg.num_params():,} parameters; method {args.method}; "
        f"{train_b.num_sequences} training examples in rows of {seq_len + 1} tokens, {train_b.steps_per_epoch} "
        f"steps per epoch, {steps} steps; {jax.device_count()} device(s), {n_proc} process(es)")

    if args.mesh:
        import jlora.parallel
    mesh = jlora.parallel.make_mesh(args.mesh) if args.mesh else None
    run_dir = os.path.join(args.out, "run")
    t0 = time.perf_counter()
    res = fit(cfg, params, train_b, run_dir=run_dir, fit_config=fc, eval_batches=eval_b, base_ref=path,
              run_config=run_config, progress=not args.no_progress and rank == 0, stop_at=args.stop_at, log=log,
              mesh=mesh)
    t_train = time.perf_counter() - t0
    done = int(res.state.step) >= steps
    results = {"method": args.method, "steps": int(res.state.step), "finished": done,
               "seconds_train": t_train, **res.eval}
    if done:
        local = host_copy(res.state.params)  # collective in multi-host runs: every process calls it
        trained = jlora.merge(local) if args.method == "lora" else local  # one matmul per layer while decoding
        if rank == 0:
            if args.method == "lora":
                jlora.save_adapter(cfg, local, os.path.join(args.out, "adapter"), lcfg)
            else:
                jlora.save_pretrained(cfg.replace(dtype="float32", remat=False), trained,
                                      os.path.join(args.out, "model"))
                tok.save(os.path.join(args.out, "model"))
        if not args.no_decode:
            groups = group_by_mr(lines["test"])
            first = {}
            for ln, seq in zip(lines["test"], seqs["test"]):
                first.setdefault(ln.mr, prompt_ids(seq))
            log(f"decoding {len(groups)} unique meaning representations ({len(lines['test'])} test lines): "
                f"beam {args.beam}, no-repeat n-gram {args.no_repeat_ngram}, length penalty {args.length_penalty}")
            t0 = time.perf_counter()
            preds = decode(cfg, trained, tok, [first[mr] for mr, _ in groups], eos_id, args, log=log)
            results["seconds_decode"] = time.perf_counter() - t0
            if rank == 0:
                ref_path, pred_path = write_outputs(args.out, groups, preds)
                results.update(references=ref_path, predictions=pred_path, unique_mrs=len(groups))
                log(f"wrote {pred_path} and {ref_path}; score them with e2e-metrics "
                    "(git clone https://github.com/tuetschek/e2e-metrics):")
                log(f"  python e2e-metrics/measure_scores.py {ref_path} {pred_path} -p")
    results["seconds_total"] = time.perf_counter() - t_start
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
