"""`jlora compare` in its reduced form on a tiny model: every method that exists gets every column, the numbers
agree with independent measurements (parameter report, files on disk, forgetting recomputed from the saved
adapter), the plots are valid PNGs, the sweep is recorded, and bad input is refused naming the known options."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

import jlora
from jlora import compare as C, tasks
from test_doctests import tiny_tokenizer

COLUMNS = ("method", "trainable_params", "trainable_percent", "peak_memory_bytes", "tokens_per_s", "step_time_s",
           "adapter_bytes", "score_before", "score_after", "forgetting", "overfitting_gap", "learning_rate",
           "decode_tokens_per_s_unmerged", "train_loss", "heldout_loss", "general_loss_before",
           "general_loss_after", "loss_curve")
CFG = dataclasses.replace(jlora.preset("tiny-llama"), max_positions=256)
CC = C.CompareConfig(steps=4, batch_size=2, seq_len=160, n_train=12, n_eval=2, general_tokens=300, decode_tokens=2,
                     learning_rates={"lora": (1e-3, 1e-2), **{m: (1e-2,) for m in C.known_methods() if m != "lora"}},
                     lora_variants=("qv",))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("compare"))
    params = jlora.init_params(CFG, jax.random.key(0))
    lines = []
    rep = C.compare(CFG, params, tiny_tokenizer(), "facts", out, CC, log=lines.append, model_name="tiny-llama")
    return out, params, rep, lines


def test_every_method_gets_every_column_and_the_files(report):
    out, _, rep, _ = report
    assert [r["method"] for r in rep["methods"]] == C.known_methods()
    for r in rep["methods"]:
        for col in COLUMNS:
            assert r.get(col) is not None, (r["method"], col)
        assert r["peak_memory_bytes"] > 0 and r["adapter_bytes"] > 0 and r["tokens_per_s"] > 0
        assert 0 <= r["score_after"] <= 1 and len(r["loss_curve"]) >= 2
        # merged decoding exists exactly for the methods that can be merged
        assert (r["decode_tokens_per_s_merged"] is None) == (r["method"] in ("adapter", "prefix", "prompt"))
    assert json.load(open(os.path.join(out, "report.json"))) == json.loads(json.dumps(rep))
    md = open(os.path.join(out, "report.md")).read()
    assert all(f"| {m} |" in md for m in C.known_methods())
    for name in C.PLOTS:
        with open(os.path.join(out, name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", name
        from PIL import Image

        with Image.open(os.path.join(out, name)) as im:
            im.verify()
    # the sweep: two learning rates for LoRA, then its q,v variant at the better one; one point elsewhere
    lora = [s for s in rep["sweep"] if s["method"] == "lora"]
    assert [s["learning_rate"] for s in lora[:2]] == [1e-3, 1e-2] and lora[2]["variant"] == "qv"
    assert lora[2]["options"]["target_modules"] == ["q_proj", "v_proj"]
    best = min(lora, key=lambda s: s["val_loss"])
    chosen = next(r for r in rep["methods"] if r["method"] == "lora")
    assert chosen["learning_rate"] == best["learning_rate"] and chosen["options"] == best["options"]
    assert len(rep["sweep"]) == len(C.known_methods()) + 1 + 3  # + LoRA's second rate and the variants
    assert rep["n_train"] == 12 and rep["epochs"] == pytest.approx(4 * 2 / 12)
    for run in os.listdir(os.path.join(out, "runs")):  # metrics kept, checkpoints not (keep_checkpoints=False)
        files = os.listdir(os.path.join(out, "runs", run))
        assert "metrics.jsonl" in files and not any(f.isdigit() for f in files), (run, files)


def test_numbers_agree_with_independent_measurements(report):
    out, params, rep, _ = report
    from jlora.peft import base as B

    tok = tiny_tokenizer()
    gen = C._general_batches(C.general_text(CC.general_tokens, tok), CC.seq_len, CC.batch_size)
    before = C.mean_loss(CFG, params, gen)
    for r in rep["methods"]:
        kind, quant = C.ROWS.get(r["method"], (r["method"], None))
        base = params if quant is None else jlora.quant.quantize_params(CFG, params, quant)
        if quant is None:
            assert r["general_loss_before"] == pytest.approx(before, rel=1e-6)
        adir = os.path.join(out, r["adapter_dir"])
        assert r["adapter_bytes"] == sum(os.path.getsize(os.path.join(adir, f)) for f in os.listdir(adir))
        if kind == "full":
            _, tuned = jlora.load_pretrained(adir)
            assert r["trainable_params"] == CFG.num_params() and r["trainable_percent"] == pytest.approx(100)
        else:
            tuned = jlora.load_adapter(CFG, base, adir)
            fresh = B.get(kind).init(jax.random.key(0), CFG, base, B.get(kind).make_config(dict(r["options"])))
            assert r["trainable_params"] == jlora.param_report(fresh)["trainable"], r["method"]
            assert r["trainable_percent"] == pytest.approx(100 * r["trainable_params"] / CFG.num_params())
        # forgetting recomputed from the saved files (float32 adapters: the same numbers)
        after = C.mean_loss(CFG, tuned, gen)
        assert r["general_loss_after"] == pytest.approx(after, rel=1e-5, abs=1e-5), r["method"]
        assert r["forgetting"] == pytest.approx(r["general_loss_after"] - r["general_loss_before"], abs=1e-9)
        assert r["overfitting_gap"] == pytest.approx(r["heldout_loss"] - r["train_loss"], abs=1e-9)
    full = next(r for r in rep["methods"] if r["method"] == "full")
    lora = next(r for r in rep["methods"] if r["method"] == "lora")
    assert full["peak_memory_bytes"] > lora["peak_memory_bytes"]  # AdamW state of every weight


def test_tasks_and_bad_input(tmp_path):
    for name in tasks.TASKS:
        tr, va, te = tasks.get(name).splits(36, 6, seed=0)
        assert len(va) == len(te) == 6 and len(tr) == 36
        assert not {ex["prompt"] for ex in te} & {ex["prompt"] for ex in tr}  # held-out questions are new
    with pytest.raises(ValueError, match="unknown task 'poems'; known tasks: dates, facts"):
        tasks.get("poems")
    with pytest.raises(ValueError, match="raise n_train to at least 24"):
        tasks.get("facts").splits(6, 6, seed=0)
    with pytest.raises(ValueError, match=r"unknown method 'lorra'; known methods: adapter, dora, full, ia3, lora"):
        C.CompareConfig(methods=("lorra",)).rows()
    with pytest.raises(ValueError, match="expected METHOD=LR"):
        C.parse_lrs(["lora:1e-3"])


def test_cli_refuses_unknowns_without_a_traceback(capsys):
    from jlora.cli import main

    assert main(["compare", "--model", "tiny-llama", "--task", "dates", "--methods", "lora,foo", "--out", "x"]) == 1
    err = capsys.readouterr().err
    assert "unknown method 'foo'" in err and "Traceback" not in err
    assert main(["compare", "--model", "tiny-llama", "--task", "poems", "--out", "x"]) == 1
    assert "unknown task 'poems'; known tasks: dates, facts" in capsys.readouterr().err
    assert main(["compare", "--model", "tiny-llama", "--task", "dates", "--out", "x"]) == 1  # no tokenizer
    assert "a tokenizer" in capsys.readouterr().err


@pytest.fixture(scope="module")
def isolated(tmp_path_factory):
    """LoRA (two rates and its q,v variant) and IA3, each in a fresh subprocess (``--isolate``)."""
    out = str(tmp_path_factory.mktemp("compare-isolated"))
    params = jlora.init_params(CFG, jax.random.key(0))
    lines = []
    cc = dataclasses.replace(CC, methods=("lora", "ia3"), isolate=True)
    rep = C.compare(CFG, params, tiny_tokenizer(), "facts", out, cc, log=lines.append, model_name="tiny-llama")
    return out, params, rep, lines


def test_isolate_same_numbers_and_per_process_memory(report, isolated):
    _, _, inproc, _ = report
    out, params, rep, lines = isolated
    assert [r["method"] for r in rep["methods"]] == ["lora", "ia3"]
    assert all(r["peak_rss_bytes"] is None and r["device_peak_bytes"] is None for r in inproc["methods"])
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    on_cpu = jax.devices()[0].platform == "cpu"
    for r in rep["methods"]:
        ref = next(x for x in inproc["methods"] if x["method"] == r["method"])
        # same data, same seeds: the same choice and the same numbers as in one process
        for key in ("learning_rate", "options", "score_before", "score_after", "trainable_params",
                    "peak_memory_bytes", "adapter_bytes", "memory"):
            assert r[key] == ref[key], (r["method"], key)
        for key in ("forgetting", "general_loss_after", "train_loss", "heldout_loss", "val_loss"):
            assert r[key] == pytest.approx(ref[key], rel=1e-6, abs=1e-6), (r["method"], key)
        np.testing.assert_allclose(r["loss_curve"], ref["loss_curve"], rtol=1e-6)
        assert isinstance(r["peak_rss_bytes"], int) and r["peak_rss_bytes"] > param_bytes
        assert r["device_peak_bytes"] is None if on_cpu else r["device_peak_bytes"] > param_bytes
    order = {m: i for i, m in enumerate(r["method"] for r in rep["methods"])}
    points = sorted((s for s in inproc["sweep"] if s["method"] in order), key=lambda s: order[s["method"]])
    assert [(s["method"], s["learning_rate"], s["options"]) for s in rep["sweep"]] == \
        [(s["method"], s["learning_rate"], s["options"]) for s in points]
    assert [s["val_loss"] for s in rep["sweep"]] == pytest.approx([s["val_loss"] for s in points], rel=1e-6)
    assert rep["config"]["isolate"] is True and rep["machine"] == inproc["machine"]
    # the children's progress reached the parent's log, as it came; nothing of the hand-off is left behind
    assert "lora: in a fresh subprocess (--isolate)" in lines and any(l.startswith("ia3: lr 0.01") for l in lines)
    assert not [n for n in os.listdir(out) if n.startswith(".isolate")]
    assert json.load(open(os.path.join(out, "report.json"))) == json.loads(json.dumps(rep))
    md = open(os.path.join(out, "report.md")).read()
    md_lines = md.splitlines()
    start = next(i for i, l in enumerate(md_lines) if l.startswith("| method | lr"))
    table = md_lines[start:md_lines.index("", start)]  # header, rule, one row per method
    assert "| step memory | peak RSS | step s |" in table[0] and len(table) == 4
    assert ("device peak" in table[0]) == (not on_cpu) and "peak RSS" not in C.markdown(inproc)
    assert len({l.count("|") for l in table}) == 1
    lora = next(r for r in rep["methods"] if r["method"] == "lora")
    assert f"| {C._fmt_bytes(lora['peak_memory_bytes'])} | {C._fmt_bytes(lora['peak_rss_bytes'])} |" in md
    from PIL import Image

    with Image.open(os.path.join(out, "memory.png")) as im:
        im.verify()


def test_isolate_errors_name_the_method(tmp_path, monkeypatch):
    params = jlora.init_params(CFG, jax.random.key(0))
    cc = dataclasses.replace(CC, methods=("ia3",), isolate=True, method_options={"ia3": {"nonsense": 1}})
    with pytest.raises(ValueError, match=r"method 'ia3' failed in its subprocess: ValueError: .*nonsense") as e:
        C.compare(CFG, params, tiny_tokenizer(), "facts", str(tmp_path / "a"), cc, log=lambda _: None)
    assert isinstance(e.value.__cause__, C.IsolatedRunError) and e.value.__cause__.method == "ia3"
    assert "Traceback" in e.value.__cause__.child_traceback
    # a child that dies without a word (e.g. the OOM killer): an error naming the method, not a hang
    monkeypatch.setattr(C, "_CHILD_BOOT", "import os, signal, sys; sys.stderr.write('dying\\n'); "
                                          "os.kill(os.getpid(), signal.SIGKILL)")
    cc = dataclasses.replace(CC, methods=("lora",), isolate=True)
    with pytest.raises(C.IsolatedRunError, match=r"method 'lora': its subprocess was killed by SIGKILL "
                                                 r"\(out of memory\?\)(.|\n)*dying") as e:
        C.compare(CFG, params, tiny_tokenizer(), "facts", str(tmp_path / "b"), cc, log=lambda _: None)
    assert e.value.method == "lora" and e.value.returncode == -9
    assert not [n for n in os.listdir(tmp_path / "b") if n.startswith(".isolate")]


def test_cli_isolate_flag_reaches_the_config(report, monkeypatch, capsys):
    import jlora.cli as cli

    seen = {}

    def fake_compare(cfg, params, tok, task, out, cc, model_name=""):
        seen["cc"] = cc
        return report[2]

    monkeypatch.setattr(cli, "resolve_model", lambda name: "/models/tiny")
    monkeypatch.setattr(jlora, "load_pretrained", lambda path: (CFG, None))
    monkeypatch.setattr(jlora, "load_tokenizer", lambda path: tiny_tokenizer())
    monkeypatch.setattr(C, "compare", fake_compare)
    for flags, want in (([], False), (["--isolate"], True)):
        assert cli.main(["compare", "--model", "tiny", "--methods", "lora", "--out", "x"] + flags) == 0
        assert seen["cc"].isolate is want
    capsys.readouterr()


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="Linux: ru_maxrss survives fork/exec")
def test_peak_rss_is_the_childs_own():
    """Linux hands a child's ru_maxrss the parent's RSS across fork/exec; `peak_rss_bytes` is the child's own."""
    import subprocess
    import sys

    big = np.ones(512 * 2**20 // 8)  # 512 MiB resident in this (the parent) process
    code = "from jlora.compare import peak_rss_bytes; print(peak_rss_bytes())"
    child = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert big.sum() > 0 and C.peak_rss_bytes() > 512 * 2**20
    assert 0 < child < C.peak_rss_bytes() - 384 * 2**20
