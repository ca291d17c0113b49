"""jlora: fine-tune GPT-style language models in JAX/Flax (full fine-tuning, LoRA, DoRA, IA3), with exact
Hugging Face / PEFT / GGUF interop. See README.md for the tour; the public surface is listed here.

    import jlora
    cfg, params = jlora.load_pretrained(path)          # HF dir or .gguf
    logits = jlora.apply(cfg, params, tokens)
    params = jlora.lora.init(key, cfg, params, jlora.LoraConfig(r=8, alpha=16))
    merged = jlora.merge(params)
    params = jlora.ia3.init(key, cfg, base, jlora.IA3Config())   # any registered method: jlora.methods.get(kind)
    params = jlora.bottleneck.init(key, cfg, base, jlora.DoubleSeqBnConfig())   # AdapterHub's Houlsby adapter
    s = jlora.AdapterSet(cfg, base); s.add("a", dir_a); s.apply(tokens, ["a", "__base__"])   # mixed batches
    c = jlora.combine_adapters([a, b], [0.7, 0.3], "ties", density=0.5)   # PEFT's add_weighted_adapter
    srv = jlora.serve.start_server(cfg, base, tok, {"a": dir_a})   # OpenAI-compatible; CLI: jlora serve
"""

from jlora import model_path, parallel, tree
from jlora.config import PRESETS, ModelConfig, preset
from jlora.convert import load_pretrained, save_pretrained
from jlora.convert.peft import config_from_peft, load_adapter, lora_config_from_peft, save_adapter
from jlora.generate import chat, generate
from jlora.kernels import KernelWrapper, is_wrapper, materialize, matmul, merge
from jlora.model import apply, forward, init_cache, init_params, lm_head, param_shapes
from jlora.model_path import DEFAULT_MODEL, default_model_path, find_default_model, resolve_model
from jlora.peft import base as methods
from jlora.peft import bottleneck, dora, ia3, lora, multi, prefix, prompt
from jlora.peft.base import strip
from jlora.peft.bottleneck import Bottleneck, BnConfig, DoubleSeqBnConfig, ParBnConfig, SeqBnConfig
from jlora.peft.dora import DoRA, DoraConfig
from jlora.peft.ia3 import IA3, IA3Config
from jlora.peft.lora import LoRA, LoraConfig
from jlora.peft.multi import AdapterSet, MultiKernel
from jlora.peft.prefix import Prefix, PrefixConfig
from jlora.peft.prompt import Prompt, PromptConfig
from jlora.peft.weighted import combine_adapters
from jlora import quant, serve
from jlora.quant import Int8, Quant4bit, QuantConfig, quantize_params
from jlora.quant_gguf import GGUFQuant, GGUFQuantLeaf
from jlora.tokenizer import Tokenizer, load_tokenizer
from jlora.tree import combine, format_report, param_report, split, trainable_labels

__version__ = "0.1.0"
