"""The prompt-learning codecs for PEFT files: ``PREFIX_TUNING`` and ``PROMPT_TUNING`` adapters, both ways.

As PEFT (0.21) writes them (checked against real PEFT files for GPT-2 and a grouped-query Llama):

* one tensor, ``prompt_embeddings``, named bare (no ``base_model.model.`` prefix). Prefix tuning:
  ``[num_virtual_tokens, num_layers * 2 * token_dim]`` -- the prefix encoder's output, so a projection MLP used in
  training is saved folded; prompt tuning: ``[num_virtual_tokens, token_dim]``;
* ``adapter_config.json`` with the model's layout: ``num_layers``, ``token_dim`` and ``num_attention_heads`` --
  for prefix tuning on a model with ``num_key_value_heads`` (Llama, Qwen2 ...), PEFT writes the key/value layout
  (``token_dim = head_dim * num_key_value_heads``, ``num_attention_heads = num_key_value_heads``); for GPT-2 and
  prompt tuning, the model's ``hidden_size`` and ``num_attention_heads``.

Loading checks that layout against the base model and refuses a file made for another one (layer count, heads,
widths), naming the key, what the file says and what the model has. ``prefix_projection: true`` files load as the
folded table (PEFT does the same in inference mode: the MLP cannot be recovered from its output).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from jlora.config import ModelConfig
from jlora.convert.peft import fail as _fail
from jlora.convert.peft import to_jax as _to_jax
from jlora.convert.peft import to_numpy as _to_numpy
from jlora.peft.prefix import Prefix, PrefixConfig, prefix, set_body_hook, token_dim
from jlora.peft.prompt import Prompt, PromptConfig, prompt

KEY = "prompt_embeddings"
_BOOKKEEPING = ("peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
                "inference_mode", "modules_to_save", "num_layers", "token_dim", "num_attention_heads",
                "num_transformer_submodules", "num_virtual_tokens")


def _check_fields(pconf: dict, honoured, where: str) -> None:
    for k, v in pconf.items():
        if k not in _BOOKKEEPING and k not in honoured and v not in (None, False, {}, []):
            _fail(where, f"option {k}={v!r} is not supported by jlora for {pconf.get('peft_type')}")
    if pconf.get("modules_to_save"):
        _fail(where, f"modules_to_save {pconf['modules_to_save']!r} with {pconf.get('peft_type')} is not supported "
                     f"by jlora")
    task = pconf.get("task_type")
    if task not in (None, "CAUSAL_LM"):
        _fail(where, f"task_type {task!r}: jlora loads CAUSAL_LM adapters only")
    if pconf.get("num_transformer_submodules") not in (None, 1):
        _fail(where, f"num_transformer_submodules {pconf['num_transformer_submodules']!r}: a decoder-only model has 1")
    n = pconf.get("num_virtual_tokens")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        _fail(where, f"num_virtual_tokens must be a positive int, got {n!r}")


def _check_layout(pconf: dict, cfg: ModelConfig, want: dict, where: str) -> None:
    """The file's model layout (num_layers, token_dim, num_attention_heads) against the base's."""
    for key, (have, meaning) in want.items():
        got = pconf.get(key)
        if got is not None and got != have:
            _fail(where, f"{key} is {got} but the model has {have} ({meaning}): the adapter was made for another model")


def _read(src, where: str, shape) -> np.ndarray:
    if KEY not in src.keys():
        _fail(where, f"no tensor {KEY} (found: {', '.join(src.original(k) for k in src.keys()) or 'none'})")
    got = tuple(src.shape(KEY))
    if got != tuple(shape):
        _fail(where, f"{KEY} has shape {list(got)}, expected {list(shape)} for this model and config")
    return src.get(KEY)


class PrefixCodec:
    """`jlora.convert.peft`'s codec for prefix tuning (see the module docstring)."""

    peft_type = "PREFIX_TUNING"
    key_prefix = ""

    def config_from_peft(self, pconf: dict, where: str) -> PrefixConfig:
        _check_fields(pconf, ("encoder_hidden_size", "prefix_projection", "init_weights"), where)
        try:
            return PrefixConfig(num_virtual_tokens=pconf["num_virtual_tokens"],
                                prefix_projection=bool(pconf.get("prefix_projection") or False),
                                encoder_hidden_size=pconf.get("encoder_hidden_size"),
                                init_weights=pconf.get("init_weights"))
        except ValueError as e:
            _fail(where, str(e))

    def config_to_peft(self, cfg: ModelConfig, params, mcfg: Optional[PrefixConfig]) -> dict:
        hook = prefix(cfg, params)
        td = token_dim(cfg)
        return {"peft_type": self.peft_type, "task_type": "CAUSAL_LM", "inference_mode": True,
                "num_virtual_tokens": hook.length, "token_dim": td, "num_transformer_submodules": 1,
                "num_attention_heads": cfg.kv_heads, "num_layers": cfg.n_layers,
                "encoder_hidden_size": (mcfg.encoder_hidden_size if mcfg and mcfg.encoder_hidden_size else
                                        (int(hook.w1.shape[1]) if hook.projected else td)),
                "prefix_projection": bool(hook.projected or (mcfg is not None and mcfg.prefix_projection)),
                "init_weights": mcfg.init_weights if mcfg is not None else None}

    def tensors_to_peft(self, cfg: ModelConfig, params, dtype):
        return {KEY: _to_numpy(prefix(cfg, params).folded().embedding, dtype)}

    def tensors_from_peft(self, cfg: ModelConfig, base, pconf: dict, mcfg: PrefixConfig, src, where: str, dtype=None):
        td = token_dim(cfg)
        _check_layout(pconf, cfg, {"num_layers": (cfg.n_layers, "layers"),
                                   "num_attention_heads": (cfg.kv_heads, "key/value heads"),
                                   "token_dim": (td, "head_dim * key/value heads")}, where)
        table = _read(src, where, (mcfg.num_virtual_tokens, cfg.n_layers * 2 * td))
        hook = Prefix(embedding=_to_jax(table, dtype), n_layers=cfg.n_layers, kv_heads=cfg.kv_heads,
                      head_dim=cfg.dim_head)
        return set_body_hook(cfg, base, "kv_prefix", hook, where)


class PromptCodec:
    """`jlora.convert.peft`'s codec for prompt tuning (see the module docstring)."""

    peft_type = "PROMPT_TUNING"
    key_prefix = ""

    def config_from_peft(self, pconf: dict, where: str) -> PromptConfig:
        _check_fields(pconf, ("prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_name_or_path",
                              "tokenizer_kwargs"), where)
        try:  # the init fields only say how training started; they are kept for the round trip
            return PromptConfig(num_virtual_tokens=pconf["num_virtual_tokens"],
                                prompt_tuning_init=pconf.get("prompt_tuning_init") or "RANDOM",
                                prompt_tuning_init_text=pconf.get("prompt_tuning_init_text"),
                                tokenizer_name_or_path=pconf.get("tokenizer_name_or_path"))
        except ValueError as e:
            _fail(where, str(e))

    def config_to_peft(self, cfg: ModelConfig, params, mcfg: Optional[PromptConfig]) -> dict:
        hook = prompt(cfg, params)
        out = {"peft_type": self.peft_type, "task_type": "CAUSAL_LM", "inference_mode": True,
               "num_virtual_tokens": hook.length, "token_dim": cfg.d_model, "num_transformer_submodules": 1,
               "num_attention_heads": cfg.n_heads, "num_layers": cfg.n_layers, "prompt_tuning_init": "RANDOM",
               "prompt_tuning_init_text": None, "tokenizer_name_or_path": None, "tokenizer_kwargs": None}
        if mcfg is not None:
            out.update(prompt_tuning_init=mcfg.prompt_tuning_init, prompt_tuning_init_text=mcfg.prompt_tuning_init_text,
                       tokenizer_name_or_path=mcfg.tokenizer_name_or_path)
        return out

    def tensors_to_peft(self, cfg: ModelConfig, params, dtype):
        return {KEY: _to_numpy(prompt(cfg, params).embedding, dtype)}

    def tensors_from_peft(self, cfg: ModelConfig, base, pconf: dict, mcfg: PromptConfig, src, where: str, dtype=None):
        _check_layout(pconf, cfg, {"num_layers": (cfg.n_layers, "layers"),
                                   "token_dim": (cfg.d_model, "hidden size")}, where)
        table = _read(src, where, (mcfg.num_virtual_tokens, cfg.d_model))
        return set_body_hook(cfg, base, "input_prefix", Prompt(embedding=_to_jax(table, dtype)), where)


PREFIX_CODEC = PrefixCodec()
PROMPT_CODEC = PromptCodec()
