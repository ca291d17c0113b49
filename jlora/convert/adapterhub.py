"""AdapterHub adapter directories (the ``adapters`` library, 1.3.0) <-> jlora bottleneck adapters, both ways.

What ``model.save_adapter(dir, name)`` writes, and what this module reads and writes:

* ``adapter_config.json``: ``{"config": {<every BnConfig field>}, "hidden_size", "model_class", "model_name",
  "model_type", "name", "version"}`` (``json.dump(..., indent=2, sort_keys=True)``). jlora writes every field of
  AdapterHub's ``BnConfig`` with the value it means (the PHM and invertible-adapter fields at AdapterHub's
  defaults) and ``"version": "adapters.1.3.0"``, the format it mirrors (without a version AdapterHub would
  rename the activation as for pre-v2 files: ``gelu`` -> ``gelu_new``; jlora does the same when reading one).
* the weights, ``pytorch_adapter.bin`` (``torch.save``, AdapterHub's default) or ``adapter.safetensors``
  (``use_safetensors=True``), under the model's module names:
  ``<transformer.h|model.layers>.<i>.<attention_adapters|output_adapters>.adapters.<name>.<param>`` with
  ``<param>`` one of ``adapter_down.0.{weight,bias}`` (the down projection, torch's ``[r, d]``; with ``ln_before``
  ``adapter_down.0`` is that LayerNorm and the projection is ``adapter_down.1``; the same LayerNorm is also a
  module of its own, so its tensors appear a second time as ``adapter_norm_before.{weight,bias}`` -- which is why
  AdapterHub cannot save such an adapter with safetensors; jlora writes both names, and reads the second copy
  only to check it is the same), ``adapter_up.{weight,bias}``
  (``[d, r]``), ``adapter_norm_after.{weight,bias}`` (``ln_after``) and ``scaling`` (``"learned"``: ``[1]``,
  ``"channel"``: ``[d]``). ``attention_adapters`` is jlora's ``attn_out`` site, ``output_adapters`` its
  ``mlp_out``.
* with the default ``with_head=True`` AdapterHub also writes the model's head (``head_config.json`` +
  ``pytorch_model_head.bin``/``model_head.safetensors``: ``lm_head.weight`` of a plain HF LM). jlora accepts it
  only as a copy of the base's own head (it never takes base weights from an adapter file) and writes none.

jlora writes ``adapter.safetensors`` (never pickle): AdapterHub loads it with
``model.load_adapter(dir, use_safetensors=True)``. It reads ``adapter.safetensors``, else ``pytorch_adapter.bin``
through a restricted reader that executes no code (`jlora.convert.torchzip`).

Strict both ways: a config of another AdapterHub method (LoRA, prefix tuning, ...), an option jlora lacks, a
model type or hidden size that is not the model's, a tensor for a layer the model does not have (or one missing
for a layer it has), a wrong shape, or any tensor left unused is a ValueError naming the file, the key, what was
expected and what was found.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from typing import Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from jlora.config import ModelConfig
from jlora.peft import bottleneck as BN

CONFIG_NAME = "adapter_config.json"
SAFE_WEIGHTS_NAME = "adapter.safetensors"
WEIGHTS_NAME = "pytorch_adapter.bin"
HEAD_CONFIG_NAME = "head_config.json"
HEAD_WEIGHTS_NAME = "pytorch_model_head.bin"
SAFE_HEAD_WEIGHTS_NAME = "model_head.safetensors"
VERSION = "adapters.1.3.0"

MODEL_CLASS = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}
MODEL_TYPES = {"gpt2": ("gpt2",), "llama": ("llama", "mistral")}  # same block wiring in adapters
LOCATION = {"attn_out": "attention_adapters", "mlp_out": "output_adapters"}
SITE_OF = {v: k for k, v in LOCATION.items()}
ACTIVATION_RENAME = {"gelu": "gelu_new", "gelu_orig": "gelu"}  # AdapterHub's, for files without a version

# AdapterHub's BnConfig fields (1.3.0) that jlora's BnConfig carries, and the rest at their AdapterHub defaults
# (PHM and invertible-adapter options: they have no effect while phm_layer is false and inv_adapter is None).
SHARED_FIELDS = ("mh_adapter", "output_adapter", "reduction_factor", "non_linearity", "original_ln_before",
                 "original_ln_after", "ln_before", "ln_after", "init_weights", "init_weights_seed", "is_parallel",
                 "scaling", "use_gating", "residual_before_ln", "adapter_residual_before_ln", "inv_adapter",
                 "cross_adapter", "leave_out", "dropout", "phm_layer", "stochastic_depth")
INERT_FIELDS = {"inv_adapter_reduction_factor": None, "phm_dim": 4, "factorized_phm_W": True,
                "shared_W_phm": False, "shared_phm_rule": True, "factorized_phm_rule": False, "phm_c_init": "normal",
                "phm_init_range": 0.0001, "learn_phm": True, "hypercomplex_nonlinearity": "glorot-uniform",
                "phm_rank": 1, "phm_bias": True}
TOP_LEVEL = ("config", "hidden_size", "model_class", "model_name", "model_type", "name", "version", "config_id",
             "type")


def _fail(where: str, msg: str):
    raise ValueError(f"{where}: {msg}")


def detect(conf) -> bool:
    """Whether a parsed ``adapter_config.json`` is AdapterHub's (a ``"config"`` entry, no PEFT ``peft_type``).

    Example:
      >>> detect({"config": {"mh_adapter": False}, "name": "a", "version": "adapters.1.3.0"})
      True
      >>> detect({"peft_type": "LORA", "r": 8})
      False
    """
    return (isinstance(conf, dict) and "peft_type" not in conf and isinstance(conf.get("config"), (dict, str))
            and any(k in conf for k in ("version", "model_type", "name", "hidden_size")))


# ----------------------------------------------------------------------------------------------------------
# adapter_config.json <-> BnConfig


def _arch_name(arch) -> str:
    return {"lora": "LoRA", "prefix_tuning": "prefix tuning", "prompt_tuning": "prompt tuning", "union":
            "config union (e.g. MAM, UniPELT)", "reft": "ReFT", "mtl_lora": "MTL-LoRA"}.get(arch, repr(arch))


def config_from_file(conf: dict, where: str = CONFIG_NAME) -> BN.BnConfig:
    """The jlora `BnConfig` of a parsed AdapterHub ``adapter_config.json``.

    Raises:
      ValueError naming ``where`` and the key: another AdapterHub method (``config.architecture``), an unknown
      field, or an option jlora does not implement (e.g. ``phm_layer``, ``use_gating``, ``inv_adapter``).

    Example:
      >>> c = config_from_file({"config": "double_seq_bn", "name": "a", "version": "adapters.1.3.0"})
      >>> c.mh_adapter, c.non_linearity
      (True, 'swish')
    """
    if not detect(conf):
        _fail(where, "not an AdapterHub adapter_config.json (expected a 'config' entry and no 'peft_type')")
    unknown = sorted(set(conf) - set(TOP_LEVEL))
    if unknown:
        _fail(where, f"unknown key {unknown[0]!r} (AdapterHub's adapter_config.json has {', '.join(TOP_LEVEL[:7])})")
    c = conf["config"]
    if isinstance(c, str):
        if BN.ALIASES.get(c, c) not in BN.PRESETS:
            _fail(where, f"config {c!r} is not a bottleneck adapter jlora knows; known: "
                         f"{', '.join(list(BN.PRESETS) + list(BN.ALIASES))}")
        return BN.BnConfig(preset=c)
    arch = c.get("architecture")
    if arch is not None:
        _fail(where, f"config.architecture is {arch!r}: an AdapterHub {_arch_name(arch)} adapter, which jlora does "
                     f"not read; jlora reads AdapterHub's bottleneck adapters (seq_bn, double_seq_bn, par_bn, ...)")
    unknown = sorted(set(c) - set(SHARED_FIELDS) - set(INERT_FIELDS) - {"architecture"})
    if unknown:
        _fail(where, f"unknown option config.{unknown[0]}={c[unknown[0]]!r} (not a field of AdapterHub's BnConfig "
                     f"1.3.0)")
    missing = [k for k in ("mh_adapter", "output_adapter", "reduction_factor", "non_linearity") if k not in c]
    if missing:
        _fail(where, f"config has no {missing[0]!r} (a required field of AdapterHub's BnConfig)")
    fields = {k: c[k] for k in SHARED_FIELDS if k in c}
    if "version" not in conf and isinstance(fields["non_linearity"], str):
        fields["non_linearity"] = ACTIVATION_RENAME.get(fields["non_linearity"], fields["non_linearity"])
    if fields.get("leave_out") is None:
        fields["leave_out"] = ()
    # the fields AdapterHub's BnConfig gives defaults to, at those defaults (jlora's presets would differ)
    defaults = {"original_ln_before": False, "original_ln_after": True, "ln_before": False, "ln_after": False,
                "init_weights": "bert", "is_parallel": False, "scaling": 1.0, "residual_before_ln": True,
                "adapter_residual_before_ln": False}
    fields = {**defaults, **fields}
    for k in ("use_gating", "cross_adapter", "phm_layer"):
        fields.setdefault(k, False)
    for k in ("dropout", "stochastic_depth"):
        if fields.get(k) is None:
            fields[k] = 0.0
    try:
        return BN.BnConfig(preset=_preset_of(fields), **fields)
    except (TypeError, ValueError) as e:
        _fail(where, f"config: {e}")


def _preset_of(fields: dict) -> str:
    """The first AdapterHub preset whose values ``fields`` has (only a label: every field is explicit)."""
    for name, values in BN.PRESETS.items():
        if all(fields.get(k) == v for k, v in values.items()):
            return name
    return "seq_bn"


def config_to_file(bcfg: BN.BnConfig) -> dict:
    """The ``"config"`` entry AdapterHub writes for ``bcfg``: every BnConfig field of AdapterHub 1.3.0.

    Example:
      >>> d = config_to_file(BN.SeqBnConfig())
      >>> d["original_ln_before"], d["reduction_factor"], d["phm_dim"], len(d)
      (True, 16, 4, 33)
    """
    out = {k: getattr(bcfg, k) for k in SHARED_FIELDS}
    out["leave_out"] = list(bcfg.leave_out)
    out["reduction_factor"] = dict(bcfg.reduction_factor) if isinstance(bcfg.reduction_factor, dict) else \
        bcfg.reduction_factor
    out.update(INERT_FIELDS)
    return dict(sorted(out.items()))


# ----------------------------------------------------------------------------------------------------------
# Tensor names


def _names(cfg: ModelConfig) -> Tuple[str, str]:
    return ("transformer", "h") if cfg.arch == "gpt2" else ("model", "layers")


def _tensor_table(node: BN.Bottleneck) -> Dict[str, Tuple[Tuple[str, ...], bool]]:
    """{AdapterHub parameter name: (path of the array in the node, transpose)} for one adapter module."""
    k = "1" if node.norm_before is not None else "0"
    out = {f"adapter_down.{k}.weight": (("down",), True), f"adapter_down.{k}.bias": (("down_bias",), False),
           "adapter_up.weight": (("up",), True), "adapter_up.bias": (("up_bias",), False)}
    if node.norm_before is not None:
        out.update({"adapter_down.0.weight": (("norm_before", "scale"), False),
                    "adapter_down.0.bias": (("norm_before", "bias"), False)})
    if node.norm_after is not None:
        out.update({"adapter_norm_after.weight": (("norm_after", "scale"), False),
                    "adapter_norm_after.bias": (("norm_after", "bias"), False)})
    if node.scaling is not None:
        out["scaling"] = (("scaling",), False)
    return out


# The second name of the ln_before LayerNorm (registered twice in AdapterHub's Adapter module).
NORM_BEFORE_ALIASES = {"adapter_norm_before.weight": "adapter_down.0.weight",
                       "adapter_norm_before.bias": "adapter_down.0.bias"}


def _get(node, path):
    x = getattr(node, path[0])
    return x if len(path) == 1 else x[path[1]]


def _layer_site(name: str) -> Tuple[int, str]:
    """(layer, site) of a `jlora.peft.bottleneck.adapters` key ``<root>.<stack>.<i>.hooks.<site>``."""
    parts = name.split(".")
    return int(parts[2]), parts[4]


# ----------------------------------------------------------------------------------------------------------
# Saving


def _reduction_factor(d: int, r: int):
    """A reduction factor AdapterHub turns back into the bottleneck size ``r``: ``int(d // rf) == r``."""
    if d % r == 0:
        return d // r
    rf = d / r
    for _ in range(8):
        if int(d // rf) == r:
            return rf
        rf = float(np.nextafter(rf, 0.0))
    raise ValueError(f"no reduction_factor gives a bottleneck of {r} for hidden size {d}")


def config_from_nodes(cfg: ModelConfig, params) -> BN.BnConfig:
    """The `BnConfig` that describes the bottleneck adapters in ``params`` (what AdapterHub can express: one
    ``leave_out`` and one bottleneck size per layer for both sites, the same options everywhere).

    Example:
      >>> tuned = BN.init(key, cfg, params, BN.DoubleSeqBnConfig(reduction_factor=8, leave_out=[1]))
      >>> c = config_from_nodes(cfg, tuned)
      >>> c.mh_adapter, c.reduction_factor, c.leave_out, c.non_linearity
      (True, 8, (1,), 'swish')
    """
    nodes = BN.adapters(params)
    if not nodes:
        _fail("save_adapter", "params has no bottleneck adapter")
    by_layer: Dict[int, Dict[str, BN.Bottleneck]] = {}
    for name, node in nodes.items():
        i, site = _layer_site(name)
        by_layer.setdefault(i, {})[site] = node
    sites = sorted({s for per in by_layer.values() for s in per}, key=BN.SITES.index)
    for i, per in sorted(by_layer.items()):
        if sorted(per, key=BN.SITES.index) != sites:
            _fail("save_adapter", f"layer {i} has adapters at {sorted(per)} but other layers at {sites}; AdapterHub's "
                                  f"config adapts the same sublayers in every layer it does not leave out")
    first = next(iter(nodes.values()))
    d = cfg.d_model

    def statics(n: BN.Bottleneck):
        kind = None if n.scaling is None else ("learned" if n.scaling.shape == (1,) else "channel")
        return dict(non_linearity=n.non_linearity, original_ln_before=n.original_ln_before,
                    original_ln_after=n.original_ln_after, residual_before_ln=n.residual_before_ln,
                    adapter_residual_before_ln=n.adapter_residual_before_ln, is_parallel=n.is_parallel,
                    dropout=n.dropout, stochastic_depth=n.stochastic_depth,
                    scaling=n.const_scaling if kind is None else kind, ln_before=n.norm_before is not None,
                    ln_after=n.norm_after is not None)

    want = statics(first)
    for name, node in nodes.items():
        got = statics(node)
        diff = [k for k in want if got[k] != want[k]]
        if diff:
            _fail("save_adapter", f"{name} has {diff[0]}={got[diff[0]]!r} but {next(iter(nodes))} has "
                                  f"{want[diff[0]]!r}; an AdapterHub adapter has one value for all its modules")
    rfs = {}
    for i, per in sorted(by_layer.items()):
        ranks = {n.rank for n in per.values()}
        if len(ranks) > 1:
            _fail("save_adapter", f"layer {i} has bottlenecks of sizes {sorted(ranks)}; AdapterHub has one "
                                  f"reduction_factor per layer")
        rfs[i] = _reduction_factor(d, ranks.pop())
    common = Counter(rfs.values()).most_common(1)[0][0]
    rf = common if len(set(rfs.values())) == 1 else \
        {"default": common, **{str(i): v for i, v in rfs.items() if v != common}}
    leave_out = tuple(i for i in range(cfg.n_layers) if i not in by_layer)
    return BN.BnConfig(preset=_preset_of({**want, "mh_adapter": "attn_out" in sites,
                                          "output_adapter": "mlp_out" in sites}),
                       mh_adapter="attn_out" in sites, output_adapter="mlp_out" in sites, reduction_factor=rf,
                       leave_out=leave_out, init_weights="bert", dtype=str(jnp.dtype(first.down.dtype)), **want)


def _check_mcfg(cfg: ModelConfig, params, derived: BN.BnConfig, mcfg: BN.BnConfig) -> None:
    nodes = BN.adapters(params)
    name = type(mcfg).__name__
    if mcfg.layers(cfg.n_layers) != derived.layers(cfg.n_layers):
        _fail("save_adapter", f"mcfg does not describe the adapters in params: {name}.leave_out "
                              f"{list(mcfg.leave_out)} adapts layers {list(mcfg.layers(cfg.n_layers))}, params has "
                              f"adapters in layers {list(derived.layers(cfg.n_layers))}")
    for k in ("mh_adapter", "output_adapter", "is_parallel", "original_ln_after", "ln_before", "ln_after", "scaling",
              "dropout", "stochastic_depth") + (() if derived.is_parallel else (
              "original_ln_before", "residual_before_ln", "adapter_residual_before_ln")):
        a, b = getattr(mcfg, k), getattr(derived, k)
        if k == "residual_before_ln":
            a = a is True
        if a != b:
            _fail("save_adapter", f"mcfg does not describe the adapters in params: {name}.{k} is {a!r}, the nodes "
                                  f"have {b!r}")
    if mcfg.non_linearity.lower() != derived.non_linearity.lower():
        _fail("save_adapter", f"mcfg does not describe the adapters in params: {name}.non_linearity is "
                              f"{mcfg.non_linearity!r}, the nodes have {derived.non_linearity!r}")
    for key, node in nodes.items():
        i, _ = _layer_site(key)
        if mcfg.bottleneck_size(cfg.d_model, i) != node.rank:
            _fail("save_adapter", f"mcfg does not describe the adapters in params: {name}.reduction_factor "
                                  f"{mcfg.reduction_factor!r} gives layer {i} a bottleneck of "
                                  f"{mcfg.bottleneck_size(cfg.d_model, i)}, {key} has {node.rank}")


def _adapter_name(out_dir: str) -> str:
    base = os.path.basename(os.path.normpath(out_dir))
    return base if re.fullmatch(r"[A-Za-z0-9_\-]+", base or "") else "adapter"


def save(cfg: ModelConfig, params, out_dir, mcfg: Optional[BN.BnConfig] = None, *,
         base_model_name_or_path: Optional[str] = None, dtype=None, name: Optional[str] = None) -> None:
    """Writes the bottleneck adapters in ``params`` as an AdapterHub directory (``adapter_config.json`` +
    ``adapter.safetensors``); `jlora.save_adapter` calls it for a tree with bottleneck adapters.

    Args:
      cfg: model config.
      params: a tree with `jlora.peft.bottleneck` adapters (nothing else trained).
      out_dir: destination directory (written atomically as `jlora.save_adapter` does).
      mcfg: the `BnConfig` they were made with (optional; it must describe the nodes, and keeps its spelling,
        e.g. ``init_weights`` and a per-layer ``reduction_factor``). Default: derived from the nodes.
      base_model_name_or_path: written as ``model_name`` (default: ``cfg.name`` unless it is only a type name).
      dtype: storage dtype of the tensors (default: as they are).
      name: the adapter's name in AdapterHub (default: the directory's name if it is a plain word, else
        ``"adapter"``).

    Example:
      >>> tuned = BN.init(key, cfg, params, BN.SeqBnConfig())
      >>> save(cfg, tuned, f"{tmp}/sst2")
      >>> sorted(os.listdir(f"{tmp}/sst2")), json.load(open(f"{tmp}/sst2/adapter_config.json"))["name"]
      (['adapter.safetensors', 'adapter_config.json'], 'sst2')
    """
    from jlora.convert.peft import write_adapter_dir
    from jlora.peft.saved import saved_modules

    if saved_modules(params):
        _fail("save_adapter", f"params has modules_to_save ({', '.join(sorted(saved_modules(params)))}); an "
                              f"AdapterHub bottleneck adapter file carries only the adapters")
    out_dir = os.fspath(out_dir)
    derived = config_from_nodes(cfg, params)
    if mcfg is not None:
        if not isinstance(mcfg, BN.BnConfig):
            _fail("save_adapter", f"mcfg is a {type(mcfg).__name__} but params holds bottleneck adapters (BnConfig)")
        _check_mcfg(cfg, params, derived, mcfg)
        bcfg = mcfg
    else:
        bcfg = derived
    name = name or _adapter_name(out_dir)
    if base_model_name_or_path is None and cfg.name not in ("custom", "", "gpt2", "llama", "mistral", "qwen2"):
        base_model_name_or_path = cfg.name
    conf = {"config": config_to_file(bcfg), "hidden_size": cfg.d_model, "model_class": MODEL_CLASS[cfg.arch],
            "model_name": base_model_name_or_path or "", "model_type": cfg.arch, "name": name, "version": VERSION}
    root, stack = _names(cfg)
    tensors = {}
    from jlora.convert.peft import to_numpy

    for key, node in BN.adapters(params).items():
        i, site = _layer_site(key)
        prefix = f"{root}.{stack}.{i}.{LOCATION[site]}.adapters.{name}."
        for pname, (path, transpose) in _tensor_table(node).items():
            arr = to_numpy(_get(node, path), dtype)
            tensors[prefix + pname] = np.ascontiguousarray(arr.T if transpose else arr)
        if node.norm_before is not None:  # AdapterHub's state dict has the LayerNorm under both names
            for alias, pname in NORM_BEFORE_ALIASES.items():
                tensors[prefix + alias] = tensors[prefix + pname].copy()
    write_adapter_dir(out_dir, conf, tensors, weights_name=SAFE_WEIGHTS_NAME)
    stale = os.path.join(out_dir, WEIGHTS_NAME)
    if os.path.exists(stale):  # an older pickle beside the new file would be what adapters reads by default
        os.remove(stale)


# ----------------------------------------------------------------------------------------------------------
# Loading


def _read_tensors(path: str) -> Dict[str, np.ndarray]:
    if path.endswith(".safetensors"):
        from jlora.convert.stfile import SafetensorsFile

        st = SafetensorsFile(path)
        return {k: np.asarray(st.get(k)) for k in st.keys()}
    from jlora.convert.torchzip import load_torch_file

    return load_torch_file(path)


def _weights_file(adapter_dir: str, safe: str, pickled: str) -> Optional[str]:
    """The safetensors file if there is one, else the pickle, else None."""
    for fname in (safe, pickled):
        p = os.path.join(adapter_dir, fname)
        if os.path.exists(p):
            return p
    return None


def _check_head(cfg: ModelConfig, base_params, adapter_dir: str) -> None:
    """AdapterHub's saved head (``with_head=True``) is accepted only as a copy of the base's own head."""
    from jlora.kernels import materialize

    hconf_path = os.path.join(adapter_dir, HEAD_CONFIG_NAME)
    if os.path.exists(hconf_path):
        with open(hconf_path) as f:
            try:
                hconf = json.load(f)
            except json.JSONDecodeError as e:
                _fail(hconf_path, f"not valid JSON ({e})")
        if not isinstance(hconf, dict) or hconf.get("config") is not None:
            _fail(hconf_path, "the adapter carries a prediction head of AdapterHub's flex-head models "
                              f"(config {hconf.get('config') if isinstance(hconf, dict) else hconf!r}); jlora loads "
                              f"adapters onto the base model's own LM head and reads no other heads")
    wpath = _weights_file(adapter_dir, SAFE_HEAD_WEIGHTS_NAME, HEAD_WEIGHTS_NAME)
    if wpath is None:
        return
    tensors = _read_tensors(wpath)
    for key, arr in tensors.items():
        if key != "lm_head.weight":
            _fail(wpath, f"tensor {key} is not the LM head (lm_head.weight); jlora reads no prediction heads")
        if cfg.tie_embeddings:
            root = "transformer" if cfg.arch == "gpt2" else "model"
            emb = "wte" if cfg.arch == "gpt2" else "embed_tokens"
            want = np.asarray(jax.device_get(materialize(base_params[root][emb]["embedding"])), np.float32)
        else:
            want = np.asarray(jax.device_get(materialize(base_params["lm_head"]["kernel"])), np.float32).T
        got = np.asarray(arr, np.float32)
        if got.shape != want.shape:
            _fail(wpath, f"tensor {key} has shape {got.shape}, expected {want.shape} (the base's head); the adapter "
                         f"was saved with the head of another model")
        if not np.allclose(got, want, rtol=1e-3, atol=1e-6):
            _fail(wpath, f"tensor {key} differs from the base's LM head (max difference "
                         f"{np.abs(got - want).max():.3g}): the adapter carries a trained head, and jlora does not "
                         f"load base weights from adapter files")


_KEY_RE = re.compile(r"^(?P<stack>h|layers)\.(?P<layer>\d+)\.(?P<loc>attention_adapters|output_adapters)\.adapters\."
                     r"(?P<rest>.+)$")


def load(cfg: ModelConfig, base_params, adapter_dir, *, dtype=jnp.float32):
    """Loads an AdapterHub bottleneck adapter directory onto ``base_params`` (`jlora.load_adapter` calls it).

    Args:
      cfg: model config of the base.
      base_params: the base tree (no adapter yet).
      adapter_dir: a directory AdapterHub's ``save_adapter`` (or `save`) wrote.
      dtype: dtype of the loaded adapter arrays (float32 by default; None keeps the file's).

    Returns:
      the tree with `jlora.peft.bottleneck.Bottleneck` hooks where the file has adapters.

    Raises:
      ValueError naming the file and key (see the module docstring); FileNotFoundError without a weights file.

    Example:
      >>> save(cfg, BN.init(key, cfg, params, BN.DoubleSeqBnConfig()), f"{tmp}/houlsby")
      >>> loaded = load(cfg, params, f"{tmp}/houlsby")
      >>> sorted(loaded["model"]["layers"]["1"]["hooks"])
      ['attn_out', 'mlp_out']
    """
    adapter_dir = os.fspath(adapter_dir)
    cpath = os.path.join(adapter_dir, CONFIG_NAME)
    with open(cpath) as f:
        try:
            conf = json.load(f)
        except json.JSONDecodeError as e:
            _fail(cpath, f"not valid JSON ({e})")
    bcfg = config_from_file(conf, cpath)
    types = MODEL_TYPES[cfg.arch]
    if conf.get("model_type") is not None and conf["model_type"] not in types:
        _fail(cpath, f"model_type is {conf['model_type']!r}, expected {' or '.join(map(repr, types))} (the model is "
                     f"a {cfg.arch} model)")
    if conf.get("hidden_size") is not None and conf["hidden_size"] != cfg.d_model:
        _fail(cpath, f"hidden_size is {conf['hidden_size']!r}, expected {cfg.d_model} (the model's hidden size); "
                     f"the adapter was made for another model")
    name = conf.get("name")
    if not isinstance(name, str) or not name:
        _fail(cpath, f"name is {name!r}, expected the adapter's name (its tensors are named after it)")
    wpath = _weights_file(adapter_dir, SAFE_WEIGHTS_NAME, WEIGHTS_NAME)
    if wpath is None:
        raise FileNotFoundError(f"{adapter_dir}: no {SAFE_WEIGHTS_NAME} or {WEIGHTS_NAME}")
    src = _read_tensors(wpath)
    try:
        skeleton = BN.init(jax.random.key(0), cfg, base_params, bcfg)
    except ValueError as e:
        _fail(cpath, str(e))
    root, stack = _names(cfg)
    nodes = BN.adapters(skeleton)
    expected = {}  # file key -> (node key, path, transpose)
    aliases = {}  # file key of the ln_before LayerNorm's second copy -> the key it copies
    for key, node in nodes.items():
        i, site = _layer_site(key)
        prefix = f"{root}.{stack}.{i}.{LOCATION[site]}.adapters.{name}."
        for pname, (path, transpose) in _tensor_table(node).items():
            expected[prefix + pname] = (key, path, transpose)
        if node.norm_before is not None:
            aliases.update({prefix + a: prefix + p for a, p in NORM_BEFORE_ALIASES.items()})
    found = {}
    for fkey in src:
        # a file saved from the bare base model (GPT2Model, LlamaModel) has no "transformer."/"model." prefix
        k = fkey if fkey.startswith(root + ".") else f"{root}.{fkey}"
        if k in found:
            _fail(wpath, f"tensors {found[k]} and {fkey} are the same parameter; the file is ambiguous")
        found[k] = fkey
    for k, fkey in found.items():
        if k in expected:
            continue
        if k in aliases:
            if aliases[k] in found and not np.array_equal(np.asarray(src[fkey]), np.asarray(src[found[aliases[k]]])):
                _fail(wpath, f"tensor {fkey} differs from {found[aliases[k]]}; in AdapterHub they are the same "
                             f"LayerNorm (ln_before)")
            continue
        m = _KEY_RE.match(k[len(root) + 1:])
        if m is None or m["stack"] != stack:
            _fail(wpath, f"tensor {fkey} is not a bottleneck adapter tensor of a {cfg.arch} model (expected "
                         f"{root}.{stack}.<i>.<attention_adapters|output_adapters>.adapters.{name}.<param>)")
        i, site = int(m["layer"]), SITE_OF[m["loc"]]
        if i >= cfg.n_layers:
            _fail(wpath, f"tensor {fkey} is for layer {i}, but the model has {cfg.n_layers} layers (0..."
                         f"{cfg.n_layers - 1}); the adapter was made for a model with more layers")
        if not m["rest"].startswith(name + "."):
            _fail(wpath, f"tensor {fkey} does not belong to adapter {name!r} ({CONFIG_NAME}'s name)")
        if i in bcfg.leave_out or site not in bcfg.sites():
            _fail(wpath, f"tensor {fkey} is for {m['loc']} of layer {i}, which {CONFIG_NAME}'s config does not adapt "
                         f"(mh_adapter={bcfg.mh_adapter}, output_adapter={bcfg.output_adapter}, leave_out="
                         f"{list(bcfg.leave_out)})")
        _fail(wpath, f"tensor {fkey} is not a parameter of this adapter config (expected "
                     f"{', '.join(sorted(p for p in _tensor_table(nodes[f'{root}.{stack}.{i}.hooks.{site}'])))})")
    arrays: Dict[str, Dict] = {}
    for k, (key, path, transpose) in expected.items():
        if k not in found:
            i, site = _layer_site(key)
            _fail(wpath, f"{CONFIG_NAME}'s config adapts {LOCATION[site]} of layer {i}, but the file has no {k}"
                         f"{' (an adapter for a model with fewer layers?)' if i > 0 else ''}")
        arr = np.asarray(src[found[k]])
        want = tuple(_get(nodes[key], path).shape)
        want = want[::-1] if transpose else want
        if arr.shape != want:
            _fail(wpath, f"tensor {found[k]} has shape {arr.shape}, expected {want} (hidden size {cfg.d_model}, "
                         f"bottleneck {nodes[key].rank} from reduction_factor {bcfg.reduction_factor!r})")
        arr = arr.T if transpose else arr
        value = jnp.asarray(arr) if dtype is None else jnp.asarray(arr.astype(np.float32), dtype=dtype)
        slot = arrays.setdefault(key, {})
        if len(path) == 1:
            slot[path[0]] = value
        else:
            slot.setdefault(path[0], {})[path[1]] = value
    _check_head(cfg, base_params, adapter_dir)
    out = skeleton
    for key, node in nodes.items():
        i, site = _layer_site(key)
        layer = out[root][stack][str(i)]
        layer[BN.HOOKS][site] = BN.make_node(arrays[key], bcfg)  # the skeleton's dicts are new: safe to fill
    return out
