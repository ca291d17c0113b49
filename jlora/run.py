"""A training run described by a config file (TOML or YAML): what `jlora train` and `jlora eval` execute.

    [model]
    path = "smollm2"            # HF dir, .gguf file, "smollm2" (the built-in default) or a preset name (random init)
    dtype = "float32"           # compute dtype: float32 | bfloat16
    base_dtype = "float32"      # storage of the frozen base in a LoRA run: float32 | bfloat16
    remat = false
    quantize = ""               # "" | "nf4" | "fp4" | "int8" | "gguf" (keep a GGUF file's Q4_0/Q4_1/Q8_0 blocks):
                                #   a quantized frozen base (QLoRA with LoRA), or a table
                                #   of jlora.quant.QuantConfig fields; full fine-tuning of it is refused

    [method]
    kind = "lora"               # adapter | dora | ia3 | lora | prefix | prompt | full (jlora.peft.base.kinds())
    r = 8                       # the rest of [method] are the fields of the method's config dataclass
    alpha = 16                  #   (LoraConfig, DoraConfig, IA3Config, PrefixConfig, ...); unknown keys are errors
    target_modules = ["q_proj", "v_proj"]

    [data]
    train = "train.jsonl"       # .jsonl (text / prompt+completion / chat) or .txt
    eval = ""                   # a separate eval file, or use eval_fraction of train
    eval_fraction = 0.05
    seq_len = 256
    batch_size = 8

    [optim]
    learning_rate = 2e-4
    schedule = "cosine"
    warmup_steps = 20

    [run]
    dir = "runs/my-run"
    steps = 500
    eval_every = 100
    save_every = 100
    mesh = ""                   # "" = one device; e.g. "data=4,fsdp=2" (see jlora.parallel); may change on resume
    distributed = false         # multi-host: call jax.distributed.initialize() first (TPU pods, multi-node GPU)

Every key is checked: an unknown section or key is an error naming it; [method] keys are checked against the
chosen method's config (its defaults fill the rest: PEFT's, e.g. LoRA ``alpha = 8``). ``--set section.key=value`` overrides a
value (parsed as TOML, so ``--set optim.learning_rate=1e-4`` and ``--set method.target_modules='["q_proj"]'``
work). The resolved config is stored in the run directory; a run directory made with a different config is
refused rather than mixed.

Types and ranges: [model], [data], [optim] and [run] are the frozen dataclasses `ModelSection`, `DataSection`,
`OptimSection` and `RunSection` (validated on construction); [method] values are checked against the field types
of the method's config dataclass. An error names ``section.key``, what was expected and the value found (e.g.
``optim.learning_rate: expected a number > 0, got -1``). ``jlora train --print-config`` prints the resolved
config as TOML (keys whose value is none are comments) and exits. A UTF-8 byte-order mark is accepted.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from typing import Any, Dict, List, Optional, Sequence

class ConfigError(ValueError):
    """A bad run config value; the message names ``section.key``, what was expected and the value found."""


class _Check:
    """One field's type and range: ``expected`` says it in words (for the error), ``__call__`` normalizes a
    valid value (an integer where a float is meant becomes a float; a list where a tuple is meant stays a list)
    or returns ``_BAD``."""

    def __init__(self, expected: str, fn):
        self.expected, self.fn = expected, fn

    def __call__(self, v):
        return self.fn(v)


_BAD = object()


def _is_num(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _number(expected="a number", ok=lambda v: True, optional=False):
    def fn(v):
        if optional and v is None:
            return None
        return float(v) if _is_num(v) and ok(v) else _BAD
    return _Check(expected + (" (or none)" if optional else ""), fn)


def _integer(lo=None, optional=False):
    def fn(v):
        if optional and v is None:
            return None
        return v if isinstance(v, int) and not isinstance(v, bool) and (lo is None or v >= lo) else _BAD
    return _Check(("an integer" if lo is None else f"an integer >= {lo}") + (" (or none)" if optional else ""), fn)


def _string(optional=False, nonempty=False):
    def fn(v):
        if optional and v is None:
            return None
        return v if isinstance(v, str) and (v or not nonempty) else _BAD
    return _Check(("a non-empty string" if nonempty else "a string") + (" (or none)" if optional else ""), fn)


def _enum(*choices):
    return _Check("one of " + " | ".join(map(repr, choices)), lambda v: v if isinstance(v, str) and v in choices
                  else _BAD)


_BOOL = _Check("true or false", lambda v: v if isinstance(v, bool) else _BAD)
_QUANTIZE = _Check("a string (\"\" | \"nf4\" | \"fp4\" | \"int8\" | \"gguf\") or a table of QuantConfig fields",
                   lambda v: v if isinstance(v, (str, dict)) else _BAD)
_RATIOS = _Check("a table of role = number > 0 (or none)", lambda v: v if v is None or (
    isinstance(v, dict) and all(isinstance(k, str) and _is_num(x) and x > 0 for k, x in v.items())) else _BAD)
DTYPES = ("float32", "bfloat16")
SCHEDULES = ("constant", "linear", "cosine")  # jlora.loop.SCHEDULES (checked equal in the tests)
OVERFLOW = ("truncate", "error", "split")  # jlora.data.make_batches(overflow=...)


def _field(default, check: _Check):
    return dataclasses.field(default=default, metadata={"check": check})


class _Section:
    """A frozen, validated section of the run config: every field is checked against its ``check`` on
    construction, and the error names ``section.key``."""

    section = ""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            check = f.metadata.get("check")
            if check is None:
                continue
            value = getattr(self, f.name)
            norm = check(value)
            if norm is _BAD:
                raise ConfigError(f"{self.section}.{f.name}: expected {check.expected}, got {value!r}")
            object.__setattr__(self, f.name, norm)

    @classmethod
    def keys(cls):
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def of(cls, values: Dict[str, Any], src: str = "config"):
        """The section from a table, every key checked (an unknown key is an error listing the known ones)."""
        unknown = [k for k in values if k not in cls.keys()]
        if unknown:
            raise ConfigError(f"{src}: unknown key {cls.section}.{unknown[0]} (known: {', '.join(cls.keys())})")
        try:
            return cls(**values)
        except ConfigError as e:
            raise ConfigError(f"{src}: {e}") from None

    def to_dict(self) -> Dict[str, Any]:
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self)}


@dataclasses.dataclass(frozen=True)
class ModelSection(_Section):
    """[model]: which base, its compute dtype, the frozen base's storage dtype, rematerialization, quantization."""

    section = "model"
    path: str = _field("smollm2", _string(nonempty=True))
    dtype: str = _field("float32", _enum(*DTYPES))
    base_dtype: str = _field("float32", _enum(*DTYPES))
    remat: bool = _field(False, _BOOL)
    quantize: Any = _field("", _QUANTIZE)


@dataclasses.dataclass(frozen=True)
class DataSection(_Section):
    """[data]: the files and how they become batches (`jlora.data.make_batches`)."""

    section = "data"
    train: Optional[str] = _field(None, _string(optional=True))
    eval: Optional[str] = _field(None, _string(optional=True))
    eval_fraction: float = _field(0.0, _number("a number >= 0 and < 1", lambda v: 0 <= v < 1))
    seq_len: int = _field(256, _integer(1))
    batch_size: int = _field(8, _integer(1))
    eval_batch_size: Optional[int] = _field(None, _integer(1, optional=True))
    accum_steps: int = _field(1, _integer(1))
    pack: bool = _field(True, _BOOL)
    overflow: str = _field("truncate", _enum(*OVERFLOW))
    seed: int = _field(0, _integer(0))


@dataclasses.dataclass(frozen=True)
class OptimSection(_Section):
    """[optim]: the optimizer and the learning-rate schedule (`jlora.loop.FitConfig`)."""

    section = "optim"
    learning_rate: float = _field(2e-4, _number("a number > 0", lambda v: v > 0))
    schedule: str = _field("cosine", _enum(*SCHEDULES))
    warmup_steps: int = _field(0, _integer(0))
    min_lr_ratio: float = _field(0.0, _number("a number >= 0 and <= 1", lambda v: 0 <= v <= 1))
    weight_decay: float = _field(0.0, _number("a number >= 0", lambda v: v >= 0))
    adam_eps: float = _field(1e-8, _number("a number > 0", lambda v: v > 0))
    max_grad_norm: Optional[float] = _field(1.0, _number("a number >= 0", lambda v: v >= 0, optional=True))
    label_smoothing: float = _field(0.0, _number("a number >= 0 and < 1", lambda v: 0 <= v < 1))
    lr_ratios: Optional[Dict[str, float]] = _field(None, _RATIOS)


@dataclasses.dataclass(frozen=True)
class RunSection(_Section):
    """[run]: the run directory, its length, evaluation/checkpoint/log cadence, seed, mesh."""

    section = "run"
    dir: Optional[str] = _field(None, _string(optional=True))
    steps: int = _field(100, _integer(1))
    eval_every: int = _field(0, _integer(0))
    save_every: int = _field(0, _integer(0))
    keep_last: int = _field(2, _integer(0))
    log_every: int = _field(10, _integer(1))
    seed: int = _field(0, _integer(0))
    mesh: str = _field("", _string())
    distributed: bool = _field(False, _BOOL)


SECTIONS = {"model": ModelSection, "method": None, "data": DataSection, "optim": OptimSection, "run": RunSection}
# The defaults of every section (the [method] ones are the chosen method's config dataclass's own).
DEFAULTS: Dict[str, Dict[str, Any]] = {name: ({"kind": "lora"} if cls is None else cls().to_dict())
                                       for name, cls in SECTIONS.items()}


def _parse_value(text: str):
    import tomllib

    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare string


def load_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> Dict[str, Dict[str, Any]]:
    """Reads a run config (TOML or YAML), applies ``section.key=value`` overrides and fills defaults.

    Args:
      path: a ``.toml`` or ``.yaml``/``.yml`` file, or None for defaults only.
      overrides: ``"section.key=value"`` strings (value parsed as TOML, else taken as a string).

    Returns:
      the resolved config: every section of `DEFAULTS` with every key.
    """
    conf: Dict[str, Any] = {} if path is None else _read_file(str(path))
    src = str(path) if path is not None else "config"
    out = copy.deepcopy(DEFAULTS)
    for section, values in conf.items():
        if section not in DEFAULTS:
            raise ConfigError(f"{src}: unknown section [{section}] (known: {', '.join(DEFAULTS)})")
        if not isinstance(values, dict):
            raise ConfigError(f"{src}: [{section}] must be a table of keys, got {values!r}")
        for key, value in values.items():
            if key not in DEFAULTS[section] and section != "method":
                raise ConfigError(f"{src}: unknown key {section}.{key} (known: {', '.join(DEFAULTS[section])})")
            out[section][key] = value
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        dotted, text = item.split("=", 1)
        section, key = dotted.split(".", 1)
        if section not in DEFAULTS:
            raise ConfigError(f"--set {item!r}: unknown section [{section}] (known: {', '.join(DEFAULTS)})")
        if key not in DEFAULTS[section] and section != "method":
            raise ConfigError(f"--set {item!r}: unknown key {dotted} (known: {', '.join(DEFAULTS[section])})")
        out[section][key] = _parse_value(text)
    for name, cls in SECTIONS.items():  # types and ranges: the section dataclasses
        if cls is not None:
            out[name] = cls.of(out[name], src).to_dict()
    _validate(out, src)
    return out


def _read_file(path: str) -> Dict[str, Any]:
    """A config file's tables; a UTF-8 byte-order mark (Windows editors write one) is accepted."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such config file")
    if not path.endswith((".toml", ".yaml", ".yml")):
        raise ConfigError(f"{path}: config files must be .toml or .yaml")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e})") from None
    if path.endswith(".toml"):
        import tomllib

        try:
            conf = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML ({e})") from None
    else:
        try:
            import yaml
        except ImportError:
            raise ConfigError(f"{path}: YAML configs need PyYAML (pip install pyyaml), or use TOML") from None
        try:
            conf = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(conf, dict):
        raise ConfigError(f"{path}: expected tables of keys ([model], [method], ...), got {conf!r}")
    return conf


def print_config(c: Dict[str, Any]) -> str:
    """The resolved config ``c`` (every key, defaults included) as TOML, the format `load_config` reads back.
    Keys whose value is none (TOML has no null) are written as comments."""
    lines = ["# jlora run config, resolved (defaults filled in); TOML"]
    for section in DEFAULTS:
        lines.append(f"\n[{section}]")
        for key, value in c[section].items():
            if value is None:
                lines.append(f"# {key} = (none)")
            else:
                lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a TOML basic string
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{json.dumps(str(k))} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise ConfigError(f"cannot write {v!r} as TOML")


def _jsonable(x):
    if isinstance(x, tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    return x


def _validate(c, src):
    from jlora.peft import base as B

    kind = c["method"].get("kind")
    if kind not in B.kinds():
        raise ValueError(f"{src}: method.kind must be one of {', '.join(B.kinds())}, got {kind!r}")
    options = {k: v for k, v in c["method"].items() if k != "kind"}
    if B.get(kind).config is None:
        # Full fine-tuning has no options; a config written for a PEFT method may still be switched to it with
        # --method full, so the options of other methods are set aside (but a typo is still an error).
        known = {f.name for m in B.methods() if m.config is not None for f in dataclasses.fields(m.config)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"{src}: unknown option method.{unknown[0]} (no method has it)")
        options = {}
    if B.get(kind).config is not None:
        _check_method_types(B.get(kind).config, options, src)
    mcfg = B.get(kind).make_config(options, src)
    # The resolved [method]: every field of the method's config, so a run's identity does not depend on
    # which defaults were spelled out.
    c["method"] = {"kind": kind, **({} if mcfg is None else
                                    {f.name: _jsonable(getattr(mcfg, f.name)) for f in dataclasses.fields(mcfg)
                                     if f.init})}
    if not c["data"]["train"]:
        raise ValueError(f"{src}: data.train is required (a .jsonl or .txt file)")
    if not c["run"]["dir"]:
        raise ValueError(f"{src}: run.dir is required (where checkpoints and results go)")
    if not isinstance(c["run"]["dir"], str):
        raise ValueError(f"{src}: run.dir must be a string (a directory), got {c['run']['dir']!r}")
    if os.path.exists(c["run"]["dir"]) and not os.path.isdir(c["run"]["dir"]):
        raise ValueError(f"{src}: run.dir {c['run']['dir']!r} exists and is not a directory; name a new "
                         f"directory or the directory of the same run")
    for sec, key in (("model", "dtype"), ("model", "base_dtype")):
        if c[sec][key] not in ("float32", "bfloat16"):
            raise ValueError(f"{src}: {sec}.{key} must be float32 or bfloat16, got {c[sec][key]!r}")
    if c["model"]["quantize"]:
        from jlora.quant import QuantConfig

        try:
            if c["model"]["quantize"] != "gguf":  # "gguf": keep a .gguf file's own blocks (checked when loading)
                QuantConfig.of(c["model"]["quantize"])
        except (TypeError, ValueError) as e:
            raise ValueError(f"{src}: model.quantize: {e}") from None
        if kind == "full":
            raise ValueError(f"{src}: model.quantize {c['model']['quantize']!r} with method.kind 'full': a quantized "
                             f"base is frozen; train an adapter on it (e.g. method.kind = \"lora\": QLoRA) or drop "
                             f"model.quantize")
    if c["run"]["mesh"]:
        from jlora.parallel import parse_mesh_spec

        try:
            parse_mesh_spec(c["run"]["mesh"])
        except (TypeError, ValueError) as e:
            raise ValueError(f"{src}: run.mesh: {e}") from None


def _type_ok(v, t) -> bool:
    import typing

    origin, args = typing.get_origin(t), typing.get_args(t)
    if t is Any:
        return True
    if t is type(None):
        return v is None
    if origin is typing.Union:
        return any(_type_ok(v, a) for a in args)
    if t is bool:
        return isinstance(v, bool)
    if t is int:
        return isinstance(v, int) and not isinstance(v, bool)
    if t is float:
        return _is_num(v)
    if t is str:
        return isinstance(v, str)
    if origin in (tuple, list):
        if not isinstance(v, (list, tuple)):
            return False
        elem = args[0] if args else Any
        return all(_type_ok(x, elem) for x in v)
    if origin in (dict, typing.Mapping) or t in (dict, typing.Mapping) or getattr(origin, "__name__", "") == "Mapping":
        if not isinstance(v, dict):
            return False
        return not args or all(_type_ok(x, args[1]) for x in v.values())
    return True  # a type this check does not know: the method's own __post_init__ decides


def _describe(t) -> str:
    import typing

    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin is typing.Union:
        return " or ".join(_describe(a) for a in args)
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "none"}
    if t in names:
        return names[t]
    if origin in (tuple, list):
        return f"a list of {_describe(args[0]).replace('an ', '').replace('a ', '')}s" if args else "a list"
    if origin is dict or getattr(origin, "__name__", "") == "Mapping":
        return "a table" + (f" of {_describe(args[1])}" if len(args) == 2 else "")
    return getattr(t, "__name__", str(t))


def _check_method_types(config_cls, options, src):
    """[method] values against the method config dataclass's field types, so that a wrong type is an error
    naming ``method.KEY`` (ranges are the dataclass's own ``__post_init__``)."""
    import typing

    hints = typing.get_type_hints(config_cls)
    for key, value in options.items():
        t = hints.get(key)
        if t is not None and not _type_ok(value, t):
            raise ConfigError(f"{src}: method.{key}: expected {_describe(t)}, got {value!r}")


def _fit_config(c):
    from jlora.loop import FitConfig

    o, r = c["optim"], c["run"]
    return FitConfig(steps=r["steps"], learning_rate=o["learning_rate"], schedule=o["schedule"],
                     warmup_steps=o["warmup_steps"], min_lr_ratio=o["min_lr_ratio"], weight_decay=o["weight_decay"],
                     adam_eps=o["adam_eps"], max_grad_norm=o["max_grad_norm"], label_smoothing=o["label_smoothing"],
                     lr_ratios=o["lr_ratios"], eval_every=r["eval_every"], save_every=r["save_every"],
                     keep_last=r["keep_last"], log_every=r["log_every"], seed=r["seed"])


def method_config(c):
    """The method config (`jlora.LoraConfig`, `DoraConfig`, `IA3Config`; None for full fine-tuning) of a resolved
    run config's [method] section."""
    from jlora.peft import base as B

    m = dict(c["method"])
    return B.get(m.pop("kind")).make_config(m)


lora_config = method_config  # the name before the method seam


def build_model(c, log=print):
    """(model path, cfg, params ready for training) from a resolved config: loads the base, applies the
    method and the dtypes."""
    import jax
    import jax.numpy as jnp

    import jlora
    from jlora.model_path import resolve_model

    spec = c["model"]["path"]
    quantize = c["model"].get("quantize") or None
    if spec in jlora.PRESETS:
        cfg = jlora.preset(spec)
        params = jlora.init_params(cfg, jax.random.key(c["run"]["seed"]))
        path = None
        if quantize == "gguf":
            raise ValueError(f"model.quantize 'gguf' keeps the blocks of a .gguf file; {spec!r} is a preset")
        if quantize:
            from jlora.quant import QuantConfig, quantize_params

            params = quantize_params(cfg, params, QuantConfig.of(quantize))
    else:
        path = resolve_model(spec)
        cfg, params = jlora.load_pretrained(path, quantize=quantize)
    cfg = cfg.replace(dtype=c["model"]["dtype"], remat=bool(c["model"]["remat"]))
    from jlora.peft import base as B

    method = B.get(c["method"]["kind"])
    if method.kind != "full":  # a parameter-efficient method: the base is frozen and may be stored narrower
        if c["model"]["base_dtype"] != "float32":
            from jlora.kernels import is_node

            bd = jnp.dtype(c["model"]["base_dtype"])  # plain leaves only: a quantized kernel keeps its codes
            params = jax.tree_util.tree_map(lambda x: x if is_node(x) else x.astype(bd), params, is_leaf=is_node)
        mcfg = method_config(c)
        if getattr(mcfg, "tokenizer_name_or_path", "") is None and path is not None:
            mcfg = mcfg.replace(tokenizer_name_or_path=path)  # e.g. prompt tuning from a text: the model's own
        params = method.init(jax.random.key(c["run"]["seed"] + 1), cfg, params, mcfg)
    return path, cfg, params


def build_data(c, tokenizer):
    """(train Batches, eval Batches or None) from a resolved config's [data] section."""
    from jlora import data

    import jax

    d = c["data"]
    kw = dict(seq_len=d["seq_len"], seed=d["seed"], pack=d["pack"], overflow=d["overflow"],
              host_index=jax.process_index(), host_count=jax.process_count())
    if d["eval"]:
        train_b, _ = data.make_batches(d["train"], tokenizer, batch_size=d["batch_size"],
                                       accum_steps=d["accum_steps"], **kw)
        eval_b, _ = data.make_batches(d["eval"], tokenizer, batch_size=d["eval_batch_size"] or d["batch_size"],
                                      shuffle=False, drop_remainder=False, **kw)
        return train_b, eval_b
    return data.make_batches(d["train"], tokenizer, batch_size=d["batch_size"], accum_steps=d["accum_steps"],
                             eval_fraction=d["eval_fraction"], eval_batch_size=d["eval_batch_size"], **kw)


def _tokenizer_for(path, c):
    import jlora

    if path is None:
        raise ValueError(f"model.path {c['model']['path']!r} is a preset with random weights and no tokenizer; "
                         "train on a real model (HF dir, .gguf or 'smollm2')")
    return jlora.load_tokenizer(path)


def train_run(c, log=print, progress=True, eval_fn=None, stop_at=None):
    """Runs (or resumes) the training described by the resolved config ``c`` and writes the result:
    a PEFT adapter (``<dir>/adapter``) for a PEFT method or a Hugging Face model (``<dir>/model``) for full
    fine-tuning.

    Returns:
      the `jlora.loop.FitResult`.

    Raises:
      jlora.checkpoint.RunDirLockedError: another process is training in run.dir (checked before the model
        loads).
      jlora.loop.Preempted: SIGTERM/SIGINT stopped the run after a committed checkpoint (exit status 75).
    """
    import jax

    from jlora import parallel
    from jlora.checkpoint import lock_run_dir

    if c["run"]["distributed"]:
        parallel.initialize_distributed()
    # Locked before the model loads, so that a second run on this directory is refused at once (`fit` takes
    # the same lock again, re-entrantly).
    with lock_run_dir(c["run"]["dir"], log if jax.process_index() == 0 else (lambda *_: None)):
        return _train_locked(c, log, progress, eval_fn, stop_at)


def _train_locked(c, log, progress, eval_fn, stop_at):
    import jax

    import jlora
    from jlora import parallel
    from jlora.loop import fit

    mesh = parallel.make_mesh(c["run"]["mesh"]) if c["run"]["mesh"] else None
    path, cfg, params = build_model(c, log)
    tok = _tokenizer_for(path, c)
    train_b, eval_b = build_data(c, tok)
    run_dir = c["run"]["dir"]
    log(f"model {path}: {cfg.arch}, {cfg.num_params():,} parameters; method {c['method']['kind']}; "
        f"{train_b.num_sequences} training sequences, {train_b.steps_per_epoch} steps per epoch")
    # The mesh and process layout are not part of a run's identity: a run may resume on another mesh.
    identity = copy.deepcopy(c)
    for key in ("mesh", "distributed"):
        identity["run"].pop(key)
    res = fit(cfg, params, train_b, run_dir=run_dir, fit_config=_fit_config(c), eval_batches=eval_b,
              eval_fn=eval_fn, base_ref=path, run_config=identity, progress=progress, stop_at=stop_at, log=log,
              mesh=mesh)
    if int(res.state.step) == c["run"]["steps"]:
        final = parallel.to_host(res.state.params) if mesh is not None else res.state.params
    if int(res.state.step) == c["run"]["steps"] and jax.process_index() == 0:
        if c["method"]["kind"] != "full":
            out = os.path.join(run_dir, "adapter")
            jlora.save_adapter(cfg, final, out, method_config(c))
        else:
            out = os.path.join(run_dir, "model")
            jlora.save_pretrained(cfg.replace(dtype="float32", remat=False), final, out)
            tok.save(out)
        log(f"wrote {out}")
    return res


def eval_run(run_dir: str, data_path: Optional[str] = None, which: str = "best", log=print) -> dict:
    """Evaluates a trained run: restores its best (or latest) checkpoint and reports eval loss/perplexity.

    Args:
      run_dir: a run directory made by `train_run` (holds ``run_config.json``).
      data_path: evaluate on this file instead of the run's eval set.
      which: "best" (by eval loss, when the run evaluated) or "latest", or a step number.

    Returns:
      dict with ``step``, ``eval_loss``, ``eval_perplexity``, ``eval_tokens``.
    """
    import jax

    import jlora
    from jlora import data, loop, train
    from jlora.checkpoint import Checkpointer

    conf_path = os.path.join(run_dir, "run_config.json")
    if not os.path.isfile(conf_path):
        raise FileNotFoundError(f"{run_dir}: no run_config.json (not a jlora run directory)")
    with open(conf_path) as f:
        recorded = json.load(f)
    c = {k: recorded[k] for k in DEFAULTS}
    path, cfg, params = build_model(c, log)
    tok = _tokenizer_for(path, c)
    labels = jlora.trainable_labels(params)
    with Checkpointer(run_dir) as ck:
        step = {"best": ck.best_step(), "latest": ck.latest_step()}.get(which, None)
        step = int(which) if step is None and str(which).isdigit() else step
        if step is None:
            raise FileNotFoundError(f"{run_dir}: no checkpoint to evaluate")
        params = ck.restore_params(step, like_params=params, labels=labels)
    d = c["data"]
    if data_path:
        eval_b, _ = data.make_batches(data_path, tok, seq_len=d["seq_len"], batch_size=d["eval_batch_size"] or
                                      d["batch_size"], shuffle=False, drop_remainder=False, pack=d["pack"],
                                      overflow=d["overflow"])
    else:
        _, eval_b = build_data(c, tok)
        if eval_b is None:
            raise ValueError(f"{run_dir}: the run has no eval set (data.eval / data.eval_fraction); pass --data")
    out = loop.evaluate(jax.jit(train.make_eval_step(cfg)), params, eval_b)
    return {"step": step, **out}
