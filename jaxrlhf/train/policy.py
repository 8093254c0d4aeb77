"""Policy optimisation (PPO, PG, GRPO, RLOO, REINFORCE++; CISPO's objective): rollout -> experience -> update.

One RL iteration is three pure functions, each jittable on its own or composed into one program:

  rollout = rollout.sample_fn(policy, prompt, prompt_mask, ...)          (sample)
  scores  = reward_fn(rollout)                                            (host: VADER on decoded text;
                                                                           or a JAX function: fused)
  state, metrics = learn(state, ref_params, rollout, scores, key=...)    (experience + update)

`learn` is `experience.make_experience` (old / reference logprobs, values, KL-shaped rewards,
advantages) then the update: `epochs` shuffled passes of `minibatches` clipped updates (one for PG), each
minibatch's gradient the policy's loss terms (`policy_loss`) then the critic's (`value_loss`), optionally
accumulated over micro-batches (`micro_batching`).

RL params are {"policy": GPT params} for policy gradient and {"policy": ..., "value": scalar model} for
PPO (the critic is a separate model, as in InstructGPT, initialised from the reward model or the SFT
model). The frozen reference is an argument, never part of the trained state.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxrlhf import losses, xla_cpu
from jaxrlhf.models import ModelConfig
from jaxrlhf.rollout import sampler
from jaxrlhf.rollout.sampler import Rollout, SampleConfig
from jaxrlhf.train import micro_batching
from jaxrlhf.train.experience import Experience, make_experience, response_logprobs, response_values
from jaxrlhf.train.lm import LMBatch, lm_loss
from jaxrlhf.train.micro_batching import UNIT
from jaxrlhf.train.rl_config import RLConfig
from jaxrlhf.train.state import TrainState, apply_gradients, init_train_state, mean_metrics, run_epochs

Params = Any


def _learnable(rl: RLConfig) -> RLConfig:
    """`rl` resolved, refused for the preference algorithms (their update is `train.make_pair_step`)."""
    if rl.pair_algo:
        raise ValueError(f"algo={rl.algo!r} learns from pairs: use train.make_pair_step, not make_learn")
    return rl.resolved()


def init_rl_params(policy: Params, value: Params | None, rl: RLConfig) -> Params:
    """{"policy"} for PG, {"policy", "value"} for PPO (value is a scalar model {"gpt", "head"})."""
    if rl.algo == "ppo":
        if value is None:
            raise ValueError("PPO needs value params: pass a scalar model (e.g. from the reward model).")
        return {"policy": policy, "value": value}
    return {"policy": policy}


def init_rl_state(params: Params, tx: optax.GradientTransformation, rl: RLConfig) -> TrainState:
    rl = rl.resolved()
    kl = losses.init_kl_controller(rl.kl_coef or 0.0, rl.kl_target, rl.kl_horizon)
    return init_train_state(params, tx, kl=kl)


def _check_sample_cfg(sample_cfg: SampleConfig, rl: RLConfig) -> None:
    if not isinstance(sample_cfg, SampleConfig):
        raise TypeError(
            f"sample_cfg is a {type(sample_cfg).__name__}: pass the SampleConfig the rollouts are drawn "
            "with (its temperature and filters define the policy that is optimised)"
        )
    if sample_cfg.greedy:
        raise ValueError("temperature 0 (greedy) has no stochastic policy to optimise; sample at T > 0")
    if rl.filtered_logprobs and not sample_cfg.filters:
        raise ValueError("filtered_logprobs does nothing without top_k or top_p in the SampleConfig; drop it")


def _check_ptx(rl: RLConfig, ptx) -> None:
    if rl.ptx_coef and ptx is None:
        raise ValueError(f"ptx_coef={rl.ptx_coef} needs a batch of pretraining text: pass ptx=LMBatch(...)")
    if ptx is not None and not rl.ptx_coef:
        raise ValueError("a ptx batch was passed but ptx_coef is 0: set RLConfig.ptx_coef or drop it")


def check_batch_split(batch_size: int, rl: RLConfig, ptx=None) -> None:
    """Raises ValueError unless `batch_size` rollouts split into `rl.minibatches` updates (one for pg) of
    rows that `rl.micro_batches` divides, and the ptx batch's rows too."""
    rl = rl.resolved()
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


def _policy_loss(
    policy, mb: Experience, ptx, kl_coef, cfg: ModelConfig, rl: RLConfig, sample_cfg, key, scale=UNIT
):
    """The minibatch loss terms of the policy's params: (PG or clipped PPO) [+ KL] [+ ptx] [- entropy].

    `scale` weighs the terms by what they average over ("agg": the policy and KL terms, "tok": the
    entropy, "ptx": the ptx term): 1 for a whole minibatch, a slice's share of it for a micro-batch
    (`micro_batching.accumulate`). The metrics are the slice's own, unweighted.
    """
    rl = rl.resolved()
    r = mb.response_mask.shape[1]
    # Dropout only by explicit choice: old / reference logprobs were computed without it.
    k_pol = jax.random.split(key)[0] if key is not None and rl.dropout else None
    logprobs, logits = response_logprobs(
        policy, mb.tokens, mb.mask, r, cfg, key=k_pol, sample_cfg=sample_cfg, filtered=rl.filtered_logprobs
    )
    if rl.algo == "pg":
        loss, metrics = losses.pg_loss(logprobs, mb.advantages, mb.response_mask, aggregation=rl.loss_agg)
        metrics = {"policy_loss": loss, **{k: v for k, v in metrics.items() if k != "loss"}}
    elif rl.objective == "cispo":
        cap = {} if rl.clip_eps_high is None else {"clip_eps_high": rl.clip_eps_high}  # else the loss's 4.0
        pol, pol_m = losses.cispo_loss(
            logprobs, mb.old_logprobs, mb.advantages, mb.response_mask, aggregation=rl.loss_agg, **cap
        )
        loss = pol
        metrics = {k: pol_m[k] for k in ("clipfrac", "ratio_max", "ratio_mean")}
        metrics["policy_loss"] = pol
    else:
        pol, pol_m = losses.ppo_policy_loss(
            logprobs, mb.old_logprobs, mb.advantages, mb.response_mask, clip_eps=rl.clip_eps,
            clip_eps_high=rl.clip_eps_high, aggregation=rl.loss_agg, ratio_level=rl.ratio_level,
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
        ptx_loss, _ = lm_loss(policy, ptx, cfg, key=k_ptx)
        loss = loss + scale["ptx"] * rl.ptx_coef * ptx_loss
        metrics["ptx_loss"] = ptx_loss
    ent_loss, ent_metrics = losses.entropy_bonus(logits, mb.response_mask)
    if rl.ent_coef:
        loss = loss + scale["tok"] * rl.ent_coef * ent_loss
    return loss, {"entropy": ent_metrics["entropy"], **metrics}


def _value_loss(value, mb: Experience, cfg: ModelConfig, rl: RLConfig, key, scale=micro_batching.UNIT):
    """PPO's critic term of the minibatch loss, weighted: vf_coef x the clipped value loss (x the
    slice's share of the minibatch's tokens, `scale["tok"]`, for a micro-batch)."""
    k_val = jax.random.split(key)[1] if key is not None and rl.dropout else None
    values = response_values(value, mb.tokens, mb.mask, mb.response_mask.shape[1], cfg, key=k_val)
    vf, vf_m = losses.value_loss(
        values, mb.old_values, mb.returns, mb.response_mask, clip_eps=rl.value_clip_eps
    )
    return scale["tok"] * rl.vf_coef * vf, {"value_loss": vf, "value_clipfrac": vf_m["clipfrac"]}


def _minibatch_grads(
    params, kl_coef, cfg: ModelConfig, rl: RLConfig, sample_cfg, mb: Experience, ptx, key, scale=UNIT
):
    """(loss, metrics, grads) of one minibatch: the policy's terms, then (PPO) the critic's.

    The loss is a sum of a term of the policy's params and one of the value's (they share no params),
    so each gradient is its own term's. The critic's forward and backward wait for the policy's
    gradient (`xla_cpu.after`), so the two models' activations never live at the same time.
    """
    (loss, metrics), g_policy = jax.value_and_grad(_policy_loss, has_aux=True)(
        params["policy"], mb, ptx, kl_coef, cfg, rl, sample_cfg, key, scale
    )
    grads = {"policy": g_policy}
    if rl.algo == "ppo":
        value = xla_cpu.after(params["value"], optax.tree.norm(g_policy))
        (vf_term, vf_metrics), g_value = jax.value_and_grad(_value_loss, has_aux=True)(
            value, mb, cfg, rl, key, scale
        )
        grads = {"policy": g_policy, "value": g_value}
        loss = loss + vf_term
        metrics.update(vf_metrics)
    return loss, {"loss": loss, **metrics}, grads


def make_rl_step(
    cfg: ModelConfig, tx: optax.GradientTransformation, rl: RLConfig, *, sample_cfg: SampleConfig
) -> Callable:
    """step(state, experience, *, key) -> (state, metrics): PG = one update on the whole buffer;
    PPO = `epochs` shuffled passes of `minibatches` updates, then the KL controller update.
    `sample_cfg` is the config the experience was sampled with (see `make_experience`)."""
    rl = _learnable(rl)
    _check_sample_cfg(sample_cfg, rl)

    def update(state, batch, key, ptx):
        grads_fn = functools.partial(_minibatch_grads, state.params, state.kl.kl_coef, cfg, rl, sample_cfg)
        if rl.micro_batches > 1:
            loss, metrics, grads = micro_batching.accumulate(
                grads_fn, batch, ptx, micro_batches=rl.micro_batches, loss_agg=rl.loss_agg,
                ratio_level=rl.ratio_level, key=key,
            )  # fmt: skip
        else:
            loss, metrics, grads = grads_fn(batch, ptx, key)
        state, opt_metrics = apply_gradients(state, grads, loss, tx)
        return state, {**metrics, **opt_metrics}

    def step(state: TrainState, exp: Experience, *, key, ptx: LMBatch | None = None):
        _check_ptx(rl, ptx)
        b = exp.tokens.shape[0]
        check_batch_split(b, rl, ptx)
        if rl.algo == "pg":
            state, metrics = update(state, exp, jax.random.fold_in(key, 0), ptx)
        else:
            state, metrics = run_epochs(functools.partial(update, ptx=ptx), state, exp, key=key,
                                        epochs=rl.epochs, minibatches=rl.minibatches)  # fmt: skip
            metrics = mean_metrics(metrics)
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
    rl = _learnable(rl)
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
    reward_fn: Callable[[Rollout], jax.Array],
    ref_cfg: ModelConfig | None = None,
) -> Callable:
    """iteration(state, ref_params, prompt, prompt_mask, *, key) -> (state, metrics, rollout) as one
    program (sample, score, experience, update) for a JAX `reward_fn(rollout) -> [B]` (e.g. a learned
    reward model); jit it once with parallel.jit_step-like shardings or plain jax.jit."""
    learn = make_learn(cfg, tx, rl, ref_cfg, sample_cfg=sample_cfg)

    def iteration(state, ref_params, prompt, prompt_mask, *, key, ptx=None):
        k_sample, k_learn = jax.random.split(key)
        rollout = sampler.sample_fn(state.params["policy"], prompt, prompt_mask, cfg, sample_cfg, k_sample)
        scores = reward_fn(rollout)
        state, metrics = learn(state, ref_params, rollout, scores, key=k_learn, ptx=ptx)
        return state, metrics, rollout

    return iteration
