"""Stage 3: RL of the SFT policy against the reward model, with a KL penalty to SFT.

    python -m experiments.tldr.ppo --model gpt2 --out runs/tldr [--resume] [--bf16] [--mesh-fsdp N]

One iteration is one jitted program over every device (`make_iteration`): sample summaries of a batch
of training prompts, score [prompt | summary] with the reward model at its last real token (the
end-of-text), normalised by --ppo.reward_norm (by default minus the mean score of reference summaries),
replace the score of a summary without end-of-text by --ppo.rl.no_eos_penalty, then jaxrlhf.rl's learn.
--ppo.rl.algo ppo (default): per-token KL to the frozen SFT model in the reward (fixed beta, or adaptive
with --ppo.rl.kl_target), GAE, whitened advantages and --ppo.rl.epochs x --ppo.rl.minibatches clipped
PPO updates of policy and value; the value model starts as the reward model with the normalisation
folded into its head, so its first values are on the scale of the rewards. pg: one policy-gradient
update on the reward-to-go. grpo / rloo: --ppo.rl.group_size summaries of each of batch_size /
group_size prompts, group-relative advantages, no value model. --ppo.rl.ptx_coef G adds PPO-ptx's
LM loss on training posts with their reference summaries. Held-out reward and KL every
--ppo.eval_every iterations, with sample summaries in <out>/ppo_samples.jsonl; metrics in
<out>/ppo.jsonl; <out>/ppo_summary.json at the end.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath

from experiments.tldr import common
from jaxrlhf import checkpoint, losses, ops, parallel, rl, runner, sampling, train
from jaxrlhf.config import ModelConfig, SampleConfig


def normalised_scores(rm_params, rollout: sampling.Rollout, cfg: ModelConfig, norm: dict) -> jax.Array:
    """gain * (RM score of prompt + response at its last real token) + bias: [B] float32."""
    scores = train.sequence_scores(rm_params, rollout.tokens, rollout.mask, cfg)
    return norm["gain"] * scores + norm["bias"]


def with_no_eos_penalty(scores, finished, rl_cfg: rl.RLConfig):
    """Scores with an unfinished summary's replaced by the penalty, as rl.make_experience does. [B]"""
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
    """The normalisation of --ppo.reward_norm "reference_mean" or "none", from the RM stage's
    statistics of reference-summary scores ({"mean", "std", "rows"})."""
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
    sum_t log pi(y_t) - log pi_ref(y_t) (k1) of the sampled summary, whether it ended, its length.
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
        rows = {
            "raw_score": raw,
            "kl": ops.masked_sum(kl, rollout.response_mask, axis=-1),
            "finished": rollout.finished.astype(jnp.float32),
            "length": rollout.response_length.astype(jnp.float32),
        }
        return rows, rollout

    return evaluate


def score_rows(rows: dict, norm: dict, rl_cfg: rl.RLConfig) -> dict:
    """Host rows of `evaluate` with "rm_score" (normalised) and "score" (what RL maximises: the
    normalised score, or the no-EOS penalty for a summary that did not end) added."""
    rm_score = norm["gain"] * rows["raw_score"] + norm["bias"]
    score = with_no_eos_penalty(rm_score, rows["finished"] > 0, rl_cfg)
    return {**rows, "rm_score": rm_score, "score": np.asarray(score)}


def make_rl_optimizer(pcfg: common.PPOConfig, n_updates: int) -> optax.GradientTransformation:
    """Separate AdamW (and gradient clipping) for the policy and the value model, as in InstructGPT:
    one global-norm clip over both would let the value loss's large early gradients scale the policy's
    updates down by orders of magnitude."""
    optim = dataclasses.replace(pcfg.optim, total_steps=pcfg.optim.total_steps or n_updates)
    value_optim = dataclasses.replace(optim, lr=pcfg.value_lr or optim.lr)
    return train.make_per_model_optimizer({"policy": optim, "value": value_optim})


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


class SampleLog:
    """Sampled summaries as JSONL at `path` (local or gs://), rewritten whole on each write (it stays
    small); on resume, records of iterations after the resumed one are dropped."""

    def __init__(self, path: epath.Path, resume_iteration: int | None):
        self.path, self.records = path, []
        if resume_iteration is not None and path.exists():
            for line in path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if record.get("iteration", 0) <= resume_iteration:
                    self.records.append(record)

    def write(self, records: list[dict]) -> None:
        self.records.extend(records)
        if common.main_process():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("".join(json.dumps(r) + "\n" for r in self.records))


def sample_records(tokenizer, rollout, scores, n: int, **fields) -> list[dict]:
    """The first `n` rows of a host rollout as readable records."""
    out = []
    for i in range(min(n, len(rollout.prompt))):
        out.append(
            {
                **fields,
                "prompt": tokenizer.decode(rollout.prompt[i][rollout.prompt_mask[i]]),
                "summary": tokenizer.decode(rollout.response[i][rollout.response_mask[i]], stop_at_eos=True),
                "finished": bool(rollout.finished[i]),
                "rm_score": float(scores[i]),  # normalised; PPO used the penalty instead if not finished
            }
        )
    return out


def run(setup: common.Setup) -> runner.StageResult:
    cfg, pcfg = setup.cfg, setup.cfg.ppo
    mesh = setup.mesh
    policy_cfg = dataclasses.replace(setup.model_cfg, embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0)
    frozen_cfg = dataclasses.replace(policy_cfg, param_dtype="bfloat16") if cfg.bf16 else policy_cfg
    group_size = pcfg.rl.group_size or 1
    flag = "--ppo.batch_size" if group_size == 1 else "--ppo.batch_size / --ppo.rl.group_size"
    prompts, val = common.load_summaries(setup, need=(pcfg.batch_size // group_size, flag))
    root = jax.random.fold_in(jax.random.key(cfg.seed), 3)
    k_steps, k_eval, k_norm = jax.random.split(root, 3)

    sft, _ = common.restore_finished(setup, "sft", common.state_target(setup, common.sft_state_init(setup)))
    rm_state, rm_meta = common.restore_finished(
        setup, "rm", common.state_target(setup, common.rm_state_init(setup))
    )
    if "reward_norm" not in rm_meta:
        raise common.StageError(
            f"the rm checkpoint under {cfg.out} has no reward_norm: rerun --stages rm --resume"
        )
    reference = rm_meta["reward_norm"]  # statistics of reference-summary scores
    frozen = common.to_bf16 if cfg.bf16 else (lambda tree: tree)
    ref_params = parallel.put(frozen(sft.params), mesh)
    rm_params = parallel.put(frozen(rm_state.params), mesh)

    rl_cfg, group = pcfg.rl, pcfg.rl.group_size or 1
    n_prompts, batch_size = len(prompts.prompt), pcfg.batch_size
    tx = make_rl_optimizer(pcfg, pcfg.iterations * updates_per_iteration(rl_cfg))
    sample_cfg = SampleConfig(
        max_new_tokens=cfg.data.max_summary_tokens,
        temperature=pcfg.temperature,
        top_k=pcfg.top_k,
        top_p=pcfg.top_p,
        eos_id=setup.tokenizer.eos_id,
        stop_ids=setup.tokenizer.stop_ids,  # e.g. an instruct model's end of turn too
        pad_id=setup.tokenizer.pad_id,
    )
    # The step run_stage resumes from: the newest good checkpoint (it sets damaged newer ones aside).
    resume_from = checkpoint.latest_good_step(cfg.out, "ppo")[0] if cfg.resume else None
    # The evaluator sees raw scores, so it is one program whatever the normalisation.
    evaluate = jit_evaluate(
        make_evaluate(policy_cfg, sample_cfg, frozen_cfg), mesh, sft.params, ref_params, rm_params
    )

    def raw_eval(policy, data: common.Summaries, n: int, key, rows_of=None) -> list[tuple[dict, object]]:
        """evaluate over the first n rows of `data` (or rows `rows_of`), in batch_size batches on host."""
        out = []
        for b, (idx, valid) in enumerate(common.eval_rows(n, batch_size)):
            idx = idx if rows_of is None else rows_of[idx]
            prompt, prompt_mask = common.put_batch((data.prompt[idx], data.prompt_mask[idx]), mesh)
            rows, rollout = parallel.to_host(
                evaluate(policy, ref_params, rm_params, prompt, prompt_mask, jax.random.fold_in(key, b))
            )
            out.append(({k: v[valid] for k, v in rows.items()}, rollout))
        return out

    saved_norm = (
        checkpoint.restore_meta(cfg.out, "ppo", resume_from).get("reward_norm") if resume_from else None
    )
    if saved_norm is not None:
        norm = saved_norm  # the normalisation the run started with
    elif pcfg.reward_norm == "policy_gain_bias":
        # Samples of the initial policy (the SFT model, at this stage's sampling settings) on a fixed
        # random subset of the training prompts.
        n = min(pcfg.norm_prompts, n_prompts)
        rows_of = np.sort(np.random.default_rng([cfg.data.seed, 3]).permutation(n_prompts)[:n])
        initial = parallel.put(sft.params, mesh)  # float32 even when the frozen reference is bf16
        raw = np.concatenate([r["raw_score"] for r, _ in raw_eval(initial, prompts, n, k_norm, rows_of)])
        norm = policy_norm(raw, reference)
        del initial
    else:
        norm = reference_norm(pcfg.reward_norm, reference)

    value = value_from_reward_model(rm_state.params, norm) if rl_cfg.algo == "ppo" else None
    params = rl.init_rl_params(sft.params, value, rl_cfg)
    state = parallel.put(rl.init_rl_state(params, tx, rl_cfg), mesh)
    del sft, rm_state, params, value
    iteration = jit_iteration(
        make_iteration(policy_cfg, sample_cfg, tx, rl_cfg, norm, frozen_cfg),
        mesh,
        state,
        ref_params,
        rm_params,
    )
    samples = SampleLog(epath.Path(cfg.out) / "ppo_samples.jsonl", resume_from)
    position = {"iteration": resume_from or 0}

    def ptx_at(i: int):
        """PPO-ptx's batch of iteration i: batch_size training posts with their reference summaries,
        every real token a target; drawn apart from the RL prompts (another seed)."""
        if not rl_cfg.ptx_coef:
            return None
        batch = common.lm_batch(prompts, common.train_rows(n_prompts, batch_size, i, cfg.data.seed + 1))
        return common.put_batch(batch._replace(loss_mask=batch.mask), mesh)

    def step_fn(state, i, key):
        # grpo / rloo: batch_size / K prompts, each K times in a row (rl's groups are consecutive rows).
        idx = np.repeat(common.train_rows(n_prompts, batch_size // group, i, cfg.data.seed), group)
        prompt, prompt_mask = common.put_batch((prompts.prompt[idx], prompts.prompt_mask[idx]), mesh)
        state, metrics, (rollout, scores) = iteration(
            state, ref_params, rm_params, prompt, prompt_mask, key, ptx_at(i)
        )
        position["iteration"] = i + 1
        if pcfg.sample_every and (i + 1) % pcfg.sample_every == 0:
            rollout, scores = parallel.to_host((rollout, scores))
            records = sample_records(
                setup.tokenizer, rollout, scores, pcfg.samples_logged, iteration=i + 1, split="train"
            )
            samples.write(records)
        return state, metrics

    def evaluate_prompts(state, data: common.Summaries, split: str) -> dict:
        """Mean per-row metrics over the first eval_batches x batch_size prompts of `data`, sampled with
        the same keys at every evaluation, so that changes come from the policy alone."""
        n = min(len(data.prompt), pcfg.eval_batches * batch_size)
        if n == 0:
            return {}
        batches = [(score_rows(rows, norm, rl_cfg), rollout) for rows, rollout in raw_eval(
            state.params["policy"], data, n, k_eval
        )]  # fmt: skip
        if split == "val":
            rows, rollout = batches[0]
            records = sample_records(
                setup.tokenizer, rollout, rows["rm_score"], pcfg.samples_logged,
                iteration=position["iteration"], split=split,
            )  # fmt: skip
            samples.write(records)
        keys = batches[0][0]
        return {f"{split}_{k}": float(np.mean(np.concatenate([r[k] for r, _ in batches]))) for k in keys}

    def eval_fn(state):
        return {**evaluate_prompts(state, val, "val"), **evaluate_prompts(state, prompts, "train")}

    initial_path = epath.Path(cfg.out) / "ppo_initial_eval.json"  # the SFT policy's held-out numbers
    if resume_from is None:
        common.write_json(initial_path, eval_fn(state))
    initial_eval = json.loads(initial_path.read_text()) if initial_path.exists() else None
    result = runner.run_stage(
        run_dir=cfg.out,
        stage="ppo",
        state=state,
        step_fn=step_fn,
        n_steps=pcfg.iterations,
        root_key=k_steps,
        resume=cfg.resume,
        meta={**common.stage_meta(cfg, "ppo"), "reward_norm": norm},
        ckpt_every=pcfg.ckpt_every,
        tokenizer=setup.tokenizer_path,
        eval_fn=eval_fn,
        eval_every=pcfg.eval_every,
        log_every=pcfg.log_every,
        progress=cfg.progress,
        stop_after=cfg.stop_after_for("ppo"),
    )
    if result.history:
        history = result.history
        common.write_json(
            epath.Path(cfg.out) / "ppo_summary.json",
            {
                **result.summary,
                "algo": rl_cfg.algo,
                "train_prompts": n_prompts,
                "val_prompts": len(val.prompt),
                "reward_norm": norm,
                "initial_eval": initial_eval,
                "first": history[0],
                "last": history[-1],
            },
        )
    return result


def main(argv=None) -> int:
    return common.main(run, argv, stages=["ppo"], description=__doc__, prog="python -m experiments.tldr.ppo")


if __name__ == "__main__":
    sys.exit(main())
