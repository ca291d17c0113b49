"""Typed run config: every wrong-typed or out-of-range key is an error naming ``section.key``, the expected type
or range and the value; --print-config round-trips; UTF-8 byte-order marks are accepted."""

import json
import subprocess
import sys
import tomllib

import pytest

from jlora import data, loop, run
from jlora.cli import main

BASE = ["run.dir='r'", "data.train='t.jsonl'"]

BAD = [  # (override, message)
    ("model.path=3", "model.path: expected a non-empty string, got 3"),
    ("model.dtype='f16'", "model.dtype: expected one of 'float32' | 'bfloat16', got 'f16'"),
    ("model.base_dtype=1", "model.base_dtype: expected one of 'float32' | 'bfloat16', got 1"),
    ("model.remat='yes'", "model.remat: expected true or false, got 'yes'"),
    ("model.quantize=4", "model.quantize: expected a string"),
    ("method.alpha='x'", "method.alpha: expected a number, got 'x'"),
    ("method.r=2.5", "method.r: expected an integer, got 2.5"),
    ("method.use_rslora=1", "method.use_rslora: expected true or false, got 1"),
    ("method.target_modules=3", "method.target_modules: expected a string or a list of strings or none, got 3"),
    ("data.train=5", "data.train: expected a string (or none), got 5"),
    ("data.eval_fraction=1.5", "data.eval_fraction: expected a number >= 0 and < 1, got 1.5"),
    ("data.seq_len=0", "data.seq_len: expected an integer >= 1, got 0"),
    ("data.batch_size=2.5", "data.batch_size: expected an integer >= 1, got 2.5"),
    ("data.accum_steps=0", "data.accum_steps: expected an integer >= 1, got 0"),
    ("data.pack='no'", "data.pack: expected true or false, got 'no'"),
    ("data.overflow='drop'", "data.overflow: expected one of 'truncate' | 'error' | 'split', got 'drop'"),
    ("optim.learning_rate=-1", "optim.learning_rate: expected a number > 0, got -1"),
    ("optim.learning_rate='big'", "optim.learning_rate: expected a number > 0, got 'big'"),
    ("optim.schedule='step'", "optim.schedule: expected one of 'constant' | 'linear' | 'cosine', got 'step'"),
    ("optim.warmup_steps=-1", "optim.warmup_steps: expected an integer >= 0, got -1"),
    ("optim.weight_decay=-0.1", "optim.weight_decay: expected a number >= 0, got -0.1"),
    ("optim.label_smoothing=1", "optim.label_smoothing: expected a number >= 0 and < 1, got 1"),
    ("optim.lr_ratios={lora_b=-1}", "optim.lr_ratios: expected a table of role = number > 0"),
    ("run.steps=0", "run.steps: expected an integer >= 1, got 0"),
    ("run.steps=1.5", "run.steps: expected an integer >= 1, got 1.5"),
    ("run.eval_every=-1", "run.eval_every: expected an integer >= 0, got -1"),
    ("run.log_every=0", "run.log_every: expected an integer >= 1, got 0"),
    ("run.mesh=4", "run.mesh: expected a string, got 4"),
    ("run.distributed='x'", "run.distributed: expected true or false, got 'x'"),
]


@pytest.mark.parametrize("override,message", BAD, ids=[b[0].split("=")[0] for b in BAD])
def test_each_bad_key_is_named(override, message):
    with pytest.raises(ValueError) as e:
        run.load_config(None, BASE + [override])
    assert message in str(e.value)


def test_unknown_keys_list_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown key optim.lr \(known: learning_rate, schedule, "):
        run.load_config(None, BASE + ["optim.lr=1"])


def test_schedules_match_the_loop():
    assert set(run.SCHEDULES) == set(loop.SCHEDULES)


def test_cli_bad_config_is_one_error_line(tmp_path, capsys):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[optim]\nlearning_rate = -1\n')
    assert main(["train", "--config", str(cfg), "--set", "run.dir='r'", "--set", "data.train='t'"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"jlora train: error: {cfg}: optim.learning_rate: expected a number > 0, got -1"]


def test_cli_subprocess_no_traceback(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[method]\nalpha = "x"\n[run]\ndir = "r"\n[data]\ntrain = "t"\n')
    p = subprocess.run([sys.executable, "-m", "jlora.cli", "train", "--config", str(cfg)], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert p.stderr.strip() == f"jlora train: error: {cfg}: method.alpha: expected a number, got 'x'"


def test_print_config_round_trips_with_a_bom(tmp_path, capsys):
    cfg = tmp_path / "run.toml"
    cfg.write_bytes(b"\xef\xbb\xbf" + b'[optim]\nlearning_rate = 1e-3\n[method]\nr = 4\n'
                    b'target_modules = ["q_proj"]\n[run]\ndir = "r"\n[data]\ntrain = "t.jsonl"\n')
    assert main(["train", "--config", str(cfg), "--print-config", "--set", "run.steps=7"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# jlora run config, resolved") and "TOML" in out.splitlines()[0]
    printed = tomllib.loads(out)
    expected = run.load_config(str(cfg), ["run.steps=7"])
    for section, values in expected.items():
        assert printed[section] == {k: v for k, v in values.items() if v is not None}
    assert printed["optim"]["learning_rate"] == 1e-3 and printed["run"]["steps"] == 7
    assert printed["data"]["seq_len"] == run.DEFAULTS["data"]["seq_len"]
    again = tmp_path / "again.toml"
    again.write_text(out)
    assert run.load_config(str(again)) == expected
    assert not (tmp_path / "r").exists()  # nothing trained


def test_bom_yaml_config(tmp_path):
    pytest.importorskip("yaml")
    cfg = tmp_path / "run.yaml"
    cfg.write_bytes(b"\xef\xbb\xbfrun:\n  dir: r\ndata:\n  train: t.jsonl\n")
    assert run.load_config(str(cfg))["run"]["dir"] == "r"


def test_bom_jsonl_data(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + (json.dumps({"text": "hello"}) + "\n" + json.dumps({"text": "x"}) + "\n").encode())
    ex = data.load_examples(str(f))
    assert len(ex) == 2
    t = tmp_path / "d.txt"
    t.write_bytes(b"\xef\xbb\xbfhello world\n")
    assert len(data.load_examples(str(t))) == 1
