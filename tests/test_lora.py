"""LoRA as a pure tree transform: identities, round trips, selection rules, errors, and the train step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
from jlora import train
from jlora.peft.lora import LoRA


def _tree_equal(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return (jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
            and all(x.dtype == y.dtype and bool((x == y).all()) for x, y in zip(la, lb)))


@pytest.fixture(scope="module", params=["tiny-gpt2", "tiny-llama"])
def model(request):
    cfg = jlora.preset(request.param)
    return cfg, jlora.init_params(cfg, jax.random.key(0))


TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 128, (2, 9)), jnp.int32)


def _all_linear(cfg):
    return ["c_attn", "c_proj", "c_fc"] if cfg.arch == "gpt2" else ["q_proj", "k_proj", "v_proj", "o_proj",
                                                                     "gate_proj", "up_proj", "down_proj"]


def test_fresh_adapter_is_identity_and_strip_round_trips(model):
    cfg, params = model
    lp = jlora.lora.init(jax.random.key(1), cfg, params, jlora.LoraConfig(r=4, alpha=8,
                                                                          target_modules=_all_linear(cfg)))
    # B = 0 adds exact zeros; the only difference is XLA's dot merger computing x@W and x@A as one matmul
    # (another accumulation order, ~1 ulp).
    np.testing.assert_allclose(np.asarray(jlora.apply(cfg, lp, TOKENS)), np.asarray(jlora.apply(cfg, params, TOKENS)),
                               atol=1e-6, rtol=0)
    assert _tree_equal(jlora.lora.strip(lp), params)
    assert _tree_equal(jlora.merge(lp), params)  # B = 0: merge is exactly the base, same dtypes


@pytest.mark.parametrize("rslora", [False, True])
def test_merge_equals_unmerged(model, rslora):
    cfg, params = model
    lcfg = jlora.LoraConfig(r=4, alpha=16, target_modules=_all_linear(cfg), init=False, use_rslora=rslora,
                            rank_pattern={"down_proj": 2, "c_fc": 2}, alpha_pattern={"o_proj": 3.0})
    lp = jlora.lora.init(jax.random.key(1), cfg, params, lcfg)
    unmerged = np.asarray(jlora.apply(cfg, lp, TOKENS))
    assert np.abs(unmerged - np.asarray(jlora.apply(cfg, params, TOKENS))).max() > 1e-3  # the adapter does something
    merged = jlora.merge(lp)
    assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(params)
    np.testing.assert_allclose(np.asarray(jlora.apply(cfg, merged, TOKENS)), unmerged, atol=1e-5, rtol=0)


def test_scales_and_patterns():
    cfg = jlora.preset("tiny-llama")
    params = jlora.init_params(cfg, jax.random.key(0))
    lcfg = jlora.LoraConfig(r=8, alpha=16, target_modules=["q_proj", "down_proj"], rank_pattern={"down_proj": 2},
                            alpha_pattern={r"layers\.1\.self_attn\.q_proj": 4.0}, use_rslora=True)
    lp = jlora.lora.init(jax.random.key(0), cfg, params, lcfg)
    ad = jlora.lora.adapters(lp)
    assert sorted(ad) == ["model.layers.0.mlp.down_proj", "model.layers.0.self_attn.q_proj",
                          "model.layers.1.mlp.down_proj", "model.layers.1.self_attn.q_proj"]
    assert ad["model.layers.0.mlp.down_proj"].rank == 2
    assert ad["model.layers.0.mlp.down_proj"].scale == pytest.approx(16 / np.sqrt(2))
    assert ad["model.layers.0.self_attn.q_proj"].scale == pytest.approx(16 / np.sqrt(8))
    assert ad["model.layers.1.self_attn.q_proj"].scale == pytest.approx(4 / np.sqrt(8))
    # PEFT's default init: A ~ U(-1/sqrt(in), 1/sqrt(in)), B = 0
    a = np.asarray(ad["model.layers.0.self_attn.q_proj"].a)
    assert a.shape == (64, 8) and np.abs(a).max() <= 1 / 8 and np.abs(a).max() > 0.1
    assert not np.asarray(ad["model.layers.0.self_attn.q_proj"].b).any()


def test_target_selection_rules():
    cfg = jlora.preset("tiny-llama").replace(n_layers=3)
    params = jlora.init_params(cfg, jax.random.key(0))
    sel = jlora.tree.select
    assert sel(params, ["q_proj"]) == [f"model.layers.{i}.self_attn.q_proj" for i in range(3)]
    assert sel(params, ["self_attn.q_proj"]) == sel(params, ["q_proj"])
    assert sel(params, ["proj"]) == []  # suffixes are whole dotted components, as in PEFT
    assert sel(params, r".*\.(q|v)_proj") == [f"model.layers.{i}.self_attn.{m}_proj" for i in range(3) for m in "qv"]
    assert sel(params, r"q_proj") == []  # a regex must match the full name
    lp = jlora.lora.init(jax.random.key(0), cfg, params,
                         jlora.LoraConfig(r=2, target_modules=["q_proj"], layers_to_transform=[0, 2]))
    assert sorted(jlora.lora.adapters(lp)) == ["model.layers.0.self_attn.q_proj", "model.layers.2.self_attn.q_proj"]


def test_fused_qkv_slices_only_touch_q_and_v():
    cfg = jlora.preset("tiny-gpt2")
    params = jlora.init_params(cfg, jax.random.key(0))
    lp = jlora.lora.init(jax.random.key(1), cfg, params,
                         jlora.LoraConfig(r=4, alpha=8, target_modules=["c_attn"], fused_qkv=("q", "v"), init=False))
    k = jlora.lora.adapters(lp)["transformer.h.0.attn.c_attn"]
    assert k.b.shape == (4, 64) and k.slices == ((0, 32), (64, 96))
    delta = np.asarray(k.delta())
    assert not delta[:, 32:64].any() and delta[:, :32].any() and delta[:, 64:].any()
    np.testing.assert_allclose(np.asarray(jlora.apply(cfg, jlora.merge(lp), TOKENS)),
                               np.asarray(jlora.apply(cfg, lp, TOKENS)), atol=1e-5, rtol=0)


def test_bad_configs_name_the_option():
    cfg = jlora.preset("tiny-llama")
    params = jlora.init_params(cfg, jax.random.key(0))
    with pytest.raises(ValueError, match=r"LoraConfig.r must be a positive integer, got 0"):
        jlora.LoraConfig(r=0)
    with pytest.raises(ValueError, match=r"LoraConfig.init must be one of"):
        jlora.LoraConfig(init="olora")
    with pytest.raises(ValueError, match=r"matched no linear layer; available: .*q_proj"):
        jlora.lora.init(jax.random.key(0), cfg, params, jlora.LoraConfig(target_modules=["query"]))
    with pytest.raises(ValueError, match=r"fused_qkv applies to GPT-2's fused c_attn only"):
        jlora.lora.init(jax.random.key(0), cfg, params, jlora.LoraConfig(fused_qkv=("q",)))
    with pytest.raises(ValueError, match=r"rank 100 .* exceeds"):
        jlora.lora.init(jax.random.key(0), cfg, params, jlora.LoraConfig(r=100))


def test_pissa_keeps_the_function_and_merges_back():
    cfg = jlora.preset("tiny-llama")
    params = jlora.init_params(cfg, jax.random.key(0))
    lp = jlora.lora.init(jax.random.key(0), cfg, params, jlora.LoraConfig(r=4, alpha=8, init="pissa"))
    np.testing.assert_allclose(np.asarray(jlora.apply(cfg, lp, TOKENS)), np.asarray(jlora.apply(cfg, params, TOKENS)),
                               atol=1e-5)
    assert jnp.abs(jlora.lora.adapters(lp)["model.layers.0.self_attn.q_proj"].b).max() > 0


def test_labels_split_combine_and_report(model):
    cfg, params = model
    lp = jlora.lora.init(jax.random.key(1), cfg, params, jlora.LoraConfig(r=4))
    labels = jlora.trainable_labels(lp)
    trainable, frozen = jlora.split(lp, labels)
    assert _tree_equal(jlora.combine(trainable, frozen, labels), lp)
    n_train = sum(x.size for x in jax.tree_util.tree_leaves(trainable))
    n_lora = sum(k.a.size + k.b.size for k in jlora.lora.adapters(lp).values())
    assert n_train == n_lora
    rep = jlora.param_report(lp, labels)
    assert rep["trainable"] == n_lora and rep["total"] == cfg.num_params() + n_lora
    assert "trainable params: " in jlora.format_report(rep)
    full = jlora.trainable_labels(params)
    assert set(jax.tree_util.tree_leaves(full)) == {"full"}
    assert jlora.param_report(params)["total"] == cfg.num_params()
    with pytest.raises(ValueError, match="mode must be"):
        jlora.trainable_labels(params, mode="some")


def _batch(cfg, b=4, t=12, seed=0):
    ids = np.random.default_rng(seed).integers(0, cfg.vocab_size, (b, t)).astype(np.int32)
    return {"input_ids": jnp.asarray(ids)}


def test_lora_steps_freeze_base_and_count_optimizer_state(model):
    cfg, params = model
    lp = jlora.lora.init(jax.random.key(1), cfg, params, jlora.LoraConfig(r=4, alpha=8, dropout=0.1))
    labels = jlora.trainable_labels(lp)
    tx = train.make_optimizer(labels, 1e-2, weight_decay=0.01, lr_ratios={"lora_b": 4.0})
    state = train.init_state(lp, tx)
    n_train = jlora.param_report(lp, labels)["trainable"]
    assert sum(x.size for x in jax.tree_util.tree_leaves(state.opt_state)) == 2 * n_train + 2  # mu, nu (+ counts)
    frozen_before = jax.device_get(jlora.split(lp, labels)[1])
    step = jax.jit(train.make_train_step(cfg, tx, labels, max_grad_norm=1.0), donate_argnums=0)
    for i in range(3):
        state, m = step(state, _batch(cfg, seed=i))
    assert np.isfinite(float(m["loss"]))
    assert _tree_equal(jlora.split(state.params, labels)[1], frozen_before)  # bitwise
    for k in jlora.lora.adapters(state.params).values():
        assert jnp.abs(k.b).max() > 0


def test_gradient_accumulation_equals_big_batch():
    cfg = jlora.preset("tiny-llama")
    params = jlora.lora.init(jax.random.key(1), cfg, jlora.init_params(cfg, jax.random.key(0)),
                             jlora.LoraConfig(r=4, init=False))
    labels = jlora.trainable_labels(params)
    tx = train.make_optimizer(labels, 1e-3)
    batch = _batch(cfg, b=4)
    batch["loss_mask"] = jnp.asarray(np.random.default_rng(1).integers(0, 2, (4, 12)), jnp.int32)
    one = jax.jit(train.make_train_step(cfg, tx, labels))
    two = jax.jit(train.make_train_step(cfg, tx, labels, accum_steps=2))
    s1, m1 = one(train.init_state(params, tx), batch)
    s2, m2 = two(train.init_state(params, tx), jax.tree_util.tree_map(lambda x: x.reshape(2, 2, 12), batch))
    np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-6)
    for x, y in zip(jax.tree_util.tree_leaves(s1.params), jax.tree_util.tree_leaves(s2.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_same_step_overfits_tiny_dataset(method):
    cfg = jlora.preset("tiny-llama")
    params = jlora.init_params(cfg, jax.random.key(0))
    if method == "lora":
        params = jlora.lora.init(jax.random.key(1), cfg, params,
                                 jlora.LoraConfig(r=8, alpha=16, target_modules=_all_linear(cfg) + ["lm_head"]))
    labels = jlora.trainable_labels(params)
    tx = train.make_optimizer(labels, 1e-2 if method == "lora" else 3e-3)
    step = jax.jit(train.make_train_step(cfg, tx, labels), donate_argnums=0)
    state = train.init_state(params, tx)
    batch = _batch(cfg, b=2, t=16)
    losses = []
    for _ in range(60):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    assert losses[0] > 4.0 and losses[-1] < 0.5, (losses[0], losses[-1])


@pytest.mark.parametrize("vocab", [128, 100])  # 100: the loss pads the head to 128 columns
def test_label_smoothing_and_prompt_mask(vocab):
    cfg = jlora.preset("tiny-gpt2").replace(vocab_size=vocab)
    params = jlora.init_params(cfg, jax.random.key(0))
    ids = jnp.asarray([[5, 6, 7, 8, 9]], jnp.int32)
    logits = np.asarray(jlora.apply(cfg, params, ids[:, :-1]), np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, np.asarray(ids[:, 1:, None]), -1)[..., 0]
    mask = jnp.asarray([[0, 0, 1, 1, 0]])  # only tokens 7 and 8 are targets
    s, n = train.lm_loss_sum(cfg, params, {"input_ids": ids, "loss_mask": mask})
    assert float(n) == 2 and float(s) == pytest.approx(nll[0, 1] + nll[0, 2], rel=1e-5)
    s, n = train.lm_loss_sum(cfg, params, {"input_ids": ids}, label_smoothing=0.1)
    expect = 0.9 * nll + 0.1 * (-logp.mean(-1))
    assert float(s) == pytest.approx(expect.sum(), rel=1e-5)


def test_bf16_compute_keeps_fp32_trainables_and_remat_matches():
    cfg = jlora.preset("tiny-llama")
    params = jlora.lora.init(jax.random.key(1), cfg, jlora.init_params(cfg, jax.random.key(0)),
                             jlora.LoraConfig(r=4, init=False))
    labels = jlora.trainable_labels(params)
    tx = train.make_optimizer(labels, 1e-3)
    batch = _batch(cfg)
    results = {}
    for name, c in {"fp32": cfg, "remat": cfg.replace(remat=True), "bf16": cfg.replace(dtype="bfloat16")}.items():
        state, m = jax.jit(train.make_train_step(c, tx, labels))(train.init_state(params, tx), batch)
        results[name] = (state, float(m["loss"]))
    s16, loss16 = results["bf16"]
    assert {x.dtype for x in jax.tree_util.tree_leaves(jlora.split(s16.params, labels)[0])} == {jnp.dtype("float32")}
    assert abs(loss16 - results["fp32"][1]) < 0.05  # bf16 activations, same loss to bf16 precision
    s_remat, loss_remat = results["remat"]
    assert loss_remat == pytest.approx(results["fp32"][1], rel=1e-6)
    for x, y in zip(jax.tree_util.tree_leaves(s_remat.params), jax.tree_util.tree_leaves(results["fp32"][0].params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)
