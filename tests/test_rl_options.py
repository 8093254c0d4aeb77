"""The 2025-26 policy-loss options of `train.RLConfig` through `make_experience` / `make_learn` (issue #32):
REINFORCE++, CISPO's objective, clip-higher, entropy masking, rollout-mismatch weights, DAPO's overlong
punishment and truncated-answer masking. Each is checked against what the code did not write: the
reference implementation's formula written out in NumPy (OpenRLHF, TRL), a closed form, or an invariant
(a gradient recovered on a bandit, an identity where the option must do nothing)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxrlhf import models, train
from jaxrlhf.rollout import SampleConfig, overlong_penalty, sampler

SCFG = SampleConfig(max_new_tokens=6, temperature=1.0, eos_id=0)
# Rollouts built by hand carry placeholder sampler logprobs: their old logprobs must be the learner's forward.
PLACEHOLDER_LOGPROBS = {"reuse_sampler_logprobs": False}


def _rollout(cfg, lengths, seed=0, finished=None):
    """len(lengths) rows, row i with lengths[i] response tokens (the last one EOS = 0 when finished)."""
    rng = np.random.default_rng(seed)
    b, r = len(lengths), max(lengths)
    response = rng.integers(1, cfg.vocab_size, (b, r)).astype(np.int32)
    mask = np.arange(r)[None] < np.array(lengths)[:, None]
    finished = np.ones(b, bool) if finished is None else np.asarray(finished)
    for i, n in enumerate(lengths):
        if finished[i]:
            response[i, n - 1] = 0
    response = np.where(mask, response, 0)
    prompt = rng.integers(1, cfg.vocab_size, (b, 3)).astype(np.int32)
    return sampler.Rollout(
        prompt=jnp.asarray(prompt), prompt_mask=jnp.ones((b, 3), bool), response=jnp.asarray(response),
        response_mask=jnp.asarray(mask), logprobs=jnp.zeros((b, r)), finished=jnp.asarray(finished),
    )  # fmt: skip


def _np_logprobs(params, rollout, cfg, temperature=1.0):
    """Teacher-forced log pi(y_t) of the response tokens, in float64 NumPy."""
    r = rollout.response.shape[1]
    logits = np.asarray(
        models.logits_fn(params, rollout.tokens, rollout.mask, cfg)[:, -r - 1 : -1], np.float64
    )
    logits = logits / temperature
    logits = logits - logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return np.take_along_axis(logp, np.asarray(rollout.response)[..., None], -1)[..., 0], logp


def _models(cfg):
    """pi_old and a reference far from uniform, and a policy an update moved (ratios well away from 1)."""
    old, ref = (models.init_params(jax.random.key(k), cfg) for k in (1, 2))
    old["wte"], ref["wte"] = old["wte"] * 20, ref["wte"] * 20
    new = jax.tree.map(lambda o, r: o + 0.3 * (r - o), old, ref)
    return old, ref, new


def _experience(cfg, rl, rollout, scores, old, ref, scfg=SCFG):
    state = train.init_rl_state(train.init_rl_params(old, None, rl), optax.sgd(0.0), rl)
    return train.make_experience(
        state, ref, rollout, jnp.asarray(scores, jnp.float32), cfg, rl, sample_cfg=scfg
    )


def _loss(cfg, rl, exp, new, scfg=SCFG):
    rl = rl.resolved()
    return float(train.policy._policy_loss(new, exp, None, rl.kl_coef, cfg, rl, scfg, None)[0])


# ------------------------------------------------------------------------------------------ REINFORCE++


@pytest.mark.parametrize("group_size", [None, 4], ids=["reinforce_pp", "reinforce_pp_baseline"])
def test_reinforce_pp_advantages_are_openrlhfs_written_out(tiny_cfg, group_size):
    """OpenRLHF's advantage_estimator "reinforce" (experience_maker.py), written out: per-token reward
    -beta k1(pi_old, ref) plus the score at the last real token, returns the reversed cumulative sum
    (gamma 1), whitened over every real token of the batch with var.clamp(min=1e-8).rsqrt(); with a group
    ("reinforce_baseline") each group's mean score subtracted first. The defaults are OpenRLHF's."""
    rl = train.RLConfig(algo="reinforce_pp", group_size=group_size, **PLACEHOLDER_LOGPROBS)
    r = rl.resolved()
    assert (r.kl_coef, r.kl_penalty, r.kl_kind, r.epochs, r.whiten_advantages) == (
        0.01,
        "reward",
        "k1",
        1,
        False,
    )
    lengths = [6, 1, 3, 2, 6, 5, 2, 4]
    rollout = _rollout(tiny_cfg, lengths, seed=1)
    scores = np.array([0.3, -1.0, 2.0, 0.5, 1.0, 1.5, 0.0, -0.2])
    old, ref, _ = _models(tiny_cfg)
    exp, _ = _experience(tiny_cfg, rl, rollout, scores, old, ref)

    mask = np.asarray(rollout.response_mask)
    old_lp, ref_lp = _np_logprobs(old, rollout, tiny_cfg)[0], _np_logprobs(ref, rollout, tiny_cfg)[0]
    s = scores.copy()
    if group_size:
        s = (s.reshape(-1, group_size) - s.reshape(-1, group_size).mean(1, keepdims=True)).reshape(-1)
    reward = -0.01 * (old_lp - ref_lp) * mask
    reward[np.arange(len(lengths)), np.array(lengths) - 1] += s
    returns = np.cumsum(reward[:, ::-1], axis=1)[:, ::-1] * mask
    mean = returns[mask].mean()
    var = ((returns - mean) ** 2)[mask].mean()
    want = (returns - mean) / np.sqrt(max(var, 1e-8)) * mask
    np.testing.assert_allclose(np.asarray(exp.advantages), want, atol=2e-5)
    assert np.abs(want).max() > 0.5


# -------------------------------------------------------------------------- CISPO and clip-higher


def test_cispo_objective_is_trls_written_out(tiny_cfg):
    """TRL's GRPOTrainer loss_type "cispo", written out: per token -min(ratio, epsilon_high).detach() * A *
    log pi (epsilon_high 5.0, no lower bound), over the batch's real tokens; A the group-standardised
    score. A PPO surrogate would give another number (it multiplies A by the ratio's value, not log pi)."""
    rl = train.RLConfig(
        algo="grpo", group_size=4, objective="cispo", kl_coef=0.0, loss_agg="token_mean",
        **PLACEHOLDER_LOGPROBS,
    )
    rollout = _rollout(tiny_cfg, [6, 1, 3, 2, 6, 5, 2, 4], seed=1)
    scores = np.array([0.3, -1.0, 2.0, 0.5, 1.0, 1.5, 0.0, -0.2])
    old, ref, new = _models(tiny_cfg)
    exp, _ = _experience(tiny_cfg, rl, rollout, scores, old, ref)
    got = _loss(tiny_cfg, rl, exp, new)

    mask = np.asarray(rollout.response_mask)
    logp, old_lp = _np_logprobs(new, rollout, tiny_cfg)[0], _np_logprobs(old, rollout, tiny_cfg)[0]
    g = scores.reshape(2, 4)
    adv = ((g - g.mean(1, keepdims=True)) / (g.std(1, ddof=1, keepdims=True) + 1e-4)).reshape(-1)[:, None]
    ratio = np.exp(logp - old_lp)
    per_token = -np.minimum(ratio, 5.0) * adv * logp
    want = (per_token * mask).sum() / mask.sum()
    np.testing.assert_allclose(got, want, rtol=5e-4)
    assert (ratio[mask] > 5.0).any() or (ratio[mask] < 0.5).any()  # the cap or a small weight acts
    ppo_like = (-np.minimum(ratio * adv, np.clip(ratio, 0.8, 1.2) * adv) * mask).sum() / mask.sum()
    assert abs(ppo_like - want) > 1e-2 * abs(want)


def test_clip_higher_is_dapos_written_out(tiny_cfg):
    """DAPO's decoupled clip (eps_low 0.2, eps_high 0.28) with its token-level mean, written out; the
    symmetric clip gives another loss on the same batch."""
    rl = train.RLConfig(
        algo="grpo", group_size=4, clip_eps_high=0.28, kl_coef=0.0, loss_agg="token_mean",
        **PLACEHOLDER_LOGPROBS,
    )
    rollout = _rollout(tiny_cfg, [6, 1, 3, 2, 6, 5, 2, 4], seed=2)
    scores = np.array([0.3, -1.0, 2.0, 0.5, 1.0, 1.5, 0.0, -0.2])
    old, ref, new = _models(tiny_cfg)
    exp, _ = _experience(tiny_cfg, rl, rollout, scores, old, ref)
    mask = np.asarray(rollout.response_mask)
    logp, old_lp = _np_logprobs(new, rollout, tiny_cfg)[0], _np_logprobs(old, rollout, tiny_cfg)[0]
    g = scores.reshape(2, 4)
    adv = ((g - g.mean(1, keepdims=True)) / (g.std(1, ddof=1, keepdims=True) + 1e-4)).reshape(-1)[:, None]
    ratio = np.exp(logp - old_lp)

    def written_out(high):
        per_token = -np.minimum(ratio * adv, np.clip(ratio, 0.8, 1 + high) * adv)
        return (per_token * mask).sum() / mask.sum()

    np.testing.assert_allclose(_loss(tiny_cfg, rl, exp, new), written_out(0.28), rtol=5e-4)
    symmetric = dataclasses.replace(rl, clip_eps_high=None)
    np.testing.assert_allclose(_loss(tiny_cfg, symmetric, exp, new), written_out(0.2), rtol=5e-4)
    assert abs(written_out(0.28) - written_out(0.2)) > 1e-3


# --------------------------------------------------------------------------------- entropy masking


def test_entropy_masking_keeps_the_top_fraction_and_q_one_is_off(tiny_cfg):
    """With q = 0.2 only the ceil(0.2 n) real tokens of highest entropy (of the sampling policy, computed
    here in NumPy) keep their advantage; every other token's is exactly 0, so its gradient is exactly 0
    (PPO's per-token term at A = 0 is the constant 0). q = 1 gives bit for bit the update without it."""
    lengths = [6, 1, 3, 2, 6, 5, 2, 4]
    rollout = _rollout(tiny_cfg, lengths, seed=3)
    scores = np.array([0.3, -1.0, 2.0, 0.5, 1.0, 1.5, 0.0, -0.2])
    old, ref, _ = _models(tiny_cfg)
    rl = train.RLConfig(algo="grpo", group_size=4, entropy_top_fraction=0.2, **PLACEHOLDER_LOGPROBS)
    exp, metrics = _experience(tiny_cfg, rl, rollout, scores, old, ref)
    mask = np.asarray(rollout.response_mask)
    logp_all = _np_logprobs(old, rollout, tiny_cfg)[1]
    entropy = -(np.exp(logp_all) * logp_all).sum(-1)
    k = int(np.ceil(0.2 * mask.sum()))
    threshold = np.sort(entropy[mask])[::-1][k - 1]
    kept = mask & (entropy >= threshold)
    adv = np.asarray(exp.advantages)
    assert kept.sum() == k and np.all(adv[~kept] == 0.0) and np.all(adv[kept] != 0.0)
    assert float(metrics["entropy_kept_fraction"]) == pytest.approx(k / mask.sum())

    learned = {}
    for q in (None, 1.0):
        rlq = train.RLConfig(algo="grpo", group_size=4, entropy_top_fraction=q, **PLACEHOLDER_LOGPROBS)
        state = train.init_rl_state(train.init_rl_params(old, None, rlq), optax.sgd(0.5), rlq)
        learn = jax.jit(train.make_learn(tiny_cfg, optax.sgd(0.5), rlq, sample_cfg=SCFG))
        learned[q] = learn(state, ref, rollout, jnp.asarray(scores, jnp.float32), key=jax.random.key(0))[0]
    jax.tree.map(np.testing.assert_array_equal, learned[None].params, learned[1.0].params)


# ------------------------------------------------------------------------ rollout-mismatch weights


def test_mismatch_weights_are_an_identity_when_the_sampler_is_the_learner(tiny_cfg):
    """Rollouts from the library's own sampler (KV-cache decoding, its own logprobs) and a learner of the
    same weights: in every mode, weights 1 (to float rounding), nothing clipped or masked, the same update."""
    scfg = SampleConfig(max_new_tokens=6, temperature=0.7, top_k=5, eos_id=0)
    policy = models.init_params(jax.random.key(0), tiny_cfg)
    policy["wte"] = policy["wte"] * 20
    prompt = jax.random.randint(jax.random.key(4), (8, 3), 1, tiny_cfg.vocab_size)
    rollout = sampler.sample(policy, prompt, jnp.ones((8, 3), bool), tiny_cfg, scfg, key=jax.random.key(5))
    scores = jax.random.normal(jax.random.key(6), (8,))
    out = {}
    for mismatch in (None, *train.rl_config.MISMATCH):
        rl = train.RLConfig(algo="grpo", group_size=4, mismatch=mismatch)
        state = train.init_rl_state(train.init_rl_params(policy, None, rl), optax.sgd(0.5), rl)
        learn = jax.jit(train.make_learn(tiny_cfg, optax.sgd(0.5), rl, sample_cfg=scfg))
        out[mismatch] = learn(state, policy, rollout, scores, key=jax.random.key(0))
    base = out.pop(None)[0]
    assert len(out) == 4
    for mode, (weighted, metrics) in out.items():
        assert float(metrics["mismatch_mean_weight"]) == pytest.approx(1.0, abs=1e-5), mode
        dropped = "mismatch_masked_fraction" if mode.endswith("mask") else "mismatch_clipped_fraction"
        assert float(metrics[dropped]) == 0.0, mode
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), base.params, weighted.params
        )


def test_mismatch_weights_recover_the_learner_gradient_on_a_bandit(tiny_cfg):
    """A one-token bandit sampled by a deliberately perturbed sampler mu (a stratified sample: each token
    round(N mu(y)) times, no Monte-Carlo noise) while the learner is pi. The policy gradient of
    E_pi[s] is sum_y pi(y) s(y) grad log pi(y) (jax.grad of that closed form); the uncorrected update
    follows mu's weights instead and misses it, the token-truncated correction pi / mu recovers it."""
    cfg = tiny_cfg
    policy = models.init_params(jax.random.key(0), cfg)
    policy["wte"] = policy["wte"] * 5
    prompt_token = 5

    def next_logits(params):
        return models.logits_fn(params, jnp.full((1, 1), prompt_token), jnp.ones((1, 1), bool), cfg)[0, -1]

    log_pi = jax.nn.log_softmax(next_logits(policy))
    log_mu = jax.nn.log_softmax(log_pi + 0.8 * jax.random.normal(jax.random.key(9), log_pi.shape))
    counts = np.round(np.exp(np.asarray(log_mu, np.float64)) * 40_000).astype(int)
    tokens = np.repeat(np.arange(cfg.vocab_size), counts)
    n = len(tokens)
    score_of = jnp.asarray(np.random.default_rng(0).normal(size=cfg.vocab_size), jnp.float32)
    rollout = sampler.Rollout(
        prompt=jnp.full((n, 1), prompt_token, jnp.int32), prompt_mask=jnp.ones((n, 1), bool),
        response=jnp.asarray(tokens[:, None], jnp.int32), response_mask=jnp.ones((n, 1), bool),
        logprobs=log_mu[tokens][:, None], finished=jnp.ones(n, bool),
    )  # fmt: skip
    scores = score_of[tokens]
    ratio_max = float(jnp.max(jnp.exp(log_pi - log_mu)))
    cap = 2.0 * ratio_max  # truncation never acts here: the corrected estimate is unbiased

    # The exact gradient of -E_pi[s]: what one SGD step of lr 1 must move the params by.
    want = jax.grad(lambda p: -jnp.sum(jax.nn.softmax(next_logits(p)) * score_of))(policy)
    moved = {}
    for mismatch in (None, "token_truncate"):
        rl = train.RLConfig(
            algo="pg", kl_coef=0.0, whiten_advantages=False, mismatch=mismatch, mismatch_cap=cap
        )
        state = train.init_rl_state(train.init_rl_params(policy, None, rl), optax.sgd(1.0), rl)
        learn = jax.jit(train.make_learn(cfg, optax.sgd(1.0), rl, sample_cfg=SampleConfig(max_new_tokens=1)))
        new, _ = learn(state, policy, rollout, scores, key=jax.random.key(0))
        moved[mismatch] = jax.tree.map(lambda a, b: a - b, new.params["policy"], policy)

    def rel_error(step):
        got = np.concatenate([np.ravel(x) for x in jax.tree.leaves(step)])
        ref = -np.concatenate([np.ravel(x) for x in jax.tree.leaves(want)])
        return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))

    assert rel_error(moved["token_truncate"]) < 0.02, rel_error(moved["token_truncate"])
    assert rel_error(moved[None]) > 0.2, rel_error(moved[None])


# ------------------------------------------------------------ DAPO's overlong punishment and filter


def test_overlong_penalty_is_dapos_soft_punishment(tiny_cfg):
    """DAPO eq. 13 at L_max = 10, L_cache = 4: 0 up to 6 tokens, then -1/4 per token, -1 at 10 and past
    it; through make_experience it is added to the score (after the no-EOS penalty) and reported."""
    lengths = np.arange(12)
    want = np.array([0, 0, 0, 0, 0, 0, 0, -0.25, -0.5, -0.75, -1.0, -1.0])
    np.testing.assert_allclose(np.asarray(overlong_penalty(lengths, 10, 4)), want)
    with pytest.raises(ValueError, match="cache=11"):
        overlong_penalty(lengths, 10, 11)

    rollout = _rollout(tiny_cfg, [6, 1, 3, 2, 6, 5, 2, 4], finished=[1, 1, 1, 1, 0, 1, 1, 1])
    scores = np.array([0.3, -1.0, 2.0, 0.5, 1.0, 1.5, 0.0, -0.2])
    old, ref, _ = _models(tiny_cfg)
    rl = train.RLConfig(algo="grpo", group_size=4, overlong_cache=2, no_eos_penalty=-1.0)
    scfg = SampleConfig(max_new_tokens=6, eos_id=0)
    exp, metrics = _experience(tiny_cfg, rl, rollout, scores, old, ref, scfg)
    ramp = np.array([-1.0, 0, 0, 0, -1.0, -0.5, 0, 0])  # (6 - 2 - |y|) / 2 above 4 tokens
    base = np.where([1, 1, 1, 1, 0, 1, 1, 1], scores, -1.0)
    np.testing.assert_allclose(np.asarray(exp.scores), base + ramp, atol=1e-6)
    assert float(metrics["overlong_penalty"]) == pytest.approx(ramp.mean())
    with pytest.raises(ValueError, match="overlong_cache=7 is longer than the 6 tokens"):
        _experience(tiny_cfg, dataclasses.replace(rl, overlong_cache=7), rollout, scores, old, ref, scfg)


def test_truncated_answers_carry_no_loss_but_count_in_their_group(tiny_cfg):
    """mask_truncated (DAPO's overlong filtering, TRL's mask_truncated_completions): the unfinished rows'
    tokens leave the loss and its normaliser; the group advantages still come from every row. At ratio 1
    (pi = pi_old) the token-mean loss is then -sum_{finished tokens} A / #finished tokens, written out."""
    finished = np.array([1, 0, 1, 1, 0, 1, 1, 0], bool)
    lengths = [6, 1, 3, 2, 6, 5, 2, 4]
    rollout = _rollout(tiny_cfg, lengths, seed=4, finished=finished)
    scores = np.array([0.3, -1.0, 2.0, 0.5, 1.0, 1.5, 0.0, -0.2])
    old, ref, _ = _models(tiny_cfg)
    rl = train.RLConfig(
        algo="grpo", group_size=4, mask_truncated=True, kl_coef=0.0, loss_agg="token_mean",
        **PLACEHOLDER_LOGPROBS,
    )
    exp, _ = _experience(tiny_cfg, rl, rollout, scores, old, ref)
    g = scores.reshape(2, 4)
    adv = ((g - g.mean(1, keepdims=True)) / (g.std(1, ddof=1, keepdims=True) + 1e-4)).reshape(-1)
    kept = np.asarray(rollout.response_mask) & finished[:, None]
    want = -(adv[:, None] * kept).sum() / kept.sum()
    np.testing.assert_allclose(_loss(tiny_cfg, rl, exp, old), want, rtol=5e-4)  # eps 1e-4 in the std
    np.testing.assert_array_equal(np.asarray(exp.response_mask), kept)
    everything = dataclasses.replace(rl, mask_truncated=False)
    exp_all, _ = _experience(tiny_cfg, everything, rollout, scores, old, ref)
    np.testing.assert_allclose(np.asarray(exp_all.advantages)[kept], np.asarray(exp.advantages)[kept])


# ------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(objective="cispo", ratio_level="sequence"), "cispo' weighs token ratios"),
        (dict(objective="adam"), "objective"),
        (dict(mismatch="token"), "mismatch"),
        (dict(mismatch="token_mask", mismatch_cap=0.5), "mismatch_cap=0.5"),
        (dict(mismatch="token_mask", mismatch_cap=float("inf")), "mismatch_cap=inf"),
        (dict(entropy_top_fraction=0.0), "entropy_top_fraction"),
        (dict(entropy_top_fraction=1.5), "entropy_top_fraction"),
        (dict(overlong_cache=0), "overlong_cache"),
        (dict(clip_eps_high=float("nan")), "clip_eps_high"),
        (dict(algo="reinforce_pp", group_size=1), "REINFORCE\\+\\+-baseline needs >= 2"),
        (dict(algo="pg", objective="cispo"), None),
    ],
)
def test_bad_options_are_refused_in_one_line(kwargs, match):
    if match is None:  # an option of the clipped algorithms given to pg: the pipelines refuse it by name
        assert train.rl_config.inactive_fields("pg", list(kwargs)[1:]) == ["objective"]
        return
    with pytest.raises(ValueError, match=match):
        train.RLConfig(**kwargs)


def test_new_fields_are_refused_for_the_pair_algorithms():
    names = [
        "entropy_top_fraction",
        "overlong_cache",
        "mask_truncated",
        "mismatch",
        "clip_eps_high",
        "objective",
    ]
    assert train.rl_config.inactive_fields("rebel", names) == names
    assert train.rl_config.inactive_fields("grpo", names) == []
    assert train.rl_config.inactive_fields("pg", names) == ["clip_eps_high", "objective"]
