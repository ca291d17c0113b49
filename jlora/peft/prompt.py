"""Prompt tuning (Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning"; PEFT's
``PromptTuningConfig``) as a hook at the model's ``input_prefix`` site.

``P = num_virtual_tokens`` learned embeddings ``[P, d_model]`` are placed before the first token, as PEFT (0.21)
does (``PeftModelForCausalLM.forward``): the attention mask gets ``P`` ones in front, the virtual positions carry
no loss (PEFT's ``-100`` labels; jlora drops their outputs, so logits and losses stay aligned with the tokens),
and real tokens take positions ``P, P+1, ...``. In generation the virtual tokens' keys and values are computed
once into the KV cache (`jlora.model.init_cache` with ``params``).

Initialization (``prompt_tuning_init``), as PEFT: ``"RANDOM"`` ``N(0, 1)`` (``torch.nn.Embedding``),
``"SAMPLE_VOCAB"`` rows of the model's token embedding at uniformly drawn ids, ``"TEXT"`` the embeddings of
``prompt_tuning_init_text`` tokenized by ``tokenizer_name_or_path`` (with special tokens, as PEFT calls the
tokenizer), cut or repeated to ``P`` tokens. Stored in float32.

The virtual tokens cannot be folded into the weights: `jlora.merge` refuses them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jlora.config import ModelConfig
from jlora.kernels import HOOKS, Hook, register_role
from jlora.peft import base as B
from jlora.peft.prefix import set_body_hook

PROMPT = register_role("prompt", "matrices")  # as HF Trainer: the [P, d] table decays

INITS = ("RANDOM", "SAMPLE_VOCAB", "TEXT")


@struct.dataclass
class Prompt(Hook):
    """Learned virtual token embeddings (the body's ``input_prefix`` hook).

    Attributes:
      embedding: ``[P, d_model]`` (trainable).
    """

    embedding: jax.Array

    @property
    def length(self) -> int:
        """``P``, the number of virtual tokens."""
        return int(self.embedding.shape[0])

    def embeds(self, batch: int, dtype):
        """``[batch, P, d]`` in ``dtype`` (PEFT casts the prompts to the input embeddings' dtype)."""
        e = self.embedding.astype(dtype)
        return jnp.broadcast_to(e[None], (batch,) + e.shape)

    def labels(self, label_base):
        return self.replace(embedding=PROMPT)


@dataclasses.dataclass(frozen=True)
class PromptConfig:
    """Prompt tuning options (PEFT's ``PromptTuningConfig`` names and meaning).

    Args:
      num_virtual_tokens: ``P`` (> 0).
      prompt_tuning_init: ``"RANDOM"``, ``"SAMPLE_VOCAB"`` or ``"TEXT"``.
      prompt_tuning_init_text: the text for ``"TEXT"``.
      tokenizer_name_or_path: the tokenizer for ``"TEXT"`` (a model directory, ``tokenizer.json`` or GGUF file;
        ``jlora train`` fills in the run's model when it is not given).
      dtype: dtype of the embedding table.

    Example:
      >>> PromptConfig(num_virtual_tokens=4, prompt_tuning_init="SAMPLE_VOCAB").prompt_tuning_init
      'SAMPLE_VOCAB'
    """

    num_virtual_tokens: int = 20
    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: Optional[str] = None
    tokenizer_name_or_path: Optional[str] = None
    dtype: str = "float32"

    def __post_init__(self):
        n = self.num_virtual_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"num_virtual_tokens must be a positive int, got {n!r}")
        init = str(getattr(self.prompt_tuning_init, "value", self.prompt_tuning_init))
        if init not in INITS:
            raise ValueError(f"prompt_tuning_init must be one of {', '.join(INITS)}, got {self.prompt_tuning_init!r}")
        object.__setattr__(self, "prompt_tuning_init", init)
        if init == "TEXT" and not self.prompt_tuning_init_text:
            raise ValueError("prompt_tuning_init 'TEXT' needs prompt_tuning_init_text")
        try:
            jnp.dtype(self.dtype)
        except TypeError:
            raise ValueError(f"dtype {self.dtype!r} is not a dtype") from None

    def replace(self, **changes) -> "PromptConfig":
        return dataclasses.replace(self, **changes)


def init_ids(pcfg: PromptConfig, tokenizer) -> np.ndarray:
    """The ``[P]`` token ids whose embeddings start a ``"TEXT"`` prompt (PEFT's rule: cut, or repeat then cut)."""
    ids = list(tokenizer.encode(pcfg.prompt_tuning_init_text))
    if not ids:
        raise ValueError(f"prompt_tuning_init_text {pcfg.prompt_tuning_init_text!r} gives no tokens")
    p = pcfg.num_virtual_tokens
    ids = (ids * math.ceil(p / len(ids)))[:p]
    return np.asarray(ids, np.int32)


def init(key: jax.Array, cfg: ModelConfig, params, pcfg: PromptConfig, tokenizer=None):
    """Adds a `Prompt` at the body's ``input_prefix`` site (a new tree; ``params`` is not modified).

    Args:
      key: PRNG key (``"RANDOM"`` and ``"SAMPLE_VOCAB"``).
      cfg: model config.
      params: base parameter tree.
      pcfg: the prompt config.
      tokenizer: for ``"TEXT"``: a `jlora.tokenizer.Tokenizer` (default: loaded from ``tokenizer_name_or_path``).

    Returns:
      the tree with the prompt hook (every base leaf frozen, unchanged).

    Example:
      >>> tuned = jlora.peft.prompt.init(jax.random.key(0), cfg, params, PromptConfig(num_virtual_tokens=3))
      >>> tuned["model"]["hooks"]["input_prefix"].embedding.shape
      (3, 64)
    """
    from jlora.model import embedding

    p, dt = pcfg.num_virtual_tokens, jnp.dtype(pcfg.dtype)
    if pcfg.prompt_tuning_init == "RANDOM":
        e = jax.random.normal(key, (p, cfg.d_model), jnp.float32)
    else:
        if pcfg.prompt_tuning_init == "SAMPLE_VOCAB":
            ids = jax.random.randint(key, (p,), 0, cfg.vocab_size)
        else:
            if tokenizer is None:
                if not pcfg.tokenizer_name_or_path:
                    raise ValueError("prompt_tuning_init 'TEXT' needs tokenizer_name_or_path (or a tokenizer)")
                from jlora.tokenizer import load_tokenizer

                tokenizer = load_tokenizer(pcfg.tokenizer_name_or_path)
            ids = jnp.asarray(init_ids(pcfg, tokenizer))
            if int(ids.max()) >= cfg.vocab_size:
                raise ValueError(f"prompt_tuning_init_text: token id {int(ids.max())} is outside the model's "
                                 f"vocabulary of {cfg.vocab_size} (a tokenizer of another model?)")
        e = jnp.take(embedding(cfg, params).astype(jnp.float32), ids, axis=0)
    return set_body_hook(cfg, params, "input_prefix", Prompt(embedding=e.astype(dt)), "prompt.init")


def prompt(cfg: ModelConfig, params) -> Optional[Prompt]:
    """The tree's `Prompt` hook, or None."""
    from jlora.model import body

    hook = body(cfg, params).get(HOOKS, {}).get("input_prefix")
    return hook if isinstance(hook, Prompt) else None


def strip(params):
    """The tree without any PEFT method (see `jlora.peft.base.strip`): ``strip(init(p)) == p``."""
    return B.strip(params)


METHOD = B.register(B.Method(
    kind="prompt", config=PromptConfig, init=init, nodes=(Prompt,), codec="jlora.convert.peft_prompt:PROMPT_CODEC",
    claims=lambda pconf: str(pconf.get("peft_type", "")).upper() == "PROMPT_TUNING", peft_type="PROMPT_TUNING",
    summary="prompt tuning: learned virtual token embeddings before the input (not mergeable)"))
