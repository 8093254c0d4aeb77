"""Train state, optimizer and the supervised / preference train steps.

Every factory returns an *un-jitted* `step(state, batch, *, key) -> (state, metrics)` written for the
whole (global) batch; `parallel.jit_step` compiles it once for a mesh. Because the step sees the global
batch, masked means are over every real token of the batch whatever the device count, and the same
function runs on 1 CPU, 8 fake CPU devices or a TPU pod (see parallel.py for why this is jit with
shardings; the losses also run inside a user's shard_map with `axis_name=`).

A step never trains on a non-finite loss or gradient: the update is skipped (params and optimizer state
unchanged) and `metrics["finite"]` is 0, which the driver turns into a one-line error.

The RL steps (policy gradient, PPO) and the rollout live in rl.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import optax
import optax.contrib

from jaxrlhf import losses, model, ops
from jaxrlhf.config import ModelConfig, check_at_least

Params = Any
StepFn = Callable[..., tuple[Any, dict]]


# ------------------------------------------------------------------------------------------ state


@flax.struct.dataclass
class TrainState:
    """What a stage trains and checkpoints.

    Attributes:
      step: [] int32 number of updates applied.
      params: the trained params: GPT params, a scalar model {"gpt", "head"}, or for PPO
        {"policy": GPT params, "value": scalar model}.
      opt_state: the optax state of `params`.
      kl: KL-controller state (RL stages), else None.
    """

    step: jax.Array
    params: Params
    opt_state: Any
    kl: losses.KLControllerState | None = None


def init_train_state(params: Params, tx: optax.GradientTransformation, kl=None) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), kl=kl)


MU_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """AdamW (or Muon) with warmup and decay (minGPT / GPT-2 settings by default).

    Attributes:
      optimizer: "adamw", or "muon": Muon (Jordan et al. 2024; optax.contrib.muon: Nesterov momentum
        0.95, its update orthogonalised by 5 Newton-Schulz steps) on the matrices ("kernel" leaves; a
        stacked [layer, in, out] kernel is one matrix per layer), AdamW at `lr` on the rest (embeddings,
        biases, layer norms). On HappyGPT's pretraining it reaches AdamW's validation loss in 0.4x the
        steps (README, scripts/bench_pretrain_levers.py).
      muon_lr: Muon's peak learning rate on the matrices (same warmup / decay schedule as `lr`); None
        = 0.02 under muon. Refused with adamw.
      lr: peak learning rate (AdamW; under muon, of the non-matrix leaves).
      warmup_steps: linear warmup from 0 to `lr`.
      total_steps: length of the schedule (warmup included); None = constant after warmup.
      schedule: "cosine", "linear" or "constant" decay after warmup.
      min_lr_ratio: final learning rate as a fraction of `lr`.
      b1, b2, eps: Adam moments (betas 0.9 / 0.95 as in GPT-3 and minGPT).
      weight_decay: decoupled weight decay, applied to matrices ("kernel" leaves) only: not to biases,
        layer norms or embeddings (under muon: Muon's decay, times `muon_lr`).
      grad_clip: global-norm clipping threshold; 0 disables it.
      mu_dtype: dtype Adam's first moment is stored in (optax.adamw's mu_dtype): None = the params'
        (float32 in the pipelines), "float32", or "bfloat16": 2 bytes per param less; each update is
        still computed in float32 from the stored moment and the gradient. Only the first moment: a bf16
        second moment stalls for b2 near 1 (0.999 moves it by 0.1% a step, under bf16's 0.4% spacing),
        and bf16 params would round away a 3e-7 step (1e-5 of a 0.02 weight).
    """

    optimizer: str = "adamw"
    muon_lr: float | None = None
    lr: float = 3e-4
    warmup_steps: int = 0
    total_steps: int | None = None
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    mu_dtype: str | None = None

    def __post_init__(self):
        if self.optimizer not in ("adamw", "muon"):
            raise ValueError(f"optimizer={self.optimizer!r}; use 'adamw' or 'muon'")
        if self.muon_lr is not None and self.optimizer != "muon":
            raise ValueError(
                f"muon_lr={self.muon_lr}; it does nothing with optimizer 'adamw': drop it or use muon"
            )
        if self.muon_lr is not None and not self.muon_lr > 0:
            raise ValueError(f"muon_lr={self.muon_lr}; use a positive learning rate")
        if self.mu_dtype is not None and self.mu_dtype not in MU_DTYPES:
            raise ValueError(
                f"mu_dtype={self.mu_dtype!r}; use none (the params' dtype) or one of {', '.join(MU_DTYPES)}"
            )
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"schedule={self.schedule!r}; use 'cosine', 'linear' or 'constant'.")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr}; use a positive learning rate")
        check_at_least(self, 0, "warmup_steps", "weight_decay", "grad_clip")
        check_at_least(self, 1, "total_steps")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio={self.min_lr_ratio}; use a fraction in [0, 1] of lr")
        for name in ("b1", "b2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name}={getattr(self, name)}; use a decay rate in [0, 1)")
        if not self.eps > 0:
            raise ValueError(f"eps={self.eps}; use a small positive number (Adam's default 1e-8)")


def learning_rate_schedule(cfg: OptimConfig) -> optax.Schedule:
    """Linear warmup to cfg.lr, then cosine / linear decay to cfg.lr * min_lr_ratio at total_steps."""
    end = cfg.lr * cfg.min_lr_ratio
    warm = max(cfg.warmup_steps, 0)
    if cfg.total_steps is None or cfg.schedule == "constant":
        decay = optax.constant_schedule(cfg.lr)
    else:
        n = max(cfg.total_steps - warm, 1)
        if cfg.schedule == "cosine":
            decay = optax.cosine_decay_schedule(cfg.lr, n, alpha=cfg.min_lr_ratio)
        else:
            decay = optax.linear_schedule(cfg.lr, end, n)
    if warm == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warm), decay], [warm])


def decay_mask(params: Params) -> Params:
    """True on matrices (leaves named "kernel"), False on biases, layer norms and embeddings."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) == "kernel", params
    )


def muon_dimensions(params: Params) -> Params:
    """Muon's matrix axes for each "kernel" leaf (the last two: in, out; leading axes such as a stacked
    layer axis are batch axes), None (AdamW) for the rest."""

    def dims(path, leaf):
        if getattr(path[-1], "key", None) != "kernel" or leaf.ndim < 2:
            return None
        return optax.contrib.MuonDimensionNumbers(reduction_axis=leaf.ndim - 2, output_axis=leaf.ndim - 1)

    return jax.tree_util.tree_map_with_path(dims, params)


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW with decay on matrices only (or Muon on the matrices and AdamW
    on the rest), on the warmup/decay schedule, the first moment stored in `cfg.mu_dtype`."""
    parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
    mu_dtype = None if cfg.mu_dtype is None else jnp.dtype(cfg.mu_dtype)
    if cfg.optimizer == "muon":
        muon_lr = 0.02 if cfg.muon_lr is None else cfg.muon_lr
        parts.append(
            optax.contrib.muon(
                learning_rate_schedule(dataclasses.replace(cfg, lr=muon_lr)),
                adam_learning_rate=learning_rate_schedule(cfg),
                adam_b1=cfg.b1,
                adam_b2=cfg.b2,
                eps=cfg.eps,
                weight_decay=cfg.weight_decay,  # Muon's part holds only the kernels
                mu_dtype=mu_dtype,
                muon_weight_dimension_numbers=muon_dimensions,
            )
        )
        return optax.chain(*parts)
    parts.append(
        optax.adamw(
            learning_rate_schedule(cfg),
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mu_dtype=mu_dtype,
            mask=decay_mask,
        )
    )
    return optax.chain(*parts)


def make_per_model_optimizer(optims: Mapping[str, OptimConfig]) -> optax.GradientTransformation:
    """A `make_optimizer` of its own for each top-level entry of the params, e.g. {"policy", "value"}.

    Each model clips its own gradient norm and has its own schedule and Adam state, as in InstructGPT
    and lm-human-preferences: one global-norm clip over policy and value together would let the value
    loss's large early gradients scale the policy's step down by orders of magnitude. Entries of
    `optims` that the params lack are ignored (e.g. "value" for policy gradient).
    """

    def labels(params):
        unknown = sorted(set(params) - set(optims))
        if unknown:
            raise ValueError(f"no optimizer for params {unknown}: give make_per_model_optimizer one each")
        return {name: jax.tree.map(lambda _, n=name: n, tree) for name, tree in params.items()}

    return optax.multi_transform({name: make_optimizer(c) for name, c in optims.items()}, labels)


def apply_gradients(
    state: TrainState, grads: Params, loss: jax.Array, tx: optax.GradientTransformation
) -> tuple[TrainState, dict]:
    """One optimizer update, skipped (state unchanged) if the loss or the gradients are not finite."""
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
    new_state = state.replace(
        step=state.step + finite.astype(jnp.int32),
        params=keep(new_params, state.params),
        opt_state=keep(new_opt_state, state.opt_state),
    )
    return new_state, {"grad_norm": grad_norm, "finite": finite.astype(jnp.float32)}


def _step_key(key: jax.Array | None, n: int = 1):
    if key is None:
        return (None,) * n if n > 1 else None
    return tuple(jax.random.split(key, n)) if n > 1 else key


# ------------------------------------------------------------------------------------------ batches


class LMBatch(NamedTuple):
    """Language-modelling batch (pretraining, SFT).

    Attributes:
      tokens: [B, T] int32 ids (T <= block_size + 1: the model reads the first T - 1).
      mask: [B, T] bool, True = real token.
      loss_mask: [B, T] bool, True where token t is a target (predicted from tokens < t); for SFT the
        response tokens only, for pretraining `mask`. Position 0 is never a target.
    """

    tokens: jax.Array
    mask: jax.Array
    loss_mask: jax.Array


class RankBatch(NamedTuple):
    """K ranked answers per prompt for a reward model (K = 2: chosen, rejected).

    Attributes:
      tokens: [B, K, T] prompt + answer ids, answers ordered best first.
      mask: [B, K, T] bool.
      rank_mask: [B, K] bool, True = a real answer.
    """

    tokens: jax.Array
    mask: jax.Array
    rank_mask: jax.Array


class PrefBatch(NamedTuple):
    """Preference pairs for DPO and REBEL; index 0 of axis 1 is the chosen (better) answer.

    Attributes:
      tokens: [B, 2, T] prompt + answer ids.
      mask: [B, 2, T] bool, True = real token.
      loss_mask: [B, 2, T] bool, True on answer tokens (the tokens whose logprobs count).
      ref_logprobs: [B, 2] sequence logprobs of the answers under the reference policy (DPO) or the
        policy that generated them (REBEL's pi_t).
      rewards: [B, 2] rewards of the answers (REBEL; ignored by DPO).
      pair_mask: [B] bool, True = a real pair.
    """

    tokens: jax.Array
    mask: jax.Array
    loss_mask: jax.Array
    ref_logprobs: jax.Array
    rewards: jax.Array
    pair_mask: jax.Array


# ------------------------------------------------------------------------------------------ helpers


def sequence_scores(scalar_params: Params, tokens, mask, cfg: ModelConfig, *, key=None) -> jax.Array:
    """Scalar model read at the last real token: [B, T] -> [B] float32 (reward model score)."""
    return ops.gather_last(model.scalar_fn(scalar_params, tokens, mask, cfg, key=key), mask)


def answer_logprobs(params: Params, tokens, mask, loss_mask, cfg: ModelConfig, *, key=None) -> jax.Array:
    """Sum of log pi(token_t | tokens_<t) over the tokens where loss_mask: [B, T] -> [B] float32.

    The LM head runs on slices of positions (`model.lm_token_logprobs`): the [B, T, V] logits are never
    held at once (DPO / REBEL steps and the online stages' teacher-forced logprobs)."""
    hidden = model.forward(params, tokens, mask, cfg, key=key)  # [B, T, D]
    token_lp = model.lm_token_logprobs(params, hidden[:, :-1], tokens[:, 1:], cfg)  # [B, T-1]
    return ops.masked_sum(token_lp, loss_mask[:, 1:] & mask[:, 1:], axis=-1)


def _flat2(x):
    """[B, K, ...] -> [B*K, ...]."""
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def _with_prefix(metrics: dict, prefix: str) -> dict:
    return {f"{prefix}{k}": v for k, v in metrics.items()}


def _update(state, tx, loss_fn, batch, key):
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, key)
    state, opt_metrics = apply_gradients(state, grads, loss, tx)
    return state, {**metrics, **opt_metrics}


def run_epochs(update: Callable, state, batch, *, key, epochs: int, minibatches: int):
    """`epochs` passes over a fixed batch, each `minibatches` updates on a fresh shuffle, in one `lax.scan`.

    The multi-pass loop of PPO (`rl.make_rl_step`) and REBEL (`make_rebel_step`): every leaf of `batch`
    has the batch on axis 0, which must be divisible by `minibatches`.

    Args:
      update: update(state, minibatch, key) -> (state, metrics), the metrics a flat dict of scalars.
      state: the train state at the start of the first pass.
      batch: a pytree of [B, ...] arrays.
      key: PRNG key of the shuffles (and of the updates' keys). None only with minibatches = 1: every pass
        is then the whole batch in order, and `update` gets a None key.
      epochs: passes over the batch.
      minibatches: updates per pass.

    Returns:
      (state, metrics) with every metric stacked to [epochs, minibatches].
    """
    b = jax.tree.leaves(batch)[0].shape[0]
    if b % minibatches:
        raise ValueError(f"batch {b} is not divisible by minibatches={minibatches}; change one.")
    if key is None:
        if minibatches > 1:
            raise ValueError(f"minibatches={minibatches} shuffles the batch every pass: pass a key.")

        def whole_batch(state, _):
            state, metrics = update(state, batch, None)
            return state, jax.tree.map(lambda x: x[None], metrics)  # [1] per pass

        return jax.lax.scan(whole_batch, state, None, length=epochs)
    mb_size = b // minibatches

    def one_epoch(state, epoch_key):
        perm = jax.random.permutation(epoch_key, b).reshape(minibatches, mb_size)

        def one_minibatch(state, xs):
            idx, mb_key = xs
            return update(state, jax.tree.map(lambda x: x[idx], batch), mb_key)

        keys = jax.random.split(jax.random.fold_in(epoch_key, 1), minibatches)
        return jax.lax.scan(one_minibatch, state, (perm, keys))

    return jax.lax.scan(one_epoch, state, jax.random.split(key, epochs))


def skip_without_pairs(update: Callable) -> Callable:
    """`update(state, minibatch: PrefBatch, key) -> (state, metrics)` that leaves the state unchanged on a
    minibatch without a real pair (`pair_mask` all False), so that Adam's momentum does not move the
    policy on no data."""

    def guarded(state, mb: PrefBatch, key):
        new_state, metrics = update(state, mb, key)
        has_pairs = jnp.any(mb.pair_mask)
        return jax.tree.map(lambda n, o: jnp.where(has_pairs, n, o), new_state, state), metrics

    return guarded


def pair_passes_step(update: Callable, *, epochs: int, minibatches: int) -> StepFn:
    """step(state, PrefBatch, *, key) making `epochs` passes of `minibatches` updates over a fixed pair set
    (`run_epochs`), an update skipped on a minibatch without a real pair (`skip_without_pairs`). Metrics:
    the means over the updates, "finite" their minimum, and "initial_loss" / "final_loss": the mean loss
    of the first / last pass (each minibatch's loss before its update)."""
    update = skip_without_pairs(update)

    def step(state: TrainState, batch: PrefBatch, *, key=None):
        state, metrics = run_epochs(update, state, batch, key=key, epochs=epochs, minibatches=minibatches)
        initial, final = jnp.mean(metrics["loss"][0]), jnp.mean(metrics["loss"][-1])
        return state, {**mean_metrics(metrics), "initial_loss": initial, "final_loss": final}

    return step


def mean_metrics(metrics: dict) -> dict:
    """Stacked per-update metrics -> their means; "finite" is the minimum (0 if any update was skipped)."""
    out = jax.tree.map(jnp.mean, metrics)
    if "finite" in metrics:
        out["finite"] = jnp.min(metrics["finite"])
    return out


# ------------------------------------------------------------------------------------------ steps


def lm_loss(params: Params, batch: LMBatch, cfg: ModelConfig, *, key=None) -> tuple[jax.Array, dict]:
    """Next-token cross-entropy on the `loss_mask` tokens of an LMBatch (losses.sft_loss)."""
    # The last position predicts nothing: run the model on T - 1 tokens (T may be block_size + 1).
    logits = model.logits_fn(params, batch.tokens[:, :-1], batch.mask[:, :-1], cfg, key=key)
    targets_mask = batch.loss_mask[:, 1:] & batch.mask[:, 1:]  # [B, T-1]
    return losses.sft_loss(logits, batch.tokens[:, 1:], targets_mask)


def make_lm_step(cfg: ModelConfig, tx: optax.GradientTransformation) -> StepFn:
    """Pretraining / SFT: next-token cross-entropy on `loss_mask` tokens (losses.sft_loss)."""

    def loss_fn(params, batch: LMBatch, key):
        return lm_loss(params, batch, cfg, key=key)

    def step(state: TrainState, batch: LMBatch, *, key=None):
        return _update(state, tx, loss_fn, batch, key)

    return step


def make_lm_eval(cfg: ModelConfig) -> Callable:
    """(params, LMBatch) -> (sum of token NLL, number of target tokens), for exact validation means."""

    def evaluate(params, batch: LMBatch):
        logits = model.logits_fn(params, batch.tokens[:, :-1], batch.mask[:, :-1], cfg)
        lp = ops.token_logprobs(logits, batch.tokens[:, 1:])
        m = batch.loss_mask[:, 1:] & batch.mask[:, 1:]
        return -ops.masked_sum(lp, m), jnp.sum(m, dtype=jnp.float32)

    return evaluate


def make_rm_step(cfg: ModelConfig, tx: optax.GradientTransformation) -> StepFn:
    """Reward model on a scalar model {"gpt", "head"}: pairwise Bradley-Terry for K = 2, else the
    InstructGPT K-way loss over all pairs of a prompt (losses.pairwise_rm_loss / kway_rm_loss)."""

    def loss_fn(params, batch: RankBatch, key):
        b, k, _ = batch.tokens.shape
        scores = sequence_scores(params, _flat2(batch.tokens), _flat2(batch.mask), cfg, key=key)
        scores = scores.reshape(b, k)  # [B, K]
        if k == 2:
            pair_mask = batch.rank_mask[:, 0] & batch.rank_mask[:, 1]
            return losses.pairwise_rm_loss(scores[:, 0], scores[:, 1], mask=pair_mask)
        return losses.kway_rm_loss(scores, batch.rank_mask)

    def step(state: TrainState, batch: RankBatch, *, key=None):
        return _update(state, tx, loss_fn, batch, key)

    return step


def make_rm_eval(cfg: ModelConfig) -> Callable:
    """(params, RankBatch) -> (number of correctly ordered pairs, number of pairs) for K = 2."""

    def evaluate(params, batch: RankBatch):
        b, k, _ = batch.tokens.shape
        scores = sequence_scores(params, _flat2(batch.tokens), _flat2(batch.mask), cfg).reshape(b, k)
        valid = batch.rank_mask[:, 0] & batch.rank_mask[:, 1]
        correct = (scores[:, 0] > scores[:, 1]) & valid
        return jnp.sum(correct, dtype=jnp.float32), jnp.sum(valid, dtype=jnp.float32)

    return evaluate


def pair_logprobs(params, batch: PrefBatch, cfg: ModelConfig, *, key=None) -> jax.Array:
    """Policy sequence logprobs of both answers of every pair: [B, 2]."""
    b = batch.tokens.shape[0]
    lp = answer_logprobs(
        params, _flat2(batch.tokens), _flat2(batch.mask), _flat2(batch.loss_mask), cfg, key=key
    )
    return lp.reshape(b, 2)


def make_dpo_step(
    cfg: ModelConfig,
    tx: optax.GradientTransformation,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    average_logprobs: bool = False,
    dropout: bool = False,
) -> StepFn:
    """DPO (loss_type "sigmoid") or IPO ("ipo") against the reference logprobs in the batch.

    `average_logprobs`: use each answer's per-token mean logprob (policy and reference, both divided by
    the answer's token count) instead of the sum; TRL does so for IPO, the length-normalised form.
    `dropout`: run the policy with the model config's dropout (off by default: the reference logprobs
    are computed without it, so with it the implicit reward margin is off at the first step; TRL and the
    REBEL code update without dropout)."""

    def loss_fn(params, batch: PrefBatch, key):
        lp = pair_logprobs(params, batch, cfg, key=key if dropout else None)  # [B, 2]
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

    def step(state: TrainState, batch: PrefBatch, *, key=None):
        return _update(state, tx, loss_fn, batch, key)

    return step


def make_rebel_step(
    cfg: ModelConfig,
    tx: optax.GradientTransformation,
    *,
    eta: float = 1.0,
    epochs: int = 4,
    minibatches: int = 1,
    dropout: bool = False,
) -> StepFn:
    """REBEL's update on one fixed pair set (Gao et al. 2024, "REBEL: Reinforcement Learning via Regressing
    Relative Rewards", Algorithm 1): regress (1/eta)[log pi/pi_t (y) - log pi/pi_t (y')] onto r(y) - r(y')
    (`losses.rebel_loss`, the paper's scale) with `epochs` passes over the pairs, each `minibatches`
    updates on a fresh shuffle, in one `lax.scan` (`run_epochs`).

    The batch's `ref_logprobs` must be pi_t's: the sequence logprobs of the policy that sampled the pairs,
    i.e. of `state.params` as this step receives them, computed once per pair set (e.g.
    `preference.rollout_logprobs(state.params, rollout, cfg)`), never the SFT reference. The first update
    then sees a zero predicted difference; later ones see log pi/pi_t move, so the passes converge to the
    regression's minimiser, where log pi/pi_t (y) - log pi/pi_t (y') = eta (r(y) - r(y')) on every pair:
    pi_{t+1} proportional to pi_t exp(eta r), and a larger eta moves further from pi_t. Defaults are the
    REBEL authors' (ZhaolinGao/REBEL `src/tldr/rebel.py`: eta 1, `noptepochs` 4, one optimizer step per
    pass over the whole local batch). With epochs = minibatches = 1 the step is one gradient step at
    pi = pi_t, where eta only scales a gradient that Adam normalises away.

    An update on a minibatch without a real pair (`pair_mask` all False) is skipped, so that Adam's
    momentum does not move the policy on no data. `key` shuffles the pairs (required for minibatches > 1)
    and drives dropout. `dropout`: as in `make_dpo_step` (off by default, so pi = pi_t exactly at the first
    update).

    Metrics: the means over the epochs x minibatches updates, "finite" their minimum, and "initial_loss" /
    "final_loss": the mean loss of the first / last pass (each minibatch's loss before its update).
    """
    for name, value in (("epochs", epochs), ("minibatches", minibatches)):
        if value < 1:
            raise ValueError(f"{name}={value}; it must be >= 1.")

    def loss_fn(params, batch: PrefBatch, key):
        lp = pair_logprobs(params, batch, cfg, key=key if dropout else None)
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

    update = lambda state, mb, key: _update(state, tx, loss_fn, mb, key)  # noqa: E731
    return pair_passes_step(update, epochs=epochs, minibatches=minibatches)
