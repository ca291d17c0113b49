"""The (IA)^3 codec for PEFT files: ``peft_type: IA3`` adapters, both ways.

The tensors, as PEFT (0.21) writes and reads them (checked against a real PEFT adapter on ``nn.Linear`` and GPT-2
``Conv1D`` modules): one per adapted module ``M``, ``M.ia3_l``, shaped ``[out, 1]`` for a module that scales its
output and ``[1, in]`` for a feed-forward module (which scales its input). jlora's vector is the same numbers,
flat: ``[out]`` or ``[in]``. ``fan_in_fan_out`` only concerns the base weight (PEFT sets it per layer type
anyway), so Linear and Conv1D store the same shapes.

``adapter_config.json``: ``target_modules``, ``feedforward_modules``, ``exclude_modules``, ``modules_to_save``,
``init_ia3_weights``. PEFT's `IA3Config` has no ``layers_to_transform``/``layers_pattern``: a jlora adapter
restricted to some layers is written with its modules listed by name (which PEFT matches exactly, whatever the
layer), and a file that carries those options is refused (PEFT would ignore them with a warning).

PEFT refuses, on loading, a config whose ``feedforward_modules`` list is not a subset of its ``target_modules``
list, yet writes one itself whenever ``target_modules`` was given without ``feedforward_modules`` (it fills in the
architecture's default feed-forward modules, e.g. ``["down_proj"]`` beside ``["q_proj", "v_proj"]``). jlora
loads such files with the meaning PEFT gave them when it trained (a target is feed-forward when its name ends
with an entry), and never writes one: `IA3Codec.config_to_peft` chooses a ``feedforward_modules`` that PEFT
accepts and that gives every module its own kind.

Strict, unlike PEFT: a selected module without its vector, a vector for a module the config does not select (or
that does not exist), a wrong shape, or an option jlora cannot honour is a ValueError that names it.
"""

from __future__ import annotations

import re
from typing import Dict, List, Optional

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
from jlora.peft.ia3 import IA3, IA3Config, adapters

CONFIG_NAME = "adapter_config.json"
SUFFIX = "ia3_l"
_KEY_RE = re.compile(rf"^(?P<module>.+)\.{SUFFIX}$")
# PEFT also stores a copy of the base weight of an adapted output/embedding layer (save_embedding_layers, e.g. when
# lm_head is a target), in case the vocabulary was resized: accepted only if it is the base jlora loads onto.

# The fields of PEFT's IA3Config (0.21) and of the PeftConfig base that carry no meaning for the computation, plus
# what the generic part writes. Anything else with a value is refused.
_BOOKKEEPING = ("peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
                "inference_mode", "ensure_weight_tying")
_HONOURED = ("target_modules", "feedforward_modules", "exclude_modules", "modules_to_save", "init_ia3_weights",
             "fan_in_fan_out")
_NOT_IN_PEFT_IA3 = ("layers_to_transform", "layers_pattern")


def _names(x, option: str, where: str):
    """A list/set field as a sorted tuple (PEFT stores sets), a string as is, None as None."""
    if x is None or isinstance(x, str):
        return x
    if isinstance(x, (list, tuple, set)):
        if not all(isinstance(e, str) for e in x):
            _fail(where, f"{option}={x!r} is not supported: expected a list of module names or a regex string")
        return tuple(sorted(set(x)))
    _fail(where, f"{option}={x!r} is not supported: expected a list of module names or a regex string")


def _targeted_suffix_regex(targets, entries) -> str:
    """A regex (for fullmatch) with PEFT's feed-forward meaning of the list ``entries`` beside the list
    ``targets``: a name that ``targets`` names (exactly or as a dotted suffix) and that ends with an entry."""
    alt = lambda xs: "|".join(re.escape(x) for x in xs)  # noqa: E731
    return rf"(?=(?:.*\.)?(?:{alt(targets)})\Z).*(?:{alt(entries)})"


def _ff_of(ff, name: str) -> bool:
    """PEFT's feed-forward rule for an explicit ``feedforward_modules`` value."""
    if isinstance(ff, str):
        return re.fullmatch(ff, name) is not None
    return any(name.endswith(e) for e in ff)


def _peft_selected(targets, exclude, modules_to_save, modules) -> set:
    """The linear modules PEFT's IA3 adapts under these fields (the shared rule; IA3 has no layer options)."""
    rules = IA3Config(target_modules=targets, exclude_modules=exclude, modules_to_save=modules_to_save,
                      feedforward_modules=())
    return {n for n in modules if rules.selects(n)}


def _derive_targets(modules, names: List[str], modules_to_save=None):
    """Short dotted suffixes that select exactly ``names`` under PEFT's list rule (else the names): for each
    module the shortest suffix that selects no module outside ``names``."""
    wanted = set(names)
    suffixes = set()
    for n in names:
        parts = n.split(".")
        for k in range(1, len(parts) + 1):
            sfx = ".".join(parts[-k:])
            if _peft_selected((sfx,), None, modules_to_save, modules) <= wanted:
                suffixes.add(sfx)
                break
    suffixes = tuple(sorted(suffixes))
    if _peft_selected(suffixes, None, modules_to_save, modules) == wanted:
        return suffixes
    return tuple(sorted(names, key=T.natural_key))


def _choose_feedforward(targets, ads: Dict[str, IA3], preferred=None):
    """A ``feedforward_modules`` value PEFT accepts beside ``targets`` (a subset when both are lists) that marks
    exactly the feed-forward wrappers in ``ads``; None when only listing the modules by name can do it."""
    want = {n: ad.feedforward for n, ad in ads.items()}

    def exact(ff):
        return all(_ff_of(ff, n) == f for n, f in want.items())

    if isinstance(targets, tuple):  # PEFT's list form, a subset of the targets
        if isinstance(preferred, tuple) and set(preferred) <= set(targets) and exact(preferred):
            return preferred
        # the target entries whose every module is feed-forward
        ff = tuple(t for t in targets if all(want[n] for n in want if n.endswith(t)))
        return ff if exact(ff) else None  # (a str preferred here is replaced by the equivalent list)
    if preferred is not None and exact(preferred):
        return preferred
    ff = tuple(sorted((n for n, f in want.items() if f), key=T.natural_key))
    return ff if exact(ff) else None


class IA3Codec:
    """`jlora.convert.peft`'s codec for (IA)^3 (see the module docstring for the format)."""

    peft_type = "IA3"
    config_cls = IA3Config

    def config_from_peft(self, pconf: dict, where: str) -> IA3Config:
        """The `IA3Config` of a PEFT ``adapter_config.json`` (as a dict); options jlora cannot honour are a
        ValueError naming them.

        Example:
          >>> IA3_CODEC.config_from_peft({"peft_type": "IA3", "target_modules": ["k_proj", "down_proj"],
          ...                             "feedforward_modules": ["down_proj"]}, "adapter_config.json").target_modules
          ('down_proj', 'k_proj')
        """
        if not isinstance(pconf, dict):
            _fail(where, f"expected a JSON object, got {type(pconf).__name__}")
        if str(pconf.get("peft_type", "")).upper() != "IA3":
            _fail(where, f"peft_type {pconf.get('peft_type')!r} is not an (IA)^3 adapter (peft_type 'IA3')")
        for option, value in pconf.items():
            if option in _BOOKKEEPING or option in _HONOURED or value is None:
                continue
            if option in _NOT_IN_PEFT_IA3:
                _fail(where, f"{option}={value!r} is not supported: PEFT's IA3Config has no {option} (PEFT ignores "
                             f"it with a warning and adapts every layer), so this file does not say which layers "
                             f"were adapted; list the target modules by name instead")
            _fail(where, f"{option}={value!r} is not supported: it is not an option of PEFT's IA3Config, and jlora "
                         f"does not know what it changes")
        for option in ("init_ia3_weights", "fan_in_fan_out", "inference_mode"):
            value = pconf.get(option)
            if value is not None and not isinstance(value, bool):
                _fail(where, f"{option}={value!r} is not supported: expected true or false")
        targets = _names(pconf.get("target_modules"), "target_modules", where)
        ff = _names(pconf.get("feedforward_modules"), "feedforward_modules", where)
        if isinstance(ff, tuple) and isinstance(targets, tuple) and not set(ff) <= set(targets):
            # PEFT writes this itself (default feed-forward modules beside explicit targets) but refuses to load
            # it; the same rule as a regex keeps PEFT's training-time meaning and passes the subset check.
            ff = _targeted_suffix_regex(targets, ff)
        mts = pconf.get("modules_to_save")
        if mts is not None and not (isinstance(mts, (list, tuple)) and all(isinstance(m, str) for m in mts)):
            _fail(where, f"modules_to_save={mts!r} is not supported: expected a list of module names")
        try:
            return IA3Config(target_modules=targets, feedforward_modules=ff,
                             exclude_modules=_names(pconf.get("exclude_modules"), "exclude_modules", where),
                             modules_to_save=tuple(mts) if mts else None,
                             init_ia3_weights=bool(pconf.get("init_ia3_weights", True)))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None

    def config_to_peft(self, cfg: ModelConfig, params, mcfg: Optional[IA3Config]) -> dict:
        """The ``adapter_config.json`` of the (IA)^3 wrappers in ``params``: from ``mcfg`` when given (keeping its
        spelling where PEFT reads it the same way), else derived from the wrappers."""
        ads = adapters(params)
        if not ads:
            _fail("save_adapter", "params has no IA3 adapter (wrap it with jlora.peft.ia3.init or load_adapter "
                                  "first)")
        names = sorted(ads, key=T.natural_key)
        modules = T.linear_modules(params)
        exclude = mts = None
        preferred = None
        if mcfg is not None:
            selected = {n for n in modules if mcfg.selects(n, cfg.arch)}
            if selected != set(ads):
                extra = sorted(selected - set(ads), key=T.natural_key) or sorted(set(ads) - selected)
                why = "selected by mcfg but has no IA3" if extra[0] in selected else "adapted but not selected by mcfg"
                _fail("save_adapter", f"mcfg does not describe the adapters in params: {extra[0]} is {why} (omit "
                                      f"mcfg to derive the config from the wrappers)")
            for n in names:
                if mcfg.is_feedforward(n, cfg.arch) != ads[n].feedforward:
                    kind = "feed-forward" if ads[n].feedforward else "not feed-forward"
                    _fail("save_adapter", f"mcfg does not describe the adapters in params: {n} is {kind} in params, "
                                          f"mcfg.feedforward_modules says otherwise (omit mcfg to derive the config "
                                          f"from the wrappers)")
            targets = mcfg.targets_for(cfg)
            exclude, mts = mcfg.exclude_modules, mcfg.modules_to_save
            preferred = mcfg.feedforward_for_arch(cfg.arch)
            if mcfg.layers() is not None or _peft_selected(targets, exclude, mts, modules) != set(ads):
                # PEFT's IA3 has no layers_to_transform (or reads these targets differently): list the modules
                targets, exclude = tuple(names), None
        else:
            from jlora.peft.saved import saved_modules

            mts = tuple(sorted({n.rsplit(".", 1)[0] for n in saved_modules(params)}, key=T.natural_key)) or None
            targets = _derive_targets(modules, names, mts)
        ff = _choose_feedforward(targets, ads, preferred)
        if ff is None:  # always possible: every module by name, the feed-forward ones among them
            targets, exclude = tuple(names), None
            ff = _choose_feedforward(targets, ads)
        assert _peft_selected(targets, exclude, mts, modules) == set(ads) and ff is not None
        listed = lambda x: list(x) if isinstance(x, tuple) else x  # noqa: E731
        return {"peft_type": "IA3", "task_type": "CAUSAL_LM", "inference_mode": True,
                "fan_in_fan_out": cfg.arch == "gpt2", "target_modules": listed(targets),
                "feedforward_modules": listed(ff), "exclude_modules": listed(exclude),
                "modules_to_save": listed(mts),
                "init_ia3_weights": True if mcfg is None else mcfg.init_ia3_weights}

    def tensors_to_peft(self, cfg: ModelConfig, params, dtype) -> Dict[str, np.ndarray]:
        """``{"<module>.ia3_l": [1, in] (feed-forward) or [out, 1]}`` for every (IA)^3 wrapper."""
        out = {}
        for name, ad in adapters(params).items():
            v = _to_numpy(ad.scale, dtype)
            out[f"{name}.{SUFFIX}"] = np.ascontiguousarray(v.reshape((1, -1) if ad.feedforward else (-1, 1)))
        return out

    def tensors_from_peft(self, cfg: ModelConfig, base_params, pconf: dict, mcfg: IA3Config, src, where: str,
                          dtype=jnp.float32):
        """The base tree with `IA3` kernels at the adapted modules (vectors in ``dtype``; None keeps the file's)."""
        modules = T.linear_modules(base_params)
        keys = {}
        for key in sorted(src.keys()):
            base_copy = BASE_COPY_RE.match(key)
            if base_copy is not None and base_copy.group("module") in modules:
                check_base_copy(src, where, key, base_copy.group("module"), modules[base_copy.group("module")],
                                    cfg)
                continue
            m = _KEY_RE.match(key)
            if m is None:
                _fail(where, f"tensor {src.original(key)} is not an (IA)^3 vector (expected <module>.{SUFFIX})")
            module = m.group("module")
            if module not in modules:
                hint = ("; jlora ties this model's output head to the embedding" if module.split(".")[-1] ==
                        "lm_head" and cfg.tie_embeddings else "; the adapter was made for another model")
                _fail(where, f"tensor {src.original(key)} maps to no linear layer of this {cfg.arch} model (module "
                             f"{module!r} does not exist){hint}")
            keys[module] = key
        selected = [n for n in sorted(modules, key=T.natural_key) if mcfg.selects(n, cfg.arch)]
        for module in sorted(keys, key=T.natural_key):
            if module not in selected:
                _fail(where, f"tensor {src.original(keys[module])} is for {module}, which {CONFIG_NAME}'s "
                             f"target_modules/exclude_modules/modules_to_save do not select")
        missing = [n for n in selected if n not in keys]
        if missing:
            more = f" (and {len(missing) - 1} more modules)" if len(missing) > 1 else ""
            _fail(where, f"{CONFIG_NAME} selects {missing[0]}{more} but the file has no {SUFFIX} for it")
        if not selected:
            _fail(where, f"{CONFIG_NAME}'s target_modules {mcfg.targets_for(cfg)!r} select no linear layer of this "
                         f"{cfg.arch} model")
        new = {}
        for module in selected:
            kernel, key = modules[module], keys[module]
            B.check_free(module, kernel, "load_adapter")
            ff = mcfg.is_feedforward(module, cfg.arch)
            d_in, d_out = kernel.shape
            expected = (1, d_in) if ff else (d_out, 1)
            found = tuple(src.shape(key))
            if found != expected:
                what = (f"feed-forward: one scale per input feature of {module}, which is {d_in} -> {d_out}" if ff
                        else f"one scale per output feature of {module}, which is {d_in} -> {d_out}")
                other = (d_out, 1) if ff else (1, d_in)
                hint = (f"; that is the shape of a {'non-' if ff else ''}feed-forward vector: does "
                        f"feedforward_modules match the file?" if found == other else "")
                _fail(where, f"tensor {src.original(key)} has shape {found}, expected {expected} ({what}){hint}")
            v = src.get(key)
            if not (np.issubdtype(v.dtype, np.floating) or v.dtype == ml_dtypes.bfloat16):
                _fail(where, f"tensor {src.original(key)} has non-float dtype {v.dtype}")
            new[module] = IA3(base=kernel, scale=_to_jax(np.asarray(v).reshape(-1), dtype), feedforward=ff)
        return T.replace_modules(base_params, new)


IA3_CODEC = IA3Codec()
