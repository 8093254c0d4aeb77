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
import types
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from jaxrlhf import losses, model, ops, rewards, sampling, train
from jaxrlhf.config import ModelConfig, SampleConfig

Params = Any


ALGOS = ("ppo", "pg", "grpo", "rloo")
# The loss terms' weights of a whole minibatch (see `_policy_loss`, `_micro_batch_grads`).
_UNIT = types.MappingProxyType({"agg": 1.0, "tok": 1.0, "ptx": 1.0})
# RLConfig fields that act only for some algorithms: a pipeline refuses one given for another algorithm
# (`inactive_fields`) instead of ignoring it.
FIELD_ALGOS = {
    "group_size": ("grpo", "rloo"),
    "grpo_scale_by_std": ("grpo",),
    "gamma": ("ppo", "pg"),
    "lam": ("ppo",),
    "clip_eps": ("ppo", "grpo", "rloo"),
    "value_clip_eps": ("ppo",),
    "vf_coef": ("ppo",),
    "epochs": ("ppo", "grpo", "rloo"),
    "minibatches": ("ppo", "grpo", "rloo"),
    "whiten_rewards": ("ppo", "pg"),
    "ratio_level": ("ppo", "grpo", "rloo"),
}


def inactive_fields(algo: str, names) -> list[str]:
    """The RLConfig fields among `names` (e.g. the flags a user gave) that do nothing for `algo`."""
    return [name for name in names if algo not in FIELD_ALGOS.get(name, ALGOS)]


@dataclasses.dataclass(frozen=True, kw_only=True)
class RLConfig:
    """Policy-optimisation settings.

    Defaults, with their sources: the PPO and KL numbers are lm-human-preferences' (Ziegler et al. 2019,
    `train_policy.py`: kl_coef 0.2, horizon 10000, gamma 1, lam 0.95, cliprange 0.2 and cliprange_value 0.2,
    vf_coef 0.1, 4 epochs of 1 minibatch, advantages whitened). It also whitens the rewards (without
    shifting their mean) before GAE; TRL does not, and neither does this default (`whiten_rewards`).
    GRPO's group size, KL form and aggregation follow DeepSeekMath; they only act for grpo / rloo.

    Attributes:
      algo: "ppo" (clipped surrogate + value head + GAE), "pg" (vanilla policy gradient on reward-to-go),
        "grpo" (clipped surrogate, no value model, each answer's sequence reward standardised within
        its group of `group_size` answers to one prompt: Shao et al. 2024) or "rloo" (the same with
        REINFORCE's leave-one-out baseline, r_i - mean_{j != i} r_j: Ahmadian et al. 2024).
      group_size: K, answers per prompt for grpo / rloo (required there, refused elsewhere); rows
        [iK, (i + 1)K) of a batch share a prompt.
      grpo_scale_by_std: grpo divides by the group's std; False keeps the mean shift only (Dr. GRPO,
        Liu et al. 2025, with loss_agg "constant").
      ratio_level: "token" (PPO's per-token ratio) or "sequence" (GSPO, Zheng et al. 2025: one
        length-normalised ratio per response, clipped as a whole; ppo, grpo, rloo).
      loss_agg: how per-token policy (and KL) terms become the loss: "token_mean" (every token of the
        batch alike), "seq_mean_token_sum", "seq_mean_token_mean" (GRPO as written) or "constant" (Dr.
        GRPO); see `losses.aggregate`.
      kl_coef: initial beta of the KL penalty to the frozen reference.
      kl_target: per-sequence KL target of the adaptive controller (Ziegler et al.); None = fixed beta.
      kl_horizon: the controller's horizon in samples.
      kl_penalty: where the KL penalty goes: "reward" (-beta * k1 on every token of the shaped reward,
        Ziegler et al. / InstructGPT: the policy gradient of that reward is the KL's gradient) or "loss"
        (beta * a k2 / k3 estimate differentiated as a loss term, GRPO's form; see `losses.kl_loss`).
      kl_kind: the estimator: "k1" with kl_penalty "reward" (the only one with the right gradient there);
        "k3" (GRPO) or "k2" with "loss".
      gamma, lam: GAE discount and lambda (PG uses lambda = 1: reward-to-go).
      clip_eps: PPO ratio clip.
      value_clip_eps: PPO value clip (None = unclipped value loss).
      vf_coef: weight of the value loss in the joint loss.
      ent_coef: weight of the entropy bonus.
      epochs: passes over one rollout buffer (ppo, grpo, rloo; pg makes one update).
      minibatches: minibatches per pass (the batch size must be divisible by it; ppo, grpo, rloo).
      micro_batches: slices each minibatch's gradient is accumulated over, one after another (gradient
        accumulation: the same update up to float rounding, with 1 / micro_batches of the rows'
        activations alive at a time); it must divide the minibatch's rows and the ptx batch's.
      whiten_advantages: normalise advantages over the batch's real tokens (for grpo / rloo, after the
        group baseline).
      whiten_rewards: standardise the per-token rewards (score and KL terms) over the batch's real tokens
        and add their mean back, (r - mean) / std + mean (lm-human-preferences' whiten_rewards with
        shift_mean=False; ppo / pg, before GAE).
      no_eos_penalty: score given to a response that never emits a stop id (`Rollout.finished`: the
        sampler's eos_id or stop_ids; None = keep the score).
      dropout: run the policy and value with the model config's dropout in the update. Off by default:
        old and reference logprobs are computed without dropout, so with it the ratio differs from 1
        before any update (lm-human-preferences, TRL and the REBEL code all update without dropout).
      ptx_coef: gamma of PPO-ptx (Ouyang et al. 2022, eq. 2): every update also minimises gamma x the
        next-token loss of a batch of pretraining text (`ptx`, a train.LMBatch passed to learn / step),
        against regressions on the pretraining distribution; 0 = off (then passing `ptx` is an error).
      filtered_logprobs: score and optimise the top-k / top-p filtered policy (the distribution tokens are
        drawn from) instead of the tempered, unfiltered one. Off by default, as in lm-human-preferences and
        TRL: the update is then slightly off-policy under top-k / top-p, by the "filter_kl" metric.
    """

    algo: str = "ppo"
    group_size: int | None = None
    grpo_scale_by_std: bool = True
    loss_agg: str = "token_mean"
    ratio_level: str = "token"
    kl_coef: float = 0.2
    kl_target: float | None = None
    kl_horizon: float = 10000.0
    kl_penalty: str = "reward"
    kl_kind: str = "k1"
    gamma: float = 1.0
    lam: float = 0.95
    clip_eps: float = 0.2
    value_clip_eps: float | None = 0.2
    vf_coef: float = 0.1
    ent_coef: float = 0.0
    epochs: int = 4
    minibatches: int = 1
    micro_batches: int = 1
    whiten_advantages: bool = True
    whiten_rewards: bool = False
    no_eos_penalty: float | None = None
    dropout: bool = False
    ptx_coef: float = 0.0
    filtered_logprobs: bool = False

    def __post_init__(self):
        if self.algo not in ALGOS:
            raise ValueError(f"algo={self.algo!r}; use one of {', '.join(ALGOS)} (REBEL/DPO: train.py).")
        if self.ratio_level not in losses.RATIO_LEVELS:
            raise ValueError(
                f"ratio_level={self.ratio_level!r}; use one of {', '.join(losses.RATIO_LEVELS)}."
            )
        if self.ratio_level != "token" and self.algo == "pg":
            raise ValueError(
                "ratio_level acts for the clipped algorithms (ppo, grpo, rloo); pg has no ratio."
            )
        if self.loss_agg not in losses.AGGREGATIONS:
            raise ValueError(f"loss_agg={self.loss_agg!r}; use one of {', '.join(losses.AGGREGATIONS)}.")
        grouped = self.algo in ("grpo", "rloo")
        if grouped and (self.group_size is None or self.group_size < 2):
            raise ValueError(f"group_size={self.group_size}: {self.algo} needs >= 2 answers per prompt.")
        if not grouped and self.group_size is not None:
            raise ValueError(f"group_size acts for grpo and rloo only; drop it for algo {self.algo!r}.")
        if not self.grpo_scale_by_std and self.algo != "grpo":
            raise ValueError(f"grpo_scale_by_std=False acts for grpo only; drop it for algo {self.algo!r}.")
        for name in ("epochs", "minibatches", "micro_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}; it must be >= 1.")
        if self.whiten_rewards and self.algo not in ("ppo", "pg"):
            raise ValueError(f"whiten_rewards acts for ppo and pg; {self.algo} uses its group baseline.")
        if self.ptx_coef < 0:
            raise ValueError(f"ptx_coef={self.ptx_coef}; use 0 (off) or a positive gamma.")
        if self.kl_kind not in ("k1", "k2", "k3"):
            raise ValueError(f"kl_kind={self.kl_kind!r}; use 'k1', 'k2' or 'k3'.")
        if self.kl_penalty not in ("reward", "loss"):
            raise ValueError(f"kl_penalty={self.kl_penalty!r}; use 'reward' (k1) or 'loss' (k2 / k3).")
        if self.kl_penalty == "reward" and self.kl_kind != "k1":
            raise ValueError(
                f"kl_kind={self.kl_kind!r} in the reward does not give the KL's gradient (only k1 does); use "
                "kl_kind 'k1', or kl_penalty 'loss' for a differentiated k2 / k3 term (GRPO's form)"
            )
        if self.kl_penalty == "loss" and self.kl_kind == "k1":
            raise ValueError(
                "kl_kind 'k1' as a loss term has zero expected gradient; use kl_kind 'k3' (GRPO) or 'k2', "
                "or kl_penalty 'reward'"
            )


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
    `filtered` (`sampling.policy_logits`); without it, the raw model at temperature 1. `unroll`: see
    `model.forward`.
    """
    logits = model.logits_fn(params, tokens, mask, cfg, key=key, unroll=unroll)[:, -response_len - 1 : -1]
    if sample_cfg is not None:
        logits = sampling.policy_logits(logits, sample_cfg, filtered=filtered)
    return ops.token_logprobs(logits, tokens[:, -response_len:]), logits  # [B, R], [B, R, V]


def _check_sample_cfg(sample_cfg: SampleConfig, rl: RLConfig) -> None:
    if not isinstance(sample_cfg, SampleConfig):
        raise TypeError(
            f"sample_cfg is a {type(sample_cfg).__name__}: pass the SampleConfig the rollouts are drawn "
            "with (its temperature and filters define the policy that is optimised)"
        )
    if sample_cfg.greedy:
        raise ValueError("temperature 0 (greedy) has no stochastic policy to optimise; sample at T > 0")
    if rl.filtered_logprobs and not (sample_cfg.top_k or sample_cfg.top_p < 1.0):
        raise ValueError("filtered_logprobs does nothing without top_k or top_p in the SampleConfig; drop it")


def _check_ptx(rl: RLConfig, ptx) -> None:
    if rl.ptx_coef and ptx is None:
        raise ValueError(f"ptx_coef={rl.ptx_coef} needs a batch of pretraining text: pass ptx=LMBatch(...)")
    if ptx is not None and not rl.ptx_coef:
        raise ValueError("a ptx batch was passed but ptx_coef is 0: set RLConfig.ptx_coef or drop it")


def check_batch_split(batch_size: int, rl: RLConfig, ptx=None) -> None:
    """Raises ValueError unless `batch_size` rollouts split into `rl.minibatches` updates (one for pg) of
    rows that `rl.micro_batches` divides, and the ptx batch's rows too."""
    minibatches = 1 if rl.algo == "pg" else rl.minibatches  # pg: one update on the whole batch
    if batch_size % minibatches:
        raise ValueError(
            f"rollout batch {batch_size} is not divisible by minibatches={rl.minibatches}; change one."
        )
    rows = batch_size // minibatches
    if rows % rl.micro_batches:
        raise ValueError(
            f"a minibatch of {rows} rows is not divisible by micro_batches={rl.micro_batches}; change one."
        )
    if ptx is not None and rl.micro_batches > 1 and ptx.tokens.shape[0] % rl.micro_batches:
        raise ValueError(
            f"the ptx batch's {ptx.tokens.shape[0]} rows are not divisible by micro_batches="
            f"{rl.micro_batches}; change one."
        )


def _filter_kl(tempered: jax.Array, sample_cfg: SampleConfig, response_mask: jax.Array) -> jax.Array:
    """Mean over response tokens of KL(filtered || unfiltered) = -log(probability mass top-k / top-p
    keep), from the [B, R, V] tempered logits: how off-policy an update on unfiltered logprobs is."""
    kept = jax.nn.logsumexp(sampling.truncate_logits(tempered, sample_cfg), axis=-1)  # [B, R]
    return ops.masked_mean(jax.nn.logsumexp(tempered, axis=-1) - kept, response_mask)


def response_values(
    value_params, tokens, mask, response_len: int, cfg: ModelConfig, *, key=None, unroll=None
):
    """Critic value of the state before each response token: [B, P + R] -> [B, R] float32."""
    return model.scalar_fn(value_params, tokens, mask, cfg, key=key, unroll=unroll)[:, -response_len - 1 : -1]


def make_experience(
    state: train.TrainState,
    ref_params: Params,
    rollout: sampling.Rollout,
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
    r = rollout.response.shape[1]
    tokens, mask, rmask = rollout.tokens, rollout.mask, rollout.response_mask
    params = jax.lax.stop_gradient(state.params)
    # No gradient flows here: the forwards run as rolled layer scans, as fast as unrolled ones without a
    # backward and a quarter of the compiled code at 4 layers (model.forward's `unroll`).
    old_logprobs, tempered = response_logprobs(
        params["policy"], tokens, mask, r, cfg, sample_cfg=sample_cfg, unroll=False
    )
    filtering = bool(sample_cfg.top_k or sample_cfg.top_p < 1.0)
    if filtering and rl.filtered_logprobs:
        old_logprobs = ops.token_logprobs(sampling.truncate_logits(tempered, sample_cfg), rollout.response)
    # The reference is tempered but never filtered: its own top-k could exclude a sampled token (KL = inf).
    ref_logprobs, _ = response_logprobs(
        ref_params, tokens, mask, r, ref_cfg or cfg, sample_cfg=sample_cfg, unroll=False
    )
    raw_scores = scores.astype(jnp.float32)
    if rl.no_eos_penalty is not None:
        scores = rewards.no_eos_penalty(raw_scores, rollout.finished, rl.no_eos_penalty)
    else:
        scores = raw_scores
    # k1 in the reward (kl_penalty "reward"), or the score alone when the KL is a loss term; the k1
    # estimate is what the metrics and the adaptive controller read in both cases.
    in_reward = state.kl.kl_coef if rl.kl_penalty == "reward" else 0.0
    token_rewards, kl = losses.shaped_rewards(scores, old_logprobs, ref_logprobs, rmask, in_reward)
    if rl.whiten_rewards:
        token_rewards = ops.masked_whiten(token_rewards, rmask, shift_mean=False)
    old_values = jnp.zeros_like(old_logprobs)
    if rl.algo == "ppo":
        old_values = response_values(params["value"], tokens, mask, r, cfg, unroll=False)
        advantages, returns = losses.compute_gae(token_rewards, old_values, rmask, rl.gamma, rl.lam)
    elif rl.algo == "pg":
        advantages, returns = losses.compute_gae(token_rewards, old_values, rmask, rl.gamma, 1.0)
    else:  # grpo / rloo: one advantage per answer, from its group's sequence rewards
        b, k = scores.shape[0], rl.group_size
        if b % k:
            raise ValueError(f"rollout batch {b} is not a whole number of groups of group_size={k}")
        # The sequence reward: score - beta * sum_t k1 with the KL in the reward, else the score.
        seq_rewards = jnp.sum(token_rewards, axis=-1).reshape(b // k, k)
        if rl.algo == "grpo":
            group = losses.grpo_advantages(seq_rewards, scale_by_std=rl.grpo_scale_by_std)
        else:
            group = losses.rloo_advantages(seq_rewards)
        advantages = jnp.broadcast_to(group.reshape(b, 1), rmask.shape)
        returns = jnp.zeros_like(old_logprobs)
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
    if filtering:
        metrics["filter_kl"] = _filter_kl(tempered, sample_cfg, rmask)
    if rl.algo == "ppo":
        # 1 - Var(returns - values) / Var(returns) over the real tokens: 1 = a perfect critic, <= 0 = none.
        residual = ops.masked_var(returns - old_values, rmask)
        metrics["explained_variance"] = 1.0 - residual / jnp.maximum(ops.masked_var(returns, rmask), 1e-8)
    return exp, metrics


def _policy_loss(
    policy, mb: Experience, ptx, kl_coef, cfg: ModelConfig, rl: RLConfig, sample_cfg, key, scale=_UNIT
):
    """The minibatch loss terms of the policy's params: (PG or clipped PPO) [+ KL] [+ ptx] [- entropy].

    `scale` weighs the terms by what they average over ("agg": the policy and KL terms, "tok": the
    entropy, "ptx": the ptx term): 1 for a whole minibatch, a slice's share of it for a micro-batch
    (`_micro_batch_grads`). The metrics are the slice's own, unweighted.
    """
    r = mb.response_mask.shape[1]
    # Dropout only by explicit choice: old / reference logprobs were computed without it.
    k_pol = jax.random.split(key)[0] if key is not None and rl.dropout else None
    logprobs, logits = response_logprobs(
        policy, mb.tokens, mb.mask, r, cfg, key=k_pol, sample_cfg=sample_cfg, filtered=rl.filtered_logprobs
    )
    if rl.algo == "pg":
        loss, metrics = losses.pg_loss(logprobs, mb.advantages, mb.response_mask, aggregation=rl.loss_agg)
        metrics = {"policy_loss": loss, **{k: v for k, v in metrics.items() if k != "loss"}}
    else:
        pol, pol_m = losses.ppo_policy_loss(
            logprobs, mb.old_logprobs, mb.advantages, mb.response_mask, clip_eps=rl.clip_eps,
            aggregation=rl.loss_agg, ratio_level=rl.ratio_level,
        )  # fmt: skip
        loss = pol
        metrics = {k: pol_m[k] for k in ("clipfrac", "approx_kl", "ratio_max", "ratio_mean")}
        metrics["policy_loss"] = pol
    if rl.kl_penalty == "loss":
        kl_term, _ = losses.kl_loss(logprobs, mb.ref_logprobs, mb.response_mask, rl.kl_kind, rl.loss_agg)
        loss = loss + jax.lax.stop_gradient(kl_coef) * kl_term
        metrics["kl_loss"] = kl_term
    loss = scale["agg"] * loss
    if rl.ptx_coef:
        k_ptx = jax.random.fold_in(key, 2) if key is not None and rl.dropout else None
        ptx_loss, _ = train.lm_loss(policy, ptx, cfg, key=k_ptx)
        loss = loss + scale["ptx"] * rl.ptx_coef * ptx_loss
        metrics["ptx_loss"] = ptx_loss
    ent = ops.masked_mean(ops.entropy(logits), mb.response_mask)
    if rl.ent_coef:
        loss = loss - scale["tok"] * rl.ent_coef * ent
    return loss, {"entropy": ent, **metrics}


def _value_loss(value, mb: Experience, cfg: ModelConfig, rl: RLConfig, key, scale=_UNIT):
    """PPO's critic term of the minibatch loss, weighted: vf_coef x the clipped value loss (x the
    slice's share of the minibatch's tokens, `scale["tok"]`, for a micro-batch)."""
    k_val = jax.random.split(key)[1] if key is not None and rl.dropout else None
    values = response_values(value, mb.tokens, mb.mask, mb.response_mask.shape[1], cfg, key=k_val)
    vf, vf_m = losses.value_loss(
        values, mb.old_values, mb.returns, mb.response_mask, clip_eps=rl.value_clip_eps
    )
    return scale["tok"] * rl.vf_coef * vf, {"value_loss": vf, "value_clipfrac": vf_m["clipfrac"]}


def _minibatch_grads(
    params, mb: Experience, ptx, kl_coef, cfg: ModelConfig, rl: RLConfig, sample_cfg, key, scale=_UNIT
):
    """(loss, metrics, grads) of one minibatch: the policy's terms, then (PPO) the critic's.

    The loss is a sum of a term of the policy's params and one of the value's (they share no params),
    so each gradient is its own term's. The critic's forward and backward wait for the policy's
    gradient (its params read through a zero computed from that gradient's norm; XLA:CPU drops an
    `optimization_barrier`), so the two models' activations never live at the same time: HappyGPT's
    update needs 48 MB of XLA temporaries instead of 99, with bit-identical params after it.
    """
    (loss, metrics), g_policy = jax.value_and_grad(_policy_loss, has_aux=True)(
        params["policy"], mb, ptx, kl_coef, cfg, rl, sample_cfg, key, scale
    )
    grads = {"policy": g_policy}
    if rl.algo == "ppo":
        norm = optax.tree.norm(g_policy)
        zero = jnp.where(jnp.isfinite(norm), norm * 0.0, 0.0)
        value = jax.tree.map(lambda v: v + zero.astype(v.dtype), params["value"])
        (vf_term, vf_metrics), g_value = jax.value_and_grad(_value_loss, has_aux=True)(
            value, mb, cfg, rl, key, scale
        )
        grads = {"policy": g_policy, "value": g_value}
        loss = loss + vf_term
        metrics.update(vf_metrics)
    return loss, {"loss": loss, **metrics}, grads


def _metric_weights(rl: RLConfig) -> dict[str, str]:
    """How each update metric of a minibatch combines over its micro-batches: the `scale` key of the
    rows or tokens it averages over, or "max"."""
    return {
        "policy_loss": "agg", "kl_loss": "agg", "ptx_loss": "ptx", "entropy": "tok", "clipfrac": "tok",
        "approx_kl": "tok", "ratio_mean": "tok" if rl.ratio_level == "token" else "row", "ratio_max": "max",
        "advantage_mean": "tok", "value_loss": "tok", "value_clipfrac": "tok",
    }  # fmt: skip


def _micro_batch_grads(params, mb: Experience, ptx, kl_coef, cfg: ModelConfig, rl: RLConfig, sample_cfg, key):
    """`_minibatch_grads` of the whole minibatch, accumulated over `rl.micro_batches` slices of its rows
    run one after another (a `lax.scan`): the same loss, gradient and metrics (up to float rounding),
    with the activations of 1 / micro_batches of the rows alive at a time.

    Slice i holds rows i, i + n, i + 2n, ... (every device of a row-sharded batch keeps its share of
    each slice). Each term is weighted by the slice's share of what the whole minibatch's term averages
    over: its real tokens for token means (and the "token_mean" aggregation), its non-empty rows for
    sequence means, its rows for "constant" (a fixed B x R normaliser), its ptx target tokens for the
    ptx loss. With dropout each slice draws its own masks (key folded with the slice's index).
    """
    n = rl.micro_batches

    def slices(x):  # [B, ...] -> [n, B / n, ...], slice i = rows i::n
        return jnp.swapaxes(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 0, 1)

    def shares(m: Experience, p) -> dict:
        tok = jnp.sum(m.response_mask, dtype=jnp.float32)
        rows = jnp.sum(jnp.any(m.response_mask, axis=-1), dtype=jnp.float32)
        out = {"tok": tok, "row": rows, "all_rows": jnp.float32(m.response_mask.shape[0])}
        if p is not None:
            out["ptx"] = jnp.sum(p.loss_mask[:, 1:] & p.mask[:, 1:], dtype=jnp.float32)
        return out

    total = shares(mb, ptx)
    agg = {"token_mean": "tok", "constant": "all_rows"}.get(rl.loss_agg, "row")
    how = _metric_weights(rl)
    xs = (jax.tree.map(slices, mb), None if ptx is None else jax.tree.map(slices, ptx), jnp.arange(n))

    def one_slice(acc, xs):
        m, p, i = xs
        part = shares(m, p)
        weight = {k: part[k] / jnp.maximum(total[k], 1.0) for k in part}
        weight["agg"] = weight[agg]
        scale = {"agg": weight["agg"], "tok": weight["tok"], "ptx": weight.get("ptx", 1.0)}
        k = jax.random.fold_in(key, i) if key is not None else None
        loss, metrics, grads = _minibatch_grads(params, m, p, kl_coef, cfg, rl, sample_cfg, k, scale)
        unknown = set(metrics) - set(how) - {"loss"}
        if unknown:  # a new metric must say how it combines, or it would be silently wrong
            raise NotImplementedError(f"micro_batches: no combination rule for metrics {sorted(unknown)}")
        a_loss, a_metrics, a_grads = acc
        for name, v in metrics.items():
            if name == "loss":
                a_metrics[name] = a_metrics[name] + v
            elif how[name] == "max":
                a_metrics[name] = jnp.maximum(a_metrics[name], v)
            else:
                a_metrics[name] = a_metrics[name] + weight[how[name]] * v
        return (a_loss + loss, a_metrics, jax.tree.map(jnp.add, a_grads, grads)), None

    # The carry's zeros: one slice's outputs, with -inf for maxima.
    m0, p0, _ = jax.tree.map(lambda x: x[0], xs)
    shapes = jax.eval_shape(
        lambda m, p: _minibatch_grads(params, m, p, kl_coef, cfg, rl, sample_cfg, key), m0, p0
    )
    init = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    init[1].update({k: jnp.full((), -jnp.inf, init[1][k].dtype) for k in init[1] if how.get(k) == "max"})
    (loss, metrics, grads), _ = jax.lax.scan(one_slice, init, xs)
    return loss, metrics, grads


def make_rl_step(
    cfg: ModelConfig, tx: optax.GradientTransformation, rl: RLConfig, *, sample_cfg: SampleConfig
) -> Callable:
    """step(state, experience, *, key) -> (state, metrics): PG = one update on the whole buffer;
    PPO = `epochs` shuffled passes of `minibatches` updates, then the KL controller update.
    `sample_cfg` is the config the experience was sampled with (see `make_experience`)."""
    _check_sample_cfg(sample_cfg, rl)

    def update(state, mb, ptx, key):
        grads_fn = _micro_batch_grads if rl.micro_batches > 1 else _minibatch_grads
        loss, metrics, grads = grads_fn(state.params, mb, ptx, state.kl.kl_coef, cfg, rl, sample_cfg, key)
        state, opt_metrics = train.apply_gradients(state, grads, loss, tx)
        return state, {**metrics, **opt_metrics}

    def step(state: train.TrainState, exp: Experience, *, key, ptx: train.LMBatch | None = None):
        _check_ptx(rl, ptx)
        b = exp.tokens.shape[0]
        check_batch_split(b, rl, ptx)
        if rl.algo == "pg":
            state, metrics = update(state, exp, ptx, jax.random.fold_in(key, 0))
        else:
            state, metrics = train.run_epochs(
                lambda s, mb, k: update(s, mb, ptx, k), state, exp, key=key, epochs=rl.epochs,
                minibatches=rl.minibatches,
            )  # fmt: skip
            metrics = train.mean_metrics(metrics)
        seq_kl = jnp.mean(jnp.sum(exp.kl, axis=-1))
        state = state.replace(kl=losses.update_kl_controller(state.kl, seq_kl, b))
        return state, metrics

    return step


def make_learn(
    cfg: ModelConfig,
    tx: optax.GradientTransformation,
    rl: RLConfig,
    ref_cfg: ModelConfig | None = None,
    *,
    sample_cfg: SampleConfig,
) -> Callable:
    """learn(state, ref_params, rollout, scores, *, key, ptx=None) -> (state, metrics): experience + update.

    `sample_cfg` is the config the rollouts are sampled with: its temperature (and, with
    `rl.filtered_logprobs`, its top-k / top-p) defines the policy that is scored and optimised.
    Non-finite scores are not trained on: the update is skipped and metrics["finite"] is 0.
    """
    rl_step = make_rl_step(cfg, tx, rl, sample_cfg=sample_cfg)

    def learn(state, ref_params, rollout, scores, *, key, ptx=None):
        _check_ptx(rl, ptx)
        check_batch_split(rollout.tokens.shape[0], rl, ptx)  # before any work on the rollout
        exp, exp_metrics = make_experience(
            state, ref_params, rollout, scores, cfg, rl, ref_cfg, sample_cfg=sample_cfg
        )
        new_state, metrics = rl_step(state, exp, key=key, ptx=ptx)
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
    learn = make_learn(cfg, tx, rl, ref_cfg, sample_cfg=sample_cfg)

    def iteration(state, ref_params, prompt, prompt_mask, *, key, ptx=None):
        k_sample, k_learn = jax.random.split(key)
        rollout = sampling.sample_fn(state.params["policy"], prompt, prompt_mask, cfg, sample_cfg, k_sample)
        scores = reward_fn(rollout)
        state, metrics = learn(state, ref_params, rollout, scores, key=k_learn, ptx=ptx)
        return state, metrics, rollout

    return iteration
