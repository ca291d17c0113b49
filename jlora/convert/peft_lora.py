"""The LoRA codec for PEFT files: ``peft_type: LORA`` adapters without ``use_dora``, both ways.

The tensors, as PEFT (0.21) writes and reads them: for every adapted module ``M`` (the HF module path, which is
also the jlora module name), ``M.lora_A.weight`` ``[r, in]`` and ``M.lora_B.weight`` ``[out, r]``. In jlora
``a = lora_A.T`` (``[in, r]``) and ``b = lora_B.T`` (``[r, out]``), for ``nn.Linear`` and GPT-2 ``Conv1D`` modules
alike (``fan_in_fan_out`` only concerns the base weight). ``adapter_config.json`` gives the scale of each module:
``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``), with ``r`` and ``lora_alpha`` overridden per
module by ``rank_pattern`` / ``alpha_pattern`` (``{regex: value}``; the first key in file order with
``re.match(rf"(.*\\.)?({key})$", module)`` wins).

Strict, unlike PEFT (which warns and goes on, peft#2566): every tensor must land on a module the config selects,
every selected module must have both factors, every shape must fit, and any option jlora does not implement
(trained biases, embedding LoRA, inits that rewrite the base such as PiSSA, ...) is refused with a ValueError that
names it. The generic part (`jlora.convert.peft`) reads and writes the directory, normalizes tensor names, restores
``modules_to_save`` and checks that every tensor was used.

GPT-2 adapters that cover only some slices of the fused ``c_attn`` (``LoraConfig(fused_qkv=("q", "v"))``)
export exactly: ``lora_B`` gets zero rows for the uncovered columns. The slices are also recorded in the
safetensors metadata (ignored by PEFT), so that `load_adapter` restores the sliced wrapper and a save/load
round trip is bitwise.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jlora import tree as T
from jlora.config import ModelConfig
from jlora.convert.peft import BASE_COPY_RE, check_base_copy
from jlora.convert.peft import fail as _fail
from jlora.convert.peft import to_jax as _to_jax
from jlora.convert.peft import to_numpy as _to_numpy
from jlora.peft import base as B
from jlora.peft.lora import LoRA, LoraConfig, adapters

CONFIG_NAME = "adapter_config.json"
_SLICES_META = "jlora.fused_qkv_slices"
_KEY_RE = re.compile(r"^(?P<module>.+)\.lora_(?P<factor>[AB])\.weight$")
# PEFT also stores a copy of the base weight of LoRA-wrapped output/embedding layers (save_embedding_layers,
# e.g. when lm_head is a target), in case the vocabulary was resized.

# init_lora_weights values after which the adapter only fits a *modified* base (PEFT rewrites the base weight
# at init: PiSSA/OLoRA/CorDA/LoRA-GA subtract the initial low-rank part, LoftQ quantizes). PEFT can convert
# such adapters to plain ones: save_pretrained(..., path_initial_model_for_weight_conversion=...).
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga", "kasa")
# init_lora_weights values that only decide the starting point of training: the trained factors are plain LoRA.
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")

# Options of PEFT's LoraConfig that change what the adapter computes (or what it stores) and that jlora does
# not implement: option -> (value(s) that are fine, why).
_UNSUPPORTED = {
    "bias": (("none", None), "trained biases (bias='all' or 'lora_only')"),
    "lora_bias": ((False, None), "a bias on lora_B"),
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


def _check_supported(pconf: dict, where: str = CONFIG_NAME) -> None:
    """Raises ValueError naming the first option of a PEFT config that jlora cannot reproduce exactly."""
    if not isinstance(pconf, dict):
        _fail(where, f"expected a JSON object, got {type(pconf).__name__}")
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


def _names(x):
    if isinstance(x, (list, tuple, set)):
        return tuple(sorted(x)) or None
    return x


def _lcfg(pconf: dict, init, config_cls=LoraConfig) -> LoraConfig:
    targets = _names(pconf.get("target_modules"))
    layers = pconf.get("layers_to_transform")
    if layers is not None and not isinstance(layers, int):
        layers = tuple(layers) or None
    lp = pconf.get("layers_pattern")
    lp = (tuple(lp) or None) if isinstance(lp, (list, tuple)) else (lp or None)
    return config_cls(exclude_modules=_names(pconf.get("exclude_modules")),
                      layers_pattern=lp if layers is not None else None,
                      modules_to_save=_names(pconf.get("modules_to_save")),
                      r=int(pconf.get("r", 8)), alpha=float(pconf.get("lora_alpha", 8)), target_modules=targets,
                      use_rslora=bool(pconf.get("use_rslora", False)),
                      rank_pattern=dict(pconf.get("rank_pattern") or {}),
                      alpha_pattern={k: float(v) for k, v in (pconf.get("alpha_pattern") or {}).items()},
                      dropout=float(pconf.get("lora_dropout", 0.0) or 0.0), init=init, layers_to_transform=layers)


def lora_config_from_peft(pconf: dict, where: str = CONFIG_NAME, config_cls=LoraConfig) -> LoraConfig:
    """The `jlora.LoraConfig` equivalent to a PEFT ``adapter_config.json`` (as a dict).

    Args:
      pconf: the parsed ``adapter_config.json``.

    Returns:
      a `LoraConfig` with the same targets, ranks, alphas (patterns included), rsLoRA switch, dropout, layers
      and init.

    Raises:
      ValueError naming the option, for options jlora does not implement (biases, inits that rewrite the base or
      that jlora has no equivalent for, ...), or for a DoRA config (use `jlora.convert.peft.config_from_peft`).

    Example:
      >>> lcfg = lora_config_from_peft({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]})
      >>> (lcfg.r, lcfg.alpha, lcfg.target_modules)
      (4, 8.0, ('q_proj',))
    """
    _check_supported(pconf, where)
    wants_dora = {f.name: f.default for f in dataclasses.fields(config_cls)}["use_dora"]
    if bool(pconf.get("use_dora")) != bool(wants_dora):
        _fail(where, "use_dora=true: this is a DoRA adapter (load it as one: jlora.load_adapter or "
                     "jlora.convert.peft.config_from_peft), not plain LoRA" if pconf.get("use_dora") else
              "use_dora is not set: this is a plain LoRA adapter")
    init = pconf.get("init_lora_weights", True)
    if init not in (True, False, "gaussian"):
        # EVA / orthogonal only choose where training starts: the trained factors are plain LoRA, and jlora
        # continues from the file's factors with its default init recorded.
        init = True
    try:
        return _lcfg(pconf, init, config_cls)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def _peft_selected(pconf: dict, modules) -> set:
    """The linear modules (names) PEFT adapts under the targeting fields of ``pconf`` (the shared rule,
    `jlora.peft.base.TargetRules.selects`)."""
    rules = LoraConfig(target_modules=_names(pconf.get("target_modules")),
                       layers_to_transform=pconf.get("layers_to_transform"),
                       layers_pattern=pconf.get("layers_pattern") if pconf.get("layers_to_transform") is not None
                       else None, exclude_modules=_names(pconf.get("exclude_modules")))
    return {n for n in modules if rules.selects(n)}


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
    idx = [T.layer_index(n) for n in names]
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
              "layers_to_transform": layers, "layers_pattern": None, "exclude_modules": None, "rank_pattern": _compact_pattern(ranks, r),
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
    selected = set(lcfg.select(params, cfg.arch))
    targets = targets if isinstance(targets, str) else sorted(targets)
    layers = list(layers) if layers is not None else None
    lp = lcfg.layers_pattern
    lp = list(lp) if isinstance(lp, tuple) else lp
    excl = lcfg.exclude_modules
    excl = sorted(excl) if isinstance(excl, tuple) else excl
    rules = {"target_modules": targets, "layers_to_transform": layers, "layers_pattern": lp,
             "exclude_modules": excl}
    if _peft_selected(rules, T.linear_modules(params)) != selected:  # cannot happen: one rule; kept as a guard
        rules = {"target_modules": sorted(selected, key=T.natural_key), "layers_to_transform": None,
                 "layers_pattern": None, "exclude_modules": None}
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
    return {"r": lcfg.r, "lora_alpha": _number(float(lcfg.alpha)), "use_rslora": lcfg.use_rslora, **rules,
            "rank_pattern": dict(lcfg.rank_pattern),
            "alpha_pattern": {k: _number(float(v)) for k, v in lcfg.alpha_pattern.items()},
            "lora_dropout": float(lcfg.dropout), "init_lora_weights": True if init == "default" else init}


def config_fields(cfg: ModelConfig, params, ads: Dict[str, Any], lcfg: Optional[LoraConfig]) -> dict:
    """The ``adapter_config.json`` fields of LoRA-family wrappers ``ads`` (LoRA or DoRA): from ``lcfg`` when given
    (keeping its spelling), else derived from the wrappers (rank from ``a``, alpha from the scale)."""
    # With lcfg.init == "pissa" the config says init_lora_weights="pissa" (the base of such a tree is the residual
    # W - scale * A0 @ B0, which PEFT recomputes from the original base on load); derived configs say True.
    fields = _derive_config(params, ads) if lcfg is None else _config_from_lcfg(cfg, params, ads, lcfg)
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "inference_mode": True, "bias": "none",
            "fan_in_fan_out": cfg.arch == "gpt2", "use_dora": False, "layers_pattern": None, **fields}


class LoraCodec:
    """`jlora.convert.peft`'s codec for plain LoRA (see the module docstring for the format)."""

    peft_type = "LORA"
    config_cls = LoraConfig

    def config_from_peft(self, pconf: dict, where: str) -> LoraConfig:
        return lora_config_from_peft(pconf, where, self.config_cls)

    def config_to_peft(self, cfg: ModelConfig, params, mcfg: Optional[LoraConfig]) -> dict:
        if mcfg is not None and mcfg.use_dora:
            _fail("save_adapter", "mcfg has use_dora=True but params holds plain LoRA kernels (a DoRA config "
                                  "does not describe them)")
        ads = adapters(params)
        if not ads:
            _fail("save_adapter", "params has no LoRA adapter (wrap it with jlora.lora.init or load_adapter first)")
        return config_fields(cfg, params, ads, mcfg)

    def tensors_to_peft(self, cfg: ModelConfig, params, dtype):
        tensors, slices_meta = {}, {}
        for name, ad in adapters(params).items():
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
            tensors[f"{name}.lora_A.weight"] = np.ascontiguousarray(a.T)
            tensors[f"{name}.lora_B.weight"] = np.ascontiguousarray(b.T)
        metadata = {_SLICES_META: json.dumps(slices_meta, sort_keys=True)} if slices_meta else None
        return tensors, metadata

    def tensors_from_peft(self, cfg: ModelConfig, base_params, pconf: dict, mcfg: LoraConfig, src, where: str,
                          dtype=jnp.float32):
        factors, scales, dropout = read_factors(cfg, base_params, pconf, mcfg, src, where, extra=())
        try:
            slices_meta = json.loads(src.metadata.get(_SLICES_META, "{}"))
        except json.JSONDecodeError:
            slices_meta = {}
        new = {}
        for module, (a, b, _) in factors.items():
            kernel = T.get_module(base_params, module)["kernel"]
            slices = _restore_slices(slices_meta.get(module), b, kernel.shape[-1])
            if slices is not None:
                b = np.concatenate([b[:, s:e] for s, e in slices], axis=1)
            new[module] = LoRA(base=kernel, a=_to_jax(a, dtype), b=_to_jax(b, dtype), scale=scales[module],
                               slices=slices, dropout=dropout)
        return T.replace_modules(base_params, new)


LORA_CODEC = LoraCodec()


def _key_problem(key: str) -> str:
    """Why a tensor name is not a plain LoRA factor (for the error message)."""
    if "lora_magnitude_vector" in key:
        return ("a DoRA magnitude vector, but use_dora is not true in adapter_config.json (or the key is not "
                "PEFT's <module>.lora_magnitude_vector)")
    if "lora_embedding_" in key:
        return "LoRA on an embedding layer, which jlora does not support"
    if re.search(r"\.lora_[AB]\.bias$", key):
        return "a bias on a LoRA factor (lora_bias is not supported)"
    if "modules_to_save" in key:
        return "a fully trained module that adapter_config.json's modules_to_save does not name"
    if "trainable_tokens" in key:
        return "trainable token embeddings (not supported)"
    if key.endswith(".bias"):
        return "a trained bias (bias='all'/'lora_only' is not supported)"
    return "not a LoRA factor (expected <module>.lora_A.weight or <module>.lora_B.weight)"


def read_factors(cfg: ModelConfig, base_params, pconf: dict, mcfg: LoraConfig, src, where: str,
                 extra: Sequence[str] = ()):
    """The LoRA factors of a PEFT LORA file, checked strictly against the base and the config.

    Args:
      extra: per-module tensor suffixes besides the factors that every adapted module must have (DoRA:
        ``("lora_magnitude_vector",)``); they are returned unread, by key.

    Returns:
      ``({module: (a [in, r], b [r, out], {suffix: key})}, {module: scale}, dropout)`` as numpy arrays.
    """
    modules = T.linear_modules(base_params)
    factors: Dict[str, Dict[str, str]] = collections.defaultdict(dict)
    base_copies = {}
    extra_re = [(sfx, re.compile(rf"^(?P<module>.+)\.{re.escape(sfx)}$")) for sfx in extra]
    for key in sorted(src.keys(), key=lambda k: BASE_COPY_RE.match(k) is not None):  # LoRA problems first
        m = _KEY_RE.match(key) or BASE_COPY_RE.match(key)
        factor = m.group("factor") if m is not None and "factor" in m.groupdict() else None
        if m is None:
            for sfx, rx in extra_re:
                m = rx.match(key)
                if m is not None:
                    factor = sfx
                    break
        if m is None:
            _fail(where, f"tensor {src.original(key)} is {_key_problem(key)}")
        module = m.group("module")
        if factor is None and module in modules:
            base_copies[module] = key
            continue
        if module not in modules:
            other = ("llama" if module.startswith("model.layers.") else
                     "gpt2" if module.startswith("transformer.h.") else None)
            hint = (f"; it looks like an adapter for a {other}-family model" if other and other != cfg.arch
                    else "; jlora ties this model's output head to the embedding, and LoRA on a tied head is not "
                         "supported" if module.split(".")[-1] == "lm_head" and cfg.tie_embeddings
                    else "; the adapter was made for another model")
            _fail(where, f"tensor {src.original(key)} maps to no linear layer of this {cfg.arch} model (module "
                         f"{module!r} does not exist){hint}")
        B.check_free(module, modules[module], "load_adapter")
        factors[module][factor] = key

    for module, key in base_copies.items():
        check_base_copy(src, where, key, module, modules[module], cfg)
    if pconf.get("target_modules") is None:
        selected = set(factors)  # no targets recorded: the tensors say which modules are adapted
    else:
        selected = {n for n in modules if mcfg.selects(n, cfg.arch)}

    out, scales = {}, {}
    for module in sorted(factors, key=T.natural_key):
        keys = factors[module]
        if module not in selected:
            _fail(where, f"tensor {src.original(next(iter(keys.values())))} is for {module}, which "
                         f"{CONFIG_NAME}'s target_modules/layers_to_transform/exclude_modules do not select")
        for need in ("A", "B") + tuple(extra):
            if need not in keys:
                have = next(iter(keys.values()))
                what = f"lora_{need}.weight" if need in ("A", "B") else need
                _fail(where, f"tensor {src.original(have)} has no matching {what} ({module}.{what} is missing)")
        kernel = modules[module]
        d_in, d_out = kernel.shape
        r, _, scale = mcfg.rank_alpha_scale(module)
        for factor, expected in (("A", (r, d_in)), ("B", (d_out, r))):
            found = src.shape(keys[factor])
            if tuple(found) != expected:
                _fail(where, f"tensor {src.original(keys[factor])} has shape {tuple(found)}, expected {expected} "
                             f"(r={r} from {CONFIG_NAME}, module {module} is {d_in} -> {d_out}); the adapter does "
                             f"not fit this model")
        a = src.get(keys["A"])
        b = src.get(keys["B"])
        for k, arr in ((keys["A"], a), (keys["B"], b)):
            if not (np.issubdtype(arr.dtype, np.floating) or arr.dtype == ml_dtypes.bfloat16):
                _fail(where, f"tensor {src.original(k)} has non-float dtype {arr.dtype}")
        out[module] = (np.asarray(a).T, np.asarray(b).T, {sfx: keys[sfx] for sfx in extra})
        scales[module] = scale

    missing = sorted(selected - set(factors), key=T.natural_key)
    if missing:
        more = f" (and {len(missing) - 1} more modules)" if len(missing) > 1 else ""
        _fail(where, f"{CONFIG_NAME} selects {missing[0]}{more} but the file has no lora_A/lora_B for it")
    if not out:
        _fail(where, "the file holds no LoRA tensors")
    return out, scales, float(mcfg.dropout)


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
