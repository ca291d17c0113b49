"""experiments/throughput.py end to end on the 8 simulated CPU devices (tiny model, one timed step)."""

import importlib.util
import json
import os

import jax
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("throughput", os.path.join(ROOT, "experiments", "throughput.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")
def test_throughput_reports_tokens_mfu_and_memory(script, tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    res = script.main(["--model", "tiny-gpt2", "--mesh", "data=2,fsdp=4", "--batch", "8", "--seq", "16",
                       "--steps", "1", "--warmup", "0", "--peak-tflops", "1", "--json", str(out)])
    assert [r["method"] for r in res] == ["full", "lora"]
    for r in res:
        assert r["devices"] == 8 and r["mesh"] == "data=2,fsdp=4,tensor=1"
        assert r["tokens_per_s"] == pytest.approx(8 * 16 / r["step_s"])
        assert r["mfu"] == pytest.approx(r["tokens_per_s"] * r["flops_per_token"] / (8 * 1e12))
    cfg = __import__("jlora").preset("tiny-gpt2")
    assert res[0]["flops_per_token"] == 6 * cfg.num_params() + 12 * cfg.n_layers * 16 * cfg.d_model
    assert res[1]["trainable"] < res[0]["trainable"] == cfg.num_params()
    # FSDP over 4: full fine-tuning state per device is about a quarter of params + 2 Adam moments
    assert res[0]["state_bytes_per_device"] < 3 * 4 * cfg.num_params() / 4 * 1.05
    assert "LoRA / full throughput" in capsys.readouterr().out
    assert [json.loads(line)["method"] for line in out.read_text().splitlines()] == ["full", "lora"]
    pm = script.main(["--model", "tiny-gpt2", "--pmap", "--method", "lora", "--batch", "8", "--seq", "16",
                      "--steps", "1", "--warmup", "0"])
    assert pm[0]["mesh"] == "pmap" and pm[0]["devices"] == 8 and pm[0]["mfu"] is None


def test_peak_table(script):
    assert script.peak_flops("NVIDIA H100 80GB HBM3", None) == 989e12
    assert script.peak_flops("TPU v5 lite", None) == 197e12
    assert script.peak_flops("cpu", None) is None and script.peak_flops("cpu", 2.0) == 2e12
