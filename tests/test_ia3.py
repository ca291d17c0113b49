"""(IA)^3 against the real `peft` library both ways (GPT-2 Conv1D and Llama GQA), merge/strip identities, the train
step (only the vectors train), exact resume, sharded training on 8 simulated devices, and clear errors."""

import copy
import dataclasses
import json
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

peft = pytest.importorskip("peft")
torch = pytest.importorskip("torch")


import jlora  # noqa: E402
from conftest import adam_moments, hf_logits, sharded_equals_one_device  # noqa: E402
from jlora import loop, train  # noqa: E402
from jlora.convert.stfile import SafetensorsFile, write_safetensors  # noqa: E402
from jlora.data import Batches  # noqa: E402
from jlora.peft import ia3  # noqa: E402
from jlora.peft.base import strip  # noqa: E402
from jlora.peft.ia3 import IA3, IA3Config  # noqa: E402

TOKENS = np.random.default_rng(0).integers(0, 128, (2, 7)).astype(np.int32)
LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# PEFT IA3Config keyword arguments, three per architecture: PEFT's defaults, feed-forward and not on every kind of
# layer (GPT-2's biased Conv1D; Llama's GQA projections and the untied head), and regex / exclude /
# modules_to_save. Llama "qv" is the file PEFT writes but cannot load itself (default feed-forward modules that are
# no target).
CONFIGS = {
    "gpt2": {
        "default": {},
        "mixed": dict(target_modules=["c_attn", "c_proj", "c_fc"], feedforward_modules=["c_fc"]),
        "regex": dict(target_modules=r".*\.h\.1\..*(c_attn|c_fc)|.*\.h\.0\.mlp\.c_proj",
                      feedforward_modules=r".*\.h\.1\.mlp\.c_fc", exclude_modules=["transformer.h.1.attn.c_attn"]),
    },
    "llama": {
        "default": {},
        "all": dict(target_modules=LLAMA_ALL + ["lm_head"], feedforward_modules=["gate_proj", "up_proj", "down_proj"]),
        "qv": dict(target_modules=["q_proj", "v_proj"], exclude_modules=["model.layers.0.self_attn.q_proj"],
                   modules_to_save=["lm_head"]),
    },
}


def _peft_adapter(hf, kind, out_dir, **kw):
    """A real PEFT IA3 adapter with random (non-identity) vectors, saved to out_dir; returns the PEFT model."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's notes on fan_in_fan_out and save_embedding_layers
        pm = peft.get_peft_model(copy.deepcopy(hf), peft.IA3Config(task_type="CAUSAL_LM", init_ia3_weights=False,
                                                                   fan_in_fan_out=kind == "gpt2", **kw))
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "modules_to_save" in name:
                    p.add_(0.05 * torch.randn_like(p))  # a trained saved module, not a copy of the base
        pm.eval()
        pm.save_pretrained(out_dir)
    return pm


def _peft_load_clean(hf, adapter_dir, caplog, reload=True):
    """PeftModel.from_pretrained with no warning at all, and (``reload``) no missing/unexpected keys on a second
    load."""
    caplog.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf), adapter_dir)
    user = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert not user, user
    assert not [r for r in caplog.records if r.levelname in ("WARNING", "ERROR")], caplog.text
    if reload:
        res = pm.load_adapter(adapter_dir, adapter_name="again")
        assert not res.missing_keys and not res.unexpected_keys, res
        pm.set_adapter("default")
    return pm.eval()


def _tree_equal(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return (jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
            and all(x.dtype == y.dtype and x.shape == y.shape and bool((x == y).all()) for x, y in zip(la, lb)))


def _logits(cfg, params):
    return np.asarray(jlora.apply(cfg, params, TOKENS))


def base_kernel(params, name):
    return jlora.tree.get_module(params, name)["kernel"]


def _peft_ia3_modules(pm):
    """{jlora module name: is_feedforward} of a PEFT model."""
    out = {}
    for n, m in pm.named_modules():
        if hasattr(m, "ia3_l") and hasattr(m, "is_feedforward") and len(m.ia3_l):
            out[n[len("base_model.model."):]] = bool(m.is_feedforward)
    return out


def _check_identity_merge_and_strip(cfg, base, hf, pm, lp, icfg, tmp_path):
    """Fresh vectors (ones) are the base; merge equals the unmerged model and PEFT's merge_and_unload; strip
    gives the base back bitwise."""
    fresh = ia3.init(jax.random.key(0), cfg, base, icfg.replace(init_ia3_weights=True))
    assert _tree_equal(strip(fresh), base) and _tree_equal(strip(lp), base)
    # each fresh layer is exactly the base layer; the jitted model differs only where XLA fuses the (exact)
    # multiplications by one into neighbouring ops (another accumulation order, ~1 ulp)
    for name, ad in ia3.adapters(fresh).items():
        x = jax.random.normal(jax.random.key(3), (3, ad.shape[0]))
        bias = jlora.tree.get_module(base, name).get("bias")
        np.testing.assert_array_equal(jlora.kernels.linear(x, ad, bias),
                                      jlora.kernels.linear(x, base_kernel(base, name), bias))
    np.testing.assert_allclose(_logits(cfg, fresh), _logits(cfg, base), atol=1e-6, rtol=0)

    merged = jlora.merge(lp)
    assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(base)
    assert all(a.dtype == b.dtype for a, b in zip(jax.tree_util.tree_leaves(merged), jax.tree_util.tree_leaves(base)))
    np.testing.assert_allclose(_logits(cfg, merged), _logits(cfg, lp), atol=1e-5, rtol=0)
    # PEFT's merge_and_unload gives the same weights (the biases of non-feed-forward layers scaled too)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        copy.deepcopy(pm).merge_and_unload().save_pretrained(tmp_path / "merged")
    _, peft_merged = jlora.load_pretrained(str(tmp_path / "merged"))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(merged), jax.tree_util.tree_leaves(peft_merged)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-6,
                                   err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("kind,name", [(k, n) for k in CONFIGS for n in CONFIGS[k]])
def test_both_directions_match_peft(models, kind, name, tmp_path, caplog):
    hf, cfg, base = models[kind]
    kw = CONFIGS[kind][name]

    # PEFT -> jlora
    pm = _peft_adapter(hf, kind, tmp_path / "peft", **kw)
    lp = jlora.load_adapter(cfg, base, tmp_path / "peft")
    ref = hf_logits(pm, TOKENS)
    assert np.abs(ref - hf_logits(hf, TOKENS)).max() > 1e-2  # the adapter does something
    np.testing.assert_allclose(_logits(cfg, lp), ref, atol=1e-4, rtol=0)
    assert {n: ad.feedforward for n, ad in ia3.adapters(lp).items()} == _peft_ia3_modules(pm)
    assert any(ad.feedforward for ad in ia3.adapters(lp).values()) or name == "qv"

    # jlora -> PEFT: the same config in jlora terms, random vectors, the config derived from the wrappers
    with open(tmp_path / "peft" / "adapter_config.json") as f:
        pconf = json.load(f)
    icfg = jlora.config_from_peft(pconf)
    assert isinstance(icfg, IA3Config) and icfg.init_ia3_weights is False
    jp = ia3.init(jax.random.key(7), cfg, base, icfg)
    if icfg.modules_to_save:
        saved = jp["lm_head"]["kernel"]
        jp = {**jp, "lm_head": {**jp["lm_head"], "kernel": saved.replace(base=saved.base + 0.05)}}
    out = _logits(cfg, jp)
    assert np.abs(out - _logits(cfg, base)).max() > 1e-2
    save_dir = tmp_path / "jlora"
    jlora.save_adapter(cfg, jp, save_dir)
    pm2 = _peft_load_clean(hf, save_dir, caplog)
    np.testing.assert_allclose(hf_logits(pm2, TOKENS), out, atol=1e-4, rtol=0)
    assert _tree_equal(jlora.load_adapter(cfg, base, save_dir), jp)  # bitwise round trip

    if name == "default":
        return
    # with mcfg the file keeps the config's own spelling where PEFT reads it the same way
    jlora.save_adapter(cfg, jp, tmp_path / "jlora-mcfg", mcfg=icfg)
    pm3 = _peft_load_clean(hf, tmp_path / "jlora-mcfg", caplog, reload=False)
    np.testing.assert_allclose(hf_logits(pm3, TOKENS), out, atol=1e-4, rtol=0)
    assert _tree_equal(jlora.load_adapter(cfg, base, tmp_path / "jlora-mcfg"), jp)
    with open(tmp_path / "jlora-mcfg" / "adapter_config.json") as f:
        written = json.load(f)
    if isinstance(kw.get("target_modules"), str):
        assert written["target_modules"] == kw["target_modules"]
    if name in ("mixed", "all"):
        _check_identity_merge_and_strip(cfg, base, hf, pm, lp, icfg, tmp_path)
    if name == "qv":
        # PEFT refuses its own file (default feed-forward modules beside explicit targets); jlora's is clean
        assert pconf["feedforward_modules"] == ["down_proj"] and written["feedforward_modules"] == []
        with pytest.raises(ValueError, match="feedforward_modules` should be a subset"):
            peft.PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "peft")


def test_shapes_are_peft_shapes(models, tmp_path):
    """``ia3_l`` is [out, 1] (scales the output) or [1, in] (feed-forward), for Conv1D and Linear alike."""
    for kind, ff_name, other in (("gpt2", "transformer.h.0.mlp.c_proj", "transformer.h.0.attn.c_attn"),
                                 ("llama", "model.layers.0.mlp.down_proj", "model.layers.0.self_attn.k_proj")):
        hf, cfg, base = models[kind]
        jlora.save_adapter(cfg, ia3.init(jax.random.key(0), cfg, base, IA3Config()), tmp_path / kind)
        st = SafetensorsFile(str(tmp_path / kind / "adapter_model.safetensors"))
        d_in_ff = base_kernel(base, ff_name).shape[0]
        d_out = base_kernel(base, other).shape[1]
        assert st.shape(f"base_model.model.{ff_name}.ia3_l") == (1, d_in_ff)
        assert st.shape(f"base_model.model.{other}.ia3_l") == (d_out, 1)


# One layer: the training tests are about the tree, not depth, and compile time grows with the (unrolled) layers.
TINY_GPT2 = dataclasses.replace(jlora.preset("tiny-gpt2"), n_layers=1)
TRAIN_CFG = IA3Config(target_modules=["c_attn", "c_proj", "c_fc"], feedforward_modules=["c_fc"],
                      init_ia3_weights=False)


def _train_params(cfg=TINY_GPT2):
    return ia3.init(jax.random.key(2), cfg, jlora.init_params(cfg, jax.random.key(1)), TRAIN_CFG)


def test_fit_trains_only_the_vectors_and_resumes_exactly(tmp_path):
    """jlora.loop.fit (the one train step): frozen leaves bitwise unchanged, every vector moves, Adam holds state
    for the vectors only, and a run stopped and resumed ends bitwise where an uninterrupted one does."""
    cfg = TINY_GPT2
    params = _train_params()
    labels = jlora.trainable_labels(params)
    assert set(jax.tree_util.tree_leaves(labels)) == {"frozen", "ia3"}
    n_train = jlora.param_report(params, labels)["trainable"]
    assert n_train == sum(ad.scale.size for ad in ia3.adapters(params).values())
    opt_state = train.init_state(params, train.make_optimizer(labels, 1e-2, weight_decay=0.1)).opt_state
    assert sum(x.size for x in adam_moments(opt_state)) == 2 * n_train
    assert sum(x.size for x in jax.tree_util.tree_leaves(opt_state)) == 2 * n_train + 1  # + Adam's step count
    frozen_before = jax.device_get(jlora.split(params, labels)[1])
    vec_before = {n: np.asarray(ad.scale) for n, ad in ia3.adapters(params).items()}

    rng = np.random.default_rng(0)
    seqs = [(rng.integers(1, 128, n).astype(np.int32), np.ones(n, np.int32)) for n in rng.integers(5, 17, 16)]
    batches = Batches(seqs, seq_len=16, batch_size=4, seed=3)
    fc = loop.FitConfig(steps=2, learning_rate=1e-2, warmup_steps=1, save_every=100, log_every=1, weight_decay=0.1)
    kw = dict(fit_config=fc, progress=False, run_config={"method": "ia3"}, log=lambda *_: None)
    # fit donates its input: a fresh tree each time
    straight = loop.fit(cfg, _train_params(), batches, run_dir=str(tmp_path / "straight"), **kw)
    assert _tree_equal(jlora.split(straight.state.params, labels)[1], frozen_before)  # bitwise
    assert all(np.abs(np.asarray(ad.scale) - vec_before[n]).max() > 0
               for n, ad in ia3.adapters(straight.state.params).items())
    assert sum(x.size for x in adam_moments(straight.state.opt_state)) == 2 * n_train

    first = loop.fit(cfg, _train_params(), batches, run_dir=str(tmp_path / "split"), stop_at=1, **kw)
    assert int(first.state.step) == 1
    logs = []
    resumed = loop.fit(cfg, _train_params(), batches, run_dir=str(tmp_path / "split"), **{**kw, "log": logs.append})
    assert any("resumed from step 1" in str(line) for line in logs), logs
    assert _tree_equal(resumed.state.params, straight.state.params)  # bitwise
    assert isinstance(resumed.state.params["transformer"]["h"]["0"]["mlp"]["c_fc"]["kernel"], IA3)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")
def test_sharded_training_equals_one_device_and_vectors_follow_their_base():
    def setup():
        params = _train_params()
        labels = jlora.trainable_labels(params)
        # eps 1e-4 as tests/test_parallel.py: Adam's first steps would turn rounding noise into lr-sized steps
        return params, labels, train.make_optimizer(labels, 1e-2, weight_decay=0.01, eps=1e-4)

    sstate = sharded_equals_one_device(TINY_GPT2, setup, n_batches=3)

    # every vector is sharded like the axis it scales: the output axis, or the input axis when feed-forward
    sharded = 0
    for name, ad in ia3.adapters(sstate.params).items():
        kin, kout = tuple(ad.base.sharding.spec) + (None,) * (2 - len(ad.base.sharding.spec))
        want = kin if ad.feedforward else kout
        got = tuple(ad.scale.sharding.spec)
        assert (got + (None,))[0] == want, (name, got, want)
        sharded += want is not None
    assert sharded  # the rule was exercised (tensor / fsdp split a vector somewhere)
    c_attn = ia3.adapters(sstate.params)["transformer.h.0.attn.c_attn"]
    assert "tensor" in str(c_attn.scale.sharding.spec)  # column-parallel: its output vector is tensor-sharded


# ----------------------------------------------------------------------------------------------------------
# Errors


def test_bad_configs_name_the_option(models):
    _, cfg, base = models["gpt2"]
    with pytest.raises(ValueError, match=r"IA3Config.feedforward_modules must be a subset of target_modules .*"
                                         r"'mlp.c_fc' is not in target_modules"):
        IA3Config(target_modules=["c_attn", "c_fc"], feedforward_modules=["mlp.c_fc"])
    with pytest.raises(ValueError, match=r"feedforward_modules must be a subset .*'c_fc' is not in target_modules "
                                         r"\['c_attn', 'mlp.c_proj'\] \(the gpt2 defaults\)"):
        ia3.init(jax.random.key(0), cfg, base, IA3Config(feedforward_modules=["c_fc"]))
    with pytest.raises(ValueError, match=r"IA3Config.feedforward_modules '.\*mlp\\\\..\*' selects "
                                         r"transformer.h.0.mlp.c_fc, which target_modules"):
        ia3.init(jax.random.key(0), cfg, base, IA3Config(target_modules=["c_attn", "mlp.c_proj"],
                                                         feedforward_modules=r".*mlp\..*"))
    with pytest.raises(ValueError, match=r"IA3Config.target_modules \('nope',\) matched no linear layer"):
        ia3.init(jax.random.key(0), cfg, base, IA3Config(target_modules=["nope"]))
    with pytest.raises(ValueError, match=r"IA3Config.feedforward_modules '\(' is not a valid regex"):
        IA3Config(feedforward_modules="(")
    with pytest.raises(ValueError, match=r"IA3Config.init_ia3_weights must be true or false"):
        IA3Config(init_ia3_weights="yes")
    with pytest.raises(ValueError, match=r"IA3Config.dtype 'f33' is not a dtype name"):
        IA3Config(dtype="f33")
    fresh = ia3.init(jax.random.key(0), cfg, base, IA3Config())
    with pytest.raises(ValueError, match=r"already has a IA3 adapter"):
        ia3.init(jax.random.key(0), cfg, fresh, IA3Config())
    assert not jlora.kernels.role_decays("ia3", jnp.ones((4, 4)))  # a scale is never weight-decayed


def _rewrite(adapter_dir, pconf=None, tensors=None):
    if pconf is not None:
        with open(os.path.join(adapter_dir, "adapter_config.json"), "w") as f:
            json.dump(pconf, f)
    if tensors is not None:
        write_safetensors(os.path.join(adapter_dir, "adapter_model.safetensors"), tensors)


def test_bad_files_are_refused_clearly(models, tmp_path):
    _, cfg, base = models["llama"]
    good = tmp_path / "good"
    jlora.save_adapter(cfg, ia3.init(jax.random.key(0), cfg, base, IA3Config()), good)
    pconf = json.load(open(good / "adapter_config.json"))
    st = SafetensorsFile(str(good / "adapter_model.safetensors"))
    tensors = {k: np.asarray(st.get(k)) for k in st.keys()}
    d = str(tmp_path / "bad")
    import shutil

    def case(pc=None, ts=None, match=""):
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(good, d)
        _rewrite(d, pc, ts)
        with pytest.raises(ValueError, match=match):
            jlora.load_adapter(cfg, base, d)

    case({**pconf, "layers_to_transform": [0]}, match=r"adapter_config.json: layers_to_transform=\[0\] is not "
                                                       r"supported: PEFT's IA3Config has no layers_to_transform")
    case({**pconf, "use_dora": True}, match=r"use_dora=True is not supported: it is not an option of PEFT's IA3Config")
    case({**pconf, "init_ia3_weights": "ones"}, match=r"init_ia3_weights='ones' is not supported")
    case({**pconf, "feedforward_modules": "("}, match=r"adapter_config.json: IA3Config.feedforward_modules '\(' is "
                                                       r"not a valid regex")
    k = "base_model.model.model.layers.1.self_attn.k_proj.ia3_l"
    case(ts={n: v for n, v in tensors.items() if n != k},
         match=r"adapter_config.json selects model.layers.1.self_attn.k_proj but the file has no ia3_l for it")
    case(ts={**tensors, "base_model.model.model.layers.0.self_attn.q_proj.ia3_l": np.ones((64, 1), np.float32)},
         match=r"tensor base_model.model.model.layers.0.self_attn.q_proj.ia3_l is for model.layers.0.self_attn."
               r"q_proj, which adapter_config.json's target_modules/.* do not select")
    case(ts={**tensors, "base_model.model.model.layers.9.self_attn.k_proj.ia3_l": np.ones((32, 1), np.float32)},
         match=r"maps to no linear layer of this llama model \(module 'model.layers.9.self_attn.k_proj' does not")
    dk = "base_model.model.model.layers.0.mlp.down_proj.ia3_l"
    case(ts={**tensors, dk: np.ones((64, 1), np.float32)},
         match=r"tensor base_model.model.model.layers.0.mlp.down_proj.ia3_l has shape \(64, 1\), expected \(1, 96\) "
               r"\(feed-forward: one scale per input feature of model.layers.0.mlp.down_proj, which is 96 -> 64\); "
               r"that is the shape of a non-feed-forward vector")
    case(ts={**tensors, "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight": np.ones((2, 96), np.float32)},
         match=r"is not an \(IA\)\^3 vector")
    case({**pconf, "feedforward_modules": []},  # the config says down_proj scales its output: the shapes disagree
         match=r"down_proj.ia3_l has shape \(1, 96\), expected \(64, 1\)")
    jlora.load_adapter(cfg, base, good)  # the good one still loads


def test_config_from_peft_and_save_errors(models):
    codec = jlora.peft.base.get("ia3").load_codec()
    c = codec.config_from_peft({"peft_type": "IA3", "target_modules": ["q_proj", "v_proj"],
                                "feedforward_modules": ["down_proj"]}, "x.json")
    # PEFT's training-time meaning, kept as an equivalent regex limited to the targets
    assert not c.is_feedforward("model.layers.0.mlp.down_proj") and not c.is_feedforward("model.layers.0.q_proj")
    c = codec.config_from_peft({"peft_type": "IA3", "target_modules": ["c_attn", "c_proj"],
                                "feedforward_modules": ["mlp.c_proj"]}, "x.json")
    assert c.is_feedforward("transformer.h.0.mlp.c_proj") and not c.is_feedforward("transformer.h.0.attn.c_proj")
    with pytest.raises(ValueError, match=r"x.json: foo=1 is not supported"):
        codec.config_from_peft({"peft_type": "IA3", "foo": 1}, "x.json")
    _, cfg, base = models["llama"]
    p = ia3.init(jax.random.key(0), cfg, base, IA3Config(target_modules=["k_proj"]))
    with pytest.raises(ValueError, match=r"save_adapter: mcfg does not describe the adapters in params: "
                                         r"model.layers.0.mlp.down_proj is selected by mcfg but has no IA3"):
        jlora.save_adapter(cfg, p, "/nonexistent/never-written", mcfg=IA3Config())
