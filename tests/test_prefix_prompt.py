"""Prefix tuning and prompt tuning against the real `peft` library, both directions (GPT-2 and GQA Llama, padding
and attention masks), generation with the KV cache (greedy and beam search vs PEFT's `generate`, sampling), the
real SmolLM2 (a short run on the demo task lowers the loss; greedy generation with the trained prefix/prompt equals
PEFT's), the train step (only the method's leaves train, exact resume, 8 simulated devices = one), and clear
errors for bad input."""

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
from conftest import adam_moments, sharded_equals_one_device  # noqa: E402
from jlora import loop, train  # noqa: E402
from jlora.convert.stfile import SafetensorsFile, write_safetensors  # noqa: E402
from jlora.data import Batches  # noqa: E402
from jlora.peft import base as B  # noqa: E402
from jlora.peft import prefix as PX  # noqa: E402
from jlora.peft import prompt as PR  # noqa: E402
from jlora.peft.prefix import Prefix, PrefixConfig  # noqa: E402
from jlora.peft.prompt import Prompt, PromptConfig  # noqa: E402

TOKENS = np.random.default_rng(0).integers(2, 128, (2, 7)).astype(np.int32)
RIGHT = np.array([[1] * 7, [1] * 5 + [0] * 2], np.int32)  # right padding: transformers' positions are exact
LEFT = np.array([[1] * 7, [0] * 2 + [1] * 5], np.int32)  # left padding, with explicit position ids

# PEFT configs (keyword arguments) and jlora's equivalent, per case.
CASES = {
    "prefix": (peft.PrefixTuningConfig, dict(num_virtual_tokens=3), PrefixConfig(num_virtual_tokens=3)),
    "prefix_mlp": (peft.PrefixTuningConfig, dict(num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=24),
                   PrefixConfig(num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=24)),
    "prompt": (peft.PromptTuningConfig, dict(num_virtual_tokens=4), PromptConfig(num_virtual_tokens=4)),
}


def _peft_model(hf, case, seed=0):
    cls, kw, _ = CASES[case]
    torch.manual_seed(seed)
    pm = peft.get_peft_model(copy.deepcopy(hf), cls(task_type="CAUSAL_LM", **kw))
    return pm.eval()


def _peft_load(hf, adapter_dir):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf), adapter_dir)
    user = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert not user, user
    return pm.eval()


def _peft_logits(pm, case, tokens, mask):
    """PEFT's logits for the real tokens. Prefix: position ids from the mask (PEFT shifts them by P, as jlora);
    prompt: PEFT ignores position ids, so only right padding keeps transformers' positions exact."""
    kw = dict(input_ids=torch.from_numpy(tokens.astype(np.int64)), attention_mask=torch.from_numpy(mask.astype(np.int64)))
    if case.startswith("prefix"):
        kw["position_ids"] = torch.from_numpy(np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int64))
    with torch.no_grad():
        logits = pm(**kw).logits.float().numpy()
    return logits[:, -tokens.shape[1]:]  # prompt tuning returns the virtual positions too


def _mask_for(case):
    return LEFT if case.startswith("prefix") else RIGHT


def _close_on_real_tokens(ours, ref, mask, atol=1e-4):
    m = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(ours)[m], ref[m], atol=atol, rtol=0)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("case", list(CASES))
def test_both_directions_match_peft(models, kind, case, tmp_path):
    hf, cfg, base = models[kind]
    mask = _mask_for(case)
    # PEFT -> jlora: a PEFT-initialized (random) adapter, saved by PEFT and loaded by jlora.
    pm = _peft_model(hf, case)
    ref = _peft_logits(pm, case, TOKENS, mask)
    pm.save_pretrained(tmp_path / "from_peft")
    loaded = jlora.load_adapter(cfg, base, tmp_path / "from_peft")
    ours = jlora.apply(cfg, loaded, jnp.asarray(TOKENS), jnp.asarray(mask))
    _close_on_real_tokens(ours, ref, mask)
    hook = PX.prefix(cfg, loaded) if case.startswith("prefix") else PR.prompt(cfg, loaded)
    assert hook is not None and hook.length == CASES[case][1]["num_virtual_tokens"]
    if case.startswith("prefix"):  # GQA: the prefix has the key/value heads' width, head_dim * kv_heads
        assert hook.embedding.shape == (3, cfg.n_layers * 2 * cfg.kv_heads * cfg.dim_head)
        assert not hook.projected  # PEFT saved the MLP's output: jlora serves the folded table

    # jlora -> PEFT: a jlora-initialized adapter (with the MLP for prefix_mlp), saved and loaded by PEFT.
    mcfg = CASES[case][2]
    tuned = B.get(case.split("_")[0]).init(jax.random.key(3), cfg, base, mcfg)
    ours = np.asarray(jlora.apply(cfg, tuned, jnp.asarray(TOKENS), jnp.asarray(mask)))
    jlora.save_adapter(cfg, tuned, tmp_path / "from_jlora", mcfg)
    with open(tmp_path / "from_jlora" / "adapter_config.json") as f:
        pconf = json.load(f)
    want = {k: v for k, v in pm.peft_config["default"].to_dict().items() if k in pconf}
    for k in ("num_layers", "token_dim", "num_attention_heads", "num_virtual_tokens", "num_transformer_submodules"):
        assert pconf[k] == want[k], k  # the layout fields PEFT derives from the model
    ref = _peft_logits(_peft_load(hf, tmp_path / "from_jlora"), case, TOKENS, mask)
    _close_on_real_tokens(ours, ref, mask)
    # and back: the file reproduces the tree's function (the MLP folded, so up to float rounding)
    again = jlora.load_adapter(cfg, base, tmp_path / "from_jlora")
    _close_on_real_tokens(jlora.apply(cfg, again, jnp.asarray(TOKENS), jnp.asarray(mask)), ours, mask, atol=2e-5)
    assert jax.tree_util.tree_structure(B.strip(again)) == jax.tree_util.tree_structure(base)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("case", ["prefix", "prompt"])
def test_generation_matches_peft_generate(models, kind, case, tmp_path):
    """Greedy and beam search with the KV cache equal PEFT's generate (prefix: also a left-padded batch)."""
    hf, cfg, base = models[kind]
    pm = _peft_model(hf, case, seed=1)
    pm.save_pretrained(tmp_path / "a")
    params = jlora.load_adapter(cfg, base, tmp_path / "a")
    prompts = [[5, 17, 3, 99, 42], [7, 8, 9]] if case == "prefix" else [[5, 17, 3, 99, 42]]
    t = max(map(len, prompts))
    ids = np.zeros((len(prompts), t), np.int64)
    mask = np.zeros_like(ids)
    for j, p in enumerate(prompts):
        ids[j, t - len(p):], mask[j, t - len(p):] = p, 1
    for beams in (1, 3):
        ours = jlora.generate(cfg, params, prompts, max_new_tokens=6, num_beams=beams, eos_token_id=[])
        with torch.no_grad():
            ref = pm.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                              max_new_tokens=6, min_new_tokens=6, do_sample=False, num_beams=beams, pad_token_id=0)
        ref = ref[:, -6:].tolist()
        assert ours == ref, (beams, ours, ref)
    # sampling goes through the same cached decode: at a vanishing temperature it is the greedy result
    cold = jlora.generate(cfg, params, prompts, max_new_tokens=6, temperature=1e-6, eos_token_id=[], seed=0)
    assert cold == jlora.generate(cfg, params, prompts, max_new_tokens=6, eos_token_id=[])


# ----------------------------------------------------------------------------------------------------------
# The real SmolLM2: a short run on the demo task, then greedy generation vs PEFT


@pytest.mark.slow
@pytest.mark.parametrize("case,mcfg", [("prefix", PrefixConfig(num_virtual_tokens=8)),
                                       ("prompt", PromptConfig(num_virtual_tokens=8, prompt_tuning_init="TEXT",
                                                               prompt_tuning_init_text="Write the date as asked."))])
def test_smollm2_demo_task_then_generation_equals_peft(smollm2, smollm2_gguf, case, mcfg, tmp_path):
    from jlora import demo_task

    cfg, base, hf = smollm2
    tok = jlora.load_tokenizer(smollm2_gguf)
    if case == "prompt":
        mcfg = mcfg.replace(tokenizer_name_or_path=smollm2_gguf)
    params = B.get(case).init(jax.random.key(0), cfg, base, mcfg)
    exs = demo_task.make_examples(12, seed=5)
    batches = Batches.from_examples([{"messages": ex["messages"]} for ex in exs], tok, seq_len=96, batch_size=4,
                                    seed=0, pack=False, overflow="error")
    held = batches.batch_at(2)  # the third batch is never trained on
    labels = jlora.trainable_labels(params)
    tx = train.make_optimizer(labels, 3e-2 if case == "prefix" else 3e-1)
    state = train.init_state(params, tx)
    step = jax.jit(train.make_train_step(cfg, tx, labels, max_grad_norm=1.0))
    ev = jax.jit(train.make_eval_step(cfg))
    before = float(ev(state.params, held)["loss_sum"])
    for i in range(4):
        state, _ = step(state, batches.batch_at(i % 2))
    after = float(ev(state.params, held)["loss_sum"])
    assert after < before, (before, after)  # the held-out loss went down
    trained = state.params
    jlora.save_adapter(cfg, trained, tmp_path / "ad", mcfg)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "ad").eval()  # the session's model stays bare
    ids = tok.apply_chat_template(demo_task.prompt_messages(demo_task.make_examples(1, seed=99)[0]),
                                  add_generation_prompt=True, tokenize=True)
    ours = jlora.generate(cfg, trained, ids, max_new_tokens=12)
    with torch.no_grad():
        x = torch.tensor([ids])
        ref = pm.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=12, do_sample=False,
                          eos_token_id=tok.eos_token_ids[0], pad_token_id=tok.eos_token_ids[0])
    assert ours == ref[0, len(ids):].tolist()
    x = jnp.asarray([ids], jnp.int32)
    assert float(jnp.abs(jlora.apply(cfg, trained, x)[0, -1] - jlora.apply(cfg, base, x)[0, -1]).max()) > 1e-2


# ----------------------------------------------------------------------------------------------------------
# The train step


TINY_GPT2 = dataclasses.replace(jlora.preset("tiny-gpt2"), n_layers=1)
TRAIN = {"prefix": PrefixConfig(num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=16),
         "prompt": PromptConfig(num_virtual_tokens=3, prompt_tuning_init="SAMPLE_VOCAB")}


def _tree_equal(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def _train_params(case, cfg=TINY_GPT2):
    return B.get(case).init(jax.random.key(2), cfg, jlora.init_params(cfg, jax.random.key(1)), TRAIN[case])


def _hook(cfg, params):
    return jlora.model.body(cfg, params)["hooks"]


@pytest.mark.parametrize("case", ["prefix", "prompt"])
def test_fit_trains_only_the_method_and_resumes_exactly(case, tmp_path):
    cfg = TINY_GPT2
    params = _train_params(case)
    labels = jlora.trainable_labels(params)
    assert set(jax.tree_util.tree_leaves(labels)) == {"frozen", case}
    n_train = sum(x.size for x in jax.tree_util.tree_leaves(_hook(cfg, params)))
    assert jlora.param_report(params, labels)["trainable"] == n_train
    opt_state = train.init_state(params, train.make_optimizer(labels, 1e-2, weight_decay=0.1)).opt_state
    assert sum(x.size for x in adam_moments(opt_state)) == 2 * n_train  # Adam state for the method's leaves only
    frozen_before = jax.device_get(jlora.split(params, labels)[1])
    hook_before = jax.device_get(_hook(cfg, params))

    rng = np.random.default_rng(0)
    seqs = [(rng.integers(1, 128, n).astype(np.int32), np.ones(n, np.int32)) for n in rng.integers(5, 17, 16)]
    batches = Batches(seqs, seq_len=16, batch_size=4, seed=3)
    fc = loop.FitConfig(steps=2, learning_rate=1e-2, warmup_steps=1, save_every=100, log_every=1, weight_decay=0.1)
    kw = dict(fit_config=fc, progress=False, run_config={"method": case}, log=lambda *_: None)
    straight = loop.fit(cfg, _train_params(case), batches, run_dir=str(tmp_path / "straight"), **kw)
    assert _tree_equal(jlora.split(straight.state.params, labels)[1], frozen_before)  # bitwise
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(_hook(cfg, straight.state.params)),
                            jax.tree_util.tree_leaves(hook_before)):
        assert np.abs(np.asarray(x) - np.asarray(y)).max() > 0, jax.tree_util.keystr(path)  # every leaf moved

    first = loop.fit(cfg, _train_params(case), batches, run_dir=str(tmp_path / "split"), stop_at=1, **kw)
    assert int(first.state.step) == 1
    logs = []
    resumed = loop.fit(cfg, _train_params(case), batches, run_dir=str(tmp_path / "split"),
                       **{**kw, "log": logs.append})
    assert any("resumed from step 1" in str(line) for line in logs), logs
    assert _tree_equal(resumed.state.params, straight.state.params)  # bitwise
    assert isinstance(_hook(cfg, resumed.state.params)["kv_prefix" if case == "prefix" else "input_prefix"],
                      Prefix if case == "prefix" else Prompt)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")
@pytest.mark.parametrize("case", ["prefix", "prompt"])
def test_sharded_training_equals_one_device(case):
    def setup():
        params = _train_params(case)
        labels = jlora.trainable_labels(params)
        return params, labels, train.make_optimizer(labels, 1e-2, weight_decay=0.01, eps=1e-4)

    sstate = sharded_equals_one_device(TINY_GPT2, setup)
    assert isinstance(_hook(TINY_GPT2, sstate.params)["kv_prefix" if case == "prefix" else "input_prefix"],
                      Prefix if case == "prefix" else Prompt)


# ----------------------------------------------------------------------------------------------------------
# Properties and errors


def test_zero_prefix_and_fold(models):
    """A fold of the projection MLP computes the same function; merge refuses and says what to do instead."""
    _, cfg, base = models["llama"]
    tuned = PX.init(jax.random.key(0), cfg, base, PrefixConfig(num_virtual_tokens=2, prefix_projection=True))
    folded = PX.fold(cfg, tuned)
    assert not PX.prefix(cfg, folded).projected
    np.testing.assert_allclose(jlora.apply(cfg, folded, TOKENS), jlora.apply(cfg, tuned, TOKENS), atol=1e-5)
    zero = PX.init(jax.random.key(0), cfg, base, PrefixConfig(num_virtual_tokens=2, init_weights="zero"))
    assert float(jnp.abs(PX.prefix(cfg, zero).table()).max()) == 0.0
    for t in (tuned, PR.init(jax.random.key(0), cfg, base, PromptConfig(num_virtual_tokens=2))):
        with pytest.raises(ValueError, match=r"cannot be folded into the weights; keep it as an adapter .*"
                                             r"jlora export --format peft"):
            jlora.merge(t)
        assert _tree_equal(B.strip(t), base)
    with pytest.raises(ValueError, match=r"already has a Prefix hook at model.hooks.kv_prefix"):
        PR.init(jax.random.key(0), cfg, tuned, PromptConfig(num_virtual_tokens=2))


def test_prompt_text_init_uses_the_tokenizer(models):
    _, cfg, base = models["llama"]

    class Tok:
        def encode(self, text):
            return [5, 6, 7]

    pc = PromptConfig(num_virtual_tokens=5, prompt_tuning_init="TEXT", prompt_tuning_init_text="abc")
    np.testing.assert_array_equal(PR.init_ids(pc, Tok()), [5, 6, 7, 5, 6])  # PEFT: repeat, then cut
    tuned = PR.init(jax.random.key(0), cfg, base, pc, tokenizer=Tok())
    emb = np.asarray(jlora.model.embedding(cfg, base))
    np.testing.assert_array_equal(np.asarray(PR.prompt(cfg, tuned).embedding), emb[[5, 6, 7, 5, 6]])
    sv = PR.init(jax.random.key(0), cfg, base, PromptConfig(num_virtual_tokens=4, prompt_tuning_init="SAMPLE_VOCAB"))
    rows = np.asarray(PR.prompt(cfg, sv).embedding)
    assert all((np.abs(emb - r).max(axis=1) == 0).any() for r in rows)  # every row is a token's embedding
    with pytest.raises(ValueError, match="needs tokenizer_name_or_path"):
        PR.init(jax.random.key(0), cfg, base, pc)


def test_bad_configs_name_the_option():
    with pytest.raises(ValueError, match="num_virtual_tokens must be a positive int, got 0"):
        PrefixConfig(num_virtual_tokens=0)
    with pytest.raises(ValueError, match="init_weights must be null"):
        PrefixConfig(init_weights="gaussian")
    with pytest.raises(ValueError, match="prompt_tuning_init must be one of RANDOM, SAMPLE_VOCAB, TEXT"):
        PromptConfig(prompt_tuning_init="VOCAB")
    with pytest.raises(ValueError, match="'TEXT' needs prompt_tuning_init_text"):
        PromptConfig(prompt_tuning_init="TEXT")
    with pytest.raises(ValueError, match=r"unknown option method.r for method.kind 'prefix'"):
        B.get("prefix").make_config({"r": 4})


def test_context_overflow_names_both_numbers(models):
    _, cfg, base = models["gpt2"]  # learned positions: 64
    tuned = PR.init(jax.random.key(0), cfg, base, PromptConfig(num_virtual_tokens=10))
    with pytest.raises(ValueError, match=r"10 virtual tokens \(num_virtual_tokens\) \+ the input of 60 tokens = 70 "
                                         r"positions exceeds the model's context of 64 positions"):
        jlora.apply(cfg, tuned, jnp.zeros((1, 60), jnp.int32))
    with pytest.raises(ValueError, match=r"generate: 10 virtual tokens \(num_virtual_tokens\) \+ a prompt of 50 "
                                         r"tokens \+ max_new_tokens=8 = 68 positions exceeds"):
        jlora.generate(cfg, tuned, list(range(1, 51)), max_new_tokens=8)
    pre = PX.init(jax.random.key(0), cfg, base, PrefixConfig(num_virtual_tokens=10))
    with pytest.raises(ValueError, match="10 virtual tokens"):
        jlora.apply(cfg, pre, jnp.zeros((1, 60), jnp.int32))
    assert jlora.apply(cfg, pre, jnp.zeros((1, 54), jnp.int32)).shape == (1, 54, cfg.vocab_size)  # 64 fits


def _rewrite(adapter_dir, pconf=None, tensors=None):
    if pconf is not None:
        with open(os.path.join(adapter_dir, "adapter_config.json"), "w") as f:
            json.dump(pconf, f)
    if tensors is not None:
        write_safetensors(os.path.join(adapter_dir, "adapter_model.safetensors"), tensors)


def test_bad_files_are_refused_clearly(models, tmp_path):
    hf, cfg, base = models["llama"]
    _peft_model(hf, "prefix").save_pretrained(tmp_path / "ok")
    with open(tmp_path / "ok" / "adapter_config.json") as f:
        good = json.load(f)
    table = SafetensorsFile(str(tmp_path / "ok" / "adapter_model.safetensors")).get("prompt_embeddings")

    def case(pc=None, ts=None, match="", model="llama"):
        d = tmp_path / f"case{case.n}"
        case.n += 1
        d.mkdir()
        _rewrite(d, pc or good, ts or {"prompt_embeddings": table})
        _, c, b = models[model]
        with pytest.raises(ValueError, match=match):
            jlora.load_adapter(c, b, d)
    case.n = 0
    case({**good, "num_layers": 3}, match=r"num_layers is 3 but the model has 2 \(layers\): the adapter was made "
                                          r"for another model")
    case({**good, "num_attention_heads": 4, "token_dim": 64},
         match=r"num_attention_heads is 4 but the model has 2 \(key/value heads\)")
    case(match=r"num_attention_heads is 2 but the model has 4 \(key/value heads\)", model="gpt2")  # another head layout
    case(ts={"prompt_embeddings": table[:, :-1]}, match=r"prompt_embeddings has shape \[3, 127\], expected \[3, 128\]")
    case(ts={"other": table}, match=r"no tensor prompt_embeddings \(found: other\)")
    case({**good, "num_virtual_tokens": 5}, match=r"prompt_embeddings has shape \[3, 128\], expected \[5, 128\]")
    case({**good, "task_type": "SEQ_2_SEQ_LM"}, match="jlora loads CAUSAL_LM adapters only")
    case({**good, "num_transformer_submodules": 2}, match="num_transformer_submodules 2")
    case({**good, "modules_to_save": ["lm_head"]}, match="modules_to_save")
    case({**good, "peft_type": "P_TUNING"}, match="P_TUNING")
