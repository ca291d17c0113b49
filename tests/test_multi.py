"""Many adapters on one base (`jlora.peft.multi.AdapterSet`): mixed-adapter batches against PEFT's
``adapter_names`` forward, per-row equality with each adapter alone, generation, run-time add/replace/remove
without recompiling, and clear refusals."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

peft = pytest.importorskip("peft")
torch = pytest.importorskip("torch")

import jlora  # noqa: E402
from conftest import hf_logits  # noqa: E402
from jlora.peft.multi import AdapterSet, MultiKernel  # noqa: E402

TOKENS = np.random.default_rng(1).integers(2, 128, (5, 9)).astype(np.int32)

LORAS = {
    "gpt2": {
        "qkv": dict(r=4, lora_alpha=8, target_modules=["c_attn"]),
        "wide": dict(r=8, lora_alpha=16, use_rslora=True, target_modules=["c_attn", "c_proj", "c_fc"],
                     rank_pattern={"c_fc": 2}),
        "mlp": dict(r=2, lora_alpha=3, target_modules=["c_fc"]),
    },
    "llama": {
        "qkv": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "wide": dict(r=8, lora_alpha=16, use_rslora=True,
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                     rank_pattern={"down_proj": 2}, alpha_pattern={"o_proj": 3}),
        "mlp": dict(r=2, lora_alpha=3, target_modules=["up_proj", "down_proj"]),
    },
}


def _save(hf, out_dir, config, seed):
    torch.manual_seed(seed)
    pm = peft.get_peft_model(copy.deepcopy(hf), config)
    with torch.no_grad():  # DoRA magnitudes / IA3 vectors away from their neutral start
        for n, p in pm.named_parameters():
            if "lora_magnitude" in n or "ia3_l" in n:
                p.mul_(1.0 + 0.2 * torch.randn_like(p))
    pm.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def setups(models, tmp_path_factory):
    """{kind: (hf, cfg, base, {name: adapter dir})} with three LoRA adapters, a DoRA and an IA3 adapter."""
    out = {}
    for kind, (hf, cfg, base) in models.items():
        dirs = {}
        for i, (name, kw) in enumerate(LORAS[kind].items()):
            dirs[name] = _save(hf, str(tmp_path_factory.mktemp(f"{kind}-{name}")),
                               peft.LoraConfig(init_lora_weights=False, **kw), i)
        tq = "c_attn" if kind == "gpt2" else "q_proj"
        dirs["dora"] = _save(hf, str(tmp_path_factory.mktemp(f"{kind}-dora")),
                             peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, init_lora_weights=False,
                                             target_modules=[tq, "c_fc" if kind == "gpt2" else "up_proj"]), 7)
        ff = "c_fc" if kind == "gpt2" else "down_proj"
        att = "c_attn" if kind == "gpt2" else "k_proj"
        dirs["ia3"] = _save(hf, str(tmp_path_factory.mktemp(f"{kind}-ia3")),
                            peft.IA3Config(target_modules=[att, ff], feedforward_modules=[ff]), 8)
        out[kind] = (hf, cfg, base, dirs)
    return out


def _peft_multi(hf, dirs, names):
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf), dirs[names[0]], adapter_name=names[0])
    for n in names[1:]:
        pm.load_adapter(dirs[n], adapter_name=n)
    return pm.eval()


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_mixed_batch_equals_peft_adapter_names(setups, kind):
    hf, cfg, base, dirs = setups[kind]
    names = ["qkv", "wide", "mlp"]
    s = AdapterSet(cfg, base, capacity=4, rank_bucket=4)
    for n in names:
        s.add(n, dirs[n])
    rows = ["wide", "__base__", "qkv", "mlp", "wide"]
    got = np.asarray(s.apply(TOKENS, rows))
    pm = _peft_multi(hf, dirs, names)
    with torch.no_grad():
        want = pm(input_ids=torch.tensor(TOKENS, dtype=torch.long), adapter_names=rows).logits.numpy()
    assert np.abs(got - want).max() <= 1e-4
    # Each row equals that adapter alone (and the base row equals the base).
    for i, n in enumerate(rows):
        alone = base if n == "__base__" else jlora.load_adapter(cfg, base, dirs[n])
        np.testing.assert_allclose(got[i], np.asarray(jlora.apply(cfg, alone, TOKENS[i:i + 1]))[0], atol=1e-5)
    np.testing.assert_allclose(got[1], hf_logits(hf, TOKENS[1:2])[0], atol=1e-4)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_dora_and_ia3_rows_equal_peft_alone(setups, kind):
    """PEFT refuses adapter_names with DoRA and has none for IA3; jlora mixes them (their outside-training math
    is per-row scales), so each row is checked against PEFT running that adapter alone."""
    hf, cfg, base, dirs = setups[kind]
    s = AdapterSet(cfg, base)
    for n in ("dora", "ia3", "qkv"):
        s.add(n, dirs[n])
    rows = ["ia3", "dora", "qkv", "__base__", "dora"]
    got = np.asarray(s.apply(TOKENS, rows))
    for n in ("dora", "ia3"):
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf), dirs[n]).eval()
        want = hf_logits(pm, TOKENS)
        for i in [i for i, r in enumerate(rows) if r == n]:
            assert np.abs(got[i] - want[i]).max() <= 1e-4, n
    np.testing.assert_allclose(got[3], hf_logits(hf, TOKENS[3:4])[0], atol=1e-4)


def test_generate_greedy_and_beam_keep_each_rows_adapter(setups):
    hf, cfg, base, dirs = setups["llama"]
    s = AdapterSet(cfg, base)
    for n in ("qkv", "wide", "dora"):
        s.add(n, dirs[n])
    prompts = [[5, 6, 7], [9], [11, 12], [3, 4, 5, 6]]
    rows = ["wide", "qkv", "__base__", "dora"]
    for kw in (dict(), dict(num_beams=3, no_repeat_ngram_size=2)):
        got = s.generate(prompts, rows, 6, eos_token_id=(), **kw)
        for p, n, g in zip(prompts, rows, got):
            alone = s.tree(n)
            assert g == jlora.generate(cfg, alone, [p], 6, eos_token_id=(), **kw)[0], (n, kw)


def test_add_replace_remove_without_recompiling(setups):
    from jlora.peft import multi

    hf, cfg, base, dirs = setups["llama"]
    s = AdapterSet(cfg, base, capacity=4, rank_bucket=8)
    s.add("wide", dirs["wide"])
    s.add("qkv", dirs["qkv"])
    assert s.layout_changes == 1  # the first adapter lays the arrays out
    s.apply(TOKENS, ["wide", "qkv", "__base__", "wide", "qkv"]).block_until_ready()
    compiled = multi._apply_jit._cache_size()
    # A new adapter in a free slot, on modules the set holds, of a rank within the bucket: values change only.
    s.add("mlp", dirs["mlp"])
    got = np.asarray(s.apply(TOKENS, ["mlp", "qkv", "__base__", "wide", "mlp"]))
    np.testing.assert_allclose(got[0], np.asarray(jlora.apply(cfg, s.tree("mlp"), TOKENS[:1]))[0], atol=1e-5)
    s.add("qkv", dirs["mlp"], replace=True)  # replaced in place
    got = np.asarray(s.apply(TOKENS, ["mlp", "qkv", "__base__", "wide", "mlp"]))
    np.testing.assert_allclose(got[1], np.asarray(
        jlora.apply(cfg, jlora.load_adapter(cfg, base, dirs["mlp"]), TOKENS[1:2]))[0], atol=1e-5)
    s.remove("wide")  # its slot is neutral again and free
    assert s.names == ["qkv", "mlp"]
    s.add("wide2", dirs["wide"])
    got = np.asarray(s.apply(TOKENS, ["wide2", "qkv", "__base__", "wide2", "mlp"]))
    np.testing.assert_allclose(got[0], np.asarray(
        jlora.apply(cfg, jlora.load_adapter(cfg, base, dirs["wide"]), TOKENS[:1]))[0], atol=1e-5)
    assert s.layout_changes == 1 and multi._apply_jit._cache_size() == compiled
    # Growing the shapes is counted: a fifth adapter beyond 4 slots doubles the slots.
    s.add("extra0", dirs["qkv"])
    assert len(s.names) == 4 and s.capacity == 4 and s.layout_changes == 1
    s.add("extra1", dirs["qkv"])
    assert s.capacity == 8 and s.layout_changes == 2
    got = np.asarray(s.apply(TOKENS, ["extra1", "wide2", "__base__", "mlp", "extra0"]))
    for i, n in enumerate(["extra1", "wide2", "__base__", "mlp", "extra0"]):
        np.testing.assert_allclose(got[i], np.asarray(jlora.apply(cfg, s.tree(n), TOKENS[i:i + 1]))[0], atol=1e-5)
    # What one more adapter costs: one slot of every stacked array.
    node = next(k for k in jlora.tree.linear_modules(s.params).values() if isinstance(k, MultiKernel))
    assert s.adapter_bytes() > 0 and node.a.shape[0] == 9
    assert s.adapter_bytes("mlp") < s.adapter_bytes("wide2")


def test_qlora_adapters_on_a_quantized_base(setups):
    hf, cfg, base, dirs = setups["llama"]
    qbase = jlora.quantize_params(cfg, base, "nf4")
    s = AdapterSet(cfg, qbase)
    s.add("qkv", jlora.load_adapter(cfg, qbase, dirs["qkv"]))
    s.add("wide", jlora.load_adapter(cfg, qbase, dirs["wide"]))
    got = np.asarray(s.apply(TOKENS[:3], ["qkv", "wide", "__base__"]))
    for i, n in enumerate(["qkv", "wide", "__base__"]):
        np.testing.assert_allclose(got[i], np.asarray(jlora.apply(cfg, s.tree(n), TOKENS[i:i + 1]))[0], atol=1e-5)


def test_refusals_name_the_problem(setups, tmp_path):
    hf, cfg, base, dirs = setups["llama"]
    s = AdapterSet(cfg, base)
    s.add("qkv", dirs["qkv"])
    with pytest.raises(ValueError, match="already loaded"):
        s.add("qkv", dirs["qkv"])
    with pytest.raises(ValueError, match="other than '__base__'"):
        s.add("__base__", dirs["qkv"])
    with pytest.raises(ValueError, match=r"unknown adapter 'nope'; loaded: \['qkv'\]"):
        s.apply(TOKENS[:1], ["nope"])
    with pytest.raises(ValueError, match="one adapter name per row"):
        s.apply(TOKENS, ["qkv"])
    with pytest.raises(KeyError, match="no adapter named"):
        s.remove("nope")
    prefix = jlora.prefix.init(jax.random.key(0), cfg, base, jlora.PrefixConfig(num_virtual_tokens=2))
    with pytest.raises(ValueError, match="cannot apply per batch row"):
        s.add("pre", prefix)
    saved = jlora.lora.init(jax.random.key(0), cfg, base, jlora.LoraConfig(modules_to_save=("lm_head",)))
    with pytest.raises(ValueError, match="modules_to_save"):
        s.add("mts", saved)
    other = jax.tree_util.tree_map(lambda x: x + 1.0, base)
    with pytest.raises(ValueError, match="different base kernel"):
        s.add("other", jlora.load_adapter(cfg, other, dirs["qkv"]))
    with pytest.raises(ValueError, match="already holds a LoRA node"):
        AdapterSet(cfg, jlora.load_adapter(cfg, base, dirs["qkv"]))
    with pytest.raises(ValueError, match="merge that"):
        jlora.kernels.materialize(next(k for k in jlora.tree.linear_modules(s.params).values()
                                       if isinstance(k, MultiKernel)))
    with pytest.raises(ValueError, match="needs the adapter of each batch row"):
        jlora.apply(cfg, s.params, TOKENS)
    assert "qkv" in s and s.names == ["qkv"]  # nothing that failed changed the set
