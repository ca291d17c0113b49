"""Parameter-tree utilities: key-path names, target selection, trainable labels, split/combine, counts.

Everything here is a pure function of the tree. The single source of truth for what trains is the *label
tree*: the parameter tree with every array replaced by a role string (``"frozen"``, ``"full"``, ``"lora_a"``,
``"lora_b"``, ...). Kernel wrappers stay nodes in it, so the label tree has exactly the structure of the params
and can be handed to `optax.multi_transform`.
"""

from __future__ import annotations

import re
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from jlora.kernels import FROZEN, FULL, is_node, is_wrapper


def path_parts(path) -> Tuple[str, ...]:
    """A `jax.tree_util` key path as a tuple of names, e.g. ``("model", "layers", "0", ..., "kernel")``."""
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(k.name)
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.FlattenedIndexKey):
            parts.append(str(k.key))
        else:
            parts.append(str(k))
    return tuple(parts)


def path_str(path) -> str:
    """A `jax.tree_util` key path as a dotted name, e.g. ``model.layers.0.self_attn.q_proj.kernel``."""
    return ".".join(path_parts(path))


def named_leaves(params) -> Dict[str, object]:
    """{dotted path: leaf}, stopping at kernel wrappers (a wrapper counts as one leaf)."""
    return {path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_wrapper)[0]}


def linear_modules(params) -> Dict[str, object]:
    """{module name: kernel} for every linear layer (every ``<module>.kernel`` leaf)."""
    return {name[: -len(".kernel")]: v for name, v in named_leaves(params).items() if name.endswith(".kernel")}


def layer_index(name: str, layers_pattern=None) -> Optional[int]:
    """The layer number PEFT reads from a module name: the first numbered segment (``...layers.3...``,
    ``...h.3...``), or the number after one of ``layers_pattern``; None when there is none."""
    if not layers_pattern:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        m = None
        for pat in ([layers_pattern] if isinstance(layers_pattern, str) else layers_pattern):
            m = re.match(rf"(?:^|.*?\.){pat}\.(?P<idx>\d+)\.", name)
            if m is not None:
                break
    return int(m.group("idx")) if m else None


def match_module(name: str, targets: Union[str, Sequence[str]], layers=None, layers_pattern=None) -> bool:
    """PEFT's ``target_modules`` rule (``check_target_module_exists``, without exclusions): a regex string must
    match the whole dotted name; a list entry matches the name exactly, or as a dotted suffix (``"q_proj"``
    matches ``model.layers.0.self_attn.q_proj``), and only the suffix form is limited to ``layers`` (read with
    `layer_index`). `jlora.peft.base.TargetRules.selects` adds exclusions, ``"all-linear"`` and defaults."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    if name in targets:
        return True
    if not any(name.endswith("." + t) for t in targets):
        return False
    if layers is None or (isinstance(layers, (tuple, list)) and not layers):
        return True
    idx = layer_index(name, layers_pattern)
    if idx is None:
        return False
    return idx == layers if isinstance(layers, int) else idx in layers


def pattern_value(name: str, patterns: Dict[str, object], default):
    """PEFT's ``rank_pattern``/``alpha_pattern`` lookup: the first pattern that matches the end of the name."""
    for pat, value in patterns.items():
        if re.match(rf"(.*\.)?({pat})$", name):
            return value
    return default


def select(params, targets: Union[str, Sequence[str]], layers: Optional[Iterable[int]] = None) -> List[str]:
    """Module names of linear layers that ``targets`` selects (see `match_module`), optionally in ``layers``.

    Example:
      >>> select(params, ["q_proj", "v_proj"])[:2]
      ['model.layers.0.self_attn.q_proj', 'model.layers.0.self_attn.v_proj']
    """
    layers = None if layers is None else tuple(int(i) for i in layers)
    return [n for n in sorted(linear_modules(params), key=natural_key) if match_module(n, targets, layers)]


def natural_key(name: str):
    """Sort key that orders ``layers.10`` after ``layers.9``."""
    return [int(p) if p.isdigit() else p for p in name.split(".")]


def get_module(params, name: str):
    node = params
    for part in name.split("."):
        node = node[part]
    return node


def replace_modules(params, new_kernels: Dict[str, object]):
    """A copy of ``params`` (dicts copied along the touched paths only) with ``<module>.kernel`` replaced."""
    out = dict(params)
    for name, kernel in new_kernels.items():
        parts = name.split(".")
        node = out
        for p in parts:
            node[p] = dict(node[p])
            node = node[p]
        node["kernel"] = kernel
    return out


# ----------------------------------------------------------------------------------------------------------
# Labels, split, combine


def trainable_labels(params, mode: str = "auto"):
    """The label tree: same structure as ``params``, each array replaced by its role string.

    Args:
      params: a parameter tree (plain arrays and/or kernel wrappers).
      mode: ``"auto"`` (adapter leaves train if the tree has any wrapper, else everything trains: full
        fine-tuning), ``"adapters"`` (only adapter leaves), or ``"full"`` (everything, adapters included).

    Returns:
      the label tree (strings as leaves, wrappers kept as nodes).

    Example:
      >>> labels = trainable_labels(jlora.lora.init(key, cfg, params, lcfg))
      >>> labels["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"].a
      'lora_a'
    """
    if mode not in ("auto", "adapters", "full"):
        raise ValueError(f"trainable_labels: mode must be 'auto', 'adapters' or 'full', got {mode!r}")
    has_wrappers = any(is_node(x) for x in jax.tree_util.tree_leaves(params, is_leaf=is_node))
    if mode == "auto":
        mode = "adapters" if has_wrappers else "full"
    plain = FULL if mode == "full" else FROZEN
    if mode == "full":
        bare = frozen_bases(params)
        if bare:
            raise ValueError(full_quantized_error(bare, "trainable_labels(mode='full')"))

    def label(x):
        # A node labels its own adapter leaves and hands its base back to `label` (wrappers nest). A node may
        # label a base leaf "frozen" whatever the mode (a quantized base's codes never train).
        return x.labels(label) if is_node(x) else plain

    return jax.tree_util.tree_map(label, params, is_leaf=is_node)


def frozen_bases(params) -> List[str]:
    """Dotted paths of kernels that are frozen bases with no adapter on them (nodes that strip to themselves,
    e.g. quantized kernels from ``load_pretrained(quantize=...)``): they can never train."""
    out = []
    for path, x in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_node)[0]:
        if is_node(x) and x.strip() is x:
            out.append(path_str(path))
    return out


def full_quantized_error(bare: Sequence[str], where: str) -> str:
    return (f"{where}: full fine-tuning cannot train {bare[0]}" + (f" (and {len(bare) - 1} more)" if len(bare) > 1
            else "") + ": it is a quantized base (the quantize= option of load_pretrained / "
            "jlora.quant.quantize_params) whose codes never train; put LoRA on it (QLoRA: jlora.lora.init) or load "
            "the model without quantize=")


def split(params, labels) -> Tuple[object, object]:
    """(trainable, frozen): two trees of the same structure, with ``None`` where the other one holds the leaf."""
    trainable = jax.tree_util.tree_map(lambda l, p: None if l == FROZEN else p, labels, params)
    frozen = jax.tree_util.tree_map(lambda l, p: p if l == FROZEN else None, labels, params)
    return trainable, frozen


def combine(trainable, frozen, labels):
    """Inverse of `split`: ``combine(*split(p, labels), labels) == p``."""
    return jax.tree_util.tree_map(lambda l, t, f: f if l == FROZEN else t, labels, trainable, frozen)


# ----------------------------------------------------------------------------------------------------------
# Counting


def param_report(params, labels=None) -> dict:
    """Parameter counts and bytes, like PEFT's ``print_trainable_parameters``.

    Args:
      params: parameter tree.
      labels: label tree (default `trainable_labels(params)`).

    Returns:
      dict with ``total``, ``trainable``, ``percent``, ``bytes`` (stored bytes of all leaves) and
      ``trainable_bytes``. ``total`` counts logical parameters: the adapter's plus the base's (as PEFT does),
      a packed quantized leaf counting the weights it stands for.
    """
    labels = trainable_labels(params) if labels is None else labels
    # Each node says how many parameters each of its leaves stands for (a packed 4-bit leaf: two per byte).
    sizes = jax.tree_util.tree_map(lambda x: x.logical_sizes() if is_node(x) else int(np.prod(np.shape(x))),
                                   params, is_leaf=is_node)
    total = trainable = nbytes = tbytes = 0
    for l, p, n in zip(jax.tree_util.tree_leaves(labels), jax.tree_util.tree_leaves(params),
                       jax.tree_util.tree_leaves(sizes)):
        b = int(np.prod(np.shape(p))) * jnp.dtype(p.dtype).itemsize
        total += int(n)
        nbytes += b
        if l != FROZEN:
            trainable += int(n)
            tbytes += b
    return {"total": total, "trainable": trainable, "percent": 100.0 * trainable / max(total, 1),
            "bytes": nbytes, "trainable_bytes": tbytes}


def format_report(report: dict) -> str:
    """``trainable params: 1,234 || all params: 5,678 || trainable%: 21.7300`` (PEFT's wording)."""
    return (f"trainable params: {report['trainable']:,} || all params: {report['total']:,} || "
            f"trainable%: {report['percent']:.4f}")
