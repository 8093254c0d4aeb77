"""Bad arguments to the library losses: one-line ValueErrors naming the function and the argument.

Shapes are checked against each other up front (static, so also under jax.jit, jax.vmap and jax.shard_map);
parameters are checked when they arrive as concrete numbers (Python, NumPy or non-traced JAX scalars), never
when traced; target ids outside the vocabulary are refused when concrete and give a NaN loss when traced.
All of it runs at trace time: the compiled programs hold no runtime check.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxrlhf import losses

B, R, V = 4, 6, 5


def raises(fn_name: str, *parts: str):
    """pytest.raises(ValueError) whose one-line message starts with `fn_name: ` and contains `parts`."""
    pattern = "^" + re.escape(f"{fn_name}: ") + "".join(f"(?=.*{re.escape(p)})" for p in parts)
    return pytest.raises(ValueError, match=pattern)


def one_line(excinfo) -> None:
    assert "\n" not in str(excinfo.value)


def tok(*shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


LP = tok(B, R)
MASK = jnp.ones((B, R), bool)
BAD_MASK = jnp.ones((B, R - 1), bool)
SEQ = tok(B, seed=1)


# ------------------------------------------------------------------ the listed cases


def test_shaped_rewards_refuses_per_token_scores():
    with raises("shaped_rewards", "scores has shape (4, 6)", "[B]") as e:
        losses.shaped_rewards(tok(B, R), LP, LP, MASK, 0.1)
    one_line(e)
    with raises("shaped_rewards", "scores has shape (3,)", "logprobs has shape (4, 6)"):
        losses.shaped_rewards(tok(3), LP, LP, MASK, 0.1)
    with raises("shaped_rewards", "kl_coef=-0.1", ">= 0"):
        losses.shaped_rewards(SEQ, LP, LP, MASK, -0.1)
    rewards, _ = losses.shaped_rewards(SEQ, LP, LP, MASK, 0.0)  # 0: the KL is a loss term (the pipelines)
    assert rewards.shape == (B, R)


def _sft_inputs():
    logits = tok(2, 3, V)
    targets = jnp.asarray([[0, 1, 2], [3, 4, 0]], jnp.int32)
    return logits, targets, jnp.ones((2, 3), bool)


@pytest.mark.parametrize("bad", [V, V + 7, -1, -100])
def test_sft_loss_refuses_concrete_targets_outside_vocab(bad):
    logits, targets, mask = _sft_inputs()
    with raises("sft_loss", f"targets[1, 2] = {bad}", f"[0, V={V})") as e:
        losses.sft_loss(logits, targets.at[1, 2].set(bad), mask)
    one_line(e)
    # Under a False mask any id is fine (-100 padding): the loss is that of the other tokens.
    loss, _ = losses.sft_loss(logits, targets.at[1, 2].set(bad), mask.at[1, 2].set(False))
    expected, _ = losses.sft_loss(logits, targets, mask.at[1, 2].set(False))
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)


@pytest.mark.parametrize("bad", [V, -1, -100])
def test_sft_loss_traced_targets_outside_vocab_give_nan_never_another_entry(bad):
    logits, targets, mask = _sft_inputs()
    loss, _ = jax.jit(losses.sft_loss)(logits, targets.at[1, 2].set(bad), mask)
    assert np.isnan(float(loss))  # -1 must not read the last vocab entry
    grads = jax.jit(jax.grad(lambda x: losses.sft_loss(x, targets, mask)[0]))(logits)
    assert np.all(np.isfinite(np.asarray(grads)))
    valid, _ = jax.jit(losses.sft_loss)(logits, targets, mask)
    ref = -np.mean(
        np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)), np.asarray(targets)[..., None], -1)
    )
    assert float(valid) == pytest.approx(ref, rel=1e-6)


def test_sft_loss_shapes_and_dtype():
    logits, targets, mask = _sft_inputs()
    with raises("sft_loss", "loss_mask has shape (2, 2)", "logits has shape (2, 3, 5)"):
        losses.sft_loss(logits, targets, mask[:, :2])
    with raises("sft_loss", "targets has shape (2, 3, 1)", "[B, T]"):
        losses.sft_loss(logits, targets[..., None], mask)
    with raises("sft_loss", "targets has dtype float32"):
        losses.sft_loss(logits, targets.astype(jnp.float32), mask)


REBEL_SEQ = dict(
    logprobs_chosen=SEQ,
    ref_logprobs_chosen=SEQ,
    logprobs_rejected=SEQ,
    ref_logprobs_rejected=SEQ,
    rewards_chosen=SEQ,
    rewards_rejected=SEQ,
)


@pytest.mark.parametrize("eta", [0.0, -1.0, 0, float("inf"), float("nan"), np.float32(-1), jnp.asarray(0.0)])
def test_rebel_loss_refuses_eta_not_positive_or_not_finite(eta):
    with raises("rebel_loss", "eta=", "> 0") as e:
        losses.rebel_loss(**REBEL_SEQ, eta=eta)
    one_line(e)


def test_rebel_loss_shapes():
    with raises("rebel_loss", "eta has shape (4,)", "scalar"):
        losses.rebel_loss(**REBEL_SEQ, eta=jnp.ones(B))
    with raises("rebel_loss", "mask_chosen has shape (4, 5)", "logprobs_chosen has shape (4, 6)"):
        losses.rebel_loss(LP, LP, LP, LP, SEQ, SEQ, 1.0, BAD_MASK, MASK)
    with raises("rebel_loss", "ref_logprobs_rejected has shape (4, 5)"):
        losses.rebel_loss(LP, LP, LP, LP[:, :5], SEQ, SEQ, 1.0, MASK, MASK)
    with raises("rebel_loss", "logprobs_rejected has shape (3, 6)", "batch sizes differ"):
        losses.rebel_loss(LP, LP, LP[:3], LP[:3], SEQ, SEQ, 1.0, MASK, MASK[:3])
    with raises("rebel_loss", "pair_mask has shape (3,)", "rewards_chosen has shape (4,)"):
        losses.rebel_loss(**REBEL_SEQ, eta=1.0, pair_mask=jnp.ones(3, bool))
    with raises("rebel_loss", "mask_rejected was given with per-sequence logprobs_rejected of shape (4,)"):
        losses.rebel_loss(**REBEL_SEQ, eta=1.0, mask_rejected=jnp.ones(B, bool))
    with raises("rebel_loss", "rewards_chosen has shape (4, 6)", "[B]"):
        losses.rebel_loss(LP, LP, LP, LP, LP, LP, 1.0, MASK, MASK)
    # Chosen and rejected answers may have different widths.
    loss, _ = losses.rebel_loss(LP, LP, LP[:, :3], LP[:, :3], SEQ, SEQ, 2.0, MASK, MASK[:, :3])
    assert np.isfinite(float(loss))


DPO_SEQ = (SEQ, SEQ, SEQ, SEQ)


@pytest.mark.parametrize("beta", [0.0, -1.0, float("inf")])
def test_dpo_loss_refuses_beta_not_positive(beta):
    with raises("dpo_loss", "beta=", "> 0") as e:
        losses.dpo_loss(*DPO_SEQ, beta=beta)
    one_line(e)


@pytest.mark.parametrize("smoothing", [2.0, 0.5, -0.1, float("nan")])
def test_dpo_loss_refuses_label_smoothing_outside_0_half(smoothing):
    with raises("dpo_loss", "label_smoothing=", ">= 0 and < 0.5"):
        losses.dpo_loss(*DPO_SEQ, beta=0.1, label_smoothing=smoothing)


def test_dpo_loss_shapes():
    with raises("dpo_loss", "ref_rejected_logps has shape (3,)", "policy_chosen_logps has shape (4,)"):
        losses.dpo_loss(SEQ, SEQ, SEQ, SEQ[:3], beta=0.1)
    with raises("dpo_loss", "policy_chosen_logps has shape (4, 6)", "[B]"):
        losses.dpo_loss(LP, LP, LP, LP, beta=0.1)
    with raises("dpo_loss", "mask has shape (4, 6)"):
        losses.dpo_loss(*DPO_SEQ, beta=0.1, mask=MASK)


@pytest.mark.parametrize(
    "kwargs, part",
    [
        (dict(clip_eps=-0.2), "clip_eps=-0.2"),
        (dict(clip_eps=0.0), "clip_eps=0.0"),
        (dict(clip_eps=float("inf")), "clip_eps=inf"),
        (dict(clip_eps_high=-0.1), "clip_eps_high=-0.1"),
        (dict(clip_eps_high=0), "clip_eps_high=0.0"),
    ],
)
def test_ppo_policy_loss_refuses_clip_not_positive(kwargs, part):
    with raises("ppo_policy_loss", part, "> 0") as e:
        losses.ppo_policy_loss(LP, LP, LP, MASK, **kwargs)
    one_line(e)


def test_ppo_policy_loss_refuses_dual_clip_at_most_one():
    with raises("ppo_policy_loss", "dual_clip=0.5", "> 1"):
        losses.ppo_policy_loss(LP, LP, LP, MASK, dual_clip=0.5)


def test_ppo_policy_loss_mask_shape_message_names_both_arguments():
    with raises("ppo_policy_loss") as e:
        losses.ppo_policy_loss(LP, LP, LP, BAD_MASK)
    assert str(e.value) == "ppo_policy_loss: response_mask has shape (4, 5); logprobs has shape (4, 6)"
    with raises("ppo_policy_loss", "old_logprobs has shape (4, 5)"):
        losses.ppo_policy_loss(LP, LP[:, :5], LP, MASK)
    with raises("ppo_policy_loss", "advantages has shape (4,)"):
        losses.ppo_policy_loss(LP, LP, SEQ, MASK)
    with raises("ppo_policy_loss", "logprobs has shape (4, 6)", "logits has shape (4, 5, 5)"):
        losses.ppo_policy_loss(LP, LP, LP, MASK, logits=tok(B, R - 1, V))
    with raises("ppo_policy_loss", "logprobs has shape (6,)", "[B, R]"):
        losses.ppo_policy_loss(LP[0], LP[0], LP[0], MASK[0])


def test_ppo_policy_loss_filtered_logprob_gives_finite_loss_grad_and_approx_kl():
    """A token pushed out of the top-k by an update has logprob finfo.min (filtered logprobs)."""
    old = jnp.full((B, R), -1.0)
    logprobs = old.at[1, 2].set(jnp.finfo(jnp.float32).min)
    adv = tok(B, R, seed=3)

    def loss_fn(lp):
        return losses.ppo_policy_loss(lp, old, adv, MASK)

    (loss, metrics), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(logprobs)
    assert np.isfinite(float(loss))
    assert np.all(np.isfinite(np.asarray(grads)))
    assert np.isfinite(float(metrics["approx_kl"]))
    cap = losses.policy.KL_METRIC_LOG_RATIO_CAP
    assert float(metrics["approx_kl"]) == pytest.approx((np.expm1(-cap) + cap) / (B * R), rel=1e-5)


def test_compute_gae_shapes_and_parameters():
    with raises("compute_gae", "values has shape (4, 7)", "rewards has shape (4, 6)") as e:
        losses.compute_gae(LP, tok(B, R + 1), MASK, 1.0, 0.95)
    one_line(e)
    with raises("compute_gae", "response_mask has shape (4, 5)"):
        losses.compute_gae(LP, LP, BAD_MASK, 1.0, 0.95)
    with raises("compute_gae", "rewards has shape (4,)", "[B, R]"):
        losses.compute_gae(SEQ, SEQ, MASK[:, 0], 1.0, 0.95)
    with raises("compute_gae", "last_value has shape (3,)"):
        losses.compute_gae(LP, LP, MASK, 1.0, 0.95, last_value=jnp.zeros(3))
    for name, gamma, lam in (
        ("gamma", 1.5, 0.9),
        ("gamma", -0.1, 0.9),
        ("lam", 1.0, 1.01),
        ("lam", 1.0, -1.0),
    ):
        with raises("compute_gae", f"{name}=", ">= 0 and <= 1"):
            losses.compute_gae(LP, LP, MASK, gamma, lam)
    losses.compute_gae(LP, LP, MASK, 0.0, 1.0)  # the ends of [0, 1] are fine
    losses.compute_gae(LP, LP, MASK, 1.0, 0.0, last_value=1.0)


@pytest.mark.parametrize("fn_name", ["grpo_advantages", "rloo_advantages"])
def test_group_advantages_shapes(fn_name):
    fn = getattr(losses, fn_name)
    with raises(fn_name, "scores has shape (8,)", "[B, K]", "[N // K, K]") as e:
        fn(tok(8))
    one_line(e)
    with raises(fn_name, "mask has shape (2, 3)", "scores has shape (2, 4)"):
        fn(tok(2, 4), mask=jnp.ones((2, 3), bool))


def test_grpo_advantages_eps():
    with raises("grpo_advantages", "eps=0.0", "> 0"):
        losses.grpo_advantages(tok(2, 4), eps=0.0)
    losses.grpo_advantages(tok(2, 4), eps=0.0, scale_by_std=False)  # eps unused


# ------------------------------------------------------------------ the same classes, every other loss


def test_kl_penalty_and_kl_loss():
    with raises("kl_penalty", "kind='k4'"):
        losses.kl_penalty(LP, LP, "k4")
    with raises("kl_penalty", "ref_logprobs has shape (4, 5)", "logprobs has shape (4, 6)"):
        losses.kl_penalty(LP, LP[:, :5], "k3")
    with raises("kl_loss", "response_mask has shape (4, 5)"):
        losses.kl_loss(LP, LP, BAD_MASK)
    with raises("kl_loss", "kind='k1'"):
        losses.kl_loss(LP, LP, MASK, "k1")
    with raises("kl_loss", "aggregation='sum'"):
        losses.kl_loss(LP, LP, MASK, "k3", "sum")


def test_value_loss():
    with raises("value_loss", "clip_eps=-0.2", "> 0"):
        losses.value_loss(LP, LP, LP, MASK, clip_eps=-0.2)
    with raises("value_loss", "returns has shape (4,)", "values has shape (4, 6)"):
        losses.value_loss(LP, LP, SEQ, MASK)
    with raises("value_loss", "response_mask has shape (4, 5)"):
        losses.value_loss(LP, LP, LP, BAD_MASK)
    losses.value_loss(LP, LP, LP, MASK, clip_eps=None)


def test_entropy_bonus():
    with raises("entropy_bonus", "response_mask has shape (4, 5)", "logits has shape (4, 6, 5)"):
        losses.entropy_bonus(tok(B, R, V), BAD_MASK)
    with raises("entropy_bonus", "logits has shape (4, 6)", "[B, R, V]"):
        losses.entropy_bonus(LP, MASK)


def test_pg_loss_and_aggregate():
    with raises("pg_loss", "response_mask has shape (4, 5)"):
        losses.pg_loss(LP, LP, BAD_MASK)
    with raises("pg_loss", "advantages has shape (3,)", "logprobs has shape (4, 6)", "(4,)"):
        losses.pg_loss(LP, tok(3), MASK)
    with raises("pg_loss", "advantages has shape (4, 5)"):
        losses.pg_loss(LP, LP[:, :5], MASK)
    with raises("pg_loss", "baseline has shape (3,)"):
        losses.pg_loss(LP, SEQ, MASK, baseline=tok(3))
    with raises("pg_loss", "baseline=nan"):
        losses.pg_loss(LP, SEQ, MASK, baseline=float("nan"))
    with raises("pg_loss", "aggregation='mean'"):
        losses.pg_loss(LP, SEQ, MASK, aggregation="mean")
    with raises("aggregate", "response_mask has shape (4, 5)", "per_token has shape (4, 6)"):
        losses.aggregate(LP, BAD_MASK)
    with raises("aggregate", "aggregation='sum'"):
        losses.aggregate(LP, MASK, "sum")


def test_reward_model_losses():
    with raises("pairwise_rm_loss", "rejected_rewards has shape (3,)", "chosen_rewards has shape (4,)"):
        losses.pairwise_rm_loss(SEQ, tok(3))
    with raises("pairwise_rm_loss", "mask has shape (4, 6)"):
        losses.pairwise_rm_loss(SEQ, SEQ, mask=MASK)
    with raises("pairwise_rm_loss", "margin has shape (3,)"):
        losses.pairwise_rm_loss(SEQ, SEQ, margin=tok(3))
    with raises("pairwise_rm_loss", "margin=inf", "finite"):
        losses.pairwise_rm_loss(SEQ, SEQ, margin=float("inf"))
    with raises("binary_rm_loss", "labels has shape (3,)", "scores has shape (4,)"):
        losses.binary_rm_loss(SEQ, jnp.ones(3))
    with raises("binary_rm_loss", "labels[1] = -1", "0 (negative) or 1 (positive)"):
        losses.binary_rm_loss(SEQ, jnp.asarray([1, -1, 0, 1]))
    losses.binary_rm_loss(SEQ, jnp.asarray([1, -1, 0, 1]), jnp.asarray([True, False, True, True]))
    with raises("kway_rm_loss", "rank_mask has shape (4, 5)", "rewards has shape (4, 6)"):
        losses.kway_rm_loss(LP, BAD_MASK)
    with raises("kway_rm_loss", "rewards has shape (4,)", "[B, K]"):
        losses.kway_rm_loss(SEQ)
    with raises("reward_centring_loss", "mask has shape (3,)"):
        losses.reward_centring_loss(SEQ, SEQ, jnp.ones(3, bool))
    with raises("reward_gain_bias", "mask has shape (3,)", "rewards has shape (4,)"):
        losses.reward_gain_bias(SEQ, jnp.ones(3, bool))
    with raises("reward_gain_bias", "target_std=0.0", "> 0"):
        losses.reward_gain_bias(SEQ, target_std=0.0)
    with raises("reward_gain_bias", "mask", "no real entry"):
        losses.reward_gain_bias(SEQ, jnp.zeros(B, bool))


def test_whiten_sequence_logprobs_and_kl_controller():
    with raises("whiten_advantages", "response_mask has shape (4, 5)", "advantages has shape (4, 6)"):
        losses.whiten_advantages(LP, BAD_MASK)
    with raises("whiten_advantages", "eps=-1.0"):
        losses.whiten_advantages(LP, MASK, eps=-1.0)
    # An all-False mask where a mean is taken gives a finite 0 (never NaN), by design.
    assert np.all(np.asarray(losses.whiten_advantages(LP, jnp.zeros((B, R), bool))) == 0)
    assert float(losses.ppo_policy_loss(LP, LP, LP, jnp.zeros((B, R), bool))[0]) == 0.0
    with raises("sequence_logprobs", "mask has shape (4, 5)", "token_logprobs has shape (4, 6)"):
        losses.sequence_logprobs(LP, BAD_MASK)
    with raises("sequence_logprobs", "token_logprobs has shape (4,)", "[B, R]"):
        losses.sequence_logprobs(SEQ, MASK[:, 0])
    with raises("init_kl_controller", "init_kl_coef=-0.1", ">= 0"):
        losses.init_kl_controller(-0.1)
    with raises("init_kl_controller", "target=0.0", "> 0"):
        losses.init_kl_controller(0.1, target=0.0)
    with raises("init_kl_controller", "horizon=inf"):
        losses.init_kl_controller(0.1, target=6.0, horizon=float("inf"))
    state = losses.init_kl_controller(0.1, target=6.0)
    with raises("update_kl_controller", "observed_kl=nan"):
        losses.update_kl_controller(state, float("nan"), 64)
    with raises("update_kl_controller", "n_steps=-1.0", ">= 0"):
        losses.update_kl_controller(state, 1.0, -1)
    with raises("update_kl_controller", "observed_kl has shape (4,)", "scalar"):
        losses.update_kl_controller(state, SEQ, 64)


# ------------------------------------------------------------------ under jit and shard_map


def test_checks_run_at_trace_time_under_jit():
    with raises("ppo_policy_loss", "response_mask has shape (4, 5)"):
        jax.jit(losses.ppo_policy_loss)(LP, LP, LP, BAD_MASK)
    with raises("rebel_loss", "eta=-1.0"):
        jax.jit(lambda *a: losses.rebel_loss(*a, eta=-1.0))(*REBEL_SEQ.values())
    with raises("shaped_rewards", "scores has shape (4, 6)"):
        jax.jit(losses.shaped_rewards)(LP, LP, LP, MASK, 0.1)
    # A traced parameter is checked for its rank only, never its value (documented).
    loss, _ = jax.jit(lambda eta: losses.rebel_loss(**REBEL_SEQ, eta=eta))(-1.0)
    assert np.isfinite(float(loss))
    with raises("rebel_loss", "eta has shape (4,)"):
        jax.jit(lambda eta: losses.rebel_loss(**REBEL_SEQ, eta=eta))(jnp.ones(B))


def test_checks_run_under_vmap_and_shard_map():
    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    n = jax.device_count()
    lp, mask = tok(2 * n, R), jnp.ones((2 * n, R), bool)

    def sharded(mask_width, eta):
        def body(lp, mask, rewards):
            loss, _ = losses.ppo_policy_loss(lp, lp, lp, mask, axis_name="data")
            rebel, _ = losses.rebel_loss(lp, lp, lp, lp, rewards, rewards, eta, mask, mask, axis_name="data")
            return loss + rebel

        f = jax.shard_map(body, mesh=mesh, in_specs=(P("data"), P("data"), P("data")), out_specs=P())
        return jax.jit(f)(lp, mask[:, :mask_width], jnp.zeros(2 * n))

    # Per-device shapes: 2 rows each.
    with raises("ppo_policy_loss", "response_mask has shape (2, 5)", "logprobs has shape (2, 6)"):
        sharded(R - 1, 1.0)
    with raises("rebel_loss", "eta=0.0"):
        sharded(R, 0.0)
    assert np.isfinite(float(sharded(R, 2.0)))
    # vmap over groups of [B, R] batches: the per-group shapes are checked.
    groups = jnp.stack([LP, LP])
    with raises("ppo_policy_loss", "response_mask has shape (4, 5)", "logprobs has shape (4, 6)"):
        jax.vmap(losses.ppo_policy_loss)(groups, groups, groups, jnp.stack([BAD_MASK, BAD_MASK]))


# ------------------------------------------------------------------ nothing at run time


CALLBACKS = ("callback", "assert", "check", "debug")


@pytest.mark.parametrize(
    "name, call",
    [
        ("ppo_policy_loss", lambda: losses.ppo_policy_loss(LP, LP, LP, MASK, 0.2, 0.28, 3.0)),
        ("rebel_loss", lambda: losses.rebel_loss(LP, LP, LP, LP, SEQ, SEQ, 1.0, MASK, MASK)),
        ("dpo_loss", lambda: losses.dpo_loss(*DPO_SEQ, 0.1, "sigmoid", 0.1)),
        ("compute_gae", lambda: losses.compute_gae(LP, LP, MASK, 1.0, 0.95)),
        ("shaped_rewards", lambda: losses.shaped_rewards(SEQ, LP, LP, MASK, 0.1)),
        ("grpo_advantages", lambda: losses.grpo_advantages(tok(2, 4))),
        ("value_loss", lambda: losses.value_loss(LP, LP, LP, MASK)),
        ("sft_loss", lambda: losses.sft_loss(*_sft_inputs())),
    ],
)
def test_valid_calls_compile_without_runtime_checks(name, call):
    """The checks live in Python: a valid call's jaxpr holds no callback or assertion primitive."""
    jaxpr = jax.make_jaxpr(call)()
    prims = {str(eqn.primitive) for eqn in jaxpr.jaxpr.eqns}
    assert not any(word in p for p in prims for word in CALLBACKS), (name, prims)
