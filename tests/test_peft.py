"""PEFT adapters <-> jlora against the real `peft` library, both directions, plus strictness on bad adapters."""

import copy
import json
import os
import shutil
import warnings

import jax
import numpy as np
import pytest

peft = pytest.importorskip("peft")
torch = pytest.importorskip("torch")

import jlora  # noqa: E402
from conftest import hf_logits, make_hf_model  # noqa: E402
from jlora.convert.peft import load_adapter, lora_config_from_peft, save_adapter  # noqa: E402
from jlora.convert.stfile import SafetensorsFile, write_safetensors  # noqa: E402

TOKENS = np.random.default_rng(0).integers(0, 128, (2, 7)).astype(np.int32)

# Three PEFT configs per architecture: (a) plain q/v, (b) rsLoRA with rank/alpha patterns over attention and MLP
# (and the untied Llama head), (c) layers_to_transform.
CONFIGS = {
    "gpt2": {
        "a": dict(r=4, lora_alpha=8, target_modules=["c_attn"]),
        "b": dict(r=4, lora_alpha=16, use_rslora=True, target_modules=["c_attn", "c_proj", "c_fc"],
                  rank_pattern={"c_fc": 2, r"h\.1\.attn\.c_proj": 3},
                  alpha_pattern={"c_proj": 5, "h.0.attn.c_attn": 7.5}),
        "c": dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], layers_to_transform=[1]),
    },
    "llama": {
        "a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "b": dict(r=8, lora_alpha=16, use_rslora=True,
                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                                  "lm_head"],
                  rank_pattern={"down_proj": 2, r"layers\.1\.self_attn\.q_proj": 6},
                  alpha_pattern={"o_proj": 3, "gate_proj": 7.5, "lm_head": 4}),
        "c": dict(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"], layers_to_transform=1),
    },
}


def _peft_adapter(hf, out_dir, **kw):
    """A real PEFT adapter with non-zero A and B, saved to out_dir; returns the PEFT model."""
    torch.manual_seed(0)
    pm = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(init_lora_weights=False, **kw))
    pm.eval()
    pm.save_pretrained(out_dir)
    return pm


def _peft_load_clean(hf, adapter_dir, caplog, reload=True):
    """PeftModel.from_pretrained with no warning at all about keys (or anything else PEFT warns about); with
    ``reload`` the file is loaded a second time through load_adapter, whose result lists missing/unexpected keys."""
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


@pytest.mark.parametrize("kind,name", [(k, n) for k in CONFIGS for n in CONFIGS[k]])
def test_both_directions_match_peft(models, kind, name, tmp_path, caplog):
    hf, cfg, base = models[kind]
    kw = CONFIGS[kind][name]

    # PEFT -> jlora
    pm = _peft_adapter(hf, tmp_path / "peft", **kw)
    lp = load_adapter(cfg, base, tmp_path / "peft")
    ref = hf_logits(pm, TOKENS)
    assert np.abs(ref - hf_logits(hf, TOKENS)).max() > 1e-2  # the adapter does something
    np.testing.assert_allclose(_logits(cfg, lp), ref, atol=1e-4, rtol=0)
    want = {n for n, _ in pm.named_modules() if n.endswith(".lora_A")}
    assert {f"base_model.model.{n}.lora_A" for n in jlora.lora.adapters(lp)} == want

    # jlora -> PEFT: the same config in jlora terms, random non-zero factors, config derived from the wrappers
    with open(tmp_path / "peft" / "adapter_config.json") as f:
        lcfg = lora_config_from_peft(json.load(f)).replace(init=False)
    jp = jlora.lora.init(jax.random.key(7), cfg, base, lcfg)
    out = _logits(cfg, jp)
    save_adapter(cfg, jp, tmp_path / "jlora")
    pm2 = _peft_load_clean(hf, tmp_path / "jlora", caplog)
    np.testing.assert_allclose(hf_logits(pm2, TOKENS), out, atol=1e-4, rtol=0)
    assert _tree_equal(load_adapter(cfg, base, tmp_path / "jlora"), jp)  # bitwise round trip

    if name == "b":  # with lcfg the config keeps its own spelling (patterns as written) and still matches PEFT
        save_adapter(cfg, jp, tmp_path / "jlora-lcfg", lcfg)
        with open(tmp_path / "jlora-lcfg" / "adapter_config.json") as f:
            saved = json.load(f)
        assert saved["rank_pattern"] == kw["rank_pattern"] and saved["use_rslora"] is True
        pm3 = _peft_load_clean(hf, tmp_path / "jlora-lcfg", caplog)
        np.testing.assert_allclose(hf_logits(pm3, TOKENS), out, atol=1e-4, rtol=0)
        assert _tree_equal(load_adapter(cfg, base, tmp_path / "jlora-lcfg"), jp)


def test_derived_config_is_compact_and_exact(models, tmp_path):
    hf, cfg, base = models["llama"]
    lcfg = jlora.LoraConfig(r=8, alpha=16, use_rslora=True, init=False, target_modules=["q_proj", "down_proj"],
                            rank_pattern={"down_proj": 2}, layers_to_transform=(1,), dropout=0.1)
    jp = jlora.lora.init(jax.random.key(0), cfg, base, lcfg)
    save_adapter(cfg, jp, tmp_path / "a")
    with open(tmp_path / "a" / "adapter_config.json") as f:
        c = json.load(f)
    assert (c["r"], c["lora_alpha"], c["use_rslora"], c["rank_pattern"], c["alpha_pattern"]) == (8, 16, True,
                                                                                                  {"down_proj": 2}, {})
    assert c["target_modules"] == ["down_proj", "q_proj"] and c["layers_to_transform"] == [1]
    assert (c["peft_type"], c["task_type"], c["bias"], c["fan_in_fan_out"], c["lora_dropout"]) == (
        "LORA", "CAUSAL_LM", "none", False, 0.1)
    assert sorted(os.listdir(tmp_path)) == ["a"]  # no temporary folder left behind
    assert _tree_equal(load_adapter(cfg, base, tmp_path / "a"), jp)


def test_fused_qkv_slices_export_exactly(models, tmp_path, caplog):
    hf, cfg, base = models["gpt2"]
    lcfg = jlora.LoraConfig(r=4, alpha=8, target_modules=["c_attn"], fused_qkv=("q", "v"), init=False)
    jp = jlora.lora.init(jax.random.key(3), cfg, base, lcfg)
    save_adapter(cfg, jp, tmp_path / "qv")
    st = SafetensorsFile(str(tmp_path / "qv" / "adapter_model.safetensors"))
    b = st.get("base_model.model.transformer.h.0.attn.c_attn.lora_B.weight")
    assert b.shape == (3 * cfg.d_model, 4) and not b[cfg.d_model:2 * cfg.d_model].any() and b[:cfg.d_model].any()
    pm = _peft_load_clean(hf, tmp_path / "qv", caplog)
    np.testing.assert_allclose(hf_logits(pm, TOKENS), _logits(cfg, jp), atol=1e-4, rtol=0)
    back = load_adapter(cfg, base, tmp_path / "qv")
    assert _tree_equal(back, jp)
    assert jlora.lora.adapters(back)["transformer.h.1.attn.c_attn"].slices == ((0, 32), (64, 96))


def test_regex_targets_and_exclude_modules(models, tmp_path):
    hf, cfg, base = models["llama"]
    for sub, kw in (("regex", dict(target_modules=r".*\.1\.(self_attn\.[qv]|mlp\.gate)_proj")),
                    ("exclude", dict(target_modules=["q_proj", "v_proj"],
                                     exclude_modules=["model.layers.0.self_attn.v_proj"]))):
        pm = _peft_adapter(hf, tmp_path / sub, r=4, lora_alpha=8, **kw)
        lp = load_adapter(cfg, base, tmp_path / sub)
        want = {n for n, _ in pm.named_modules() if n.endswith(".lora_A")}
        assert {f"base_model.model.{n}.lora_A" for n in jlora.lora.adapters(lp)} == want and len(want) == 3
        np.testing.assert_allclose(_logits(cfg, lp), hf_logits(pm, TOKENS), atol=1e-4, rtol=0)


# PEFT's targeting vocabulary through files, both ways: (PEFT kwargs, jlora LoraConfig kwargs), same meaning.
VOCAB = {
    "exclude-regex": ("llama", dict(target_modules=["q_proj", "v_proj", "down_proj"],
                                    exclude_modules=r".*\.0\.self_attn\.q_proj")),
    "layers-pattern": ("llama", dict(target_modules=["q_proj", "up_proj"], layers_to_transform=[1],
                                     layers_pattern="layers")),
    "all-linear": ("gpt2", dict(target_modules="all-linear")),
    "all-linear-llama": ("llama", dict(target_modules="all-linear", exclude_modules=["o_proj"])),
    "modules-to-save": ("llama", dict(target_modules=["q_proj"], modules_to_save=["lm_head", "norm"])),
    "modules-to-save-gpt2": ("gpt2", dict(target_modules=["c_attn"], modules_to_save=["ln_f", "wpe"])),
}


@pytest.mark.parametrize("name", list(VOCAB))
def test_targeting_vocabulary_round_trips_through_peft_files(models, name, tmp_path, caplog):
    kind, kw = VOCAB[name]
    hf, cfg, base = models[kind]
    # PEFT -> jlora: the same modules adapted, the same logits (saved modules perturbed so they matter)
    torch.manual_seed(0)
    pm = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, **kw))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if ".modules_to_save." in n:
                p.add_(0.05 * torch.randn_like(p))
    pm.eval()
    pm.save_pretrained(tmp_path / "peft")
    lp = load_adapter(cfg, base, tmp_path / "peft")
    want = {n for n, _ in pm.named_modules() if n.endswith(".lora_A")}
    assert {f"base_model.model.{n}.lora_A" for n in jlora.lora.adapters(lp)} == want
    np.testing.assert_allclose(_logits(cfg, lp), hf_logits(pm, TOKENS), atol=1e-4, rtol=0)
    # jlora -> PEFT, with the config's own spelling and with a derived one
    lcfg = jlora.LoraConfig(r=2, alpha=4, init=False, **kw)
    assert set(jlora.lora.adapters(jlora.lora.init(jax.random.key(0), cfg, base, lcfg))) == set(
        jlora.lora.adapters(lp))  # the same selection from the config alone
    trained = jax.tree_util.tree_map(lambda x: x, lp)  # the loaded tree: saved modules hold perturbed values
    for sub, mc in (("spelled", lcfg), ("derived", None)):
        save_adapter(cfg, trained, tmp_path / sub, mc)
        with open(tmp_path / sub / "adapter_config.json") as f:
            saved = json.load(f)
        if mc is not None:
            for key in ("target_modules", "layers_pattern", "modules_to_save"):
                if key in kw:
                    got = saved[key]
                    assert (sorted(got) if isinstance(got, list) else got) == (
                        sorted(kw[key]) if isinstance(kw[key], list) else kw[key]), key
        pm2 = _peft_load_clean(hf, tmp_path / sub, caplog, reload=False)
        np.testing.assert_allclose(hf_logits(pm2, TOKENS), _logits(cfg, trained), atol=1e-4, rtol=0)
        assert _tree_equal(load_adapter(cfg, base, tmp_path / sub), trained)


def test_pissa_tree_exports_with_its_init(models, tmp_path, caplog):
    """A PiSSA tree's base is the residual; with lcfg the config says init_lora_weights='pissa', and PEFT rebuilds
    the same residual from the original base. jlora's own loader refuses it (it never rewrites a base)."""
    hf, cfg, base = models["llama"]
    lcfg = jlora.LoraConfig(r=4, alpha=8, init="pissa", target_modules=["q_proj", "down_proj"])
    jp = jlora.lora.init(jax.random.key(0), cfg, base, lcfg)
    trained = {n: a.replace(a=a.a * 1.1, b=a.b + 0.05) for n, a in jlora.lora.adapters(jp).items()}
    jp = jlora.tree.replace_modules(jp, trained)
    save_adapter(cfg, jp, tmp_path / "pissa", lcfg)
    pm = _peft_load_clean(hf, tmp_path / "pissa", caplog, reload=False)  # a 2nd PiSSA load would re-decompose
    np.testing.assert_allclose(hf_logits(pm, TOKENS), _logits(cfg, jp), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="init_lora_weights='pissa' is not supported"):
        load_adapter(cfg, base, tmp_path / "pissa")


def test_storage_dtype(models, tmp_path):
    _, cfg, base = models["gpt2"]
    jp = jlora.lora.init(jax.random.key(0), cfg, base, jlora.LoraConfig(r=2, alpha=4, init=False))
    save_adapter(cfg, jp, tmp_path / "bf16", dtype="bfloat16")
    st = SafetensorsFile(str(tmp_path / "bf16" / "adapter_model.safetensors"))
    assert {st._entries[k]["dtype"] for k in st.keys()} == {"BF16"}
    ad = jlora.lora.adapters(load_adapter(cfg, base, tmp_path / "bf16"))["transformer.h.0.attn.c_attn"]
    assert ad.a.dtype == np.float32  # trainable factors load in float32 by default
    ad = jlora.lora.adapters(load_adapter(cfg, base, tmp_path / "bf16", dtype=None))["transformer.h.0.attn.c_attn"]
    assert ad.a.dtype == jax.numpy.bfloat16


# ----------------------------------------------------------------------------------------------------------
# Errors


@pytest.fixture(scope="module")
def gpt2_adapter(models, tmp_path_factory):
    hf, _, _ = models["gpt2"]
    d = tmp_path_factory.mktemp("gpt2-adapter")
    _peft_adapter(hf, d, r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"])
    return d


def _copy(src, dst, edit_config=None, edit_tensors=None):
    shutil.copytree(src, dst)
    if edit_config:
        with open(dst / "adapter_config.json") as f:
            c = json.load(f)
        edit_config(c)
        with open(dst / "adapter_config.json", "w") as f:
            json.dump(c, f)
    if edit_tensors:
        st = SafetensorsFile(str(src / "adapter_model.safetensors"))
        tensors = {k: np.array(st.get(k)) for k in st.keys()}
        edit_tensors(tensors)
        write_safetensors(str(dst / "adapter_model.safetensors"), tensors)
    return dst


@pytest.mark.parametrize("option,kw", [
    ("bias", dict(bias="all")),
    ("lora_bias", dict(lora_bias=True)),
])
def test_unsupported_peft_options_are_named(models, tmp_path, option, kw):
    hf, cfg, base = models["gpt2"]
    _peft_adapter(hf, tmp_path, r=2, lora_alpha=4, target_modules=["c_attn"], **kw)
    with pytest.raises(ValueError, match=rf"{option}=.* is not supported"):
        load_adapter(cfg, base, tmp_path)


def test_embedding_lora_is_refused(models, tmp_path):
    hf, cfg, base = models["gpt2"]
    _peft_adapter(hf, tmp_path, r=2, lora_alpha=4, target_modules=["c_attn", "wte"])
    with pytest.raises(ValueError, match=r"lora_embedding_A.* LoRA on an embedding layer"):
        load_adapter(cfg, base, tmp_path)


def test_bad_adapter_files_are_named(models, gpt2_adapter, tmp_path):
    _, cfg, base = models["gpt2"]
    key0 = "base_model.model.transformer.h.0.attn.c_attn"

    def extra_key(t):
        t["base_model.model.transformer.h.7.attn.c_attn.lora_A.weight"] = t[f"{key0}.lora_A.weight"]

    bad = _copy(gpt2_adapter, tmp_path / "extra", edit_tensors=extra_key)
    with pytest.raises(ValueError, match=r"h\.7\.attn\.c_attn\.lora_A\.weight maps to no linear layer"):
        load_adapter(cfg, base, bad)

    bad = _copy(gpt2_adapter, tmp_path / "noB", edit_tensors=lambda t: t.pop(f"{key0}.lora_B.weight"))
    with pytest.raises(ValueError, match=r"h\.0\.attn\.c_attn\.lora_A\.weight has no matching lora_B"):
        load_adapter(cfg, base, bad)

    def drop_module(t):
        t.pop(f"{key0}.lora_A.weight"), t.pop(f"{key0}.lora_B.weight")

    bad = _copy(gpt2_adapter, tmp_path / "nomod", edit_tensors=drop_module)
    with pytest.raises(ValueError, match=r"selects transformer\.h\.0\.attn\.c_attn but the file has no lora_A"):
        load_adapter(cfg, base, bad)

    bad = _copy(gpt2_adapter, tmp_path / "untargeted", edit_config=lambda c: c.update(target_modules=["c_attn"]))
    with pytest.raises(ValueError, match=r"c_fc, which adapter_config.json's target_modules"):
        load_adapter(cfg, base, bad)

    bad = _copy(gpt2_adapter, tmp_path / "rank", edit_config=lambda c: c.update(rank_pattern={"c_fc": 2}))
    with pytest.raises(ValueError, match=r"c_fc\.lora_A\.weight has shape \(4, 32\), expected \(2, 32\)"):
        load_adapter(cfg, base, bad)

    bad = _copy(gpt2_adapter, tmp_path / "pissa", edit_config=lambda c: c.update(init_lora_weights="pissa"))
    with pytest.raises(ValueError, match=r"init_lora_weights='pissa' is not supported.*rewrote"):
        load_adapter(cfg, base, bad)

    bad = _copy(gpt2_adapter, tmp_path / "vera", edit_config=lambda c: c.update(peft_type="VERA"))
    with pytest.raises(ValueError, match=r"peft_type 'VERA' is not supported; jlora reads and writes: .*LORA"):
        load_adapter(cfg, base, bad)

    bad = _copy(gpt2_adapter, tmp_path / "pickle")
    os.rename(bad / "adapter_model.safetensors", bad / "adapter_model.bin")
    with pytest.raises(ValueError, match=r"adapter_model\.bin, a pickle file"):
        load_adapter(cfg, base, bad)


def test_adapter_for_another_model_is_named(models, tmp_path):
    hf_llama, _, _ = models["llama"]
    _, cfg, base = models["gpt2"]
    _peft_adapter(hf_llama, tmp_path / "llama", r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    with pytest.raises(ValueError, match=r"maps to no linear layer of this gpt2 model.*llama-family"):
        load_adapter(cfg, base, tmp_path / "llama")

    wide = make_hf_model("gpt2", n_embd=64)
    _peft_adapter(wide, tmp_path / "wide", r=2, lora_alpha=4, target_modules=["c_attn"])
    with pytest.raises(ValueError, match=r"c_attn\.lora_A\.weight has shape \(2, 64\), expected \(2, 32\)"):
        load_adapter(cfg, base, tmp_path / "wide")


def test_save_refuses_mismatched_lcfg_and_plain_trees(models, tmp_path):
    _, cfg, base = models["llama"]
    with pytest.raises(ValueError, match="params has no adapter"):
        save_adapter(cfg, base, tmp_path / "x")
    jp = jlora.lora.init(jax.random.key(0), cfg, base, jlora.LoraConfig(r=4, alpha=8))
    with pytest.raises(ValueError, match="lcfg does not describe"):
        save_adapter(cfg, jp, tmp_path / "x", jlora.LoraConfig(r=4, alpha=16))
    assert not os.path.exists(tmp_path / "x")


def test_ambiguous_files_and_inconsistent_configs_are_refused(models, gpt2_adapter, tmp_path):
    hf, cfg, base = models["gpt2"]
    # the same parameter twice under two spellings (with and without PEFT's prefix): never silently one of them
    bad = _copy(gpt2_adapter, tmp_path / "twice", edit_tensors=lambda t: t.update(
        {"transformer.h.0.attn.c_attn.lora_A.weight": t["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"]}))
    with pytest.raises(ValueError, match="are the same parameter .*ambiguous"):
        load_adapter(cfg, base, bad)
    # modules_to_save in mcfg must describe the tree's saved modules
    lcfg = jlora.LoraConfig(r=2, alpha=4, target_modules=["c_attn"])
    jp = jlora.lora.init(jax.random.key(0), cfg, base, lcfg)
    with pytest.raises(ValueError, match=r"modules_to_save \['ln_f'\] does not describe .* named but not saved"):
        save_adapter(cfg, jp, tmp_path / "x", lcfg.replace(modules_to_save=("ln_f",)))
    with pytest.raises(ValueError, match="use_dora=True but params holds plain LoRA"):
        save_adapter(cfg, jp, tmp_path / "x", jlora.DoraConfig(r=2, alpha=4, target_modules=["c_attn"]))
    assert not os.path.exists(tmp_path / "x")
    # a run config's method error names the file and the section
    from jlora import run
    with pytest.raises(ValueError, match=r"config: \[method\] kind 'lora': LoraConfig.r must be a positive"):
        run.load_config(None, ["run.dir=x", "data.train=y", "method.r=0"])
