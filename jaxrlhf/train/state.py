"""What every train step shares: the train state, the optimizers, one update, passes over a fixed batch.

Every `make_*_step` factory of this package returns an *un-jitted*
`step(state, batch, *, key) -> (state, metrics)` written for the whole (global) batch; `parallel.jit_step`
compiles it once for a mesh. Because the step sees the global
batch, masked means are over every real token of the batch whatever the device count, and the same
function runs on 1 CPU, 8 fake CPU devices or a TPU pod (see parallel.py for why this is jit with
shardings; the losses also run inside a user's shard_map with `axis_name=`).

A step never trains on a non-finite loss or gradient: the update is skipped (params and optimizer state
unchanged) and `metrics["finite"]` is 0, which the driver turns into a one-line error.

"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
import optax.contrib

from jaxrlhf import losses
from jaxrlhf.validate import check_at_least

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


def optim_field(**settings) -> dataclasses.Field:
    """A config field holding an OptimConfig with these `settings` by default (each instance its own)."""
    return dataclasses.field(default_factory=lambda: OptimConfig(**settings))


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


# ------------------------------------------------------------------------------------------ steps


def update(state: TrainState, tx: optax.GradientTransformation, loss_fn, batch, key, *, applies=None):
    """One step of `loss_fn(params, batch, key) -> (loss, metrics)`: its gradient, then `apply_gradients`.
    The body of every supervised and preference step.

    `applies(batch) -> bool scalar`, if given: where False the state is left as it was (a minibatch
    without a real pair: Adam's momentum must not move the policy on no data)."""
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, key)
    new_state, opt_metrics = apply_gradients(state, grads, loss, tx)
    if applies is not None:
        ok = applies(batch)
        new_state = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new_state, state)
    return new_state, {**metrics, **opt_metrics}


def run_epochs(update: Callable, state, batch, *, key, epochs: int, minibatches: int):
    """`epochs` passes over a fixed batch, each `minibatches` updates on a fresh shuffle, in one `lax.scan`
    over the epochs x minibatches updates.

    The multi-pass loop of PPO (`rl.make_rl_step`) and REBEL (`make_rebel_step`): every leaf of `batch`
    has the batch on axis 0, which must be divisible by `minibatches`.

    Args:
      update: update(state, batch=minibatch, key=key) -> (state, metrics), the metrics a flat dict of
        scalars (called by keyword: `functools.partial(state.update, tx=..., loss_fn=...)` is one).
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
            state, metrics = update(state, batch=batch, key=None)
            return state, jax.tree.map(lambda x: x[None], metrics)  # [1] per pass

        return jax.lax.scan(whole_batch, state, None, length=epochs)
    mb_size = b // minibatches
    epoch_keys = jax.random.split(key, epochs)  # each pass: a shuffle and its updates' keys
    perms = jax.vmap(lambda k: jax.random.permutation(k, b).reshape(minibatches, mb_size))(epoch_keys)
    mb_keys = jax.vmap(lambda k: jax.random.split(jax.random.fold_in(k, 1), minibatches))(epoch_keys)

    def one_minibatch(state, xs):  # the passes' updates in order, as one scan
        idx, mb_key = xs
        return update(state, batch=jax.tree.map(lambda x: x[idx], batch), key=mb_key)

    flat = (
        perms.reshape(epochs * minibatches, mb_size),
        mb_keys.reshape(epochs * minibatches, *mb_keys.shape[2:]),
    )
    state, metrics = jax.lax.scan(one_minibatch, state, flat)
    return state, jax.tree.map(lambda x: x.reshape(epochs, minibatches, *x.shape[1:]), metrics)


def mean_metrics(metrics: dict) -> dict:
    """Stacked per-update metrics -> their means; "finite" is the minimum (0 if any update was skipped)."""
    out = jax.tree.map(jnp.mean, metrics)
    if "finite" in metrics:
        out["finite"] = jnp.min(metrics["finite"])
    return out
