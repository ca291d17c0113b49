"""Model configurations: frozen dataclasses (hashable, so they can be static arguments under `jax.jit`).

One `ModelConfig` describes both supported families:

* ``arch="gpt2"``: learned positions, LayerNorm, GELU-tanh MLP, fused ``c_attn`` with bias, tied head.
* ``arch="llama"``: RoPE, RMSNorm, SwiGLU MLP, grouped-query attention, optional biases, tied or untied head
  (also covers Qwen2/Mistral-style configs that differ only in these switches).

Variants are made with ``cfg.replace(...)``; presets live in `PRESETS` and are reached with `preset(name)`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

ARCHS = ("gpt2", "llama")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only Transformer.

    Args:
      arch: "gpt2" or "llama".
      vocab_size: rows of the token embedding.
      max_positions: context length (learned positions for GPT-2; the RoPE cache bound for Llama).
      d_model: hidden size.
      n_layers: number of Transformer blocks.
      n_heads: query heads.
      n_kv_heads: key/value heads (grouped-query attention when < n_heads).
      head_dim: per-head size; defaults to d_model // n_heads.
      d_ff: MLP inner size.
      norm_eps: epsilon of LayerNorm / RMSNorm.
      rope_theta: RoPE base (Llama family).
      tie_embeddings: the LM head reuses the token embedding.
      attn_bias: q/k/v projections carry a bias (Llama family; GPT-2 always has biases).
      attn_out_bias: the attention output projection carries a bias (Llama family).
      mlp_bias: the MLP projections carry a bias (Llama family).
      bos_token_id, eos_token_id, pad_token_id: special ids (eos may be a tuple of ids).
      dtype: compute dtype of activations ("float32" or "bfloat16"); logits are returned in float32.
      remat: recompute each block in the backward pass instead of storing its activations.
      attention: "auto" (cuDNN fused attention on GPU for 16-bit causal attention without a padding mask,
        XLA otherwise), "xla" or "cudnn" (`jax.nn.dot_product_attention`'s implementations).
      name: a label for reports.

    Example:
      >>> cfg = preset("tiny-llama").replace(n_layers=4)
      >>> cfg.kv_heads, cfg.dim_head
      (2, 16)
    """

    arch: str = "llama"
    vocab_size: int = 256
    max_positions: int = 128
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: Optional[int] = None
    head_dim: Optional[int] = None
    d_ff: int = 128
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    attn_bias: bool = False
    attn_out_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: Optional[int] = None
    eos_token_id: Any = None
    pad_token_id: Optional[int] = None
    dtype: str = "float32"
    remat: bool = False
    attention: str = "auto"
    name: str = "custom"

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"ModelConfig.arch must be one of {ARCHS}, got {self.arch!r}")
        for field in ("vocab_size", "max_positions", "d_model", "n_layers", "n_heads", "d_ff"):
            if int(getattr(self, field)) <= 0:
                raise ValueError(f"ModelConfig.{field} must be positive, got {getattr(self, field)!r}")
        if self.n_heads % self.kv_heads:
            raise ValueError(
                f"ModelConfig.n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.kv_heads})")
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ValueError(f"ModelConfig.d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads}) "
                             "unless head_dim is given")
        if self.arch == "gpt2" and self.kv_heads != self.n_heads:
            raise ValueError("ModelConfig: GPT-2 has no grouped-query attention (n_kv_heads must equal n_heads)")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"ModelConfig.dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.attention not in ("auto", "xla", "cudnn"):
            raise ValueError(f"ModelConfig.attention must be auto, xla or cudnn, got {self.attention!r}")
        if isinstance(self.eos_token_id, list):  # keep the config hashable
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def dim_head(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def eos_ids(self) -> tuple:
        """The end-of-sequence ids as a tuple (possibly empty)."""
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, (tuple, list)):
            return tuple(int(i) for i in self.eos_token_id)
        return (int(self.eos_token_id),)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        """Parameter count of the plain (un-adapted) model, computed from the config alone."""
        d, f, hd = self.d_model, self.d_ff, self.dim_head
        q, kv = self.n_heads * hd, self.kv_heads * hd
        emb = self.vocab_size * d
        if self.arch == "gpt2":
            attn = d * (3 * q) + 3 * q + q * d + d
            mlp = d * f + f + f * d + d
            norms = 2 * 2 * d
            total = emb + self.max_positions * d + self.n_layers * (attn + mlp + norms) + 2 * d
        else:
            attn = d * (q + 2 * kv) + q * d
            if self.attn_bias:
                attn += q + 2 * kv
            if self.attn_out_bias:
                attn += d
            mlp = 3 * d * f + (2 * f + d if self.mlp_bias else 0)
            total = emb + self.n_layers * (attn + mlp + 2 * d) + d
        if not self.tie_embeddings:
            total += emb
        return total


def _gpt2(name, d, layers, heads):
    return ModelConfig(arch="gpt2", vocab_size=50257, max_positions=1024, d_model=d, n_layers=layers,
                       n_heads=heads, d_ff=4 * d, norm_eps=1e-5, tie_embeddings=True,
                       bos_token_id=50256, eos_token_id=50256, name=name)


PRESETS = {
    "gpt2": _gpt2("gpt2", 768, 12, 12),
    "gpt2-medium": _gpt2("gpt2-medium", 1024, 24, 16),
    "gpt2-large": _gpt2("gpt2-large", 1280, 36, 20),
    "gpt2-xl": _gpt2("gpt2-xl", 1600, 48, 25),
    "smollm2-135m": ModelConfig(
        arch="llama", vocab_size=49152, max_positions=8192, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3,
        d_ff=1536, norm_eps=1e-5, rope_theta=100000.0, tie_embeddings=True, bos_token_id=1, eos_token_id=2,
        pad_token_id=2, name="smollm2-135m"),
    # Tiny configs for tests and CI: built in the test, random weights, nothing downloaded.
    "tiny-gpt2": ModelConfig(arch="gpt2", vocab_size=128, max_positions=64, d_model=32, n_layers=2, n_heads=4,
                             d_ff=128, tie_embeddings=True, eos_token_id=0, name="tiny-gpt2"),
    "tiny-llama": ModelConfig(arch="llama", vocab_size=128, max_positions=64, d_model=64, n_layers=2, n_heads=4,
                              n_kv_heads=2, d_ff=96, rope_theta=500000.0, tie_embeddings=False, eos_token_id=0,
                              name="tiny-llama"),
}


def preset(name: str) -> ModelConfig:
    """Returns the named preset config (see `PRESETS`)."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(sorted(PRESETS))}") from None
