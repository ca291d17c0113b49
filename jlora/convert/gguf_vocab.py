"""GGUF vocabularies (llama.cpp ``tokenizer.*`` metadata) -> `jlora.tokenizer.Tokenizer`.

`jlora.load_tokenizer` calls `load_gguf_tokenizer` for a ``.gguf`` path; the metadata comes from the one GGUF
reader of `jlora.convert.gguf` (`read_metadata`, cached per file), the same one that loads the weights.

Decisions written down here:

* BOS/EOS insertion: the flags ``tokenizer.ggml.add_bos_token``/``add_eos_token`` decide (default: off;
  SmolLM2 sets no BOS), as in transformers.
* GGUF ``gpt2`` (byte-level BPE) vocabularies are supported. The pre-tokenizer split is chosen from
  ``tokenizer.ggml.pre`` with the same table transformers uses (llama3, qwen2, gpt-4o, tekken families; anything
  else, e.g. SmolLM2's ``smollm``, gets plain GPT-2 byte-level splitting). With
  ``gguf_pretokenizer="llama.cpp"`` the ``smollm``/``starcoder`` families instead isolate every digit first, as
  llama.cpp and those models' original ``tokenizer.json`` do; this differs from transformers' GGUF tokenizer on
  rare inputs (e.g. ``"a  1"``: two spaces before a digit merge into one token ``"ĠĠ"`` in the original, but
  stay two tokens in transformers).
* GGUF ``llama`` (SentencePiece-style), ``t5``, ``bert`` ... vocabularies raise a ``ValueError`` naming the file;
  use the model's Hugging Face directory (with ``tokenizer.json``) for those.
"""

from __future__ import annotations

import functools

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors

from jlora.convert.gguf import read_metadata
from jlora.tokenizer import Tokenizer, _add_named_special_tokens

__all__ = ["load_gguf_tokenizer"]

# llama.cpp's token types (tokenizer.ggml.token_type).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizer splits by `tokenizer.ggml.pre` (the regexes of llama.cpp / the models' own tokenizer.json),
# the same table transformers uses; anything not listed splits with GPT-2's byte-level regex.
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_UPPER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]"
_LOWER = r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
_TEKKEN = (
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O = (
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_CONTRACTIONS}|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*{_CONTRACTIONS}"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_SPLITS = {
    **dict.fromkeys(
        ["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
         "jina-v5-nano", "dbrx", "smaug-bpe"], _LLAMA3),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"], _QWEN2),
    "qwen35": _QWEN35,
    "tekken": _TEKKEN,
    **dict.fromkeys(["gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"], _GPT4O),
}  # fmt: skip
# Families whose original tokenizer.json (and llama.cpp) isolate each digit before GPT-2 splitting.
_DIGIT_ISOLATING = {"smollm", "starcoder"}


@functools.lru_cache(maxsize=1)
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's printable spelling of each byte: printable Latin-1 bytes stand for themselves, the other 68
    bytes map to U+0100 onwards in order."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(0x100 + extra)
            extra += 1
    return table


def load_gguf_tokenizer(path: str, gguf_pretokenizer: str = "transformers") -> Tokenizer:
    """Builds a `jlora.tokenizer.Tokenizer` from the ``tokenizer.*`` metadata of a ``.gguf`` file.

    Args:
      path: the GGUF file.
      gguf_pretokenizer: ``"transformers"`` or ``"llama.cpp"`` (see the module docstring).

    Raises:
      ValueError: no tokenizer metadata, an unsupported tokenizer model, malformed merges, or a file that is
        not a valid GGUF (all naming the file).
    """
    meta = read_metadata(path)
    model_type = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if model_type is None or not tokens:
        raise ValueError(
            f"{path}: the GGUF file has no tokenizer metadata (expected 'tokenizer.ggml.model' and "
            "'tokenizer.ggml.tokens'); load the tokenizer from the model's Hugging Face directory instead"
        )
    if model_type != "gpt2":
        raise ValueError(
            f"{path}: unsupported GGUF tokenizer model {model_type!r} (tokenizer.ggml.model); jlora builds only "
            "'gpt2' (byte-level BPE) tokenizers from GGUF metadata. Load the tokenizer from the model's Hugging "
            "Face directory (tokenizer.json) instead"
        )
    token_types = list(meta.get("tokenizer.ggml.token_type") or [])
    merges_raw = meta.get("tokenizer.ggml.merges")
    if not merges_raw:
        raise ValueError(f"{path}: a 'gpt2' GGUF tokenizer needs 'tokenizer.ggml.merges', which is missing or empty")

    # Byte-level vocabularies spell every token in GPT-2's byte alphabet; a token using other characters is
    # re-spelled from its UTF-8 bytes (so it can still be produced from text).
    spelling = _byte_alphabet()
    alphabet = set(spelling.values())
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        key = tok if set(tok) <= alphabet else "".join(spelling[b] for b in tok.encode("utf-8"))
        vocab[key] = i
    merges = []
    for m in merges_raw:
        parts = m.split(" ")
        if len(parts) != 2:
            raise ValueError(f"{path}: malformed merge {m!r} in tokenizer.ggml.merges (expected 'left right')")
        merges.append((parts[0], parts[1]))

    backend = tokenizers.Tokenizer(
        models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None, fuse_unk=False, byte_fallback=False)
    )
    pre = meta.get("tokenizer.ggml.pre")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _PRE_SPLITS:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_PRE_SPLITS[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    elif gguf_pretokenizer == "llama.cpp" and pre in _DIGIT_ISOLATING:
        backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        backend.pre_tokenizer = byte_level
    backend.decoder = decoders.ByteLevel()

    # Control tokens (<|im_start|> ...) are matched whole in text and are "special" (skippable in decode);
    # user-defined ones are matched whole but are not special. A control token spelled outside the byte
    # alphabet is a mislabel in the file and is left alone.
    control = [
        AddedToken(t, special=True, normalized=False)
        for t, ty in zip(tokens, token_types)
        if ty == _CONTROL and set(t) <= alphabet
    ]
    user = [
        AddedToken(t, special=False, normalized=False)
        for t, ty in zip(tokens, token_types)
        if ty == _USER_DEFINED and t in vocab
    ]

    def token_of(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    bos, eos, unk, pad = (token_of(k) for k in ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id"))
    if control:
        backend.add_special_tokens(control)
    if user:
        backend.add_tokens(user)
    _add_named_special_tokens(backend, (bos, eos, unk, pad))

    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    backend.post_processor = _bos_eos_template(backend, bos if add_bos else None, eos if add_eos else None)

    extra_eos = [meta.get(f"tokenizer.ggml.{k}") for k in ("eot_token_id", "eom_token_id")]
    extra_eos = [i for i in extra_eos if isinstance(i, int) and 0 <= i < len(tokens)]
    return Tokenizer(
        backend,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        unk_token=unk,
        extra_eos_token_ids=extra_eos,
        chat_template=meta.get("tokenizer.chat_template"),
        name=path,
    )


def _bos_eos_template(backend: tokenizers.Tokenizer, bos: str | None, eos: str | None):
    """``[bos] $A [eos]`` (and the pair form), the post-processor transformers builds from add_bos/eos_token."""
    single = ([f"{bos}:0"] if bos else []) + ["$A:0"] + ([f"{eos}:0"] if eos else [])
    pair = single + ([f"{bos}:1"] if bos else []) + ["$B:1"] + ([f"{eos}:1"] if eos else [])
    specials = [(t, backend.token_to_id(t)) for t in dict.fromkeys(x for x in (bos, eos) if x)]
    return processors.TemplateProcessing(single=" ".join(single), pair=" ".join(pair), special_tokens=specials)
