"""jaxrlhf.losses: loop-based NumPy references at 1e-5 under jax.jit, properties, check_grads."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from jaxrlhf import losses

TOL = dict(rtol=1e-5, atol=1e-5)
PROPERTY = settings(max_examples=25, deadline=None, derandomize=True, database=None)
SEEDS = st.integers(0, 2**32 - 1)
# Few distinct shapes, so each jitted function compiles a handful of times.
BATCH = st.sampled_from([1, 3])
LENGTH = st.sampled_from([1, 6])
V = 5  # vocabulary size in the logits-based tests


def assert_close(actual, expected):
    np.testing.assert_allclose(np.asarray(actual, np.float64), np.asarray(expected), **TOL)


def assert_metrics(actual: dict, expected: dict):
    assert set(actual) == set(expected), (sorted(actual), sorted(expected))
    for name, value in expected.items():
        np.testing.assert_allclose(float(actual[name]), value, err_msg=name, **TOL)


def random_mask(rng, b, r):
    """[B, R] bool with random holes; the first row is full, so some token is always real."""
    mask = rng.random((b, r)) < 0.7
    mask[0] = True
    return mask


def log_sigmoid(x):
    x = float(x)
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def log_softmax_row(row):
    top = max(float(v) for v in row)
    lse = top + math.log(sum(math.exp(float(v) - top) for v in row))
    return [float(v) - lse for v in row]


def mean_of(values):
    return sum(values) / max(len(values), 1)


# ------------------------------------------------------------------------- loop references


def ref_sft(logits, targets, mask):
    nll, correct = [], []
    for b in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            if mask[b, t]:
                logp = log_softmax_row(logits[b, t])
                nll.append(-logp[targets[b, t]])
                correct.append(float(int(np.argmax(logits[b, t])) == targets[b, t]))
    loss = mean_of(nll)
    return loss, {"loss": loss, "accuracy": mean_of(correct), "ntokens": float(len(nll))}


def ref_preference_metrics(chosen, rejected, keep):
    pairs = [(float(c), float(r)) for c, r, k in zip(chosen, rejected, keep, strict=True) if k]
    return {
        "accuracy": mean_of([float(c > r) for c, r in pairs]),
        "reward_margin": mean_of([c - r for c, r in pairs]),
        "chosen_reward": mean_of([c for c, _ in pairs]),
        "rejected_reward": mean_of([r for _, r in pairs]),
    }


def ref_pairwise(chosen, rejected, margin, mask):
    keep = np.ones(len(chosen), bool) if mask is None else mask
    terms = []
    for b in range(len(chosen)):
        if keep[b]:
            m = 0.0 if margin is None else float(np.broadcast_to(margin, chosen.shape)[b])
            terms.append(-log_sigmoid(float(chosen[b]) - float(rejected[b]) - m))
    loss = mean_of(terms)
    return loss, {"loss": loss, **ref_preference_metrics(chosen, rejected, keep)}


def ref_kway(rewards, mask):
    b_size, k = rewards.shape
    valid = np.ones((b_size, k), bool) if mask is None else mask
    prompt_losses, diffs = [], []
    for b in range(b_size):
        terms = []
        for i in range(k):
            for j in range(i + 1, k):
                if valid[b, i] and valid[b, j]:
                    diff = float(rewards[b, i]) - float(rewards[b, j])
                    terms.append(-log_sigmoid(diff))
                    diffs.append(diff)
        if terms:
            prompt_losses.append(sum(terms) / len(terms))
    loss = mean_of(prompt_losses)
    return loss, {
        "loss": loss,
        "accuracy": mean_of([float(d > 0) for d in diffs]),
        "reward_margin": mean_of(diffs),
        "npairs": float(len(diffs)),
    }


def ref_kl(logprob, ref_logprob, kind):
    log_ratio = float(logprob) - float(ref_logprob)
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    return math.exp(-log_ratio) - 1.0 + log_ratio


def ref_shaped(scores, logprobs, ref_logprobs, mask, kl_coef, kind):
    rewards, kl = np.zeros(mask.shape), np.zeros(mask.shape)
    for b in range(mask.shape[0]):
        last = None
        for t in range(mask.shape[1]):
            if mask[b, t]:
                kl[b, t] = ref_kl(logprobs[b, t], ref_logprobs[b, t], kind)
                rewards[b, t] = -kl_coef * kl[b, t]
                last = t
        if last is not None:
            rewards[b, last] += float(scores[b])
    return rewards, kl


def ref_gae(rewards, values, mask, gamma, lam, last_value=None):
    advantages, returns = np.zeros(mask.shape), np.zeros(mask.shape)
    for b in range(mask.shape[0]):
        next_value = 0.0 if last_value is None else float(last_value[b])
        next_advantage = 0.0
        for t in reversed(range(mask.shape[1])):
            if not mask[b, t]:
                continue
            delta = float(rewards[b, t]) + gamma * next_value - float(values[b, t])
            next_advantage = delta + gamma * lam * next_advantage
            next_value = float(values[b, t])
            advantages[b, t] = next_advantage
            returns[b, t] = next_advantage + next_value
    return advantages, returns


def ref_whiten(x, mask, shift_mean, eps=1e-8):
    real = [float(x[b, t]) for b in range(x.shape[0]) for t in range(x.shape[1]) if mask[b, t]]
    mean = mean_of(real)
    var = sum((v - mean) ** 2 for v in real) / max(len(real) - 1, 1)
    out = np.zeros(x.shape)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            if mask[b, t]:
                out[b, t] = (float(x[b, t]) - mean) / math.sqrt(var + eps) + (0.0 if shift_mean else mean)
    return out


def ref_rloo(scores, mask):
    valid = np.ones(scores.shape, bool) if mask is None else mask
    out = np.zeros(scores.shape)
    for b in range(scores.shape[0]):
        group = [k for k in range(scores.shape[1]) if valid[b, k]]
        if len(group) < 2:
            continue
        for i in group:
            others = [float(scores[b, j]) for j in group if j != i]
            out[b, i] = float(scores[b, i]) - sum(others) / len(others)
    return out


def ref_grpo(scores, mask, eps, scale_by_std=True):
    valid = np.ones(scores.shape, bool) if mask is None else mask
    out = np.zeros(scores.shape)
    for b in range(scores.shape[0]):
        group = [float(scores[b, k]) for k in range(scores.shape[1]) if valid[b, k]]
        mean = mean_of(group)
        std = math.sqrt(sum((s - mean) ** 2 for s in group) / max(len(group) - 1, 1))
        for k in range(scores.shape[1]):
            if valid[b, k]:
                centred = float(scores[b, k]) - mean
                out[b, k] = centred / (std + eps) if scale_by_std else centred
    return out


def ref_pg(logprobs, advantages, mask, baseline):
    terms, used = [], []
    for b in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            if mask[b, t]:
                a = float(advantages[b]) if advantages.ndim == 1 else float(advantages[b, t])
                if baseline is not None:
                    base = np.asarray(baseline, np.float64)
                    a -= float(base[b] if base.ndim == 1 else base if base.ndim == 0 else base[b, t])
                terms.append(-a * float(logprobs[b, t]))
                used.append(a)
    loss = mean_of(terms)
    return loss, {"loss": loss, "advantage_mean": mean_of(used)}


def ref_ppo(logprobs, old_logprobs, advantages, mask, clip_eps, clip_eps_high, dual_clip, logits):
    high = clip_eps if clip_eps_high is None else clip_eps_high
    terms, clipped, dual, kls, ratios, entropies = [], [], [], [], [], []
    for b in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            if not mask[b, t]:
                continue
            a = float(advantages[b, t])
            log_ratio = float(logprobs[b, t]) - float(old_logprobs[b, t])
            ratio = math.exp(log_ratio)
            unclipped_loss = -a * ratio
            clipped_loss = -a * min(max(ratio, 1.0 - clip_eps), 1.0 + high)
            term = max(unclipped_loss, clipped_loss)
            clipped.append(float(clipped_loss > unclipped_loss))
            if dual_clip is not None:
                is_dual = a < 0 and term > -dual_clip * a
                dual.append(float(is_dual))
                if is_dual:
                    term = -dual_clip * a
            terms.append(term)
            kls.append(ratio - 1.0 - log_ratio)
            ratios.append(ratio)
            if logits is not None:
                logp = log_softmax_row(logits[b, t])
                entropies.append(-sum(math.exp(lp) * lp for lp in logp))
    loss = mean_of(terms)
    metrics = {
        "loss": loss,
        "clipfrac": mean_of(clipped),
        "approx_kl": mean_of(kls),
        "ratio_mean": mean_of(ratios),
        "ratio_max": max(ratios, default=0.0),
    }
    if dual_clip is not None:
        metrics["dual_clipfrac"] = mean_of(dual)
    if logits is not None:
        metrics["entropy"] = mean_of(entropies)
    return loss, metrics


def ref_value(values, old_values, returns, mask, clip_eps):
    terms, clipped, used = [], [], []
    for b in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            if not mask[b, t]:
                continue
            v, old, g = float(values[b, t]), float(old_values[b, t]), float(returns[b, t])
            term = (v - g) ** 2
            if clip_eps is not None:
                clipped_term = (min(max(v, old - clip_eps), old + clip_eps) - g) ** 2
                clipped.append(float(clipped_term > term))
                term = max(term, clipped_term)
            terms.append(term)
            used.append(v)
    loss = 0.5 * mean_of(terms)
    return loss, {"loss": loss, "clipfrac": mean_of(clipped), "value_mean": mean_of(used)}


def ref_entropy(logits, mask):
    entropies = []
    for b in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            if mask[b, t]:
                logp = log_softmax_row(logits[b, t])
                entropies.append(-sum(math.exp(lp) * lp for lp in logp))
    h = mean_of(entropies)
    return -h, {"loss": -h, "entropy": h}


def ref_sequence_sum(x, mask):
    return [
        sum(float(x[b, t]) for t in range(x.shape[1]) if mask is None or mask[b, t])
        for b in range(x.shape[0])
    ]


def ref_rebel(lp_c, ref_c, lp_r, ref_r, rew_c, rew_r, eta, mask_c, mask_r, pair_mask):
    def log_ratios(lp, ref, mask):
        if lp.ndim == 1:
            return [float(a) - float(b) for a, b in zip(lp, ref, strict=True)]
        return [a - b for a, b in zip(ref_sequence_sum(lp, mask), ref_sequence_sum(ref, mask), strict=True)]

    ratio_c, ratio_r = log_ratios(lp_c, ref_c, mask_c), log_ratios(lp_r, ref_r, mask_r)
    keep = np.ones(len(rew_c), bool) if pair_mask is None else pair_mask
    predicted = [(c - r) / eta for c, r, k in zip(ratio_c, ratio_r, keep, strict=True) if k]
    target = [float(c) - float(r) for c, r, k in zip(rew_c, rew_r, keep, strict=True) if k]
    loss = mean_of([(p - y) ** 2 for p, y in zip(predicted, target, strict=True)])
    return loss, {
        "loss": loss,
        "predicted_diff": mean_of(predicted),
        "reward_diff": mean_of(target),
    }


def ref_dpo(pc, pr, rc, rr, beta, loss_type, label_smoothing, mask):
    terms, chosen, rejected = [], [], []
    for b in range(len(pc)):
        if mask is not None and not mask[b]:
            continue
        ratio_c, ratio_r = float(pc[b]) - float(rc[b]), float(pr[b]) - float(rr[b])
        h = ratio_c - ratio_r
        if loss_type == "sigmoid":
            s = label_smoothing
            terms.append(-(1 - s) * log_sigmoid(beta * h) - s * log_sigmoid(-beta * h))
        else:
            terms.append((h - 1.0 / (2.0 * beta)) ** 2)
        chosen.append(beta * ratio_c)
        rejected.append(beta * ratio_r)
    loss = mean_of(terms)
    keep = [True] * len(chosen)
    return loss, {"loss": loss, **ref_preference_metrics(chosen, rejected, keep)}


# ------------------------------------------------------------- references vs jit(function)


def test_sft_loss_matches_loop():
    rng = np.random.default_rng(0)
    b, t = 3, 7
    logits = (2.0 * rng.normal(size=(b, t, V))).astype(np.float32)
    targets = rng.integers(0, V, size=(b, t))
    mask = random_mask(rng, b, t)
    targets[~mask] = -100  # padding ids must never be read
    loss, metrics = jax.jit(losses.sft_loss)(logits, targets, mask)
    expected_loss, expected = ref_sft(logits, targets, mask)
    assert_close(loss, expected_loss)
    assert_metrics(metrics, expected)


def test_sft_loss_bf16_logits_compute_in_float32():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(2, 3, V)), jnp.bfloat16)
    targets = rng.integers(0, V, size=(2, 3))
    loss, _ = jax.jit(losses.sft_loss)(logits, targets, np.ones((2, 3), bool))
    assert loss.dtype == jnp.float32
    expected, _ = ref_sft(np.asarray(logits.astype(jnp.float32)), targets, np.ones((2, 3), bool))
    assert_close(loss, expected)


@pytest.mark.parametrize("margin_kind", ["none", "scalar", "per_pair"])
@pytest.mark.parametrize("with_mask", [False, True])
def test_pairwise_rm_loss_matches_loop(margin_kind, with_mask):
    rng = np.random.default_rng(2)
    chosen = rng.normal(size=8).astype(np.float32)
    rejected = rng.normal(size=8).astype(np.float32)
    margin = {"none": None, "scalar": np.float32(0.5), "per_pair": rng.random(8, np.float32)}
    margin = margin[margin_kind]
    mask = rng.random(8) < 0.6 if with_mask else None
    loss, metrics = jax.jit(losses.pairwise_rm_loss)(chosen, rejected, margin, mask)
    expected_loss, expected = ref_pairwise(chosen, rejected, margin, mask)
    assert_close(loss, expected_loss)
    assert_metrics(metrics, expected)


@pytest.mark.parametrize("with_mask", [False, True])
def test_kway_rm_loss_matches_loop(with_mask):
    rng = np.random.default_rng(3)
    rewards = rng.normal(size=(5, 4)).astype(np.float32)
    mask = None
    if with_mask:
        mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]], bool)
    loss, metrics = jax.jit(losses.kway_rm_loss)(rewards, mask)
    expected_loss, expected = ref_kway(rewards, mask)
    assert_close(loss, expected_loss)
    assert_metrics(metrics, expected)


def test_kway_rm_loss_weighs_each_prompt_equally():
    """InstructGPT's 1/C(K, 2) per prompt: a prompt with 6 pairs counts as much as one with 1."""
    rewards = np.array([[0.0, 1.0, 2.0, 3.0], [0.0, 1.0, 9.0, 9.0]], np.float32)
    mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0]], bool)
    loss, _ = jax.jit(losses.kway_rm_loss)(rewards, mask)
    first = mean_of([-log_sigmoid(rewards[0, i] - rewards[0, j]) for i in range(4) for j in range(i + 1, 4)])
    second = -log_sigmoid(-1.0)
    assert_close(loss, 0.5 * (first + second))


def test_reward_gain_bias_matches_loop():
    rng = np.random.default_rng(4)
    rewards = (3.0 + 2.0 * rng.normal(size=(4, 5))).astype(np.float32)
    mask = random_mask(rng, 4, 5)
    gain, bias = jax.jit(losses.reward_gain_bias)(rewards, mask, 0.5, 2.0)
    real = [float(r) for r, m in zip(rewards.ravel(), mask.ravel(), strict=True) if m]
    mean = mean_of(real)
    var = mean_of([(r - mean) ** 2 for r in real])
    expected_gain = 2.0 / math.sqrt(var + 1e-8)
    assert_close(gain, expected_gain)
    assert_close(bias, 0.5 - expected_gain * mean)
    normalised = [expected_gain * r + (0.5 - expected_gain * mean) for r in real]
    assert_close(mean_of(normalised), 0.5)


def test_reward_centring_loss_matches_loop():
    rng = np.random.default_rng(5)
    chosen, rejected = rng.normal(size=(2, 6)).astype(np.float32)
    mask = rng.random(6) < 0.6
    mask[0] = True
    loss, metrics = jax.jit(losses.reward_centring_loss)(chosen, rejected, mask)
    sums = [float(c) + float(r) for c, r, m in zip(chosen, rejected, mask, strict=True) if m]
    expected_loss = mean_of([s**2 for s in sums])
    assert_close(loss, expected_loss)
    assert_metrics(metrics, {"loss": expected_loss, "reward_mean": 0.5 * mean_of(sums)})


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_penalty_matches_loop(kind):
    rng = np.random.default_rng(6)
    logprobs = -rng.random((3, 5)).astype(np.float32) * 3
    ref_logprobs = -rng.random((3, 5)).astype(np.float32) * 3
    got = jax.jit(losses.kl_penalty, static_argnames="kind")(logprobs, ref_logprobs, kind=kind)
    expected = [[ref_kl(logprobs[b, t], ref_logprobs[b, t], kind) for t in range(5)] for b in range(3)]
    assert_close(got, expected)


def test_kl_estimators_are_unbiased_or_nonnegative():
    """Schulman's note: k1 and k3 are unbiased for KL(p || q) with samples from p; k2, k3 >= 0."""
    p = np.array([0.5, 0.3, 0.15, 0.05])
    q = np.array([0.25, 0.25, 0.25, 0.25])
    true_kl = float(np.sum(p * np.log(p / q)))
    logp, logq = np.log(p).astype(np.float32), np.log(q).astype(np.float32)
    for kind in ("k1", "k3"):
        per_token = np.asarray(losses.kl_penalty(logp, logq, kind), np.float64)
        assert_close(np.sum(p * per_token), true_kl)  # exact expectation under p
    for kind in ("k2", "k3"):
        assert np.all(np.asarray(losses.kl_penalty(logp, logq, kind)) >= 0)


def test_kl_penalty_rejects_unknown_kind():
    with pytest.raises(ValueError, match="k4"):
        losses.kl_penalty(jnp.zeros(2), jnp.zeros(2), kind="k4")


@pytest.mark.parametrize("kind", ["k1"])
def test_shaped_rewards_match_loop(kind):
    rng = np.random.default_rng(7)
    b, r = 4, 6
    mask = random_mask(rng, b, r)
    mask[1] = False  # a fully masked row gets neither score nor penalty
    scores = rng.normal(size=b).astype(np.float32)
    logprobs = -rng.random((b, r)).astype(np.float32) * 2
    ref_logprobs = -rng.random((b, r)).astype(np.float32) * 2
    fn = jax.jit(losses.shaped_rewards, static_argnames="kind")
    rewards, kl = fn(scores, logprobs, ref_logprobs, mask, 0.1, kind=kind)
    expected_rewards, expected_kl = ref_shaped(scores, logprobs, ref_logprobs, mask, 0.1, kind)
    assert_close(rewards, expected_rewards)
    assert_close(kl, expected_kl)
    assert np.all(np.asarray(rewards)[1] == 0.0)


@pytest.mark.parametrize("with_last_value", [False, True])
def test_compute_gae_matches_loop(with_last_value):
    rng = np.random.default_rng(8)
    b, r = 5, 7
    mask = random_mask(rng, b, r)
    mask[2] = False
    mask[3] = [False, True, True, False, True, False, False]  # holes inside the response
    rewards = rng.normal(size=(b, r)).astype(np.float32)
    values = rng.normal(size=(b, r)).astype(np.float32)
    last_value = rng.normal(size=b).astype(np.float32) if with_last_value else None
    advantages, returns = jax.jit(losses.compute_gae)(rewards, values, mask, 0.95, 0.9, last_value)
    expected_adv, expected_ret = ref_gae(rewards, values, mask, 0.95, 0.9, last_value)
    assert_close(advantages, expected_adv)
    assert_close(returns, expected_ret)


@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten_advantages_matches_loop(shift_mean):
    rng = np.random.default_rng(9)
    advantages = (1.0 + 3.0 * rng.normal(size=(3, 6))).astype(np.float32)
    mask = random_mask(rng, 3, 6)
    got = jax.jit(losses.whiten_advantages, static_argnames="shift_mean")(
        advantages, mask, shift_mean=shift_mean
    )
    assert_close(got, ref_whiten(advantages, mask, shift_mean))


@pytest.mark.parametrize("with_mask", [False, True])
def test_rloo_advantages_match_loop(with_mask):
    rng = np.random.default_rng(10)
    scores = rng.normal(size=(4, 5)).astype(np.float32)
    mask = None
    if with_mask:
        mask = rng.random((4, 5)) < 0.7
        mask[0], mask[1] = True, [True, False, False, False, False]
    got = jax.jit(losses.rloo_advantages)(scores, mask)
    assert_close(got, ref_rloo(scores, mask))


@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("scale_by_std", [True, False])
def test_grpo_advantages_match_loop(with_mask, scale_by_std):
    rng = np.random.default_rng(11)
    scores = rng.normal(size=(4, 5)).astype(np.float32)
    scores[2] = 1.0  # equal scores: zero advantage, no division by zero
    mask = None
    if with_mask:
        mask = rng.random((4, 5)) < 0.7
        mask[0], mask[1] = True, [True, False, False, False, False]
    fn = jax.jit(losses.grpo_advantages, static_argnames="scale_by_std")
    got = fn(scores, 1e-6, mask, scale_by_std=scale_by_std)
    assert_close(got, ref_grpo(scores, mask, 1e-6, scale_by_std))
    assert np.all(np.asarray(got)[2] == 0.0)


@pytest.mark.parametrize("advantage_shape", ["per_token", "per_sequence"])
@pytest.mark.parametrize("baseline_kind", ["none", "scalar", "per_sequence"])
def test_pg_loss_matches_loop(advantage_shape, baseline_kind):
    rng = np.random.default_rng(12)
    b, r = 4, 6
    mask = random_mask(rng, b, r)
    logprobs = -rng.random((b, r)).astype(np.float32) * 3
    shape = (b, r) if advantage_shape == "per_token" else (b,)
    advantages = rng.normal(size=shape).astype(np.float32)
    baseline = {"none": None, "scalar": np.float32(0.3), "per_sequence": rng.normal(size=b)}
    baseline = baseline[baseline_kind]
    if baseline is not None:
        baseline = np.asarray(baseline, np.float32)
    loss, metrics = jax.jit(losses.pg_loss)(logprobs, advantages, mask, baseline)
    expected_loss, expected = ref_pg(logprobs, advantages, mask, baseline)
    assert_close(loss, expected_loss)
    assert_metrics(metrics, expected)


@pytest.mark.parametrize(
    "clip_eps_high, dual_clip, with_logits",
    [(None, None, False), (0.28, None, True), (None, 3.0, False), (0.28, 2.0, True)],
)
def test_ppo_policy_loss_matches_loop(clip_eps_high, dual_clip, with_logits):
    rng = np.random.default_rng(13)
    b, r = 4, 8
    mask = random_mask(rng, b, r)
    old_logprobs = -rng.random((b, r)).astype(np.float32) * 3
    # Log-ratios up to +-1.5 so that the clip and the dual clip (ratio > c) both bind somewhere.
    logprobs = (old_logprobs + rng.uniform(-1.5, 1.5, size=(b, r))).astype(np.float32)
    advantages = rng.normal(size=(b, r)).astype(np.float32)
    logits = rng.normal(size=(b, r, V)).astype(np.float32) if with_logits else None
    fn = jax.jit(losses.ppo_policy_loss)
    loss, metrics = fn(logprobs, old_logprobs, advantages, mask, 0.2, clip_eps_high, dual_clip, logits)
    expected_loss, expected = ref_ppo(
        logprobs, old_logprobs, advantages, mask, 0.2, clip_eps_high, dual_clip, logits
    )
    assert_close(loss, expected_loss)
    assert_metrics(metrics, expected)
    assert 0.0 < expected["clipfrac"] < 1.0
    if dual_clip is not None:
        assert expected["dual_clipfrac"] > 0.0


def test_ppo_policy_loss_rejects_dual_clip_below_one():
    x = jnp.zeros((1, 2))
    with pytest.raises(ValueError, match="dual_clip"):
        losses.ppo_policy_loss(x, x, x, jnp.ones((1, 2), bool), dual_clip=0.5)


def gspo_sequence_objective(logprobs, old_logprobs, seq_advantages, mask, eps):
    """GSPO as written (Zheng et al. 2025, eq. 5 and 7), independently of the loss under test:
    J = 1/G sum_i min(s_i A_i, clip(s_i, 1 - eps, 1 + eps) A_i), s_i = (pi(y_i) / pi_old(y_i))^(1/|y_i|),
    over the G rows with at least one real token; returns -J."""
    length = jnp.sum(mask, axis=-1)
    s = jnp.exp(jnp.sum(jnp.where(mask, logprobs - old_logprobs, 0.0), axis=-1) / jnp.maximum(length, 1))
    per_seq = jnp.minimum(s * seq_advantages, jnp.clip(s, 1.0 - eps, 1.0 + eps) * seq_advantages)
    return -jnp.sum(jnp.where(length > 0, per_seq, 0.0)) / jnp.sum(length > 0)


def test_gspo_sequence_ratio_has_the_gradient_of_the_sequence_objective():
    rng = np.random.default_rng(31)
    b, r, eps = 6, 5, 0.2
    mask = random_mask(rng, b, r)
    mask[1:5, 0] = True  # rows 1-4 ragged but not empty
    mask[5] = False  # batch padding
    # Mean log-ratio per row and its advantage: rows 0 and 4 clipped (no gradient), 1 and 3 unclipped
    # outside the clip range, 2 inside it.
    delta = np.array([0.4, -0.4, 0.05, 0.4, -0.4, 0.0])
    seq_advantages = np.array([1.0, 0.7, -1.3, -0.5, -2.0, 0.9], np.float32)
    logprobs = (-rng.random((b, r)) * 3).astype(np.float32)
    noise = rng.normal(size=(b, r))
    noise_mean = np.sum(noise * mask, axis=-1, keepdims=True) / np.maximum(mask.sum(-1, keepdims=True), 1)
    old_logprobs = (logprobs - (noise - noise_mean + delta[:, None])).astype(np.float32)
    advantages = np.broadcast_to(seq_advantages[:, None], (b, r))

    gspo = functools.partial(
        losses.ppo_policy_loss,
        old_logprobs=old_logprobs,
        advantages=advantages,
        response_mask=mask,
        clip_eps=eps,
        aggregation="seq_mean_token_mean",
        ratio_level="sequence",
    )
    ref = functools.partial(
        gspo_sequence_objective, old_logprobs=old_logprobs, seq_advantages=seq_advantages, mask=mask, eps=eps
    )
    (loss, metrics), grad = jax.jit(jax.value_and_grad(gspo, has_aux=True))(logprobs)
    ref_loss, ref_grad = jax.jit(jax.value_and_grad(ref))(logprobs)
    assert_close(loss, ref_loss)
    assert_close(grad, ref_grad)
    # The same in closed form: d(-J)/d log pi_it = -A_i s_i / (G |y_i|) where the clip is inactive.
    s = np.exp(delta)
    clipped = np.array([True, False, False, False, True, False])
    length = mask.sum(-1)
    per_row = -seq_advantages * s / (np.sum(length > 0) * np.maximum(length, 1))  # [B]
    assert_close(grad, np.where(mask & ~clipped[:, None], per_row[:, None], 0.0))
    assert np.all(np.asarray(grad)[[0, 4]] == 0.0) and np.all(np.asarray(grad)[1:4][mask[1:4]] != 0.0)
    real = length > 0
    assert_close(metrics["ratio_mean"], np.mean(s[real]))
    assert_close(metrics["ratio_max"], np.max(s[real]))
    assert_close(metrics["clipfrac"], np.sum(mask[clipped]) / np.sum(mask))


def test_gspo_with_one_token_per_row_is_the_token_ratio():
    rng = np.random.default_rng(32)
    b, r = 6, 4
    mask = np.zeros((b, r), bool)
    mask[np.arange(b - 1), rng.integers(0, r, b - 1)] = True  # one real token per row, last row empty
    old_logprobs = (-rng.random((b, r)) * 3).astype(np.float32)
    logprobs = (old_logprobs + rng.uniform(-1.5, 1.5, size=(b, r))).astype(np.float32)
    advantages = rng.normal(size=(b, r)).astype(np.float32)

    def both(logprobs):
        out = {}
        for agg in losses.AGGREGATIONS:
            for level in losses.RATIO_LEVELS:
                fn = functools.partial(
                    losses.ppo_policy_loss,
                    old_logprobs=old_logprobs,
                    advantages=advantages,
                    response_mask=mask,
                    clip_eps_high=0.28,
                    dual_clip=2.0,
                    aggregation=agg,
                    ratio_level=level,
                )
                out[agg, level] = jax.value_and_grad(fn, has_aux=True)(logprobs)
        return out

    out = jax.jit(both)(logprobs)
    assert 0.0 < float(out["token_mean", "token"][0][1]["clipfrac"]) < 1.0
    for agg in losses.AGGREGATIONS:
        (token_loss, token_metrics), token_grad = out[agg, "token"]
        (seq_loss, seq_metrics), seq_grad = out[agg, "sequence"]
        assert_close(seq_loss, token_loss)
        assert_close(seq_grad, token_grad)
        assert_metrics(seq_metrics, {k: float(v) for k, v in token_metrics.items()})


def test_ppo_policy_loss_rejects_unknown_ratio_level():
    x = jnp.zeros((1, 2))
    with pytest.raises(ValueError, match="ratio_level"):
        losses.ppo_policy_loss(x, x, x, jnp.ones((1, 2), bool), ratio_level="group")


@pytest.mark.parametrize("clip_eps", [0.2, None])
def test_value_loss_matches_loop(clip_eps):
    rng = np.random.default_rng(14)
    b, r = 4, 7
    mask = random_mask(rng, b, r)
    old_values = rng.normal(size=(b, r)).astype(np.float32)
    values = (old_values + rng.uniform(-0.5, 0.5, size=(b, r))).astype(np.float32)
    returns = rng.normal(size=(b, r)).astype(np.float32)
    loss, metrics = jax.jit(losses.value_loss)(values, old_values, returns, mask, clip_eps)
    expected_loss, expected = ref_value(values, old_values, returns, mask, clip_eps)
    assert_close(loss, expected_loss)
    assert_metrics(metrics, expected)
    if clip_eps is not None:
        assert 0.0 < expected["clipfrac"] < 1.0


def test_entropy_bonus_matches_loop():
    rng = np.random.default_rng(15)
    logits = (2.0 * rng.normal(size=(3, 5, V))).astype(np.float32)
    mask = random_mask(rng, 3, 5)
    loss, metrics = jax.jit(losses.entropy_bonus)(logits, mask)
    expected_loss, expected = ref_entropy(logits, mask)
    assert_close(loss, expected_loss)
    assert_metrics(metrics, expected)


@pytest.mark.parametrize("average", [False, True])
def test_sequence_logprobs_matches_loop(average):
    rng = np.random.default_rng(16)
    token_logprobs = -rng.random((4, 6)).astype(np.float32)
    mask = random_mask(rng, 4, 6)
    mask[2] = False
    got = jax.jit(losses.sequence_logprobs, static_argnames="average")(token_logprobs, mask, average=average)
    sums = ref_sequence_sum(token_logprobs, mask)
    counts = mask.sum(axis=1)
    expected = [s / max(c, 1) for s, c in zip(sums, counts, strict=True)] if average else sums
    assert_close(got, expected)


def test_kl_controller_matches_loop():
    state = losses.init_kl_controller(0.2, target=6.0, horizon=10000)
    update = jax.jit(losses.update_kl_controller)
    coef = 0.2
    for observed_kl, n_steps in [(12.0, 64), (6.5, 64), (1.0, 128), (6.0, 32), (5.0, 256)]:
        state = update(state, observed_kl, n_steps)
        error = min(max(observed_kl / 6.0 - 1.0, -0.2), 0.2)
        coef *= 1.0 + error * n_steps / 10000
        assert_close(state.kl_coef, coef)
    assert coef != 0.2


def test_fixed_kl_controller_never_moves_and_scans():
    state = losses.init_kl_controller(0.05)

    def body(state, observed_kl):
        return losses.update_kl_controller(state, observed_kl, 64), state.kl_coef

    state, coefs = jax.jit(lambda s, kl: jax.lax.scan(body, s, kl))(state, jnp.arange(5.0))
    assert state.target is None
    np.testing.assert_array_equal(np.asarray(coefs), np.float32(0.05))
    assert float(state.kl_coef) == np.float32(0.05)


@pytest.mark.parametrize("per_token, with_pair_mask", [(True, False), (False, False), (True, True)])
def test_rebel_loss_matches_loop(per_token, with_pair_mask):
    rng = np.random.default_rng(17)
    b, r = 4, 6
    shape = (b, r) if per_token else (b,)
    lp_c, ref_c, lp_r, ref_r = (-rng.random((4, *shape)) * 2).astype(np.float32)
    rew_c, rew_r = rng.normal(size=(2, b)).astype(np.float32)
    mask_c = random_mask(rng, b, r) if per_token else None
    mask_r = random_mask(rng, b, r) if per_token else None
    pair_mask = np.array([True, False, True, True]) if with_pair_mask else None
    loss, metrics = jax.jit(losses.rebel_loss)(
        lp_c, ref_c, lp_r, ref_r, rew_c, rew_r, 2.0, mask_c, mask_r, pair_mask
    )
    expected_loss, expected = ref_rebel(
        lp_c, ref_c, lp_r, ref_r, rew_c, rew_r, 2.0, mask_c, mask_r, pair_mask
    )
    assert_close(loss, expected_loss)
    assert_metrics(metrics, expected)


def test_rebel_loss_rejects_mask_with_sequence_logprobs():
    x = jnp.zeros(3)
    with pytest.raises(ValueError, match="mask"):
        losses.rebel_loss(x, x, x, x, x, x, 1.0, mask_chosen=jnp.ones((3, 2), bool))


@pytest.mark.parametrize(
    "loss_type, label_smoothing, with_mask",
    [("sigmoid", 0.0, False), ("sigmoid", 0.1, False), ("ipo", 0.0, False), ("sigmoid", 0.0, True)],
)
def test_dpo_loss_matches_loop(loss_type, label_smoothing, with_mask):
    rng = np.random.default_rng(18)
    pc, pr, rc, rr = (-rng.random((4, 6)) * 20).astype(np.float32)
    mask = np.array([True, True, False, True, False, True]) if with_mask else None
    fn = jax.jit(losses.dpo_loss, static_argnames="loss_type")
    loss, metrics = fn(pc, pr, rc, rr, 0.1, loss_type, label_smoothing, mask)
    expected_loss, expected = ref_dpo(pc, pr, rc, rr, 0.1, loss_type, label_smoothing, mask)
    assert_close(loss, expected_loss)
    assert_metrics(metrics, expected)


def test_dpo_loss_rejects_unknown_type_and_ipo_smoothing():
    x = jnp.zeros(2)
    with pytest.raises(ValueError, match="hinge"):
        losses.dpo_loss(x, x, x, x, 0.1, loss_type="hinge")
    with pytest.raises(ValueError, match="label_smoothing"):
        losses.dpo_loss(x, x, x, x, 0.1, loss_type="ipo", label_smoothing=0.1)


# ------------------------------------------------------------------------------- properties


def _gae_unit(rewards, values, mask):
    return losses.compute_gae(rewards, values, mask, 1.0, 1.0)


GAE_UNIT = jax.jit(_gae_unit)


@PROPERTY
@given(seed=SEEDS, b=BATCH, r=LENGTH)
def test_gae_with_unit_gamma_lambda_is_reward_to_go_minus_value(seed, b, r):
    rng = np.random.default_rng(seed)
    mask = rng.random((b, r)) < 0.7
    rewards = rng.normal(size=(b, r)).astype(np.float32)
    values = rng.normal(size=(b, r)).astype(np.float32)
    advantages, returns = GAE_UNIT(rewards, values, mask)
    reward_to_go = np.zeros((b, r))
    for i in range(b):
        for t in range(r):
            if mask[i, t]:
                reward_to_go[i, t] = sum(float(rewards[i, u]) for u in range(t, r) if mask[i, u])
    assert_close(advantages, np.where(mask, reward_to_go - values, 0.0))
    assert_close(returns, reward_to_go)


def _ppo_at_ratio_one(logprobs, advantages, mask, clip_eps_high, dual_clip):
    # old_logprobs is the very array being differentiated: the loss's stop_gradient must hold it.
    return losses.ppo_policy_loss(logprobs, logprobs, advantages, mask, 0.2, clip_eps_high, dual_clip)[0]


PPO_GRAD_AT_ONE = jax.jit(jax.grad(_ppo_at_ratio_one))
PG_GRAD = jax.jit(jax.grad(lambda lp, adv, mask: losses.pg_loss(lp, adv, mask)[0]))


@PROPERTY
@given(
    seed=SEEDS,
    b=BATCH,
    r=LENGTH,
    clip_eps_high=st.sampled_from([None, 0.28]),
    dual_clip=st.sampled_from([None, 3.0]),
)
def test_ppo_with_old_equal_new_has_policy_gradient_gradient(seed, b, r, clip_eps_high, dual_clip):
    rng = np.random.default_rng(seed)
    mask = random_mask(rng, b, r)
    logprobs = -rng.random((b, r)).astype(np.float32) * 3
    advantages = rng.normal(size=(b, r)).astype(np.float32)
    ppo_grad = PPO_GRAD_AT_ONE(logprobs, advantages, mask, clip_eps_high, dual_clip)
    pg_grad = PG_GRAD(logprobs, advantages, mask)
    assert_close(ppo_grad, pg_grad)
    assert np.any(np.asarray(pg_grad) != 0.0)


def _ppo_per_token_loss_sum(logprobs, old_logprobs, advantages, mask, clip_eps_high, dual_clip):
    return losses.ppo_policy_loss(logprobs, old_logprobs, advantages, mask, 0.2, clip_eps_high, dual_clip)[0]


PPO_GRAD = jax.jit(jax.grad(_ppo_per_token_loss_sum))


@PROPERTY
@given(
    seed=SEEDS,
    b=BATCH,
    r=LENGTH,
    clip_eps_high=st.sampled_from([None, 0.28]),
    dual_clip=st.sampled_from([None, 3.0]),
)
def test_ppo_clip_removes_the_gradient_exactly_where_it_should(seed, b, r, clip_eps_high, dual_clip):
    rng = np.random.default_rng(seed)
    mask = random_mask(rng, b, r)
    old_logprobs = -rng.random((b, r)).astype(np.float32) * 3
    logprobs = (old_logprobs + rng.uniform(-1.5, 1.5, size=(b, r))).astype(np.float32)
    advantages = rng.normal(size=(b, r)).astype(np.float32)
    grad = np.asarray(PPO_GRAD(logprobs, old_logprobs, advantages, mask, clip_eps_high, dual_clip))
    ratio = np.exp(logprobs.astype(np.float64) - old_logprobs)
    high = 0.2 if clip_eps_high is None else clip_eps_high
    for bound in (1.0 - 0.2, 1.0 + high) + (() if dual_clip is None else (dual_clip,)):
        if np.any(np.abs(ratio - bound) < 1e-4):
            return  # a ratio on a kink: the gradient there is a convention, not a property
    clipped = ((advantages > 0) & (ratio > 1.0 + high)) | ((advantages < 0) & (ratio < 0.8))
    if dual_clip is not None:
        clipped |= (advantages < 0) & (ratio > dual_clip)
    live = mask & ~clipped
    assert np.all(grad[~live] == 0.0)
    assert np.all(grad[live] != 0.0)
    n = max(mask.sum(), 1)
    assert_close(grad[live], -(advantages * ratio)[live] / n)  # d/dlogp of -A * exp(logp - old)


# Padding: every case maps (float token arrays, float row arrays, mask) -> (scalar, outputs).
# Outputs are scalars or arrays shaped like the mask, compared on the real entries only.


def _sft_case(t, rows, mask):
    loss, metrics = losses.sft_loss(t["logits"], t["targets"].astype(jnp.int32), mask)
    return loss, metrics


def _pg_tokens_case(t, rows, mask):
    return losses.pg_loss(t["logprobs"], t["advantages"], mask)


def _pg_scores_case(t, rows, mask):
    return losses.pg_loss(t["logprobs"], rows["scores"], mask, baseline=rows["baseline"])


def _ppo_case(t, rows, mask):
    return losses.ppo_policy_loss(
        t["logprobs"], t["old_logprobs"], t["advantages"], mask, 0.2, 0.28, 3.0, t["logits"]
    )


def _value_case(t, rows, mask):
    return losses.value_loss(t["values"], t["old_values"], t["returns"], mask, 0.2)


def _entropy_case(t, rows, mask):
    return losses.entropy_bonus(t["logits"], mask)


def _shaped_gae_case(t, rows, mask):
    rewards, kl = losses.shaped_rewards(rows["scores"], t["logprobs"], t["ref_logprobs"], mask, 0.1, "k1")
    advantages, returns = losses.compute_gae(rewards, t["values"], mask, 0.9, 0.8)
    white = losses.whiten_advantages(advantages, mask)
    scalar = jnp.sum(advantages) + jnp.sum(returns) + jnp.sum(white * t["values"])
    outputs = {"rewards": rewards, "kl": kl, "advantages": advantages, "returns": returns}
    return scalar, {**outputs, "white": white}


# A pair with no real token is batch padding: the pair losses take it out with a [B] pair mask.


def _rebel_case(t, rows, mask):
    pair_mask = jnp.any(mask, axis=1)
    chosen, rejected = (t["lp_c"], t["ref_c"]), (t["lp_r"], t["ref_r"])
    rewards = (rows["rew_c"], rows["rew_r"])
    return losses.rebel_loss(*chosen, *rejected, *rewards, 0.5, mask, mask, pair_mask)


def _dpo_case(t, rows, mask, loss_type="sigmoid", average=False):
    seq = {k: losses.sequence_logprobs(t[k], mask, average) for k in t}
    args = (seq["lp_c"], seq["lp_r"], seq["ref_c"], seq["ref_r"], 0.1, loss_type)
    return losses.dpo_loss(*args, mask=jnp.any(mask, axis=1))


def _ipo_case(t, rows, mask):
    return _dpo_case(t, rows, mask, "ipo", average=True)


def _pairwise_case(t, rows, mask):
    # Pairs laid out as the "tokens" of rows, so padding scatters them like tokens.
    flat = {k: v.reshape(-1) for k, v in t.items()}
    return losses.pairwise_rm_loss(flat["chosen"], flat["rejected"], flat["margin"], mask.reshape(-1))


def _centring_case(t, rows, mask):
    flat = {k: v.reshape(-1) for k, v in t.items()}
    return losses.reward_centring_loss(flat["chosen"], flat["rejected"], mask.reshape(-1))


def _gain_bias_case(t, rows, mask):
    gain, bias = losses.reward_gain_bias(t["rewards"], mask)
    return gain + bias, {"gain": gain, "bias": bias}


def _kway_case(t, rows, mask):
    return losses.kway_rm_loss(t["rewards"], mask)


def _group_case(t, rows, mask):
    rloo = losses.rloo_advantages(t["scores"], mask)
    grpo = losses.grpo_advantages(t["scores"], 1e-6, mask)
    return jnp.sum(rloo * t["scores"]) + jnp.sum(grpo * t["scores"]), {"rloo": rloo, "grpo": grpo}


def _logits(rng, b, r):
    return rng.normal(size=(b, r, V)) * 2


CASES = {
    # name: (call, token arrays builder, row arrays builder)
    "sft": (
        _sft_case,
        lambda g, b, r: {"logits": _logits(g, b, r), "targets": g.integers(0, V, (b, r)) * 1.0},
        lambda g, b: {},
    ),
    "pg_tokens": (
        _pg_tokens_case,
        lambda g, b, r: {"logprobs": -g.random((b, r)), "advantages": g.normal(size=(b, r))},
        lambda g, b: {},
    ),
    "pg_scores": (
        _pg_scores_case,
        lambda g, b, r: {"logprobs": -g.random((b, r))},
        lambda g, b: {"scores": g.normal(size=b), "baseline": g.normal(size=b)},
    ),
    "ppo": (
        _ppo_case,
        lambda g, b, r: {
            "logprobs": -g.random((b, r)) + g.uniform(-1.5, 1.5, (b, r)),
            "old_logprobs": -g.random((b, r)),
            "advantages": g.normal(size=(b, r)),
            "logits": _logits(g, b, r),
        },
        lambda g, b: {},
    ),
    "value": (
        _value_case,
        lambda g, b, r: {
            "values": g.normal(size=(b, r)),
            "old_values": g.normal(size=(b, r)),
            "returns": g.normal(size=(b, r)),
        },
        lambda g, b: {},
    ),
    "entropy": (_entropy_case, lambda g, b, r: {"logits": _logits(g, b, r)}, lambda g, b: {}),
    "shaped_gae_whiten": (
        _shaped_gae_case,
        lambda g, b, r: {
            "logprobs": -g.random((b, r)),
            "ref_logprobs": -g.random((b, r)),
            "values": g.normal(size=(b, r)),
        },
        lambda g, b: {"scores": g.normal(size=b)},
    ),
    "rebel": (
        _rebel_case,
        lambda g, b, r: {k: -g.random((b, r)) for k in ("lp_c", "ref_c", "lp_r", "ref_r")},
        lambda g, b: {"rew_c": g.normal(size=b), "rew_r": g.normal(size=b)},
    ),
    "dpo": (
        _dpo_case,
        lambda g, b, r: {k: -g.random((b, r)) for k in ("lp_c", "ref_c", "lp_r", "ref_r")},
        lambda g, b: {},
    ),
    "ipo": (
        _ipo_case,
        lambda g, b, r: {k: -g.random((b, r)) for k in ("lp_c", "ref_c", "lp_r", "ref_r")},
        lambda g, b: {},
    ),
    "pairwise": (
        _pairwise_case,
        lambda g, b, r: {
            "chosen": g.normal(size=(b, r)),
            "rejected": g.normal(size=(b, r)),
            "margin": g.random((b, r)),
        },
        lambda g, b: {},
    ),
    "centring": (
        _centring_case,
        lambda g, b, r: {"chosen": g.normal(size=(b, r)), "rejected": g.normal(size=(b, r))},
        lambda g, b: {},
    ),
    "gain_bias": (
        _gain_bias_case,
        lambda g, b, r: {"rewards": g.normal(size=(b, r))},
        lambda g, b: {},
    ),
    "kway": (_kway_case, lambda g, b, r: {"rewards": g.normal(size=(b, r))}, lambda g, b: {}),
    "rloo_grpo": (_group_case, lambda g, b, r: {"scores": g.normal(size=(b, r))}, lambda g, b: {}),
}
JITTED = {name: jax.jit(call) for name, (call, _, _) in CASES.items()}
GRADS = {
    name: jax.jit(jax.grad(lambda t, rows, m, c=call: c(t, rows, m)[0], argnums=(0, 1)))
    for name, (call, _, _) in CASES.items()
}


def _as_f32(arrays):
    return {k: np.asarray(v, np.float32) for k, v in arrays.items()}


def _garbage(rng, name, shape):
    """Large finite garbage for padded slots; padded target ids are -100 (PyTorch's habit)."""
    if name == "targets":
        return np.full(shape, -100.0, np.float32)
    return (1e3 * rng.normal(size=shape)).astype(np.float32)


def _pad_batch(rng, mask, tokens, rows, extra_cols):
    """Scatter each row into a wider row (order kept) and insert one fully masked garbage row."""
    b, r = mask.shape
    new_b, new_r = b + 1, r + extra_cols
    garbage_row = int(rng.integers(0, new_b))
    row_of = [i if i < garbage_row else i + 1 for i in range(b)]
    new_mask = np.zeros((new_b, new_r), bool)
    cols = [np.sort(rng.choice(new_r, size=r, replace=False)) for _ in range(b)]
    new_tokens = {}
    for name, x in tokens.items():
        padded = _garbage(rng, name, (new_b, new_r, *x.shape[2:]))
        for i in range(b):
            padded[row_of[i], cols[i]] = x[i]
        new_tokens[name] = padded
    for i in range(b):
        new_mask[row_of[i], cols[i]] = mask[i]
    new_rows = {}
    for name, x in rows.items():
        padded = (1e3 * rng.normal(size=(new_b,))).astype(x.dtype)
        padded[row_of] = x
        new_rows[name] = padded
    return new_tokens, new_rows, new_mask


@PROPERTY
@given(seed=SEEDS, b=BATCH, r=LENGTH)
@pytest.mark.parametrize("case", sorted(CASES))
def test_padding_never_changes_a_loss(case, seed, b, r):
    call, make_tokens, make_rows = CASES[case]
    rng = np.random.default_rng(seed)
    mask = rng.random((b, r)) < 0.7
    tokens, rows = _as_f32(make_tokens(rng, b, r)), _as_f32(make_rows(rng, b))
    padded_tokens, padded_rows, padded_mask = _pad_batch(rng, mask, tokens, rows, extra_cols=3)
    _, outputs = JITTED[case](tokens, rows, mask)
    _, padded_outputs = JITTED[case](padded_tokens, padded_rows, padded_mask)
    assert set(outputs) == set(padded_outputs)
    for name, value in outputs.items():
        value, padded = np.asarray(value), np.asarray(padded_outputs[name])
        if value.ndim == 2:
            value, padded = value[mask], padded[padded_mask]
        np.testing.assert_allclose(padded, value, err_msg=name, **TOL)


@pytest.mark.parametrize("case", sorted(CASES))
def test_fully_masked_row_keeps_gradients_finite(case):
    call, make_tokens, make_rows = CASES[case]
    rng = np.random.default_rng(19)
    b, r = 3, 5
    mask = random_mask(rng, b, r)
    mask[0] = True
    mask[1] = False
    tokens, rows = _as_f32(make_tokens(rng, b, r)), _as_f32(make_rows(rng, b))
    for name, x in tokens.items():
        if name != "targets":
            x[1] = 1e4 * rng.normal(size=x[1].shape)  # extreme garbage under the mask
    for x in rows.values():
        x[1] = 1e4
    scalar, outputs = JITTED[case](tokens, rows, mask)
    token_grads, row_grads = GRADS[case](tokens, rows, mask)
    assert np.isfinite(float(scalar))
    for name, value in outputs.items():
        assert np.all(np.isfinite(np.asarray(value))), name
    for name, grad in {**token_grads, **row_grads}.items():
        grad = np.asarray(grad)
        assert np.all(np.isfinite(grad)), name
        assert np.all(grad[1] == 0.0), name  # the masked row gets no gradient at all
    assert any(np.any(np.asarray(g) != 0.0) for g in {**token_grads, **row_grads}.values())


@pytest.mark.parametrize("case", sorted(CASES))
def test_fully_masked_batch_gives_zero_loss_and_finite_gradients(case):
    call, make_tokens, make_rows = CASES[case]
    rng = np.random.default_rng(20)
    tokens, rows = _as_f32(make_tokens(rng, 2, 4)), _as_f32(make_rows(rng, 2))
    mask = np.zeros((2, 4), bool)
    scalar, outputs = JITTED[case](tokens, rows, mask)
    token_grads, row_grads = GRADS[case](tokens, rows, mask)
    for grad in {**token_grads, **row_grads}.values():
        assert np.all(np.asarray(grad) == 0.0)
    if "loss" in outputs:
        assert float(outputs["loss"]) == 0.0
    for value in outputs.values():
        assert np.all(np.isfinite(np.asarray(value)))


KWAY = jax.jit(losses.kway_rm_loss)
PAIRWISE = jax.jit(losses.pairwise_rm_loss)


@PROPERTY
@given(seed=SEEDS, b=st.sampled_from([1, 4]), with_mask=st.booleans())
def test_kway_loss_with_two_answers_is_the_pairwise_loss(seed, b, with_mask):
    rng = np.random.default_rng(seed)
    chosen, rejected = (3.0 * rng.normal(size=(2, b))).astype(np.float32)
    mask = rng.random(b) < 0.6 if with_mask else np.ones(b, bool)
    kway_loss, kway_metrics = KWAY(np.stack([chosen, rejected], axis=1), np.stack([mask, mask], 1))
    pair_loss, pair_metrics = PAIRWISE(chosen, rejected, None, mask)
    assert_close(kway_loss, pair_loss)
    for name in ("loss", "accuracy", "reward_margin"):
        assert_close(kway_metrics[name], pair_metrics[name])


# ----------------------------------------------------------------- check_grads (float64)


def _check(fn, *args, order=1, x64=True):
    """check_grads in float64 (tolerance 1e-5), or float32 for code that computes in float32.

    Second order where the loss is curved; first order for linear and piecewise-linear ones.
    """
    with jax.enable_x64(x64):
        dtype = np.float64 if x64 else np.float32
        args = tuple(jnp.asarray(np.asarray(a, dtype)) for a in args)
        check_grads(jax.jit(fn), args, order=order, modes=("fwd", "rev"))


def test_check_grads_sft_and_entropy():
    rng = np.random.default_rng(21)
    logits = rng.normal(size=(2, 3, V))
    targets = rng.integers(0, V, (2, 3))
    mask = np.array([[1, 1, 0], [1, 0, 1]], bool)
    # log-softmax runs in float32 by design (jaxrlhf.ops): checked at float32 tolerance.
    _check(lambda x: losses.sft_loss(x, targets, mask)[0], logits, order=2, x64=False)
    _check(lambda x: losses.entropy_bonus(x, mask)[0], logits, x64=False)


def test_check_grads_reward_model_losses():
    rng = np.random.default_rng(22)
    chosen, rejected, margin = rng.normal(size=(3, 4))
    mask = np.array([1, 0, 1, 1], bool)

    def pairwise(c, r, m):
        return losses.pairwise_rm_loss(c, r, m, mask)[0]

    _check(pairwise, chosen, rejected, margin, order=2)
    _check(lambda c, r: losses.reward_centring_loss(c, r, mask)[0], chosen, rejected)
    rank_mask = np.array([[1, 1, 1], [1, 1, 0]], bool)
    _check(lambda x: losses.kway_rm_loss(x, rank_mask)[0], rng.normal(size=(2, 3)), order=2)
    _check(lambda x: losses.reward_gain_bias(x)[0], rng.normal(size=6))


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_check_grads_kl_and_shaped_rewards(kind):
    rng = np.random.default_rng(23)
    logprobs, ref_logprobs = -rng.random((2, 2, 3))
    mask = np.array([[1, 1, 0], [1, 0, 1]], bool)
    _check(lambda a, b: losses.kl_penalty(a, b, kind), logprobs, ref_logprobs, order=2)
    if kind == "k1":
        _check(
            lambda s, a, b: losses.shaped_rewards(s, a, b, mask, 0.1, kind)[0],
            rng.normal(size=2),
            logprobs,
            ref_logprobs,
        )
    else:
        _check(lambda a: losses.kl_loss(a, ref_logprobs, mask, kind)[0], logprobs, order=2)


def test_check_grads_advantage_estimators():
    rng = np.random.default_rng(24)
    mask = np.array([[1, 1, 0, 1], [1, 0, 0, 0]], bool)
    rewards, values = rng.normal(size=(2, 2, 4))
    _check(lambda r, v: losses.compute_gae(r, v, mask, 0.9, 0.95), rewards, values)
    _check(lambda a: losses.whiten_advantages(a, mask), rng.normal(size=(2, 4)))
    scores = rng.normal(size=(2, 4))
    _check(losses.rloo_advantages, scores)
    _check(lambda s: losses.grpo_advantages(s, 1e-6), scores)


def test_check_grads_policy_and_value_losses():
    rng = np.random.default_rng(25)
    mask = np.array([[1, 1, 0, 1], [0, 1, 1, 1]], bool)
    old_logprobs = -rng.random((2, 4))
    # Ratios well inside and well outside the clip range, none near a kink.
    shift = np.array([[0.05, -0.6, 0.0, 0.6], [0.0, -0.05, 0.9, 1.5]])
    advantages = np.array([[1.0, -1.0, 0.5, 1.0], [1.0, 1.5, -1.0, -2.0]])
    _check(lambda lp: losses.pg_loss(lp, advantages, mask)[0], old_logprobs)

    def ppo(lp):
        return losses.ppo_policy_loss(lp, old_logprobs, advantages, mask, 0.2, 0.28, 3.0)[0]

    _check(ppo, old_logprobs + shift)
    old_values = rng.normal(size=(2, 4))
    values = old_values + np.array([[0.05, -0.5, 0.0, 0.5], [0.0, 0.1, -0.1, 0.9]])
    returns = rng.normal(size=(2, 4))
    _check(lambda v: losses.value_loss(v, old_values, returns, mask, 0.2)[0], values)


def test_check_grads_rebel_and_dpo():
    rng = np.random.default_rng(26)
    mask = np.array([[1, 1, 0], [1, 0, 1]], bool)
    lp_c, ref_c, lp_r, ref_r = -rng.random((4, 2, 3))
    rewards = rng.normal(size=(2, 2))
    _check(
        lambda c, r: losses.rebel_loss(c, ref_c, r, ref_r, *rewards, 0.5, mask, mask)[0],
        lp_c,
        lp_r,
    )
    pc, pr, rc, rr = -rng.random((4, 3)) * 10
    for loss_type, smoothing in (("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0)):

        def dpo(c, r, loss_type=loss_type, smoothing=smoothing):
            return losses.dpo_loss(c, r, rc, rr, 0.1, loss_type, smoothing)[0]

        _check(dpo, pc, pr, order=2 if loss_type == "sigmoid" else 1)


# ------------------------------------------------------------------------------------------- vmap


def test_losses_vmap_over_a_leading_axis():
    rng = np.random.default_rng(27)
    g, b, r = 3, 2, 5
    mask = rng.random((g, b, r)) < 0.7
    logprobs, old_logprobs, advantages, values = rng.normal(size=(4, g, b, r)).astype(np.float32)
    batched_ppo = jax.jit(jax.vmap(losses.ppo_policy_loss))(logprobs, old_logprobs, advantages, mask)
    batched_gae = jax.jit(jax.vmap(lambda x, v, m: losses.compute_gae(x, v, m, 0.9, 0.9)))(
        advantages, values, mask
    )
    for i in range(g):
        loss, metrics = losses.ppo_policy_loss(logprobs[i], old_logprobs[i], advantages[i], mask[i])
        assert_close(batched_ppo[0][i], loss)
        assert_close(batched_ppo[1]["clipfrac"][i], metrics["clipfrac"])
        expected_adv, _ = ref_gae(advantages[i], values[i], mask[i], 0.9, 0.9)
        assert_close(batched_gae[0][i], expected_adv)


