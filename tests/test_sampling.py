"""The jitted KV-cache sampler."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxrlhf import models, ops, xla_cpu
from jaxrlhf.models import ModelConfig
from jaxrlhf.rollout import SampleConfig, sampler

CFG = ModelConfig(vocab_size=23, block_size=32, n_layer=2, n_head=2, n_embd=16)


@pytest.fixture(scope="module")
def params():
    p = models.init_params(jax.random.key(0), CFG)
    # Sharper distributions than the 0.02 init gives, so greedy and top-k are meaningful.
    return jax.tree.map(lambda x: x * 8 if x.ndim >= 2 else x, p)


def _prompt(batch=4, length=5):
    prompt = jax.random.randint(jax.random.key(7), (batch, length), 1, CFG.vocab_size)
    mask = jnp.ones((batch, length), bool).at[1, :2].set(False).at[3, :4].set(False)
    return jnp.where(mask, prompt, 0), mask


def _teacher_forced(params, r):
    logits = models.logits_fn(params, r.tokens, r.mask, CFG)
    P_ = r.prompt.shape[1]
    return logits[:, P_ - 1 : -1]  # [B, R, V] logits predicting each response token


def test_greedy_equals_teacher_forced_argmax(params):
    prompt, mask = _prompt()
    r = sampler.sample(
        params,
        prompt,
        mask,
        CFG,
        SampleConfig(max_new_tokens=9, temperature=0.0),
        key=jax.random.key(0),
    )
    logits = _teacher_forced(params, r)
    np.testing.assert_array_equal(r.response, jnp.argmax(logits, -1))
    assert bool(r.response_mask.all())
    np.testing.assert_allclose(r.logprobs, ops.token_logprobs(logits, r.response), atol=1e-5)


def test_logprobs_match_teacher_forced_forward(params):
    prompt, mask = _prompt()
    cfg = SampleConfig(max_new_tokens=10, temperature=0.7, top_k=5, eos_id=3)
    r = sampler.sample(params, prompt, mask, CFG, cfg, key=jax.random.key(1))
    # The tempered, unfiltered policy: log_softmax(logits / T) of the teacher-forced forward.
    expected = jax.nn.log_softmax(_teacher_forced(params, r) / 0.7, axis=-1)
    expected = jnp.take_along_axis(expected, r.response[..., None], -1)[..., 0]
    np.testing.assert_allclose(r.logprobs, jnp.where(r.response_mask, expected, 0.0), atol=1e-5)


def test_top_k_never_leaves_top_k(params):
    prompt, mask = _prompt(batch=16)
    for k in (1, 3):
        r = sampler.sample(
            params,
            prompt,
            mask,
            CFG,
            SampleConfig(max_new_tokens=8, top_k=k),
            key=jax.random.key(k),
        )
        logits = _teacher_forced(params, r)
        rank = jnp.sum(logits > jnp.take_along_axis(logits, r.response[..., None], -1), -1)
        assert int(rank.max()) < k


def test_top_p_stays_in_nucleus(params):
    prompt, mask = _prompt(batch=16)
    top_p = 0.6
    r = sampler.sample(
        params,
        prompt,
        mask,
        CFG,
        SampleConfig(max_new_tokens=8, top_p=top_p),
        key=jax.random.key(2),
    )
    probs = jax.nn.softmax(_teacher_forced(params, r), -1)
    chosen = jnp.take_along_axis(probs, r.response[..., None], -1)[..., 0]
    mass_above = jnp.sum(jnp.where(probs > chosen[..., None], probs, 0.0), -1)
    assert float(mass_above.max()) < top_p


def _chi2_critical(df, z=3.719):  # Wilson-Hilferty, upper 1e-4 tail
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize("top_k,temperature", [(0, 1.0), (4, 1.5)])
def test_sampled_frequencies_match_softmax(params, top_k, temperature):
    n = 20000
    prompt = jnp.full((n, 3), 5, jnp.int32)
    mask = jnp.ones((n, 3), bool)
    cfg = SampleConfig(max_new_tokens=1, top_k=top_k, temperature=temperature)
    r = sampler.sample(params, prompt, mask, CFG, cfg, key=jax.random.key(11))
    logits = np.asarray(models.logits_fn(params, prompt[:1], mask[:1], CFG)[0, -1], np.float64)
    z = logits / temperature
    if top_k:
        z = np.where(z >= np.sort(z)[-top_k], z, -np.inf)
    p = np.exp(z - z.max())
    p /= p.sum()
    counts = np.bincount(np.asarray(r.response[:, 0]), minlength=CFG.vocab_size)
    assert counts[p == 0].sum() == 0
    support = p > 0
    expected = n * p[support]
    chi2 = float(np.sum((counts[support] - expected) ** 2 / expected))
    assert chi2 < _chi2_critical(int(support.sum()) - 1), chi2


def test_same_key_same_rollout_and_no_recompile(params):
    prompt, mask = _prompt()
    cfg = SampleConfig(max_new_tokens=8, top_k=10)
    a = sampler.sample(params, prompt, mask, CFG, cfg, key=jax.random.key(3))
    size = sampler._sample_jit._cache_size()
    b = sampler.sample(params, prompt, mask, CFG, cfg, key=jax.random.key(3))
    c = sampler.sample(params, prompt, mask, CFG, cfg, key=jax.random.key(4))
    assert sampler._sample_jit._cache_size() == size
    np.testing.assert_array_equal(a.response, b.response)
    np.testing.assert_array_equal(a.logprobs, b.logprobs)
    assert not np.array_equal(a.response, c.response)


def test_eos_stops_each_row_and_masks_after(params):
    prompt, mask = _prompt()
    greedy = SampleConfig(max_new_tokens=12, temperature=0.0)
    free = sampler.sample(params, prompt, mask, CFG, greedy, key=jax.random.key(0))
    eos = int(free.response[0, 2])
    cfg = dataclasses.replace(greedy, eos_id=eos, pad_id=0)
    r = sampler.sample(params, prompt, mask, CFG, cfg, key=jax.random.key(0))
    for b in range(prompt.shape[0]):
        row = np.asarray(free.response[b])
        hits = np.flatnonzero(row == eos)
        stop = hits[0] + 1 if hits.size else len(row)
        np.testing.assert_array_equal(r.response[b, :stop], row[:stop])
        assert bool(r.response_mask[b, :stop].all()) and not bool(r.response_mask[b, stop:].any())
        assert bool((r.response[b, stop:] == 0).all()) and bool((r.logprobs[b, stop:] == 0).all())
        assert bool(r.finished[b]) == bool(hits.size)
        assert int(r.response_length[b]) == stop
    assert int(r.response_length[0]) <= 3


def test_early_exit_when_all_rows_finish(params):
    prompt, mask = _prompt()
    greedy = SampleConfig(max_new_tokens=12, temperature=0.0)
    free = sampler.sample(params, prompt, mask, CFG, greedy, key=jax.random.key(0))
    # Every row's first token as EOS -> finishing after one step must be correct for all rows whose
    # first token is that id; rows with another first token keep going.
    eos = int(free.response[0, 0])
    r = sampler.sample(
        params, prompt, mask, CFG, dataclasses.replace(greedy, eos_id=eos), key=jax.random.key(0)
    )
    assert int(r.response_length[0]) == 1
    single = sampler.sample(
        params,
        prompt[:1],
        mask[:1],
        CFG,
        dataclasses.replace(greedy, eos_id=eos),
        key=jax.random.key(0),
    )
    assert int(single.response_length[0]) == 1 and bool(single.finished[0])


def test_sharded_batch_matches_single_device(params):
    devices = jax.devices()
    assert len(devices) == 8
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    prompt = jax.random.randint(jax.random.key(5), (16, 4), 1, CFG.vocab_size)
    mask = jnp.ones((16, 4), bool)
    cfg = SampleConfig(max_new_tokens=6, top_k=5)
    ref = sampler.sample(params, prompt, mask, CFG, cfg, key=jax.random.key(8))
    sharding = NamedSharding(mesh, P("data"))
    sp, sm = jax.device_put(prompt, sharding), jax.device_put(mask, sharding)
    rep = jax.device_put(params, NamedSharding(mesh, P()))
    out = sampler.sample(rep, sp, sm, CFG, cfg, key=jax.random.key(8))
    assert len(out.response.sharding.device_set) == 8
    np.testing.assert_array_equal(out.response, ref.response)
    np.testing.assert_allclose(out.logprobs, ref.logprobs, rtol=1e-5, atol=1e-5)


def test_bad_prompts_are_clear_errors(params):
    prompt, _ = _prompt()
    right_padded = jnp.ones(prompt.shape, bool).at[0, -2:].set(False)
    with pytest.raises(ValueError, match="left-padded"):
        sampler.sample(
            params, prompt, right_padded, CFG, SampleConfig(max_new_tokens=4), key=jax.random.key(0)
        )
    with pytest.raises(ValueError, match="exceeds block_size"):
        sampler.sample(
            params,
            prompt,
            jnp.ones(prompt.shape, bool),
            CFG,
            SampleConfig(max_new_tokens=40),
            key=jax.random.key(0),
        )
    with pytest.raises(ValueError, match="top_p"):
        SampleConfig(max_new_tokens=4, top_p=0.0)


def test_stop_ids_end_rows_like_eos(params):
    prompt, mask = _prompt()
    greedy = SampleConfig(max_new_tokens=12, temperature=0.0)
    free = sampler.sample(params, prompt, mask, CFG, greedy, key=jax.random.key(0))
    stop = int(free.response[0, 2])
    as_eos = sampler.sample(
        params, prompt, mask, CFG, dataclasses.replace(greedy, eos_id=stop), key=jax.random.key(0)
    )
    as_stop = sampler.sample(
        params, prompt, mask, CFG, dataclasses.replace(greedy, stop_ids=(stop,)), key=jax.random.key(0)
    )
    for name in ("response", "response_mask", "logprobs", "finished"):
        np.testing.assert_array_equal(getattr(as_stop, name), getattr(as_eos, name), err_msg=name)
    # eos_id and stop_ids together: each row stops after the first of either; rows with neither run on.
    other = int(free.response[1, 4])
    both = dataclasses.replace(greedy, eos_id=other, stop_ids=(stop, CFG.vocab_size - 1), pad_id=0)
    r = sampler.sample(params, prompt, mask, CFG, both, key=jax.random.key(0))
    for b in range(prompt.shape[0]):
        row = np.asarray(free.response[b])
        hits = np.flatnonzero(np.isin(row, [stop, other, CFG.vocab_size - 1]))
        end = hits[0] + 1 if hits.size else len(row)
        np.testing.assert_array_equal(r.response[b, :end], row[:end])
        np.testing.assert_array_equal(r.logprobs[b, :end], free.logprobs[b, :end])
        assert bool(r.response_mask[b, :end].all()) and not bool(r.response_mask[b, end:].any())
        assert bool((r.response[b, end:] == 0).all()) and bool((r.logprobs[b, end:] == 0).all())
        assert bool(r.finished[b]) == bool(hits.size)
    assert int(r.response_length[0]) <= 3 and int(r.response_length[1]) <= 5


def test_stop_ids_are_checked(params):
    cfg = SampleConfig(max_new_tokens=4, eos_id=3, stop_ids=[7, 2, 7])
    assert cfg.stop_ids == (2, 7) and cfg.stops == (2, 3, 7) and hash(cfg) == hash(dataclasses.replace(cfg))
    assert SampleConfig(max_new_tokens=4).stops == ()
    for bad in ((1.5,), (True,), 5, (-1,)):
        with pytest.raises(ValueError, match="stop_ids"):
            SampleConfig(max_new_tokens=4, stop_ids=bad)
    prompt, mask = _prompt()
    with pytest.raises(ValueError, match=r"stop_ids has 23, outside the vocabulary \[0, 23\)"):
        sampler.sample(
            params, prompt, mask, CFG, SampleConfig(max_new_tokens=4, stop_ids=(3, 23)), key=jax.random.key(0)
        )


def _top_k_reference(logits, k):
    """Plain loop: keep the entries of each row with fewer than k strictly larger entries (all ties with
    the k-th largest value), the rest get finfo.min."""
    out = np.full(logits.shape, np.finfo(np.float32).min, np.float32)
    for b in range(logits.shape[0]):
        for v in range(logits.shape[1]):
            if sum(1 for w in logits[b] if w > logits[b, v]) < k:
                out[b, v] = logits[b, v]
    return out


def test_top_k_filter_matches_loop_reference_with_ties():
    rng = np.random.default_rng(0)
    V = 40
    normal = rng.standard_normal((6, V)).astype(np.float32)
    ties = np.round(rng.standard_normal((6, V)) * 2).astype(np.float32)  # few distinct values
    special = ties.copy()
    special[:, :4] = [0.0, -0.0, np.finfo(np.float32).min, np.finfo(np.float32).max]
    special[0] = -0.0  # a row of signed zeros: all tie
    special[1, 5:] = np.finfo(np.float32).min  # fewer than k entries left by an earlier filter
    logits = np.concatenate([normal, ties, special])
    for k in (1, 2, 5, 17, V - 1):
        cfg = SampleConfig(max_new_tokens=1, top_k=k)
        got = np.asarray(jax.jit(lambda x, c=cfg: sampler.truncate_logits(x, c))(logits))
        np.testing.assert_array_equal(got, _top_k_reference(logits, k), err_msg=f"k={k}")
        assert (np.sum(got == logits, -1) >= k).all()  # at least k kept in every row


def test_sortable_keys_order_like_floats():
    rng = np.random.default_rng(1)
    x = np.concatenate(
        [
            rng.standard_normal(200) * 10.0 ** rng.integers(-30, 30, 200),  # no subnormals (XLA:CPU flushes)
            np.array([0.0, -0.0, 1.5, -1.5, np.inf, -np.inf], np.float32),
            np.array([np.finfo(np.float32).min, np.finfo(np.float32).max], np.float32),
        ]
    ).astype(np.float32)
    keys = np.asarray(jax.jit(xla_cpu.sortable_keys)(x)).astype(np.int64)
    np.testing.assert_array_equal(keys[:, None] >= keys[None, :], x[:, None] >= x[None, :])
    np.testing.assert_array_equal(keys[:, None] == keys[None, :], x[:, None] == x[None, :])


def test_top_k_rollout_bitwise_equal_to_counting_filter(params, monkeypatch):
    """The sort-of-keys top-k gives the same rollout, bit for bit, as the earlier filter that counted the
    larger entries of each one ([B, V, V])."""
    prompt, mask = _prompt(batch=8)
    cfg = SampleConfig(max_new_tokens=8, top_k=4, temperature=0.9)
    new = sampler.sample(params, prompt, mask, CFG, cfg, key=jax.random.key(9))

    def counting(logits, cfg):
        larger = (logits[:, None, :] > logits[:, :, None]).astype(jnp.float32)  # [B, V, V]
        return jnp.where(jnp.sum(larger, -1) < cfg.top_k, logits, jnp.finfo(jnp.float32).min)

    monkeypatch.setattr(sampler, "_truncate_rows", counting)
    fresh = jax.jit(sampler._sample_impl, static_argnums=(3, 4))  # traces the patched filter
    old = fresh(params, prompt, mask, CFG, cfg, jax.random.key(9))
    for name in ("response", "response_mask", "logprobs", "finished"):
        np.testing.assert_array_equal(getattr(new, name), getattr(old, name), err_msg=name)


def test_pad_id_equal_to_eos_keeps_mask(params):
    """Rows pad with eos after they stop (GPT-2's pad = eos): the mask still ends at the first eos."""
    prompt, mask = _prompt()
    greedy = SampleConfig(max_new_tokens=12, temperature=0.0)
    free = sampler.sample(params, prompt, mask, CFG, greedy, key=jax.random.key(0))
    eos = int(free.response[0, 2])
    padded_0 = sampler.sample(
        params, prompt, mask, CFG, dataclasses.replace(greedy, eos_id=eos, pad_id=0), key=jax.random.key(0)
    )
    padded_eos = sampler.sample(
        params, prompt, mask, CFG, dataclasses.replace(greedy, eos_id=eos, pad_id=eos), key=jax.random.key(0)
    )
    np.testing.assert_array_equal(padded_eos.response_mask, padded_0.response_mask)
    np.testing.assert_array_equal(padded_eos.finished, padded_0.finished)
    np.testing.assert_array_equal(
        padded_eos.response, jnp.where(padded_0.response_mask, padded_0.response, eos)
    )
    for b in range(prompt.shape[0]):
        hits = np.flatnonzero(np.asarray(free.response[b]) == eos)
        assert int(padded_eos.response_length[b]) == (hits[0] + 1 if hits.size else 12)


def test_top_p_filter_equals_float_sort_filter():
    """Top-p sorts int32 keys; the result must equal, bit for bit, the same filter on a float sort."""
    rng = np.random.default_rng(2)
    logits = np.concatenate(
        [rng.standard_normal((8, 50)) * 3, np.round(rng.standard_normal((8, 50)))]  # with ties
    ).astype(np.float32)
    logits[-1, :10] = -0.0

    def float_sort_top_p(x, top_p):
        sorted_logits = jnp.sort(x, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        threshold = jnp.min(jnp.where(mass_before < top_p, sorted_logits, jnp.inf), -1, keepdims=True)
        return jnp.where(x < threshold, jnp.finfo(jnp.float32).min, x)

    for top_p in (0.05, 0.5, 0.9, 0.999):
        cfg = SampleConfig(max_new_tokens=1, top_p=top_p)
        got = jax.jit(lambda x, c=cfg: sampler.truncate_logits(x, c))(logits)
        want = jax.jit(float_sort_top_p, static_argnums=1)(logits, top_p)
        np.testing.assert_array_equal(got, want, err_msg=f"top_p={top_p}")
        assert 0 < int(jnp.sum(got > jnp.finfo(jnp.float32).min)) < logits.size or top_p > 0.99
