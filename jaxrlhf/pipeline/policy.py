"""The RL stage: the policy (from an SFT model) against a reward model, with a KL penalty to the frozen
SFT reference; any `jaxrlhf.rl` algorithm (ppo, pg, grpo, rloo: rl.algo).

One iteration is one jitted program over every device (`make_iteration`): sample responses to a batch of
training prompts, score [prompt | response] with the reward model at its last real token, normalised by
`reward_norm` ("reference_mean": minus the mean score of reference rows, from the reward stage;
"policy_gain_bias": Ziegler et al.'s gain and bias on samples of the initial policy; "none": raw), replace
the score of a response without a stop id by rl.no_eos_penalty, then jaxrlhf.rl's learn. For ppo the value
model starts as the reward model with the normalisation folded into its head. Held-out reward and KL (per
token and per sequence) on fixed prompts with fixed keys every eval_every iterations, with samples as text
in <out>/<stage>_samples.jsonl; <out>/<stage>_initial_eval.json holds the initial policy's numbers.
"""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import numpy as np
import optax
from etils import epath

from jaxrlhf import checkpoint, parallel, rl, runner, train
from jaxrlhf.config import SampleConfig, check_at_least
from jaxrlhf.pipeline import handoff
from jaxrlhf.pipeline.handoff import PromptAnswers, StageRun
from jaxrlhf.pipeline.rl_programs import (
    jit_evaluate,
    jit_iteration,
    make_evaluate,
    make_iteration,
    policy_norm,
    reference_norm,
    score_rows,
    updates_per_iteration,
    value_from_reward_model,
)
from jaxrlhf.pipeline.setup import Setup, StageError
from jaxrlhf.rl import FIELD_ALGOS, RLConfig, check_batch_split, inactive_fields

REWARD_NORMS = ("reference_mean", "policy_gain_bias", "none")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RLStageConfig:
    """RL (PPO, PG, GRPO or RLOO: rl.algo) against the normalised reward model with a KL penalty to SFT.

    Attributes:
      iterations: rollout + update rounds.
      batch_size: global rollouts per iteration (split into rl.minibatches); for grpo / rloo,
        batch_size / rl.group_size prompts with rl.group_size responses each.
      temperature: sampling temperature of the rollouts; the policy scored and optimised is the
        tempered one, log_softmax(logits / T), as in lm-human-preferences and TRL.
      top_k: top-k filter of the rollouts (0 = off).
      top_p: nucleus filter of the rollouts (1.0 = off).
      eval_every: reward / KL on held-out and on training prompts every this many iterations (and
        before the first, at the end).
      eval_batches: batches (of batch_size prompts) per evaluation, of each prompt set.
      sample_every: write training samples every this many iterations.
      samples_logged: samples written per evaluation / sample step.
      ckpt_every: checkpoint every this many iterations (and at the end).
      log_every: write metrics every this many iterations.
      optim: AdamW settings of the policy (and of the value model, but for its lr); each model has its
        own optimizer and gradient clipping; total_steps None means iterations x epochs x minibatches.
      value_lr: peak learning rate of the value model (None: optim.lr; ppo only).
      reward_norm: how raw reward-model scores become the reward: "reference_mean" subtracts the mean
        score of the reward stage's norm_rows reference rows (the SFT data), so they score 0 on average
        (Stiennon et al. 2020, "Learning to summarize from human feedback"; Huang et al. 2024, "The
        N+ Implementation Details of RLHF with PPO"; the default KL 0.05 and no-EOS penalty -1 are on
        this scale);
        "policy_gain_bias" applies the gain and bias that give samples of the initial (SFT) policy mean 0
        and std 1 (Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences";
        lm-human-preferences normalises its reward model so on samples of the reference policy),
        measured on norm_prompts training prompts at this stage's sampling settings; "none" keeps the
        raw scores.
      norm_prompts: training prompts sampled for "policy_gain_bias".
      rl: the RL / KL settings (jaxrlhf.rl.RLConfig); rl.kl_target set = adaptive KL; rl.ptx_coef > 0
        adds PPO-ptx's LM loss on a batch_size batch of training prompts with their reference answers
        (every token a target: the text the models were trained on stands in for InstructGPT's
        pretraining mix).
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
    optim: train.OptimConfig = dataclasses.field(
        default_factory=lambda: train.OptimConfig(
            lr=1e-5, schedule="linear", min_lr_ratio=0.0, weight_decay=0.0
        )
    )
    value_lr: float | None = None
    reward_norm: str = "reference_mean"
    norm_prompts: int = 256
    rl: RLConfig = dataclasses.field(
        default_factory=lambda: RLConfig(kl_coef=0.05, epochs=4, minibatches=4, no_eos_penalty=-1.0)
    )

    def __post_init__(self):
        if self.reward_norm not in REWARD_NORMS:
            raise ValueError(f"reward_norm={self.reward_norm!r}; use one of {', '.join(REWARD_NORMS)}")
        check_at_least(self, 1, "iterations", "batch_size", "eval_batches", "norm_prompts", "log_every")
        check_at_least(self, 0, "eval_every", "sample_every", "samples_logged", "ckpt_every")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature={self.temperature}; use a finite value >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k}; use 0 (off) or a positive k")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p}; use a value in (0, 1] (1 = off)")
        if self.value_lr is not None and not self.value_lr > 0:
            raise ValueError(f"value_lr={self.value_lr}; use a positive learning rate, or none (optim.lr)")
        if self.rl.group_size and self.batch_size % self.rl.group_size:
            raise ValueError(
                f"batch_size={self.batch_size} is not a whole number of groups of rl.group_size "
                f"{self.rl.group_size}; make it a multiple"
            )
        if self.rl.algo in FIELD_ALGOS["minibatches"] and self.batch_size % self.rl.minibatches:
            raise ValueError(
                f"batch_size={self.batch_size} is not divisible by rl.minibatches {self.rl.minibatches}; "
                "change one"
            )
        try:  # the micro-batches of each update too, as the update will check them
            check_batch_split(self.batch_size, self.rl)
        except ValueError as err:
            raise ValueError(f"batch_size={self.batch_size}: {err}") from None


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
                "rm_score": float(scores[i]),  # normalised; PPO used the penalty instead if not finished
            }
        )
    return out


def inactive_flags(pcfg: RLStageConfig, given, prefix: str) -> list[str]:
    """The flags among `given` (field paths under this stage's config, e.g. ("rl", "kl_target")) that
    would do nothing with its algorithm / normalisation, spelled with the stage's flag `prefix` ("--ppo")."""
    algo = pcfg.rl.algo
    rl_given = [path[1] for path in given if path[:1] == ("rl",) and len(path) == 2]
    bad = [f"{prefix}.rl.{name}" for name in inactive_fields(algo, rl_given)]
    if ("value_lr",) in given and algo != "ppo":
        bad.append(f"{prefix}.value_lr")
    if ("norm_prompts",) in given and pcfg.reward_norm != "policy_gain_bias":
        bad.append(f"{prefix}.norm_prompts")
    return bad


def run_rl_stage(
    setup: Setup,
    pcfg: RLStageConfig,
    run: StageRun,
    *,
    prompts: PromptAnswers,
    val: PromptAnswers,
    policy: dict,
    rm_params: dict,
    reference: dict,
    response_len: int,
    answer_key: str = "answer",
    summary: dict | None = None,
) -> runner.StageResult:
    """Run (or resume) the stage; writes <out>/<stage>/, <stage>.jsonl, <stage>_samples.jsonl,
    <stage>_initial_eval.json and (when it ran steps) <stage>_summary.json.

    Args:
      setup: the run's setup (`model_cfg.compute_dtype` bfloat16: the frozen models are kept in bf16).
      pcfg: this stage's config.
      run: where and how it runs.
      prompts: training prompts (answers: the PPO-ptx text); at least batch_size / group_size rows.
      val: held-out prompts (evaluated with fixed keys).
      policy: the initial policy and frozen reference params (the SFT model's, float32).
      rm_params: the reward model {"gpt", "head"}.
      reference: the reward stage's statistics of reference-row scores ({"mean", "std", "rows"}).
      response_len: R, the most tokens sampled per response.
      answer_key: the name of the response in the sample records.
      summary: extra fields of the summary file.

    Returns:
      The runner's StageResult.
    """
    mesh = setup.mesh
    policy_cfg = dataclasses.replace(setup.model_cfg, embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0)
    bf16 = setup.model_cfg.compute_dtype == "bfloat16"
    frozen_cfg = dataclasses.replace(policy_cfg, param_dtype="bfloat16") if bf16 else policy_cfg
    k_steps, k_eval, k_norm = jax.random.split(run.root_key, 3)
    frozen = handoff.to_bf16 if bf16 else (lambda tree: tree)
    ref_params = parallel.put(frozen(policy), mesh)
    rm_frozen = parallel.put(frozen(rm_params), mesh)

    rl_cfg, group = pcfg.rl, pcfg.rl.group_size or 1
    n_prompts, batch_size = len(prompts.prompt), pcfg.batch_size
    tx = make_rl_optimizer(pcfg, pcfg.iterations * updates_per_iteration(rl_cfg))
    sample_cfg = SampleConfig(
        max_new_tokens=response_len,
        temperature=pcfg.temperature,
        top_k=pcfg.top_k,
        top_p=pcfg.top_p,
        eos_id=setup.tokenizer.eos_id,
        stop_ids=setup.tokenizer.stop_ids,  # e.g. an instruct model's end of turn too
        pad_id=setup.tokenizer.pad_id,
    )
    # The step run_stage resumes from: the newest good checkpoint (it sets damaged newer ones aside).
    resume_from = checkpoint.latest_good_step(run.out, run.stage)[0] if run.resume else None
    # The evaluator sees raw scores, so it is one program whatever the normalisation.
    evaluate = jit_evaluate(
        make_evaluate(policy_cfg, sample_cfg, frozen_cfg), mesh, policy, ref_params, rm_frozen
    )

    def raw_eval(params, data: PromptAnswers, n: int, key, rows_of=None) -> list[tuple[dict, object]]:
        """evaluate over the first n rows of `data` (or rows `rows_of`), in batch_size batches on host."""
        out = []
        for b, (idx, valid) in enumerate(handoff.eval_rows(n, batch_size)):
            idx = idx if rows_of is None else rows_of[idx]
            prompt, prompt_mask = handoff.put_batch((data.prompt[idx], data.prompt_mask[idx]), mesh)
            rows, rollout = parallel.to_host(
                evaluate(params, ref_params, rm_frozen, prompt, prompt_mask, jax.random.fold_in(key, b))
            )
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
        norm = policy_norm(raw, reference)
        del initial
    else:
        norm = reference_norm(pcfg.reward_norm, reference)

    value = value_from_reward_model(rm_params, norm) if rl_cfg.algo == "ppo" else None
    state = parallel.put(rl.init_rl_state(rl.init_rl_params(policy, value, rl_cfg), tx, rl_cfg), mesh)
    del value
    iteration = jit_iteration(
        make_iteration(policy_cfg, sample_cfg, tx, rl_cfg, norm, frozen_cfg),
        mesh,
        state,
        ref_params,
        rm_frozen,
    )
    samples = SampleLog(run.out_path / f"{run.stage}_samples.jsonl", resume_from)
    position = {"iteration": resume_from or 0}

    def ptx_at(i: int):
        """PPO-ptx's batch of iteration i: batch_size training prompts with their reference answers,
        every real token a target; drawn apart from the RL prompts (another seed)."""
        if not rl_cfg.ptx_coef:
            return None
        batch = handoff.lm_batch(prompts, handoff.train_rows(n_prompts, batch_size, i, run.data_seed + 1))
        return handoff.put_batch(batch._replace(loss_mask=batch.mask), mesh)

    def step_fn(state, i, key):
        # grpo / rloo: batch_size / K prompts, each K times in a row (rl's groups are consecutive rows).
        idx = np.repeat(handoff.train_rows(n_prompts, batch_size // group, i, run.data_seed), group)
        prompt, prompt_mask = handoff.put_batch((prompts.prompt[idx], prompts.prompt_mask[idx]), mesh)
        state, metrics, (rollout, scores) = iteration(
            state, ref_params, rm_frozen, prompt, prompt_mask, key, ptx_at(i)
        )
        position["iteration"] = i + 1
        if pcfg.sample_every and (i + 1) % pcfg.sample_every == 0:
            rollout, scores = parallel.to_host((rollout, scores))
            records = sample_records(
                setup.tokenizer,
                rollout,
                scores,
                pcfg.samples_logged,
                answer_key,
                iteration=i + 1,
                split="train",
            )
            samples.write(records)
        return state, metrics

    def evaluate_prompts(state, data: PromptAnswers, split: str) -> dict:
        """Mean per-row metrics over the first eval_batches x batch_size prompts of `data`, sampled with
        the same keys at every evaluation, so that changes come from the policy alone."""
        n = min(len(data.prompt), pcfg.eval_batches * batch_size)
        if n == 0:
            return {}
        batches = [
            (score_rows(rows, norm, rl_cfg), rollout)
            for rows, rollout in raw_eval(state.params["policy"], data, n, k_eval)
        ]
        if split == "val":
            rows, rollout = batches[0]
            samples.write(sample_records(
                setup.tokenizer, rollout, rows["rm_score"], pcfg.samples_logged, answer_key,
                iteration=position["iteration"], split=split,
            ))  # fmt: skip
        keys = batches[0][0]
        return {f"{split}_{k}": float(np.mean(np.concatenate([r[k] for r, _ in batches]))) for k in keys}

    def eval_fn(state):
        return {**evaluate_prompts(state, val, "val"), **evaluate_prompts(state, prompts, "train")}

    initial_path = run.out_path / f"{run.stage}_initial_eval.json"  # the initial policy's numbers
    if resume_from is None:
        handoff.write_json(initial_path, eval_fn(state))
    initial_eval = json.loads(initial_path.read_text()) if initial_path.exists() else None
    result = runner.run_stage(
        run_dir=run.out,
        stage=run.stage,
        state=state,
        step_fn=step_fn,
        n_steps=pcfg.iterations,
        root_key=k_steps,
        resume=run.resume,
        meta={**run.meta, "reward_norm": norm},
        ckpt_every=pcfg.ckpt_every,
        tokenizer=setup.tokenizer_path,
        eval_fn=eval_fn,
        eval_every=pcfg.eval_every,
        log_every=pcfg.log_every,
        progress=run.progress,
        stop_after=run.stop_after,
    )
    if result.history:
        history = result.history
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
                "first": history[0],
                "last": history[-1],
            },
        )
    return result


def restore_rl_inputs(setup: Setup, out: str, sft: tuple[str, int, object], rm: tuple[str, int, object]):
    """(SFT params, reward-model params, the reward stage's reference statistics) of finished stages.

    Args:
      setup: the run's setup.
      out: the run directory.
      sft, rm: (stage name, its steps, key -> its TrainState) of the SFT and reward stages.

    Raises:
      FileNotFoundError, StageError: a stage missing, unfinished, or without its reward_norm.
    """
    sft_state, _ = handoff.restore_finished(out, sft[0], sft[1], handoff.state_target(setup, sft[2]))
    rm_state, rm_meta = handoff.restore_finished(out, rm[0], rm[1], handoff.state_target(setup, rm[2]))
    if "reward_norm" not in rm_meta:
        raise StageError(
            f"the {rm[0]} checkpoint under {out} has no reward_norm: rerun --stages {rm[0]} --resume"
        )
    return sft_state.params, rm_state.params, rm_meta["reward_norm"]
