"""The method seam: PEFT's targeting rules (shared by every method config) and the registry of methods.

A PEFT method is one file in `jlora.peft` plus one `register` call. The rest of the library asks the registry
(`get(kind)`, `kinds()`, `method_of(node)`) and the nodes themselves (`jlora.kernels`), never a method's name:

* `Method.config`: a frozen dataclass with PEFT's field names where PEFT has the method; it mixes in
  `TargetRules` and so has `selects(module_name)`;
* `Method.init(key, cfg, params, mcfg) -> params`: a new tree with the method's nodes at the targets;
* `Method.nodes`: the node types it owns (their protocol is in `jlora.kernels`);
* `Method.codec`: ``"module:attr"`` of its PEFT codec (`jlora.convert.peft` loads it lazily), or None;
* `Method.file_format`: the module of its own (non-PEFT) adapter file format, e.g. AdapterHub's for bottleneck
  adapters: ``detect(config_json) -> bool``, ``save(cfg, params, out_dir, mcfg, ...)``, ``load(cfg, params, dir,
  ...)`` (`jlora.save_adapter`/`jlora.load_adapter` dispatch to it), or None;
* `Method.claims(pconf)`: whether a PEFT ``adapter_config.json`` is this method's.

`"full"` (full fine-tuning) is registered here too: its init is the identity and everything trains.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

from jlora.kernels import Node, is_node

ALL_LINEAR = "all-linear"
OUTPUT_LAYERS = ("lm_head",)  # module names (last part) of the output layer, which "all-linear" leaves out

# ----------------------------------------------------------------------------------------------------------
# Targeting: PEFT's rules (peft.tuners.tuners_utils.check_target_module_exists and the "all-linear" shorthand)


def _as_tuple(x):
    if x is None:
        return None
    if isinstance(x, (list, tuple, set, frozenset)):
        return tuple(sorted(x)) if isinstance(x, (set, frozenset)) else tuple(x)
    return x


def in_modules_to_save(name: str, modules_to_save) -> bool:
    """PEFT's rule for ``modules_to_save``: an entry matches a whole dotted segment of the name."""
    return bool(modules_to_save) and any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in modules_to_save)


class TargetRules:
    """PEFT's targeting vocabulary, shared by every method config (mixed into their dataclasses).

    The config declares the fields ``target_modules``, ``exclude_modules``, ``layers_to_transform``,
    ``layers_pattern`` and ``modules_to_save`` with PEFT's meaning:

    * ``target_modules``: a list (entries match the dotted module name exactly or as a dotted suffix), a regex
      string (must match the whole name), ``"all-linear"`` (every linear layer but the output layer), or None
      (the method's default targets for the architecture, `default_targets`);
    * ``exclude_modules``: the same forms; an excluded module is never targeted;
    * ``layers_to_transform`` (int or list) with ``layers_pattern`` (str or list): only list targets in those
      layers (PEFT ignores them for regex targets and for exact-name matches, and so does jlora);
    * ``modules_to_save``: modules trained in full and saved whole (e.g. ``lm_head``, ``embed_tokens``); they are
      never targeted by the method itself.
    """

    def _normalize_targets(self) -> None:
        for field in ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern",
                      "modules_to_save"):
            if isinstance(getattr(self, field, None), (list, set, frozenset)):
                object.__setattr__(self, field, _as_tuple(getattr(self, field)))
        name = type(self).__name__
        for field in ("target_modules", "exclude_modules"):
            v = getattr(self, field)
            if v is not None and not isinstance(v, (str, tuple)):
                raise ValueError(f"{name}.{field} must be a list of module names or a regex string, got {v!r}")
            if isinstance(v, tuple) and not all(isinstance(t, str) and t for t in v):
                raise ValueError(f"{name}.{field} entries must be non-empty strings, got {list(v)!r}")
            if isinstance(v, str) and v != ALL_LINEAR:
                try:
                    re.compile(v)
                except re.error as e:
                    raise ValueError(f"{name}.{field} {v!r} is not a valid regex ({e})") from None
        layers = self.layers_to_transform
        if layers is not None:
            items = (layers,) if isinstance(layers, int) else layers
            if isinstance(layers, bool) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                   for i in items):
                raise ValueError(f"{name}.layers_to_transform must be a layer index or a list of them, got "
                                 f"{layers!r}")
            if isinstance(self.target_modules, str):
                # PEFT's own config refuses this combination.
                raise ValueError(f"{name}.layers_to_transform cannot be used when target_modules is a str "
                                 f"({self.target_modules!r}); list the target names instead")
        if self.layers_pattern is not None:
            pats = (self.layers_pattern,) if isinstance(self.layers_pattern, str) else self.layers_pattern
            if not all(isinstance(p, str) for p in pats):
                raise ValueError(f"{name}.layers_pattern must be a string or a list of strings, got "
                                 f"{self.layers_pattern!r}")
            # PEFT's own config checks, as PEFT words them: any pattern with a str target, a non-empty one
            # without layers_to_transform.
            if isinstance(self.target_modules, str):
                raise ValueError(f"{name}.layers_pattern cannot be used when target_modules is a str "
                                 f"({self.target_modules!r})")
            if self.layers_pattern and layers is None:
                raise ValueError(f"{name}.layers_pattern is only used with layers_to_transform; set both or "
                                 f"neither")
        mts = self.modules_to_save
        if mts is not None and (not isinstance(mts, tuple) or not all(isinstance(m, str) and m for m in mts)):
            raise ValueError(f"{name}.modules_to_save must be a list of module names, got {mts!r}")

    # The method's default targets per architecture (PEFT's TRANSFORMERS_MODELS_TO_*_TARGET_MODULES_MAPPING).
    DEFAULT_TARGETS: Dict[str, Tuple[str, ...]] = {}

    def default_targets(self, arch: str) -> Tuple[str, ...]:
        if arch not in self.DEFAULT_TARGETS:
            raise ValueError(f"{type(self).__name__}: no default target_modules for the {arch!r} architecture; "
                             f"set target_modules")
        return self.DEFAULT_TARGETS[arch]

    def targets_for(self, cfg) -> Union[str, Tuple[str, ...]]:
        """``target_modules``, or the defaults for ``cfg.arch`` when it is None."""
        return self.targets_for_arch(cfg.arch)

    def targets_for_arch(self, arch: str) -> Union[str, Tuple[str, ...]]:
        return self.default_targets(arch) if self.target_modules is None else self.target_modules

    def resolved(self, cfg):
        """This config with ``target_modules`` filled in for ``cfg``'s architecture."""
        return self if self.target_modules is not None else dataclasses.replace(
            self, target_modules=self.targets_for(cfg))

    def layers(self) -> Optional[Tuple[int, ...]]:
        """``layers_to_transform`` as a tuple (None: every layer)."""
        if self.layers_to_transform is None:
            return None
        if isinstance(self.layers_to_transform, int):
            return (self.layers_to_transform,)
        return tuple(self.layers_to_transform)

    def selects(self, module_name: str, arch: Optional[str] = None) -> bool:
        """Whether this config puts its method on the linear module ``module_name`` (PEFT's rule exactly).

        Args:
          module_name: the dotted module name (``model.layers.0.self_attn.q_proj``).
          arch: the architecture for default targets when ``target_modules`` is None (default: read from the
            name: ``transformer.h.*`` is GPT-2, anything else Llama).

        Example:
          >>> rules = jlora.LoraConfig(target_modules=["q_proj"], exclude_modules=["model.layers.1.self_attn.q_proj"])
          >>> rules.selects("model.layers.1.self_attn.q_proj")
          False
        """
        name = module_name
        exclude = self.exclude_modules
        if exclude:
            if isinstance(exclude, str):
                if re.fullmatch(exclude, name):
                    return False
            elif name in exclude or any(name.endswith("." + e) for e in exclude):
                return False
        if in_modules_to_save(name, self.modules_to_save):
            return False
        targets = self.target_modules
        if targets is None:
            if arch is None:
                arch = "gpt2" if name.startswith("transformer.") or ".h." in name else "llama"
            targets = self.default_targets(arch)
        if targets == ALL_LINEAR:
            return name.split(".")[-1] not in OUTPUT_LAYERS
        from jlora.tree import match_module

        return match_module(name, targets, self.layers_to_transform, self.layers_pattern)

    def select(self, params, arch: Optional[str] = None) -> List[str]:
        """The linear modules of ``params`` this config selects, in natural order."""
        from jlora import tree as T

        return [n for n in sorted(T.linear_modules(params), key=T.natural_key) if self.selects(n, arch)]


def no_match_error(mcfg, params, arch: str) -> ValueError:
    """The error for a config whose targets select nothing: names the option and lists what exists."""
    from jlora import tree as T

    names = T.linear_modules(params)
    suffixes = sorted({n.split(".")[-1] for n in names} | {".".join(n.split(".")[-2:]) for n in names})
    where = "" if mcfg.layers() is None else f" in layers {list(mcfg.layers())}"
    excl = "" if not mcfg.exclude_modules else f" (after exclude_modules {mcfg.exclude_modules!r})"
    return ValueError(f"{type(mcfg).__name__}.target_modules {mcfg.targets_for_arch(arch)!r} matched no linear "
                      f"layer{where}{excl}; available: {', '.join(suffixes)}")


def check_free(name: str, kernel, where: str) -> None:
    """Refuses to put a second method on a kernel that already has one (a quantized base is fine: it is the base)."""
    from jlora.kernels import strip_kernel

    if is_node(kernel) and strip_kernel(kernel) is not kernel:
        raise ValueError(f"{where}: {name} already has a {type(kernel).__name__} adapter (strip or merge it first)")


def finish_init(cfg, params, mcfg):
    """The shared last step of every method's init: ``modules_to_save`` (`jlora.peft.saved`)."""
    if getattr(mcfg, "modules_to_save", None):
        from jlora.peft import saved

        params = saved.mark(cfg, params, mcfg.modules_to_save)
    return params


# ----------------------------------------------------------------------------------------------------------
# The registry


@dataclasses.dataclass(frozen=True)
class Method:
    """One PEFT method (or full fine-tuning) as the rest of jlora sees it.

    Attributes:
      kind: the name in ``method.kind`` and `get` (``"lora"``, ``"dora"``, ``"ia3"``, ``"full"``).
      config: the config dataclass (None for full fine-tuning).
      init: ``init(key, cfg, params, mcfg) -> params``.
      nodes: the node types this method puts in a tree.
      codec: ``"module:attr"`` of the PEFT codec (see `jlora.convert.peft`), or None (no PEFT format).
      file_format: the module of a non-PEFT file format (see `load_file_format`), or None.
      claims: ``claims(pconf) -> bool`` for a parsed ``adapter_config.json``.
      peft_type: PEFT's ``peft_type`` string, for messages.
      summary: one line for ``--help`` and error messages.
    """

    kind: str
    config: Optional[type]
    init: Callable
    nodes: Tuple[type, ...] = ()
    codec: Optional[str] = None
    claims: Optional[Callable[[dict], bool]] = None
    peft_type: Optional[str] = None
    summary: str = ""
    standalone: bool = True  # a method.kind of its own (False: a component other methods use, modules_to_save)
    peft_label: str = ""  # how PEFT names it, for messages (default: peft_type)
    file_format: Optional[str] = None  # module with detect/save/load of its own adapter directory format

    @property
    def mergeable(self) -> bool:
        return all(n.mergeable for n in self.nodes)

    def make_config(self, options: Dict[str, Any], where: str = "method"):
        """The config from a dict of options (a run config's [method] table): every key checked."""
        if self.config is None:
            if options:
                raise ValueError(f"{where}: method.kind {self.kind!r} takes no options, got "
                                 f"{', '.join(sorted(options))}")
            return None
        fields = {f.name for f in dataclasses.fields(self.config) if f.init}
        unknown = sorted(set(options) - fields)
        if unknown:
            raise ValueError(f"{where}: unknown option method.{unknown[0]} for method.kind {self.kind!r} (its "
                             f"options: {', '.join(sorted(fields))})")
        try:
            return self.config(**options)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: [method] kind {self.kind!r}: {e}") from None

    def load_file_format(self):
        """The module of this method's own adapter file format (``detect``, ``save``, ``load``), or None."""
        return None if self.file_format is None else importlib.import_module(self.file_format)

    def load_codec(self):
        if self.codec is None:
            return None
        module, attr = self.codec.split(":")
        return getattr(importlib.import_module(module), attr)


_REGISTRY: Dict[str, Method] = {}
_BUILTINS = ("jlora.peft.lora", "jlora.peft.dora", "jlora.peft.ia3", "jlora.peft.saved", "jlora.peft.prefix",
             "jlora.peft.prompt", "jlora.peft.bottleneck")


def register(method: Method) -> Method:
    """Adds a method to the registry (one call at the bottom of its file)."""
    if method.kind in _REGISTRY and _REGISTRY[method.kind] is not method:
        raise ValueError(f"register: a method named {method.kind!r} is already registered")
    for n in method.nodes:
        if not issubclass(n, Node):
            raise TypeError(f"register({method.kind!r}): {n.__name__} is not a jlora.kernels.Node")
        n.method = method.kind
    _REGISTRY[method.kind] = method
    return method


def _load_builtins() -> None:
    for mod in _BUILTINS:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:  # only while a built-in method is being written
            if e.name != mod:
                raise


def kinds() -> List[str]:
    """The registered method kinds, ``"full"`` last."""
    _load_builtins()
    return sorted(k for k, m in _REGISTRY.items() if k != "full" and m.standalone) + ["full"]


def get(kind: str) -> Method:
    """The registered method ``kind``; an unknown kind is a ValueError that lists the known ones."""
    _load_builtins()
    if kind not in _REGISTRY or not _REGISTRY[kind].standalone:
        raise ValueError(f"unknown method kind {kind!r}; jlora knows: {', '.join(kinds())}")
    return _REGISTRY[kind]


def methods() -> List[Method]:
    _load_builtins()
    return [_REGISTRY[k] for k in kinds()]


def method_of(node) -> Optional[Method]:
    """The method that owns a node type (None for nodes of no registered method, e.g. a test's)."""
    _load_builtins()
    for m in _REGISTRY.values():
        if isinstance(node, m.nodes):
            return m
    return None


def methods_in(params) -> List[Method]:
    """The registered methods whose nodes occur in ``params``."""
    import jax

    seen = []
    for x in jax.tree_util.tree_leaves(params, is_leaf=is_node):
        m = method_of(x) if is_node(x) else None
        if m is not None and m not in seen:
            seen.append(m)
    return seen


def strip(params):
    """The tree with every PEFT method removed: kernel/leaf wrappers unwrapped, hooks dropped.

    ``strip(init(p)) == p`` for every method whose init leaves the base unchanged (all but PiSSA).
    """
    from jlora.kernels import HOOKS, Hook, strip_kernel

    def walk(node):
        if isinstance(node, dict):
            out = {}
            for k, v in node.items():
                if k == HOOKS and isinstance(v, dict) and all(isinstance(h, Hook) for h in v.values()):
                    continue
                out[k] = walk(v)
            return out
        if isinstance(node, (list, tuple)):
            return type(node)(walk(v) for v in node)
        return strip_kernel(node) if is_node(node) else node

    return walk(params)


def _full_init(key, cfg, params, mcfg=None):
    return params


register(Method(kind="full", config=None, init=_full_init, summary="full fine-tuning: every parameter trains"))
