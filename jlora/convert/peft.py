"""LoRA adapters <-> the Hugging Face PEFT format (``adapter_config.json`` + ``adapter_model.safetensors``).

The file format, as PEFT (0.21) writes and reads it:

* ``adapter_model.safetensors`` holds, for every adapted module ``M`` (the HF module path, which is also the
  jlora module name), ``base_model.model.M.lora_A.weight`` ``[r, in]`` and ``base_model.model.M.lora_B.weight``
  ``[out, r]``. In jlora ``a = lora_A.T`` (``[in, r]``) and ``b = lora_B.T`` (``[r, out]``), for ``nn.Linear``
  and GPT-2 ``Conv1D`` modules alike (``fan_in_fan_out`` only concerns the base weight).
* ``adapter_config.json`` gives the scale of each module: ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with
  ``use_rslora``), with ``r`` and ``lora_alpha`` overridden per module by ``rank_pattern`` / ``alpha_pattern``
  (``{regex: value}``; the first key in file order with ``re.match(rf"(.*\\.)?({key})$", module)`` wins).

Loading is strict, unlike PEFT's (which warns and goes on, peft#2566): every tensor of the file must land on a
module of the model, every module the config selects must have both factors, every shape must fit, and any
option jlora does not implement (DoRA, trained biases, ``modules_to_save``, embedding LoRA, inits that rewrite
the base such as PiSSA, ...) is refused with a ValueError that names it.

GPT-2 adapters that cover only some slices of the fused ``c_attn`` (``LoraConfig(fused_qkv=("q", "v"))``)
export exactly: ``lora_B`` gets zero rows for the uncovered columns. The slices are also recorded in the
safetensors metadata (ignored by PEFT), so that `load_adapter` restores the sliced wrapper and a save/load
round trip is bitwise.
"""

from __future__ import annotations

import collections
import json
import math
import os
import re
import shutil
import tempfile
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jlora import tree as T
from jlora.config import ModelConfig
from jlora.convert.stfile import SafetensorsFile, write_safetensors
from jlora.peft.lora import LoRA, LoraConfig, adapters

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
_SLICES_META = "jlora.fused_qkv_slices"
_KEY_RE = re.compile(r"^(?P<module>.+)\.lora_(?P<factor>[AB])\.weight$")
# PEFT also stores a copy of the base weight of LoRA-wrapped output/embedding layers (save_embedding_layers,
# e.g. when lm_head is a target), in case the vocabulary was resized.
_BASE_RE = re.compile(r"^(?P<module>.+)\.base_layer\.weight$")

# init_lora_weights values after which the adapter only fits a *modified* base (PEFT rewrites the base weight
# at init: PiSSA/OLoRA/CorDA/LoRA-GA subtract the initial low-rank part, LoftQ quantizes). PEFT can convert
# such adapters to plain ones: save_pretrained(..., path_initial_model_for_weight_conversion=...).
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga", "kasa")
# init_lora_weights values that only decide the starting point of training: the trained factors are plain LoRA.
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")

# Options of PEFT's LoraConfig that change what the adapter computes (or what it stores) and that jlora does
# not implement: option -> (value(s) that are fine, why).
_UNSUPPORTED = {
    "use_dora": ((False, None), "DoRA (weight-decomposed LoRA)"),
    "bias": (("none", None), "trained biases (bias='all' or 'lora_only')"),
    "lora_bias": ((False, None), "a bias on lora_B"),
    "modules_to_save": ((None, []), "fully trained extra modules (modules_to_save)"),
    "trainable_token_indices": ((None, [], {}), "trainable token embeddings"),
    "layer_replication": ((None, []), "layer replication"),
    "target_parameters": ((None, []), "LoRA on nn.Parameter targets"),
    "use_qalora": ((False, None), "QA-LoRA"),
    "use_bdlora": ((None, False), "block-diagonal LoRA"),
    "alora_invocation_tokens": ((None, []), "activated LoRA (aLoRA)"),
    "velora_config": ((None,), "VeLoRA"),
    "monteclora_config": ((None,), "MonteCLoRA"),
    "arrow_config": ((None,), "Arrow routing"),
    "kasa_config": ((None,), "KaSA"),
    "megatron_config": ((None,), "Megatron tensor-parallel layers"),
}


def _fail(where: str, msg: str):
    raise ValueError(f"{where}: {msg}")


def _check_supported(pconf: dict, where: str = CONFIG_NAME) -> None:
    """Raises ValueError naming the first option of a PEFT config that jlora cannot reproduce exactly."""
    if not isinstance(pconf, dict):
        _fail(where, f"expected a JSON object, got {type(pconf).__name__}")
    ptype = str(pconf.get("peft_type", "LORA")).upper()
    if ptype != "LORA":
        _fail(where, f"peft_type {pconf.get('peft_type')!r} is not supported (jlora loads LORA adapters only)")
    for option, (ok, what) in _UNSUPPORTED.items():
        value = pconf.get(option, ok[0])
        if value not in ok:
            _fail(where, f"{option}={value!r} is not supported: jlora does not implement {what}")
    init = pconf.get("init_lora_weights", True)
    name = str(init).lower()
    if isinstance(init, str) and any(name.startswith(p) for p in _BASE_CHANGING_INITS):
        _fail(where, f"init_lora_weights={init!r} is not supported: this adapter was trained on a base whose "
                     f"weights PEFT rewrote at initialization, so it does not apply to the original base. Convert "
                     f"it to a plain LoRA adapter with PEFT's save_pretrained(..., "
                     f"path_initial_model_for_weight_conversion=...) first")
    if init not in _PLAIN_INITS:
        _fail(where, f"init_lora_weights={init!r} is not supported (it selects a LoRA variant jlora does not "
                     f"implement)")
    if "r" in pconf and (not isinstance(pconf["r"], int) or isinstance(pconf["r"], bool) or pconf["r"] <= 0):
        _fail(where, f"r must be a positive integer, got {pconf['r']!r}")


def _lcfg(pconf: dict, init) -> LoraConfig:
    targets = pconf.get("target_modules")
    if isinstance(targets, (list, tuple, set)):
        targets = tuple(sorted(targets))
    layers = pconf.get("layers_to_transform")
    if layers is not None and not isinstance(layers, int):
        layers = tuple(layers) or None
    return LoraConfig(r=int(pconf.get("r", 8)), alpha=float(pconf.get("lora_alpha", 8)), target_modules=targets,
                      use_rslora=bool(pconf.get("use_rslora", False)),
                      rank_pattern=dict(pconf.get("rank_pattern") or {}),
                      alpha_pattern={k: float(v) for k, v in (pconf.get("alpha_pattern") or {}).items()},
                      dropout=float(pconf.get("lora_dropout", 0.0) or 0.0), init=init, layers_to_transform=layers)


def lora_config_from_peft(pconf: dict) -> LoraConfig:
    """The `jlora.LoraConfig` equivalent to a PEFT ``adapter_config.json`` (as a dict).

    Args:
      pconf: the parsed ``adapter_config.json``.

    Returns:
      a `LoraConfig` with the same targets, ranks, alphas (patterns included), rsLoRA switch, dropout, layers
      and init.

    Raises:
      ValueError naming the option, for options jlora does not implement (DoRA, biases, modules_to_save, inits
      that rewrite the base or that jlora has no equivalent for, exclude_modules, custom layers_pattern, ...).

    Example:
      >>> lcfg = lora_config_from_peft(json.load(open("adapter/adapter_config.json")))
    """
    _check_supported(pconf)
    if pconf.get("exclude_modules"):
        _fail(CONFIG_NAME, "exclude_modules has no jlora.LoraConfig equivalent (load_adapter honours it)")
    lp = pconf.get("layers_pattern")
    if lp and set([lp] if isinstance(lp, str) else lp) - {"layers", "h"}:
        _fail(CONFIG_NAME, f"layers_pattern={lp!r} has no jlora.LoraConfig equivalent (jlora numbers layers by "
                           f"their 'layers'/'h' index)")
    init = pconf.get("init_lora_weights", True)
    if init not in (True, False, "gaussian"):
        _fail(CONFIG_NAME, f"init_lora_weights={init!r} has no jlora equivalent (jlora: True, False, 'gaussian', "
                           f"'pissa')")
    return _lcfg(pconf, init)


# ----------------------------------------------------------------------------------------------------------
# Target selection, exactly as PEFT decides it (peft.tuners.tuners_utils.check_target_module_exists)


def _peft_layer_index(name: str, layers_pattern) -> Optional[int]:
    if not layers_pattern:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        m = None
        for pat in ([layers_pattern] if isinstance(layers_pattern, str) else layers_pattern):
            m = re.match(rf"(?:^|.*?\.){pat}\.(?P<idx>\d+)\.", name)
            if m is not None:
                break
    return int(m.group("idx")) if m else None


def _peft_selects(pconf: dict, name: str, output_layers: Sequence[str]) -> bool:
    """Whether PEFT would put LoRA on the linear module ``name`` under the config ``pconf``."""
    exclude = pconf.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, name):
                return False
        elif name in exclude or any(name.endswith("." + e) for e in exclude):
            return False
    targets = pconf.get("target_modules")
    if targets == "all-linear":  # PEFT expands it to every linear layer but the output layer
        return name not in output_layers
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    if name in targets:
        return True
    if not any(name.endswith("." + t) for t in targets):
        return False
    layers = pconf.get("layers_to_transform")
    if layers is None or (isinstance(layers, list) and not layers):
        return True
    idx = _peft_layer_index(name, pconf.get("layers_pattern"))
    if idx is None:
        return False
    return idx == layers if isinstance(layers, int) else idx in layers


def _peft_selected(pconf: dict, modules) -> set:
    """The linear modules (names) PEFT adapts under ``pconf``."""
    output_layers = [n for n in modules if n.split(".")[-1] == "lm_head"]
    return {n for n in modules if _peft_selects(pconf, n, output_layers)}


# ----------------------------------------------------------------------------------------------------------
# Saving


def _scale_of(alpha: float, r: int, rslora: bool) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r  # PEFT's formula, in Python floats


def _alpha_for(scale: float, r: int, rslora: bool) -> Tuple[float, bool]:
    """The simplest alpha that PEFT turns back into exactly ``scale``; (alpha, exact)."""
    raw = scale * (math.sqrt(r) if rslora else r)
    for cand in (float(round(raw)), round(raw, 6), raw, math.nextafter(raw, math.inf),
                 math.nextafter(raw, -math.inf)):
        if _scale_of(cand, r, rslora) == scale:
            return cand, True
    return raw, False


def _number(x: float):
    return int(x) if float(x).is_integer() else float(x)


def _compact_pattern(values: Dict[str, Any], default) -> Dict[str, Any]:
    """``{pattern: value}`` for the modules whose value differs from ``default``: one entry per module suffix
    when all adapted modules with that suffix agree, else one entry per full module name."""
    out = {}
    by_suffix = collections.defaultdict(set)
    for name, v in values.items():
        by_suffix[name.split(".")[-1]].add(v)
    for name, v in values.items():
        if v == default:
            continue
        suffix = name.split(".")[-1]
        key = suffix if len(by_suffix[suffix]) == 1 else name
        out[key] = _number(v) if isinstance(v, float) else v
    return out


def _derive_targets(params, names: List[str]):
    """(target_modules, layers_to_transform) that select exactly ``names`` with PEFT's rules."""
    wanted, modules = set(names), T.linear_modules(params)
    idx = [_peft_layer_index(n, None) for n in names]
    layers = sorted(set(idx)) if None not in idx else None
    depth = max(len(n.split(".")) for n in names)
    for k in range(1, depth + 1):
        suffixes = sorted({".".join(n.split(".")[-k:]) for n in names})
        for lay in (None, layers):
            if _peft_selected({"target_modules": suffixes, "layers_to_transform": lay}, modules) == wanted:
                return suffixes, lay
    return sorted(names, key=T.natural_key), None


def _most_common(values):
    """The most frequent value; ties go to the largest (a global rank with patterns that lower some modules)."""
    counts = collections.Counter(values)
    return max(counts, key=lambda v: (counts[v], v))


def _derive_config(params, ads: Dict[str, LoRA]) -> dict:
    """The PEFT config fields that reproduce every wrapper's rank and scale exactly."""
    names = sorted(ads, key=T.natural_key)
    ranks = {n: ads[n].rank for n in names}
    best = None
    for rslora in (False, True):
        alphas, exact = {}, True
        for n in names:
            alphas[n], ok = _alpha_for(float(ads[n].scale), ranks[n], rslora)
            exact &= ok
        # Prefer the scaling rule under which the alphas are few, round and exact (rsLoRA only if it helps).
        score = (not exact, len(set(alphas.values())), sum(not a.is_integer() for a in alphas.values()), rslora)
        if best is None or score < best[0]:
            best = (score, rslora, alphas)
    (inexact, *_), rslora, alphas = best
    r, alpha = _most_common(ranks.values()), _most_common(alphas.values())
    targets, layers = _derive_targets(params, names)
    dropouts = [float(ads[n].dropout) for n in names]
    fields = {"r": r, "lora_alpha": _number(alpha), "use_rslora": rslora, "target_modules": targets,
              "layers_to_transform": layers, "rank_pattern": _compact_pattern(ranks, r),
              "alpha_pattern": _compact_pattern(alphas, alpha), "lora_dropout": _most_common(dropouts),
              "init_lora_weights": True}
    check = _lcfg(fields, True)  # the config must give back every module's rank and scale
    for n in names:
        r_n, _, scale_n = check.rank_alpha_scale(n)
        if r_n != ranks[n] or not (scale_n == ads[n].scale or (inexact and math.isclose(scale_n, ads[n].scale))):
            raise AssertionError(f"save_adapter: derived config gives {n} rank {r_n} scale {scale_n}, wrapper has "
                                 f"rank {ranks[n]} scale {ads[n].scale}")
    return fields


def _config_from_lcfg(cfg: ModelConfig, params, ads: Dict[str, LoRA], lcfg: LoraConfig) -> dict:
    targets = lcfg.targets_for(cfg)
    layers = lcfg.layers()
    selected = set(T.select(params, targets, layers))
    if isinstance(targets, str) and layers is not None:
        # PEFT refuses layers_to_transform with a regex target: list the selected modules instead.
        targets, layers = sorted(selected, key=T.natural_key), None
    targets = targets if isinstance(targets, str) else sorted(targets)
    layers = list(layers) if layers is not None else None
    if _peft_selected({"target_modules": targets, "layers_to_transform": layers},
                      T.linear_modules(params)) != selected:
        targets, layers = sorted(selected, key=T.natural_key), None  # jlora's and PEFT's rules disagree here
    if selected != set(ads):
        extra = sorted(selected - set(ads)) or sorted(set(ads) - selected)
        why = "selected by lcfg but has no LoRA" if extra[0] in selected else "adapted but not selected by lcfg"
        _fail("save_adapter", f"lcfg does not describe the adapters in params: {extra[0]} is {why} (omit lcfg "
                              f"to derive the config from the wrappers)")
    for name, ad in ads.items():
        r, _, scale = lcfg.rank_alpha_scale(name)
        if r != ad.rank or scale != ad.scale:
            _fail("save_adapter", f"lcfg does not describe the adapters in params: {name} has rank {ad.rank} and "
                                  f"scale {ad.scale!r}, lcfg gives rank {r} and scale {scale!r} (omit lcfg to "
                                  f"derive the config from the wrappers)")
    init = lcfg.init
    return {"r": lcfg.r, "lora_alpha": _number(float(lcfg.alpha)), "use_rslora": lcfg.use_rslora,
            "target_modules": targets, "layers_to_transform": layers,
            "rank_pattern": dict(lcfg.rank_pattern),
            "alpha_pattern": {k: _number(float(v)) for k, v in lcfg.alpha_pattern.items()},
            "lora_dropout": float(lcfg.dropout), "init_lora_weights": True if init == "default" else init}


def _to_numpy(x, dtype) -> np.ndarray:
    arr = np.asarray(jax.device_get(x))
    if dtype is not None and arr.dtype != jnp.dtype(dtype):
        arr = arr.astype(np.float32).astype(jnp.dtype(dtype))
    return arr


def save_adapter(cfg: ModelConfig, params, out_dir, lcfg: Optional[LoraConfig] = None, *,
                 base_model_name_or_path: Optional[str] = None, dtype=None) -> None:
    """Writes the LoRA adapters of ``params`` as a PEFT adapter directory.

    ``PeftModel.from_pretrained(hf_model, out_dir)`` loads it with no missing or unexpected keys and computes
    the same function. Without ``lcfg`` the config is derived from the wrappers themselves (rank from ``a``,
    alpha from the scale), choosing ``r``/``lora_alpha``/``use_rslora`` and the smallest ``rank_pattern`` /
    ``alpha_pattern`` under which PEFT reconstructs exactly the same scales. The files are written to a
    temporary folder and moved into place: a new ``out_dir`` appears complete or not at all; in an existing one
    the weights, then the config, are replaced by atomic renames.

    Args:
      cfg: model config.
      params: a parameter tree with `LoRA` kernels (e.g. from `jlora.lora.init` or `load_adapter`).
      out_dir: destination directory (created if needed).
      lcfg: the `LoraConfig` the adapters were made with (optional; keeps its target/pattern spelling). It must
        describe the wrappers exactly.
      base_model_name_or_path: written to the config (default: ``cfg.name`` unless it is ``"custom"``).
      dtype: storage dtype of the factors (default: as they are, usually float32).

    Returns:
      None.

    Example:
      >>> params = jlora.lora.init(jax.random.key(0), cfg, params, jlora.LoraConfig(r=8, alpha=16))
      >>> save_adapter(cfg, params, "out/adapter")
    """
    ads = adapters(params)
    if not ads:
        _fail("save_adapter", "params has no LoRA adapter (wrap it with jlora.lora.init or load_adapter first)")
    # With lcfg.init == "pissa" the config says init_lora_weights="pissa" (the base of such a tree is the residual
    # W - scale * A0 @ B0, which PEFT recomputes from the original base on load); derived configs say True.
    fields = _derive_config(params, ads) if lcfg is None else _config_from_lcfg(cfg, params, ads, lcfg)
    # Names that are only a model type (jlora's fallback when config.json has no _name_or_path) are no hub id.
    if base_model_name_or_path is None and cfg.name not in ("custom", "", "llama", "mistral", "qwen2"):
        base_model_name_or_path = cfg.name
    pconf = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True, "bias": "none", "fan_in_fan_out": cfg.arch == "gpt2", "use_dora": False,
        "modules_to_save": None, "layers_pattern": None, **fields,
    }
    tensors, slices_meta = {}, {}
    for name, ad in ads.items():
        a = _to_numpy(ad.a, dtype)
        b = _to_numpy(ad.b, dtype)
        if ad.slices is not None:
            full = np.zeros((b.shape[0], ad.shape[-1]), b.dtype)
            offset = 0
            for start, stop in ad.slices:
                full[:, start:stop] = b[:, offset:offset + stop - start]
                offset += stop - start
            b = full
            slices_meta[name] = [list(s) for s in ad.slices]
        tensors[f"{PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(a.T)
        tensors[f"{PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(b.T)
    metadata = {_SLICES_META: json.dumps(slices_meta, sort_keys=True)} if slices_meta else None

    out_dir = os.fspath(out_dir)
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".jlora-adapter-", dir=parent)
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; it becomes out_dir
        write_safetensors(os.path.join(tmp, WEIGHTS_NAME), tensors, metadata)
        with open(os.path.join(tmp, CONFIG_NAME), "w") as f:
            json.dump(pconf, f, indent=2, sort_keys=True)
            f.write("\n")
        try:
            os.rename(tmp, out_dir)  # atomic when out_dir does not exist yet
            tmp = None
        except OSError:
            if not os.path.isdir(out_dir):
                raise
            for fname in (WEIGHTS_NAME, CONFIG_NAME):
                os.replace(os.path.join(tmp, fname), os.path.join(out_dir, fname))
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------
# Loading


def _read_config(adapter_dir: str) -> dict:
    path = os.path.join(adapter_dir, CONFIG_NAME)
    if not os.path.isdir(adapter_dir):
        raise FileNotFoundError(f"{adapter_dir}: no such adapter directory")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{adapter_dir}: no {CONFIG_NAME} (expected a PEFT adapter directory)")
    try:
        with open(path) as f:
            pconf = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    _check_supported(pconf, path)
    return pconf


def _key_problem(key: str) -> str:
    """Why a tensor name is not a plain LoRA factor (for the error message)."""
    if "lora_magnitude_vector" in key:
        return "a DoRA magnitude vector (DoRA is not supported)"
    if "lora_embedding_" in key:
        return "LoRA on an embedding layer, which jlora does not support"
    if re.search(r"\.lora_[AB]\.bias$", key):
        return "a bias on a LoRA factor (lora_bias is not supported)"
    if "modules_to_save" in key:
        return "a fully trained module (modules_to_save is not supported)"
    if "trainable_tokens" in key:
        return "trainable token embeddings (not supported)"
    if key.endswith(".bias"):
        return "a trained bias (bias='all'/'lora_only' is not supported)"
    return "not a LoRA factor (expected <module>.lora_A.weight or <module>.lora_B.weight)"


def load_adapter(cfg: ModelConfig, base_params, adapter_dir, *, dtype=jnp.float32):
    """Loads a PEFT LoRA adapter onto a base parameter tree.

    Honours ``r``, ``lora_alpha``, ``use_rslora``, ``rank_pattern``, ``alpha_pattern`` (PEFT's first-match
    regex rule), ``target_modules``, ``exclude_modules``, ``layers_to_transform``/``layers_pattern`` and
    ``lora_dropout``. Strict: a tensor that maps to no module, a module the config selects without both
    factors, a shape that does not fit, or an option jlora does not implement is a ValueError that names it.
    Only safetensors files are read (``adapter_model.bin`` is pickle and refused).

    Args:
      cfg: model config of the base.
      base_params: the base parameter tree (plain kernels, or quantized wrappers; no LoRA yet).
      adapter_dir: directory with ``adapter_config.json`` and ``adapter_model.safetensors``.
      dtype: dtype of the loaded factors (float32 by default; None keeps the file's dtype).

    Returns:
      the parameter tree with `LoRA` kernels at the adapted modules.

    Example:
      >>> cfg, base = jlora.load_pretrained("gpt2-dir")
      >>> params = load_adapter(cfg, base, "my-adapter")
    """
    adapter_dir = os.fspath(adapter_dir)
    pconf = _read_config(adapter_dir)
    wpath = os.path.join(adapter_dir, WEIGHTS_NAME)
    if not os.path.exists(wpath):
        if os.path.exists(os.path.join(adapter_dir, PICKLE_NAME)):
            raise ValueError(f"{adapter_dir}: holds only {PICKLE_NAME}, a pickle file (pickle can run code); jlora "
                             f"reads adapters from {WEIGHTS_NAME} only. Convert it with PEFT: load it and call "
                             f"save_pretrained(dir, safe_serialization=True)")
        raise FileNotFoundError(f"{adapter_dir}: no {WEIGHTS_NAME}")
    st = SafetensorsFile(wpath)
    try:
        slices_meta = json.loads(st.metadata.get(_SLICES_META, "{}"))
    except json.JSONDecodeError:
        slices_meta = {}

    modules = T.linear_modules(base_params)
    arch_prefix = "transformer." if cfg.arch == "gpt2" else "model."
    factors: Dict[str, Dict[str, str]] = collections.defaultdict(dict)
    base_copies = {}
    for key in sorted(st.keys(), key=lambda k: _BASE_RE.match(k) is not None):  # LoRA problems first
        m = _KEY_RE.match(key) or _BASE_RE.match(key)
        if m is None:
            _fail(wpath, f"tensor {key} is {_key_problem(key)}")
        module = m.group("module")
        module = module[len(PREFIX):] if module.startswith(PREFIX) else module
        if module not in modules and arch_prefix + module in modules:
            module = arch_prefix + module  # an adapter made on the bare base model (GPT2Model, LlamaModel)
        if "factor" not in m.groupdict() and module in modules:
            base_copies[module] = key
            continue
        if module not in modules:
            other = ("llama" if module.startswith("model.layers.") else
                     "gpt2" if module.startswith("transformer.h.") else None)
            hint = (f"; it looks like an adapter for a {other}-family model" if other and other != cfg.arch
                    else "; jlora ties this model's output head to the embedding, and LoRA on a tied head is not "
                         "supported" if module.split(".")[-1] == "lm_head" and cfg.tie_embeddings
                    else "; the adapter was made for another model")
            _fail(wpath, f"tensor {key} maps to no linear layer of this {cfg.arch} model (module {module!r} "
                         f"does not exist){hint}")
        if isinstance(modules[module], LoRA):
            _fail("load_adapter", f"{module} already has a LoRA adapter (strip or merge it first)")
        factors[module][m.group("factor")] = key

    for module, key in base_copies.items():
        _check_base_copy(st, wpath, key, module, modules[module], cfg)
    if pconf.get("target_modules") is None:
        selected = set(factors)  # no targets recorded: the tensors say which modules are adapted
    else:
        selected = _peft_selected(pconf, modules)
    lcfg = _lcfg(pconf, True)
    dropout = lcfg.dropout

    new = {}
    for module in sorted(factors, key=T.natural_key):
        keys = factors[module]
        if module not in selected:
            _fail(wpath, f"tensor {next(iter(keys.values()))} is for {module}, which {CONFIG_NAME}'s "
                         f"target_modules/layers_to_transform/exclude_modules do not select")
        for have, need in (("A", "B"), ("B", "A")):
            if have in keys and need not in keys:
                _fail(wpath, f"tensor {keys[have]} has no matching lora_{need} "
                             f"({keys[have][:-len('A.weight')]}{need}.weight is missing)")
        kernel = modules[module]
        d_in, d_out = kernel.shape
        r, _, scale = lcfg.rank_alpha_scale(module)
        for factor, expected in (("A", (r, d_in)), ("B", (d_out, r))):
            found = st.shape(keys[factor])
            if tuple(found) != expected:
                _fail(wpath, f"tensor {keys[factor]} has shape {tuple(found)}, expected {expected} (r={r} from "
                             f"{CONFIG_NAME}, module {module} is {d_in} -> {d_out}); the adapter does not fit "
                             f"this model")
        a = st.get(keys["A"])
        b = st.get(keys["B"])
        for k, arr in ((keys["A"], a), (keys["B"], b)):
            if not (np.issubdtype(arr.dtype, np.floating) or arr.dtype == ml_dtypes.bfloat16):
                _fail(wpath, f"tensor {k} has non-float dtype {arr.dtype}")
        a, b = np.asarray(a).T, np.asarray(b).T  # [in, r], [r, out]
        slices = _restore_slices(slices_meta.get(module), b, d_out)
        if slices is not None:
            b = np.concatenate([b[:, s:e] for s, e in slices], axis=1)
        new[module] = LoRA(base=kernel, a=_to_jax(a, dtype), b=_to_jax(b, dtype), scale=scale, slices=slices,
                           dropout=dropout)

    missing = sorted(selected - set(factors), key=T.natural_key)
    if missing:
        more = f" (and {len(missing) - 1} more modules)" if len(missing) > 1 else ""
        _fail(wpath, f"{CONFIG_NAME} selects {missing[0]}{more} but the file has no lora_A/lora_B for it")
    if not new:
        _fail(wpath, "the file holds no LoRA tensors")
    return T.replace_modules(base_params, new)


def _to_jax(x: np.ndarray, dtype) -> jax.Array:
    if dtype is None or x.dtype == jnp.dtype(dtype):
        return jnp.asarray(x)
    return jnp.asarray(x.astype(np.float32), dtype=dtype)


def _check_base_copy(st: SafetensorsFile, wpath: str, key: str, module: str, kernel, cfg: ModelConfig) -> None:
    """A stored copy of a base weight is accepted only if it is the base we load onto (jlora never takes base
    weights from an adapter file)."""
    from jlora.convert.hf import key_table
    from jlora.kernels import is_wrapper, materialize

    transpose = {hf_key: tr for _, hf_key, tr in key_table(cfg)}.get(module + ".weight", True)
    shape = tuple(kernel.shape)[::-1] if transpose else tuple(kernel.shape)
    found = st.shape(key)
    if tuple(found) != shape:
        _fail(wpath, f"tensor {key} (a saved copy of the base weight of {module}) has shape {tuple(found)}, "
                     f"expected {shape}; the adapter was made for another base (a resized vocabulary?)")
    if is_wrapper(kernel):
        return  # a quantized base cannot be compared bit for bit; the shapes agree
    want = np.asarray(jax.device_get(materialize(kernel)), np.float32)
    want = want.T if transpose else want
    got = np.asarray(st.get(key), np.float32).astype(jnp.dtype(kernel.dtype)).astype(np.float32)
    want = want.astype(jnp.dtype(kernel.dtype)).astype(np.float32)
    if not np.allclose(got, want, rtol=1e-3, atol=1e-6):
        _fail(wpath, f"tensor {key} is a saved copy of the base weight of {module} that differs from the base "
                     f"passed to load_adapter (max difference {np.abs(got - want).max():.3g}); the adapter was "
                     f"made for another or modified base, and jlora does not load base weights from adapters")


def _restore_slices(meta, b: np.ndarray, d_out: int):
    """The fused-qkv slices recorded by `save_adapter`, if ``b`` is still zero outside them (else None: the
    adapter was trained further as a full c_attn LoRA, and loading it full is exact)."""
    if not meta:
        return None
    try:
        slices = tuple((int(s), int(e)) for s, e in meta)
    except (TypeError, ValueError):
        return None
    cursor = 0
    for s, e in slices:
        if not cursor <= s < e <= d_out:
            return None
        cursor = e
    covered = np.zeros(d_out, bool)
    for s, e in slices:
        covered[s:e] = True
    if np.any(np.asarray(b[:, ~covered], np.float32) != 0):
        return None
    return slices
