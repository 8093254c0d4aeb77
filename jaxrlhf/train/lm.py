"""Language modelling (pretraining, SFT, PPO-ptx): next-token cross-entropy on the `loss_mask` tokens.

One row layout serves all of them: [prompt | answer] with the prompt P tokens wide. The loss runs the LM
head only on the hidden states that predict answer tokens (positions P - 1 .. T - 2): at P = 512, S = 53
that is a tenth of the [B, T, V] logits' memory. P = 1 (one beginning-of-text token, or pretraining rows
whose first token is never a target) is plain language modelling of the whole row.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxrlhf import losses, ops
from jaxrlhf.models import ModelConfig, transformer
from jaxrlhf.train.state import StepFn, TrainState, update


class LMBatch(NamedTuple):
    """Language-modelling batch (pretraining, SFT, PPO-ptx).

    Attributes:
      tokens: [B, T] int32 ids (T <= block_size + 1: the model reads the first T - 1).
      mask: [B, T] bool, True = real token.
      loss_mask: [B, T] bool, True where token t is a target (predicted from tokens < t); for SFT the
        answer tokens only, for pretraining `mask`. Position 0 is never a target.
    """

    tokens: jax.Array
    mask: jax.Array
    loss_mask: jax.Array


def answer_logits(params, batch: LMBatch, cfg: ModelConfig, *, prompt_len: int = 1, key=None) -> jax.Array:
    """Next-token logits of the tokens after the first `prompt_len`: [B, T] -> [B, T - P, V] float32."""
    # The last position predicts nothing: run the model on T - 1 tokens (T may be block_size + 1).
    hidden = transformer.forward(
        params, batch.tokens[:, :-1], batch.mask[:, :-1], cfg, key=key
    )  # [B, T-1, D]
    return transformer.lm_logits(params, hidden[:, prompt_len - 1 :], cfg)  # [B, T-P, V]


def _targets(batch: LMBatch, prompt_len: int) -> tuple[jax.Array, jax.Array]:
    return batch.tokens[:, prompt_len:], batch.loss_mask[:, prompt_len:] & batch.mask[:, prompt_len:]


def lm_loss(params, batch: LMBatch, cfg: ModelConfig, *, prompt_len: int = 1, key=None):
    """Token-mean next-token cross-entropy on the `loss_mask` tokens after the prompt (losses.sft_loss):
    (loss, metrics)."""
    targets, targets_mask = _targets(batch, prompt_len)
    return losses.sft_loss(
        answer_logits(params, batch, cfg, prompt_len=prompt_len, key=key), targets, targets_mask
    )


def make_lm_step(cfg: ModelConfig, tx: optax.GradientTransformation, *, prompt_len: int = 1) -> StepFn:
    """step(state, LMBatch, *, key) -> (state, metrics): one update of `lm_loss`."""

    def loss_fn(params, batch: LMBatch, key):
        return lm_loss(params, batch, cfg, prompt_len=prompt_len, key=key)

    def step(state: TrainState, batch: LMBatch, *, key=None):
        return update(state, tx, loss_fn, batch, key)

    return step


def make_lm_eval(cfg: ModelConfig, *, prompt_len: int = 1) -> Callable:
    """(params, LMBatch) -> (sum of target-token NLL, number of target tokens), for exact held-out means
    over any number of batches."""

    def evaluate(params, batch: LMBatch):
        targets, targets_mask = _targets(batch, prompt_len)
        nll = -ops.token_logprobs(answer_logits(params, batch, cfg, prompt_len=prompt_len), targets)
        return ops.masked_sum(nll, targets_mask), jnp.sum(targets_mask, dtype=jnp.float32)

    return evaluate
