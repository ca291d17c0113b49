"""Datasets for fine-tuning: text / JSONL / chat files -> tokenized, packed, deterministic, resumable batches.

The pipeline is four small steps, each a function the tests call::

    examples = load_examples("train.jsonl")                       # list[Example], each knows its file:line
    train, held_out = split_examples(examples, 0.05, seed=0)      # deterministic split
    batches = Batches.from_examples(train, tok, seq_len=512, batch_size=8, seed=0)
    for step, batch in batches.iterate(start_step):               # or batches.batch_at(step)
        state, metrics = train_step(state, batch)

(`make_batches` does all four.) A batch is the dict `jlora.train` consumes: ``input_ids`` int32, ``loss_mask``
int32 (1 where the token is a *target*), ``attention_mask`` int32 (1 for real tokens), each
``[batch_size, seq_len + 1]``, or ``[accum_steps, batch_size, seq_len + 1]`` with gradient accumulation.

Decisions written down here:

* **No grain.** Everything here is an in-memory list of token arrays and some index arithmetic: the batch at
  step k is a pure function of ``(seed, k)``, so resuming needs only the step number (already in the train
  state) and no iterator state in checkpoints. grain would add a dependency (not installed here) and a
  checkpointable-iterator protocol for a problem this small; it earns its keep for datasets that do not fit
  in memory or need heavy per-record work in worker processes. If that day comes, ``Batches.batch_at`` maps
  directly onto a grain ``RandomAccessDataSource`` + index sampler.
* **Row length is ``seq_len + 1``.** `jlora.train` feeds ``input_ids[:, :-1]`` to the model and scores
  ``input_ids[:, 1:]``, so a row of ``seq_len + 1`` tokens gives exactly ``seq_len`` inputs and ``seq_len``
  predictions; the model's context must be at least ``seq_len``. An example "overflows" when it has more than
  ``seq_len + 1`` tokens.
* **File formats.** ``.jsonl`` lines are objects with ``{"text"}``, ``{"prompt", "completion"}`` or
  ``{"messages": [{"role", "content"}, ...]}`` (other keys are ignored; a line matching two formats, or none,
  is an error); blank lines are skipped. One file (or directory) must use one format: mixing them is almost
  always a mistake (e.g. a text corpus concatenated onto a chat set), so it is refused, naming both lines.
  A ``.txt`` file holds documents separated by blank lines (lines of only whitespace), so a file of
  paragraphs, quotes or poems is a dataset as it stands; to train on one long text as a single document, pass
  ``txt_split="file"`` and ``overflow="split"``. A directory loads its ``*.txt`` and ``*.jsonl`` files in
  sorted order.
* **What is a target** (`tokenize_example`). ``text``: every token. ``prompt``/``completion``: the completion
  tokens and the EOS appended after them; prompt and completion are tokenized *separately* (the prompt with
  the tokenizer's own BOS rule, the completion without special tokens), which is exactly what the model sees
  at inference, when the prompt is tokenized alone and the completion generated token by token. ``chat``:
  the conversation is rendered once with the tokenizer's chat template and tokenized without adding special
  tokens (the template writes its own BOS, as in transformers); the targets are each assistant message's
  tokens through its end-of-turn token (see below). Text and completion examples end with EOS (when the
  tokenizer has one); chat examples end however the template ends them (SmolLM2: ``<|im_end|>\\n``).
* **Finding assistant spans.** For assistant message i the template renders the prefix ``messages[:i]`` with
  the generation prompt (``...<|im_start|>assistant\\n``) and the prefix ``messages[:i+1]`` without it; both
  must be *string* prefixes of the full rendering, which gives the character span of the assistant turn.
  Tokens overlapping that span (by the tokenizer's character offsets) are targets, cut after the last
  end-of-sequence id (``tokenizer.eos_token_ids``) inside the span so that trailing template text such as the
  newline after ``<|im_end|>`` (never generated) is not. Mapping characters to tokens, rather than diffing
  the token ids of separately tokenized prefixes, stays exact when a BPE merge crosses the boundary. A
  template that renders earlier turns differently from the last one (some "thinking" templates) breaks the
  prefix property and raises a ``ValueError`` naming the example; so does a conversation whose first message
  is from the assistant (its start cannot be located).
* **Packing vs padding.** ``pack=True``: whole examples are placed into rows first-fit (among the last 16
  open rows, in a seeded order) and each row is right-padded; an example is never split across rows (unless
  ``overflow="split"`` cut it into chunks first), so a chat is never separated from its prompt. Examples in
  a row attend to one another (the model has no segment ids; the EOS / end-of-turn separator is the usual
  GPT practice); ``loss_mask`` keeps each example's own targets. ``pack=False``: one example per row. In both
  modes padding has ``attention_mask = 0`` and ``loss_mask = 0`` and uses ``pad_token_id`` (else EOS, else 0).
  Rows are built once (from the seed); each epoch is a fresh permutation of the rows seeded by
  ``(seed, epoch)``.
* **Overflow.** ``"truncate"`` keeps the first ``seq_len + 1`` tokens and warns once with the count;
  ``"error"`` raises a ``ValueError`` naming the example (file:line) and its length; ``"split"`` cuts it into
  chunks of ``seq_len + 1`` tokens overlapping by one token, so every target is still predicted exactly once.
  Examples left with no target token are dropped (with a warning).
* **Batch geometry.** ``batch_size`` is the number of rows of one (micro-)batch across all hosts; a step
  consumes ``accum_steps * batch_size`` rows. With ``host_count > 1`` each host receives the contiguous slice
  ``host_index`` of every micro-batch (``batch_size / host_count`` rows), so the hosts together see exactly
  the global batch (pass ``jax.process_index(), jax.process_count()``; this module does not import jax).
  ``drop_remainder=True`` (training) skips the last incomplete batch of each epoch, a different set of rows
  every epoch; ``drop_remainder=False`` (evaluation) fills it with empty rows (all masks 0, so they add
  nothing to a token-weighted loss), so every row is seen exactly once per epoch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

__all__ = [
    "Example",
    "load_examples",
    "split_examples",
    "tokenize_example",
    "Batches",
    "make_batches",
]

_FORMATS = ("text", "completion", "chat")
_OVERFLOW = ("truncate", "error", "split")
_PACK_WINDOW = 16  # open rows a packed example may go into (first-fit among them)
# Seed-stream tags, so the split, the packing order and the epoch permutations are independent streams.
_SPLIT, _PACK, _EPOCH = 0, 1, 2


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Example:
    """One training example.

    Attributes:
        kind: ``"text"``, ``"completion"`` (prompt/completion) or ``"chat"``.
        data: ``{"text": str}``, ``{"prompt": str, "completion": str}`` or ``{"messages": [...]}``.
        source: where it came from, ``"path:line"``, for error messages.
    """

    kind: str
    data: dict
    source: str = "<memory>"


def _detect(obj: Any, where: str) -> Example:
    """The Example of one parsed JSON object (or an in-memory dict), validated."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    matches = [k for k, keys in (("chat", ("messages",)), ("completion", ("prompt", "completion")),
                                 ("text", ("text",))) if all(key in obj for key in keys)]
    if not matches:
        raise ValueError(
            f"{where}: keys {sorted(obj)} match no format; expected {{'text'}}, {{'prompt', 'completion'}} or "
            "{'messages': [{'role', 'content'}, ...]}"
        )
    if len(matches) > 1:
        raise ValueError(f"{where}: keys {sorted(obj)} match more than one format ({', '.join(matches)}); keep one")
    kind = matches[0]
    if kind == "text":
        _check_str(obj["text"], "text", where)
        return Example("text", {"text": obj["text"]}, where)
    if kind == "completion":
        _check_str(obj["prompt"], "prompt", where)
        _check_str(obj["completion"], "completion", where)
        return Example("completion", {"prompt": obj["prompt"], "completion": obj["completion"]}, where)
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    clean = []
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"{where}: messages[{j}] must be an object with string 'role' and 'content', got {m!r}")
        clean.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in clean):
        raise ValueError(f"{where}: the conversation has no 'assistant' message, so nothing to train on")
    if clean[0]["role"] == "assistant":
        raise ValueError(f"{where}: the conversation starts with an assistant message; its prompt cannot be located")
    return Example("chat", {"messages": clean}, where)


def _check_str(value: Any, key: str, where: str) -> None:
    if not isinstance(value, str):
        raise ValueError(f"{where}: {key!r} must be a string, got {type(value).__name__}")


def _load_file(path: str, txt_split: str) -> list[Example]:
    out: list[Example] = []
    with open(path, encoding="utf-8-sig") as f:  # -sig: a byte-order mark (Windows editors) is accepted
        text = f.read()
    lines = text.splitlines()
    if path.endswith(".txt"):
        if txt_split == "file":  # the file's text exactly as it is
            if text.strip():
                out.append(Example("text", {"text": text}, f"{path}:1"))
            return out
        block: list[str] = []
        start = 0
        for n, line in enumerate(lines + [""], start=1):
            if line.strip():
                if not block:
                    start = n
                block.append(line)
            elif block:
                out.append(Example("text", {"text": "\n".join(block)}, f"{path}:{start}"))
                block = []
        return out
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
        out.append(_detect(obj, where))
    return out


def load_examples(path: str | os.PathLike, *, txt_split: str = "blank_lines") -> list[Example]:
    """Reads a dataset file (``.txt`` or ``.jsonl``) or a directory of them.

    Args:
        path: a ``.txt`` / ``.jsonl`` file, or a directory (its ``*.txt`` and ``*.jsonl`` files, sorted).
        txt_split: ``"blank_lines"`` (a ``.txt`` file holds documents separated by blank lines) or ``"file"``
            (a ``.txt`` file is one document, its text unchanged).
    Returns:
        The examples, in file order, each with its ``source`` (``"path:line"``).
    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: an unsupported extension, invalid JSON, a line matching no format (or two), formats mixed
            within the dataset, or no examples at all; the message names the file and line.

    Example:
        >>> import json
        >>> with open(f"{tmp}/chats.jsonl", "w") as f:
        ...     for q, a in [("Hi", "Hello!"), ("2+2?", "4")]:
        ...         print(json.dumps({"messages": [{"role": "user", "content": q},
        ...                                        {"role": "assistant", "content": a}]}), file=f)
        >>> examples = load_examples(f"{tmp}/chats.jsonl")
        >>> len(examples), examples[1].kind, examples[1].source
        (2, 'chat', '.../chats.jsonl:2')
    """
    path = os.fspath(path)
    if txt_split not in ("blank_lines", "file"):
        raise ValueError(f"load_examples: txt_split must be 'blank_lines' or 'file', got {txt_split!r}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: dataset file not found")
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith((".txt", ".jsonl")))
        if not files:
            raise ValueError(f"{path}: the directory has no .txt or .jsonl files")
    else:
        if not path.endswith((".txt", ".jsonl")):
            raise ValueError(f"{path}: unsupported dataset file type (expected .txt or .jsonl)")
        files = [path]
    examples: list[Example] = []
    for f in files:
        examples.extend(_load_file(f, txt_split))
    if not examples:
        raise ValueError(f"{path}: empty dataset (no examples found)")
    first = examples[0]
    for ex in examples:
        if ex.kind != first.kind:
            raise ValueError(
                f"{ex.source}: mixed dataset formats: this example is {ex.kind!r} but {first.source} is "
                f"{first.kind!r}; use one format per dataset"
            )
    return examples


def split_examples(examples: Sequence, eval_fraction: float, seed: int = 0) -> tuple[list, list]:
    """Deterministic train/eval split.

    Args:
        examples: any sequence (examples, token sequences, ...).
        eval_fraction: the share held out, in ``[0, 1)``; rounded to a count, at least 1 when positive.
        seed: the split depends only on ``(seed, len(examples))``.
    Returns:
        ``(train, eval)`` lists, each in the original order.

    Example:
        >>> train, held_out = split_examples(list(range(20)), 0.1, seed=0)
        >>> len(train), held_out
        (18, [4, 19])
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"split_examples: eval_fraction must be in [0, 1), got {eval_fraction}")
    n = len(examples)
    n_eval = 0 if eval_fraction == 0 else max(1, int(round(n * eval_fraction)))
    if n_eval >= n and n_eval > 0:
        raise ValueError(f"split_examples: {n} example(s) are too few to hold out {eval_fraction:.0%} for eval")
    held = np.zeros(n, bool)
    held[np.random.default_rng([seed, _SPLIT]).permutation(n)[:n_eval]] = True
    return [e for e, h in zip(examples, held) if not h], [e for e, h in zip(examples, held) if h]


# --------------------------------------------------------------------------------------------------------------
# Tokenizing
# --------------------------------------------------------------------------------------------------------------


def _as_example(ex: Example | dict, where: str = "<memory>") -> Example:
    return ex if isinstance(ex, Example) else _detect(ex, where)


_PREFIX_CACHE: "weakref.WeakKeyDictionary[Any, list[int]]" = weakref.WeakKeyDictionary()


def _special_prefix(tokenizer) -> list[int]:
    """The ids the tokenizer puts before a text (its BOS rule), found by encoding a probe with and without
    special tokens (so an EOS the tokenizer would append is left out: examples get their EOS explicitly)."""
    try:
        return _PREFIX_CACHE[tokenizer]
    except (KeyError, TypeError):
        pass
    with_special = list(tokenizer.encode("a", add_special_tokens=True))
    core = list(tokenizer.encode("a", add_special_tokens=False))
    prefix: list[int] = []
    for k in range(len(with_special) - len(core) + 1):
        if with_special[k : k + len(core)] == core:
            prefix = with_special[:k]
            break
    try:
        _PREFIX_CACHE[tokenizer] = prefix
    except TypeError:  # pragma: no cover - objects that cannot be weakly referenced
        pass
    return prefix


def _eos(tokenizer) -> list[int]:
    return [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]


def _chat_ids_and_mask(messages: list[dict], tokenizer, where: str) -> tuple[list[int], list[int]]:
    def render(msgs, gen):
        try:
            return tokenizer.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False)
        except Exception as e:
            raise ValueError(f"{where}: the chat template failed ({type(e).__name__}: {e})") from e

    full = render(messages, False)
    enc = tokenizer.backend.encode(full, add_special_tokens=False)
    ids, offsets = list(enc.ids), list(enc.offsets)
    mask = [0] * len(ids)
    eos_ids = set(int(i) for i in tokenizer.eos_token_ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start_text, end_text = render(messages[:i], True), render(messages[: i + 1], False)
        if not (full.startswith(start_text) and full.startswith(end_text)) or len(end_text) < len(start_text):
            raise ValueError(
                f"{where}: cannot locate assistant message {i}: the chat template does not render the "
                "conversation's prefixes as prefixes of the whole (it renders earlier turns differently)"
            )
        cs, ce = len(start_text), len(end_text)
        span = [t for t, (a, b) in enumerate(offsets) if (a < ce and b > cs) or (a == b and cs <= a < ce)]
        ends = [t for t in span if ids[t] in eos_ids]
        if ends:  # stop after the end-of-turn token; what follows it is template text never generated
            span = [t for t in span if t <= ends[-1]]
        for t in span:
            mask[t] = 1
    return ids, mask


def tokenize_example(example: Example | dict, tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """Tokenizes one example and marks its target tokens (no truncation here; see `Batches`).

    Args:
        example: an `Example`, or a plain dict in one of the JSONL formats.
        tokenizer: a `jlora.tokenizer.Tokenizer` (chat examples need its chat template).
    Returns:
        ``(ids, target_mask)``: int32 and int32 arrays of equal length; ``target_mask[t] = 1`` when token t is
        trained on (predicted from the tokens before it). Text: all tokens (BOS as the tokenizer adds it, then
        EOS). Prompt/completion: ``BOS? prompt`` are 0, ``completion EOS`` are 1. Chat: each assistant
        message's tokens through its end-of-turn token are 1.

    Example:
        >>> ids, mask = tokenize_example({"prompt": "Q: 2+2?\\nA:", "completion": " 4"}, tok)
        >>> tok.decode(ids[mask == 1])
        ' 4<|im_end|>'
    """
    ex = _as_example(example)
    if ex.kind == "text":
        ids = _special_prefix(tokenizer) + list(tokenizer.encode(ex.data["text"], add_special_tokens=False))
        ids += _eos(tokenizer)
        mask = [1] * len(ids)
    elif ex.kind == "completion":
        prompt = _special_prefix(tokenizer) + list(tokenizer.encode(ex.data["prompt"], add_special_tokens=False))
        completion = list(tokenizer.encode(ex.data["completion"], add_special_tokens=False)) + _eos(tokenizer)
        ids, mask = prompt + completion, [0] * len(prompt) + [1] * len(completion)
    elif ex.kind == "chat":
        ids, mask = _chat_ids_and_mask(ex.data["messages"], tokenizer, ex.source)
    else:
        raise ValueError(f"{ex.source}: unknown example kind {ex.kind!r} (expected one of {_FORMATS})")
    return np.asarray(ids, np.int32), np.asarray(mask, np.int32)


# --------------------------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------------------------


def _fit(seqs, sources, max_len: int, overflow: str):
    """Applies the overflow policy; drops sequences with no target left. Returns (ids, masks) lists."""
    out_ids, out_masks = [], []
    long, emptied = [], []
    for n, (ids, mask) in enumerate(seqs):
        ids, mask = np.asarray(ids, np.int32), np.asarray(mask, np.int32)
        if ids.shape != mask.shape or ids.ndim != 1:
            raise ValueError(f"{sources[n]}: ids and target mask must be 1-D of equal length, got "
                             f"{ids.shape} and {mask.shape}")
        pieces = [(ids, mask)]
        if len(ids) > max_len:
            long.append(n)
            if overflow == "error":
                raise ValueError(
                    f"{sources[n]} (example {n}): {len(ids)} tokens, longer than seq_len + 1 = {max_len}; "
                    "raise seq_len, or pass overflow='truncate' or 'split'"
                )
            if overflow == "truncate":
                pieces = [(ids[:max_len], mask[:max_len])]
            else:  # split: chunks overlap by one token; that token was already a target in the chunk before
                step = max_len - 1
                pieces = []
                for s in range(0, len(ids) - 1, step):
                    c_ids, c_mask = ids[s : s + max_len], mask[s : s + max_len].copy()
                    if s:
                        c_mask[0] = 0
                    pieces.append((c_ids, c_mask))
        kept = [(i, m) for i, m in pieces if len(i) >= 2 and m[1:].any()]
        if not kept:
            emptied.append(n)
        for i, m in kept:
            out_ids.append(i)
            out_masks.append(m)
    if long and overflow == "truncate":
        warnings.warn(
            f"{len(long)} of {len(seqs)} examples are longer than seq_len + 1 = {max_len} tokens and were "
            f"truncated (first: {sources[long[0]]})",
            stacklevel=3,
        )
    if emptied:
        warnings.warn(
            f"{len(emptied)} of {len(seqs)} examples have no target token (after truncation) and were dropped "
            f"(first: {sources[emptied[0]]})",
            stacklevel=3,
        )
    if not out_ids:
        raise ValueError("no example has a target token left; nothing to train on")
    return out_ids, out_masks


def _pack(lengths: np.ndarray, order: np.ndarray, max_len: int) -> list[np.ndarray]:
    """First-fit of whole sequences (in ``order``) into rows of ``max_len`` tokens, among the last few open
    rows (a bounded window keeps it O(n) while filling rows nearly as well as full first-fit)."""
    rows: list[list[int]] = []
    room: list[int] = []
    open_rows: list[int] = []
    for s in order:
        n = int(lengths[s])
        for r in open_rows:
            if room[r] >= n:
                break
        else:
            r = len(rows)
            rows.append([])
            room.append(max_len)
            open_rows.append(r)
            if len(open_rows) > _PACK_WINDOW:
                open_rows.pop(0)
        rows[r].append(int(s))
        room[r] -= n
        if room[r] < 2:  # nothing with a target fits any more
            open_rows.remove(r)
    return [np.asarray(r, np.int64) for r in rows]


class Batches:
    """Deterministic, resumable batches over tokenized examples.

    ``batch_at(step)`` depends only on ``(seed, step)`` (and the data and options), so training resumes
    exactly from a step number: ``iterate(start_step=k)`` yields the same batches as a straight run from step
    0 does from step k. Epoch e is a permutation of the rows seeded by ``(seed, e)``.

    Attributes:
        seq_len: rows hold ``seq_len + 1`` tokens (``seq_len`` inputs and ``seq_len`` predictions).
        batch_size: rows per micro-batch across all hosts; this host gets ``batch_size // host_count``.
        accum_steps: micro-batches per step (a leading axis when > 1).
        steps_per_epoch: steps in one pass over the rows.
        num_rows: rows (packed or padded) in one epoch.
        num_sequences: token sequences after the overflow policy.
        fingerprint: a hex digest of the data and every option that changes the global batches (store it
            with a checkpoint to detect resuming on different data). The host split is not part of it: a run
            may resume with another number of processes.
    """

    def __init__(
        self,
        sequences: Sequence[tuple[Sequence[int], Sequence[int]]],
        *,
        seq_len: int,
        batch_size: int,
        seed: int = 0,
        pack: bool = True,
        overflow: str = "truncate",
        pad_id: int = 0,
        accum_steps: int = 1,
        shuffle: bool = True,
        drop_remainder: bool = True,
        host_index: int = 0,
        host_count: int = 1,
        sources: Sequence[str] | None = None,
    ):
        """Builds the rows (packing or padding) once.

        Args:
            sequences: ``(ids, target_mask)`` pairs, e.g. from `tokenize_example`.
            seq_len: rows are ``seq_len + 1`` tokens long.
            batch_size: rows per micro-batch, all hosts together.
            seed: the seed of the packing order and of every epoch's permutation.
            pack: pack several examples per row (True) or one example per row (False).
            overflow: ``"truncate"`` (warn), ``"error"`` or ``"split"``, for examples over ``seq_len + 1`` tokens.
            pad_id: the id written in padding (masked out, so any valid id works).
            accum_steps: micro-batches per step; batches get a leading ``[accum_steps]`` axis when > 1.
            shuffle: permute rows each epoch (and the packing order); False keeps the data order (evaluation).
            drop_remainder: skip an epoch's last incomplete batch (True) or fill it with empty rows (False).
            host_index, host_count: this host's slice of every micro-batch.
            sources: a name per sequence (``"file:line"``) for messages; default ``"example N"``.
        """
        if seq_len < 1 or batch_size < 1 or accum_steps < 1:
            raise ValueError(f"Batches: seq_len, batch_size and accum_steps must be >= 1, got {seq_len}, "
                             f"{batch_size}, {accum_steps}")
        if overflow not in _OVERFLOW:
            raise ValueError(f"Batches: overflow must be one of {_OVERFLOW}, got {overflow!r}")
        if host_count < 1 or not 0 <= host_index < host_count:
            raise ValueError(f"Batches: need 0 <= host_index < host_count, got {host_index}, {host_count}")
        if batch_size % host_count:
            raise ValueError(f"Batches: batch_size {batch_size} is not divisible by host_count {host_count}")
        if not len(sequences):
            raise ValueError("Batches: no sequences")
        sources = list(sources) if sources is not None else [f"example {n}" for n in range(len(sequences))]
        if len(sources) != len(sequences):
            raise ValueError(f"Batches: {len(sources)} sources for {len(sequences)} sequences")
        self.seq_len, self.batch_size, self.seed = int(seq_len), int(batch_size), int(seed)
        self.pack, self.accum_steps, self.shuffle = bool(pack), int(accum_steps), bool(shuffle)
        self.drop_remainder, self.pad_id = bool(drop_remainder), int(pad_id)
        self.host_index, self.host_count = int(host_index), int(host_count)
        self.row_len = self.seq_len + 1

        ids, masks = _fit(list(sequences), sources, self.row_len, overflow)
        self.num_sequences = len(ids)
        lengths = np.asarray([len(i) for i in ids], np.int64)
        self._starts = np.concatenate([[0], np.cumsum(lengths)])
        self._ids = np.concatenate(ids).astype(np.int32)
        self._mask = np.concatenate(masks).astype(np.int32)
        if self.pack:
            order = (np.random.default_rng([self.seed, _PACK]).permutation(len(ids)) if self.shuffle
                     else np.arange(len(ids)))
            self._rows = _pack(lengths, order, self.row_len)
        else:
            self._rows = [np.asarray([s], np.int64) for s in range(len(ids))]
        self.num_rows = len(self._rows)

        per_step = self.accum_steps * self.batch_size
        whole, rest = divmod(self.num_rows, per_step)
        self.steps_per_epoch = whole + (1 if rest and not self.drop_remainder else 0)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"Batches: {self.num_rows} row(s) are fewer than one step's accum_steps * batch_size = {per_step} "
                "rows; use a smaller batch, more data, or drop_remainder=False"
            )
        h = hashlib.sha256()
        for a in (self._ids, self._mask, self._starts):
            h.update(np.ascontiguousarray(a).tobytes())
        h.update(np.concatenate(self._rows).tobytes() + np.asarray([len(r) for r in self._rows]).tobytes())
        h.update(repr((self.seq_len, self.batch_size, self.seed, self.accum_steps, self.shuffle,
                       self.drop_remainder, self.pad_id)).encode())
        self.fingerprint = h.hexdigest()[:16]
        self._perm_cache: tuple[int, np.ndarray] | None = None

    @classmethod
    def from_examples(cls, examples: Sequence[Example | dict], tokenizer, *, seq_len: int, batch_size: int,
                      pad_id: int | None = None, **kwargs: Any) -> "Batches":
        """Tokenizes examples (`tokenize_example`) and builds `Batches` over them.

        Args:
            examples: `Example` objects (e.g. from `load_examples`) or plain format dicts.
            tokenizer: a `jlora.tokenizer.Tokenizer`.
            seq_len, batch_size: as in `Batches`.
            pad_id: padding id; default the tokenizer's pad token, else its EOS, else 0.
            **kwargs: the other `Batches` options (seed, pack, overflow, accum_steps, host_index, ...).
        Returns:
            A `Batches`.

        Example:
            >>> examples = [{"prompt": f"{i} + 1 =", "completion": f" {i + 1}"} for i in range(40)]
            >>> batches = Batches.from_examples(examples, tok, seq_len=16, batch_size=8)
            >>> batches.steps_per_epoch, batches.batch_at(0)["input_ids"].shape
            (5, (8, 17))
        """
        exs = [_as_example(e, f"example {n}") for n, e in enumerate(examples)]
        seqs = [tokenize_example(e, tokenizer) for e in exs]
        if pad_id is None:
            pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
        return cls(seqs, seq_len=seq_len, batch_size=batch_size, pad_id=pad_id,
                   sources=[e.source for e in exs], **kwargs)

    # ---- indexing ---------------------------------------------------------------------------------------------

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm_cache is None or self._perm_cache[0] != epoch:
            perm = (np.random.default_rng([self.seed, _EPOCH, epoch]).permutation(self.num_rows) if self.shuffle
                    else np.arange(self.num_rows))
            self._perm_cache = (epoch, perm)
        return self._perm_cache[1]

    def row_indices(self, step: int) -> np.ndarray:
        """The global row numbers of a step, ``[accum_steps, batch_size]``; -1 marks an empty filler row.

        Args:
            step: the step number (>= 0); epoch ``step // steps_per_epoch``.
        Returns:
            An int64 array (all hosts' rows; `batch_at` takes this host's columns).
        """
        if step < 0:
            raise ValueError(f"Batches: step must be >= 0, got {step}")
        epoch, k = divmod(int(step), self.steps_per_epoch)
        per_step = self.accum_steps * self.batch_size
        idx = self._permutation(epoch)[k * per_step : (k + 1) * per_step]
        idx = np.concatenate([idx, np.full(per_step - len(idx), -1, np.int64)])
        return idx.reshape(self.accum_steps, self.batch_size)

    def _row(self, r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ids = np.full(self.row_len, self.pad_id, np.int32)
        loss = np.zeros(self.row_len, np.int32)
        attn = np.zeros(self.row_len, np.int32)
        if r >= 0:
            at = 0
            for s in self._rows[r]:
                a, b = self._starts[s], self._starts[s + 1]
                ids[at : at + b - a] = self._ids[a:b]
                loss[at : at + b - a] = self._mask[a:b]
                at += b - a
            attn[:at] = 1
        return ids, loss, attn

    def batch_at(self, step: int) -> dict[str, np.ndarray]:
        """This host's batch of one step: a pure function of ``(seed, step)``.

        Args:
            step: the step number (>= 0), counting over epochs.
        Returns:
            ``{"input_ids", "loss_mask", "attention_mask"}``, int32 arrays ``[B, seq_len + 1]`` with
            ``B = batch_size // host_count``, or ``[accum_steps, B, seq_len + 1]`` when ``accum_steps > 1``.
        """
        b = self.batch_size // self.host_count
        idx = self.row_indices(step)[:, self.host_index * b : (self.host_index + 1) * b]
        rows = [self._row(int(r)) for r in idx.reshape(-1)]
        shape = (self.accum_steps, b, self.row_len) if self.accum_steps > 1 else (b, self.row_len)
        names = ("input_ids", "loss_mask", "attention_mask")
        return {name: np.stack([row[j] for row in rows]).reshape(shape) for j, name in enumerate(names)}

    def iterate(self, start_step: int = 0, num_steps: int | None = None) -> Iterator[tuple[int, dict]]:
        """Yields ``(step, batch_at(step))`` from ``start_step``, across epochs.

        Args:
            start_step: the first step (the restored train state's step, to resume).
            num_steps: how many steps to yield; None for endless.
        Returns:
            An iterator of ``(step, batch)``.
        """
        step = int(start_step)
        end = None if num_steps is None else step + int(num_steps)
        while end is None or step < end:
            yield step, self.batch_at(step)
            step += 1

    def __iter__(self) -> Iterator[dict]:
        """One epoch of batches from step 0 (for evaluation loops)."""
        return (batch for _, batch in self.iterate(0, self.steps_per_epoch))

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __repr__(self) -> str:
        return (f"Batches(rows={self.num_rows}, seq_len={self.seq_len}, batch_size={self.batch_size}, "
                f"accum_steps={self.accum_steps}, steps_per_epoch={self.steps_per_epoch}, pack={self.pack}, "
                f"seed={self.seed}, host={self.host_index}/{self.host_count})")


def make_batches(
    data: str | os.PathLike | Sequence[Example | dict],
    tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    eval_fraction: float = 0.0,
    eval_batch_size: int | None = None,
    seed: int = 0,
    **kwargs: Any,
) -> tuple[Batches, Batches | None]:
    """Loads, splits, tokenizes and batches a dataset in one call.

    Args:
        data: a dataset path (see `load_examples`) or a list of examples.
        tokenizer: a `jlora.tokenizer.Tokenizer`.
        seq_len, batch_size, seed: as in `Batches`.
        eval_fraction: share held out for evaluation (`split_examples`, same seed).
        eval_batch_size: rows per eval batch (default ``batch_size``).
        **kwargs: more `Batches` options for the training batches (pack, overflow, accum_steps, host_*...).
    Returns:
        ``(train, eval)``; eval is None when ``eval_fraction == 0``. Eval batches are unshuffled, keep every row
        (``drop_remainder=False``) and have no accumulation axis.

    Example:
        >>> examples = [{"prompt": f"{i} + 1 =", "completion": f" {i + 1}"} for i in range(40)]  # or a path
        >>> train, held_out = make_batches(examples, tok, seq_len=16, batch_size=8, eval_fraction=0.2)
        >>> train.steps_per_epoch, held_out.num_rows
        (4, 8)
    """
    examples = load_examples(data) if isinstance(data, (str, os.PathLike)) else list(data)
    train_ex, eval_ex = split_examples(examples, eval_fraction, seed)
    train = Batches.from_examples(train_ex, tokenizer, seq_len=seq_len, batch_size=batch_size, seed=seed, **kwargs)
    held_out = None
    if eval_ex:
        keep = {k: kwargs[k] for k in ("pack", "overflow", "pad_id", "host_index", "host_count") if k in kwargs}
        held_out = Batches.from_examples(eval_ex, tokenizer, seq_len=seq_len, batch_size=eval_batch_size or batch_size,
                                         seed=seed, shuffle=False, drop_remainder=False, **keep)
    return train, held_out
