"""PEFT adapter directories (``adapter_config.json`` + ``adapter_model.safetensors``) <-> jlora, for every method.

This is the generic part; each method brings a codec (registered in `jlora.peft.base`, e.g.
`jlora.convert.peft_lora`, `jlora.convert.peft_dora`, `jlora.convert.peft_ia3`) with four functions:
``config_from_peft(pconf, where)``, ``config_to_peft(cfg, params, mcfg)``, ``tensors_to_peft(cfg, params, dtype)``
and ``tensors_from_peft(cfg, base, pconf, mcfg, src, where)``. The generic part

* reads the config and picks the codec by the registry (`jlora.peft.base.Method.claims`); an unsupported
  ``peft_type`` is an error that names it and what jlora supports;
* normalizes tensor names to jlora module names: PEFT's ``base_model.model.`` prefix is removed and adapters made
  on the bare base model (``GPT2Model``, ``LlamaModel``) get the ``transformer.``/``model.`` prefix;
* restores ``modules_to_save`` modules (PEFT stores them under the module's own weight names, e.g.
  ``base_model.model.lm_head.weight``) for every method;
* is strict: a tensor that no part used is an error naming it (PEFT warns and goes on, peft#2566);
* writes atomically: a new ``out_dir`` appears complete or not at all; in an existing one the weights, then the
  config, are replaced by atomic renames. Only safetensors files are read (pickle can run code).

A method whose files are not PEFT's names a file-format module instead (`jlora.peft.base.Method.file_format`,
e.g. `jlora.convert.adapterhub` for bottleneck adapters): `save_adapter` hands a tree of that method to its
``save``, and `load_adapter` hands a directory whose ``adapter_config.json`` the module's ``detect`` claims to
its ``load``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
from typing import Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jlora import tree as T
from jlora.config import ModelConfig
from jlora.convert.stfile import SafetensorsFile, write_safetensors
from jlora.peft import base as B

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
PREFIX = "base_model.model."


# Tensors PEFT stores for a copy of an adapted layer's base weight (see `check_base_copy`).
BASE_COPY_RE = re.compile(r"^(?P<module>.+)\.base_layer\.weight$")


def _fail(where: str, msg: str):
    raise ValueError(f"{where}: {msg}")


fail = _fail  # for the codecs: "<where>: <message>" as a ValueError


def _supported() -> str:
    out = []
    for m in B.methods():
        if m.codec is not None:
            out.append(f"{m.peft_label or m.peft_type} ({m.kind})")
    return ", ".join(out)


def method_for(pconf: dict, where: str = CONFIG_NAME) -> B.Method:
    """The registered method whose codec reads this PEFT config; an unsupported ``peft_type`` is a ValueError
    that names it and what jlora supports."""
    if not isinstance(pconf, dict):
        _fail(where, f"expected a JSON object, got {type(pconf).__name__}")
    hits = [m for m in B.methods() if m.claims is not None and m.claims(pconf)]
    if not hits:
        _fail(where, f"peft_type {pconf.get('peft_type')!r} is not supported; jlora reads and writes: {_supported()}")
    return hits[0]


def file_format_for(conf):
    """The file-format module (`jlora.peft.base.Method.file_format`) whose ``detect`` claims a parsed
    ``adapter_config.json``, or None for a PEFT file.

    Example:
      >>> file_format_for({"config": "seq_bn", "name": "a", "version": "adapters.1.3.0"}).__name__
      'jlora.convert.adapterhub'
      >>> file_format_for({"peft_type": "LORA"}) is None
      True
    """
    for m in B.methods():
        fmt = m.load_file_format()
        if fmt is not None and fmt.detect(conf):
            return fmt
    return None


def config_from_peft(pconf: dict, where: str = CONFIG_NAME):
    """The jlora method config (`LoraConfig`, `DoraConfig`, `IA3Config`, ...) equivalent to a parsed
    ``adapter_config.json``; options jlora cannot honour are a ValueError naming them.

    Example:
      >>> type(config_from_peft({"peft_type": "IA3", "target_modules": ["k_proj"], "feedforward_modules": []}))
      <class 'jlora.peft.ia3.IA3Config'>
    """
    method = method_for(pconf, where)
    return method.load_codec().config_from_peft(pconf, where)


# ----------------------------------------------------------------------------------------------------------
# modules_to_save


def _saved_tensors(cfg: ModelConfig, params, dtype) -> Dict[str, np.ndarray]:
    from jlora.convert.hf import key_table
    from jlora.peft.saved import saved_modules

    table = {".".join(path): (hf_key, tr) for path, hf_key, tr in key_table(cfg)}
    out = {}
    for name, node in saved_modules(params).items():
        hf_key, transpose = table[name]
        arr = _to_numpy(node.value if hasattr(node, "value") else node.base, dtype)  # the trained float32 copy
        out[hf_key] = np.ascontiguousarray(arr.T if transpose else arr)
    return out


def _restore_saved(cfg: ModelConfig, params, mcfg, src, where: str, dtype):
    """Marks ``mcfg.modules_to_save`` in ``params`` and loads their stored weights from ``src``."""
    from jlora.convert.hf import key_table
    from jlora.peft.saved import mark, replace_leaves, saved_modules, wrap

    names = getattr(mcfg, "modules_to_save", None)
    if not names:
        return params
    params = mark(cfg, params, names)
    table = {".".join(path): (hf_key, tr) for path, hf_key, tr in key_table(cfg)}
    new = {}
    for name, node in saved_modules(params).items():
        hf_key, transpose = table[name]
        if hf_key not in src.keys():
            _fail(where, f"{CONFIG_NAME} lists {name.rsplit('.', 1)[0]} in modules_to_save but the file has no "
                         f"{PREFIX}{hf_key}")
        want = tuple(node.shape)[::-1] if transpose else tuple(node.shape)
        if tuple(src.shape(hf_key)) != want:
            _fail(where, f"tensor {src.original(hf_key)} has shape {tuple(src.shape(hf_key))}, expected {want} "
                         f"(modules_to_save {name})")
        arr = np.asarray(src.get(hf_key))
        arr = arr.T if transpose else arr
        value = jnp.asarray(arr.astype(np.float32), dtype=dtype or jnp.float32)  # trainable: float32
        new[name] = wrap(name, value, node.base_dtype)
    return replace_leaves(params, new)


# ----------------------------------------------------------------------------------------------------------
# Saving


def to_numpy(x, dtype) -> np.ndarray:
    """A host copy of ``x`` in ``dtype`` (None: as it is), for writing files."""
    arr = np.asarray(jax.device_get(x))
    if dtype is not None and arr.dtype != jnp.dtype(dtype):
        arr = arr.astype(np.float32).astype(jnp.dtype(dtype))
    return arr


def to_jax(x: np.ndarray, dtype) -> jax.Array:
    """A device array of a file tensor in ``dtype`` (None: the file's)."""
    if dtype is None or x.dtype == jnp.dtype(dtype):
        return jnp.asarray(x)
    return jnp.asarray(x.astype(np.float32), dtype=dtype)


_to_numpy = to_numpy


def _adapter_method(params, where: str) -> B.Method:
    found = [m for m in B.methods_in(params) if m.standalone and m.kind != "full"]
    if not found:
        _fail(where, "params has no adapter (wrap it with a method's init, e.g. jlora.lora.init, or load_adapter)")
    if len(found) > 1:
        _fail(where, f"params mixes methods {', '.join(m.kind for m in found)}; a PEFT adapter file holds one")
    if found[0].codec is None and found[0].file_format is None:
        _fail(where, f"the {found[0].kind!r} method has no adapter file format")
    return found[0]


def save_adapter(cfg: ModelConfig, params, out_dir, mcfg=None, *, base_model_name_or_path: Optional[str] = None,
                 dtype=None) -> None:
    """Writes the adapter in ``params`` (LoRA, DoRA, IA3, with any ``modules_to_save``) as a PEFT directory;
    bottleneck adapters as an AdapterHub directory (`jlora.convert.adapterhub.save`).

    ``PeftModel.from_pretrained(hf_model, out_dir)`` loads it with no missing or unexpected keys and computes
    the same function. Without ``mcfg`` the config is derived from the nodes themselves (for LoRA: rank from
    ``a``, alpha from the scale, the smallest ``rank_pattern``/``alpha_pattern`` under which PEFT reconstructs
    exactly the same scales). Written atomically (see the module docstring).

    Args:
      cfg: model config.
      params: a parameter tree with one method's nodes (e.g. from `jlora.lora.init` or `load_adapter`).
      out_dir: destination directory (created if needed).
      mcfg: the method config the adapter was made with (optional; keeps its target/pattern spelling). It must
        describe the nodes exactly.
      base_model_name_or_path: written to the config (default: ``cfg.name`` unless it is ``"custom"``).
      dtype: storage dtype of the adapter tensors (default: as they are, usually float32).

    Example:
      >>> params = jlora.lora.init(jax.random.key(0), cfg, params, jlora.LoraConfig(r=8, alpha=16))
      >>> save_adapter(cfg, params, f"{tmp}/adapter")
      >>> import os; sorted(os.listdir(f"{tmp}/adapter"))
      ['adapter_config.json', 'adapter_model.safetensors']
    """
    method = _adapter_method(params, "save_adapter")
    fmt = method.load_file_format()
    if fmt is not None:  # a method with a file format of its own (AdapterHub's for bottleneck adapters)
        return fmt.save(cfg, params, out_dir, mcfg, base_model_name_or_path=base_model_name_or_path, dtype=dtype)
    codec = method.load_codec()
    if mcfg is not None and not isinstance(mcfg, method.config):
        # e.g. a LoraConfig(use_dora=True), which made a DoRA tree: the method's own config with the same fields
        try:
            mcfg = method.config(**{f.name: getattr(mcfg, f.name) for f in dataclasses.fields(mcfg) if f.init})
        except (TypeError, ValueError):
            _fail("save_adapter", f"mcfg is a {type(mcfg).__name__} but params holds a {method.kind} adapter")
    pconf = codec.config_to_peft(cfg, params, mcfg)
    # Names that are only a model type (jlora's fallback when config.json has no _name_or_path) are no hub id.
    if base_model_name_or_path is None and cfg.name not in ("custom", "", "llama", "mistral", "qwen2"):
        base_model_name_or_path = cfg.name
    saved = _saved_tensors(cfg, params, dtype)
    from jlora.peft.saved import saved_modules

    have = set(saved_modules(params))
    mts = getattr(mcfg, "modules_to_save", None)
    if mts is None and saved:
        mts = sorted({n.rsplit(".", 1)[0] for n in have}, key=T.natural_key)
    elif mts:
        from jlora.peft.saved import wraps

        named = {n for n in T.named_leaves(params) if any(wraps(n, m) for m in mts)}
        if named != have:
            odd = sorted(named ^ have, key=T.natural_key)[0]
            _fail("save_adapter", f"mcfg.modules_to_save {list(mts)} does not describe the saved modules in params "
                                  f"({odd} is {'named but not saved' if odd in named else 'saved but not named'})")
    pconf.update({"base_model_name_or_path": base_model_name_or_path, "modules_to_save": list(mts) if mts else None})
    out = codec.tensors_to_peft(cfg, params, dtype)
    tensors, metadata = out if isinstance(out, tuple) else (out, None)
    clash = sorted(set(tensors) & set(saved))
    if clash:
        _fail("save_adapter", f"tensor {clash[0]} is both an adapter tensor and a modules_to_save weight")
    key_prefix = getattr(codec, "key_prefix", PREFIX)  # prompt-learning files name their tensors bare
    tensors = {key_prefix + k: v for k, v in {**tensors, **saved}.items()}
    write_adapter_dir(out_dir, pconf, tensors, metadata)


def write_adapter_dir(out_dir, pconf: dict, tensors: Dict[str, np.ndarray], metadata=None, *,
                      weights_name: str = WEIGHTS_NAME) -> None:
    """Writes ``adapter_config.json`` and the weights (``adapter_model.safetensors``, or ``weights_name``)
    atomically (see the module docstring)."""
    out_dir = os.fspath(out_dir)
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".jlora-adapter-", dir=parent)
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; it becomes out_dir
        write_safetensors(os.path.join(tmp, weights_name), tensors, metadata)
        with open(os.path.join(tmp, CONFIG_NAME), "w") as f:
            json.dump(pconf, f, indent=2, sort_keys=True)
            f.write("\n")
        try:
            os.rename(tmp, out_dir)  # atomic when out_dir does not exist yet
            tmp = None
        except OSError:
            if not os.path.isdir(out_dir):
                raise
            for fname in (weights_name, CONFIG_NAME):
                os.replace(os.path.join(tmp, fname), os.path.join(out_dir, fname))
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------
# Loading


class TensorSource:
    """The tensors of an adapter file under jlora names (``<module>.<suffix>``), recording which were read."""

    def __init__(self, st: SafetensorsFile, cfg: ModelConfig, base_params, path: str):
        self.path = path
        self.metadata = st.metadata
        self._st = st
        modules = {n.rsplit(".", 1)[0] for n in T.named_leaves(base_params)}  # modules that hold arrays
        arch_prefix = "transformer." if cfg.arch == "gpt2" else "model."
        self._names = {}
        for key in st.keys():
            name = key[len(PREFIX):] if key.startswith(PREFIX) else key
            head = name.rsplit(".", 1)[0]
            if not any(head == m or head.startswith(m + ".") for m in modules) and \
                    any((arch_prefix + head) == m or (arch_prefix + head).startswith(m + ".") for m in modules):
                name = arch_prefix + name  # an adapter made on the bare base model (GPT2Model, LlamaModel)
            if name in self._names:
                raise ValueError(f"{path}: tensors {self._names[name]} and {key} are the same parameter "
                                 f"({name}); the file is ambiguous")
            self._names[name] = key
        self.used = set()

    def keys(self):
        return list(self._names)

    def shape(self, name):
        return self._st.shape(self._names[name])

    def get(self, name):
        self.used.add(name)
        return self._st.get(self._names[name])

    def original(self, name) -> str:
        """The tensor's name in the file (for messages)."""
        return self._names.get(name, name)

    def without(self, names):
        """A view without ``names`` (e.g. the modules_to_save weights, which the generic part reads)."""
        view = object.__new__(TensorSource)
        view.__dict__.update(self.__dict__)
        view._names = {k: v for k, v in self._names.items() if k not in set(names)}  # shares `used`
        return view


def _read_config(adapter_dir: str) -> dict:
    path = os.path.join(adapter_dir, CONFIG_NAME)
    if not os.path.isdir(adapter_dir):
        raise FileNotFoundError(f"{adapter_dir}: no such adapter directory")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{adapter_dir}: no {CONFIG_NAME} (expected a PEFT or AdapterHub adapter "
                                f"directory)")
    try:
        with open(path) as f:
            pconf = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    return pconf


def load_adapter(cfg: ModelConfig, base_params, adapter_dir, *, dtype=jnp.float32):
    """Loads a PEFT adapter (LoRA, DoRA or IA3, with any ``modules_to_save``) onto a base parameter tree; an
    AdapterHub bottleneck adapter directory goes to `jlora.convert.adapterhub.load`.

    Honours the method's options and PEFT's whole targeting vocabulary (``target_modules`` incl. regex and
    ``"all-linear"``, ``exclude_modules``, ``layers_to_transform``/``layers_pattern``). Strict: a tensor that
    maps to no module, a module the config selects without its tensors, a shape that does not fit, an unused
    tensor, or an option jlora does not implement is a ValueError that names it.

    Args:
      cfg: model config of the base.
      base_params: the base parameter tree (plain kernels, or quantized wrappers; no adapter yet).
      adapter_dir: directory with ``adapter_config.json`` and ``adapter_model.safetensors``.
      dtype: dtype of the loaded adapter tensors (float32 by default; None keeps the file's dtype).

    Returns:
      the parameter tree with the method's nodes at the adapted modules.

    Example:
      >>> tuned = jlora.lora.init(key, cfg, params, lcfg)  # params is the base tree here
      >>> save_adapter(cfg, tuned, f"{tmp}/my-adapter")
      >>> loaded = load_adapter(cfg, params, f"{tmp}/my-adapter")
      >>> kernel = loaded["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]
      >>> type(kernel).__name__, kernel.a.shape
      ('LoRA', (64, 2))
    """
    adapter_dir = os.fspath(adapter_dir)
    pconf = _read_config(adapter_dir)
    cpath = os.path.join(adapter_dir, CONFIG_NAME)
    fmt = file_format_for(pconf)
    if fmt is not None:  # not PEFT's format: a method's own (AdapterHub's for bottleneck adapters)
        return fmt.load(cfg, base_params, adapter_dir, dtype=dtype)
    method = method_for(pconf, cpath)
    codec = method.load_codec()
    mcfg = codec.config_from_peft(pconf, cpath)
    wpath = os.path.join(adapter_dir, WEIGHTS_NAME)
    if not os.path.exists(wpath):
        if os.path.exists(os.path.join(adapter_dir, PICKLE_NAME)):
            raise ValueError(f"{adapter_dir}: holds only {PICKLE_NAME}, a pickle file (pickle can run code); jlora "
                             f"reads adapters from {WEIGHTS_NAME} only. Convert it with PEFT: load it and call "
                             f"save_pretrained(dir, safe_serialization=True)")
        raise FileNotFoundError(f"{adapter_dir}: no {WEIGHTS_NAME}")
    src = TensorSource(SafetensorsFile(wpath), cfg, base_params, wpath)
    saved_keys = set()
    if getattr(mcfg, "modules_to_save", None):
        from jlora.convert.hf import key_table

        from jlora.peft.saved import wraps

        saved_keys = {hf for path, hf, _ in key_table(cfg)
                      if any(wraps(".".join(path), m) for m in mcfg.modules_to_save)}
    params = codec.tensors_from_peft(cfg, base_params, pconf, mcfg, src.without(saved_keys), wpath, dtype=dtype)
    params = _restore_saved(cfg, params, mcfg, src, wpath, dtype)
    return _check_all_used(src, params, wpath)


def _check_all_used(src: TensorSource, params, wpath: str):
    unused = [k for k in src.keys() if k not in src.used]
    if unused:
        _fail(wpath, f"tensor {src.original(unused[0])} was not used by the adapter"
                     + (f" (and {len(unused) - 1} more)" if len(unused) > 1 else "")
                     + "; jlora refuses files it cannot load completely")
    return params


def check_base_copy(st, wpath: str, key: str, module: str, kernel, cfg: ModelConfig) -> None:
    """A stored copy of a base weight (PEFT saves ``<module>.base_layer.weight`` for adapted output/embedding
    layers) is accepted only if it is the base we load onto: jlora never takes base weights from an adapter file.
    Any codec may call it."""
    from jlora.convert.hf import key_table
    from jlora.kernels import is_wrapper, materialize

    transpose = {hf_key: tr for _, hf_key, tr in key_table(cfg)}.get(module + ".weight", True)
    shape = tuple(kernel.shape)[::-1] if transpose else tuple(kernel.shape)
    found = st.shape(key)
    arr = st.get(key)
    key = st.original(key)
    if tuple(found) != shape:
        _fail(wpath, f"tensor {key} (a saved copy of the base weight of {module}) has shape {tuple(found)}, "
                     f"expected {shape}; the adapter was made for another base (a resized vocabulary?)")
    if is_wrapper(kernel):
        return  # a quantized base cannot be compared bit for bit; the shapes agree
    want = np.asarray(jax.device_get(materialize(kernel)), np.float32)
    want = want.T if transpose else want
    got = np.asarray(arr, np.float32).astype(jnp.dtype(kernel.dtype)).astype(np.float32)
    want = want.astype(jnp.dtype(kernel.dtype)).astype(np.float32)
    if not np.allclose(got, want, rtol=1e-3, atol=1e-6):
        _fail(wpath, f"tensor {key} is a saved copy of the base weight of {module} that differs from the base "
                     f"passed to load_adapter (max difference {np.abs(got - want).max():.3g}); the adapter was "
                     f"made for another or modified base, and jlora does not load base weights from adapters")


# Public for compatibility: the LoRA config of a PEFT LORA file.
def lora_config_from_peft(pconf: dict):
    """The `jlora.LoraConfig` equivalent to a PEFT LoRA ``adapter_config.json`` (as a dict); see
    `jlora.convert.peft_lora.lora_config_from_peft`. For any method use `config_from_peft`."""
    from jlora.convert.peft_lora import lora_config_from_peft as f

    return f(pconf)
