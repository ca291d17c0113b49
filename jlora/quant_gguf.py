"""GGUF-quantized frozen bases: llama.cpp's Q4_0 / Q4_1 / Q8_0 blocks kept quantized in memory, as kernel
wrappers (and a leaf wrapper for a quantized embedding). ``LoRA(GGUFQuant(...), a, b)`` is LoRA on a GGUF base.

**The format is ggml's** (``gguf.quants``; the blocks are stored as the file has them, split into arrays):

* a tensor is read in numpy order, ``[rows, cols]`` (GGUF ``ne`` reversed): a projection is ``W_hf [out, in]``
  (``nn.Linear``'s orientation; jlora's kernel is its transpose ``[in, out]``), an embedding is ``[vocab, d]``;
  blocks of 32 values run along ``cols`` (``in``), so every row is whole blocks;
* per block a float16 scale ``d`` (and for Q4_1 a float16 minimum ``m``), then the values:
  Q8_0: 32 int8 ``q``, value ``d * q``; Q4_0: 16 bytes of nibbles, value ``d * (q - 8)``; Q4_1: 16 bytes of
  nibbles, value ``d * q + m``. Byte ``j`` of a block holds value ``j`` in its low nibble and value ``j + 16``
  in its high nibble (``gguf.quants``' dequantizers and `jlora.convert.gguf.dequantize` agree);
* stored here as ``qs`` (uint8 ``[rows, cols / 2]`` nibbles, or int8 ``[rows, cols]``), ``d`` (float16
  ``[rows, cols / 32]``) and ``m`` (Q4_1 only): the file's bytes, 4.5 / 5 / 8.5 bits per weight.

llama.cpp permutes the rows of ``attn_q`` / ``attn_k`` within each head for its RoPE layout; a permutation of
rows moves whole block rows, so the loader applies the inverse to ``qs``, ``d`` and ``m`` alike
(`from_gguf_rows`) and ``materialize()`` equals the float loader's kernel bit for bit.

The wrappers dequantize inside ``matmul`` in the compute dtype (``x.dtype``: the integer codes are exact in
bf16 and fp32, the scales are cast to it), so under jit the dequantized matrix is a temporary of that one matmul,
never a stored copy. ``materialize()`` is float32 and exactly what `jlora.convert.gguf.load_gguf` gives (same
operations, one float32 rounding per product and per ``+ m``). Codes and scales never train: full
fine-tuning of such a base is refused (`jlora.tree.trainable_labels`), LoRA on it trains its factors only.
"""

from __future__ import annotations

from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jlora.kernels import FROZEN, KernelWrapper, LeafWrapper, dequant_matmul

BLOCK = 32
# ggml type name -> bytes per block of 32 values
TYPES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}


def split_blocks(raw: np.ndarray, type_name: str, shape: Tuple[int, int]):
    """A GGUF tensor's bytes as ``(qs, d, m)`` numpy arrays (copies; ``m`` is None but for Q4_1).

    Args:
      raw: the tensor's bytes (any array; reinterpreted as uint8).
      type_name: ``"Q4_0"``, ``"Q4_1"`` or ``"Q8_0"``.
      shape: numpy-order ``(rows, cols)``; ``cols`` must be a multiple of 32.

    Example:
      >>> block = np.concatenate([np.float16(0.5).reshape(1).view(np.uint8), np.arange(32, dtype=np.int8).view(np.uint8)])
      >>> qs, d, m = split_blocks(block, "Q8_0", (1, 32))
      >>> qs.dtype, qs.shape, d.tolist(), m
      (dtype('int8'), (1, 32), [[0.5]], None)
    """
    if type_name not in TYPES:
        raise ValueError(f"GGUF type {type_name} cannot be kept quantized; jlora keeps {', '.join(TYPES)}")
    rows, cols = (int(s) for s in shape)
    if cols % BLOCK:
        raise ValueError(f"row length {cols} is not a multiple of the {type_name} block size {BLOCK}")
    nbytes, nb = TYPES[type_name], cols // BLOCK
    raw = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    if raw.size != rows * nb * nbytes:
        raise ValueError(f"{type_name} tensor of shape {(rows, cols)} needs {rows * nb * nbytes} bytes, got {raw.size}")
    b = raw.reshape(rows, nb, nbytes)
    d = np.ascontiguousarray(b[..., 0:2]).view("<f2").reshape(rows, nb)
    m = None
    if type_name == "Q8_0":
        qs = np.ascontiguousarray(b[..., 2:]).view(np.int8).reshape(rows, cols)
    elif type_name == "Q4_0":
        qs = np.ascontiguousarray(b[..., 2:]).reshape(rows, cols // 2)
    else:
        m = np.ascontiguousarray(b[..., 2:4]).view("<f2").reshape(rows, nb)
        qs = np.ascontiguousarray(b[..., 4:]).reshape(rows, cols // 2)
    return qs, d.astype(np.float16), None if m is None else m.astype(np.float16)


def unpermute_rows(x: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order -> Hugging Face's: row ``(head, j, c)`` of the file is row ``(head, c, j)``."""
    rows = x.shape[0]
    return np.ascontiguousarray(x.reshape((heads, rows // heads // 2, 2, -1)).transpose(0, 2, 1, 3)
                                .reshape(x.shape))


def dequantize_rows(qs, d, m, qtype: str, dtype=jnp.float32) -> jax.Array:
    """``[rows, cols]`` in ``dtype`` from the block arrays (jnp; the same operations as the float loader)."""
    rows, nb = d.shape
    if qtype == "Q8_0":
        q = qs.reshape(rows, nb, BLOCK).astype(dtype)
    else:
        p = qs.reshape(rows, nb, BLOCK // 2)
        q = jnp.concatenate([p & 15, p >> 4], axis=-1)  # low nibbles are values 0..15, high ones 16..31
        q = (q.astype(jnp.int8) - jnp.int8(8)).astype(dtype) if qtype == "Q4_0" else q.astype(dtype)
    w = q * d.astype(dtype)[..., None]
    if m is not None:
        w = w + m.astype(dtype)[..., None]
    return w.reshape(rows, nb * BLOCK)


def _dequant(arrays, dtype, qtype):
    qs, d, m = arrays
    return dequantize_rows(qs, d, m, qtype, dtype)


class _Blocks:
    """Shared by the kernel and the leaf wrapper: fields ``qs``, ``d``, ``m`` and the static ``qtype``."""

    method = "quantize"  # for messages (a quantized base is no registered method: it is the base)

    @property
    def dtype(self):
        return jnp.dtype(jnp.float32)

    def dequantize_rows(self, dtype=jnp.float32) -> jax.Array:
        """The tensor in the file's numpy order (``W_hf [out, in]`` for a kernel) in ``dtype``."""
        return dequantize_rows(self.qs, self.d, self.m, self.qtype, dtype)

    def strip(self):
        return self

    def labels(self, label_base):
        # Codes and scales never train, whatever label_base says (see jlora.tree.trainable_labels).
        return jax.tree_util.tree_map(lambda _: FROZEN, self)

    def logical_sizes(self):
        rows, nb = self.d.shape
        return jax.tree_util.tree_map(lambda _: 0, self).replace(qs=int(rows * nb * BLOCK))

    def _shard_rows(self, rows_axes, cols_axes, fits):
        """Each block array split by rows (``rows_axes``) and by whole blocks along the columns (``cols_axes``)."""
        rows, nb = self.d.shape
        r = fits(rows, rows_axes) if rows_axes is not None else None
        c = fits(nb, cols_axes) if cols_axes is not None else None  # nb divides: so do qs's columns, per block
        return jax.tree_util.tree_map(lambda _: (r, c), self)


@struct.dataclass
class GGUFQuant(_Blocks, KernelWrapper):
    """A frozen GGUF-quantized kernel (Q4_0 / Q4_1 / Q8_0 blocks; see the module docstring).

    Attributes:
      qs: uint8 ``[out, in / 2]`` (4-bit types) or int8 ``[out, in]`` (Q8_0): the codes of ``W_hf = kernel.T``.
      d: float16 ``[out, in / 32]``: the scale of each block.
      m: float16 ``[out, in / 32]``: Q4_1's block minimum, else None.
      qtype: ``"Q4_0"``, ``"Q4_1"`` or ``"Q8_0"``; static.

    ``materialize()`` is the float32 ``[in, out]`` kernel. Sharding: the block arrays split along the kernel's
    output dimension (their rows) and along its input dimension by whole blocks, where the mesh axes divide.
    """

    qs: jax.Array
    d: jax.Array
    m: Optional[jax.Array] = None
    qtype: str = struct.field(pytree_node=False, default="Q4_1")

    @property
    def shape(self):
        rows, nb = self.d.shape
        return (nb * BLOCK, rows)

    def matmul(self, x):
        # Dequantized in the compute dtype inside this matmul: under jit a temporary, never a stored copy.
        return dequant_matmul(x, (self.qs, self.d, self.m), _dequant, self.qtype, layout="oi")

    def materialize(self):
        return self.dequantize_rows(jnp.float32).T

    def merge_linear(self, bias):
        """The float32 dequantized kernel (what the float loader gives); cast it when saving."""
        return self.materialize(), bias

    def shard(self, spec_in, spec_out, fits):
        return self._shard_rows(spec_out, spec_in, fits)


@struct.dataclass
class GGUFQuantLeaf(_Blocks, LeafWrapper):
    """A frozen GGUF-quantized non-kernel leaf: the token embedding ``[vocab, d]`` (same fields as `GGUFQuant`,
    rows = vocabulary). The model reads it through ``materialize()`` (float32), under jit a temporary."""

    qs: jax.Array
    d: jax.Array
    m: Optional[jax.Array] = None
    qtype: str = struct.field(pytree_node=False, default="Q8_0")

    @property
    def shape(self):
        rows, nb = self.d.shape
        return (rows, nb * BLOCK)

    def materialize(self):
        return self.dequantize_rows(jnp.float32)

    def shard(self, spec, fits):
        spec = tuple(spec) + (None,) * (2 - len(tuple(spec)))
        return self._shard_rows(spec[0], spec[1], fits)


GGUF_QUANTIZED = (GGUFQuant, GGUFQuantLeaf)


def from_gguf_rows(raw, type_name: str, shape: Tuple[int, int], *, kernel: bool, rope_heads: Optional[int] = None):
    """One GGUF tensor kept quantized: a `GGUFQuant` (``kernel=True``: a projection ``[out, in]`` whose jlora
    kernel is the transpose) or a `GGUFQuantLeaf` (an embedding, same orientation as the file).

    Args:
      raw: the tensor's bytes; type_name: its ggml type; shape: numpy-order ``(rows, cols)``.
      kernel: whether the jlora leaf is a kernel (transposed) or an embedding.
      rope_heads: un-permute llama.cpp's q/k rows with this many heads (whole block rows move).

    Example:
      >>> import gguf
      >>> w = np.linspace(-1, 1, 4 * 64, dtype=np.float32).reshape(4, 64)
      >>> k = from_gguf_rows(gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q4_1), "Q4_1", (4, 64), kernel=True)
      >>> type(k).__name__, k.shape, k.qs.shape, k.d.dtype
      ('GGUFQuant', (64, 4), (4, 32), dtype('float16'))
    """
    qs, d, m = split_blocks(raw, type_name, shape)
    if rope_heads is not None:
        qs, d = unpermute_rows(qs, rope_heads), unpermute_rows(d, rope_heads)
        m = None if m is None else unpermute_rows(m, rope_heads)
    cls = GGUFQuant if kernel else GGUFQuantLeaf
    return cls(qs=jnp.asarray(qs), d=jnp.asarray(d), m=None if m is None else jnp.asarray(m), qtype=type_name)


def is_gguf_quantized(x) -> bool:
    """True for a GGUF-quantized base leaf (`GGUFQuant`, `GGUFQuantLeaf`)."""
    return isinstance(x, GGUF_QUANTIZED)
