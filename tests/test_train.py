"""Train steps: optimizer, every step factory on 1 device vs 8-device meshes, NaN handling, bad input."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from jaxrlhf import losses, models, parallel, train
from jaxrlhf.engine import loop
from jaxrlhf.models import ModelConfig
from jaxrlhf.rollout import SampleConfig, sampler

B, T = 8, 12


def _tokens(key, shape, vocab):
    return jax.random.randint(key, shape, 1, vocab)


def _lengths_mask(lengths, t):
    return np.arange(t)[None, :] < np.asarray(lengths)[:, None]


def lm_case(cfg, tx):
    tokens = _tokens(jax.random.key(1), (B, T), cfg.vocab_size)
    mask = _lengths_mask([12, 11, 9, 12, 5, 12, 7, 3], T)
    loss_mask = mask & (np.arange(T)[None] >= 2)  # SFT-like: first tokens are a prompt
    state = train.init_train_state(models.init_params(jax.random.key(0), cfg), tx)
    return (
        train.make_lm_step(cfg, tx),
        state,
        train.LMBatch(tokens, jnp.asarray(mask), jnp.asarray(loss_mask)),
    )


def _rank_batch(cfg, k):
    tokens = _tokens(jax.random.key(2), (B, k, T), cfg.vocab_size)
    lengths = np.random.default_rng(0).integers(3, T + 1, size=(B, k))
    mask = np.arange(T)[None, None] < lengths[..., None]
    rank_mask = np.ones((B, k), bool)
    rank_mask[1, -1] = False
    return train.RankBatch(tokens, jnp.asarray(mask), jnp.asarray(rank_mask))


def _scalar_model(key, cfg):
    """A scalar model with a random (not zero-initialised) head, so every leaf gets a real gradient."""
    params = models.init_scalar_model(key, cfg)
    kernel = 0.1 * jax.random.normal(jax.random.fold_in(key, 1), params["head"]["kernel"].shape)
    return {**params, "head": {**params["head"], "kernel": kernel}}


def rm_case(cfg, tx, k=2):
    state = train.init_train_state(_scalar_model(jax.random.key(0), cfg), tx)
    return train.make_rm_step(cfg, tx), state, _rank_batch(cfg, k)


def _pref_batch(cfg):
    tokens = _tokens(jax.random.key(3), (B, 2, T), cfg.vocab_size)
    lengths = np.random.default_rng(1).integers(5, T + 1, size=(B, 2))
    mask = np.arange(T)[None, None] < lengths[..., None]
    loss_mask = mask & (np.arange(T) >= 3)
    ref = -np.random.default_rng(2).uniform(5, 20, size=(B, 2)).astype(np.float32)
    rewards = np.random.default_rng(3).normal(size=(B, 2)).astype(np.float32)
    pair_mask = np.ones(B, bool)
    pair_mask[-1] = False
    return train.PrefBatch(tokens, jnp.asarray(mask), jnp.asarray(loss_mask), ref, rewards, pair_mask)


def dpo_case(cfg, tx):
    state = train.init_train_state(models.init_params(jax.random.key(0), cfg), tx)
    return train.make_dpo_step(cfg, tx, beta=0.1), state, _pref_batch(cfg)


def rebel_case(cfg, tx):
    state = train.init_train_state(models.init_params(jax.random.key(0), cfg), tx)
    return train.make_rebel_step(cfg, tx, eta=2.0), state, _pref_batch(cfg)


RL_SAMPLE = SampleConfig(max_new_tokens=6, eos_id=0, top_k=8)


def _rl_case(cfg, tx, algo):
    rlc = train.RLConfig(algo=algo, minibatches=2, epochs=2, kl_coef=0.05, kl_target=1.0)
    policy = models.init_params(jax.random.key(0), cfg)
    value = _scalar_model(jax.random.key(1), cfg)
    state = train.init_rl_state(train.init_rl_params(policy, value, rlc), tx, rlc)
    prompt = _tokens(jax.random.key(4), (B, 3), cfg.vocab_size)
    prompt_mask = jnp.asarray(_lengths_mask([3, 2, 1, 3, 3, 2, 1, 3], 3)[:, ::-1])
    rollout = sampler.sample(policy, prompt, prompt_mask, cfg, RL_SAMPLE, key=jax.random.key(5))
    scores = jnp.linspace(-1.0, 1.0, B)
    ref = models.init_params(jax.random.key(9), cfg)
    learn = train.make_learn(cfg, tx, rlc, sample_cfg=RL_SAMPLE)

    def step(state, batch, *, key):
        return learn(state, ref, batch[0], batch[1], key=key)

    return step, state, (rollout, scores)


CASES = {
    "lm": lm_case,
    "rm_pairwise": rm_case,
    "rm_kway": lambda cfg, tx: rm_case(cfg, tx, k=4),
    "dpo": dpo_case,
    "rebel": rebel_case,
    "pg": lambda cfg, tx: _rl_case(cfg, tx, "pg"),
    "ppo": lambda cfg, tx: _rl_case(cfg, tx, "ppo"),
}


def _run_on(mesh, step, state, batch, n=2):
    f = parallel.jit_step(step, mesh, state)
    state = parallel.put(state, mesh)
    batch = parallel.shard_batch(batch, mesh)
    losses_ = []
    for i in range(n):
        state, metrics = f(state, batch, jax.random.key(10 + i))
        losses_.append(float(metrics["loss"]))
        assert float(metrics["finite"]) == 1.0
    return jax.device_get(state), losses_


# One step of each kind on a data x fsdp mesh, both axes at once, and on pure data parallelism (the fsdp
# axis of size 1): K-way RM, preference and RL on the GPT (the pairwise RM, REBEL and PG steps are the same
# programs with K = 2, another loss, no value model; RL has the most batch-wide statistics: whitening, KL,
# minibatches), the LM and pairwise RM steps on a Llama-style config (RMSNorm, RoPE, SwiGLU, GQA 4 / 2,
# untied head, no biases). PPO on data x fsdp: the TL;DR test of a whole sharded PPO iteration.
MESH_CASES = [(name, (2, 4), "gpt") for name in ("rm_kway", "dpo")]
MESH_CASES += [(name, (8, 1), "gpt") for name in ("ppo",)]
MESH_CASES += [(name, shape, "llama") for name in ("lm", "rm_pairwise") for shape in ((8, 1), (2, 4))]
LLAMA_CFG = ModelConfig.preset(
    "tiny-llama", vocab_size=37, block_size=24, n_embd=16, intermediate_size=40, tie_embeddings=False
)


@pytest.mark.parametrize(
    "name, shape, family",
    MESH_CASES,
    ids=[f"{f}-{n}-{'data8' if s == (8, 1) else 'data2xfsdp4'}" for n, s, f in MESH_CASES],
)
def test_step_same_on_one_and_eight_devices(name, shape, family, tiny_cfg):
    base = tiny_cfg if family == "gpt" else LLAMA_CFG
    cfg = dataclasses.replace(base, embd_pdrop=0.1, resid_pdrop=0.1)  # dropout keys too
    # Adam's eps is raised from 1e-8: with it, a gradient that is 0 in exact arithmetic (e.g. a key bias)
    # but 1e-10 of reduction-order noise would be scaled up to a full-lr step on one mesh and not the other.
    opt = train.OptimConfig(lr=1e-2, warmup_steps=0, total_steps=4, weight_decay=0.1, eps=1e-4)
    tx = train.make_optimizer(opt)
    step, state, batch = CASES[name](cfg, tx)
    one, losses1 = _run_on(parallel.make_mesh(1, 1, devices=jax.devices()[:1]), step, state, batch)
    many, losses8 = _run_on(parallel.make_mesh(*shape), step, state, batch)
    np.testing.assert_allclose(losses8, losses1, rtol=1e-5, atol=1e-5)
    assert losses1[0] != losses1[1]  # the params moved
    for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(many.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    assert int(one.step) == int(many.step) >= 2


def test_fsdp_shards_params():
    mesh = parallel.make_mesh(2, 4)
    sh = parallel.leaf_sharding((128, 512), mesh)
    assert sh.spec == jax.sharding.PartitionSpec(None, "fsdp")
    assert parallel.leaf_sharding((3,), mesh).spec == jax.sharding.PartitionSpec()


def test_jit_step_keeps_activations_split_over_the_batch(tiny_cfg):
    # Traced on_mesh, every block's input and output is pinned to the ('data', 'fsdp') batch split; a plain
    # jit of the same step leaves XLA free to follow the FSDP-split weights instead (see constrain_batch).
    step, state, batch = lm_case(tiny_cfg, train.make_optimizer(train.OptimConfig(lr=1e-2)))
    mesh = parallel.make_mesh(2, 4)
    text = parallel.jit_step(step, mesh, state).lower(state, batch, jax.random.key(0)).as_text()
    assert text.count("sharding_constraint") >= 2 * tiny_cfg.n_layer and '[{"data", "fsdp"}' in text
    assert "sharding_constraint" not in jax.jit(step).lower(state, batch).as_text()
    x = jnp.ones((8, 3))
    assert parallel.constrain_batch(x) is x  # no mesh
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        odd = jnp.ones((6, 3))
        assert parallel.constrain_batch(odd) is odd  # 6 rows do not split over 8 devices
    inside = jax.shard_map(  # manual axes: as it is
        lambda x: parallel.constrain_batch(x) * 1.0, mesh=mesh, in_specs=P(parallel.BATCH_AXES),
        out_specs=P(parallel.BATCH_AXES), check_vma=False,
    )
    np.testing.assert_array_equal(jax.jit(inside)(x), x)


def _adam_state(opt_state) -> optax.ScaleByAdamState:
    is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)  # noqa: E731
    (adam,) = [s for s in jax.tree.leaves(opt_state, is_leaf=is_adam) if is_adam(s)]
    return adam


def test_mu_dtype_bfloat16_stores_the_first_moment_in_bf16_and_still_trains(tiny_cfg):
    opt = dict(lr=3e-3, warmup_steps=0, weight_decay=0.0)
    runs = {}
    for mu_dtype in (None, "bfloat16"):
        step, state, batch = lm_case(
            tiny_cfg, train.make_optimizer(train.OptimConfig(**opt, mu_dtype=mu_dtype))
        )
        adam = _adam_state(state.opt_state)
        mu, nu, params = jax.tree.leaves(adam.mu), jax.tree.leaves(adam.nu), jax.tree.leaves(state.params)
        assert [x.shape for x in mu] == [x.shape for x in nu] == [x.shape for x in params]
        assert {x.dtype for x in nu} == {jnp.dtype(jnp.float32)}
        assert {x.dtype for x in mu} == {jnp.dtype(mu_dtype or jnp.float32)}
        jitted, history = jax.jit(step), []
        for _ in range(6):
            state, metrics = jitted(state, batch)
            history.append((state.params, float(metrics["loss"])))
        runs[mu_dtype] = history
        assert {x.dtype for x in jax.tree.leaves(_adam_state(state.opt_state).mu)} == {
            jnp.dtype(mu_dtype or jnp.float32)
        }
    (first32, _), (first16, _) = runs[None][0], runs["bfloat16"][0]
    # Update 1 is computed from the float32 moment before it is stored: identical. Later ones read the
    # rounded moment: the bf16 state acts, and training goes on as with float32.
    for a, b in zip(jax.tree.leaves(first32), jax.tree.leaves(first16), strict=True):
        np.testing.assert_array_equal(a, b)
    last32, last16 = runs[None][-1][0], runs["bfloat16"][-1][0]
    pairs = zip(jax.tree.leaves(last32), jax.tree.leaves(last16), strict=True)
    assert any(not np.array_equal(a, b) for a, b in pairs)
    losses = [loss for _, loss in runs["bfloat16"]]
    assert losses[-1] < losses[0] - 0.05
    assert losses[-1] == pytest.approx(runs[None][-1][1], abs=1e-2)


def test_mu_dtype_is_validated_and_is_a_flag(capsys):
    with pytest.raises(
        ValueError, match=r"^mu_dtype='float16'; use none \(the params' dtype\) or one of float32"
    ):
        train.OptimConfig(mu_dtype="float16")
    # Every stage's optim is a flag: --<stage>.optim.mu_dtype.
    from experiments.ultrafeedback.stages import RECIPE
    from jaxrlhf.engine import flags

    def parse(*argv):
        r = RECIPE
        cfg, _ = flags.parse(r.defaults, ["--model", "tiny-llama", *argv], check=r.check, inactive=r.inactive,
                             renamed=r.renamed, adjust=r.adjust)  # fmt: skip
        return cfg.rebel.optim.mu_dtype

    assert parse("--rebel.optim.mu_dtype", "bfloat16") == "bfloat16"
    assert parse("--rebel.optim.mu_dtype", "none") is None and parse() is None
    with pytest.raises(SystemExit) as exit_info:
        parse("--rebel.optim.mu_dtype", "float16")
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1
    assert "--rebel.optim.mu_dtype 'float16'; use none" in err


def test_weight_decay_only_on_matrices(tiny_cfg):
    params = models.init_params(jax.random.key(0), tiny_cfg)
    mask = train.state.decay_mask(params)
    assert mask["blocks"]["attn"]["c_attn"]["kernel"] is True
    assert mask["blocks"]["attn"]["c_attn"]["bias"] is False
    assert mask["blocks"]["ln_1"]["scale"] is False and mask["wte"] is False and mask["wpe"] is False
    # With zero gradients only decayed leaves move.
    tx = train.make_optimizer(train.OptimConfig(lr=0.1, weight_decay=0.5, grad_clip=0.0))
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_allclose(new["wte"], params["wte"])
    k = params["blocks"]["mlp"]["c_fc"]["kernel"]
    np.testing.assert_allclose(new["blocks"]["mlp"]["c_fc"]["kernel"], k * (1 - 0.1 * 0.5), rtol=1e-6)


def test_schedule_warmup_then_cosine():
    cfg = train.OptimConfig(lr=1.0, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    sched = train.state.learning_rate_schedule(cfg)
    assert float(sched(0)) == 0.0
    assert float(sched(5)) == pytest.approx(0.5)
    assert float(sched(10)) == pytest.approx(1.0)
    assert float(sched(60)) == pytest.approx(0.1 + 0.9 * 0.5, rel=1e-5)
    assert float(sched(110)) == pytest.approx(0.1, rel=1e-5)
    lin = train.state.learning_rate_schedule(dataclasses.replace(cfg, schedule="linear"))
    assert float(lin(60)) == pytest.approx(0.55, rel=1e-5)


def test_lm_step_matches_reference_loss(tiny_cfg):
    tx = optax.sgd(0.0)
    step, state, batch = lm_case(tiny_cfg, tx)
    _, metrics = jax.jit(step)(state, batch)
    logits = np.asarray(models.logits_fn(state.params, batch.tokens, batch.mask, tiny_cfg), np.float64)
    tokens, m = np.asarray(batch.tokens), np.asarray(batch.loss_mask)
    total, count = 0.0, 0
    for b in range(B):
        for t in range(1, T):
            if m[b, t]:
                row = logits[b, t - 1]
                total += -(row[tokens[b, t]] - np.log(np.sum(np.exp(row - row.max()))) - row.max())
                count += 1
    assert float(metrics["loss"]) == pytest.approx(total / count, rel=1e-5)


def test_nan_loss_is_not_trained_on(tiny_cfg):
    tx = train.make_optimizer(train.OptimConfig(lr=1e-2))
    step, state, batch = rebel_case(tiny_cfg, tx)
    bad = batch._replace(rewards=jnp.asarray(batch.rewards).at[0, 0].set(np.nan))
    new, metrics = jax.jit(step)(state, bad)
    assert float(metrics["finite"]) == 0.0 and int(new.step) == 0
    for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(state.params), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(loop.NonFiniteError, match="non-finite"):
        loop.check_finite({k: float(v) for k, v in jax.device_get(metrics).items()}, "rebel", 0)


def test_nan_reward_is_not_trained_on(tiny_cfg):
    tx = train.make_optimizer(train.OptimConfig(lr=1e-2))
    step, state, (rollout, scores) = _rl_case(tiny_cfg, tx, "ppo")
    new, metrics = jax.jit(step)(state, (rollout, scores.at[3].set(jnp.inf)), key=jax.random.key(0))
    assert float(metrics["finite"]) == 0.0
    for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(state.params), strict=True):
        np.testing.assert_array_equal(a, b)


def test_batch_not_dividing_mesh_is_a_clear_error(tiny_cfg):
    mesh = parallel.make_mesh(8, 1)
    with pytest.raises(ValueError, match="not divisible by the 8 devices"):
        parallel.shard_batch(train.LMBatch(*(np.zeros((6, 4), np.int32),) * 3), mesh)
    with pytest.raises(ValueError, match="needs 6 devices"):
        parallel.make_mesh(3, 2)


def test_ppo_minibatches_must_divide_batch(tiny_cfg):
    tx = optax.sgd(1e-3)
    rlc = train.RLConfig(minibatches=3)
    policy = models.init_params(jax.random.key(0), tiny_cfg)
    state = train.init_rl_state(
        train.init_rl_params(policy, _scalar_model(jax.random.key(1), tiny_cfg), rlc), tx, rlc
    )
    b, p, r = 8, 2, 3  # refused from the shapes, before any work on the rollout
    rollout = sampler.Rollout(
        prompt=jnp.ones((b, p), jnp.int32), prompt_mask=jnp.ones((b, p), bool),
        response=jnp.ones((b, r), jnp.int32), response_mask=jnp.ones((b, r), bool),
        logprobs=jnp.zeros((b, r)), finished=jnp.ones((b,), bool),
    )  # fmt: skip
    with pytest.raises(ValueError, match="not divisible by minibatches=3"):
        train.make_learn(tiny_cfg, tx, rlc, sample_cfg=RL_SAMPLE)(
            state, policy, rollout, jnp.zeros(b), key=jax.random.key(0)
        )


def test_rl_experience_matches_losses(tiny_cfg):
    """Experience = shaped rewards + GAE + whitening computed from the teacher-forced forward."""
    tx = optax.sgd(0.0)
    step, state, (rollout, scores) = _rl_case(tiny_cfg, tx, "ppo")
    rlc = train.RLConfig(kl_coef=0.05)
    ref = models.init_params(jax.random.key(9), tiny_cfg)
    exp, metrics = train.make_experience(state, ref, rollout, scores, tiny_cfg, rlc, sample_cfg=RL_SAMPLE)
    r = rollout.response.shape[1]
    lp = models.logits_fn(state.params["policy"], rollout.tokens, rollout.mask, tiny_cfg)
    lp = jax.nn.log_softmax(lp[:, -r - 1 : -1], -1)
    old = jnp.take_along_axis(lp, rollout.response[..., None], -1)[..., 0]
    m = rollout.response_mask
    np.testing.assert_allclose(np.where(m, exp.old_logprobs, 0), np.where(m, old, 0), atol=1e-5)
    # The sampler's own logprobs (KV-cache path) agree with the training forward.
    np.testing.assert_allclose(np.where(m, rollout.logprobs, 0), np.where(m, old, 0), atol=1e-4)
    rewards, kl = losses.shaped_rewards(scores, exp.old_logprobs, exp.ref_logprobs, m, 0.05)
    adv, ret = losses.compute_gae(rewards, exp.old_values, m, 1.0, 0.95)
    np.testing.assert_allclose(exp.returns, ret, atol=1e-5)

    np.testing.assert_allclose(exp.advantages, jnp.where(m, losses.whiten_advantages(adv, m), 0), atol=1e-5)
    assert float(metrics["reward"]) == pytest.approx(float(jnp.mean(scores)))
    mm = np.asarray(m)
    ret, val = np.asarray(exp.returns)[mm], np.asarray(exp.old_values)[mm]
    ev = 1 - np.var(ret - val) / np.var(ret)  # sklearn's explained_variance_score
    assert float(metrics["explained_variance"]) == pytest.approx(ev, abs=1e-4)


def test_per_model_optimizer_keeps_the_policy_independent_of_the_value():
    """The policy's trajectory must not depend on the value model's gradients (one global-norm clip over
    both would couple them: the value loss's large gradients would rescale the policy's steps)."""
    optim = train.OptimConfig(lr=1e-2, weight_decay=0.0, grad_clip=1.0)
    params = {"policy": {"kernel": jnp.ones((3, 2))}, "value": {"kernel": jnp.zeros((3, 2))}}
    policy_grads = [jnp.full((3, 2), g) for g in (0.3, -0.2, 0.25)]

    def run(tx, value_scale):
        p, opt_state = params, tx.init(params)
        for i, g in enumerate(policy_grads):
            grads = {"policy": {"kernel": g}, "value": {"kernel": jnp.full((3, 2), value_scale * (i + 1))}}
            updates, opt_state = tx.update(grads, opt_state, p)
            p = optax.apply_updates(p, updates)
        return np.asarray(p["policy"]["kernel"])

    split = train.make_per_model_optimizer({"policy": optim, "value": optim})
    np.testing.assert_array_equal(run(split, 0.0), run(split, 1e3))
    joint = train.make_optimizer(optim)
    assert not np.allclose(run(joint, 0.0), run(joint, 1e3))  # what the split optimizer prevents
    with pytest.raises(ValueError, match="no optimizer for params"):
        train.make_per_model_optimizer({"policy": optim}).init(params)


def test_muon_orthogonalises_each_layers_matrix_and_leaves_the_rest_to_adam(tiny_cfg):
    """Independent properties of Muon's first update: on every kernel (one matrix per stacked layer) the
    update's singular values are nearly equal, where the gradient's spread widely; layers do not mix;
    the non-matrix leaves move by Adam's first step, about lr against the gradient's sign."""
    lr, muon_lr = 1e-3, 0.02
    cfg = train.OptimConfig(optimizer="muon", lr=lr, muon_lr=muon_lr, weight_decay=0.0, grad_clip=0.0)
    tx = train.make_optimizer(cfg)
    params = models.init_params(jax.random.key(0), tiny_cfg)
    keys = iter(jax.random.split(jax.random.key(1), 64))
    grads = jax.tree.map(
        lambda x: jax.random.normal(next(keys), x.shape) * jnp.geomspace(0.01, 10.0, x.shape[-1]), params
    )
    updates, _ = tx.update(grads, tx.init(params), params)
    kernel = params["blocks"]["mlp"]["c_fc"]["kernel"]
    assert kernel.ndim == 3  # [layer, in, out]
    for layer in range(kernel.shape[0]):
        g = np.asarray(grads["blocks"]["mlp"]["c_fc"]["kernel"][layer])
        u = np.asarray(updates["blocks"]["mlp"]["c_fc"]["kernel"][layer])
        sg, su = np.linalg.svd(g, compute_uv=False), np.linalg.svd(u, compute_uv=False)
        assert sg.max() / sg.min() > 10 and su.max() / su.min() < 1.8, (sg, su)  # NS: ~[0.7, 1.1]
        assert np.sum(u * g) < 0  # a descent direction
    # Layer 1's gradient alone changed: layer 0's update is the same.
    grads2 = jax.tree.map(lambda x: x, grads)
    grads2["blocks"]["mlp"]["c_fc"]["kernel"] = grads["blocks"]["mlp"]["c_fc"]["kernel"].at[1].mul(-3.0)
    updates2, _ = tx.update(grads2, tx.init(params), params)
    u1, u2 = (u["blocks"]["mlp"]["c_fc"]["kernel"] for u in (updates, updates2))
    np.testing.assert_allclose(u1[0], u2[0], rtol=1e-5, atol=1e-8)
    assert not np.allclose(u1[1], u2[1])
    # Embeddings, biases, layer norms: Adam's first step (Nesterov's, as optax.contrib.muon has it) is
    # a sign step: one size for every element, lr to 2 lr, against the gradient.
    for name in ("wte",):
        g, u = np.asarray(grads[name]), np.asarray(updates[name])
        assert np.all(np.sign(u) == -np.sign(g)) and np.allclose(np.abs(u), np.abs(u).max(), rtol=0.02)
        assert lr <= np.abs(u).max() <= 2 * lr
    b, gb = (
        np.asarray(updates["blocks"]["mlp"]["c_fc"]["bias"]),
        np.asarray(grads["blocks"]["mlp"]["c_fc"]["bias"]),
    )
    assert np.all(np.sign(b) == -np.sign(gb)) and np.allclose(np.abs(b), np.abs(u).max(), rtol=0.02)
    # And it trains.
    step, state, batch = lm_case(tiny_cfg, tx)
    jitted, losses_ = jax.jit(step), []
    for _ in range(6):
        state, metrics = jitted(state, batch)
        losses_.append(float(metrics["loss"]))
    assert losses_[-1] < losses_[0] - 0.05, losses_


def test_muon_flags_are_validated():
    with pytest.raises(ValueError, match=r"^optimizer='sgd'; use 'adamw' or 'muon'$"):
        train.OptimConfig(optimizer="sgd")
    with pytest.raises(ValueError, match=r"^muon_lr=0.01; it does nothing with optimizer 'adamw'"):
        train.OptimConfig(muon_lr=0.01)
