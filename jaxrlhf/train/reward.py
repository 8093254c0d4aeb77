"""Reward models: a scalar model {"gpt", "head"} read at the last real token, trained on ranked answers
(pairwise Bradley-Terry for K = 2, InstructGPT's K-way loss for K > 2) or on binary labels."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxrlhf import losses
from jaxrlhf.models import ModelConfig, sequence_scores
from jaxrlhf.train.state import StepFn, TrainState, update


class RankBatch(NamedTuple):
    """K ranked answers per prompt for a reward model (K = 2: chosen, rejected).

    Attributes:
      tokens: [B, K, T] prompt + answer ids, answers ordered best first.
      mask: [B, K, T] bool.
      rank_mask: [B, K] bool, True = a real answer.
    """

    tokens: jax.Array
    mask: jax.Array
    rank_mask: jax.Array


class LabelBatch(NamedTuple):
    """Labelled rows for a binary reward model.

    Attributes:
      tokens: [B, T] [prompt | answer] ids.   mask: [B, T] bool.
      label: [B] int32, 1 = positive.   row_mask: [B] bool, True = a real row.
    """

    tokens: jax.Array
    mask: jax.Array
    label: jax.Array
    row_mask: jax.Array


def ranked_scores(params, batch: RankBatch, cfg: ModelConfig, *, key=None) -> jax.Array:
    """The scores of every answer: [B, K]."""
    b, k, t = batch.tokens.shape
    scores = sequence_scores(
        params, batch.tokens.reshape(b * k, t), batch.mask.reshape(b * k, t), cfg, key=key
    )
    return scores.reshape(b, k)


def make_rm_step(cfg: ModelConfig, tx: optax.GradientTransformation) -> StepFn:
    """Pairwise Bradley-Terry for K = 2, else the InstructGPT K-way loss over all pairs of a prompt
    (losses.pairwise_rm_loss / kway_rm_loss)."""

    def loss_fn(params, batch: RankBatch, key):
        scores = ranked_scores(params, batch, cfg, key=key)  # [B, K]
        if scores.shape[1] == 2:
            pair_mask = batch.rank_mask[:, 0] & batch.rank_mask[:, 1]
            return losses.pairwise_rm_loss(scores[:, 0], scores[:, 1], mask=pair_mask)
        return losses.kway_rm_loss(scores, batch.rank_mask)

    def step(state: TrainState, batch: RankBatch, *, key=None):
        return update(state, tx, loss_fn, batch, key)

    return step


def make_rm_eval(cfg: ModelConfig) -> Callable:
    """(params, RankBatch) -> (number of correctly ordered pairs, number of pairs) for K = 2."""

    def evaluate(params, batch: RankBatch):
        scores = ranked_scores(params, batch, cfg)
        valid = batch.rank_mask[:, 0] & batch.rank_mask[:, 1]
        correct = (scores[:, 0] > scores[:, 1]) & valid
        return jnp.sum(correct, dtype=jnp.float32), jnp.sum(valid, dtype=jnp.float32)

    return evaluate


def make_binary_step(cfg: ModelConfig, tx: optax.GradientTransformation) -> StepFn:
    """The score at the last real token as the log-odds of the positive class (losses.binary_rm_loss)."""

    def loss_fn(params, batch: LabelBatch, key):
        scores = sequence_scores(params, batch.tokens, batch.mask, cfg, key=key)  # [B]
        return losses.binary_rm_loss(scores, batch.label, batch.row_mask)

    def step(state: TrainState, batch: LabelBatch, *, key=None):
        return update(state, tx, loss_fn, batch, key)

    return step


def make_binary_eval(cfg: ModelConfig) -> Callable:
    """(params, LabelBatch) -> (number of rows on the right side of score 0, number of rows)."""

    def evaluate(params, batch: LabelBatch):
        scores = sequence_scores(params, batch.tokens, batch.mask, cfg)  # [B]
        correct = ((scores > 0) == (batch.label > 0)) & batch.row_mask
        return jnp.sum(correct, dtype=jnp.float32), jnp.sum(batch.row_mask, dtype=jnp.float32)

    return evaluate
