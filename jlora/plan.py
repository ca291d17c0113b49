"""The memory planner behind ``jlora plan``: will a fine-tuning run fit a device, and if not, what would it take?

`plan` estimates, per device, the bytes of one train step of `jlora.train.make_train_step` (AdamW from
`jlora.train.make_optimizer`) for any registered method, without allocating anything:

* **state**: parameters (frozen base, trainable leaves, a quantized base's stored bytes) and the optimizer
  state (Adam ``mu`` + ``nu`` in float32 per trainable leaf, a count per role), counted exactly from the real
  method init run abstractly (`jax.eval_shape`), so every method in the registry is covered;
* **gradients**: one buffer per trainable leaf (only the trainable part is differentiated);
* **activations**: what the backward pass keeps of the forward (the model below), with and without
  rematerialization, plus the loss head (``[B, T, vocab]`` float32 logits, their softmax and gradient), which
  dominates small models;
* FLOPs per token, an estimated step time from the device's peak (at an assumed MFU, `ASSUMED_MFU`), the
  checkpoint size on disk, and for every device in `DEVICES` whether the step fits and what it would take
  (`what_it_takes`: remat, an FSDP degree, QLoRA).

`measure` compiles the same step on the same abstract state (shapes only, nothing allocated) and returns XLA's
own memory analysis, which the tests hold the estimate to (within 15% for every method, with and without remat,
and under FSDP on simulated devices).

The activation model (bytes kept for the backward pass; ``a`` = bytes of the compute dtype, ``BT`` = tokens
per device, ``d, f, q, kv`` = model width, MLP width, query and key/value widths, ``S`` = attended keys,
``H`` = query heads, ``V`` = vocabulary padded to 128):

* per layer, without remat: ``a BT (c_d d + c_qkv (q + 2 kv) + c_f f) + 4 c_s H B T S`` (the last term: the
  attention scores/probabilities of XLA's attention, softmax in float32; cuDNN's fused attention on a GPU keeps
  none, so there the estimate errs high), coefficients per (architecture, whether the base's weights train)
  fitted to XLA's buffer assignment (`_COEF`); full fine-tuning keeps more (every matmul input, for the weight
  gradients). Method nodes add what they keep per token (a LoRA factor's ``[BT, r]``, DoRA's ``[BT, out]``, an
  IA3 scale's ``[BT, in or out]``, a bottleneck's ``[BT, bottleneck]``); prefix tuning adds ``P`` keys, prompt
  tuning ``P`` positions. The backward pass stops at the lowest trainable leaf: layers below it keep nothing
  (a bottleneck adapter after the first MLP needs none of the first layer);
* with remat (``cfg.remat``: each block recomputed in the backward pass), every layer keeps only its input
  ``a BT d`` and one layer's working set is live at a time;
* the loss head: ``4 c_v BT V`` (float32 logits, their exponentials and gradient), plus a padded copy of the
  head matrix when the vocabulary is not a multiple of 128;
* full fine-tuning: the embedding/head gradients are made first and live through the backward pass.

The step's peak is ``state + max(activations + early gradients, gradients + AdamW temporaries)``: the
activations are freed layer by layer while the gradients fill up, so the two do not peak together. Parameters,
gradients and optimizer state divide by ``fsdp x tensor``; activations follow the batch per device
(``batch / (data x fsdp)``); FSDP adds two layers of gathered weights.

On ``cpu`` (`Plan.bytes_on`) two facts of XLA's CPU compiler, measured, change the answer: 16-bit activations
take float32 buffers, and remat saves nothing (the recomputation is scheduled early, so its buffers are as
live as stored activations: the compiled step's temporaries are equal with and without remat). The remat model
for GPUs and TPUs (whose schedulers do realize it) is not checked against XLA here.

Example:
  >>> p = plan(cfg, "lora", batch=2, seq=16)
  >>> p.trainable_params, p.fits("gpu-24g")
  (3584, True)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Dict, List, Optional, Sequence, Tuple

GiB = 1024 ** 3

# Fraction of a device's memory a step may use: the runtime, the compiled program and fragmentation take the rest.
USABLE = 0.9
# Step time = FLOPs / (peak * ASSUMED_MFU): 40% of peak is what a well-tuned dense fine-tuning step reaches on
# GPUs and TPUs (PaLM/MaxText-style MFU numbers); on CPUs take the estimate as an order of magnitude.
ASSUMED_MFU = 0.4


@dataclasses.dataclass(frozen=True)
class Device:
    """A device (one chip) the planner knows: usable memory and dense bf16 peak FLOP/s."""

    name: str
    memory_bytes: int
    peak_flops: float
    label: str


def _cpu_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 16 * GiB


def _cpu_peak() -> float:
    # AVX2/AVX-512 FMA: ~32 float32 FLOPs per cycle per core at ~2.5 GHz (an order of magnitude, see ASSUMED_MFU).
    return (os.cpu_count() or 1) * 32 * 2.5e9


def _devices() -> Dict[str, Device]:
    # Peaks: dense bf16 (the table of experiments/throughput.py); memory: what the runtime reports per chip.
    rows = [
        Device("cpu", _cpu_memory(), _cpu_peak(), f"this machine's RAM ({os.cpu_count()} cores)"),
        Device("gpu-24g", 24 * GiB, 121e12, "24 GB GPU (L4 / RTX 4090 class)"),
        Device("gpu-48g", 48 * GiB, 362e12, "48 GB GPU (L40S / A6000 class)"),
        Device("gpu-80g", 80 * GiB, 312e12, "80 GB GPU (A100-80GB; H100 has 3x the peak)"),
        Device("gpu-141g", 139 * GiB, 989e12, "141 GB GPU (H200)"),
        Device("tpu-v4", 32 * GiB, 275e12, "TPU v4 chip (32 GiB HBM)"),
        Device("tpu-v5e", 16 * GiB, 197e12, "TPU v5e chip (16 GiB HBM)"),
        Device("tpu-v5p", 95 * GiB, 459e12, "TPU v5p chip (95 GiB HBM)"),
    ]
    return {d.name: d for d in rows}


DEVICES: Dict[str, Device] = _devices()


def device(name: str) -> Device:
    """The named device; an unknown name is a ValueError listing the known ones."""
    if name not in DEVICES:
        raise ValueError(f"unknown device {name!r}; known devices: {', '.join(DEVICES)}")
    return DEVICES[name]


# ----------------------------------------------------------------------------------------------------------
# Models: presets, HF config.json, and public Llama architectures for the decision matrix


def _llama(name, layers, d, ff, heads, kv, vocab, tie=False):
    from jlora.config import ModelConfig

    return ModelConfig(arch="llama", vocab_size=vocab, max_positions=8192, d_model=d, n_layers=layers,
                       n_heads=heads, n_kv_heads=kv, d_ff=ff, rope_theta=500000.0, tie_embeddings=tie, name=name)


# Public architectures (layers, d_model, d_ff, heads, kv heads, vocab): Llama 3.2 1B/3B, Llama 2 7B/13B, Llama 3 70B.
LLAMA_CONFIGS = {
    "llama-1b": _llama("llama-1b", 16, 2048, 8192, 32, 8, 128256, tie=True),
    "llama-3b": _llama("llama-3b", 28, 3072, 8192, 24, 8, 128256, tie=True),
    "llama-7b": _llama("llama-7b", 32, 4096, 11008, 32, 32, 32000),
    "llama-13b": _llama("llama-13b", 40, 5120, 13824, 40, 40, 32000),
    "llama-70b": _llama("llama-70b", 80, 8192, 28672, 64, 8, 128256),
}
MATRIX_MODELS = ("gpt2", "smollm2-135m", "gpt2-medium", "gpt2-large", "gpt2-xl", "llama-1b", "llama-3b",
                 "llama-7b", "llama-13b", "llama-70b")


def model_config(spec: str):
    """A `ModelConfig` from a preset name (`jlora.PRESETS` or `LLAMA_CONFIGS`), an HF model directory, a
    directory holding only ``config.json``, or a ``config.json`` file: nothing but the config is read."""
    from jlora.config import PRESETS
    from jlora.convert.hf import config_from_hf

    if spec in PRESETS:
        return PRESETS[spec]
    if spec in LLAMA_CONFIGS:
        return LLAMA_CONFIGS[spec]
    if spec == "smollm2":  # the built-in model: its GGUF file's config when installed, else the same preset
        from jlora.model_path import find_default_model

        spec = find_default_model() or "smollm2-135m"
        if spec == "smollm2-135m":
            return PRESETS[spec]
    if spec.endswith(".gguf") and os.path.isfile(spec):
        from jlora.convert.gguf import _open, config_from_gguf

        return config_from_gguf(_open(spec), spec)
    path = os.path.join(spec, "config.json") if os.path.isdir(spec) else spec
    if not os.path.isfile(path) or not path.endswith(".json"):
        known = ", ".join(sorted(PRESETS) + list(LLAMA_CONFIGS))
        raise FileNotFoundError(f"--model {spec!r}: not a preset ({known}) nor a directory with a config.json")
    with open(path) as f:
        try:
            hf = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
    return config_from_hf(hf, path)


# ----------------------------------------------------------------------------------------------------------
# The abstract train state (shapes only): the same tree `jlora train` builds


def _abstract_quantize(params, quantize):
    """``params`` (ShapeDtypeStructs) with the linear kernels `jlora.quant.quantize_params` would quantize
    replaced by `Quant4bit` / `Int8` nodes of ShapeDtypeStructs (the layout `quantize_kernel` produces)."""
    import jax
    import numpy as np

    from jlora import tree as T
    from jlora.quant import NESTED_BLOCK, Int8, Quant4bit, QuantConfig

    qcfg = QuantConfig.of(quantize)
    sds = jax.ShapeDtypeStruct
    new = {}
    for name in T.linear_modules(params):
        if not qcfg.selects(name):
            continue
        n_in, n_out = T.get_module(params, name)["kernel"].shape
        if qcfg.quant == "int8":
            new[name] = Int8(q=sds((n_in, n_out), np.int8), scale=sds((n_out,), np.float32))
            continue
        n = n_in * n_out
        blocks = -(-n // qcfg.block_size)
        if qcfg.double_quant:
            new[name] = Quant4bit(codes=sds((-(-n // 2),), np.uint8), absmax=sds((blocks,), np.uint8),
                                  nested_absmax=sds((-(-blocks // NESTED_BLOCK),), np.float32),
                                  offset=sds((), np.float32), in_out=(n_in, n_out), quant_type=qcfg.quant,
                                  block_size=qcfg.block_size)
        else:
            new[name] = Quant4bit(codes=sds((-(-n // 2),), np.uint8), absmax=sds((blocks,), np.float32),
                                  in_out=(n_in, n_out), quant_type=qcfg.quant, block_size=qcfg.block_size)
    if not new:
        raise ValueError(f"quantize {quantize!r} selected no linear layer")
    return T.replace_modules(params, new)


def _method_config(method: str, options: Optional[dict]):
    from jlora.peft import base as B

    m = B.get(method)  # an unknown kind: ValueError listing the known ones
    return m, m.make_config(dict(options or {}), "plan")


def abstract_state(cfg, method: str = "lora", method_options: Optional[dict] = None, quantize=None,
                   base_dtype: Optional[str] = None):
    """(params, labels, tx, state) of a run as `jlora.run.build_model` would make it, as ShapeDtypeStructs.

    Args:
      cfg: model config.
      method: a registered method kind (`jlora.methods.kinds`).
      method_options: the method config's fields (a run config's ``[method]`` table).
      quantize: None, ``"nf4"``, ``"fp4"``, ``"int8"`` or a `jlora.quant.QuantConfig` (the frozen base).
      base_dtype: storage of the frozen base of a PEFT method (default float32); full fine-tuning trains fp32.
    """
    key = json.dumps(method_options or {}, sort_keys=True, default=str)
    q = quantize if quantize is None or isinstance(quantize, (str, dict)) else dataclasses.astuple(quantize)
    return _abstract_state(cfg, method, key, json.dumps(q, sort_keys=True), base_dtype)


@functools.lru_cache(maxsize=32)
def _abstract_state(cfg, method, options_json, quantize_json, base_dtype):
    # Cached: the decision matrix and `what_it_takes` plan the same trees many times (a 70B tree takes ~1 s).
    import jax
    import jax.numpy as jnp

    from jlora import train
    from jlora import tree as T
    from jlora.model import init_params
    from jlora.quant import QuantConfig

    method_options, quantize = json.loads(options_json), json.loads(quantize_json)
    if isinstance(quantize, list):
        quantize = QuantConfig(*quantize)
    m, mcfg = _method_config(method, method_options)
    if quantize and m.kind == "full":
        raise ValueError(f"quantize {quantize!r} with method 'full': a quantized base is frozen; plan an adapter on "
                         f"it (method 'lora': QLoRA)")
    if m.kind == "full":
        base_dtype = "float32"
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0), jnp.dtype(base_dtype or "float32")))
    if quantize:
        params = _abstract_quantize(params, quantize)
    if m.kind != "full":
        params = jax.eval_shape(lambda p: m.init(jax.random.key(1), cfg, p, mcfg), params)
    labels = T.trainable_labels(params)
    tx = train.make_optimizer(labels, 1e-4)
    state = jax.eval_shape(lambda p: train.init_state(p, tx, 0), params)
    return params, labels, tx, state


def abstract_batch(batch: int, seq: int):
    import jax
    import jax.numpy as jnp

    return {"input_ids": jax.ShapeDtypeStruct((batch, seq + 1), jnp.int32)}


# ----------------------------------------------------------------------------------------------------------
# The estimate


# Activation coefficients (see the module docstring), fitted by least squares to XLA's buffer assignment of the
# real step (CPU, float32; configs varying layers, width, MLP width, heads, vocabulary and sequence length; the
# fit's worst error was 12%): {(arch, base trains): (c_d, c_qkv, c_f, c_s, c_v)}. Full fine-tuning keeps more:
# every matmul input, for the weight gradients.
_COEF = {
    ("llama", False): (1.9, 1.0, 4.75, 2.27, 1.96),
    ("llama", True): (6.2, 2.0, 6.7, 1.85, 2.1),
    ("gpt2", False): (4.4, 1.0, 2.45, 2.7, 1.9),
    ("gpt2", True): (9.2, 2.0, 3.1, 2.5, 1.95),
}
_C_OPT = 0.5  # AdamW's update temporaries, in gradient sizes, besides the gradients (XLA fuses most of it)


def _nbytes(x) -> int:
    import numpy as np

    return int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize


@dataclasses.dataclass
class Plan:
    """The estimate for one run configuration (bytes are per device). See `plan`."""

    model: str
    method: str
    quantize: Optional[str]
    batch: int
    seq: int
    dtype: str
    base_dtype: str
    remat: bool
    mesh: Dict[str, int]
    total_params: int
    trainable_params: int
    components: Dict[str, int]
    activations_no_remat: int
    activations_remat: int
    activations_cpu: int
    checkpoint_bytes: int
    adapter_bytes: int
    flops_per_token: float
    model_flops_per_token: float
    tokens_per_device: int
    n_layers: int

    @property
    def n_devices(self) -> int:
        return math.prod(self.mesh.values())

    @property
    def total_bytes(self) -> int:
        c = self.components
        state = c["params_frozen"] + c["params_trainable"] + c["optimizer"] + c["batch"]
        peak = max(c["activations"] + c["early_gradients"], c["gradients"] + c["optimizer_temp"])
        return state + peak + c["fsdp_gather"]

    def bytes_on(self, name: str) -> int:
        """``total_bytes`` on a ``name`` device. On ``cpu`` XLA computes 16-bit activations in float32 and remat
        saves nothing (its scheduler runs the recomputation early, so those buffers are as live as stored
        activations): measured, the compiled step's temporaries are the same with and without ``cfg.remat``
        and with bfloat16 or float32 compute."""
        if device(name).name == "cpu":
            c = dict(self.components, activations=self.activations_cpu)
            return dataclasses.replace(self, components=c).total_bytes
        return self.total_bytes

    def with_remat(self, remat: bool) -> int:
        """``total_bytes`` had the run been planned with (or without) remat."""
        c = dict(self.components)
        c["activations"] = self.activations_remat if remat else self.activations_no_remat
        return dataclasses.replace(self, components=c, remat=remat).total_bytes

    def fits(self, name: str) -> bool:
        """Whether the step fits `USABLE` of one ``name`` device's memory (`DEVICES`)."""
        return self.bytes_on(name) <= USABLE * device(name).memory_bytes

    def step_seconds(self, name: str) -> float:
        """Estimated seconds per step on ``name`` devices: FLOPs per device / (peak * `ASSUMED_MFU`)."""
        return self.tokens_per_device * self.flops_per_token / (device(name).peak_flops * ASSUMED_MFU)

    def to_dict(self) -> dict:
        out = {k: v for k, v in dataclasses.asdict(self).items()}
        out["n_devices"] = self.n_devices
        out["total_bytes"] = self.total_bytes
        out["assumed_mfu"] = ASSUMED_MFU
        out["usable_fraction"] = USABLE
        out["devices"] = {n: {"memory_bytes": d.memory_bytes, "bytes": self.bytes_on(n), "fits": self.fits(n),
                              "step_seconds": self.step_seconds(n), "what_it_takes": what_it_takes(self, n)}
                          for n, d in DEVICES.items()}
        return out


def _layer_extras(cfg, params, labels, bt: int, a: int) -> int:
    """Bytes per layer that the method's nodes keep per token (see the module docstring), from the first
    layer's trainable leaves."""
    import jax
    import numpy as np

    from jlora import tree as T
    from jlora.kernels import Hook, KernelWrapper, is_node
    from jlora.model import layers

    total = 0
    for x, lab in zip(jax.tree_util.tree_leaves(layers(cfg, params)[0], is_leaf=is_node),
                      jax.tree_util.tree_leaves(layers(cfg, labels)[0], is_leaf=is_node)):
        if not is_node(x):
            continue
        dims = [np.shape(l) for l, r in zip(jax.tree_util.tree_leaves(x), jax.tree_util.tree_leaves(lab))
                if r != T.FROZEN]
        if not dims:
            continue
        mats = [s for s in dims if len(s) == 2]
        if isinstance(x, KernelWrapper):
            n_out = x.shape[1]
            if mats:  # low-rank factors: the [BT, r] intermediate (DoRA: also its [BT, out] pre-scale output)
                dora = any(len(s) == 1 for s in dims)
                total += bt * min(mats[0]) * a + (bt * n_out * a if dora else 0)
            else:  # a scaling vector (IA3): the unscaled input or output
                total += bt * max(s[0] for s in dims if len(s) == 1) * a
        elif isinstance(x, Hook) and mats:  # a bottleneck: down projection, activation, up projection
            total += bt * (2 * min(min(s) for s in mats) + cfg.d_model) * a
    return total


def _first_trainable(cfg, labels) -> Tuple[int, int]:
    """(the lowest layer the backward pass must reach, how much of it: 0 attention and MLP, 1 the MLP only (a
    trainable leaf after the attention: an ``attn_out`` hook, MLP targets), 2 neither (an ``mlp_out`` hook))."""
    import jax

    from jlora import tree as T

    root, stack = ("transformer", "h") if cfg.arch == "gpt2" else ("model", "layers")
    best = (cfg.n_layers, 2)
    for path, lab in jax.tree_util.tree_flatten_with_path(labels)[0]:
        if lab == T.FROZEN:
            continue
        parts = T.path_parts(path)
        if len(parts) > 3 and parts[0] == root and parts[1] == stack and parts[2].isdigit():
            where = parts[3:]
            if where[0] == "hooks":
                stage = 2 if where[1] == "mlp_out" else 1
            elif where[0] in ("mlp", "ln_2", "post_attention_layernorm"):
                stage = 1
            else:
                stage = 0
            here = (int(parts[2]), stage)
        elif parts[0] == "lm_head" or (len(parts) > 1 and parts[0] == root and parts[1] in ("ln_f", "norm")):
            continue  # the head: no backward into the layers for it
        else:  # embeddings, prompt / prefix hooks: every layer, attention included
            here = (0, 0)
        best = min(best, here)
    return best


def plan(cfg, method: str = "lora", method_options: Optional[dict] = None, quantize=None, batch: int = 8,
         seq: int = 512, dtype: Optional[str] = None, remat: Optional[bool] = None, mesh=None,
         base_dtype: Optional[str] = None, optimizer: str = "adamw", name: Optional[str] = None) -> Plan:
    """Estimates the per-device memory, FLOPs and step time of one train step (nothing is allocated).

    Args:
      cfg: model config (`model_config` reads one from a preset or an HF ``config.json``).
      method: a registered method kind; ``method_options`` its config's fields (PEFT's names).
      quantize: a quantized frozen base (``"nf4"``: QLoRA with ``method="lora"``).
      batch, seq: the global batch (sequences) and tokens per sequence.
      dtype: compute dtype (default ``cfg.dtype``); ``base_dtype``: storage of a PEFT method's frozen base
        (default: the compute dtype, as one would run it; full fine-tuning keeps float32 weights).
      remat: rematerialize each block (default ``cfg.remat``).
      mesh: ``"data=2,fsdp=4"`` or a dict (`jlora.parallel.parse_mesh_spec`); ``None``: one device.
      optimizer: ``"adamw"`` (`jlora.train.make_optimizer`), the only one `jlora train` builds.

    Returns:
      a `Plan`.
    """
    from jlora import tree as T
    from jlora.model import virtual_tokens
    from jlora.parallel.rules import parse_mesh_spec
    from jlora.train import VOCAB_PAD

    if optimizer != "adamw":
        raise ValueError(f"optimizer {optimizer!r}: jlora trains with 'adamw' (jlora.train.make_optimizer)")
    if batch < 1 or seq < 1:
        raise ValueError(f"batch and seq must be positive, got batch={batch}, seq={seq}")
    dtype = dtype or cfg.dtype
    remat = cfg.remat if remat is None else bool(remat)
    base_dtype = base_dtype or (dtype if method != "full" else "float32")
    cfg = cfg.replace(dtype=dtype, remat=remat)
    sizes = parse_mesh_spec(mesh or {"data": 1})
    if any(v == -1 for v in sizes.values()):
        raise ValueError(f"mesh {mesh!r}: give every axis a size to plan (no -1)")
    dp, shard = sizes["data"] * sizes["fsdp"], sizes["fsdp"] * sizes["tensor"]
    if batch % dp:
        raise ValueError(f"batch {batch} is not divisible by the data-parallel size data x fsdp = {dp}")
    params, labels, _, state = abstract_state(cfg, method, method_options, quantize, base_dtype)

    import jax
    import numpy as np

    from jlora.kernels import is_node
    from jlora.quant import is_quantized

    # State, counted from the abstract tree (parameters and optimizer leaves shard as 1 / (fsdp x tensor)).
    frozen = trainable = quant = 0
    for l, x in zip(jax.tree_util.tree_leaves(labels), jax.tree_util.tree_leaves(params)):
        if l == T.FROZEN:
            frozen += _nbytes(x)
        else:
            trainable += _nbytes(x)
    for x in jax.tree_util.tree_leaves(params, is_leaf=is_node):
        if is_quantized(x):
            quant += sum(_nbytes(l) for l in jax.tree_util.tree_leaves(x))
    opt = sum(_nbytes(x) for x in jax.tree_util.tree_leaves(state.opt_state))
    rep = T.param_report(params, labels)

    b = batch // dp
    t_virtual = virtual_tokens(cfg, params)
    prompt = t_virtual and "input_prefix" in str(jax.tree_util.tree_structure(params))
    t = seq + (t_virtual if prompt else 0)  # prompt tuning: the virtual tokens run through every layer
    s = t + (0 if prompt else t_virtual)  # prefix tuning: P more keys per query
    bt = b * t
    tp = sizes["tensor"]
    d, f, hd = cfg.d_model, cfg.d_ff, cfg.dim_head
    q, kv = cfg.n_heads * hd, cfg.kv_heads * hd
    base_trains = method == "full"
    c_d, c_qkv, c_f, c_s, c_v = _COEF[(cfg.arch, base_trains)]
    heads = cfg.n_heads // min(tp, cfg.n_heads)
    # The backward pass stops at the lowest trainable leaf: layers below it keep nothing, and a layer whose
    # trainable leaves all sit after its attention (bottleneck adapters, MLP-only targets) keeps no attention.
    first, stage = _first_trainable(cfg, labels)
    n_keep = cfg.n_layers - first
    v = -(-cfg.vocab_size // VOCAB_PAD) * VOCAB_PAD
    head = c_v * 4 * b * seq * v / tp
    if v != cfg.vocab_size:  # the loss pads the head to a multiple of VOCAB_PAD: a padded copy of the matrix
        head += v * d * np.dtype(dtype).itemsize / tp

    def activations(a: int) -> Tuple[int, int]:
        """(without remat, with remat) for activations of ``a`` bytes."""
        attn_part = a * bt * (c_d / 2 * d + c_qkv * (q + 2 * kv) / tp) + c_s * 4 * b * heads * t * s
        mlp_part = a * bt * (c_d / 2 * d + c_f * f / tp)
        per_layer = attn_part + mlp_part + _layer_extras(cfg, params, labels, bt, a)
        kept = n_keep * per_layer
        if n_keep:
            kept -= (attn_part if stage >= 1 else 0) + (mlp_part if stage >= 2 else 0)
        # The forward pass's own peak (one layer's attention in flight) bounds the activations from below.
        transient = c_s / 2 * 4 * b * heads * t * s + a * bt * (q + 2 * kv) / tp
        return (int(max(kept, transient + a * bt * d * n_keep) + head),
                int(min(kept, n_keep * a * bt * d + per_layer) + head))

    acts_plain, acts_remat = activations(np.dtype(dtype).itemsize)
    # XLA on CPU computes 16-bit ops in float32 (its buffers are float32-sized) and does not realize remat.
    acts_cpu = activations(4)[0]
    # Full fine-tuning: the embedding / head gradients are made first and live through the whole backward pass.
    early = 0
    if base_trains:
        early = 4 * v * d * (1 if cfg.tie_embeddings else 2) // shard
    grads = trainable
    components = {
        "params_frozen": frozen // shard,
        "params_trainable": trainable // shard,
        "quantized_base": quant // shard,  # included in params_frozen
        "gradients": grads // shard,
        "optimizer": opt // shard,
        "optimizer_temp": int(_C_OPT * grads) // shard,
        "activations": acts_remat if remat else acts_plain,
        "early_gradients": early,
        "batch": batch * (seq + 1) * 4 // dp,
        # FSDP: a layer's weights are gathered where they are used (two layers in flight: compute + prefetch).
        "fsdp_gather": 0 if sizes["fsdp"] == 1 else int(2 * (frozen + trainable) / cfg.n_layers
                                                            * (1 - 1 / shard)),
    }
    n = cfg.num_params()
    attn = 12 * cfg.n_layers * seq * d
    model_flops = 6 * n + attn
    # Work actually done: no weight gradient for a frozen matrix (forward 2N + input gradients 2N).
    done = model_flops if base_trains else 4 * n + attn
    if method == "full":
        adapter = sum(_nbytes(x) for x in jax.tree_util.tree_leaves(params))
    else:
        adapter = trainable
    return Plan(model=name or cfg.name, method=method, quantize=None if not quantize else str(
        getattr(quantize, "quant", quantize)), batch=batch, seq=seq, dtype=dtype, base_dtype=base_dtype,
        remat=remat, mesh=sizes, total_params=rep["total"], trainable_params=rep["trainable"],
        components=components, activations_no_remat=acts_plain, activations_remat=acts_remat,
        activations_cpu=acts_cpu,
        checkpoint_bytes=frozen + trainable + opt if method == "full" else trainable + opt,
        adapter_bytes=adapter, flops_per_token=float(done) / tp, model_flops_per_token=float(model_flops),
        tokens_per_device=b * seq, n_layers=cfg.n_layers)


# ----------------------------------------------------------------------------------------------------------
# XLA's own numbers


def measure(cfg, method: str = "lora", method_options: Optional[dict] = None, quantize=None, batch: int = 8,
            seq: int = 512, dtype: Optional[str] = None, remat: Optional[bool] = None, mesh=None,
            base_dtype: Optional[str] = None) -> Dict[str, int]:
    """Compiles the real train step on the abstract state (nothing allocated) and returns XLA's memory analysis
    per device: ``argument``, ``output``, ``alias``, ``temp`` and ``total`` (= argument + output - alias + temp,
    the step's peak with the state donated) and ``backend``. ``mesh`` needs that many devices (e.g. simulated
    CPU devices). Compare it with ``Plan.bytes_on("cpu")`` on CPU, ``Plan.total_bytes`` on an accelerator."""
    import jax

    from jlora import parallel, train

    dtype = dtype or cfg.dtype
    remat = cfg.remat if remat is None else bool(remat)
    base_dtype = base_dtype or (dtype if method != "full" else "float32")
    cfg = cfg.replace(dtype=dtype, remat=remat)
    _, labels, tx, state = abstract_state(cfg, method, method_options, quantize, base_dtype)
    b = abstract_batch(batch, seq)
    if mesh:
        sizes = parallel.parse_mesh_spec(mesh)
        n = math.prod(sizes.values())
        if jax.device_count() < n:
            raise ValueError(f"measure: mesh {mesh!r} needs {n} devices, {jax.device_count()} are available")
        m = parallel.make_mesh(mesh, jax.devices()[:n])
        step = parallel.make_sharded_train_step(cfg, tx, labels, m, parallel.state_shardings(state, m))
    else:
        step = jax.jit(train.make_train_step(cfg, tx, labels), donate_argnums=0)
    ma = step.lower(state, b).compile().memory_analysis()
    out = {"argument": int(ma.argument_size_in_bytes), "output": int(ma.output_size_in_bytes),
           "alias": int(ma.alias_size_in_bytes), "temp": int(ma.temp_size_in_bytes)}
    out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    out["backend"] = jax.default_backend()
    return out


# ----------------------------------------------------------------------------------------------------------
# What it would take, and the decision matrix


FSDP_DEGREES = (2, 4, 8, 16, 32, 64)


def what_it_takes(p: Plan, name: str) -> str:
    """How the planned run could fit ``name`` devices: ``"fits"``, ``"remat"``, ``"remat + fsdp=N"`` (N devices,
    the global batch split over them: one sequence per device at least), or ``"does not fit ..."``.

    On ``cpu`` (this machine) neither helps: XLA's CPU scheduler does not realize remat, and one machine has
    no FSDP; the answer is then how much memory is missing."""
    d = device(name)
    limit = USABLE * d.memory_bytes
    if p.fits(name):
        return "fits"
    if d.name == "cpu":
        return f"does not fit (needs {fmt_bytes(p.bytes_on(name))}, {fmt_bytes(limit)} usable)"
    if not p.remat and p.with_remat(True) <= limit:
        return "remat"
    return _fsdp_advice(p, limit)


def _fsdp_advice(p: Plan, limit: float) -> str:
    # Parameters, gradients and optimizer state divide by the FSDP degree n; activations follow the batch per
    # device, the global batch split over data x n (at least one sequence per device).
    c = p.components
    n0 = max(1, p.mesh["fsdp"] * p.mesh["tensor"])
    flat = {k: v * n0 for k, v in c.items() if k in ("params_frozen", "params_trainable", "gradients", "optimizer",
                                                     "optimizer_temp", "early_gradients")}
    layer = (flat["params_frozen"] + flat["params_trainable"]) / p.n_layers
    b0 = max(1, p.batch // (p.mesh["data"] * p.mesh["fsdp"]))
    for n in FSDP_DEGREES:
        if n <= n0:
            continue
        b = max(1, p.batch // (p.mesh["data"] * n))
        state = (flat["params_frozen"] + flat["params_trainable"] + flat["optimizer"]) / n + c["batch"]
        acts = p.activations_remat * b / b0 + flat["early_gradients"] / n
        tot = state + max(acts, (flat["gradients"] + flat["optimizer_temp"]) / n) + 2 * layer
        if tot <= limit:
            return f"remat + fsdp={n}"
    return f"does not fit (needs more than {FSDP_DEGREES[-1]} devices)"


def decision_matrix(models: Sequence[str] = MATRIX_MODELS, devices: Sequence[str] = tuple(DEVICES),
                    batch: int = 8, seq: int = 512, dtype: str = "bfloat16") -> List[dict]:
    """Rows ``{"model", "params", "method", "total_bytes", <device>: what it takes}`` for full fine-tuning,
    LoRA (r=8 on every linear layer but the head, bf16 base) and QLoRA (the same on an NF4 base), each planned
    on one device without remat; the cells say what would make it fit (`what_it_takes`)."""
    rows = []
    for spec in models:
        cfg = model_config(spec)
        for label, method, quant in (("full", "full", None), ("lora", "lora", None), ("qlora", "lora", "nf4")):
            opts = None if method == "full" else {"r": 8, "alpha": 16, "target_modules": "all-linear"}
            p = plan(cfg, method, opts, quant, batch=batch, seq=seq, dtype=dtype, remat=False, name=spec)
            row = {"model": spec, "params": cfg.num_params(), "method": label, "total_bytes": p.total_bytes,
                   "remat_bytes": p.with_remat(True)}
            for dev in devices:
                row[dev] = what_it_takes(p, dev)
            rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------------------
# Text


def fmt_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def format_plan(p: Plan, device_name: Optional[str] = None, measured: Optional[dict] = None) -> str:
    """The plan as the text ``jlora plan`` prints."""
    c = p.components
    mesh = ",".join(f"{k}={v}" for k, v in p.mesh.items() if v > 1) or "one device"
    lines = [f"{p.model}: {p.total_params:,} parameters; method {p.method}"
             + (f" on a {p.quantize} base" if p.quantize else "")
             + f"; {p.trainable_params:,} trainable ({100 * p.trainable_params / max(p.total_params, 1):.3f}%)",
             f"batch {p.batch} x seq {p.seq}, compute {p.dtype}, base {p.base_dtype}, remat {'on' if p.remat else 'off'}"
             f", mesh {mesh}",
             "", "per-device memory (estimate):"]
    rows = [("parameters, frozen", c["params_frozen"]), ("  of which quantized base", c["quantized_base"]),
            ("parameters, trainable", c["params_trainable"]), ("gradients", c["gradients"]),
            ("optimizer state (Adam mu, nu)", c["optimizer"]), ("optimizer temporaries", c["optimizer_temp"]),
            ("embedding/head gradients (early)", c["early_gradients"]),
            (f"activations ({'remat' if p.remat else 'no remat'})", c["activations"]),
            (f"activations ({'no remat' if p.remat else 'with remat'})",
             p.activations_no_remat if p.remat else p.activations_remat),
            ("batch", c["batch"]), ("FSDP weight gathers", c["fsdp_gather"])]
    for label, v in rows:
        lines.append(f"  {label:34s} {fmt_bytes(v):>12s}")
    lines.append(f"  {'total (peak of the step)':34s} {fmt_bytes(p.total_bytes):>12s}"
                 f"   (with remat {'off' if p.remat else 'on'}: {fmt_bytes(p.with_remat(not p.remat))})")
    if measured:
        lines.append("")
        lines.append("XLA's memory analysis of the compiled step (per device):")
        for k in ("argument", "output", "alias", "temp", "total"):
            lines.append(f"  {k:34s} {fmt_bytes(measured[k]):>12s}")
        est = p.bytes_on("cpu") if measured.get("backend") == "cpu" else p.total_bytes
        err = (est - measured["total"]) / max(measured["total"], 1)
        where = " (the estimate for cpu: float32 activations, no remat saving)" if measured.get("backend") == "cpu" \
            else ""
        lines.append(f"  estimate {fmt_bytes(est)} vs XLA total: {100 * err:+.1f}%{where}")
    lines += ["", f"checkpoint on disk: {fmt_bytes(p.adapter_bytes)} "
                  f"({'the model' if p.method == 'full' else 'the adapter'}), training checkpoint "
                  f"{fmt_bytes(p.checkpoint_bytes)} (with optimizer state)",
              f"FLOPs per token: {p.flops_per_token:.3g} done ({p.model_flops_per_token:.3g} model FLOPs, "
              f"6N + 12 L T d)", ""]
    names = [device_name] if device_name else list(DEVICES)
    lines.append(f"{'device':10s} {'memory':>10s} {'needs':>10s} {'fits':>5s} {'step (est.)':>12s}  what it takes")
    for n in names:
        d = DEVICES[n]
        lines.append(f"{n:10s} {fmt_bytes(d.memory_bytes):>10s} {fmt_bytes(p.bytes_on(n)):>10s} "
                     f"{'yes' if p.fits(n) else 'no':>5s} {p.step_seconds(n):>10.3g} s  {what_it_takes(p, n)}")
    if device_name and not p.fits(device_name):
        d = DEVICES[device_name]
        lines.append(f"\ndoes not fit {device_name}: needs {fmt_bytes(p.bytes_on(device_name))} per device, "
                     f"{fmt_bytes(USABLE * d.memory_bytes)} usable of {fmt_bytes(d.memory_bytes)}; "
                     f"{what_it_takes(p, device_name)}")
    lines.append(f"(step time at {ASSUMED_MFU:.0%} of the device's bf16 peak; fits = under {USABLE:.0%} of its "
                 f"memory)")
    return "\n".join(lines)


def format_matrix(rows: List[dict], devices: Sequence[str] = tuple(DEVICES)) -> str:
    head = f"{'model':14s} {'params':>8s} {'method':6s} {'peak':>10s}  " + " ".join(f"{d:>16s}" for d in devices)
    out = [head]
    for r in rows:
        cells = " ".join(f"{_short(r[d]):>16s}" for d in devices)
        out.append(f"{r['model']:14s} {r['params'] / 1e9:7.2f}B {r['method']:6s} {fmt_bytes(r['total_bytes']):>10s}"
                   f"  {cells}")
    return "\n".join(out)


def _short(s: str) -> str:
    if s.startswith("does not fit (needs more than"):
        return "no (>64 dev)"
    return "no" if s.startswith("does not") else s


# ----------------------------------------------------------------------------------------------------------
# The command line (``jlora plan``; `jlora.cli` adds the subcommand with `add_arguments` and calls `run_cli`)


def add_arguments(p) -> None:
    """The flags of ``jlora plan`` on an argparse parser."""
    p.add_argument("--model", default="smollm2", help="a preset (gpt2 ... gpt2-xl, smollm2-135m, llama-1b/3b/7b/"
                   "13b/70b, ...), an HF model dir or a directory with only config.json, or a .gguf file "
                   "(default: the built-in SmolLM2-135M)")
    p.add_argument("--method", default="lora", metavar="KIND",
                   help="adapter | dora | ia3 | lora | prefix | prompt | full (default lora)")
    p.add_argument("--r", type=int, default=None, help="LoRA/DoRA rank (method option r)")
    p.add_argument("--alpha", type=float, default=None, help="LoRA/DoRA alpha")
    p.add_argument("--target-modules", default=None,
                   help="comma-separated module names, or all-linear (method option target_modules)")
    p.add_argument("--option", action="append", metavar="KEY=VALUE",
                   help="any other field of the method's config (value parsed as TOML), repeatable")
    p.add_argument("--quantize", default=None, choices=["nf4", "fp4", "int8"],
                   help="a quantized frozen base (with --method lora: QLoRA)")
    p.add_argument("--batch", type=int, default=8, help="global batch in sequences (default 8)")
    p.add_argument("--seq", type=int, default=512, help="tokens per sequence (default 512)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="compute dtype (default: the model's, float32)")
    p.add_argument("--base-dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="storage of a PEFT method's frozen base (default: the compute dtype)")
    p.add_argument("--remat", action="store_true", help="rematerialize each block in the backward pass")
    p.add_argument("--mesh", default=None, metavar="SPEC", help="device mesh, e.g. data=2,fsdp=4 (default: one device)")
    p.add_argument("--device", default=None, metavar="NAME", help="the device to plan for: " + ", ".join(DEVICES)
                   + " (default: show all)")
    p.add_argument("--measure", action="store_true",
                   help="also compile the real step abstractly (shapes only) and print XLA's memory analysis")
    p.add_argument("--matrix", action="store_true",
                   help="the decision matrix instead: models from 124M to 70B x devices x full/LoRA/QLoRA")
    p.add_argument("--json", action="store_true", help="print JSON")


def _options(a) -> dict:
    from jlora.run import _parse_value

    opts = {}
    if a.r is not None:
        opts["r"] = a.r
    if a.alpha is not None:
        opts["alpha"] = a.alpha
    if a.target_modules:
        t = a.target_modules
        opts["target_modules"] = t if t == "all-linear" else [x.strip() for x in t.split(",") if x.strip()]
    for item in a.option or ():
        if "=" not in item:
            raise ValueError(f"--option {item!r}: expected KEY=VALUE")
        k, v = item.split("=", 1)
        opts[k.strip()] = _parse_value(v)
    return opts


def _simulate_devices(n: int) -> None:
    # A mesh of n devices on CPU is simulated (as the tests do). This only takes effect before JAX starts its
    # backends, and only for the CPU backend (a machine with n accelerators uses them).
    import jax

    try:
        if jax.config.jax_num_cpu_devices < n:
            jax.config.update("jax_num_cpu_devices", n)
    except (AttributeError, RuntimeError):
        pass


def run_cli(a) -> str:
    """What ``jlora plan`` prints for parsed flags ``a`` (a ValueError for bad input)."""
    from jlora.peft import base as B

    if a.device is not None:
        device(a.device)  # an unknown device: the error lists the known ones
    B.get(a.method)  # an unknown method: the error lists the known ones
    if a.matrix:
        devs = [a.device] if a.device else list(DEVICES)
        rows = decision_matrix(MATRIX_MODELS, batch=a.batch, seq=a.seq, dtype=a.dtype or "bfloat16", devices=devs)
        if a.json:
            return json.dumps(rows, indent=2)
        return (f"what it takes to fine-tune (global batch {a.batch} x seq {a.seq}, bf16 compute, AdamW; LoRA r=8 on "
                f"all linear layers, bf16 base; QLoRA: the same on an NF4 base): 'fits' on one device as is, else "
                f"with remat, else remat + FSDP over N devices (the batch split over them, at least one sequence "
                f"each); cpu: this machine, where remat saves nothing under XLA\n"
                + format_matrix(rows, devs))
    cfg = model_config(a.model)
    kw = dict(method=a.method, method_options=_options(a), quantize=a.quantize, batch=a.batch, seq=a.seq,
              dtype=a.dtype, remat=a.remat, mesh=a.mesh, base_dtype=a.base_dtype)
    p = plan(cfg, name=a.model, **kw)
    measured = None
    if a.measure:
        if a.mesh:
            from jlora.parallel.rules import parse_mesh_spec

            _simulate_devices(math.prod(parse_mesh_spec(a.mesh).values()))
        measured = measure(cfg, **kw)
    if a.json:
        out = p.to_dict()
        if measured:
            out["measured"] = measured
        if a.device:
            out["device"] = a.device
            out["fits"] = p.fits(a.device)
        return json.dumps(out, indent=2)
    text = format_plan(p, a.device, measured)
    if a.device and not p.fits(a.device) and not a.quantize and _wraps_kernels(a.method):
        q = plan(cfg, name=p.model, **dict(kw, quantize="nf4"))
        text += (f"\nQLoRA (--quantize nf4) would need {fmt_bytes(q.bytes_on(a.device))} per device: "
                 f"{what_it_takes(q, a.device)}")
    return text


def _wraps_kernels(kind: str) -> bool:
    """Whether a method's nodes wrap the base kernels, so that the base under them can be quantized (QLoRA)."""
    from jlora.kernels import KernelWrapper
    from jlora.peft import base as B

    m = B.get(kind)
    return any(isinstance(n, type) and issubclass(n, KernelWrapper) for n in m.nodes)


def main(argv=None) -> int:
    """``python -m jlora.plan ...``: the same as ``jlora plan ...``."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="jlora plan", description=__doc__.split("\n")[0])
    add_arguments(parser)
    a = parser.parse_args(argv)
    try:
        print(run_cli(a))
    except (FileNotFoundError, ValueError) as e:
        print(f"jlora plan: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
