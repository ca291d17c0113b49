"""Train state, causal-LM loss, the optimizer, and the one train step for full and parameter-efficient tuning.

The step is a pure ``(state, batch) -> (state, metrics)`` function; its caller jits it, typically with
``jax.jit(step, donate_argnums=0)``. It splits the parameters into (trainable, frozen) by the label tree and
differentiates only the trainable part, so no weight gradient is ever computed for a frozen matrix. Full
fine-tuning is the same step with every leaf labelled trainable.

Batches are dicts of arrays:

* ``input_ids``: int ``[B, T]``; position t is trained to predict token t + 1.
* ``loss_mask`` (optional): ``[B, T]``, 1 where token t is a *target* (0 for prompt and padding tokens).
* ``attention_mask`` (optional): ``[B, T]``, 1 for real tokens.

With gradient accumulation every array gets a leading ``[accum_steps]`` axis.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Union

import jax
import jax.numpy as jnp
import optax
from flax import struct

from jlora import tree as T
from jlora.config import ModelConfig
from jlora.kernels import role_decays, with_rngs
from jlora.model import forward, lm_head


@struct.dataclass
class TrainState:
    """Everything a step updates: step counter, parameters, optimizer state, PRNG key."""

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


def init_state(params, tx: optax.GradientTransformation, seed: Union[int, jax.Array] = 0) -> TrainState:
    """A fresh `TrainState` (frozen leaves get no optimizer state when ``tx`` is from `make_optimizer`)."""
    rng = jax.random.key(seed) if isinstance(seed, int) else seed
    return TrainState(step=jnp.array(0, jnp.int32), params=params, opt_state=tx.init(params), rng=rng)


# ----------------------------------------------------------------------------------------------------------
# Optimizer


def _decay_mask(role: str):
    # Each role declares its rule (jlora.kernels.register_role): "full" decays matrices only (not biases, norm
    # scales), LoRA factors decay, multiplicative vectors (IA3 scales, DoRA magnitudes) never do.
    return lambda tree: jax.tree_util.tree_map(lambda x: role_decays(role, x), tree)


def make_optimizer(labels, learning_rate: Union[float, Callable] = 1e-4, *, weight_decay: float = 0.0,
                   b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                   lr_ratios: Optional[Dict[str, float]] = None) -> optax.GradientTransformation:
    """AdamW over the trainable labels, `optax.set_to_zero` over ``"frozen"``, as one `optax.multi_transform`.

    Frozen leaves hold no optimizer state (optax stores ``MaskedNode`` for them).

    Args:
      labels: the label tree (`jlora.trainable_labels`).
      learning_rate: a float or an optax schedule.
      weight_decay: decoupled weight decay, applied as each role declares (`jlora.kernels.register_role`):
        matrices of fully trained leaves and LoRA factors, never biases, norm scales or scaling vectors.
      b1, b2, eps: Adam hyper-parameters.
      lr_ratios: per-role learning-rate multipliers, e.g. ``{"lora_b": 16.0}`` for LoRA+.

    Returns:
      the optax transformation.

    Example:
      >>> labels = jlora.trainable_labels(jlora.lora.init(key, cfg, params, lcfg))
      >>> tx = make_optimizer(labels, 2e-4, weight_decay=0.01, lr_ratios={"lora_b": 16.0})  # LoRA+
    """
    roles = sorted(set(jax.tree_util.tree_leaves(labels)) - {T.FROZEN})
    lr_ratios = dict(lr_ratios or {})
    unknown = set(lr_ratios) - set(roles)
    if unknown:
        raise ValueError(f"make_optimizer: lr_ratios names unknown roles {sorted(unknown)}; roles here: {roles}")
    transforms = {T.FROZEN: optax.set_to_zero()}
    for role in roles:
        ratio = lr_ratios.get(role, 1.0)
        if callable(learning_rate):
            lr = (lambda s, r=ratio: r * learning_rate(s)) if ratio != 1.0 else learning_rate
        else:
            lr = learning_rate * ratio
        transforms[role] = optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=_decay_mask(role))
    return optax.multi_transform(transforms, labels)


# ----------------------------------------------------------------------------------------------------------
# Loss


def token_weights(batch) -> jax.Array:
    """``[B, T-1]`` float weights of the targets ``input_ids[:, 1:]``."""
    ids = batch["input_ids"]
    w = batch.get("loss_mask")
    if w is None:
        w = batch.get("attention_mask")
    if w is None:
        return jnp.ones((ids.shape[0], ids.shape[1] - 1), jnp.float32)
    return w[:, 1:].astype(jnp.float32)


VOCAB_PAD = 128  # the loss pads the head to a multiple of this: aligned matmul shapes (GPT-2's 50257 is not)


def lm_loss_sum(cfg: ModelConfig, params, batch, label_smoothing: float = 0.0):
    """Summed causal-LM cross-entropy over the weighted targets, and the summed weight.

    Args:
      cfg: model config.
      params: parameter tree.
      batch: dict with ``input_ids`` and optional ``loss_mask`` / ``attention_mask``.
      label_smoothing: PyTorch-style: ``(1 - e) * nll + e * mean over the vocabulary of -log p``.

    Returns:
      ``(loss_sum, weight_sum)`` as float32 scalars; the mean loss is their ratio.
    """
    ids = batch["input_ids"]
    attn = batch.get("attention_mask")
    hidden, _ = forward(cfg, params, ids[:, :-1], attention_mask=None if attn is None else attn[:, :-1])
    logits = lm_head(cfg, params, hidden, pad_to=VOCAB_PAD).astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)  # padded columns hold -1e9: exp() is exactly 0 there
    target_logit = jnp.take_along_axis(logits, ids[:, 1:, None], axis=-1)[..., 0]
    nll = lse - target_logit
    if label_smoothing:
        mean_logit = logits[..., :cfg.vocab_size].mean(-1)
        nll = (1.0 - label_smoothing) * nll + label_smoothing * (lse - mean_logit)
    w = token_weights(batch)
    return jnp.sum(nll * w), jnp.sum(w)


# ----------------------------------------------------------------------------------------------------------
# The step


def make_train_step(cfg: ModelConfig, tx: optax.GradientTransformation, labels, *,
                    max_grad_norm: Optional[float] = None, label_smoothing: float = 0.0,
                    accum_steps: int = 1, axis_name: Optional[str] = None) -> Callable:
    """Builds the train step ``(state, batch) -> (state, metrics)`` (pure; jit it yourself).

    Args:
      cfg: model config (``cfg.dtype`` sets the compute dtype, ``cfg.remat`` rematerialization).
      tx: the optimizer from `make_optimizer` (built over the same ``labels``).
      labels: the label tree; leaves labelled ``"frozen"`` get no gradient at all.
      max_grad_norm: clip the global gradient norm of the trainable leaves.
      label_smoothing: see `lm_loss_sum`.
      accum_steps: gradient accumulation; batch arrays then have a leading ``[accum_steps]`` axis and the
        loss is the token-weighted mean over all micro-batches (identical to one big batch).
      axis_name: for `jax.pmap` data parallelism (see `jlora.parallel.make_pmap_train_step`): each device's
        batch is a shard of the global batch, and the token counts, loss and gradients are summed over this
        axis so the update equals the single-device one on the whole batch (the token-weighted mean of the
        per-device gradients; a plain ``pmean`` when every device holds the same number of target tokens).
        Dropout keys differ per device.

    Returns:
      ``step(state, batch) -> (state, {"loss", "grad_norm", "tokens"})``.

    Example:
      >>> params = jlora.lora.init(key, cfg, params, lcfg); labels = jlora.trainable_labels(params)
      >>> tx = make_optimizer(labels, 1e-3)
      >>> step = jax.jit(make_train_step(cfg, tx, labels))  # donate_argnums=0 would also free the base arrays
      >>> state, metrics = step(init_state(params, tx), {"input_ids": jnp.ones((2, 9), jnp.int32)})
      >>> int(state.step), {k: round(float(v), 2) for k, v in metrics.items()}
      (1, {'grad_norm': 1.0, 'loss': 5.04, 'tokens': 16.0})
    """
    if accum_steps < 1:
        raise ValueError(f"make_train_step: accum_steps must be >= 1, got {accum_steps}")
    if all(l == T.FROZEN for l in jax.tree_util.tree_leaves(labels)):
        bare = T.frozen_bases(labels)  # the label tree keeps the nodes: a bare quantized base shows here
        raise ValueError(T.full_quantized_error(bare, "make_train_step") if bare else
                         "make_train_step: nothing to train: every leaf of the label tree is 'frozen'")

    def loss_fn(trainable, frozen, micro, rng, total):
        params = with_rngs(T.combine(trainable, frozen, labels), rng)
        loss_sum, _ = lm_loss_sum(cfg, params, micro, label_smoothing)
        return loss_sum / total

    grad_fn = jax.value_and_grad(loss_fn)

    def global_sum(x):
        return x if axis_name is None else jax.lax.psum(x, axis_name)

    def step(state: TrainState, batch):
        rng, sub = jax.random.split(state.rng)
        if axis_name is not None:
            sub = jax.random.fold_in(sub, jax.lax.axis_index(axis_name))
        trainable, frozen = T.split(state.params, labels)
        if accum_steps == 1:
            total = jnp.maximum(global_sum(jnp.sum(token_weights(batch))), 1.0)
            loss, grads = grad_fn(trainable, frozen, batch, sub, total)
        else:
            total = jnp.maximum(global_sum(jnp.sum(jax.vmap(token_weights)(batch))), 1.0)

            def micro_step(carry, xs):
                loss_acc, grad_acc = carry
                micro, i = xs
                loss_i, g = grad_fn(trainable, frozen, micro, jax.random.fold_in(sub, i), total)
                return (loss_acc + loss_i, jax.tree_util.tree_map(jnp.add, grad_acc, g)), None

            zeros = jax.tree_util.tree_map(jnp.zeros_like, trainable)
            (loss, grads), _ = jax.lax.scan(micro_step, (jnp.zeros((), jnp.float32), zeros),
                                            (batch, jnp.arange(accum_steps)))
        if axis_name is not None:
            loss, grads = jax.lax.psum((loss, grads), axis_name)
        grad_norm = optax.global_norm(grads)
        if max_grad_norm is not None:
            factor = jnp.minimum(1.0, max_grad_norm / (grad_norm + 1e-6))
            grads = jax.tree_util.tree_map(lambda g: g * factor.astype(g.dtype), grads)
        # The optimizer is a multi_transform over the whole tree; frozen leaves get zeros that set_to_zero
        # ignores (XLA removes them as dead code) and their updates are discarded below.
        full_grads = T.combine(grads, jax.tree_util.tree_map(jnp.zeros_like, frozen), labels)
        updates, opt_state = tx.update(full_grads, state.opt_state, state.params)
        new_trainable = optax.apply_updates(trainable, T.split(updates, labels)[0])
        params = T.combine(new_trainable, frozen, labels)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
        return new_state, {"loss": loss, "grad_norm": grad_norm, "tokens": total}

    return step


def make_eval_step(cfg: ModelConfig) -> Callable:
    """``eval_step(params, batch) -> {"loss_sum", "tokens"}`` (jit it yourself); sum over batches, divide."""

    def eval_step(params, batch):
        loss_sum, n = lm_loss_sum(cfg, params, batch)
        return {"loss_sum": loss_sum, "tokens": n}

    return eval_step
