"""The README demo, in a reduced form (fewer steps, fewer held-out examples): its score check is real."""

import dataclasses
import json
import os

import pytest

from jlora.demo import DemoConfig, run_demo

# The reduced recipe: same task, model and LoRA settings as the full demo, fewer steps and examples.
CI_DEMO = dataclasses.replace(DemoConfig(), steps=30, n_eval=32, eval_batch=32)


@pytest.mark.slow
def test_reduced_demo_improves_the_real_model(smollm2_gguf, tmp_path):
    lines = []
    out = run_demo(str(tmp_path), CI_DEMO, model_path=smollm2_gguf, progress=False, log=lines.append)
    assert out["before"] <= 0.25, out  # the base model is bad at the exact format
    assert out["after"] >= out["before"] + 0.3, out  # a real, large gain after 30 CPU steps
    assert out["reloaded"] == out["after"]  # the saved PEFT adapter reproduces the result
    assert sorted(os.listdir(out["adapter_dir"])) == ["adapter_config.json", "adapter_model.safetensors"]
    assert json.load(open(tmp_path / "results.json"))["after"] == out["after"]
    assert any("side by side" in line for line in lines)
