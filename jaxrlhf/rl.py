"""Policy optimisation: rollout -> experience (logprobs, values, KL-shaped rewards, advantages) -> update.

One RL iteration is three pure functions, each jittable on its own or composed into one program:

  rollout = sampling.sample_fn(policy, prompt, prompt_mask, ...)        (jit 1: sample)
  scores  = reward_fn(rollout)                                            (host: VADER on decoded text;
                                                                           or a JAX function: fused)
  exp     = make_experience(state, ref_params, rollout, scores, ...)     (jit 2: experience + update)
  state   = ppo/pg step(state, exp, key=...)

RL params are {"policy": GPT params} for policy gradient and {"policy": ..., "value": scalar model} for
PPO (the critic is a separate model, as in InstructGPT, initialised from the reward model or the SFT
model). The frozen reference is an argument, never part of the trained state.

Shift convention (ops): the logits at position P - 1 + t predict response token t, so response logprobs
and values are read from positions [P - 1, P + R - 1).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from jaxrlhf import losses, model, ops, rewards, sampling, train
from jaxrlhf.config import ModelConfig, SampleConfig

Params = Any


@dataclasses.dataclass(frozen=True, kw_only=True)
class RLConfig:
    """Policy-optimisation settings (InstructGPT / lm-human-preferences defaults where they exist).

    Attributes:
      algo: "ppo" (clipped surrogate + value head + GAE) or "pg" (vanilla policy gradient).
      kl_coef: initial beta of the per-token KL penalty to the frozen reference.
      kl_target: per-sequence KL target of the adaptive controller (Ziegler et al.); None = fixed beta.
      kl_horizon: the controller's horizon in samples.
      kl_kind: KL estimator in the shaped reward: "k1", "k2" or "k3".
      gamma, lam: GAE discount and lambda (PG uses lambda = 1: reward-to-go).
      clip_eps: PPO ratio clip.
      value_clip_eps: PPO value clip (None = unclipped value loss).
      vf_coef: weight of the value loss in the joint loss.
      ent_coef: weight of the entropy bonus.
      epochs: PPO passes over one rollout buffer.
      minibatches: PPO minibatches per pass (the batch size must be divisible by it).
      whiten_advantages: normalise advantages over the batch's real tokens.
      no_eos_penalty: score given to a response that never emits end-of-text (None = keep the score).
    """

    algo: str = "ppo"
    kl_coef: float = 0.1
    kl_target: float | None = None
    kl_horizon: float = 10000.0
    kl_kind: str = "k1"
    gamma: float = 1.0
    lam: float = 0.95
    clip_eps: float = 0.2
    value_clip_eps: float | None = 0.2
    vf_coef: float = 0.5
    ent_coef: float = 0.0
    epochs: int = 4
    minibatches: int = 4
    whiten_advantages: bool = True
    no_eos_penalty: float | None = None

    def __post_init__(self):
        if self.algo not in ("ppo", "pg"):
            raise ValueError(f"algo={self.algo!r}; use 'ppo' or 'pg' (REBEL/DPO: see preference.py).")
        if self.kl_kind not in ("k1", "k2", "k3"):
            raise ValueError(f"kl_kind={self.kl_kind!r}; use 'k1', 'k2' or 'k3'.")


@flax.struct.dataclass
class Experience:
    """One rollout buffer, everything aligned to response tokens.

    Attributes:
      tokens: [B, P + R] prompt + response ids.   mask: [B, P + R] bool.
      response_mask: [B, R] bool.
      old_logprobs: [B, R] policy logprobs at rollout time (training forward, not the sampler's).
      ref_logprobs: [B, R] frozen-reference logprobs.
      old_values: [B, R] critic values at rollout time (0 for PG).
      advantages: [B, R].  returns: [B, R] value targets.
      scores: [B] sequence rewards (after the no-EOS penalty).
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


def init_rl_params(policy: Params, value: Params | None, rl: RLConfig) -> Params:
    """{"policy"} for PG, {"policy", "value"} for PPO (value is a scalar model {"gpt", "head"})."""
    if rl.algo == "ppo":
        if value is None:
            raise ValueError("PPO needs value params: pass a scalar model (e.g. from the reward model).")
        return {"policy": policy, "value": value}
    return {"policy": policy}


def init_rl_state(params: Params, tx: optax.GradientTransformation, rl: RLConfig) -> train.TrainState:
    kl = losses.init_kl_controller(rl.kl_coef, rl.kl_target, rl.kl_horizon)
    return train.init_train_state(params, tx, kl=kl)


def response_logprobs(params, tokens, mask, response_len: int, cfg: ModelConfig, *, key=None):
    """log pi(response_t | prefix): [B, P + R] -> ([B, R] logprobs, [B, R, V] logits), float32."""
    logits = model.logits_fn(params, tokens, mask, cfg, key=key)[:, -response_len - 1 : -1]
    return ops.token_logprobs(logits, tokens[:, -response_len:]), logits


def response_values(value_params, tokens, mask, response_len: int, cfg: ModelConfig, *, key=None):
    """Critic value of the state before each response token: [B, P + R] -> [B, R] float32."""
    return model.scalar_fn(value_params, tokens, mask, cfg, key=key)[:, -response_len - 1 : -1]


def make_experience(
    state: train.TrainState,
    ref_params: Params,
    rollout: sampling.Rollout,
    scores: jax.Array,
    cfg: ModelConfig,
    rl: RLConfig,
    ref_cfg: ModelConfig | None = None,
) -> tuple[Experience, dict]:
    """Old / reference logprobs, values, KL-shaped rewards and advantages for one rollout.

    Args:
      state: the RL train state (params {"policy"[, "value"]}, kl controller).
      ref_params: the frozen reference policy (may be bf16; `ref_cfg` says how to run it).
      rollout: the sampled batch.
      scores: [B] float sequence rewards.
      cfg, rl: model and RL configs; ref_cfg defaults to cfg.

    Returns:
      (Experience, metrics) with reward / KL / length statistics of the rollout.
    """
    r = rollout.response.shape[1]
    tokens, mask, rmask = rollout.tokens, rollout.mask, rollout.response_mask
    params = jax.lax.stop_gradient(state.params)
    old_logprobs, _ = response_logprobs(params["policy"], tokens, mask, r, cfg)
    ref_logprobs, _ = response_logprobs(ref_params, tokens, mask, r, ref_cfg or cfg)
    raw_scores = scores.astype(jnp.float32)
    if rl.no_eos_penalty is not None:
        scores = rewards.no_eos_penalty(raw_scores, rollout.finished, rl.no_eos_penalty)
    else:
        scores = raw_scores
    token_rewards, kl = losses.shaped_rewards(
        scores, old_logprobs, ref_logprobs, rmask, state.kl.kl_coef, kind=rl.kl_kind
    )
    if rl.algo == "ppo":
        old_values = response_values(params["value"], tokens, mask, r, cfg)
        advantages, returns = losses.compute_gae(token_rewards, old_values, rmask, rl.gamma, rl.lam)
    else:
        old_values = jnp.zeros_like(old_logprobs)
        advantages, returns = losses.compute_gae(token_rewards, old_values, rmask, rl.gamma, 1.0)
    if rl.whiten_advantages:
        advantages = ops.masked_whiten(advantages, rmask)
    advantages = jnp.where(rmask, advantages, 0.0)
    exp = Experience(
        tokens=tokens,
        mask=mask,
        response_mask=rmask,
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
        "reward": jnp.mean(raw_scores),
        "reward_std": jnp.std(raw_scores),
        "kl_per_token": ops.masked_mean(kl, rmask),
        "kl_per_sequence": jnp.mean(seq_kl),
        "kl_coef": state.kl.kl_coef,
        "response_length": jnp.mean(rollout.response_length.astype(jnp.float32)),
        "finished_fraction": jnp.mean(rollout.finished.astype(jnp.float32)),
    }
    return exp, metrics


def _minibatch_loss(params, mb: Experience, cfg: ModelConfig, rl: RLConfig, key):
    r = mb.response_mask.shape[1]
    k_pol, k_val = jax.random.split(key) if key is not None else (None, None)
    logprobs, logits = response_logprobs(params["policy"], mb.tokens, mb.mask, r, cfg, key=k_pol)
    if rl.algo == "pg":
        loss, metrics = losses.pg_loss(logprobs, mb.advantages, mb.response_mask)
        metrics = {"policy_loss": loss, **{k: v for k, v in metrics.items() if k != "loss"}}
    else:
        pol, pol_m = losses.ppo_policy_loss(
            logprobs, mb.old_logprobs, mb.advantages, mb.response_mask, clip_eps=rl.clip_eps
        )
        values = response_values(params["value"], mb.tokens, mb.mask, r, cfg, key=k_val)
        vf, vf_m = losses.value_loss(
            values, mb.old_values, mb.returns, mb.response_mask, clip_eps=rl.value_clip_eps
        )
        loss = pol + rl.vf_coef * vf
        metrics = {
            "policy_loss": pol,
            "value_loss": vf,
            "clipfrac": pol_m["clipfrac"],
            "approx_kl": pol_m["approx_kl"],
            "ratio_max": pol_m["ratio_max"],
            "value_clipfrac": vf_m["clipfrac"],
        }
    ent = ops.masked_mean(ops.entropy(logits), mb.response_mask)
    if rl.ent_coef:
        loss = loss - rl.ent_coef * ent
    return loss, {"loss": loss, "entropy": ent, **metrics}


def make_rl_step(cfg: ModelConfig, tx: optax.GradientTransformation, rl: RLConfig) -> Callable:
    """step(state, experience, *, key) -> (state, metrics): PG = one update on the whole buffer;
    PPO = `epochs` shuffled passes of `minibatches` updates, then the KL controller update."""

    def update(state, mb, key):
        (loss, metrics), grads = jax.value_and_grad(_minibatch_loss, has_aux=True)(
            state.params, mb, cfg, rl, key
        )
        state, opt_metrics = train.apply_gradients(state, grads, loss, tx)
        return state, {**metrics, **opt_metrics}

    def step(state: train.TrainState, exp: Experience, *, key):
        b = exp.tokens.shape[0]
        if rl.algo == "pg":
            state, metrics = update(state, exp, jax.random.fold_in(key, 0))
        else:
            if b % rl.minibatches:
                raise ValueError(
                    f"rollout batch {b} is not divisible by minibatches={rl.minibatches}; change one."
                )
            mb_size = b // rl.minibatches

            def one_epoch(state, epoch_key):
                perm = jax.random.permutation(epoch_key, b).reshape(rl.minibatches, mb_size)

                def one_minibatch(state, xs):
                    idx, mb_key = xs
                    mb = jax.tree.map(lambda x: x[idx], exp)
                    return update(state, mb, mb_key)

                keys = jax.random.split(jax.random.fold_in(epoch_key, 1), rl.minibatches)
                return jax.lax.scan(one_minibatch, state, (perm, keys))

            state, metrics = jax.lax.scan(one_epoch, state, jax.random.split(key, rl.epochs))
            finite = jnp.min(metrics["finite"])
            metrics = jax.tree.map(jnp.mean, metrics)
            metrics["finite"] = finite
        seq_kl = jnp.mean(jnp.sum(exp.kl, axis=-1))
        state = state.replace(kl=losses.update_kl_controller(state.kl, seq_kl, b))
        return state, metrics

    return step


def make_learn(
    cfg: ModelConfig, tx: optax.GradientTransformation, rl: RLConfig, ref_cfg: ModelConfig | None = None
) -> Callable:
    """learn(state, ref_params, rollout, scores, *, key) -> (state, metrics): experience + update.

    Non-finite scores are not trained on: the update is skipped and metrics["finite"] is 0.
    """
    rl_step = make_rl_step(cfg, tx, rl)

    def learn(state, ref_params, rollout, scores, *, key):
        exp, exp_metrics = make_experience(state, ref_params, rollout, scores, cfg, rl, ref_cfg)
        new_state, metrics = rl_step(state, exp, key=key)
        scores_finite = jnp.all(jnp.isfinite(scores))
        new_state = jax.tree.map(lambda n, o: jnp.where(scores_finite, n, o), new_state, state)
        metrics["finite"] = metrics["finite"] * scores_finite.astype(jnp.float32)
        return new_state, {**exp_metrics, **metrics}

    return learn


def make_fused_iteration(
    cfg: ModelConfig,
    sample_cfg: SampleConfig,
    tx: optax.GradientTransformation,
    rl: RLConfig,
    reward_fn: Callable[[sampling.Rollout], jax.Array],
    ref_cfg: ModelConfig | None = None,
) -> Callable:
    """iteration(state, ref_params, prompt, prompt_mask, *, key) -> (state, metrics, rollout) as one
    program (sample, score, experience, update) for a JAX `reward_fn(rollout) -> [B]` (e.g. a learned
    reward model); jit it once with parallel.jit_step-like shardings or plain jax.jit."""
    learn = make_learn(cfg, tx, rl, ref_cfg)

    def iteration(state, ref_params, prompt, prompt_mask, *, key):
        k_sample, k_learn = jax.random.split(key)
        rollout = sampling.sample_fn(state.params["policy"], prompt, prompt_mask, cfg, sample_cfg, k_sample)
        scores = reward_fn(rollout)
        state, metrics = learn(state, ref_params, rollout, scores, key=k_learn)
        return state, metrics, rollout

    return iteration
