"""Gradient accumulation for the policy update: one minibatch's loss, gradient and metrics from slices
of its rows run one after another (a `lax.scan`), with the activations of one slice alive at a time.

The same update up to float rounding, for every aggregation: each loss term is weighted by the slice's
share of what the whole minibatch's term averages over (`shares`), and each metric combines by the rule
of `METRIC_WEIGHTS` (a metric without a rule is an error, never silently wrong).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

# How each update metric of a minibatch combines over its slices: the share it averages over, or "max".
METRIC_WEIGHTS = {
    "policy_loss": "agg", "kl_loss": "agg", "ptx_loss": "ptx", "entropy": "tok", "clipfrac": "tok",
    "approx_kl": "tok", "ratio_max": "max", "advantage_mean": "tok", "value_loss": "tok",
    "value_clipfrac": "tok",
}  # fmt: skip
UNIT = {"agg": 1.0, "tok": 1.0, "ptx": 1.0}  # the loss terms' weights of a whole minibatch


def shares(response_mask: jax.Array, ptx=None) -> dict:
    """What a (slice of a) minibatch's loss terms average over: its real tokens ("tok"), its non-empty
    rows ("row"), its rows ("all_rows", Dr. GRPO's fixed B x R normaliser) and its ptx target tokens."""
    out = {
        "tok": jnp.sum(response_mask, dtype=jnp.float32),
        "row": jnp.sum(jnp.any(response_mask, axis=-1), dtype=jnp.float32),
        "all_rows": jnp.float32(response_mask.shape[0]),
    }
    if ptx is not None:
        out["ptx"] = jnp.sum(ptx.loss_mask[:, 1:] & ptx.mask[:, 1:], dtype=jnp.float32)
    return out


def accumulate(
    grads_fn: Callable,
    minibatch,
    ptx,
    *,
    micro_batches: int,
    loss_agg: str,
    ratio_level: str,
    key: jax.Array | None,
):
    """`grads_fn(minibatch, ptx, key, scale) -> (loss, metrics, grads)` of the whole minibatch, accumulated
    over `micro_batches` slices of its rows.

    Slice i holds rows i, i + n, i + 2n, ... (every device of a row-sharded batch keeps its share of
    each slice). `scale` weighs the slice's terms by its share of what the whole minibatch's term averages
    over: its real tokens for token means (and the "token_mean" aggregation), its non-empty rows for
    sequence means, its rows for "constant", its ptx target tokens for the ptx loss. With dropout each
    slice draws its own masks (key folded with the slice's index).
    """
    n = micro_batches

    def slices(x):  # [B, ...] -> [n, B / n, ...], slice i = rows i::n
        return jnp.swapaxes(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 0, 1)

    total = shares(minibatch.response_mask, ptx)
    agg = {"token_mean": "tok", "constant": "all_rows"}.get(loss_agg, "row")
    how = {**METRIC_WEIGHTS, "ratio_mean": "tok" if ratio_level == "token" else "row"}
    xs = (jax.tree.map(slices, minibatch), None if ptx is None else jax.tree.map(slices, ptx), jnp.arange(n))

    def one_slice(acc, xs):
        m, p, i = xs
        part = shares(m.response_mask, p)
        weight = {k: part[k] / jnp.maximum(total[k], 1.0) for k in part}
        weight["agg"] = weight[agg]
        scale = {"agg": weight["agg"], "tok": weight["tok"], "ptx": weight.get("ptx", 1.0)}
        loss, metrics, grads = grads_fn(m, p, jax.random.fold_in(key, i) if key is not None else None, scale)
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
    shapes = jax.eval_shape(functools.partial(grads_fn, key=key, scale=UNIT), m0, p0)
    init = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    init[1].update({k: jnp.full((), -jnp.inf, init[1][k].dtype) for k in init[1] if how.get(k) == "max"})
    (loss, metrics, grads), _ = jax.lax.scan(one_slice, init, xs)
    return loss, metrics, grads
