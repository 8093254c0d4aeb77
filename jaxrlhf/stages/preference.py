"""The pair stages of an online preference pipeline (after `online`'s generate and score): a (best, worst)
pair per prompt after a length filter and deduplication (`filter_answers`), the pairs as a `PrefBatch`
(`pref_pairs`), and the update on that fixed pair set (`run_pair_stage`: REBEL's regression with several
passes per batch of pairs, DPO or IPO).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import numpy as np

from jaxrlhf import models, parallel, train
from jaxrlhf.engine import loop
from jaxrlhf.rollout import pairs as pairs_lib
from jaxrlhf.rollout import scoring
from jaxrlhf.stages import batches, handoff
from jaxrlhf.stages.handoff import StageError, StageRun
from jaxrlhf.stages.setup import Setup
from jaxrlhf.validate import check_at_least

ALGOS = train.preference.ALGOS

# ------------------------------------------------------------------------------------------ filter


def filter_answers(
    rows: Mapping[str, np.ndarray],
    rewards: np.ndarray,
    n: int,
    *,
    special_ids,
    max_answer_tokens: int | None,
    min_answer_tokens: int = 1,
    keep_unfinished: bool = False,
) -> pairs_lib.PairSelection:
    """(best, worst) pairs of the written answers (`pairs_lib.select_pairs`, n answers per prompt in
    order): unfinished answers (unless `keep_unfinished`: they then compete with the reward they were
    given, e.g. a no-EOS penalty), answers longer than `max_answer_tokens` or shorter than
    `min_answer_tokens` (in tokens, special tokens not counted), repeats of an earlier answer to the same
    prompt, prompts with fewer than two answers left and prompts whose answers all tie are dropped and
    counted."""
    response, mask = rows["response"], rows["response_mask"]
    special = np.isin(response, np.asarray(sorted(special_ids), dtype=response.dtype))
    return pairs_lib.select_pairs(
        np.where(special, -1, response),  # special tokens neither count nor tell answers apart
        mask & ~special,
        rewards,
        n,
        max_answer_tokens=max_answer_tokens,
        min_answer_tokens=min_answer_tokens,
        finished=None if keep_unfinished else rows["finished"],
    )


def selection_stats(selection: pairs_lib.PairSelection) -> dict:
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
    """The pairs as a host `PrefBatch` of every pair (`rollout.build_pref_batch` of the written rows), with
    ref_logprobs pi_t's (REBEL: the policy that sampled) or the reference's (DPO / IPO)."""
    rollout = pairs_lib.rows_as_rollout(rows)
    chosen = pairs_lib.Pairs(
        pairs["chosen"], pairs["rejected"], pairs["chosen_reward"], pairs["rejected_reward"]
    )
    ref = rows["policy_logprobs"] if algo == "rebel" else rows["ref_logprobs"]
    return pairs_lib.build_pref_batch(rollout, chosen, ref, num_pairs=len(pairs["chosen"]))


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
    optim: train.OptimConfig = train.optim_field(
        lr=3e-7, warmup_steps=0, schedule="linear", min_lr_ratio=0.0, weight_decay=0.0
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


def make_pair_step(setup: Setup, pcfg: PairStageConfig, tx, temperature: float = 1.0):
    """step(state, PrefBatch, *, key) of `pcfg.algo` (`train.make_pair_step`) at the pairs' sampling
    `temperature`."""
    return train.make_pair_step(setup.model_cfg, tx, algo=pcfg.algo, eta=pcfg.eta, beta=pcfg.beta,
                                epochs=pcfg.epochs, minibatches=pcfg.minibatches,
                                temperature=temperature)  # fmt: skip


def pair_state_init(setup: Setup, pcfg: PairStageConfig, n_pairs: int):
    """key -> the TrainState a pair stage of `n_pairs` pairs checkpoints (to restore it later)."""
    tx = pcfg.optimizer(max(n_pairs, 1))
    return lambda key: train.init_train_state(models.init_params(key, setup.model_cfg), tx)


def log_ratio_gaps(
    setup: Setup, params, pairs: train.PrefBatch, batch_size: int, temperature: float = 1.0
) -> np.ndarray:
    """[M] (log pi/pi_0 (chosen) - log pi/pi_0 (rejected)) of `params` at `temperature` against the pairs'
    ref_logprobs."""
    mcfg = setup.model_cfg

    def gap(params, batch):
        lp = train.pair_logprobs(params, batch, mcfg, temperature=temperature)
        ratio = lp - batch.ref_logprobs
        return ratio[:, 0] - ratio[:, 1]

    return batches.evaluate_rows(
        batches.jit_eval(gap, setup.mesh, params), params, pairs, batch_size, setup.mesh
    )


def run_pair_stage(
    setup: Setup,
    pcfg: PairStageConfig,
    run: StageRun,
    *,
    pairs: train.PrefBatch,
    params,
    temperature: float = 1.0,
    summary: dict | None = None,
) -> loop.StageResult:
    """The update on a fixed pair set; writes <out>/<stage>/, <stage>.jsonl and <stage>_summary.json.
    `temperature`: the pairs' sampling temperature; the policy's logprobs are taken at it, as the pairs'
    ref_logprobs must be (`rollout.rollout_logprobs(..., temperature=T)`).

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
    pairs = batches.subset(pairs, order)
    n_steps, b = pcfg.steps(n_pairs), pcfg.batch_size
    tx = pcfg.optimizer(n_pairs)
    state = handoff.place_state(train.init_train_state(params, tx), mesh)
    step = parallel.jit_step(make_pair_step(setup, pcfg, tx, temperature), mesh, state)

    def step_fn(state, i, key):
        idx = np.arange(i * b, (i + 1) * b)
        valid = idx < n_pairs
        batch = batches.subset(pairs, np.where(valid, idx, 0))
        batch = batch._replace(pair_mask=batch.pair_mask & valid)
        return step(state, batches.put_batch(batch, mesh), key)

    result = loop.run_stage(
        **handoff.loop_args(run, setup, pcfg),
        state=state, step_fn=step_fn, n_steps=n_steps,
        tokens_per_step=2 * b * pairs.tokens.shape[-1] * pcfg.epochs,
    )  # fmt: skip
    if not handoff.stage_finished(run.out, run.stage, n_steps) or not result.history:
        return result
    gap = log_ratio_gaps(setup, result.state.params, pairs, b, temperature)
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


# ------------------------------------------------------------------------------------- online pairs


def run_online_pairs(setup: Setup, pcfg, run: StageRun, *, prompts, policy, reward, response_len: int,
                     summary: dict | None = None) -> loop.StageResult:  # fmt: skip
    """The RL stage for rebel / dpo / ipo (`policy.run_rl_stage` calls it): each iteration samples
    rl.group_size answers to each of batch_size / group_size prompts, scores them (the reward; REBEL's
    adds -kl_coef x the sequence KL of pi_t to the reference and the no-EOS penalty, as the REBEL
    authors' code), keeps the (best, worst) pair of each prompt (`rollout.select_pairs`) and updates on
    them: REBEL regresses against pi_t, the policy that sampled; DPO / IPO against the frozen reference.
    An iteration without a pair leaves the policy as it was and counts in "no_pairs"; a stage made only
    of those is refused at its end (`check_pairs`).

    Args: as `policy.run_rl_stage` (pcfg an RLStageConfig with a pair algorithm).
    """
    rl = pcfg.rl.resolved()
    if isinstance(reward, handoff.LearnedReward) and pcfg.reward_norm == "policy_gain_bias":
        raise ValueError(
            "reward_norm 'policy_gain_bias' acts for ppo / pg / grpo / rloo; use reference_mean or none"
        )
    mesh = setup.mesh
    mcfg = dataclasses.replace(setup.model_cfg, embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0)
    n, n_prompts = rl.group_size, pcfg.batch_size // rl.group_size
    sample_cfg = pcfg.sample_config(setup.tokenizer, response_len)
    temperature = 1.0 if sample_cfg.greedy else sample_cfg.temperature  # pi_t: the policy that samples
    tx = train.make_optimizer(dataclasses.replace(
        pcfg.optim,
        total_steps=pcfg.optim.total_steps or pcfg.iterations * rl.epochs * rl.minibatches))  # fmt: skip
    ref = parallel.put(policy, mesh)
    state = handoff.place_state(train.init_train_state(policy, tx), mesh)
    step = parallel.jit_step(
        train.make_pair_step(mcfg, tx, algo=rl.algo, eta=rl.eta, beta=rl.beta, epochs=rl.epochs,
                             minibatches=rl.minibatches, average_logprobs=rl.average_logprobs,
                             temperature=temperature),
        mesh, state,
    )  # fmt: skip
    shard, rep, batch_sh = parallel.tree_shardings, parallel.replicated(mesh), parallel.batch_sharding(mesh)
    generate = jax.jit(
        parallel.on_mesh(
            lambda p, prompt, mask, k: pairs_lib.generate_answers(p, prompt, mask, mcfg, sample_cfg, n,
                                                                  key=k),
            mesh),
        in_shardings=(shard(policy, mesh), batch_sh, batch_sh, rep), out_shardings=batch_sh,
    )  # fmt: skip
    logprobs = jax.jit(
        parallel.on_mesh(lambda p, ro: pairs_lib.rollout_logprobs(p, ro, mcfg, temperature=temperature),
                         mesh),
        in_shardings=(shard(policy, mesh), batch_sh), out_shardings=batch_sh,
    )  # fmt: skip
    if isinstance(reward, handoff.LearnedReward):
        norm = scoring.reference_norm(pcfg.reward_norm, reward.reference)
        rm = parallel.put(reward.params, mesh)
        learned = jax.jit(
            parallel.on_mesh(lambda p, ro: scoring.normalised_scores(p, ro, mcfg, norm), mesh),
            in_shardings=(shard(rm, mesh), batch_sh), out_shardings=batch_sh,
        )  # fmt: skip
        score = lambda rollout: np.asarray(learned(rm, rollout))  # noqa: E731
    else:
        score = lambda rollout: reward.score(parallel.to_host(rollout))  # noqa: E731

    def step_fn(state, i, key):
        k_gen, k_step = jax.random.split(key)
        idx = batches.train_rows(len(prompts.prompt), n_prompts, i, run.data_seed)
        prompt, prompt_mask = batches.put_batch((prompts.prompt[idx], prompts.prompt_mask[idx]), mesh)
        rollout = generate(state.params, prompt, prompt_mask, k_gen)
        scores = np.asarray(score(rollout), np.float32)
        pol = logprobs(state.params, rollout)  # pi_t, the policy that sampled
        ref_lp = logprobs(ref, rollout)
        host = parallel.to_host(rollout)
        if rl.algo == "rebel":  # REBEL regresses against pi_t, on its authors' reward
            base = pol
            pair_rewards = scoring.rebel_rewards(scores, host.finished, pol, ref_lp, kl_coef=rl.kl_coef,
                                                 no_eos_penalty=rl.no_eos_penalty)  # fmt: skip
        else:  # DPO / IPO against the frozen reference, on pairs picked by the score
            base, pair_rewards = ref_lp, scores
        sel = pairs_lib.select_pairs(host.response, host.response_mask, np.asarray(pair_rewards), n)
        batch = pairs_lib.build_pref_batch(host, sel, np.asarray(base), num_pairs=n_prompts)
        state, metrics = step(state, batches.put_batch(batch, mesh), k_step)
        pair_metrics = sel.metrics()  # pairs, no_pairs, skipped_tied, dropped_duplicate, ...
        pair_metrics["pair_reward_margin"] = pair_metrics.pop("reward_margin")  # not DPO's implicit one
        rmask = host.response_mask
        kl_tok = float(np.sum(np.asarray(pol) - np.asarray(ref_lp)) / max(rmask.sum(), 1))
        return state, {**metrics, **pair_metrics, "reward": float(np.mean(scores)), "kl_per_token": kl_tok,
                       "response_length": float(rmask.sum(-1).mean())}  # fmt: skip

    result = loop.run_stage(
        **handoff.loop_args(run, setup, pcfg), state=state, step_fn=step_fn, n_steps=pcfg.iterations
    )
    check_pairs(rl, result, run.out_path / f"{run.stage}.jsonl")
    if result.history:
        batches_summary = {**result.summary, **(summary or {}), "algo": rl.algo, "first": result.history[0],
                           "last": result.history[-1]}  # fmt: skip
        handoff.write_json(run.out_path / f"{run.stage}_summary.json", batches_summary)
    return result


class NoPairsError(ValueError):
    """Every iteration of a REBEL / DPO / IPO stage had no pair to learn from: the policy did not move."""


def check_pairs(rl, result: loop.StageResult, metrics_path) -> None:
    """Count the stage's iterations without a pair into its summary; raise NoPairsError if that is all of
    them (the whole stage, resumed parts included, as its metrics file records it)."""
    records = loop.read_metrics(metrics_path) if metrics_path.exists() else result.history
    empty = sum(1 for r in records if r.get("no_pairs", 0.0) > 0)
    result.summary["no_pair_iterations"] = empty
    if records and empty == len(records):
        tied = sum(r.get("skipped_tied", 0.0) for r in records)
        raise NoPairsError(
            f"{metrics_path.stem}: none of the {len(records)} {rl.algo} iterations had a pair to learn "
            f"from (every prompt's {rl.group_size} answers tied on the reward ({tied:.0f} times) or were "
            f"identical; no_pairs in {metrics_path}), so the policy was not trained: raise --rl.group_size "
            "or --rl.temperature, or use a reward that tells the answers apart"
        )
