"""Reward-model losses: Bradley-Terry pairs, InstructGPT K-way ranking, binary labels, normalisation and
centring."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf import ops
from jaxrlhf.losses._common import (
    _check_finite,
    _check_param,
    _check_positive,
    _check_rank,
    _check_same_shape,
    _concrete_mask_is_empty,
    _float,
    _is_traced,
    _preference_metrics,
    _zero_padding,
)


def _check_pairs(fn: str, chosen, rejected, mask) -> None:
    """[B] chosen and rejected rewards and an optional [B] mask."""
    _check_rank(fn, "[B]", chosen_rewards=chosen)
    _check_same_shape(fn, "chosen_rewards", chosen, rejected_rewards=rejected, mask=mask)


def pairwise_rm_loss(
    chosen_rewards: jax.Array,
    rejected_rewards: jax.Array,
    margin: jax.Array | float | None = None,
    mask: jax.Array | None = None,
    *,
    axis_name: ops.AxisName = None,
) -> tuple[jax.Array, dict]:
    """Bradley-Terry reward-model loss on preference pairs.

    L = mean_b -log sigmoid(r_chosen_b - r_rejected_b - margin_b). Bradley & Terry 1952; Christiano
    et al. 2017; Stiennon et al. 2020, "Learning to summarize from human feedback". The margin (0 by
    default) is Touvron et al. 2023, "Llama 2", eq. 2.

    Args:
      chosen_rewards: [B] reward of the preferred answer.
      rejected_rewards: [B] reward of the other answer.
      margin: None, a scalar or [B]; the chosen reward must beat the rejected one by this much.
      mask: optional [B] bool, True = real pair.
      axis_name: mesh axis (or axes) the pairs are split over inside `jax.shard_map`; the mean and the
        metrics are then over all pairs.

    Returns:
      (loss, metrics) with "loss", "accuracy" (r_chosen > r_rejected), "reward_margin",
      "chosen_reward", "rejected_reward".
    """
    _check_pairs("pairwise_rm_loss", chosen_rewards, rejected_rewards, mask)
    if margin is not None and jnp.ndim(margin) != 0:
        _check_same_shape("pairwise_rm_loss", "chosen_rewards", chosen_rewards, margin=margin)
    elif margin is not None:
        _check_finite("pairwise_rm_loss", margin=margin)
    chosen, rejected = _float(chosen_rewards), _float(rejected_rewards)
    diff = chosen - rejected  # [B]
    if margin is not None:
        diff = diff - _float(margin)
    loss = ops.masked_mean(-jax.nn.log_sigmoid(_zero_padding(mask, diff)), mask, axis_name=axis_name)
    return loss, {"loss": loss, **_preference_metrics(chosen, rejected, mask, axis_name)}


def binary_rm_loss(
    scores: jax.Array, labels: jax.Array, mask: jax.Array | None = None, *, axis_name: ops.AxisName = None
) -> tuple[jax.Array, dict]:
    """Logistic loss of a reward model's score as the logit of a binary label (e.g. positive sentiment).

    L = mean_b -[y_b log sigmoid(s_b) + (1 - y_b) log sigmoid(-s_b)] = mean_b softplus(-(2 y_b - 1) s_b):
    the score is the log-odds of the positive class (logistic regression on the trunk's last state; the
    sentiment classifier of Ziegler et al. 2019 and of TRL's sentiment example, read as a reward).

    Args:
      scores: [B] scores (logits of the positive class).
      labels: [B] 1 = positive, 0 = negative (int, bool or float); concrete labels (not traced) other than
        0 / 1 under the mask are refused.
      mask: optional [B] bool, True = real row.
      axis_name: mesh axis (or axes) the rows are split over inside `jax.shard_map`.

    Returns:
      (loss, metrics) with "loss", "accuracy" (score > 0 on positives, <= 0 on negatives),
      "positive_score" and "negative_score" (mean scores of each class).
    """
    _check_rank("binary_rm_loss", "[B]", scores=scores)
    _check_same_shape("binary_rm_loss", "scores", scores, labels=labels, mask=mask)
    _check_binary_labels(labels, mask)
    s = _float(scores)
    y = _float(labels) > 0.5  # [B] bool
    sign = jnp.where(y, 1.0, -1.0).astype(s.dtype)
    loss = ops.masked_mean(jax.nn.softplus(-sign * _zero_padding(mask, s)), mask, axis_name=axis_name)
    real = jnp.ones_like(y) if mask is None else mask
    correct = ((s > 0) == y).astype(s.dtype)
    return loss, {
        "loss": loss,
        "accuracy": ops.masked_mean(correct, real, axis_name=axis_name),
        "positive_score": ops.masked_mean(s, real & y, axis_name=axis_name),
        "negative_score": ops.masked_mean(s, real & ~y, axis_name=axis_name),
    }


def _check_binary_labels(labels, mask) -> None:
    """Refuse concrete labels other than 0 / 1 (e.g. a -1 / +1 convention, read as all negative)."""
    if _is_traced(labels) or _is_traced(mask):
        return
    y = np.asarray(labels)
    bad = ~((y == 0) | (y == 1))
    if mask is not None:
        bad &= np.asarray(mask, bool)
    if bad.any():
        i = int(np.argwhere(bad)[0][0])
        raise ValueError(
            f"binary_rm_loss: labels[{i}] = {y[i].item()!r}; labels must be 0 (negative) or 1 (positive) "
            f"({int(bad.sum())} other value(s))"
        )


def kway_rm_loss(
    rewards: jax.Array, rank_mask: jax.Array | None = None, *, axis_name: ops.AxisName = None
) -> tuple[jax.Array, dict]:
    """InstructGPT K-way ranking loss: every ranked pair of a prompt in one batch item.

    L = mean_b [ 1/C(K_b, 2) sum_{i<j valid} -log sigmoid(r_bi - r_bj) ], answer i ranked above
    answer j when i < j. Each prompt weighs the same whatever its number of answers, and its pairs
    are never split across batch items (which overfits, per the paper). Ouyang et al. 2022,
    "Training language models to follow instructions with human feedback", eq. 1. With K = 2 this is
    `pairwise_rm_loss`.

    Args:
      rewards: [B, K] rewards of the K answers of each prompt, ordered best first (index 0 = best).
      rank_mask: optional [B, K] bool, True = a real answer (prompts with fewer than K answers). A
        prompt with fewer than 2 real answers has no pairs and is left out of the mean.
      axis_name: mesh axis (or axes) the prompts (axis 0) are split over inside `jax.shard_map`; the
        mean over prompts and the metrics are then global.

    Returns:
      (loss, metrics) with "loss", "accuracy" and "reward_margin" (means over all valid pairs),
      "npairs".
    """
    _check_rank("kway_rm_loss", "[B, K]", rewards=rewards)
    _check_same_shape("kway_rm_loss", "rewards", rewards, rank_mask=rank_mask)
    rewards = _float(rewards)
    k = rewards.shape[1]
    valid = jnp.ones(rewards.shape, bool) if rank_mask is None else rank_mask  # [B, K]
    rewards = _zero_padding(valid, rewards)
    diff = rewards[:, :, None] - rewards[:, None, :]  # [B, K, K]: r_i - r_j
    upper = jnp.triu(jnp.ones((k, k), bool), k=1)  # [K, K]: i ranked above j
    pair_mask = upper[None] & valid[:, :, None] & valid[:, None, :]  # [B, K, K]
    per_prompt = ops.masked_mean(-jax.nn.log_sigmoid(diff), pair_mask, axis=(1, 2))  # [B]
    loss = ops.masked_mean(per_prompt, jnp.any(pair_mask, axis=(1, 2)), axis_name=axis_name)
    return loss, {
        "loss": loss,
        "accuracy": ops.masked_mean((diff > 0).astype(diff.dtype), pair_mask, axis_name=axis_name),
        "reward_margin": ops.masked_mean(diff, pair_mask, axis_name=axis_name),
        "npairs": ops.psum(jnp.sum(pair_mask, dtype=rewards.dtype), axis_name),
    }


def reward_gain_bias(
    rewards: jax.Array,
    mask: jax.Array | None = None,
    target_mean: float = 0.0,
    target_std: float = 1.0,
    eps: float = 1e-8,
    *,
    axis_name: ops.AxisName = None,
) -> tuple[jax.Array, jax.Array]:
    """Gain and bias that give `rewards` a chosen mean and std: r' = gain * r + bias.

    gain = target_std / sqrt(var(r) + eps), bias = target_mean - gain * mean(r), with the population
    variance over the masked entries. Ziegler et al. 2019, "Fine-Tuning Language Models from Human
    Preferences", normalise the reward model this way on samples of the initial policy (mean 0, std
    1) so the KL coefficient keeps one scale.

    Args:
      rewards: reward-model outputs of any shape, e.g. [B] scores of policy samples.
      mask: optional bool of the same shape, True = real.
      target_mean, target_std: the statistics of gain * r + bias (target_std > 0).
      eps: keeps the gain finite for constant rewards (>= 0). A concrete mask with no True entry (or an
        empty `rewards`) is refused: there are no statistics to match.
      axis_name: mesh axis (or axes) axis 0 is split over inside `jax.shard_map`; the mean and the
        variance are then over every device's samples (same gain and bias everywhere).

    Returns:
      (gain, bias), two scalars.
    """
    fn = "reward_gain_bias"
    _check_same_shape(fn, "rewards", rewards, mask=mask)
    _check_finite(fn, target_mean=target_mean)
    _check_positive(fn, target_std=target_std)
    _check_param(fn, "eps", eps, low=0.0)
    if jnp.size(rewards) == 0 or _concrete_mask_is_empty(mask):
        raise ValueError(
            f"{fn}: mask (or rewards) has no real entry; the statistics of no rewards are undefined"
        )
    rewards = _float(rewards)
    mean = ops.masked_mean(rewards, mask, axis_name=axis_name)
    var = ops.masked_var(rewards, mask, unbiased=False, axis_name=axis_name)
    gain = target_std * jax.lax.rsqrt(var + eps)
    return gain, target_mean - gain * mean


def reward_centring_loss(
    chosen_rewards: jax.Array,
    rejected_rewards: jax.Array,
    mask: jax.Array | None = None,
    *,
    axis_name: ops.AxisName = None,
) -> tuple[jax.Array, dict]:
    """Auxiliary loss that centres a reward model's outputs on 0.

    L = mean_b (r_chosen_b + r_rejected_b)^2; add `coef * L` (e.g. 0.01) to `pairwise_rm_loss`,
    which is blind to a shared offset. Eisenstein et al. 2023, "Helping or Herding? Reward Model
    Ensembles Mitigate but do not Eliminate Reward Hacking".

    Args:
      chosen_rewards, rejected_rewards: [B].
      mask: optional [B] bool, True = real pair.
      axis_name: mesh axis (or axes) the pairs are split over inside `jax.shard_map` (global mean).

    Returns:
      (loss, metrics) with "loss" and "reward_mean" (mean of both rewards).
    """
    _check_pairs("reward_centring_loss", chosen_rewards, rejected_rewards, mask)
    total = _zero_padding(mask, _float(chosen_rewards) + _float(rejected_rewards))  # [B]
    loss = ops.masked_mean(jnp.square(total), mask, axis_name=axis_name)
    return loss, {"loss": loss, "reward_mean": 0.5 * ops.masked_mean(total, mask, axis_name=axis_name)}
