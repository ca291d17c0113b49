"""(IA)^3 (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning"; PEFT's ``IA3Config``) as a kernel wrapper.

A targeted kernel ``W`` ``[in, out]`` becomes ``IA3(W, l)`` with a learned vector ``l``, exactly as PEFT (0.21)
computes it (``peft/tuners/ia3/layer.py``):

* a *feed-forward* module scales its input, ``l`` ``[in]``: ``y = (x * l) @ W + bias``;
* any other module scales its output *including the bias*, ``l`` ``[out]``: ``y = (x @ W + bias) * l``.

Which targets are feed-forward is PEFT's rule (``IA3Model._check_target_module_feedforward``): a regex string
``feedforward_modules`` must match the whole module name; a list entry matches when the name *ends with* it, with
no dot boundary (unlike ``target_modules``, whose list entries match whole dotted suffixes). PEFT requires
``feedforward_modules`` to be a subset of ``target_modules`` when both are lists, and so does `IA3Config`.
When ``feedforward_modules`` is None the architecture's defaults apply (PEFT's
``TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING``), as for ``target_modules``.

`merge` folds ``l`` into the kernel (rows for feed-forward modules, columns and the bias otherwise), as PEFT's
``merge_and_unload``. The vector is stored in float32 (``IA3Config.dtype``) and applied in the compute dtype. It
is never weight-decayed (it is a multiplicative scale whose neutral value is 1, not 0).

``init_ia3_weights=True`` starts every vector at ones (the identity); ``False`` draws them from a standard
normal, as PEFT does (``torch.randn``) -- a non-identity adapter, useful for tests.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Dict, Optional, Tuple, Union

import jax
import jax.numpy as jnp
from flax import struct

from jlora import tree as T
from jlora.config import ModelConfig
from jlora.kernels import KernelWrapper, linear, materialize, matmul, register_role
from jlora.peft import base as B

IA3_L = register_role("ia3", False)  # a multiplicative scale (neutral at 1): never weight-decayed


@struct.dataclass
class IA3(KernelWrapper):
    """A kernel ``W`` ``[in, out]`` with a learned (IA)^3 vector.

    Attributes:
      base: the frozen kernel ``[in, out]`` (an array or another wrapper, e.g. a quantized one).
      scale: the learned vector ``l`` (trainable; PEFT's ``ia3_l``): ``[in]`` for a feed-forward module (scales
        the layer's input), ``[out]`` otherwise (scales the layer's output, bias included).
      feedforward: which of the two; static.
    """

    base: Any
    scale: jax.Array
    feedforward: bool = struct.field(pytree_node=False, default=False)

    def matmul(self, x):
        """``x @ W'`` for the scaled kernel (no bias): ``(x * l) @ W`` or ``(x @ W) * l``."""
        if self.feedforward:
            return matmul(x * self.scale.astype(x.dtype), self.base)
        y = matmul(x, self.base)
        return y * self.scale.astype(y.dtype)

    def linear(self, x, bias):
        if self.feedforward:  # the bias is added after the scaled matmul, unchanged
            y = self.matmul(x)
            return y if bias is None else y + bias.astype(y.dtype)
        y = linear(x, self.base, bias)  # PEFT scales the base layer's whole output, bias included
        return y * self.scale.astype(y.dtype)

    def _scaled(self, kernel):
        """``kernel`` (plain ``[in, out]``) with ``l`` folded in: float32 math, one cast back."""
        l32 = self.scale.astype(jnp.float32)
        l32 = l32[:, None] if self.feedforward else l32[None, :]
        return (kernel.astype(jnp.float32) * l32).astype(kernel.dtype)

    def materialize(self):
        return self._scaled(materialize(self.base))

    def merge_linear(self, bias):
        if isinstance(self.base, KernelWrapper):
            kernel, bias = self.base.merge_linear(bias)
        else:
            kernel = self.base
        kernel = self._scaled(kernel)
        if bias is not None and not self.feedforward:
            bias = (bias.astype(jnp.float32) * self.scale.astype(jnp.float32)).astype(bias.dtype)
        return kernel, bias

    def row_terms(self):
        return {"base": self.base, ("in_scale" if self.feedforward else "out_scale"): self.scale.astype(jnp.float32)}

    def labels(self, label_base):
        return self.replace(base=label_base(self.base), scale=IA3_L)

    def shard(self, spec_in, spec_out, fits):
        base = self.base.shard(spec_in, spec_out, fits) if isinstance(self.base, KernelWrapper) else \
            (spec_in, spec_out)
        axes = spec_in if self.feedforward else spec_out  # the vector follows the axis it scales
        return self.replace(base=base, scale=(fits(self.scale.shape[0], axes),))


DEFAULT_FEEDFORWARD = {"gpt2": ("mlp.c_proj",), "llama": ("down_proj",)}


def _ends_with_any(name: str, entries) -> bool:
    return any(name.endswith(e) for e in entries)


@dataclasses.dataclass(frozen=True)
class IA3Config(B.TargetRules):
    """Which kernels get an (IA)^3 vector, and which of them scale their input (PEFT's `IA3Config`).

    Args:
      target_modules: a list of module names matched exactly or as a dotted suffix, a regex string matched
        against the full dotted module name, or ``"all-linear"`` (see `jlora.peft.base.TargetRules`). Default
        (None): PEFT's IA3 defaults, ``c_attn`` and ``mlp.c_proj`` for GPT-2, ``k_proj``, ``v_proj`` and
        ``down_proj`` for Llama.
      feedforward_modules: the targets whose vector scales the input (PEFT's rule: a regex string matched against
        the full name, or a list whose entries the name ends with). As lists, a subset of ``target_modules``.
        Default (None): ``mlp.c_proj`` (GPT-2), ``down_proj`` (Llama).
      exclude_modules: modules never adapted (list or regex, as ``target_modules``).
      layers_to_transform: only these layer indices (an int or a list); with ``layers_pattern``, the name of the
        layer list to read the index after. PEFT's `IA3Config` has no such option: such an adapter is written to
        PEFT with the selected modules listed by name.
      layers_pattern: see ``layers_to_transform``.
      modules_to_save: whole modules trained in full and saved with the adapter (``["lm_head"]``).
      init_ia3_weights: True (every vector starts at ones: the identity) or False (standard-normal vectors, as
        PEFT: a non-identity adapter, for tests).
      dtype: dtype of the vectors (float32 keeps trainable weights in full precision).

    Example:
      >>> icfg = IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
      >>> icfg.is_feedforward("model.layers.0.mlp.down_proj")
      True
    """

    target_modules: Union[str, Tuple[str, ...], None] = None
    feedforward_modules: Union[str, Tuple[str, ...], None] = None
    exclude_modules: Union[str, Tuple[str, ...], None] = None
    layers_to_transform: Union[int, Tuple[int, ...], None] = None
    layers_pattern: Union[str, Tuple[str, ...], None] = None
    modules_to_save: Optional[Tuple[str, ...]] = None
    init_ia3_weights: bool = True
    dtype: str = "float32"

    DEFAULT_TARGETS = {"gpt2": ("c_attn", "mlp.c_proj"), "llama": ("k_proj", "v_proj", "down_proj")}

    def __post_init__(self):
        self._normalize_targets()
        ff = self.feedforward_modules
        if isinstance(ff, (list, set, frozenset)):
            ff = tuple(sorted(ff)) if isinstance(ff, (set, frozenset)) else tuple(ff)
            object.__setattr__(self, "feedforward_modules", ff)
        if ff is not None and not isinstance(ff, (str, tuple)):
            raise ValueError(f"IA3Config.feedforward_modules must be a list of module names or a regex string, got "
                             f"{ff!r}")
        if isinstance(ff, tuple) and not all(isinstance(e, str) and e for e in ff):
            raise ValueError(f"IA3Config.feedforward_modules entries must be non-empty strings, got {list(ff)!r}")
        if isinstance(ff, str):
            try:
                re.compile(ff)
            except re.error as e:
                raise ValueError(f"IA3Config.feedforward_modules {ff!r} is not a valid regex ({e})") from None
        if isinstance(ff, tuple) and isinstance(self.target_modules, tuple):
            # PEFT's IA3Config.__post_init__ refuses this too (and so would PEFT on loading the saved file).
            extra = [e for e in ff if e not in self.target_modules]
            if extra:
                raise ValueError(f"IA3Config.feedforward_modules must be a subset of target_modules (PEFT's rule): "
                                 f"{extra[0]!r} is not in target_modules {list(self.target_modules)!r}")
        if not isinstance(self.init_ia3_weights, bool):
            raise ValueError(f"IA3Config.init_ia3_weights must be true or false, got {self.init_ia3_weights!r}")
        try:
            jnp.dtype(self.dtype)
        except TypeError:
            raise ValueError(f"IA3Config.dtype {self.dtype!r} is not a dtype name") from None

    def replace(self, **changes) -> "IA3Config":
        return dataclasses.replace(self, **changes)

    def feedforward_for_arch(self, arch: str) -> Union[str, Tuple[str, ...]]:
        """``feedforward_modules``, or the defaults for ``arch`` when it is None."""
        if self.feedforward_modules is not None:
            return self.feedforward_modules
        if arch not in DEFAULT_FEEDFORWARD:
            raise ValueError(f"IA3Config: no default feedforward_modules for the {arch!r} architecture; set "
                             f"feedforward_modules")
        return DEFAULT_FEEDFORWARD[arch]

    def is_feedforward(self, name: str, arch: Optional[str] = None) -> bool:
        """Whether the (targeted) module ``name`` scales its input rather than its output (PEFT's rule: a regex
        string must match the whole name; a list entry matches when the name ends with it, no dot boundary)."""
        if arch is None:
            arch = "gpt2" if name.startswith("transformer.") or ".h." in name else "llama"
        ff = self.feedforward_for_arch(arch)
        if isinstance(ff, str):
            return re.fullmatch(ff, name) is not None
        return _ends_with_any(name, ff)

    def names_targeted(self, name: str, arch: str) -> bool:
        """Whether ``target_modules`` names ``name`` (PEFT's name rule only: without ``exclude_modules``,
        ``layers_to_transform`` and ``modules_to_save``, which may leave out some modules of a targeted name)."""
        return dataclasses.replace(self, exclude_modules=None, layers_to_transform=None, layers_pattern=None,
                                   modules_to_save=None).selects(name, arch)

    def check_feedforward(self, params, arch: str) -> None:
        """Refuses explicit ``feedforward_modules`` that name a module ``target_modules`` does not target.

        `IA3Config` checks the subset rule when both are lists; this also covers default targets and regexes.
        """
        if self.feedforward_modules is None:
            return  # the defaults: PEFT fills them in whatever the targets are, harmlessly
        targets = self.targets_for_arch(arch)
        ff = self.feedforward_modules
        if isinstance(ff, tuple) and isinstance(targets, tuple):
            extra = [e for e in ff if e not in targets]
            if extra:
                raise ValueError(f"IA3Config.feedforward_modules must be a subset of target_modules (PEFT's rule): "
                                 f"{extra[0]!r} is not in target_modules {list(targets)!r}"
                                 + (f" (the {arch} defaults)" if self.target_modules is None else ""))
        for name in sorted(T.linear_modules(params), key=T.natural_key):
            if self.is_feedforward(name, arch) and not self.names_targeted(name, arch):
                raise ValueError(f"IA3Config.feedforward_modules {ff!r} selects {name}, which target_modules "
                                 f"{targets!r} does not target; a feed-forward module must be a target")


def init(key: jax.Array, cfg: ModelConfig, params, icfg: IA3Config):
    """Wraps the target kernels of ``params`` in `IA3` (a new tree; ``params`` is not modified).

    Args:
      key: PRNG key (used only with ``init_ia3_weights=False``).
      cfg: model config.
      params: base parameter tree.
      icfg: the (IA)^3 config.

    Returns:
      the parameter tree with `IA3` kernels at the targets (``modules_to_save`` marked for full training).

    Raises:
      ValueError naming the option: targets that match nothing, feed-forward modules that are no target.

    Example:
      >>> tuned = jlora.peft.ia3.init(jax.random.key(0), cfg, params, IA3Config())  # k, v and down_proj
      >>> k = tuned["model"]["layers"]["0"]["self_attn"]["k_proj"]["kernel"]
      >>> type(k).__name__, k.scale.shape, float(k.scale.min()), k.feedforward  # scales start at one
      ('IA3', (32,), 1.0, False)
    """
    names = icfg.select(params, cfg.arch)
    if not names:
        raise B.no_match_error(icfg, params, cfg.arch)
    icfg.check_feedforward(params, cfg.arch)
    dt = jnp.dtype(icfg.dtype)
    new = {}
    for i, name in enumerate(names):
        kernel = T.get_module(params, name)["kernel"]
        B.check_free(name, kernel, "ia3.init")
        ff = icfg.is_feedforward(name, cfg.arch)
        n = kernel.shape[0] if ff else kernel.shape[-1]
        if icfg.init_ia3_weights:
            vec = jnp.ones((n,), dt)
        else:  # PEFT: torch.randn
            vec = jax.random.normal(jax.random.fold_in(key, i), (n,), jnp.float32).astype(dt)
        new[name] = IA3(base=kernel, scale=vec, feedforward=ff)
    return B.finish_init(cfg, T.replace_modules(params, new), icfg)


def strip(params):
    """The tree with every PEFT method removed (see `jlora.peft.base.strip`): ``strip(init(p)) == p``."""
    return B.strip(params)


def adapters(params) -> Dict[str, IA3]:
    """{module name: IA3 wrapper} for every (IA)^3 kernel in the tree."""
    return {name: k for name, k in T.linear_modules(params).items() if isinstance(k, IA3)}


METHOD = B.register(B.Method(
    kind="ia3", config=IA3Config, init=init, nodes=(IA3,), codec="jlora.convert.peft_ia3:IA3_CODEC",
    claims=lambda pconf: str(pconf.get("peft_type", "")).upper() == "IA3", peft_type="IA3",
    summary="(IA)^3: a learned vector scales the target layers' outputs (or, feed-forward, their inputs)"))
