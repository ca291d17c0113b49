"""The DoRA codec for PEFT files: ``peft_type: LORA`` adapters with ``use_dora: true``, both ways.

The tensors, as PEFT (0.21) writes and reads them (checked by saving a real PEFT DoRA adapter): for every adapted
module ``M``, LoRA's two factors plus the magnitude,

* ``M.lora_A.weight`` ``[r, in]`` -> ``a = lora_A.T``; ``M.lora_B.weight`` ``[out, r]`` -> ``b = lora_B.T``
  (for ``nn.Linear`` and GPT-2 ``Conv1D`` alike, as plain LoRA);
* ``M.lora_magnitude_vector`` ``[out]`` (no ``.weight`` suffix) -> ``m`` as it is.

``adapter_config.json`` is LoRA's (targets, ``r``/``lora_alpha``, ``use_rslora``, ``rank_pattern`` /
``alpha_pattern``, ``lora_dropout``) with ``use_dora: true``: the config side reuses the LoRA codec
(`jlora.convert.peft_lora`), so both methods honour and refuse exactly the same options. Strict: a selected
module without all three tensors, a tensor for a module the config does not select, or a wrong shape is a
ValueError naming it. A DoRA file never loads as plain LoRA (the LoRA codec refuses ``use_dora``), and a DoRA tree
never saves as one (its wrappers are no `jlora.peft.lora.LoRA`).
"""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jlora.convert.peft import fail as _fail
from jlora import tree as T
from jlora.config import ModelConfig
from jlora.convert import peft_lora as PL
from jlora.peft import dora as D
from jlora.peft import lora as L

MAGNITUDE = "lora_magnitude_vector"


class DoraCodec:
    """`jlora.convert.peft`'s codec for DoRA (see the module docstring for the format)."""

    peft_type = "LORA"
    config_cls = D.DoraConfig

    def config_from_peft(self, pconf: dict, where: str) -> D.DoraConfig:
        """The `jlora.peft.dora.DoraConfig` of a PEFT ``adapter_config.json`` (LoRA's fields and checks)."""
        return PL.lora_config_from_peft(pconf, where, self.config_cls)

    def config_to_peft(self, cfg: ModelConfig, params, mcfg: Optional[L.LoraConfig]) -> dict:
        ads = D.adapters(params)
        if not ads:
            _fail("save_adapter", "params has no DoRA adapter (wrap it with jlora.peft.dora.init or load_adapter "
                                  "first)")
        plain = sorted(L.adapters(params), key=T.natural_key)
        if plain:
            _fail("save_adapter", f"params mixes DoRA and plain LoRA kernels ({plain[0]} is LoRA); one PEFT adapter "
                                  f"is either (use_dora is one switch for the whole adapter)")
        if mcfg is not None and not getattr(mcfg, "use_dora", False):
            _fail("save_adapter", f"the {type(mcfg).__name__} given has use_dora=False but params holds DoRA "
                                  f"kernels (pass a DoraConfig, or omit it to derive the config from the wrappers)")
        return {**PL.config_fields(cfg, params, ads, mcfg), "use_dora": True}

    def tensors_to_peft(self, cfg: ModelConfig, params, dtype):
        """``({"<module>.lora_A.weight": [r, in], "<module>.lora_B.weight": [out, r],
        "<module>.lora_magnitude_vector": [out]}, metadata)``."""
        tensors = {}
        for name, ad in D.adapters(params).items():
            tensors[f"{name}.lora_A.weight"] = np.ascontiguousarray(PL._to_numpy(ad.a, dtype).T)
            tensors[f"{name}.lora_B.weight"] = np.ascontiguousarray(PL._to_numpy(ad.b, dtype).T)
            tensors[f"{name}.{MAGNITUDE}"] = np.ascontiguousarray(PL._to_numpy(ad.m, dtype))
        return tensors, None

    def tensors_from_peft(self, cfg: ModelConfig, base_params, pconf: dict, mcfg: L.LoraConfig, src, where: str,
                          dtype=jnp.float32):
        """The base tree with `jlora.peft.dora.DoRA` kernels at the adapted modules (factors in ``dtype``;
        None keeps the file's)."""
        factors, scales, dropout = PL.read_factors(cfg, base_params, pconf, mcfg, src, where, extra=(MAGNITUDE,))
        new = {}
        for module, (a, b, extra) in factors.items():
            kernel = T.get_module(base_params, module)["kernel"]
            d_out = kernel.shape[-1]
            key = extra[MAGNITUDE]
            found = tuple(src.shape(key))
            if found != (d_out,):
                _fail(where, f"tensor {src.original(key)} has shape {found}, expected {(d_out,)} (one magnitude per "
                             f"output column of {module}, which is {kernel.shape[0]} -> {d_out})")
            m = src.get(key)
            if not (np.issubdtype(m.dtype, np.floating) or m.dtype == ml_dtypes.bfloat16):
                _fail(where, f"tensor {src.original(key)} has non-float dtype {m.dtype}")
            new[module] = D.DoRA(base=kernel, a=PL._to_jax(a, dtype), b=PL._to_jax(b, dtype),
                                 m=PL._to_jax(np.asarray(m), dtype), scale=scales[module], dropout=dropout)
        return T.replace_modules(base_params, new)


DORA_CODEC = DoraCodec()
