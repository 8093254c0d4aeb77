"""Language-model losses: sequence log-probabilities and next-token cross-entropy (pretraining, SFT)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf import ops
from jaxrlhf.losses._common import _check_prefix, _check_rank, _check_same_shape, _float, _is_traced


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
    _check_rank("sequence_logprobs", "[B, R]", token_logprobs=token_logprobs)
    _check_same_shape("sequence_logprobs", "token_logprobs", token_logprobs, mask=mask)
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
      targets: [B, T] int token ids; ids under a False mask are never read (-100 padding is fine). Under
        a True mask an id must lie in [0, V): concrete (not traced) arrays with one outside are refused
        (ValueError naming the first); traced, that token's loss is NaN, so the loss is NaN (never a read
        of another entry, as -1 would read the last one).
      loss_mask: [B, T] bool, False on prompt and padding tokens. An all-False mask gives a loss of 0.
      axis_name: mesh axis (or axes) the batch is split over inside `jax.shard_map`; the mean and the
        metrics are then over the global batch.

    Returns:
      (loss, metrics) with metrics "loss", "accuracy" (argmax == target) and "ntokens".
    """
    if not hasattr(targets, "shape"):  # a list
        targets = np.asarray(targets)
    _check_rank("sft_loss", "[B, T, V]", logits=logits)
    _check_rank("sft_loss", "[B, T]", targets=targets)
    _check_prefix("sft_loss", "logits", logits, 2, targets=targets, loss_mask=loss_mask)
    if not jnp.issubdtype(jnp.result_type(targets), jnp.integer):
        raise ValueError(
            f"sft_loss: targets has dtype {jnp.result_type(targets)}; it must hold int token ids"
        )
    vocab = jnp.shape(logits)[-1]
    _check_target_ids(targets, loss_mask, vocab)
    in_vocab = (targets >= 0) & (targets < vocab)  # [B, T]
    targets = jnp.where(loss_mask, targets, 0)
    nll = -ops.token_logprobs(logits, targets)  # [B, T]
    # An id outside [0, V) under a True mask (only possible traced) makes the loss NaN, never a wrapped read.
    nll = jnp.where(jnp.logical_and(loss_mask, ~in_vocab), jnp.nan, nll)
    loss = ops.masked_mean(nll, loss_mask, axis_name=axis_name)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)  # [B, T]
    return loss, {
        "loss": loss,
        "accuracy": ops.masked_mean(correct, loss_mask, axis_name=axis_name),
        "ntokens": ops.psum(jnp.sum(loss_mask, dtype=jnp.float32), axis_name),
    }


def _check_target_ids(targets, loss_mask, vocab: int) -> None:
    """Refuse concrete target ids outside [0, vocab) under a True mask, naming the first one."""
    if _is_traced(targets) or _is_traced(loss_mask):
        return
    t, m = np.asarray(targets), np.asarray(loss_mask, bool)
    bad = m & ((t < 0) | (t >= vocab))
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"sft_loss: targets{list(first)} = {int(t[first])} under a True loss_mask is outside "
            f"[0, V={vocab}) ({int(bad.sum())} such token(s)); mask it out or fix the id"
        )
