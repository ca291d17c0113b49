"""experiments/e2e_nlg.py: the E2E file format (parsing, grouping, errors naming file:line, prompt/target
tokenization) and a tiny end-to-end run on CPU (tiny-gpt2 preset, a word-level tokenizer over the made-up
data set) that writes predictions/references in the layout e2e-metrics' measure_scores.py reads."""

import importlib.util
import json
import os

import numpy as np
import pytest
import tokenizers
from tokenizers import models, pre_tokenizers

from jlora.tokenizer import Tokenizer, load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "experiments", "data", "e2e_tiny")
EOT = "<|endoftext|>"

_spec = importlib.util.spec_from_file_location("e2e_nlg", os.path.join(ROOT, "experiments", "e2e_nlg.py"))
e2e = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(e2e)


def read_lines(path, multi_ref=False):
    """measure_scores.py's reader (tuetschek/e2e-metrics): one instance per line, or in multi-ref mode groups
    of lines separated by empty lines."""
    buf = [[]] if multi_ref else []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if multi_ref:
                if not line:
                    buf.append([])
                else:
                    buf[-1].append(line)
            else:
                buf.append(line)
    if multi_ref and not buf[-1]:
        del buf[-1]
    return buf


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    """A word-level tokenizer over the tiny data's words; <|endoftext|> is id 0 (tiny-gpt2's EOS), BOS and EOS,
    like GPT-2's."""
    words = set()
    for split in e2e.SPLITS:
        for ln in e2e.read_e2e(os.path.join(DATA, f"{split}.txt")):
            words.update(ln.mr.split() + ln.ref.split())
    vocab = [EOT, "<unk>"] + sorted(words)
    assert len(vocab) <= 128  # tiny-gpt2's vocabulary
    backend = tokenizers.Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens([EOT, "<unk>"])
    d = tmp_path_factory.mktemp("e2e_tok")
    Tokenizer(backend, bos_token=EOT, eos_token=EOT, unk_token="<unk>").save(d)
    return str(d)


# ---------------------------------------------------------------------------------------------------------------
# Format
# ---------------------------------------------------------------------------------------------------------------


def test_tiny_data_parses_and_groups():
    for split, n in (("train", 36), ("valid", 8), ("test", 12)):
        assert len(e2e.read_e2e(os.path.join(DATA, f"{split}.txt"))) == n
    test = e2e.read_e2e(os.path.join(DATA, "test.txt"))
    assert test[0].mr == "name : The Copper Kettle | Type : coffee shop | food : English | customer rating : high"
    assert test[0].ref == "The Copper Kettle is an English coffee shop with a high customer rating ."
    assert test[0].source.endswith("test.txt:1")
    groups = e2e.group_by_mr(test)
    assert [len(refs) for _, refs in groups] == [3, 2, 1, 4, 2]
    assert groups[2] == ("name : Saffron Garden | Type : restaurant | price : more than £ 30 | family friendly : no",
                         ["Saffron Garden is an expensive restaurant . It is not family friendly ."])


def test_parser_errors_name_file_and_line(tmp_path):
    ok = "name : A | Type : pub||A is a pub ."
    for bad, what in (("name : A | Type : pub A is a pub .", "exactly one '\\|\\|', found 0"),
                      ("name : A||A is||a pub .", "found 2"),
                      ("name : A||   ", "empty reference"),
                      ("||A is a pub .", "empty meaning representation")):
        p = tmp_path / "bad.txt"
        p.write_text(f"{ok}\n\n{bad}\n", encoding="utf-8")
        with pytest.raises(ValueError, match=rf"bad.txt:3: .*{what}"):
            e2e.read_e2e(str(p))
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        e2e.read_e2e(str(tmp_path / "nope.txt"))
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="no examples"):
        e2e.read_e2e(str(tmp_path / "empty.txt"))


def test_tokenize_prompt_separator_and_targets(tok_dir):
    import jlora

    tok = load_tokenizer(tok_dir)
    cfg = jlora.preset("tiny-gpt2")
    eot = tok.token_to_id(EOT)
    assert e2e.special_ids(tok, cfg) == (eot, eot)
    ln = e2e.E2ELine("name : Blue Heron | Type : pub", "Blue Heron is a pub .", "x:1")
    mr, ref = tok.encode(ln.mr, add_special_tokens=False), tok.encode(ln.ref, add_special_tokens=False)
    assert tok.token_to_id("<unk>") not in mr + ref
    ids, mask = e2e.tokenize([ln], tok, eot, eot, cfg.vocab_size)[0]
    # context = MR + separator (no target); completion = reference + EOS (the targets), as the LoRA repo.
    assert ids.tolist() == mr + [eot] + ref + [eot]
    assert mask.tolist() == [0] * (len(mr) + 1) + [1] * (len(ref) + 1)
    assert e2e.prompt_ids((ids, mask)) == mr + [eot]
    with pytest.raises(ValueError, match="x:1: token id .* outside the model's vocabulary of 10"):
        e2e.tokenize([ln], tok, eot, eot, 10)
    assert e2e.clean_prediction("  Blue Heron is\na pub .\n\nname : B") == "Blue Heron is a pub ."


def test_special_ids_fall_back_to_the_model_config(tok_dir):
    """A tokenizer whose files name no BOS/EOS (the hub's gpt2-medium): the ids come from the model config."""
    import jlora

    bare = Tokenizer(load_tokenizer(tok_dir).backend)
    assert e2e.special_ids(bare, jlora.preset("gpt2-medium")) == (50256, 50256)
    assert e2e.special_ids(bare, jlora.preset("tiny-gpt2").replace(bos_token_id=5)) == (5, 0)
    with pytest.raises(ValueError, match="EOS"):
        e2e.special_ids(bare, jlora.preset("tiny-gpt2").replace(eos_token_id=None))


# ---------------------------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------------------------


def _argv(tok_dir, out, *extra):
    return ["--model", "tiny-gpt2", "--tokenizer", tok_dir, "--data", DATA, "--out", str(out), "--steps", "6",
            "--batch-size", "4", "--warmup-steps", "2", "--log-every", "3", "--beam", "3",
            "--max-new-tokens", "12", "--decode-batch", "4", "--no-progress", *extra]


def _check_outputs(out):
    groups = e2e.group_by_mr(e2e.read_e2e(os.path.join(DATA, "test.txt")))
    refs = read_lines(out / "references.txt", multi_ref=True)
    preds = read_lines(out / "predictions.txt")
    assert refs == [r for _, r in groups]
    assert len(preds) == len(groups) == 5
    assert (out / "references.txt").read_text(encoding="utf-8").endswith(".\n\n")
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["mr"] for r in rows] == [mr for mr, _ in groups] and [r["prediction"] for r in rows] == preds
    return preds


def test_lora_end_to_end_writes_scorer_files_and_resumes(tok_dir, tmp_path, capsys):
    out = tmp_path / "lora"
    res = e2e.main(_argv(tok_dir, out, "--lr", "1e-2"))
    assert res["finished"] and res["steps"] == 6 and np.isfinite(res["eval_loss"])
    preds = _check_outputs(out)
    printed = capsys.readouterr().out
    assert f"measure_scores.py {out / 'references.txt'} {out / 'predictions.txt'} -p" in printed
    assert "trainable params" in printed
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 32 and cfg["target_modules"] == ["c_attn"]
    assert json.loads((out / "results.json").read_text())["unique_mrs"] == 5
    losses = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in losses if "loss" in m] == [3, 6]

    # Again on the same directory: nothing is retrained, the same predictions are written.
    res2 = e2e.main(_argv(tok_dir, out, "--lr", "1e-2"))
    assert "run already complete" in capsys.readouterr().out
    assert res2["steps"] == 6 and _check_outputs(out) == preds
    # Other training settings on the same run directory are refused.
    with pytest.raises(ValueError, match="different config"):
        e2e.main(_argv(tok_dir, out, "--lr", "1e-2", "--lora-r", "2"))


def test_full_finetuning_on_a_mesh(tok_dir, tmp_path):
    import jax

    out = tmp_path / "full"
    mesh = f"data={min(2, jax.device_count())},fsdp=-1"  # conftest simulates 8 CPU devices: data=2,fsdp=4
    res = e2e.main(_argv(tok_dir, out, "--method", "full", "--mesh", mesh, "--batch-size", "8", "--no-decode"))
    assert res["finished"] and res["method"] == "full"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(out / "model"))
    assert not (out / "predictions.txt").exists()
    run_config = json.loads((out / "run" / "run_config.json").read_text())
    assert run_config["lr"] == e2e.FULL_FT_LR and run_config["method"] == "full"
