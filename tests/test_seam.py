"""The method seam: the registry, the node protocol, the model's generic hook sites, modules_to_save, role-based
weight decay and logical parameter counts. The hooks are exercised with small nodes defined here (the methods
that use them come later), so what is tested is the model's contract, not a method."""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import struct

import jlora
from jlora import train
from jlora.kernels import FULL, Hook, KernelWrapper, matmul, register_role
from jlora.model import check_params, forward
from jlora.peft import base as B
from jlora.peft.saved import Saved, SavedKernel

TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 128, (2, 7)), jnp.int32)
ROLE = register_role("test_hook", False)


@pytest.fixture(scope="module", params=["tiny-gpt2", "tiny-llama"])
def model(request):
    cfg = jlora.preset(request.param)
    return cfg, jlora.init_params(cfg, jax.random.key(0))


def _layers_dict(cfg, params):
    return params["transformer"]["h"] if cfg.arch == "gpt2" else params["model"]["layers"]


def _with_hooks(cfg, params, layer_hooks=None, body_hooks=None):
    out = jax.tree_util.tree_map(lambda x: x, params)
    body = out["transformer" if cfg.arch == "gpt2" else "model"]
    if layer_hooks:
        for i, hooks in layer_hooks.items():
            _layers_dict(cfg, out)[str(i)]["hooks"] = hooks
    if body_hooks:
        body["hooks"] = body_hooks
    return out


@struct.dataclass
class Residual(Hook):
    """x + gain * h: a sublayer hook that owns the residual sum."""

    gain: jax.Array

    def __call__(self, h, residual):
        return residual + self.gain.astype(h.dtype) * h

    def labels(self, label_base):
        return self.replace(gain=ROLE)


@struct.dataclass
class KVPrefix(Hook):
    k: jax.Array  # [n_layers, P, kv_heads, dim_head]
    v: jax.Array

    @property
    def length(self):
        return self.k.shape[1]

    def kv(self, batch, dtype):
        grow = lambda a: jnp.broadcast_to(a[:, None], (a.shape[0], batch) + a.shape[1:]).astype(dtype)  # noqa: E731
        return grow(self.k), grow(self.v)

    def labels(self, label_base):
        return self.replace(k=ROLE, v=ROLE)


@struct.dataclass
class InputPrefix(Hook):
    e: jax.Array  # [P, d]

    @property
    def length(self):
        return self.e.shape[0]

    def embeds(self, batch, dtype):
        return jnp.broadcast_to(self.e, (batch,) + self.e.shape).astype(dtype)

    def labels(self, label_base):
        return self.replace(e=ROLE)


@struct.dataclass
class Packed(KernelWrapper):
    """A stand-in for a packed 4-bit base: two weights per stored byte, never trainable."""

    codes: jax.Array
    real: Any = struct.field(pytree_node=False, default=None)

    def matmul(self, x):
        return matmul(x, self.real)

    def materialize(self):
        return self.real

    def strip(self):
        return self

    def labels(self, label_base):
        return self.replace(codes="frozen")

    def logical_sizes(self):
        return self.replace(codes=2 * int(self.codes.size))

    @property
    def shape(self):
        return tuple(self.real.shape)

    @property
    def dtype(self):
        return self.real.dtype


def test_registry_lists_methods_and_names_unknown_kinds():
    assert B.kinds() == ["adapter", "dora", "ia3", "lora", "prefix", "prompt", "full"]
    assert B.get("lora").config is jlora.LoraConfig and B.get("lora").mergeable
    with pytest.raises(ValueError, match="unknown method kind 'vera'; jlora knows: adapter, dora, ia3, lora, prefix, prompt, full"):
        B.get("vera")
    with pytest.raises(ValueError, match="unknown method kind 'modules_to_save'"):
        B.get("modules_to_save")  # a component of other methods, not a kind of its own
    with pytest.raises(ValueError, match="already registered"):
        B.register(B.Method(kind="lora", config=None, init=lambda *a: None))
    with pytest.raises(ValueError, match=r"unknown option method.lora_alpha for method.kind 'lora'"):
        B.get("lora").make_config({"lora_alpha": 8})


def test_sublayer_hooks_own_the_residual(model):
    cfg, params = model
    base_logits = jlora.apply(cfg, params, TOKENS)
    one = Residual(gain=jnp.ones(()))
    hooked = _with_hooks(cfg, params, {i: {"attn_out": one, "mlp_out": one} for i in range(cfg.n_layers)})
    check_params(cfg, hooked)  # hook sites are accepted
    np.testing.assert_allclose(jlora.apply(cfg, hooked, TOKENS), base_logits, atol=1e-6)  # gain 1 = absent
    # gain 0 on layer 0's attention: the block's output is the MLP applied to the input alone
    zero = _with_hooks(cfg, params, {0: {"attn_out": Residual(gain=jnp.zeros(()))}})
    assert np.abs(np.asarray(jlora.apply(cfg, zero, TOKENS) - base_logits)).max() > 1e-4
    layers = dict(_layers_dict(cfg, params))
    lp = dict(layers["0"])
    attn = "attn" if cfg.arch == "gpt2" else "self_attn"
    for m in lp[attn]:
        if "kernel" in lp[attn][m] and m in ("c_proj", "o_proj"):
            lp[attn] = dict(lp[attn])
            lp[attn][m] = {k: jnp.zeros_like(v) for k, v in lp[attn][m].items()}
    manual = jax.tree_util.tree_map(lambda x: x, params)
    _layers_dict(cfg, manual)["0"] = lp  # attention output exactly zero
    np.testing.assert_allclose(jlora.apply(cfg, zero, TOKENS), jlora.apply(cfg, manual, TOKENS), atol=1e-5)


def test_kv_prefix_is_attended_and_empty_prefix_is_identity(model):
    cfg, params = model
    base_logits = np.asarray(jlora.apply(cfg, params, TOKENS))
    shape = (cfg.n_layers, 0, cfg.kv_heads, cfg.dim_head)
    empty = KVPrefix(k=jnp.zeros(shape), v=jnp.zeros(shape))
    hooked = _with_hooks(cfg, params, body_hooks={"kv_prefix": empty})
    check_params(cfg, hooked)
    np.testing.assert_allclose(jlora.apply(cfg, hooked, TOKENS), base_logits, atol=1e-6)
    rng = np.random.default_rng(1)
    shape = (cfg.n_layers, 3, cfg.kv_heads, cfg.dim_head)
    pre = KVPrefix(k=jnp.asarray(rng.normal(size=shape), jnp.float32),
                   v=jnp.asarray(rng.normal(size=shape), jnp.float32))
    hooked = _with_hooks(cfg, params, body_hooks={"kv_prefix": pre})
    assert jlora.model.virtual_tokens(cfg, hooked) == 3
    out = np.asarray(jlora.apply(cfg, hooked, TOKENS))
    assert np.abs(out - base_logits).max() > 1e-4
    # Every position sees the prefix, including the first token (which otherwise sees only itself), and a
    # left-padded row gives the same logits for its real tokens.
    mask = np.ones(TOKENS.shape, np.int32)
    padded = np.concatenate([np.zeros((2, 2), np.int32), np.asarray(TOKENS)], axis=1)
    pmask = np.concatenate([np.zeros((2, 2), np.int32), mask], axis=1)
    out_pad = np.asarray(jlora.apply(cfg, hooked, jnp.asarray(padded), jnp.asarray(pmask)))
    np.testing.assert_allclose(out_pad[:, 2:], out, atol=2e-5)
    # With the KV cache (prefill then one step) the result equals the full forward.
    cache = jlora.init_cache(cfg, 2, 16)
    h1, cache = forward(cfg, hooked, TOKENS[:, :5], cache=cache)
    h2, cache = forward(cfg, hooked, TOKENS[:, 5:], cache=cache)
    full, _ = forward(cfg, hooked, TOKENS)
    np.testing.assert_allclose(np.concatenate([h1, h2], axis=1), full, atol=2e-5)


def test_input_prefix_adds_virtual_tokens_and_keeps_output_aligned(model):
    cfg, params = model
    rng = np.random.default_rng(2)
    e = jnp.asarray(0.02 * rng.normal(size=(4, cfg.d_model)), jnp.float32)
    hooked = _with_hooks(cfg, params, body_hooks={"input_prefix": InputPrefix(e=e)})
    check_params(cfg, hooked)
    out = np.asarray(jlora.apply(cfg, hooked, TOKENS))
    assert out.shape == (2, 7, cfg.vocab_size)
    # Manually: the same model fed the virtual embeddings as its first four inputs.
    emb = jlora.model.embedding(cfg, params)
    big = jnp.concatenate([jnp.zeros((2, 4), jnp.int32), TOKENS], axis=1)
    vocab_hack = jnp.concatenate([emb, e], axis=0)  # ids vocab..vocab+3 are the virtual tokens
    ids = big.at[:, :4].set(jnp.arange(cfg.vocab_size, cfg.vocab_size + 4)[None])
    manual = jax.tree_util.tree_map(lambda x: x, params)
    body = manual["transformer" if cfg.arch == "gpt2" else "model"]
    body["wte" if cfg.arch == "gpt2" else "embed_tokens"] = {"embedding": vocab_hack}
    mcfg = cfg.replace(vocab_size=cfg.vocab_size + 4, tie_embeddings=False)
    if cfg.tie_embeddings:
        manual["lm_head"] = {"kernel": emb.T}
    hidden, _ = forward(mcfg, manual, ids)
    ref = np.asarray(jlora.lm_head(cfg, params, hidden[:, 4:]))
    np.testing.assert_allclose(out, ref, atol=2e-5)
    with pytest.raises(ValueError, match=r"input_prefix hook .* make it with init_cache\(.*params=params\)"):
        forward(cfg, hooked, TOKENS, cache=jlora.init_cache(cfg, 2, 16))
    # A cache made with the params holds the virtual tokens' keys/values: prefill + one step = the full forward.
    cache = jlora.init_cache(cfg, 2, 16, params=hooked)
    h1, cache = forward(cfg, hooked, TOKENS[:, :5], cache=cache)
    h2, cache = forward(cfg, hooked, TOKENS[:, 5:], cache=cache)
    full, _ = forward(cfg, hooked, TOKENS)
    np.testing.assert_allclose(np.concatenate([h1, h2], axis=1), full, atol=2e-5)


def test_hooks_train_strip_and_refuse_to_merge(model):
    cfg, params = model
    hooked = _with_hooks(cfg, params, {0: {"attn_out": Residual(gain=jnp.ones(()))}})
    labels = jlora.trainable_labels(hooked)
    roles = set(jax.tree_util.tree_leaves(labels))
    assert roles == {"frozen", ROLE}
    assert B.strip(hooked).keys() == params.keys()
    assert jax.tree_util.tree_structure(B.strip(hooked)) == jax.tree_util.tree_structure(params)
    with pytest.raises(ValueError, match=r"merge: .*hooks.attn_out is a Residual node .* cannot be folded"):
        jlora.merge(hooked)
    tx = train.make_optimizer(labels, 1e-2, weight_decay=0.5)
    state = train.init_state(hooked, tx)
    step = jax.jit(train.make_train_step(cfg, tx, labels))
    state, _ = step(state, {"input_ids": TOKENS})
    g = _layers_dict(cfg, state.params)["0"]["hooks"]["attn_out"].gain
    assert float(g) != 1.0  # trained through the hook
    with pytest.raises(ValueError, match="sits under a 'hooks' site but is not a jlora.kernels.Hook"):
        check_params(cfg, _with_hooks(cfg, params, {0: {"attn_out": jnp.ones(())}}))
    with pytest.raises(ValueError, match=r"hook .*hooks.attn_output is at no hook site the model reads"):
        check_params(cfg, _with_hooks(cfg, params, {0: {"attn_output": Residual(gain=jnp.ones(()))}}))
    with pytest.raises(ValueError, match=r"hook .*hooks.input_prefix is at no hook site"):  # a body site in a layer
        check_params(cfg, _with_hooks(cfg, params, {0: {"input_prefix": Residual(gain=jnp.ones(()))}}))


def test_weight_decay_follows_roles(model):
    cfg, params = model
    lp = jlora.lora.init(jax.random.key(1), cfg, params,
                         jlora.LoraConfig(r=2, init=False, modules_to_save=[_norm_name(cfg)]))
    hooked = _with_hooks(cfg, lp, {0: {"attn_out": Residual(gain=jnp.ones(()))}})
    labels = jlora.trainable_labels(hooked)
    tx = train.make_optimizer(labels, 1.0, weight_decay=0.5)  # zero gradients: the update is the decay alone
    state = train.init_state(hooked, tx)
    zero_grads = jax.tree_util.tree_map(jnp.zeros_like, hooked)
    updates, _ = tx.update(zero_grads, state.opt_state, hooked)
    named = {jax.tree_util.keystr(p): u for p, u in jax.tree_util.tree_flatten_with_path(updates)[0]}
    lab = {jax.tree_util.keystr(p): l for p, l in jax.tree_util.tree_flatten_with_path(labels)[0]}
    for k, u in named.items():
        decayed = bool(np.abs(np.asarray(u)).max() > 0)
        if lab[k] in ("lora_a", "lora_b"):
            assert decayed, k
        elif lab[k] == ROLE or lab[k] == "frozen":
            assert not decayed, k
        elif lab[k] == FULL:  # the saved norm: a vector, never decayed
            assert not decayed, k
    with pytest.raises(ValueError, match="already declared"):
        register_role("lora_a", False)


def _norm_name(cfg):
    return "ln_f" if cfg.arch == "gpt2" else "model.norm"


def test_modules_to_save_trains_whole_modules_and_strips_to_them(model):
    cfg, params = model
    target = "lm_head" if not cfg.tie_embeddings else ("wpe" if cfg.arch == "gpt2" else "embed_tokens")
    lcfg = jlora.LoraConfig(r=2, modules_to_save=[target, _norm_name(cfg)])
    lp = jlora.lora.init(jax.random.key(1), cfg, params, lcfg)
    saved = {n for n, v in jlora.tree.named_leaves(lp).items() if isinstance(v, (Saved, SavedKernel))}
    assert saved and all(target in n or _norm_name(cfg) in n for n in saved)
    np.testing.assert_allclose(jlora.apply(cfg, lp, TOKENS), jlora.apply(cfg, params, TOKENS), atol=1e-6)
    labels = jlora.trainable_labels(lp)
    tx = train.make_optimizer(labels, 1e-2)
    state = train.init_state(lp, tx)
    state, _ = jax.jit(train.make_train_step(cfg, tx, labels))(state, {"input_ids": TOKENS})
    merged, stripped = jlora.merge(state.params), B.strip(state.params)
    assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(params)
    for name, leaf in jlora.tree.named_leaves(stripped).items():
        if name in saved:  # the trained copy stays (as PEFT's unload/merge_and_unload keep it)
            assert np.abs(np.asarray(leaf) - np.asarray(jlora.tree.named_leaves(params)[name])).max() > 0
    # A bf16 base: the saved modules still train in float32, and merge/strip give back the base's dtypes.
    bf = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params)
    bp = jlora.lora.init(jax.random.key(1), cfg, bf, lcfg)
    assert all(jax.tree_util.tree_leaves(v)[0].dtype == jnp.float32 for n, v in jlora.tree.named_leaves(bp).items()
               if n in saved)
    for got in (jlora.merge(bp), B.strip(bp)):
        assert {x.dtype for x in jax.tree_util.tree_leaves(got)} == {jnp.dtype(jnp.bfloat16)}
    with pytest.raises(ValueError, match="modules_to_save entry 'nope' matches no module"):
        jlora.lora.init(jax.random.key(1), cfg, params, jlora.LoraConfig(modules_to_save=["nope"]))
    if cfg.tie_embeddings:
        with pytest.raises(ValueError, match="ties its output head to the input embedding"):
            jlora.lora.init(jax.random.key(1), cfg, params, jlora.LoraConfig(modules_to_save=["lm_head"]))
        with pytest.raises(ValueError, match="selects the input embedding of a model whose output head is tied"):
            jlora.lora.init(jax.random.key(1), cfg, params, jlora.LoraConfig(modules_to_save=["wte"]))


def test_param_report_counts_logical_parameters(model):
    cfg, params = model
    name = "transformer.h.0.mlp.c_fc" if cfg.arch == "gpt2" else "model.layers.0.mlp.up_proj"
    kernel = jlora.tree.get_module(params, name)["kernel"]
    packed = Packed(codes=jnp.zeros((kernel.size // 2,), jnp.uint8), real=kernel)
    qp = jlora.tree.replace_modules(params, {name: packed})
    rep = jlora.param_report(qp)
    assert rep["total"] == cfg.num_params()  # the packed leaf counts the weights it stands for
    assert rep["bytes"] == jlora.param_report(params)["bytes"] - kernel.size * 4 + kernel.size // 2
    # LoRA on the packed base: codes stay frozen even in full fine-tuning
    lp = jlora.lora.init(jax.random.key(0), cfg, qp, jlora.LoraConfig(r=2, target_modules=[name]))
    full = jlora.trainable_labels(lp, mode="full")
    assert jlora.tree.get_module(full, name)["kernel"].base.codes == "frozen"
    assert B.strip(lp)["transformer" if cfg.arch == "gpt2" else "model"] is not None
    assert jlora.tree.get_module(B.strip(lp), name)["kernel"] is packed  # a quantized base is the base
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        jlora.lora.init(jax.random.key(0), cfg, lp, jlora.LoraConfig(r=2, target_modules=[name]))


def test_help_texts_list_every_registered_method():
    """`jlora train --help` and jlora/run.py's docstring name the kinds without importing JAX at parser build
    time; this keeps them equal to the registry."""
    from jlora import cli, run

    spelled = " | ".join(B.kinds())
    assert spelled in run.__doc__
    train = next(a for a in cli.build_parser()._subparsers._group_actions[0].choices["train"]._actions
                 if "--method" in a.option_strings)
    assert spelled in train.help
