"""The RL stage: the policy (from an SFT model) against a reward, with a KL penalty to the frozen reference;
any online algorithm of `train.RLConfig` (ppo, pg, grpo, rloo, reinforce_pp; rebel, dpo, ipo on best /
worst pairs: `preference.run_online_pairs`), with DAPO's dynamic sampling for the grouped ones.

The reward is a learned reward model (`LearnedReward`: scored inside one jitted program per iteration,
`policy_programs.make_iteration`, normalised by `reward_norm`) or a host function of the rollout
(`HostReward`, e.g. VADER on the decoded text: a sampler program, the host's scores, a learner program).
"reference_mean" subtracts the mean score of the reward stage's reference rows; "policy_gain_bias" applies
Ziegler et al.'s gain and bias on samples of the initial policy; "none" keeps the raw scores. An
unfinished response scores rl.no_eos_penalty when it is set. For ppo the value model starts as the reward
model with the normalisation folded into its head (`value_from` "reward_model"), or as the initial
policy's trunk with a zero head ("policy"). Held-out reward and KL (per token and per sequence) on fixed
prompts with fixed keys every eval_every iterations, with samples as text in <out>/<stage>_samples.jsonl;
<out>/<stage>_initial_eval.json holds the initial policy's numbers.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath

from jaxrlhf import losses, models, parallel, train
from jaxrlhf.engine import checkpoint, flags, loop
from jaxrlhf.rollout import SampleConfig, pairs, scoring
from jaxrlhf.stages import batches, handoff, policy_programs
from jaxrlhf.stages.batches import PromptAnswers
from jaxrlhf.stages.handoff import HostReward, LearnedReward, StageError, StageRun
from jaxrlhf.stages.setup import Setup
from jaxrlhf.train.rl_config import RLConfig, inactive_fields
from jaxrlhf.validate import check_at_least, check_range

REWARD_NORMS = ("reference_mean", "policy_gain_bias", "none")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RLStageConfig:
    """RL of the policy against a reward with a KL penalty to the reference (its algorithm: `algo`).

    Attributes:
      iterations: rollout + update rounds.
      batch_size: global rollouts (answers) per iteration, split into minibatches; with group_size K,
        batch_size / K prompts with K answers each.
      temperature: sampling temperature of the rollouts; the policy scored and optimised is the
        tempered one, log_softmax(logits / T), as in lm-human-preferences and TRL.
      top_k: top-k filter of the rollouts (0 = off).
      top_p: nucleus filter of the rollouts (1.0 = off).
      eval_every: reward / KL on held-out and on training prompts every this many iterations (and
        before the first, at the end); 0 = at the end only.
      eval_batches: batches (of batch_size prompts) per evaluation, of each prompt set; 0 = no evaluation.
      sample_every: write training samples every this many iterations (0 = never).
      samples_logged: samples written per evaluation / sample step.
      ckpt_every: checkpoint every this many iterations (and at the end).
      log_every: write metrics every this many iterations.
      optim: AdamW settings of the policy (and of the value model, but for its lr); each model has its
        own optimizer and gradient clipping; total_steps None means iterations x epochs x minibatches.
      value_lr: peak learning rate of the value model (None: optim.lr; ppo only).
      value_from: where ppo's value model starts: "reward_model" (the reward model with the normalisation
        folded into its head, InstructGPT) or "policy" (the initial policy's trunk with a zero head, as
        minRLHF; the only choice with a host reward).
      reward_norm: how raw reward-model scores become the reward: "reference_mean" subtracts the mean
        score of the reward stage's norm_rows reference rows (the SFT data), so they score 0 on average
        (Stiennon et al. 2020, "Learning to summarize from human feedback"; Huang et al. 2024, "The
        N+ Implementation Details of RLHF with PPO"; the default KL 0.05 and no-EOS penalty -1 are on
        this scale); "policy_gain_bias" applies the gain and bias that give samples of the initial (SFT)
        policy mean 0 and std 1 (Ziegler et al. 2019, "Fine-Tuning Language Models from Human
        Preferences"), measured on norm_prompts training prompts at this stage's sampling settings;
        "none" keeps the raw scores (the only choice with a host reward).
      norm_prompts: training prompts sampled for "policy_gain_bias".
      dynamic_sampling_rounds: DAPO's dynamic sampling (Yu et al. 2025, section 3.2) for the grouped
        algorithms (grpo, rloo, reinforce_pp with a group) with a host reward: groups whose answers all
        score the same carry no gradient, so they are dropped and up to this many extra rounds of
        batch_size / group_size fresh prompts are sampled until the batch is full of groups that differ;
        if it is still short, tied groups fill it (counted in "dynamic_filled_groups"). 0 = off.
      rl: the algorithm and its settings (`train.RLConfig`; its flags have this stage's prefix:
        --rl.algo, --rl.kl_coef, ...); rl.kl_target set = adaptive KL; rl.ptx_coef > 0 adds PPO-ptx's LM
        loss on a batch_size batch of the pipeline's ptx text.
    """

    iterations: int = 1000
    batch_size: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    eval_every: int = 50
    eval_batches: int = 2
    sample_every: int = 10
    samples_logged: int = 4
    ckpt_every: int = 100
    log_every: int = 1
    optim: train.OptimConfig = train.optim_field(
        lr=1e-5, schedule="linear", min_lr_ratio=0.0, weight_decay=0.0
    )
    value_lr: float | None = None
    value_from: Literal["reward_model", "policy"] = "reward_model"
    reward_norm: Literal["reference_mean", "policy_gain_bias", "none"] = "reference_mean"
    norm_prompts: int = 256
    dynamic_sampling_rounds: int = 0
    rl: RLConfig = dataclasses.field(
        default_factory=lambda: RLConfig(kl_coef=0.05, minibatches=4, no_eos_penalty=-1.0),
        metadata=flags.FLATTEN,
    )

    def __post_init__(self):
        check_at_least(self, 1, "iterations", "batch_size", "norm_prompts", "log_every")
        check_at_least(self, 0, "eval_every", "eval_batches", "sample_every", "samples_logged", "ckpt_every",
                       "dynamic_sampling_rounds")  # fmt: skip
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature={self.temperature}; use a finite value >= 0 (0 = greedy)")
        if not self.top_k >= 0:
            raise ValueError(f"top_k={self.top_k}; use 0 (off) or a positive k")
        check_range(self, "top_p", 0.0, 1.0, low_open=True)
        if self.value_lr is not None and not self.value_lr > 0:
            raise ValueError(f"value_lr={self.value_lr}; use a positive learning rate, or none (optim.lr)")
        rl = self.rl
        if self.dynamic_sampling_rounds and (rl.pair_algo or not rl.group_size):
            raise ValueError(
                f"dynamic_sampling_rounds={self.dynamic_sampling_rounds} drops groups of equal scores: it "
                "acts for grpo, rloo and reinforce_pp with a group_size; drop it"
            )
        if rl.group_size and self.batch_size % rl.group_size:
            raise ValueError(
                f"batch_size={self.batch_size} is not a whole number of groups of group_size "
                f"{rl.group_size}; make it a multiple"
            )
        if rl.pair_algo:
            if self.temperature == 0:
                raise ValueError(
                    "temperature=0 (greedy) makes the group_size answers of a prompt identical, so "
                    f"{rl.algo} never has a pair: use a temperature > 0"
                )
            n_pairs = self.batch_size // rl.group_size  # one pair per prompt at most
            if n_pairs % rl.minibatches:
                raise ValueError(
                    f"minibatches={rl.minibatches} must divide the {n_pairs} pairs of an iteration "
                    f"(batch_size={self.batch_size} / group_size={rl.group_size}, one pair per prompt)"
                )
            return
        if self.temperature == 0:
            raise ValueError("temperature=0 (greedy) has no stochastic policy to optimise; sample at T > 0")
        minibatches = 1 if rl.algo == "pg" else rl.minibatches  # pg: one update on the whole batch
        if self.batch_size % minibatches:
            raise ValueError(
                f"batch_size={self.batch_size} is not divisible by minibatches={rl.minibatches}; change one"
            )
        rows = self.batch_size // minibatches
        if rows % rl.micro_batches:
            split = f"batch_size={self.batch_size}" + (
                f" / minibatches={rl.minibatches}" if minibatches > 1 else ""
            )
            raise ValueError(
                f"micro_batches={rl.micro_batches} must divide an update's {rows} rows ({split}); "
                "micro_batches=1 runs each update whole"
            )

    def sample_config(self, tokenizer, response_len: int) -> SampleConfig:
        """The sampler settings of the rollouts (the tokenizer's stop ids end a response)."""
        return SampleConfig(
            max_new_tokens=response_len, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
            eos_id=tokenizer.eos_id, stop_ids=tuple(tokenizer.stop_ids), pad_id=tokenizer.pad_id,
        )  # fmt: skip


def inactive_flags(pcfg: RLStageConfig, given, prefix: str = "--rl") -> list[str]:
    """The flags among `given` (field paths under this stage's config, e.g. ("rl", "kl_target")) that
    would do nothing with its algorithm / normalisation, spelled with the stage's flag `prefix`."""
    algo = pcfg.rl.algo
    rl_given = [path[1] for path in given if path[:1] == ("rl",) and len(path) == 2]
    bad = [f"{prefix}.{name}" for name in inactive_fields(algo, rl_given)]
    grouped = bool(pcfg.rl.group_size) and not pcfg.rl.pair_algo
    for name, acts in (("value_lr", algo == "ppo"), ("value_from", algo == "ppo"),
                       ("norm_prompts", pcfg.reward_norm == "policy_gain_bias"),
                       ("dynamic_sampling_rounds", grouped)):  # fmt: skip
        if (name,) in given and not acts:
            bad.append(f"{prefix}.{name}")
    return bad


def inactive_line(cfg, given) -> str:
    """A pipeline's `recipe.Recipe.inactive` for its RL stage (the config's `rl` field): "" or one line
    naming the --rl.* flags among `given` (field paths) that would do nothing."""
    bad = inactive_flags(cfg.rl, [path[1:] for path in given if path[:1] == ("rl",)])
    if not bad:
        return ""
    verb, pronoun = ("does", "it") if len(bad) == 1 else ("do", "them")
    norm = f" and --rl.reward_norm {cfg.rl.reward_norm}" if "--rl.norm_prompts" in bad else ""
    return f"{', '.join(bad)} {verb} nothing under --rl.algo {cfg.rl.rl.algo}{norm}: drop {pronoun}"


def make_rl_optimizer(pcfg: RLStageConfig, n_updates: int) -> optax.GradientTransformation:
    """Separate AdamW (and gradient clipping) for the policy and the value model, as in InstructGPT:
    one global-norm clip over both would let the value loss's large early gradients scale the policy's
    updates down by orders of magnitude."""
    optim = dataclasses.replace(pcfg.optim, total_steps=pcfg.optim.total_steps or n_updates)
    value_optim = dataclasses.replace(optim, lr=pcfg.value_lr or optim.lr)
    return train.make_per_model_optimizer({"policy": optim, "value": value_optim})


class SampleLog:
    """Sampled responses as JSONL at `path` (local or gs://), rewritten whole on each write (it stays
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
        if handoff.main_process():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("".join(json.dumps(r) + "\n" for r in self.records))


def sample_records(tokenizer, rollout, scores, n: int, answer_key: str = "answer", **fields) -> list[dict]:
    """The first `n` rows of a host rollout as readable records (the response under `answer_key`)."""
    out = []
    for i in range(min(n, len(rollout.prompt))):
        out.append(
            {
                **fields,
                "prompt": tokenizer.decode(rollout.prompt[i][rollout.prompt_mask[i]]),
                answer_key: tokenizer.decode(rollout.response[i][rollout.response_mask[i]], stop_at_eos=True),
                "finished": bool(rollout.finished[i]),
                "score": float(scores[i]),  # the reward (normalised); RL used the penalty if not finished
            }
        )
    return out


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


def stage_keys(run: StageRun) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(the steps' root key, the evaluations' key, the policy_gain_bias samples' key): `run.root_key` and
    two keys folded from it, or `run.aux_keys` when the pipeline fixed them."""
    if run.aux_keys is not None:
        return run.root_key, run.aux_keys[0], run.aux_keys[1]
    return (
        run.root_key,
        jax.random.fold_in(run.root_key, 1 << 30),
        jax.random.fold_in(run.root_key, (1 << 30) + 1),
    )


def run_rl_stage(
    setup: Setup,
    pcfg: RLStageConfig,
    run: StageRun,
    *,
    prompts: PromptAnswers,
    val: PromptAnswers,
    policy: dict,
    reward: LearnedReward | HostReward,
    response_len: int,
    ptx_rows: PromptAnswers | None = None,
    answer_key: str = "answer",
    summary: dict | None = None,
) -> loop.StageResult:
    """Run (or resume) the stage; writes <out>/<stage>/, <stage>.jsonl, <stage>_samples.jsonl,
    <stage>_initial_eval.json (with evaluation) and (when it ran steps) <stage>_summary.json.

    Args:
      setup: the run's setup (`model_cfg.compute_dtype` bfloat16: the frozen models are kept in bf16).
      pcfg: this stage's config.
      run: where and how it runs (`stage_keys`).
      prompts: training prompts; at least batch_size / group_size rows.
      val: held-out prompts (evaluated with fixed keys).
      policy: the initial policy and frozen reference params (the SFT model's, float32).
      reward: a LearnedReward or a HostReward.
      response_len: R, the most tokens sampled per response.
      ptx_rows: PPO-ptx's text ([prompt | answer] rows, every real token a target); None: `prompts`.
      answer_key: the name of the response in the sample records.
      summary: extra fields of the summary file.

    Returns:
      The StageResult.
    """
    rl_cfg = pcfg.rl.resolved()
    learned = isinstance(reward, LearnedReward)
    if not learned and (pcfg.reward_norm != "none" or (pcfg.value_from != "policy" and rl_cfg.algo == "ppo")):
        raise ValueError("a host reward has no reward model: use reward_norm 'none' and value_from 'policy'")
    if learned and pcfg.dynamic_sampling_rounds:
        raise ValueError(
            "dynamic_sampling_rounds needs a host reward (a verifier or a text score): a reward model's "
            "iteration is one fused program; drop it"
        )
    if rl_cfg.pair_algo:
        from jaxrlhf.stages import preference  # noqa: PLC0415  (it builds on this module's configs)

        return preference.run_online_pairs(setup, pcfg, run, prompts=prompts, policy=policy, reward=reward,
                                           response_len=response_len, summary=summary)  # fmt: skip
    mesh = setup.mesh
    policy_cfg = dataclasses.replace(setup.model_cfg, embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0)
    bf16 = setup.model_cfg.compute_dtype == "bfloat16"
    frozen_cfg = dataclasses.replace(policy_cfg, param_dtype="bfloat16") if bf16 else policy_cfg
    k_steps, k_eval, k_norm = stage_keys(run)
    frozen = batches.to_bf16 if bf16 else (lambda tree: tree)
    ref_params = parallel.put(frozen(policy), mesh)
    rm_frozen = parallel.put(frozen(reward.params), mesh) if learned else None

    group = rl_cfg.group_size or 1
    n_prompts, batch_size = len(prompts.prompt), pcfg.batch_size
    tx = make_rl_optimizer(pcfg, pcfg.iterations * policy_programs.updates_per_iteration(rl_cfg))
    sample_cfg = pcfg.sample_config(setup.tokenizer, response_len)
    # The step run_stage resumes from: the newest good checkpoint (it sets damaged newer ones aside).
    resume_from = checkpoint.latest_good_step(run.out, run.stage)[0] if run.resume else None
    evaluate = policy_programs.jit_evaluate(
        policy_programs.make_evaluate(policy_cfg, sample_cfg, frozen_cfg, learned), mesh, policy, ref_params,
        rm_frozen,
    )  # fmt: skip

    def raw_eval(params, data: PromptAnswers, n: int, key, rows_of=None) -> list[tuple[dict, object]]:
        """evaluate over the first n rows of `data` (or rows `rows_of`), in batch_size batches on host."""
        out = []
        for b, (idx, valid) in enumerate(batches.eval_rows(n, batch_size)):
            idx = idx if rows_of is None else rows_of[idx]
            prompt, prompt_mask = batches.put_batch((data.prompt[idx], data.prompt_mask[idx]), mesh)
            rows, rollout = parallel.to_host(
                evaluate(params, ref_params, rm_frozen, prompt, prompt_mask, jax.random.fold_in(key, b))
            )
            if not learned:
                rows["raw_score"] = np.asarray(reward.score(rollout), np.float32)
            out.append(({k: v[valid] for k, v in rows.items()}, rollout))
        return out

    saved = (
        checkpoint.restore_meta(run.out, run.stage, resume_from).get("reward_norm") if resume_from else None
    )
    if saved is not None:
        norm = saved  # the normalisation the run started with
    elif pcfg.reward_norm == "policy_gain_bias":
        # Samples of the initial policy at this stage's sampling settings on a fixed random subset of the
        # training prompts.
        n = min(pcfg.norm_prompts, n_prompts)
        rows_of = np.sort(np.random.default_rng([run.data_seed, 3]).permutation(n_prompts)[:n])
        initial = parallel.put(policy, mesh)  # float32 even when the frozen reference is bf16
        raw = np.concatenate([r["raw_score"] for r, _ in raw_eval(initial, prompts, n, k_norm, rows_of)])
        norm = policy_norm(raw, reward.reference)
        del initial
    else:
        norm = scoring.reference_norm(pcfg.reward_norm, reward.reference if learned else {})

    if rl_cfg.algo != "ppo":
        value = None
    elif pcfg.value_from == "reward_model":
        value = scoring.value_from_reward_model(reward.params, norm)
    else:  # the initial policy's trunk with a zero head: values start at 0
        value = {"gpt": policy, "head": models.init_scalar_head(jax.random.key(1), setup.model_cfg)}
    state = handoff.place_state(
        train.init_rl_state(train.init_rl_params(policy, value, rl_cfg), tx, rl_cfg), mesh
    )
    del value
    if learned:
        iteration = policy_programs.jit_iteration(
            policy_programs.make_iteration(policy_cfg, sample_cfg, tx, rl_cfg, norm, frozen_cfg), mesh, state,
            ref_params, rm_frozen,
        )  # fmt: skip
    else:
        sample = policy_programs.jit_sample(policy_cfg, sample_cfg, mesh, policy)
        learn = policy_programs.jit_learn(
            train.make_learn(policy_cfg, tx, rl_cfg, frozen_cfg, sample_cfg=sample_cfg),
            mesh,
            state,
            ref_params,
        )
    samples = SampleLog(run.out_path / f"{run.stage}_samples.jsonl", resume_from)
    position = {"iteration": resume_from or 0}
    ptx_rows = prompts if ptx_rows is None else ptx_rows

    def ptx_at(i: int):
        """PPO-ptx's batch of iteration i: batch_size rows of the ptx text, every real token a target;
        drawn apart from the RL prompts (another seed)."""
        if not rl_cfg.ptx_coef:
            return None
        batch = batches.lm_batch(
            ptx_rows, batches.train_rows(len(ptx_rows.prompt), batch_size, i, run.data_seed + 1)
        )
        return batches.put_batch(batch._replace(loss_mask=batch.mask), mesh)

    def group_prompts(i: int, seed: int):
        """batch_size / K prompts of iteration i, each K times in a row (the group baselines' layout),
        placed on the mesh."""
        idx = np.repeat(batches.train_rows(n_prompts, batch_size // group, i, seed), group)
        return batches.put_batch((prompts.prompt[idx], prompts.prompt_mask[idx]), mesh)

    def sample_scored(state, prompt, prompt_mask, key):
        """Sample a batch and score it on the host: (rollout, its host copy, [B] float32 scores,
        {"reward_host_s"})."""
        # Blocks on the sampler (and the update before it) first: the time is the host reward's alone.
        rollout = jax.block_until_ready(sample(state.params["policy"], prompt, prompt_mask, key))
        t0 = time.perf_counter()
        host = parallel.to_host(rollout)
        scores = np.asarray(reward.score(host), np.float32)
        return rollout, host, scores, {"reward_host_s": time.perf_counter() - t0}

    def dynamic_sampling(state, i, key, host, scores, extra):
        """DAPO's dynamic sampling: rounds of batch_size / group_size fresh prompts (up to
        dynamic_sampling_rounds more) until the batch can be filled with groups whose scores differ
        (`rollout.pairs.differing_groups`). With no tie it returns its input."""
        need = batch_size // group
        rounds, sampled = [host], [scores]
        rows, stats = pairs.differing_groups(sampled, group, need)
        while stats["filled_groups"] and len(rounds) <= pcfg.dynamic_sampling_rounds:
            r = len(rounds)
            prompt, prompt_mask = group_prompts(i, run.data_seed + 7919 * r)
            _, host, scores, more = sample_scored(state, prompt, prompt_mask, jax.random.fold_in(key, r))
            extra["reward_host_s"] += more["reward_host_s"]
            rounds.append(host)
            sampled.append(scores)
            rows, stats = pairs.differing_groups(sampled, group, need)
        host = jax.tree.map(lambda *xs: np.concatenate(xs)[rows], *rounds)
        all_scores = np.concatenate(sampled)
        extra.update(
            dynamic_rounds=float(len(rounds) - 1),
            dynamic_kept_fraction=float(stats["kept_fraction"]),
            dynamic_filled_groups=float(stats["filled_groups"]),
            reward_sampled=float(np.mean(all_scores)),
        )
        return batches.put_batch(host, mesh), all_scores[rows], extra

    def step_fn(state, i, key):
        prompt, prompt_mask = group_prompts(i, run.data_seed)
        if learned:
            state, metrics, (rollout, scores) = iteration(
                state, ref_params, rm_frozen, prompt, prompt_mask, key, ptx_at(i)
            )
        else:
            k_sample, k_learn = jax.random.split(key)
            rollout, host, scores, extra = sample_scored(state, prompt, prompt_mask, k_sample)
            if pcfg.dynamic_sampling_rounds:
                rollout, scores, extra = dynamic_sampling(state, i, k_sample, host, scores, extra)
            state, metrics = learn(
                state, ref_params, rollout, batches.put_batch(scores, mesh), k_learn, ptx_at(i)
            )
            metrics = {**metrics, **extra}
        position["iteration"] = i + 1
        if pcfg.sample_every and (i + 1) % pcfg.sample_every == 0:
            host_rollout, host_scores = parallel.to_host((rollout, scores))
            samples.write(sample_records(
                setup.tokenizer, host_rollout, host_scores, pcfg.samples_logged, answer_key, iteration=i + 1,
                split="train",
            ))  # fmt: skip
        return state, metrics

    def evaluate_prompts(state, data: PromptAnswers, split: str) -> dict:
        """Mean per-row metrics over the first eval_batches x batch_size prompts of `data`, sampled with
        the same keys at every evaluation, so that changes come from the policy alone."""
        n = min(len(data.prompt), pcfg.eval_batches * batch_size)
        if n == 0:
            return {}
        scored = [
            (policy_programs.score_rows(rows, norm, rl_cfg), rollout)
            for rows, rollout in raw_eval(state.params["policy"], data, n, k_eval)
        ]
        if split == "val":
            rows, rollout = scored[0]
            samples.write(sample_records(
                setup.tokenizer, rollout, rows["rm_score"], pcfg.samples_logged, answer_key,
                iteration=position["iteration"], split=split,
            ))  # fmt: skip
        keys = scored[0][0]
        return {f"{split}_{k}": float(np.mean(np.concatenate([r[k] for r, _ in scored]))) for k in keys}

    def eval_fn(state):
        return {**evaluate_prompts(state, val, "val"), **evaluate_prompts(state, prompts, "train")}

    evaluates = pcfg.eval_batches > 0
    initial_path = run.out_path / f"{run.stage}_initial_eval.json"  # the initial policy's numbers
    if evaluates and resume_from is None:
        handoff.write_json(initial_path, eval_fn(state))
    initial_eval = json.loads(initial_path.read_text()) if evaluates and initial_path.exists() else None
    result = loop.run_stage(
        **handoff.loop_args(run, setup, pcfg, root_key=k_steps, meta={"reward_norm": norm}),
        state=state, step_fn=step_fn, n_steps=pcfg.iterations, eval_fn=eval_fn if evaluates else None,
    )  # fmt: skip
    if result.history:
        handoff.write_json(
            run.out_path / f"{run.stage}_summary.json",
            {
                **result.summary,
                **(summary or {}),
                "algo": rl_cfg.algo,
                "train_prompts": n_prompts,
                "val_prompts": len(val.prompt),
                "reward_norm": norm,
                "initial_eval": initial_eval,
                "first": result.history[0],
                "last": result.history[-1],
            },
        )
    return result


def rl_state_init(setup: Setup, pcfg: RLStageConfig):
    """key -> the state this stage checkpoints: {"policy"[, "value"]} with the KL controller (ppo / pg /
    grpo / rloo), or the policy's TrainState (the pair algorithms)."""
    rl_cfg = pcfg.rl.resolved()
    mcfg = setup.model_cfg
    if rl_cfg.pair_algo:
        tx = train.make_optimizer(pcfg.optim)
        return lambda key: train.init_train_state(models.init_params(key, mcfg), tx)
    tx = make_rl_optimizer(pcfg, pcfg.iterations * policy_programs.updates_per_iteration(rl_cfg))

    def init(key):
        value = models.init_scalar_model(key, mcfg) if rl_cfg.algo == "ppo" else None
        return train.init_rl_state(
            train.init_rl_params(models.init_params(key, mcfg), value, rl_cfg), tx, rl_cfg
        )

    return init


def trained_policy(state, pcfg: RLStageConfig):
    """The policy params of this stage's state."""
    return state.params if pcfg.rl.pair_algo else state.params["policy"]


def restore_rl_inputs(setup: Setup, out: str, sft: tuple[str, int, object], rm: tuple[str, int, object]):
    """(SFT params, reward-model params, the reward stage's reference statistics) of finished stages.

    Args:
      setup: the run's setup.
      out: the run directory.
      sft, rm: (stage name, its steps, key -> its TrainState) of the SFT and reward stages.

    Raises:
      FileNotFoundError, StageError: a stage missing, unfinished, or without its reward_norm.
    """
    sft_state, _ = handoff.restore_finished(out, sft[0], sft[1], handoff.state_target(setup.mesh, sft[2]))
    rm_state, rm_meta = handoff.restore_finished(out, rm[0], rm[1], handoff.state_target(setup.mesh, rm[2]))
    if "reward_norm" not in rm_meta:
        raise StageError(
            f"the {rm[0]} checkpoint under {out} has no reward_norm: rerun --stages {rm[0]} --resume"
        )
    return sft_state.params, rm_state.params, rm_meta["reward_norm"]
