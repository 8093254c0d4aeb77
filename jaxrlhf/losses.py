"""Every RLHF loss and estimator as a pure function: arrays in, `(loss, metrics)` out.

Each function stands alone so it can be lifted into other code: no model or config objects, no
hidden state, jittable and vmappable. Conventions:

- Per-token arrays are [B, R], aligned to response tokens, with one bool `response_mask` [B, R]
  (True = real). Sequence-level arrays (scores, rewards, sequence logprobs) are [B]; groups of
  answers to one prompt are [B, K].
- A loss computes a per-token (or per-pair) array and reduces it once with `ops.masked_mean`, which
  divides by max(count, 1): a fully masked row adds nothing and an empty batch gives a finite 0.
- Padded entries are zeroed before any exp or square, so garbage in padding never reaches the loss
  or its gradient.
- `metrics` is a flat dict of scalar arrays that always contains "loss".
- What the formula treats as constant (advantages, returns, old logprobs and values, reference
  logprobs, reward targets) goes through `jax.lax.stop_gradient`.
- String and None options (`kind`, `loss_type`, `clip_eps_high`, `dual_clip`, `logits`) are static
  Python values; an unknown option raises ValueError.
- Computation runs in at least float32 (bf16 inputs are promoted).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxrlhf import ops


def _float(x) -> jax.Array:
    """`x` as an array of at least float32 precision."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _zero_padding(mask: jax.Array | None, x: jax.Array) -> jax.Array:
    """`x` with padded entries set to 0, so no exp or square of garbage ever runs."""
    return x if mask is None else jnp.where(mask, x, jnp.zeros_like(x))


def _preference_metrics(chosen: jax.Array, rejected: jax.Array, mask: jax.Array | None) -> dict:
    """Accuracy, margin and means of a [B] pair of (possibly implicit) rewards."""
    return {
        "accuracy": ops.masked_mean((chosen > rejected).astype(chosen.dtype), mask),
        "reward_margin": ops.masked_mean(chosen - rejected, mask),
        "chosen_reward": ops.masked_mean(chosen, mask),
        "rejected_reward": ops.masked_mean(rejected, mask),
    }


def sequence_logprobs(token_logprobs: jax.Array, mask: jax.Array, average: bool = False) -> jax.Array:
    """log pi(y) = sum_t m_t log pi(y_t | y_<t), or the per-token mean when `average` (IPO).

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


# ------------------------------------------------------------------------------------------ SFT


def sft_loss(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, dict]:
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

    Returns:
      (loss, metrics) with metrics "loss", "accuracy" (argmax == target) and "ntokens".
    """
    targets = jnp.where(loss_mask, targets, 0)
    nll = -ops.token_logprobs(logits, targets)  # [B, T]
    loss = ops.masked_mean(nll, loss_mask)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)  # [B, T]
    return loss, {
        "loss": loss,
        "accuracy": ops.masked_mean(correct, loss_mask),
        "ntokens": jnp.sum(loss_mask, dtype=jnp.float32),
    }


# ------------------------------------------------------------------------------- reward models


def pairwise_rm_loss(
    chosen_rewards: jax.Array,
    rejected_rewards: jax.Array,
    margin: jax.Array | float | None = None,
    mask: jax.Array | None = None,
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

    Returns:
      (loss, metrics) with "loss", "accuracy" (r_chosen > r_rejected), "reward_margin",
      "chosen_reward", "rejected_reward".
    """
    chosen, rejected = _float(chosen_rewards), _float(rejected_rewards)
    diff = chosen - rejected  # [B]
    if margin is not None:
        diff = diff - _float(margin)
    loss = ops.masked_mean(-jax.nn.log_sigmoid(_zero_padding(mask, diff)), mask)
    return loss, {"loss": loss, **_preference_metrics(chosen, rejected, mask)}


def kway_rm_loss(rewards: jax.Array, rank_mask: jax.Array | None = None) -> tuple[jax.Array, dict]:
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

    Returns:
      (loss, metrics) with "loss", "accuracy" and "reward_margin" (means over all valid pairs),
      "npairs".
    """
    rewards = _float(rewards)
    k = rewards.shape[1]
    valid = jnp.ones(rewards.shape, bool) if rank_mask is None else rank_mask  # [B, K]
    rewards = _zero_padding(valid, rewards)
    diff = rewards[:, :, None] - rewards[:, None, :]  # [B, K, K]: r_i - r_j
    upper = jnp.triu(jnp.ones((k, k), bool), k=1)  # [K, K]: i ranked above j
    pair_mask = upper[None] & valid[:, :, None] & valid[:, None, :]  # [B, K, K]
    per_prompt = ops.masked_mean(-jax.nn.log_sigmoid(diff), pair_mask, axis=(1, 2))  # [B]
    loss = ops.masked_mean(per_prompt, jnp.any(pair_mask, axis=(1, 2)))
    return loss, {
        "loss": loss,
        "accuracy": ops.masked_mean((diff > 0).astype(diff.dtype), pair_mask),
        "reward_margin": ops.masked_mean(diff, pair_mask),
        "npairs": jnp.sum(pair_mask, dtype=rewards.dtype),
    }


def reward_gain_bias(
    rewards: jax.Array,
    mask: jax.Array | None = None,
    target_mean: float = 0.0,
    target_std: float = 1.0,
    eps: float = 1e-8,
) -> tuple[jax.Array, jax.Array]:
    """Gain and bias that give `rewards` a chosen mean and std: r' = gain * r + bias.

    gain = target_std / sqrt(var(r) + eps), bias = target_mean - gain * mean(r), with the population
    variance over the masked entries. Ziegler et al. 2019, "Fine-Tuning Language Models from Human
    Preferences", normalise the reward model this way on samples of the initial policy (mean 0, std
    1) so the KL coefficient keeps one scale.

    Args:
      rewards: reward-model outputs of any shape, e.g. [B] scores of policy samples.
      mask: optional bool of the same shape, True = real.
      target_mean, target_std: the statistics of gain * r + bias.
      eps: keeps the gain finite for constant rewards.

    Returns:
      (gain, bias), two scalars.
    """
    rewards = _float(rewards)
    mean = ops.masked_mean(rewards, mask)
    var = ops.masked_var(rewards, mask, unbiased=False)
    gain = target_std * jax.lax.rsqrt(var + eps)
    return gain, target_mean - gain * mean


def reward_centring_loss(
    chosen_rewards: jax.Array, rejected_rewards: jax.Array, mask: jax.Array | None = None
) -> tuple[jax.Array, dict]:
    """Auxiliary loss that centres a reward model's outputs on 0.

    L = mean_b (r_chosen_b + r_rejected_b)^2; add `coef * L` (e.g. 0.01) to `pairwise_rm_loss`,
    which is blind to a shared offset. Eisenstein et al. 2023, "Helping or Herding? Reward Model
    Ensembles Mitigate but do not Eliminate Reward Hacking".

    Args:
      chosen_rewards, rejected_rewards: [B].
      mask: optional [B] bool, True = real pair.

    Returns:
      (loss, metrics) with "loss" and "reward_mean" (mean of both rewards).
    """
    total = _zero_padding(mask, _float(chosen_rewards) + _float(rejected_rewards))  # [B]
    loss = ops.masked_mean(jnp.square(total), mask)
    return loss, {"loss": loss, "reward_mean": 0.5 * ops.masked_mean(total, mask)}


# ------------------------------------------------------------------------------------------ KL


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
    log_ratio = _float(logprobs) - _float(ref_logprobs)  # log pi / pi_ref = -log r
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * jnp.square(log_ratio)
    if kind == "k3":
        return jnp.expm1(-log_ratio) + log_ratio
    raise ValueError(f"kind={kind!r}; use 'k1', 'k2' or 'k3'.")


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
      kl_coef: beta, a scalar (e.g. `KLControllerState.kl_coef`).
      kind: "k1", the only estimator whose reward has the KL's gradient; "k2" / "k3" are refused.

    Returns:
      (rewards [B, R], kl [B, R]), both 0 on padding.
    """
    if kind != "k1":
        raise ValueError(
            f"kind={kind!r} in a reward does not give the gradient of the KL (only k1 does); keep k1 in "
            "the reward, or put a k2 / k3 penalty in the loss: losses.kl_loss (RLConfig.kl_penalty='loss')"
        )
    logprobs = _zero_padding(response_mask, _float(logprobs))
    ref_logprobs = _zero_padding(response_mask, _float(ref_logprobs))
    kl = _zero_padding(response_mask, kl_penalty(logprobs, ref_logprobs, kind))  # [B, R]
    positions = jnp.arange(response_mask.shape[1])
    is_last = (positions == ops.last_index(response_mask)[:, None]) & response_mask  # [B, R]
    rewards = -kl_coef * kl + jnp.where(is_last, _float(scores)[:, None], 0.0)
    return rewards, kl


def kl_loss(
    logprobs: jax.Array,
    ref_logprobs: jax.Array,
    response_mask: jax.Array,
    kind: str = "k3",
    aggregation: str = "token_mean",
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

    Returns:
      (loss, metrics) with "kl_loss".
    """
    if kind not in ("k2", "k3"):
        raise ValueError(
            f"kind={kind!r} as a KL loss term: k1's gradient is 0 in expectation; use 'k3' (GRPO) or 'k2' "
            "(the exact reverse-KL gradient), or put k1 in the reward (RLConfig.kl_penalty='reward')"
        )
    ref_logprobs = jax.lax.stop_gradient(_float(ref_logprobs))
    per_token = kl_penalty(_zero_padding(response_mask, _float(logprobs)), ref_logprobs, kind)  # [B, R]
    loss = aggregate(per_token, response_mask, aggregation)
    return loss, {"kl_loss": loss}


class KLControllerState(NamedTuple):
    """State of the (adaptive) KL coefficient; a pytree, so it can live in a jitted train state."""

    kl_coef: jax.Array  # [] current beta
    target: jax.Array | None  # [] target KL per sequence; None = fixed coefficient
    horizon: jax.Array  # [] number of samples over which the error is corrected


def init_kl_controller(
    init_kl_coef: float, target: float | None = None, horizon: float = 10000
) -> KLControllerState:
    """A KL controller at `init_kl_coef`: fixed if `target` is None, else adaptive (see update)."""
    return KLControllerState(
        kl_coef=jnp.asarray(init_kl_coef, jnp.float32),
        target=None if target is None else jnp.asarray(target, jnp.float32),
        horizon=jnp.asarray(horizon, jnp.float32),
    )


def update_kl_controller(
    state: KLControllerState, observed_kl: jax.Array | float, n_steps: jax.Array | int
) -> KLControllerState:
    """Proportional control of beta towards a target KL (Ziegler et al. 2019, section 2.2).

    e = clip(KL_observed / KL_target - 1, -0.2, 0.2);  beta <- beta * (1 + e * n_steps / horizon).
    A fixed controller (target None) returns `state` unchanged.

    Args:
      state: the current controller.
      observed_kl: mean KL(pi || pi_ref) per sequence over the batch just used.
      n_steps: number of samples (sequences) in that batch.

    Returns:
      The new state.
    """
    if state.target is None:
        return state
    error = jnp.clip(_float(observed_kl) / state.target - 1.0, -0.2, 0.2)
    return state._replace(kl_coef=state.kl_coef * (1.0 + error * n_steps / state.horizon))


# ---------------------------------------------------------------------------------- advantages


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
      gamma: discount.
      lam: GAE lambda.
      last_value: optional [B] bootstrap value after the last token.

    Returns:
      (advantages [B, R], returns [B, R]), both 0 on padding.
    """
    rewards = _float(rewards)
    values = _float(values).astype(rewards.dtype)
    batch = rewards.shape[0]
    next_value = jnp.zeros((batch,), rewards.dtype)
    if last_value is not None:
        next_value = jnp.broadcast_to(jnp.asarray(last_value, rewards.dtype), (batch,))

    def step(carry, inputs):
        next_value, next_advantage = carry  # [B], [B]
        reward, value, mask = inputs  # [B], [B], [B]
        delta = reward + gamma * next_value - value
        advantage = delta + gamma * lam * next_advantage
        carry = (jnp.where(mask, value, next_value), jnp.where(mask, advantage, next_advantage))
        return carry, jnp.where(mask, advantage, 0.0)

    init = (next_value, jnp.zeros((batch,), rewards.dtype))
    inputs = (rewards.T, values.T, response_mask.T)  # time-major [R, B]
    _, advantages = jax.lax.scan(step, init, inputs, reverse=True)
    advantages = advantages.T  # [B, R]
    returns = jnp.where(response_mask, advantages + values, 0.0)
    return advantages, returns


def whiten_advantages(
    advantages: jax.Array, response_mask: jax.Array, shift_mean: bool = True, eps: float = 1e-8
) -> jax.Array:
    """(A - mean) / std over all real tokens of the batch; `shift_mean=False` adds the mean back.

    Whitening as in lm-human-preferences (Ziegler et al. 2019). [B, R] -> [B, R], 0 on padding.
    """
    return ops.masked_whiten(_float(advantages), response_mask, shift_mean=shift_mean, eps=eps)


def rloo_advantages(scores: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """REINFORCE leave-one-out advantages over the K answers of each prompt.

    A_i = s_i - 1/(K-1) sum_{j != i} s_j. Kool et al. 2019, "Buy 4 REINFORCE Samples, Get a Baseline
    for Free!"; Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for
    Learning from Human Feedback in LLMs".

    Args:
      scores: [B, K] sequence scores, group = axis 1.
      mask: optional [B, K] bool, True = real answer. A group with a single answer has no baseline
        and gets advantage 0.

    Returns:
      [B, K] advantages, 0 on padding.
    """
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
    shift (Liu et al. 2025, "Understanding R1-Zero-Like Training", Dr. GRPO).

    Args:
      scores: [B, K] sequence scores, group = axis 1.
      eps: added to the std; a group of equal scores gets advantage 0.
      mask: optional [B, K] bool, True = real answer.
      scale_by_std: divide by the group std.

    Returns:
      [B, K] advantages, 0 on padding.
    """
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


# ------------------------------------------------------------------------------- policy losses

AGGREGATIONS = ("token_mean", "seq_mean_token_sum", "seq_mean_token_mean", "constant")


def aggregate(per_token: jax.Array, response_mask: jax.Array, aggregation: str = "token_mean") -> jax.Array:
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
    """
    per_token = _zero_padding(response_mask, _float(per_token))
    if aggregation == "token_mean":
        return ops.masked_mean(per_token, response_mask)
    if aggregation == "constant":
        return jnp.sum(per_token) / per_token.size
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation={aggregation!r}; use one of {', '.join(AGGREGATIONS)}")
    rows = jnp.any(response_mask, axis=-1)  # [B]
    per_row = jnp.sum(per_token, axis=-1)  # [B]
    if aggregation == "seq_mean_token_mean":
        per_row = per_row / jnp.maximum(jnp.sum(response_mask, axis=-1), 1)
    return ops.masked_mean(per_row, rows)


def pg_loss(
    logprobs: jax.Array,
    advantages: jax.Array,
    response_mask: jax.Array,
    baseline: jax.Array | float | None = None,
    aggregation: str = "token_mean",
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

    Returns:
      (loss, metrics) with "loss" and "advantage_mean".
    """
    logprobs = _zero_padding(response_mask, _float(logprobs))
    advantages = _float(advantages)
    if advantages.ndim == 1:
        advantages = advantages[:, None]
    if baseline is not None:
        baseline = _float(baseline)
        advantages = advantages - (baseline[:, None] if baseline.ndim == 1 else baseline)
    advantages = jax.lax.stop_gradient(jnp.broadcast_to(advantages, logprobs.shape))  # [B, R]
    advantages = _zero_padding(response_mask, advantages)
    loss = aggregate(-advantages * logprobs, response_mask, aggregation)
    return loss, {"loss": loss, "advantage_mean": ops.masked_mean(advantages, response_mask)}


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
) -> tuple[jax.Array, dict]:
    """PPO clipped surrogate, per token, averaged over the real tokens of the batch (by default).

    rho = exp(log pi - log pi_old),  L_t = max(-A rho, -A clip(rho, 1 - eps_low, 1 + eps_high)).
    Dual clip (A < 0 only): L_t = min(L_t, -c A), bounding the loss when rho >> 1.
    Schulman et al. 2017, "Proximal Policy Optimization Algorithms", eq. 7; asymmetric clip
    ("clip-higher") Yu et al. 2025, "DAPO"; dual clip Ye et al. 2020, "Mastering Complex Control in
    MOBA Games with Deep Reinforcement Learning". At rho = 1 the gradient equals `pg_loss`'s.

    Args:
      logprobs: [B, R] log pi of the sampled tokens under the current policy (differentiated).
      old_logprobs: [B, R] log pi_old of the same tokens (the policy that sampled them; constant).
      advantages: [B, R] advantages (constant), e.g. from `compute_gae`.
      response_mask: [B, R] bool, True = real token.
      clip_eps: eps_low, and eps_high when `clip_eps_high` is None.
      clip_eps_high: optional upper clip eps (DAPO uses 0.28 with eps_low 0.2).
      dual_clip: optional c > 1 (3.0 in the paper).
      logits: optional [B, R, V] current-policy logits, only to report the "entropy" metric.
      aggregation: how per-token terms become the loss (`aggregate`): "token_mean" (default),
        "seq_mean_token_sum", "seq_mean_token_mean" (GRPO) or "constant" (Dr. GRPO).

    Returns:
      (loss, metrics) with "loss", "clipfrac" (fraction of tokens whose gradient the clip removed),
      "approx_kl" (k3 estimate of KL(pi_old || pi)), "ratio_mean", "ratio_max", plus "dual_clipfrac"
      with `dual_clip` and "entropy" with `logits`.
    """
    if dual_clip is not None and isinstance(dual_clip, int | float) and dual_clip <= 1.0:
        raise ValueError(f"dual_clip={dual_clip}; it must be > 1 (or None).")
    clip_high = clip_eps if clip_eps_high is None else clip_eps_high
    old_logprobs = jax.lax.stop_gradient(_float(old_logprobs))
    advantages = _zero_padding(response_mask, jax.lax.stop_gradient(_float(advantages)))
    log_ratio = _zero_padding(response_mask, _float(logprobs) - old_logprobs)  # [B, R]
    ratio = jnp.exp(log_ratio)  # [B, R]
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_high)
    per_token = jnp.maximum(unclipped, clipped)  # [B, R]
    metrics = {"clipfrac": ops.masked_mean((clipped > unclipped).astype(ratio.dtype), response_mask)}
    if dual_clip is not None:
        bound = -dual_clip * advantages
        dual_active = (advantages < 0) & (per_token > bound)
        per_token = jnp.where(dual_active, bound, per_token)
        metrics["dual_clipfrac"] = ops.masked_mean(dual_active.astype(ratio.dtype), response_mask)
    loss = aggregate(per_token, response_mask, aggregation)
    metrics["loss"] = loss
    metrics["approx_kl"] = ops.masked_mean(jnp.expm1(log_ratio) - log_ratio, response_mask)
    metrics["ratio_mean"] = ops.masked_mean(ratio, response_mask)
    metrics["ratio_max"] = jnp.max(_zero_padding(response_mask, ratio))
    if logits is not None:
        metrics["entropy"] = ops.masked_mean(ops.entropy(logits), response_mask)
    return loss, metrics


def value_loss(
    values: jax.Array,
    old_values: jax.Array,
    returns: jax.Array,
    response_mask: jax.Array,
    clip_eps: float | None = 0.2,
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
      clip_eps: clip range around `old_values`, or None.

    Returns:
      (loss, metrics) with "loss", "clipfrac" (fraction of tokens where the clipped error is used)
      and "value_mean".
    """
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
        clipfrac = ops.masked_mean((clipped > per_token).astype(values.dtype), response_mask)
        per_token = jnp.maximum(per_token, clipped)
    loss = 0.5 * ops.masked_mean(per_token, response_mask)
    return loss, {
        "loss": loss,
        "clipfrac": clipfrac,
        "value_mean": ops.masked_mean(values, response_mask),
    }


def entropy_bonus(logits: jax.Array, response_mask: jax.Array) -> tuple[jax.Array, dict]:
    """Minus the mean policy entropy over real response tokens; add `coef * loss` to maximise it.

    L = -mean_t H(pi(. | y_<t)), H = -sum_v p_v log p_v in float32. Williams & Peng 1991, "Function
    optimization using connectionist reinforcement learning algorithms"; Mnih et al. 2016 (A3C).

    Args:
      logits: [B, R, V] policy logits at the response positions.
      response_mask: [B, R] bool, True = real token.

    Returns:
      (loss, metrics) with "loss" and "entropy" (= -loss).
    """
    mean_entropy = ops.masked_mean(ops.entropy(logits), response_mask)
    return -mean_entropy, {"loss": -mean_entropy, "entropy": mean_entropy}


# ------------------------------------------------------------------------- direct preference


def _sequence_log_ratio(logprobs: jax.Array, ref_logprobs: jax.Array, mask: jax.Array | None) -> jax.Array:
    """log pi(y) - log pi_ref(y) from token [B, R] (summed under mask) or sequence [B] logprobs."""
    log_ratio = _float(logprobs) - jax.lax.stop_gradient(_float(ref_logprobs))
    if log_ratio.ndim == 2:
        return ops.masked_sum(log_ratio, mask, axis=-1)
    if mask is not None:
        raise ValueError("a mask was given with per-sequence [B] logprobs; pass [B, R] token logprobs.")
    return log_ratio


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
) -> tuple[jax.Array, dict]:
    """REBEL: regress the scaled difference of policy log-ratios onto the difference of rewards.

    L = mean_b ( (1/eta) [log pi/pi_0 (y_b) - log pi/pi_0 (y'_b)] - (r(y_b) - r(y'_b)) )^2, where
    pi_0 ("ref") is the policy that sampled the pair (REBEL's pi_t) and y, y' are two answers to one
    prompt. Gao et al. 2024, "REBEL: Reinforcement Learning via Regressing Relative Rewards", eq. 1.

    Args:
      logprobs_chosen, ref_logprobs_chosen: [B, R] token logprobs (summed under `mask_chosen`) or
        [B] sequence logprobs of y under pi and pi_0.
      logprobs_rejected, ref_logprobs_rejected: the same for y'.
      rewards_chosen, rewards_rejected: [B] rewards r(y), r(y') (constant).
      eta: the regression scale (1/eta multiplies the log-ratio difference).
      mask_chosen, mask_rejected: [B, R] bool, True = real token; only with token logprobs.
      pair_mask: optional [B] bool, True = a real pair (False for batch padding).

    Returns:
      (loss, metrics) with "loss", "predicted_diff" (mean of the scaled log-ratio difference) and
      "reward_diff" (mean of r(y) - r(y')).
    """
    log_ratio_chosen = _sequence_log_ratio(logprobs_chosen, ref_logprobs_chosen, mask_chosen)
    log_ratio_rejected = _sequence_log_ratio(logprobs_rejected, ref_logprobs_rejected, mask_rejected)
    predicted = _zero_padding(pair_mask, (log_ratio_chosen - log_ratio_rejected) / eta)  # [B]
    target = _float(rewards_chosen) - _float(rewards_rejected)
    target = _zero_padding(pair_mask, jax.lax.stop_gradient(target))  # [B]
    loss = ops.masked_mean(jnp.square(predicted - target), pair_mask)
    return loss, {
        "loss": loss,
        "predicted_diff": ops.masked_mean(predicted, pair_mask),
        "reward_diff": ops.masked_mean(target, pair_mask),
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
      beta: KL strength (DPO's beta, IPO's tau).
      loss_type: "sigmoid" or "ipo".
      label_smoothing: s in [0, 0.5), assumed probability that a label is flipped; sigmoid only.
      mask: optional [B] bool, True = a real pair (False for batch padding).

    Returns:
      (loss, metrics) with "loss", "accuracy", "reward_margin", "chosen_reward", "rejected_reward"
      (all of the implicit rewards).
    """
    chosen_log_ratio = _sequence_log_ratio(policy_chosen_logps, ref_chosen_logps, None)  # [B]
    rejected_log_ratio = _sequence_log_ratio(policy_rejected_logps, ref_rejected_logps, None)  # [B]
    chosen_log_ratio = _zero_padding(mask, chosen_log_ratio)
    rejected_log_ratio = _zero_padding(mask, rejected_log_ratio)
    h = chosen_log_ratio - rejected_log_ratio
    if loss_type == "sigmoid":
        per_pair = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * h)
        per_pair = per_pair - label_smoothing * jax.nn.log_sigmoid(-beta * h)
    elif loss_type == "ipo":
        if isinstance(label_smoothing, int | float) and label_smoothing != 0.0:
            raise ValueError("label_smoothing applies to loss_type='sigmoid' only.")
        per_pair = jnp.square(h - 1.0 / (2.0 * beta))
    else:
        raise ValueError(f"loss_type={loss_type!r}; use 'sigmoid' or 'ipo'.")
    loss = ops.masked_mean(per_pair, mask)
    chosen_rewards = jax.lax.stop_gradient(beta * chosen_log_ratio)
    rejected_rewards = jax.lax.stop_gradient(beta * rejected_log_ratio)
    return loss, {"loss": loss, **_preference_metrics(chosen_rewards, rejected_rewards, mask)}
