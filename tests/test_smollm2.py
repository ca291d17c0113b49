"""The real pretrained model end to end: chat generation equals transformers', the demo and conversion work."""

import os

import numpy as np
import pytest

import jlora
from jlora.cli import main

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tok(smollm2_gguf):
    return jlora.load_tokenizer(smollm2_gguf)


@pytest.mark.parametrize("question", ["What is the capital of France?", "List three fruits."])
def test_greedy_chat_equals_transformers(smollm2, tok, question):
    cfg, params, hf = smollm2
    ids = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=True)
    ours = jlora.generate(cfg, params, ids, max_new_tokens=20)
    with torch.no_grad():
        x = torch.tensor([ids])
        ref = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=20, do_sample=False,
                          eos_token_id=tok.eos_token_ids[0], pad_token_id=tok.eos_token_ids[0])
    assert ours == ref[0, len(ids):].tolist()
    if "France" in question:
        assert "Paris" in tok.decode(ours, skip_special_tokens=True)


def test_batched_prompts_of_different_lengths(smollm2, tok):
    cfg, params, _ = smollm2
    qs = ["What is the capital of France?", "Hi"]
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=True) for q in qs]
    batch = jlora.generate(cfg, params, prompts, max_new_tokens=8)
    for p, out in zip(prompts, batch):
        assert out == jlora.generate(cfg, params, p, max_new_tokens=8)


def test_convert_and_generate_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "smollm2"
    assert main(["convert", "smollm2", str(out)]) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(out))
    assert main(["generate", "--model", str(out), "--prompt", "What is the capital of France?",
                 "--max-new-tokens", "12"]) == 0
    assert "Paris" in capsys.readouterr().out
    # The converted directory is a complete HF model dir: transformers' tokenizer agrees with jlora's.
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    ours = jlora.load_tokenizer(out)
    for s in ["Hello world", "  spaces\tand\nnewlines", "def f(x):\n    return x ** 2", "héllo wörld 你好 🙂"]:
        assert hf_tok.encode(s) == ours.encode(s)
    msgs = [{"role": "user", "content": "Hi"}]
    assert hf_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) == \
        ours.apply_chat_template(msgs, add_generation_prompt=True)
