"""LoRA on a GGUF-quantized base (jlora.quant_gguf): Q4_0 / Q4_1 / Q8_0 kept quantized, against the float loader."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora import train
from jlora.quant_gguf import GGUFQuant, GGUFQuantLeaf, is_gguf_quantized

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as QT  # noqa: E402
from test_gguf import TINY, write_tiny  # noqa: E402  (tiny llama.cpp-style files, q/k rows permuted)

TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, TINY.vocab_size, (2, 9)), jnp.int32)


def _flat(tree):
    return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_gguf_quantized)[0]}


def _bytes(tree):
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))


def _tree_equal(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


@pytest.fixture(scope="module")
def q4_1(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("gguf") / "tiny-q4_1.gguf")
    write_tiny(path, qtype=QT.Q4_1)
    cfg, qp = jlora.load_pretrained(path, quantize="gguf")
    _, fp = jlora.load_pretrained(path)
    return path, cfg, qp, fp


@pytest.mark.parametrize("qtype", [QT.Q4_0, QT.Q4_1, QT.Q8_0])
def test_materialize_equals_float_loader_bitwise(tmp_path, qtype):
    path = str(tmp_path / f"tiny-{qtype.name}.gguf")
    write_tiny(path, qtype=qtype)  # every matrix (embedding and lm_head too) in qtype, norms F32
    cfg, qp = jlora.load_pretrained(path, quantize="gguf")
    _, fp = jlora.load_pretrained(path)
    q, f = _flat(qp), _flat(fp)
    assert q.keys() == f.keys()
    kinds = {k: type(v).__name__ for k, v in q.items()}
    assert kinds["['model']['embed_tokens']['embedding']"] == "GGUFQuantLeaf"
    assert kinds["['model']['layers']['0']['self_attn']['q_proj']['kernel']"] == "GGUFQuant"
    assert kinds["['lm_head']['kernel']"] == "GGUFQuant"
    assert kinds["['model']['norm']['scale']"] == "ArrayImpl" and q["['model']['norm']['scale']"].dtype == jnp.float32
    jit_mat = jax.jit(lambda w: w.materialize())
    for k, v in q.items():
        if is_gguf_quantized(v):
            assert v.qtype == qtype.name and v.shape == f[k].shape and v.dtype == jnp.float32
            # the q/k rows are un-permuted as whole block rows: the float loader's (transformers-checked) kernel
            np.testing.assert_array_equal(np.asarray(v.materialize()), np.asarray(f[k]), err_msg=k)
            np.testing.assert_array_equal(np.asarray(jit_mat(v)), np.asarray(f[k]), err_msg=k)
        else:
            np.testing.assert_array_equal(np.asarray(v), np.asarray(f[k]), err_msg=k)
    # the quantized leaves hold exactly the file's bytes (d, m and codes of each block)
    file_bytes = {t.name: int(t.n_bytes) for t in jlora.convert.gguf._open(path).tensors}
    quant_bytes = sum(_bytes(v) for v in q.values() if is_gguf_quantized(v))
    assert quant_bytes == sum(n for name, n in file_bytes.items() if not name.endswith("norm.weight"))
    # logits equal the float model's within fp32 rounding (same weights; only the matmul's summation order differs)
    a, b = np.asarray(jlora.apply(cfg, qp, TOKENS)), np.asarray(jlora.apply(cfg, fp, TOKENS))
    assert np.abs(a - b).max() <= 1e-5 * max(1.0, np.abs(b).max()), np.abs(a - b).max()


def test_matmul_dtypes_and_sharding(q4_1):
    _, _, qp, _ = q4_1
    k = qp["model"]["layers"]["0"]["mlp"]["down_proj"]["kernel"]  # [in=96, out=64]
    assert isinstance(k, GGUFQuant) and k.shape == (96, 64) and k.qs.shape == (64, 48) and k.d.dtype == jnp.float16
    x = jnp.asarray(np.random.default_rng(1).standard_normal((3, 96)), jnp.float32)
    ref = np.asarray(x) @ np.asarray(k.materialize(), np.float64)
    np.testing.assert_allclose(np.asarray(jlora.matmul(x, k)), ref, rtol=1e-5, atol=1e-5)
    y16 = jax.jit(jlora.matmul)(x.astype(jnp.bfloat16), k)
    assert y16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y16, np.float32), ref, rtol=0.05, atol=0.1)
    fits = lambda size, axes: axes if axes is not None and size % 2 == 0 else None  # noqa: E731  (a 2-way mesh)
    spec = k.shard("fsdp", "tp", fits)
    assert (spec.qs, spec.d, spec.m) == (("tp", None), ("tp", None), ("tp", None))  # 3 blocks per row: no split
    emb = qp["model"]["embed_tokens"]["embedding"]
    assert isinstance(emb, GGUFQuantLeaf) and emb.shard(("tp", "fsdp"), fits).qs == ("tp", "fsdp")
    assert jlora.param_report(qp)["total"] == TINY.num_params()


def test_lora_trains_on_gguf_base_and_its_adapter_works_on_the_float_base(q4_1, tmp_path):
    _, cfg, qp, fp = q4_1
    lcfg = jlora.LoraConfig(r=4, alpha=8, target_modules="all-linear")
    lp = jlora.lora.init(jax.random.key(1), cfg, qp, lcfg)
    labels = jlora.trainable_labels(lp)
    assert set(jax.tree_util.tree_leaves(labels)) == {"frozen", "lora_a", "lora_b"}
    n_train = jlora.param_report(lp, labels)["trainable"]
    n_lora = sum(a.a.size + a.b.size for a in jlora.lora.adapters(lp).values())
    assert n_train == n_lora
    tx = train.make_optimizer(labels, 1e-2)
    state = train.init_state(lp, tx)
    assert sum(x.size for x in jax.tree_util.tree_leaves(state.opt_state)) == 2 * n_train + 2  # LoRA factors only
    frozen_before = jax.device_get(jlora.split(lp, labels)[1])
    batch = {"input_ids": jax.random.randint(jax.random.key(7), (2, 12), 0, cfg.vocab_size)}

    # The custom VJP (dx from a re-dequantized matrix) gives the float base's LoRA gradients.
    def grads(p):
        lab = jlora.trainable_labels(p)
        tr, fr = jlora.split(p, lab)
        return jax.grad(lambda t: train.lm_loss_sum(cfg, jlora.combine(t, fr, lab), batch)[0])(tr)

    lf = jlora.lora.init(jax.random.key(1), cfg, fp, lcfg)
    for gq, gf in zip(jax.tree_util.tree_leaves(grads(lp)), jax.tree_util.tree_leaves(grads(lf))):
        np.testing.assert_allclose(np.asarray(gq), np.asarray(gf), rtol=1e-4, atol=1e-5 * np.abs(gf).max())
    jstep = jax.jit(train.make_train_step(cfg, tx, labels), donate_argnums=0)
    # No dequantized copy of the base: each matrix is a temporary of its own matmul (forward and backward).
    # Measured with one sequence of 12 tokens: 174 KB of temporaries; 356 KB when XLA hoists every dequantization
    # (jlora.kernels.dequant_matmul); the float32 kernels are 262 KB. On SmolLM2: 160 MB vs 583 MB.
    one = {"input_ids": batch["input_ids"][:1]}
    temp = jstep.lower(state, one).compile().memory_analysis().temp_size_in_bytes
    float_kernels = sum(int(np.prod(v.shape)) * 4 for v in _flat(qp).values() if isinstance(v, GGUFQuant))
    assert temp < 0.85 * float_kernels, (temp, float_kernels)
    step = jstep
    losses = []
    for _ in range(3):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert np.isfinite(losses).all() and losses[-1] < losses[0], losses
    trained = state.params
    assert _tree_equal(jlora.split(trained, labels)[1], frozen_before)  # codes and scales bitwise unchanged
    kq = trained["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]
    assert isinstance(kq.base, GGUFQuant) and kq.base.qs.dtype == jnp.uint8 and np.abs(np.asarray(kq.b)).max() > 0

    # The adapter on the float base: the float base *is* the dequantized GGUF, so only fp32 rounding differs.
    jlora.save_adapter(cfg, trained, str(tmp_path / "adapter"))
    on_float = jlora.load_adapter(cfg, fp, str(tmp_path / "adapter"))
    a, b = np.asarray(jlora.apply(cfg, trained, TOKENS)), np.asarray(jlora.apply(cfg, on_float, TOKENS))
    assert np.abs(a - b).max() <= 1e-5 * max(1.0, np.abs(b).max()), np.abs(a - b).max()

    # merge folds LoRA into the dequantized base: a plain tree shaped like the float load
    merged = jlora.merge(trained)
    assert jax.tree.structure(merged) == jax.tree.structure(fp)
    np.testing.assert_allclose(np.asarray(merged["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]),
                               np.asarray(kq.base.materialize()) + np.asarray(kq.delta()), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(merged["model"]["embed_tokens"]["embedding"]),
                                  np.asarray(fp["model"]["embed_tokens"]["embedding"]))
    np.testing.assert_allclose(np.asarray(jlora.apply(cfg, merged, TOKENS)), a, atol=1e-5 * max(1.0, np.abs(a).max()))


def test_bad_input_is_refused_clearly(q4_1, tmp_path):
    path, cfg, qp, _ = q4_1
    with pytest.raises(ValueError, match=r"full fine-tuning cannot train .*quantized base"):
        jlora.trainable_labels(qp, mode="full")
    tx = train.make_optimizer(jlora.trainable_labels(qp), 1e-3)  # auto: nothing trains; a step is refused
    with pytest.raises(ValueError, match="make_train_step: full fine-tuning cannot train"):
        train.make_train_step(cfg, tx, jlora.trainable_labels(qp))
    bad = str(tmp_path / "q5.gguf")
    write_tiny(bad, qtype=QT.Q4_1, types={"blk.1.ffn_up.weight": QT.Q5_0})
    with pytest.raises(ValueError, match=r"q5.gguf.*blk\.1\.ffn_up\.weight.*unsupported type Q5_0"):
        jlora.load_pretrained(bad, quantize="gguf")
    with pytest.raises(ValueError, match="quantize='gguf' keeps the quantized tensors of a .gguf file"):
        jlora.load_pretrained(str(tmp_path), quantize="gguf")


def test_smollm2_base_stays_about_its_file_size(smollm2, smollm2_gguf):
    cfg, fp, _ = smollm2
    _, qp = jlora.load_pretrained(smollm2_gguf, quantize="gguf")
    n_q, n_f, n_file = _bytes(qp), _bytes(fp), os.path.getsize(smollm2_gguf)
    assert n_q <= n_file and n_f > 5 * n_q, (n_q, n_f, n_file)  # 96.6 MB vs 538 MB float32 (98.4 MB file)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.29.self_attn.k_proj"):
        k = jlora.tree.get_module(qp, name)["kernel"]
        assert isinstance(k, GGUFQuant) and k.qtype == "Q4_1"
        np.testing.assert_array_equal(np.asarray(k.materialize()), np.asarray(jlora.tree.get_module(fp, name)["kernel"]))
    emb = qp["model"]["embed_tokens"]["embedding"]
    assert isinstance(emb, GGUFQuantLeaf) and emb.qtype == "Q8_0"


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_gguf_to_nf4_quantizes_as_it_reads_equal_to_quantizing_after(q4_1, quant):
    """load_pretrained(.gguf, quantize="nf4"|"int8") quantizes each matrix as it is read (no float copy of the
    whole model beside the quantized one) and gives bitwise what quantize_params gives on the float load."""
    from jlora.quant import quantize_params

    path, cfg, _, fp = q4_1
    _, streamed = jlora.load_pretrained(path, quantize=quant)
    assert _tree_equal(streamed, quantize_params(cfg, fp, quant))
    assert jax.tree_util.tree_structure(streamed) == jax.tree_util.tree_structure(quantize_params(cfg, fp, quant))
    with pytest.raises(ValueError, match="matched no linear layer"):
        jlora.load_pretrained(path, quantize={"quant": quant, "modules": ["nothing_here"]})
