"""The pure-function GPT: masks, positions, KV cache, dtypes, heads."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf import models, ops
from jaxrlhf.models import ModelConfig


@pytest.fixture(scope="module")
def setup(tiny_cfg):
    params = models.init_params(jax.random.key(0), tiny_cfg)
    tokens = jax.random.randint(jax.random.key(1), (3, 11), 0, tiny_cfg.vocab_size)
    return tiny_cfg, params, tokens


def _logits(params, tokens, mask, cfg):
    return jax.jit(models.logits_fn, static_argnums=3)(params, tokens, mask, cfg)


def test_presets_and_param_count():
    cfg = ModelConfig.preset("gpt2")
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.vocab_size) == (12, 12, 768, 50257)
    assert cfg.num_params == 124_439_808  # GPT-2 small, tied head
    micro = ModelConfig.preset("gpt-micro", vocab_size=100, block_size=32)
    params = models.init_params(jax.random.key(0), micro)
    assert sum(x.size for x in jax.tree.leaves(params)) == micro.num_params
    assert params["blocks"]["attn"]["c_attn"]["kernel"].shape == (4, 128, 384)
    with pytest.raises(ValueError, match="unknown model preset"):
        ModelConfig.preset("gpt-huge")
    with pytest.raises(ValueError, match="not divisible"):
        ModelConfig(vocab_size=10, block_size=8, n_layer=1, n_head=3, n_embd=16)


def test_init_statistics():
    cfg = ModelConfig(vocab_size=512, block_size=64, n_layer=8, n_head=4, n_embd=256)
    p = models.init_params(jax.random.key(0), cfg)
    assert np.std(p["wte"]) == pytest.approx(0.02, rel=0.02)
    assert np.std(p["blocks"]["mlp"]["c_fc"]["kernel"]) == pytest.approx(0.02, rel=0.02)
    proj = 0.02 / np.sqrt(2 * cfg.n_layer)
    assert np.std(p["blocks"]["mlp"]["c_proj"]["kernel"]) == pytest.approx(proj, rel=0.02)
    assert np.std(p["blocks"]["attn"]["c_proj"]["kernel"]) == pytest.approx(proj, rel=0.02)
    assert np.all(p["blocks"]["ln_1"]["scale"] == 1) and np.all(p["blocks"]["attn"]["c_attn"]["bias"] == 0)


def test_causality(setup):
    cfg, params, tokens = setup
    mask = jnp.ones(tokens.shape, bool)
    base = _logits(params, tokens, mask, cfg)
    changed = tokens.at[:, 6].set((tokens[:, 6] + 1) % cfg.vocab_size)
    out = _logits(params, changed, mask, cfg)
    np.testing.assert_allclose(out[:, :6], base[:, :6], atol=1e-6)
    assert np.abs(out[:, 6:] - base[:, 6:]).max() > 1e-3


@pytest.mark.parametrize("side", ["left", "right", "both"])
def test_padding_invariance(setup, side):
    cfg, params, tokens = setup
    mask = jnp.ones(tokens.shape, bool)
    base = _logits(params, tokens, mask, cfg)
    left = 4 if side in ("left", "both") else 0
    right = 5 if side in ("right", "both") else 0
    junk = jax.random.randint(jax.random.key(9), (3, left + right + tokens.shape[1]), 0, 37)
    padded = junk.at[:, left : left + tokens.shape[1]].set(tokens)
    pmask = jnp.zeros(padded.shape, bool).at[:, left : left + tokens.shape[1]].set(True)
    out = _logits(params, padded, pmask, cfg)
    np.testing.assert_allclose(out[:, left : left + tokens.shape[1]], base, atol=1e-5)


def test_kv_cache_equals_full_forward(setup):
    cfg, params, tokens = setup
    # Rows with different amounts of left padding.
    mask = jnp.ones(tokens.shape, bool).at[1, :3].set(False).at[2, :5].set(False)
    full = jax.jit(models.forward, static_argnums=3)(params, tokens, mask, cfg)
    P = 6
    prefill = jax.jit(models.prefill, static_argnums=(3, 4))
    decode = jax.jit(models.decode_step, static_argnums=3)
    hidden, cache = prefill(params, tokens[:, :P], mask[:, :P], cfg, tokens.shape[1])
    np.testing.assert_allclose(hidden[mask[:, :P]], full[:, :P][mask[:, :P]], atol=1e-5)
    for t in range(P, tokens.shape[1]):
        h, cache = decode(params, tokens[:, t], cache, cfg)
        np.testing.assert_allclose(h, full[:, t], atol=1e-5)
    assert int(cache.index) == tokens.shape[1]
    np.testing.assert_array_equal(cache.positions, mask.sum(-1))


def test_decoding_params_give_the_same_decode_step(setup):
    cfg, params, tokens = setup
    mask = jnp.ones(tokens.shape, bool).at[1, :3].set(False)
    P, B = 6, tokens.shape[0]
    _, cache = jax.jit(models.prefill, static_argnums=(3, 4))(params, tokens[:, :P], mask[:, :P], cfg, 11)
    step_params = models.kv_cache.decoding_params(params, B)
    biases = [x for x in jax.tree.leaves(step_params["blocks"]) if x.ndim == 2 and x.shape[0] == B]
    assert len(biases) == 4 * cfg.n_layer  # c_attn, attn c_proj, c_fc, mlp c_proj: [B, Dout] each
    decode = jax.jit(models.decode_step, static_argnums=3)
    h_ref, cache_ref = decode(params, tokens[:, P], cache, cfg)
    h, cache_new = decode(step_params, tokens[:, P], cache, cfg)
    np.testing.assert_array_equal(h, h_ref)  # the same elementwise adds: bit for bit
    for a, b in zip(jax.tree.leaves(cache_new), jax.tree.leaves(cache_ref), strict=True):
        np.testing.assert_array_equal(a, b)


def test_sequence_too_long_is_a_clear_error(setup):
    cfg, params, _ = setup
    tokens = jnp.zeros((1, cfg.block_size + 1), jnp.int32)
    with pytest.raises(ValueError, match="exceeds block_size"):
        models.forward(params, tokens, jnp.ones(tokens.shape, bool), cfg)


def test_bf16_compute_keeps_float32_logits(setup):
    cfg, params, tokens = setup
    mask = jnp.ones(tokens.shape, bool)
    bf = dataclasses.replace(cfg, compute_dtype="bfloat16")
    logits = _logits(params, tokens, mask, bf)
    assert logits.dtype == jnp.float32
    ref = _logits(params, tokens, mask, cfg)
    assert np.abs(logits - ref).max() < 0.1
    assert models.forward(params, tokens, mask, bf).dtype == jnp.bfloat16


def test_bf16_params():
    cfg = ModelConfig(vocab_size=37, block_size=16, n_layer=2, n_head=2, n_embd=16, param_dtype="bfloat16")
    p = models.init_params(jax.random.key(0), cfg)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(p))
    logits = models.logits_fn(p, jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4), bool), cfg)
    assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))


def test_scalar_model_and_last_token(setup):
    cfg, _, tokens = setup
    sp = models.init_scalar_model(jax.random.key(3), cfg)
    sp["head"]["kernel"] = jax.random.normal(jax.random.key(4), (cfg.n_embd,))
    mask = jnp.ones(tokens.shape, bool).at[0, 7:].set(False)
    values = models.scalar_fn(sp, tokens, mask, cfg)
    assert values.shape == tokens.shape and values.dtype == jnp.float32
    last = ops.gather_last(values, mask)
    assert float(last[0]) == pytest.approx(float(values[0, 6]))
    assert float(last[1]) == pytest.approx(float(values[1, -1]))


def test_finite_gradients_with_fully_masked_row(setup):
    cfg, params, tokens = setup
    mask = jnp.ones(tokens.shape, bool).at[1].set(False)

    def loss(p):
        logits = models.logits_fn(p, tokens, mask, cfg)
        lp = ops.token_logprobs(logits[:, :-1], tokens[:, 1:])
        return -ops.masked_mean(lp, mask[:, 1:])

    grads = jax.jit(jax.grad(loss))(params)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


def test_remat_and_dropout(setup):
    cfg, params, tokens = setup
    mask = jnp.ones(tokens.shape, bool)

    # Jitted (the config static): op-by-op, the scanned blocks' grads take many times longer.
    @functools.partial(jax.jit, static_argnums=1)
    def loss(p, c, key=None):
        return jnp.mean(models.logits_fn(p, tokens, mask, c, key=key) ** 2)

    grad = jax.jit(jax.grad(loss.__wrapped__), static_argnums=1)
    g = grad(params, cfg)
    g_remat = grad(params, dataclasses.replace(cfg, remat=True))
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_remat), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    drop = dataclasses.replace(cfg, embd_pdrop=0.1, resid_pdrop=0.1, attn_pdrop=0.1)
    k = jax.random.key(5)
    assert float(loss(params, drop)) == pytest.approx(float(loss(params, cfg)))  # no key: eval mode
    assert float(loss(params, drop, k)) == float(loss(params, drop, k))
    assert float(loss(params, drop, k)) != pytest.approx(float(loss(params, cfg)), rel=1e-4)


def test_gelu_new_value_and_grad_match_numpy_reference():
    """The custom-vjp gelu_new against a loop-free NumPy float64 reference of GPT-2's tanh GELU and its
    analytic derivative (and against jax.nn.gelu(approximate=True))."""
    x = np.linspace(-12.0, 12.0, 2001, dtype=np.float32)
    x64 = x.astype(np.float64)
    c = np.sqrt(2.0 / np.pi)
    t = np.tanh(c * (x64 + 0.044715 * x64**3))
    ref = 0.5 * x64 * (1.0 + t)
    dref = 0.5 * (1.0 + t) + 0.5 * x64 * (1.0 - t**2) * c * (1.0 + 3 * 0.044715 * x64**2)
    y = jax.jit(models.layers.gelu_new)(jnp.asarray(x))
    g = jax.jit(jax.grad(lambda v: jnp.sum(models.layers.gelu_new(v))))(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-6)
    # atol 1e-5: where the derivative is ~1e-6 (x near -5) float32 cancellation in 0.5 * (1 + tanh) costs
    # ~3e-6, the same error as autodiff of jax.nn.gelu.
    np.testing.assert_allclose(np.asarray(g), dref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(y), np.asarray(jax.nn.gelu(x, approximate=True)), atol=1e-6)


def test_lm_token_logprobs_in_slices_match_a_loop_reference():
    # 37 positions in slices of at most 8: 5 slices of 8, the last 3 positions padding.
    cfg = ModelConfig.preset("tiny-llama", vocab_size=97, block_size=64, tie_embeddings=False)
    params = models.init_params(jax.random.key(0), cfg)
    hidden = jax.random.normal(jax.random.key(1), (3, 37, cfg.n_embd), jnp.float32)
    targets = jax.random.randint(jax.random.key(2), (3, 37), 0, cfg.vocab_size)
    sliced = jax.jit(lambda p, h: models.lm_token_logprobs(p, h, targets, cfg, chunk=8))
    got = np.asarray(sliced(params, hidden))
    head, h, t = (
        np.asarray(params["lm_head"], np.float64),
        np.asarray(hidden, np.float64),
        np.asarray(targets),
    )
    want = np.zeros(t.shape)
    for b in range(t.shape[0]):
        for i in range(t.shape[1]):
            z = head @ h[b, i]
            want[b, i] = z[t[b, i]] - z.max() - np.log(np.sum(np.exp(z - z.max())))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    whole = jax.jit(lambda p, h: models.lm_token_logprobs(p, h, targets, cfg, chunk=37))  # one slice
    np.testing.assert_allclose(np.asarray(whole(params, hidden)), want, rtol=1e-5, atol=1e-5)
    # Gradients (params and hidden) as autodiff of the full [B, T, V] logits gives them.
    weights = jax.random.normal(jax.random.key(3), targets.shape)

    def loss(fn):
        return jax.jit(jax.grad(lambda p, h: jnp.sum(weights * fn(p, h)), argnums=(0, 1)))

    full = loss(lambda p, h: ops.token_logprobs(models.lm_logits(p, h, cfg), targets))(params, hidden)
    for a, b in zip(jax.tree.leaves(loss(sliced)(params, hidden)), jax.tree.leaves(full), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_lm_token_logprobs_never_holds_the_whole_logits():
    # XLA's own buffer assignment of the gradient program: the full path holds [B, T, V] float32 logits
    # (and more); the sliced one at most a few [B, T / n, V] slices.
    cfg = ModelConfig.preset("tiny-llama", vocab_size=4096, block_size=512, n_embd=16)
    params = jax.eval_shape(lambda k: models.init_params(k, cfg), jax.random.key(0))
    hidden = jax.ShapeDtypeStruct((2, 512, 16), jnp.float32)
    targets = jnp.zeros((2, 512), jnp.int32)
    logits_bytes = 2 * 512 * 4096 * 4

    def temp_bytes(chunk):
        grad = jax.grad(lambda p, h: jnp.sum(models.lm_token_logprobs(p, h, targets, cfg, chunk=chunk)))
        return jax.jit(grad).lower(params, hidden).compile().memory_analysis().temp_size_in_bytes

    assert temp_bytes(512) > logits_bytes  # one slice: the whole logits (the measure sees them)
    assert temp_bytes(64) < logits_bytes / 2
