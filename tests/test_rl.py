"""RL updates against independent references: the KL's gradient on a softmax bandit (closed form), the
tempered policy's logprobs, ratio 1 before any update whatever the dropout, temperature and filters.

The references here are not the code's formulas written twice: the bandit gradients are closed forms
(d KL(pi || q) / d theta_j = pi_j (log(pi_j / q_j) - KL), d KL(q || pi) / d theta = pi - q), the exact KL of a
tiny model is differentiated by autodiff over its full next-token distribution, and the tempered / filtered
policies are built in NumPy from the teacher-forced logits.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxrlhf import losses, models, train
from jaxrlhf.rollout import SampleConfig, sampler

THETA = np.array([1.0, 0.0, -1.0], np.float32)  # bandit logits
REF = np.array([0.2, 0.3, 0.5], np.float32)  # reference policy
# Rollouts built by hand carry placeholder sampler logprobs: their old logprobs must be the learner's forward.
PLACEHOLDER_LOGPROBS = {"reuse_sampler_logprobs": False}


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _reverse_kl_grad(theta, q):
    """d KL(softmax(theta) || q) / d theta, closed form."""
    p = _softmax(theta)
    kl = np.sum(p * np.log(p / q))
    return p * (np.log(p / q) - kl)


def _bandit_samples(n=400_000, seed=0):
    actions = jax.random.categorical(jax.random.key(seed), jnp.asarray(THETA), shape=(n,))
    return actions[:, None], jnp.ones((n, 1), bool)  # [N, R = 1]


def _logprobs(theta, actions):
    return jnp.take_along_axis(jax.nn.log_softmax(theta)[None, :].repeat(len(actions), 0), actions, 1)


def test_bandit_reference_values():
    # The numbers quoted in the issue that asked for this test.
    np.testing.assert_allclose(_reverse_kl_grad(THETA, REF), [0.404, -0.196, -0.208], atol=2e-3)


def test_k1_in_the_reward_has_the_kl_gradient():
    """PG on the KL-shaped reward (score 0, beta 1): its gradient is grad KL(pi || ref)."""
    actions, mask = _bandit_samples()
    ref_lp = jnp.log(jnp.asarray(REF))[actions]

    def loss(theta):
        lp = _logprobs(theta, actions)
        rewards, _ = losses.shaped_rewards(
            jnp.zeros(len(actions)), jax.lax.stop_gradient(lp), ref_lp, mask, 1.0
        )
        return losses.pg_loss(lp, rewards, mask)[0]

    grad = jax.jit(jax.grad(loss))(jnp.asarray(THETA))
    np.testing.assert_allclose(grad, _reverse_kl_grad(THETA, REF), atol=0.01)


@pytest.mark.parametrize("kind", ["k2", "k3"])
def test_kl_in_the_reward_other_than_k1_is_refused(kind):
    with pytest.raises(ValueError, match="only k1"):
        losses.shaped_rewards(
            jnp.zeros(2), jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.ones((2, 3), bool), 0.1, kind
        )
    with pytest.raises(ValueError, match="only k1"):
        train.RLConfig(kl_kind=kind)


@pytest.mark.parametrize("kind", ["k2", "k3"])
def test_kl_loss_gradients(kind):
    """k2 as a loss: the reverse KL's gradient; k3 (GRPO): the forward KL's, pi - ref."""
    actions, mask = _bandit_samples(seed=1)
    ref_lp = jnp.log(jnp.asarray(REF))[actions]
    grad = jax.jit(jax.grad(lambda t: losses.kl_loss(_logprobs(t, actions), ref_lp, mask, kind)[0]))(
        jnp.asarray(THETA)
    )
    want = _reverse_kl_grad(THETA, REF) if kind == "k2" else _softmax(THETA) - REF
    np.testing.assert_allclose(grad, want, atol=0.01)
    # Either way the penalty pulls pi towards the reference.
    assert float(np.dot(grad, _reverse_kl_grad(THETA, REF))) > 0


def test_k1_as_a_loss_is_refused():
    with pytest.raises(ValueError, match="zero expected gradient"):
        train.RLConfig(kl_penalty="loss", kl_kind="k1")
    with pytest.raises(ValueError, match="gradient is 0"):
        losses.kl_loss(jnp.zeros((1, 1)), jnp.zeros((1, 1)), jnp.ones((1, 1), bool), "k1")


# ------------------------------------------------------------------- the same through train.make_learn

PROMPT_TOKEN, N_ROWS = 5, 50_000


def _prompt_logits(params, cfg):
    logits = models.logits_fn(params, jnp.full((1, 1), PROMPT_TOKEN), jnp.ones((1, 1), bool), cfg)
    return logits[0, -1]  # [V] next-token logits after the prompt


def _one_token_case(tiny_cfg, temperature):
    """A tiny GPT as a one-step bandit: one prompt token, one response token, a different reference.

    The responses are a stratified sample of the tempered policy (each token repeated round(N pi_T(y))
    times): an expectation over pi_T without Monte-Carlo noise, so the comparison below can be tight.
    """
    policy = models.init_params(jax.random.key(0), tiny_cfg)
    ref = models.init_params(jax.random.key(1), tiny_cfg)
    # Less flat next-token distributions than the 0.02-scale init gives, so the KL is not ~0; the policy
    # keeps every token at N pi_T(y) > 200, so the stratified sample covers the whole vocabulary (k3's
    # gradient is -sum_y q(y) grad log pi(y): it needs the tokens pi rarely samples too).
    policy["wte"], ref["wte"] = policy["wte"] * 5, ref["wte"] * 20
    probs = _softmax(np.asarray(_prompt_logits(policy, tiny_cfg), np.float64) / temperature)
    counts = np.round(probs * N_ROWS).astype(int)
    assert counts.min() > 200
    tokens = np.repeat(np.arange(tiny_cfg.vocab_size), counts)
    n = len(tokens)
    rollout = sampler.Rollout(
        prompt=jnp.full((n, 1), PROMPT_TOKEN, jnp.int32),
        prompt_mask=jnp.ones((n, 1), bool),
        response=jnp.asarray(tokens[:, None], jnp.int32),
        response_mask=jnp.ones((n, 1), bool),
        logprobs=jnp.zeros((n, 1)),
        finished=jnp.zeros((n,), bool),
    )
    return policy, ref, rollout, SampleConfig(max_new_tokens=1, temperature=temperature)


def _exact_kl(policy, ref, tiny_cfg, temperature, direction):
    """KL between the tempered next-token distributions after the prompt, over the whole vocabulary."""
    p = jax.nn.log_softmax(_prompt_logits(policy, tiny_cfg) / temperature)
    q = jax.nn.log_softmax(_prompt_logits(ref, tiny_cfg) / temperature)
    if direction == "reverse":
        return jnp.sum(jnp.exp(p) * (p - q))
    return jnp.sum(jnp.exp(q) * (q - p))


def _relative_error(got, want):
    got = np.concatenate([np.ravel(x) for x in jax.tree.leaves(got)])
    want = np.concatenate([np.ravel(x) for x in jax.tree.leaves(want)])
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


@pytest.mark.parametrize(
    "penalty,kind,direction",
    [("reward", "k1", "reverse"), ("loss", "k2", "reverse"), ("loss", "k3", "forward")],
)
def test_make_learn_kl_gradient_at_temperature(tiny_cfg, penalty, kind, direction):
    """One PG step (SGD, lr 1, score 0, beta 1) moves the params by -grad of the exact KL between the
    *tempered* policies (T = 0.7): scoring at T = 1 while sampling at 0.7 would miss it."""
    temperature = 0.7
    policy, ref, rollout, scfg = _one_token_case(tiny_cfg, temperature)
    rlc = train.RLConfig(
        algo="pg", kl_coef=1.0, kl_penalty=penalty, kl_kind=kind, whiten_advantages=False,
        **PLACEHOLDER_LOGPROBS,
    )
    tx = optax.sgd(1.0)
    state = train.init_rl_state(train.init_rl_params(policy, None, rlc), tx, rlc)
    learn = jax.jit(train.make_learn(tiny_cfg, tx, rlc, sample_cfg=scfg))
    new, _ = learn(state, ref, rollout, jnp.zeros(rollout.response.shape[0]), key=jax.random.key(3))
    step = jax.tree.map(lambda a, b: a - b, policy, new.params["policy"])  # = the gradient
    exact = jax.grad(_exact_kl)(policy, ref, tiny_cfg, temperature, direction)
    assert _relative_error(step, exact) < 0.02
    untempered = jax.grad(_exact_kl)(policy, ref, tiny_cfg, 1.0, direction)
    assert _relative_error(step, untempered) > 0.1  # what scoring at T = 1 would have given


# ------------------------------------------------------------------ tempered and filtered logprobs


def _teacher_forced(params, rollout, cfg):
    r = rollout.response.shape[1]
    return np.asarray(models.logits_fn(params, rollout.tokens, rollout.mask, cfg)[:, -r - 1 : -1], np.float64)


def _np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _rl_rollout(cfg, scfg, b=8):
    policy = models.init_params(jax.random.key(0), cfg)
    policy["wte"] = policy["wte"] * 20
    prompt = jax.random.randint(jax.random.key(4), (b, 3), 1, cfg.vocab_size)
    rollout = sampler.sample(policy, prompt, jnp.ones((b, 3), bool), cfg, scfg, key=jax.random.key(5))
    return policy, rollout


@pytest.mark.parametrize("filtered", [False, True])
def test_experience_logprobs_are_the_tempered_policy(tiny_cfg, filtered):
    scfg = SampleConfig(max_new_tokens=6, temperature=0.7, top_k=5, eos_id=0)
    policy, rollout = _rl_rollout(tiny_cfg, scfg)
    ref = models.init_params(jax.random.key(9), tiny_cfg)
    rlc = train.RLConfig(algo="pg", filtered_logprobs=filtered)
    state = train.init_rl_state(train.init_rl_params(policy, None, rlc), optax.sgd(0.0), rlc)
    exp, metrics = train.make_experience(state, ref, rollout, jnp.zeros(8), tiny_cfg, rlc, sample_cfg=scfg)

    m = np.asarray(rollout.response_mask)
    tempered = _teacher_forced(policy, rollout, tiny_cfg) / 0.7  # [B, R, V]
    resp = np.asarray(rollout.response)[..., None]
    want = np.take_along_axis(_np_log_softmax(tempered), resp, -1)[..., 0]
    # The sampler records the tempered, unfiltered logprobs (KV-cache path).
    np.testing.assert_allclose(np.where(m, rollout.logprobs, 0), np.where(m, want, 0), atol=1e-4)
    # Top-5 by NumPy: the distribution the tokens were drawn from, renormalised.
    top = np.argsort(-tempered, -1)[..., :5]
    keep = np.zeros_like(tempered, bool)
    np.put_along_axis(keep, top, True, -1)
    assert np.all(np.take_along_axis(keep, resp, -1)[..., 0] | ~m), "sampled outside the top-k"
    log_mass = np.log(np.sum(np.where(keep, np.exp(_np_log_softmax(tempered)), 0.0), -1))  # [B, R]
    if filtered:
        want = want - log_mass
    np.testing.assert_allclose(np.where(m, exp.old_logprobs, 0), np.where(m, want, 0), atol=1e-5)
    # The reference is tempered, never filtered.
    ref_t = _teacher_forced(ref, rollout, tiny_cfg) / 0.7
    ref_want = np.take_along_axis(_np_log_softmax(ref_t), resp, -1)[..., 0]
    np.testing.assert_allclose(np.where(m, exp.ref_logprobs, 0), np.where(m, ref_want, 0), atol=1e-5)
    # KL(filtered || unfiltered) per token = -log(kept mass), averaged over the response tokens.
    assert float(metrics["filter_kl"]) == pytest.approx(float(np.sum(-log_mass * m) / m.sum()), abs=1e-5)
    assert float(metrics["filter_kl"]) > 0.01


def _dropout_cfg(cfg):
    return dataclasses.replace(cfg, embd_pdrop=0.1, resid_pdrop=0.1, attn_pdrop=0.1)


@pytest.mark.parametrize("filtered", [False, True], ids=["unfiltered", "filtered"])
def test_ratio_is_one_at_learning_rate_zero(tiny_cfg, filtered):
    """With dropout in the model config, T = 0.7 and top-k: PPO's ratio is exactly 1 and nothing is
    clipped when the update cannot move the policy; with `RLConfig.dropout` it is not (the flag acts)."""
    cfg = _dropout_cfg(tiny_cfg)
    scfg = SampleConfig(max_new_tokens=6, temperature=0.7, top_k=5, eos_id=0)
    policy, rollout = _rl_rollout(cfg, scfg)
    value = {"gpt": policy, "head": models.init_scalar_head(jax.random.key(1), cfg, scale=1.0)}
    ref = models.init_params(jax.random.key(9), cfg)
    scores = jnp.linspace(-1.0, 1.0, 8)

    def run(dropout):
        rlc = train.RLConfig(epochs=2, minibatches=2, dropout=dropout, filtered_logprobs=filtered)
        state = train.init_rl_state(train.init_rl_params(policy, value, rlc), optax.sgd(0.0), rlc)
        learn = jax.jit(train.make_learn(cfg, optax.sgd(0.0), rlc, sample_cfg=scfg))
        return learn(state, ref, rollout, scores, key=jax.random.key(6))[1]

    metrics = run(dropout=False)
    assert float(metrics["ratio_max"]) == pytest.approx(1.0, abs=1e-5)
    assert float(metrics["ratio_mean"]) == pytest.approx(1.0, abs=1e-6)
    assert float(metrics["clipfrac"]) == 0.0 and abs(float(metrics["approx_kl"])) < 1e-6
    assert float(metrics["value_clipfrac"]) == 0.0
    if not filtered:  # one compile less: the flag's effect does not depend on the filter
        with_dropout = run(dropout=True)
        assert float(with_dropout["ratio_max"]) > 1.01


def test_options_that_would_do_nothing_are_refused(tiny_cfg):
    with pytest.raises(ValueError, match="group_size acts for grpo, rloo and reinforce_pp only"):
        train.RLConfig(algo="ppo", group_size=4)
    with pytest.raises(ValueError, match="needs >= 2 answers"):
        train.RLConfig(algo="rloo")
    with pytest.raises(ValueError, match="acts for grpo only"):
        train.RLConfig(algo="rloo", group_size=4, grpo_scale_by_std=False)
    with pytest.raises(ValueError, match="filtered_logprobs does nothing"):
        train.make_learn(tiny_cfg, optax.sgd(0.0), train.RLConfig(algo="pg", filtered_logprobs=True),
                      sample_cfg=SampleConfig(max_new_tokens=2))  # fmt: skip


def test_sample_cfg_is_required_and_not_greedy(tiny_cfg):
    rlc = train.RLConfig(algo="pg")
    with pytest.raises(ValueError, match="greedy"):
        train.make_learn(
            tiny_cfg, optax.sgd(0.0), rlc, sample_cfg=SampleConfig(max_new_tokens=2, temperature=0)
        )
    with pytest.raises(TypeError, match="SampleConfig"):
        train.make_learn(tiny_cfg, optax.sgd(0.0), rlc, sample_cfg=None)


@pytest.mark.parametrize("algo", ["dpo", "rebel"])
def test_preference_steps_start_at_the_reference_despite_dropout(tiny_cfg, algo):
    """pi = pi_ref before any update: DPO's loss is log 2 and REBEL predicts a zero difference."""
    cfg = _dropout_cfg(tiny_cfg)
    params = models.init_params(jax.random.key(0), cfg)
    b, t = 4, 10
    tokens = jax.random.randint(jax.random.key(1), (b, 2, t), 1, cfg.vocab_size)
    mask = jnp.ones((b, 2, t), bool)
    loss_mask = mask & (jnp.arange(t) >= 4)
    batch = train.PrefBatch(
        tokens, mask, loss_mask, jnp.zeros((b, 2)), jnp.array([[1.0, 0.0]] * b), jnp.ones(b, bool)
    )
    ref = train.pair_logprobs(params, batch, cfg)  # deterministic: what the pipelines store
    batch = batch._replace(ref_logprobs=ref)
    tx = optax.sgd(0.0)
    if algo == "dpo":
        step = train.make_dpo_step(cfg, tx, beta=0.1)
    else:
        step = train.make_rebel_step(cfg, tx, eta=1.0, epochs=1)  # the first update
    state = train.init_train_state(params, tx)
    _, metrics = jax.jit(lambda s, x, k: step(s, x, key=k))(state, batch, jax.random.key(7))
    if algo == "dpo":
        assert float(metrics["loss"]) == pytest.approx(float(np.log(2.0)), abs=1e-6)
    else:
        assert abs(float(metrics["predicted_diff"])) < 1e-5
        assert float(metrics["loss"]) == pytest.approx(1.0, abs=1e-5)  # (0 - (1 - 0))^2


# ----------------------------------------------------- every algorithm on a task with a known optimum

TARGET = 3  # reward = the fraction of response tokens equal to TARGET: the best answer is all TARGET
TASK_CFG = dict(vocab_size=8, block_size=8, n_layer=2, n_head=2, n_embd=32)


def _target_reward(rollout):
    hits = (rollout.response == TARGET) & rollout.response_mask
    return jnp.sum(hits, -1) / jnp.maximum(jnp.sum(rollout.response_mask, -1), 1)


# Variants on another algorithm's update: (algo, RLConfig fields).
VARIANTS = {
    "gspo": ("grpo", dict(ratio_level="sequence")),  # GRPO with a sequence ratio
    "cispo": ("grpo", dict(objective="cispo", loss_agg="token_mean")),
    # DAPO's loss (clip-higher, the token mean); its length shaping needs answers that stop (an EOS), which
    # this task's have not: test_rl_options tests those.
    "dapo": ("grpo", dict(clip_eps_high=0.28, loss_agg="token_mean")),
    "reinforce_pp": ("reinforce_pp", dict(group_size=None)),
}


@pytest.mark.parametrize(
    "algo", ["ppo", "pg", "grpo", "gspo", "cispo", "dapo", "rloo", "reinforce_pp", "rebel", "dpo", "ipo"]
)
def test_every_algorithm_climbs_to_the_known_best_answer(algo):
    """From a random policy (reward ~1/8), 30 iterations of each algorithm must take the mean reward above
    0.5 (measured: ppo, pg, grpo, rloo, rebel, dpo reach ~1.0, ipo ~0.65 at beta 0.1, which holds the policy
    near the reference); an update with a wrong sign, a lost gradient or an ignored advantage would not."""
    from jaxrlhf.models import ModelConfig
    from jaxrlhf.rollout import pairs as pairs_lib

    cfg = ModelConfig(**TASK_CFG)
    scfg = SampleConfig(max_new_tokens=6, temperature=1.0)
    policy = models.init_params(jax.random.key(0), cfg)
    tx = optax.adam(1e-2)
    iters, b = 30, 32
    start_key = jax.random.key(1)
    rewards_seen = []
    algo, variant = VARIANTS.get(algo, (algo, {}))
    if algo in train.rl_config.ALGOS:
        rlc = train.RLConfig(**{
            "algo": algo, "kl_coef": 0.01, "epochs": 2, "minibatches": 2, "vf_coef": 0.5,
            "group_size": 4 if algo in ("grpo", "rloo", "reinforce_pp") else None,
            "kl_penalty": "loss" if algo == "grpo" else "reward", "kl_kind": "k3" if algo == "grpo" else "k1",
            "whiten_advantages": algo in ("ppo", "pg"), **variant,
        })  # fmt: skip
        value = (
            {"gpt": policy, "head": models.init_scalar_head(jax.random.key(2), cfg)}
            if algo == "ppo"
            else None
        )
        optim = train.OptimConfig(lr=5e-3, b2=0.999, weight_decay=0.0)
        tx = train.make_per_model_optimizer({"policy": optim, "value": optim})
        state = train.init_rl_state(train.init_rl_params(policy, value, rlc), tx, rlc)
        fused = train.make_fused_iteration(cfg, scfg, tx, rlc, _target_reward)
        prompt, prompt_mask = jnp.ones((b, 1), jnp.int32), jnp.ones((b, 1), bool)
        iteration = jax.jit(lambda s, k: fused(s, policy, prompt, prompt_mask, key=k))
        for i in range(iters):
            state, metrics, _ = iteration(state, jax.random.fold_in(start_key, i))
            assert float(metrics["finite"]) == 1.0
            rewards_seen.append(float(metrics["reward"]))
    else:
        n, n_prompts = 4, b // 4
        if algo == "rebel":
            step = train.make_rebel_step(cfg, tx, eta=1.0)
        else:
            step = train.make_dpo_step(cfg, tx, beta=0.1, loss_type="ipo" if algo == "ipo" else "sigmoid")
        state = train.init_train_state(policy, tx)
        pprompt, pmask = jnp.ones((n_prompts, 1), jnp.int32), jnp.ones((n_prompts, 1), bool)
        gen = jax.jit(lambda p, k: pairs_lib.generate_answers(p, pprompt, pmask, cfg, scfg, n, key=k))
        jstep = jax.jit(lambda s, x, k: step(s, x, key=k))
        logprobs = jax.jit(lambda p, r: pairs_lib.rollout_logprobs(p, r, cfg))
        for i in range(iters):
            rollout = gen(state.params, jax.random.fold_in(start_key, i))
            scores = np.asarray(_target_reward(rollout))
            rewards_seen.append(float(scores.mean()))
            sel = pairs_lib.select_pairs(
                np.asarray(rollout.response), np.asarray(rollout.response_mask), scores, n
            )
            base = logprobs(state.params if algo == "rebel" else policy, rollout)
            batch = pairs_lib.build_pref_batch(rollout, sel, np.asarray(base), num_pairs=n_prompts)
            state, metrics = jstep(state, batch, jax.random.fold_in(start_key, 1000 + i))
            assert float(metrics["finite"]) == 1.0
    start, end = rewards_seen[0], np.mean(rewards_seen[-5:])  # the first batch: the random policy
    assert start < 0.25, rewards_seen[:5]
    assert end > max(0.5, start + 0.35), f"{algo}: " + " ".join(f"{r:.2f}" for r in rewards_seen)


def test_ptx_adds_gamma_times_the_pretraining_gradient(tiny_cfg):
    """With a zero policy gradient (equal scores, no KL), one SGD step of PPO-ptx is -lr * gamma * the
    gradient of the next-token cross-entropy of the ptx batch (InstructGPT eq. 2), computed here directly."""
    gamma, lr = 0.5, 0.1
    policy = models.init_params(jax.random.key(0), tiny_cfg)
    n, scfg = 8, SampleConfig(max_new_tokens=3, temperature=1.0)
    rollout = sampler.Rollout(  # any responses do (no sampler to compile): their advantages are 0
        prompt=jnp.full((n, 1), PROMPT_TOKEN, jnp.int32),
        prompt_mask=jnp.ones((n, 1), bool),
        response=jax.random.randint(jax.random.key(4), (n, 3), 1, tiny_cfg.vocab_size),
        response_mask=jnp.arange(3)[None, :] < jnp.array([3, 2, 1, 3, 3, 2, 1, 3])[:, None],
        logprobs=jnp.zeros((n, 3)),
        finished=jnp.zeros((n,), bool),
    )
    tokens = jax.random.randint(jax.random.key(3), (4, 9), 1, tiny_cfg.vocab_size)
    mask = jnp.arange(9)[None, :] < jnp.array([9, 7, 5, 9])[:, None]
    ptx = train.LMBatch(tokens, mask, mask)
    rlc = train.RLConfig(algo="pg", kl_coef=0.0, ptx_coef=gamma)
    tx = optax.sgd(lr)
    state = train.init_rl_state(train.init_rl_params(policy, None, rlc), tx, rlc)
    learn = jax.jit(train.make_learn(tiny_cfg, tx, rlc, sample_cfg=scfg))
    new, metrics = learn(state, policy, rollout, jnp.ones(n), key=jax.random.key(0), ptx=ptx)

    def cross_entropy(params):
        logp = jax.nn.log_softmax(models.logits_fn(params, tokens[:, :-1], mask[:, :-1], tiny_cfg), -1)
        nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
        target = mask[:, 1:]
        return jnp.sum(jnp.where(target, nll, 0.0)) / jnp.sum(target)

    ce, grad = jax.jit(jax.value_and_grad(cross_entropy))(policy)
    want = jax.tree.map(lambda p, g: p - lr * gamma * g, policy, grad)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), new.params["policy"], want)
    assert float(metrics["ptx_loss"]) == pytest.approx(float(ce), rel=1e-5)
    with pytest.raises(ValueError, match="needs a batch of pretraining text"):
        learn(state, policy, rollout, jnp.ones(n), key=jax.random.key(0))
    plain = train.make_learn(tiny_cfg, tx, train.RLConfig(algo="pg"), sample_cfg=scfg)
    with pytest.raises(ValueError, match="ptx_coef is 0"):
        plain(state, policy, rollout, jnp.ones(n), key=jax.random.key(0), ptx=ptx)


def test_whiten_rewards_scales_the_rewards_to_unit_variance(tiny_cfg):
    """lm-human-preferences' reward whitening without a mean shift, (r - mean) / std + mean over the real
    tokens, checked on the PG returns (reward-to-go) against the same transform done in NumPy."""
    scfg = SampleConfig(max_new_tokens=6, temperature=0.7, top_k=5, eos_id=0)
    policy, rollout = _rl_rollout(tiny_cfg, scfg)
    ref = models.init_params(jax.random.key(9), tiny_cfg)
    scores = jnp.linspace(-2.0, 3.0, 8)

    def returns(whiten):
        rlc = train.RLConfig(algo="pg", kl_coef=0.3, whiten_rewards=whiten)
        state = train.init_rl_state(train.init_rl_params(policy, None, rlc), optax.sgd(0.0), rlc)
        return np.asarray(
            train.make_experience(state, ref, rollout, scores, tiny_cfg, rlc, sample_cfg=scfg)[0].returns
        )

    plain, white = returns(False), returns(True)
    m = np.asarray(rollout.response_mask)
    rewards = plain - np.concatenate([plain[:, 1:], np.zeros((8, 1))], 1)  # reward-to-go -> rewards
    mean, std = rewards[m].mean(), rewards[m].std(ddof=1)
    whitened = np.where(m, (rewards - mean) / std + mean, 0.0)
    want = np.cumsum(whitened[:, ::-1], axis=1)[:, ::-1]  # reward-to-go again
    np.testing.assert_allclose(white[m], want[m], rtol=1e-4, atol=1e-4)
    assert abs(std - 1.0) > 0.1  # the test would not notice a no-op otherwise
    with pytest.raises(ValueError, match="whiten_rewards acts for ppo and pg"):
        train.RLConfig(algo="grpo", group_size=4, whiten_rewards=True)


def test_ppo_update_is_the_policy_gradient_plus_the_critic_regression(tiny_cfg):
    """One SGD step of PPO at ratio 1 moves the policy by lr x the advantage-weighted score function
    (-mean_t A_t grad log pi(y_t)) and the critic by lr x vf_coef x the squared error's gradient
    (0.5 mean_t (V_t - G_t)^2), both written here from the model's outputs; so the two updates, which the
    update computes one after the other to hold one model's activations at a time, are neither mixed
    nor lost. The critic's weight moves the critic alone."""
    lr, n, r = 0.05, 8, 4
    policy = models.init_params(jax.random.key(0), tiny_cfg)
    value = {
        "gpt": models.init_params(jax.random.key(1), tiny_cfg),
        "head": models.init_scalar_head(jax.random.key(2), tiny_cfg),
    }
    rmask = jnp.arange(r)[None, :] < jnp.array([4, 3, 1, 4, 2, 4, 3, 2])[:, None]
    rollout = sampler.Rollout(
        prompt=jnp.full((n, 1), PROMPT_TOKEN, jnp.int32),
        prompt_mask=jnp.ones((n, 1), bool),
        response=jax.random.randint(jax.random.key(3), (n, r), 1, tiny_cfg.vocab_size),
        response_mask=rmask,
        logprobs=jnp.zeros((n, r)),
        finished=jnp.ones((n,), bool),
    )
    tokens = jnp.concatenate([rollout.prompt, rollout.response], 1)
    full = jnp.ones_like(tokens, bool)
    scores = jax.random.normal(jax.random.key(4), (n,))
    scfg = SampleConfig(max_new_tokens=r, temperature=1.0)
    tx = optax.sgd(lr)

    def policy_objective(p, advantages):
        logp = jax.nn.log_softmax(models.logits_fn(p, tokens[:, :-1], full[:, :-1], tiny_cfg), -1)
        logp = jnp.take_along_axis(logp, rollout.response[..., None], -1)[..., 0]
        return -jnp.sum(jnp.where(rmask, advantages * logp, 0.0)) / jnp.sum(rmask)

    def critic_error(v, returns):
        values = models.scalar_fn(v, tokens, full, tiny_cfg)[:, -r - 1 : -1]
        return 0.5 * jnp.sum(jnp.where(rmask, (values - returns) ** 2, 0.0)) / jnp.sum(rmask)

    def moved(new, old):
        return jax.tree.map(jnp.subtract, new, old)

    policies = []
    for vf_coef in (0.1, 1.0):
        rlc = train.RLConfig(
            algo="ppo", kl_coef=0.05, vf_coef=vf_coef, epochs=1, minibatches=1,
            **PLACEHOLDER_LOGPROBS,
        )
        state = train.init_rl_state(train.init_rl_params(policy, value, rlc), tx, rlc)
        exp, _ = jax.jit(  # eager, a transformer runs op by op: slow
            lambda s, rlc=rlc: train.make_experience(
                s, policy, rollout, scores, tiny_cfg, rlc, sample_cfg=scfg
            )
        )(state)
        new, metrics = jax.jit(train.make_learn(tiny_cfg, tx, rlc, sample_cfg=scfg))(
            state, policy, rollout, scores, key=jax.random.key(5)
        )
        assert float(metrics["finite"]) == 1.0 and float(metrics["clipfrac"]) == 0.0
        g_policy = jax.jit(jax.grad(policy_objective))(policy, exp.advantages)
        g_value = jax.jit(jax.grad(critic_error))(value, exp.returns)
        want_policy = jax.tree.map(lambda g: -lr * g, g_policy)
        want_value = jax.tree.map(lambda g, c=vf_coef: -lr * c * g, g_value)
        assert _relative_error(moved(new.params["policy"], policy), want_policy) < 1e-4
        assert _relative_error(moved(new.params["value"], value), want_value) < 1e-4
        policies.append(new.params["policy"])
    jax.tree.map(np.testing.assert_array_equal, *policies)


def _ppo_models_and_rollout(cfg, n, r, response_mask=None):
    """A policy, a value model ({"gpt", "head"}) and a rollout of n random responses of r tokens from the
    prompt token (every token real unless `response_mask` says otherwise)."""
    policy = models.init_params(jax.random.key(0), cfg)
    value = {
        "gpt": models.init_params(jax.random.key(1), cfg),
        "head": models.init_scalar_head(jax.random.key(2), cfg),
    }
    rollout = sampler.Rollout(
        prompt=jnp.full((n, 1), PROMPT_TOKEN, jnp.int32),
        prompt_mask=jnp.ones((n, 1), bool),
        response=jax.random.randint(jax.random.key(3), (n, r), 1, cfg.vocab_size),
        response_mask=jnp.ones((n, r), bool) if response_mask is None else response_mask,
        logprobs=jnp.zeros((n, r)),
        finished=jnp.ones((n,), bool),
    )
    return policy, value, rollout


def test_ppo_update_holds_one_models_activations_at_a_time(tiny_cfg):
    """The PPO update's XLA temporaries are about the larger of the policy's and the critic's gradient
    programs alone, not their sum: the critic's forward and backward wait for the policy's gradient (on
    gpt-micro's HappyGPT update `memory_analysis()` gives 48 MB instead of 99)."""
    cfg = dataclasses.replace(tiny_cfg, n_embd=64, n_head=4)
    n, r = 32, 16
    policy, value, rollout = _ppo_models_and_rollout(cfg, n, r)
    scfg = SampleConfig(max_new_tokens=r, temperature=1.0)
    rlc = train.RLConfig(algo="ppo")
    tx = optax.adam(1e-3)
    state = train.init_rl_state(train.init_rl_params(policy, value, rlc), tx, rlc)
    exp, _ = train.make_experience(state, policy, rollout, jnp.zeros(n), cfg, rlc, sample_cfg=scfg)

    def temp_mb(f, *args):
        return jax.jit(f).lower(*args).compile().memory_analysis().temp_size_in_bytes / 1e6

    step = train.make_rl_step(cfg, tx, rlc, sample_cfg=scfg)
    both = temp_mb(lambda s: step(s, exp, key=jax.random.key(0)), state)
    pol = temp_mb(
        jax.grad(lambda p: train.policy._policy_loss(p, exp, None, 0.05, cfg, rlc, scfg, None)[0]), policy
    )
    val = temp_mb(jax.grad(lambda v: train.policy._value_loss(v, exp, cfg, rlc, None)[0]), value)
    assert both < 0.8 * (pol + val), (both, pol, val)


MICRO_CASES = {
    "ppo": dict(algo="ppo", ent_coef=0.01, epochs=2, minibatches=2),
    "grpo_seq_mean_token_mean": dict(
        algo="grpo", group_size=4, kl_penalty="loss", kl_kind="k3", loss_agg="seq_mean_token_mean"
    ),
    "rloo_gspo_constant": dict(algo="rloo", group_size=2, ratio_level="sequence", loss_agg="constant"),
    "pg_ptx_seq_mean_token_sum": dict(algo="pg", ptx_coef=0.5, loss_agg="seq_mean_token_sum"),
}


@pytest.mark.parametrize("case", sorted(MICRO_CASES))
def test_micro_batches_give_the_whole_minibatchs_update(tiny_cfg, case):
    """Gradient accumulation over micro-batches is the unsliced update: the same params after it (plain
    SGD, so the params move by the gradient itself) and the same metrics, for every loss aggregation,
    with responses of unequal lengths and an empty one (slices hold unequal token and row counts, so a
    wrong weight shows), ptx and a KL loss term; and the slices' activations are not alive together."""
    n, r = 16, 8
    lengths = jax.random.randint(jax.random.key(4), (n,), 1, r + 1).at[5].set(0)
    response_mask = jnp.arange(r)[None, :] < lengths[:, None]
    policy, value, rollout = _ppo_models_and_rollout(tiny_cfg, n, r, response_mask)
    ptx = None
    if MICRO_CASES[case].get("ptx_coef"):
        ids = jax.random.randint(jax.random.key(5), (4, 9), 1, tiny_cfg.vocab_size)
        ptx = train.LMBatch(
            ids, jnp.ones_like(ids, bool), jnp.arange(9)[None, :] < jnp.array([[9], [3], [6], [2]])
        )
    scfg = SampleConfig(max_new_tokens=r, temperature=1.0)
    scores = jax.random.normal(jax.random.key(6), (n,))
    tx = optax.sgd(1.0)
    runs = {}
    for micro in (1, 4):
        rlc = train.RLConfig(**MICRO_CASES[case], micro_batches=micro)
        start = train.init_rl_params(policy, value if rlc.algo == "ppo" else None, rlc)
        learn = jax.jit(train.make_learn(tiny_cfg, tx, rlc, sample_cfg=scfg))
        runs[micro] = learn(
            train.init_rl_state(start, tx, rlc), policy, rollout, scores, key=jax.random.key(7), ptx=ptx
        )
    (one, m1), (four, m4) = runs[1], runs[4]
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), one.params, start)
    assert max(jax.tree.leaves(moved)) > 1e-3  # the update moved the params: the comparison means something
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6), one.params, four.params)
    assert set(m1) == set(m4)
    for name in m1:
        np.testing.assert_allclose(m4[name], m1[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_micro_batches_hold_a_slice_of_the_activations_and_are_checked(tiny_cfg):
    """4 slices need well under the whole minibatch's XLA temporaries; slices that do not divide the
    minibatch (or the ptx batch) are refused by name before any work."""
    cfg = dataclasses.replace(tiny_cfg, n_embd=64, n_head=4)
    n, r = 32, 16
    policy, value, rollout = _ppo_models_and_rollout(cfg, n, r)
    scfg = SampleConfig(max_new_tokens=r, temperature=1.0)
    tx = optax.adam(1e-3)
    temps = {}
    for micro in (1, 4):
        rlc = train.RLConfig(algo="ppo", epochs=1, micro_batches=micro)
        state = train.init_rl_state(train.init_rl_params(policy, value, rlc), tx, rlc)
        exp, _ = train.make_experience(state, policy, rollout, jnp.zeros(n), cfg, rlc, sample_cfg=scfg)
        step = train.make_rl_step(cfg, tx, rlc, sample_cfg=scfg)
        compiled = jax.jit(functools.partial(step, key=jax.random.key(0))).lower(state, exp).compile()
        temps[micro] = compiled.memory_analysis().temp_size_in_bytes
    assert temps[4] < 0.5 * temps[1], temps
    with pytest.raises(ValueError, match="micro_batches"):
        train.RLConfig(micro_batches=0)
    rlc = train.RLConfig(algo="ppo", minibatches=2, micro_batches=3)
    learn = train.make_learn(cfg, tx, rlc, sample_cfg=scfg)
    state = train.init_rl_state(train.init_rl_params(policy, value, rlc), tx, rlc)
    with pytest.raises(ValueError, match="16 rows is not divisible by micro_batches=3"):
        learn(state, policy, rollout, jnp.zeros(n), key=jax.random.key(0))
    from jaxrlhf.stages.policy import RLStageConfig  # noqa: PLC0415  (the pipelines' config: at construction)

    with pytest.raises(ValueError, match="micro_batches=3 must divide an update's 16 rows"):
        RLStageConfig(batch_size=n, rl=rlc)


# ------------------------------------------------------------------ GRPO / RLOO: the published defaults


def _grouped_rollout(cfg, lengths, seed=0):
    """A rollout of len(lengths) rows, row i with lengths[i] response tokens (the last one EOS = 0)."""
    rng = np.random.default_rng(seed)
    b, r = len(lengths), max(lengths)
    response = rng.integers(1, cfg.vocab_size, (b, r)).astype(np.int32)
    mask = np.arange(r)[None] < np.array(lengths)[:, None]
    response[np.arange(b), np.array(lengths) - 1] = 0
    response = np.where(mask, response, 0)
    prompt = rng.integers(1, cfg.vocab_size, (b, 3)).astype(np.int32)
    return sampler.Rollout(
        prompt=jnp.asarray(prompt), prompt_mask=jnp.ones((b, 3), bool), response=jnp.asarray(response),
        response_mask=jnp.asarray(mask), logprobs=jnp.zeros((b, r)), finished=jnp.ones(b, bool),
    )  # fmt: skip


def test_default_grpo_advantages_are_the_group_standardised_scores(tiny_cfg):
    """Issue #29's example: two groups of four, binary scores, lengths [6,1,1,1 | 6,6,2,2]. GRPO
    (DeepSeekMath eq. 3 / TRL GRPOTrainer: (r - group mean) / (group std + eps), std with Bessel's
    correction) gives every token of a row its group advantage, with no re-whitening over tokens; each
    group's advantages sum to zero."""
    rl = train.RLConfig(algo="grpo", group_size=4)
    scfg = SampleConfig(max_new_tokens=6, temperature=1.0, eos_id=0)
    rollout = _grouped_rollout(tiny_cfg, [6, 1, 1, 1, 6, 6, 2, 2])
    scores = jnp.array([1.0, 0, 0, 0, 1, 1, 0, 0])
    policy = models.init_params(jax.random.key(0), tiny_cfg)
    state = train.init_rl_state(train.init_rl_params(policy, None, rl), optax.sgd(0.1), rl)
    exp, _ = train.make_experience(state, policy, rollout, scores, tiny_cfg, rl, sample_cfg=scfg)
    want = np.array([1.5, -0.5, -0.5, -0.5, 0.8660254, 0.8660254, -0.8660254, -0.8660254])
    adv = np.asarray(exp.advantages)
    mask = np.asarray(rollout.response_mask)
    np.testing.assert_allclose(adv, np.where(mask, want[:, None], 0.0), atol=2e-4)  # eps = 1e-4 in the std
    assert rl.resolved().kl_penalty == "loss" and rl.resolved().kl_kind == "k3"  # the KL is a k3 loss term
    assert rl.resolved().loss_agg == "seq_mean_token_mean" and not rl.resolved().whiten_advantages


def test_default_grpo_loss_is_trls_written_out(tiny_cfg):
    """The default GRPO update's loss for a policy moved away from pi_old, against TRL's GRPOTrainer
    conventions written out here in NumPy (trl/trainer/grpo_trainer.py, loss_type "grpo", epsilon 0.2):
    per token -min(ratio A, clip(ratio, 0.8, 1.2) A) + beta k3, k3 = exp(ref - logp) - (ref - logp) - 1,
    averaged over each sequence's tokens, then over sequences; A the group-standardised score."""
    rl = train.RLConfig(algo="grpo", group_size=4, **PLACEHOLDER_LOGPROBS)
    beta = rl.resolved().kl_coef
    assert beta == 0.04  # DeepSeekMath section 4.2
    scfg = SampleConfig(max_new_tokens=6, temperature=1.0, eos_id=0)
    rollout = _grouped_rollout(tiny_cfg, [6, 1, 3, 2, 6, 5, 2, 4], seed=1)
    scores = jnp.array([0.3, -1.0, 2.0, 0.5, 1.0, 1.5, 0.0, -0.2])
    old, ref = (models.init_params(jax.random.key(k), tiny_cfg) for k in (1, 2))
    old["wte"], ref["wte"] = old["wte"] * 20, ref["wte"] * 20  # far from uniform policies
    new = jax.tree.map(lambda o, r: o + 0.3 * (r - o), old, ref)  # a policy an update moved
    state = train.init_rl_state(train.init_rl_params(old, None, rl), optax.sgd(0.0), rl)
    exp, _ = train.make_experience(state, ref, rollout, scores, tiny_cfg, rl, sample_cfg=scfg)
    loss, _ = train.policy._policy_loss(new, exp, None, beta, tiny_cfg, rl.resolved(), scfg, None)
    # TRL, written out.
    mask = np.asarray(rollout.response_mask)
    resp = np.asarray(rollout.response)

    def token_logprobs(params):
        lp = _np_log_softmax(_teacher_forced(params, rollout, tiny_cfg))
        return np.take_along_axis(lp, resp[..., None], -1)[..., 0]

    logp, old_lp, ref_lp = token_logprobs(new), token_logprobs(old), token_logprobs(ref)
    r = np.asarray(scores, np.float64).reshape(2, 4)
    adv = ((r - r.mean(1, keepdims=True)) / (r.std(1, ddof=1, keepdims=True) + 1e-4)).reshape(-1)[:, None]
    ratio = np.exp(logp - old_lp)
    k3 = np.exp(ref_lp - logp) - (ref_lp - logp) - 1.0
    per_token = -np.minimum(ratio * adv, np.clip(ratio, 0.8, 1.2) * adv) + beta * k3
    want = np.mean((per_token * mask).sum(1) / mask.sum(1))
    np.testing.assert_allclose(float(loss), want, rtol=5e-4)  # float32 logprobs of far-from-uniform logits
    assert abs(want) > 1e-2 and np.abs(ratio[mask] - 1).max() > 0.2  # clipping and KL both act
    token_mean = (per_token * mask).sum() / mask.sum()  # the aggregation GRPO does not use by default
    assert abs(token_mean - want) > 1e-2 * abs(want)
