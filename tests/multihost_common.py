"""The tiny run shared by tests/test_multihost.py and its worker processes."""

import jax
import numpy as np

from jlora.config import preset
from jlora.data import Batches
from jlora.loop import FitConfig
from jlora.model import init_params
from jlora.peft import lora


def make_params():
    cfg = preset("tiny-gpt2")
    params = lora.init(jax.random.key(2), cfg, init_params(cfg, jax.random.key(1)),
                       lora.LoraConfig(r=4, alpha=8, init=False))
    return cfg, params


def make_data(cfg, host_index=0, host_count=1):
    rng = np.random.default_rng(0)
    seqs = [(rng.integers(1, cfg.vocab_size, 17).tolist(), [1] * 17) for _ in range(64)]
    return Batches(seqs, seq_len=16, batch_size=8, seed=0, host_index=host_index, host_count=host_count)


def fit_config():
    return FitConfig(steps=4, learning_rate=1e-2, log_every=1, save_every=2, schedule="linear", adam_eps=1e-4)
