"""jaxrlhf.ops against plain loop-based NumPy references, compared on jax.jit(fn) at 1e-5."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf import losses, ops

TOL = dict(rtol=1e-5, atol=1e-5)


def assert_close(actual, expected):
    np.testing.assert_allclose(np.asarray(actual, np.float64), np.asarray(expected), **TOL)


def random_mask(rng, b, t, p=0.6):
    """A [B, T] bool mask with random holes, one fully masked row and one full row."""
    mask = rng.random((b, t)) < p
    mask[0] = False
    mask[-1] = True
    return mask


# ------------------------------------------------------------------------- loop references


def ref_masked_stats(x, mask):
    """(sum, count, mean, biased var, unbiased var) over the True entries, by explicit loops."""
    total, count = 0.0, 0
    for value, keep in zip(x.ravel(), mask.ravel(), strict=True):
        if keep:
            total += float(value)
            count += 1
    mean = total / max(count, 1)
    sq = 0.0
    for value, keep in zip(x.ravel(), mask.ravel(), strict=True):
        if keep:
            sq += (float(value) - mean) ** 2
    return total, count, mean, sq / max(count, 1), sq / max(count - 1, 1)


def ref_log_softmax_row(row):
    top = max(float(v) for v in row)
    lse = top + math.log(sum(math.exp(float(v) - top) for v in row))
    return [float(v) - lse for v in row]


# ------------------------------------------------------------------------------ reductions


def test_masked_sum_and_mean_all_axes():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 7)).astype(np.float32)
    mask = random_mask(rng, 4, 7)
    total, count, mean, _, _ = ref_masked_stats(x, mask)
    assert_close(jax.jit(ops.masked_sum)(x, mask), total)
    assert_close(jax.jit(ops.masked_mean)(x, mask), mean)
    assert count > 0
    assert_close(jax.jit(ops.masked_mean)(x, None), x.astype(np.float64).mean())
    assert_close(jax.jit(ops.masked_sum)(x, None), x.astype(np.float64).sum())


def test_masked_sum_and_mean_per_row():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(5, 6)).astype(np.float32)
    mask = random_mask(rng, 5, 6)
    sums = [ref_masked_stats(x[b], mask[b])[0] for b in range(5)]
    means = [ref_masked_stats(x[b], mask[b])[2] for b in range(5)]
    assert_close(jax.jit(lambda x, m: ops.masked_sum(x, m, axis=1))(x, mask), sums)
    assert_close(jax.jit(lambda x, m: ops.masked_mean(x, m, axis=-1))(x, mask), means)
    assert means[0] == 0.0  # the fully masked row gives a finite 0, not 0/0


def test_masked_mean_empty_mask_is_zero_with_finite_grad():
    x = jnp.full((3, 4), 1e30, jnp.float32)
    mask = jnp.zeros((3, 4), bool)
    value, grad = jax.jit(jax.value_and_grad(ops.masked_mean))(x, mask)
    assert float(value) == 0.0
    assert np.all(np.asarray(grad) == 0.0)


@pytest.mark.parametrize("unbiased", [True, False])
def test_masked_var(unbiased):
    rng = np.random.default_rng(2)
    x = (3.0 + 2.0 * rng.normal(size=(4, 9))).astype(np.float32)
    mask = random_mask(rng, 4, 9)
    _, _, _, biased_var, unbiased_var = ref_masked_stats(x, mask)
    got = jax.jit(lambda x, m: ops.masked_var(x, m, unbiased=unbiased))(x, mask)
    assert_close(got, unbiased_var if unbiased else biased_var)
    got_all = jax.jit(lambda x: ops.masked_var(x, None, unbiased=unbiased))(x)
    assert_close(got_all, np.var(x.astype(np.float64), ddof=1 if unbiased else 0))


def test_masked_var_single_and_empty_entry_is_zero():
    x = jnp.asarray([[5.0, 7.0, 9.0]])
    one = jnp.asarray([[False, True, False]])
    none = jnp.zeros((1, 3), bool)
    assert float(jax.jit(ops.masked_var)(x, one)) == 0.0
    assert float(jax.jit(ops.masked_var)(x, none)) == 0.0


@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten(shift_mean):
    rng = np.random.default_rng(3)
    x = (1.5 + 4.0 * rng.normal(size=(3, 8))).astype(np.float32)
    mask = random_mask(rng, 3, 8)
    eps = 1e-8
    _, _, mean, _, var = ref_masked_stats(x, mask)
    expected = np.zeros(x.shape)
    for b in range(3):
        for t in range(8):
            if mask[b, t]:
                white = (float(x[b, t]) - mean) / math.sqrt(var + eps)
                expected[b, t] = white if shift_mean else white + mean
    got = jax.jit(lambda x, m: losses.whiten_advantages(x, m, shift_mean=shift_mean, eps=eps))(x, mask)
    assert_close(got, expected)


def test_masked_whiten_without_mask_has_zero_mean_unit_std():
    rng = np.random.default_rng(4)
    x = (10.0 + 3.0 * rng.normal(size=(4, 5))).astype(np.float32)
    x64 = x.astype(np.float64)
    expected = (x64 - x64.mean()) / math.sqrt(x64.var(ddof=1) + 1e-8)
    assert_close(jax.jit(losses.whiten_advantages)(x), expected)


# ------------------------------------------------------------------- log-softmax and logprobs


def test_log_softmax_is_float32_and_matches_loop():
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(2, 3, 11)).astype(np.float32)
    got = jax.jit(ops.log_softmax)(jnp.asarray(logits, jnp.bfloat16))
    assert got.dtype == jnp.float32
    got = jax.jit(ops.log_softmax)(logits)
    expected = [[ref_log_softmax_row(logits[b, t]) for t in range(3)] for b in range(2)]
    assert_close(got, expected)


def test_token_logprobs():
    rng = np.random.default_rng(6)
    b, t, v = 3, 5, 13
    logits = (3.0 * rng.normal(size=(b, t, v))).astype(np.float32)
    targets = rng.integers(0, v, size=(b, t))
    expected = np.zeros((b, t))
    for i in range(b):
        for j in range(t):
            expected[i, j] = ref_log_softmax_row(logits[i, j])[targets[i, j]]
    assert_close(jax.jit(ops.token_logprobs)(logits, targets), expected)
    got_bf16 = jax.jit(ops.token_logprobs)(jnp.asarray(logits, jnp.bfloat16), targets)
    assert got_bf16.dtype == jnp.float32


def test_token_logprobs_next_token_shift():
    """The documented shift: token_logprobs(logits[:, :-1], tokens[:, 1:]) scores tokens 1..T-1."""
    rng = np.random.default_rng(7)
    logits = rng.normal(size=(2, 6, 9)).astype(np.float32)
    tokens = rng.integers(0, 9, size=(2, 6))
    got = jax.jit(ops.token_logprobs)(logits[:, :-1], tokens[:, 1:])
    for i in range(2):
        for j in range(1, 6):
            assert_close(got[i, j - 1], ref_log_softmax_row(logits[i, j - 1])[tokens[i, j]])


def test_entropy():
    rng = np.random.default_rng(8)
    logits = (2.0 * rng.normal(size=(3, 4, 10))).astype(np.float32)
    expected = np.zeros((3, 4))
    for i in range(3):
        for j in range(4):
            logp = ref_log_softmax_row(logits[i, j])
            expected[i, j] = -sum(math.exp(lp) * lp for lp in logp)
    assert_close(jax.jit(ops.entropy)(logits), expected)
    uniform = jax.jit(ops.entropy)(jnp.zeros((1, 10)))
    assert_close(uniform, [math.log(10)])


# ------------------------------------------------------------------------------------ masks


def test_causal_mask():
    got = np.asarray(jax.jit(ops.causal_mask, static_argnums=0)(5))
    for q in range(5):
        for k in range(5):
            assert got[q, k] == (k <= q)


@pytest.mark.parametrize("causal", [True, False])
def test_attention_mask(causal):
    rng = np.random.default_rng(9)
    key_mask = random_mask(rng, 3, 6)
    got = jax.jit(lambda m: ops.attention_mask(m, m, causal=causal))(key_mask)
    # Without the causal part the mask is [B, 1, 1, S]; it must broadcast to [B, 1, T, S].
    got = np.broadcast_to(np.asarray(got), (3, 1, 6, 6))
    for b in range(3):
        for q in range(6):
            for k in range(6):
                assert got[b, 0, q, k] == (key_mask[b, k] and (k <= q or not causal))


def test_positions_from_mask_ignores_left_padding():
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1], [0, 0, 0, 0, 0]], bool)
    expected = np.zeros(mask.shape, np.int64)
    for b in range(mask.shape[0]):
        seen = 0
        for t in range(mask.shape[1]):
            if mask[b, t]:
                expected[b, t] = seen
                seen += 1
    got = np.asarray(jax.jit(ops.positions_from_mask)(mask))
    np.testing.assert_array_equal(got[mask], expected[mask])
    assert got.min() >= 0


def ref_mask_after_eos(tokens, eos_id, mask):
    keep = np.zeros(tokens.shape, bool)
    for b in range(tokens.shape[0]):
        stopped = False
        for t in range(tokens.shape[1]):
            real = True if mask is None else bool(mask[b, t])
            keep[b, t] = real and not stopped
            if real and tokens[b, t] == eos_id:
                stopped = True
    return keep


@pytest.mark.parametrize("with_mask", [False, True])
def test_mask_after_eos(with_mask):
    rng = np.random.default_rng(10)
    tokens = rng.integers(0, 4, size=(6, 8))
    tokens[0] = 1  # no EOS at all
    tokens[1, 0] = 0  # EOS first
    mask = random_mask(rng, 6, 8, p=0.8) if with_mask else None
    got = jax.jit(lambda t, m: ops.mask_after_eos(t, 0, m))(tokens, mask)
    np.testing.assert_array_equal(np.asarray(got), ref_mask_after_eos(tokens, 0, mask))


def test_last_index_and_gather_last():
    rng = np.random.default_rng(11)
    mask = random_mask(rng, 5, 7)
    x = rng.normal(size=(5, 7, 3)).astype(np.float32)
    expected_idx = np.zeros(5, np.int64)
    for b in range(5):
        for t in range(7):
            if mask[b, t]:
                expected_idx[b] = t
    np.testing.assert_array_equal(np.asarray(jax.jit(ops.last_index)(mask)), expected_idx)
    assert expected_idx[0] == 0  # the all-False row
    got = jax.jit(ops.gather_last)(x, mask)
    assert_close(got, np.stack([x[b, expected_idx[b]] for b in range(5)]))
    got_2d = jax.jit(ops.gather_last)(x[..., 0], mask)
    assert_close(got_2d, [x[b, expected_idx[b], 0] for b in range(5)])
