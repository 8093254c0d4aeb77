"""jaxrlhf.preference: n answers per prompt -> pairs -> PrefBatch -> DPO / REBEL steps."""

import _helpers  # noqa: E402  (tests/)
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxrlhf import models, train
from jaxrlhf.models import ModelConfig
from jaxrlhf.rollout import SampleConfig, sampler, scoring
from jaxrlhf.rollout import pairs as pairs_lib

TOL = dict(rtol=1e-5, atol=1e-5)
N_ANSWERS = 4
SAMPLE_CFG = SampleConfig(max_new_tokens=10, temperature=1.0, eos_id=3, pad_id=0)


random_params = _helpers.random_params


def left_padded_prompts(cfg, batch, length=6, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, length + 1, batch)
    mask = np.arange(length) >= (length - lengths)[:, None]  # [B, P] left-padded
    prompt = np.where(mask, rng.integers(4, cfg.vocab_size, (batch, length)), 0).astype(np.int32)
    return prompt, mask


def content_rewards(rollout, vocab_size):
    """A fixed score per token summed over the answer: identical answers get identical rewards."""
    weights = np.random.default_rng(123).standard_normal(vocab_size).astype(np.float32)
    response, mask = np.asarray(rollout.response), np.asarray(rollout.response_mask)
    return np.where(mask, weights[response], 0.0).sum(-1).astype(np.float32)


def loop_answer_logprobs(params, tokens, mask, loss_mask, cfg):
    """NumPy reference of sum_t log pi(token_t | tokens_<t) over loss_mask, one row at a time.

    Each row's real tokens are moved to the front of an all-real row (no padding masks at all; causal
    attention makes whatever follows them irrelevant), then log-softmax and the sum run in float64 loops.
    """
    tokens, mask, loss_mask = (np.asarray(x) for x in (tokens, mask, loss_mask))
    packed = np.zeros_like(tokens)
    for row in range(len(tokens)):
        packed[row, : mask[row].sum()] = tokens[row][mask[row]]
    logits_fn = jax.jit(models.logits_fn, static_argnums=3)
    logits = np.asarray(logits_fn(params, packed, np.ones(packed.shape, bool), cfg), np.float64)
    out = np.zeros(len(tokens))
    for row in range(len(tokens)):
        real, scored = tokens[row][mask[row]], loss_mask[row][mask[row]]
        for t in range(1, len(real)):
            if scored[t]:
                z = logits[row, t - 1]
                out[row] += z[real[t]] - (z.max() + np.log(np.sum(np.exp(z - z.max()))))
    return out


def pair_loop_logprobs(params, batch, cfg):
    """[K, 2] loop-reference logprobs of the K real pairs of a PrefBatch."""
    real = np.asarray(batch.pair_mask)
    flat = [np.asarray(x)[real].reshape(-1, x.shape[-1]) for x in (batch.tokens, batch.mask, batch.loss_mask)]
    return loop_answer_logprobs(params, *flat, cfg).reshape(-1, 2)


@pytest.fixture(scope="module")
def pipeline(tiny_cfg):
    params = random_params(tiny_cfg, 1)
    prompt, prompt_mask = left_padded_prompts(tiny_cfg, 4)
    rollout = pairs_lib.generate_answers(
        params, prompt, prompt_mask, tiny_cfg, SAMPLE_CFG, N_ANSWERS, key=jax.random.key(0)
    )
    rewards = content_rewards(rollout, tiny_cfg.vocab_size)
    selection = pairs_lib.select_pairs(rollout.response, rollout.response_mask, rewards, N_ANSWERS)
    ref_logprobs = pairs_lib.rollout_logprobs(params, rollout, tiny_cfg)
    return dict(
        params=params,
        prompt=prompt,
        prompt_mask=prompt_mask,
        rollout=rollout,
        rewards=rewards,
        selection=selection,
        ref_logprobs=ref_logprobs,
    )


# ------------------------------------------------------------------------------------------ sampling


def test_generate_answers_repeats_each_prompt_n_times(pipeline, tiny_cfg):
    rollout, prompt, prompt_mask = pipeline["rollout"], pipeline["prompt"], pipeline["prompt_mask"]
    assert rollout.response.shape == (4 * N_ANSWERS, SAMPLE_CFG.max_new_tokens)
    for i in range(4):
        for j in range(N_ANSWERS):
            np.testing.assert_array_equal(rollout.prompt[i * N_ANSWERS + j], prompt[i])
            np.testing.assert_array_equal(rollout.prompt_mask[i * N_ANSWERS + j], prompt_mask[i])
        block = {tuple(np.asarray(rollout.response[i * N_ANSWERS + j])) for j in range(N_ANSWERS)}
        assert len(block) > 1  # rows draw independent noise from the one key
    direct = sampler.sample(
        pipeline["params"],
        np.repeat(prompt, N_ANSWERS, axis=0),
        np.repeat(prompt_mask, N_ANSWERS, axis=0),
        tiny_cfg,
        SAMPLE_CFG,
        key=jax.random.key(0),
    )
    np.testing.assert_array_equal(rollout.response, direct.response)
    with pytest.raises(ValueError, match="at least one answer"):
        pairs_lib.generate_answers(
            pipeline["params"], prompt, prompt_mask, tiny_cfg, SAMPLE_CFG, 0, key=jax.random.key(0)
        )


# ------------------------------------------------------------------------------------------ pairing


def _answers(rows, length=4):
    """Right-padded [N, length] ids and mask from token lists; padding slots hold 9 (never real)."""
    ids = np.full((len(rows), length), 9, np.int32)
    mask = np.zeros((len(rows), length), bool)
    for r, row in enumerate(rows):
        ids[r, : len(row)] = row
        mask[r, : len(row)] = True
    return ids, mask


def test_select_pairs_hand_made():
    rows = [
        # prompt 0: row 2 repeats row 0 (dropped although its reward is higher); row 3 is too long
        [1, 2], [3], [1, 2], [4, 5, 6, 7],
        # prompt 1: tied best (rows 5, 6) and tied worst (rows 4, 7): the lowest row wins each
        [1], [2], [3], [4],
        # prompt 2: four copies of one answer
        [5, 5], [5, 5], [5, 5], [5, 5],
        # prompt 3: one too long, three empty (too short)
        [1, 1, 1, 1], [], [], [],
        # prompt 4: distinct answers, all rewards equal
        [1], [2], [3], [1, 2],
        # prompt 5: rows 20 and 21 differ only in a masked-out slot: duplicates
        [1, 2], [1, 2], [2, 1], [1, 2, 3],
    ]  # fmt: skip
    ids, mask = _answers(rows)
    ids[21, 3] = 7  # padding content must not matter
    rewards = np.asarray(
        [0.5, -1.0, 0.9, 2.0]
        + [0.3, 0.7, 0.7, 0.3]
        + [1.0, 2.0, 3.0, 4.0]
        + [1.0, 2.0, 3.0, 4.0]
        + [0.1, 0.1, 0.1, 0.1]
        + [0.0, 5.0, 1.0, -2.0],
        np.float32,
    )
    sel = pairs_lib.select_pairs(ids, mask, rewards, 4, max_answer_tokens=3)
    np.testing.assert_array_equal(sel.prompt_index, [0, 1, 5])
    np.testing.assert_array_equal(sel.chosen_index, [0, 5, 22])
    np.testing.assert_array_equal(sel.rejected_index, [1, 4, 23])
    np.testing.assert_array_equal(sel.chosen_reward, np.float32([0.5, 0.7, 1.0]))
    np.testing.assert_array_equal(sel.rejected_reward, np.float32([-1.0, 0.3, -2.0]))
    assert sel.num_pairs == 3 and sel.num_prompts == 6
    assert (sel.num_too_long, sel.num_too_short, sel.num_duplicate) == (2, 3, 5)
    assert (sel.num_too_few, sel.num_tied) == (2, 1)
    metrics = sel.metrics()
    assert metrics["pairs"] == 3.0 and metrics["pair_fraction"] == 0.5
    assert metrics["dropped_duplicate"] == 5.0 and metrics["skipped_tied"] == 1.0
    np.testing.assert_allclose(metrics["reward_margin"], np.mean([1.5, 0.4, 3.0]), **TOL)

    # No budget, a minimum of 2 tokens: row 3 of prompt 0 now counts, single tokens do not.
    sel = pairs_lib.select_pairs(ids, mask, rewards, 4, min_answer_tokens=2)
    np.testing.assert_array_equal(sel.prompt_index, [0, 5])
    np.testing.assert_array_equal(sel.chosen_index, [3, 22])
    np.testing.assert_array_equal(sel.rejected_index, [0, 23])
    assert (sel.num_too_long, sel.num_too_short, sel.num_duplicate) == (0, 11, 5)
    assert (sel.num_too_few, sel.num_tied) == (4, 0)


def test_select_pairs_with_no_pairs_gives_empty_arrays():
    ids, mask = _answers([[1], [1], [2], [2]])
    sel = pairs_lib.select_pairs(ids, mask, np.zeros(4, np.float32), 2)
    assert sel.num_pairs == 0 and sel.num_too_few == 2 and sel.num_duplicate == 2
    assert sel.chosen_index.shape == (0,) and sel.chosen_reward.dtype == np.float32
    assert sel.metrics()["reward_margin"] == 0.0


def test_select_pairs_rejects_bad_input():
    ids, mask = _answers([[1], [2], [3], [4]])
    rewards = np.zeros(4, np.float32)
    with pytest.raises(ValueError, match="at least 2 answers"):
        pairs_lib.select_pairs(ids, mask, rewards, 1)
    with pytest.raises(ValueError, match="not a multiple of n=3"):
        pairs_lib.select_pairs(ids, mask, rewards, 3)
    with pytest.raises(ValueError, match="one per answer"):
        pairs_lib.select_pairs(ids, mask, rewards[:3], 2)
    with pytest.raises(ValueError, match=r"not finite at rows \[2\]"):
        pairs_lib.select_pairs(ids, mask, np.float32([0, 1, np.nan, 2]), 2)
    with pytest.raises(ValueError, match="same"):
        pairs_lib.select_pairs(ids, mask[:, :2], rewards, 2)
    with pytest.raises(ValueError, match="max_answer_tokens=1 < min_answer_tokens=2"):
        pairs_lib.select_pairs(ids, mask, rewards, 2, max_answer_tokens=1, min_answer_tokens=2)


# ------------------------------------------------------------------------------------------ logprobs


def test_rollout_logprobs_match_loop_reference(pipeline, tiny_cfg):
    rollout = pipeline["rollout"]
    loss_mask = pairs_lib.answer_loss_mask(rollout)
    np.testing.assert_array_equal(loss_mask[:, : rollout.prompt.shape[1]], False)
    np.testing.assert_array_equal(loss_mask[:, rollout.prompt.shape[1] :], rollout.response_mask)
    expected = loop_answer_logprobs(pipeline["params"], rollout.tokens, rollout.mask, loss_mask, tiny_cfg)
    np.testing.assert_allclose(pipeline["ref_logprobs"], expected, **TOL)
    np.testing.assert_allclose(pairs_lib.sampler_logprobs(rollout), expected, **TOL)
    lengths = np.asarray(rollout.response_length)
    assert lengths.min() < lengths.max()  # some rows stopped at EOS, so the masks have real holes


# ------------------------------------------------------------------------------------------ batches


def test_build_pref_batch_shapes_masks_and_padding(pipeline):
    rollout, sel, ref = pipeline["rollout"], pipeline["selection"], pipeline["ref_logprobs"]
    m = sel.num_pairs
    assert 2 <= m <= 4
    batch = pairs_lib.build_pref_batch(rollout, sel, ref, num_pairs=6)
    T = rollout.tokens.shape[1]
    assert batch.tokens.shape == batch.mask.shape == batch.loss_mask.shape == (6, 2, T)
    assert batch.ref_logprobs.shape == batch.rewards.shape == (6, 2)
    assert batch.tokens.dtype == np.int32 and batch.mask.dtype == bool and batch.loss_mask.dtype == bool
    np.testing.assert_array_equal(batch.pair_mask, [True] * m + [False] * (6 - m))
    loss_mask = np.asarray(pairs_lib.answer_loss_mask(rollout))
    for k in range(m):
        for side, row in enumerate((sel.chosen_index[k], sel.rejected_index[k])):
            assert row // N_ANSWERS == sel.prompt_index[k]
            np.testing.assert_array_equal(batch.tokens[k, side], rollout.tokens[row])
            np.testing.assert_array_equal(batch.mask[k, side], rollout.mask[row])
            np.testing.assert_array_equal(batch.loss_mask[k, side], loss_mask[row])
            assert batch.ref_logprobs[k, side] == np.float32(ref[row])
            assert batch.rewards[k, side] == pipeline["rewards"][row]
        assert batch.rewards[k, 0] > batch.rewards[k, 1]
    assert not np.any(batch.loss_mask & ~batch.mask)
    for x in batch[:5]:
        assert not np.any(x[m:])  # padding pairs are all zero / False
    default = pairs_lib.build_pref_batch(rollout, sel, ref)
    assert default.tokens.shape[0] == 4  # one slot per prompt


def test_build_pref_batch_rejects_bad_input(pipeline):
    rollout, sel, ref = pipeline["rollout"], pipeline["selection"], pipeline["ref_logprobs"]
    with pytest.raises(ValueError, match="raise num_pairs"):
        pairs_lib.build_pref_batch(rollout, sel, ref, num_pairs=sel.num_pairs - 1)
    with pytest.raises(ValueError, match="one per answer"):
        pairs_lib.build_pref_batch(rollout, sel, ref[:-1])
    bad = np.asarray(ref).copy()
    bad[sel.chosen_index[0]] = np.nan
    with pytest.raises(ValueError, match="not finite"):
        pairs_lib.build_pref_batch(rollout, sel, bad)


# ------------------------------------------------------------------------------------------ steps


def test_dpo_step_on_pipeline_batch_matches_numpy(pipeline, tiny_cfg):
    beta = 0.5
    ref_params = random_params(tiny_cfg, 2)
    ref = pairs_lib.rollout_logprobs(ref_params, pipeline["rollout"], tiny_cfg)
    batch = pairs_lib.build_pref_batch(pipeline["rollout"], pipeline["selection"], ref, num_pairs=6)
    policy = pair_loop_logprobs(pipeline["params"], batch, tiny_cfg)  # [K, 2]
    reference = pair_loop_logprobs(ref_params, batch, tiny_cfg)
    np.testing.assert_allclose(batch.ref_logprobs[batch.pair_mask], reference, **TOL)
    h = (policy[:, 0] - reference[:, 0]) - (policy[:, 1] - reference[:, 1])
    expected = np.mean(np.logaddexp(0.0, -beta * h))  # -log sigmoid(beta h)

    tx = optax.sgd(0.1)
    state = train.init_train_state(pipeline["params"], tx)
    new_state, metrics = jax.jit(train.make_dpo_step(tiny_cfg, tx, beta=beta))(state, batch)
    np.testing.assert_allclose(float(metrics["loss"]), expected, **TOL)
    assert float(metrics["finite"]) == 1.0 and int(new_state.step) == 1
    assert not np.allclose(new_state.params["wte"], state.params["wte"])


@pytest.mark.parametrize("average", [False, True])
def test_ipo_step_summed_and_per_token_averaged_match_numpy(pipeline, tiny_cfg, average):
    """IPO's (h - 1 / (2 tau))^2 on summed sequence logprobs, or on per-token means (TRL's IPO): the
    loop reference divides each answer's summed logprob by its own answer-token count."""
    tau = 0.5
    ref_params = random_params(tiny_cfg, 2)
    ref = pairs_lib.rollout_logprobs(ref_params, pipeline["rollout"], tiny_cfg)
    batch = pairs_lib.build_pref_batch(pipeline["rollout"], pipeline["selection"], ref, num_pairs=6)
    real = np.asarray(batch.pair_mask)
    policy = pair_loop_logprobs(pipeline["params"], batch, tiny_cfg)  # [K, 2]
    reference = pair_loop_logprobs(ref_params, batch, tiny_cfg)
    if average:
        lengths = np.asarray(pipeline["rollout"].response_length)
        rows = np.stack([pipeline["selection"].chosen_index, pipeline["selection"].rejected_index], 1)
        counts = lengths[rows[: real.sum()]]  # answer tokens of each side
        assert len(np.unique(counts)) > 1, "answers of different lengths, so averaging changes h"
        policy, reference = policy / counts, reference / counts
    h = (policy[:, 0] - reference[:, 0]) - (policy[:, 1] - reference[:, 1])
    expected = np.mean((h - 1.0 / (2.0 * tau)) ** 2)

    tx = optax.sgd(0.1)
    state = train.init_train_state(pipeline["params"], tx)
    step = train.make_dpo_step(tiny_cfg, tx, beta=tau, loss_type="ipo", average_logprobs=average)
    _, metrics = jax.jit(step)(state, batch)
    np.testing.assert_allclose(float(metrics["loss"]), expected, **TOL)


def test_rebel_step_on_pipeline_batch_matches_numpy(pipeline, tiny_cfg):
    eta = 0.5
    # REBEL's pi_t is the policy that sampled the answers: ref logprobs are the policy's own.
    batch = pairs_lib.build_pref_batch(
        pipeline["rollout"], pipeline["selection"], pipeline["ref_logprobs"], num_pairs=6
    )
    real = batch.pair_mask
    pi_t = pair_loop_logprobs(pipeline["params"], batch, tiny_cfg)
    np.testing.assert_allclose(batch.ref_logprobs[real], pi_t, **TOL)
    reward_diff = batch.rewards[real, 0] - batch.rewards[real, 1]

    tx = optax.sgd(0.1)
    step = jax.jit(train.make_rebel_step(tiny_cfg, tx, eta=eta, epochs=1))  # one update
    state = train.init_train_state(pipeline["params"], tx)
    state, metrics = step(state, batch)
    np.testing.assert_allclose(float(metrics["loss"]), np.mean(reward_diff**2), **TOL)
    # A second step on the same batch: now pi != pi_t and the log-ratios enter the loss.
    pi = pair_loop_logprobs(state.params, batch, tiny_cfg)
    predicted = ((pi[:, 0] - pi_t[:, 0]) - (pi[:, 1] - pi_t[:, 1])) / eta
    assert np.abs(predicted).max() > 1e-3
    state, metrics = step(state, batch)
    np.testing.assert_allclose(float(metrics["loss"]), np.mean((predicted - reward_diff) ** 2), **TOL)
    assert float(metrics["finite"]) == 1.0 and int(state.step) == 2


def test_rebel_passes_move_toward_eta_times_the_reward_difference(pipeline, tiny_cfg):
    """One multi-pass update (4 epochs x 2 minibatches, the batch with padding pairs) on a fixed pair set:
    the regression loss falls from its value at pi = pi_t (mean (r(y) - r(y'))^2, the prediction being 0)
    and every pair's predicted difference moves toward its reward difference, both from loop-reference
    logprobs. And eta acts: the updates for eta 1 and 100 differ (cosine 0.56 measured; one pass at
    pi = pi_t gives 0.999, Adam normalising the 1/eta away)."""
    batch = pairs_lib.build_pref_batch(
        pipeline["rollout"], pipeline["selection"], pipeline["ref_logprobs"], num_pairs=6
    )
    real = np.asarray(batch.pair_mask)
    assert 0 < real.sum() < len(real)  # real pairs and padding
    reward_diff = batch.rewards[real, 0] - batch.rewards[real, 1]
    pi_t = pair_loop_logprobs(pipeline["params"], batch, tiny_cfg)
    tx = optax.adam(1e-2)
    state = train.init_train_state(pipeline["params"], tx)
    # eta traced, so that both values run one compiled program.
    step = jax.jit(
        lambda s, b, eta: train.make_rebel_step(tiny_cfg, tx, eta=eta, epochs=4, minibatches=2)(
            s, b, key=jax.random.key(0)
        )
    )
    moves = {}
    for eta in (1.0, 100.0):
        new, metrics = step(state, batch, eta)
        assert float(metrics["finite"]) == 1.0 and int(new.step) == 8
        pi = pair_loop_logprobs(new.params, batch, tiny_cfg)
        predicted = ((pi[:, 0] - pi_t[:, 0]) - (pi[:, 1] - pi_t[:, 1])) / eta
        move = jax.tree.map(lambda a, b: np.ravel(a - b), new.params, state.params)
        moves[eta] = np.concatenate(jax.tree.leaves(move))
        if eta == 1.0:
            # measured: loss 28.6 at pi_t -> 2.3 after; |predicted - target| below |target| on every pair
            assert np.mean((predicted - reward_diff) ** 2) < 0.2 * np.mean(reward_diff**2)
            assert np.all(np.abs(predicted - reward_diff) < np.abs(reward_diff))
            assert float(metrics["final_loss"]) < 0.2 * float(metrics["initial_loss"])
    cosine = moves[1.0] @ moves[100.0] / (np.linalg.norm(moves[1.0]) * np.linalg.norm(moves[100.0]))
    assert cosine < 0.8, cosine


BANDIT_CFG = ModelConfig(vocab_size=8, block_size=4, n_layer=1, n_head=1, n_embd=16)
BANDIT_REWARDS = {2: 0.3, 3: -0.5, 4: 0.9, 5: 0.1, 6: -0.2}  # one-token answers to the prompt "1"


def test_rebel_passes_reach_pi_t_exp_eta_r():
    """The known optimum of REBEL's regression over a fixed pair set (Gao et al. 2024, eq. 1): pi_{t+1}
    proportional to pi_t exp(eta r), i.e. log pi/pi_t (y) - log pi/pi_t (y') = eta (r(y) - r(y')) on
    every pair. A bandit: a tiny GPT answering the prompt "1" with one token, 6 pairs over 5 answers,
    log pi from a NumPy log-softmax of its logits. 200 passes (Adam, lr 3e-2 decayed linearly to 0) reach
    it to 6e-6 (eta 1) and 5e-5 (eta 4), measured; eta 4 moves 4 times as far as eta 1."""
    pairs = [(4, 2), (2, 3), (5, 3), (4, 5), (6, 4), (2, 6)]
    tokens = np.array([[[1, a], [1, b]] for a, b in pairs], np.int32)  # [M, 2, T = 2]
    mask = np.ones(tokens.shape, bool)
    loss_mask = mask & (np.arange(2) == 1)  # the answer token
    rewards = np.array([[BANDIT_REWARDS[a], BANDIT_REWARDS[b]] for a, b in pairs], np.float32)
    params = random_params(BANDIT_CFG, 5, std=0.5)
    logits_fn = jax.jit(lambda p: models.logits_fn(p, jnp.ones((1, 1), jnp.int32), jnp.ones((1, 1), bool),
                                                  BANDIT_CFG)[0, 0])  # fmt: skip

    def log_pi(p):  # [V] float64
        z = np.asarray(logits_fn(p), np.float64)
        return z - z.max() - np.log(np.sum(np.exp(z - z.max())))

    lp_t = log_pi(params)
    batch = train.PrefBatch(tokens, mask, loss_mask, lp_t[tokens[..., 1]].astype(np.float32), rewards,
                            np.ones(len(pairs), bool))  # fmt: skip
    epochs = 200
    tx = optax.adam(optax.linear_schedule(3e-2, 0.0, epochs))
    step = jax.jit(lambda s, b, eta: train.make_rebel_step(BANDIT_CFG, tx, eta=eta, epochs=epochs)(s, b))
    state = train.init_train_state(params, tx)
    log_ratio_diff, kl = {}, {}
    for eta, tol in ((1.0, 1e-4), (4.0, 5e-4)):
        new, metrics = step(state, batch, eta)
        log_ratio = log_pi(new.params) - lp_t  # [V] log pi/pi_t
        kl[eta] = np.sum(np.exp(log_pi(new.params)) * log_ratio)  # KL(pi || pi_t)
        log_ratio_diff[eta] = log_ratio[tokens[:, 0, 1]] - log_ratio[tokens[:, 1, 1]]
        target = eta * (rewards[:, 0] - rewards[:, 1])
        np.testing.assert_allclose(log_ratio_diff[eta], target, rtol=0, atol=tol)
        assert float(metrics["finite"]) == 1.0 and float(metrics["final_loss"]) < 1e-8
    # The larger eta moves further from pi_t: 4 times the log-ratio differences, a larger KL.
    np.testing.assert_allclose(log_ratio_diff[4.0], 4.0 * log_ratio_diff[1.0], atol=1e-3)
    assert kl[4.0] > 2 * kl[1.0] > 0, kl


def test_rebel_rewards_add_the_kl_to_sft_and_the_no_eos_penalty():
    """The REBEL authors' reward, by hand: score (penalty if unfinished) - kl_coef (log pi_t - log pi_sft)."""
    scores = np.float32([0.5, -0.2, 0.9])
    finished = np.array([True, False, True])
    pi_t, sft = np.float32([-3.0, -4.0, -2.0]), np.float32([-5.0, -4.5, -1.0])
    got = scoring.rebel_rewards(scores, finished, pi_t, sft, kl_coef=0.1, no_eos_penalty=-1.0)
    np.testing.assert_allclose(got, [0.5 - 0.1 * 2.0, -1.0 - 0.1 * 0.5, 0.9 + 0.1 * 1.0], **TOL)
    np.testing.assert_allclose(scoring.rebel_rewards(scores, finished, pi_t, sft), scores)


# ------------------------------------------------------------------------------------------ sharding


def test_pipeline_on_a_sharded_batch_matches_unsharded(pipeline, tiny_cfg):
    assert len(jax.devices()) == 8
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    rows = NamedSharding(mesh, P("data"))
    params = pipeline["params"]
    prompt, prompt_mask = left_padded_prompts(tiny_cfg, 8, seed=1)
    n = 2

    def run(params, prompt, prompt_mask):
        rollout = pairs_lib.generate_answers(
            params, prompt, prompt_mask, tiny_cfg, SAMPLE_CFG, n, key=jax.random.key(3)
        )
        return rollout, pairs_lib.rollout_logprobs(params, rollout, tiny_cfg)

    rollout, ref = run(params, jnp.asarray(prompt), jnp.asarray(prompt_mask))
    sharded_params = jax.device_put(params, NamedSharding(mesh, P()))
    s_rollout, s_ref = run(sharded_params, jax.device_put(prompt, rows), jax.device_put(prompt_mask, rows))
    assert len(s_rollout.response.sharding.device_set) == 8
    assert len(s_ref.sharding.device_set) == 8
    np.testing.assert_array_equal(s_rollout.response, rollout.response)
    np.testing.assert_array_equal(s_rollout.response_mask, rollout.response_mask)
    np.testing.assert_array_equal(s_rollout.prompt, rollout.prompt)
    np.testing.assert_allclose(s_rollout.logprobs, rollout.logprobs, **TOL)
    np.testing.assert_allclose(s_ref, ref, **TOL)

    rewards = content_rewards(rollout, tiny_cfg.vocab_size)
    sel = pairs_lib.select_pairs(rollout.response, rollout.response_mask, rewards, n)
    s_sel = pairs_lib.select_pairs(s_rollout.response, s_rollout.response_mask, rewards, n)
    np.testing.assert_array_equal(s_sel.chosen_index, sel.chosen_index)
    batch = pairs_lib.build_pref_batch(rollout, sel, ref)
    s_batch = pairs_lib.build_pref_batch(s_rollout, s_sel, s_ref)
    for name in ("tokens", "mask", "loss_mask", "rewards", "pair_mask"):
        np.testing.assert_array_equal(getattr(s_batch, name), getattr(batch, name), err_msg=name)
    np.testing.assert_allclose(s_batch.ref_logprobs, batch.ref_logprobs, **TOL)


def test_rebel_at_the_sampling_temperature_reaches_pi_t_exp_eta_r():
    """A softmax bandit: one prompt, four one-token answers (then EOS), all six pairs, rewards r. REBEL's
    passes at the sampling temperature T = 0.8 (policy and pi_t both logits / T, as the REBEL authors'
    code) reach the regression's fixed point pi_{t+1}(y) proportional to pi_t(y) exp(eta r(y)) over the
    answers, computed here in closed form from pi_t's logprobs at T."""
    T, eta = 0.8, 1.0
    cfg = ModelConfig(vocab_size=8, block_size=4, n_layer=1, n_head=2, n_embd=32, embd_pdrop=0.0,
                      resid_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    params0 = random_params(cfg, seed=3, std=0.3)
    answers, rewards = np.array([4, 5, 6, 7]), np.array([0.5, -0.2, 1.0, 0.1], np.float32)
    pairs = [(i, j) for i in range(4) for j in range(i + 1, 4)]
    tokens = np.array([[[2, answers[i], 3], [2, answers[j], 3]] for i, j in pairs], np.int32)  # [6, 2, 3]
    loss_mask = np.broadcast_to(np.array([False, True, True]), tokens.shape)
    batch = train.PrefBatch(
        tokens=jnp.asarray(tokens), mask=jnp.ones(tokens.shape, bool), loss_mask=jnp.asarray(loss_mask),
        ref_logprobs=jnp.zeros((len(pairs), 2)), rewards=jnp.asarray(rewards[np.array(pairs)]),
        pair_mask=jnp.ones(len(pairs), bool),
    )  # fmt: skip
    logprobs = jax.jit(lambda p, b: train.pair_logprobs(p, b, cfg, temperature=T))
    batch = batch._replace(ref_logprobs=logprobs(params0, batch))  # pi_t at T, as the sampler's policy
    tx = optax.adam(1e-2)
    step = jax.jit(train.make_rebel_step(cfg, tx, eta=eta, epochs=100, minibatches=1, temperature=T))
    state = train.init_train_state(params0, tx)
    for i in range(4):
        state, metrics = step(state, batch, key=jax.random.key(i))
    singles = jax.tree.map(lambda x: x[:2], batch)  # the 4 answers as 2 pairs
    singles = singles._replace(tokens=singles.tokens.at[:, :, 1].set(answers.reshape(2, 2)))
    lp_t, lp_new = (np.asarray(logprobs(p, singles)).reshape(-1) for p in (params0, state.params))

    def normalised(x):
        return np.exp(x - np.logaddexp.reduce(x))

    want = normalised(lp_t + eta * rewards)
    got = normalised(lp_new)
    assert np.abs(got - want).max() < 1e-3, (got, want)
    assert np.abs(normalised(lp_t) - want).max() > 0.05  # the update moved the policy a long way
    # The temperature-1 fixed point is another one: at T = 0.8 it would be pi_t exp(eta r / T).
    assert np.abs(normalised(lp_t + eta * rewards / T) - want).max() > 0.01
