"""The layers the decoder is made of, as pure functions: dense, LayerNorm / RMSNorm, dropout, GPT-2's GELU,
SwiGLU and rotary position embeddings. Norms and RoPE compute in float32 and return the input's dtype."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxrlhf.models.config import ModelConfig

Params = dict


def dense(x: jax.Array, p: Params, dtype) -> jax.Array:
    """x @ kernel (+ bias) on a 2-D view of x (the fast path of XLA:CPU). [..., Din] -> [..., Dout]."""
    kernel = p["kernel"].astype(dtype)
    y = x.reshape(-1, x.shape[-1]).astype(dtype) @ kernel
    if "bias" in p:
        y = y + p["bias"].astype(dtype)
    return y.reshape(*x.shape[:-1], kernel.shape[-1])


def layer_norm(x: jax.Array, p: Params, eps: float) -> jax.Array:
    """LayerNorm (Ba et al. 2016) over the last axis: (x - mean) / sqrt(var + eps) * scale + bias."""
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + eps)
    return (y * p["scale"].astype(jnp.float32) + p["bias"].astype(jnp.float32)).astype(x.dtype)


def rms_norm(x: jax.Array, p: Params, eps: float) -> jax.Array:
    """RMSNorm (Zhang & Sennrich 2019) over the last axis: x / sqrt(mean(x^2) + eps) * scale, as Llama's."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + eps)
    return (y * p["scale"].astype(jnp.float32)).astype(x.dtype)


def norm(x: jax.Array, p: Params, cfg: ModelConfig) -> jax.Array:
    """The config's norm: LayerNorm or RMSNorm."""
    return (layer_norm if cfg.norm == "layernorm" else rms_norm)(x, p, cfg.ln_eps)


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
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


def mlp(x: jax.Array, p: Params, cfg: ModelConfig) -> jax.Array:
    """GPT-2's c_proj(gelu(c_fc x)), or SwiGLU (Shazeer 2020) c_proj(silu(gate x) * up x) with c_fc holding
    [gate | up] in one [D, 2F] matmul. [B, T, D] -> [B, T, D]."""
    h = dense(x, p["c_fc"], cfg.dtype)  # [B, T, F] or [B, T, 2F]
    if cfg.mlp == "swiglu":
        gate, up = jnp.split(h, 2, axis=-1)
        h = jax.nn.silu(gate) * up
    else:
        h = gelu_new(h)
    return dense(h, p["c_proj"], cfg.dtype)


def rope_frequencies(cfg: ModelConfig) -> jax.Array:
    """RoPE's inverse frequencies theta^(-2i / H), i < H / 2 (Su et al. 2021), float32 [H / 2], with Llama
    3.1's "llama3" scaling when `cfg.rope_scaling` is set: wavelengths longer than original_len /
    low_freq_factor are divided by `factor`, shorter than original_len / high_freq_factor kept, and the
    band between interpolated (as transformers' `_compute_llama3_parameters`)."""
    h = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
    if cfg.rope_scaling is None:
        return inv_freq
    factor, low, high, original = cfg.rope_scaling
    wavelen = 2.0 * math.pi / inv_freq
    scaled = jnp.where(wavelen > original / low, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    medium = (wavelen >= original / high) & (wavelen <= original / low)
    return jnp.where(medium, (1.0 - smooth) * scaled / factor + smooth * scaled, scaled)


def rope_angles(positions: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """(cos, sin) of the rotation at integer `positions` [B, T]: [B, T, H] float32 each, the H / 2
    frequencies repeated twice (the rotate-half layout of transformers' Llama)."""
    angles = positions.astype(jnp.float32)[..., None] * rope_frequencies(cfg)  # [B, T, H/2]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate q or k [B, T, heads, H] by the angles [B, T, H]: x cos + rotate_half(x) sin."""
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (xf * cos[:, :, None] + rotated * sin[:, :, None]).astype(x.dtype)
