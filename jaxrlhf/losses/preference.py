"""Direct preference losses on sequence log-ratios: REBEL and DPO / IPO."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxrlhf import ops
from jaxrlhf.losses._common import (
    _check_batch,
    _check_param,
    _check_positive,
    _check_rank,
    _check_same_shape,
    _float,
    _preference_metrics,
    _zero_padding,
)


def _sequence_log_ratio(logprobs: jax.Array, ref_logprobs: jax.Array, mask: jax.Array | None) -> jax.Array:
    """log pi(y) - log pi_ref(y) from token [B, R] (summed under mask) or sequence [B] logprobs."""
    log_ratio = _float(logprobs) - jax.lax.stop_gradient(_float(ref_logprobs))
    if log_ratio.ndim == 2:
        return ops.masked_sum(log_ratio, mask, axis=-1)
    if mask is not None:
        raise ValueError(
            "rebel_loss: a mask was given with per-sequence [B] logprobs; pass [B, R] token logprobs."
        )
    return log_ratio


def _check_log_ratio_args(fn: str, side: str, logprobs, ref_logprobs, mask, first) -> None:
    """[B, R] token or [B] sequence logprobs, the reference's of the same shape, a mask of that shape, and
    the batch size of `first` (name, array)."""
    names = {"chosen": ("logprobs_chosen", "ref_logprobs_chosen", "mask_chosen"),
             "rejected": ("logprobs_rejected", "ref_logprobs_rejected", "mask_rejected")}[side]  # fmt: skip
    if jnp.ndim(logprobs) not in (1, 2):
        raise ValueError(
            f"{fn}: {names[0]} has shape {tuple(jnp.shape(logprobs))}; it must be [B, R] token or [B] "
            "sequence logprobs"
        )
    _check_same_shape(fn, names[0], logprobs, **{names[1]: ref_logprobs})
    if jnp.ndim(logprobs) == 2:
        _check_same_shape(fn, names[0], logprobs, **{names[2]: mask})
    elif mask is not None:
        raise ValueError(
            f"{fn}: {names[2]} was given with per-sequence {names[0]} of shape {tuple(jnp.shape(logprobs))}; "
            "pass [B, R] token logprobs with a mask, or no mask"
        )
    _check_batch(fn, first[0], first[1], **{names[0]: logprobs})


def rebel_loss(
    logprobs_chosen: jax.Array,
    ref_logprobs_chosen: jax.Array,
    logprobs_rejected: jax.Array,
    ref_logprobs_rejected: jax.Array,
    rewards_chosen: jax.Array,
    rewards_rejected: jax.Array,
    eta: float,
    mask_chosen: jax.Array | None = None,
    mask_rejected: jax.Array | None = None,
    pair_mask: jax.Array | None = None,
    *,
    axis_name: ops.AxisName = None,
) -> tuple[jax.Array, dict]:
    """REBEL: regress the scaled difference of policy log-ratios onto the difference of rewards.

    L = mean_b ( (1/eta) [log pi/pi_0 (y_b) - log pi/pi_0 (y'_b)] - (r(y_b) - r(y'_b)) )^2, where
    pi_0 ("ref") is the policy that sampled the pair (REBEL's pi_t) and y, y' are two answers to one
    prompt. Gao et al. 2024, "REBEL: Reinforcement Learning via Regressing Relative Rewards", eq. 1.

    Its minimiser over a fixed set of pairs has log pi/pi_0 (y) - log pi/pi_0 (y') = eta (r(y) - r(y')),
    i.e. pi proportional to pi_0 exp(eta r): a larger eta moves further from pi_0. At pi = pi_0 the
    prediction is 0 and eta only scales the gradient, so the update must make several passes over the
    pairs (`train.make_rebel_step`) for eta to act.

    Scale: this is the paper's form. The REBEL authors' code (ZhaolinGao/REBEL, `src/tldr/rebel.py` and
    `src/ultrafeedback/rebel.py`) minimises mean_b ( [log pi/pi_0 (y_b) - log pi/pi_0 (y'_b)] - eta (r(y_b)
    - r(y'_b)) )^2, which is eta^2 x L: the same minimiser, and gradients eta^2 times these. Adam's step
    is invariant to that constant up to its eps, but gradient-norm clipping and SGD are not: to match
    the authors' runs at eta != 1, multiply this loss (or the SGD learning rate) by eta^2.

    Args:
      logprobs_chosen, ref_logprobs_chosen: [B, R] token logprobs (summed under `mask_chosen`) or
        [B] sequence logprobs of y under pi and pi_0.
      logprobs_rejected, ref_logprobs_rejected: the same for y'.
      rewards_chosen, rewards_rejected: [B] rewards r(y), r(y') (constant).
      eta: the regression scale > 0 (1/eta multiplies the log-ratio difference); checked when it is not
        traced.
      mask_chosen, mask_rejected: [B, R] bool, True = real token; only with token logprobs.
      pair_mask: optional [B] bool, True = a real pair (False for batch padding).
      axis_name: mesh axis (or axes) the pairs are split over inside `jax.shard_map`; the mean and the
        metrics are then over all pairs.

    Returns:
      (loss, metrics) with "loss", "predicted_diff" (mean of the scaled log-ratio difference) and
      "reward_diff" (mean of r(y) - r(y')).
    """
    fn = "rebel_loss"
    _check_positive(fn, eta=eta)
    _check_rank(fn, "[B]", rewards_chosen=rewards_chosen)
    _check_same_shape(
        fn, "rewards_chosen", rewards_chosen, rewards_rejected=rewards_rejected, pair_mask=pair_mask
    )
    first = ("rewards_chosen", rewards_chosen)
    _check_log_ratio_args(fn, "chosen", logprobs_chosen, ref_logprobs_chosen, mask_chosen, first)
    _check_log_ratio_args(fn, "rejected", logprobs_rejected, ref_logprobs_rejected, mask_rejected, first)
    log_ratio_chosen = _sequence_log_ratio(logprobs_chosen, ref_logprobs_chosen, mask_chosen)
    log_ratio_rejected = _sequence_log_ratio(logprobs_rejected, ref_logprobs_rejected, mask_rejected)
    predicted = _zero_padding(pair_mask, (log_ratio_chosen - log_ratio_rejected) / eta)  # [B]
    target = _float(rewards_chosen) - _float(rewards_rejected)
    target = _zero_padding(pair_mask, jax.lax.stop_gradient(target))  # [B]
    loss = ops.masked_mean(jnp.square(predicted - target), pair_mask, axis_name=axis_name)
    return loss, {
        "loss": loss,
        "predicted_diff": ops.masked_mean(predicted, pair_mask, axis_name=axis_name),
        "reward_diff": ops.masked_mean(target, pair_mask, axis_name=axis_name),
    }


def dpo_loss(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    ref_chosen_logps: jax.Array,
    ref_rejected_logps: jax.Array,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    mask: jax.Array | None = None,
    *,
    axis_name: ops.AxisName = None,
) -> tuple[jax.Array, dict]:
    """Direct preference optimisation on sequence logprobs.

    h = [log pi(y_w) - log pi_ref(y_w)] - [log pi(y_l) - log pi_ref(y_l)].
      sigmoid: L = -(1 - s) log sigmoid(beta h) - s log sigmoid(-beta h). Rafailov et al. 2023,
        "Direct Preference Optimization"; label smoothing s (conservative DPO), Mitchell 2023, "A
        note on DPO with noisy preferences".
      ipo: L = (h - 1 / (2 beta))^2, beta playing tau. Azar et al. 2023, "A General Theoretical
        Paradigm to Understand Learning from Human Preferences", eq. 17 (pair it with
        `sequence_logprobs(average=True)` for the length-normalised variant).
    Implicit rewards are beta * (log pi - log pi_ref).

    Args:
      policy_chosen_logps, policy_rejected_logps: [B] sequence logprobs under the policy
        (differentiated).
      ref_chosen_logps, ref_rejected_logps: [B] sequence logprobs under the reference (constant).
      beta: KL strength > 0 (DPO's beta, IPO's tau).
      loss_type: "sigmoid" or "ipo".
      label_smoothing: s in [0, 0.5), assumed probability that a label is flipped; sigmoid only. beta and
        label_smoothing are checked when they are not traced.
      mask: optional [B] bool, True = a real pair (False for batch padding).
      axis_name: mesh axis (or axes) the pairs are split over inside `jax.shard_map`; the mean and the
        metrics are then over all pairs.

    Returns:
      (loss, metrics) with "loss", "accuracy", "reward_margin", "chosen_reward", "rejected_reward"
      (all of the implicit rewards).
    """
    fn = "dpo_loss"
    if loss_type not in ("sigmoid", "ipo"):
        raise ValueError(f"{fn}: loss_type={loss_type!r}; use 'sigmoid' or 'ipo'.")
    _check_positive(fn, beta=beta)
    _check_param(fn, "label_smoothing", label_smoothing, low=0.0, high=0.5, high_open=True)
    _check_rank(fn, "[B] (sequence logprobs)", policy_chosen_logps=policy_chosen_logps)
    _check_same_shape(
        fn,
        "policy_chosen_logps",
        policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
        mask=mask,
    )
    chosen_log_ratio = _sequence_log_ratio(policy_chosen_logps, ref_chosen_logps, None)  # [B]
    rejected_log_ratio = _sequence_log_ratio(policy_rejected_logps, ref_rejected_logps, None)  # [B]
    chosen_log_ratio = _zero_padding(mask, chosen_log_ratio)
    rejected_log_ratio = _zero_padding(mask, rejected_log_ratio)
    h = chosen_log_ratio - rejected_log_ratio
    if loss_type == "sigmoid":
        per_pair = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * h)
        per_pair = per_pair - label_smoothing * jax.nn.log_sigmoid(-beta * h)
    else:  # ipo
        if isinstance(label_smoothing, int | float) and label_smoothing != 0.0:
            raise ValueError(
                f"{fn}: label_smoothing={label_smoothing!r} applies to loss_type='sigmoid' only."
            )
        per_pair = jnp.square(h - 1.0 / (2.0 * beta))
    loss = ops.masked_mean(per_pair, mask, axis_name=axis_name)
    chosen_rewards = jax.lax.stop_gradient(beta * chosen_log_ratio)
    rejected_rewards = jax.lax.stop_gradient(beta * rejected_log_ratio)
    return loss, {"loss": loss, **_preference_metrics(chosen_rewards, rejected_rewards, mask, axis_name)}
