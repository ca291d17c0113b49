"""Scale-out on 8 simulated CPU devices (tests/conftest.py sets ``jax_num_cpu_devices=8``): sharded (data /
fsdp / tensor) and pmapped training equal one device, shard shapes follow the rules, checkpoints move between
meshes, and bad meshes or batch sizes are refused clearly."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

import jlora
from jlora import parallel, train
from jlora import tree as T
from jlora.checkpoint import Checkpointer
from jlora.config import preset
from jlora.model import init_params
from jlora.peft import lora

STEPS = 3
B, SEQ = 8, 16

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")


def batches(cfg, n=STEPS, b=B, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids = rng.integers(0, cfg.vocab_size, (b, SEQ + 1), dtype=np.int32)
        attn = np.ones((b, SEQ + 1), np.int32)
        attn[1, -5:] = 0  # uneven token counts per row: the loss is token-weighted, not row-averaged
        attn[min(6, b - 1), -9:] = 0
        out.append({"input_ids": ids, "attention_mask": attn, "loss_mask": attn})
    return out


def make_params(cfg, method):
    params = init_params(cfg, jax.random.key(1))
    if method == "lora":
        targets = ("c_attn", "c_proj", "c_fc") if cfg.arch == "gpt2" else \
            ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
        params = lora.init(jax.random.key(2), cfg, params,
                           lora.LoraConfig(r=4, alpha=8, target_modules=targets, init=False))
    return params


def setup(cfg, method):
    params = make_params(cfg, method)
    labels = T.trainable_labels(params)
    # eps 1e-4: Adam's first steps are ~lr * sign(g), which turns float32 rounding noise in (near-)zero
    # gradients (GPT-2's key bias has an exactly-zero gradient) into lr-sized differences. The larger eps keeps
    # the comparison about the distribution, not about Adam's sign of noise.
    tx = train.make_optimizer(labels, 1e-2, weight_decay=0.01, eps=1e-4)
    return params, labels, tx


def host(tree):
    def one(x):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.asarray(jax.device_get(x))
    return jax.tree_util.tree_map(one, tree)


_REF = {}


def reference(cfg, method):
    """Losses and final params of STEPS steps on one device (cached per config)."""
    key = (cfg.name, method)
    if key not in _REF:
        params, labels, tx = setup(cfg, method)
        state = train.init_state(params, tx, 0)
        step = jax.jit(train.make_train_step(cfg, tx, labels, max_grad_norm=1.0))
        losses = []
        for b in batches(cfg):
            state, m = step(state, b)
            losses.append(float(m["loss"]))
        _REF[key] = (losses, host(state.params))
    return _REF[key]


def assert_same(losses, params, ref):
    ref_losses, ref_params = ref
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-6, atol=1e-6)
    flat_ref = jax.tree_util.tree_leaves_with_path(ref_params)
    flat = jax.tree_util.tree_leaves(params)
    assert len(flat) == len(flat_ref)
    for (path, r), x in zip(flat_ref, flat):
        np.testing.assert_allclose(x, r, rtol=1e-5, atol=1e-5, err_msg=T.path_str(path))  # atol = lr / 1000


MESHES = ["data=8", "data=2,fsdp=4", "data=2,tensor=4"]


def run_sharded(cfg, method, spec):
    """Losses, final state and state shardings of STEPS steps on the mesh ``spec``."""
    params, labels, tx = setup(cfg, method)
    mesh = parallel.make_mesh(spec)
    state, shardings = parallel.init_sharded_state(params, tx, mesh, 0)
    step = parallel.make_sharded_train_step(cfg, tx, labels, mesh, shardings, max_grad_norm=1.0)
    losses = []
    for b in batches(cfg):
        state, m = step(state, parallel.global_batch(b, mesh))
        losses.append(float(m["loss"]))
    return losses, state, shardings


@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("spec", MESHES)
def test_sharded_step_equals_one_device(spec, method):
    cfg = preset("tiny-gpt2")
    ref = reference(cfg, method)
    losses, state, shardings = run_sharded(cfg, method, spec)
    # the state keeps its layout step after step (no resharding)
    got = jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda x: x.sharding, state))
    want = jax.tree_util.tree_leaves(shardings)
    assert all(g.is_equivalent_to(w, np.ndim(x)) for g, w, x in zip(got, want, jax.tree_util.tree_leaves(state)))
    assert_same(losses, host(state.params), ref)


@pytest.mark.parametrize("spec", ["fsdp=2,tensor=4", "data=2,fsdp=2,tensor=2"])
def test_llama_lora_sharded_equals_one_device(spec):
    cfg = preset("tiny-llama")
    ref = reference(cfg, "lora")
    losses, state, _ = run_sharded(cfg, "lora", spec)
    assert_same(losses, host(state.params), ref)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_pmap_step_equals_one_device(method):
    cfg = preset("tiny-gpt2")
    ref = reference(cfg, method)
    params, labels, tx = setup(cfg, method)
    step = parallel.make_pmap_train_step(cfg, tx, labels, max_grad_norm=1.0)
    state = parallel.replicate(train.init_state(params, tx, 0))
    losses = []
    for b in batches(cfg):
        state, m = step(state, parallel.split_batch(b))
        np.testing.assert_array_equal(np.asarray(m["loss"]), float(m["loss"][0]))  # every device agrees
        losses.append(float(m["loss"][0]))
    assert_same(losses, host(parallel.unreplicate(state).params), ref)


def test_accumulation_sharded_and_pmap_equal_one_device():
    cfg = preset("tiny-gpt2")
    params, labels, tx = setup(cfg, "lora")
    b = batches(cfg, n=1, b=16)[0]
    acc = {k: v.reshape(2, 8, -1) for k, v in b.items()}
    state = train.init_state(params, tx, 0)
    ref_state, ref_m = jax.jit(train.make_train_step(cfg, tx, labels))(state, b)
    mesh = parallel.make_mesh("data=4,fsdp=2")
    s_state, sh = parallel.init_sharded_state(params, tx, mesh, 0)
    s_step = parallel.make_sharded_train_step(cfg, tx, labels, mesh, sh, accum_steps=2)
    s_state, s_m = s_step(s_state, parallel.global_batch(acc, mesh, accum_steps=2))
    p_step = parallel.make_pmap_train_step(cfg, tx, labels, accum_steps=2)
    p_state, p_m = p_step(parallel.replicate(state), parallel.split_batch(acc, accum_steps=2))
    for loss, p in ((float(s_m["loss"]), s_state.params), (float(p_m["loss"][0]), parallel.unreplicate(p_state).params)):
        np.testing.assert_allclose(loss, float(ref_m["loss"]), rtol=2e-6)
        for x, r in zip(jax.tree_util.tree_leaves(host(p)), jax.tree_util.tree_leaves(host(ref_state.params))):
            np.testing.assert_allclose(x, r, rtol=1e-5, atol=1e-5)


def test_lora_dropout_is_the_same_sharded_as_on_one_device():
    """The dropout masks are a function of the state's key, not of the layout (partitionable threefry)."""
    cfg = preset("tiny-gpt2")
    params = lora.init(jax.random.key(2), cfg, init_params(cfg, jax.random.key(1)),
                       lora.LoraConfig(r=4, alpha=8, dropout=0.3, init=False))
    labels = T.trainable_labels(params)
    tx = train.make_optimizer(labels, 1e-2, eps=1e-4)
    b = batches(cfg, n=1)[0]
    one, m1 = jax.jit(train.make_train_step(cfg, tx, labels))(train.init_state(params, tx, 0), b)
    no_drop = lora.init(jax.random.key(2), cfg, init_params(cfg, jax.random.key(1)),
                        lora.LoraConfig(r=4, alpha=8, init=False))
    labels0 = T.trainable_labels(no_drop)
    tx0 = train.make_optimizer(labels0, 1e-2, eps=1e-4)
    _, m0 = jax.jit(train.make_train_step(cfg, tx0, labels0))(train.init_state(no_drop, tx0, 0), b)
    assert abs(float(m1["loss"]) - float(m0["loss"])) > 1e-4  # dropout is active
    mesh = parallel.make_mesh("data=2,fsdp=4")
    state, sh = parallel.init_sharded_state(params, tx, mesh, 0)
    state, m8 = parallel.make_sharded_train_step(cfg, tx, labels, mesh, sh)(state, parallel.global_batch(b, mesh))
    np.testing.assert_allclose(float(m8["loss"]), float(m1["loss"]), rtol=2e-6)
    for x, r in zip(jax.tree_util.tree_leaves(host(state.params)), jax.tree_util.tree_leaves(host(one.params))):
        np.testing.assert_allclose(x, r, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Layout


def shard_shape(x):
    return x.sharding.shard_shape(x.shape)


def test_shard_shapes_follow_the_rules_and_lora_is_cosharded():
    cfg = preset("tiny-gpt2")  # d 32, ff 128, qkv 96, vocab 128
    params, labels, tx = setup(cfg, "lora")
    mesh = parallel.make_mesh("fsdp=2,tensor=4")
    state, _ = parallel.init_sharded_state(params, tx, mesh, 0)
    layer = state.params["transformer"]["h"]["0"]
    c_attn = layer["attn"]["c_attn"]["kernel"]  # column parallel: [in/fsdp, out/tensor]
    assert c_attn.base.sharding.spec == P("fsdp", "tensor") and shard_shape(c_attn.base) == (16, 24)
    assert c_attn.a.sharding.spec == P("fsdp", None) and shard_shape(c_attn.a) == (16, 4)
    assert c_attn.b.sharding.spec == P(None, "tensor") and shard_shape(c_attn.b) == (4, 24)
    assert layer["attn"]["c_attn"]["bias"].sharding.spec == P(("tensor", "fsdp"))  # [96] over 4 x 2
    proj = layer["mlp"]["c_proj"]["kernel"]  # row parallel: [in/tensor, out/fsdp]
    assert proj.base.sharding.spec == P("tensor", "fsdp") and shard_shape(proj.base) == (32, 16)
    assert proj.a.sharding.spec == P("tensor", None) and proj.b.sharding.spec == P(None, "fsdp")
    wte = state.params["transformer"]["wte"]["embedding"]  # [vocab/(tensor x fsdp), d]
    assert wte.sharding.spec == P(("tensor", "fsdp"), None) and shard_shape(wte) == (16, 32)
    assert layer["ln_1"]["scale"].sharding.spec == P("fsdp")
    # Adam moments are co-sharded with their parameter; counts replicated
    adam = state.opt_state.inner_states["lora_a"].inner_state[0]
    mu_a = adam.mu["transformer"]["h"]["0"]["attn"]["c_attn"]["kernel"].a
    assert mu_a.sharding.spec == P("fsdp", None) and shard_shape(mu_a) == (16, 4)
    nu_b = state.opt_state.inner_states["lora_b"].inner_state[0].nu["transformer"]["h"]["0"]["mlp"]["c_proj"]["kernel"].b
    assert nu_b.sharding.spec == P(None, "fsdp")
    assert adam.count.sharding.is_fully_replicated
    # frozen leaves hold no optimizer state at all
    assert all(x.size < 1000 or x.sharding.spec != P() for x in jax.tree_util.tree_leaves(state.opt_state))


def test_fused_qv_slices_and_gqa_fall_back_to_replication():
    cfg = preset("tiny-gpt2")
    params = lora.init(jax.random.key(0), cfg, init_params(cfg, jax.random.key(1)),
                       lora.LoraConfig(r=4, fused_qkv=("q", "v")))
    specs = parallel.param_specs(params, parallel.make_mesh("data=2,tensor=4"))
    k = specs["transformer"]["h"]["0"]["attn"]["c_attn"]["kernel"]
    assert k.b == P(None, "tensor")  # b [4, 64]: 64 columns split 4 ways
    specs3 = parallel.param_specs(params, parallel.make_mesh("data=1,fsdp=1,tensor=8"))
    assert specs3["transformer"]["h"]["0"]["attn"]["c_attn"]["kernel"].base == P(None, "tensor")  # 96 / 8
    llama = preset("tiny-llama")  # 2 kv heads x 16 = 32 columns
    lp = parallel.param_specs(init_params(llama, jax.random.key(0)), parallel.make_mesh("tensor=8"))
    assert lp["model"]["layers"]["0"]["self_attn"]["k_proj"]["kernel"] == P(None, "tensor")
    assert lp["model"]["layers"]["0"]["self_attn"]["o_proj"]["kernel"] == P("tensor", None)
    assert lp["lm_head"]["kernel"] == P(None, "tensor")
    odd = llama.replace(d_ff=100)  # 100 % 8 != 0: replicated along that axis
    op = parallel.param_specs(init_params(odd, jax.random.key(0)), parallel.make_mesh("tensor=8"))
    assert op["model"]["layers"]["0"]["mlp"]["up_proj"]["kernel"] == P(None, None)
    assert "self_attn.q_proj.kernel" in parallel.describe(init_params(llama, jax.random.key(0)), parallel.make_mesh("tensor=8"))


def test_fsdp_divides_param_and_optimizer_memory():
    cfg = preset("tiny-gpt2")
    params, labels, tx = setup(cfg, "full")
    per_dev = {}
    for spec in ("data=8", "data=4,fsdp=2", "fsdp=8"):
        state, _ = parallel.init_sharded_state(params, tx, parallel.make_mesh(spec), 0)
        per_dev[spec] = parallel.per_device_bytes((state.params, state.opt_state))
    total = per_dev["data=8"]
    assert total > 3 * 4 * sum(x.size for x in jax.tree_util.tree_leaves(params))  # params + mu + nu, f32
    assert per_dev["data=4,fsdp=2"] <= total / 2 * 1.01 + 64
    assert per_dev["fsdp=8"] <= total / 8 * 1.01 + 64


# ---------------------------------------------------------------------------------------------------------
# Checkpoints across meshes


@pytest.mark.parametrize("method", ["full", "lora"])
def test_checkpoint_moves_between_meshes(tmp_path, method):
    cfg = preset("tiny-gpt2")
    params, labels, tx = setup(cfg, method)
    mesh = parallel.make_mesh("data=2,fsdp=4")
    state, sh = parallel.init_sharded_state(params, tx, mesh, 0)
    step = parallel.make_sharded_train_step(cfg, tx, labels, mesh, sh)
    for b in batches(cfg, n=2):
        state, _ = step(state, parallel.global_batch(b, mesh))
    saved = host(state)
    with Checkpointer(tmp_path / "a", save_every=1) as ck:
        ck.save(2, state, labels, force=True)
    # 8 devices -> 1
    like1 = train.init_state(make_params(cfg, method), tx, 0)
    with Checkpointer(tmp_path / "a") as ck:
        one, _ = ck.restore(like_state=like1, labels=labels)
    for x, r in zip(jax.tree_util.tree_leaves(one), jax.tree_util.tree_leaves(saved)):
        assert len(x.sharding.device_set) == 1
    for x, r in zip(jax.tree_util.tree_leaves(host(one)), jax.tree_util.tree_leaves(saved)):
        np.testing.assert_array_equal(x, r)
    # 1 -> 8 on another mesh layout
    with Checkpointer(tmp_path / "b", save_every=1) as ck:
        ck.save(2, one, labels, force=True)
    mesh2 = parallel.make_mesh("data=2,tensor=4")
    like8, sh8 = parallel.init_sharded_state(make_params(cfg, method), tx, mesh2, 0)
    with Checkpointer(tmp_path / "b") as ck:
        eight, _ = ck.restore(like_state=like8, labels=labels)
    for x, l in zip(jax.tree_util.tree_leaves(eight.params), jax.tree_util.tree_leaves(like8.params)):
        assert x.sharding.is_equivalent_to(l.sharding, x.ndim)
    for x, r in zip(jax.tree_util.tree_leaves(host(eight.params)), jax.tree_util.tree_leaves(saved.params)):
        np.testing.assert_array_equal(x, r)
    # and training continues on the new mesh exactly like on one device
    step8 = parallel.make_sharded_train_step(cfg, tx, labels, mesh2, sh8)
    b = batches(cfg, n=1, seed=5)[0]
    eight, m8 = step8(eight, parallel.global_batch(b, mesh2))
    one, m1 = jax.jit(train.make_train_step(cfg, tx, labels))(one, b)
    np.testing.assert_allclose(float(m8["loss"]), float(m1["loss"]), rtol=2e-6)


def test_fit_on_a_mesh_resumes_on_one_device(tmp_path):
    """fit(mesh=...) stops at step 2; a second fit without a mesh resumes and ends where a straight
    single-device run ends."""
    from jlora.data import Batches
    from jlora.loop import FitConfig, fit

    cfg = preset("tiny-gpt2")
    rng = np.random.default_rng(0)
    seqs = [(rng.integers(1, cfg.vocab_size, SEQ + 1).tolist(), [1] * (SEQ + 1)) for _ in range(64)]
    data = Batches(seqs, seq_len=SEQ, batch_size=8, seed=0)
    fc = FitConfig(steps=4, learning_rate=1e-2, log_every=1, save_every=2, schedule="linear")
    straight = fit(cfg, make_params(cfg, "lora"), data, run_dir=str(tmp_path / "s"), fit_config=fc,
                   progress=False, log=lambda *_: None)
    part = fit(cfg, make_params(cfg, "lora"), data, run_dir=str(tmp_path / "m"), fit_config=fc, progress=False,
               stop_at=2, mesh=parallel.make_mesh("data=2,fsdp=2,tensor=2"), log=lambda *_: None)
    assert len(part.state.params["transformer"]["wte"]["embedding"].sharding.device_set) == 8
    rest = fit(cfg, make_params(cfg, "lora"), data, run_dir=str(tmp_path / "m"), fit_config=fc,
               progress=False, log=lambda *_: None)
    assert rest.resumed_from == 2
    losses = [h["loss"] for h in part.history + rest.history if "loss" in h]
    np.testing.assert_allclose(losses, [h["loss"] for h in straight.history if "loss" in h], rtol=2e-6)
    for x, r in zip(jax.tree_util.tree_leaves(host(rest.state.params)),
                    jax.tree_util.tree_leaves(host(straight.state.params))):
        np.testing.assert_allclose(x, r, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Errors


def test_bad_meshes_and_batches_are_refused_clearly():
    with pytest.raises(ValueError, match=r"needs 6 devices but 8 are available"):
        parallel.make_mesh("data=3,fsdp=2")
    with pytest.raises(ValueError, match=r"unknown axis 'model'"):
        parallel.make_mesh("model=8")
    with pytest.raises(ValueError, match=r"not of the form axis=size"):
        parallel.make_mesh("data:8")
    with pytest.raises(ValueError, match=r"at most one axis may be -1"):
        parallel.make_mesh("data=-1,fsdp=-1")
    with pytest.raises(ValueError, match=r"'tensor'=-1|does not divide"):
        parallel.make_mesh("data=3,tensor=-1")
    assert dict(parallel.make_mesh("fsdp=2,data=-1").shape) == {"data": 4, "fsdp": 2, "tensor": 1}
    assert dict(parallel.make_mesh("tensor=2", devices=jax.devices()[:2]).shape)["tensor"] == 2
    mesh = parallel.make_mesh("data=2,fsdp=4")
    cfg = preset("tiny-gpt2")
    bad = batches(cfg, n=1, b=6)[0]
    with pytest.raises(ValueError, match=r"batch size 6 .* not divisible by the data-parallel size 8 of mesh "
                                         r"data=2,fsdp=4,tensor=1"):
        parallel.global_batch(bad, mesh)
    with pytest.raises(ValueError, match=r"batch size 6 .* not divisible by the 8 devices"):
        parallel.split_batch(bad)
    # tensor parallelism alone does not split the batch: any size works
    assert parallel.global_batch(bad, parallel.make_mesh("data=2,tensor=4"), )["input_ids"].shape == (6, SEQ + 1)
