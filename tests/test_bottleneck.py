"""Bottleneck adapters (Pfeiffer, Houlsby, parallel) against the real AdapterHub `adapters` library both ways (GPT-2
and Llama with GQA), identity at init, bitwise round trips, training (only the adapters train; resume; 8 simulated
devices), and clear errors.

The reference runs in its own environment (``.venv-adapters``, built by ``bash dev.sh test`` from
constraints-adapters.txt: adapters pins transformers 4.57) as ONE subprocess for this module
(tests/adapters_ref.py): the autouse module fixture ``reference`` writes jlora's adapters, then starts the
reference on every case at once; the parity tests, last in this file, wait for it while the jlora-only tests run.
Without that environment the parity tests skip, except under CI=true, where they fail.
"""

import dataclasses
import json
import os
import shutil
import subprocess
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from conftest import adam_moments, sharded_equals_one_device
from jlora import loop, run, train
from jlora.convert import adapterhub as AH
from jlora.convert.stfile import SafetensorsFile, write_safetensors
from jlora.convert.torchzip import load_torch_file
from jlora.peft import bottleneck as BN
from jlora.peft.bottleneck import BnConfig, DoubleSeqBnConfig, ParBnConfig, SeqBnConfig

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
REF_PYTHON = os.environ.get("JLORA_ADAPTERS_PYTHON", os.path.join(REPO, ".venv-adapters", "bin", "python"))

TOKENS = np.random.default_rng(0).integers(1, 128, (2, 7)).astype(np.int32)
MASK = np.ones((2, 7), np.int32)
MASK[1, -3:] = 0  # right padding: both libraries give the real tokens positions 0..n-1
VALID = MASK.astype(bool)

# (id, arch, AdapterHub config: {"preset": its config string, **overrides}, save with safetensors?)
REF_MADE = [
    ("gpt2-pfeiffer", "gpt2", {"preset": "seq_bn", "reduction_factor": 8}, False),
    ("gpt2-houlsby", "gpt2", {"preset": "double_seq_bn", "reduction_factor": {"0": 4, "default": 16}}, True),
    ("gpt2-options", "gpt2", {"preset": "double_seq_bn", "ln_before": True, "ln_after": True,
                              "adapter_residual_before_ln": True, "scaling": "channel", "non_linearity": "gelu_new",
                              "residual_before_ln": False, "leave_out": [0]}, False),  # ln_before: .bin only
    ("llama-pfeiffer", "llama", {"preset": "seq_bn", "reduction_factor": 16}, False),
    ("llama-houlsby", "llama", {"preset": "double_seq_bn", "reduction_factor": 8, "non_linearity": "tanh"}, True),
    ("llama-parallel", "llama", {"preset": "scaled_par_bn", "ln_after": True, "original_ln_after": True}, False),
    ("llama-noresidual", "llama", {"preset": "seq_bn", "original_ln_after": False, "original_ln_before": True,
                                   "residual_before_ln": False, "scaling": 0.5, "non_linearity": "leakyrelu"}, True),
]
# (id, arch, jlora config) -> written by jlora, loaded by AdapterHub
JLORA_MADE = [
    ("gpt2-pfeiffer", "gpt2", SeqBnConfig(reduction_factor=4)),
    ("gpt2-houlsby", "gpt2", DoubleSeqBnConfig(reduction_factor={"1": 4, "default": 8}, leave_out=[0])),
    ("gpt2-parallel", "gpt2", ParBnConfig(scaling="learned", ln_before=True)),
    ("llama-pfeiffer", "llama", SeqBnConfig(non_linearity="gelu")),
    ("llama-houlsby", "llama", DoubleSeqBnConfig(ln_after=True, scaling="channel", adapter_residual_before_ln=True)),
]


def _perturb(params, key, scale=0.1):
    """Non-trivial norms and biases (so their mapping is tested too) on jlora's random init."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    out = []
    for i, (path, x) in enumerate(leaves):
        name = jax.tree_util.keystr(path)
        if "scale" in name or "bias" in name:
            x = x + scale * jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
        out.append(x)
    return jax.tree_util.tree_unflatten(treedef, out)


def _noisy(params, key, scale=0.2):
    """Every bottleneck array moved away from its init (a trained-looking, non-identity adapter)."""
    def move(node):
        if not isinstance(node, BN.Bottleneck):
            return node
        leaves, treedef = jax.tree_util.tree_flatten(node)
        leaves = [x + scale * jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
                  for i, x in enumerate(leaves)]
        return jax.tree_util.tree_unflatten(treedef, leaves)

    return jax.tree_util.tree_map(move, params, is_leaf=lambda x: isinstance(x, BN.Bottleneck))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{arch: (cfg, base params, HF dir)}: tiny GPT-2 and Llama (GQA 4/2, untied head), written by jlora."""
    out = {}
    for arch, name in (("gpt2", "tiny-gpt2"), ("llama", "tiny-llama")):
        cfg = jlora.preset(name)
        params = _perturb(jlora.init_params(cfg, jax.random.key(1)), jax.random.key(2))
        d = str(tmp_path_factory.mktemp(f"hf-{arch}"))
        jlora.save_pretrained(cfg, params, d)
        cfg, params = jlora.load_pretrained(d)
        out[arch] = (cfg, params, d)
    return out


def _ref_unavailable() -> str:
    """Why the reference cannot run ("" when it can): dev.sh stamps a complete build of .venv-adapters."""
    if not os.path.exists(REF_PYTHON):
        return f"{REF_PYTHON} does not exist (bash dev.sh test builds .venv-adapters)"
    if "JLORA_ADAPTERS_PYTHON" not in os.environ:
        venv = os.path.dirname(os.path.dirname(REF_PYTHON))
        if not any(f.startswith(".jlora-installed-") for f in os.listdir(venv)):
            return f"{venv} has no install stamp (its build by bash dev.sh test failed or did not finish)"
    return ""


class _Reference:
    """The reference subprocess, started at the module's first test and awaited by the first test that needs it
    (the jlora-only tests run meanwhile)."""

    def __init__(self, models, root):
        self.why = _ref_unavailable()
        self.proc = self._result = None
        if self.why:
            return
        cases, self.trees, self.dirs = [], {}, {}
        for arch in models:
            cases.append({"id": f"{arch}-base", "op": "base", "model_dir": models[arch][2]})
        for cid, arch, conf, safe in REF_MADE:
            self.dirs[("ref", cid)] = str(root / f"ref-{cid}")
            cases.append({"id": f"ref-{cid}", "op": "make", "model_dir": models[arch][2], "config": conf,
                          "name": cid.replace("-", "_"), "save_dir": self.dirs[("ref", cid)],
                          "use_safetensors": safe, "seed": len(cases)})
        for i, (cid, arch, bcfg) in enumerate(JLORA_MADE):
            cfg, base, hf_dir = models[arch]
            tree = _noisy(BN.init(jax.random.key(10 + i), cfg, base, bcfg), jax.random.key(20 + i))
            self.dirs[("jlora", cid)] = str(root / f"jlora-{cid}")
            jlora.save_adapter(cfg, tree, self.dirs[("jlora", cid)], bcfg)
            self.trees[cid] = tree
            cases.append({"id": f"jlora-{cid}", "op": "load", "model_dir": hf_dir,
                          "adapter_dir": self.dirs[("jlora", cid)]})
        self.cases, self.out = cases, root / "out"
        spec = root / "spec.json"
        spec.write_text(json.dumps({"tokens": TOKENS.tolist(), "mask": MASK.tolist(), "cases": cases}))
        self.proc = subprocess.Popen([REF_PYTHON, os.path.join(HERE, "adapters_ref.py"), str(spec), str(self.out)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def get(self):
        """(results, logits by case id, jlora trees, dirs); skips (fails under CI=true) without the reference."""
        if self.why:
            if os.environ.get("CI", "").lower() == "true":
                pytest.fail(f"the AdapterHub reference environment is missing under CI: {self.why}")
            pytest.skip(self.why)
        if self._result is None:
            _, err = self.proc.communicate(timeout=600)
            assert self.proc.returncode == 0, err[-4000:]
            results = json.loads((self.out / "results.json").read_text())
            errors = {k: v["error"] for k, v in results.items() if isinstance(v, dict) and "error" in v}
            assert not errors, errors
            logits = {c["id"]: np.load(self.out / f"{c['id']}.npy") for c in self.cases}
            self._result = (results, logits, self.trees, self.dirs)
        return self._result

    def close(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module", autouse=True)
def reference(models, tmp_path_factory):
    r = _Reference(models, tmp_path_factory.mktemp("adapterhub"))
    yield r
    r.close()


@pytest.fixture
def ref(reference):
    return reference.get()


def _logits(cfg, params):
    return np.asarray(jlora.apply(cfg, params, jnp.asarray(TOKENS), jnp.asarray(MASK)))


def _max_diff(a, b):
    return float(np.abs(a[VALID] - b[VALID]).max())


def _tree_equal(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return (jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
            and all(x.dtype == y.dtype and x.shape == y.shape and bool((x == y).all()) for x, y in zip(la, lb)))


# ----------------------------------------------------------------------------------------------------------
# jlora-only properties


MAM_CONFIGS = [SeqBnConfig(init_weights="mam_adapter"), DoubleSeqBnConfig(init_weights="mam_adapter"), ParBnConfig()]


def test_mam_init_is_the_identity(models):
    """mam_adapter starts ``up`` at zero: every hook returns exactly ``x + h`` and the adapted model's logits are the
    base's bitwise (Llama jitted, every preset; GPT-2 op by op, since XLA fuses the extra exact zero-adds into its
    LayerNorm differently, ~1 ulp jitted); strip gives the base tree back."""
    h = jax.random.normal(jax.random.key(2), (2, 5, 64))
    x = jax.random.normal(jax.random.key(3), (2, 5, 64))
    for bcfg in MAM_CONFIGS:
        for arch, (cfg, base, _) in models.items():
            tuned = BN.init(jax.random.key(0), cfg, base, bcfg)
            nodes = BN.adapters(tuned)
            assert all(float(jnp.abs(n.up).max()) == 0.0 and float(jnp.abs(n.down).max()) > 0 for n in nodes.values())
            node = next(iter(nodes.values()))
            d = cfg.d_model
            np.testing.assert_array_equal(jax.jit(lambda n, a, b: n(a, b))(node, h[..., :d], x[..., :d]),
                                          x[..., :d] + h[..., :d])
            if arch == "llama":
                np.testing.assert_array_equal(_logits(cfg, tuned), _logits(cfg, base))
            elif bcfg is MAM_CONFIGS[0]:
                np.testing.assert_allclose(_logits(cfg, tuned), _logits(cfg, base), atol=1e-6, rtol=0)
            assert _tree_equal(BN.strip(tuned), base)
    cfg, base, _ = models["gpt2"]
    tuned = BN.init(jax.random.key(0), cfg, base, MAM_CONFIGS[0])
    with jax.disable_jit():
        np.testing.assert_array_equal(np.asarray(jlora.model.forward(cfg, tuned, jnp.asarray(TOKENS[:1, :3]))[0]),
                                      np.asarray(jlora.model.forward(cfg, base, jnp.asarray(TOKENS[:1, :3]))[0]))


def test_init_distributions_and_shapes(models):
    cfg, base, _ = models["llama"]
    d = cfg.d_model
    bert = BN.adapters(BN.init(jax.random.key(0), cfg, base, DoubleSeqBnConfig(reduction_factor=2)))
    down = np.concatenate([np.asarray(n.down).ravel() for n in bert.values()])
    assert abs(down.std() - 0.02) < 0.003 and all(float(jnp.abs(n.up_bias).max()) == 0 for n in bert.values())
    houlsby = BN.adapters(BN.init(jax.random.key(0), cfg, base,
                                  SeqBnConfig(init_weights="houlsby", reduction_factor=2)))
    up = np.concatenate([np.asarray(n.up).ravel() for n in houlsby.values()])
    assert np.abs(up).max() <= 0.02 and 0.005 < up.std() < 0.01
    mam = BN.adapters(BN.init(jax.random.key(0), cfg, base, SeqBnConfig(init_weights="mam_adapter",
                                                                         reduction_factor=2)))
    down = np.concatenate([np.asarray(n.down).ravel() for n in mam.values()])
    assert np.abs(down).max() <= 1 / np.sqrt(d) and np.abs(down).max() > 0.9 / np.sqrt(d)
    seeded = BN.adapters(BN.init(jax.random.key(0), cfg, base, DoubleSeqBnConfig(init_weights_seed=3)))
    first = next(iter(seeded.values()))
    assert all(np.array_equal(n.down, first.down) for n in seeded.values())  # AdapterHub: one seed for all
    assert len({np.asarray(n.down).tobytes() for n in bert.values()}) == len(bert)
    # bottleneck sizes: int(d // rf), at least 1, per layer
    sizes = {k: n.rank for k, n in BN.adapters(BN.init(jax.random.key(0), cfg, base, SeqBnConfig(
        reduction_factor={"1": 100, "default": 3}))).items()}
    assert sizes == {"model.layers.0.hooks.mlp_out": 21, "model.layers.1.hooks.mlp_out": 1}
    # labels: matrices decay like LoRA factors, biases / norms / scalings never
    tree = BN.init(jax.random.key(0), cfg, base, DoubleSeqBnConfig(ln_before=True, scaling="channel"))
    roles = jax.tree_util.tree_leaves(jlora.trainable_labels(tree))
    assert set(roles) == {"frozen", "bottleneck", "bottleneck_bias"}
    assert jlora.kernels.role_decays("bottleneck", jnp.ones((4, 4)))
    assert not jlora.kernels.role_decays("bottleneck_bias", jnp.ones((4, 4)))
    n = sum(x.size for x in jax.tree_util.tree_leaves(BN.adapters(tree)))
    assert jlora.param_report(tree)["trainable"] == n


def test_dropout_and_stochastic_depth_only_while_training(models):
    cfg, base, _ = models["gpt2"]
    node = next(iter(BN.adapters(_noisy(BN.init(jax.random.key(0), cfg, base, SeqBnConfig(
        dropout=0.5, stochastic_depth=0.5)), jax.random.key(1))).values()))
    h = jax.random.normal(jax.random.key(2), (4, 3, cfg.d_model))
    x = jax.random.normal(jax.random.key(3), (4, 3, cfg.d_model))
    plain = node(h, x)
    assert node.with_rng(jax.random.key(5)).rng is not None
    trained = node.with_rng(jax.random.key(5))(h, x)
    adapter_part = np.asarray(trained - h - x)
    assert not np.allclose(trained, plain)
    dropped_rows = [i for i in range(4) if np.abs(adapter_part[i]).max() < 1e-5]  # (up + h) + x - h - x: rounding
    assert dropped_rows and len(dropped_rows) < 4  # whole sequences dropped (row mode), not all
    kept = [i for i in range(4) if i not in dropped_rows]
    assert (np.abs(adapter_part[kept]) < 1e-5).mean() > 0.2  # element dropout inside the kept rows
    quiet = BN.init(jax.random.key(0), cfg, base, SeqBnConfig())
    n0 = next(iter(BN.adapters(quiet).values()))
    assert n0.with_rng(jax.random.key(5)) is n0  # no randomness: no key


def test_public_names():
    assert jlora.bottleneck is BN and jlora.BnConfig is BnConfig and jlora.SeqBnConfig is SeqBnConfig
    assert jlora.methods.get("adapter").config is BnConfig and not jlora.methods.get("adapter").mergeable
    assert jlora.methods.get("adapter").load_file_format() is AH


def test_merge_refuses_and_points_to_keeping_the_adapter(models):
    cfg, base, _ = models["gpt2"]
    tree = BN.init(jax.random.key(0), cfg, base, SeqBnConfig())
    with pytest.raises(ValueError, match=r"transformer.h.0.hooks.mlp_out is a Bottleneck node of the 'adapter' "
                                         r"method.*cannot be folded into the weights.*(unmerged|export)"):
        jlora.merge(tree)


def test_config_from_nodes_and_file_round_trip(models, tmp_path):
    cfg, base, _ = models["gpt2"]
    bcfg = DoubleSeqBnConfig(reduction_factor={"0": 4, "default": 16}, non_linearity="Swish", leave_out=[5])
    tree = BN.init(jax.random.key(0), cfg, base, bcfg)
    derived = AH.config_from_nodes(cfg, tree)
    assert isinstance(derived.reduction_factor, dict) and derived.leave_out == ()
    assert [derived.bottleneck_size(cfg.d_model, i) for i in range(2)] == [8, 2]
    # a bottleneck that does not divide d still round-trips through AdapterHub's int(d // rf)
    odd = BN.init(jax.random.key(0), cfg, base, SeqBnConfig(reduction_factor=32 / 3))
    assert AH.config_from_nodes(cfg, odd).bottleneck_size(cfg.d_model, 0) == 3
    jlora.save_adapter(cfg, tree, tmp_path / "a")  # derived config
    jlora.save_adapter(cfg, tree, tmp_path / "b", bcfg)  # the config's own spelling
    a = json.load(open(tmp_path / "a" / "adapter_config.json"))
    b = json.load(open(tmp_path / "b" / "adapter_config.json"))
    assert b["config"]["non_linearity"] == "Swish" and b["config"]["leave_out"] == [5]
    assert a["name"] == "a" and a["version"] == "adapters.1.3.0" and a["model_class"] == "GPT2LMHeadModel"
    assert set(a["config"]) == set(AH.SHARED_FIELDS) | set(AH.INERT_FIELDS)
    for d in ("a", "b"):
        assert _tree_equal(jlora.load_adapter(cfg, base, tmp_path / d), tree)
    assert AH.detect(a) and not AH.detect({"peft_type": "LORA"})
    assert jlora.convert.peft.file_format_for(a) is AH
    # a file without a version is an old one: AdapterHub renames "gelu" to "gelu_new" there, and so does jlora
    assert AH.config_from_file({**a, "config": {**a["config"], "non_linearity": "gelu"}}).non_linearity == "gelu"
    old = {k: v for k, v in a.items() if k != "version"}
    assert AH.config_from_file({**old, "config": {**a["config"], "non_linearity": "gelu"}}).non_linearity == \
        "gelu_new"
    # an unchanged save into an existing directory replaces the files; a stale pickle is removed
    (tmp_path / "a" / "pytorch_adapter.bin").write_bytes(b"stale")
    jlora.save_adapter(cfg, tree, tmp_path / "a")
    assert sorted(os.listdir(tmp_path / "a")) == ["adapter.safetensors", "adapter_config.json"]


# ----------------------------------------------------------------------------------------------------------
# Training: only the adapters train, exact resume, 8 simulated devices

TINY = dataclasses.replace(jlora.preset("tiny-gpt2"), n_layers=1)
TRAIN_CFG = DoubleSeqBnConfig(reduction_factor=4, ln_after=True, scaling="learned")


def _train_params(cfg=TINY):
    return BN.init(jax.random.key(2), cfg, jlora.init_params(cfg, jax.random.key(1)), TRAIN_CFG)


@pytest.fixture(scope="module")
def demo_model_dir(tmp_path_factory):
    """A tiny random Llama with a character tokenizer and the demo task (date extraction) as training data."""
    from jlora import demo_task
    from test_doctests import tiny_tokenizer

    d = tmp_path_factory.mktemp("demo-model")
    cfg = jlora.preset("tiny-llama").replace(max_positions=128, n_layers=1)
    jlora.save_pretrained(cfg, jlora.init_params(cfg, jax.random.key(0)), d)
    tiny_tokenizer(cfg.vocab_size).save(str(d))
    with open(d / "train.jsonl", "w") as f:
        for ex in demo_task.make_examples(40, seed=0):
            f.write(json.dumps({"prompt": ex["prompt"], "completion": ex["completion"]}) + "\n")
    return d


def _run_config(model_dir, run_dir, steps=6):
    return run.load_config(None, [
        f"model.path='{model_dir}'", f"data.train='{model_dir / 'train.jsonl'}'", f"run.dir='{run_dir}'",
        "method.kind='adapter'", "method.preset='houlsby'", "method.reduction_factor=4", "method.scaling='learned'",
        "data.seq_len=112", "data.batch_size=4", "data.eval_fraction=0.2", "optim.learning_rate=1e-2",
        "optim.warmup_steps=1", "optim.weight_decay=0.1", f"run.steps={steps}", "run.eval_every=100",
        "run.save_every=100", "run.log_every=1"])


def test_run_lowers_the_demo_loss_trains_only_the_adapters_and_resumes(demo_model_dir, tmp_path):
    """`[method] kind = "adapter"` through jlora.run: the eval loss on the demo task drops; frozen leaves bitwise
    unchanged; Adam state only for the adapters; <run>/adapter is an AdapterHub directory; a run stopped and
    resumed ends bitwise where the uninterrupted one does."""
    c = _run_config(demo_model_dir, tmp_path / "straight")
    assert c["method"]["preset"] == "houlsby" and c["method"]["mh_adapter"] is True
    path, cfg, params = run.build_model(c, log=lambda *_: None)
    labels = jlora.trainable_labels(params)
    _, eval_b = run.build_data(c, jlora.load_tokenizer(path))
    before = loop.evaluate(jax.jit(train.make_eval_step(cfg)), params, eval_b)["eval_loss"]
    frozen_before = jax.device_get(jlora.split(params, labels)[1])
    n_train = jlora.param_report(params, labels)["trainable"]
    assert n_train == sum(x.size for x in jax.tree_util.tree_leaves(BN.adapters(params)))

    res = run.train_run(c, log=lambda *_: None, progress=False)
    after = res.eval["eval_loss"]
    assert after < before - 0.1, (before, after)
    assert _tree_equal(jlora.split(res.state.params, labels)[1], frozen_before)  # bitwise
    assert sum(x.size for x in adam_moments(res.state.opt_state)) == 2 * n_train
    rest = sum(x.size for x in jax.tree_util.tree_leaves(res.state.opt_state)) - 2 * n_train
    assert 0 < rest <= 8  # step counters only: no state for any frozen leaf
    adapter = tmp_path / "straight" / "adapter"
    assert sorted(os.listdir(adapter)) == ["adapter.safetensors", "adapter_config.json"]
    loaded = jlora.load_adapter(cfg, jlora.load_pretrained(demo_model_dir)[1], adapter)
    assert _tree_equal(BN.adapters(loaded), BN.adapters(res.state.params))

    split = _run_config(demo_model_dir, tmp_path / "split")
    run.train_run(split, log=lambda *_: None, progress=False, stop_at=3)
    logs = []
    resumed = run.train_run(split, log=logs.append, progress=False)
    assert any("resumed from step 3" in str(line) for line in logs), logs
    assert _tree_equal(resumed.state.params, res.state.params)  # bitwise


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")
def test_sharded_training_equals_one_device():
    def setup():
        params = _train_params()
        labels = jlora.trainable_labels(params)
        return params, labels, train.make_optimizer(labels, 1e-2, weight_decay=0.01, eps=1e-4)

    sstate = sharded_equals_one_device(TINY, setup)
    moved = BN.adapters(sstate.params)["transformer.h.0.hooks.attn_out"]
    assert float(jnp.abs(jax.device_get(moved.scaling) - 1.0).max()) > 0  # the learned scaling trained


# ----------------------------------------------------------------------------------------------------------
# Errors


def test_bad_configs_name_the_option(models):
    cases = [
        (dict(preset="compacter"), r"BnConfig.preset must be one of seq_bn, double_seq_bn"),
        (dict(phm_layer=True), r"BnConfig.phm_layer=True is not supported: jlora does not implement Compacter"),
        (dict(use_gating=True), r"BnConfig.use_gating=True is not supported: UniPELT's gate"),
        (dict(inv_adapter="nice"), r"BnConfig.inv_adapter='nice' is not supported"),
        (dict(residual_before_ln="post_add"), r"BnConfig.residual_before_ln='post_add' is not supported"),
        (dict(non_linearity="prelu"), r"BnConfig.non_linearity 'prelu' is not supported \(it has trained param"),
        (dict(non_linearity="nope"), r"BnConfig.non_linearity 'nope' is not supported; jlora knows: gelu"),
        (dict(init_weights="lora"), r"BnConfig.init_weights must be one of bert, mam_adapter, houlsby, got 'lora'"),
        (dict(scaling="big"), r"BnConfig.scaling must be a number, 'learned' or 'channel', got 'big'"),
        (dict(reduction_factor=0), r"BnConfig.reduction_factor must be a positive number"),
        (dict(reduction_factor={"x": 2}), r"BnConfig.reduction_factor\['x'\] = 2: expected layer indices"),
        (dict(mh_adapter=False, output_adapter=False), r"mh_adapter and output_adapter are both false"),
        (dict(leave_out=[-1]), r"BnConfig.leave_out must be a list of layer indices"),
        (dict(dropout=1.0), r"BnConfig.dropout must be a number in \[0, 1\), got 1.0"),
        (dict(ln_after="yes"), r"BnConfig.ln_after must be true or false, got 'yes'"),
        (dict(dtype="f33"), r"BnConfig.dtype 'f33' is not a dtype name"),
    ]
    for kw, match in cases:
        with pytest.raises(ValueError, match=match):
            BnConfig(**kw)
    cfg, base, _ = models["gpt2"]
    with pytest.raises(ValueError, match=r"SeqBnConfig.leave_out \[0, 1\] leaves out every layer"):
        BN.init(jax.random.key(0), cfg, base, SeqBnConfig(leave_out=[0, 1]))
    with pytest.raises(ValueError, match=r"reduction_factor \{'0': 2\} has no entry for layer 1 and no 'default'"):
        BN.init(jax.random.key(0), cfg, base, SeqBnConfig(reduction_factor={"0": 2}))
    tree = BN.init(jax.random.key(0), cfg, base, SeqBnConfig())
    with pytest.raises(ValueError, match=r"transformer.h.0.hooks.mlp_out already has a Bottleneck hook"):
        BN.init(jax.random.key(0), cfg, tree, SeqBnConfig())
    with pytest.raises(ValueError, match=r"unknown option method.phm_dim for method.kind 'adapter'"):
        run.load_config(None, ["run.dir=x", "data.train=y", "method.kind=adapter", "method.phm_dim=4"])
    with pytest.raises(ValueError, match=r"\[method\] kind 'adapter': BnConfig.use_gating=True is not supported"):
        run.load_config(None, ["run.dir=x", "data.train=y", "method.kind=adapter", "method.use_gating=true"])


def test_save_refuses_what_adapterhub_cannot_express(models, tmp_path):
    cfg, base, _ = models["gpt2"]
    tree = BN.init(jax.random.key(0), cfg, base, DoubleSeqBnConfig())
    lone = dict(tree["transformer"]["h"]["1"])
    lone["hooks"] = {"mlp_out": lone["hooks"]["mlp_out"]}
    odd = {**tree, "transformer": {**tree["transformer"], "h": {**tree["transformer"]["h"], "1": lone}}}
    with pytest.raises(ValueError, match=r"layer 1 has adapters at \['mlp_out'\] but other layers at "
                                         r"\['attn_out', 'mlp_out'\]"):
        jlora.save_adapter(cfg, odd, tmp_path / "x")
    other = BN.init(jax.random.key(0), cfg, base, DoubleSeqBnConfig(non_linearity="tanh"))
    mixed = dict(tree)
    mixed["transformer"] = {**tree["transformer"], "h": {**tree["transformer"]["h"],
                                                         "1": other["transformer"]["h"]["1"]}}
    with pytest.raises(ValueError, match=r"transformer.h.1.hooks.attn_out has non_linearity='tanh' but "
                                         r"transformer.h.0.hooks.attn_out has 'swish'"):
        jlora.save_adapter(cfg, mixed, tmp_path / "x")
    with pytest.raises(ValueError, match=r"mcfg does not describe the adapters in params: DoubleSeqBnConfig."
                                         r"reduction_factor 8 gives layer 0 a bottleneck of 4, "
                                         r"transformer.h.0.hooks.attn_out has 2"):
        jlora.save_adapter(cfg, tree, tmp_path / "x", DoubleSeqBnConfig(reduction_factor=8))
    with pytest.raises(ValueError, match=r"mcfg does not describe .*SeqBnConfig.mh_adapter is False, the nodes have "
                                         r"True"):
        jlora.save_adapter(cfg, tree, tmp_path / "x", SeqBnConfig())
    assert not (tmp_path / "x").exists()


@pytest.fixture(scope="module")
def good_llama(models, tmp_path_factory):
    cfg, base, _ = models["llama"]
    d = tmp_path_factory.mktemp("good") / "good"
    jlora.save_adapter(cfg, _noisy(BN.init(jax.random.key(0), cfg, base, DoubleSeqBnConfig()), jax.random.key(1)),
                       d)
    return d


def _case(good, tmp_path, conf=None, tensors=None, extra=None):
    d = tmp_path / "bad"
    shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(good, d)
    if conf is not None:
        (d / "adapter_config.json").write_text(json.dumps(conf))
    if tensors is not None:
        write_safetensors(str(d / "adapter.safetensors"), tensors)
    for name, data in (extra or {}).items():
        (d / name).write_text(data) if isinstance(data, str) else write_safetensors(str(d / name), data)
    return d


def test_bad_files_are_refused_clearly(models, good_llama, tmp_path):
    cfg, base, _ = models["llama"]
    conf = json.load(open(good_llama / "adapter_config.json"))
    st = SafetensorsFile(str(good_llama / "adapter.safetensors"))
    tensors = {k: np.asarray(st.get(k)) for k in st.keys()}
    pre = "model.layers.{}.{}.adapters.good."

    def bad(match, **kw):
        with pytest.raises(ValueError, match=match):
            jlora.load_adapter(cfg, base, _case(good_llama, tmp_path, **kw))

    # AdapterHub configs of other methods, and options jlora lacks
    bad(r"adapter_config.json: config.architecture is 'lora': an AdapterHub LoRA adapter, which jlora does not read",
        conf={**conf, "config": {"architecture": "lora", "r": 8, "alpha": 8}})
    bad(r"config.architecture is 'prefix_tuning': an AdapterHub prefix tuning adapter",
        conf={**conf, "config": {"architecture": "prefix_tuning", "prefix_length": 30}})
    bad(r"adapter_config.json: config: BnConfig.phm_layer=True is not supported",
        conf={**conf, "config": {**conf["config"], "phm_layer": True}})
    bad(r"adapter_config.json: config: BnConfig.use_gating=True is not supported",
        conf={**conf, "config": {**conf["config"], "use_gating": True}})
    bad(r"adapter_config.json: unknown option config.frobnicate=1",
        conf={**conf, "config": {**conf["config"], "frobnicate": 1}})
    bad(r"adapter_config.json: unknown key 'extra'", conf={**conf, "extra": 1})
    # another model
    bad(r"adapter_config.json: hidden_size is 32, expected 64 \(the model's hidden size\)",
        conf={**conf, "hidden_size": 32})
    bad(r"adapter_config.json: model_type is 'gpt2', expected 'llama' or 'mistral'",
        conf={**conf, "model_type": "gpt2"})
    deeper = {**tensors, **{k.replace("layers.1.", "layers.2."): v for k, v in tensors.items() if ".layers.1." in k}}
    bad(r"adapter.safetensors: tensor model.layers.2.attention_adapters.adapters.good.adapter_down.0.bias is for "
        r"layer 2, but the model has 2 layers \(0...1\); the adapter was made for a model with more layers",
        tensors=deeper)
    shallower = {k: v for k, v in tensors.items() if ".layers.1." not in k}
    bad(r"adapter_config.json's config adapts attention_adapters of layer 1, but the file has no model.layers.1."
        r"attention_adapters.adapters.good.adapter_down.0.weight \(an adapter for a model with fewer layers\?\)",
        tensors=shallower)
    # tensors
    k = pre.format(0, "output_adapters") + "adapter_up.weight"
    bad(rf"tensor {k} has shape \(64, 3\), expected \(64, 4\)", tensors={**tensors, k: np.ones((64, 3), np.float32)})
    bad(r"tensor model.layers.0.output_adapters.adapters.other.adapter_up.bias does not belong to adapter 'good'",
        tensors={**tensors, "model.layers.0.output_adapters.adapters.other.adapter_up.bias": np.ones(64, np.float32)})
    bad(r"tensor model.layers.0.self_attn.loras.good.lora_A is not a bottleneck adapter tensor of a llama model",
        tensors={**tensors, "model.layers.0.self_attn.loras.good.lora_A": np.ones((2, 64), np.float32)})
    bad(r"tensor model.layers.0.output_adapters.adapters.good.scaling is not a parameter of this adapter config",
        tensors={**tensors, pre.format(0, "output_adapters") + "scaling": np.ones(1, np.float32)})
    bad(r"tensor model.layers.1.attention_adapters.adapters.good.\S+ is for attention_adapters of layer "
        r"1, which adapter_config.json's config does not adapt \(.*leave_out=\[1\]\)",
        conf={**conf, "config": {**conf["config"], "leave_out": [1]}})
    # heads: only a copy of the base's own head
    head = {"lm_head.weight": np.asarray(base["lm_head"]["kernel"]).T.copy()}
    jlora.load_adapter(cfg, base, _case(good_llama, tmp_path, extra={"model_head.safetensors": head}))
    bad(r"model_head.safetensors: tensor lm_head.weight differs from the base's LM head",
        extra={"model_head.safetensors": {"lm_head.weight": head["lm_head.weight"] + 0.1}})
    bad(r"head_config.json: the adapter carries a prediction head of AdapterHub's flex-head models",
        extra={"head_config.json": json.dumps({"config": {"head_type": "causal_lm"}, "name": "x"})})
    # files
    d = _case(good_llama, tmp_path)
    os.remove(d / "adapter.safetensors")
    with pytest.raises(FileNotFoundError, match=r"no adapter.safetensors or pytorch_adapter.bin"):
        jlora.load_adapter(cfg, base, d)
    (d / "pytorch_adapter.bin").write_bytes(b"\x80\x02}q\x00.")
    bad_bin = r"pytorch_adapter.bin: not a torch zip file"
    with pytest.raises(ValueError, match=bad_bin):
        jlora.load_adapter(cfg, base, d)
    jlora.load_adapter(cfg, base, good_llama)  # the good one still loads


# ----------------------------------------------------------------------------------------------------------
# Parity with AdapterHub, both directions


def test_base_models_agree(models, ref):
    _, logits, _, _ = ref
    for arch, (cfg, base, _) in models.items():
        assert _max_diff(_logits(cfg, base), logits[f"{arch}-base"]) <= 1e-4


@pytest.mark.parametrize("cid,arch,conf,safe", REF_MADE, ids=[c[0] for c in REF_MADE])
def test_adapterhub_adapters_load_into_jlora(models, ref, cid, arch, conf, safe):
    results, logits, _, dirs = ref
    cfg, base, _ = models[arch]
    d = dirs[("ref", cid)]
    files = results[f"ref-{cid}"]["files"]
    assert ("adapter.safetensors" if safe else "pytorch_adapter.bin") in files and "head_config.json" in files
    loaded = jlora.load_adapter(cfg, base, d)
    out = _logits(cfg, loaded)
    want = logits[f"ref-{cid}"]
    assert _max_diff(want, logits[f"{arch}-base"]) > 1e-2  # the adapter does something
    diff = _max_diff(out, want)
    print(f"{cid}: AdapterHub -> jlora max |logit diff| {diff:.2e}")
    assert diff <= 1e-4, diff
    # what jlora reads back is the file's config
    bcfg = AH.config_from_file(results[f"ref-{cid}"]["adapter_config"], "x")
    sites = {(int(k.split(".")[2]), k.split(".")[-1]) for k in BN.adapters(loaded)}
    assert sites == {(i, s) for i in bcfg.layers(cfg.n_layers) for s in bcfg.sites()}
    # saved again by jlora: the same function, and AdapterHub's config fields exactly
    again = os.path.join(os.path.dirname(d), f"resaved-{cid}")
    jlora.save_adapter(cfg, loaded, again, bcfg)
    assert _tree_equal(jlora.load_adapter(cfg, base, again), loaded)
    written = json.load(open(os.path.join(again, "adapter_config.json")))
    ref_conf = results[f"ref-{cid}"]["adapter_config"]
    assert written["config"] == ref_conf["config"]
    assert {k: v for k, v in written.items() if k not in ("name", "model_name")} == \
        {k: v for k, v in ref_conf.items() if k not in ("name", "model_name")}


@pytest.mark.parametrize("cid,arch,bcfg", JLORA_MADE, ids=[c[0] for c in JLORA_MADE])
def test_jlora_adapters_load_into_adapterhub(models, ref, cid, arch, bcfg):
    results, logits, trees, dirs = ref
    cfg, base, _ = models[arch]
    info = results[f"jlora-{cid}"]
    assert info["missing_keys"] == [] and info["unexpected_keys"] == [], info
    out = _logits(cfg, trees[cid])
    assert _max_diff(out, logits[f"{arch}-base"]) > 1e-2
    diff = _max_diff(out, logits[f"jlora-{cid}"])
    print(f"{cid}: jlora -> AdapterHub max |logit diff| {diff:.2e}")
    assert diff <= 1e-4, diff
    assert _tree_equal(jlora.load_adapter(cfg, base, dirs[("jlora", cid)]), trees[cid])  # bitwise round trip
    assert sorted(os.listdir(dirs[("jlora", cid)])) == ["adapter.safetensors", "adapter_config.json"]


def test_torch_file_reader_matches_the_safetensors_tensors(ref, tmp_path):
    """The restricted .bin reader gives AdapterHub's tensors; a pickle naming anything else is refused."""
    _, _, _, dirs = ref
    sd = load_torch_file(os.path.join(dirs[("ref", "gpt2-pfeiffer")], "pytorch_adapter.bin"))
    assert sorted(sd) == sorted(f"transformer.h.{i}.output_adapters.adapters.gpt2_pfeiffer.{p}" for i in range(2)
                                for p in ("adapter_down.0.weight", "adapter_down.0.bias", "adapter_up.weight",
                                          "adapter_up.bias"))
    assert sd["transformer.h.0.output_adapters.adapters.gpt2_pfeiffer.adapter_down.0.weight"].shape == (4, 32)
    head = load_torch_file(os.path.join(dirs[("ref", "gpt2-pfeiffer")], "pytorch_model_head.bin"))
    assert list(head) == ["lm_head.weight"]
    # a pickle that names another callable is refused before anything runs
    bad = tmp_path / "evil.bin"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("archive/data.pkl", b"\x80\x02cos\nsystem\nq\x00X\x04\x00\x00\x00trueq\x01\x85q\x02Rq\x03.")
    with pytest.raises(ValueError, match=r"evil.bin: refuses to load os.system"):
        load_torch_file(str(bad))
