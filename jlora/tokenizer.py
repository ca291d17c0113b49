"""Tokenizers for jlora, built on the Rust ``tokenizers`` library; no torch, no transformers.

``load_tokenizer(path)`` accepts

* a Hugging Face tokenizer/model directory: ``tokenizer.json`` (required), plus ``tokenizer_config.json`` or
  ``special_tokens_map.json`` for the special tokens and flags, a chat template from ``chat_template.jinja``
  (preferred, what transformers 5 writes) or ``tokenizer_config.json``, and extra end-of-sequence ids from
  ``generation_config.json`` / ``config.json`` when present; a path to a ``tokenizer.json`` file works too;
* a ``.gguf`` file: the tokenizer is rebuilt from the file's ``tokenizer.*`` metadata (llama.cpp key names).

Parity target: ``transformers.AutoTokenizer.from_pretrained`` on the same directory / GGUF file gives the same
ids for ``encode`` and the same text for ``decode`` and ``apply_chat_template``; the tests check this.

Decisions written down here:

* BOS/EOS insertion follows transformers 5: in a directory, ``tokenizer.json``'s post-processor alone decides
  (transformers 5 ignores ``add_bos_token``/``add_eos_token`` in ``tokenizer_config.json`` when ``tokenizer.json``
  exists). In a GGUF, the flags ``tokenizer.ggml.add_bos_token``/``add_eos_token`` decide (default: off; SmolLM2
  sets no BOS).
* A directory's pipeline is exactly its ``tokenizer.json``. transformers 5 does the same for the generic
  ``TokenizersBackend`` class (what it saves), but for a model-specific ``tokenizer_class`` (``LlamaTokenizer``,
  ``GPT2Tokenizer`` ...) it rebuilds normalizer/pre-tokenizer/decoder from the class and keeps only vocab, merges
  and post-processor from the file; these normally agree with the file, but that is not checked here.
* GGUF vocabularies are rebuilt by `jlora.convert.gguf_vocab` (its docstring lists what is supported).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

import tokenizers
from tokenizers import AddedToken

__all__ = ["Tokenizer", "load_tokenizer"]


# --------------------------------------------------------------------------------------------------------------
# The tokenizer object
# --------------------------------------------------------------------------------------------------------------


class Tokenizer:
    """A text tokenizer: a ``tokenizers.Tokenizer`` backend plus special tokens and a chat template.

    Build one with ``load_tokenizer``. The backend already contains the BOS/EOS post-processing rule, so
    ``encode(text)`` equals ``transformers``' ``tokenizer.encode(text)`` for the same files.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        extra_eos_token_ids: Iterable[int] = (),
        chat_template: str | None = None,
        clean_up_tokenization_spaces: bool = False,
        name: str = "",
    ):
        """Wraps a ready ``tokenizers.Tokenizer``.

        Args:
            backend: the ``tokenizers.Tokenizer`` (model, pre-tokenizer, post-processor and decoder set).
            bos_token, eos_token, pad_token, unk_token: the special tokens' strings, or None.
            extra_eos_token_ids: more ids that end generation (e.g. ``<|eot_id|>``), besides ``eos_token``.
            chat_template: a Jinja chat template, or None.
            clean_up_tokenization_spaces: the transformers flag; applied in ``decode`` only for non-BPE models,
                as transformers 5 does.
            name: where it was loaded from, for messages.
        """
        self.backend = backend
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.pad_token = pad_token
        self.unk_token = unk_token
        self.chat_template = chat_template
        self.name = name
        self._clean_up = clean_up_tokenization_spaces and type(backend.model).__name__ != "BPE"
        eos = [] if self.eos_token_id is None else [self.eos_token_id]
        for i in extra_eos_token_ids:
            if i is not None and int(i) not in eos:
                eos.append(int(i))
        self._eos_token_ids = tuple(eos)

    # ---- vocabulary -------------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """The number of ids, added tokens included (``len(hf_tokenizer)``)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def token_to_id(self, token: str) -> int | None:
        """The id of a token string.

        Args:
            token: a token as the vocabulary spells it (byte-level BPE spells a leading space as ``"Ġ"``).
        Returns:
            Its id, or None if it is not in the vocabulary.
        """
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """The token string of an id.

        Args:
            token_id: an id.
        Returns:
            The token as the vocabulary spells it, or None for an id out of range.
        """
        return self.backend.id_to_token(int(token_id))

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        """Id of the beginning-of-sequence token, or None."""
        return self._id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        """Id of the end-of-sequence token, or None."""
        return self._id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        """Id of the padding token, or None."""
        return self._id(self.pad_token)

    @property
    def unk_token_id(self) -> int | None:
        """Id of the unknown token, or None."""
        return self._id(self.unk_token)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Every id that should stop generation: ``eos_token_id`` first, then the model's others (``<|eot_id|>``)."""
        return self._eos_token_ids

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """``{"bos_token": ..., "eos_token": ..., "unk_token": ..., "pad_token": ...}``, the ones that are set."""
        names = {
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "unk_token": self.unk_token,
            "pad_token": self.pad_token,
        }
        return {k: v for k, v in names.items() if v is not None}

    # ---- encode / decode --------------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Text to ids.

        Args:
            text: the string to tokenize. Special tokens written in the text (``"<|im_start|>"``) become their ids.
            add_special_tokens: add BOS/EOS as the tokenizer's rule says (SmolLM2's GGUF adds none).
        Returns:
            A list of int ids.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def batch_encode(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        """Many texts to ids (in parallel in the Rust backend). No padding or truncation.

        Args:
            texts: the strings.
            add_special_tokens: as in ``encode``.
        Returns:
            One list of ids per text.
        """
        texts = list(texts)
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"batch_encode expects strings, got {type(t).__name__}")
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def __call__(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str:
        """Ids to text.

        Args:
            ids: an int, or a sequence / 1-D array (numpy or JAX) of ints.
            skip_special_tokens: drop special tokens (BOS, EOS, ``<|im_start|>`` ...) from the text.
        Returns:
            The decoded string.
        """
        text = self.backend.decode(_as_id_list(ids), skip_special_tokens=skip_special_tokens)
        return _clean_up_tokenization(text) if self._clean_up else text

    def batch_decode(self, batch: Iterable[Any], skip_special_tokens: bool = False) -> list[str]:
        """``decode`` for each row.

        Args:
            batch: an iterable of id sequences, or a 2-D array.
            skip_special_tokens: as in ``decode``.
        Returns:
            One string per row.
        """
        return [self.decode(row, skip_special_tokens=skip_special_tokens) for row in batch]

    # ---- chat -------------------------------------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        *,
        tools: list[dict] | None = None,
        documents: list[dict] | None = None,
        continue_final_message: bool = False,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> str | list[int]:
        """Renders a conversation with the chat template (Jinja, sandboxed), like transformers does.

        Note the default ``add_generation_prompt=True`` (transformers defaults to False): the usual use here is
        building a prompt to generate from. Pass False to render a finished conversation for training.

        Args:
            messages: ``[{"role": "system" | "user" | "assistant", "content": str}, ...]``. Keys whose value
                is None are dropped first, as transformers does.
            add_generation_prompt: append the header that starts the assistant's turn.
            tokenize: return ids (encoded without adding BOS/EOS, as transformers does) instead of text.
            tools, documents: passed to the template (for templates that use them).
            continue_final_message: end the text right after the last message's content (no end-of-turn
                tokens), so the model continues it. Not compatible with ``add_generation_prompt``.
            chat_template: a template to use instead of the tokenizer's.
            **kwargs: more template variables (they override the special-token variables).
        Returns:
            The rendered text, or its ids if ``tokenize``.
        """
        template = chat_template if chat_template is not None else self.chat_template
        if template is None:
            raise ValueError(
                f"{self.name or 'this tokenizer'} has no chat template (expected 'chat_template' in "
                "tokenizer_config.json, a chat_template.jinja file, or 'tokenizer.chat_template' in the GGUF); "
                "pass chat_template=..."
            )
        if not messages:
            raise ValueError("apply_chat_template: the conversation is empty")
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt are mutually exclusive")
        chat = []
        for m in messages:
            if not isinstance(m, dict):
                raise TypeError(f"chat messages must be dicts, got {m!r}")
            chat.append({k: v for k, v in m.items() if v is not None})

        tag = "CONTINUE_FINAL_MESSAGE_TAG "
        final = None
        if continue_final_message:
            final = chat[-1].get("content")
            if not isinstance(final, str):
                raise ValueError("continue_final_message needs the last message to have a string 'content'")
            chat[-1]["content"] = final + tag

        variables = {**self.special_tokens_map, **kwargs}
        text = _compile_chat_template(template).render(
            messages=chat, tools=tools, documents=documents, add_generation_prompt=add_generation_prompt, **variables
        )
        if continue_final_message:
            at = text.rfind(tag.strip())
            if at < 0 or final.strip() not in text:
                raise ValueError("continue_final_message: the template dropped the final message's content")
            text = text[:at] if text[at : at + len(tag)] == tag else text[:at].rstrip()
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def save(self, directory: str | os.PathLike) -> None:
        """Writes ``tokenizer.json``, ``tokenizer_config.json`` (special tokens, chat template) and
        ``chat_template.jinja`` into ``directory``, so that this class and ``transformers.AutoTokenizer`` load
        the same tokenizer from it.

        Args:
            directory: the destination (created if needed); existing tokenizer files there are replaced.
        """
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                  "model_max_length": 1_000_000_000_000_000_019_884_624_838_656}
        for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
            if getattr(self, name) is not None:
                config[name] = getattr(self, name)
        files = {"tokenizer.json": self.backend.to_str(pretty=True),
                 "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False)}
        if self.chat_template:
            files["chat_template.jinja"] = self.chat_template
        for name, text in files.items():
            tmp = os.path.join(directory, f".{name}.tmp-{os.getpid()}")
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, os.path.join(directory, name))

    def __repr__(self) -> str:
        return (
            f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, bos={self.bos_token!r}, "
            f"eos={self.eos_token!r}, pad={self.pad_token!r})"
        )


def _as_id_list(ids: Any) -> list[int]:
    if isinstance(ids, int) or (hasattr(ids, "ndim") and ids.ndim == 0):
        return [int(ids)]
    if hasattr(ids, "tolist"):  # numpy / jax arrays
        ids = ids.tolist()
    return [int(i) for i in ids]


def _clean_up_tokenization(text: str) -> str:
    # transformers' clean-up of spaces before punctuation and contractions (WordPiece-era decoders).
    for before, after in (
        (" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
        (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"),
    ):  # fmt: skip
        text = text.replace(before, after)
    return text


# --------------------------------------------------------------------------------------------------------------
# Chat templates
# --------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _compile_chat_template(template: str):
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        # `{% generation %}...{% endgeneration %}` marks assistant text for transformers' assistant masks;
        # here it just renders its body.
        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters; chat templates expect plain JSON.
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, "jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(template)


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------


def load_tokenizer(path: str | os.PathLike, *, gguf_pretokenizer: str = "transformers") -> Tokenizer:
    """Loads a tokenizer from a Hugging Face directory or a ``.gguf`` file.

    Args:
        path: a directory with ``tokenizer.json`` (and usually ``tokenizer_config.json``), a ``tokenizer.json``
            file, or a ``.gguf`` file with tokenizer metadata.
        gguf_pretokenizer: for GGUF files, ``"transformers"`` (default: split text exactly as
            ``AutoTokenizer.from_pretrained(dir, gguf_file=...)`` does) or ``"llama.cpp"`` (split as llama.cpp
            and the model's original ``tokenizer.json`` do; differs only for the ``smollm``/``starcoder`` families,
            see the module docstring).
    Returns:
        A ``Tokenizer``.
    Raises:
        FileNotFoundError: the path does not exist, or a directory has no ``tokenizer.json``.
        ValueError: a GGUF without tokenizer metadata or with an unsupported tokenizer model, or a file that is
            neither ``.gguf`` nor ``.json``.
    """
    if gguf_pretokenizer not in ("transformers", "llama.cpp"):
        raise ValueError(f"gguf_pretokenizer must be 'transformers' or 'llama.cpp', got {gguf_pretokenizer!r}")
    path = os.fspath(path)
    if os.path.isdir(path):
        return _load_hf_dir(path, os.path.join(path, "tokenizer.json"))
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path}: no such file or directory (expected a Hugging Face tokenizer directory with "
            "tokenizer.json, or a .gguf file)"
        )
    if path.lower().endswith(".gguf") or _has_gguf_magic(path):
        from jlora.convert.gguf_vocab import load_gguf_tokenizer  # imports this module: not at the top

        return load_gguf_tokenizer(path, gguf_pretokenizer)
    if path.lower().endswith(".json"):
        return _load_hf_dir(os.path.dirname(os.path.abspath(path)), path)
    raise ValueError(
        f"{path}: not a tokenizer source (expected a Hugging Face tokenizer directory with tokenizer.json, "
        "a tokenizer.json file, or a .gguf file)"
    )


def _has_gguf_magic(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


# ---- Hugging Face directories -------------------------------------------------------------------------------


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: could not read JSON ({e})") from e
    return data if isinstance(data, dict) else {}


def _token_str(value: Any) -> str | None:
    """A special token from a config: a string, or an AddedToken-style dict ``{"content": ...}``."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _load_hf_dir(directory: str, tokenizer_json: str) -> Tokenizer:
    if not os.path.isfile(tokenizer_json):
        present = sorted(f for f in os.listdir(directory) if f.endswith((".gguf", ".model", "vocab.json")))
        hint = f" (found {', '.join(present)}; load a .gguf by its file path)" if present else ""
        raise FileNotFoundError(
            f"{tokenizer_json}: not found; a Hugging Face tokenizer directory must contain tokenizer.json "
            f"(the fast-tokenizer file; vocab.json/merges.txt or tokenizer.model alone are not supported){hint}"
        )
    try:
        backend = tokenizers.Tokenizer.from_file(tokenizer_json)
    except Exception as e:  # the Rust side raises a bare Exception
        raise ValueError(f"{tokenizer_json}: not a valid tokenizers file ({e})") from e

    config = _read_json(os.path.join(directory, "tokenizer_config.json"))
    special_map = _read_json(os.path.join(directory, "special_tokens_map.json"))

    def special(name: str) -> str | None:
        if name in config:
            return _token_str(config[name])
        return _token_str(special_map.get(name))

    bos, eos, unk, pad = (special(n) for n in ("bos_token", "eos_token", "unk_token", "pad_token"))

    _add_named_special_tokens(backend, (bos, eos, unk, pad))

    # BOS/EOS come from tokenizer.json's post-processor alone: transformers 5 drops add_bos_token/add_eos_token
    # from tokenizer_config.json whenever tokenizer.json exists.

    chat_template = None
    jinja_file = os.path.join(directory, "chat_template.jinja")
    if os.path.isfile(jinja_file):
        with open(jinja_file, encoding="utf-8") as f:
            chat_template = f.read()
    else:
        chat_template = _pick_chat_template(config.get("chat_template"))

    extra_eos = []
    for name in ("generation_config.json", "config.json"):
        ids = _read_json(os.path.join(directory, name)).get("eos_token_id")
        extra_eos += ids if isinstance(ids, list) else [ids] if isinstance(ids, int) else []

    return Tokenizer(
        backend,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        unk_token=unk,
        extra_eos_token_ids=extra_eos,
        chat_template=chat_template,
        clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
        name=directory,
    )


def _add_named_special_tokens(backend: tokenizers.Tokenizer, named: Iterable[str | None]) -> None:
    """Makes BOS/EOS/UNK/PAD added special tokens (matched whole in text, skippable in decode), as transformers
    does for named special tokens that are not added tokens yet."""
    added = {t.content for t in backend.get_added_tokens_decoder().values()}
    new = [t for t in dict.fromkeys(named) if t is not None and t not in added]
    if new:
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in new])


def _pick_chat_template(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        return named.get("default")
    return None
