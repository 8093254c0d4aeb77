"""Experience: what one rollout becomes before an update. Old and reference logprobs at the sampling
temperature, the critic's values, the KL-shaped per-token rewards and the advantages (GAE for PPO /
PG, group baselines for GRPO / RLOO, REINFORCE++'s batch-normalised returns), all aligned to response
tokens; then the token selections and weights of `RLConfig` (entropy mask, rollout-mismatch weights,
truncated answers masked).

Shift convention (ops): the logits at position P - 1 + t predict response token t, so response logprobs
and values are read from positions [P - 1, P + R - 1).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from jaxrlhf import losses, ops
from jaxrlhf.models import ModelConfig, transformer
from jaxrlhf.rollout import sampler, scoring
from jaxrlhf.rollout.sampler import Rollout, SampleConfig
from jaxrlhf.train.rl_config import RLConfig
from jaxrlhf.train.state import TrainState

Params = dict


@flax.struct.dataclass
class Experience:
    """One rollout buffer, everything aligned to response tokens.

    Attributes:
      tokens: [B, P + R] prompt + response ids.   mask: [B, P + R] bool.
      response_mask: [B, R] bool: the tokens that carry the loss (the response's real tokens; with
        `rl.mask_truncated`, only those of answers that emitted a stop id).
      old_logprobs: [B, R] policy logprobs at rollout time (the sampler's where `sampler_logprobs_reusable`,
        else a training forward).
      ref_logprobs: [B, R] frozen-reference logprobs.
      old_values: [B, R] critic values at rollout time (0 for PG).
      advantages: [B, R] (times the mismatch weights, 0 outside the entropy mask, when those are on).
      returns: [B, R] value targets.
      scores: [B] sequence rewards (after the no-EOS penalty and the overlong punishment).
      kl: [B, R] per-token KL estimate (0 on padding).
    """

    tokens: jax.Array
    mask: jax.Array
    response_mask: jax.Array
    old_logprobs: jax.Array
    ref_logprobs: jax.Array
    old_values: jax.Array
    advantages: jax.Array
    returns: jax.Array
    scores: jax.Array
    kl: jax.Array


def response_logprobs(
    params,
    tokens,
    mask,
    response_len: int,
    cfg: ModelConfig,
    *,
    key=None,
    sample_cfg: SampleConfig | None = None,
    filtered: bool = False,
    unroll: bool | None = None,
):
    """log pi(response_t | prefix): [B, P + R] -> ([B, R] logprobs, [B, R, V] policy logits), float32.

    With `sample_cfg`, pi is the policy that config samples from: logits / T, and top-k / top-p too when
    `filtered` (`sampler.policy_logits`); without it, the raw model at temperature 1. `unroll`: see
    `transformer.forward`.
    """
    logits = transformer.logits_fn(params, tokens, mask, cfg, key=key, unroll=unroll)[
        :, -response_len - 1 : -1
    ]
    if sample_cfg is not None:
        logits = sampler.policy_logits(logits, sample_cfg, filtered=filtered)
    return ops.token_logprobs(logits, tokens[:, -response_len:]), logits  # [B, R], [B, R, V]


def _filter_kl(tempered: jax.Array, sample_cfg: SampleConfig, response_mask: jax.Array) -> jax.Array:
    """Mean over response tokens of KL(filtered || unfiltered) = -log(probability mass top-k / top-p
    keep), from the [B, R, V] tempered logits: how off-policy an update on unfiltered logprobs is."""
    kept = jax.nn.logsumexp(sampler.truncate_logits(tempered, sample_cfg), axis=-1)  # [B, R]
    return ops.masked_mean(jax.nn.logsumexp(tempered, axis=-1) - kept, response_mask)


def response_values(
    value_params, tokens, mask, response_len: int, cfg: ModelConfig, *, key=None, unroll=None
):
    """Critic value of the state before each response token: [B, P + R] -> [B, R] float32."""
    return transformer.scalar_fn(value_params, tokens, mask, cfg, key=key, unroll=unroll)[
        :, -response_len - 1 : -1
    ]


def sampler_logprobs_reusable(cfg: ModelConfig, rl: RLConfig, sample_cfg: SampleConfig) -> bool:
    """Whether the rollout's own logprobs are the old logprobs (`RLConfig.reuse_sampler_logprobs`): the
    learner's tempered, unfiltered policy in float32, with nothing else that needs its logits."""
    return (
        rl.reuse_sampler_logprobs and cfg.compute_dtype == "float32" and not sample_cfg.filters
        and rl.entropy_top_fraction is None and rl.mismatch is None
    )  # fmt: skip


def make_experience(
    state: TrainState,
    ref_params: Params,
    rollout: Rollout,
    scores: jax.Array,
    cfg: ModelConfig,
    rl: RLConfig,
    ref_cfg: ModelConfig | None = None,
    *,
    sample_cfg: SampleConfig,
) -> tuple[Experience, dict]:
    """Old / reference logprobs, values, KL-shaped rewards and advantages for one rollout.

    Args:
      state: the RL train state (params {"policy"[, "value"]}, kl controller).
      ref_params: the frozen reference policy (may be bf16; `ref_cfg` says how to run it).
      rollout: the sampled batch.
      scores: [B] float sequence rewards.
      cfg, rl: model and RL configs; ref_cfg defaults to cfg.
      sample_cfg: the config the rollout was sampled with: policy and reference are both scored at its
        temperature (logits / T); the policy is also filtered by its top-k / top-p when
        `rl.filtered_logprobs` (the reference never is: its own top-k could exclude a sampled token).

    Returns:
      (Experience, metrics) with reward / KL / length statistics of the rollout; "filter_kl" is the mean
      per-token KL between the filtered and the unfiltered tempered policy (0 without top-k / top-p).
    """
    rl = rl.resolved()
    r = rollout.response.shape[1]
    tokens, mask, rmask = rollout.tokens, rollout.mask, rollout.response_mask
    params = jax.lax.stop_gradient(state.params)
    filtering = sample_cfg.filters
    reused = sampler_logprobs_reusable(cfg, rl, sample_cfg)
    if reused:  # the sampler computed this very function: no forward
        old_logprobs, tempered = jnp.where(rmask, rollout.logprobs.astype(jnp.float32), 0.0), None
    else:
        # No gradient flows here: the forwards run as rolled layer scans, as fast as unrolled ones without
        # a backward and a quarter of the compiled code at 4 layers (transformer.forward's `unroll`).
        old_logprobs, tempered = response_logprobs(
            params["policy"], tokens, mask, r, cfg, sample_cfg=sample_cfg, unroll=False
        )
    learner_logprobs = old_logprobs  # the function the sampler reports (tempered, unfiltered)
    if filtering and rl.filtered_logprobs:
        old_logprobs = ops.token_logprobs(sampler.truncate_logits(tempered, sample_cfg), rollout.response)
    # The reference is tempered but never filtered: its own top-k could exclude a sampled token (KL = inf).
    ref_logprobs, _ = response_logprobs(
        ref_params, tokens, mask, r, ref_cfg or cfg, sample_cfg=sample_cfg, unroll=False
    )
    raw_scores = scores.astype(jnp.float32)
    if rl.no_eos_penalty is not None:
        scores = scoring.penalise_unfinished(raw_scores, rollout.finished, rl.no_eos_penalty)
    else:
        scores = raw_scores
    if rl.overlong_cache is not None:
        if rl.overlong_cache > r:
            raise ValueError(
                f"overlong_cache={rl.overlong_cache} is longer than the {r} tokens a response may have; use "
                f"at most {r}"
            )
        overlong = scoring.overlong_penalty(rollout.response_length, r, rl.overlong_cache)
        scores = scores + overlong
    # k1 in the reward (kl_penalty "reward"), or the score alone when the KL is a loss term; the k1
    # estimate is what the metrics and the adaptive controller read in both cases.
    in_reward = state.kl.kl_coef if rl.kl_penalty == "reward" else 0.0
    token_rewards, kl = losses.shaped_rewards(scores, old_logprobs, ref_logprobs, rmask, in_reward)
    if rl.whiten_rewards:
        token_rewards = losses.whiten_advantages(token_rewards, rmask, shift_mean=False)  # whiten_rewards
    old_values = jnp.zeros_like(old_logprobs)
    b, k = scores.shape[0], rl.group_size
    if k and b % k:
        raise ValueError(f"rollout batch {b} is not a whole number of groups of group_size={k}")
    if rl.algo == "ppo":
        old_values = response_values(params["value"], tokens, mask, r, cfg, unroll=False)
        advantages, returns = losses.compute_gae(token_rewards, old_values, rmask, rl.gamma, rl.lam)
    elif rl.algo == "pg":
        advantages, returns = losses.compute_gae(token_rewards, old_values, rmask, rl.gamma, 1.0)
    elif rl.algo == "reinforce_pp":
        baseline_scores = scores
        if k:  # REINFORCE++-baseline: each group's mean score subtracted first
            centred = losses.grpo_advantages(scores.reshape(b // k, k), scale_by_std=False)
            baseline_scores = centred.reshape(b)
        advantages = losses.reinforce_pp_advantages(
            baseline_scores, kl, rmask, kl_coef=in_reward, gamma=rl.gamma
        )
        returns = jnp.zeros_like(old_logprobs)
    else:  # grpo / rloo: one advantage per answer, from its group's sequence rewards
        # The sequence reward: score - beta * sum_t k1 with the KL in the reward, else the score.
        seq_rewards = jnp.sum(token_rewards, axis=-1).reshape(b // k, k)
        if rl.algo == "grpo":
            group = losses.grpo_advantages(seq_rewards, scale_by_std=rl.grpo_scale_by_std)
        else:
            group = losses.rloo_advantages(seq_rewards)
        advantages = jnp.broadcast_to(group.reshape(b, 1), rmask.shape)
        returns = jnp.zeros_like(old_logprobs)
    if rl.whiten_advantages:
        advantages = losses.whiten_advantages(advantages, rmask)
    advantages = jnp.where(rmask, advantages, 0.0)
    metrics = {}
    if rl.entropy_top_fraction is not None:  # only the high-entropy tokens carry the policy gradient
        keep = losses.entropy_mask(ops.entropy(tempered), rmask, top_fraction=rl.entropy_top_fraction)
        advantages = jnp.where(keep, advantages, 0.0)
        metrics["entropy_kept_fraction"] = ops.masked_mean(keep.astype(jnp.float32), rmask)
    if rl.mismatch is not None:  # the sampler's logprobs against the learner's, as importance weights
        level, mode = rl.mismatch.split("_")
        weights, w_metrics = losses.mismatch_weights(
            learner_logprobs, rollout.logprobs, rmask, level=level, mode=mode, cap=rl.mismatch_cap
        )
        advantages = advantages * weights
        metrics.update({f"mismatch_{k}": v for k, v in w_metrics.items()})
    loss_mask = rmask
    if rl.mask_truncated:  # answers without a stop id carry no loss (nor count in its normalisers)
        loss_mask = rmask & rollout.finished[:, None]
    exp = Experience(
        tokens=tokens,
        mask=mask,
        response_mask=loss_mask,
        old_logprobs=old_logprobs,
        ref_logprobs=ref_logprobs,
        old_values=old_values,
        advantages=advantages,
        returns=returns,
        scores=scores,
        kl=kl,
    )
    seq_kl = jnp.sum(kl, axis=-1)
    metrics = {
        **metrics,
        "old_logprobs_reused": jnp.float32(reused),
        "reward": jnp.mean(raw_scores),
        "reward_std": jnp.std(raw_scores),
        "kl_per_token": ops.masked_mean(kl, rmask),
        "kl_per_sequence": jnp.mean(seq_kl),
        "kl_coef": state.kl.kl_coef,
        "response_length": jnp.mean(rollout.response_length.astype(jnp.float32)),
        "finished_fraction": jnp.mean(rollout.finished.astype(jnp.float32)),
    }
    if rl.overlong_cache is not None:
        metrics["overlong_penalty"] = jnp.mean(overlong)
    if filtering:
        metrics["filter_kl"] = _filter_kl(tempered, sample_cfg, rmask)
    if rl.algo == "ppo":
        # 1 - Var(returns - values) / Var(returns) over the real tokens: 1 = a perfect critic, <= 0 = none.
        residual = ops.masked_var(returns - old_values, rmask)
        metrics["explained_variance"] = 1.0 - residual / jnp.maximum(ops.masked_var(returns, rmask), 1e-8)
    return exp, metrics
