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
