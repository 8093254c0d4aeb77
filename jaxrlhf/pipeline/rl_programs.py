"""The jitted programs of the RL stage and what they compute with: one iteration (sample, score, learn),
the evaluation (per-row reward and KL to the reference), the reward normalisations and the value model
that starts as the reward model. No I/O: `policy` runs them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf import losses, ops, parallel, rl, sampling, train
from jaxrlhf.config import ModelConfig, SampleConfig


def normalised_scores(rm_params, rollout: sampling.Rollout, cfg: ModelConfig, norm: dict) -> jax.Array:
    """gain * (RM score of prompt + response at its last real token) + bias: [B] float32."""
    scores = train.sequence_scores(rm_params, rollout.tokens, rollout.mask, cfg)
    return norm["gain"] * scores + norm["bias"]


def with_no_eos_penalty(scores, finished, rl_cfg: rl.RLConfig):
    """Scores with an unfinished response's replaced by the penalty, as rl.make_experience does. [B]"""
    if rl_cfg.no_eos_penalty is None:
        return scores
    return jnp.where(finished, scores, rl_cfg.no_eos_penalty)


def value_from_reward_model(rm_params, norm: dict):
    """The reward model with gain * score + bias folded into its linear head."""
    head = rm_params["head"]
    kernel = head["kernel"] * norm["gain"]
    bias = head["bias"] * norm["gain"] + norm["bias"]
    return {"gpt": rm_params["gpt"], "head": {"kernel": kernel, "bias": bias}}


def reference_norm(kind: str, reference: dict) -> dict:
    """The normalisation of reward_norm "reference_mean" or "none", from the RM stage's
    statistics of reference-row scores ({"mean", "std", "rows"})."""
    bias = -reference["mean"] if kind == "reference_mean" else 0.0
    return {"kind": kind, "gain": 1.0, "bias": float(bias), "reference": reference}


def policy_norm(raw_scores: np.ndarray, reference: dict) -> dict:
    """Ziegler et al.'s gain and bias: gain * s + bias has mean 0 and std 1 over `raw_scores`, the RM
    scores of samples of the initial policy (losses.reward_gain_bias)."""
    gain, bias = losses.reward_gain_bias(jnp.asarray(raw_scores, jnp.float32))
    return {
        "kind": "policy_gain_bias",
        "gain": float(gain),
        "bias": float(bias),
        "policy_mean": float(np.mean(raw_scores)),
        "policy_std": float(np.std(raw_scores)),
        "policy_samples": int(len(raw_scores)),
        "reference": reference,
    }


def make_iteration(cfg: ModelConfig, sample_cfg: SampleConfig, tx, rl_cfg: rl.RLConfig, norm, frozen_cfg):
    """iteration(state, ref_params, rm_params, prompt, prompt_mask, key, ptx) -> (state, metrics,
    (rollout, scores)): sample, score, learn in one program; `ptx` is the PPO-ptx LMBatch or None.

    This is `rl.make_fused_iteration` with the reward model's params as an argument: its `reward_fn`
    closure would bake the RM weights into the compiled program as constants (unshardable, slow to
    compile at GPT-2 sizes).
    """
    learn = rl.make_learn(cfg, tx, rl_cfg, frozen_cfg, sample_cfg=sample_cfg)

    def iteration(state, ref_params, rm_params, prompt, prompt_mask, key, ptx=None):
        k_sample, k_learn = jax.random.split(key)
        rollout = sampling.sample_fn(state.params["policy"], prompt, prompt_mask, cfg, sample_cfg, k_sample)
        scores = normalised_scores(rm_params, rollout, frozen_cfg, norm)  # [B]
        state, metrics = learn(state, ref_params, rollout, scores, key=k_learn, ptx=ptx)
        # The sequence reward RL maximises: "reward" (from rl) is the RM score alone.
        metrics["score"] = jnp.mean(with_no_eos_penalty(scores, rollout.finished, rl_cfg))
        return state, metrics, (rollout, scores)

    return iteration


def make_evaluate(cfg: ModelConfig, sample_cfg: SampleConfig, frozen_cfg):
    """evaluate(policy, ref_params, rm_params, prompt, prompt_mask, key) -> (per-row metrics, rollout).

    Per row: the raw RM score (`score_rows` normalises it on the host), the sequence KL
    sum_t log pi(y_t) - log pi_ref(y_t) (k1) of the sampled response and that over its length (per
    token), whether it ended, its length.
    """

    def evaluate(policy, ref_params, rm_params, prompt, prompt_mask, key):
        rollout = sampling.sample_fn(policy, prompt, prompt_mask, cfg, sample_cfg, key)
        raw = train.sequence_scores(rm_params, rollout.tokens, rollout.mask, frozen_cfg)  # [B]
        r = rollout.response.shape[1]
        # Both tempered, as in training: rollout.logprobs are log_softmax(logits / T) of the policy.
        ref_logprobs, _ = rl.response_logprobs(
            ref_params, rollout.tokens, rollout.mask, r, frozen_cfg, sample_cfg=sample_cfg
        )
        kl = losses.kl_penalty(rollout.logprobs, ref_logprobs, "k1")  # [B, R]
        seq_kl = ops.masked_sum(kl, rollout.response_mask, axis=-1)  # [B]
        rows = {
            "raw_score": raw,
            "kl": seq_kl,
            "kl_per_token": seq_kl / jnp.maximum(rollout.response_length, 1).astype(jnp.float32),
            "finished": rollout.finished.astype(jnp.float32),
            "length": rollout.response_length.astype(jnp.float32),
        }
        return rows, rollout

    return evaluate


def score_rows(rows: dict, norm: dict, rl_cfg: rl.RLConfig) -> dict:
    """Host rows of `evaluate` with "rm_score" (normalised) and "score" (what RL maximises: the
    normalised score, or the no-EOS penalty for a response that did not end) added."""
    rm_score = norm["gain"] * rows["raw_score"] + norm["bias"]
    score = with_no_eos_penalty(rm_score, rows["finished"] > 0, rl_cfg)
    return {**rows, "rm_score": rm_score, "score": np.asarray(score)}


def updates_per_iteration(rl_cfg: rl.RLConfig) -> int:
    """Optimizer steps of one iteration: epochs x minibatches, one for pg."""
    return 1 if rl_cfg.algo == "pg" else rl_cfg.epochs * rl_cfg.minibatches


def jit_programs(iteration, evaluate, mesh, state, ref_params, rm_params):
    """`iteration` and `evaluate` jitted once for `mesh` (`jit_iteration`, `jit_evaluate`)."""
    return (
        jit_iteration(iteration, mesh, state, ref_params, rm_params),
        jit_evaluate(evaluate, mesh, state.params["policy"], ref_params, rm_params),
    )


def jit_iteration(iteration, mesh, state, ref_params, rm_params):
    """The train state, reference and reward model sharded by parallel.tree_shardings (FSDP over the
    mesh's fsdp axis, else replicated), prompts, the ptx batch and per-row outputs split over every
    device, the key and metrics replicated, the state donated."""
    shard, batch_sh, rep = parallel.tree_shardings, parallel.batch_sharding(mesh), parallel.replicated(mesh)
    state_sh, ref_sh, rm_sh = shard(state, mesh), shard(ref_params, mesh), shard(rm_params, mesh)
    return jax.jit(
        iteration,
        in_shardings=(state_sh, ref_sh, rm_sh, batch_sh, batch_sh, rep, batch_sh),
        out_shardings=(state_sh, rep, batch_sh),
        donate_argnums=(0,),
    )


def jit_evaluate(evaluate, mesh, policy, ref_params, rm_params):
    """`evaluate` with the shardings of `jit_iteration`; `policy` gives the policy params' tree."""
    shard, batch_sh, rep = parallel.tree_shardings, parallel.batch_sharding(mesh), parallel.replicated(mesh)
    policy_sh, ref_sh, rm_sh = shard(policy, mesh), shard(ref_params, mesh), shard(rm_params, mesh)
    return jax.jit(
        evaluate,
        in_shardings=(policy_sh, ref_sh, rm_sh, batch_sh, batch_sh, rep),
        out_shardings=(batch_sh, batch_sh),
    )
