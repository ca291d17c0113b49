"""Text generation with a KV cache: greedy, temperature / top-k / top-p sampling, and beam search.

One jitted function per (config, shapes, decoding mode) runs the whole generation: a prefill of the (left-padded)
prompts into a KV cache, then a `jax.lax.while_loop` that decodes one token per step and stops as soon as every
sequence is finished. Shapes are bucketed so that calls with similar lengths share one compilation:

* prompts are left-padded to a multiple of 16 tokens (padding is masked, positions come from the mask);
* the cache holds ``prompt + new tokens`` rounded up to a multiple of 64 slots (capped at the context of GPT-2,
  whose positions are learned);
* ``max_new_tokens``, ``temperature``, ``top_k``, ``top_p``, ``length_penalty`` and the EOS / pad ids are traced
  values, so changing them does not recompile; static are the decoding mode (greedy, sampling with or without
  top-k/top-p filtering, beam search), ``num_beams``, ``no_repeat_ngram_size`` and the number of EOS ids.

Semantics (decided here, tested against transformers in tests/test_generate.py):

* The result holds only the new tokens. A sequence that stops on an EOS token **includes** that EOS as its last
  token (as transformers does); nothing after it is returned.
* Greedy (``temperature=0``) and beam search match ``transformers`` ``generate(do_sample=False)`` token for token,
  including ``no_repeat_ngram_size`` (whose n-grams are taken over the prompt and the new tokens; left padding is
  never part of an n-gram) and beam search with its default ``early_stopping=False`` heuristic: a finished
  hypothesis scores ``sum(logprobs) / len(new tokens incl. EOS) ** length_penalty``, and a prompt stops collecting
  hypotheses once it has ``num_beams`` of them and the best running beam, normalised by the *current* length, can
  no longer beat the worst of them.
* Sampling follows transformers' order: n-gram ban, then temperature, top-k, top-p. Given the same seed (or key)
  and the same batch, the output is deterministic (step ``i`` draws with ``fold_in(key, i)``).
* Beam search returns the best finished hypothesis per prompt (``num_return_sequences=1``); beam sampling is not
  supported.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from jlora.config import ModelConfig
from jlora.kernels import repeat_rows
from jlora.model import forward, init_cache, lm_head, virtual_tokens

# A finite "impossible" score, the value transformers' beam search uses: finite so that sums stay ordered.
_NEG = -1.0e9
_PROMPT_BUCKET = 16
_CACHE_BUCKET = 64
# "traces": incremented each time the generation function is traced, i.e. compiled (tests check the jit cache);
# "last_steps": decoding steps of the last call (tokens chosen per sequence, i.e. forward passes needed including
# the prefill; transformers makes the same number of forward passes).
_STATS = {"traces": 0, "last_steps": 0}


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


# ----------------------------------------------------------------------------------------------------------
# Logits processing (pure, jit-compatible)


def _filter_logits(logits: jax.Array, temperature: Any = 1.0, top_k: Any = 0, top_p: Any = 1.0) -> jax.Array:
    """Temperature, then top-k, then top-p (nucleus) filtering, as transformers' sampling warpers.

    Args:
      logits: float ``[..., vocab]``.
      temperature: divides the logits (a float or a traced scalar, > 0).
      top_k: keep the ``top_k`` largest logits (ties with the k-th are kept); 0 disables. May be traced.
      top_p: then keep the smallest set of most likely tokens whose probability (renormalised over the top-k
        survivors) reaches ``top_p``; the most likely token is always kept; 1.0 disables. May be traced.

    Returns:
      float32 logits of the same shape, ``-inf`` where filtered out.

    Example:
      >>> _filter_logits(jnp.log(jnp.array([0.1, 0.4, 0.2, 0.3])), 1.0, top_k=0, top_p=0.5)  # keeps 0.4 and 0.3
      Array([      -inf, -0.9162907,       -inf, -1.2039728], dtype=float32)
    """
    logits = logits.astype(jnp.float32) / temperature
    k_off = isinstance(top_k, (int, np.integer)) and top_k <= 0  # statically off: no sort needed
    p_off = isinstance(top_p, (int, float)) and top_p >= 1.0
    if k_off and p_off:
        return logits
    vocab = logits.shape[-1]
    desc = -jnp.sort(-logits, axis=-1)
    threshold = jnp.full(logits.shape[:-1] + (1,), -jnp.inf, jnp.float32)
    if not k_off:
        kth_index = jnp.broadcast_to(jnp.clip(jnp.asarray(top_k) - 1, 0, vocab - 1), threshold.shape)
        kth = jnp.take_along_axis(desc, kth_index.astype(jnp.int32), axis=-1)
        threshold = jnp.where(jnp.asarray(top_k) > 0, kth, threshold)
    if not p_off:
        probs = jax.nn.softmax(jnp.where(desc < threshold, -jnp.inf, desc), axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs  # probability of the strictly more likely tokens
        n_keep = jnp.maximum(jnp.sum(mass_before < top_p, axis=-1, keepdims=True), 1)
        pth = jnp.take_along_axis(desc, n_keep - 1, axis=-1)
        threshold = jnp.where(jnp.asarray(top_p) < 1.0, jnp.maximum(threshold, pth), threshold)
    return jnp.where(logits < threshold, -jnp.inf, logits)


def _ngram_ban(hist: jax.Array, valid: jax.Array, cur: jax.Array, n: int, vocab: int) -> jax.Array:
    """Tokens that would repeat an n-gram of ``hist[:, :cur]``: bool ``[rows, vocab]``.

    hist: int ``[rows, L]``; valid: bool ``[rows, L]`` (False for padding, which never takes part in an n-gram);
    cur: the current length (scalar), the next token goes to slot ``cur``.
    """
    rows, length = hist.shape
    if n > length:
        return jnp.zeros((rows, vocab), bool)
    valid = valid & (jnp.arange(length)[None] < cur)
    pos = cur - (n - 1) + jnp.arange(n - 1)
    pos_c = jnp.clip(pos, 0, length - 1)
    tail = jnp.take(hist, pos_c, axis=1)  # the last n-1 tokens
    tail_ok = jnp.all((pos >= 0)[None] & jnp.take(valid, pos_c, axis=1), axis=1)
    w = length - n + 1  # window starts
    match = valid[:, n - 1:] & tail_ok[:, None]
    for k in range(n - 1):
        match &= (hist[:, k:k + w] == tail[:, k:k + 1]) & valid[:, k:k + w]
    targets = jnp.where(match, hist[:, n - 1:], vocab)  # out of range -> dropped
    return jnp.zeros((rows, vocab), bool).at[jnp.arange(rows)[:, None], targets].set(True, mode="drop")


def _is_eos(tok: jax.Array, eos: jax.Array) -> jax.Array:
    return jnp.any(tok[..., None] == eos, axis=-1)  # eos: int32 [n_eos], possibly empty


# ----------------------------------------------------------------------------------------------------------
# The jitted generation


def _decode(cfg: ModelConfig, params, cache, tok: jax.Array):
    tok = jnp.clip(tok, 0, cfg.vocab_size - 1)  # finished rows feed their fill token; keep it a valid index
    hidden, cache = forward(cfg, params, tok[:, None], cache=cache)
    return lm_head(cfg, params, hidden[:, 0]).astype(jnp.float32), cache


def _sample_loop(cfg, params, cache, logits, tokens, mask, key, max_new, temperature, top_k, top_p, *, n_buf,
                 greedy, filtered, ngram, eos, pad):
    b, t = tokens.shape
    hist_valid = jnp.concatenate([mask, jnp.ones((b, n_buf), bool)], axis=1)

    def choose(st, logits):
        i = st["i"]
        logp = jax.nn.log_softmax(logits, axis=-1)
        if ngram:
            hist = jnp.concatenate([tokens, st["out"]], axis=1)
            logits = jnp.where(_ngram_ban(hist, hist_valid, t + i, ngram, logits.shape[-1]), -jnp.inf, logits)
        if greedy:
            tok = jnp.argmax(logits, axis=-1)
        else:
            logits = _filter_logits(logits, temperature, top_k if filtered else 0, top_p if filtered else 1.0)
            tok = jax.random.categorical(jax.random.fold_in(key, i), logits, axis=-1)
        live = ~st["done"]
        tok = jnp.where(live, tok.astype(jnp.int32), pad)
        tok_lp = jnp.take_along_axis(logp, jnp.clip(tok, 0, logp.shape[-1] - 1)[:, None], axis=1)[:, 0]
        return dict(st, i=i + 1,
                    out=jax.lax.dynamic_update_slice_in_dim(st["out"], tok[:, None], i, axis=1),
                    done=st["done"] | _is_eos(tok, eos),
                    score=st["score"] + jnp.where(live, tok_lp, 0.0),
                    length=st["length"] + live.astype(jnp.int32))

    def cond(st):
        return (st["i"] < max_new) & ~jnp.all(st["done"])

    def body(st):
        # One copy of the model in the loop body (XLA compile time is mostly the forward): pick the token from the
        # carried logits, then run it to get the next logits. The last iteration's forward is wasted, and needs
        # the cache slot prompt + max_new - 1, which the cache has.
        st = choose(st, st["logits"])
        last = jax.lax.dynamic_index_in_dim(st["out"], st["i"] - 1, axis=1, keepdims=False)
        logits, cache = _decode(cfg, params, st["cache"], last)
        return dict(st, cache=cache, logits=logits)

    st = dict(cache=cache, logits=logits, out=jnp.full((b, n_buf), pad, jnp.int32), done=jnp.zeros((b,), bool),
              i=jnp.array(0, jnp.int32), score=jnp.zeros((b,), jnp.float32), length=jnp.zeros((b,), jnp.int32))

    st = jax.lax.while_loop(cond, body, st)
    return st["out"], st["length"], st["score"], st["i"]


def _beam_loop(cfg, params, cache, logits, tokens, mask, max_new, length_penalty, *, n_buf, k, ngram, eos, pad):
    """Beam search over ``k`` beams per prompt, as transformers' vectorised `_beam_search` (early_stopping=False)."""
    b, t = tokens.shape
    v = logits.shape[-1]
    # Candidates kept per step, as transformers: enough that k of them are not finished. (No EOS is passed as
    # the one id -1, which gives the same count as one EOS id.)
    c = max(2, 1 + eos.shape[0]) * k
    rep = lambda x: jnp.repeat(x, k, axis=0) if x.ndim else x  # noqa: E731
    cache = jax.tree_util.tree_map(rep, cache)
    params = repeat_rows(params, k)  # a row's own adapter (an adapter set) for each of its beams
    logits = rep(logits)
    tok_rep = rep(tokens)
    hist_valid = jnp.concatenate([rep(mask), jnp.ones((b * k, n_buf), bool)], axis=1)
    slots = jnp.arange(n_buf)

    def gather(x, idx):  # x: [B, M, ...], idx: [B, J] -> [B, J, ...]
        return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)

    def step(st, logits):
        i = st["i"]
        logp = jax.nn.log_softmax(logits, axis=-1)  # [B*K, V]
        if ngram:
            hist = jnp.concatenate([tok_rep, st["run_seq"].reshape(b * k, n_buf)], axis=1)
            logp = jnp.where(_ngram_ban(hist, hist_valid, t + i, ngram, v), -jnp.inf, logp)
        acc = (logp.reshape(b, k, v) + st["run_score"][:, :, None]).reshape(b, k * v)
        vals, idx = jax.lax.top_k(acc, c)
        src, tok = idx // v, (idx % v).astype(jnp.int32)
        cand = jnp.where(slots == i, tok[:, :, None], gather(st["run_seq"], src))  # [B, C, N]
        hits = _is_eos(tok, eos) | (i + 1 >= max_new)

        # Running beams: the best k candidates that did not just finish.
        run_score, pick = jax.lax.top_k(vals + jnp.where(hits, _NEG, 0.0), k)
        run_seq, parent = gather(cand, pick), gather(src, pick)

        # Finished hypotheses: only candidates ranked in the top k may finish; keep the best k overall.
        denom = (i + 1).astype(jnp.float32) ** length_penalty
        just = hits & (jnp.arange(c) < k)[None]
        cand_score = vals / denom + jnp.where(st["unsat"][:, None], 0.0, _NEG) + jnp.where(just, 0.0, _NEG)
        m_score = jnp.concatenate([st["fin_score"], cand_score], axis=1)
        fin_score, sel = jax.lax.top_k(m_score, k)
        fin_seq = gather(jnp.concatenate([st["fin_seq"], cand], axis=1), sel)
        fin_flag = gather(jnp.concatenate([st["fin_flag"], just], axis=1), sel)
        fin_len = gather(jnp.concatenate([st["fin_len"], jnp.broadcast_to(i + 1, (b, c))], axis=1), sel)

        flat = (jnp.arange(b)[:, None] * k + parent).reshape(-1)
        cache = jax.tree_util.tree_map(lambda x: x[flat] if x.ndim else x, st["cache"])

        # transformers' early-stopping heuristic (early_stopping=False): the best running beam at its current
        # length against the worst finished hypothesis, once all k slots are finished.
        best = run_score[:, :1] / denom
        worst = jnp.where(fin_flag, jnp.min(fin_score, axis=1, keepdims=True), _NEG)
        unsat = st["unsat"] & jnp.any(best > worst, axis=1)
        go = jnp.any(unsat) & ~jnp.all(hits) & (i + 1 < max_new)
        return dict(st, cache=cache, i=i + 1, run_seq=run_seq, run_score=run_score, fin_seq=fin_seq,
                    fin_score=fin_score, fin_flag=fin_flag, fin_len=fin_len, unsat=unsat, go=go)

    st = dict(cache=cache, i=jnp.array(0, jnp.int32),
              run_seq=jnp.full((b, k, n_buf), pad, jnp.int32),
              run_score=jnp.tile(jnp.array([0.0] + [_NEG] * (k - 1), jnp.float32), (b, 1)),
              fin_seq=jnp.full((b, k, n_buf), pad, jnp.int32), fin_score=jnp.full((b, k), _NEG, jnp.float32),
              fin_flag=jnp.zeros((b, k), bool), fin_len=jnp.zeros((b, k), jnp.int32),
              unsat=jnp.ones((b,), bool), go=jnp.array(True), logits=logits)

    def body(st):  # as in `_sample_loop`: step on the carried logits, then one forward (wasted on the last step)
        st = step(st, st["logits"])
        last = jax.lax.dynamic_index_in_dim(st["run_seq"], st["i"] - 1, axis=2, keepdims=False)
        logits, cache = _decode(cfg, params, st["cache"], last.reshape(b * k))
        return dict(st, cache=cache, logits=logits)

    st = jax.lax.while_loop(lambda st: st["go"], body, st)
    return st["fin_seq"][:, 0], st["fin_len"][:, 0], st["fin_score"][:, 0], st["i"]


@functools.partial(jax.jit, static_argnames=("cfg", "n_buf", "mode", "filtered", "num_beams", "ngram"))
def _generate_jit(cfg, params, tokens, mask, key, max_new, temperature, top_k, top_p, length_penalty, eos, pad, *,
                  n_buf, mode, filtered, num_beams, ngram):
    _STATS["traces"] += 1
    b, t = tokens.shape
    cache = init_cache(cfg, b, t + n_buf, params=params)  # with params: a prompt's virtual tokens
    hidden, cache = forward(cfg, params, tokens, attention_mask=mask, cache=cache)
    logits = lm_head(cfg, params, hidden[:, -1]).astype(jnp.float32)  # only the last position: [B, V]
    if mode == "beam":
        return _beam_loop(cfg, params, cache, logits, tokens, mask, max_new, length_penalty, n_buf=n_buf,
                          k=num_beams, ngram=ngram, eos=eos, pad=pad)
    return _sample_loop(cfg, params, cache, logits, tokens, mask, key, max_new, temperature, top_k, top_p,
                        n_buf=n_buf, greedy=(mode == "greedy"), filtered=filtered, ngram=ngram, eos=eos, pad=pad)


# ----------------------------------------------------------------------------------------------------------
# Public API


def _prompt_rows(prompt_ids, attention_mask):
    """-> (list of 1-D int arrays, single, array_in)."""
    if isinstance(prompt_ids, (np.ndarray, jax.Array)):
        arr = np.asarray(prompt_ids)
        if arr.ndim == 1:
            return [arr], True, True
        if arr.ndim != 2:
            raise ValueError(f"prompt_ids must be 1-D or 2-D, got shape {arr.shape}")
        if attention_mask is None:
            return list(arr), False, True
        m = np.asarray(attention_mask).astype(bool)
        if m.shape != arr.shape:
            raise ValueError(f"attention_mask shape {m.shape} differs from prompt_ids shape {arr.shape}")
        return [row[keep] for row, keep in zip(arr, m)], False, True
    seq = list(prompt_ids)
    if seq and all(isinstance(x, (int, np.integer)) for x in seq):
        return [np.asarray(seq)], True, False
    return [np.asarray(list(r)) for r in seq], False, False


def generate(cfg: ModelConfig, params, prompt_ids, max_new_tokens: int = 32, *, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, num_beams: int = 1, length_penalty: float = 1.0,
             no_repeat_ngram_size: int = 0, eos_token_id: Union[None, int, Sequence[int]] = None,
             pad_token_id: Optional[int] = None, seed: Any = 0, return_scores: bool = False,
             attention_mask=None):
    """Generates continuations of one or several prompts with a KV cache.

    Args:
      cfg: model config.
      params: parameter tree (plain or with adapters).
      prompt_ids: one prompt (``list[int]`` or a 1-D array), a batch (``list[list[int]]``, lengths may differ:
        they are left-padded and masked), or an int array ``[B, T]``.
      max_new_tokens: at most this many new tokens per sequence. For GPT-2 (learned positions) the longest
        prompt plus this must fit ``cfg.max_positions``, else ValueError; RoPE models have no such bound.
      temperature: 0 for greedy decoding; > 0 samples from ``softmax(logits / temperature)``.
      top_k: sampling only: keep the k most likely tokens (0: all).
      top_p: sampling only: nucleus filtering (1.0: off).
      num_beams: > 1 for beam search (deterministic; temperature must be 0).
      length_penalty: beam search: finished hypotheses score ``sum(logprobs) / new_len ** length_penalty``.
      no_repeat_ngram_size: if > 0, an n-gram of this size never occurs twice in prompt + new tokens.
      eos_token_id: an id or ids that end a sequence; default ``cfg.eos_ids``; ``()`` never stops early.
      pad_token_id: fills array results after EOS (default ``cfg.pad_token_id``, else the first EOS id, else 0).
      seed: an int or a `jax.random.key` for sampling.
      return_scores: also return a score per sequence: for beam search its length-normalised beam score (as
        transformers' ``sequences_scores``), otherwise the sum of the model's log-probabilities of the new
        tokens (under the unfiltered distribution).
      attention_mask: for a 2-D array ``prompt_ids`` only: 1 for real tokens (padding anywhere is removed).

    Returns:
      The new tokens only; a sequence ending on EOS includes it, nothing follows it. A ``list[int]`` for a
      single list prompt, ``list[list[int]]`` for a list batch; for array input an ``np.ndarray`` ``[B, N]``
      (or ``[N]``) padded with ``pad_token_id``. With ``return_scores``: ``(ids, scores)``.

    Example:
      ``cfg, params`` are a tiny random model and ``tok`` a character-level tokenizer; real ones come from
      ``jlora.load_pretrained(path)`` and ``jlora.load_tokenizer(path)``.

      >>> new = generate(cfg, params, tok.encode("The capital of France is"), max_new_tokens=8)  # greedy
      >>> new, tok.decode(new)  # the new ids only (noise: random weights)
      ([74, 62, 33, 2, 89, 22, 40, 35], 'g[><pad>v3E@')
      >>> generate(cfg, params, [[5], [6, 7]], 4, temperature=0.8, top_p=0.9, seed=0)  # a batch, sampled
      [[87, 9, 124, 53], [55, 83, 2, 113]]
      >>> generate(cfg, params, [[5, 6, 7]], 8, num_beams=4, no_repeat_ngram_size=2, length_penalty=0.9)  # beams
      [[73, 1, 66, 64, 60, 85, 3, 61]]
    """
    rows, single, array_in = _prompt_rows(prompt_ids, attention_mask)
    if not rows:
        raise ValueError("generate: prompt_ids is empty (no prompts)")
    for r in rows:
        if r.size == 0:
            raise ValueError("generate: every prompt needs at least one token (e.g. a BOS token)")
        if not np.issubdtype(r.dtype, np.integer):
            raise ValueError(f"generate: prompt ids must be integers, got dtype {r.dtype}")
        if r.min() < 0 or r.max() >= cfg.vocab_size:
            raise ValueError(f"generate: prompt id out of range [0, {cfg.vocab_size})")
    max_new = int(max_new_tokens)
    if max_new < 0:
        raise ValueError(f"generate: max_new_tokens must be >= 0, got {max_new_tokens}")
    if num_beams < 1 or top_k < 0 or temperature < 0 or not 0.0 < top_p <= 1.0:
        raise ValueError(f"generate: invalid options num_beams={num_beams} top_k={top_k} "
                         f"temperature={temperature} top_p={top_p}")
    if num_beams > 1 and temperature > 0:
        raise ValueError("generate: beam search is deterministic; use temperature=0 with num_beams > 1")
    if no_repeat_ngram_size < 0:
        raise ValueError(f"generate: no_repeat_ngram_size must be >= 0, got {no_repeat_ngram_size}")

    if eos_token_id is None:
        eos = cfg.eos_ids
    elif isinstance(eos_token_id, (int, np.integer)):
        eos = (int(eos_token_id),)
    else:
        eos = tuple(int(e) for e in eos_token_id)
    pad = pad_token_id if pad_token_id is not None else cfg.pad_token_id
    pad = int(pad if pad is not None else (eos[0] if eos else 0))

    longest = max(len(r) for r in rows)
    n_virtual = virtual_tokens(cfg, params)  # prefix/prompt tuning: positions before the first token
    cap = cfg.max_positions - n_virtual if cfg.arch == "gpt2" else None  # learned positions: a hard limit
    if cap is not None and longest + max_new > cap:
        lead = f"{n_virtual} virtual tokens (num_virtual_tokens) + " if n_virtual else ""
        raise ValueError(f"generate: {lead}a prompt of {longest} tokens + max_new_tokens={max_new} = "
                         f"{n_virtual + longest + max_new} positions exceeds the model's context of "
                         f"{cfg.max_positions} positions; shorten the prompt or lower max_new_tokens")

    b = len(rows)
    lengths = np.zeros((b,), np.int64)
    out = np.zeros((b, 0), np.int64)
    scores = np.zeros((b,), np.float32)
    if max_new > 0:
        t_pad = _round_up(longest, _PROMPT_BUCKET)
        if cap is not None:
            t_pad = min(t_pad, cap - max_new)
        s = _round_up(t_pad + max_new, _CACHE_BUCKET)
        if cap is not None:
            s = min(s, cap)
        fill = pad if 0 <= pad < cfg.vocab_size else 0
        tokens = np.full((b, t_pad), fill, np.int32)
        mask = np.zeros((b, t_pad), bool)
        for j, r in enumerate(rows):
            tokens[j, t_pad - len(r):] = r
            mask[j, t_pad - len(r):] = True
        key = jax.random.key(seed) if isinstance(seed, (int, np.integer)) else seed
        mode = "beam" if num_beams > 1 else ("greedy" if temperature == 0 else "sample")
        sampling = mode == "sample"
        res = _generate_jit(
            cfg, params, jnp.asarray(tokens), jnp.asarray(mask), key, jnp.int32(max_new),
            jnp.float32(temperature if sampling else 1.0), jnp.int32(top_k), jnp.float32(top_p),
            jnp.float32(length_penalty), jnp.asarray(eos or (-1,), jnp.int32), jnp.int32(pad), n_buf=s - t_pad,
            mode=mode, filtered=bool(sampling and (top_k > 0 or top_p < 1.0)), num_beams=int(num_beams),
            ngram=int(no_repeat_ngram_size))
        out, lengths, scores, steps = (np.asarray(x) for x in jax.device_get(res))
        _STATS["last_steps"] = int(steps)

    ids = [out[j, :lengths[j]].tolist() for j in range(b)]
    if array_in:
        arr = np.full((b, int(lengths.max()) if b else 0), pad, np.int64)
        for j, r in enumerate(ids):
            arr[j, :len(r)] = r
        result = arr[0] if single else arr
    else:
        result = ids[0] if single else ids
    if return_scores:
        return result, (float(scores[0]) if single else scores)
    return result


def chat(cfg: ModelConfig, params, tokenizer, messages, **gen_kwargs) -> str:
    """Answers a chat conversation: applies the tokenizer's chat template, generates, decodes the reply.

    Args:
      cfg: model config.
      params: parameter tree.
      tokenizer: has ``apply_chat_template(messages, add_generation_prompt=True, tokenize=True)`` and
        ``decode(ids, skip_special_tokens=True)`` (a `jlora.load_tokenizer` tokenizer or a transformers one).
      messages: ``[{"role": "user", "content": "..."}, ...]``.
      **gen_kwargs: passed to `generate` (``max_new_tokens``, ``temperature``, ...). ``eos_token_id`` defaults
        to ``cfg.eos_ids``, else to the tokenizer's ``eos_token_id``.

    Returns:
      the reply text, special tokens skipped.

    Example:
      Here ``tok`` is a tiny character-level tokenizer with a ChatML template and ``params`` are random, so the
      reply is noise. With the built-in SmolLM2 (``path = jlora.default_model_path()``, then
      ``cfg, params = jlora.load_pretrained(path)`` and ``tok = jlora.load_tokenizer(path)``) the same call with
      ``max_new_tokens=40`` answers ``'Hello! How can I assist you today?'``.

      >>> tok.apply_chat_template([{"role": "user", "content": "Hi!"}])  # the prompt chat() generates from
      '<|im_start|>user\\nHi!<|im_end|>\\n<|im_start|>assistant\\n'
      >>> chat(cfg, params, tok, [{"role": "user", "content": "Hi!"}], max_new_tokens=8)
      'Çfs×:([>'
    """
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, Mapping) or hasattr(ids, "keys"):  # transformers may return a BatchEncoding
        ids = ids["input_ids"]
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    if gen_kwargs.get("eos_token_id") is None and not cfg.eos_ids:
        tok_eos = getattr(tokenizer, "eos_token_id", None)
        if tok_eos is not None:
            gen_kwargs["eos_token_id"] = tok_eos
    gen_kwargs.pop("return_scores", None)
    new = generate(cfg, params, ids, **gen_kwargs)
    return tokenizer.decode(new, skip_special_tokens=True)
