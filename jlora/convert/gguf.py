"""GGUF files (llama.cpp) -> jlora, for the Llama architecture.

A GGUF file holds metadata (``llama.block_count``, ``tokenizer.ggml.eos_token_id``, ...) and tensors that are
plain (F32, F16, BF16) or block-quantized (Q8_0, Q4_0, Q4_1 are supported here; other types raise ValueError).
Loading dequantizes every tensor to float32 with vectorized numpy, then casts once to the requested dtype;
with ``keep_quantized=True`` the Q8_0 / Q4_0 / Q4_1 projections and embedding stay as stored instead
(`jlora.quant_gguf`, ``load_pretrained(path, quantize="gguf")``: LoRA on a GGUF-quantized base).

Three layout facts matter, all handled next to the key table below:

* GGUF lists a tensor's dimensions fastest-first (``ne``), the reverse of a numpy shape. Read in numpy order,
  a projection is ``[out, in]`` exactly like a Hugging Face ``nn.Linear.weight``, so jlora kernels (``[in, out]``)
  are its transpose, and ``ne`` itself equals the jlora kernel shape.
* llama.cpp's converter permutes the rows of ``attn_q`` / ``attn_k`` (weights and biases) within each head so that
  llama.cpp can apply RoPE to interleaved pairs ``(x0, x1), (x2, x3), ...``. Hugging Face Llama (and
  `jlora.model`) rotates halves ``(x_i, x_{i + D/2})``. Row ``2 j + c`` of a GGUF head is row ``c D/2 + j`` of the
  HF head, so we undo it with ``reshape(heads, D/2, 2, ...)`` -> swap the two middle axes, the same inverse
  transformers applies when it loads GGUF (Q with the query head count, K with the key/value head count).
* Quantized blocks run along ``ne[0]`` (the input dimension of a projection); a row length must be a multiple
  of the block size.

The GGUF name <-> jlora path mapping is one table (`TENSOR_TABLE`), usable in both directions.
"""

from __future__ import annotations

import functools
import inspect
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from jlora.config import ModelConfig
from jlora.model import _is_shape, param_shapes

# GGUF tensor name <-> jlora path ("{i}" is the layer index). Kernels are transposed; q/k rows are un-permuted.
TENSOR_TABLE: Dict[str, str] = {
    "token_embd.weight": "model.embed_tokens.embedding",
    "output_norm.weight": "model.norm.scale",
    "output.weight": "lm_head.kernel",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.scale",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.kernel",
    "blk.{i}.attn_q.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.kernel",
    "blk.{i}.attn_k.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.kernel",
    "blk.{i}.attn_v.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.kernel",
    "blk.{i}.attn_output.bias": "model.layers.{i}.self_attn.o_proj.bias",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.scale",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.kernel",
    "blk.{i}.ffn_gate.bias": "model.layers.{i}.mlp.gate_proj.bias",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.kernel",
    "blk.{i}.ffn_up.bias": "model.layers.{i}.mlp.up_proj.bias",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.kernel",
    "blk.{i}.ffn_down.bias": "model.layers.{i}.mlp.down_proj.bias",
}
_JLORA_TO_GGUF = {v: k for k, v in TENSOR_TABLE.items()}
# Modules whose rows llama.cpp permutes for its RoPE layout, and the head count that permutation used.
_ROPE_PERMUTED = {"q_proj": "n_heads", "k_proj": "kv_heads"}

SUPPORTED_ARCHS = ("llama",)


class TensorEntry(NamedTuple):
    """One row of the mapping for a given config."""

    path: Tuple[str, ...]  # jlora path
    gguf_name: str
    shape: Tuple[int, ...]  # jlora shape
    transpose: bool  # jlora leaf is the transpose of the GGUF tensor in numpy order
    rope_heads: Optional[int]  # un-permute rows with this many heads (q/k projections), else None


def key_table(cfg: ModelConfig) -> List[TensorEntry]:
    """The GGUF mapping for every parameter of ``cfg`` (see `TENSOR_TABLE`).

    Args:
      cfg: a Llama-family config.

    Returns:
      a list of `TensorEntry`, one per jlora leaf.

    Example:
      >>> key_table(jlora.preset("smollm2-135m"))[0].gguf_name
      'token_embd.weight'
    """
    if cfg.arch != "llama":
        raise ValueError(f"GGUF conversion supports the llama architecture only, got {cfg.arch!r}")
    out = []
    for path, shape in jax.tree_util.tree_flatten_with_path(param_shapes(cfg), is_leaf=_is_shape)[0]:
        names = tuple(k.key for k in path)
        if names[:2] == ("model", "layers"):
            i = names[2]
            templ = ".".join(names[:2] + ("{i}",) + names[3:])
        else:
            i, templ = None, ".".join(names)
        gguf_name = _JLORA_TO_GGUF[templ].format(i=i)
        module = names[-2]
        heads = getattr(cfg, _ROPE_PERMUTED[module]) if module in _ROPE_PERMUTED else None
        out.append(TensorEntry(names, gguf_name, tuple(shape), names[-1] == "kernel", heads))
    return out


# ----------------------------------------------------------------------------------------------------------
# Dequantization (vectorized numpy; one block is 32 values sharing a float16 scale)

# ggml type name -> (block size in values, block size in bytes)
_BLOCKS = {"F32": (1, 4), "F16": (1, 2), "BF16": (1, 2), "Q8_0": (32, 34), "Q4_0": (32, 18), "Q4_1": (32, 20)}
SUPPORTED_TYPES = tuple(_BLOCKS)
_KEEP = ("Q4_0", "Q4_1", "Q8_0")  # the block types `jlora.quant_gguf` keeps quantized (load_gguf(keep_quantized=True))


def _half(blocks: np.ndarray, col: int) -> np.ndarray:
    """The little-endian float16 at byte ``col`` of every block, as float32 ``[n, 1]``."""
    return blocks[:, col:col + 2].view("<f2").astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """``[n, 16]`` packed bytes -> ``[n, 32]`` values: low nibbles are values 0..15, high nibbles 16..31."""
    q = np.empty((qs.shape[0], 32), np.uint8)
    np.bitwise_and(qs, 0x0F, out=q[:, :16])
    np.right_shift(qs, 4, out=q[:, 16:])
    return q


def dequantize(raw: np.ndarray, type_name: str, shape: Tuple[int, ...]) -> np.ndarray:
    """Decodes the bytes of one GGUF tensor to float32.

    Args:
      raw: the tensor's bytes (any array; its buffer is reinterpreted as little-endian uint8).
      type_name: the ggml type name: "F32", "F16", "BF16", "Q8_0", "Q4_0" or "Q4_1".
      shape: numpy-order shape of the result (GGUF ``ne`` reversed); the last axis is the one blocks run along.

    Returns:
      a float32 array of ``shape``. Values are exactly ``d * q`` (Q8_0), ``d * (q - 8)`` (Q4_0) and
      ``d * q + m`` (Q4_1, two float32 roundings, as ggml's reference and ``gguf.quants``).

    Example:
      >>> block = np.concatenate([np.float16(0.5).reshape(1).view(np.uint8), np.arange(32, dtype=np.int8).view(np.uint8)])
      >>> dequantize(block, "Q8_0", (32,))[:3]
      array([0. , 0.5, 1. ], dtype=float32)
    """
    if type_name not in _BLOCKS:
        raise ValueError(f"unsupported GGUF tensor type {type_name}; supported: {', '.join(SUPPORTED_TYPES)}")
    block, nbytes = _BLOCKS[type_name]
    n = int(np.prod(shape, dtype=np.int64))
    if shape and shape[-1] % block:
        raise ValueError(f"row length {shape[-1]} is not a multiple of the {type_name} block size {block}")
    raw = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    if raw.size != n // block * nbytes:
        raise ValueError(f"{type_name} tensor of shape {tuple(shape)} needs {n // block * nbytes} bytes, "
                         f"got {raw.size}")
    if type_name == "F32":
        return raw.view("<f4").astype(np.float32, copy=False).reshape(shape)
    if type_name == "F16":
        return raw.view("<f2").astype(np.float32).reshape(shape)
    if type_name == "BF16":  # the high half of a float32
        return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32).reshape(shape)
    b = raw.reshape(-1, nbytes)
    out = np.empty((b.shape[0], block), np.float32)
    if type_name == "Q8_0":
        np.multiply(b[:, 2:].view(np.int8), _half(b, 0), out=out)
    elif type_name == "Q4_0":
        q = _nibbles(b[:, 2:]).view(np.int8)
        q -= 8  # in int8 first, so each value is a single rounding d * (q - 8)
        np.multiply(q, _half(b, 0), out=out)
    else:  # Q4_1
        np.multiply(_nibbles(b[:, 4:]), _half(b, 0), out=out)
        out += _half(b, 2)
    return out.reshape(shape)


# ----------------------------------------------------------------------------------------------------------
# Reading


@functools.lru_cache(maxsize=None)
def _reader_class():
    """``gguf.GGUFReader``, sped up ~3x when its (private) ``_get`` has the signature we know.

    GGUFReader parses every metadata value (for SmolLM2, ~100k tokenizer strings) through ``_get``, which slices
    the ``np.memmap``; each slice of a memmap subclass runs ``memmap.__array_finalize__``, and that is most of the
    reader's time. Slicing a plain-ndarray view of the same mapping reads the same bytes without that overhead.
    Should a future gguf change ``_get``, we fall back to the stock reader (only slower).
    """
    from gguf import GGUFReader

    try:
        params = list(inspect.signature(GGUFReader._get).parameters)
    except (AttributeError, TypeError, ValueError):  # pragma: no cover - a different gguf version
        return GGUFReader
    if params != ["self", "offset", "dtype", "count", "override_order"]:  # pragma: no cover
        return GGUFReader

    class _FastReader(GGUFReader):
        def _get(self, offset, dtype, count=1, override_order=None):
            plain = self.__dict__.get("_plain")
            if plain is None:
                plain = self.__dict__["_plain"] = self.data.view(np.ndarray)
            count, dt = int(count), np.dtype(dtype)
            arr = plain[offset:offset + dt.itemsize * count].view(dt)[:count]
            return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))

    return _FastReader


def _open(path: str, fast: bool = True):
    """A GGUFReader over ``path``; any parse failure becomes a ValueError naming the file."""
    try:
        from gguf import GGUFReader
    except ImportError as e:  # pragma: no cover - gguf is a dependency
        raise ImportError("loading GGUF files needs the `gguf` package (pip install gguf)") from e
    try:
        reader = (_reader_class() if fast else GGUFReader)(path)
    except OSError:
        raise  # missing file, permission, a directory: the OS message already names the path
    except Exception as e:  # numpy / struct / enum errors from a truncated or corrupt file
        raise ValueError(f"{path}: not a valid GGUF file (truncated or corrupt?): {type(e).__name__}: {e}") from None
    if reader.byte_order != "I":
        raise ValueError(f"{path}: GGUF file has the opposite byte order of this machine; not supported")
    return reader


def _field_value(field: Any) -> Any:
    """A GGUF metadata value as Python (str, int, float, bool, or list of those)."""
    if hasattr(field, "contents"):
        return field.contents()
    # Older gguf packages: decode from the raw parts.
    from gguf import GGUFValueType

    def one(part, vtype):
        if vtype == GGUFValueType.STRING:
            return bytes(part).decode("utf-8")
        value = part.tolist()[0]
        return bool(value) if vtype == GGUFValueType.BOOL else value

    if field.types and field.types[0] == GGUFValueType.ARRAY:
        return [one(field.parts[i], field.types[-1]) for i in field.data]
    return one(field.parts[field.data[0]], field.types[0])


def read_metadata(path) -> Dict[str, Any]:
    """Every metadata value of a GGUF file as Python values (``{"general.architecture": "llama", ...}``).

    The reader is `_open`'s, the one that loads the weights. Parsing the ~100k tokenizer strings of a real
    vocabulary takes a while, so the result is cached per (file, size, mtime) for the life of the process;
    do not mutate it.

    Raises:
      ValueError: not a valid GGUF file (naming it). OSError: the file cannot be opened.
    """
    path = os.fspath(path)
    st = os.stat(path)
    return _read_metadata_cached(os.path.realpath(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _read_metadata_cached(path: str, size: int, mtime_ns: int) -> Dict[str, Any]:
    reader = _open(path)
    try:
        return {name: _field_value(field) for name, field in reader.fields.items()}
    except Exception as e:  # a value that does not decode (bad UTF-8, an unknown value type)
        raise ValueError(f"{path}: not a valid GGUF file (unreadable metadata): {type(e).__name__}: {e}") from None


_MISSING = object()


def _meta(reader, key: str, path: str, default=_MISSING, kind=int):
    """A scalar metadata value converted with ``kind``; ValueError naming the file and key when absent/invalid."""
    field = reader.fields.get(key)
    if field is None:
        if default is _MISSING:
            raise ValueError(f"{path}: missing GGUF metadata key {key!r}")
        return default
    try:
        value = _field_value(field)
        if kind is float:  # float32 in the file: take its shortest decimal form (9.999999747e-06 -> 1e-05)
            return float(str(np.float32(value)))
        return kind(value)
    except Exception as e:
        raise ValueError(f"{path}: GGUF metadata key {key!r} is not a valid {kind.__name__} ({e})") from None


def config_from_gguf(reader, path: str = "<gguf>") -> ModelConfig:
    """Builds a `ModelConfig` from the metadata and tensor list of an open ``gguf.GGUFReader``.

    Args:
      reader: a ``gguf.GGUFReader``.
      path: the file name, for error messages.

    Returns:
      the config (Llama family; unsupported options raise ValueError naming the file).
    """
    arch = _meta(reader, "general.architecture", path, kind=str)
    if arch not in SUPPORTED_ARCHS:
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported; jlora loads "
                         f"{', '.join(SUPPORTED_ARCHS)} GGUF files")
    tensors = {t.name: t for t in reader.tensors}

    def m(key, default=_MISSING, kind=int):
        return _meta(reader, f"{arch}.{key}", path, default, kind)

    d = m("embedding_length")
    n_heads = m("attention.head_count")
    head_dim = m("attention.key_length", d // n_heads if n_heads else 0)
    if m("attention.value_length", head_dim) != head_dim:
        raise ValueError(f"{path}: attention.value_length != key_length is not supported")
    rope_dims = m("rope.dimension_count", head_dim)
    if rope_dims != head_dim:
        raise ValueError(f"{path}: partial rotary embedding (rope.dimension_count={rope_dims}, head size "
                         f"{head_dim}) is not supported")
    scaling = m("rope.scaling.type", "none", kind=str)
    if scaling not in ("none", ""):
        raise ValueError(f"{path}: RoPE scaling {scaling!r} is not supported (only plain RoPE)")
    if "rope_freqs.weight" in tensors:
        raise ValueError(f"{path}: tensor rope_freqs.weight (Llama-3 style RoPE frequency scaling) is not supported")
    if m("expert_count", 0):
        raise ValueError(f"{path}: mixture-of-experts Llama GGUF files are not supported")

    if "token_embd.weight" not in tensors:
        raise ValueError(f"{path}: missing tensor token_embd.weight")
    ne = [int(x) for x in tensors["token_embd.weight"].shape]
    if len(ne) != 2 or ne[0] != d:
        raise ValueError(f"{path}: tensor token_embd.weight has GGUF shape {ne}, expected [{d}, vocab]")
    vocab = ne[1]
    meta_vocab = m("vocab_size", vocab)
    if meta_vocab != vocab:
        raise ValueError(f"{path}: {arch}.vocab_size={meta_vocab} but token_embd.weight has {vocab} rows")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is not None and len(tokens.data) > vocab:
        raise ValueError(f"{path}: the tokenizer has {len(tokens.data)} tokens but token_embd.weight only {vocab} rows")

    tok = lambda key: _meta(reader, f"tokenizer.ggml.{key}", path, None)  # noqa: E731
    fields = dict(
        arch="llama", vocab_size=vocab, max_positions=m("context_length"), d_model=d, n_layers=m("block_count"),
        n_heads=n_heads, n_kv_heads=m("attention.head_count_kv", n_heads),
        head_dim=None if head_dim * n_heads == d else head_dim, d_ff=m("feed_forward_length"),
        norm_eps=m("attention.layer_norm_rms_epsilon", kind=float), rope_theta=m("rope.freq_base", 10000.0, float),
        tie_embeddings="output.weight" not in tensors,
        attn_bias="blk.0.attn_q.bias" in tensors, attn_out_bias="blk.0.attn_output.bias" in tensors,
        mlp_bias="blk.0.ffn_up.bias" in tensors,
        bos_token_id=tok("bos_token_id"), eos_token_id=tok("eos_token_id"), pad_token_id=tok("padding_token_id"),
        name=_meta(reader, "general.name", path, arch, kind=str))
    try:
        return ModelConfig(**fields)
    except ValueError as e:  # ModelConfig's own validation (e.g. heads not dividing the width)
        raise ValueError(f"{path}: {e}") from None


def _to_jlora(w: np.ndarray, entry: TensorEntry, head_dim: int, dtype) -> np.ndarray:
    """numpy-order GGUF tensor -> jlora leaf: un-permute q/k rows, transpose kernels; one copy with the cast."""
    if entry.rope_heads is not None:
        h = entry.rope_heads
        # rows (head, j, c) in GGUF -> (head, c, j) in HF; for a kernel, also move the input axis first.
        w = w.reshape((h, head_dim // 2, 2) + w.shape[1:])
        w = w.transpose(3, 0, 2, 1) if w.ndim == 4 else w.transpose(0, 2, 1)
    elif entry.transpose:
        w = w.T
    return np.ascontiguousarray(w, dtype=dtype).reshape(entry.shape)


def load_gguf(path, dtype=jnp.float32, keep_quantized: bool = False, quantize=None) -> Tuple[ModelConfig, dict]:
    """Loads a Llama-architecture GGUF file (llama.cpp format) as a jlora config and parameter tree.

    Args:
      path: the ``.gguf`` file.
      dtype: parameter dtype (float32 by default; bfloat16 halves memory). Quantized tensors are dequantized
        to float32 first, then cast once.
      keep_quantized: keep Q4_0 / Q4_1 / Q8_0 projection and embedding tensors quantized, as frozen
        `jlora.quant_gguf` wrappers (``load_pretrained(quantize="gguf")``); their ``materialize()`` equals the
        float32 load bit for bit. Plain tensors, norms and biases load as above; other quantized types raise.
      quantize: a `jlora.quant.QuantConfig` (or None): its linear kernels are quantized on the host one at a time
        as they are read (from the value a float load in ``dtype`` gives), so no float copy of the whole model
        coexists with the quantized one.

    Returns:
      ``(ModelConfig, params)``; the tree matches `jlora.model.param_shapes` and Hugging Face's Llama layout.

    Raises:
      ValueError naming the file (and tensor) for a corrupt or truncated file, another architecture, a missing,
      unexpected or misshaped tensor, or an unsupported tensor type.

    Example:
      >>> cfg, params = load_gguf(gguf_path)  # a tiny F32 file; jlora.default_model_path() is SmolLM2's
      >>> cfg.name, cfg.n_layers, cfg.kv_heads
      ('tiny-llama', 2, 2)
      >>> jlora.apply(cfg, params, jnp.array([[1, 2, 3, 4, 5]])).shape
      (1, 5, 128)
    """
    path = os.fspath(path)
    target = jnp.dtype(dtype)
    if not jnp.issubdtype(target, jnp.floating):
        raise ValueError(f"load_gguf: dtype must be a float type, got {target}")
    reader = _open(path)
    cfg = config_from_gguf(reader, path)
    tensors = {t.name: t for t in reader.tensors}
    table = key_table(cfg)

    # Check every tensor's presence, type and shape before any work.
    jobs = []
    for entry in table:
        t = tensors.get(entry.gguf_name)
        if t is None:
            raise ValueError(f"{path}: missing tensor {entry.gguf_name} (for {'.'.join(entry.path)})")
        type_name = t.tensor_type.name
        if type_name not in _BLOCKS:
            raise ValueError(f"{path}: tensor {entry.gguf_name} has unsupported type {type_name}; jlora "
                             f"dequantizes {', '.join(SUPPORTED_TYPES)}")
        ne = tuple(int(x) for x in t.shape)
        want = entry.shape if entry.transpose else entry.shape[::-1]  # GGUF ne order
        if ne != tuple(want):
            raise ValueError(f"{path}: tensor {entry.gguf_name} has GGUF shape {list(ne)}, expected {list(want)} "
                             f"for this config")
        jobs.append((entry, t, type_name, ne[::-1]))
    unexpected = sorted(set(tensors) - {e.gguf_name for e in table})
    if unexpected:
        raise ValueError(f"{path}: unexpected tensor {unexpected[0]} for a llama model"
                         + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))

    def convert(job):
        entry, t, type_name, shape = job
        if keep_quantized and type_name in _KEEP and entry.path[-1] in ("kernel", "embedding"):
            from jlora.quant_gguf import from_gguf_rows

            try:
                return from_gguf_rows(t.data, type_name, shape, kernel=entry.transpose, rope_heads=entry.rope_heads)
            except ValueError as e:
                raise ValueError(f"{path}: tensor {entry.gguf_name}: {e}") from None
        try:
            w = dequantize(t.data, type_name, shape)
        except ValueError as e:
            raise ValueError(f"{path}: tensor {entry.gguf_name}: {e}") from None
        module = ".".join(entry.path[:-1])
        if qcfg is not None and entry.path[-1] == "kernel" and qcfg.selects(module):
            w = np.asarray(_to_jlora(w, entry, cfg.dim_head, target))
            return quantize_kernel(np.asarray(w, np.float32), qcfg, module)  # w: the value cast to dtype
        return jnp.asarray(_to_jlora(w, entry, cfg.dim_head, target))

    qcfg = None
    if quantize is not None:
        from jlora.quant import QuantConfig, quantize_kernel

        qcfg = QuantConfig.of(quantize)

    # numpy releases the GIL in the bulk array loops, so threads overlap the per-tensor work.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        arrays = list(pool.map(convert, jobs))

    params: dict = {}
    for (entry, *_), arr in zip(jobs, arrays):
        node = params
        for k in entry.path[:-1]:
            node = node.setdefault(k, {})
        node[entry.path[-1]] = arr
    del reader  # releases the memory map
    if qcfg is not None and not any(entry.path[-1] == "kernel" and qcfg.selects(".".join(entry.path[:-1]))
                                    for entry, *_ in jobs):
        raise ValueError(f"quantize: modules {qcfg.modules!r} matched no linear layer of this {cfg.arch} model")
    return cfg, params
