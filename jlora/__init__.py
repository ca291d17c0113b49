"""jlora: fine-tune GPT-style language models in JAX/Flax (full fine-tuning and LoRA), with exact
Hugging Face / PEFT / GGUF interop. See README.md for the tour; the public surface is listed here."""

from jlora.config import ModelConfig, PRESETS, preset
from jlora.kernels import KernelWrapper, is_wrapper, materialize, matmul
from jlora.model import apply, forward, init_cache, init_params, lm_head, param_shapes

__version__ = "0.1.0"
from jlora.convert import load_pretrained, save_pretrained
