"""Generation: KV-cache decoding against full recomputation, greedy and beam search against transformers, sampling.

Random tiny models have nearly flat next-token distributions, where float noise between two frameworks could flip
an argmax. The fixture models are therefore initialised with a larger std and their logits scaled up (the final
norm / LM head multiplied by 10), so that the top tokens are well separated.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from conftest import make_hf_model
from jlora.generate import _STATS, _filter_logits, chat, generate

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PAD = 127  # fills the left padding of transformers' batched prompts and the rows that finished
PROMPTS = [[5, 17, 33, 2, 9], [7, 1, 100, 4, 8, 9, 10, 11, 12, 13, 14], [3, 60], [44, 45, 46, 47, 48, 49, 50]]
REF_LEN = 32  # fixed buffer length of the no-cache reference (one compilation of jlora.apply)


def _peaked(kind):
    if kind == "gpt2":
        model = make_hf_model("gpt2", initializer_range=0.4)
        with torch.no_grad():  # logits are linear in ln_f's (scale, bias) since the head is tied
            model.transformer.ln_f.weight.mul_(10)
            model.transformer.ln_f.bias.mul_(10)
    else:
        model = make_hf_model("llama", initializer_range=0.2)
        with torch.no_grad():
            model.lm_head.weight.mul_(10)
    return model


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model(request, tmp_path_factory):
    hf = _peaked(request.param)
    d = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(d)
    cfg, params = jlora.load_pretrained(d)
    return hf, cfg, params


def _hf_generate(hf, prompts, max_new_tokens, eos, **kw):
    """transformers' generate on left-padded prompts; new tokens only, cut after the first EOS (like jlora)."""
    t = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (t - len(p)) + list(p) for p in prompts])
    mask = torch.tensor([[0] * (t - len(p)) + [1] * len(p) for p in prompts])
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=PAD,
                      eos_token_id=eos, return_dict_in_generate=True, output_scores=True, **kw)
    eos_set = set([eos] if isinstance(eos, int) else (eos or []))
    rows = []
    for row in out.sequences[:, t:].tolist():
        cut = next((i for i, x in enumerate(row) if x in eos_set), None)
        rows.append(row if cut is None else row[:cut + 1])
    return rows, out


def _reference_greedy(cfg, params, prompt, n):
    """Greedy decoding without a cache: the full sequence through jlora.apply at every step."""
    buf = np.zeros((1, REF_LEN), np.int32)  # right padding is invisible to causal attention
    buf[0, :len(prompt)] = prompt
    cur, score = len(prompt), 0.0
    for _ in range(n):
        logits = np.asarray(jlora.apply(cfg, params, jnp.asarray(buf)))[0, cur - 1]
        tok = int(np.argmax(logits))
        score += float(jax.nn.log_softmax(logits)[tok])
        buf[0, cur] = tok
        cur += 1
    return buf[0, len(prompt):cur].tolist(), score


def _first_token_not_in(rows, avoid):
    return next(x for row in rows for x in row[2:] if x not in avoid)


def _count_forwards(hf):
    calls = []
    return calls, hf.register_forward_hook(lambda *_: calls.append(1))


# ----------------------------------------------------------------------------------------------------------
# 1. cache vs recomputation


def test_cached_greedy_matches_full_recompute(model):
    _, cfg, params = model
    for prompt in (PROMPTS[0], PROMPTS[1]):
        ids, score = generate(cfg, params, prompt, 14, eos_token_id=(), return_scores=True)
        ref, ref_score = _reference_greedy(cfg, params, prompt, 14)
        assert ids == ref
        assert score == pytest.approx(ref_score, abs=1e-3)


# ----------------------------------------------------------------------------------------------------------
# 2. greedy vs transformers


@pytest.mark.parametrize("ngram", [0, 3])
def test_greedy_matches_transformers_batched(model, ngram):
    hf, cfg, params = model
    free, _ = _hf_generate(hf, PROMPTS, 16, None, no_repeat_ngram_size=ngram)
    eos = _first_token_not_in(free, {PAD})  # a token some sequence emits mid-way: that one stops, others may not
    calls, hook = _count_forwards(hf)
    ref, _ = _hf_generate(hf, PROMPTS, 16, eos, no_repeat_ngram_size=ngram)
    hook.remove()
    ours = generate(cfg, params, PROMPTS, 16, eos_token_id=eos, pad_token_id=PAD, no_repeat_ngram_size=ngram)
    assert ours == ref
    assert _STATS["last_steps"] == len(calls)
    assert any(len(r) < 16 and r[-1] == eos for r in ours)
    if ngram == 0:  # each prompt alone (no padding) gives the same as in the batch
        assert [generate(cfg, params, p, 16, eos_token_id=eos) for p in PROMPTS] == ours


# ----------------------------------------------------------------------------------------------------------
# 3. beam search vs transformers


@pytest.mark.parametrize("beams,ngram,lps,eos_kind", [(4, 3, (0.9, 2.0), "one"), (3, 2, (-0.5,), "many")])
def test_beam_search_matches_transformers(model, beams, ngram, lps, eos_kind):
    hf, cfg, params = model
    free, _ = _hf_generate(hf, PROMPTS, 12, None)
    if eos_kind == "one":  # a token some sequence emits mid-way: some hypotheses finish early, others run to the end
        eos = _first_token_not_in(free, {PAD})
    else:  # many EOS ids: every prompt collects num_beams finished hypotheses early and the search stops early
        eos = sorted({r[1] for r in free} | {r[2] for r in free})
    calls, hook = _count_forwards(hf)
    try:
        for lp in lps:  # length_penalty is traced: one compilation for both
            kw = dict(num_beams=beams, no_repeat_ngram_size=ngram, length_penalty=lp)
            calls.clear()
            ref, out = _hf_generate(hf, PROMPTS, 12, eos, early_stopping=False, **kw)
            ours, scores = generate(cfg, params, PROMPTS, 12, eos_token_id=eos, pad_token_id=PAD,
                                    return_scores=True, **kw)
            assert ours == ref
            np.testing.assert_allclose(scores, out.sequences_scores.numpy(), atol=1e-4, rtol=1e-5)
            assert _STATS["last_steps"] == len(calls)  # the while loop stopped when transformers' loop did
    finally:
        hook.remove()
    if eos_kind == "many":
        assert _STATS["last_steps"] < 12


# ----------------------------------------------------------------------------------------------------------
# 4. sampling


def test_filter_logits_matches_transformers_warpers():
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    logits = np.random.default_rng(0).normal(size=(4, 50)).astype(np.float32) * 3
    traced = jax.jit(_filter_logits)  # temperature, top_k and top_p traced: one compilation for all settings
    for temp, k, p in [(1.0, 5, 1.0), (0.7, 0, 0.6), (1.3, 10, 0.8), (1.0, 1, 1.0), (1.0, 0, 1e-6), (1.0, 0, 1.0)]:
        ref = torch.from_numpy(logits)
        ref = TemperatureLogitsWarper(temp)(None, ref)
        if k:
            ref = TopKLogitsWarper(k)(None, ref)
        if p < 1.0:
            ref = TopPLogitsWarper(p)(None, ref)
        for got in (_filter_logits(jnp.asarray(logits), temp, k, p),
                    traced(jnp.asarray(logits), jnp.float32(temp), jnp.int32(k), jnp.float32(p))):
            got = np.asarray(got)
            np.testing.assert_array_equal(np.isfinite(got), np.isfinite(ref.numpy()))
            np.testing.assert_allclose(got[np.isfinite(got)], ref.numpy()[np.isfinite(got)], rtol=1e-6)
    # a hand-made distribution: top-p 0.5 over probabilities (0.4, 0.3, 0.2, 0.1) keeps the first two
    got = np.asarray(_filter_logits(jnp.log(jnp.array([0.1, 0.4, 0.2, 0.3])), 1.0, 0, 0.5))
    assert np.isfinite(got).tolist() == [False, True, False, True]
    got = np.asarray(_filter_logits(jnp.log(jnp.array([0.1, 0.4, 0.2, 0.3])), 1.0, 3, 1.0))
    assert np.isfinite(got).tolist() == [False, True, True, True]


def test_sampling_is_deterministic_and_follows_the_tempered_distribution(model):
    _, cfg, params = model
    prompts, temp = [PROMPTS[2]] * 512, 2.0
    first = np.array(generate(cfg, params, prompts, 1, temperature=temp, seed=0))[:, 0]
    again = np.array(generate(cfg, params, prompts, 1, temperature=temp, seed=jax.random.key(0)))[:, 0]
    other = np.array(generate(cfg, params, prompts, 1, temperature=temp, seed=1))[:, 0]
    assert first.tolist() == again.tolist() and first.tolist() != other.tolist()
    logits = np.asarray(jlora.apply(cfg, params, jnp.asarray([PROMPTS[2]])))[0, -1]
    probs = np.asarray(jax.nn.softmax(logits / temp))
    freq = np.bincount(first, minlength=cfg.vocab_size) / len(prompts)
    assert np.all(np.abs(freq - probs) <= 4 * np.sqrt(probs * (1 - probs) / len(prompts)) + 2e-3)


def test_sampling_filters(model):
    _, cfg, params = model
    prompt, n = PROMPTS[0], 12
    greedy = generate(cfg, params, prompt, n, eos_token_id=())
    assert generate(cfg, params, prompt, n, temperature=1.0, top_k=1, eos_token_id=(), seed=3) == greedy
    assert generate(cfg, params, prompt, n, temperature=1.0, top_p=1e-6, eos_token_id=(), seed=3) == greedy
    # every sampled token lies in the top-3 of the model's distribution at its step
    seq = generate(cfg, params, prompt, n, temperature=10.0, top_k=3, eos_token_id=(), seed=7)
    assert seq != greedy
    assert seq == generate(cfg, params, prompt, n, temperature=10.0, top_k=3, eos_token_id=(), seed=7)
    buf = np.zeros((1, REF_LEN), np.int32)
    buf[0, :len(prompt) + n] = prompt + seq
    logits = np.asarray(jlora.apply(cfg, params, jnp.asarray(buf)))[0]
    for j, tok in enumerate(seq):
        step = logits[len(prompt) + j - 1]
        assert (step > step[tok]).sum() < 3


# ----------------------------------------------------------------------------------------------------------
# 5. stopping, lengths, input/output forms, errors, compilation cache


def test_eos_stops_and_max_new_tokens(model):
    _, cfg, params = model
    free = generate(cfg, params, PROMPTS[1], 10, eos_token_id=())
    assert len(free) == 10
    assert len(generate(cfg, params, PROMPTS[1], 3, eos_token_id=())) == 3
    eos = free[4]
    stop = free.index(eos)
    assert generate(cfg, params, PROMPTS[1], 10, eos_token_id=eos) == free[:stop + 1]
    assert _STATS["last_steps"] == stop + 1  # the decode loop stopped there
    assert generate(cfg, params, PROMPTS[1], 10, eos_token_id=[PAD, eos]) == free[:stop + 1]
    beams = generate(cfg, params, PROMPTS, 10, num_beams=4, no_repeat_ngram_size=3, length_penalty=0.9,
                     eos_token_id=())
    assert [len(b) for b in beams] == [10] * len(PROMPTS)
    assert generate(cfg, params, PROMPTS[1], 0) == []


def test_input_and_output_forms(model):
    _, cfg, params = model
    lists = generate(cfg, params, PROMPTS, 6, eos_token_id=())
    arr = generate(cfg, params, np.array([PROMPTS[1]] * 4), 6, eos_token_id=())
    assert isinstance(arr, np.ndarray) and arr.shape == (4, 6)
    assert arr[0].tolist() == lists[1]
    # a 2-D array with a mask: padding (left or right) is dropped before generation
    padded = np.array([[PAD, PAD, PAD] + PROMPTS[0], PROMPTS[0] + [PAD, PAD, PAD]] * 2)
    out = generate(cfg, params, padded, 6, attention_mask=padded != PAD, eos_token_id=())
    assert out.tolist() == [lists[0]] * 4
    one = generate(cfg, params, np.array(PROMPTS[0]), 6, eos_token_id=())
    assert one.shape == (6,) and one.tolist() == lists[0]
    with pytest.raises(ValueError, match="at least one token"):
        generate(cfg, params, [[1, 2], []], 4)
    with pytest.raises(ValueError, match="out of range"):
        generate(cfg, params, [cfg.vocab_size], 4)
    with pytest.raises(ValueError, match="beam search is deterministic"):
        generate(cfg, params, [1, 2], 4, num_beams=2, temperature=1.0)


def test_overlong_prompt_for_gpt2_context_raises(model):
    _, cfg, params = model
    if cfg.arch != "gpt2":
        pytest.skip("only GPT-2's learned positions bound the context")
    with pytest.raises(ValueError, match="exceeds the model's context of 64 positions"):
        generate(cfg, params, [1] * 70, 4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(cfg, params, [1] * 60, 8)
    assert len(generate(cfg, params, [1] * 60, 4, eos_token_id=())) == 4  # exactly fills the context


def test_second_call_does_not_recompile(model):
    _, cfg, params = model
    generate(cfg, params, PROMPTS, 10, eos_token_id=5)
    before = _STATS["traces"]
    # other lengths in the same buckets, another EOS id, another max_new_tokens: same compiled function
    generate(cfg, params, PROMPTS[::-1], 12, eos_token_id=9)
    generate(cfg, params, [[1, 2, 3], [4], [5], [6, 7]], 7, eos_token_id=5, pad_token_id=3)
    generate(cfg, params, PROMPTS[0], 5, temperature=1.0, top_k=2, seed=1)
    generate(cfg, params, PROMPTS[1], 9, temperature=0.5, top_k=0, top_p=0.9, seed=2)
    assert _STATS["traces"] == before


def test_chat_applies_template_and_decodes(model):
    _, cfg, params = model

    class StubTokenizer:  # the interface chat() relies on, nothing more
        eos_token_id = None

        def apply_chat_template(self, messages, add_generation_prompt, tokenize):
            assert add_generation_prompt and tokenize
            return {"input_ids": [1] + [ord(c) % 100 for m in messages for c in m["content"]] + [2]}

        def decode(self, ids, skip_special_tokens=False):
            assert skip_special_tokens
            return " ".join(str(i) for i in ids)

    messages = [{"role": "user", "content": "hi there"}]
    text = chat(cfg, params, StubTokenizer(), messages, max_new_tokens=5, eos_token_id=())
    prompt = [1] + [ord(c) % 100 for c in "hi there"] + [2]
    assert text == " ".join(map(str, generate(cfg, params, prompt, 5, eos_token_id=())))
