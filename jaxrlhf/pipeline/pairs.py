"""The pair stages of an online preference pipeline (after `online`'s generate and score): a (best, worst)
pair per prompt after a length filter and deduplication (`filter_answers`), the pairs as a `PrefBatch`
(`pref_pairs`), and the update on that fixed pair set (`run_pair_stage`: REBEL's regression with several
passes per batch of pairs, DPO or IPO).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from jaxrlhf import model, parallel, preference, runner, train
from jaxrlhf.config import check_at_least
from jaxrlhf.pipeline import handoff
from jaxrlhf.pipeline.handoff import StageRun
from jaxrlhf.pipeline.setup import Setup, StageError

ALGOS = ("rebel", "dpo", "ipo")

# ------------------------------------------------------------------------------------------ filter


def content_lengths(response: np.ndarray, response_mask: np.ndarray, special_ids) -> np.ndarray:
    """[rows] answer lengths in tokens, not counting special tokens (a chat model's end-of-turn)."""
    special = np.isin(response, np.asarray(sorted(special_ids), dtype=response.dtype))
    return (response_mask & ~special).sum(-1)


def filter_answers(
    rows: Mapping[str, np.ndarray],
    rewards: np.ndarray,
    n: int,
    *,
    special_ids,
    max_answer_tokens: int | None,
    min_answer_tokens: int = 1,
) -> preference.PairSelection:
    """(best, worst) pairs of the written answers (`preference.select_pairs`, n answers per prompt in
    order): unfinished answers, answers longer than `max_answer_tokens` or shorter than
    `min_answer_tokens` (in tokens, special tokens not counted), repeats of an earlier answer to the same
    prompt, prompts with fewer than two answers left and prompts whose answers all tie are dropped and
    counted."""
    response, mask = rows["response"], rows["response_mask"]
    special = np.isin(response, np.asarray(sorted(special_ids), dtype=response.dtype))
    return preference.select_pairs(
        np.where(special, -1, response),  # special tokens neither count nor tell answers apart
        mask & ~special,
        rewards,
        n,
        max_answer_tokens=max_answer_tokens,
        min_answer_tokens=min_answer_tokens,
        finished=rows["finished"],
    )


def selection_stats(selection: preference.PairSelection) -> dict:
    """What the filter kept and dropped, as JSON numbers."""
    margin = selection.chosen_reward - selection.rejected_reward
    return {
        "prompts": selection.num_prompts,
        "pairs": selection.num_pairs,
        "dropped_unfinished": selection.num_unfinished,
        "dropped_too_long": selection.num_too_long,
        "dropped_too_short": selection.num_too_short,
        "dropped_duplicate": selection.num_duplicate,
        "skipped_too_few": selection.num_too_few,
        "skipped_tied": selection.num_tied,
        "mean_chosen_reward": float(selection.chosen_reward.mean()) if selection.num_pairs else None,
        "mean_rejected_reward": float(selection.rejected_reward.mean()) if selection.num_pairs else None,
        "mean_reward_margin": float(margin.mean()) if selection.num_pairs else None,
    }


def pref_pairs(rows: Mapping[str, np.ndarray], pairs: Mapping[str, np.ndarray], algo: str) -> train.PrefBatch:
    """The pairs as a host `train.PrefBatch` of every pair: the rows unchanged ([prompt | answer], loss
    on the answer), ref_logprobs pi_t's (REBEL: the policy that sampled) or the reference's (DPO / IPO)."""
    index = np.stack([pairs["chosen"], pairs["rejected"]], axis=1)  # [M, 2]
    prompt, prompt_mask = rows["prompt"][index], rows["prompt_mask"][index]
    response, response_mask = rows["response"][index], rows["response_mask"][index]
    ref = rows["policy_logprobs"] if algo == "rebel" else rows["ref_logprobs"]
    return train.PrefBatch(
        tokens=np.concatenate([prompt, response], axis=2).astype(np.int32),
        mask=np.concatenate([prompt_mask, response_mask], axis=2),
        loss_mask=np.concatenate([np.zeros_like(prompt_mask), response_mask], axis=2),
        ref_logprobs=ref[index].astype(np.float32),
        rewards=np.stack([pairs["chosen_reward"], pairs["rejected_reward"]], axis=1).astype(np.float32),
        pair_mask=np.ones(len(index), bool),
    )


# ------------------------------------------------------------------------------------------ update


@dataclasses.dataclass(frozen=True, kw_only=True)
class PairStageConfig:
    """The update on one iteration's fixed pair set.

    Attributes:
      algo: "rebel" (regress (1/eta) x the log-ratio difference to pi_t, the policy that sampled, onto
        the reward difference), "dpo" or "ipo" (against the frozen reference).
      eta: REBEL's scale: the optimum moves log pi/pi_t (y) - log pi/pi_t (y') to eta (r(y) - r(y')).
      beta: DPO / IPO's beta.
      kl_coef: REBEL's reward minus kl_coef x [log pi_t(y) - log pi_ref(y)] (the REBEL authors' KL
        regularisation; 0 = none), applied before the pairs are chosen.
      batch_size: pairs per step (global, a multiple of the data devices); the last batch is padded.
      epochs: passes over each batch of pairs.
      minibatches: updates per pass (batch_size must divide into them).
      log_every: write metrics every this many steps.
      ckpt_every: checkpoint every this many steps (and at the end).
      optim: AdamW settings; total_steps None means the number of steps x epochs x minibatches.
    """

    algo: str = "rebel"
    eta: float = 1.0
    beta: float = 0.1
    kl_coef: float = 0.0
    batch_size: int = 8
    epochs: int = 4
    minibatches: int = 1
    log_every: int = 1
    ckpt_every: int = 50
    optim: train.OptimConfig = dataclasses.field(
        default_factory=lambda: train.OptimConfig(
            lr=3e-7, warmup_steps=0, schedule="linear", min_lr_ratio=0.0, weight_decay=0.0
        )
    )

    def __post_init__(self):
        if self.algo not in ALGOS:
            raise ValueError(f"algo={self.algo!r}; use one of {', '.join(ALGOS)}")
        for name in ("eta", "beta"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)}; use a positive value")
        check_at_least(self, 0, "kl_coef", "ckpt_every")
        check_at_least(self, 1, "batch_size", "epochs", "minibatches", "log_every")
        if self.batch_size % self.minibatches:
            raise ValueError(
                f"batch_size={self.batch_size} is not divisible by minibatches {self.minibatches}; change one"
            )

    def steps(self, n_pairs: int) -> int:
        """Steps of a stage over `n_pairs` pairs: one per batch."""
        return -(-n_pairs // self.batch_size)

    def optimizer(self, n_pairs: int):
        updates = self.steps(n_pairs) * self.epochs * self.minibatches
        return train.make_optimizer(
            dataclasses.replace(self.optim, total_steps=self.optim.total_steps or updates)
        )


def make_pair_step(setup: Setup, pcfg: PairStageConfig, tx):
    """step(state, PrefBatch, *, key) of `pcfg.algo`: REBEL's `train.make_rebel_step`, or DPO / IPO updates
    in the same epochs x minibatches passes (`train.pair_passes_step`)."""
    mcfg = setup.model_cfg
    if pcfg.algo == "rebel":
        return train.make_rebel_step(mcfg, tx, eta=pcfg.eta, epochs=pcfg.epochs, minibatches=pcfg.minibatches)
    loss_type = "sigmoid" if pcfg.algo == "dpo" else "ipo"
    dpo = train.make_dpo_step(
        mcfg, tx, beta=pcfg.beta, loss_type=loss_type, average_logprobs=pcfg.algo == "ipo"
    )
    return train.pair_passes_step(
        lambda state, mb, key: dpo(state, mb, key=key), epochs=pcfg.epochs, minibatches=pcfg.minibatches
    )


def pair_state_init(setup: Setup, pcfg: PairStageConfig, n_pairs: int):
    """key -> the TrainState a pair stage of `n_pairs` pairs checkpoints (to restore it later)."""
    tx = pcfg.optimizer(max(n_pairs, 1))
    return lambda key: train.init_train_state(model.init_params(key, setup.model_cfg), tx)


def log_ratio_gaps(setup: Setup, params, pairs: train.PrefBatch, batch_size: int) -> np.ndarray:
    """[M] (log pi/pi_0 (chosen) - log pi/pi_0 (rejected)) of `params` against the pairs' ref_logprobs."""
    mcfg = setup.model_cfg

    def gap(params, batch):
        lp = train.pair_logprobs(params, batch, mcfg)
        ratio = lp - batch.ref_logprobs
        return ratio[:, 0] - ratio[:, 1]

    return handoff.evaluate_rows(
        handoff.jit_eval(gap, setup.mesh, params), params, pairs, batch_size, setup.mesh
    )


def run_pair_stage(
    setup: Setup,
    pcfg: PairStageConfig,
    run: StageRun,
    *,
    pairs: train.PrefBatch,
    params,
    summary: dict | None = None,
) -> runner.StageResult:
    """The update on a fixed pair set; writes <out>/<stage>/, <stage>.jsonl and <stage>_summary.json.

    The pairs are shuffled once (by run.data_seed) and cut into steps of `pcfg.batch_size` pairs (the
    last padded with pair_mask False); each step is `pcfg.epochs` passes of `pcfg.minibatches` updates.
    The summary reports the regression REBEL performs: over every pair, the log-ratio gap
    g = log pi/pi_t (chosen) - log pi/pi_t (rejected) before (0) and after the stage against its target
    eta (r(chosen) - r(rejected)), as the mean squared error and the correlation; for DPO / IPO the
    fraction of pairs whose implicit reward (the gap to the reference) orders them right.

    Raises:
      StageError: no pairs.
    """
    n_pairs = len(pairs.pair_mask)
    if n_pairs == 0:
        raise StageError(f"{run.stage}: no pairs to train on")
    mesh = setup.mesh
    order = np.random.default_rng(run.data_seed).permutation(n_pairs)
    pairs = handoff.subset(pairs, order)
    n_steps, b = pcfg.steps(n_pairs), pcfg.batch_size
    tx = pcfg.optimizer(n_pairs)
    state = parallel.put(train.init_train_state(params, tx), mesh)
    step = parallel.jit_step(make_pair_step(setup, pcfg, tx), mesh, state)

    def step_fn(state, i, key):
        idx = np.arange(i * b, (i + 1) * b)
        valid = idx < n_pairs
        batch = handoff.subset(pairs, np.where(valid, idx, 0))
        batch = batch._replace(pair_mask=batch.pair_mask & valid)
        return step(state, handoff.put_batch(batch, mesh), key)

    result = runner.run_stage(
        run_dir=run.out, stage=run.stage, state=state, step_fn=step_fn, n_steps=n_steps,
        root_key=run.root_key, resume=run.resume, meta=run.meta, ckpt_every=pcfg.ckpt_every,
        tokenizer=setup.tokenizer_path, log_every=pcfg.log_every, progress=run.progress,
        tokens_per_step=2 * b * pairs.tokens.shape[-1] * pcfg.epochs, stop_after=run.stop_after,
    )  # fmt: skip
    if not handoff.stage_finished(run.out, run.stage, n_steps) or not result.history:
        return result
    gap = log_ratio_gaps(setup, result.state.params, pairs, b)
    target = pcfg.eta * (pairs.rewards[:, 0] - pairs.rewards[:, 1])
    record = {**result.summary, **(summary or {}), "pairs": n_pairs, "algo": pcfg.algo}
    if pcfg.algo == "rebel":
        record["regression"] = {
            "mse_before": float(np.mean(target**2)),  # the gap is 0 at pi = pi_t
            "mse_after": float(np.mean((gap - target) ** 2)),
            "correlation_after": float(np.corrcoef(gap, target)[0, 1])
            if n_pairs > 1 and gap.std() > 0
            else None,
            "mean_gap_after": float(gap.mean()),
            "mean_target": float(target.mean()),
        }
    else:
        record["implicit_reward_accuracy"] = float(np.mean(gap > 0))
    first, last = result.history[0], result.history[-1]
    record["first"], record["last"] = first, last
    handoff.write_json(run.out_path / f"{run.stage}_summary.json", record)
    return result
