"""jaxrlhf.losses and the ops reductions inside `jax.shard_map` over 8 devices.

With `axis_name='data'` every batch reduction equals the unsharded call at 1e-5 (values, metrics and
gradients); without it the per-device results differ, so each comparison can fail. The acceptance test
runs one data-parallel PPO train step three ways (1 device; GSPMD over the mesh; shard_map with the
gradient and the Adam update inside) and compares new params, optimizer state, gradients and metrics.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxrlhf import losses, ops

TOL = dict(rtol=1e-5, atol=1e-5)
N = 8
B, R, V = 16, 5, 6  # two rows per device
EMPTY_ROW = 5  # a fully masked row (batch padding)


@pytest.fixture(scope="module")
def mesh():
    assert jax.device_count() == N
    return jax.make_mesh((N,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def ragged_mask(rng, b=B, r=R):
    """[B, R] bool with random holes (so per-device token counts differ), row 0 full, one row empty."""
    mask = rng.random((b, r)) < 0.6
    mask[0] = True
    mask[EMPTY_ROW] = False
    return jnp.asarray(mask)


def normal(rng, *shape, scale=1.0):
    return jnp.asarray(scale * rng.normal(size=shape), jnp.float32)


def run_sharded(mesh, fn, *args, axis_name="data"):
    """`fn(*args, axis_name=...)` -> flat dict of scalars, [B, ...] rows or replicated arrays.

    Returns (unsharded, global, local): the plain jitted call; the call inside `jax.shard_map` over the
    mesh with `axis_name` (scalars and replicated outputs come back as one value: check_vma proves they
    are the same on every device); and the same shard_map call without `axis_name`, each device's
    non-row output stacked on a new leading axis [N, ...].
    """
    expected = jax.jit(functools.partial(fn, axis_name=None))(*args)
    is_rows = {k: v.ndim > 0 and v.shape[0] == B for k, v in expected.items()}
    batch_spec = P(axis_name)

    def body(*shards):
        global_out = fn(*shards, axis_name=axis_name)
        local_out = fn(*shards, axis_name=None)
        return global_out, {k: v if is_rows[k] else v[None] for k, v in local_out.items()}

    out_specs = (
        {k: batch_spec if r else P() for k, r in is_rows.items()},
        dict.fromkeys(is_rows, batch_spec),
    )
    in_specs = tuple(batch_spec for _ in args)
    sharded = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs))
    global_out, local_out = sharded(*args)
    return expected, global_out, local_out


def assert_global(expected, global_out, local_out, per_row=()):
    """Global == unsharded for every output; the local (no axis_name) result differs for every output
    but the per-row ones."""
    assert set(global_out) == set(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(np.asarray(global_out[name]), np.asarray(value), err_msg=name, **TOL)
    for name, value in expected.items():
        local = np.asarray(local_out[name])
        if name in per_row:
            np.testing.assert_allclose(local, np.asarray(value), err_msg=name, **TOL)
        else:  # [N, ...] per-device values against the one global value
            assert not np.allclose(local, np.asarray(value), **TOL), f"{name}: local == global"


# ------------------------------------------------------------------------------------- ops


def _ops_reductions(x, mask, *, axis_name):
    return {
        "sum": ops.masked_sum(x, mask, axis_name=axis_name),
        "sum_over_rows": ops.masked_sum(x, mask, axis=0, axis_name=axis_name),  # [R], replicated
        "mean": ops.masked_mean(x, mask, axis_name=axis_name),
        "mean_over_rows": ops.masked_mean(x, mask, axis=(0,), axis_name=axis_name),
        "mean_unmasked": ops.masked_mean(x, axis_name=axis_name),
        "var": ops.masked_var(x, mask, axis_name=axis_name),
        "var_biased": ops.masked_var(x, mask, unbiased=False, axis_name=axis_name),
        "var_unmasked": ops.masked_var(x, axis_name=axis_name),
        "whiten": losses.whiten_advantages(x, mask, axis_name=axis_name),  # [B, R]
        "whiten_keep_mean": losses.whiten_advantages(x, mask, shift_mean=False, axis_name=axis_name),
        "row_mean": ops.masked_mean(x, mask, axis=-1),  # per row: no collective needed
    }


@pytest.mark.parametrize("mesh_shape", [(8,), (4, 2)])
def test_ops_reductions_with_axis_name_are_global(mesh_shape):
    names = ("data",) if len(mesh_shape) == 1 else ("data", "fsdp")
    mesh = jax.make_mesh(mesh_shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(names))
    rng = np.random.default_rng(0)
    x, mask = normal(rng, B, R, scale=2.0) + 1.0, ragged_mask(rng)
    axis_name = names[0] if len(names) == 1 else names
    out = run_sharded(mesh, _ops_reductions, x, mask, axis_name=axis_name)
    assert_global(*out, per_row=("row_mean",))


def test_ops_refuse_axis_name_on_a_per_row_reduction():
    x = jnp.ones((B, R))
    with pytest.raises(ValueError, match="axis_name"):
        ops.masked_mean(x, x > 0, axis=-1, axis_name="data")
    with pytest.raises(ValueError, match="axis_name"):
        ops.masked_sum(x, None, axis=1, axis_name="data")


# ---------------------------------------------------------------------------------- RL losses


def _rl_losses(
    raw_advantages,
    logprobs,
    old_logprobs,
    ref_logprobs,
    values,
    old_values,
    returns,
    logits,
    mask,
    *,
    axis_name,
):
    out = {}
    advantages = losses.whiten_advantages(raw_advantages, mask, axis_name=axis_name)
    out["whitened"] = advantages  # [B, R]
    for agg in losses.AGGREGATIONS:
        out[f"aggregate/{agg}"] = losses.aggregate(raw_advantages, mask, agg, axis_name=axis_name)

    def policy_loss(logprobs):
        ppo, ppo_m = losses.ppo_policy_loss(
            logprobs, old_logprobs, advantages, mask, 0.2, 0.28, 1.5, logits, axis_name=axis_name
        )
        gspo, gspo_m = losses.ppo_policy_loss(
            logprobs,
            old_logprobs,
            advantages[:, :1] * mask,
            mask,
            0.05,
            aggregation="seq_mean_token_mean",
            ratio_level="sequence",
            axis_name=axis_name,
        )
        pg, pg_m = losses.pg_loss(
            logprobs, advantages, mask, raw_advantages[:, 0], "constant", axis_name=axis_name
        )
        kl, kl_m = losses.kl_loss(
            logprobs, ref_logprobs, mask, "k3", "seq_mean_token_sum", axis_name=axis_name
        )
        total = ppo + gspo + pg + kl
        metrics = {f"ppo/{k}": v for k, v in ppo_m.items()} | {f"gspo/{k}": v for k, v in gspo_m.items()}
        return total, metrics | {f"pg/{k}": v for k, v in pg_m.items()} | kl_m

    (total, metrics), grad = jax.value_and_grad(policy_loss, has_aux=True)(logprobs)
    out |= metrics | {"policy_total": total, "grad_logprobs": grad}  # grad: [B, R], this device's rows
    (vf, vf_m), vf_grad = jax.value_and_grad(
        lambda v: losses.value_loss(v, old_values, returns, mask, axis_name=axis_name), has_aux=True
    )(values)
    out |= {f"value/{k}": v for k, v in vf_m.items()} | {"grad_values": vf_grad}
    ent, _ = losses.entropy_bonus(logits, mask, axis_name=axis_name)
    out["entropy_bonus"] = ent
    return out


def test_rl_losses_with_axis_name_are_global(mesh):
    rng = np.random.default_rng(1)
    mask = ragged_mask(rng)
    logprobs = normal(rng, B, R, scale=0.3) - 1.5
    args = (
        normal(rng, B, R, scale=2.0) + 0.5,  # raw advantages
        logprobs,
        logprobs + normal(rng, B, R, scale=0.5),  # old: ratios spread around 1, some clipped
        logprobs + normal(rng, B, R, scale=0.5),  # ref
        normal(rng, B, R),
        normal(rng, B, R),
        normal(rng, B, R),
        normal(rng, B, R, V),
        mask,
    )
    expected, global_out, local_out = run_sharded(mesh, _rl_losses, *args)
    # The clip and the dual clip must be active somewhere, or their metrics would prove nothing.
    for name in ("ppo/clipfrac", "ppo/dual_clipfrac", "gspo/clipfrac", "value/clipfrac"):
        assert 0.0 < float(expected[name]) < 1.0, name
    assert_global(expected, global_out, local_out)
    assert not np.any(np.asarray(global_out["grad_logprobs"])[EMPTY_ROW])


# --------------------------------------------------------------- reward, preference, LM losses


def _pair_losses(
    chosen,
    rejected,
    k_rewards,
    rank_mask,
    pair_mask,
    lp_c,
    ref_c,
    lp_r,
    ref_r,
    mask_c,
    mask_r,
    logits,
    targets,
    loss_mask,
    seq_kl,
    *,
    axis_name,
):
    out = {}
    rm, rm_m = losses.pairwise_rm_loss(chosen, rejected, 0.1, pair_mask, axis_name=axis_name)
    kway, kway_m = losses.kway_rm_loss(k_rewards, rank_mask, axis_name=axis_name)
    out |= {f"rm/{k}": v for k, v in rm_m.items()} | {f"kway/{k}": v for k, v in kway_m.items()}
    out["gain"], out["bias"] = losses.reward_gain_bias(k_rewards, rank_mask, 0.5, 2.0, axis_name=axis_name)
    out["centring"], _ = losses.reward_centring_loss(chosen, rejected, pair_mask, axis_name=axis_name)
    seq_c = losses.sequence_logprobs(lp_c, mask_c)  # [B], per row
    seq_r = losses.sequence_logprobs(lp_r, mask_r)
    for loss_type, smoothing in (("sigmoid", 0.1), ("ipo", 0.0)):
        _, dpo_m = losses.dpo_loss(
            seq_c,
            seq_r,
            losses.sequence_logprobs(ref_c, mask_c),
            losses.sequence_logprobs(ref_r, mask_r),
            0.5,
            loss_type,
            smoothing,
            pair_mask,
            axis_name=axis_name,
        )
        out |= {f"{loss_type}/{k}": v for k, v in dpo_m.items()}
    _, rebel_m = losses.rebel_loss(
        lp_c, ref_c, lp_r, ref_r, chosen, rejected, 2.0, mask_c, mask_r, pair_mask, axis_name=axis_name
    )
    out |= {f"rebel/{k}": v for k, v in rebel_m.items()}
    _, sft_m = losses.sft_loss(logits, targets, loss_mask, axis_name=axis_name)
    out |= {f"sft/{k}": v for k, v in sft_m.items()}
    kl_state = losses.init_kl_controller(0.1, target=1.0, horizon=20.0)
    observed = ops.masked_mean(seq_kl, pair_mask)  # this device's mean KL per sequence
    n = jnp.sum(pair_mask, dtype=jnp.float32)
    out["kl_coef"] = losses.update_kl_controller(kl_state, observed, n, axis_name=axis_name).kl_coef
    out["seq_logprobs"] = seq_c  # [B], per row
    return out


def test_reward_preference_and_lm_losses_with_axis_name_are_global(mesh):
    rng = np.random.default_rng(2)
    pair_mask = np.ones(B, bool)
    pair_mask[[EMPTY_ROW, 9]] = False
    rank_mask = rng.random((B, 4)) < 0.75
    rank_mask[EMPTY_ROW] = [True, False, False, False]  # a prompt with no pair
    args = (
        normal(rng, B),
        normal(rng, B),
        normal(rng, B, 4),
        jnp.asarray(rank_mask),
        jnp.asarray(pair_mask),
        normal(rng, B, R) - 1.0,
        normal(rng, B, R) - 1.0,
        normal(rng, B, R) - 1.0,
        normal(rng, B, R) - 1.0,
        ragged_mask(rng),
        ragged_mask(rng),
        normal(rng, B, R, V, scale=2.0),
        jnp.asarray(rng.integers(0, V, (B, R))),
        ragged_mask(rng),
        jnp.abs(normal(rng, B)) + 0.2,
    )
    out = run_sharded(mesh, _pair_losses, *args)
    assert_global(*out, per_row=("seq_logprobs",))


# -------------------------------------------------------------------- the data-parallel train step

D, H = 3, 8  # feature width, hidden width of the tiny policy / value MLP


def init_policy(rng):
    return {
        "w_in": normal(rng, D, H, scale=1 / np.sqrt(D)),
        "w_policy": normal(rng, H, V),
        "w_value": normal(rng, H),
    }


def apply_policy(params, features):
    """[B, R, D] features -> ([B, R, V] logits, [B, R] values)."""
    hidden = jnp.tanh(features @ params["w_in"])  # [B, R, H]
    return hidden @ params["w_policy"], hidden @ params["w_value"]


def ppo_objective(params, batch, *, axis_name=None):
    logits, values = apply_policy(params, batch["features"])
    logprobs = ops.token_logprobs(logits, batch["actions"])  # [B, R]
    mask = batch["response_mask"]
    advantages = losses.whiten_advantages(batch["advantages"], mask, axis_name=axis_name)
    pol, pol_m = losses.ppo_policy_loss(
        logprobs, batch["old_logprobs"], advantages, mask, logits=logits, axis_name=axis_name
    )
    vf, vf_m = losses.value_loss(values, batch["old_values"], batch["returns"], mask, axis_name=axis_name)
    kl, _ = losses.kl_loss(logprobs, batch["ref_logprobs"], mask, axis_name=axis_name)
    total = pol + 0.5 * vf + 0.1 * kl
    metrics = {f"policy/{k}": v for k, v in pol_m.items()} | {f"value/{k}": v for k, v in vf_m.items()}
    return total, metrics | {"loss": total, "kl_loss": kl}


def train_step(state, batch, *, tx, axis_name=None):
    """One PPO update; with `axis_name` it runs per device inside shard_map on that device's rows."""
    grad_fn = jax.value_and_grad(functools.partial(ppo_objective, axis_name=axis_name), has_aux=True)
    (_, metrics), grads = grad_fn(state["params"], batch)  # the global gradient: no pmean (ops docstring)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    return {"params": params, "opt_state": opt_state}, metrics, grads


def ppo_batch(params, rng):
    """A rollout batch near `params` (old / ref logprobs and old values a little off), built in NumPy."""
    features = rng.normal(size=(B, R, D))
    hidden = np.tanh(features @ np.asarray(params["w_in"]))  # [B, R, H]
    logits = hidden @ np.asarray(params["w_policy"])  # [B, R, V]
    log_softmax = logits - np.log(np.sum(np.exp(logits), axis=-1, keepdims=True))
    actions = rng.integers(0, V, (B, R))
    logprobs = np.take_along_axis(log_softmax, actions[..., None], axis=-1)[..., 0]  # [B, R]
    lengths = np.array([5, 1, 3, 4, 2, 0, 5, 3, 1, 2, 4, 5, 3, 2, 1, 4])  # ragged; row 5 empty
    batch = {
        "features": features,
        "actions": actions.astype(np.int32),
        "response_mask": np.arange(R)[None] < lengths[:, None],
        "old_logprobs": logprobs + 0.3 * rng.normal(size=(B, R)),
        "ref_logprobs": logprobs + 0.3 * rng.normal(size=(B, R)),
        "advantages": 2.0 * rng.normal(size=(B, R)) + 1.0,
        "old_values": hidden @ np.asarray(params["w_value"]) + 0.3 * rng.normal(size=(B, R)),
        "returns": rng.normal(size=(B, R)),
    }
    return {k: jnp.asarray(v, jnp.float32 if v.dtype == np.float64 else v.dtype) for k, v in batch.items()}


def test_data_parallel_train_step_single_device_gspmd_and_shard_map_agree(mesh):
    tx = optax.adam(1e-2)
    rng = np.random.default_rng(3)
    params = init_policy(rng)
    state = {"params": params, "opt_state": tx.init(params)}
    batch = ppo_batch(params, rng)
    step = functools.partial(train_step, tx=tx)

    single = jax.jit(step)(state, batch)  # (a) one device
    replicated, rows = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    gspmd_step = jax.jit(step, in_shardings=(replicated, rows), out_shardings=replicated)  # (b)
    gspmd = gspmd_step(jax.device_put(state, replicated), jax.device_put(batch, rows))
    sharded_step = jax.jit(  # (c) per device, the losses given axis_name
        jax.shard_map(
            functools.partial(step, axis_name="data"), mesh=mesh, in_specs=(P(), P("data")), out_specs=P()
        )
    )
    sharded = sharded_step(state, batch)
    assert len(sharded[0]["params"]["w_in"].sharding.device_set) == N

    assert 0.0 < float(single[1]["policy/clipfrac"]) < 1.0  # the clip is exercised
    assert not np.allclose(single[0]["params"]["w_in"], params["w_in"], **TOL)  # the step moves
    for name, other in (("gspmd", gspmd), ("shard_map", sharded)):
        flat, tree = jax.tree_util.tree_flatten_with_path(single)
        other_flat, other_tree = jax.tree.flatten(other)
        assert tree == other_tree, name
        for (path, expected), actual in zip(flat, other_flat, strict=True):
            np.testing.assert_allclose(
                np.asarray(actual),
                np.asarray(expected),
                err_msg=f"{name} {jax.tree_util.keystr(path)}",
                **TOL,
            )
