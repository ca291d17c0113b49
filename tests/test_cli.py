"""The jlora command: each verb end to end on tiny models (the same library functions the other tests check)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora.cli import build_parser, main
from conftest import hf_logits, make_hf_model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def test_help_lists_the_verbs():
    text = build_parser().format_help()
    for verb in ("convert", "generate", "merge", "export", "info", "demo"):
        assert verb in text
    out = subprocess.run([sys.executable, "-m", "jlora.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "convert" in out.stdout


@pytest.fixture(scope="module")
def llama_with_adapter(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model = make_hf_model("llama")
    model.save_pretrained(root / "base")
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                    init_lora_weights=False))
    pm.save_pretrained(root / "adapter")
    return root, pm


def test_convert_hf_dir(llama_with_adapter, tmp_path, capsys):
    root, _ = llama_with_adapter
    assert main(["convert", str(root / "base"), str(tmp_path / "out")]) == 0
    assert "converted" in capsys.readouterr().out
    cfg, p1 = jlora.load_pretrained(root / "base")
    _, p2 = jlora.load_pretrained(tmp_path / "out")
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda a, b: bool((a == b).all()), p1, p2))


def test_merge_and_export_hf_match_peft(llama_with_adapter, tmp_path):
    root, pm = llama_with_adapter
    toks = np.random.default_rng(0).integers(0, 128, (2, 9))
    ref = hf_logits(pm, toks)
    assert main(["merge", "--model", str(root / "base"), "--adapter", str(root / "adapter"),
                 "--out", str(tmp_path / "merged")]) == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    np.testing.assert_allclose(hf_logits(merged, toks), ref, atol=1e-4, rtol=0)
    assert main(["export", "--format", "hf", "--model", str(root / "base"), "--adapter", str(root / "adapter"),
                 "--out", str(tmp_path / "exported")]) == 0
    cfg, params = jlora.load_pretrained(tmp_path / "exported")
    np.testing.assert_allclose(np.asarray(jlora.apply(cfg, params, jnp.asarray(toks, jnp.int32))), ref,
                               atol=1e-4, rtol=0)


def test_export_peft_round_trips(llama_with_adapter, tmp_path):
    root, pm = llama_with_adapter
    assert main(["export", "--format", "peft", "--model", str(root / "base"), "--adapter", str(root / "adapter"),
                 "--out", str(tmp_path / "ad")]) == 0
    assert sorted(os.listdir(tmp_path / "ad")) == ["adapter_config.json", "adapter_model.safetensors"]
    cfg, base = jlora.load_pretrained(root / "base")
    a = jlora.load_adapter(cfg, base, root / "adapter")
    b = jlora.load_adapter(cfg, base, tmp_path / "ad")
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda x, y: bool((x == y).all()), a, b))


def test_info_and_errors(llama_with_adapter, capsys):
    root, _ = llama_with_adapter
    assert main(["info", "--model", str(root / "base"), "--adapter", str(root / "adapter")]) == 0
    info = json.loads(capsys.readouterr().out)
    # per layer: q_proj A 64x4 + B 4x64, v_proj A 64x4 + B 4x32 (GQA: 2 kv heads of 16)
    assert info["parameters"]["trainable"] == 2 * (64 * 4 + 4 * 64 + 64 * 4 + 4 * 32)
    assert main(["merge", "--model", str(root / "nope"), "--adapter", str(root / "adapter"), "--out",
                 str(root / "x")]) == 1
    assert "no such model directory" in capsys.readouterr().err
