"""The 2025-26 policy losses of jaxrlhf.losses: CISPO, REINFORCE++ advantages, high-entropy token masks and
rollout-mismatch importance weights.

Each is checked against its reference formula written out here in NumPy (TRL's GRPOTrainer for CISPO and the
vLLM importance-sampling correction, OpenRLHF's experience maker for REINFORCE++), for properties (identities,
invariants, exact zero gradients), inside `jax.shard_map` over 8 devices against the unsharded call, and for
its argument checks (one-line ValueErrors naming the function and the argument).
"""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxrlhf import losses

TIGHT = dict(rtol=1e-6, atol=1e-6)
TOL = dict(rtol=1e-5, atol=1e-5)
B, R = 4, 6


def normal(rng, *shape, scale=1.0):
    return np.asarray(scale * rng.normal(size=shape), np.float32)


def holes_mask(rng, b=B, r=R):
    """[B, R] bool with random holes anywhere in the rows; row 0 full."""
    mask = rng.random((b, r)) < 0.7
    mask[0] = True
    return mask


def right_padded(lengths, r=R):
    return np.arange(r)[None] < np.asarray(lengths)[:, None]


# ------------------------------------------------------------------------------------------ CISPO


def trl_cispo(logprobs, old_logprobs, advantages, mask, epsilon_high):
    """TRL 1.x GRPOTrainer._compute_loss, loss_type="cispo" (token-level importance sampling), in NumPy:
    coef_1 = exp(logp - old); w = clamp(coef_1, max=epsilon_high).detach(); per_token = -w * A * logp;
    loss = sum(per_token * mask) / num_items_in_batch (the count of real tokens). Returns the loss and its
    gradient with respect to logp (w and A are constants)."""
    lp, old, mask = np.float64(logprobs), np.float64(old_logprobs), np.float64(mask)
    adv = np.float64(advantages)
    adv = adv[:, None] if adv.ndim == 1 else adv
    w = np.minimum(np.exp(lp - old), epsilon_high)
    count = max(mask.sum(), 1.0)
    loss = np.sum(-w * adv * lp * mask) / count
    return loss, -w * adv * mask / count


def paper_cispo(logprobs, old_logprobs, advantages, mask, eps_low, eps_high):
    """MiniMax-M1's CISPO objective: -1/sum|o| sum_t sg(clip(r_t, 1 - eps_low, 1 + eps_high)) A_t log pi_t."""
    lp, old, mask = np.float64(logprobs), np.float64(old_logprobs), np.float64(mask)
    w = np.clip(np.exp(lp - old), 1.0 - eps_low, 1.0 + eps_high)
    count = max(mask.sum(), 1.0)
    return np.sum(-w * advantages * lp * mask) / count, -w * advantages * mask / count


def cispo_value_and_grad(*args, **kwargs):
    return jax.jit(
        jax.value_and_grad(lambda lp, *rest: losses.cispo_loss(lp, *rest, **kwargs), has_aux=True)
    )(*args)


def cispo_inputs(seed, seq_advantages=False):
    rng = np.random.default_rng(seed)
    logprobs = normal(rng, B, R, scale=0.5) - 1.5
    old = logprobs + normal(rng, B, R, scale=1.2)
    old[0, :2] = logprobs[0, :2] + [2.5, -2.5]  # ratios exp(-2.5) and exp(2.5) ~ 12 (row 0 is real): both
    # clips and TRL's cap of 5 are active
    advantages = normal(rng, B) if seq_advantages else normal(rng, B, R)
    return logprobs, old, advantages, holes_mask(rng)


@pytest.mark.parametrize("seq_advantages", [False, True])
def test_cispo_matches_trl_value_and_gradient(seq_advantages):
    logprobs, old, advantages, mask = cispo_inputs(0, seq_advantages)
    # TRL's recommended epsilon_high=5.0 caps the weight at 5 = 1 + clip_eps_high; no lower bound.
    (loss, metrics), grad = cispo_value_and_grad(logprobs, old, advantages, mask)
    expected, expected_grad = trl_cispo(logprobs, old, advantages, mask, epsilon_high=5.0)
    np.testing.assert_allclose(float(loss), expected, **TIGHT)
    np.testing.assert_allclose(np.asarray(grad), expected_grad, **TIGHT)
    ratio = np.exp(np.float64(logprobs) - old)[mask]
    assert 0 < np.sum(ratio > 5.0) < ratio.size  # the cap is exercised
    np.testing.assert_allclose(float(metrics["clipfrac"]), np.mean(ratio > 5.0), **TIGHT)
    np.testing.assert_allclose(float(metrics["ratio_mean"]), np.mean(ratio), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["ratio_max"]), np.max(ratio), rtol=1e-5)


def test_cispo_matches_the_paper_two_sided_clip():
    logprobs, old, advantages, mask = cispo_inputs(1)
    (loss, metrics), grad = cispo_value_and_grad(
        logprobs, old, advantages, mask, clip_eps_low=0.2, clip_eps_high=0.28
    )
    expected, expected_grad = paper_cispo(logprobs, old, advantages, mask, 0.2, 0.28)
    np.testing.assert_allclose(float(loss), expected, **TIGHT)
    np.testing.assert_allclose(np.asarray(grad), expected_grad, **TIGHT)
    ratio = np.exp(np.float64(logprobs) - old)[mask]
    np.testing.assert_allclose(float(metrics["clipfrac"]), np.mean((ratio < 0.8) | (ratio > 1.28)), **TIGHT)


@pytest.mark.parametrize("aggregation", losses.AGGREGATIONS)
def test_cispo_on_policy_equals_pg_loss(aggregation):
    logprobs, _, advantages, mask = cispo_inputs(2)
    (loss, metrics), grad = cispo_value_and_grad(
        logprobs, logprobs, advantages, mask, clip_eps_low=0.2, clip_eps_high=0.28, aggregation=aggregation
    )
    (pg, _), pg_grad = jax.value_and_grad(
        lambda lp: losses.pg_loss(lp, advantages, mask, aggregation=aggregation), has_aux=True
    )(logprobs)
    np.testing.assert_allclose(float(loss), float(pg), **TIGHT)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(pg_grad), **TIGHT)
    assert float(metrics["clipfrac"]) == 0.0


def test_cispo_padding_garbage_never_reaches_the_loss():
    logprobs, old, advantages, mask = cispo_inputs(3)
    (loss, _), grad = cispo_value_and_grad(logprobs, old, advantages, mask)
    bad = np.where(mask, logprobs, np.nan), np.where(mask, old, np.inf), np.where(mask, advantages, np.nan)
    (bad_loss, _), bad_grad = cispo_value_and_grad(*bad, mask)
    assert float(bad_loss) == float(loss)
    np.testing.assert_array_equal(np.asarray(bad_grad), np.asarray(grad))
    assert not np.any(np.asarray(grad)[~mask])


# ------------------------------------------------------------------------------------ REINFORCE++


def openrlhf_reinforce(scores, kl, mask, kl_coef, gamma):
    """OpenRLHF advantage_estimator="reinforce": compute_reward (score at the last real token minus
    kl_coef * kl), get_cumulative_returns (a reverse loop over every position of the masked rewards), then the
    batch normalisation (x - mean) * rsqrt(clamp(var, 1e-8)) with the population variance of real tokens."""
    mask = np.float64(mask)
    rewards = -kl_coef * np.float64(kl)
    for b in range(mask.shape[0]):
        real = np.flatnonzero(mask[b])
        if real.size:
            rewards[b, real[-1]] += scores[b]
    rewards = rewards * mask
    returns = np.zeros_like(rewards)
    running = np.zeros(mask.shape[0])
    for t in reversed(range(mask.shape[1])):
        running = rewards[:, t] + gamma * running
        returns[:, t] = running
    count = mask.sum()
    mean = np.sum(returns * mask) / count
    var = np.sum((returns - mean) ** 2 * mask) / count
    return (returns - mean) / np.sqrt(max(var, 1e-8)) * mask


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reinforce_pp_matches_openrlhf(gamma):
    rng = np.random.default_rng(4)
    scores, kl = normal(rng, 5), np.abs(normal(rng, 5, R, scale=0.3))
    mask = right_padded([6, 2, 4, 0, 1])  # right padding (OpenRLHF discounts over positions); an empty row
    got = jax.jit(functools.partial(losses.reinforce_pp_advantages, kl_coef=0.05, gamma=gamma))(
        scores, kl, mask
    )
    np.testing.assert_allclose(np.asarray(got), openrlhf_reinforce(scores, kl, mask, 0.05, gamma), **TOL)


def test_reinforce_pp_closed_form_and_whitening_invariants():
    rng = np.random.default_rng(5)
    scores, kl, mask = normal(rng, B), normal(rng, B, R, scale=0.3), holes_mask(rng)
    beta = 0.1
    # gamma = 1: G_t = score - beta * sum_{u >= t} KL_u over real tokens (a reverse cumsum), then whitening.
    kl_real = np.where(mask, np.float64(kl), 0.0)
    suffix = np.flip(np.cumsum(np.flip(kl_real, -1), -1), -1)
    returns = np.where(mask, scores[:, None] - beta * suffix, 0.0)
    real = returns[mask]
    expected = np.where(mask, (returns - real.mean()) / real.std(), 0.0)
    got = np.asarray(losses.reinforce_pp_advantages(scores, kl, mask, kl_coef=beta))
    np.testing.assert_allclose(got, expected, **TOL)
    assert not np.any(got[~mask])
    np.testing.assert_allclose(got[mask].mean(), 0.0, atol=1e-6)
    np.testing.assert_allclose(got[mask].std(), 1.0, rtol=1e-5)  # population std, as OpenRLHF
    # Constant: no gradient reaches the scores or the KL.
    grads = jax.jit(
        jax.grad(lambda s, k: jnp.sum(losses.reinforce_pp_advantages(s, k, mask, kl_coef=beta)), (0, 1))
    )(scores, kl)
    assert not any(np.any(np.asarray(g)) for g in grads)


def test_reinforce_pp_degenerate_batches_are_finite():
    mask = right_padded([3, 3, 0, 1])
    equal = losses.reinforce_pp_advantages(jnp.ones(4), jnp.zeros((4, R)), mask, kl_coef=0.0, gamma=1.0)
    np.testing.assert_array_equal(np.asarray(equal), 0.0)  # every return is 1: zero advantages
    empty = losses.reinforce_pp_advantages(jnp.ones(4), jnp.ones((4, R)), np.zeros((4, R), bool), kl_coef=0.1)
    np.testing.assert_array_equal(np.asarray(empty), 0.0)


# ------------------------------------------------------------------------------------ entropy mask


def distinct_entropies(rng, b, r):
    """[B, R] entropies, all different (no ties at any threshold)."""
    return np.asarray(rng.permutation(b * r).reshape(b, r) * 0.01 + 0.5, np.float32)


@pytest.mark.parametrize("q", [0.2, 0.3, 0.7, 0.25, 0.05, 1 / 3, 1.0])
def test_entropy_mask_keeps_ceil_q_n_highest_tokens(q):
    rng = np.random.default_rng(6)
    for b, r in ((4, 5), (3, 7), (10, 10)):
        entropy, mask = distinct_entropies(rng, b, r), holes_mask(rng, b, r)
        keep = np.asarray(jax.jit(functools.partial(losses.entropy_mask, top_fraction=q))(entropy, mask))
        n = int(mask.sum())
        k = math.ceil(round(q * n, 9))  # q * n in exact decimal (0.3 * 10 is 3, not 3.0000000000000004)
        assert keep.sum() == k, (q, n)
        assert not np.any(keep & ~mask)
        assert entropy[keep].min() > entropy[mask & ~keep].max(initial=-1.0)  # the top k, not any k


def test_entropy_mask_exact_count_at_integer_products():
    entropy = distinct_entropies(np.random.default_rng(7), 1, 10)
    mask = np.ones((1, 10), bool)
    for q, k in ((0.3, 3), (0.7, 7), (0.1, 1), (0.6, 6), (0.9, 9)):
        assert int(losses.entropy_mask(entropy, mask, top_fraction=q).sum()) == k, q
    # A traced fraction rounds in float32: the same counts here.
    traced = jax.jit(lambda q: losses.entropy_mask(entropy, mask, top_fraction=q).sum())
    assert [int(traced(q)) for q in (0.3, 0.7, 0.15)] == [3, 7, 2]


def test_entropy_mask_ties_and_empty_batches():
    mask = np.ones((2, 3), bool)
    tied = np.asarray([[1.0, 2.0, 2.0], [2.0, 0.5, 0.1]], np.float32)  # k = ceil(0.2 * 6) = 2: three tie
    assert int(losses.entropy_mask(tied, mask, top_fraction=0.2).sum()) == 3
    none = losses.entropy_mask(tied, np.zeros((2, 3), bool), top_fraction=0.5)
    assert not np.any(np.asarray(none))


def test_entropy_mask_q1_is_no_masking_and_masked_tokens_carry_zero_gradient():
    rng = np.random.default_rng(8)
    entropy, mask = distinct_entropies(rng, B, R), holes_mask(rng)
    logprobs, old, advantages, _ = cispo_inputs(8)
    np.testing.assert_array_equal(np.asarray(losses.entropy_mask(entropy, mask, top_fraction=1.0)), mask)

    def policy_losses(lp, loss_mask):
        return {
            "pg": losses.pg_loss(lp, advantages, loss_mask)[0],
            "ppo": losses.ppo_policy_loss(lp, old, advantages, loss_mask, 0.2, 0.28)[0],
            "cispo": losses.cispo_loss(lp, old, advantages, loss_mask)[0],
        }

    full = policy_losses(logprobs, mask)
    all_kept = policy_losses(
        logprobs, mask & np.asarray(losses.entropy_mask(entropy, mask, top_fraction=1.0))
    )
    for name in full:
        assert float(all_kept[name]) == float(full[name]), name
    keep = np.asarray(losses.entropy_mask(entropy, mask, top_fraction=0.2))
    assert 0 < keep.sum() < mask.sum()
    for name in full:
        grad = np.asarray(
            jax.jit(jax.grad(lambda lp, name=name: policy_losses(lp, mask & keep)[name]))(logprobs)
        )
        assert np.all(grad[~keep] == 0.0), name  # exactly zero, not small
        assert np.any(grad[keep] != 0.0), name


# ------------------------------------------------------------------------------- mismatch weights


def trl_is_ratio(learner, sampler, mask, vllm_mode, clip_max):
    """TRL GRPOTrainer._generate_and_score_completions, vllm_importance_sampling_correction=True, C_min None:
    diff = (old - sampling) * mask; sequence modes: exp(sum(diff)) [B, 1]; token modes: exp(diff) [B, T];
    *_truncate: clamp(max=C_max); *_mask: ratio > C_max -> 0. Broadcast to [B, T]."""
    diff = (np.float64(learner) - np.float64(sampler)) * mask
    if vllm_mode.startswith("sequence"):
        diff = diff.sum(-1, keepdims=True)
    ratio = np.exp(diff)
    if vllm_mode.endswith("truncate"):
        ratio = np.minimum(ratio, clip_max)
    else:
        ratio = np.where(ratio > clip_max, 0.0, ratio)
    return np.broadcast_to(ratio, mask.shape), ratio


@pytest.mark.parametrize("level", losses.MISMATCH_LEVELS)
@pytest.mark.parametrize("mode", losses.MISMATCH_MODES)
def test_mismatch_weights_match_trl(level, mode):
    rng = np.random.default_rng(9)
    sampler = normal(rng, B, R, scale=0.5) - 1.5
    learner = sampler + normal(rng, B, R, scale=0.6 if level == "token" else 0.35)
    learner[0, 0] += 1.5  # row 0 is real: one token (and its row) beyond the cap
    mask = holes_mask(rng)
    cap = 2.0 if level == "token" else 1.5
    weights, metrics = jax.jit(functools.partial(losses.mismatch_weights, level=level, mode=mode, cap=cap))(
        learner, sampler, mask
    )
    expected, per_unit = trl_is_ratio(learner, sampler, mask, f"{level}_{mode}", cap)
    np.testing.assert_allclose(np.asarray(weights), np.where(mask, expected, 0.0), **TIGHT)
    # TRL logs the mean over real tokens (token level) or over sequences (sequence level).
    units = per_unit[mask] if level == "token" else per_unit[:, 0]
    raw = np.exp((np.float64(learner) - sampler) * mask)
    raw = raw[mask] if level == "token" else np.exp(np.log(raw).sum(-1))
    beyond = np.mean(raw > cap)
    assert 0 < beyond < 1  # the cap is exercised
    fraction = "clipped_fraction" if mode == "truncate" else "masked_fraction"
    assert set(metrics) == {"mean_weight", fraction}
    np.testing.assert_allclose(float(metrics["mean_weight"]), units.mean(), **TOL)
    np.testing.assert_allclose(float(metrics[fraction]), beyond, **TIGHT)


@pytest.mark.parametrize("level", losses.MISMATCH_LEVELS)
@pytest.mark.parametrize("mode", losses.MISMATCH_MODES)
def test_mismatch_weights_are_one_when_learner_and_sampler_agree(level, mode):
    rng = np.random.default_rng(10)
    logprobs, mask = normal(rng, B, R) - 1.0, holes_mask(rng)
    weights, metrics = losses.mismatch_weights(logprobs, logprobs, mask, level=level, mode=mode)
    np.testing.assert_array_equal(np.asarray(weights), np.float32(mask))
    assert float(metrics["mean_weight"]) == 1.0
    assert float(metrics["clipped_fraction" if mode == "truncate" else "masked_fraction"]) == 0.0
    grads = jax.jit(
        jax.grad(lambda a, b: jnp.sum(losses.mismatch_weights(a, b, mask, level=level, mode=mode)[0]), (0, 1))
    )(logprobs, logprobs)
    assert not any(np.any(np.asarray(g)) for g in grads)  # stop-gradient


def test_mismatch_weights_correct_a_bandit_gradient():
    """A softmax bandit: actions sampled from mu = softmax(theta + delta) (the sampler), learner pi = softmax
    (theta). The exact expectation over mu of w A grad log pi is the on-policy gradient grad E_pi[A] with the
    full ratio (a cap above every ratio, truncate or mask), and the truncated weight removes most of the bias
    of the uncorrected update."""
    theta = jnp.asarray([0.3, -0.5, 1.2, 0.0])
    delta = jnp.asarray([0.9, -0.2, -0.8, 0.4])
    reward = jnp.asarray([1.0, -0.5, 2.0, 0.3])
    log_pi, log_mu = jax.nn.log_softmax(theta), jax.nn.log_softmax(theta + delta)
    mu = jnp.exp(log_mu)
    rows = jnp.ones((4, 1), bool)  # row v = action v

    @jax.jit
    def grad_with(weights):
        return jax.grad(lambda th: -jnp.sum(mu * weights[:, 0] * reward * jax.nn.log_softmax(th)))(theta)

    true = jax.grad(lambda th: -jnp.sum(jax.nn.softmax(th) * reward))(theta)
    ratio_max = float(jnp.max(jnp.exp(log_pi - log_mu)))
    for mode in losses.MISMATCH_MODES:
        w, _ = losses.mismatch_weights(log_pi[:, None], log_mu[:, None], rows, mode=mode, cap=ratio_max + 1)
        np.testing.assert_allclose(np.asarray(grad_with(w)), np.asarray(true), **TOL)
    truncated, m = losses.mismatch_weights(log_pi[:, None], log_mu[:, None], rows, cap=1.5)
    assert 0 < float(m["clipped_fraction"]) < 1
    uncorrected = grad_with(jnp.ones((4, 1)))
    bias = lambda g: float(jnp.linalg.norm(g - true))  # noqa: E731
    assert bias(grad_with(truncated)) < 0.5 * bias(uncorrected)


# -------------------------------------------------------------------------------- inside shard_map

N, SB, SR = 8, 16, 5  # 8 devices, two rows each
EMPTY_ROW = 5


def _new_losses(logprobs, old, ref, sampler, advantages, entropy, scores, mask, *, axis_name):
    out = {}

    def loss(lp):
        cispo, cispo_m = losses.cispo_loss(lp, old, advantages, mask, 0.2, 0.28, axis_name=axis_name)
        keep = losses.entropy_mask(entropy, mask, top_fraction=0.3, axis_name=axis_name)
        weights, _ = losses.mismatch_weights(old, sampler, mask, mode="mask", cap=2.0, axis_name=axis_name)
        pg, _ = losses.pg_loss(lp, advantages * weights, mask & keep, axis_name=axis_name)
        return cispo + pg, {f"cispo/{k}": v for k, v in cispo_m.items()} | {"pg": pg}

    (total, metrics), grad = jax.value_and_grad(loss, has_aux=True)(logprobs)
    out |= metrics | {"total": total, "grad": grad}
    kl = losses.kl_penalty(old, ref, "k1")
    out["reinforce_pp"] = losses.reinforce_pp_advantages(
        scores, kl, mask, kl_coef=0.1, gamma=0.95, axis_name=axis_name
    )
    out["entropy_mask"] = losses.entropy_mask(entropy, mask, top_fraction=0.3, axis_name=axis_name).astype(
        jnp.float32
    )
    for level in losses.MISMATCH_LEVELS:
        for mode in losses.MISMATCH_MODES:
            w, m = losses.mismatch_weights(
                old, sampler, mask, level=level, mode=mode, cap=1.5, axis_name=axis_name
            )
            out[f"{level}_{mode}/weights"] = w
            out |= {f"{level}_{mode}/{k}": v for k, v in m.items()}
    return out


def test_new_losses_with_axis_name_are_global():
    assert jax.device_count() == N
    mesh = jax.make_mesh((N,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    rng = np.random.default_rng(11)
    mask = holes_mask(rng, SB, SR)
    mask[EMPTY_ROW] = False
    logprobs = normal(rng, SB, SR, scale=0.3) - 1.5
    old = logprobs + normal(rng, SB, SR, scale=0.5)
    args = (
        logprobs,
        old,
        old + normal(rng, SB, SR, scale=0.3),  # ref
        old + normal(rng, SB, SR, scale=0.4),  # sampler
        normal(rng, SB, SR),  # advantages
        distinct_entropies(rng, SB, SR),
        normal(rng, SB),  # scores
        mask,
    )
    expected = jax.jit(functools.partial(_new_losses, axis_name=None))(*args)
    is_rows = {k: v.ndim > 0 for k, v in expected.items()}

    def body(*shards):
        global_out = _new_losses(*shards, axis_name="data")
        local_out = _new_losses(*shards, axis_name=None)
        return global_out, {k: v if is_rows[k] else v[None] for k, v in local_out.items()}

    out_specs = ({k: P("data") if r else P() for k, r in is_rows.items()}, dict.fromkeys(is_rows, P("data")))
    sharded = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("data"),) * len(args), out_specs=out_specs))
    global_out, local_out = sharded(*args)
    assert set(global_out) == set(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(np.asarray(global_out[name]), np.asarray(value), err_msg=name, **TOL)
    # Without axis_name each device sees only its rows: the batch-level results differ (the test can fail).
    for name in ("total", "grad", "cispo/loss", "reinforce_pp", "entropy_mask", "token_truncate/mean_weight"):
        assert not np.allclose(np.asarray(local_out[name]), np.asarray(expected[name]), **TOL), name
    np.testing.assert_array_equal(  # the weights are per token / per row: the same either way
        np.asarray(local_out["sequence_mask/weights"]), np.asarray(expected["sequence_mask/weights"])
    )
    assert 0 < float(expected["cispo/clipfrac"]) < 1
    assert 0 < float(expected["sequence_mask/masked_fraction"]) < 1
    assert not np.any(np.asarray(global_out["grad"])[EMPTY_ROW])


# ------------------------------------------------------------------------------- argument checks


def raises(fn_name, *parts):
    """pytest.raises(ValueError) whose one-line message starts with `fn_name: ` and contains `parts`."""
    pattern = "^" + re.escape(f"{fn_name}: ") + "".join(f"(?=.*{re.escape(p)})" for p in parts)
    return pytest.raises(ValueError, match=pattern)


LP = np.zeros((B, R), np.float32)
MASK = np.ones((B, R), bool)
SEQ = np.zeros(B, np.float32)


@pytest.mark.parametrize(
    "call, fn, parts",
    [
        (
            lambda: losses.cispo_loss(LP, LP, LP, MASK, clip_eps_high=-0.1),
            "cispo_loss",
            ("clip_eps_high=-0.1", ">= 0"),
        ),
        (
            lambda: losses.cispo_loss(LP, LP, LP, MASK, clip_eps_low=-1),
            "cispo_loss",
            ("clip_eps_low=-1", ">= 0"),
        ),
        (
            lambda: losses.cispo_loss(LP, LP, LP, MASK, clip_eps_high=math.inf),
            "cispo_loss",
            ("clip_eps_high=inf",),
        ),
        (
            lambda: losses.cispo_loss(LP, LP, LP, MASK, aggregation="sum"),
            "cispo_loss",
            ("aggregation='sum'",),
        ),
        (
            lambda: losses.cispo_loss(LP, LP[:, :-1], LP, MASK),
            "cispo_loss",
            ("old_logprobs has shape (4, 5)",),
        ),
        (lambda: losses.cispo_loss(LP, LP, LP, MASK[:-1]), "cispo_loss", ("response_mask has shape (3, 6)",)),
        (lambda: losses.cispo_loss(LP, LP, SEQ[:-1], MASK), "cispo_loss", ("advantages has shape (3,)",)),
        (
            lambda: losses.cispo_loss(LP[0], LP[0], SEQ, MASK[0]),
            "cispo_loss",
            ("logprobs has shape (6,)", "[B, R]"),
        ),
        (
            lambda: losses.reinforce_pp_advantages(LP, LP, MASK, kl_coef=0.1),
            "reinforce_pp_advantages",
            ("scores has shape (4, 6)", "[B]"),
        ),
        (
            lambda: losses.reinforce_pp_advantages(SEQ[:-1], LP, MASK, kl_coef=0.1),
            "reinforce_pp_advantages",
            ("scores has shape (3,)", "kl has shape (4, 6)"),
        ),
        (
            lambda: losses.reinforce_pp_advantages(SEQ, LP, MASK[:, :-1], kl_coef=0.1),
            "reinforce_pp_advantages",
            ("response_mask has shape (4, 5)",),
        ),
        (
            lambda: losses.reinforce_pp_advantages(SEQ, LP, MASK, kl_coef=-0.1),
            "reinforce_pp_advantages",
            ("kl_coef=-0.1", ">= 0"),
        ),
        (
            lambda: losses.reinforce_pp_advantages(SEQ, LP, MASK, kl_coef=0.1, gamma=1.5),
            "reinforce_pp_advantages",
            ("gamma=1.5", "<= 1"),
        ),
        (
            lambda: losses.reinforce_pp_advantages(SEQ, LP, MASK, kl_coef=0.1, eps=-1e-8),
            "reinforce_pp_advantages",
            ("eps=-1e-08",),
        ),
        (
            lambda: losses.entropy_mask(LP, MASK, top_fraction=0.0),
            "entropy_mask",
            ("top_fraction=0.0", "> 0"),
        ),
        (
            lambda: losses.entropy_mask(LP, MASK, top_fraction=1.5),
            "entropy_mask",
            ("top_fraction=1.5", "<= 1"),
        ),
        (lambda: losses.entropy_mask(LP, MASK, top_fraction=math.nan), "entropy_mask", ("top_fraction=nan",)),
        (
            lambda: losses.entropy_mask(LP, MASK[:, :-1], top_fraction=0.2),
            "entropy_mask",
            ("response_mask has shape",),
        ),
        (
            lambda: losses.entropy_mask(LP[..., None], MASK, top_fraction=0.2),
            "entropy_mask",
            ("entropy has shape",),
        ),
        (lambda: losses.mismatch_weights(LP, LP, MASK, cap=0.5), "mismatch_weights", ("cap=0.5", ">= 1")),
        (
            lambda: losses.mismatch_weights(LP, LP, MASK, level="seq"),
            "mismatch_weights",
            ("level='seq'", "'sequence'"),
        ),
        (
            lambda: losses.mismatch_weights(LP, LP, MASK, mode="clip"),
            "mismatch_weights",
            ("mode='clip'", "'truncate'"),
        ),
        (
            lambda: losses.mismatch_weights(LP, LP[:-1], MASK),
            "mismatch_weights",
            ("sampler_logprobs has shape (3, 6)", "learner_logprobs has shape (4, 6)"),
        ),
    ],
)
def test_bad_arguments_raise_one_line_errors_naming_them(call, fn, parts):
    with raises(fn, *parts) as excinfo:
        call()
    assert "\n" not in str(excinfo.value)


def test_traced_parameters_are_checked_for_rank_only():
    rng = np.random.default_rng(12)
    logprobs, old, advantages, mask = cispo_inputs(12)
    entropy = distinct_entropies(rng, B, R)

    @jax.jit
    def run(eps_high, beta, q, cap):
        return (
            losses.cispo_loss(logprobs, old, advantages, mask, clip_eps_high=eps_high)[0],
            losses.reinforce_pp_advantages(SEQ + 1.0, old, mask, kl_coef=beta),
            losses.entropy_mask(entropy, mask, top_fraction=q),
            losses.mismatch_weights(logprobs, old, mask, cap=cap)[0],
        )

    traced = run(4.0, 0.1, 0.5, 2.0)
    plain = (
        losses.cispo_loss(logprobs, old, advantages, mask)[0],
        losses.reinforce_pp_advantages(SEQ + 1.0, old, mask, kl_coef=0.1),
        losses.entropy_mask(entropy, mask, top_fraction=0.5),
        losses.mismatch_weights(logprobs, old, mask)[0],
    )
    for got, want in zip(traced, plain, strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), **TOL)
    with raises("cispo_loss", "clip_eps_high has shape (2,)", "scalar"):
        jax.jit(lambda e: losses.cispo_loss(logprobs, old, advantages, mask, clip_eps_high=e))(jnp.ones(2))
