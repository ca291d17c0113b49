"""Quantized frozen bases: bitsandbytes' NF4 / FP4 4-bit blockwise formats (with double quantization) and int8
per output channel, as kernel wrappers. ``LoRA(Quant4bit(...), a, b)`` is QLoRA.

**The format is bitsandbytes'** (``bitsandbytes.functional.quantize_4bit`` as its CPU backend computes it), so a
jlora quantized matrix holds the same bytes as a bnb ``Params4bit``:

* the matrix quantized is the Hugging Face weight ``W_hf [out, in]`` (``nn.Linear``'s orientation; jlora's kernel
  is its transpose ``[in, out]``), flattened row-major and cut into blocks of ``block_size`` (64) values; the last
  block may be partial (bnb pads; so does jlora, never refusing a shape);
* per block ``absmax = max |w|``; each value ``w / absmax`` (in float32, as bnb: multiplied by the reciprocal) is
  rounded to the nearest of the 16 code values (bnb's NF4 or FP4 table; ties go to the lower code);
* two 4-bit codes per byte, the first value in the high nibble; an odd count is padded with one zero value;
* double quantization (bnb's ``compress_statistics``): the float32 absmax values minus their mean (``offset``)
  are quantized to 8 bits blockwise in blocks of 256 with bnb's signed dynamic map
  (``create_dynamic_map(signed=True)``), keeping one float32 absmax per 256 blocks: 4 + 8/64 + 32/(64*256)
  = 4.127 bits per weight.

Quantization runs on the host in numpy (one matrix at a time); the wrappers dequantize inside ``matmul`` in the
compute dtype (``x.dtype``), so under jit the dequantized matrix is a temporary of that one matmul and never a
stored copy. The codes and statistics are never trainable; full fine-tuning of a quantized base is refused (see
`jlora.tree.trainable_labels` and `jlora.train.make_train_step`).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jlora.kernels import FROZEN, KernelWrapper, dequant_matmul, is_node

BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # bnb's valid 4-bit block sizes
NESTED_BLOCK = 256  # bnb's block size of the double-quantized absmax
QUANT_TYPES = ("nf4", "fp4", "int8")

# bnb's 16-value code tables (bitsandbytes.functional.get_4bit_type), indexed by the 4-bit code.
NF4_CODE = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                     -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                     0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                     0.7229568362236023, 1.0], np.float32)
# FP4: sign bit, 2 exponent bits, 1 mantissa bit, normalized by its largest value (12) in float32 as bnb does.
FP4_CODE = (np.array([0, 0.0625, 8, 12, 4, 6, 2, 3, -0.0, -0.0625, -8, -12, -4, -6, -2, -3], np.float32)
            / np.float32(12.0))
CODES = {"nf4": NF4_CODE, "fp4": FP4_CODE}


def _bounds(quant_type: str):
    """(midpoints between sorted code values, sort order): bnb's bucketize step. FP4's +0 (code 0) sorts before
    -0 (code 8), as bnb's argsort gives, so tiny negative values get code 0 and tiny positive ones code 8."""
    code = CODES[quant_type]
    order = np.argsort(code, kind="stable")
    srt = code[order]
    return ((srt[:-1] + srt[1:]) / np.float32(2)).astype(np.float32), order.astype(np.uint8)


def _linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps, dtype=torch.float32)`` bit for bit: a float32 step, the first half
    counted from ``start`` and the second from ``end``, each as one fused multiply-add (one rounding)."""
    s, e = np.float32(start), np.float32(end)
    step = np.float64((e - s) / np.float32(steps - 1))
    i = np.arange(steps, dtype=np.float64)
    out = np.where(i < steps // 2, np.float64(s) + step * i, np.float64(e) - step * (steps - 1 - i))
    return out.astype(np.float32)


def dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> np.ndarray:
    """bnb's 8-bit dynamic quantization map (``create_dynamic_map``): 256 sorted float32 values in [-1, 1].

    Example:
      >>> m = dynamic_map(); m.shape, float(m[0]) < -0.99, float(m[-1])
      ((256,), True, 1.0)
    """
    data = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        items = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1 if signed
                    else 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1)
        bounds = _linspace_f32(0.1, 1.0, items)
        means = (bounds[:-1] + bounds[1:]) / np.float32(2.0)
        # bnb multiplies a float32 tensor by a Python float (float32 result), then converts with .tolist()
        scale = np.float32(10 ** (-(max_exponent_bits - 1) + i))
        data += (scale * means).astype(np.float32).tolist()
        if signed:
            data += (-scale * means).astype(np.float32).tolist()
    if additional_items > 0:
        bounds = _linspace_f32(0.1, 1.0, additional_items + 1)
        means = (bounds[:-1] + bounds[1:]) / np.float32(2.0)
        scale = np.float32(10 ** (-(max_exponent_bits - 1) + i))
        data += (scale * means).astype(np.float32).tolist()
        if signed:
            data += (-scale * means).astype(np.float32).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (256 - len(data))
    return np.sort(np.asarray(data, np.float32))


DYNAMIC_MAP = dynamic_map(signed=True)


# ----------------------------------------------------------------------------------------------------------
# Host-side quantization (numpy), bit-compatible with bitsandbytes' CPU backend


def _blocks_absmax(flat: np.ndarray, block: int, clamp_tail: bool):
    """Per-block absmax of a flat float32 array (last block partial) and its full-block/tail split."""
    n = flat.size
    full = n - n % block
    head = flat[:full].reshape(-1, block)
    absmax = np.abs(head).max(axis=-1) if full else np.zeros((0,), np.float32)
    tail = flat[full:]
    if tail.size:
        am = np.abs(tail).max()
        am = np.maximum(am, np.float32(1e-38)) if clamp_tail else am
        absmax = np.concatenate([absmax, np.asarray([am], np.float32)])
    return head, tail, absmax.astype(np.float32)


def quantize_4bit(w_hf: np.ndarray, quant_type: str = "nf4", block_size: int = 64):
    """4-bit blockwise quantization of a float matrix, exactly as bitsandbytes' ``quantize_4bit`` (CPU).

    Args:
      w_hf: the weight in bnb's/Hugging Face's orientation (``[out, in]``; any shape: it is flattened).
      quant_type: ``"nf4"`` or ``"fp4"``.
      block_size: values per absmax block.

    Returns:
      ``(packed uint8 [ceil(n / 2)], absmax float32 [ceil(n / block_size)])``; bnb stores ``packed`` as
      ``[ceil(n / 2), 1]``.

    Example:
      >>> packed, absmax = quantize_4bit(np.array([[1.0, -0.5, 0.0, 0.25]]), "nf4", block_size=32)
      >>> packed.tolist(), absmax.tolist()  # codes 15, 2, 7, 10: [0xf2, 0x7a]
      ([242, 122], [1.0])
    """
    _check_4bit_args(quant_type, block_size)
    flat = np.asarray(w_hf, np.float32).reshape(-1)
    head, tail, absmax = _blocks_absmax(flat, block_size, clamp_tail=True)
    nfull = head.shape[0]
    # bnb: clamp(A * (1 / absmax.clamp(min=1e-38)), -1, 1) for full blocks, clamp(A / absmax) for the tail
    recip = np.float32(1.0) / np.maximum(absmax[:nfull], np.float32(1e-38))
    scaled = [np.clip(head * recip[:, None], -1, 1).reshape(-1)]
    if tail.size:
        scaled.append(np.clip(tail / absmax[-1], -1, 1))
    scaled = np.concatenate(scaled).astype(np.float32)
    if scaled.size % 2:
        scaled = np.concatenate([scaled, np.zeros((1,), np.float32)])
    bounds, order = _bounds(quant_type)
    q = order[np.searchsorted(bounds, scaled, side="left")]  # torch.bucketize(right=False)
    packed = (q[0::2] << 4) | q[1::2]
    return packed.astype(np.uint8), absmax


def quantize_blockwise(x: np.ndarray, code: np.ndarray = DYNAMIC_MAP, block_size: int = NESTED_BLOCK):
    """8-bit blockwise quantization as bitsandbytes' CPU kernel (``quantize_blockwise``): per block absmax,
    ``x / absmax`` rounded to the nearest ``code`` value (the lower one on a float32 tie of the distances).

    Returns:
      ``(codes uint8 [n], absmax float32 [ceil(n / block_size)])``.

    Example:
      >>> q, am = quantize_blockwise(np.array([0.5, -1.0, 0.0], np.float32))
      >>> [round(v, 4) for v in dequantize_blockwise(q, am).tolist()]  # the nearest of 256 code values
      [0.5008, -0.993, 0.0]
    """
    flat = np.asarray(x, np.float32).reshape(-1)
    head, tail, absmax = _blocks_absmax(flat, block_size, clamp_tail=False)
    per = np.repeat(absmax, block_size)[: flat.size]
    with np.errstate(divide="ignore", invalid="ignore"):
        normed = np.where(per > 0, flat / per, np.float32(0)).astype(np.float32)
    code = np.asarray(code, np.float32)
    left = np.clip(np.searchsorted(code, normed, side="right") - 1, 0, code.size - 1)
    right = np.minimum(left + 1, code.size - 1)
    d_left = np.abs(normed - code[left])
    d_right = np.abs(normed - code[right])
    idx = np.where((left < code.size - 1) & (d_right < d_left), right, left)
    idx = np.where(per > 0, idx, 0)  # an all-zero block: bnb's 0/0 is NaN, which its search maps to code 0
    return idx.astype(np.uint8), absmax


def dequantize_blockwise(q: np.ndarray, absmax: np.ndarray, code: np.ndarray = DYNAMIC_MAP,
                         block_size: int = NESTED_BLOCK) -> np.ndarray:
    """Inverse of `quantize_blockwise`: ``code[q] * absmax`` per block (float32, as bnb)."""
    vals = np.asarray(code, np.float32)[np.asarray(q).reshape(-1)]
    return (vals * np.repeat(np.asarray(absmax, np.float32), block_size)[: vals.size]).astype(np.float32)


def double_quantize(absmax: np.ndarray):
    """bnb's ``compress_statistics``: ``(codes uint8 [nb], nested absmax float32 [ceil(nb / 256)], offset
    float32 [])`` with ``offset = mean(absmax)`` and the rest `quantize_blockwise`-d in blocks of 256."""
    absmax = np.asarray(absmax, np.float32)
    offset = np.float32(np.mean(absmax, dtype=np.float64))
    q, nested = quantize_blockwise(absmax - offset)
    return q, nested, np.asarray(offset, np.float32)


def dequantize_4bit(packed: np.ndarray, absmax: np.ndarray, shape, quant_type: str = "nf4",
                    block_size: int = 64) -> np.ndarray:
    """Inverse of `quantize_4bit` on the host: the float32 array of ``shape`` (bnb's ``dequantize_4bit``)."""
    n = int(np.prod(shape))
    packed = np.asarray(packed, np.uint8).reshape(-1)
    idx = np.stack([packed >> 4, packed & 15], axis=-1).reshape(-1)[:n]
    vals = CODES[quant_type][idx]
    return (vals * np.repeat(np.asarray(absmax, np.float32), block_size)[:n]).astype(np.float32).reshape(shape)


def _check_4bit_args(quant_type, block_size):
    if quant_type not in CODES:
        raise ValueError(f"4-bit quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {BLOCK_SIZES} (bitsandbytes' 4-bit block sizes), got "
                         f"{block_size!r}")


def quantize_int8(w_hf: np.ndarray):
    """Symmetric int8 per output channel (row of ``W_hf [out, in]``): ``q = round(w * 127 / absmax_row)``.

    Returns:
      ``(q int8 [out, in], scale float32 [out])`` with ``w ~= q * scale`` (``scale = absmax_row / 127``).

    Example:
      >>> q, s = quantize_int8(np.array([[1.0, -0.5], [0.0, 0.0]]))
      >>> q.tolist(), s.tolist()
      ([[127, -64], [0, 0]], [0.007874015718698502, 0.0])
    """
    w = np.asarray(w_hf, np.float32)
    absmax = np.abs(w).max(axis=-1)
    with np.errstate(divide="ignore"):
        mult = np.where(absmax > 0, np.float32(127.0) / absmax, np.float32(0)).astype(np.float32)
    q = np.clip(np.rint(w * mult[:, None]), -127, 127).astype(np.int8)
    return q, (absmax / np.float32(127.0)).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------
# Kernel wrappers


def _flat_rows_shardable(n_in: int, n_out: int, block: int) -> bool:
    """Flattened ``[out, in]`` blocks (and byte pairs) never straddle a row: contiguous chunks of the flat
    codes/absmax are row ranges, i.e. output-column ranges of the kernel."""
    return n_in % block == 0 and block % 2 == 0 and n_out > 0


def _scales_4bit(absmax, nested_absmax, offset) -> jax.Array:
    if nested_absmax is None:
        return absmax.astype(jnp.float32)
    nb = absmax.shape[0]
    vals = jnp.asarray(DYNAMIC_MAP)[absmax.astype(jnp.int32)]
    per = jnp.repeat(nested_absmax.astype(jnp.float32), NESTED_BLOCK,
                     total_repeat_length=nested_absmax.shape[0] * NESTED_BLOCK)[:nb]
    return vals * per + offset.astype(jnp.float32)


def _dequant_4bit(arrays, dtype, static) -> jax.Array:
    """``W_hf [out, in]`` in ``dtype`` from `Quant4bit`'s arrays; ``static = ((in, out), quant_type, block)``."""
    codes, absmax, nested_absmax, offset = arrays
    (n_in, n_out), quant_type, block = static
    n = n_in * n_out
    idx = jnp.stack([codes >> 4, codes & 15], axis=-1).reshape(-1)[:n].astype(jnp.int32)
    vals = jnp.asarray(CODES[quant_type], dtype)[idx]
    nb = absmax.shape[0]
    vals = jnp.pad(vals, (0, nb * block - n)).reshape(nb, block)
    w = vals * _scales_4bit(absmax, nested_absmax, offset).astype(dtype)[:, None]
    return w.reshape(-1)[:n].reshape(n_out, n_in)


def _dequant_int8(arrays, dtype, static) -> jax.Array:
    q, scale = arrays
    return q.astype(dtype) * scale.astype(dtype)


@struct.dataclass
class Quant4bit(KernelWrapper):
    """A frozen NF4/FP4 kernel in bitsandbytes' layout (see the module docstring).

    Attributes:
      codes: uint8 ``[ceil(in * out / 2)]``: bnb's packed codes of ``W_hf = kernel.T`` (``[out, in]``) flattened.
      absmax: float32 ``[n_blocks]``, or with double quantization uint8 ``[n_blocks]`` (8-bit dynamic codes).
      nested_absmax: float32 ``[ceil(n_blocks / 256)]`` (double quantization only, else None).
      offset: float32 scalar, the mean subtracted before the 8-bit step (double quantization only, else None).
      in_out: ``(in, out)``, the kernel's shape; static.
      quant_type: ``"nf4"`` or ``"fp4"``; static.
      block_size: values per absmax block (64); static.

    ``materialize()`` is the float32 ``[in, out]`` kernel (bnb's ``dequantize_4bit`` transposed). Sharding: with
    ``in % block_size == 0`` the flat arrays split along the output dimension exactly where the kernel does
    (contiguous chunks are whole rows of ``W_hf``); otherwise, and always for the tiny double-quant statistics,
    they are replicated.
    """

    codes: jax.Array
    absmax: jax.Array
    nested_absmax: Optional[jax.Array] = None
    offset: Optional[jax.Array] = None
    in_out: Tuple[int, int] = struct.field(pytree_node=False, default=(0, 0))
    quant_type: str = struct.field(pytree_node=False, default="nf4")
    block_size: int = struct.field(pytree_node=False, default=64)

    method = "quantize"  # for messages (quantized bases are no registered method: they are the base)

    @property
    def shape(self):
        return tuple(self.in_out)

    @property
    def dtype(self):
        return jnp.dtype(jnp.float32)

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    def scales(self) -> jax.Array:
        """The float32 absmax per block (double quantization undone exactly as bnb: ``code[q] * nested + offset``)."""
        return _scales_4bit(self.absmax, self.nested_absmax, self.offset)

    def dequantize_hf(self, dtype=jnp.float32) -> jax.Array:
        """``W_hf [out, in]`` in ``dtype``: code values times their block's absmax, both in ``dtype``."""
        return _dequant_4bit((self.codes, self.absmax, self.nested_absmax, self.offset), dtype, self._static)

    @property
    def _static(self):
        return (tuple(self.in_out), self.quant_type, self.block_size)

    def matmul(self, x):
        # Dequantized in the compute dtype inside this matmul (jlora.kernels.dequant_matmul): under jit a
        # short-lived temporary, never a stored copy, in the forward and in the backward pass.
        return dequant_matmul(x, (self.codes, self.absmax, self.nested_absmax, self.offset), _dequant_4bit,
                              self._static, layout="oi")

    def materialize(self):
        return self.dequantize_hf(jnp.float32).T

    def merge_linear(self, bias):
        """The float32 dequantized kernel (exact: every dequantized value is a float32 product); cast it when
        saving (``save_pretrained(dtype=...)``)."""
        return self.materialize(), bias

    def strip(self):
        return self

    def labels(self, label_base):
        # Codes and statistics never train, whatever label_base says (see jlora.tree.trainable_labels).
        return jax.tree_util.tree_map(lambda _: FROZEN, self)

    def logical_sizes(self):
        n_in, n_out = self.in_out
        return jax.tree_util.tree_map(lambda _: 0, self).replace(codes=int(n_in * n_out))

    def shard(self, spec_in, spec_out, fits):
        n_in, n_out = self.in_out
        axes = fits(n_out, spec_out) if _flat_rows_shardable(n_in, n_out, self.block_size) else None
        if axes is not None and (fits(self.codes.shape[0], axes) is None or fits(self.absmax.shape[0], axes) is None):
            axes = None
        out = jax.tree_util.tree_map(lambda x: (None,) * np.ndim(x), self)
        return out.replace(codes=(axes,), absmax=(axes,))


@struct.dataclass
class Int8(KernelWrapper):
    """A frozen int8 kernel, symmetric per output channel: ``kernel ~= q * scale``.

    Attributes:
      q: int8 ``[in, out]`` (jlora's orientation; HF's ``[out, in]`` weight transposed).
      scale: float32 ``[out]`` (``absmax / 127`` of each output channel).
    """

    q: jax.Array
    scale: jax.Array

    method = "quantize"

    @property
    def shape(self):
        return tuple(self.q.shape)

    @property
    def dtype(self):
        return jnp.dtype(jnp.float32)

    def matmul(self, x):
        # ``q * scale`` in the compute dtype inside this matmul (jlora.kernels.dequant_matmul): under jit a
        # short-lived temporary, never a stored float copy.
        return dequant_matmul(x, (self.q, self.scale), _dequant_int8)

    def materialize(self):
        return self.q.astype(jnp.float32) * self.scale[None, :]

    def merge_linear(self, bias):
        """The float32 dequantized kernel ``q * scale``."""
        return self.materialize(), bias

    def strip(self):
        return self

    def labels(self, label_base):
        return self.replace(q=FROZEN, scale=FROZEN)

    def logical_sizes(self):
        return self.replace(q=int(self.q.size), scale=0)

    def shard(self, spec_in, spec_out, fits):
        return self.replace(q=(spec_in, spec_out), scale=(spec_out,))


QUANTIZED = (Quant4bit, Int8)


def is_quantized(x) -> bool:
    """True for a quantized base kernel (`Quant4bit`, `Int8`)."""
    return isinstance(x, QUANTIZED)


# ----------------------------------------------------------------------------------------------------------
# Quantizing a model


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """How to quantize a model's linear layers (what ``load_pretrained(quantize=...)`` takes).

    Args:
      quant: ``"nf4"``, ``"fp4"`` (bitsandbytes' 4-bit types) or ``"int8"`` (per output channel).
      double_quant: 4-bit only: bnb's ``compress_statistics`` / ``bnb_4bit_use_double_quant``.
      block_size: 4-bit only: values per absmax block (bnb's 32 ... 4096; 64 default).
      modules: which linear modules (PEFT's target rule: names matched exactly or as a dotted suffix, or a
        regex string); default: every linear layer but the output head (``lm_head``), as transformers'
        ``llm_int8_skip_modules`` default. Embeddings are never quantized.

    Example:
      >>> QuantConfig("nf4").selects("model.layers.0.mlp.up_proj"), QuantConfig("nf4").selects("lm_head")
      (True, False)
    """

    quant: str = "nf4"
    double_quant: bool = True
    block_size: int = 64
    modules: Union[str, Tuple[str, ...], None] = None

    def __post_init__(self):
        if self.quant not in QUANT_TYPES:
            raise ValueError(f"quantize: quant must be one of {', '.join(QUANT_TYPES)}, got {self.quant!r}")
        if self.quant != "int8":
            _check_4bit_args(self.quant, self.block_size)
        if isinstance(self.modules, (list, set, frozenset)):
            object.__setattr__(self, "modules", tuple(sorted(self.modules) if not isinstance(self.modules, list)
                                                      else self.modules))
        if not isinstance(self.double_quant, bool):
            raise ValueError(f"quantize: double_quant must be true or false, got {self.double_quant!r}")

    @classmethod
    def of(cls, quantize) -> Optional["QuantConfig"]:
        """A config from ``None``, a quant name (``"nf4"``), a dict of fields, or a config."""
        if quantize is None or isinstance(quantize, cls):
            return quantize
        if isinstance(quantize, str):
            return cls(quant=quantize)
        if isinstance(quantize, dict):
            unknown = sorted(set(quantize) - {f.name for f in dataclasses.fields(cls)})
            if unknown:
                raise ValueError(f"quantize: unknown option {unknown[0]!r} (options: quant, double_quant, "
                                 f"block_size, modules)")
            return cls(**quantize)
        raise TypeError(f"quantize must be None, 'nf4', 'fp4', 'int8', a dict or a QuantConfig, got "
                        f"{type(quantize).__name__}")

    def selects(self, module: str) -> bool:
        from jlora import tree as T

        if self.modules is None:
            return module.split(".")[-1] != "lm_head"
        return T.match_module(module, self.modules)


def quantize_kernel(kernel, qcfg: QuantConfig, name: str = "kernel"):
    """One ``[in, out]`` kernel (array-like, any float dtype) as a `Quant4bit` or `Int8`, quantized on the host.

    Example:
      >>> k = quantize_kernel(np.ones((64, 32), np.float32), QuantConfig("nf4"))
      >>> type(k).__name__, k.shape, k.codes.shape, k.absmax.dtype
      ('Quant4bit', (64, 32), (1024,), dtype('uint8'))
    """
    if is_node(kernel):
        raise ValueError(f"quantize: {name} is already a {type(kernel).__name__} node; quantize the plain base "
                         f"(before adding adapters)")
    w = np.asarray(jax.device_get(kernel))
    if w.ndim != 2 or not (np.issubdtype(w.dtype, np.floating) or w.dtype.name == "bfloat16"):
        raise ValueError(f"quantize: {name} must be a 2-d float matrix, got shape {w.shape} dtype {w.dtype}")
    w_hf = np.ascontiguousarray(w.astype(np.float32).T)  # bnb quantizes nn.Linear's [out, in] weight
    n_in, n_out = w.shape
    if qcfg.quant == "int8":
        q, scale = quantize_int8(w_hf)
        return Int8(q=jnp.asarray(np.ascontiguousarray(q.T)), scale=jnp.asarray(scale))
    packed, absmax = quantize_4bit(w_hf, qcfg.quant, qcfg.block_size)
    if qcfg.double_quant:
        qa, nested, offset = double_quantize(absmax)
        return Quant4bit(codes=jnp.asarray(packed), absmax=jnp.asarray(qa), nested_absmax=jnp.asarray(nested),
                         offset=jnp.asarray(offset), in_out=(n_in, n_out), quant_type=qcfg.quant,
                         block_size=qcfg.block_size)
    return Quant4bit(codes=jnp.asarray(packed), absmax=jnp.asarray(absmax), in_out=(n_in, n_out),
                     quant_type=qcfg.quant, block_size=qcfg.block_size)


def quantize_params(cfg, params, quant: str = "nf4", double_quant: bool = True, block_size: int = 64,
                    modules: Union[str, Sequence[str], None] = None):
    """A new tree whose linear kernels are quantized bases (``params`` is not modified).

    Args:
      cfg: the model config (for messages; the tree's paths say what is linear).
      params: a plain parameter tree.
      quant, double_quant, block_size, modules: see `QuantConfig` (a QuantConfig may be passed as ``quant``).

    Returns:
      the tree with `Quant4bit` / `Int8` kernels at the selected modules; put LoRA on it for QLoRA.

    Raises:
      ValueError: an unknown quant type or block size, ``modules`` selecting nothing, or a kernel that already
        carries an adapter.

    Example:
      >>> q = quantize_params(cfg, params, "nf4")   # QLoRA: jlora.lora.init(key, cfg, q, lcfg)
      >>> k = q["model"]["layers"]["0"]["mlp"]["up_proj"]["kernel"]
      >>> type(k).__name__, k.shape, type(q["lm_head"]["kernel"]).__name__
      ('Quant4bit', (64, 96), 'ArrayImpl')
    """
    from jlora import tree as T

    qcfg = quant if isinstance(quant, QuantConfig) else QuantConfig(
        quant=quant, double_quant=double_quant, block_size=block_size,
        modules=tuple(modules) if isinstance(modules, (list, tuple)) else modules)
    names = [n for n in sorted(T.linear_modules(params), key=T.natural_key) if qcfg.selects(n)]
    if not names:
        raise ValueError(f"quantize: modules {qcfg.modules!r} matched no linear layer of this "
                         f"{getattr(cfg, 'arch', '?')} model")
    new = {n: quantize_kernel(T.get_module(params, n)["kernel"], qcfg, n) for n in names}
    return T.replace_modules(params, new)


def stored_bytes(kernel) -> int:
    """Bytes of every array a (quantized) kernel stores."""
    return sum(int(np.prod(np.shape(x))) * jnp.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(kernel))
