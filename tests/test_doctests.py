"""Every `Example:` block in jlora's docstrings runs: doctest over each module of the package (one test per
module), with NORMALIZE_WHITESPACE and ELLIPSIS.

Each docstring sees its module's namespace plus these shared, small and real objects (built once):

* ``jax``, ``jnp``, ``np``, ``jlora``;
* ``key = jax.random.key(0)``, ``cfg = jlora.preset("tiny-llama")``, ``params = jlora.init_params(cfg, key)``
  (random weights) and ``lcfg = jlora.LoraConfig(r=2, alpha=4)``;
* ``tmp``: a temporary directory (a str) for the files an example writes; the examples also run with it as
  the working directory, so nothing lands in the checkout;
* ``tok``: a tiny character-level `jlora.Tokenizer` (128 ids, as ``cfg``) with a ChatML chat template and
  ``<|im_end|>`` (id 0, ``cfg``'s EOS) as its EOS;
* ``gguf_path``: ``params`` written as a llama.cpp GGUF file (F32), for the examples that load one.
"""

import doctest
import importlib
import os
import pkgutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora

MODULES = sorted(m.name for m in pkgutil.walk_packages(jlora.__path__, "jlora."))
OPTIONS = doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_tokenizer(vocab_size: int = 128) -> jlora.Tokenizer:
    """One id per character (printable ASCII, newline, then Latin-1 letters to fill ``vocab_size``)."""
    import tokenizers
    from tokenizers import Regex, decoders, models, pre_tokenizers

    special = ["<|im_end|>", "<|im_start|>", "<pad>"]
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    chars += [chr(0xC0 + i) for i in range(vocab_size - len(special) - len(chars))]
    backend = tokenizers.Tokenizer(models.WordLevel({t: i for i, t in enumerate(special + chars)}, unk_token="?"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(special)
    return jlora.Tokenizer(backend, eos_token="<|im_end|>", pad_token="<pad>", chat_template=CHAT_TEMPLATE,
                           name="tiny-chars")


def write_gguf(path, cfg, params) -> str:
    """``params`` as llama.cpp stores them (F32): GGUF names, [out, in] rows, q/k rows permuted for RoPE."""
    gguf = pytest.importorskip("gguf")
    from jlora.convert.gguf import key_table

    w = gguf.GGUFWriter(str(path), "llama")
    for k, v in {"context_length": cfg.max_positions, "embedding_length": cfg.d_model, "block_count": cfg.n_layers,
                 "feed_forward_length": cfg.d_ff, "attention.head_count": cfg.n_heads,
                 "attention.head_count_kv": cfg.kv_heads}.items():
        w.add_uint32(f"llama.{k}", v)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", cfg.norm_eps)
    w.add_float32("llama.rope.freq_base", cfg.rope_theta)
    w.add_name(cfg.name)
    w.add_eos_token_id(cfg.eos_token_id)
    hd = cfg.dim_head
    for entry in key_table(cfg):
        x = params
        for k in entry.path:
            x = x[k]
        x = np.asarray(x, np.float32)
        if entry.rope_heads is not None:  # jlora [in, (head, 2, half)] -> GGUF rows (head, half, 2)
            x = x.reshape(-1, entry.rope_heads, 2, hd // 2).transpose(1, 3, 2, 0).reshape(-1, x.shape[0])
        elif entry.transpose:
            x = x.T
        w.add_tensor(entry.gguf_name, np.ascontiguousarray(x))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


@pytest.fixture(scope="session")
def shared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("doctest")
    cfg = jlora.preset("tiny-llama")
    key = jax.random.key(0)
    params = jlora.init_params(cfg, key)
    return {"jax": jax, "jnp": jnp, "np": np, "jlora": jlora, "key": key, "cfg": cfg, "params": params,
            "lcfg": jlora.LoraConfig(r=2, alpha=4), "tmp": str(tmp), "tok": tiny_tokenizer(cfg.vocab_size),
            "gguf_path": write_gguf(tmp / "tiny-llama.gguf", cfg, params)}


def _doctests(name):
    tests = doctest.DocTestFinder(exclude_empty=True).find(importlib.import_module(name), name)
    return [t for t in tests if t.examples]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name, shared, monkeypatch):
    tests = _doctests(name)
    if not tests:
        pytest.skip("no examples")
    monkeypatch.chdir(shared["tmp"])
    module = importlib.import_module(name)
    runner = doctest.DocTestRunner(optionflags=OPTIONS)
    report = []
    for t in tests:
        t.globs = {**vars(module), **shared}  # a fresh namespace per docstring
        runner.run(t, out=report.append)
    assert runner.failures == 0, "".join(report)


def test_every_example_block_is_a_doctest():
    """An ``Example:`` section must hold ``>>>`` lines, or it would silently not run."""
    missing = []
    for name in MODULES:
        for t in doctest.DocTestFinder(exclude_empty=True).find(importlib.import_module(name), name):
            if "Example:" in t.docstring and not t.examples:
                missing.append(f"{t.name} ({os.path.relpath(t.filename)}:{t.lineno})")
    assert not missing, missing


def test_gguf_fixture_round_trips(shared):
    """The shared GGUF file really holds ``params`` (so the GGUF examples show what loading a file gives). Runs
    after the examples, so it also checks that none of them freed the shared arrays (e.g. by donating them)."""
    from jlora.convert.gguf import load_gguf

    cfg, params = load_gguf(shared["gguf_path"])
    assert (cfg.n_layers, cfg.vocab_size, cfg.kv_heads) == (2, 128, 2)
    jax.tree.map(np.testing.assert_array_equal, params, shared["params"])
