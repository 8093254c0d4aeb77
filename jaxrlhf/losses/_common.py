"""Private helpers shared by the loss families: dtype promotion, padding, preference metrics."""

from __future__ import annotations

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


def _preference_metrics(
    chosen: jax.Array, rejected: jax.Array, mask: jax.Array | None, axis_name: ops.AxisName = None
) -> dict:
    """Accuracy, margin and means of a [B] pair of (possibly implicit) rewards, global with `axis_name`."""
    return {
        "accuracy": ops.masked_mean((chosen > rejected).astype(chosen.dtype), mask, axis_name=axis_name),
        "reward_margin": ops.masked_mean(chosen - rejected, mask, axis_name=axis_name),
        "chosen_reward": ops.masked_mean(chosen, mask, axis_name=axis_name),
        "rejected_reward": ops.masked_mean(rejected, mask, axis_name=axis_name),
    }
