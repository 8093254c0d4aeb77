"""Policy-gradient losses: aggregation, REINFORCE, PPO (token or GSPO sequence ratio), CISPO, value,
entropy; and the token selection and reweighting that feed them (high-entropy tokens, rollout-mismatch
importance weights)."""

from __future__ import annotations

import fractions

import jax
import jax.numpy as jnp

from jaxrlhf import ops
from jaxrlhf.losses._common import (
    _check_choice,
    _check_param,
    _check_positive,
    _check_prefix,
    _check_rank,
    _check_same_shape,
    _float,
    _is_traced,
    _zero_padding,
)

AGGREGATIONS = ("token_mean", "seq_mean_token_sum", "seq_mean_token_mean", "constant")
RATIO_LEVELS = ("token", "sequence")

KL_METRIC_LOG_RATIO_CAP = 20.0  # |log pi/pi_old| beyond it counts as 20 in "approx_kl"


def _check_aggregation(fn: str, aggregation: str) -> None:
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"{fn}: aggregation={aggregation!r}; use one of {', '.join(AGGREGATIONS)}")


def _check_per_token(fn: str, logprobs_name: str, logprobs, **arrays) -> None:
    """`logprobs` is [B, R] and every other non-None array has its shape."""
    _check_rank(fn, "[B, R]", **{logprobs_name: logprobs})
    _check_same_shape(fn, logprobs_name, logprobs, **arrays)


def aggregate(
    per_token: jax.Array,
    response_mask: jax.Array,
    aggregation: str = "token_mean",
    *,
    axis_name: ops.AxisName = None,
) -> jax.Array:
    """Reduce a [B, R] per-token loss to a scalar, the one place policy losses choose how.

      token_mean:          sum_bt m L / sum_bt m, every real token of the batch weighs the same (DAPO: Yu
                           et al. 2025; lm-human-preferences, TRL's PPO);
      seq_mean_token_sum:  mean_b sum_t m L, a sequence's weight grows with its length (REINFORCE on the
                           sequence log-likelihood);
      seq_mean_token_mean: mean_b (sum_t m L / sum_t m), every sequence weighs the same (GRPO as written:
                           Shao et al. 2024, eq. 3);
      constant:            sum_bt m L / (B R), a constant normaliser (R = the response budget), no length
                           bias (Dr. GRPO: Liu et al. 2025, "Understanding R1-Zero-Like Training").
    Sequence means are over rows with at least one real token (fully masked rows are batch padding).
    With `axis_name` (inside `jax.shard_map`, rows split over that mesh axis) every sum and count is
    global: the token count, the number of non-empty rows and Dr. GRPO's B.
    """
    _check_aggregation("aggregate", aggregation)
    _check_per_token("aggregate", "per_token", per_token, response_mask=response_mask)
    per_token = _zero_padding(response_mask, _float(per_token))
    if aggregation == "token_mean":
        return ops.masked_mean(per_token, response_mask, axis_name=axis_name)
    if aggregation == "constant":
        # psum(size) is the global B * R (jax.lax.psum of a Python int is that int times the axis size).
        return ops.masked_sum(per_token, axis_name=axis_name) / ops.psum(per_token.size, axis_name)
    rows = jnp.any(response_mask, axis=-1)  # [B]
    per_row = jnp.sum(per_token, axis=-1)  # [B]
    if aggregation == "seq_mean_token_mean":
        per_row = per_row / jnp.maximum(jnp.sum(response_mask, axis=-1), 1)
    return ops.masked_mean(per_row, rows, axis_name=axis_name)


def _check_seq_or_token(fn: str, name: str, x, logprobs) -> None:
    """`x` is [B] (one value per sequence) or [B, R] like `logprobs`."""
    if jnp.ndim(x) == 1:
        _check_prefix(fn, "logprobs", logprobs, 1, **{name: x})
    elif jnp.ndim(x) == 2:
        _check_same_shape(fn, "logprobs", logprobs, **{name: x})
    else:
        raise ValueError(f"{fn}: {name} has shape {tuple(jnp.shape(x))}; it must be [B] or [B, R]")


def pg_loss(
    logprobs: jax.Array,
    advantages: jax.Array,
    response_mask: jax.Array,
    baseline: jax.Array | float | None = None,
    aggregation: str = "token_mean",
    *,
    axis_name: ops.AxisName = None,
) -> tuple[jax.Array, dict]:
    """Vanilla policy gradient (REINFORCE) in minRLHF's per-token form.

    L = -sum_{b,t} m_bt (A_bt - baseline) log pi(y_bt) / sum m, with A constant (stop_gradient), so
    grad L = -E_tokens[(A - b) grad log pi]. Williams 1992, "Simple statistical gradient-following
    algorithms"; per-token mean over real tokens as in minRLHF (github.com/thomfoster/minRLHF).

    Args:
      logprobs: [B, R] log pi of the sampled response tokens (differentiated).
      advantages: [B] sequence scores (broadcast to every token) or [B, R] per-token advantages.
      response_mask: [B, R] bool, True = real token.
      baseline: optional scalar, [B] or [B, R] subtracted from `advantages`.
      aggregation: how per-token terms become the loss (`aggregate`); "token_mean" is the form above.
      axis_name: mesh axis (or axes) the batch is split over inside `jax.shard_map`; the loss and the
        metrics are then the global ones.

    Returns:
      (loss, metrics) with "loss" and "advantage_mean".
    """
    fn = "pg_loss"
    _check_aggregation(fn, aggregation)
    _check_per_token(fn, "logprobs", logprobs, response_mask=response_mask)
    _check_seq_or_token(fn, "advantages", advantages, logprobs)
    if baseline is not None and jnp.ndim(baseline) == 0:
        _check_param(fn, "baseline", baseline)
    elif baseline is not None:
        _check_seq_or_token(fn, "baseline", baseline, logprobs)
    logprobs = _zero_padding(response_mask, _float(logprobs))
    advantages = _float(advantages)
    if advantages.ndim == 1:
        advantages = advantages[:, None]
    if baseline is not None:
        baseline = _float(baseline)
        advantages = advantages - (baseline[:, None] if baseline.ndim == 1 else baseline)
    advantages = jax.lax.stop_gradient(jnp.broadcast_to(advantages, logprobs.shape))  # [B, R]
    advantages = _zero_padding(response_mask, advantages)
    loss = aggregate(-advantages * logprobs, response_mask, aggregation, axis_name=axis_name)
    advantage_mean = ops.masked_mean(advantages, response_mask, axis_name=axis_name)
    return loss, {"loss": loss, "advantage_mean": advantage_mean}


def ppo_policy_loss(
    logprobs: jax.Array,
    old_logprobs: jax.Array,
    advantages: jax.Array,
    response_mask: jax.Array,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
    logits: jax.Array | None = None,
    aggregation: str = "token_mean",
    ratio_level: str = "token",
    *,
    axis_name: ops.AxisName = None,
) -> tuple[jax.Array, dict]:
    """PPO clipped surrogate, per token, averaged over the real tokens of the batch (by default).

    rho = exp(log pi - log pi_old),  L_t = max(-A rho, -A clip(rho, 1 - eps_low, 1 + eps_high)).
    Dual clip (A < 0 only): L_t = min(L_t, -c A), bounding the loss when rho >> 1.
    Schulman et al. 2017, "Proximal Policy Optimization Algorithms", eq. 7; asymmetric clip
    ("clip-higher") Yu et al. 2025, "DAPO"; dual clip Ye et al. 2020, "Mastering Complex Control in
    MOBA Games with Deep Reinforcement Learning". At rho = 1 the gradient equals `pg_loss`'s.

    `ratio_level="sequence"` replaces rho by GSPO's length-normalised sequence ratio in its token form
    (Zheng et al. 2025, "Group Sequence Policy Optimization", GSPO-token):
      s_i = exp(1/|y_i| sum_t m_it (log pi_it - log pi_old_it)),  s_it = sg[s_i] pi_it / sg[pi_it],
    so s_it = s_i in value and grad s_it = s_i grad log pi_it; every token of a row is clipped (or not)
    together. With advantages constant along each row and `aggregation="seq_mean_token_mean"` this is
    GSPO's sequence objective -mean_i min(s_i A_i, clip(s_i, 1 - eps, 1 + eps) A_i) (the paper clips
    at eps ~ 3e-4 / 4e-4, far tighter than the token ratio's 0.2).

    Args:
      logprobs: [B, R] log pi of the sampled tokens under the current policy (differentiated).
      old_logprobs: [B, R] log pi_old of the same tokens (the policy that sampled them; constant).
      advantages: [B, R] advantages (constant), e.g. from `compute_gae` (broadcast [B] sequence
        advantages to [B, R] first).
      response_mask: [B, R] bool, True = real token.
      clip_eps: eps_low > 0, and eps_high when `clip_eps_high` is None.
      clip_eps_high: optional upper clip eps > 0 (DAPO uses 0.28 with eps_low 0.2).
      dual_clip: optional c > 1 (3.0 in the paper). Parameter values are checked when they are Python
        (or other concrete) numbers, not when traced.
      logits: optional [B, R, V] current-policy logits, only to report the "entropy" metric.
      aggregation: how per-token terms become the loss (`aggregate`): "token_mean" (default),
        "seq_mean_token_sum", "seq_mean_token_mean" (GRPO, GSPO) or "constant" (Dr. GRPO).
      ratio_level: "token" (PPO's per-token ratio) or "sequence" (GSPO's s_i, above).
      axis_name: mesh axis (or axes) the batch is split over inside `jax.shard_map`; the loss and every
        metric are then the global ones (ratio_max through pmax). The sequence ratio is per row.

    Returns:
      (loss, metrics) with "loss", "clipfrac" (fraction of tokens whose gradient the clip removed),
      "approx_kl" (k3 estimate of KL(pi_old || pi) per token, log-ratios capped at +-20), "ratio_mean",
      "ratio_max" (of the token ratio over real tokens, or of s_i over non-empty rows with
      `ratio_level="sequence"`), plus "dual_clipfrac" with `dual_clip` and "entropy" with `logits`.
    """
    fn = "ppo_policy_loss"
    _check_param(fn, "dual_clip", dual_clip, low=1.0, low_open=True)
    if ratio_level not in RATIO_LEVELS:
        raise ValueError(f"{fn}: ratio_level={ratio_level!r}; use 'token' or 'sequence'.")
    _check_aggregation(fn, aggregation)
    _check_positive(fn, clip_eps=clip_eps, clip_eps_high=clip_eps_high)
    _check_per_token(
        fn,
        "logprobs",
        logprobs,
        old_logprobs=old_logprobs,
        advantages=advantages,
        response_mask=response_mask,
    )
    if logits is not None:
        _check_rank(fn, "[B, R, V]", logits=logits)
        _check_prefix(fn, "logits", logits, 2, logprobs=logprobs)
    clip_high = clip_eps if clip_eps_high is None else clip_eps_high
    old_logprobs = jax.lax.stop_gradient(_float(old_logprobs))
    advantages = _zero_padding(response_mask, jax.lax.stop_gradient(_float(advantages)))
    log_ratio = _zero_padding(response_mask, _float(logprobs) - old_logprobs)  # [B, R]
    if ratio_level == "token":
        ratio = jnp.exp(log_ratio)  # [B, R]
    else:
        seq_ratio = jnp.exp(jax.lax.stop_gradient(ops.masked_mean(log_ratio, response_mask, axis=-1)))  # [B]
        token_logprobs = _zero_padding(response_mask, _float(logprobs))
        ratio = seq_ratio[:, None] * jnp.exp(token_logprobs - jax.lax.stop_gradient(token_logprobs))  # [B, R]
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_high)
    per_token = jnp.maximum(unclipped, clipped)  # [B, R]
    clipfrac = ops.masked_mean((clipped > unclipped).astype(ratio.dtype), response_mask, axis_name=axis_name)
    metrics = {"clipfrac": clipfrac}
    if dual_clip is not None:
        bound = -dual_clip * advantages
        dual_active = (advantages < 0) & (per_token > bound)
        per_token = jnp.where(dual_active, bound, per_token)
        metrics["dual_clipfrac"] = ops.masked_mean(
            dual_active.astype(ratio.dtype), response_mask, axis_name=axis_name
        )
    loss = aggregate(per_token, response_mask, aggregation, axis_name=axis_name)
    metrics["loss"] = loss
    # A token that top-k / top-p filtered logprobs push out of the filter has logprob -3.4e38: its
    # log-ratio is capped for the metric (as exp(20) ~ 5e8), which otherwise overflows to inf.
    capped = jnp.clip(log_ratio, -KL_METRIC_LOG_RATIO_CAP, KL_METRIC_LOG_RATIO_CAP)
    approx_kl = jnp.expm1(capped) - capped  # [B, R]
    metrics["approx_kl"] = ops.masked_mean(approx_kl, response_mask, axis_name=axis_name)
    if ratio_level == "token":
        metrics["ratio_mean"] = ops.masked_mean(ratio, response_mask, axis_name=axis_name)
        metrics["ratio_max"] = ops.pmax(jnp.max(_zero_padding(response_mask, ratio)), axis_name)
    else:
        rows = jnp.any(response_mask, axis=-1)  # [B]
        metrics["ratio_mean"] = ops.masked_mean(seq_ratio, rows, axis_name=axis_name)
        metrics["ratio_max"] = ops.pmax(jnp.max(_zero_padding(rows, seq_ratio)), axis_name)
    if logits is not None:
        metrics["entropy"] = ops.masked_mean(ops.entropy(logits), response_mask, axis_name=axis_name)
    return loss, metrics


def value_loss(
    values: jax.Array,
    old_values: jax.Array,
    returns: jax.Array,
    response_mask: jax.Array,
    clip_eps: float | None = 0.2,
    *,
    axis_name: ops.AxisName = None,
) -> tuple[jax.Array, dict]:
    """Clipped value loss: the larger of the plain and the clipped squared error.

    V_clip = V_old + clip(V - V_old, -eps, eps),  L = 0.5 * mean_t max((V - G)^2, (V_clip - G)^2).
    Schulman et al. 2017 (openai/baselines ppo2); Andrychowicz et al. 2021, "What Matters in
    On-Policy Reinforcement Learning?". `clip_eps=None` gives the plain 0.5 * mean (V - G)^2.

    Args:
      values: [B, R] value predictions (differentiated).
      old_values: [B, R] value predictions at rollout time (constant).
      returns: [B, R] value targets G (constant), e.g. from `compute_gae`.
      response_mask: [B, R] bool, True = real token.
      clip_eps: clip range > 0 around `old_values`, or None.
      axis_name: mesh axis (or axes) the batch is split over inside `jax.shard_map`; the mean and the
        metrics are then over every device's real tokens.

    Returns:
      (loss, metrics) with "loss", "clipfrac" (fraction of tokens where the clipped error is used)
      and "value_mean".
    """
    _check_positive("value_loss", clip_eps=clip_eps)
    _check_per_token(
        "value_loss", "values", values, old_values=old_values, returns=returns, response_mask=response_mask
    )
    values = _zero_padding(response_mask, _float(values))
    old_values = _zero_padding(response_mask, jax.lax.stop_gradient(_float(old_values)))
    returns = _zero_padding(response_mask, jax.lax.stop_gradient(_float(returns)))
    per_token = jnp.square(values - returns)  # [B, R]
    clipfrac = jnp.zeros((), values.dtype)
    if clip_eps is not None:
        # clip(V, V_old - eps, V_old + eps) is V bit for bit inside the range, so no rounding shows
        # up as a spurious clip.
        clipped_values = jnp.clip(values, old_values - clip_eps, old_values + clip_eps)
        clipped = jnp.square(clipped_values - returns)
        clipfrac = ops.masked_mean(
            (clipped > per_token).astype(values.dtype), response_mask, axis_name=axis_name
        )
        per_token = jnp.maximum(per_token, clipped)
    loss = 0.5 * ops.masked_mean(per_token, response_mask, axis_name=axis_name)
    return loss, {
        "loss": loss,
        "clipfrac": clipfrac,
        "value_mean": ops.masked_mean(values, response_mask, axis_name=axis_name),
    }


def entropy_bonus(
    logits: jax.Array, response_mask: jax.Array, *, axis_name: ops.AxisName = None
) -> tuple[jax.Array, dict]:
    """Minus the mean policy entropy over real response tokens; add `coef * loss` to maximise it.

    L = -mean_t H(pi(. | y_<t)), H = -sum_v p_v log p_v in float32. Williams & Peng 1991, "Function
    optimization using connectionist reinforcement learning algorithms"; Mnih et al. 2016 (A3C).

    Args:
      logits: [B, R, V] policy logits at the response positions.
      response_mask: [B, R] bool, True = real token.
      axis_name: mesh axis (or axes) the batch is split over inside `jax.shard_map` (global mean).

    Returns:
      (loss, metrics) with "loss" and "entropy" (= -loss).
    """
    _check_rank("entropy_bonus", "[B, R, V]", logits=logits)
    _check_prefix("entropy_bonus", "logits", logits, 2, response_mask=response_mask)
    mean_entropy = ops.masked_mean(ops.entropy(logits), response_mask, axis_name=axis_name)
    return -mean_entropy, {"loss": -mean_entropy, "entropy": mean_entropy}


def cispo_loss(
    logprobs: jax.Array,
    old_logprobs: jax.Array,
    advantages: jax.Array,
    response_mask: jax.Array,
    clip_eps_low: float | None = None,
    clip_eps_high: float = 4.0,
    aggregation: str = "token_mean",
    *,
    axis_name: ops.AxisName = None,
) -> tuple[jax.Array, dict]:
    """CISPO: REINFORCE with a clipped, stop-gradient importance weight on every token's log-prob.

    r_t = exp(log pi(y_t) - log pi_old(y_t)),  w_t = sg(clip(r_t, 1 - eps_low, 1 + eps_high)),
    L = -sum_{b,t} m_bt w_bt A_bt log pi(y_bt) / sum m   (the default "token_mean"),
    so grad L = -E_tokens[w A grad log pi]: unlike PPO's clip, which drops the gradient of a token whose
    ratio left the trust region, every token keeps its gradient and only its weight is bounded.
    MiniMax 2025, "MiniMax-M1: Scaling Test-Time Compute Efficiently with Lightning Attention",
    arXiv 2506.13585, the CISPO objective (the paper sets no lower bound in practice: eps_low large).
    TRL implements it as GRPOConfig(loss_type="cispo"): clamp(r, max=epsilon_high) with no lower bound,
    divided by the global count of real tokens; TRL's epsilon_high is the weight cap itself (ScaleRL's
    eps_max, Khatri et al. 2025, arXiv 2510.13786; TRL recommends 5.0), which is 1 + clip_eps_high here:
    the defaults (no lower bound, clip_eps_high 4.0, "token_mean") are TRL's CISPO with epsilon_high=5.0.
    At r = 1 (on-policy) the value and the gradient equal `pg_loss`'s.

    Args:
      logprobs: [B, R] log pi of the sampled tokens under the current policy (differentiated).
      old_logprobs: [B, R] log pi_old of the same tokens (the policy that sampled them; constant).
      advantages: [B] sequence advantages (broadcast to every token) or [B, R] per-token ones (constant).
      response_mask: [B, R] bool, True = real token.
      clip_eps_low: eps_low >= 0 (the weight's floor is 1 - eps_low), or None for no floor (MiniMax-M1,
        TRL).
      clip_eps_high: eps_high >= 0, the weight's cap is 1 + eps_high. Values are checked when concrete.
      aggregation: how per-token terms become the loss (`aggregate`); "token_mean" is MiniMax-M1's and
        TRL's normaliser.
      axis_name: mesh axis (or axes) the batch is split over inside `jax.shard_map`; the loss and every
        metric are then the global ones (ratio_max through pmax).

    Returns:
      (loss, metrics) with "loss", "clipfrac" (fraction of real tokens whose weight was clipped, on either
      side and for either sign of A), "ratio_mean" and "ratio_max" (of r over real tokens).
    """
    fn = "cispo_loss"
    _check_aggregation(fn, aggregation)
    _check_param(fn, "clip_eps_low", clip_eps_low, low=0.0)
    _check_param(fn, "clip_eps_high", clip_eps_high, low=0.0)
    _check_per_token(fn, "logprobs", logprobs, old_logprobs=old_logprobs, response_mask=response_mask)
    _check_seq_or_token(fn, "advantages", advantages, logprobs)
    logprobs = _zero_padding(response_mask, _float(logprobs))
    old_logprobs = jax.lax.stop_gradient(_float(old_logprobs))
    log_ratio = _zero_padding(response_mask, jax.lax.stop_gradient(logprobs) - old_logprobs)  # [B, R]
    ratio = jnp.exp(log_ratio)  # [B, R], constant
    weight = jnp.minimum(ratio, 1.0 + clip_eps_high)
    if clip_eps_low is not None:
        weight = jnp.maximum(weight, 1.0 - clip_eps_low)
    advantages = _float(advantages)
    if advantages.ndim == 1:
        advantages = advantages[:, None]
    advantages = jax.lax.stop_gradient(jnp.broadcast_to(advantages, logprobs.shape))  # [B, R]
    advantages = _zero_padding(response_mask, advantages)
    loss = aggregate(-weight * advantages * logprobs, response_mask, aggregation, axis_name=axis_name)
    clipped = (weight != ratio).astype(ratio.dtype)
    return loss, {
        "loss": loss,
        "clipfrac": ops.masked_mean(clipped, response_mask, axis_name=axis_name),
        "ratio_mean": ops.masked_mean(ratio, response_mask, axis_name=axis_name),
        "ratio_max": ops.pmax(jnp.max(_zero_padding(response_mask, ratio)), axis_name),
    }


# ------------------------------------------------------------------ token selection and reweighting

_EXACT_DENOMINATOR = 2**15  # top fractions with a decimal denominator up to this count in exact integers


def _top_count(count: jax.Array, top_fraction) -> jax.Array:
    """ceil(top_fraction * count) for an int32 `count`: exact integer arithmetic when `top_fraction` is a
    concrete number with a short decimal form (0.2 = 1/5, 0.3 = 3/10, ...; float 0.3 * 10 would round to
    3.0000000000000004 and keep 4), float32 otherwise (a traced fraction)."""
    if not _is_traced(top_fraction):
        frac = fractions.Fraction(repr(float(top_fraction)))
        if frac.denominator <= _EXACT_DENOMINATOR:
            p, d = frac.numerator, frac.denominator  # p <= d, so (count % d) * p < 2**30 fits int32
            return (count // d) * p + ((count % d) * p + d - 1) // d
    q = jnp.asarray(top_fraction, jnp.float32)
    return jnp.ceil(q * count.astype(jnp.float32)).astype(jnp.int32)


def entropy_mask(
    entropy: jax.Array,
    response_mask: jax.Array,
    *,
    top_fraction: float,
    axis_name: ops.AxisName = None,
) -> jax.Array:
    """The real tokens whose entropy is among the top `top_fraction` of the batch's real tokens.

    With n real tokens in the (global) batch and k = ceil(q n), the threshold tau is the k-th largest
    entropy and the mask is m_bt & (H_bt >= tau): k tokens when no entropy ties tau (ties at tau are all
    kept), every real token at q = 1, none for an empty batch. Wang et al. 2025, "Beyond the 80/20 Rule:
    High-Entropy Minority Tokens Drive Effective Reinforcement Learning for LLM Reasoning",
    arXiv 2506.01939: only the top 20% (q = 0.2) high-entropy "forking" tokens carry the policy gradient,
    with the batch-level threshold (TRL: GRPOConfig(top_entropy_quantile=q), which thresholds at a
    linearly interpolated quantile instead of the k-th value, so its count can differ by one).

    Use: pass `response_mask & entropy_mask(...)` as the mask of a policy loss (`pg_loss`,
    `ppo_policy_loss`, `cispo_loss`): the other tokens then carry exactly zero gradient. With
    "token_mean" that loss averages over the kept tokens; the paper (and TRL) divide by every real token,
    i.e. multiply that loss by kept / n (`ops.masked_sum` of the two masks, with the same `axis_name`).

    Inside `jax.shard_map` with `axis_name`, the threshold is the global batch's: every device
    `jax.lax.all_gather`s the [B, R] entropies (4 bytes per token of the global batch) and sorts them,
    so the mask is bit for bit the unsharded one (an exact order statistic; no approximate psum quantile).

    Args:
      entropy: [B, R] per-token entropies of the policy, e.g. `ops.entropy(logits)` (no gradient flows).
      response_mask: [B, R] bool, True = real token.
      top_fraction: q in (0, 1], the fraction of real tokens to keep. A concrete q with at most a short
        decimal denominator (<= 2**15: 0.2, 0.25, 0.123) gives k exactly; a traced q rounds in float32.
      axis_name: mesh axis (or axes) the batch is split over inside `jax.shard_map`.

    Returns:
      [B, R] bool mask, False on padding.
    """
    fn = "entropy_mask"
    _check_param(fn, "top_fraction", top_fraction, low=0.0, low_open=True, high=1.0)
    _check_rank(fn, "[B, R]", entropy=entropy)
    _check_same_shape(fn, "entropy", entropy, response_mask=response_mask)
    entropy = jax.lax.stop_gradient(_float(entropy))
    values = jnp.where(response_mask, entropy, -jnp.inf)  # [B, R]
    if axis_name is not None:
        values = jax.lax.all_gather(values, axis_name, tiled=True)  # [B_global, R]
    ordered = jnp.sort(values.ravel())  # ascending; padding (-inf) first
    count = ops.psum(jnp.sum(response_mask, dtype=jnp.int32), axis_name)
    k = jnp.clip(_top_count(count, top_fraction), 0, count)
    threshold = ordered[ordered.size - jnp.maximum(k, 1)]
    return response_mask & (entropy >= threshold) & (k > 0)


MISMATCH_LEVELS = ("token", "sequence")
MISMATCH_MODES = ("truncate", "mask")


def mismatch_weights(
    learner_logprobs: jax.Array,
    sampler_logprobs: jax.Array,
    response_mask: jax.Array,
    *,
    level: str = "token",
    mode: str = "truncate",
    cap: float = 2.0,
    axis_name: ops.AxisName = None,
) -> tuple[jax.Array, dict]:
    """Importance weights that correct the rollout engine / learner mismatch (truncated or masked IS).

    The sampler (vLLM, SGLang, a quantised or differently-kerneled copy) samples from mu while the learner
    computes pi_old for the same weights; the tokens are then off-policy for pi_old. With
    rho = pi_old(y_t) / mu(y_t) per token ("token") or rho = prod_t pi_old / mu over a row's real tokens
    ("sequence", every token of the row gets it):
      truncate (TIS):  w = min(rho, C);
      mask (MIS):      w = rho if rho <= C else 0 (the token or sequence is dropped).
    Multiply the per-token policy loss by w, or, the same for every policy loss here (w >= 0 scales each
    per-token term: REINFORCE, PPO's min / max, the dual clip, CISPO), pass `advantages * w` (broadcast
    [B] advantages to [B, R] first). Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You
    Off-Policy RL Training" (https://fengyao.notion.site/off-policy-rl), truncated IS; masked and
    sequence-level variants as in TRL's GRPOConfig(vllm_importance_sampling_mode="token_truncate" |
    "token_mask" | "sequence_truncate" | "sequence_mask", vllm_importance_sampling_clip_max=C) with no
    lower bound (its C_min None); TRL's default is "sequence_mask" with C = 3.

    Args:
      learner_logprobs: [B, R] log pi_old of the sampled tokens, recomputed by the learner (constant).
      sampler_logprobs: [B, R] log mu of the same tokens, as the sampler reported them (constant).
      response_mask: [B, R] bool, True = real token.
      level: "token" or "sequence" (static).
      mode: "truncate" or "mask" (static).
      cap: C >= 1 (checked when concrete).
      axis_name: mesh axis (or axes) the batch is split over inside `jax.shard_map`, for the metrics; the
        weights are per token or per row and need no collective.

    Returns:
      (weights [B, R] under stop_gradient, 0 on padding; metrics) with "mean_weight" and
      "clipped_fraction" (truncate) or "masked_fraction" (mask): the mean of w and the fraction with
      rho > C, over real tokens for "token", over non-empty rows for "sequence" (as TRL logs them).
    """
    fn = "mismatch_weights"
    _check_choice(fn, "level", level, MISMATCH_LEVELS)
    _check_choice(fn, "mode", mode, MISMATCH_MODES)
    _check_param(fn, "cap", cap, low=1.0)
    _check_per_token(
        fn,
        "learner_logprobs",
        learner_logprobs,
        sampler_logprobs=sampler_logprobs,
        response_mask=response_mask,
    )
    learner = jax.lax.stop_gradient(_float(learner_logprobs))
    sampler = jax.lax.stop_gradient(_float(sampler_logprobs)).astype(learner.dtype)
    log_ratio = _zero_padding(response_mask, learner - sampler)  # [B, R]
    unit_mask = response_mask
    if level == "sequence":
        log_ratio = jnp.sum(log_ratio, axis=-1)  # [B]
        unit_mask = jnp.any(response_mask, axis=-1)  # [B]
    ratio = jnp.exp(log_ratio)
    beyond = ratio > cap
    weights = jnp.minimum(ratio, cap) if mode == "truncate" else jnp.where(beyond, 0.0, ratio)
    fraction = "clipped_fraction" if mode == "truncate" else "masked_fraction"
    metrics = {
        "mean_weight": ops.masked_mean(weights, unit_mask, axis_name=axis_name),
        fraction: ops.masked_mean(beyond.astype(weights.dtype), unit_mask, axis_name=axis_name),
    }
    if level == "sequence":
        weights = jnp.broadcast_to(weights[:, None], response_mask.shape)
    return jax.lax.stop_gradient(_zero_padding(response_mask, weights)), metrics
