"""DoRA (PEFT's ``use_dora=True``) as its own kernel wrapper: parity with the real `peft` library both ways, the
gradient (the column norm carries none), merge, training, resume, sharding, and strictness."""

import copy
import json
import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

peft = pytest.importorskip("peft")
torch = pytest.importorskip("torch")

import jlora  # noqa: E402
from conftest import hf_logits  # noqa: E402
from jlora import loop, parallel  # noqa: E402
from jlora import tree as T  # noqa: E402
from jlora.convert.peft_dora import DORA_CODEC  # noqa: E402
from jlora.convert.peft_lora import LORA_CODEC  # noqa: E402
from jlora.convert.stfile import SafetensorsFile, write_safetensors  # noqa: E402
from jlora.data import Batches  # noqa: E402
from jlora.peft import base as B  # noqa: E402
from jlora.peft import dora  # noqa: E402
from jlora.peft.dora import DoRA, DoraConfig  # noqa: E402
from jlora.peft.lora import LoRA  # noqa: E402

TOKENS = np.random.default_rng(0).integers(0, 128, (2, 7)).astype(np.int32)
MAG = "lora_magnitude_vector"

# PEFT configs per architecture: (a) plain, (b) rsLoRA with rank/alpha patterns over attention and MLP (and the
# untied Llama head), (c) layers_to_transform with dropout. Llama has GQA: k/v project to 32 columns, q to 64.
CONFIGS = {
    "gpt2": {
        "a": dict(r=4, lora_alpha=8, target_modules=["c_attn"]),
        "b": dict(r=4, lora_alpha=16, use_rslora=True, target_modules=["c_attn", "c_proj", "c_fc"],
                  rank_pattern={"c_fc": 2, r"h\.1\.attn\.c_proj": 3},
                  alpha_pattern={"c_proj": 5, "h.0.attn.c_attn": 7.5}),
    },
    "llama": {
        "a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"]),
        "b": dict(r=8, lora_alpha=16, use_rslora=True,
                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                                  "lm_head"],
                  rank_pattern={"down_proj": 2, r"layers\.1\.self_attn\.q_proj": 6},
                  alpha_pattern={"o_proj": 3, "gate_proj": 7.5, "lm_head": 4}),
        "c": dict(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"], layers_to_transform=[1], lora_dropout=0.1),
    },
}


def _tree_equal(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return (jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
            and all(x.dtype == y.dtype and x.shape == y.shape and bool((x == y).all()) for x, y in zip(la, lb)))


def _logits(cfg, params):
    return np.asarray(jlora.apply(cfg, params, TOKENS))


def _peft_dora(hf, out_dir, **kw):
    """A real PEFT DoRA adapter with random A and B and a perturbed magnitude, saved to out_dir."""
    torch.manual_seed(0)
    pm = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(init_lora_weights=False, use_dora=True, **kw))
    with torch.no_grad():  # trained-looking magnitudes (at init m = ||W + scale * B A||, which hides m's role)
        for n, p in pm.named_parameters():
            if MAG in n:
                p.mul_(1 + 0.2 * torch.randn_like(p))
    pm.eval()
    pm.save_pretrained(out_dir)
    return pm


@pytest.fixture(scope="module")
def peft_adapters(models, tmp_path_factory):
    """{(kind, name): (peft model, adapter dir)}, built once."""
    out = {}
    for kind, confs in CONFIGS.items():
        for name, kw in confs.items():
            d = tmp_path_factory.mktemp(f"peft-{kind}-{name}")
            out[kind, name] = (_peft_dora(models[kind][0], d, **kw), d)
    return out


def _peft_load_clean(hf, adapter_dir, caplog):
    """PeftModel.from_pretrained with no warning at all, and a second load whose result lists no missing or
    unexpected keys."""
    caplog.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf), adapter_dir)
    user = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert not user, user
    assert not [r for r in caplog.records if r.levelname in ("WARNING", "ERROR")], caplog.text
    res = pm.load_adapter(adapter_dir, adapter_name="again")
    assert not res.missing_keys and not res.unexpected_keys, res
    pm.set_adapter("default")
    return pm.eval()


def _jitter(params, seed=0):
    """Every DoRA leaf (a, b, m) multiplied by 1 + 0.3 * noise, on the host (no new XLA programs)."""
    rng = np.random.default_rng(seed)

    def j(x):
        x = np.asarray(x)
        return jnp.asarray((x * (1 + 0.3 * rng.standard_normal(x.shape))).astype(x.dtype))

    return T.replace_modules(params, {n: ad.replace(a=j(ad.a), b=j(ad.b), m=j(ad.m))
                                      for n, ad in dora.adapters(params).items()})


# ----------------------------------------------------------------------------------------------------------
# Against real PEFT


@pytest.mark.parametrize("kind,name", [(k, n) for k in CONFIGS for n in CONFIGS[k]])
def test_both_directions_match_peft(models, peft_adapters, kind, name, tmp_path, caplog):
    hf, cfg, base = models[kind]
    pm, pdir = peft_adapters[kind, name]

    # PEFT -> jlora: loads as DoRA, never as LoRA
    lp = jlora.load_adapter(cfg, base, pdir)
    ads = dora.adapters(lp)
    assert not jlora.lora.adapters(lp)
    assert {f"base_model.model.{n}.lora_A" for n in ads} == {n for n, _ in pm.named_modules() if n.endswith(".lora_A")}
    ref = hf_logits(pm, TOKENS)
    assert np.abs(ref - hf_logits(hf, TOKENS)).max() > 1e-2  # the adapter does something
    np.testing.assert_allclose(_logits(cfg, lp), ref, atol=1e-4, rtol=0)
    if name == "c":
        assert {ad.dropout for ad in ads.values()} == {0.1}

    # jlora -> PEFT: other factors and magnitudes (jlora's own), config derived from the wrappers
    with open(pdir / "adapter_config.json") as f:
        dcfg = jlora.convert.peft.config_from_peft(json.load(f))
    assert type(dcfg) is DoraConfig
    jp = _jitter(lp)
    out = _logits(cfg, jp)
    jlora.save_adapter(cfg, jp, tmp_path / "jlora")
    with open(tmp_path / "jlora" / "adapter_config.json") as f:
        assert json.load(f)["use_dora"] is True
    pm2 = _peft_load_clean(hf, tmp_path / "jlora", caplog)
    np.testing.assert_allclose(hf_logits(pm2, TOKENS), out, atol=1e-4, rtol=0)
    assert _tree_equal(jlora.load_adapter(cfg, base, tmp_path / "jlora"), jp)  # bitwise round trip

    if (kind, name) == ("llama", "b"):  # with the config its spelling (patterns as written) is kept, PEFT agrees
        jlora.save_adapter(cfg, jp, tmp_path / "jlora-cfg", dcfg)
        with open(tmp_path / "jlora-cfg" / "adapter_config.json") as f:
            saved = json.load(f)
        assert saved["rank_pattern"] == CONFIGS[kind][name]["rank_pattern"] and saved["use_rslora"] is True
        pm3 = _peft_load_clean(hf, tmp_path / "jlora-cfg", caplog)
        np.testing.assert_allclose(hf_logits(pm3, TOKENS), out, atol=1e-4, rtol=0)
        assert _tree_equal(jlora.load_adapter(cfg, base, tmp_path / "jlora-cfg"), jp)


def test_magnitude_tensor_format(models, peft_adapters):
    """PEFT 0.21 stores ``<module>.lora_magnitude_vector`` (no ``.weight``), one float per output column."""
    _, cfg, base = models["llama"]
    st = SafetensorsFile(str(peft_adapters["llama", "a"][1] / "adapter_model.safetensors"))
    k = "base_model.model.model.layers.0.self_attn.k_proj"
    assert st.shape(f"{k}.{MAG}") == (32,) and st.shape(f"{k}.lora_B.weight") == (32, 4)  # GQA: 2 kv heads x 16
    ad = dora.adapters(jlora.load_adapter(cfg, base, peft_adapters["llama", "a"][1]))["model.layers.0.self_attn.k_proj"]
    np.testing.assert_array_equal(np.asarray(ad.m), st.get(f"{k}.{MAG}"))


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_merge_equals_unmerged_and_peft(models, peft_adapters, kind):
    hf, cfg, base = models[kind]
    pm, pdir = peft_adapters[kind, "b"]
    lp = jlora.load_adapter(cfg, base, pdir)
    merged = jlora.merge(lp)
    assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(base)
    assert all(x.dtype == y.dtype for x, y in zip(jax.tree_util.tree_leaves(merged), jax.tree_util.tree_leaves(base)))
    # float32 rounding only (~1e-5 on logits of ~1 after 16 adapted matrices of large updates)
    np.testing.assert_allclose(_logits(cfg, merged), _logits(cfg, lp), atol=1e-5, rtol=1e-5)
    ref = copy.deepcopy(pm).merge_and_unload()
    for name in dora.adapters(lp):
        w = ref.get_submodule(name).weight.detach().numpy()
        w = w if kind == "gpt2" else w.T  # Conv1D stores [in, out], nn.Linear [out, in]
        np.testing.assert_allclose(np.asarray(T.get_module(merged, name)["kernel"]), w, atol=1e-5, rtol=0,
                                   err_msg=name)


def test_fresh_dora_is_the_base_and_strip_round_trips(models):
    _, cfg, base = models["llama"]
    targets = ["q_proj", "k_proj", "o_proj", "down_proj"]
    dp = dora.init(jax.random.key(1), cfg, base, DoraConfig(r=4, alpha=8, target_modules=targets))
    assert len(dora.adapters(dp)) == 8
    for ad in dora.adapters(dp).values():
        assert not ad.b.any() and ad.m.shape == (ad.shape[1],)
    np.testing.assert_allclose(_logits(cfg, dp), _logits(cfg, base), atol=1e-6, rtol=0)
    assert _tree_equal(dora.strip(dp), base) and _tree_equal(B.strip(dp), base)
    np.testing.assert_allclose(np.asarray(T.get_module(jlora.merge(dp), "model.layers.0.mlp.up_proj")["kernel"]),
                               np.asarray(T.get_module(base, "model.layers.0.mlp.up_proj")["kernel"]), atol=1e-6)
    # LoraConfig(use_dora=True) is the same thing through jlora.lora.init; the factors are LoRA's for the same key
    via_lora = jlora.lora.init(jax.random.key(1), cfg, base, jlora.LoraConfig(r=4, alpha=8, target_modules=targets,
                                                                                use_dora=True))
    assert _tree_equal(via_lora, dp)
    plain = jlora.lora.init(jax.random.key(1), cfg, base, jlora.LoraConfig(r=4, alpha=8, target_modules=targets))
    a0 = lambda p: T.get_module(p, "model.layers.1.self_attn.k_proj")["kernel"].a  # noqa: E731
    np.testing.assert_array_equal(a0(plain), a0(dp))


# ----------------------------------------------------------------------------------------------------------
# The gradient and the dropout path, against PEFT's DoRA layer on the same numbers


class _Lin(torch.nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.lin = torch.nn.Linear(d_in, d_out)

    def forward(self, x):
        return self.lin(x)


class _FixedDropout(torch.nn.Module):
    """PEFT's lora_dropout with a given mask (the one jlora draws), so both sides drop the same inputs."""

    def __init__(self, keep, p):
        super().__init__()
        self.keep, self.p = keep, p

    def forward(self, x):
        return x * self.keep / (1 - self.p)


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_gradient_and_dropout_match_peft_layer(p):
    d_in, d_out, r, alpha = 16, 12, 4, 6.0
    torch.manual_seed(0)
    pm = peft.get_peft_model(_Lin(d_in, d_out), peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["lin"],
                                                                use_dora=True, init_lora_weights=False,
                                                                lora_dropout=p))
    layer = pm.base_model.model.lin
    A, Bt = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    mag = layer.lora_magnitude_vector["default"].weight
    w = jnp.asarray(layer.base_layer.weight.detach().numpy().T)
    a, b = jnp.asarray(A.detach().numpy().T), jnp.asarray(Bt.detach().numpy().T)
    # PEFT's init (random factors, init_lora_weights=False): m = ||W + scale * B A|| per column, as jlora's
    np.testing.assert_allclose(np.asarray(dora.magnitude(w, a, b, alpha / r, jnp.float32)), mag.detach().numpy(),
                               rtol=1e-6)
    with torch.no_grad():
        layer.lora_magnitude_vector["default"].weight.mul_(1 + 0.3 * torch.randn(d_out))
    x = np.random.default_rng(1).standard_normal((5, d_in)).astype(np.float32)
    g = np.random.default_rng(2).standard_normal((5, d_out)).astype(np.float32)  # loss = sum(y * g)
    rng = jax.random.key(3)
    if p:
        keep = np.asarray(jax.random.bernoulli(rng, 1.0 - p, x.shape))
        layer.lora_dropout["default"] = _FixedDropout(torch.from_numpy(keep.astype(np.float32)), p)
    pm.train()
    tx = torch.from_numpy(x)
    y_ref = layer(tx)
    (y_ref * torch.from_numpy(g)).sum().backward()
    want = {"a": A.grad.numpy().T, "b": Bt.grad.numpy().T, "m": mag.grad.numpy()}

    kernel = DoRA(base=w, a=a, b=b, m=jnp.asarray(mag.detach().numpy()), scale=alpha / r, dropout=p,
                  rng=rng if p else None)
    bias = jnp.asarray(layer.base_layer.bias.detach().numpy())

    def loss(ab_m, fwd):
        k = kernel.replace(a=ab_m["a"], b=ab_m["b"], m=ab_m["m"])
        return jnp.sum(fwd(k, jnp.asarray(x)) * g)

    def dora_fwd(k, xx):
        return jlora.kernels.linear(xx, k, bias)

    y = dora_fwd(kernel, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(y), y_ref.detach().numpy(), atol=1e-5, rtol=0)
    trainable = {"a": kernel.a, "b": kernel.b, "m": kernel.m}
    got = jax.grad(loss)(trainable, dora_fwd)
    for k in want:
        np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=1e-4, atol=1e-4 * np.abs(want[k]).max(),
                                   err_msg=k)
    if not p:  # the test can tell: letting the gradient flow through the norm gives another answer
        through = jax.grad(loss)(trainable, lambda k, xx: xx @ k.materialize() + bias)
        assert np.abs(np.asarray(through["a"]) - want["a"]).max() > 1e-3 * np.abs(want["a"]).max()


# ----------------------------------------------------------------------------------------------------------
# Training


@pytest.fixture(scope="module")
def tiny(models):
    """The Llama of `models` cut to its first layer (GQA kept), on the host: ``(cfg, base)``. Cheaper to compile
    than the whole model, and free to make (no init_params)."""
    _, cfg, base = models["llama"]
    base = jax.device_get(base)
    base = {**base, "model": {**base["model"], "layers": {"0": base["model"]["layers"]["0"]}}}
    return cfg.replace(n_layers=1), base


def _fresh(tiny, dropout=0.0, targets=("q_proj", "k_proj", "o_proj", "down_proj")):
    """A fresh tree with random DoRA factors (a new one each call: training donates its input buffers)."""
    cfg, base = tiny
    dcfg = DoraConfig(r=4, alpha=8, target_modules=list(targets), init=False, dropout=dropout)
    return dora.init(jax.random.key(2), cfg, base, dcfg)


def _tiny_batches():
    rng = np.random.default_rng(0)
    seqs = [(rng.integers(1, 128, n).astype(np.int32), np.ones(n, np.int32)) for n in rng.integers(5, 17, 24)]
    return Batches(seqs, seq_len=16, batch_size=4, seed=3)


FIT = loop.FitConfig(steps=4, learning_rate=1e-2, warmup_steps=1, weight_decay=0.01, save_every=2, log_every=1,
                     adam_eps=1e-4)  # eps: see tests/test_parallel.py (Adam's sign of float32 noise)
QUIET = dict(progress=False, log=lambda s: None, run_config={"method": "dora"})


@pytest.fixture(scope="module")
def straight(tiny, tmp_path_factory):
    """An uninterrupted 4-step `loop.fit` run of DoRA with dropout on one device: (initial params, result)."""
    dp = jax.device_get(_fresh(tiny, dropout=0.1))
    res = loop.fit(tiny[0], _fresh(tiny, dropout=0.1), _tiny_batches(), run_dir=str(tmp_path_factory.mktemp("a")),
                   fit_config=FIT, **QUIET)
    return dp, res


def test_training_updates_only_dora_leaves_and_resumes_exactly(tiny, straight, tmp_path):
    dp, res = straight
    labels = jlora.trainable_labels(dp)
    k = labels["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]
    assert (k.base, k.a, k.b, k.m) == ("frozen", "lora_a", "lora_b", "dora_magnitude")
    assert jlora.kernels.ROLE_DECAY["dora_magnitude"] is False  # a scale vector: never weight-decayed
    n_train = jlora.param_report(dp, labels)["trainable"]
    assert n_train == sum(ad.a.size + ad.b.size + ad.m.size for ad in dora.adapters(dp).values())
    # mu and nu for every trainable parameter, nothing for the frozen ones (besides scalar step counts)
    opt = [x for x in jax.tree_util.tree_leaves(res.state.opt_state) if np.ndim(x)]
    assert sum(x.size for x in opt) == 2 * n_train
    after = jax.device_get(res.state.params)
    assert _tree_equal(jlora.split(after, labels)[1], jlora.split(dp, labels)[1])  # frozen: bitwise unchanged
    for name, ad in dora.adapters(after).items():
        old = dora.adapters(dp)[name]
        assert all(bool((getattr(ad, f) != getattr(old, f)).any()) for f in ("a", "b", "m")), name

    # stop after step 2, resume in a new fit: bitwise the same run (dropout keys included)
    cfg = tiny[0]
    loop.fit(cfg, _fresh(tiny, dropout=0.1), _tiny_batches(), run_dir=str(tmp_path), fit_config=FIT, stop_at=2,
             **QUIET)
    resumed = loop.fit(cfg, _fresh(tiny, dropout=0.1), _tiny_batches(), run_dir=str(tmp_path), fit_config=FIT,
                       **QUIET)
    assert resumed.resumed_from == 2
    assert isinstance(T.get_module(resumed.state.params, "model.layers.0.mlp.down_proj")["kernel"], DoRA)
    assert _tree_equal(jax.device_get(resumed.state.params), after)
    assert [h["loss"] for h in resumed.history if "loss" in h] == [h["loss"] for h in res.history if "loss" in h][2:]


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")
def test_sharded_training_equals_one_device(tiny, straight, tmp_path):
    _, ref = straight
    mesh = parallel.make_mesh("data=2,fsdp=2,tensor=2")
    res = loop.fit(tiny[0], _fresh(tiny, dropout=0.1), _tiny_batches(), run_dir=str(tmp_path), fit_config=FIT,
                   mesh=mesh, **QUIET)
    losses = lambda r: [h["loss"] for h in r.history if "loss" in h]  # noqa: E731
    np.testing.assert_allclose(losses(res), losses(ref), rtol=2e-6, atol=1e-6)
    for (path, r), x in zip(jax.tree_util.tree_leaves_with_path(jax.device_get(ref.state.params)),
                            jax.tree_util.tree_leaves(jax.device_get(res.state.params))):
        np.testing.assert_allclose(x, r, rtol=1e-5, atol=1e-5, err_msg=T.path_str(path))  # atol = lr / 1000

    # the trained state's layout: m and b follow the base's output axis, a its input axis
    def dims(x, n):
        return (tuple(x.sharding.spec) + (None,) * n)[:n]

    sharded_out = 0
    for name, k in dora.adapters(res.state.params).items():
        spec_in, spec_out = dims(k.base, 2)
        assert dims(k.m, 1) == (spec_out,) and dims(k.b, 2) == (None, spec_out), name
        assert dims(k.a, 2) == (spec_in, None), name
        sharded_out += spec_out is not None
    assert sharded_out > 0


# ----------------------------------------------------------------------------------------------------------
# Bad input


def test_bad_configs_name_the_option(models):
    with pytest.raises(ValueError, match="use_dora=True cannot be combined with fused_qkv"):
        jlora.LoraConfig(use_dora=True, fused_qkv=("q", "v"))
    with pytest.raises(ValueError, match="use_dora=True cannot be combined with init='pissa'"):
        DoraConfig(init="pissa")
    with pytest.raises(ValueError, match="DoraConfig.use_dora must be True"):
        DoraConfig(use_dora=False)
    _, cfg, params = models["gpt2"]
    with pytest.raises(ValueError, match="use_dora=False"):
        dora.init(jax.random.key(0), cfg, params, jlora.LoraConfig())
    with pytest.raises(ValueError, match="target_modules .* matched no linear layer"):
        dora.init(jax.random.key(0), cfg, params, DoraConfig(target_modules=["q_proj"]))
    dp = dora.init(jax.random.key(0), cfg, params, DoraConfig())
    with pytest.raises(ValueError, match="already has a DoRA adapter"):
        jlora.lora.init(jax.random.key(0), cfg, dp, jlora.LoraConfig())
    assert B.get("dora") is dora.METHOD and B.method_of(T.get_module(dp, "transformer.h.0.attn.c_attn")["kernel"]) \
        is dora.METHOD


def test_dora_never_passes_as_plain_lora(models, peft_adapters, tmp_path):
    _, cfg, base = models["gpt2"]
    pdir = peft_adapters["gpt2", "a"][1]
    with open(pdir / "adapter_config.json") as f:
        pconf = json.load(f)
    assert not issubclass(DoRA, LoRA)
    assert jlora.convert.peft.method_for(pconf) is dora.METHOD
    with pytest.raises(ValueError, match="use_dora=true: this is a DoRA adapter"):
        jlora.convert.peft.lora_config_from_peft(pconf)
    with pytest.raises(ValueError, match="use_dora=true: this is a DoRA adapter"):
        LORA_CODEC.config_from_peft(pconf, "x")
    with pytest.raises(ValueError, match="use_dora is not set"):
        DORA_CODEC.config_from_peft({**pconf, "use_dora": False}, "x")
    dp = jlora.load_adapter(cfg, base, pdir)
    with pytest.raises(ValueError, match="no LoRA adapter"):
        LORA_CODEC.config_to_peft(cfg, dp, None)
    with pytest.raises(ValueError, match="mcfg is a LoraConfig but params holds a dora adapter"):
        jlora.save_adapter(cfg, dp, tmp_path / "x", jlora.LoraConfig(r=4, alpha=8, target_modules=["c_attn"]))
    lp = jlora.lora.init(jax.random.key(0), cfg, base, jlora.LoraConfig(r=2, alpha=4, target_modules=["c_fc"]))
    mixed = T.replace_modules(lp, dora.adapters(dp))
    with pytest.raises(ValueError, match="mixes methods"):
        jlora.save_adapter(cfg, mixed, tmp_path / "x")
    with pytest.raises(ValueError, match="mixes DoRA and plain LoRA"):
        DORA_CODEC.config_to_peft(cfg, mixed, None)


def _edit(src, dst, tensors=None, config=None):
    shutil.copytree(src, dst)
    if config:
        with open(dst / "adapter_config.json") as f:
            c = json.load(f)
        config(c)
        with open(dst / "adapter_config.json", "w") as f:
            json.dump(c, f)
    if tensors:
        st = SafetensorsFile(str(src / "adapter_model.safetensors"))
        t = {k: np.array(st.get(k)) for k in st.keys()}
        tensors(t)
        write_safetensors(str(dst / "adapter_model.safetensors"), t)
    return dst


def test_bad_dora_files_are_named(models, peft_adapters, tmp_path):
    _, cfg, base = models["llama"]
    src = peft_adapters["llama", "a"][1]
    k0 = "base_model.model.model.layers.0.self_attn.q_proj"
    bad = _edit(src, tmp_path / "nomag", tensors=lambda t: t.pop(f"{k0}.{MAG}"))
    with pytest.raises(ValueError, match=rf"q_proj\.lora_A\.weight has no matching {MAG}"):
        jlora.load_adapter(cfg, base, bad)
    bad = _edit(src, tmp_path / "shape", tensors=lambda t: t.update({f"{k0}.{MAG}": t[f"{k0}.{MAG}"][:32]}))
    with pytest.raises(ValueError, match=rf"q_proj\.{MAG} has shape \(32,\), expected \(64,\)"):
        jlora.load_adapter(cfg, base, bad)
    bad = _edit(src, tmp_path / "untargeted", config=lambda c: c.update(target_modules=["q_proj", "v_proj"]))
    with pytest.raises(ValueError, match=r"k_proj, which adapter_config.json's target_modules"):
        jlora.load_adapter(cfg, base, bad)
    bad = _edit(src, tmp_path / "rank", config=lambda c: c.update(rank_pattern={"k_proj": 2}))
    with pytest.raises(ValueError, match=r"k_proj\.lora_A\.weight has shape \(4, 64\), expected \(2, 64\)"):
        jlora.load_adapter(cfg, base, bad)
    bad = _edit(src, tmp_path / "nodora", config=lambda c: c.update(use_dora=False))
    with pytest.raises(ValueError, match=rf"{MAG}"):  # as plain LoRA the magnitudes are refused, never dropped
        jlora.load_adapter(cfg, base, bad)
    bad = _edit(src, tmp_path / "bias", config=lambda c: c.update(lora_bias=True))
    with pytest.raises(ValueError, match=r"lora_bias=True is not supported"):
        jlora.load_adapter(cfg, base, bad)


def test_lora_config_with_use_dora_saves_as_dora(models, tmp_path):
    _, cfg, base = models["llama"]
    lcfg = jlora.LoraConfig(r=2, alpha=4, use_dora=True)
    dp = jlora.lora.init(jax.random.key(1), cfg, base, lcfg)  # lora.init hands use_dora to dora.init
    assert all(isinstance(k, DoRA) for k in dora.adapters(dp).values()) and not jlora.lora.adapters(dp)
    jlora.save_adapter(cfg, dp, tmp_path / "a", lcfg)  # the LoraConfig is taken as the DoraConfig it equals
    with open(tmp_path / "a" / "adapter_config.json") as f:
        assert json.load(f)["use_dora"] is True
    with pytest.raises(ValueError, match="mcfg is a LoraConfig but params holds a dora adapter"):
        jlora.save_adapter(cfg, dp, tmp_path / "b", jlora.LoraConfig(r=2, alpha=4))
