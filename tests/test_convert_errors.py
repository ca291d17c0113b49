"""Bad checkpoints give clear errors that name the file and what was wrong; nothing is loaded half-way."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

import jlora
from jlora.convert.stfile import SafetensorsFile, write_safetensors
from conftest import make_hf_model


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    make_hf_model("llama").save_pretrained(d)
    return d


def _copy(src, tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(src, dst)
    return dst


def test_missing_path_and_no_weights(llama_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such model directory"):
        jlora.load_pretrained(tmp_path / "nope")
    shutil.copy(llama_dir / "config.json", tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="no weights found"):
        jlora.load_pretrained(tmp_path)


def test_no_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        jlora.load_pretrained(tmp_path)


def test_config_missing_field(llama_dir, tmp_path):
    d = _copy(llama_dir, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    del cfg["hidden_size"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config.json: missing field 'hidden_size'"):
        jlora.load_pretrained(d)


def test_unknown_model_type(llama_dir, tmp_path):
    d = _copy(llama_dir, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "bert"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config.json: unknown or unsupported model_type 'bert'"):
        jlora.load_pretrained(d)


def test_unsupported_rope_scaling(llama_dir, tmp_path):
    d = _copy(llama_dir, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="rope scaling type 'yarn'"):
        jlora.load_pretrained(d)


def _rewrite(d, fn):
    st = SafetensorsFile(str(d / "model.safetensors"))
    tensors = {k: np.array(st.get(k)) for k in st.keys()}
    del st
    fn(tensors)
    write_safetensors(str(d / "model.safetensors"), tensors)


def test_missing_tensor(llama_dir, tmp_path):
    d = _copy(llama_dir, tmp_path)
    _rewrite(d, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensor model.layers.1.mlp.up_proj.weight"):
        jlora.load_pretrained(d)


def test_misshaped_tensor(llama_dir, tmp_path):
    d = _copy(llama_dir, tmp_path)
    _rewrite(d, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": np.zeros((16, 64), np.float32)}))
    with pytest.raises(ValueError, match=r"k_proj.weight has shape \(16, 64\), expected \(32, 64\)"):
        jlora.load_pretrained(d)


def test_unexpected_tensor(llama_dir, tmp_path):
    d = _copy(llama_dir, tmp_path)
    _rewrite(d, lambda t: t.update({"model.layers.0.self_attn.extra.weight": np.zeros((2,), np.float32)}))
    with pytest.raises(ValueError, match=r"unexpected tensor model.layers.0.self_attn.extra.weight"):
        jlora.load_pretrained(d)


@pytest.mark.parametrize("cut", [4, 100, -10])
def test_truncated_safetensors(llama_dir, tmp_path, cut):
    d = _copy(llama_dir, tmp_path)
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:cut])
    with pytest.raises(ValueError, match=r"model.safetensors: (not a safetensors file|corrupt|truncated)"):
        jlora.load_pretrained(d)


def test_garbage_header(llama_dir, tmp_path):
    d = _copy(llama_dir, tmp_path)
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"\xff" * 12
    f.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"model.safetensors: corrupt safetensors header"):
        jlora.load_pretrained(d)


def test_pickle_refused_unless_asked(llama_dir, tmp_path):
    torch = pytest.importorskip("torch")
    d = tmp_path / "pkl"
    d.mkdir()
    shutil.copy(llama_dir / "config.json", d / "config.json")
    model = make_hf_model("llama")
    torch.save(model.state_dict(), d / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pickle"):
        jlora.load_pretrained(d)
    cfg, params = jlora.load_pretrained(d, allow_pickle=True)
    cfg2, params2 = jlora.load_pretrained(llama_dir)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda a, b: bool((a == b).all()), params, params2))


def test_save_refuses_wrong_tree_and_keeps_existing(llama_dir, tmp_path):
    cfg, params = jlora.load_pretrained(llama_dir)
    jlora.save_pretrained(cfg, params, tmp_path)
    before = (tmp_path / "model.safetensors").read_bytes()
    bad = jax.tree_util.tree_map(lambda x: x, params)
    del bad["model"]["layers"]["1"]["mlp"]
    with pytest.raises(ValueError, match=r"missing parameter model.layers.1.mlp"):
        jlora.save_pretrained(cfg, bad, tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["config.json", "generation_config.json", "model.safetensors"]
