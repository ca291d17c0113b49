"""GGUF loading: the real SmolLM2 file against transformers, block dequantization, tiny written files, errors."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora.model
from jlora.config import ModelConfig, preset
from jlora.convert.gguf import _open, dequantize, load_gguf

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as QT  # noqa: E402

SMOLLM2_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


# ----------------------------------------------------------------------------------------------------------
# The real model against transformers


# The `smollm2` fixture (jlora and transformers loads of the real GGUF) is session-scoped in conftest.py.


def test_smollm2_config_matches_preset(smollm2):
    cfg, params, _ = smollm2
    assert cfg.replace(name="smollm2-135m") == preset("smollm2-135m")
    jlora.model.check_params(cfg, params, "smollm2")
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(params))


def test_smollm2_logits_match_transformers(smollm2):
    import torch

    cfg, params, hf = smollm2
    toks = np.array([[1, 504, 3458, 282, 4649, 314, 253, 1345, 28, 30],
                     [2, 17, 9000, 100, 49151, 0, 5, 7, 33, 12000]], np.int32)
    ours = np.asarray(jlora.model.apply(cfg, params, jnp.asarray(toks)))
    with torch.no_grad():
        ref = hf(torch.from_numpy(toks.astype(np.int64))).logits.float().numpy()
    assert ours.shape == ref.shape == (2, 10, 49152)
    assert np.abs(ours - ref).max() < 1e-3


def test_smollm2_weights_equal_transformers(smollm2):
    """The dequantized and un-permuted q/k kernels are bit-identical to what transformers loads."""
    cfg, params, hf = smollm2
    sd = hf.state_dict()
    for i in (0, 29):
        layer = params["model"]["layers"][str(i)]
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            ref = sd[f"model.layers.{i}.self_attn.{name}.weight"].numpy().T
            np.testing.assert_array_equal(np.asarray(layer["self_attn"][name]["kernel"]), ref)
    np.testing.assert_array_equal(np.asarray(params["model"]["embed_tokens"]["embedding"]),
                                  sd["model.embed_tokens.weight"].numpy())


# ----------------------------------------------------------------------------------------------------------
# Dequantization of hand-built blocks


def _f16_bytes(x):
    return np.array([x], np.float16).view(np.uint8)


def test_dequantize_q8_0_exact():
    q = np.arange(-16, 16, dtype=np.int8)
    blocks = [np.concatenate([_f16_bytes(0.5), q.view(np.uint8)]),
              np.concatenate([_f16_bytes(-2.0), q[::-1].copy().view(np.uint8)])]
    out = dequantize(np.concatenate(blocks), "Q8_0", (1, 64))
    np.testing.assert_array_equal(out[0, :32], 0.5 * np.arange(-16, 16))
    np.testing.assert_array_equal(out[0, 32:], -2.0 * np.arange(-16, 16)[::-1])
    assert out.dtype == np.float32


def _packed(lo, hi):
    return (np.asarray(lo, np.uint8) | (np.asarray(hi, np.uint8) << 4)).astype(np.uint8)


def test_dequantize_q4_0_exact():
    j = np.arange(16)
    block = np.concatenate([_f16_bytes(0.25), _packed(j, 15 - j)])
    out = dequantize(np.concatenate([block, block]), "Q4_0", (2, 32))
    expect = 0.25 * (np.concatenate([j, 15 - j]) - 8)  # low nibbles are values 0..15, high nibbles 16..31
    np.testing.assert_array_equal(out, np.stack([expect, expect]))


def test_dequantize_q4_1_exact():
    j = np.arange(16)
    block = np.concatenate([_f16_bytes(0.5), _f16_bytes(-2.0), _packed(j, 15 - j)])
    out = dequantize(block, "Q4_1", (32,))
    np.testing.assert_array_equal(out, 0.5 * np.concatenate([j, 15 - j]) - 2.0)


def test_dequantize_plain_types():
    x = np.array([[1.5, -2.25, 3e-3, 65504.0]], np.float32)
    np.testing.assert_array_equal(dequantize(x, "F32", (1, 4)), x)
    np.testing.assert_array_equal(dequantize(x.astype(np.float16), "F16", (4,)), x.astype(np.float16)[0])
    bf = (x.view(np.uint32) >> 16).astype(np.uint16)  # truncation of a float32 is a valid bfloat16
    np.testing.assert_array_equal(dequantize(bf, "BF16", (1, 4)), (bf.astype(np.uint32) << 16).view(np.float32))


@pytest.mark.parametrize("qtype", [QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.BF16], ids=lambda t: t.name)
def test_dequantize_matches_gguf_reference(qtype):
    x = np.random.default_rng(0).normal(size=(8, 96)).astype(np.float32)
    packed = gguf.quants.quantize(x, qtype)
    ours = dequantize(packed, qtype.name, x.shape)
    np.testing.assert_array_equal(ours, gguf.quants.dequantize(packed, qtype))
    assert np.abs(ours - x).max() < 0.35  # and it is an approximation of the input


def test_dequantize_rejects_bad_sizes():
    with pytest.raises(ValueError, match="block size"):
        dequantize(np.zeros(34, np.uint8), "Q8_0", (16,))
    with pytest.raises(ValueError, match="needs 68 bytes"):
        dequantize(np.zeros(34, np.uint8), "Q8_0", (64,))
    with pytest.raises(ValueError, match="Q4_K"):
        dequantize(np.zeros(144, np.uint8), "Q4_K", (256,))


# ----------------------------------------------------------------------------------------------------------
# Tiny GGUF files written in the test

TINY = ModelConfig(arch="llama", vocab_size=64, max_positions=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                   d_ff=96, norm_eps=1e-5, rope_theta=500000.0, tie_embeddings=False, bos_token_id=1,
                   eos_token_id=2, pad_token_id=0, name="tiny-gguf")

# Written independently of jlora.convert.gguf: GGUF name -> (jlora module path, HF layout is [out, in]).
_LAYER = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
          "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
          "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def _llamacpp_permute(w, heads):
    """What llama.cpp's converter does to HF q/k rows: within a head, halves (j, j + D/2) -> pairs (2j, 2j + 1)."""
    hd = w.shape[0] // heads
    return w.reshape((heads, 2, hd // 2) + w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_tensors(cfg, seed=0):
    """Random weights in Hugging Face layout, keyed by GGUF name, with the jlora path of each."""
    rng = np.random.default_rng(seed)
    d, f, hd = cfg.d_model, cfg.d_ff, cfg.dim_head
    q, kv = cfg.n_heads * hd, cfg.kv_heads * hd
    shapes = {"attn_norm": (d,), "ffn_norm": (d,), "attn_q": (q, d), "attn_k": (kv, d), "attn_v": (kv, d),
              "attn_output": (d, q), "ffn_gate": (f, d), "ffn_up": (f, d), "ffn_down": (d, f)}
    out = {"token_embd.weight": (rng.normal(size=(cfg.vocab_size, d)), "model.embed_tokens.embedding"),
           "output_norm.weight": (1 + 0.1 * rng.normal(size=(d,)), "model.norm.scale")}
    if not cfg.tie_embeddings:
        out["output.weight"] = (0.2 * rng.normal(size=(cfg.vocab_size, d)), "lm_head.kernel")
    for i in range(cfg.n_layers):
        for g, shape in shapes.items():
            leaf = "scale" if g.endswith("norm") else "kernel"
            w = 1 + 0.1 * rng.normal(size=shape) if leaf == "scale" else 0.2 * rng.normal(size=shape)
            out[f"blk.{i}.{g}.weight"] = (w, f"model.layers.{i}.{_LAYER[g]}.{leaf}")
        if cfg.attn_bias:
            for g, n in (("attn_q", q), ("attn_k", kv), ("attn_v", kv)):
                out[f"blk.{i}.{g}.bias"] = (rng.normal(size=(n,)), f"model.layers.{i}.{_LAYER[g]}.bias")
    return {k: (w.astype(np.float32), p) for k, (w, p) in out.items()}


def write_tiny(path, cfg=TINY, qtype=QT.F32, types=None, arch="llama", drop=(), replace=None, extra=None,
               meta_drop=(), seed=0):
    """Writes a tiny Llama GGUF as llama.cpp would; returns the expected jlora tree (flat path -> array).

    ``qtype`` applies to every matrix (``types`` overrides per tensor); norms stay F32 as llama.cpp keeps them.
    """
    w = gguf.GGUFWriter(str(path), arch)
    meta = {"context_length": cfg.max_positions, "embedding_length": cfg.d_model, "block_count": cfg.n_layers,
            "feed_forward_length": cfg.d_ff, "attention.head_count": cfg.n_heads,
            "attention.head_count_kv": cfg.kv_heads}
    for k, v in meta.items():
        if k not in meta_drop:
            w.add_uint32(f"{arch}.{k}", v)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", cfg.norm_eps)
    w.add_float32(f"{arch}.rope.freq_base", cfg.rope_theta)
    w.add_name(cfg.name)
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id)
    w.add_pad_token_id(cfg.pad_token_id)
    w.add_token_list([f"t{i}" for i in range(cfg.vocab_size)])
    expected = {}
    for name, (hf, jpath) in _hf_tensors(cfg, seed).items():
        if name in drop:
            continue
        if replace and name in replace:
            hf = replace[name]
        t = (types or {}).get(name, QT.F32 if hf.ndim == 1 else qtype)
        stored = hf
        if ".attn_q." in name:
            stored = _llamacpp_permute(hf, cfg.n_heads)
        elif ".attn_k." in name:
            stored = _llamacpp_permute(hf, cfg.kv_heads)
        if t == QT.F32:
            w.add_tensor(name, stored)
            dq = hf
        elif t == QT.F16:
            w.add_tensor(name, stored.astype(np.float16))
            dq = hf.astype(np.float16).astype(np.float32)
        else:  # block formats quantize rows independently, so row permutation commutes with quantization
            w.add_tensor(name, gguf.quants.quantize(stored, t), raw_dtype=t)
            dq = gguf.quants.dequantize(gguf.quants.quantize(hf, t), t)
        expected[jpath] = dq.T if jpath.endswith("kernel") else dq
    for name, arr in (extra or {}).items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


def _flat(params):
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    return {".".join(k.key for k in p): np.asarray(v) for p, v in leaves}


@pytest.mark.parametrize("qtype", [QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1], ids=lambda t: t.name)
def test_tiny_gguf_loads_exactly(tmp_path, qtype):
    path = tmp_path / "tiny.gguf"
    expected = write_tiny(path, qtype=qtype)
    cfg, params = load_gguf(path)
    assert cfg == TINY
    jlora.model.check_params(cfg, params)
    got = _flat(params)
    assert set(got) == set(expected)
    for k, v in expected.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)


def test_tiny_gguf_mixed_types_tied_bf16(tmp_path):
    cfg = TINY.replace(tie_embeddings=True, n_kv_heads=1)
    path = tmp_path / "tiny.gguf"
    types = {"token_embd.weight": QT.Q8_0, "blk.0.attn_q.weight": QT.F16, "blk.1.attn_k.weight": QT.Q4_1,
             "blk.1.ffn_down.weight": QT.Q4_0}
    expected = write_tiny(path, cfg=cfg, qtype=QT.Q8_0, types=types)
    loaded_cfg, params = load_gguf(path, dtype=jnp.bfloat16)
    assert loaded_cfg == cfg and "lm_head" not in params
    got = _flat(params)
    for k, v in expected.items():
        assert got[k].dtype == jnp.bfloat16
        np.testing.assert_array_equal(got[k], v.astype(jnp.bfloat16), err_msg=k)
    logits = jlora.model.apply(loaded_cfg, params, jnp.arange(6, dtype=jnp.int32)[None])
    assert logits.shape == (1, 6, cfg.vocab_size) and bool(jnp.isfinite(logits).all())


def test_tiny_gguf_qk_biases_are_unpermuted(tmp_path):
    cfg = TINY.replace(attn_bias=True)
    expected = write_tiny(tmp_path / "bias.gguf", cfg=cfg, qtype=QT.Q8_0)
    loaded_cfg, params = load_gguf(tmp_path / "bias.gguf")
    assert loaded_cfg == cfg
    got = _flat(params)
    assert set(got) == set(expected)
    for k, v in expected.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)


def test_tiny_gguf_matches_transformers(tmp_path):
    """transformers reads the test's tiny file to the same weights and logits (checks the test's permutation)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    expected = write_tiny(tmp_path / "tiny.gguf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf", dtype=torch.float32)
    np.testing.assert_array_equal(hf.state_dict()["model.layers.1.self_attn.k_proj.weight"].numpy().T,
                                  expected["model.layers.1.self_attn.k_proj.kernel"])
    cfg, params = load_gguf(tmp_path / "tiny.gguf")
    toks = np.array([[3, 1, 4, 1, 5, 9, 2, 6]], np.int32)
    with torch.no_grad():
        ref = hf.eval()(torch.from_numpy(toks.astype(np.int64))).logits.numpy()
    np.testing.assert_allclose(np.asarray(jlora.model.apply(cfg, params, jnp.asarray(toks))), ref, atol=1e-4)


# ----------------------------------------------------------------------------------------------------------
# Errors name the file (and the tensor)


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_tiny(path)
    return path


def test_fast_reader_reads_what_gguf_reader_reads(tiny_file):
    fast, stock = _open(str(tiny_file)), _open(str(tiny_file), fast=False)
    assert type(fast) is not type(stock)
    assert list(fast.fields) == list(stock.fields)
    for k in stock.fields:
        assert fast.fields[k].contents() == stock.fields[k].contents(), k
    assert [(t.name, t.tensor_type, list(t.shape), t.data_offset) for t in fast.tensors] == \
           [(t.name, t.tensor_type, list(t.shape), t.data_offset) for t in stock.tensors]
    for a, b in zip(fast.tensors, stock.tensors):
        np.testing.assert_array_equal(np.asarray(a.data), np.asarray(b.data))


@pytest.mark.parametrize("frac", [0.0, 0.001, 0.01, 0.05, 0.5, 0.999])
def test_truncated_file(tiny_file, tmp_path, frac):
    data = tiny_file.read_bytes()
    n = min(int(len(data) * frac), len(data) - 1)
    bad = tmp_path / "truncated.gguf"
    bad.write_bytes(data[:n])
    with pytest.raises(ValueError, match="truncated.gguf"):
        load_gguf(bad)


def test_corrupt_magic(tiny_file, tmp_path):
    bad = tmp_path / "corrupt.gguf"
    bad.write_bytes(b"GGML" + tiny_file.read_bytes()[4:])
    with pytest.raises(ValueError, match="corrupt.gguf.*not a valid GGUF"):
        load_gguf(bad)


def test_other_architecture(tmp_path):
    path = tmp_path / "gpt2.gguf"
    write_tiny(path, arch="gpt2")
    with pytest.raises(ValueError, match="gpt2.gguf.*architecture 'gpt2' is not supported"):
        load_gguf(path)


def test_unsupported_tensor_type(tmp_path):
    path = tmp_path / "q5.gguf"
    write_tiny(path, types={"blk.1.ffn_up.weight": QT.Q5_0})
    with pytest.raises(ValueError, match=r"q5.gguf.*blk\.1\.ffn_up\.weight.*unsupported type Q5_0"):
        load_gguf(path)


def test_missing_tensor(tmp_path):
    path = tmp_path / "missing.gguf"
    write_tiny(path, drop=("blk.1.attn_v.weight",))
    with pytest.raises(ValueError, match=r"missing.gguf.*missing tensor blk\.1\.attn_v\.weight"):
        load_gguf(path)


def test_misshaped_tensor(tmp_path):
    path = tmp_path / "shape.gguf"
    write_tiny(path, replace={"blk.0.attn_k.weight": np.zeros((64, 64), np.float32)})
    with pytest.raises(ValueError, match=r"shape.gguf.*blk\.0\.attn_k\.weight has GGUF shape \[64, 64\], "
                                         r"expected \[64, 32\]"):
        load_gguf(path)


def test_unexpected_tensor(tmp_path):
    path = tmp_path / "extra.gguf"
    write_tiny(path, extra={"blk.0.attn_sinks.weight": np.zeros(4, np.float32)})
    with pytest.raises(ValueError, match=r"extra.gguf.*unexpected tensor blk\.0\.attn_sinks\.weight"):
        load_gguf(path)


def test_missing_metadata(tmp_path):
    path = tmp_path / "meta.gguf"
    write_tiny(path, meta_drop=("block_count",))
    with pytest.raises(ValueError, match="meta.gguf.*llama.block_count"):
        load_gguf(path)
