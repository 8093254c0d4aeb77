"""The decoder as stateless pure functions: init, forward (the trunk), the LM head and scalar heads.

Shape letters (used in every docstring of the package):
  B batch, T / S positions (query / key), D model width, N heads, H head dim (D / N), F MLP width,
  V vocabulary, L layers, P prompt length, R response length.

Params are a nested dict with GPT-2-like names; the L transformer blocks are stacked on a leading [L] axis
and run with `jax.lax.scan` (K = key / value heads, K = N without grouped-query attention):

  wte [V, D]   wpe [block_size, D] (learned positions only)   ln_f {scale, bias} [D]
  lm_head [V, D] (untied heads only)
  blocks/ln_1, ln_2 {scale, bias} [L, D]   (RMSNorm: scale only)
  blocks/attn/c_attn {kernel [L, D, (N + 2K) H], bias}: [q | k | v]
  blocks/attn/c_proj {kernel [L, N H, D], bias}
  blocks/attn/q_norm, k_norm {scale [L, H]} (Qwen3's qk-norm only)
  blocks/mlp/c_fc {kernel [L, D, F] (SwiGLU: [L, D, 2F] = [gate | up]), bias}
  blocks/mlp/c_proj {kernel [L, F, D], bias}

Biases exist where `cfg.bias` (and for c_attn `cfg.has_qkv_bias`) says so. The architecture is a set of
static switches of the ModelConfig (norm, position, mlp, n_kv_head, head_size, biases, qk_norm,
tie_embeddings), so GPT-2, Llama 3, Mistral and Qwen 2.5 / 3 are this one forward. The LM head is `wte`
unless `tie_embeddings` is False. Scalar heads (value, reward) are a separate {kernel [D], bias []} dict; a
"scalar model" is {"gpt": params, "head": head}.

Positions are derived from the padding mask (`ops.positions_from_mask`), so a left-padded prompt gets the
same logits on its real tokens as the unpadded one, with learned positions and with RoPE alike. Dense
layers run on 2-D [B*T, D] activations: XLA:CPU is several times slower on 3-D dot operands (see shared
notes).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from jaxrlhf import ops, xla_cpu
from jaxrlhf.models import armorm, layers
from jaxrlhf.models.config import ModelConfig
from jaxrlhf.parallel import constrain_batch

Params = dict


# ----------------------------------------------------------------------------------------------- init


def init_params(key: jax.Array, cfg: ModelConfig) -> Params:
    """GPT-2 initialisation: N(0, 0.02) weights, residual projections N(0, 0.02 / sqrt(2L)), zero biases,
    unit norm scales (for every architecture; imported weights replace it)."""
    L, D, F, V = cfg.n_layer, cfg.n_embd, cfg.mlp_dim, cfg.vocab_size
    N, K, H = cfg.n_head, cfg.kv_heads, cfg.head_dim
    k_wte, k_wpe, k_attn, k_aproj, k_fc, k_mproj = jax.random.split(key, 6)
    dt = cfg.pdtype
    std, proj_std = 0.02, 0.02 / math.sqrt(2 * L)

    def normal(k, shape, s):
        return (s * jax.random.normal(k, shape, jnp.float32)).astype(dt)

    def norm(*shape):
        p = {"scale": jnp.ones(shape, dt)}
        if cfg.norm == "layernorm":
            p["bias"] = jnp.zeros(shape, dt)
        return p

    def dense(k, din, dout, s, bias=cfg.bias):
        p = {"kernel": normal(k, (L, din, dout), s)}
        if bias:
            p["bias"] = jnp.zeros((L, dout), dt)
        return p

    attn = {
        "c_attn": dense(k_attn, D, (N + 2 * K) * H, std, cfg.has_qkv_bias),
        "c_proj": dense(k_aproj, N * H, D, proj_std),
    }
    if cfg.qk_norm:
        attn.update(q_norm=norm(L, H), k_norm=norm(L, H))
    ffn_in = 2 * F if cfg.mlp == "swiglu" else F
    params = {
        "wte": normal(k_wte, (V, D), std),
        "blocks": {
            "ln_1": norm(L, D),
            "attn": attn,
            "ln_2": norm(L, D),
            "mlp": {"c_fc": dense(k_fc, D, ffn_in, std), "c_proj": dense(k_mproj, F, D, proj_std)},
        },
        "ln_f": norm(D),
    }
    if cfg.position == "learned":
        params["wpe"] = normal(k_wpe, (cfg.block_size, D), std)
    if not cfg.tie_embeddings:
        params["lm_head"] = normal(jax.random.fold_in(key, 7), (V, D), std)
    return params


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

    Reads only shapes (arrays, tracers or ShapeDtypeStructs alike), so it costs nothing inside jit. The
    split of the attention width into heads changes no shape (GPT-2's fused c_attn kernel is [D, 3D] for
    any head count) and cannot be checked here: it has to come from the config the params were trained
    with (a checkpoint's meta, config.json).
    """
    if not isinstance(params, Mapping) or "wte" not in params:
        if isinstance(params, Mapping) and {"gpt", "head"} <= set(params):
            raise ValueError(
                f"{what} are a scalar model {{'gpt', 'head'}} (a reward or value model), not GPT params; "
                "pass its ['gpt'] entry"
            )
        keys = sorted(params) if isinstance(params, Mapping) else type(params).__name__
        raise ValueError(
            f"{what} are not GPT params (got {keys}); expected model.init_params' wte, blocks, ln_f"
        )
    vocab, width = params["wte"].shape
    layers = params["blocks"]["ln_1"]["scale"].shape[0]
    mlp = params["blocks"]["mlp"]["c_fc"]["kernel"].shape[-1]
    qkv = params["blocks"]["attn"]["c_attn"]["kernel"].shape[-1]
    mlp_name = "mlp_ratio" if cfg.intermediate_size is None else "intermediate_size"
    found = [
        ("vocab_size", cfg.vocab_size, vocab, f"wte has {vocab} rows"),
        ("n_embd", cfg.n_embd, width, f"they are {width} wide"),
        ("n_layer", cfg.n_layer, layers, f"they stack {layers} blocks"),
        (mlp_name, cfg.mlp_dim * (2 if cfg.mlp == "swiglu" else 1), mlp, f"the MLP is {mlp} wide"),
        ("n_kv_head", (cfg.n_head + 2 * cfg.kv_heads) * cfg.head_dim, qkv, f"q | k | v is {qkv} wide"),
    ]
    for name, want, got, why in found:
        if want != got:
            raise ValueError(
                f"cfg.{name}={getattr(cfg, name)} does not match the {what}: {why}; pass the config "
                "they were built with"
            )
    if cfg.position != "learned":
        return
    positions = params["wpe"].shape[0]
    if cfg.block_size > positions:
        raise ValueError(
            f"cfg.block_size={cfg.block_size} exceeds the {positions} position embeddings of the {what}; "
            f"use block_size <= {positions}"
        )


# ------------------------------------------------------------------------------------------- layers


def _attend(q, k, v, mask, cfg: ModelConfig, key):
    """Softmax attention with heads folded into the batch, so both products are plain 3-D batched matmuls.

    q: [B*N, T, H], k / v: [B*K, S, H], mask: [B, 1, T, S] -> [B*N, T, H]. With grouped-query attention
    (G = N / K query heads per kv head, head n reading kv head n // G as in transformers' repeat_kv) the
    G query heads of a kv head are stacked along the query axis: [B*K, G*T, H] against [B*K, S, H].
    """
    X, T, H = q.shape
    XK, S = k.shape[:2]
    B, G = mask.shape[0], X // XK
    scores = jnp.einsum("xth,xsh->xts", q.reshape(XK, G * T, H), k)  # [B*K, G*T, S]
    scores = scores.reshape(B, XK // B, G, T, S).astype(jnp.float32) / math.sqrt(cfg.head_dim)
    scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)  # [B, K, G, T, S]
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype).reshape(XK, G * T, S)
    probs = layers.dropout(probs, cfg.attn_pdrop, key)
    return jnp.einsum("xts,xsh->xth", probs, v).reshape(X, T, H)


def _qkv(p, h, cfg: ModelConfig, rope):
    """q [B*N, T, H], k and v [B*K, T, H] of the normed residual h [B, T, D]: one [q | k | v] matmul, then
    Qwen3's qk-norm and RoPE where the config has them."""
    B, T, _ = h.shape
    N, K, H = cfg.n_head, cfg.kv_heads, cfg.head_dim
    qkv = layers.dense(h, p["attn"]["c_attn"], cfg.dtype)  # [B, T, (N + 2K) H]
    if K == N and rope is None and not cfg.qk_norm:  # GPT-2: one transpose puts the heads into the batch
        q, k, v = qkv.reshape(B, T, 3, N, H).transpose(2, 0, 3, 1, 4).reshape(3, B * N, T, H)
        return q, k, v
    q = qkv[..., : N * H].reshape(B, T, N, H)
    k = qkv[..., N * H : (N + K) * H].reshape(B, T, K, H)
    v = qkv[..., (N + K) * H :].reshape(B, T, K, H)
    if cfg.qk_norm:
        q = layers.rms_norm(q, p["attn"]["q_norm"], cfg.ln_eps)
        k = layers.rms_norm(k, p["attn"]["k_norm"], cfg.ln_eps)
    if rope is not None:
        q, k = layers.apply_rope(q, *rope), layers.apply_rope(k, *rope)

    def heads_first(x):
        return x.transpose(0, 2, 1, 3).reshape(B * x.shape[2], T, H)

    return heads_first(q), heads_first(k), heads_first(v)


def block(p, x, mask, cfg: ModelConfig, key, kv=None, write_index=None, rope=None):
    """One pre-norm transformer block.

    Args:
      p: this layer's params (leading L axis removed).
      x: [B, T, D] residual stream.
      mask: [B, 1, T, S] bool attention mask.
      key: dropout key or None.
      kv: optional cache of this layer, (k [B*K, S, H], v [B*K, S, H]); the k/v of the T new tokens are
        written at slot `write_index` and attention runs over all S slots.
      rope: (cos, sin) [B, T, H] of the tokens' positions for RoPE models, else None.

    Returns:
      (x [B, T, D], kv).
    """
    x = constrain_batch(x)
    B, T, D = x.shape
    dt = cfg.dtype
    keys = jax.random.split(key, 3) if key is not None else (None, None, None)
    q, k, v = _qkv(p, layers.norm(x, p["ln_1"], cfg), cfg, rope)
    if kv is not None:
        start = (0, write_index, 0)
        k_all = jax.lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype), start)
        v_all = jax.lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), start)
        kv = (k_all, v_all)
        k, v = k_all.astype(dt), v_all.astype(dt)  # [B*K, S, H]
    y = _attend(q, k, v, mask, cfg, keys[0])  # [B*N, T, H]
    N, H = cfg.n_head, cfg.head_dim
    y = y.reshape(B, N, T, H).transpose(0, 2, 1, 3).reshape(B, T, N * H)
    y = layers.dense(y, p["attn"]["c_proj"], dt)
    x = x + layers.dropout(y, cfg.resid_pdrop, keys[1])
    h = layers.mlp(layers.norm(x, p["ln_2"], cfg), p["mlp"], cfg)
    x = x + layers.dropout(h, cfg.resid_pdrop, keys[2])
    return constrain_batch(x), kv


def embed(params: Params, tokens, positions, cfg: ModelConfig, key):
    """Token (+ learned position) embeddings, and the RoPE angles of `positions` (None without RoPE)."""
    x = params["wte"][tokens].astype(cfg.dtype)
    rope = None
    if cfg.position == "learned":
        x = x + params["wpe"][positions].astype(cfg.dtype)
    else:
        rope = layers.rope_angles(positions, cfg)
    return layers.dropout(x, cfg.embd_pdrop, key), rope  # [B, T, D]


def _run_blocks(params, x, mask, cfg: ModelConfig, key, rope=None, unroll: bool | None = None):
    """All L blocks under one `lax.scan` (training and scoring path). Returns x [B, T, D]."""
    layer_keys = jax.random.split(key, cfg.n_layer) if key is not None else None

    def body(x, xs):
        p, k = xs
        return block(p, x, mask, cfg, k, rope=rope)[0], None

    if cfg.remat:
        body = jax.checkpoint(body, prevent_cse=False)
    if unroll is None:
        unroll = xla_cpu.unroll_layers(cfg.n_layer)
    x, _ = jax.lax.scan(body, x, (params["blocks"], layer_keys), unroll=cfg.n_layer if unroll else 1)
    return x


def check_length(T: int, cfg: ModelConfig):
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
    unroll: bool | None = None,
) -> jax.Array:
    """The transformer trunk.

    Args:
      params: GPT params (see module docstring).
      tokens: [B, T] int ids.
      mask: [B, T] bool, True = real token (left or right padding, or both).
      cfg: the model config.
      key: dropout key; None means deterministic (evaluation).
      unroll: the layers as one unrolled program (True) or a rolled `lax.scan` (False); None: unrolled
        up to 12 layers (`xla_cpu.unroll_layers`). A rolled forward without gradient runs
        about as fast and compiles to a quarter of the code of gpt-micro's 4 layers (PPO's experience
        forwards: ~15 MB less host memory kept by the compiled program).

    Returns:
      hidden: [B, T, D] final-layer-norm outputs in the compute dtype. Rows at padded positions are
      finite but meaningless.
    """
    check_length(tokens.shape[1], cfg)
    mask = mask.astype(bool)
    k_embd, k_blocks = jax.random.split(key) if key is not None else (None, None)
    x, rope = embed(params, tokens, ops.positions_from_mask(mask), cfg, k_embd)
    attn_mask = ops.attention_mask(mask, mask)  # [B, 1, T, T]
    x = _run_blocks(params, x, attn_mask, cfg, k_blocks, rope, unroll)
    return layers.norm(x, params["ln_f"], cfg)


def lm_logits(params: Params, hidden: jax.Array, cfg: ModelConfig) -> jax.Array:
    """LM head (wte, or lm_head when untied): hidden [..., D] -> logits [..., V] float32 (next-token
    logits, see ops)."""
    wte = params["wte" if cfg.tie_embeddings else "lm_head"].astype(cfg.dtype)
    flat = hidden.reshape(-1, hidden.shape[-1]).astype(cfg.dtype)
    logits = jax.lax.dot_general(flat, wte, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return logits.reshape(*hidden.shape[:-1], wte.shape[0])


LOGPROB_CHUNK = 256  # positions per LM-head call in `lm_token_logprobs`


def lm_token_logprobs(
    params: Params,
    hidden: jax.Array,
    targets: jax.Array,
    cfg: ModelConfig,
    *,
    chunk: int = LOGPROB_CHUNK,
    temperature: float = 1.0,
) -> jax.Array:
    """log softmax(lm_logits(hidden) / temperature)[targets] in float32, without the [B, T, V] logits at once
    (the tempered policy a sampler at that temperature draws from, `rollout.policy_logits`).

    `ops.token_logprobs(lm_logits(params, hidden, cfg), targets)` for T <= chunk. Longer rows run the LM
    head on n = ceil(T / chunk) slices of ceil(T / n) positions in a `lax.map`, each under
    `jax.checkpoint`: forward and backward then hold one slice's [B, T / n, V] float32 logits (and their
    gradient) instead of the whole row's, for one more LM-head matmul in the backward pass. At V = 128256
    and T = 2k the full logits are 1 GiB per row, more than an 8B model's activations under remat.

    Args:
      params: GPT params (the LM head: wte, or lm_head when untied).
      hidden: [B, T, D] final hidden states (`forward`), already shifted so hidden[:, t] predicts
        targets[:, t] (see ops).
      targets: [B, T] int ids.
      cfg: the model config.
      chunk: the most positions per LM-head call.
      temperature: the policy's temperature (a Python float; 1.0 divides nothing).

    Returns:
      [B, T] float32 log-probabilities.
    """
    B, T, D = hidden.shape

    def logits(h):
        out = lm_logits(params, h, cfg)
        return out if temperature == 1.0 else out / temperature

    if T <= chunk:
        return ops.token_logprobs(logits(hidden), targets)
    n = -(-T // chunk)
    size = -(-T // n)
    pad = n * size - T
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(B, n, size, D).swapaxes(0, 1)
    targets = jnp.pad(targets, ((0, 0), (0, pad))).reshape(B, n, size).swapaxes(0, 1)

    @jax.checkpoint
    def one_slice(xs):
        h, t = xs  # [B, size, D], [B, size]
        return ops.token_logprobs(logits(constrain_batch(h)), t)  # [B, size]

    logprobs = jax.lax.map(one_slice, (hidden, targets))  # [n, B, size]
    return logprobs.swapaxes(0, 1).reshape(B, n * size)[:, :T]


def scalar_head(head: Params, hidden: jax.Array) -> jax.Array:
    """Linear scalar head in float32: hidden [..., D] -> [...]."""
    return hidden.astype(jnp.float32) @ head["kernel"].astype(jnp.float32) + head["bias"]


def logits_fn(params, tokens, mask, cfg: ModelConfig, *, key=None, unroll: bool | None = None) -> jax.Array:
    """forward + LM head: [B, T] -> [B, T, V] float32."""
    return lm_logits(params, forward(params, tokens, mask, cfg, key=key, unroll=unroll), cfg)


def scalar_fn(params, tokens, mask, cfg: ModelConfig, *, key=None, unroll: bool | None = None) -> jax.Array:
    """A scalar model ({"gpt", "head"}) on every position: [B, T] -> [B, T] float32."""
    return scalar_head(params["head"], forward(params["gpt"], tokens, mask, cfg, key=key, unroll=unroll))


def sequence_scores(scalar_params, tokens, mask, cfg: ModelConfig, *, key=None) -> jax.Array:
    """A scalar model read at the last real token of each row: [B, T] -> [B] float32 (a reward model's
    score, as its pairwise loss trains it and as transformers' *ForSequenceClassification reads it).

    An ArmoRM reward model ({"gpt", "armorm"}, `hf.load_reward_model` of a LlamaForRewardModelWithGating)
    gives its gated score (`armorm_outputs`), NaN for a row without the assistant header pattern."""
    if armorm.is_armorm(scalar_params):
        return armorm_outputs(scalar_params, tokens, mask, cfg, key=key).score
    return ops.gather_last(scalar_fn(scalar_params, tokens, mask, cfg, key=key), mask)


def armorm_outputs(
    params, tokens, mask, cfg: ModelConfig, *, key=None, unroll: bool | None = None
) -> armorm.ArmoOutputs:
    """An ArmoRM reward model {"gpt", "armorm"} on whole conversations [B, T]: (score [B], rewards [B, K],
    gating [B, K]) float32, as RLHFlow's LlamaForRewardModelWithGating computes them (`models.armorm`).

    Pure and jittable (cfg static). Under jit a row without the gating pattern has NaN score and gate;
    called eagerly it is refused in one line (ValueError, `armorm.check_gating_pattern`)."""
    armorm.check_if_concrete(params, tokens, mask)  # eagerly: refused before the trunk runs
    hidden = forward(params["gpt"], tokens, mask, cfg, key=key, unroll=unroll)
    return armorm.head_outputs(params[armorm.HEAD], hidden, tokens, mask)


def check_scalar_model(scalar_params, cfg: ModelConfig, what: str = "reward model") -> None:
    """Raise a one-line ValueError unless `scalar_params` is a scalar model {"gpt", "head"} whose shapes
    match `cfg` (see `check_params`)."""
    if isinstance(scalar_params, Mapping) and "wte" in scalar_params:
        raise ValueError(
            f"the {what} params are LM (GPT) params without a scalar head; a reward model is "
            '{"gpt": params, "head": init_scalar_head(...)} trained with train.make_rm_step'
        )
    if armorm.is_armorm(scalar_params):
        raise ValueError(
            f"the {what} is an ArmoRM (a gated multi-objective head, no scalar head): it gives sequence "
            "scores only (models.sequence_scores, models.armorm_outputs)"
        )
    if not isinstance(scalar_params, Mapping) or not {"gpt", "head"} <= set(scalar_params):
        keys = sorted(scalar_params) if isinstance(scalar_params, Mapping) else type(scalar_params).__name__
        raise ValueError(f"the {what} params are not a scalar model {{'gpt', 'head'}} (got {keys})")
    check_params(scalar_params["gpt"], cfg, what=f"{what}'s params")
    kernel = tuple(scalar_params["head"]["kernel"].shape)
    if kernel != (cfg.n_embd,):
        raise ValueError(
            f"the {what}'s head kernel is {kernel}, expected ({cfg.n_embd},) for n_embd={cfg.n_embd}"
        )


def answer_logprobs(
    params: Params, tokens, mask, loss_mask, cfg: ModelConfig, *, key=None, temperature: float = 1.0
) -> jax.Array:
    """Sum of log pi(token_t | tokens_<t) over the tokens where loss_mask: [B, T] -> [B] float32, pi the
    model's policy at `temperature` (logits / temperature).

    The LM head runs on slices of positions (`lm_token_logprobs`): the [B, T, V] logits are never held at
    once (DPO / REBEL steps and the online stages' teacher-forced logprobs)."""
    hidden = forward(params, tokens, mask, cfg, key=key)  # [B, T, D]
    token_lp = lm_token_logprobs(
        params, hidden[:, :-1], tokens[:, 1:], cfg, temperature=temperature
    )  # [B, T-1]
    return ops.masked_sum(token_lp, loss_mask[:, 1:] & mask[:, 1:], axis=-1)
