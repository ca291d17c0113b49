"""Hugging Face checkpoints saved by transformers with bitsandbytes (``quantization_config``): 4-bit NF4/FP4 (with
and without double quantization) and 8-bit, written here by transformers 5 + bitsandbytes 0.50.2 on CPU, read by
jlora without torch into `Quant4bit` / `Int8` kernels holding the file's bytes; their logits, their size, LoRA
training on them, ``llm_int8_skip_modules`` and the checkpoints jlora refuses."""

import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora import quant as Q, train
from jlora.convert.stfile import SafetensorsFile, write_safetensors

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
bnb_F = pytest.importorskip("bitsandbytes.functional")
safetensors_torch = pytest.importorskip("safetensors.torch")

from conftest import hf_logits, make_hf_model  # noqa: E402

TOKENS = np.random.default_rng(0).integers(0, 128, (2, 12)).astype(np.int32)
KIND = {"llama": dict(intermediate_size=128), "gpt2": dict(n_embd=64)}  # dims multiples of 64 (see test_quant)


def _write(tmp_path, kind, name, shard=None, **bnb):
    """(transformers' float model, dir of the bnb-quantized checkpoint transformers saved from it)."""
    base = tmp_path / f"{kind}-base"
    if not base.exists():
        make_hf_model(kind, **KIND[kind]).save_pretrained(base)
    qm = transformers.AutoModelForCausalLM.from_pretrained(
        base, quantization_config=transformers.BitsAndBytesConfig(**bnb), device_map="cpu", dtype=torch.float32)
    qm.save_pretrained(tmp_path / name, **({"max_shard_size": shard} if shard else {}))
    fp = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    return fp, qm.eval(), tmp_path / name


def _dequantized_by_bnb(qdir):
    """{HF module: bnb's float32 dequantization of the file's state} (QuantState.from_dict, as transformers
    restores it, before any forward: bnb's CPU forward repacks the state with bfloat16 absmax)."""
    sd = {}
    for f in sorted(f for f in os.listdir(qdir) if f.endswith(".safetensors")):  # one file or shards
        sd.update(safetensors_torch.load_file(os.path.join(qdir, f)))
    out = {}
    for key in sd:
        if ".weight.quant_state.bitsandbytes__" in key:
            m = key.split(".weight.quant_state.")[0]
            qs = bnb_F.QuantState.from_dict({k[len(m) + 8:]: v for k, v in sd.items()
                                             if k.startswith(m + ".weight.")}, device=torch.device("cpu"))
            out[m] = bnb_F.dequantize_4bit(sd[m + ".weight"].view(torch.uint8), qs).float().numpy()
    return out, sd


def _with_weights(fp, weights):
    """transformers' float model with the given [out, in] weights (GPT-2's Conv1D stores [in, out])."""
    with torch.no_grad():
        for name, mod in fp.named_modules():
            if name in weights:
                w = torch.from_numpy(weights[name])
                mod.weight.copy_(w.T if type(mod).__name__ == "Conv1D" else w)
    return fp


@pytest.mark.parametrize("kind,quant_type,dq", [("llama", "nf4", True), ("gpt2", "fp4", False)])
def test_bnb_4bit_checkpoint_loads_with_transformers_logits(tmp_path, kind, quant_type, dq):
    """Tolerances: jlora vs transformers' float32 model carrying bnb's dequantization of the same file: float32
    matmul rounding only (1e-4; measured ~1e-7); vs transformers + bitsandbytes' own CPU forward of the file, which
    repacks the state with bfloat16 absmax (relative 2^-9 per block scale): 5e-3 (measured ~2e-3), well under
    the 4-bit effect itself (fp32 model vs quantized, ~1e-1), which is also checked to be large."""
    fp, qm, qdir = _write(tmp_path, kind, "q4", load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                          bnb_4bit_use_double_quant=dq, bnb_4bit_compute_dtype=torch.float32)
    assert json.load(open(qdir / "config.json"))["quantization_config"]["load_in_4bit"]
    cfg, params = jlora.load_pretrained(qdir)
    deq, sd = _dequantized_by_bnb(qdir)
    linear = jlora.tree.linear_modules(params)
    quantized = {n: k for n, k in linear.items() if Q.is_quantized(k)}
    assert set(quantized) == set(deq) and len(quantized) == len(linear) - (cfg.arch == "llama")  # lm_head float
    for n, k in quantized.items():
        assert isinstance(k, Q.Quant4bit) and k.quant_type == quant_type and k.double_quant == dq
        # exactly the file's bytes, and bnb's dequantization of them bit for bit
        np.testing.assert_array_equal(np.asarray(k.codes), sd[n + ".weight"].numpy().reshape(-1))
        np.testing.assert_array_equal(np.asarray(k.absmax), sd[n + ".weight.absmax"].numpy())
        if dq:
            np.testing.assert_array_equal(np.asarray(k.nested_absmax), sd[n + ".weight.nested_absmax"].numpy())
        np.testing.assert_array_equal(np.asarray(k.materialize()).T, deq[n])
        # 4-bit in memory: 4.127 bits per weight with double quantization, 4.5 without
        assert Q.stored_bytes(k) / np.prod(k.shape) <= (0.52 if dq else 0.57)
    got = np.asarray(jlora.apply(cfg, params, TOKENS))
    float_logits = hf_logits(fp, TOKENS)
    exact = hf_logits(_with_weights(fp, deq), TOKENS)
    vs_bnb = np.abs(got - hf_logits(qm, TOKENS)).max()
    effect = np.abs(float_logits - exact).max()
    print(f"{kind} {quant_type} dq={dq}: |jlora - fp32 on bnb's dequantized weights| = "
          f"{np.abs(got - exact).max():.2e}, |jlora - transformers+bnb CPU forward| = {vs_bnb:.2e}, "
          f"4-bit effect {effect:.2e}")
    np.testing.assert_allclose(got, exact, atol=1e-4)
    assert vs_bnb <= 5e-3 and effect > 10 * vs_bnb


def test_skip_modules_stay_float_and_lora_trains_on_the_4bit_base(tmp_path):
    """Also a sharded checkpoint whose packed codes are stored as bfloat16 (``bnb_4bit_quant_storage``: the same
    bytes viewed as another dtype, as FSDP-QLoRA recipes save them)."""
    _, _, qdir = _write(tmp_path, "llama", "q4", shard="100KB", load_in_4bit=True, bnb_4bit_quant_type="nf4",
                        bnb_4bit_use_double_quant=True, llm_int8_skip_modules=["lm_head", "down_proj"],
                        bnb_4bit_quant_storage=torch.bfloat16)
    assert (qdir / "model.safetensors.index.json").exists()
    cfg, params = jlora.load_pretrained(qdir)
    deq, _ = _dequantized_by_bnb(qdir)
    assert len(deq) == 2 * 6  # all but down_proj (and lm_head)
    for n, w in deq.items():
        np.testing.assert_array_equal(np.asarray(jlora.tree.get_module(params, n)["kernel"].materialize()).T, w)
    kinds = {n: type(k).__name__ for n, k in jlora.tree.linear_modules(params).items()}
    assert kinds["model.layers.1.mlp.down_proj"] == kinds["lm_head"] == "ArrayImpl"
    assert kinds["model.layers.1.mlp.up_proj"] == "Quant4bit"
    lp = jlora.lora.init(jax.random.key(0), cfg, params, jlora.LoraConfig(r=2, target_modules="all-linear"))
    labels = jlora.trainable_labels(lp)
    tx = train.make_optimizer(labels, 1e-2)
    state = train.init_state(lp, tx)
    frozen = jax.device_get(jlora.split(lp, labels)[1])
    step = jax.jit(train.make_train_step(cfg, tx, labels))
    batch = {"input_ids": TOKENS, "attention_mask": np.ones_like(TOKENS), "loss_mask": np.ones_like(TOKENS)}
    for _ in range(2):
        state, metrics = step(state, batch)
    assert np.isfinite(float(metrics["loss"]))
    after = jax.device_get(jlora.split(state.params, labels)[1])
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(frozen),
                                                     jax.tree_util.tree_leaves(after)))  # codes unchanged
    k = jlora.tree.get_module(state.params, "model.layers.0.self_attn.q_proj")["kernel"]
    assert isinstance(k.base, Q.Quant4bit) and k.base.codes.dtype == jnp.uint8
    assert np.abs(np.asarray(k.b)).max() > 0  # LoRA moved
    merged = jlora.merge(state.params)  # LoRA folded into the dequantized base: a plain float tree
    assert all(isinstance(x, jax.Array) and x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(merged))
    np.testing.assert_allclose(jlora.apply(cfg, merged, TOKENS), jlora.apply(cfg, state.params, TOKENS), atol=2e-5)


def test_bnb_8bit_checkpoint_loads_as_int8(tmp_path):
    """LLM.int8 (``load_in_8bit``): ``weight`` int8 [out, in] + ``SCB`` row absmax -> `Int8` (scale SCB / 127).
    Compared with transformers' float32 model carrying bnb's dequantization ``weight * SCB / 127`` (1e-4:
    float32 rounding); bnb's own int8 forward also quantizes activations (and splits outliers), so it is only
    reported."""
    fp, qm, qdir = _write(tmp_path, "llama", "q8", load_in_8bit=True)
    cfg, params = jlora.load_pretrained(qdir)
    sd = SafetensorsFile(os.path.join(qdir, "model.safetensors"))
    deq = {}
    for n, k in jlora.tree.linear_modules(params).items():
        if n == "lm_head":
            assert not Q.is_quantized(k)
            continue
        assert isinstance(k, Q.Int8)
        np.testing.assert_array_equal(np.asarray(k.q).T, sd.get(n + ".weight"))
        deq[n] = (sd.get(n + ".weight").astype(np.float32) * sd.get(n + ".SCB")[:, None] / 127).astype(np.float32)
    got = np.asarray(jlora.apply(cfg, params, TOKENS))
    exact = hf_logits(_with_weights(fp, deq), TOKENS)
    print(f"int8: |jlora - fp32 on dequantized weights| = {np.abs(got - exact).max():.2e}, "
          f"|jlora - transformers+bnb int8 forward| = {np.abs(got - hf_logits(qm, TOKENS)).max():.2e}")
    np.testing.assert_allclose(got, exact, atol=1e-4)


def _edit(src, dst, tensors=None, config=None):
    """A copy of checkpoint ``src`` with tensors / config.json fields changed (None deletes)."""
    shutil.copytree(src, dst)
    st = SafetensorsFile(os.path.join(src, "model.safetensors"))
    arrays = {k: np.array(st.get(k)) for k in st.keys()}
    for k, v in (tensors or {}).items():
        arrays.pop(k) if v is None else arrays.__setitem__(k, v)
    write_safetensors(os.path.join(dst, "model.safetensors"), arrays)
    if config:
        hf = json.load(open(os.path.join(src, "config.json")))
        hf["quantization_config"].update(config)
        json.dump(hf, open(os.path.join(dst, "config.json"), "w"))
    return dst


def test_refuses_what_it_cannot_read(tmp_path):
    _, _, qdir = _write(tmp_path, "llama", "q4", load_in_4bit=True, bnb_4bit_quant_type="nf4",
                        bnb_4bit_use_double_quant=True)
    m = "model.layers.0.self_attn.q_proj.weight"
    st = SafetensorsFile(os.path.join(qdir, "model.safetensors"))
    blob = json.loads(bytes(np.array(st.get(m + ".quant_state.bitsandbytes__nf4"))).decode())

    def blob_with(**kw):
        return np.frombuffer(json.dumps({**blob, **kw}).encode(), np.uint8).copy()

    cases = [
        (dict(tensors={m + ".absmax": None}), rf"model.safetensors: missing tensor {m}.absmax \(the absmax"),
        (dict(tensors={m + ".absmax": np.array(st.get(m + ".absmax")).astype(np.float16)}),
         rf"model.safetensors: tensor {m}.absmax .*has dtype float16, expected uint8"),
        (dict(tensors={m + ".quant_map": Q.FP4_CODE}), rf"tensor {m}.quant_map is not bitsandbytes' nf4 table"),
        (dict(tensors={m + ".quant_state.bitsandbytes__nf4": blob_with(shape=[64, 32])}),
         r"shape \[64, 32\], expected \[64, 64\]"),
        (dict(tensors={m + ".quant_state.bitsandbytes__nf4": blob_with(blocksize=48)}), r"blocksize 48, expected"),
        (dict(tensors={m + ".quant_state.bitsandbytes__nf4": None,
                       m + ".quant_state.bitsandbytes__int4": blob_with(quant_type="int4")}),
         r"quant_type 'int4' .* expected 'nf4' or 'fp4'"),
        (dict(tensors={m + ".quant_state.bitsandbytes__nf4": np.frombuffer(b"{not json", np.uint8).copy()}),
         r"not bitsandbytes' packed quant_state JSON"),
        (dict(tensors={m + ".quant_state.bitsandbytes__nf4": None}),
         rf"missing tensor {re.escape(m + '.quant_state.bitsandbytes__<nf4|fp4>')} \(the quantization state of {m}"),
        (dict(config={"quant_method": "gptq"}), r"quant_method 'gptq' is not supported"),
        (dict(config={"load_in_4bit": False, "load_in_8bit": False}), r"neither load_in_4bit nor load_in_8bit"),
        (dict(config={"bnb_4bit_quant_storage": "int4"}), r"bnb_4bit_quant_storage 'int4' is not supported"),
    ]
    for i, (edit, msg) in enumerate(cases):
        with pytest.raises(ValueError, match=msg):
            jlora.load_pretrained(_edit(qdir, tmp_path / f"bad{i}", **edit))
    with pytest.raises(ValueError, match=r"already quantized by bitsandbytes \(4bit\); load it with quantize=None"):
        jlora.load_pretrained(qdir, quantize="nf4")
