"""PEFT's own target-matching tables, run against jlora's targeting rule (`jlora.peft.base.TargetRules`).

The rows live in ``tests/data/peft_target_cases.json`` (copied from huggingface/peft's
``tests/test_tuners_utils.py``; its "source" field says which commit and which tables). Every row is checked
twice: against the expected value PEFT's table states, and against the installed ``peft`` itself
(``check_target_module_exists`` for single names, ``get_peft_model`` for the small model-level tests). The
"all-linear" tables are checked on tiny random transformers models (nothing is downloaded).

Rows are never dropped silently:

* REGEX_TEST_CASES: 46 rows, all run; none is refused by PEFT's config.
* the 2 rows the table had at the older commit: 1 runs, 1 (``layers_pattern`` without ``layers_to_transform``)
  is refused by PEFT's current ``LoraConfig`` and is checked to raise ValueError in both libraries.
* MAYBE_INCLUDE_ALL_LINEAR_LAYERS_TEST_CASES: 5 rows, all run (tiny models of the same architecture).
* the IA3 rows of the model-level tables run with jlora's LoraConfig (the rule is shared by every method config)
  and with PEFT's IA3Config, as PEFT's test does.
"""

from __future__ import annotations

import json
import os
import re
import warnings

import pytest

import jlora
from jlora.peft import base as B

from conftest import make_hf_model, tiny_hf_config

with open(os.path.join(os.path.dirname(__file__), "data", "peft_target_cases.json")) as f:
    DATA = json.load(f)

TARGET_FIELDS = ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "modules_to_save")


def _peft():
    return pytest.importorskip("peft")


def jcfg(**kw) -> jlora.LoraConfig:
    """jlora's config from the targeting fields of a row (PEFT-only fields such as feedforward_modules dropped)."""
    return jlora.LoraConfig(**{k: v for k, v in kw.items() if k in TARGET_FIELDS})


def pcfg(method: str = "lora", **kw):
    peft = _peft()
    cls = peft.IA3Config if method == "ia3" else peft.LoraConfig
    return cls(**kw)


def peft_selects(config, key: str) -> bool:
    from peft.tuners.tuners_utils import check_target_module_exists

    return bool(check_target_module_exists(config, key))


def _row_id(prefix, i, row):
    return f"{prefix}{i}:" + "|".join(repr(x) for x in row[:4])


def _kw(row):
    _, tm, ltt, lp, _ = row
    return dict(target_modules=tm, layers_to_transform=ltt, layers_pattern=lp)


# ----------------------------------------------------------------------------------------------------------
# 1 + 2. REGEX_TEST_CASES (and the two rows of the older table)

# Two rows of the table expect a layers_pattern at the very start of the name not to count ("only keys that contain
# '.bar' are valid"): PEFT's rule at the table's commit is re.match(rf".*?\.{pattern}\.(\d+)\.", key), which needs
# a "." before the pattern. jlora (like the installed peft 0.21.2 wheel) uses rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.",
# which also accepts the pattern at the start, so both answer True there. Shown as strict xfails.
_LEADING_PATTERN = ("PEFT's table (commit 005fdd53) expects False: its rule .*?\\.{pattern}\\. needs a '.' before "
                    "layers_pattern; jlora and the installed peft 0.21.2 use (?:^|.*?\\.){pattern}\\. and match it "
                    "at the start of the name")
TABLE_MISMATCH = {38: _LEADING_PATTERN, 42: _LEADING_PATTERN}  # bar.1.baz / blocks.1.weight


def _regex_param(i, r, xfail=True):
    marks = [pytest.mark.xfail(strict=True, reason=TABLE_MISMATCH[i])] if xfail and i in TABLE_MISMATCH else []
    return pytest.param(r, id=_row_id("r", i, r), marks=marks)


REGEX_ROWS = [_regex_param(i, r) for i, r in enumerate(DATA["regex_cases"]["rows"])]
REGEX_ROWS_NO_XFAIL = [_regex_param(i, r, xfail=False) for i, r in enumerate(DATA["regex_cases"]["rows"])]

# Of the older table's two "empty layers_to_transform" rows, the second one (layers_pattern=["bar"],
# layers_to_transform=None) is refused by PEFT's LoraConfig today ("When `layers_pattern` is specified,
# `layers_to_transform` must also be specified"); the table's expected value (True) can no longer be reached
# through a config, so that row checks the refusal instead: 1 row refused, 1 row run.
_REMOVED = DATA["regex_cases_removed"]["rows"]
REFUSED_ROWS = [pytest.param(_REMOVED[1], id=_row_id("old", 1, _REMOVED[1]))]
REMOVED_ROWS = [pytest.param(_REMOVED[0], id=_row_id("old", 0, _REMOVED[0]))]
assert len(REGEX_ROWS) == 46 and len(REFUSED_ROWS) + len(REMOVED_ROWS) == len(_REMOVED) == 2


@pytest.mark.parametrize("row", REGEX_ROWS + REMOVED_ROWS)
def test_regex_row(row):
    key, expected = row[0], row[4]
    assert jcfg(**_kw(row)).selects(key) is expected


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("row", REGEX_ROWS_NO_XFAIL + REMOVED_ROWS)
def test_regex_row_matches_installed_peft(row):
    key = row[0]
    assert peft_selects(pcfg(**_kw(row)), key) is jcfg(**_kw(row)).selects(key)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("row", REGEX_ROWS + REMOVED_ROWS)
def test_installed_peft_agrees_with_table(row):
    """Not jlora: whether the installed peft wheel still gives its table's answers (it does not on 2 rows)."""
    assert peft_selects(pcfg(**_kw(row)), row[0]) is row[4]


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("row", REFUSED_ROWS)
def test_row_refused_by_peft_is_refused_by_jlora(row):
    with pytest.raises(ValueError):
        pcfg(**_kw(row))
    with pytest.raises(ValueError):
        jcfg(**_kw(row))


# Config combinations PEFT's LoraConfig.__post_init__ refuses or accepts (not from the test tables: derived from
# its checks "layers_to_transform / layers_pattern cannot be used when target_modules is a str" and "when
# layers_pattern is specified, layers_to_transform must also be specified"), each cross-checked with the
# installed peft (PEFT refuses any layers_pattern that is not None with a str target, even []; it requires
# layers_to_transform only for a truthy layers_pattern, so '' alone is accepted).
CONFIG_VALIDITY = [
    # (kwargs, PEFT accepts it)
    (dict(target_modules="foo", layers_to_transform=[1]), False),
    (dict(target_modules="foo", layers_to_transform=[]), False),
    (dict(target_modules="foo", layers_to_transform=[1], layers_pattern="h"), False),
    (dict(target_modules="foo", layers_pattern="h"), False),
    (dict(target_modules="foo", layers_pattern=""), False),
    (dict(target_modules="foo", layers_pattern=[]), False),
    (dict(target_modules=["baz"], layers_pattern=["bar"]), False),
    (dict(target_modules=["baz"], layers_pattern="bar"), False),
    (dict(target_modules=["baz"], layers_pattern=[]), True),
    (dict(target_modules=["baz"], layers_pattern=""), True),
    (dict(target_modules=["baz"], layers_to_transform=[], layers_pattern=["bar"]), True),
    (dict(target_modules=["baz"], layers_to_transform=1, layers_pattern="bar"), True),
    (dict(target_modules="foo"), True),
]


def _accepts(make, kw) -> bool:
    try:
        make(**kw)
    except ValueError:
        return False
    return True


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("kw, peft_accepts", CONFIG_VALIDITY)
def test_config_validity_matches_peft(kw, peft_accepts):
    assert _accepts(pcfg, kw) is peft_accepts  # the stated PEFT behaviour is the installed one
    assert _accepts(jcfg, kw) is peft_accepts


# ----------------------------------------------------------------------------------------------------------
# 1-3. The model-level tables: targeted_module_names, exclude_modules, modules_to_save, the MoE layer index


def _mlp():
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class MLP(nn.Module):  # the module tree of PEFT's test MLP
        def __init__(self):
            super().__init__()
            self.lin0 = nn.Linear(10, 20)
            self.relu = nn.ReLU()
            self.drop = nn.Dropout(0.5)
            self.lin1 = nn.Linear(20, 2)
            self.sm = nn.LogSoftmax(dim=-1)

    return MLP()


def _bloom():
    transformers = pytest.importorskip("transformers")
    return transformers.BloomForCausalLM(transformers.BloomConfig(vocab_size=64, hidden_size=16, n_layer=5, n_head=2))


def _toy_moe():
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attn = nn.Module()
            self.self_attn.q_proj = nn.Linear(4, 4, bias=False)
            self.mlp = nn.Module()
            self.mlp.experts = nn.ModuleList([nn.Module() for _ in range(2)])
            for e in self.mlp.experts:
                e.up_proj = nn.Linear(4, 4, bias=False)

    class ToyMoE(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = nn.Module()
            self.model.layers = nn.ModuleList([Block() for _ in range(4)])

    return ToyMoE()


MODEL_BUILDERS = {"MLP": _mlp, "Bloom": _bloom}
MODEL_MODULES = DATA["targeted_module_names"]["models"]


def _model_rows(table):
    return [pytest.param(r, id=f"{r['test']}[{r.get('method', 'lora')}]") for r in DATA[table]["rows"]
            if "model" in r and r["model"] in MODEL_MODULES]


TARGETED = _model_rows("targeted_module_names")
EXCLUDED = _model_rows("excluded_module_names")
SAVED = _model_rows("modules_to_save")
assert (len(TARGETED), len(EXCLUDED), len(SAVED)) == (7, 10, 1)  # + the SEQ_CLS row, tested on its own below


def _jlora_kw(row):
    kw = dict(row["config"])
    if kw.get("target_modules", "") is None:  # PEFT's per-architecture default, stated in the row
        kw["target_modules"] = row["target_modules_default"]
    return kw


@pytest.mark.parametrize("row", TARGETED + EXCLUDED + SAVED)
def test_model_row(row):
    cfg = jcfg(**_jlora_kw(row))
    assert [n for n in MODEL_MODULES[row["model"]] if cfg.selects(n)] == row["expected"]


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("row", TARGETED + EXCLUDED + SAVED)
def test_model_row_matches_installed_peft(row):
    peft = _peft()
    method = row.get("method", "lora")
    model = MODEL_BUILDERS[row["model"]]()
    # the module list in the data is the model's linear layers
    torch = pytest.importorskip("torch")
    assert [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)] == MODEL_MODULES[row["model"]]
    # per name: PEFT's rule with the explicit targets equals jlora's
    kw = _jlora_kw(row)
    cfg = jcfg(**kw)
    pc = pcfg(method, **kw)
    assert [peft_selects(pc, n) for n in MODEL_MODULES[row["model"]]] == \
        [cfg.selects(n) for n in MODEL_MODULES[row["model"]]]
    # whole model, with the row's own config (defaults resolved by PEFT): what PEFT's test asserts
    pc = pcfg(method, **row["config"])
    if row.get("peft_error"):
        with pytest.raises(ValueError, match=row["peft_error"]):
            peft.get_peft_model(model, pc)
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        targeted = peft.get_peft_model(model, pc).targeted_module_names
    assert targeted == row["expected"]
    if row.get("peft_warning"):
        assert any(re.search(row["peft_warning"], str(w.message)) for w in caught)
    if row["config"].get("modules_to_save"):
        for name in row["config"]["modules_to_save"]:
            assert type(dict(model.named_modules())[name]).__name__ == "ModulesToSaveWrapper"


MOE = DATA["moe_layers_to_transform"]
MOE_PATTERNS = [pytest.param(p, id=repr(p)) for p in MOE["layers_pattern"]]


@pytest.mark.parametrize("layers_pattern", MOE_PATTERNS)
def test_moe_layer_index_not_expert_index(layers_pattern):
    cfg = jcfg(layers_pattern=layers_pattern, **MOE["config"])
    assert {n for n in MOE["modules"] if cfg.selects(n)} == set(MOE["expected"])


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("layers_pattern", MOE_PATTERNS)
def test_moe_layer_index_matches_installed_peft(layers_pattern):
    peft = _peft()
    model = _toy_moe()
    torch = pytest.importorskip("torch")
    assert sorted(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)) == sorted(MOE["modules"])
    pc = pcfg(layers_pattern=layers_pattern, r=2, lora_alpha=4, **MOE["config"])
    cfg = jcfg(layers_pattern=layers_pattern, **MOE["config"])
    assert [peft_selects(pc, n) for n in MOE["modules"]] == [cfg.selects(n) for n in MOE["modules"]]
    assert set(peft.get_peft_model(model, pc).targeted_module_names) == set(MOE["expected"])


# ----------------------------------------------------------------------------------------------------------
# 4. "all-linear" (MAYBE_INCLUDE_ALL_LINEAR_LAYERS_TEST_CASES and _INTERNALS)


def _linear_names(model):
    import torch
    from transformers.pytorch_utils import Conv1D

    return [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))]


def _peft_targets(model, **kw):
    """The module names PEFT puts LoRA on (modules with lora_A), relative to the base model."""
    peft = _peft()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(model, peft.LoraConfig(**kw))
    return {n.removeprefix("base_model.model.") for n, m in pm.named_modules() if hasattr(m, "lora_A")}


def _tiny(model_id, model_type):
    """A tiny random model of the row's architecture and head (the hub ids are not downloaded)."""
    transformers = pytest.importorskip("transformers")
    if "Llama" in model_id:
        cls = transformers.LlamaForCausalLM if model_type == "causal" else transformers.LlamaModel
        return cls(tiny_hf_config("llama"))
    if "gpt2" in model_id:
        return make_hf_model("gpt2")
    if "t5" in model_id:
        return transformers.T5ForConditionalGeneration(transformers.T5Config(
            vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, decoder_start_token_id=0))
    if "GPTNeoX" in model_id:
        return transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
            vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32))
    raise AssertionError(model_id)


ALL_LINEAR = [pytest.param(r, id=f"{r[0].split('/')[-1]}-{r[1]}") for r in DATA["all_linear"]["rows"]]
assert len(ALL_LINEAR) == 5


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("row", ALL_LINEAR)
def test_all_linear_names_match_peft_table(row):
    """On every architecture of PEFT's table: jlora's rule on the model's linear layer names targets what PEFT
    targets, and the targets' last name parts are the table's expected target_modules."""
    model_id, model_type, target, expected = row
    model = _tiny(model_id, model_type)
    names = _linear_names(model)
    cfg = jcfg(target_modules=target)
    ours = {n for n in names if cfg.selects(n)}
    assert ours == _peft_targets(model, target_modules=target)
    assert {n.split(".")[-1] for n in ours} == set(expected)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_all_linear_on_loaded_model_matches_peft(kind, tmp_path):
    """jlora's select on the tree `load_pretrained` builds equals what PEFT targets on the same HF model."""
    hf = make_hf_model(kind)
    hf.save_pretrained(tmp_path)
    cfg, params = jlora.load_pretrained(str(tmp_path))
    ours = jlora.LoraConfig(target_modules="all-linear").select(params, cfg.arch)
    assert len(ours) == len(set(ours)) > 0
    assert set(ours) == _peft_targets(make_hf_model(kind), target_modules="all-linear")
    row = next(r for r in DATA["all_linear"]["rows"] if r[1] == "causal" and kind in r[0].lower())
    assert {n.split(".")[-1] for n in ours} == set(row[3])


INTERNALS = [pytest.param(r, id=repr(r[0])) for r in DATA["all_linear_internals"]["rows"]]


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("row", INTERNALS)
def test_all_linear_internals(row):
    """Targets other than "all-linear" are left as they are, and select what PEFT selects (None: the defaults)."""
    initial, expected = row
    cfg = jcfg(target_modules=initial)
    peft = _peft()
    if expected is None:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

        assert cfg.target_modules is None
        assert cfg.targets_for_arch("llama") == tuple(DEFAULTS["llama"])
    else:
        assert cfg.target_modules == (tuple(expected) if isinstance(expected, list) else expected)
    model = make_hf_model("llama")
    names = _linear_names(model)
    ours = {n for n in names if cfg.selects(n, "llama")}
    assert ours == _peft_targets(model, target_modules=initial)
    assert peft.LoraConfig(target_modules=initial).target_modules == (
        set(expected) if isinstance(expected, list) else expected)


# ----------------------------------------------------------------------------------------------------------
# 5. modules_to_save: never targeted (PEFT: re.match(rf"(^|.*\.){m}($|\..*)", key))


def _peft_saved(name, modules_to_save):
    return any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in modules_to_save)


@pytest.mark.filterwarnings("ignore")
def test_seq_cls_head_is_saved_not_targeted():
    """PEFT's test_maybe_include_all_linear_does_not_target_classifier_head: with SEQ_CLS PEFT adds
    classifier/score to modules_to_save, and "all-linear" then adapts every linear layer but the head."""
    peft = _peft()
    transformers = pytest.importorskip("transformers")
    row = next(r for r in DATA["modules_to_save"]["rows"] if r["model"] == "LlamaForSequenceClassification")
    model = transformers.LlamaForSequenceClassification(tiny_hf_config("llama", num_labels=10))
    names = _linear_names(model)
    cfg = jcfg(target_modules=row["config"]["target_modules"], modules_to_save=row["modules_to_save_from_task"])
    ours = {n for n in names if cfg.selects(n)}
    assert not ours & set(row["expected_not_targeted"])
    assert len(ours) == len(names) - 1  # PEFT's num_lora == num_linear - 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(model, peft.LoraConfig(**row["config"]))
    assert set(pm.peft_config["default"].modules_to_save) >= set(row["modules_to_save_from_task"])
    assert type(pm.base_model.model.score).__name__ == "ModulesToSaveWrapper"
    assert ours == {n.removeprefix("base_model.model.") for n, m in pm.named_modules() if hasattr(m, "lora_A")}


# Module names of the tiny GPT-2 and Llama (plus names with the saved module in the middle) against entries that
# match a whole name, a last part, a middle part, a dotted path, a regex, or nothing (a bare suffix such as "proj"
# is not a whole segment of "q_proj").
_SAVED_KEYS = [
    "lm_head", "model.embed_tokens", "transformer.wte",
    "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "model.layers.0.self_attn.o_proj",
    "model.layers.1.mlp.down_proj", "transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_proj",
    "model.score", "score", "classifier.dense",
]
_SAVED_ENTRIES = [
    ["lm_head"], ["q_proj"], ["self_attn"], ["layers.0.self_attn.q_proj"], ["proj"], ["0"], ["model.layers.1"],
    ["embed_tokens", "lm_head"], ["score"], ["classifier", "score"], ["c_.*"], ["mlp"], ["wte"],
]
_TARGET_FORMS = [
    pytest.param("all-linear", id="all-linear"),
    pytest.param(".*", id="regex"),
    pytest.param(sorted({k.split(".")[-1] for k in _SAVED_KEYS}), id="list"),
]


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("target", _TARGET_FORMS)
@pytest.mark.parametrize("saved", [pytest.param(s, id="+".join(s)) for s in _SAVED_ENTRIES])
def test_modules_to_save_never_targeted(target, saved):
    plain = jcfg(target_modules=target)
    cfg = jcfg(target_modules=target, modules_to_save=saved)
    for key in _SAVED_KEYS:
        want = plain.selects(key) and not _peft_saved(key, saved)
        assert cfg.selects(key) is want, key
        assert B.in_modules_to_save(key, saved) is _peft_saved(key, saved), key
    if target != "all-linear":  # PEFT resolves "all-linear" on a model, not in check_target_module_exists
        pc = pcfg(target_modules=target, modules_to_save=saved)
        assert [peft_selects(pc, k) for k in _SAVED_KEYS] == [cfg.selects(k) for k in _SAVED_KEYS]


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("saved", [["lm_head"], ["q_proj"], ["layers.0.self_attn.q_proj"],
                                   ["model.layers.1.mlp.down_proj"], ["gate_proj", "up_proj"]])
def test_modules_to_save_with_all_linear_matches_peft_model(saved):
    """"all-linear" with leaf modules_to_save on the tiny Llama: the same targets as PEFT's get_peft_model."""
    model = make_hf_model("llama")
    names = _linear_names(model)
    cfg = jcfg(target_modules="all-linear", modules_to_save=saved)
    ours = {n for n in names if cfg.selects(n)}
    assert not any(_peft_saved(n, saved) for n in ours)
    assert ours == _peft_targets(model, target_modules="all-linear", modules_to_save=saved)


@pytest.mark.filterwarnings("ignore")
def test_modules_to_save_bare_suffix_peft_model_refuses():
    """PEFT wraps modules_to_save by plain key.endswith(entry) (peft.utils.other._set_trainable) but keeps them out
    of the targets by whole segments: with ["proj"] every *_proj layer gets LoRA and is then wrapped, and
    get_peft_model fails. jlora's selects follows the targeting rule (a bare "proj" excludes nothing)."""
    model = make_hf_model("llama")
    cfg = jcfg(target_modules="all-linear", modules_to_save=["proj"])
    assert {n for n in _linear_names(model) if cfg.selects(n)} == {
        n for n in _linear_names(model) if n != "lm_head"}
    with pytest.raises(TypeError, match="modules_to_save cannot be applied"):
        _peft_targets(model, target_modules="all-linear", modules_to_save=["proj"])
