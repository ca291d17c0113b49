"""`jlora train` / `jlora eval` from a config file, end to end on a tiny model directory with a tokenizer."""

import json
import os

import numpy as np
import pytest
import tokenizers
from tokenizers import models, pre_tokenizers, processors

import jlora
from jlora import run
from jlora.cli import main
from jlora.tokenizer import Tokenizer
from conftest import make_hf_model

WORDS = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(100)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    make_hf_model("llama", eos_token_id=2, bos_token_id=1).save_pretrained(d)
    backend = tokenizers.Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(["<pad>", "<s>", "</s>", "<unk>"])
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    Tokenizer(backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>").save(d)
    rng = np.random.default_rng(0)
    lines = []
    for _ in range(48):  # "copy the prompt reversed": learnable, deterministic
        words = [f"w{i}" for i in rng.integers(0, 100, 4)]
        lines.append(json.dumps({"prompt": " ".join(words), "completion": " ".join(words[::-1])}))
    (d / "train.jsonl").write_text("\n".join(lines) + "\n")
    return d


def _toml(path, model_dir, run_dir, kind="lora", steps=6):
    path.write_text(f"""
[model]
path = "{model_dir}"
[method]
kind = "{kind}"
r = 4
alpha = 8
target_modules = ["q_proj", "v_proj", "o_proj"]
[data]
train = "{model_dir / 'train.jsonl'}"
eval_fraction = 0.25
seq_len = 16
batch_size = 4
[optim]
learning_rate = 1e-2
warmup_steps = 2
[run]
dir = "{run_dir}"
steps = {steps}
eval_every = 3
save_every = 3
log_every = 3
""")
    return path


def test_train_lora_writes_a_peft_adapter_and_evaluates(model_dir, tmp_path, capsys):
    cfg_file = _toml(tmp_path / "run.toml", model_dir, tmp_path / "run")
    assert main(["train", "--config", str(cfg_file), "--no-progress"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["step"] == 6 and np.isfinite(out["eval_loss"])
    adapter = tmp_path / "run" / "adapter"
    assert sorted(os.listdir(adapter)) == ["adapter_config.json", "adapter_model.safetensors"]
    cfg, base = jlora.load_pretrained(model_dir)
    assert set(jlora.lora.adapters(jlora.load_adapter(cfg, base, adapter))) == {
        f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "v_proj", "o_proj")}
    assert main(["eval", "--run", str(tmp_path / "run")]) == 0
    ev = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert ev["eval_loss"] == pytest.approx(out["eval_loss"], rel=1e-5)
    # Running again finds the finished run and does not train further.
    assert main(["train", "--config", str(cfg_file), "--no-progress"]) == 0
    assert "run already complete" in capsys.readouterr().out


def test_train_full_writes_an_hf_model(model_dir, tmp_path, capsys):
    cfg_file = _toml(tmp_path / "run.toml", model_dir, tmp_path / "run", kind="full", steps=3)
    assert main(["train", "--config", str(cfg_file), "--no-progress", "--set", "optim.learning_rate=1e-3"]) == 0
    cfg, params = jlora.load_pretrained(tmp_path / "run" / "model")
    assert jlora.load_tokenizer(tmp_path / "run" / "model").encode("w1 w2") == [1, 5, 6]


def test_stop_and_resume_from_the_command_line(model_dir, tmp_path, capsys):
    cfg_file = _toml(tmp_path / "run.toml", model_dir, tmp_path / "run")
    assert main(["train", "--config", str(cfg_file), "--no-progress", "--stop-at", "3"]) == 0
    assert not (tmp_path / "run" / "adapter").exists()
    assert main(["train", "--config", str(cfg_file), "--no-progress"]) == 0
    assert "resumed from step 3" in capsys.readouterr().out
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").exists()


def test_train_on_a_mesh_resumes_on_another_mesh(model_dir, tmp_path, capsys):
    """--mesh: steps 0-3 on data=2,fsdp=2,tensor=2, then 3-6 on fsdp=4,tensor=2: the same adapter as a
    one-device run. A batch of 4 on fsdp=8 is refused before any step runs."""
    import jax

    if jax.device_count() < 8:
        pytest.skip("needs 8 (simulated) devices")
    cfg_file = _toml(tmp_path / "run.toml", model_dir, tmp_path / "run")
    assert main(["train", "--config", str(cfg_file), "--no-progress", "--stop-at", "3",
                 "--mesh", "data=2,fsdp=2,tensor=2"]) == 0
    assert "mesh data=2,fsdp=2,tensor=2 over 8 cpu devices" in capsys.readouterr().out
    assert main(["train", "--config", str(cfg_file), "--no-progress", "--mesh", "fsdp=-1"]) == 1
    assert "train batch size 4 is not divisible by the data-parallel size 8 of mesh data=1,fsdp=8,tensor=1" \
        in capsys.readouterr().err
    assert main(["train", "--config", str(cfg_file), "--no-progress", "--mesh", "fsdp=4,tensor=-1"]) == 0
    assert "resumed from step 3" in capsys.readouterr().out
    one = _toml(tmp_path / "one.toml", model_dir, tmp_path / "one")
    assert main(["train", "--config", str(one), "--no-progress"]) == 0
    cfg, base = jlora.load_pretrained(model_dir)
    a = jlora.lora.adapters(jlora.load_adapter(cfg, base, tmp_path / "run" / "adapter"))
    b = jlora.lora.adapters(jlora.load_adapter(cfg, base, tmp_path / "one" / "adapter"))
    for name in b:
        np.testing.assert_allclose(np.asarray(a[name].b), np.asarray(b[name].b), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match=r"run.mesh: .*unknown axis 'model'"):
        run.load_config(str(cfg_file), ["run.mesh='model=8'"])


def test_config_errors_name_the_key(model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('[optim]\nlearnig_rate = 1.0\n')
    with pytest.raises(ValueError, match=r"bad.toml: unknown key optim.learnig_rate"):
        run.load_config(str(bad))
    bad.write_text('[optimizer]\nx = 1\n')
    with pytest.raises(ValueError, match=r"unknown section \[optimizer\]"):
        run.load_config(str(bad))
    with pytest.raises(ValueError, match="data.train is required"):
        run.load_config(None, ["run.dir=x"])
    with pytest.raises(ValueError, match="method.kind must be one of adapter, dora, ia3, lora, prefix, prompt, full, got 'vera'"):
        run.load_config(None, ["run.dir=x", "data.train=y", "method.kind=vera"])
    with pytest.raises(ValueError, match=r"unknown option method.lora_alpha for method.kind 'lora' \(its options: "
                                         r"alpha, .*\)"):
        run.load_config(None, ["run.dir=x", "data.train=y", "method.lora_alpha=8"])
    with pytest.raises(ValueError, match=r"IA3Config.feedforward_modules"):
        run.load_config(None, ["run.dir=x", "data.train=y", "method.kind=ia3", 'method.target_modules=["k_proj"]',
                               'method.feedforward_modules=["down_proj"]'])
    with pytest.raises(ValueError, match=r"unknown option method.rr \(no method has it\)"):
        run.load_config(None, ["run.dir=x", "data.train=y", "method.kind=full", "method.rr=4"])
    assert run.load_config(None, ["run.dir=x", "data.train=y", "method.kind=full", "method.r=4"])["method"] == {
        "kind": "full"}
    c = run.load_config(None, ["run.dir=x", "data.train=y", "optim.learning_rate=3e-4",
                               'method.target_modules=["q_proj"]'])
    assert c["optim"]["learning_rate"] == 3e-4 and c["method"]["target_modules"] == ["q_proj"]
    assert main(["train", "--data", str(tmp_path / "missing.jsonl"), "--run-dir", str(tmp_path / "r"),
                 "--model", str(model_dir), "--no-progress"]) == 1
    assert "missing.jsonl" in capsys.readouterr().err


@pytest.mark.parametrize("kind,options", [
    ("dora", ['method.r=2', 'method.alpha=4', 'method.target_modules=["q_proj", "down_proj"]']),
    ("ia3", ['method.target_modules=["k_proj", "v_proj", "down_proj"]', 'method.feedforward_modules=["down_proj"]']),
])
def test_train_other_methods_then_merge_and_export(model_dir, tmp_path, capsys, kind, options):
    """Every registered method trains from the command line, writes a PEFT adapter of its own kind, and merges
    and exports through the same verbs."""
    sets = ["--set", "data.eval_fraction=0.25", "--set", "data.seq_len=16", "--set", "data.batch_size=4",
            "--set", "optim.learning_rate=1e-2"]
    for o in options:
        sets += ["--set", o]
    run_dir = tmp_path / "run"
    assert main(["train", "--model", str(model_dir), "--data", str(model_dir / "train.jsonl"), "--run-dir",
                 str(run_dir), "--method", kind, "--steps", "2", "--no-progress", *sets]) == 0
    with open(run_dir / "adapter" / "adapter_config.json") as f:
        pconf = json.load(f)
    assert pconf["peft_type"] == ("IA3" if kind == "ia3" else "LORA") and pconf.get("use_dora", False) == (
        kind == "dora")
    cfg, base = jlora.load_pretrained(model_dir)
    params = jlora.load_adapter(cfg, base, run_dir / "adapter")
    assert jlora.methods.methods_in(params) == [jlora.methods.get(kind)]
    capsys.readouterr()
    assert main(["merge", "--model", str(model_dir), "--adapter", str(run_dir / "adapter"), "--out",
                 str(tmp_path / "merged")]) == 0
    _, merged = jlora.load_pretrained(tmp_path / "merged")
    toks = np.asarray([[1, 5, 9, 14, 3]], np.int32)
    np.testing.assert_allclose(jlora.apply(cfg, merged, toks), jlora.apply(cfg, params, toks), atol=1e-4)
    assert main(["export", "--model", str(model_dir), "--adapter", str(run_dir / "adapter"), "--format", "peft",
                 "--out", str(tmp_path / "exported")]) == 0
    again = jlora.load_adapter(cfg, base, tmp_path / "exported")
    np.testing.assert_allclose(jlora.apply(cfg, again, toks), jlora.apply(cfg, params, toks), atol=0)


@pytest.mark.parametrize("kind,options", [
    ("prefix", ["method.num_virtual_tokens=4", "method.prefix_projection=true"]),
    ("prompt", ["method.num_virtual_tokens=4", 'method.prompt_tuning_init="TEXT"',
                'method.prompt_tuning_init_text="w1 w2 w3"']),
])
def test_train_prefix_and_prompt_then_generate_and_refuse_merge(model_dir, tmp_path, capsys, kind, options):
    """Prefix and prompt tuning from the command line: a PEFT adapter of their kind that `generate --adapter`
    applies; `merge` is a clear error (they change the computation) and `export --format peft` works."""
    sets = ["--set", "data.eval_fraction=0.25", "--set", "data.seq_len=16", "--set", "data.batch_size=4",
            "--set", "optim.learning_rate=1e-2"]
    for o in options:
        sets += ["--set", o]
    run_dir = tmp_path / "run"
    assert main(["train", "--model", str(model_dir), "--data", str(model_dir / "train.jsonl"), "--run-dir",
                 str(run_dir), "--method", kind, "--steps", "2", "--no-progress", *sets]) == 0
    with open(run_dir / "adapter" / "adapter_config.json") as f:
        pconf = json.load(f)
    assert pconf["peft_type"] == {"prefix": "PREFIX_TUNING", "prompt": "PROMPT_TUNING"}[kind]
    assert pconf["num_virtual_tokens"] == 4
    if kind == "prompt":  # the TEXT init used the run's own tokenizer
        assert pconf["prompt_tuning_init"] == "TEXT"
    cfg, base = jlora.load_pretrained(model_dir)
    params = jlora.load_adapter(cfg, base, run_dir / "adapter")
    assert jlora.methods.methods_in(params) == [jlora.methods.get(kind)]
    capsys.readouterr()
    assert main(["generate", "--model", str(model_dir), "--adapter", str(run_dir / "adapter"), "--prompt",
                 "w1 w2", "--no-chat", "--max-new-tokens", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    tok = jlora.load_tokenizer(model_dir)
    ids = jlora.generate(cfg, params, tok.encode("w1 w2"), max_new_tokens=3, eos_token_id=tok.eos_token_ids)
    assert out["completion"] == tok.decode(ids, skip_special_tokens=True)
    assert main(["merge", "--model", str(model_dir), "--adapter", str(run_dir / "adapter"), "--out",
                 str(tmp_path / "merged")]) == 1
    err = capsys.readouterr().err
    assert "jlora merge: error:" in err and "cannot be folded into the weights" in err and "export" in err
    assert not os.path.exists(tmp_path / "merged")  # nothing half-written
    assert main(["export", "--model", str(model_dir), "--adapter", str(run_dir / "adapter"), "--format", "peft",
                 "--out", str(tmp_path / "exported")]) == 0
    again = jlora.load_adapter(cfg, base, tmp_path / "exported")
    toks = np.asarray([[1, 5, 9, 14, 3]], np.int32)
    np.testing.assert_allclose(jlora.apply(cfg, again, toks), jlora.apply(cfg, params, toks), atol=0)


def test_qlora_from_the_command_line_and_full_on_a_quantized_base_refused(model_dir, tmp_path, capsys):
    """--quantize nf4 with LoRA (QLoRA): the base's linear kernels are 4-bit during training and the adapter
    applies to the float base; full fine-tuning of a quantized base is refused naming the option."""
    from jlora.quant import Quant4bit

    c = run.load_config(None, ["run.dir=x", "data.train=y", 'model.quantize="nf4"'])
    _, cfg, params = run.build_model({**c, "model": {**c["model"], "path": str(model_dir)}}, log=lambda *_: None)
    kernel = params["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]
    assert isinstance(kernel.base, Quant4bit)  # LoRA(NF4(W))
    run_dir = tmp_path / "run"
    assert main(["train", "--model", str(model_dir), "--data", str(model_dir / "train.jsonl"), "--run-dir",
                 str(run_dir), "--quantize", "nf4", "--steps", "2", "--no-progress", "--set", "data.seq_len=16",
                 "--set", "data.batch_size=4", "--set", "data.eval_fraction=0.25"]) == 0
    cfg, base = jlora.load_pretrained(model_dir)
    tuned = jlora.load_adapter(cfg, base, run_dir / "adapter")
    assert jlora.methods.methods_in(tuned) == [jlora.methods.get("lora")]
    capsys.readouterr()
    assert main(["train", "--model", str(model_dir), "--data", str(model_dir / "train.jsonl"), "--run-dir",
                 str(tmp_path / "full"), "--quantize", "nf4", "--method", "full", "--steps", "1",
                 "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "model.quantize 'nf4' with method.kind 'full'" in err and "QLoRA" in err
    with pytest.raises(ValueError, match=r"model.quantize: .*"):
        run.load_config(None, ["run.dir=x", "data.train=y", 'model.quantize="nf3"'])


def test_lora_on_the_gguf_blocks_of_the_real_model(smollm2_gguf, tmp_path):
    """model.quantize = "gguf": the base keeps SmolLM2's Q4_1 blocks (about its file size), LoRA trains on it."""
    from jlora.quant_gguf import GGUFQuant

    c = run.load_config(None, ["run.dir=x", "data.train=y", f'model.path="{smollm2_gguf}"', 'model.quantize="gguf"',
                               'method.target_modules=["q_proj"]'])
    _, cfg, params = run.build_model(c, log=lambda *_: None)
    assert isinstance(params["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"].base, GGUFQuant)
    import jax

    nbytes = sum(int(x.nbytes) for x in jax.tree_util.tree_leaves(params))
    assert nbytes < 1.05 * os.path.getsize(smollm2_gguf)  # not the 538 MB of a float32 base
    with pytest.raises(ValueError, match="model.quantize 'gguf' keeps the blocks of a .gguf file"):
        run.build_model(run.load_config(None, ["run.dir=x", "data.train=y", 'model.path="tiny-llama"',
                                               'model.quantize="gguf"']), log=lambda *_: None)
