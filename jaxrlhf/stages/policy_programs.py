"""The jitted programs of the RL stage: one iteration against a learned reward (sample, score, learn in one
program), the sampler and the learner of a host reward (scored between them), and the evaluation (per-row
reward and KL to the reference). No I/O: `policy` runs them. Every program takes the weights as arguments,
never as constants closed over (they would be baked into the compiled program: unshardable, slow to
compile at GPT-2 sizes)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf import losses, models, ops, parallel, train
from jaxrlhf.models import ModelConfig
from jaxrlhf.rollout import SampleConfig, sampler, scoring


def penalised(scores, finished, rl_cfg: train.RLConfig):
    """The scores RL maximises: an unfinished response's replaced by rl_cfg.no_eos_penalty, if set."""
    if rl_cfg.no_eos_penalty is None:
        return scores
    return scoring.penalise_unfinished(scores, finished, rl_cfg.no_eos_penalty)


def make_iteration(cfg: ModelConfig, sample_cfg: SampleConfig, tx, rl_cfg: train.RLConfig, norm, frozen_cfg):
    """iteration(state, ref_params, rm_params, prompt, prompt_mask, key, ptx) -> (state, metrics,
    (rollout, scores)): sample, score with the reward model, learn, in one program; `ptx` is the PPO-ptx
    LMBatch or None. `train.make_fused_iteration` with the reward model's params an argument."""
    learn = train.make_learn(cfg, tx, rl_cfg, frozen_cfg, sample_cfg=sample_cfg)

    def iteration(state, ref_params, rm_params, prompt, prompt_mask, key, ptx=None):
        k_sample, k_learn = jax.random.split(key)
        rollout = sampler.sample_fn(state.params["policy"], prompt, prompt_mask, cfg, sample_cfg, k_sample)
        scores = scoring.normalised_scores(rm_params, rollout, frozen_cfg, norm)  # [B]
        state, metrics = learn(state, ref_params, rollout, scores, key=k_learn, ptx=ptx)
        # The sequence reward RL maximises: "reward" (from train) is the RM score alone.
        metrics["score"] = jnp.mean(penalised(scores, rollout.finished, rl_cfg))
        return state, metrics, (rollout, scores)

    return iteration


def make_evaluate(cfg: ModelConfig, sample_cfg: SampleConfig, frozen_cfg, learned: bool):
    """evaluate(policy, ref_params, rm_params, prompt, prompt_mask, key) -> (per-row metrics, rollout).

    Per row: the sequence KL sum_t log pi(y_t) - log pi_ref(y_t) (k1) of the sampled response and that
    over its length (per token), whether it ended, its length; with a `learned` reward the raw RM score
    too (`score_rows` normalises it on the host; a host reward scores the rollout there).
    """

    def evaluate(policy, ref_params, rm_params, prompt, prompt_mask, key):
        rollout = sampler.sample_fn(policy, prompt, prompt_mask, cfg, sample_cfg, key)
        r = rollout.response.shape[1]
        # Both tempered, as in training: rollout.logprobs are log_softmax(logits / T) of the policy.
        ref_logprobs, _ = train.experience.response_logprobs(
            ref_params, rollout.tokens, rollout.mask, r, frozen_cfg, sample_cfg=sample_cfg
        )
        kl = losses.kl_penalty(rollout.logprobs, ref_logprobs, "k1")  # [B, R]
        seq_kl = ops.masked_sum(kl, rollout.response_mask, axis=-1)  # [B]
        rows = {
            "kl": seq_kl,
            "kl_per_token": seq_kl / jnp.maximum(rollout.response_length, 1).astype(jnp.float32),
            "finished": rollout.finished.astype(jnp.float32),
            "length": rollout.response_length.astype(jnp.float32),
        }
        if learned:
            rows["raw_score"] = models.sequence_scores(rm_params, rollout.tokens, rollout.mask, frozen_cfg)
        return rows, rollout

    return evaluate


def score_rows(rows: dict, norm: dict, rl_cfg: train.RLConfig) -> dict:
    """Host rows of `evaluate` (with "raw_score") and "rm_score" (normalised) and "score" (what RL
    maximises: the normalised score, or the no-EOS penalty for a response that did not end) added."""
    rm_score = norm["gain"] * rows["raw_score"] + norm["bias"]
    score = penalised(rm_score, rows["finished"] > 0, rl_cfg)
    return {**rows, "rm_score": rm_score, "score": np.asarray(score)}


def updates_per_iteration(rl_cfg: train.RLConfig) -> int:
    """Optimizer steps of one iteration: epochs x minibatches, one for pg."""
    rl_cfg = rl_cfg.resolved()
    return 1 if rl_cfg.algo == "pg" else rl_cfg.epochs * rl_cfg.minibatches


def jit_iteration(iteration, mesh, state, ref_params, rm_params):
    """The train state, reference and reward model sharded by parallel.tree_shardings (FSDP over the
    mesh's fsdp axis, else replicated), prompts, the ptx batch and per-row outputs split over every
    device, the key and metrics replicated, the state donated."""
    shard, batch_sh, rep = parallel.tree_shardings, parallel.batch_sharding(mesh), parallel.replicated(mesh)
    state_sh, ref_sh, rm_sh = shard(state, mesh), shard(ref_params, mesh), shard(rm_params, mesh)
    return jax.jit(
        parallel.on_mesh(iteration, mesh),
        in_shardings=(state_sh, ref_sh, rm_sh, batch_sh, batch_sh, rep, batch_sh),
        out_shardings=(state_sh, rep, batch_sh),
        donate_argnums=(0,),
    )


def jit_sample(cfg: ModelConfig, sample_cfg: SampleConfig, mesh, policy):
    """sample(policy, prompt, prompt_mask, key) -> rollout, the rows split over the mesh (a host
    reward's first program)."""
    batch_sh = parallel.batch_sharding(mesh)
    return jax.jit(
        parallel.on_mesh(
            lambda p, prompt, mask, key: sampler.sample_fn(p, prompt, mask, cfg, sample_cfg, key), mesh
        ),
        in_shardings=(parallel.tree_shardings(policy, mesh), batch_sh, batch_sh, parallel.replicated(mesh)),
        out_shardings=batch_sh,
    )


def jit_learn(learn, mesh, state, ref_params):
    """learn(state, ref_params, rollout, scores, key, ptx) -> (state, metrics) with the shardings of
    `jit_iteration` (a host reward's second program, after the host scored the rollout)."""
    shard, batch_sh, rep = parallel.tree_shardings, parallel.batch_sharding(mesh), parallel.replicated(mesh)
    state_sh = shard(state, mesh)

    def fn(state, ref_params, rollout, scores, key, ptx):
        with parallel.tracing_on(mesh):
            return learn(state, ref_params, rollout, scores, key=key, ptx=ptx)

    return jax.jit(
        fn,
        in_shardings=(state_sh, shard(ref_params, mesh), batch_sh, batch_sh, rep, batch_sh),
        out_shardings=(state_sh, rep),
        donate_argnums=(0,),
    )


def jit_evaluate(evaluate, mesh, policy, ref_params, rm_params):
    """`evaluate` with the shardings of `jit_iteration`; `policy` gives the policy params' tree."""
    shard, batch_sh, rep = parallel.tree_shardings, parallel.batch_sharding(mesh), parallel.replicated(mesh)
    policy_sh, ref_sh, rm_sh = shard(policy, mesh), shard(ref_params, mesh), shard(rm_params, mesh)
    return jax.jit(
        parallel.on_mesh(evaluate, mesh),
        in_shardings=(policy_sh, ref_sh, rm_sh, batch_sh, batch_sh, rep),
        out_shardings=(batch_sh, batch_sh),
    )
