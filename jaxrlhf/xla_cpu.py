"""The XLA:CPU tunings, in one place. A GPU or TPU reader can skip this file: no helper here changes a
result (each is tested equal to its plain form), each only changes how XLA:CPU compiles the same maths.
Their measurements are in docs/benchmarks.md ("XLA:CPU tunings").

    unroll_layers            the layer scan unrolled up to 12 layers (the trunk, `models.transformer`)
    broadcast_biases         decode-time dense biases pre-broadcast to [batch, Dout] (`models.kv_cache`)
    kth_largest / sort_descending   top-k / top-p thresholds from one int32-key sort (`rollout.sampler`)
    predraw_gumbel           all of a rollout's sampling noise drawn before the decode loop
                             (`rollout.sampler`)
    after                    the critic's forward and backward ordered after the policy's (`train.policy`)

Elsewhere, by nature rather than by option: `layers.dense` runs matmuls on 2-D views, `layers.gelu` keeps only
its input for the backward, and `engine.memory` holds the host-memory levers of a laptop run.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

UNROLL_MAX_LAYERS = 12  # deeper models keep a rolled scan: compile time grows with unrolling
SMALL_VOCAB = 512  # up to this vocabulary top-k sorts int32 keys; above it, jax.lax.top_k
PREDRAW_MAX = 1 << 22  # elements of pre-drawn Gumbel noise (16 MiB of float32)


def unroll_layers(n_layer: int) -> bool:
    """Whether the layers run as one unrolled program. Why: a rolled scan's per-layer slicing and the
    zero-filling of its stacked [L, ...] residual buffers cost XLA:CPU more than the layers' own work at
    small widths."""
    return n_layer <= UNROLL_MAX_LAYERS


def broadcast_biases(block_params: Any, batch: int) -> Any:
    """Every dense bias ({"kernel", "bias"} mapping) in `block_params` broadcast to [batch, Dout]. Why:
    XLA:CPU fuses a [Dout] bias into the elementwise op after a decode step's matmul as a broadcast and
    splits those tiny fusions over threads; a bias of the activations' shape is a plain add."""
    if not isinstance(block_params, Mapping):
        return block_params
    if "kernel" in block_params and "bias" in block_params:
        bias = block_params["bias"]
        return {**block_params, "bias": jnp.broadcast_to(bias, (batch, *bias.shape))}
    return {k: broadcast_biases(v, batch) for k, v in block_params.items()}


def sortable_keys(x: jax.Array) -> jax.Array:
    """int32 keys ordered as the float32 values x (not NaN), -0.0 equal to 0.0: a >= b iff key(a) >= key(b).

    The float's bits read as int32 order the non-negative values; flipping the magnitude bits of the
    negative ones reverses their order below zero.
    """
    bits = jax.lax.bitcast_convert_type(jnp.where(x == 0, 0.0, x).astype(jnp.float32), jnp.int32)
    return jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)


def _from_sortable_keys(keys: jax.Array) -> jax.Array:
    """The float32 values of `sortable_keys` (-0.0 comes back as 0.0)."""
    bits = jnp.where(keys < 0, keys ^ jnp.int32(0x7FFFFFFF), keys)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def sort_descending(x: jax.Array) -> jax.Array:
    """x [B, V] float32 sorted descending along V. Why: XLA:CPU sorts int32 with a plain comparator and
    float32 with a NaN-aware one, several times slower; the keys carry the same order."""
    return _from_sortable_keys(jnp.sort(sortable_keys(x), axis=-1)[:, ::-1])


def kth_largest(x: jax.Array, k: int) -> jax.Array:
    """The k-th largest entry of each row of x [B, V], as [B, 1]. Why: for small V one int32-key sort is
    faster on XLA:CPU than `jax.lax.top_k` (a full float sort); for larger V top_k is kept."""
    if x.shape[-1] <= SMALL_VOCAB:
        return sort_descending(x)[:, k - 1 : k]
    return jax.lax.top_k(x, k)[0][:, -1:]


def predraw_gumbel(key: jax.Array, steps: int, batch: int, vocab: int) -> jax.Array | None:
    """[steps, batch, vocab] Gumbel noise for a whole rollout, or None when it would be large (then the
    loop draws per step). Why: on XLA:CPU every in-loop threefry call is an inner while loop of tiny ops
    that costs more than a small model's decode step."""
    if steps * batch * vocab > PREDRAW_MAX:
        return None
    return jax.random.gumbel(key, (steps, batch, vocab), jnp.float32)


def after(tree: Any, dep: jax.Array) -> Any:
    """`tree` read through a zero computed from `dep` (a finite-checked scalar): what uses the result waits
    for `dep`. Why: XLA:CPU drops an `optimization_barrier`, and ordering the critic's forward and backward
    after the policy's gradient keeps the two models' activations from living at the same time."""
    zero = jnp.where(jnp.isfinite(dep), dep * 0.0, 0.0)
    return jax.tree.map(lambda v: v + zero.astype(v.dtype), tree)
