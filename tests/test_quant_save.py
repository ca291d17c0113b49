"""jlora writes bitsandbytes checkpoints (`jlora.save_pretrained` with quantized kernels or ``quantize=``):
transformers + bitsandbytes 0.50.2 load them on CPU into ``Linear4bit`` / ``Linear8bitLt`` with the same logits,
the layout is the one transformers itself saves, jlora reads them back bit for bit, and a merged QLoRA model is
written float or re-quantized (``jlora merge --quantize ... --out-quantize ...``), saying which."""

import json
import os

import jax
import numpy as np
import pytest

import jlora
from jlora import quant as Q
from jlora.cli import main
from jlora.convert.stfile import SafetensorsFile

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
bnb_F = pytest.importorskip("bitsandbytes.functional")
bnb_nn = pytest.importorskip("bitsandbytes.nn")

from conftest import hf_logits, make_hf_model  # noqa: E402

TOKENS = np.random.default_rng(0).integers(0, 128, (2, 12)).astype(np.int32)
KIND = {"llama": dict(intermediate_size=128), "gpt2": dict(n_embd=64)}  # dims multiples of 64
QUANTS = {"nf4-dq": dict(quant="nf4", double_quant=True), "fp4": dict(quant="fp4", double_quant=False),
          "int8": dict(quant="int8")}


def _leaves_equal(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(np.asarray(x).dtype == np.asarray(y).dtype and np.array_equal(x, y)
                                      for x, y in zip(la, lb))


def _layout(d):
    """{key: (dtype, shape)} of a checkpoint dir's safetensors and its quantization_config."""
    st = SafetensorsFile(os.path.join(d, "model.safetensors"))
    lay = {k: (str(st.get(k).dtype), tuple(st.get(k).shape)) for k in st.keys()}
    return lay, json.load(open(os.path.join(d, "config.json")))["quantization_config"]


def _bnb_dequantized(model):
    """{module: bnb's float32 dequantization [out, in]} of a transformers model loaded quantized (read before any
    forward: bnb's CPU forward repacks 4-bit states with bfloat16 absmax)."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, bnb_nn.Linear4bit):
            out[name] = bnb_F.dequantize_4bit(mod.weight.data, mod.weight.quant_state).float().numpy().copy()
        elif isinstance(mod, bnb_nn.Linear8bitLt):
            w, scb = mod.weight.data.numpy(), mod.weight.SCB.numpy()
            out[name] = (w.astype(np.float32) * scb[:, None] / 127).astype(np.float32)
    return out


@pytest.mark.parametrize("kind,quant", [("llama", "nf4-dq"), ("gpt2", "fp4"), ("llama", "int8")])
def test_jlora_written_bnb_checkpoint_loads_in_transformers_and_back(tmp_path, kind, quant):
    """Tolerances as tests/test_quant_hf.py (the reading direction): vs transformers' float32 model carrying bnb's
    dequantization of jlora's file, float32 rounding (1e-4); vs bitsandbytes' own CPU 4-bit forward, which
    repacks absmax to bfloat16, 5e-3; bnb's int8 forward also quantizes the activations, so it is only reported."""
    hf = make_hf_model(kind, **KIND[kind])
    hf.save_pretrained(tmp_path / "base")
    cfg, fp = jlora.load_pretrained(tmp_path / "base")
    qp = Q.quantize_params(cfg, fp, Q.QuantConfig(**QUANTS[quant]))
    jlora.save_pretrained(cfg, qp, tmp_path / "jl")

    # The layout transformers saves from the same float model with BitsAndBytesConfig: same keys, dtypes, shapes
    qc = QUANTS[quant]
    bnb_cfg = (transformers.BitsAndBytesConfig(load_in_8bit=True) if qc["quant"] == "int8" else
               transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=qc["quant"],
                                               bnb_4bit_use_double_quant=qc["double_quant"],
                                               bnb_4bit_compute_dtype=torch.float32))
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=bnb_cfg,
                                                            device_map="cpu", dtype=torch.float32)
    ref.save_pretrained(tmp_path / "tf")
    (mine, my_qc), (theirs, their_qc) = _layout(tmp_path / "jl"), _layout(tmp_path / "tf")
    blob = [k for k in theirs if ".quant_state." in k]
    assert {k: v for k, v in mine.items() if k not in blob} == {k: v for k, v in theirs.items() if k not in blob}
    assert {k for k in mine if ".quant_state." in k} == set(blob)  # JSON lengths differ (number formatting)
    for key in ("quant_method", "load_in_4bit", "load_in_8bit", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant",
                "bnb_4bit_quant_storage"):
        if key != "bnb_4bit_quant_type" or qc["quant"] != "int8":
            assert my_qc[key] == their_qc[key], key

    # transformers + bitsandbytes load jlora's file quantized, holding jlora's values
    qm = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "jl", device_map="cpu",
                                                           dtype=torch.float32).eval()
    deq = _bnb_dequantized(qm)
    kernels = {n: k for n, k in jlora.tree.linear_modules(qp).items() if Q.is_quantized(k)}
    assert set(deq) == set(kernels) and len(kernels) > 0
    for n, k in kernels.items():
        if isinstance(k, Q.Int8):  # bnb: weight * SCB / 127; jlora: q * (SCB / 127): one rounding apart
            mod = qm.get_submodule(n)
            np.testing.assert_array_equal(mod.weight.data.numpy(), np.asarray(k.q).T)
            np.testing.assert_array_equal((mod.weight.SCB.numpy() / np.float32(127)).astype(np.float32), k.scale)
            np.testing.assert_allclose(np.asarray(k.materialize()).T, deq[n], rtol=2.5e-7, atol=0)
        else:
            np.testing.assert_array_equal(np.asarray(k.materialize()).T, deq[n])
    got = np.asarray(jlora.apply(cfg, qp, TOKENS))
    fp_hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32).eval()
    with torch.no_grad():
        for name, mod in fp_hf.named_modules():
            if name in deq:
                mod.weight.copy_(torch.from_numpy(deq[name].T if type(mod).__name__ == "Conv1D" else deq[name]))
    np.testing.assert_allclose(got, hf_logits(fp_hf, TOKENS), atol=1e-4)
    vs_bnb = np.abs(got - hf_logits(qm, TOKENS)).max()
    print(f"{kind} {quant}: |jlora - transformers+bnb forward of jlora's file| = {vs_bnb:.2e}")
    if qc["quant"] != "int8":
        assert vs_bnb <= 5e-3

    # and jlora reads its own file back bit for bit (Int8's SCB is chosen so that SCB / 127 == scale)
    _, back = jlora.load_pretrained(tmp_path / "jl")
    assert jax.tree.structure(back) == jax.tree.structure(qp) and _leaves_equal(back, qp)


def test_merged_qlora_is_written_float_or_requantized_and_the_cli_says_which(tmp_path, capsys):
    hf = make_hf_model("llama", **KIND["llama"])
    hf.save_pretrained(tmp_path / "base")
    cfg, fp = jlora.load_pretrained(tmp_path / "base")
    _, qp = jlora.load_pretrained(tmp_path / "base", quantize="nf4")
    lp = jlora.lora.init(jax.random.key(3), cfg, qp, jlora.LoraConfig(r=4, alpha=8, init=False,
                                                                     target_modules="all-linear"))
    jlora.save_adapter(cfg, lp, tmp_path / "adapter")
    want = np.asarray(jlora.apply(cfg, lp, TOKENS))  # the QLoRA model as trained

    # float: LoRA folded into the dequantized NF4 base, which transformers reproduces in float32
    args = ["merge", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"), "--quantize", "nf4"]
    assert main(args + ["--out", str(tmp_path / "m32")]) == 0
    said = capsys.readouterr().out
    assert "the NF4 base, dequantized to float32" in said and "written as float32 weights" in said, said
    m32 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m32", dtype=torch.float32)
    np.testing.assert_allclose(hf_logits(m32, TOKENS), want, atol=1e-4)
    # without --quantize the adapter folds into the float base: a different model (the 4-bit error)
    assert main(args[:-2] + ["--out", str(tmp_path / "mfloat")]) == 0
    assert "folded into the float base" in capsys.readouterr().out
    _, mf = jlora.load_pretrained(tmp_path / "mfloat")
    assert np.abs(np.asarray(jlora.apply(cfg, mf, TOKENS)) - want).max() > 1e-2

    # re-quantized: a bitsandbytes NF4 checkpoint holding exactly quantize_params(merged)
    assert main(args + ["--out", str(tmp_path / "m4"), "--out-quantize", "nf4", "--dtype", "bfloat16"]) == 0
    said = capsys.readouterr().out
    assert "re-quantized: bitsandbytes NF4 4-bit" in said and "other tensors bfloat16" in said, said
    _, m4 = jlora.load_pretrained(tmp_path / "m4")
    expect = Q.quantize_params(cfg, jlora.merge(lp), "nf4")
    for n, k in jlora.tree.linear_modules(expect).items():
        if Q.is_quantized(k):
            assert _leaves_equal(jlora.tree.get_module(m4, n)["kernel"], k), n
    assert json.load(open(tmp_path / "m4" / "config.json"))["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    qm = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m4", device_map="cpu", dtype=torch.float32)
    assert isinstance(qm.model.layers[0].mlp.up_proj, bnb_nn.Linear4bit)
    # re-quantizing the merged model costs a second 4-bit rounding, of the size of the first
    again = np.abs(hf_logits(qm, TOKENS) - want).max()
    first = np.abs(np.asarray(jlora.apply(cfg, jlora.lora.init(jax.random.key(3), cfg, fp, jlora.LoraConfig(
        r=4, alpha=8, init=False, target_modules="all-linear")), TOKENS)) - want).max()
    assert 0 < again < 3 * first, (again, first)
    assert not list(tmp_path.glob("**/.jlora-save-*"))


def test_writing_refuses_what_one_bnb_checkpoint_cannot_hold(tmp_path):
    cfg = jlora.preset("tiny-llama")
    fp = jlora.init_params(cfg, jax.random.key(0))
    q4 = Q.quantize_params(cfg, fp, "nf4", modules=["q_proj"])
    mixed = Q.quantize_params(cfg, q4, "int8", modules=["v_proj"])
    with pytest.raises(ValueError, match=r"one quantization, but model\.layers\.0\.self_attn\.q_proj is nf4 "
                                         r"\(with double quantization\) and .*v_proj is int8"):
        jlora.save_pretrained(cfg, mixed, tmp_path / "mixed")
    with pytest.raises(ValueError, match=r"quantize=.int8.\): model\..*q_proj\.kernel is already quantized"):
        jlora.save_pretrained(cfg, q4, tmp_path / "twice", quantize="int8")
    lp = jlora.lora.init(jax.random.key(1), cfg, q4, jlora.LoraConfig(r=2))
    with pytest.raises(ValueError, match=r"q_proj\.kernel is a LoRA node; call jlora\.merge"):
        jlora.save_pretrained(cfg, lp, tmp_path / "lora")
    with pytest.raises(ValueError, match="quantize: quant must be one of nf4, fp4, int8, got 'q4_1'"):
        jlora.save_pretrained(cfg, fp, tmp_path / "bad", quantize="q4_1")
    assert not any(os.listdir(tmp_path / d) for d in ("mixed", "twice", "lora", "bad") if (tmp_path / d).exists())
    # only the linear layers selected are quantized; the others are listed for transformers to keep float
    jlora.save_pretrained(cfg, q4, tmp_path / "some")
    qc = json.load(open(tmp_path / "some" / "config.json"))["quantization_config"]
    assert "model.layers.0.self_attn.k_proj" in qc["llm_int8_skip_modules"] and "lm_head" in qc[
        "llm_int8_skip_modules"] and not any("q_proj" in m for m in qc["llm_int8_skip_modules"])
    _, back = jlora.load_pretrained(tmp_path / "some")
    assert _leaves_equal(back, q4)
