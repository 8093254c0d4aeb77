"""A minGPT / GPT-2 decoder as stateless pure functions.

Shape letters (used in every docstring of the package):
  B batch, T / S positions (query / key), D model width, N heads, H head dim (D / N), F MLP width,
  V vocabulary, L layers, P prompt length, R response length.

Params are a nested dict with GPT-2-like names; the L transformer blocks are stacked on a leading [L] axis
and run with `jax.lax.scan`:

  wte [V, D]   wpe [block_size, D]   ln_f {scale, bias} [D]
  blocks/ln_1, ln_2 {scale, bias} [L, D]
  blocks/attn/c_attn {kernel [L, D, 3D], bias [L, 3D]}   blocks/attn/c_proj {kernel [L, D, D], bias [L, D]}
  blocks/mlp/c_fc {kernel [L, D, F], bias [L, F]}        blocks/mlp/c_proj {kernel [L, F, D], bias [L, D]}

The LM head is tied to `wte`. Scalar heads (value, reward) are a separate {kernel [D], bias []} dict; a
"scalar model" is {"gpt": params, "head": head}.

Positions are derived from the padding mask (`ops.positions_from_mask`), so a left-padded prompt gets the
same logits on its real tokens as the unpadded one. Dense layers run on 2-D [B*T, D] activations: XLA:CPU
is several times slower on 3-D dot operands (see shared notes).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxrlhf import ops
from jaxrlhf.config import ModelConfig

Params = dict
_UNROLL_MAX_LAYERS = 12  # deeper models keep a rolled layer scan (compile time grows with unrolling)


class KVCache(NamedTuple):
    """Per-layer keys and values for incremental decoding.

    Attributes:
      k: L arrays [B*N, S, H] of keys (S = cache length; heads folded into the batch, the layout attention
        reads, so it needs no transpose or reshape of the cache; one array per layer so each decode step
        updates them in place).
      v: L arrays [B*N, S, H] of values.
      mask: [B, S] bool, True where a slot holds a real token.
      index: [] int32, the next slot to write.
      positions: [B] int32, position id of the next token of each row.
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    mask: jax.Array
    index: jax.Array
    positions: jax.Array


# ----------------------------------------------------------------------------------------------- init


def init_params(key: jax.Array, cfg: ModelConfig) -> Params:
    """GPT-2 initialisation: N(0, 0.02) weights, residual projections N(0, 0.02 / sqrt(2L)), zero biases."""
    L, D, F, V = cfg.n_layer, cfg.n_embd, cfg.mlp_dim, cfg.vocab_size
    k_wte, k_wpe, k_attn, k_aproj, k_fc, k_mproj = jax.random.split(key, 6)
    dt = cfg.pdtype
    std, proj_std = 0.02, 0.02 / math.sqrt(2 * L)

    def normal(k, shape, s):
        return (s * jax.random.normal(k, shape, jnp.float32)).astype(dt)

    def ln(*lead):
        return {"scale": jnp.ones((*lead, D), dt), "bias": jnp.zeros((*lead, D), dt)}

    def dense(k, din, dout, s):
        return {"kernel": normal(k, (L, din, dout), s), "bias": jnp.zeros((L, dout), dt)}

    return {
        "wte": normal(k_wte, (V, D), std),
        "wpe": normal(k_wpe, (cfg.block_size, D), std),
        "blocks": {
            "ln_1": ln(L),
            "attn": {
                "c_attn": dense(k_attn, D, 3 * D, std),
                "c_proj": dense(k_aproj, D, D, proj_std),
            },
            "ln_2": ln(L),
            "mlp": {"c_fc": dense(k_fc, D, F, std), "c_proj": dense(k_mproj, F, D, proj_std)},
        },
        "ln_f": ln(),
    }


def init_scalar_head(key: jax.Array, cfg: ModelConfig, scale: float = 0.0) -> Params:
    """A linear head D -> 1 (value or reward). Zero-init by default so it starts at a neutral 0."""
    kernel = scale * jax.random.normal(key, (cfg.n_embd,), jnp.float32) / math.sqrt(cfg.n_embd)
    return {"kernel": kernel, "bias": jnp.zeros((), jnp.float32)}


def init_scalar_model(key: jax.Array, cfg: ModelConfig) -> Params:
    """A GPT trunk plus a scalar head: {"gpt": params, "head": head}."""
    k_gpt, k_head = jax.random.split(key)
    return {"gpt": init_params(k_gpt, cfg), "head": init_scalar_head(k_head, cfg)}


def check_params(params: Params, cfg: ModelConfig, what: str = "params") -> None:
    """Raise a one-line ValueError naming the config field that the shapes of GPT `params` contradict.

    Reads only shapes (arrays, tracers or ShapeDtypeStructs alike), so it costs nothing inside jit. n_head
    changes no shape (the fused c_attn kernel is [D, 3D] for any head count) and cannot be checked here:
    it has to come from the config the params were trained with (a checkpoint's meta, config.json).
    """
    if not isinstance(params, Mapping) or "wte" not in params:
        if isinstance(params, Mapping) and {"gpt", "head"} <= set(params):
            raise ValueError(
                f"{what} are a scalar model {{'gpt', 'head'}} (a reward or value model), not GPT params; "
                "pass its ['gpt'] entry"
            )
        keys = sorted(params) if isinstance(params, Mapping) else type(params).__name__
        raise ValueError(
            f"{what} are not GPT params (got {keys}); expected model.init_params' wte, wpe, blocks"
        )
    vocab, width = params["wte"].shape
    layers = params["blocks"]["ln_1"]["scale"].shape[0]
    mlp = params["blocks"]["mlp"]["c_fc"]["kernel"].shape[-1]
    positions = params["wpe"].shape[0]
    found = [
        ("vocab_size", cfg.vocab_size, vocab, f"wte has {vocab} rows"),
        ("n_embd", cfg.n_embd, width, f"they are {width} wide"),
        ("n_layer", cfg.n_layer, layers, f"they stack {layers} blocks"),
        ("mlp_ratio", cfg.mlp_dim, mlp, f"the MLP is {mlp} wide"),
    ]
    for name, want, got, why in found:
        if want != got:
            raise ValueError(
                f"cfg.{name}={getattr(cfg, name)} does not match the {what}: {why}; pass the config "
                "they were built with"
            )
    if cfg.block_size > positions:
        raise ValueError(
            f"cfg.block_size={cfg.block_size} exceeds the {positions} position embeddings of the {what}; "
            f"use block_size <= {positions}"
        )


# ------------------------------------------------------------------------------------------- layers


def _dense(x: jax.Array, p: Params, dtype) -> jax.Array:
    """x @ kernel + bias on a 2-D view of x (the fast path of XLA:CPU). [..., Din] -> [..., Dout]."""
    kernel = p["kernel"].astype(dtype)
    y = x.reshape(-1, x.shape[-1]).astype(dtype) @ kernel + p["bias"].astype(dtype)
    return y.reshape(*x.shape[:-1], kernel.shape[-1])


def _layer_norm(x: jax.Array, p: Params, eps: float) -> jax.Array:
    """LayerNorm computed in float32, returned in x's dtype."""
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + eps)
    return (y * p["scale"].astype(jnp.float32) + p["bias"].astype(jnp.float32)).astype(x.dtype)


def _dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


_GELU_C = math.sqrt(2.0 / math.pi)


@jax.custom_vjp
def gelu_new(x: jax.Array) -> jax.Array:
    """GPT-2's "gelu_new": 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), = jax.nn.gelu(approximate=True).

    The hand-written backward keeps only x as residual and recomputes tanh: XLA:CPU's autodiff of
    jax.nn.gelu stores several [B*T, F] intermediates and made the whole train step ~1.3x slower.
    """
    return 0.5 * x * (1.0 + jnp.tanh(_GELU_C * (x + 0.044715 * x * x * x)))


def _gelu_fwd(x):
    return gelu_new(x), x


def _gelu_bwd(x, g):
    x2 = x * x
    t = jnp.tanh(_GELU_C * x * (1.0 + 0.044715 * x2))
    dt = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _GELU_C * (1.0 + 3 * 0.044715 * x2)
    return (g * dt,)


gelu_new.defvjp(_gelu_fwd, _gelu_bwd)


def _attend(q, k, v, mask, cfg: ModelConfig, key):
    """Softmax attention with heads folded into the batch (X = B*N), so both products are plain 3-D
    batched matmuls. q: [X, T, H], k/v: [X, S, H], mask: [B, 1|N, T, S] -> [X, T, H]."""
    X, T, H = q.shape
    S = k.shape[1]
    B = mask.shape[0]
    scores = jnp.einsum("xth,xsh->xts", q, k).reshape(B, X // B, T, S)  # [B, N, T, S]
    scores = scores.astype(jnp.float32) / math.sqrt(cfg.head_dim)
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype).reshape(X, T, S)
    probs = _dropout(probs, cfg.attn_pdrop, key)
    return jnp.einsum("xts,xsh->xth", probs, v)


def _block(p, x, mask, cfg: ModelConfig, key, kv=None, write_index=None):
    """One pre-LN transformer block.

    Args:
      p: this layer's params (leading L axis removed).
      x: [B, T, D] residual stream.
      mask: [B, 1, T, S] bool attention mask.
      key: dropout key or None.
      kv: optional cache of this layer, (k [B*N, S, H], v [B*N, S, H]); the k/v of the T new tokens are
        written at slot `write_index` and attention runs over all S slots.

    Returns:
      (x [B, T, D], kv).
    """
    B, T, D = x.shape
    dt = cfg.dtype
    keys = jax.random.split(key, 3) if key is not None else (None, None, None)
    h = _layer_norm(x, p["ln_1"], cfg.ln_eps)
    N, H = cfg.n_head, cfg.head_dim
    qkv = _dense(h, p["attn"]["c_attn"], dt).reshape(B, T, 3, N, H)
    q, k, v = qkv.transpose(2, 0, 3, 1, 4).reshape(3, B * N, T, H)  # one transpose, heads into batch
    if kv is not None:
        start = (0, write_index, 0)
        k_all = jax.lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype), start)
        v_all = jax.lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), start)
        kv = (k_all, v_all)
        k, v = k_all.astype(dt), v_all.astype(dt)  # [B*N, S, H]
    y = _attend(q, k, v, mask, cfg, keys[0])  # [B*N, T, H]
    y = y.reshape(B, N, T, H).transpose(0, 2, 1, 3).reshape(B, T, D)
    y = _dense(y, p["attn"]["c_proj"], dt)
    x = x + _dropout(y, cfg.resid_pdrop, keys[1])
    h = _layer_norm(x, p["ln_2"], cfg.ln_eps)
    h = gelu_new(_dense(h, p["mlp"]["c_fc"], dt))  # [B, T, F]
    h = _dense(h, p["mlp"]["c_proj"], dt)
    x = x + _dropout(h, cfg.resid_pdrop, keys[2])
    return x, kv


def _embed(params: Params, tokens, positions, cfg: ModelConfig, key):
    x = params["wte"][tokens].astype(cfg.dtype) + params["wpe"][positions].astype(cfg.dtype)
    return _dropout(x, cfg.embd_pdrop, key)  # [B, T, D]


def _run_blocks(params, x, mask, cfg: ModelConfig, key):
    """All L blocks under one `lax.scan` (training and scoring path). Returns x [B, T, D]."""
    layer_keys = jax.random.split(key, cfg.n_layer) if key is not None else None

    def body(x, xs):
        p, k = xs
        return _block(p, x, mask, cfg, k)[0], None

    if cfg.remat:
        body = jax.checkpoint(body, prevent_cse=False)
    # Unrolled for small depths: a rolled scan's per-layer slicing and the zero-filling of its stacked
    # [L, ...] residual buffers cost XLA:CPU 1.2-1.5x the gpt-micro train step (same-run ratios).
    unroll = cfg.n_layer if cfg.n_layer <= _UNROLL_MAX_LAYERS else 1
    x, _ = jax.lax.scan(body, x, (params["blocks"], layer_keys), unroll=unroll)
    return x


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


def _check_length(T: int, cfg: ModelConfig):
    if T > cfg.block_size:
        raise ValueError(
            f"sequence length {T} exceeds block_size={cfg.block_size}; truncate the input or use a "
            "config with a larger block_size."
        )


# ------------------------------------------------------------------------------------------ forward


def forward(
    params: Params,
    tokens: jax.Array,
    mask: jax.Array,
    cfg: ModelConfig,
    *,
    key: jax.Array | None = None,
) -> jax.Array:
    """The transformer trunk.

    Args:
      params: GPT params (see module docstring).
      tokens: [B, T] int ids.
      mask: [B, T] bool, True = real token (left or right padding, or both).
      cfg: the model config.
      key: dropout key; None means deterministic (evaluation).

    Returns:
      hidden: [B, T, D] final-layer-norm outputs in the compute dtype. Rows at padded positions are
      finite but meaningless.
    """
    _check_length(tokens.shape[1], cfg)
    mask = mask.astype(bool)
    k_embd, k_blocks = jax.random.split(key) if key is not None else (None, None)
    x = _embed(params, tokens, ops.positions_from_mask(mask), cfg, k_embd)
    attn_mask = ops.attention_mask(mask, mask)  # [B, 1, T, T]
    x = _run_blocks(params, x, attn_mask, cfg, k_blocks)
    return _layer_norm(x, params["ln_f"], cfg.ln_eps)


def lm_logits(params: Params, hidden: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Tied LM head: hidden [..., D] -> logits [..., V] float32 (next-token logits, see ops)."""
    wte = params["wte"].astype(cfg.dtype)
    flat = hidden.reshape(-1, hidden.shape[-1]).astype(cfg.dtype)
    logits = jax.lax.dot_general(flat, wte, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return logits.reshape(*hidden.shape[:-1], wte.shape[0])


def scalar_head(head: Params, hidden: jax.Array) -> jax.Array:
    """Linear scalar head in float32: hidden [..., D] -> [...]."""
    return hidden.astype(jnp.float32) @ head["kernel"].astype(jnp.float32) + head["bias"]


def logits_fn(params, tokens, mask, cfg: ModelConfig, *, key=None) -> jax.Array:
    """forward + tied LM head: [B, T] -> [B, T, V] float32."""
    return lm_logits(params, forward(params, tokens, mask, cfg, key=key), cfg)


def scalar_fn(params, tokens, mask, cfg: ModelConfig, *, key=None) -> jax.Array:
    """A scalar model ({"gpt", "head"}) on every position: [B, T] -> [B, T] float32."""
    return scalar_head(params["head"], forward(params["gpt"], tokens, mask, cfg, key=key))


# ----------------------------------------------------------------------------------------- KV cache


def init_cache(cfg: ModelConfig, batch: int, length: int) -> KVCache:
    """An empty cache of `length` slots (prompt + response) for `batch` rows."""
    _check_length(length, cfg)
    shape = (batch * cfg.n_head, length, cfg.head_dim)
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
    x = _embed(params, tokens, positions, cfg, None)
    cache_mask = jax.lax.dynamic_update_slice(cache.mask, token_mask, (0, cache.index))  # [B, S]
    slot = jnp.arange(S, dtype=jnp.int32)
    query_slot = cache.index + jnp.arange(T, dtype=jnp.int32)
    causal = slot[None, :] <= query_slot[:, None]  # [T, S]
    attn_mask = cache_mask[:, None, None, :] & causal[None, None]  # [B, 1, T, S]
    ks, vs = [], []
    for p, k, v in zip(unstack_blocks(params)["blocks"], cache.k, cache.v, strict=True):
        x, (k, v) = _block(p, x, attn_mask, cfg, None, (k, v), cache.index)
        ks.append(k)
        vs.append(v)
    hidden = _layer_norm(x, params["ln_f"], cfg.ln_eps)
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
