"""Small numeric primitives shared by the model, the sampler and the losses.

Masks are bool arrays, True = real token. Every reduction over tokens goes through `masked_sum` /
`masked_mean`, which never divide by zero: a fully masked row contributes nothing and yields a finite 0.

The next-token shift, stated once: for tokens `x[:, 0..T-1]`, `logits[:, t]` is the model's distribution
for `x[:, t+1]`. So the log-probability of token `x[:, t]` (t >= 1) is read from `logits[:, t-1]`, and
`token_logprobs(logits[:, :-1], tokens[:, 1:])` scores every token but the first. For a prompt of width P
followed by a response of width R, the response logprobs are `token_logprobs(logits[:, P-1:-1], response)`.

Reductions inside `jax.shard_map`: `masked_sum / masked_mean / masked_var` take an optional
keyword `axis_name` (a mesh axis name or a tuple of them) over which the batch axis 0 is split. With it the
result is the global one, identical on every device: sums are psum'd, a mean is psum(sum) / psum(count)
(not a mean of per-device means, which would weigh a shard of short responses like one of long ones), and
variances use the global mean and the global count. Without it nothing changes (bit for bit). `psum` /
`pmax` below are `jax.lax.psum` / `pmax` that are the identity for `axis_name=None`.

Gradients of such a global loss (measured on JAX 0.10, `shard_map(check_vma=True)`, the default): call
`jax.grad` on the loss inside the shard_map with the params replicated (in_specs `P()`); the result is
already the gradient of the global loss, the same on every device (psum transposes to a no-op on the
cotangent, and the implicit pvary of the replicated params transposes to a psum of the per-device
contributions). Do not pmean or psum the gradients again (a pmean is a no-op on them, a psum multiplies by
the device count). The older pattern, a per-device loss without `axis_name` followed by `pmean(grads)`, is
wrong under check_vma=True: `jax.grad` already sums the per-device gradients, so the pmean leaves N times the
mean of the per-device gradients. Only with `check_vma=False` does psum transpose to psum; there each
device's gradient of the global loss is N times its own share and `pmean(grads)` gives the global gradient.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

AxisName = str | tuple[str, ...] | None


def psum(x: jax.Array, axis_name: AxisName) -> jax.Array:
    """`jax.lax.psum(x, axis_name)`, or `x` itself when `axis_name` is None (no mesh axis)."""
    return x if axis_name is None else jax.lax.psum(x, axis_name)


def pmax(x: jax.Array, axis_name: AxisName) -> jax.Array:
    """`jax.lax.pmax(x, axis_name)`, or `x` itself when `axis_name` is None (no mesh axis).

    `jax.lax.pmax` has no differentiation rule, so its input's gradient is stopped: a max over devices
    is a metric, and a metric returned as aux of `jax.value_and_grad` is still traced by its JVP.
    """
    return x if axis_name is None else jax.lax.pmax(jax.lax.stop_gradient(x), axis_name)


def _axes(x: jax.Array, axis) -> tuple[int, ...]:
    """The reduced axes of `x`, non-negative, for `axis` None, an int or a tuple."""
    if axis is None:
        return tuple(range(x.ndim))
    return tuple(a % x.ndim for a in (axis if isinstance(axis, tuple | list) else (axis,)))


def _check_batch_reduction(x: jax.Array, axis, axis_name: AxisName) -> None:
    """An `axis_name` sums over the split batch axis 0, so the reduction must run over axis 0 too."""
    if axis_name is not None and 0 not in _axes(x, axis):
        raise ValueError(
            f"axis_name={axis_name!r} with axis={axis!r}: a reduction that leaves the batch axis 0 is "
            "per row and needs no collective; drop axis_name."
        )


def masked_sum(
    x: jax.Array, mask: jax.Array | None = None, axis=None, *, axis_name: AxisName = None
) -> jax.Array:
    """Sum of `x` where `mask` is True (all of `x` when mask is None).

    With `axis_name` (inside `jax.shard_map`, axis 0 split over that mesh axis or axes) the sum is over
    the global batch: psum of the per-device sums. The reduction must then include axis 0.
    """
    _check_batch_reduction(x, axis, axis_name)
    if mask is None:
        return psum(jnp.sum(x, axis=axis), axis_name)
    return psum(jnp.sum(jnp.where(mask, x, jnp.zeros_like(x)), axis=axis), axis_name)


def _count(x: jax.Array, mask: jax.Array | None, axis, axis_name: AxisName) -> jax.Array:
    """Global number of entries that a (masked) reduction of `x` over `axis` reads, in x's dtype."""
    if mask is None:
        return psum(jnp.asarray(math.prod(x.shape[a] for a in _axes(x, axis)), x.dtype), axis_name)
    return psum(jnp.sum(jnp.broadcast_to(mask, x.shape), axis=axis, dtype=x.dtype), axis_name)


def masked_mean(
    x: jax.Array, mask: jax.Array | None = None, axis=None, *, axis_name: AxisName = None
) -> jax.Array:
    """Mean of `x` over the True entries of `mask`; divides by max(count, 1) so an empty mask gives 0.

    With `axis_name` the mean is global: psum(sum) / max(psum(count), 1), the same number on every
    device as the unsharded call (never a mean of per-device means).
    """
    _check_batch_reduction(x, axis, axis_name)
    if axis_name is None:
        if mask is None:
            return jnp.mean(x, axis=axis)
        mask = jnp.broadcast_to(mask, x.shape)
        count = jnp.sum(mask, axis=axis, dtype=x.dtype)
        return masked_sum(x, mask, axis) / jnp.maximum(count, 1)
    return masked_sum(x, mask, axis, axis_name=axis_name) / jnp.maximum(_count(x, mask, axis, axis_name), 1)


def masked_var(
    x: jax.Array, mask: jax.Array | None = None, unbiased: bool = True, *, axis_name: AxisName = None
) -> jax.Array:
    """Variance of the masked entries of `x` (all axes); Bessel-corrected when `unbiased` and count > 1.

    With `axis_name` the global mean and the global count are used (Bessel's n / (n - 1) with the
    global n), so the result is the variance of the whole batch.
    """
    mean = masked_mean(x, mask, axis_name=axis_name)
    centred_sq = jnp.square(x - mean)
    var = masked_mean(centred_sq, mask, axis_name=axis_name)
    if unbiased:
        if axis_name is None:
            count = x.size if mask is None else jnp.sum(jnp.broadcast_to(mask, x.shape), dtype=x.dtype)
        else:
            count = _count(x, mask, None, axis_name)
        var = var * count / jnp.maximum(count - 1, 1)
    return var


def log_softmax(logits: jax.Array) -> jax.Array:
    """Log-softmax in float32 whatever the input dtype."""
    return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)


def token_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log p(targets) under `logits`, in float32.

    Args:
      logits: [B, T, V] (already shifted so logits[:, t] predicts targets[:, t]).
      targets: [B, T] int ids.

    Returns:
      [B, T] float32 log-probabilities.

    Ids must lie in [0, V): this is a plain gather, so an id >= V reads NaN and a negative one wraps (-1
    reads the last entry). `losses.sft_loss` refuses or NaN-marks such ids under its mask.
    """
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def entropy(logits: jax.Array) -> jax.Array:
    """Entropy of softmax(logits) along the last axis, float32. [..., V] -> [...]."""
    logp = log_softmax(logits)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def causal_mask(length: int) -> jax.Array:
    """[T, T] bool, True where query t may attend to key s (s <= t)."""
    return jnp.tril(jnp.ones((length, length), dtype=bool))


def attention_mask(query_mask: jax.Array, key_mask: jax.Array, causal: bool = True) -> jax.Array:
    """Combine causal and padding masks for self-attention.

    Args:
      query_mask: [B, T] bool, True = real query token (kept for symmetry; padded queries are harmless).
      key_mask: [B, S] bool, True = real key token.
      causal: restrict to keys at or before the query (requires T == S).

    Returns:
      [B, 1, T, S] bool, broadcastable over heads.
    """
    del query_mask  # a padded query still sees real keys; its output is ignored downstream.
    mask = key_mask[:, None, None, :]  # [B, 1, 1, S]
    if causal:
        mask = mask & causal_mask(key_mask.shape[1])[None, None]
    return mask


def positions_from_mask(mask: jax.Array) -> jax.Array:
    """Position ids counting real tokens only: left padding does not shift positions. [B, T] -> [B, T]."""
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)


def mask_after_eos(tokens: jax.Array, eos_id: int, mask: jax.Array | None = None) -> jax.Array:
    """True up to and including the first `eos_id` of each row, False after it. [B, R] -> [B, R] bool."""
    is_eos = tokens == eos_id
    if mask is not None:
        is_eos = is_eos & mask
    # Number of EOS strictly before t; a token is kept while none has been seen.
    seen_before = jnp.cumsum(is_eos, axis=-1) - is_eos
    keep = seen_before == 0
    return keep if mask is None else keep & mask


def last_index(mask: jax.Array) -> jax.Array:
    """Index of the last True entry of each row (0 for an all-False row). [B, T] -> [B] int32."""
    t = jnp.arange(mask.shape[-1], dtype=jnp.int32)
    return jnp.maximum(jnp.max(jnp.where(mask, t, -1), axis=-1), 0)


def gather_last(x: jax.Array, mask: jax.Array) -> jax.Array:
    """x at the last real token of each row. x: [B, T, ...], mask: [B, T] -> [B, ...]."""
    idx = last_index(mask)
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 1)), axis=1)[:, 0]
