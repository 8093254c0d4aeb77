"""Language-model losses: sequence log-probabilities and next-token cross-entropy (pretraining, SFT)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxrlhf import ops
from jaxrlhf.losses._common import _float


def sequence_logprobs(token_logprobs: jax.Array, mask: jax.Array, average: bool = False) -> jax.Array:
    """log pi(y) = sum_t m_t log pi(y_t | y_<t), or the per-token mean when `average` (IPO).

    Per row, so it needs no `axis_name` under `jax.shard_map`.

    Args:
      token_logprobs: [B, R] per-token log-probabilities.
      mask: [B, R] bool, True = real token.
      average: divide by the number of real tokens (max(count, 1)) instead of summing.

    Returns:
      [B] sequence log-probabilities.
    """
    if average:
        return ops.masked_mean(_float(token_logprobs), mask, axis=-1)
    return ops.masked_sum(_float(token_logprobs), mask, axis=-1)


def sft_loss(
    logits: jax.Array, targets: jax.Array, loss_mask: jax.Array, *, axis_name: ops.AxisName = None
) -> tuple[jax.Array, dict]:
    """Next-token cross-entropy over the tokens where `loss_mask` is True (pretraining and SFT).

    L = -sum_{b,t} m_bt log softmax(logits_bt)[x_bt] / max(sum_{b,t} m_bt, 1), in float32: one mean
    over every real token of the batch. Language modelling as in Radford et al. 2018, "Improving
    Language Understanding by Generative Pre-Training"; SFT with prompt tokens excluded as in Ouyang
    et al. 2022, "Training language models to follow instructions with human feedback".

    Args:
      logits: [B, T, V], already shifted so `logits[:, t]` predicts `targets[:, t]` (see
        `jaxrlhf.ops`).
      targets: [B, T] int token ids; ids under a False mask are never read (-100 padding is fine).
      loss_mask: [B, T] bool, False on prompt and padding tokens.
      axis_name: mesh axis (or axes) the batch is split over inside `jax.shard_map`; the mean and the
        metrics are then over the global batch.

    Returns:
      (loss, metrics) with metrics "loss", "accuracy" (argmax == target) and "ntokens".
    """
    targets = jnp.where(loss_mask, targets, 0)
    nll = -ops.token_logprobs(logits, targets)  # [B, T]
    loss = ops.masked_mean(nll, loss_mask, axis_name=axis_name)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)  # [B, T]
    return loss, {
        "loss": loss,
        "accuracy": ops.masked_mean(correct, loss_mask, axis_name=axis_name),
        "ntokens": ops.psum(jnp.sum(loss_mask, dtype=jnp.float32), axis_name),
    }
