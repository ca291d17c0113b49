"""`jlora plan`: the memory estimate against XLA's own memory analysis of the compiled train step (shapes only,
nothing allocated) for every method, with and without remat and under FSDP on 8 simulated CPU devices; the
state counts are exact; the CLI in text and JSON, and its refusals."""

import json

import jax
import pytest

import jlora
from jlora import plan as P
from jlora.cli import main
from jlora.peft import base as B

TOL = 0.15
# Two small configs, one per architecture, big enough that activations, the loss head and the state all count.
CONFIGS = {
    "llama": jlora.preset("tiny-llama").replace(n_layers=2, vocab_size=512, max_positions=128),
    "gpt2": jlora.preset("tiny-gpt2").replace(n_layers=2, vocab_size=384, d_model=64, d_ff=256, max_positions=128),
}
BATCH, SEQ = 4, 48
KINDS = B.kinds()  # every registered method, "full" included


def _check(cfg, method, quantize=None, remat=False, mesh=None, device="cpu", batch=BATCH, **kw):
    p = P.plan(cfg, method, quantize=quantize, batch=batch, seq=SEQ, remat=remat, mesh=mesh, **kw)
    m = P.measure(cfg, method, quantize=quantize, batch=batch, seq=SEQ, remat=remat, mesh=mesh, **kw)
    est = p.bytes_on(device)
    err = (est - m["total"]) / m["total"]
    assert abs(err) <= TOL, (f"{method} remat={remat} mesh={mesh}: estimate {est:,} vs XLA {m['total']:,} "
                             f"({100 * err:+.1f}%); {p.components} {m}")
    return p, m, err


@pytest.mark.parametrize("arch", sorted(CONFIGS))
@pytest.mark.parametrize("kind", KINDS)
def test_estimate_matches_xla(arch, kind):
    p, m, _ = _check(CONFIGS[arch], kind)
    # The state is counted exactly: XLA's arguments are the parameters, optimizer state, step, key and batch.
    c = p.components
    state = c["params_frozen"] + c["params_trainable"] + c["optimizer"] + c["batch"]
    assert abs(m["argument"] - state) <= 64, (state, m)


@pytest.mark.parametrize("kind", KINDS)
def test_estimate_matches_xla_with_remat(kind):
    _check(CONFIGS["llama"], kind, remat=True)


def test_remat_on_cpu_saves_nothing_but_is_planned_for_accelerators():
    # XLA's CPU scheduler runs the recomputation early: the compiled step keeps as much with remat as without
    # (what `Plan.bytes_on("cpu")` says). If this starts to fail, XLA CPU realizes remat: revisit bytes_on.
    cfg = CONFIGS["llama"].replace(n_layers=4)
    plain = P.measure(cfg, "lora", batch=BATCH, seq=SEQ, remat=False)
    remat = P.measure(cfg, "lora", batch=BATCH, seq=SEQ, remat=True)
    assert abs(remat["temp"] - plain["temp"]) <= 0.1 * plain["temp"], (plain, remat)
    p = P.plan(cfg, "lora", batch=BATCH, seq=SEQ, remat=True)
    assert p.total_bytes < p.with_remat(False) == p.bytes_on("cpu")  # float32: the cpu estimate is the plain one
    assert p.activations_remat < p.activations_no_remat


def test_qlora_and_bf16():
    cfg = CONFIGS["llama"]
    p, m, _ = _check(cfg, "lora", quantize="nf4")
    assert 0 < p.components["quantized_base"] <= p.components["params_frozen"]
    _check(cfg, "lora", dtype="bfloat16")


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")
@pytest.mark.parametrize("kind", KINDS)
def test_estimate_matches_xla_fsdp(kind):
    p, _, _ = _check(CONFIGS["llama"], kind, mesh="data=2,fsdp=4", batch=8)
    assert p.n_devices == 8


def test_plan_counts_and_flops():
    cfg = CONFIGS["llama"]
    full = P.plan(cfg, "full", batch=BATCH, seq=SEQ)
    assert full.trainable_params == full.total_params == cfg.num_params()
    lora = P.plan(cfg, "lora", {"r": 4, "target_modules": ["q_proj", "v_proj"]}, batch=BATCH, seq=SEQ)
    # r * (in + out) per target: q 64x64, v 64x32 in each of 2 layers
    assert lora.trainable_params == 2 * 4 * ((64 + 64) + (64 + 32))
    assert lora.components["optimizer"] >= 2 * 4 * lora.trainable_params
    assert full.model_flops_per_token == 6 * cfg.num_params() + 12 * cfg.n_layers * SEQ * cfg.d_model
    assert lora.flops_per_token < full.flops_per_token  # no weight gradients for the frozen base
    fsdp = P.plan(cfg, "full", batch=8, seq=SEQ, mesh="fsdp=8")
    assert fsdp.components["optimizer"] * 8 == pytest.approx(full.components["optimizer"], rel=0.01)


def test_big_models_are_planned_without_allocating():
    p = P.plan(P.model_config("llama-70b"), "lora", {"target_modules": "all-linear"}, "nf4", batch=1, seq=2048,
               dtype="bfloat16", remat=True)
    assert 70e9 < p.total_params < 72e9
    assert not p.fits("gpu-24g") and p.fits("gpu-80g")
    assert P.what_it_takes(p, "gpu-24g").startswith("remat + fsdp=")
    rows = P.decision_matrix(models=("gpt2", "llama-70b"), devices=("gpu-24g", "gpu-80g"), seq=256)
    cell = {(r["model"], r["method"]): r for r in rows}
    assert cell[("gpt2", "lora")]["gpu-24g"] == "fits"
    assert cell[("llama-70b", "full")]["gpu-80g"].startswith(("remat + fsdp=", "does not fit"))


# ---------------------------------------------------------------------------------------------------------
# The command


def test_cli_text_and_json(capsys, tmp_path):
    assert main(["plan", "--model", "gpt2", "--method", "lora", "--r", "8", "--batch", "2", "--seq", "128",
                 "--device", "gpu-24g"]) == 0
    out = capsys.readouterr().out
    for word in ("gradients", "optimizer state", "activations", "FLOPs per token", "gpu-24g", "fits"):
        assert word in out
    assert main(["plan", "--model", "gpt2", "--method", "full", "--batch", "2", "--seq", "128", "--json"]) == 0
    j = json.loads(capsys.readouterr().out)
    assert j["total_bytes"] > j["components"]["optimizer"] > 0
    assert set(j["devices"]) == set(P.DEVICES) and all("fits" in v for v in j["devices"].values())
    # A directory with only config.json is a model.
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}))
    assert main(["plan", "--model", str(tmp_path), "--method", "ia3", "--batch", "2", "--seq", "16", "--json",
                 "--measure"]) == 0
    j = json.loads(capsys.readouterr().out)
    assert abs(j["devices"]["cpu"]["bytes"] - j["measured"]["total"]) <= TOL * j["measured"]["total"]


def test_cli_does_not_fit_is_an_answer(capsys):
    assert main(["plan", "--model", "llama-70b", "--method", "full", "--dtype", "bfloat16", "--device",
                 "gpu-80g"]) == 0
    out = capsys.readouterr().out
    assert "does not fit gpu-80g" in out and "GiB" in out and "fsdp" in out
    assert main(["plan", "--model", "llama-70b", "--method", "full", "--device", "gpu-80g", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["fits"] is False
    # Methods that wrap the base kernels get the QLoRA hint (the registry says which); full fine-tuning does not.
    for method, hint in (("dora", True), ("lora", True), ("prompt", False)):
        assert main(["plan", "--model", "llama-70b", "--method", method, "--device", "gpu-24g"]) == 0
        assert ("QLoRA (--quantize nf4) would need" in capsys.readouterr().out) is hint, method


def test_cli_refusals(capsys):
    assert main(["plan", "--model", "gpt2", "--method", "nope"]) == 1
    err = capsys.readouterr().err
    assert "nope" in err and all(k in err for k in KINDS) and "Traceback" not in err
    assert main(["plan", "--model", "gpt2", "--device", "gpu-1g"]) == 1
    err = capsys.readouterr().err
    assert "gpu-1g" in err and "gpu-80g" in err and "tpu-v5e" in err
    assert main(["plan", "--model", "no/such/dir"]) == 1
    assert "config.json" in capsys.readouterr().err
    assert main(["plan", "--model", "gpt2", "--method", "lora", "--option", "bogus=1"]) == 1
    assert "bogus" in capsys.readouterr().err


def test_cli_matrix(capsys, monkeypatch):
    monkeypatch.setattr(P, "MATRIX_MODELS", ("gpt2", "llama-70b"))  # the whole matrix takes ~20 s to plan
    assert main(["plan", "--matrix", "--device", "tpu-v5e", "--seq", "256"]) == 0
    out = capsys.readouterr().out
    assert "llama-70b" in out and "qlora" in out and "gpt2" in out and "tpu-v5e" in out
    assert main(["plan", "--matrix", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["method"] for r in rows} == {"full", "lora", "qlora"} and all(d in rows[0] for d in P.DEVICES)
