"""An OpenAI-compatible HTTP server for one base model and many adapters: ``jlora serve``.

One frozen base is held once; every LoRA / DoRA / IA3 adapter sits in a `jlora.AdapterSet` slot. Requests that
arrive together are batched **across adapters** into one forward per decoding step (each batch row uses its own
adapter, PEFT's ``adapter_names`` semantics), with a KV cache. The HTTP side is Starlette on uvicorn.

The pieces:

* `Engine`: a bounded request queue and one worker thread that owns the accelerator. **Continuous batching**:
  when no batch runs, it takes the waiting requests (up to ``max_batch``, after waiting ``batch_wait_s`` for
  company), left-pads their prompts into one batch (rows, prompt length and cache slots each padded to a power of
  two -- prompts at least 16, the cache at least ``min_slots`` -- so shapes repeat and compilations are reused) and
  prefills; then it decodes one token per step for the whole batch. Between steps, a newly arrived request joins
  the running batch in a free row (or a new row, up to ``max_batch``): its prompt is prefilled alone into the
  cache slots just before the batch's current slot and spliced into its row, and from the next step it decodes
  with the others. A request that does not fit (its prompt longer than the slots already passed, or its budget
  beyond the slots left) waits, and so do the ones behind it, until the batch drains. Each row has its own
  adapter, sampling settings (greedy, temperature, top-k, top-p, seed: a row's draws depend on its seed and its
  own token count only, not on its batch mates), token budget and stop strings.
* `build_app`: the Starlette app. ``GET /v1/models``; ``POST /v1/completions``; ``POST /v1/chat/completions``
  (both streaming as server-sent events, or not); ``POST /v1/adapters`` ``{"name", "path", "replace"}`` and
  ``DELETE /v1/adapters/{name}`` to load and unload adapters at run time; ``GET /health``. The request's ``model``
  picks the adapter (the base under its served name or ``"__base__"``).
* `serve` (the CLI) and `start_server` (a server in a background thread, for notebooks and tests).

Safe by default: binds 127.0.0.1; with an API key (``--api-key`` or ``JLORA_API_KEY``) every ``/v1`` route needs
``Authorization: Bearer KEY`` (401 otherwise); request bodies are capped (413); adapters loaded at run time must
lie inside a directory named at start-up (403 otherwise; none named: run-time loading is off) and under a size
cap (413); a full queue answers 429; a request running past its timeout ends with 504. Bad requests get an
OpenAI-style JSON error ``{"error": {"message", "type", "param", "code"}}`` with a 4xx status, and the server goes
on serving. SIGTERM (or Ctrl-C) stops accepting connections, lets running requests finish (up to a grace
period), fails the queued ones with 503 and exits 0.

Beyond OpenAI's parameters: ``top_k`` and vLLM's ``ignore_eos`` (generate exactly ``max_tokens`` tokens, for
benchmarks). Not supported (refused with a 400 that says so, rather than silently ignored): ``n > 1``, ``best_of``,
``logprobs``, ``echo``, ``suffix``, non-zero ``presence_penalty`` / ``frequency_penalty``, ``logit_bias``, tools
and response formats other than text.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import hmac
import json
import logging
import os
import re
import signal
import socket
import stat
import threading
import time
import uuid
from typing import Any, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jlora.config import ModelConfig
from jlora.generate import _decode, _filter_logits
from jlora.model import forward, init_cache, lm_head
from jlora.peft.multi import BASE, AdapterSet

log = logging.getLogger("jlora.serve")

_MIN_PROMPT = 16  # prompts are padded to a power of two >= this, caches to a power of two >= min_slots: a
# client cannot force more than a few dozen compiled shapes (log2 buckets x batch sizes x sampling flags)
_MIN_TEMPERATURE = 1e-5  # below this, sampling is greedy (logits / 1e-39 overflows float32)


def _bucket(n: int, least: int) -> int:
    return max(int(least), _pow2(n))
_LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


# ----------------------------------------------------------------------------------------------------------
# Errors


class ApiError(Exception):
    """A request the server refuses: becomes ``{"error": {...}}`` with ``status``."""

    def __init__(self, status: int, message: str, *, param: Optional[str] = None, code: Optional[str] = None,
                 type: Optional[str] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                             404: "not_found_error", 409: "conflict_error", 413: "invalid_request_error",
                             429: "rate_limit_error", 503: "server_error", 504: "timeout_error"}.get(status,
                                                                                                  "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ----------------------------------------------------------------------------------------------------------
# The jitted prefill and decode step (per-row sampling)


def _choose(logits, seeds, steps, temp, top_k, top_p, greedy, *, sample: bool, filtered: bool):
    """The next token of every row: argmax for greedy rows; for sampling rows a draw from the tempered (and top-k /
    top-p filtered) distribution with the key ``fold_in(key(seed), n)``, ``n`` = the tokens the row has made so
    far -- a row's draws depend only on its own seed and logits, not on the rows it shares a batch with."""
    arg = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if not sample:
        return arg
    t = jnp.where(greedy, 1.0, temp)[:, None]
    f = _filter_logits(logits, t, top_k[:, None] if filtered else 0, top_p[:, None] if filtered else 1.0)

    def draw(seed, n, row):
        return jax.random.categorical(jax.random.fold_in(jax.random.key(seed), n), row)

    drawn = jax.vmap(draw)(seeds, steps, f).astype(jnp.int32)
    return jnp.where(greedy, arg, drawn)


@functools.partial(jax.jit, static_argnames=("cfg", "n_slots", "sample", "filtered"))
def _prefill(cfg, params, tokens, mask, seeds, temp, top_k, top_p, greedy, *, n_slots, sample, filtered):
    """A new batch: its prompts (left-padded to ``[B, T]``) into a fresh cache of ``n_slots`` slots."""
    b, t = tokens.shape
    cache = init_cache(cfg, b, n_slots, params=params)
    hidden, cache = forward(cfg, params, tokens, attention_mask=mask, cache=cache)
    logits = lm_head(cfg, params, hidden[:, -1]).astype(jnp.float32)
    tok = _choose(logits, seeds, jnp.zeros((b,), jnp.int32), temp, top_k, top_p, greedy, sample=sample,
                  filtered=filtered)
    return tok, cache


@functools.partial(jax.jit, static_argnames=("cfg", "sample", "filtered"), donate_argnames=("cache",))
def _step(cfg, params, cache, tok, steps, seeds, temp, top_k, top_p, greedy, *, sample, filtered):
    """One decoding step of the whole batch (every row writes its token at the shared slot ``cache["index"]``)."""
    logits, cache = _decode(cfg, params, cache, tok)
    return _choose(logits, seeds, steps, temp, top_k, top_p, greedy, sample=sample, filtered=filtered), cache


@functools.partial(jax.jit, static_argnames=("cfg", "n_slots", "sample", "filtered"))
def _prefill_one(cfg, params1, index, tokens1, mask1, seed1, temp1, top_k1, top_p1, greedy1, *, n_slots, sample,
                 filtered):
    """Continuous batching, part 1: a joining request's prompt (left-padded to ``T``) prefilled alone into the
    slots just before the running batch's current slot ``index`` (``[index - T, index)``) of a one-row cache of the
    batch's size. Returns (its first token, the one-row cache)."""
    t = tokens1.shape[1]
    one = init_cache(cfg, 1, n_slots)
    one["index"] = index - t
    hidden, one = forward(cfg, params1, tokens1, attention_mask=mask1, cache=one)
    logits = lm_head(cfg, params1, hidden[:, -1]).astype(jnp.float32)
    tok1 = _choose(logits, seed1, jnp.zeros((1,), jnp.int32), temp1, top_k1, top_p1, greedy1, sample=sample,
                   filtered=filtered)
    return tok1[0], one


@functools.partial(jax.jit, donate_argnames=("cache",))
def _splice(cache, one, tok, row, tok1):
    """Continuous batching, part 2: the one-row cache's keys, values, key mask and position replace row ``row`` of
    the batch's cache (all of its slots: nothing of a previous occupant remains visible); the next step decodes the
    new row at the shared slot with everyone else."""
    new = dict(cache)
    new["layers"] = [{k: lc[k].at[row].set(l1[k][0]) for k in lc} for lc, l1 in zip(cache["layers"], one["layers"])]
    new["key_mask"] = cache["key_mask"].at[row].set(one["key_mask"][0])
    new["next_pos"] = cache["next_pos"].at[row].set(one["next_pos"][0])
    return new, tok.at[row].set(tok1)


@functools.partial(jax.jit, static_argnames=("b",))
def _grow(cache, tok, *, b):
    """More rows for a running batch (new rows empty: masked, fed a dummy token)."""
    def pad(x):
        return jnp.concatenate([x, jnp.zeros((b - x.shape[0],) + x.shape[1:], x.dtype)], axis=0)

    new = dict(cache)
    new["layers"] = [{k: pad(v) for k, v in lc.items()} for lc in cache["layers"]]
    new["key_mask"], new["next_pos"] = pad(cache["key_mask"]), pad(cache["next_pos"])
    return new, pad(tok)


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


# ----------------------------------------------------------------------------------------------------------
# Requests and the engine


@dataclasses.dataclass(eq=False)
class GenRequest:
    """One sequence to generate. Events go to ``emit(kind, payload)``: ``("delta", text)``, then ``("done",
    {"finish_reason", "prompt_tokens", "completion_tokens"})`` or ``("error", ApiError)``."""

    prompt: List[int]
    adapter: Optional[str] = None  # None: the base
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: Optional[int] = None
    stop: Sequence[str] = ()
    eos: Sequence[int] = ()
    timeout_s: float = 300.0
    emit: Any = None
    cancelled: bool = False
    deadline: float = 0.0


class _Row:
    """A request's decoding state inside a batch (host side)."""

    def __init__(self, req: GenRequest, tokenizer):
        self.req = req
        self.tok = tokenizer
        self.ids: List[int] = []
        self.sent = 0  # characters of the decoded text already emitted
        self.done = False
        self.eos = set(int(e) for e in req.eos)
        self.stop = [s for s in req.stop if s]
        self.longest_stop = max((len(s) for s in self.stop), default=0)

    def _finish(self, reason: str):
        self.done = True
        self.req.emit("done", {"finish_reason": reason, "prompt_tokens": len(self.req.prompt),
                               "completion_tokens": len(self.ids)})

    def push(self, token: int) -> None:
        """Takes one new token: emits the text that is now final, finishes on EOS, a stop string or the budget."""
        if self.done:
            return
        if self.req.cancelled:
            self.done = True
            return
        if token in self.eos:
            self._flush(final=True)
            self._finish("stop")
            return
        self.ids.append(token)
        if self._flush(final=False):
            self._finish("stop")
        elif len(self.ids) >= self.req.max_tokens:
            self._flush(final=True)
            self._finish("length")

    def _flush(self, final: bool) -> bool:
        """Emits the decoded text not yet sent; True if a stop string ended it."""
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if self.stop:
            start = max(0, self.sent - self.longest_stop)
            hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                end = min(hits)
                if end > self.sent:
                    self.req.emit("delta", text[self.sent:end])
                self.sent = max(self.sent, end)
                return True
        end = len(text)
        if not final:
            while end > self.sent and text[end - 1] == "\ufffd":  # an incomplete UTF-8 sequence: wait for the rest
                end -= 1
            hold = 0  # hold back the longest tail that may be the start of a stop string
            for s in self.stop:
                for k in range(min(len(s) - 1, end - self.sent), hold, -1):
                    if text[end - k:end] == s[:k]:
                        hold = k
                        break
            end -= hold
        if end > self.sent:
            self.req.emit("delta", text[self.sent:end])
            self.sent = end
        return False


class _Batch:
    """The running batch: B rows sharing one KV cache of ``n_slots`` slots; ``index`` = the next slot written."""

    def __init__(self, b: int, n_slots: int):
        self.rows: List[Optional[_Row]] = [None] * b
        self.n_slots = n_slots
        self.index = 0
        self.cache = None
        self.tok = None
        self.seeds = np.zeros((b,), np.int32)
        self.temp = np.ones((b,), np.float32)
        self.top_k = np.zeros((b,), np.int32)
        self.top_p = np.ones((b,), np.float32)
        self.greedy = np.ones((b,), bool)

    @property
    def size(self) -> int:
        return len(self.rows)

    def active(self) -> List[int]:
        return [j for j, r in enumerate(self.rows) if r is not None and not r.done]

    def set_row(self, j: int, row: "_Row") -> None:
        req = row.req
        self.rows[j] = row
        self.greedy[j] = req.temperature < _MIN_TEMPERATURE
        self.temp[j] = 1.0 if self.greedy[j] else req.temperature
        self.top_k[j], self.top_p[j] = req.top_k, req.top_p
        self.seeds[j] = (req.seed if req.seed is not None else int.from_bytes(os.urandom(4), "little")) & 0x7FFFFFFF

    def grow(self, b: int) -> None:
        n = b - self.size
        self.rows += [None] * n
        self.seeds = np.concatenate([self.seeds, np.zeros((n,), np.int32)])
        self.temp = np.concatenate([self.temp, np.ones((n,), np.float32)])
        self.top_k = np.concatenate([self.top_k, np.zeros((n,), np.int32)])
        self.top_p = np.concatenate([self.top_p, np.ones((n,), np.float32)])
        self.greedy = np.concatenate([self.greedy, np.ones((n,), bool)])

    def flags(self, idx=None):
        """(sample, filtered): static flags of the jitted step for the given (default: active) rows."""
        idx = self.active() if idx is None else idx
        g = self.greedy[idx]
        sample = not bool(g.all()) if len(idx) else False
        filtered = bool(((self.top_k[idx] > 0) | (self.top_p[idx] < 1.0))[~g].any()) if sample else False
        return sample, filtered


class Engine:
    """The request queue and the worker thread that runs batched generation on an `AdapterSet`.

    Continuous batching: a request that arrives while a batch decodes joins it at the next step, in a free row
    (or a new one, up to ``max_batch``), when its prompt fits before the batch's current cache slot and its budget
    fits the slots left (`_join`); otherwise it waits, and requests behind it wait too (first come, first served)
    until the batch drains and a new one starts with the waiting requests together.

    Args:
      adapters: the adapter set (its base is the served model).
      tokenizer: a `jlora.Tokenizer` (or anything with ``decode(ids, skip_special_tokens=True)``).
      max_batch: the most requests decoded together.
      queue_size: the most requests waiting; `submit` raises a 429 `ApiError` beyond it.
      batch_wait_s: when no batch runs, how long the first request waits for company.
      context: the longest prompt + new tokens a request may use (default ``cfg.max_positions``).
      min_slots: a new batch's cache has at least this many slots (room for requests that join later).
      max_adapters: the most adapters `add_adapter` loads (409 beyond).
    """

    def __init__(self, adapters: AdapterSet, tokenizer, *, max_batch: int = 8, queue_size: int = 64,
                 batch_wait_s: float = 0.005, context: Optional[int] = None, min_slots: int = 512,
                 max_adapters: int = 256):
        if max_batch < 1 or queue_size < 1:
            raise ValueError(f"Engine: max_batch and queue_size must be >= 1, got {max_batch}, {queue_size}")
        self.set = adapters
        self.cfg: ModelConfig = adapters.cfg
        self.tokenizer = tokenizer
        self.max_batch = int(max_batch)
        self.batch_wait_s = float(batch_wait_s)
        self.context = int(context or self.cfg.max_positions)
        self.min_slots = int(min_slots)
        self.max_adapters = int(max_adapters)
        self._names = tuple(adapters.names)
        self._inflight: List[GenRequest] = []  # taken from the queue, not yet in the batch (failed with it)
        self.queue_size = int(queue_size)
        self._waiting: "collections.deque[GenRequest]" = collections.deque()
        self._cv = threading.Condition()
        self._lock = threading.Lock()  # the adapter set: mutations vs a step reading its parameters
        self._paused = False
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._batch: Optional[_Batch] = None
        self.stats = {"batches": 0, "rows": 0, "joined": 0, "largest_batch": 0, "tokens": 0, "steps": 0,
                      "adapters_in_batch": 0}

    # -- lifecycle -----------------------------------------------------------------------------------------

    def start(self) -> "Engine":
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._work, name="jlora-engine", daemon=True)
            self._thread.start()
        return self

    def close(self, timeout: float = 30.0) -> None:
        """Stops the worker after its current batch; requests still queued get a 503."""
        self._stop.set()
        with self._cv:
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        with self._cv:
            left = list(self._waiting)
            self._waiting.clear()
        for req in left:
            req.emit("error", ApiError(503, "the server is shutting down", code="shutting_down"))

    def pause(self) -> None:
        """Admits no new request (the running batch goes on): requests queue up; `resume` lets them in together."""
        with self._cv:
            self._paused = True

    def resume(self) -> None:
        with self._cv:
            self._paused = False
            self._cv.notify_all()

    @property
    def pending(self) -> int:
        """Requests waiting to be admitted."""
        with self._cv:
            return len(self._waiting)

    # -- adapters --------------------------------------------------------------------------------------------

    def add_adapter(self, name: str, adapter, *, replace: bool = False) -> None:
        """`AdapterSet.add` under the engine's lock (safe while a batch runs: each step reads the set anew)."""
        with self._lock:
            if name not in self.set and len(self.set.names) >= self.max_adapters:
                raise ApiError(409, f"{self.max_adapters} adapters are loaded, the most this server holds "
                                    f"(--max-adapters); unload one first", code="too_many_adapters")
            self.set.add(name, adapter, replace=replace)
            self._names = tuple(self.set.names)

    def remove_adapter(self, name: str) -> None:
        """Unloads an adapter; rows still generating with it end with a 404 error."""
        with self._lock:
            self.set.remove(name)
            self._names = tuple(self.set.names)

    @property
    def adapter_names(self) -> List[str]:
        """The loaded adapters (a snapshot taken after each change: reading it never waits for a load)."""
        return list(self._names)

    # -- requests --------------------------------------------------------------------------------------------

    def check(self, req: GenRequest) -> None:
        """Raises a 4xx `ApiError` for a request the engine cannot run."""
        if req.adapter is not None and req.adapter not in self.set:
            raise ApiError(404, f"the model {req.adapter!r} does not exist (loaded adapters: "
                                f"{self.adapter_names})", param="model", code="model_not_found")
        if not req.prompt:
            raise ApiError(400, "the prompt is empty (it needs at least one token)", param="prompt")
        if min(req.prompt) < 0 or max(req.prompt) >= self.cfg.vocab_size:
            raise ApiError(400, f"prompt token ids must lie in [0, {self.cfg.vocab_size})", param="prompt")
        if len(req.prompt) + req.max_tokens > self.context:
            raise ApiError(400, f"the prompt is {len(req.prompt)} tokens and max_tokens is {req.max_tokens}: "
                                f"{len(req.prompt) + req.max_tokens} tokens exceed the model's context of "
                                f"{self.context}; shorten the prompt or lower max_tokens",
                           param="max_tokens" if len(req.prompt) < self.context else "prompt",
                           code="context_length_exceeded")

    def submit(self, req: GenRequest) -> None:
        """Queues a checked request (429 `ApiError` when the queue is full, 503 when shutting down)."""
        self.check(req)
        req.deadline = time.monotonic() + req.timeout_s
        with self._cv:  # under the lock: close() drains the queue under it too
            if self._stop.is_set():
                raise ApiError(503, "the server is shutting down", code="shutting_down")
            if len(self._waiting) >= self.queue_size:
                raise ApiError(429, f"the server is busy: {self.queue_size} requests are already waiting; retry "
                                    f"later", code="queue_full")
            self._waiting.append(req)
            self._cv.notify_all()

    # -- the worker ------------------------------------------------------------------------------------------

    def _expired(self, req: GenRequest, now: float) -> bool:
        if req.cancelled:
            return True
        if now > req.deadline:
            req.emit("error", ApiError(504, f"the request waited longer than its timeout of {req.timeout_s:g} s",
                                       code="timeout"))
            return True
        return False

    def _take_new(self) -> List[GenRequest]:
        """Waits for requests when no batch runs: the first, then company for ``batch_wait_s``."""
        with self._cv:
            if self._paused or not self._waiting:
                self._cv.wait(0.1)
            if self._stop.is_set() or self._paused or not self._waiting:
                return []
            until = time.monotonic() + self.batch_wait_s
            while len(self._waiting) < self.max_batch and not self._stop.is_set():
                left = until - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(left)
            out, now = [], time.monotonic()
            longest = max_new = 0
            while self._waiting and len(out) < self.max_batch and not self._paused:
                r = self._waiting[0]
                if self._expired(r, now):
                    self._waiting.popleft()
                    continue
                lo, mn = max(longest, len(r.prompt)), max(max_new, r.max_tokens)
                if out and lo + mn > self.context:  # rows share one cache: must fit together
                    break
                out.append(self._waiting.popleft())
                longest, max_new = lo, mn
            self._inflight = list(out)
            return out

    def work_once(self) -> None:
        """One unit of the worker's work: start a batch from the waiting requests (waiting briefly for one), or
        one step of the running batch. The worker thread loops on it; tests call it to drive the engine."""
        if self._batch is None:
            reqs = self._take_new()
            if reqs:
                self._start(reqs)
        else:
            self._tick()

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                self.work_once()
            except Exception as e:  # a bug or a device failure: fail the batch, keep serving
                log.exception("jlora serve: a batch failed")
                batch, self._batch = self._batch, None
                failed = [row.req for row in (batch.rows if batch else []) if row is not None and not row.done]
                failed += [r for r in self._inflight if all(r is not f for f in failed)]
                self._inflight = []
                for req in failed:
                    req.cancelled = True
                    req.emit("error", ApiError(500, f"generation failed ({type(e).__name__}; see the server log)",
                                               code="internal_error"))
        if self._batch is not None:  # stopping: finish what runs (uvicorn waited for running requests already)
            batch, self._batch = self._batch, None
            for row in batch.rows:
                if row is not None and not row.done:
                    row.done = True
                    row.req.emit("error", ApiError(503, "the server is shutting down", code="shutting_down"))

    def _params(self, batch: _Batch):
        """The adapter set's tree with each row's adapter (rows whose adapter was unloaded end with a 404)."""
        with self._lock:
            names = []
            for j, row in enumerate(batch.rows):
                name = None if row is None or row.done else row.req.adapter
                if name is not None and name not in self.set:
                    row.done = True
                    row.req.emit("error", ApiError(404, f"the adapter {name!r} was unloaded while generating",
                                                   param="model", code="model_not_found"))
                    name = None
                names.append(name)
            return self.set.select(names)

    def _start(self, reqs: List[GenRequest]) -> None:
        cfg = self.cfg
        b = _pow2(len(reqs))
        longest = max(len(r.prompt) for r in reqs)
        max_new = max(r.max_tokens for r in reqs)
        t_pad = _bucket(longest, _MIN_PROMPT)
        if t_pad + max_new > self.context:  # near the context: exact (rare, so few extra shapes)
            t_pad = self.context - max_new
        n_slots = min(_bucket(t_pad + max_new, self.min_slots), self.context)
        batch = _Batch(b, n_slots)
        for j, r in enumerate(reqs):
            batch.set_row(j, _Row(r, self.tokenizer))
        tokens = np.zeros((b, t_pad), np.int32)
        mask = np.zeros((b, t_pad), bool)
        mask[:, -1] = True  # empty rows: one token, so attention has something to attend to
        for j, r in enumerate(reqs):
            tokens[j, t_pad - len(r.prompt):] = r.prompt
            mask[j, t_pad - len(r.prompt):] = True
        params = self._params(batch)
        sample, filtered = batch.flags(list(range(len(reqs))))
        tok, batch.cache = _prefill(cfg, params, jnp.asarray(tokens), jnp.asarray(mask), batch.seeds, batch.temp,
                                    batch.top_k, batch.top_p, batch.greedy, n_slots=n_slots, sample=sample,
                                    filtered=filtered)
        batch.index = t_pad
        batch.tok = tok
        self.stats["batches"] += 1
        self.stats["rows"] += len(reqs)
        self._batch = batch
        self._inflight = []
        self._deliver(batch, np.asarray(tok))

    def _deliver(self, batch: _Batch, host: np.ndarray, rows: Optional[List[int]] = None) -> None:
        """Hands each active row (or each of ``rows``) its new token (text, stop strings, budget, deadline)."""
        now = time.monotonic()
        for j in (batch.active() if rows is None else rows):
            row = batch.rows[j]
            if now > row.req.deadline:
                row.done = True
                row.req.emit("error", ApiError(504, f"the request ran longer than its timeout of "
                                                    f"{row.req.timeout_s:g} s", code="timeout"))
                continue
            row.push(int(host[j]))
            self.stats["tokens"] += 1
        act = batch.active()
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(act))
        self.stats["adapters_in_batch"] = max(self.stats["adapters_in_batch"],
                                              len({batch.rows[j].req.adapter for j in act}))

    def _admit(self, batch: _Batch) -> None:
        """Lets waiting requests join the running batch while the first in line fits (see the class docstring).
        Decided under the queue's lock; the joins (prefills) run outside it, so `submit` never waits for them."""
        take = []
        with self._cv:
            if self._paused:
                return
            now = time.monotonic()
            free = [j for j, row in enumerate(batch.rows) if row is None or row.done]
            room = self.max_batch - (batch.size - len(free))
            size = batch.size
            while self._waiting and room > 0:
                r = self._waiting[0]
                if self._expired(r, now):
                    self._waiting.popleft()
                    continue
                t = _bucket(len(r.prompt), _MIN_PROMPT)
                if t > batch.index or batch.index + r.max_tokens > batch.n_slots:
                    break
                if not free:
                    if size >= self.max_batch:
                        break
                    new = min(_pow2(size + 1), _pow2(self.max_batch))
                    free += list(range(size, new))
                    size = new
                take.append((free.pop(0), self._waiting.popleft(), t))
                room -= 1
            self._inflight = [r for _, r, _ in take]
        if size > batch.size:
            batch.cache, batch.tok = _grow(batch.cache, batch.tok, b=size)
            batch.grow(size)
        for j, r, t in take:
            self._join(batch, j, r, t)
            self._inflight.remove(r)

    def _join(self, batch: _Batch, j: int, req: GenRequest, t: int) -> None:
        with self._lock:
            params1 = self.set.select([req.adapter]) if (req.adapter is None or req.adapter in self.set) else None
        if params1 is None:
            req.emit("error", ApiError(404, f"the adapter {req.adapter!r} was unloaded before the request ran",
                                       param="model", code="model_not_found"))
            return
        row = _Row(req, self.tokenizer)
        batch.set_row(j, row)
        tokens = np.zeros((1, t), np.int32)
        mask = np.zeros((1, t), bool)
        tokens[0, t - len(req.prompt):] = req.prompt
        mask[0, t - len(req.prompt):] = True
        sample, filtered = batch.flags([j])
        sl = slice(j, j + 1)
        try:  # a failure here (e.g. out of memory compiling a new shape) fails this request only
            tok1, one = _prefill_one(self.cfg, params1, jnp.int32(batch.index), jnp.asarray(tokens),
                                     jnp.asarray(mask), batch.seeds[sl], batch.temp[sl], batch.top_k[sl],
                                     batch.top_p[sl], batch.greedy[sl], n_slots=batch.n_slots, sample=sample,
                                     filtered=filtered)
            tok1 = int(tok1)
        except Exception as e:
            log.exception("jlora serve: a request could not join the batch")
            row.done = True
            req.emit("error", ApiError(500, f"generation failed ({type(e).__name__}; see the server log)",
                                       code="internal_error"))
            return
        batch.cache, batch.tok = _splice(batch.cache, one, batch.tok, jnp.int32(j), jnp.int32(tok1))
        self.stats["rows"] += 1
        self.stats["joined"] += 1
        host = np.zeros((batch.size,), np.int32)
        host[j] = tok1
        self._deliver(batch, host, rows=[j])  # its first token, from its own prefill

    def _tick(self) -> None:
        """One step of the running batch: admit joiners, decode, deliver; the batch ends when no row is active."""
        batch = self._batch
        self._admit(batch)
        act = batch.active()
        if not act:
            self._batch = None
            return
        params = self._params(batch)
        sample, filtered = batch.flags()
        steps = np.asarray([len(r.ids) if r is not None else 0 for r in batch.rows], np.int32)
        batch.tok, batch.cache = _step(self.cfg, params, batch.cache, batch.tok, steps, batch.seeds, batch.temp,
                                       batch.top_k, batch.top_p, batch.greedy, sample=sample, filtered=filtered)
        batch.index += 1
        self.stats["steps"] += 1
        self._deliver(batch, np.asarray(batch.tok))
        if not batch.active():
            self._batch = None


# ----------------------------------------------------------------------------------------------------------
# The HTTP app


@dataclasses.dataclass
class ServeOptions:
    """The server's limits and safety settings (the CLI flags)."""

    model_name: str = "base"
    api_key: Optional[str] = None
    adapter_dirs: Sequence[str] = ()
    max_tokens_limit: int = 1024
    default_max_tokens: int = 256  # chat requests without max_tokens (completions default to 16, as OpenAI's)
    max_body_bytes: int = 1 << 20
    max_adapter_bytes: int = 1 << 30
    request_timeout_s: float = 300.0
    local_only: bool = False  # set by `serve` / `start_server` for a loopback bind: without a key, only local
    # Host / Origin headers are answered (no cross-site requests from a browser, no DNS rebinding)


def _now() -> int:
    return int(time.time())


def _envelope(rid: str, kind: str, model: str, choices: list, usage: Optional[dict] = None) -> dict:
    """An OpenAI response object (``text_completion``, ``chat.completion`` or ``chat.completion.chunk``)."""
    out = {"id": rid, "object": kind, "created": _now(), "model": model, "choices": choices,
           "system_fingerprint": None}
    if usage is not None:
        out["usage"] = usage
    return out


def _num(body: dict, key: str, default, kind, lo=None, hi=None, lo_open=False):
    v = body.get(key, default)
    if v is None:
        v = default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not float(v).is_integer()):
        raise ApiError(400, f"{key} must be {'an integer' if kind is int else 'a number'}, got {v!r}", param=key)
    v = kind(v)
    if (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and v > hi):
        rng = f"{'(' if lo_open else '['}{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        raise ApiError(400, f"{key} must lie in {rng}, got {v!r}", param=key)
    return v


# Parameters jlora serve does not implement, with the values that mean "off" (anything else is refused).
_UNSUPPORTED = {"n": (1,), "best_of": (1,), "logprobs": (False,), "top_logprobs": (0,), "echo": (False,),
                "suffix": ("",), "presence_penalty": (0,), "frequency_penalty": (0,), "logit_bias": ({},),
                "tools": ([],), "functions": ([],), "tool_choice": ("none", "auto"), "function_call": ("none", "auto")}


def _refuse_unsupported(body: dict) -> None:
    for key, off in _UNSUPPORTED.items():
        v = body.get(key)
        if v is not None and not any(v == f and isinstance(v, bool) == isinstance(f, bool) for f in off):
            raise ApiError(400, f"{key}={v!r} is not supported by jlora serve", param=key,
                           code="unsupported_parameter")
    rf = body.get("response_format")
    if rf not in (None, {"type": "text"}):
        raise ApiError(400, f"response_format={rf!r} is not supported (only text)", param="response_format",
                       code="unsupported_parameter")


def build_app(engine: Engine, options: ServeOptions):
    """The Starlette app serving ``engine`` (see the module docstring for the routes)."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    opts = options
    tok = engine.tokenizer
    eos = tuple(getattr(tok, "eos_token_ids", ()) or ()) or tuple(engine.cfg.eos_ids)
    roots = [os.path.realpath(d) for d in opts.adapter_dirs]
    created = _now()

    def auth(request: Request) -> None:
        if not opts.api_key:
            if opts.local_only:  # no key on a loopback bind: refuse what a web page could send (CSRF, rebinding)
                host = (request.headers.get("host") or "").rsplit(":", 1)[0].strip("[]").lower()
                origin = request.headers.get("origin")
                origin_host = (origin.split("://", 1)[-1].split("/", 1)[0].rsplit(":", 1)[0].strip("[]").lower()
                               if origin else None)
                if host not in _LOCAL_HOSTS or (origin is not None and origin_host not in _LOCAL_HOSTS):
                    raise ApiError(403, "without an API key this server answers only local clients (Host and Origin "
                                        "must be localhost); start it with --api-key to serve others",
                                   code="not_local")
            return
        got = request.headers.get("authorization", "")
        scheme, _, token = got.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), opts.api_key.encode()):
            raise ApiError(401, "a valid API key is required: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    async def read_json(request: Request) -> dict:
        ctype = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if ctype != "application/json":  # also keeps browsers' "simple" cross-site posts out
            raise ApiError(415, f"the request body must be JSON with 'Content-Type: application/json', got "
                                f"{ctype or 'no content type'!r}", code="unsupported_media_type")
        n = request.headers.get("content-length")
        if n is not None and n.isdigit() and int(n) > opts.max_body_bytes:
            raise ApiError(413, f"the request body is {int(n)} bytes; the limit is {opts.max_body_bytes}",
                           code="body_too_large")
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > opts.max_body_bytes:
                raise ApiError(413, f"the request body exceeds the limit of {opts.max_body_bytes} bytes",
                               code="body_too_large")
        try:
            body = json.loads(bytes(data) or b"null")
        except (ValueError, RecursionError) as e:  # JSONDecodeError, bad UTF-8, huge ints, deep nesting
            raise ApiError(400, f"the request body is not valid JSON: {str(e)[:200]}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}",
                           code="invalid_json")
        return body

    def adapter_of(body: dict) -> Optional[str]:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise ApiError(400, "model is required: the served model's name or an adapter's (GET /v1/models)",
                           param="model")
        if model in (opts.model_name, BASE):
            return None
        if model not in engine.set:
            raise ApiError(404, f"the model {model!r} does not exist; served: {[opts.model_name] + engine.adapter_names}",
                           param="model", code="model_not_found")
        return model

    def sampling(body: dict, default_max: int) -> dict:
        _refuse_unsupported(body)
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        max_tokens = _num({"max_tokens": max_tokens}, "max_tokens", default_max, int, 1, opts.max_tokens_limit)
        stop = body.get("stop")
        stop = [] if stop is None else ([stop] if isinstance(stop, str) else stop)
        if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) for s in stop):
            raise ApiError(400, f"stop must be a string or a list of at most 4 strings, got {body.get('stop')!r}",
                           param="stop")
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ApiError(400, f"seed must be an integer, got {seed!r}", param="seed")
        stream_options = body.get("stream_options")
        if stream_options is not None and not isinstance(stream_options, dict):
            raise ApiError(400, "stream_options must be an object", param="stream_options")
        ignore_eos = body.get("ignore_eos", False)
        if not isinstance(ignore_eos, bool):
            raise ApiError(400, f"ignore_eos must be true or false, got {ignore_eos!r}", param="ignore_eos")
        stream = body.get("stream", False)
        if not isinstance(stream, bool) and stream is not None:
            raise ApiError(400, f"stream must be true or false, got {stream!r}", param="stream")
        return dict(max_tokens=max_tokens, temperature=_num(body, "temperature", 1.0, float, 0.0, 2.0),
                    top_p=_num(body, "top_p", 1.0, float, 0.0, 1.0, lo_open=True),
                    top_k=_num(body, "top_k", 0, int, 0, engine.cfg.vocab_size), seed=seed, stop=stop,
                    stream=bool(stream), include_usage=bool((stream_options or {}).get("include_usage")),
                    ignore_eos=ignore_eos)

    def prompts_of(body: dict) -> List[List[int]]:
        p = body.get("prompt")
        if isinstance(p, str):
            return [tok.encode(p)]
        if isinstance(p, list) and p and all(isinstance(x, int) and not isinstance(x, bool) for x in p):
            return [list(p)]
        if isinstance(p, list) and p and all(isinstance(x, str) for x in p):
            return [tok.encode(x) for x in p]
        if isinstance(p, list) and p and all(isinstance(x, list) and x and all(
                isinstance(i, int) and not isinstance(i, bool) for i in x) for x in p):
            return [list(x) for x in p]
        raise ApiError(400, "prompt must be a string, a list of strings, a list of token ids or a list of such "
                            "lists (non-empty)", param="prompt")

    def chat_prompt(body: dict) -> List[int]:
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise ApiError(400, "messages must be a non-empty list of {role, content}", param="messages")
        clean = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
                raise ApiError(400, f"messages[{i}] must be an object with a role of system, developer, user or "
                                    f"assistant", param=f"messages[{i}]")
            content = m.get("content")
            if isinstance(content, list):  # content parts: only text
                if not all(isinstance(c, dict) and c.get("type") == "text" and isinstance(c.get("text"), str)
                           for c in content):
                    raise ApiError(400, f"messages[{i}].content: only text parts are supported",
                                   param=f"messages[{i}].content")
                content = "".join(c["text"] for c in content)
            if not isinstance(content, str):
                raise ApiError(400, f"messages[{i}].content must be a string", param=f"messages[{i}].content")
            clean.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
        if not getattr(tok, "chat_template", None):
            raise ApiError(400, "this model has no chat template; use /v1/completions", code="no_chat_template")
        try:
            return list(tok.apply_chat_template(clean, add_generation_prompt=True, tokenize=True))
        except Exception as e:  # the template raised (e.g. roles it does not accept)
            raise ApiError(400, f"the chat template refused the conversation: {e}", param="messages") from None

    def start(prompts: List[List[int]], adapter, s: dict):
        """Submits one request per prompt; returns (asyncio queue of (index, kind, payload), requests)."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        reqs = []

        def emitter(i):
            def emit(kind, payload):
                try:
                    loop.call_soon_threadsafe(events.put_nowait, (i, kind, payload))
                except RuntimeError:  # the event loop is gone (shutdown)
                    pass
            return emit

        for i, p in enumerate(prompts):
            reqs.append(GenRequest(prompt=p, adapter=adapter, max_tokens=s["max_tokens"],
                                   temperature=s["temperature"], top_p=s["top_p"], top_k=s["top_k"],
                                   seed=None if s["seed"] is None else s["seed"] + i, stop=s["stop"],
                                   eos=() if s["ignore_eos"] else eos,
                                   timeout_s=opts.request_timeout_s, emit=emitter(i)))
        for r in reqs:
            engine.check(r)
        try:
            for r in reqs:
                engine.submit(r)
        except ApiError:
            for r in reqs:
                r.cancelled = True
            raise
        return events, reqs

    async def next_event(events, deadline, request=None):
        """The next engine event; 504 past the deadline; None if the client has gone (checked twice a second)."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ApiError(504, f"the request ran longer than its timeout of {opts.request_timeout_s:g} s",
                               code="timeout")
            try:
                return await asyncio.wait_for(events.get(), min(left, 0.5))
            except asyncio.TimeoutError:
                if request is not None and await request.is_disconnected():
                    return None

    async def collect(events, reqs, request):
        texts = [[] for _ in reqs]
        done: Dict[int, dict] = {}
        deadline = time.monotonic() + opts.request_timeout_s + 5.0
        try:
            while len(done) < len(reqs):
                ev = await next_event(events, deadline, request)
                if ev is None:  # the client went away: stop its rows, answer nobody
                    return None
                i, kind, payload = ev
                if kind == "delta":
                    texts[i].append(payload)
                elif kind == "done":
                    done[i] = payload
                else:
                    raise payload
        finally:
            for r in reqs:
                r.cancelled = True  # done ones ignore it; the rest stop
        usage = {"prompt_tokens": sum(d["prompt_tokens"] for d in done.values()),
                 "completion_tokens": sum(d["completion_tokens"] for d in done.values())}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return ["".join(t) for t in texts], [done[i]["finish_reason"] for i in range(len(reqs))], usage

    def sse(obj) -> bytes:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()

    def stream(events, reqs, chunk, final_usage):
        """Server-sent events: one chunk per text delta, one with each finish_reason, optional usage, [DONE]."""

        async def gen():
            done = 0
            usage = {"prompt_tokens": 0, "completion_tokens": 0}
            deadline = time.monotonic() + opts.request_timeout_s + 5.0
            try:
                first = chunk(0, None, None, first=True)
                if first is not None:
                    yield sse(first)
                while done < len(reqs):
                    try:
                        i, kind, payload = await next_event(events, deadline)
                    except ApiError as e:
                        yield sse(e.body())
                        return
                    if kind == "delta":
                        yield sse(chunk(i, payload, None))
                    elif kind == "done":
                        done += 1
                        usage["prompt_tokens"] += payload["prompt_tokens"]
                        usage["completion_tokens"] += payload["completion_tokens"]
                        yield sse(chunk(i, None, payload["finish_reason"]))
                    else:
                        yield sse(payload.body())
                        return
                if final_usage:
                    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
                    yield sse(final_usage(usage))
                yield b"data: [DONE]\n\n"
            finally:
                for r in reqs:
                    r.cancelled = True  # a client that went away stops its rows

        return StreamingResponse(gen(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def completions(request: Request):
        auth(request)
        body = await read_json(request)
        adapter = adapter_of(body)
        s = sampling(body, 16)
        prompts = prompts_of(body)
        most = min(engine.max_batch * 4, engine.queue_size)
        if len(prompts) > most:
            raise ApiError(400, f"at most {most} prompts per request, got {len(prompts)}", param="prompt")
        events, reqs = start(prompts, adapter, s)
        rid, model = f"cmpl-{uuid.uuid4().hex}", body["model"]

        def obj(choices, usage=None):
            return _envelope(rid, "text_completion", model, choices, usage)

        if s["stream"]:
            def chunk(i, text, reason, first=False):
                if first:
                    return None
                return obj([{"index": i, "text": text or "", "logprobs": None, "finish_reason": reason}])

            return stream(events, reqs, chunk,
                          (lambda u: obj([], u)) if s["include_usage"] else None)
        got = await collect(events, reqs, request)
        if got is None:
            return Response(status_code=499)
        texts, reasons, usage = got
        return JSONResponse(obj([{"index": i, "text": t, "logprobs": None, "finish_reason": r}
                                 for i, (t, r) in enumerate(zip(texts, reasons))], usage))

    async def chat_completions(request: Request):
        auth(request)
        body = await read_json(request)
        adapter = adapter_of(body)
        s = sampling(body, min(opts.default_max_tokens, opts.max_tokens_limit))
        events, reqs = start([chat_prompt(body)], adapter, s)
        rid, model = f"chatcmpl-{uuid.uuid4().hex}", body["model"]

        def obj(choices, usage=None, kind="chat.completion"):
            return _envelope(rid, kind, model, choices, usage)

        if s["stream"]:
            def chunk(i, text, reason, first=False):
                if first:
                    delta = {"role": "assistant", "content": ""}
                elif reason is not None:
                    delta = {}
                else:
                    delta = {"content": text}
                return obj([{"index": i, "delta": delta, "logprobs": None, "finish_reason": reason}],
                           kind="chat.completion.chunk")

            return stream(events, reqs, chunk,
                          (lambda u: obj([], u, kind="chat.completion.chunk")) if s["include_usage"] else None)
        got = await collect(events, reqs, request)
        if got is None:
            return Response(status_code=499)
        texts, reasons, usage = got
        return JSONResponse(obj([{"index": 0, "message": {"role": "assistant", "content": texts[0]},
                                  "logprobs": None, "finish_reason": reasons[0]}], usage))

    def model_obj(name: str) -> dict:
        return {"id": name, "object": "model", "created": created, "owned_by": "jlora",
                **({"parent": opts.model_name} if name != opts.model_name else {})}

    async def models(request: Request):
        auth(request)
        return JSONResponse({"object": "list", "data": [model_obj(n) for n in [opts.model_name] +
                                                         engine.adapter_names]})

    async def model_one(request: Request):
        auth(request)
        name = request.path_params["name"]
        if name != opts.model_name and name not in engine.set:
            raise ApiError(404, f"the model {name!r} does not exist", param="model", code="model_not_found")
        return JSONResponse(model_obj(name))

    def check_dir(real: str, path: str) -> None:
        """The adapter directory holds only regular files inside the allowed roots, within the size limit."""
        total = 0
        for dirpath, dirs, files in os.walk(real):
            for f in dirs + files:
                full = os.path.join(dirpath, f)
                target = os.path.realpath(full)
                if not any(target == r or target.startswith(r.rstrip(os.sep) + os.sep) for r in roots):
                    raise ApiError(403, f"{path!r} holds a link leading outside the allowed adapter directories",
                                   param="path", code="path_not_allowed")
                if f in files:
                    st = os.stat(full)
                    if not stat.S_ISREG(st.st_mode):
                        raise ApiError(400, f"{path!r} holds {f!r}, which is not a regular file", param="path",
                                       code="invalid_adapter")
                    total += st.st_size
                    if total > opts.max_adapter_bytes:
                        raise ApiError(413, f"the adapter at {path!r} exceeds the limit of {opts.max_adapter_bytes} "
                                            f"bytes", param="path", code="adapter_too_large")

    async def add_adapter(request: Request):
        auth(request)
        body = await read_json(request)
        name, path, replace = body.get("name"), body.get("path"), body.get("replace", False)
        if not isinstance(name, str) or not _NAME_RE.match(name) or name in (opts.model_name, BASE):
            raise ApiError(400, f"name must be 1-128 characters of letters, digits and ._:- (starting with a letter "
                                f"or digit), not the base's name; got {name!r}", param="name")
        if not isinstance(path, str) or not path:
            raise ApiError(400, "path is required: an adapter directory inside a directory the server was started "
                                "with (--adapter-dir)", param="path")
        if not isinstance(replace, bool):
            raise ApiError(400, f"replace must be true or false, got {replace!r}", param="replace")
        if not roots:
            raise ApiError(403, "loading adapters at run time is off: start the server with --adapter-dir DIR",
                           param="path", code="adapter_loading_disabled")
        if "\x00" in path:
            raise ApiError(400, "path must not contain NUL characters", param="path")
        real = os.path.realpath(path if os.path.isabs(path) else os.path.join(roots[0], path))
        if not any(real == r or real.startswith(r.rstrip(os.sep) + os.sep) for r in roots):
            raise ApiError(403, f"the path {path!r} is outside the adapter directories the server allows",
                           param="path", code="path_not_allowed")
        if not os.path.isdir(real):
            raise ApiError(404, f"no adapter directory at {path!r}", param="path", code="adapter_not_found")
        await asyncio.to_thread(check_dir, real, path)
        if name in engine.set and not replace:
            raise ApiError(409, f"an adapter named {name!r} is already loaded (send \"replace\": true)",
                           param="name", code="adapter_exists")
        from jlora.convert.peft import load_adapter

        def load():
            tree = load_adapter(engine.cfg, engine.set.base, real)
            engine.add_adapter(name, tree, replace=replace)

        try:
            await asyncio.to_thread(load)
        except (ValueError, FileNotFoundError, KeyError, OSError) as e:
            raise ApiError(400, f"could not load the adapter at {path!r}: {e}", param="path",
                           code="invalid_adapter") from None
        log.info("loaded adapter %r from %s", name, real)
        return JSONResponse(model_obj(name), status_code=201)

    async def delete_adapter(request: Request):
        auth(request)
        name = request.path_params["name"]
        if name not in engine.set:
            raise ApiError(404, f"no adapter named {name!r} is loaded", param="name", code="model_not_found")
        await asyncio.to_thread(engine.remove_adapter, name)
        log.info("unloaded adapter %r", name)
        return JSONResponse({"id": name, "object": "model", "deleted": True})

    async def health(request: Request):
        return JSONResponse({"status": "ok", "pending": engine.pending, "adapters": len(engine.adapter_names)})

    async def on_api_error(request: Request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status)

    async def on_http_error(request: Request, exc: HTTPException):
        return JSONResponse(ApiError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code)

    async def on_error(request: Request, exc: Exception):
        log.exception("jlora serve: unexpected error on %s", request.url.path)
        return JSONResponse(ApiError(500, f"internal error ({type(exc).__name__}; see the server log)",
                                     code="internal_error").body(), status_code=500)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            engine.close()

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{name:path}", model_one, methods=["GET"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/adapters", add_adapter, methods=["POST"]),
        Route("/v1/adapters/{name:path}", delete_adapter, methods=["DELETE"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan,
                     exception_handlers={ApiError: on_api_error, HTTPException: on_http_error, Exception: on_error})


# ----------------------------------------------------------------------------------------------------------
# Running it


class ServerThread:
    """A uvicorn server running ``app`` in a background thread (`start_server`); ``url`` ends in ``/v1``."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = host, self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="on",
                                                    timeout_graceful_shutdown=10))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True,
                                       name="jlora-serve")
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() - t0 > 60:
                raise RuntimeError("jlora serve: the server did not start")
            time.sleep(0.01)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()


def make_engine(cfg: ModelConfig, base_params, tokenizer, adapters: Dict[str, Any] = None, *, capacity: int = 8,
                rank_bucket: int = 8, **engine_kw) -> Engine:
    """An `Engine` (``engine_kw``: its options, e.g. ``max_batch``, ``queue_size``, ``max_adapters``) over a new
    `AdapterSet` on ``base_params`` with ``adapters`` (name -> tree or PEFT dir)."""
    s = AdapterSet(cfg, base_params, capacity=capacity, rank_bucket=rank_bucket)
    for name, a in (adapters or {}).items():
        if not isinstance(name, str) or not _NAME_RE.match(name) or name == BASE:
            raise ValueError(f"adapter name {name!r}: use 1-128 letters, digits and ._:- (starting with a letter "
                             f"or digit), not {BASE!r}")
        s.add(name, a)
    return Engine(s, tokenizer, **engine_kw)


def _options(options: Optional[ServeOptions], host: str) -> ServeOptions:
    return dataclasses.replace(options or ServeOptions(), local_only=host in _LOCAL_HOSTS)


def start_server(cfg: ModelConfig, base_params, tokenizer, adapters: Dict[str, Any] = None, *, host: str = "127.0.0.1",
                 port: int = 0, options: Optional[ServeOptions] = None, **engine_kw) -> ServerThread:
    """Starts an OpenAI-compatible server in a background thread; ``.url`` for clients, ``.stop()`` to end it.

    Example:
      ``cfg, params`` are a tiny random model and ``tok`` its tokenizer (with SmolLM2:
      ``cfg, params = jlora.load_pretrained(jlora.default_model_path())``).

      >>> srv = start_server(cfg, params, tok, options=ServeOptions(model_name="tiny"))
      >>> import urllib.request, json
      >>> json.load(urllib.request.urlopen(srv.url + "/models"))["data"][0]["id"]
      'tiny'
      >>> srv.stop()
    """
    engine = make_engine(cfg, base_params, tokenizer, adapters, **engine_kw)
    return ServerThread(build_app(engine, _options(options, host)), host, port)


def serve(cfg: ModelConfig, base_params, tokenizer, adapters: Dict[str, Any], *, host: str = "127.0.0.1",
          port: int = 8000, options: Optional[ServeOptions] = None, log_level: str = "info", graceful_s: float = 30.0,
          **engine_kw) -> None:
    """Runs the server in the foreground until SIGTERM / SIGINT (uvicorn's signal handling: stop accepting,
    finish running requests for up to ``graceful_s``, then the engine fails what is still queued with 503)."""
    import uvicorn

    engine = make_engine(cfg, base_params, tokenizer, adapters, **engine_kw)
    app = build_app(engine, _options(options, host))
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                                           timeout_graceful_shutdown=graceful_s))
    # uvicorn handles SIGINT/SIGTERM itself (graceful shutdown), then re-raises the signal under the handlers it
    # found: with these, that re-raise ends `run` normally (exit status 0, no KeyboardInterrupt traceback).
    old = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            old[sig] = signal.signal(sig, lambda *_: None)
    try:
        server.run()
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    if not server.started:
        raise OSError(f"jlora serve: the server could not start on {host}:{port} (see the log above)")
