"""`jlora.peft.weighted.combine_adapters` against PEFT's real ``add_weighted_adapter``: every combination type, the
resulting factors and logits, the saved adapter in PEFT, the merge building blocks, and the refusals.

PEFT's randomness and SVD signs are not reproducible from numpy, so where the result depends on them the test
gives both sides the same source: ``torch.bernoulli`` is patched to a fixed pattern that ``dare_mask`` also
returns, and ``torch.linalg.svd`` is patched to numpy's SVD (the factorization jlora uses). A separate test keeps
torch's own SVD and compares what does not depend on signs (the products and the logits).
"""

import copy
import os

import jax
import numpy as np
import pytest

peft = pytest.importorskip("peft")
torch = pytest.importorskip("torch")

import jlora  # noqa: E402
from conftest import hf_logits  # noqa: E402
from jlora.peft import saved as S  # noqa: E402
from jlora.peft import weighted as W  # noqa: E402
from peft.utils import merge_utils as MU  # noqa: E402

TOKENS = np.random.default_rng(0).integers(0, 128, (2, 7)).astype(np.int32)
TOL = 1e-4

# Three Llama adapters: equal ranks for the pair (different targets: the union rule), a third of another rank.
LLAMA = {
    "ad1": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "ad2": dict(r=4, lora_alpha=16, target_modules=["q_proj", "up_proj"]),
    "ad3": dict(r=2, lora_alpha=6, target_modules=["v_proj", "o_proj", "lm_head"]),
}
GPT2 = {
    "ad1": dict(r=4, lora_alpha=8, target_modules=["c_attn"]),
    "ad2": dict(r=4, lora_alpha=4, target_modules=["c_attn", "c_fc"]),
}
PAIR, TRIPLE = ["ad1", "ad2"], ["ad1", "ad2", "ad3"]
W2, W3 = [0.7, -0.4], [0.7, -0.4, 1.3]

# (combination type, adapters, weights, options)
CASES = [
    ("linear", PAIR, W2, {}),
    ("cat", TRIPLE, W3, {}),
    ("svd", TRIPLE, W3, {}),
    ("svd", TRIPLE, W3, dict(svd_rank=3, svd_clamp=0.9, svd_full_matrices=False)),
    ("ties", PAIR, W2, dict(density=0.5)),
    ("ties", PAIR, W2, dict(density=0.4, majority_sign_method="frequency")),
    ("ties_svd", TRIPLE, W3, dict(density=0.5)),
    ("dare_linear", PAIR, W2, dict(density=0.6)),
    ("dare_ties", PAIR, W2, dict(density=0.6, majority_sign_method="frequency")),
    ("dare_linear_svd", TRIPLE, W3, dict(density=0.6)),
    ("dare_ties_svd", TRIPLE, W3, dict(density=0.7, svd_rank=5)),
    ("magnitude_prune", PAIR, W2, dict(density=0.3)),
    ("magnitude_prune_svd", TRIPLE, W3, dict(density=0.3, svd_clamp=0.95)),
]


def _mask(shape, p):
    """A fixed 0/1 pattern per shape (what the patched torch.bernoulli and jlora's dare_mask both return)."""
    return (np.random.default_rng(list(shape)).random(shape) < p).astype(np.float32)


def _numpy_svd(a, full_matrices=True, driver=None):
    u, s, vh = np.linalg.svd(a.detach().numpy(), full_matrices=full_matrices)
    return torch.from_numpy(u), torch.from_numpy(s), torch.from_numpy(vh)


@pytest.fixture
def same_randomness(monkeypatch):
    """PEFT with numpy's SVD and fixed DARE masks; returns ``opts -> opts`` with the matching ``dare_mask`` for
    jlora added to the options of a DARE type."""
    monkeypatch.setattr(torch.linalg, "svd", _numpy_svd)
    monkeypatch.setattr(torch, "bernoulli", lambda p: torch.from_numpy(_mask(tuple(p.shape), float(p.flatten()[0]))))

    def jlora_opts(ctype, opts):
        if not ctype.startswith("dare"):
            return opts
        return dict(opts, dare_mask=lambda module, factor, index, shape: _mask(shape, opts["density"]))

    return jlora_opts


def _make(kind, models, tmp_path_factory, configs, extra=None):
    hf, cfg, base = models[kind]
    dirs = {}
    for i, (name, kw) in enumerate(configs.items()):
        torch.manual_seed(10 + i)
        pm = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(init_lora_weights=False, **kw))
        if extra and name in extra:
            extra[name](pm)
        d = tmp_path_factory.mktemp(f"{kind}-{name}")
        pm.save_pretrained(d)
        dirs[name] = str(d)
    names = list(configs)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf), dirs[names[0]], adapter_name=names[0])
    for n in names[1:]:
        pm.load_adapter(dirs[n], adapter_name=n)
    pm.eval()
    trees = {n: jlora.load_adapter(cfg, base, d) for n, d in dirs.items()}
    return {"hf": hf, "cfg": cfg, "base": base, "pm": pm, "trees": trees, "dirs": dirs}


@pytest.fixture(scope="module")
def llama(models, tmp_path_factory):
    return _make("llama", models, tmp_path_factory, LLAMA)


@pytest.fixture(scope="module")
def gpt2(models, tmp_path_factory):
    return _make("gpt2", models, tmp_path_factory, GPT2)


COUNTER = [0]


def _peft_combine(env, names, weights, ctype, **opts):
    """PEFT's add_weighted_adapter: ({module: (A [r, in], B [out, r], scaling)}, logits)."""
    pm = env["pm"]
    COUNTER[0] += 1
    new = f"mix{COUNTER[0]}"
    pm.add_weighted_adapter(names, weights, new, combination_type=ctype, **opts)
    pm.set_adapter(new)
    out = {}
    for name, mod in pm.named_modules():
        if hasattr(mod, "lora_A") and new in mod.lora_A:
            out[name[len("base_model.model."):]] = (mod.lora_A[new].weight.detach().numpy().copy(),
                                                    mod.lora_B[new].weight.detach().numpy().copy(),
                                                    mod.scaling[new])
    logits = hf_logits(pm, TOKENS)
    pm.set_adapter(names[0])
    pm.delete_adapter(new)
    return out, logits


def _compare(env, ref, tree, exact_factors=True):
    ads = jlora.lora.adapters(tree)
    assert set(ads) == set(ref)
    worst = 0.0
    for m, (A, Bm, scaling) in ref.items():
        n = ads[m]
        assert scaling == 1.0 and n.scale == 1.0, m
        a, b = np.asarray(n.a).T, np.asarray(n.b).T
        assert a.shape == A.shape and b.shape == Bm.shape, m
        if exact_factors:
            np.testing.assert_allclose(a, A, atol=2e-5, rtol=1e-4, err_msg=m)
            np.testing.assert_allclose(b, Bm, atol=2e-5, rtol=1e-4, err_msg=m)
            worst = max(worst, float(np.abs(a - A).max()), float(np.abs(b - Bm).max()))
        np.testing.assert_allclose(b @ a, Bm @ A, atol=2e-5, rtol=1e-4, err_msg=m)
    return worst


def _logits(env, tree, merged=True):
    """The logits of the combined adapter; by default through `jlora.merge` (one compilation for every rank:
    the LoRA forward of such trees is compared with PEFT in test_cat_is_exact_and_saved_adapter_loads_in_peft)."""
    return np.asarray(jlora.apply(env["cfg"], jlora.merge(tree) if merged else tree, TOKENS))


@pytest.mark.parametrize("ctype,names,weights,opts", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_every_type_matches_peft_llama(llama, ctype, names, weights, opts, same_randomness):
    ref, ref_logits = _peft_combine(llama, names, weights, ctype, **opts)
    tree = W.combine_adapters([llama["trees"][n] for n in names], weights, ctype, **same_randomness(ctype, opts))
    worst = _compare(llama, ref, tree)
    out = _logits(llama, tree)
    assert np.abs(ref_logits - hf_logits(llama["hf"], TOKENS)).max() > 1e-3  # the combination does something
    np.testing.assert_allclose(out, ref_logits, atol=TOL, rtol=0)
    print(f"{ctype} {opts}: factors {worst:.2e}, logits {np.abs(out - ref_logits).max():.2e}")


@pytest.mark.parametrize("ctype,opts", [("linear", {}), ("cat", {}), ("svd", dict(svd_rank=6)),
                                        ("ties", dict(density=0.5)), ("dare_linear", dict(density=0.5))])
def test_gpt2_with_fused_slices_matches_peft(gpt2, models, tmp_path, ctype, opts, same_randomness):
    """A jlora adapter on the q and v slices of GPT-2's fused c_attn (exported to PEFT with zero rows) combined
    with PEFT adapters: the slices are expanded to full columns, as PEFT sees them."""
    hf, cfg, base = models["gpt2"]
    sliced = jlora.lora.init(jax.random.key(5), cfg, base, jlora.LoraConfig(r=4, alpha=12, target_modules=["c_attn"],
                                                                            fused_qkv=("q", "v"), init=False))
    jlora.save_adapter(cfg, sliced, tmp_path / "sliced")
    gpt2["pm"].load_adapter(str(tmp_path / "sliced"), adapter_name="sl")
    try:
        names, weights = ["ad1", "ad2", "sl"], [0.6, 0.8, -0.5]
        ref, ref_logits = _peft_combine(gpt2, names, weights, ctype, **opts)
        tree = W.combine_adapters([gpt2["trees"]["ad1"], gpt2["trees"]["ad2"], sliced], weights, ctype,
                                  **same_randomness(ctype, opts))
    finally:
        gpt2["pm"].delete_adapter("sl")
        gpt2["pm"].set_adapter("ad1")
    assert all(n.slices is None for n in jlora.lora.adapters(tree).values())
    _compare(gpt2, ref, tree)
    np.testing.assert_allclose(_logits(gpt2, tree), ref_logits, atol=TOL, rtol=0)


def test_torch_svd_unpatched_same_products_and_logits(llama):
    """With torch's own SVD the singular vectors' signs may differ; the product B A and the logits may not."""
    for opts in ({}, dict(svd_rank=2)):
        ref, ref_logits = _peft_combine(llama, TRIPLE, W3, "svd", **opts)
        tree = W.combine_adapters([llama["trees"][n] for n in TRIPLE], W3, "svd", **opts)
        _compare(llama, ref, tree, exact_factors=False)
        np.testing.assert_allclose(_logits(llama, tree), ref_logits, atol=TOL, rtol=0)


def test_cat_is_exact_and_saved_adapter_loads_in_peft(llama, tmp_path, caplog):
    """cat: the delta is the weighted sum of deltas; the saved result loads in PEFT (no key warnings) and in
    jlora (bitwise), with the same logits."""
    trees = [llama["trees"][n] for n in TRIPLE]
    for ctype, opts in (("cat", {}), ("svd", dict(svd_rank=3)), ("ties", dict(density=0.5))):
        names = TRIPLE if ctype != "ties" else PAIR
        tree = W.combine_adapters(trees[:len(names)], W3[:len(names)], ctype, **opts)
        if ctype == "cat":
            for m, n in jlora.lora.adapters(tree).items():
                want = sum(w * jlora.lora.adapters(t)[m].delta() for w, t in zip(W3, trees)
                           if m in jlora.lora.adapters(t))
                np.testing.assert_allclose(np.asarray(n.delta()), np.asarray(want), atol=1e-6, err_msg=m)
                assert n.rank == 10  # 4 + 4 + 2, zero-padded where an adapter lacks the module
        d = tmp_path / ctype
        jlora.save_adapter(llama["cfg"], tree, d)
        caplog.clear()
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(llama["hf"]), str(d)).eval()
        assert not [r for r in caplog.records if r.levelname in ("WARNING", "ERROR")], caplog.text
        out = _logits(llama, tree, merged=False)
        np.testing.assert_allclose(hf_logits(loaded, TOKENS), out, atol=TOL, rtol=0)
        np.testing.assert_allclose(_logits(llama, tree), out, atol=TOL, rtol=0)
        back = jlora.load_adapter(llama["cfg"], llama["base"], d)
        for x, y in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(tree)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_single_adapter_is_linear(llama):
    """PEFT turns any type into linear for one adapter: sqrt(|w s|) on both factors, the sign on A."""
    ref, ref_logits = _peft_combine(llama, ["ad3"], [-0.8], "svd")
    tree = W.combine_adapters([llama["trees"]["ad3"]], [-0.8], "svd")
    _compare(llama, ref, tree)
    np.testing.assert_allclose(_logits(llama, tree), ref_logits, atol=TOL, rtol=0)


def test_modules_to_save_as_peft(models, tmp_path_factory):
    """The first adapter's modules_to_save go to the new adapter with the base's values (PEFT's rule); two
    adapters that save the same module are refused by both."""

    def perturb(pm):
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if ".modules_to_save." in n:
                    p.add_(0.5 * torch.randn_like(p))

    env = _make("llama", models, tmp_path_factory,
                {"s1": dict(r=2, lora_alpha=4, target_modules=["q_proj"], modules_to_save=["lm_head"]),
                 "s2": dict(r=2, lora_alpha=4, target_modules=["v_proj"]),
                 "s3": dict(r=2, lora_alpha=4, target_modules=["k_proj"], modules_to_save=["lm_head"])},
                extra={"s1": perturb, "s3": perturb})
    trees = env["trees"]
    ref, ref_logits = _peft_combine(env, ["s1", "s2"], [1.0, 0.5], "cat")
    tree = W.combine_adapters([trees["s1"], trees["s2"]], [1.0, 0.5], "cat")
    saved = S.saved_modules(tree)
    assert list(saved) == ["lm_head.kernel"]
    np.testing.assert_array_equal(np.asarray(saved["lm_head.kernel"].base),
                                  np.asarray(env["base"]["lm_head"]["kernel"]))
    _compare(env, ref, tree)
    np.testing.assert_allclose(_logits(env, tree), ref_logits, atol=TOL, rtol=0)
    # the second adapter's saved module is not the new adapter's: PEFT keeps none
    ref, ref_logits = _peft_combine(env, ["s2", "s1"], [0.5, 1.0], "cat")
    tree = W.combine_adapters([trees["s2"], trees["s1"]], [0.5, 1.0], "cat")
    assert not S.saved_modules(tree)
    np.testing.assert_allclose(_logits(env, tree), ref_logits, atol=TOL, rtol=0)
    with pytest.raises(ValueError, match="same module with modules_to_save"):
        env["pm"].add_weighted_adapter(["s1", "s3"], [1.0, 1.0], "bad", combination_type="cat")
    with pytest.raises(ValueError, match=r"adapters \[0, 1\] all save lm_head whole \(modules_to_save\)"):
        W.combine_adapters([trees["s1"], trees["s3"]], [1.0, 1.0], "cat")
    with pytest.raises(ValueError, match="lm_head.kernel is saved whole .* by the only adapter"):
        W.combine_adapters([trees["s1"]], [1.0], "cat")


# ----------------------------------------------------------------------------------------------------------
# DARE with jlora's own key: the defining properties


def test_dare_key_properties(llama):
    t1, t2 = llama["trees"]["ad1"], llama["trees"]["ad2"]
    ref = jlora.lora.adapters(t1)
    density = 0.3
    kept, seen = [], []
    for seed in (0, 1):
        # the second weight is 0, so on ad1's modules A = sqrt(s1) * mask * a1 / density, B = sqrt(s1) * mask * b1
        tree = W.combine_adapters([t1, t2], [1.0, 0.0], "dare_linear", density=density, key=jax.random.key(seed))
        out = jlora.lora.adapters(tree)
        nz_all = []
        for m, r in ref.items():
            root = np.sqrt(float(r.scale))
            for got, want in ((out[m].a, root * np.asarray(r.a) / density),
                              (out[m].b, root * np.asarray(r.b) / density)):
                got = np.asarray(got)
                nz = got != 0
                np.testing.assert_allclose(got[nz], want[nz], rtol=1e-5, err_msg=m)
                nz_all.append(nz.reshape(-1))
        nz_all = np.concatenate(nz_all)
        kept.append(nz_all.mean())
        seen.append(nz_all)
    assert nz_all.size > 1500
    assert all(abs(k - density) < 0.04 for k in kept), kept  # ~1800 entries: sigma 0.011
    assert (seen[0] != seen[1]).any()  # another key, another mask
    q = "model.layers.1.self_attn.q_proj"
    same = W.combine_adapters([t1, t2], [1.0, 0.0], "dare_linear", density=density, key=jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(jlora.lora.adapters(same)[q].a), np.asarray(
        jlora.lora.adapters(W.combine_adapters([t1, t2], [1.0, 0.0], "dare_linear", density=density,
                                               key=jax.random.key(0)))[q].a))
    # density 1.0 keeps everything: dare_linear == linear, dare_ties == ties, *_svd the same (nothing drawn)
    for dare, det in (("dare_linear", "linear"), ("dare_ties", "ties"), ("dare_linear_svd", "svd"),
                      ("dare_ties_svd", "ties_svd")):
        kd = dict(density=1.0) if "ties" in det else {}
        x = W.combine_adapters([t1, t2], W2, dare, density=1.0)
        y = W.combine_adapters([t1, t2], W2, det, **kd)
        for lx, ly in zip(jax.tree_util.tree_leaves(x), jax.tree_util.tree_leaves(y)):
            np.testing.assert_array_equal(np.asarray(lx), np.asarray(ly))


def test_dare_density_one_matches_peft_unpatched(llama):
    ref, ref_logits = _peft_combine(llama, PAIR, W2, "dare_ties", density=1.0)
    tree = W.combine_adapters([llama["trees"][n] for n in PAIR], W2, "dare_ties", density=1.0)
    _compare(llama, ref, tree)
    np.testing.assert_allclose(_logits(llama, tree), ref_logits, atol=TOL, rtol=0)


# ----------------------------------------------------------------------------------------------------------
# The building blocks against peft.utils.merge_utils on the same tensors and masks


@pytest.mark.parametrize("shape", [(6, 5), (4, 3, 2)])
def test_merge_functions_match_peft(shape, monkeypatch):
    rng = np.random.default_rng(1)
    ts = [rng.standard_normal(shape).astype(np.float32) for _ in range(3)]
    ts[1][0] = 0.0  # zeros: no sign, not counted by the disjoint mean
    ws = [0.5, -1.2, 2.0]
    masks = [(rng.random(shape) < 0.5).astype(np.float32) for _ in ts]
    tt, tw = [torch.from_numpy(t) for t in ts], torch.tensor(ws)
    calls = iter(masks)
    monkeypatch.setattr(torch, "bernoulli", lambda p: torch.from_numpy(next(calls)))
    for density in (0.0, 0.3, 0.5, 1.0):
        for method in ("total", "frequency"):
            close = lambda x, y: np.testing.assert_allclose(x, y.numpy(), atol=1e-6, rtol=1e-6)  # noqa: E731
            close(W.ties(ts, ws, density, method), MU.ties(tt, tw, density, method))
            if density > 0:
                calls = iter(masks)
                close(W.dare_ties(ts, ws, density, masks, method), MU.dare_ties(tt, tw, density, method))
        close(W.magnitude_prune(ts, ws, density), MU.magnitude_prune(tt, tw, density))
        close(W.task_arithmetic(ts, ws), MU.task_arithmetic(tt, tw))
        if density > 0:
            calls = iter(masks)
            close(W.dare_linear(ts, ws, density, masks), MU.dare_linear(tt, tw, density))
        for t in ts:
            close(W.prune_magnitude(t, density), MU.prune(torch.from_numpy(t), density, "magnitude"))
        assert W.majority_sign_mask(np.stack(ts)).dtype == bool


# ----------------------------------------------------------------------------------------------------------
# Refusals


def test_refusals(llama, models):
    _, cfg, base = models["llama"]
    t = llama["trees"]
    pair, triple = [t["ad1"], t["ad2"]], [t["ad1"], t["ad2"], t["ad3"]]
    patterned = jlora.lora.init(jax.random.key(0), cfg, base,
                                jlora.LoraConfig(r=4, rank_pattern={"v_proj": 2}, init=False))
    bad = [
        (lambda: W.combine_adapters(pair, W2, "average"), r"combination_type must be one of \['svd', 'linear'"),
        (lambda: W.combine_adapters(pair, [1.0], "cat"), "weights must have one entry per adapter: expected 2, got 1"),
        (lambda: W.combine_adapters(pair, [1.0, "x"], "cat"), r"weights\[1\] must be a finite number"),
        (lambda: W.combine_adapters([], [], "cat"), "adapters is empty"),
        (lambda: W.combine_adapters(triple, W3, "linear"), r"needs adapters of equal rank .* ranks \[4, 4, 2\]"),
        (lambda: W.combine_adapters([t["ad1"], patterned], W2, "linear"),
         r"needs equal ranks in every module, but model.layers.0.self_attn.v_proj has ranks \[4, 2\]"),
        (lambda: W.combine_adapters(triple, W3, "dare_ties", density=0.5, key=jax.random.key(0)),
         "needs adapters of equal rank"),
        (lambda: W.combine_adapters(pair, W2, "ties"), r"needs density in \[0, 1\] .* got None"),
        (lambda: W.combine_adapters(pair, W2, "magnitude_prune_svd", density=1.5), r"needs density in \[0, 1\]"),
        (lambda: W.combine_adapters(pair, W2, "dare_linear", density=0.0, key=jax.random.key(0)),
         r"needs density in \(0, 1\]"),
        (lambda: W.combine_adapters(pair, W2, "linear", density=0.5), "density applies to"),
        (lambda: W.combine_adapters(pair, W2, "dare_linear", density=0.5), "pass key=jax.random.key"),
        (lambda: W.combine_adapters(pair, W2, "ties", density=0.5, majority_sign_method="max"),
         r"majority_sign_method must be one of \['total', 'frequency'\], got 'max'"),
        (lambda: W.combine_adapters(pair, W2, "cat", svd_rank=2), "svd_rank must be a positive integer"),
        (lambda: W.combine_adapters(pair, W2, "svd", svd_rank=0), "svd_rank must be a positive integer"),
        (lambda: W.combine_adapters(pair, W2, "svd", svd_clamp=1.5), r"svd_clamp must be a quantile in \[0, 1\]"),
        (lambda: W.combine_adapters(pair, W2, "svd", svd_rank=65), "svd_rank 65 exceeds the dimensions of"),
    ]
    for call, msg in bad:
        with pytest.raises(ValueError, match=msg):
            call()
    # PEFT refuses the unequal ranks too
    with pytest.raises(ValueError, match="same r value"):
        llama["pm"].add_weighted_adapter(TRIPLE, W3, "bad", combination_type="linear")


def test_refuses_other_methods_and_other_bases(llama, models):
    _, cfg, base = models["llama"]
    a = llama["trees"]["ad1"]
    dora = jlora.lora.init(jax.random.key(0), cfg, base, jlora.LoraConfig(r=4, use_dora=True, init=False))
    with pytest.raises(ValueError, match=r"adapters\[1\] holds a DoRA node \(method 'dora'\) at model\.layers\.0"):
        W.combine_adapters([a, dora], [1.0, 1.0], "cat")
    from jlora.peft import ia3

    i3 = ia3.init(jax.random.key(0), cfg, base, ia3.IA3Config(init_ia3_weights=False))
    with pytest.raises(ValueError, match=r"adapters\[0\] holds a IA3 node \(method 'ia3'\)"):
        W.combine_adapters([i3, a], [1.0, 1.0], "cat")
    _, gcfg, gbase = models["gpt2"]
    g = jlora.lora.init(jax.random.key(0), gcfg, gbase, jlora.LoraConfig(r=4, init=False))
    with pytest.raises(ValueError, match=r"adapters\[1\] is on a different base than adapters\[0\]"):
        W.combine_adapters([a, g], [1.0, 1.0], "cat")
    other = jax.tree_util.tree_map(lambda x: x, base)
    other["model"] = dict(other["model"], norm=dict(other["model"]["norm"]))
    other["model"]["norm"]["scale"] = other["model"]["norm"]["scale"] + 1.0
    o = jlora.lora.init(jax.random.key(0), cfg, other, jlora.LoraConfig(r=4, init=False))
    with pytest.raises(ValueError, match="different bases: model.norm.scale differs"):
        W.combine_adapters([a, o], [1.0, 1.0], "cat")
    with pytest.raises(ValueError, match=r"adapters\[0\] holds no LoRA kernel"):
        W.combine_adapters([base, a], [1.0, 1.0], "cat")


def test_cli_combine_writes_the_combined_adapter(llama, tmp_path, capsys):
    """`jlora combine` = combine_adapters on the same adapters, written as a PEFT adapter; bad flags are one-line
    errors that leave an existing output alone."""
    from jlora.cli import main

    model = tmp_path / "model"
    jlora.save_pretrained(llama["cfg"], llama["base"], str(model))
    out = tmp_path / "combined"
    d1, d2 = llama["dirs"]["ad1"], llama["dirs"]["ad2"]
    args = ["combine", "--model", str(model), "--adapter", d1, "--adapter", d2, "--out", str(out)]
    assert main(args + ["--weights", "0.7", "-0.4", "--type", "ties", "--density", "0.5"]) == 0
    assert "combined 2 adapters (ties" in capsys.readouterr().out
    want = W.combine_adapters([llama["trees"]["ad1"], llama["trees"]["ad2"]], [0.7, -0.4], "ties", density=0.5)
    got = jlora.load_adapter(llama["cfg"], llama["base"], str(out))
    w, g = jlora.lora.adapters(want), jlora.lora.adapters(got)
    assert set(w) == set(g)
    for m in w:
        np.testing.assert_allclose(np.asarray(g[m].delta()), np.asarray(w[m].delta()), atol=1e-6)
    before = sorted(os.listdir(out))
    assert main(args + ["--weights", "1.0", "--type", "cat"]) == 1
    assert "--weights: 1 weight(s) for 2 --adapter(s)" in capsys.readouterr().err
    assert main(args + ["--weights", "1.0", "1.0", "--type", "cat"]) == 1
    assert "exists and is not empty" in capsys.readouterr().err
    assert main(args + ["--weights", "1.0", "1.0", "--type", "ties", "--overwrite"]) == 1  # needs a density
    assert "density" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == before
    assert main(args + ["--weights", "1.0", "1.0", "--type", "cat", "--overwrite"]) == 0
    assert jlora.lora.adapters(jlora.load_adapter(llama["cfg"], llama["base"], str(out)))[
        "model.layers.0.self_attn.q_proj"].rank == 8
