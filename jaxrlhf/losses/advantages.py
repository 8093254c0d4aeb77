"""Advantage estimators: GAE, batch whitening, REINFORCE++, and the group baselines of RLOO and GRPO.

Under `jax.shard_map` only `whiten_advantages` and `reinforce_pp_advantages` reduce over the batch (they take
`axis_name`). GAE runs per row; RLOO and GRPO use per-group statistics and take no `axis_name`: a group is one
row of their [B, K] input, and for a flat rollout batch reshaped to [B / K, K] the K answers of a prompt are K
consecutive rows, so each device's share of the batch must hold whole groups (its row count a multiple of K,
which a batch split on axis 0 into equal shards of whole groups gives).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxrlhf import ops
from jaxrlhf.losses._common import (
    _check_param,
    _check_positive,
    _check_prefix,
    _check_rank,
    _check_same_shape,
    _float,
    _score_at_last_token,
    _zero_padding,
)


def compute_gae(
    rewards: jax.Array,
    values: jax.Array,
    response_mask: jax.Array,
    gamma: float,
    lam: float,
    last_value: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation as a reverse `lax.scan` over response tokens.

    delta_t = r_t + gamma * V_next - V_t,   A_t = delta_t + gamma * lam * A_next,
    returns_t = A_t + V_t,
    where "next" is the next *real* token: padding (anywhere in the row) is skipped by carrying
    V_next and A_next across it, and the value after the last real token is 0 (or `last_value` for
    a truncated response). Schulman et al. 2016, "High-Dimensional Continuous Control Using
    Generalized Advantage Estimation", eq. 16. With gamma = lam = 1, A_t = sum_{u>=t} r_u - V_t.

    Args:
      rewards: [B, R] per-token rewards (e.g. from `shaped_rewards`).
      values: [B, R] value estimates V(s_t).
      response_mask: [B, R] bool, True = real token.
      gamma: discount in [0, 1].
      lam: GAE lambda in [0, 1] (gamma and lam are checked when they are not traced).
      last_value: optional scalar or [B] bootstrap value after the last token.

    Returns:
      (advantages [B, R], returns [B, R]), both 0 on padding.
    """
    fn = "compute_gae"
    _check_rank(fn, "[B, R]", rewards=rewards)
    _check_same_shape(fn, "rewards", rewards, values=values, response_mask=response_mask)
    if last_value is not None and jnp.ndim(last_value) != 0:
        _check_prefix(fn, "rewards", rewards, 1, last_value=last_value)
    _check_param(fn, "gamma", gamma, low=0.0, high=1.0)
    _check_param(fn, "lam", lam, low=0.0, high=1.0)
    rewards = _float(rewards)
    values = _float(values).astype(rewards.dtype)
    # A [B] zero derived from the inputs, so that inside `jax.shard_map` the scan's initial carry varies over
    # the same mesh axes as its output (a fresh jnp.zeros would not, and the scan would be refused).
    zero = jnp.zeros_like(jnp.where(response_mask[:, 0], rewards[:, 0], values[:, 0]))  # [B]
    next_value = zero
    if last_value is not None:
        next_value = zero + jnp.asarray(last_value, rewards.dtype)

    def step(carry, inputs):
        next_value, next_advantage = carry  # [B], [B]
        reward, value, mask = inputs  # [B], [B], [B]
        delta = reward + gamma * next_value - value
        advantage = delta + gamma * lam * next_advantage
        carry = (jnp.where(mask, value, next_value), jnp.where(mask, advantage, next_advantage))
        return carry, jnp.where(mask, advantage, 0.0)

    init = (next_value, zero)
    inputs = (rewards.T, values.T, response_mask.T)  # time-major [R, B]
    _, advantages = jax.lax.scan(step, init, inputs, reverse=True)
    advantages = advantages.T  # [B, R]
    returns = jnp.where(response_mask, advantages + values, 0.0)
    return advantages, returns


def whiten_advantages(
    advantages: jax.Array,
    response_mask: jax.Array | None = None,
    shift_mean: bool = True,
    eps: float = 1e-8,
    *,
    axis_name: ops.AxisName = None,
) -> jax.Array:
    """(x - mean) / std over all real tokens of the batch; `shift_mean=False` adds the mean back.

    Whitening as in lm-human-preferences (Ziegler et al. 2019), of advantages, and with shift_mean=False
    of per-token rewards (its whiten_rewards). [B, R] -> [B, R], 0 on padding. Statistics are global over
    all axes: the Bessel-corrected variance of every real token; with `axis_name` (inside
    `jax.shard_map`) the mean, the variance and the count are those of every device's real tokens
    together. An all-False mask gives 0 everywhere. `eps` (>= 0) is added to the variance.
    """
    _check_same_shape("whiten_advantages", "advantages", advantages, response_mask=response_mask)
    _check_param("whiten_advantages", "eps", eps, low=0.0)
    x = _float(advantages)
    mean = ops.masked_mean(x, response_mask, axis_name=axis_name)
    var = ops.masked_var(x, response_mask, axis_name=axis_name)
    white = (x - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        white = white + mean
    return white if response_mask is None else jnp.where(response_mask, white, jnp.zeros_like(white))


def _check_groups(fn: str, scores, mask) -> None:
    """`scores` is [B, K] (one group of K answers per row) and `mask`, if any, has its shape."""
    if jnp.ndim(scores) != 2:
        raise ValueError(
            f"{fn}: scores has shape {tuple(jnp.shape(scores))}; it must be [B, K], one group of K answers "
            "per row (reshape a flat [N] batch of consecutive groups to [N // K, K])"
        )
    _check_same_shape(fn, "scores", scores, mask=mask)


def rloo_advantages(scores: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """REINFORCE leave-one-out advantages over the K answers of each prompt.

    A_i = s_i - 1/(K-1) sum_{j != i} s_j. Kool et al. 2019, "Buy 4 REINFORCE Samples, Get a Baseline
    for Free!"; Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for
    Learning from Human Feedback in LLMs".

    Per group (row), so under `jax.shard_map` each device must hold whole groups (module docstring).

    Args:
      scores: [B, K] sequence scores, group = axis 1.
      mask: optional [B, K] bool, True = real answer. A group with a single answer has no baseline
        and gets advantage 0.

    Returns:
      [B, K] advantages, 0 on padding.
    """
    _check_groups("rloo_advantages", scores, mask)
    scores = _float(scores)
    valid = jnp.ones(scores.shape, bool) if mask is None else mask
    scores = _zero_padding(valid, scores)
    count = jnp.sum(valid, axis=1, keepdims=True, dtype=scores.dtype)  # [B, 1]
    baseline = (jnp.sum(scores, axis=1, keepdims=True) - scores) / jnp.maximum(count - 1, 1)
    return jnp.where(valid & (count > 1), scores - baseline, 0.0)


def grpo_advantages(
    scores: jax.Array, eps: float = 1e-6, mask: jax.Array | None = None, scale_by_std: bool = True
) -> jax.Array:
    """Group-relative advantages: each answer's score standardised within its prompt's group.

    A_i = (s_i - mean(s)) / (std(s) + eps), std with Bessel's correction (as TRL and verl compute
    it). Shao et al. 2024, "DeepSeekMath", section 4.1.2. `scale_by_std=False` keeps only the mean
    shift (Liu et al. 2025, "Understanding R1-Zero-Like Training", Dr. GRPO). Per group (row), so
    under `jax.shard_map` each device must hold whole groups (module docstring).

    Args:
      scores: [B, K] sequence scores, group = axis 1.
      eps: added to the std (> 0 when `scale_by_std`); a group of equal scores gets advantage 0.
      mask: optional [B, K] bool, True = real answer.
      scale_by_std: divide by the group std.

    Returns:
      [B, K] advantages, 0 on padding.
    """
    _check_groups("grpo_advantages", scores, mask)
    if scale_by_std:
        _check_positive("grpo_advantages", eps=eps)
    scores = _float(scores)
    valid = jnp.ones(scores.shape, bool) if mask is None else mask
    count = jnp.sum(valid, axis=1, keepdims=True, dtype=scores.dtype)  # [B, 1]
    mean = ops.masked_mean(scores, valid, axis=1)[:, None]  # [B, 1]
    centred = _zero_padding(valid, scores - mean)
    if not scale_by_std:
        return centred
    var = jnp.sum(jnp.square(centred), axis=1, keepdims=True) / jnp.maximum(count - 1, 1)
    # sqrt has an infinite derivative at 0: keep the gradient finite for groups of equal scores.
    std = jnp.where(var > 0, jnp.sqrt(jnp.where(var > 0, var, 1.0)), 0.0)
    return centred / (std + eps)


def reinforce_pp_advantages(
    scores: jax.Array,
    kl: jax.Array,
    response_mask: jax.Array,
    *,
    kl_coef: jax.Array | float,
    gamma: float = 1.0,
    eps: float = 1e-8,
    axis_name: ops.AxisName = None,
) -> jax.Array:
    """REINFORCE++ advantages: KL-shaped returns, whitened over every real token of the global batch.

    r_t = [t = last real token] * score - beta * KL_t,   G_t = sum_{u >= t} gamma^(u - t) r_u,
    A_t = (G_t - mean(G)) / sqrt(max(var(G), eps)),
    mean and (population) variance over all real tokens of the batch, no critic and no per-prompt group.
    With gamma = 1, G_t = score - beta * sum_{u >= t} KL_u. Hu et al. 2025, "REINFORCE++: Stabilizing
    Critic-Free Policy Optimization with Global Normalization", arXiv 2501.03262 (global advantage
    normalisation); the reference implementation is OpenRLHF's advantage_estimator="reinforce"
    (experience_maker.py: get_cumulative_returns, then the batch normalisation with
    var.clamp(min=1e-8).rsqrt()), which this follows. "REINFORCE++ w/ baseline" (OpenRLHF
    "reinforce_baseline") subtracts each prompt group's mean score first: pass
    `grpo_advantages(scores.reshape(-1, K), scale_by_std=False).reshape(-1)` as `scores`. Feed the result
    to `pg_loss` or `ppo_policy_loss` as constant per-token advantages.

    Discounting runs over real tokens, skipping padding anywhere in a row (as `compute_gae` does); for
    right-padded responses this is OpenRLHF's loop exactly.

    Args:
      scores: [B] sequence scores (reward model or verifier), added at each row's last real token.
      kl: [B, R] per-token KL estimates, e.g. `kl_penalty(old_logprobs, ref_logprobs, "k1")` (the paper's
        k1 of pi_old against the SFT reference; constant).
      response_mask: [B, R] bool, True = real token. A fully masked row gets no score and no penalty.
      kl_coef: beta >= 0 (a scalar; its value is checked when not traced).
      gamma: discount in [0, 1] (1 in the paper).
      eps: floor >= 0 of the variance (OpenRLHF's 1e-8), so a batch of equal returns gives finite zeros.
      axis_name: mesh axis (or axes) the batch is split over inside `jax.shard_map`: the mean and the
        variance are then those of every device's real tokens together (the returns are per row).

    Returns:
      [B, R] advantages under stop_gradient, 0 on padding.
    """
    fn = "reinforce_pp_advantages"
    _check_rank(fn, "[B, R]", kl=kl)
    _check_same_shape(fn, "kl", kl, response_mask=response_mask)
    _check_rank(fn, "[B] (one score per sequence)", scores=scores)
    _check_prefix(fn, "kl", kl, 1, scores=scores)
    _check_param(fn, "kl_coef", kl_coef, low=0.0)
    _check_param(fn, "gamma", gamma, low=0.0, high=1.0)
    _check_param(fn, "eps", eps, low=0.0)
    kl = _zero_padding(response_mask, jax.lax.stop_gradient(_float(kl)))
    scores = jax.lax.stop_gradient(_float(scores)).astype(kl.dtype)
    rewards = _score_at_last_token(scores, response_mask) - kl_coef * kl  # [B, R]
    # Returns = GAE with V = 0 and lambda = 1: G_t = r_t + gamma G_next over real tokens.
    returns, _ = compute_gae(rewards, jnp.zeros_like(rewards), response_mask, gamma, 1.0)
    mean = ops.masked_mean(returns, response_mask, axis_name=axis_name)
    var = ops.masked_var(returns, response_mask, unbiased=False, axis_name=axis_name)
    white = (returns - mean) * jax.lax.rsqrt(jnp.maximum(var, eps))
    return jax.lax.stop_gradient(_zero_padding(response_mask, white))
