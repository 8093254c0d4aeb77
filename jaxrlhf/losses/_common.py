"""Private helpers shared by the loss families: dtype promotion, padding, preference metrics, argument
checks."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf import ops


def _float(x) -> jax.Array:
    """`x` as an array of at least float32 precision."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _zero_padding(mask: jax.Array | None, x: jax.Array) -> jax.Array:
    """`x` with padded entries set to 0, so no exp or square of garbage ever runs."""
    return x if mask is None else jnp.where(mask, x, jnp.zeros_like(x))


def _score_at_last_token(scores: jax.Array, response_mask: jax.Array) -> jax.Array:
    """[B, R]: each row's score [B] on its last real token, 0 elsewhere (a fully masked row: 0 everywhere);
    the sequence reward of `shaped_rewards` and `reinforce_pp_advantages`."""
    positions = jnp.arange(response_mask.shape[1])
    is_last = (positions == ops.last_index(response_mask)[:, None]) & response_mask  # [B, R]
    return jnp.where(is_last, _float(scores)[:, None], 0.0)


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


# ------------------------------------------------------------------ argument checks
#
# Every public loss checks its arguments before it computes anything. The checks read only shapes (static
# under `jax.jit`, `jax.vmap` and `jax.shard_map`, where they are the per-example / per-device shapes) and
# parameters that arrive as concrete numbers (Python, NumPy or non-traced JAX scalars): they run once, at
# trace time, and add nothing to the compiled program. A parameter that arrives as a traced JAX value (an
# argument of a jitted function, a scanned state) is checked for its rank only, never for its value.
# Messages are one line: "fn: argument ...".


def _is_traced(x) -> bool:
    """Whether `x` is a JAX tracer (its value unknown until run time)."""
    return isinstance(x, jax.core.Tracer)


def _shape(x) -> tuple[int, ...]:
    return tuple(jnp.shape(x))


def _check_rank(fn: str, layout: str, **arrays) -> None:
    """Each non-None array has the rank of `layout` ("[B]", "[B, R]", "[B, R, V]", ...)."""
    rank = layout.count(",") + 1
    for name, x in arrays.items():
        if x is not None and jnp.ndim(x) != rank:
            raise ValueError(f"{fn}: {name} has shape {_shape(x)}; it must be {layout}")


def _check_prefix(fn: str, ref_name: str, ref, n: int | None, **arrays) -> None:
    """Each non-None array's shape is the first `n` axes of `ref`'s shape (all of it for None)."""
    want = _shape(ref)[:n]
    for name, x in arrays.items():
        if x is not None and _shape(x) != want:
            hint = "" if n is None or n == len(_shape(ref)) else f" (it must be {want})"
            raise ValueError(f"{fn}: {name} has shape {_shape(x)}; {ref_name} has shape {_shape(ref)}{hint}")


def _check_same_shape(fn: str, ref_name: str, ref, **arrays) -> None:
    """Each non-None array has exactly the shape of `ref`."""
    _check_prefix(fn, ref_name, ref, None, **arrays)


def _check_batch(fn: str, ref_name: str, ref, **arrays) -> None:
    """Each non-None array has the batch size (axis 0) of `ref` (its rank is checked elsewhere)."""
    for name, x in arrays.items():
        if x is not None and _shape(x)[:1] != _shape(ref)[:1]:
            raise ValueError(
                f"{fn}: {name} has shape {_shape(x)}; {ref_name} has shape {_shape(ref)} (batch sizes differ)"
            )


def _scalar_value(fn: str, name: str, value) -> float | None:
    """A scalar parameter's value as a float, or None when it is traced (not checkable)."""
    if jnp.ndim(value) != 0:
        raise ValueError(f"{fn}: {name} has shape {_shape(value)}; it must be a scalar")
    if _is_traced(value):
        return None
    try:
        return float(value)
    except (TypeError, ValueError) as e:  # e.g. a string
        raise ValueError(f"{fn}: {name}={value!r}; it must be a number") from e


def _check_param(
    fn: str,
    name: str,
    value,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """A scalar parameter (None passes) is finite and inside [low, high] (open ends as asked).

    Only concrete values are checked; a traced value is checked for its rank only."""
    if value is None:
        return
    v = _scalar_value(fn, name, value)
    if v is None:
        return
    ok = math.isfinite(v)
    ok = ok and (low is None or (v > low if low_open else v >= low))
    ok = ok and (high is None or (v < high if high_open else v <= high))
    if not ok:
        parts = []
        if low is not None:
            parts.append(f"{'>' if low_open else '>='} {low:g}")
        if high is not None:
            parts.append(f"{'<' if high_open else '<='} {high:g}")
        bound = " and ".join(parts)
        raise ValueError(f"{fn}: {name}={v!r}; it must be a finite number" + (f" {bound}" if bound else ""))


def _check_positive(fn: str, **params) -> None:
    """Each non-None scalar parameter is finite and > 0 (when concrete)."""
    for name, value in params.items():
        _check_param(fn, name, value, low=0.0, low_open=True)


def _check_finite(fn: str, **params) -> None:
    """Each non-None scalar parameter is finite (when concrete)."""
    for name, value in params.items():
        _check_param(fn, name, value)


def _check_choice(fn: str, name: str, value, choices: tuple) -> None:
    """A static option is one of `choices`."""
    if value not in choices:
        raise ValueError(f"{fn}: {name}={value!r}; use one of {', '.join(map(repr, choices))}")


def _concrete_mask_is_empty(mask) -> bool:
    """Whether `mask` is concrete (not traced) and has no True entry."""
    return mask is not None and not _is_traced(mask) and not np.any(np.asarray(mask))
