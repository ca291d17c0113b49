"""Model parity with Hugging Face transformers through load_pretrained / save_pretrained (float32)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from conftest import hf_logits, make_hf_model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

CASES = {
    "gpt2": dict(kind="gpt2"),
    "llama-gqa-untied": dict(kind="llama"),
    "llama-tied-bias": dict(kind="llama", tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
                            num_key_value_heads=1, rope_theta=1234.0),
    "qwen2": dict(kind="qwen2"),
}


def _tokens(vocab, b=2, t=11, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, size=(b, t)).astype(np.int32)


@pytest.fixture(scope="module", params=sorted(CASES))
def hf_dir(request, tmp_path_factory):
    kw = dict(CASES[request.param])
    model = make_hf_model(kw.pop("kind"), **kw)
    d = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(d)
    return model, str(d)


def test_load_pretrained_matches_transformers(hf_dir):
    model, d = hf_dir
    cfg, params = jlora.load_pretrained(d)
    toks = _tokens(cfg.vocab_size)
    ours = np.asarray(jlora.apply(cfg, params, jnp.asarray(toks)))
    np.testing.assert_allclose(ours, hf_logits(model, toks), atol=1e-4, rtol=0)


def test_save_pretrained_round_trip_through_transformers(hf_dir, tmp_path):
    model, d = hf_dir
    cfg, params = jlora.load_pretrained(d)
    jlora.save_pretrained(cfg, params, tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    toks = _tokens(cfg.vocab_size, seed=1)
    np.testing.assert_allclose(hf_logits(reloaded, toks), hf_logits(model, toks), atol=1e-5, rtol=0)
    # and jlora reads its own output back bit for bit
    cfg2, params2 = jlora.load_pretrained(tmp_path)
    assert cfg2.replace(name=cfg.name) == cfg
    assert all(jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda a, b: bool((a == b).all()), params, params2)))


def test_attention_mask_left_padding_matches_unpadded(hf_dir):
    model, d = hf_dir
    cfg, params = jlora.load_pretrained(d)
    toks = _tokens(cfg.vocab_size, b=1, t=7)
    padded = np.concatenate([np.zeros((1, 3), np.int32), toks], axis=1)
    mask = np.concatenate([np.zeros((1, 3), np.int32), np.ones((1, 7), np.int32)], axis=1)
    ref = np.asarray(jlora.apply(cfg, params, jnp.asarray(toks)))
    got = np.asarray(jlora.apply(cfg, params, jnp.asarray(padded), attention_mask=jnp.asarray(mask)))
    np.testing.assert_allclose(got[:, 3:], ref, atol=1e-5, rtol=0)


def test_bf16_storage_and_fp16_file(tmp_path):
    model = make_hf_model("llama")
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    model.to(torch.float16).save_pretrained(tmp_path / "fp16")
    for sub, dt in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        cfg, params = jlora.load_pretrained(tmp_path / sub)
        ref = model.to(dt).float()
        toks = _tokens(cfg.vocab_size)
        np.testing.assert_allclose(np.asarray(jlora.apply(cfg, params, jnp.asarray(toks))), hf_logits(ref, toks),
                                   atol=1e-4, rtol=0)
    cfg, params = jlora.load_pretrained(tmp_path / "bf16", dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.bfloat16)}


def test_sharded_checkpoint_and_unprefixed_keys(tmp_path):
    model = make_hf_model("gpt2")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert os.path.exists(tmp_path / "sharded" / "model.safetensors.index.json")
    cfg, params = jlora.load_pretrained(tmp_path / "sharded")
    toks = _tokens(cfg.vocab_size)
    np.testing.assert_allclose(np.asarray(jlora.apply(cfg, params, jnp.asarray(toks))), hf_logits(model, toks),
                               atol=1e-4, rtol=0)
    # The original GPT-2 checkpoints store the base model's keys (no "transformer." prefix) plus attn buffers.
    from jlora.convert.stfile import write_safetensors

    sd = {k.removeprefix("transformer."): v.numpy() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    sd["h.0.attn.bias"] = np.ones((1, 1, 64, 64), np.float32)
    d = tmp_path / "bare"
    d.mkdir()
    write_safetensors(str(d / "model.safetensors"), sd)
    (d / "config.json").write_text(json.dumps(model.config.to_dict()))
    cfg2, params2 = jlora.load_pretrained(d)
    np.testing.assert_array_equal(np.asarray(jlora.apply(cfg2, params2, jnp.asarray(toks))),
                                  np.asarray(jlora.apply(cfg, params, jnp.asarray(toks))))
