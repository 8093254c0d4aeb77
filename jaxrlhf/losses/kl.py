"""KL penalties: per-token estimators, KL-shaped rewards, the KL loss term and the KL controller."""

from __future__ import annotations

from typing import NamedTuple

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
    _score_at_last_token,
    _zero_padding,
)
from jaxrlhf.losses.policy import _check_aggregation, aggregate


def kl_penalty(logprobs: jax.Array, ref_logprobs: jax.Array, kind: str = "k1") -> jax.Array:
    """Per-token estimators of KL(pi || pi_ref) from tokens sampled from pi.

    With log r = log pi_ref(y_t) - log pi(y_t) (Schulman 2020, "Approximating KL Divergence",
    http://joschu.net/blog/kl-approx.html):
      k1 = -log r                      unbiased, high variance, can be negative;
      k2 = (log r)^2 / 2               biased, low variance, >= 0;
      k3 = (r - 1) - log r             unbiased, low variance, >= 0 (GRPO's KL term).
    Differentiable in both arguments; no masking (see `shaped_rewards`).

    Args:
      logprobs: [B, R] log pi of the sampled tokens.
      ref_logprobs: [B, R] log pi_ref of the same tokens.
      kind: "k1", "k2" or "k3".

    Returns:
      [B, R] per-token KL estimates.
    """
    if kind not in ("k1", "k2", "k3"):
        raise ValueError(f"kl_penalty: kind={kind!r}; use 'k1', 'k2' or 'k3'.")
    _check_same_shape("kl_penalty", "logprobs", logprobs, ref_logprobs=ref_logprobs)
    log_ratio = _float(logprobs) - _float(ref_logprobs)  # log pi / pi_ref = -log r
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * jnp.square(log_ratio)
    return jnp.expm1(-log_ratio) + log_ratio


def shaped_rewards(
    scores: jax.Array,
    logprobs: jax.Array,
    ref_logprobs: jax.Array,
    response_mask: jax.Array,
    kl_coef: jax.Array | float,
    kind: str = "k1",
) -> tuple[jax.Array, jax.Array]:
    """Per-token RLHF reward: a KL penalty on every response token plus the score on the last one.

    R_t = -beta * KL_t + [t = last real token] * score, with KL_t = log pi(y_t) - log pi_ref(y_t) (k1);
    0 on padding. Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", eq. 2;
    Stiennon et al. 2020; Ouyang et al. 2022, eq. 2.

    Only k1 belongs in a reward: the policy gradient of E_pi[-beta k1] is exactly -beta grad KL(pi || pi_ref)
    (E_pi[grad log pi] = 0), while k2 / k3 in the reward give another gradient (for k3 it even points away
    from the reference on a softmax bandit). For a k2 / k3 penalty differentiate it as a loss term instead:
    `kl_loss`.

    Args:
      scores: [B] sequence scores (reward model or reward function).
      logprobs: [B, R] policy log-probabilities of the response tokens.
      ref_logprobs: [B, R] reference-policy log-probabilities of the same tokens.
      response_mask: [B, R] bool, True = real token. A fully masked row gets no score and no
        penalty.
      kl_coef: beta >= 0, a scalar (e.g. `KLControllerState.kl_coef`; its value is checked only when
        it is not traced).
      kind: "k1", the only estimator whose reward has the KL's gradient; "k2" / "k3" are refused.

    Returns:
      (rewards [B, R], kl [B, R]), both 0 on padding.
    """
    if kind != "k1":
        raise ValueError(
            f"shaped_rewards: kind={kind!r} in a reward does not give the gradient of the KL (only k1 "
            "does); keep k1 in the reward, or put a k2 / k3 penalty in the loss: losses.kl_loss "
            "(RLConfig.kl_penalty='loss')"
        )
    fn = "shaped_rewards"
    _check_rank(fn, "[B, R]", logprobs=logprobs)
    _check_same_shape(fn, "logprobs", logprobs, ref_logprobs=ref_logprobs, response_mask=response_mask)
    _check_rank(fn, "[B] (one score per sequence)", scores=scores)
    _check_batch(fn, "logprobs", logprobs, scores=scores)
    _check_param(fn, "kl_coef", kl_coef, low=0.0)
    logprobs = _zero_padding(response_mask, _float(logprobs))
    ref_logprobs = _zero_padding(response_mask, _float(ref_logprobs))
    kl = _zero_padding(response_mask, kl_penalty(logprobs, ref_logprobs, kind))  # [B, R]
    rewards = -kl_coef * kl + _score_at_last_token(scores, response_mask)
    return rewards, kl


def kl_loss(
    logprobs: jax.Array,
    ref_logprobs: jax.Array,
    response_mask: jax.Array,
    kind: str = "k3",
    aggregation: str = "token_mean",
    *,
    axis_name: ops.AxisName = None,
) -> tuple[jax.Array, dict]:
    """A KL penalty differentiated as a loss term (GRPO's form), per token, over the real tokens.

    L = masked_mean(KL_t), KL_t = `kl_penalty(logprobs, ref_logprobs, kind)`, for tokens sampled from
    pi itself (on-policy) and `logprobs` differentiated. What its gradient is, in expectation over y ~ pi:
      k2: (log pi - log pi_ref) grad log pi  ->  grad KL(pi || pi_ref), the reverse KL's exact gradient;
      k3: (1 - pi_ref / pi) grad log pi      ->  grad KL(pi_ref || pi), the forward KL's gradient (GRPO:
          Shao et al. 2024, "DeepSeekMath", eq. 4; its value is an unbiased estimate of the reverse KL,
          its gradient is not);
      k1: grad log pi                        ->  0 in expectation, so it is refused.
    Both k2 and k3 pull pi towards pi_ref; for the reverse KL of a reward-shaped penalty use
    `shaped_rewards` (k1 in the reward) instead.

    Args:
      logprobs: [B, R] log pi of the sampled tokens (differentiated).
      ref_logprobs: [B, R] log pi_ref of the same tokens (constant).
      response_mask: [B, R] bool, True = real token.
      kind: "k2" or "k3".
      aggregation: how per-token terms become the loss (`aggregate`), as for the policy loss.
      axis_name: mesh axis (or axes) the batch is split over inside `jax.shard_map`; the loss is then
        the global one (see `aggregate`).

    Returns:
      (loss, metrics) with "kl_loss".
    """
    if kind not in ("k2", "k3"):
        raise ValueError(
            f"kl_loss: kind={kind!r} as a KL loss term: k1's gradient is 0 in expectation; use 'k3' (GRPO) "
            "or 'k2' (the exact reverse-KL gradient), or put k1 in the reward (RLConfig.kl_penalty='reward')"
        )
    _check_rank("kl_loss", "[B, R]", logprobs=logprobs)
    _check_same_shape("kl_loss", "logprobs", logprobs, ref_logprobs=ref_logprobs, response_mask=response_mask)
    _check_aggregation("kl_loss", aggregation)
    ref_logprobs = jax.lax.stop_gradient(_float(ref_logprobs))
    per_token = kl_penalty(_zero_padding(response_mask, _float(logprobs)), ref_logprobs, kind)  # [B, R]
    loss = aggregate(per_token, response_mask, aggregation, axis_name=axis_name)
    return loss, {"kl_loss": loss}


class KLControllerState(NamedTuple):
    """State of the (adaptive) KL coefficient; a pytree, so it can live in a jitted train state."""

    kl_coef: jax.Array  # [] current beta
    target: jax.Array | None  # [] target KL per sequence; None = fixed coefficient
    horizon: jax.Array  # [] number of samples over which the error is corrected


def init_kl_controller(
    init_kl_coef: float, target: float | None = None, horizon: float = 10000
) -> KLControllerState:
    """A KL controller at `init_kl_coef` >= 0: fixed if `target` is None, else adaptive (see update), with
    `target` > 0 and `horizon` > 0 (values checked when not traced)."""
    _check_param("init_kl_controller", "init_kl_coef", init_kl_coef, low=0.0)
    _check_positive("init_kl_controller", target=target, horizon=horizon)
    return KLControllerState(
        kl_coef=jnp.asarray(init_kl_coef, jnp.float32),
        target=None if target is None else jnp.asarray(target, jnp.float32),
        horizon=jnp.asarray(horizon, jnp.float32),
    )


def update_kl_controller(
    state: KLControllerState,
    observed_kl: jax.Array | float,
    n_steps: jax.Array | int,
    *,
    axis_name: ops.AxisName = None,
) -> KLControllerState:
    """Proportional control of beta towards a target KL (Ziegler et al. 2019, section 2.2).

    e = clip(KL_observed / KL_target - 1, -0.2, 0.2);  beta <- beta * (1 + e * n_steps / horizon).
    A fixed controller (target None) returns `state` unchanged.

    Args:
      state: the current controller.
      observed_kl: mean KL(pi || pi_ref) per sequence over the batch just used.
      n_steps: number of samples (sequences) in that batch, >= 0 (values checked when not traced).
      axis_name: mesh axis (or axes) the batch is split over inside `jax.shard_map`. `observed_kl` and
        `n_steps` are then this device's (the mean over its own `n_steps` sequences); the update reads
        the global mean psum(n * KL) / psum(n) and the global count psum(n), so every device keeps the
        same state as the unsharded controller.

    Returns:
      The new state.
    """
    _check_param("update_kl_controller", "observed_kl", observed_kl)
    _check_param("update_kl_controller", "n_steps", n_steps, low=0.0)
    if state.target is None:
        return state
    if axis_name is not None:
        n_local = _float(n_steps)
        n_steps = ops.psum(n_local, axis_name)
        observed_kl = ops.psum(_float(observed_kl) * n_local, axis_name) / jnp.maximum(n_steps, 1)
    error = jnp.clip(_float(observed_kl) / state.target - 1.0, -0.2, 0.2)
    return state._replace(kl_coef=state.kl_coef * (1.0 + error * n_steps / state.horizon))
