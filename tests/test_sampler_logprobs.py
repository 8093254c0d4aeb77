"""Issue #31: the old logprobs of an on-policy update are the sampler's own where sampler and learner
compute the same function (`RLConfig.reuse_sampler_logprobs`, `train.experience.sampler_logprobs_reusable`):
the update equals the one with the forward it skips, and every case where the two can differ (bfloat16
compute, a top-k / top-p filter, an entropy mask or mismatch weights that need the learner's logits, the
option off) computes them again."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxrlhf import models, train
from jaxrlhf.rollout import SampleConfig, sample
from jaxrlhf.train.experience import sampler_logprobs_reusable


def _sampled(cfg, scfg, n=16, seed=0):
    """A policy and a rollout it sampled itself (8 prompts x 2 answers, prompts of 3 tokens)."""
    policy = models.init_params(jax.random.key(seed), cfg)
    policy["wte"] = policy["wte"] * 8  # far from uniform: logprobs of very different sizes
    prompt = jnp.repeat(jax.random.randint(jax.random.key(seed + 1), (n // 2, 3), 1, cfg.vocab_size), 2, 0)
    rollout = sample(policy, prompt, jnp.ones_like(prompt, bool), cfg, scfg, key=jax.random.key(seed + 2))
    return policy, rollout


@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_reused_logprobs_give_the_recomputed_update(tiny_cfg, algo):
    """Ratios at 1 and, after one AdamW update (2 epochs x 2 minibatches) at lr 1e-6, the same params to 1%
    of the step (the sampler's KV-cache decode and the learner's full forward differ by ~1e-7); the same
    experience."""
    scfg = SampleConfig(max_new_tokens=5, temperature=0.8, eos_id=0)
    policy, rollout = _sampled(tiny_cfg, scfg)
    scores = jax.random.normal(jax.random.key(7), (16,))
    ref = jax.tree.map(lambda x: x * 0.9, policy)
    group = {"group_size": 2} if algo != "ppo" else {}
    value = None
    if algo == "ppo":
        value = {"gpt": policy, "head": models.init_scalar_head(jax.random.key(3), tiny_cfg)}
    tx = optax.adamw(1e-6)
    out = {}
    for reuse in (True, False):
        rl = train.RLConfig(algo=algo, reuse_sampler_logprobs=reuse, epochs=2, minibatches=2, **group)
        state = train.init_rl_state(train.init_rl_params(policy, value, rl), tx, rl)
        learn = jax.jit(train.make_learn(tiny_cfg, tx, rl, sample_cfg=scfg))
        experience = jax.jit(lambda st, ro, sc, rl=rl: train.make_experience(
            st, ref, ro, sc, tiny_cfg, rl, sample_cfg=scfg)[0])  # fmt: skip
        out[reuse] = (*learn(state, ref, rollout, scores, key=jax.random.key(0)),
                      experience(state, rollout, scores))  # fmt: skip
    assert float(out[True][1]["old_logprobs_reused"]) == 1.0
    assert float(out[False][1]["old_logprobs_reused"]) == 0.0
    for reuse in (True, False):
        metrics = out[reuse][1]
        assert abs(float(metrics["ratio_mean"]) - 1.0) < 1e-4 and float(metrics["clipfrac"]) == 0.0
    a, b = out[True][2], out[False][2]
    real = np.asarray(rollout.response_mask)  # after a row's end neither is read
    np.testing.assert_allclose(np.asarray(a.old_logprobs)[real], np.asarray(b.old_logprobs)[real], atol=1e-5)
    np.testing.assert_allclose(a.advantages, b.advantages, atol=1e-4)
    moved = jax.tree.map(lambda n, o: np.abs(np.asarray(n) - np.asarray(o)).max(),
                         out[False][0].params["policy"], policy)  # fmt: skip
    assert max(jax.tree.leaves(moved)) > 5e-7  # the update moved the params (AdamW: ~lr per coordinate)
    diff = jax.tree.map(lambda x, y: np.abs(np.asarray(x) - np.asarray(y)).max(),
                        out[True][0].params, out[False][0].params)  # fmt: skip
    assert max(jax.tree.leaves(diff)) < 1e-8


def test_every_case_that_can_differ_recomputes(tiny_cfg):
    scfg = SampleConfig(max_new_tokens=5, temperature=1.0, eos_id=0)
    rl = train.RLConfig(algo="grpo", group_size=2)
    bf16 = dataclasses.replace(tiny_cfg, compute_dtype="bfloat16")
    assert sampler_logprobs_reusable(tiny_cfg, rl, scfg)
    assert not sampler_logprobs_reusable(bf16, rl, scfg)  # KV-cache decode and full forward differ in bf16
    assert not sampler_logprobs_reusable(tiny_cfg, rl, dataclasses.replace(scfg, top_k=5))
    assert not sampler_logprobs_reusable(tiny_cfg, rl, dataclasses.replace(scfg, top_p=0.9))
    for change in ({"entropy_top_fraction": 0.5}, {"mismatch": "token_truncate"},
                   {"reuse_sampler_logprobs": False}):  # fmt: skip
        assert not sampler_logprobs_reusable(tiny_cfg, dataclasses.replace(rl, **change), scfg)

    # Through make_learn, with the rollout's logprobs deliberately 1 nat too low: a bf16 and a filtered
    # sampler recompute (ratios at 1: the learner against itself), the reused path reads them (ratio e).
    for cfg, s, reused in ((bf16, scfg, 0.0), (tiny_cfg, dataclasses.replace(scfg, top_k=5), 0.0),
                           (tiny_cfg, scfg, 1.0)):  # fmt: skip
        policy, rollout = _sampled(cfg, s)
        wrong = rollout.replace(logprobs=rollout.logprobs - 1.0)
        state = train.init_rl_state(train.init_rl_params(policy, None, rl), optax.sgd(0.0), rl)
        learn = jax.jit(train.make_learn(cfg, optax.sgd(0.0), rl, sample_cfg=s))
        _, metrics = learn(state, policy, wrong, jnp.arange(16.0), key=jax.random.key(0))
        assert float(metrics["old_logprobs_reused"]) == reused
        if reused:
            assert float(metrics["ratio_max"]) == pytest.approx(np.e, rel=1e-4)
        else:
            assert abs(float(metrics["ratio_mean"]) - 1.0) < 2e-2  # bf16: its own rounding
