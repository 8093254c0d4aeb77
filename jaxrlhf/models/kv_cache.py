"""Incremental decoding over a KV cache: prefill a (left-padded) prompt, then one token per row per step.

The cache is per layer, so each decode step updates it in place; decoding runs the layers as an unrolled
Python loop over per-layer params (`unstack_blocks`), sliced once outside the sampling loop. Shapes as in
`models.transformer`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxrlhf import ops, xla_cpu
from jaxrlhf.models import layers, transformer
from jaxrlhf.models.config import ModelConfig

Params = dict


class KVCache(NamedTuple):
    """Per-layer keys and values for incremental decoding.

    Attributes:
      k: L arrays [B*K, S, H] of keys (S = cache length; the K kv heads folded into the batch, the layout
        attention reads, so it needs no transpose or reshape of the cache; one array per layer so each
        decode step updates them in place).
      v: L arrays [B*K, S, H] of values.
      mask: [B, S] bool, True where a slot holds a real token.
      index: [] int32, the next slot to write.
      positions: [B] int32, position id of the next token of each row.
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    mask: jax.Array
    index: jax.Array
    positions: jax.Array


def unstack_blocks(params: Params) -> Params:
    """Params with `blocks` split into a tuple of L per-layer dicts (the decoding layout).

    Decoding runs the layers as an unrolled Python loop over this tuple: slicing the stacked weights and
    caches once, outside the sampling loop, keeps every decode step free of per-layer copies.
    """
    if isinstance(params["blocks"], tuple):
        return params
    n_layer = jax.tree.leaves(params["blocks"])[0].shape[0]
    blocks = tuple(jax.tree.map(lambda a, i=i: a[i], params["blocks"]) for i in range(n_layer))
    return {**params, "blocks": blocks}


def decoding_params(params: Params, batch: int) -> Params:
    """`unstack_blocks(params)` with every dense bias broadcast to [batch, Dout] (`xla_cpu.broadcast_biases`):
    the layout of a decode step (one token per row, `decode_step`), made once per sampling call outside its
    loop. Prefill (T > 1 tokens per row) takes the unstacked params, not these."""
    params = unstack_blocks(params)
    return {**params, "blocks": tuple(xla_cpu.broadcast_biases(p, batch) for p in params["blocks"])}


def init_cache(cfg: ModelConfig, batch: int, length: int) -> KVCache:
    """An empty cache of `length` slots (prompt + response) for `batch` rows."""
    transformer.check_length(length, cfg)
    shape = (batch * cfg.kv_heads, length, cfg.head_dim)  # only the kv heads are cached
    return KVCache(
        k=tuple(jnp.zeros(shape, cfg.dtype) for _ in range(cfg.n_layer)),
        v=tuple(jnp.zeros(shape, cfg.dtype) for _ in range(cfg.n_layer)),
        mask=jnp.zeros((batch, length), bool),
        index=jnp.zeros((), jnp.int32),
        positions=jnp.zeros((batch,), jnp.int32),
    )


def _cached_step(params, tokens, token_mask, positions, cache: KVCache, cfg: ModelConfig):
    """Run T new tokens against the cache: write their k/v at `cache.index`, attend to all real slots."""
    T = tokens.shape[1]
    S = cache.mask.shape[1]
    x, rope = transformer.embed(params, tokens, positions, cfg, None)
    cache_mask = jax.lax.dynamic_update_slice(cache.mask, token_mask, (0, cache.index))  # [B, S]
    slot = jnp.arange(S, dtype=jnp.int32)
    query_slot = cache.index + jnp.arange(T, dtype=jnp.int32)
    causal = slot[None, :] <= query_slot[:, None]  # [T, S]
    attn_mask = cache_mask[:, None, None, :] & causal[None, None]  # [B, 1, T, S]
    ks, vs = [], []
    for p, k, v in zip(unstack_blocks(params)["blocks"], cache.k, cache.v, strict=True):
        x, (k, v) = transformer.block(p, x, attn_mask, cfg, None, (k, v), cache.index, rope)
        ks.append(k)
        vs.append(v)
    hidden = layers.norm(x, params["ln_f"], cfg)
    new_positions = positions[:, -1] + token_mask[:, -1].astype(jnp.int32)
    cache = KVCache(tuple(ks), tuple(vs), cache_mask, cache.index + T, new_positions)
    return hidden, cache


def prefill(params, tokens, mask, cfg: ModelConfig, cache_length: int) -> tuple[jax.Array, KVCache]:
    """Encode a (left-padded) prompt into a fresh cache of `cache_length` slots.

    Args:
      tokens: [B, P] prompt ids; mask: [B, P] bool.
      cache_length: S >= P, total slots (prompt + tokens to decode).

    Returns:
      (hidden [B, P, D], cache) with cache.index = P and cache.positions = number of real prompt tokens.
    """
    mask = mask.astype(bool)
    cache = init_cache(cfg, tokens.shape[0], cache_length)
    positions = ops.positions_from_mask(mask)
    hidden, cache = _cached_step(params, tokens, mask, positions, cache, cfg)
    return hidden, cache._replace(positions=jnp.sum(mask, axis=-1, dtype=jnp.int32))


def decode_step(params, token, cache: KVCache, cfg: ModelConfig, token_mask=None):
    """Append one token per row. token: [B] ids -> (hidden [B, D], cache)."""
    if token_mask is None:
        token_mask = jnp.ones(token.shape, bool)
    hidden, cache = _cached_step(
        params, token[:, None], token_mask[:, None], cache.positions[:, None], cache, cfg
    )
    return hidden[:, 0], cache
