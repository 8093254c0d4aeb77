"""Preference optimisation on pairs: DPO / IPO against a frozen reference, REBEL's regression onto reward
differences against the policy that sampled, and passes over a fixed pair set."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from jaxrlhf import losses
from jaxrlhf.models import ModelConfig
from jaxrlhf.models.transformer import answer_logprobs
from jaxrlhf.rollout.pairs import PrefBatch
from jaxrlhf.train.rl_config import PAIR_ALGOS
from jaxrlhf.train.state import StepFn, TrainState, mean_metrics, run_epochs, update

ALGOS = PAIR_ALGOS  # the algorithms make_pair_step optimises (rl_config)


def pair_logprobs(
    params, batch: PrefBatch, cfg: ModelConfig, *, key=None, temperature: float = 1.0
) -> jax.Array:
    """Policy sequence logprobs of both answers of every pair at `temperature`: [B, 2]."""
    b, _, t = batch.tokens.shape
    flat = [x.reshape(2 * b, t) for x in (batch.tokens, batch.mask, batch.loss_mask)]
    return answer_logprobs(params, *flat, cfg, key=key, temperature=temperature).reshape(b, 2)


def dpo_loss_fn(
    cfg: ModelConfig,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    average_logprobs: bool = False,
    dropout: bool = False,
    temperature: float = 1.0,
) -> Callable:
    """loss_fn(params, PrefBatch, key) -> (loss, metrics): DPO (loss_type "sigmoid") or IPO ("ipo") against
    the reference logprobs in the batch.

    `temperature`: the policy's logprobs are those of logits / temperature; the batch's reference logprobs
    must be at the same temperature (online DPO on answers sampled at T: the sampler's policy).

    `average_logprobs`: use each answer's per-token mean logprob (policy and reference, both divided by
    the answer's token count) instead of the sum; TRL does so for IPO, the length-normalised form.
    `dropout`: run the policy with the model config's dropout (off by default: the reference logprobs
    are computed without it, so with it the implicit reward margin is off at the first step; TRL and the
    REBEL code update without dropout)."""

    def loss_fn(params, batch: PrefBatch, key):
        lp = pair_logprobs(
            params, batch, cfg, key=key if dropout else None, temperature=temperature
        )  # [B, 2]
        ref = batch.ref_logprobs
        if average_logprobs:
            # The tokens answer_logprobs sums over: targets 1..T-1 that are answer tokens.
            count = jnp.sum(batch.loss_mask[..., 1:] & batch.mask[..., 1:], axis=-1)  # [B, 2]
            count = jnp.maximum(count, 1).astype(jnp.float32)
            lp, ref = lp / count, ref / count
        return losses.dpo_loss(
            lp[:, 0],
            lp[:, 1],
            ref[:, 0],
            ref[:, 1],
            beta=beta,
            loss_type=loss_type,
            label_smoothing=label_smoothing,
            mask=batch.pair_mask,
        )

    return loss_fn


def make_dpo_step(cfg: ModelConfig, tx: optax.GradientTransformation, **options) -> StepFn:
    """step(state, PrefBatch, *, key) -> (state, metrics): one DPO / IPO update (`dpo_loss_fn`'s options)."""
    loss_fn = dpo_loss_fn(cfg, **options)

    def step(state: TrainState, batch: PrefBatch, *, key=None):
        return update(state, tx, loss_fn, batch, key)

    return step


def make_rebel_step(
    cfg: ModelConfig,
    tx: optax.GradientTransformation,
    *,
    eta: float = 1.0,
    epochs: int = 4,
    minibatches: int = 1,
    dropout: bool = False,
    temperature: float = 1.0,
) -> StepFn:
    """REBEL's update on one fixed pair set (Gao et al. 2024, "REBEL: Reinforcement Learning via Regressing
    Relative Rewards", Algorithm 1): regress (1/eta)[log pi/pi_t (y) - log pi/pi_t (y')] onto r(y) - r(y')
    (`losses.rebel_loss`, the paper's scale) with `epochs` passes over the pairs, each `minibatches`
    updates on a fresh shuffle, in one `lax.scan` (`run_epochs`).

    The batch's `ref_logprobs` must be pi_t's: the sequence logprobs of the policy that sampled the pairs,
    i.e. of `state.params` as this step receives them, computed once per pair set (e.g.
    `rollout.rollout_logprobs(state.params, rollout, cfg)`), never the SFT reference. The first update
    then sees a zero predicted difference; later ones see log pi/pi_t move, so the passes converge to the
    regression's minimiser, where log pi/pi_t (y) - log pi/pi_t (y') = eta (r(y) - r(y')) on every pair:
    pi_{t+1} proportional to pi_t exp(eta r), and a larger eta moves further from pi_t. Defaults are the
    REBEL authors' (ZhaolinGao/REBEL `src/tldr/rebel.py`: eta 1, `noptepochs` 4, one optimizer step per
    pass over the whole local batch). With epochs = minibatches = 1 the step is one gradient step at
    pi = pi_t, where eta only scales a gradient that Adam normalises away.

    An update on a minibatch without a real pair (`pair_mask` all False) is skipped, so that Adam's
    momentum does not move the policy on no data. `key` shuffles the pairs (required for minibatches > 1)
    and drives dropout. `dropout`: as in `make_dpo_step` (off by default, so pi = pi_t exactly at the first
    update). `temperature`: the sampling temperature of the pairs; pi and pi_t are both the policies at it
    (logits / T, as the REBEL authors' code), so the fixed point is pi_t exp(eta r) at that temperature
    (with temperature-1 logprobs on answers sampled at T it would be pi_t exp(eta r / T)).

    Metrics: the means over the epochs x minibatches updates, "finite" their minimum, and "initial_loss" /
    "final_loss": the mean loss of the first / last pass (each minibatch's loss before its update).
    """
    for name, value in (("epochs", epochs), ("minibatches", minibatches)):
        if value < 1:
            raise ValueError(f"{name}={value}; it must be >= 1.")

    def loss_fn(params, batch: PrefBatch, key):
        lp = pair_logprobs(params, batch, cfg, key=key if dropout else None, temperature=temperature)
        return losses.rebel_loss(
            lp[:, 0],
            batch.ref_logprobs[:, 0],
            lp[:, 1],
            batch.ref_logprobs[:, 1],
            batch.rewards[:, 0],
            batch.rewards[:, 1],
            eta=eta,
            pair_mask=batch.pair_mask,
        )

    return pair_passes_step(loss_fn, tx, epochs=epochs, minibatches=minibatches)


def pair_passes_step(
    loss_fn: Callable, tx: optax.GradientTransformation, *, epochs: int, minibatches: int
) -> StepFn:
    """step(state, PrefBatch, *, key) making `epochs` passes of `minibatches` updates of
    `loss_fn(params, minibatch, key) -> (loss, metrics)` over a fixed pair set (`run_epochs`). An update on a
    minibatch without a real pair (`pair_mask` all False) leaves the state as it was, so that Adam's
    momentum does not move the policy on no data. Metrics: the means over the updates, "finite" their
    minimum, and "initial_loss" / "final_loss": the mean loss of the first / last pass (each minibatch's
    loss before its update)."""

    one_update = functools.partial(update, tx=tx, loss_fn=loss_fn, applies=lambda mb: jnp.any(mb.pair_mask))

    def step(state: TrainState, batch: PrefBatch, *, key=None):
        state, metrics = run_epochs(one_update, state, batch, key=key, epochs=epochs, minibatches=minibatches)
        initial, final = jnp.mean(metrics["loss"][0]), jnp.mean(metrics["loss"][-1])
        return state, {**mean_metrics(metrics), "initial_loss": initial, "final_loss": final}

    return step


def make_pair_step(
    cfg: ModelConfig,
    tx: optax.GradientTransformation,
    *,
    algo: str,
    eta: float = 1.0,
    beta: float = 0.1,
    epochs: int = 1,
    minibatches: int = 1,
    average_logprobs: bool | None = None,
    temperature: float = 1.0,
) -> StepFn:
    """step(state, PrefBatch, *, key) of `algo`: REBEL's `make_rebel_step`, or DPO / IPO updates in the same
    `epochs` x `minibatches` passes over the pair set (`pair_passes_step`). IPO averages each answer's
    logprobs over its tokens by default, as TRL does (`average_logprobs`). `temperature`: the pairs'
    sampling temperature, at which the policy's logprobs are taken (the batch's reference ones must be)."""
    if algo not in ALGOS:
        raise ValueError(f"algo={algo!r}; use one of {', '.join(ALGOS)}")
    if algo == "rebel":
        return make_rebel_step(
            cfg, tx, eta=eta, epochs=epochs, minibatches=minibatches, temperature=temperature
        )
    average = algo == "ipo" if average_logprobs is None else average_logprobs
    loss_fn = dpo_loss_fn(cfg, beta=beta, loss_type="sigmoid" if algo == "dpo" else "ipo",
                          average_logprobs=average, temperature=temperature)  # fmt: skip
    return pair_passes_step(loss_fn, tx, epochs=epochs, minibatches=minibatches)
