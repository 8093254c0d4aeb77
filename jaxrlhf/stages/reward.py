"""The reward-model stage: a scalar model {"gpt": trunk of an earlier stage, "head": zero-init linear head}
read at the last real token of [prompt | answer], trained either on pairwise comparisons (Bradley-Terry,
`kind="pairwise"`: Stiennon et al. 2020, eq. 1) or on binary labels (the score as the log-odds of the
positive class, `kind="binary"`: losses.binary_rm_loss). Held-out accuracy every eval_every steps.

After the last step the model scores `norm_rows` reference rows ([prompt | answer] of the SFT data) and
their (mean, std) is stored as "reward_norm" in the final checkpoint's meta, for the RL stage's
--*.reward_norm; a stage is complete only once that is saved (`reward_finished`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import jax
import numpy as np

from jaxrlhf import models, parallel, train
from jaxrlhf.engine import checkpoint, loop
from jaxrlhf.stages import batches, handoff
from jaxrlhf.stages.batches import PromptAnswers
from jaxrlhf.stages.handoff import StageRun
from jaxrlhf.stages.setup import Setup
from jaxrlhf.train.reward import LabelBatch
from jaxrlhf.validate import check_at_least

KINDS = ("pairwise", "binary")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RewardStageConfig(handoff.StepsConfig):
    """A reward model on comparisons or labels, read at the last real token.

    Attributes:
      batch_size: global comparisons (or labelled rows) per step.
      eval_batch_size: global comparisons (or rows) per held-out accuracy batch.
      eval_every: held-out accuracy every this many steps (and at the end).
      norm_rows: reference rows scored for the reward normalisation (mean / std).
      optim: AdamW settings; total_steps None means `steps`.
    """

    steps: int = 1450
    norm_rows: int = 1024
    optim: train.OptimConfig = train.optim_field(lr=3e-5, warmup_steps=50, weight_decay=0.0)

    def __post_init__(self):
        super().__post_init__()
        check_at_least(self, 1, "norm_rows")


class Comparisons(NamedTuple):
    """Prompts with a preferred and a rejected answer.

    Attributes:
      prompt: [N, P] int32, left-padded.   prompt_mask: [N, P] bool.
      answers: [N, 2, S] int32, chosen first.   answers_mask: [N, 2, S] bool.
    """

    prompt: np.ndarray
    prompt_mask: np.ndarray
    answers: np.ndarray
    answers_mask: np.ndarray


class Labelled(NamedTuple):
    """Prompts with one answer and a binary label each.

    Attributes:
      prompt: [N, P] int32, left-padded.   prompt_mask: [N, P] bool.
      answer: [N, S] int32, right-padded.   answer_mask: [N, S] bool.
      label: [N] int32, 1 = positive.
    """

    prompt: np.ndarray
    prompt_mask: np.ndarray
    answer: np.ndarray
    answer_mask: np.ndarray
    label: np.ndarray


def rank_batch(d: Comparisons, idx: np.ndarray, valid: np.ndarray | None = None) -> train.RankBatch:
    """[prompt | answer] for the chosen and rejected answer of rows `idx`: tokens [B, 2, P + S]."""
    prompt = np.repeat(d.prompt[idx][:, None], 2, axis=1)  # [B, 2, P]
    prompt_mask = np.repeat(d.prompt_mask[idx][:, None], 2, axis=1)
    rank_mask = np.ones((len(idx), 2), bool) if valid is None else np.repeat(valid[:, None], 2, axis=1)
    return train.RankBatch(
        tokens=np.concatenate([prompt, d.answers[idx]], axis=2),
        mask=np.concatenate([prompt_mask, d.answers_mask[idx]], axis=2),
        rank_mask=rank_mask,
    )


def label_batch(d: Labelled, idx: np.ndarray, valid: np.ndarray | None = None) -> LabelBatch:
    """[prompt | answer] of rows `idx` with their labels: tokens [B, P + S]."""
    return LabelBatch(
        tokens=np.concatenate([d.prompt[idx], d.answer[idx]], axis=1),
        mask=np.concatenate([d.prompt_mask[idx], d.answer_mask[idx]], axis=1),
        label=d.label[idx].astype(np.int32),
        row_mask=np.ones(len(idx), bool) if valid is None else valid,
    )


# kind -> (step maker, evaluator maker, batch maker, sequences per row, what a row is called)
_KINDS = {
    "pairwise": (train.make_rm_step, train.make_rm_eval, rank_batch, 2, "pairs"),
    "binary": (train.make_binary_step, train.make_binary_eval, label_batch, 1, "rows"),
}


def reward_state_init(setup: Setup, scfg: RewardStageConfig):
    """key -> the TrainState over a scalar model {"gpt", "head"} this stage checkpoints."""
    tx = train.make_optimizer(scfg.full_optim)
    return lambda key: train.init_train_state(models.init_scalar_model(key, setup.model_cfg), tx)


def reference_stats(setup: Setup, params, rows: PromptAnswers, n: int, batch_size: int, seed: int) -> dict:
    """Mean and std of the reward model's scores of [prompt | answer] over `n` of `rows` (a fixed random
    subset): {"mean", "std" (1 if ~0), "rows"}."""
    mesh = setup.mesh
    n = min(n, len(rows.prompt))
    picked = batches.subset(rows, np.sort(np.random.default_rng(seed).permutation(len(rows.prompt))[:n]))

    def score(params, batch: train.LMBatch):
        return models.sequence_scores(params, batch.tokens, batch.mask, setup.model_cfg)  # [B]

    score = batches.jit_eval(score, mesh, params)
    scores = batches.evaluate_rows(score, params, picked, batch_size, mesh, make_batch=batches.lm_batch)
    std = float(scores.std())
    return {"mean": float(scores.mean()), "std": std if std > 1e-6 else 1.0, "rows": int(n)}


def reward_finished(out: str, stage: str, steps: int) -> bool:
    """The stage reached its last step and stored the reward normalisation."""
    return handoff.stage_finished(out, stage, steps) and "reward_norm" in checkpoint.restore_meta(out, stage)


def run_reward_stage(
    setup: Setup,
    scfg: RewardStageConfig,
    run: StageRun,
    *,
    kind: str,
    rows: Comparisons | Labelled,
    val: Comparisons | Labelled,
    trunk: models.Params,
    reference: Callable[[], PromptAnswers],
    summary: dict | None = None,
) -> loop.StageResult:
    """Run (or resume) the stage; writes <out>/<stage>/, <stage>.jsonl and <stage>_summary.json.

    Args:
      setup: the run's setup.
      scfg: this stage's config.
      run: where and how it runs; root_key also draws the head (zero-init: no draw matters).
      kind: "pairwise" (rows are Comparisons) or "binary" (rows are Labelled).
      rows, val: training rows (at least one batch) and held-out rows (none: no evaluation).
      trunk: the params of the model under the head (e.g. the SFT model's).
      reference: () -> the rows scored for the normalisation, called only when it is computed.
      summary: extra fields of the summary file.

    Returns:
      The runner's StageResult.

    Raises:
      ValueError: an unknown `kind`.
    """
    if kind not in _KINDS:
        raise ValueError(f"kind={kind!r}; use one of {', '.join(KINDS)}")
    make_step, make_eval, make_batch, per_row, what = _KINDS[kind]
    mesh, mcfg = setup.mesh, setup.model_cfg
    k_head, k_steps = jax.random.split(run.root_key)
    tx = train.make_optimizer(scfg.full_optim)
    params = {"gpt": trunk, "head": models.init_scalar_head(k_head, mcfg)}
    state = handoff.place_state(train.init_train_state(params, tx), mesh)
    del params
    step = parallel.jit_step(make_step(mcfg, tx), mesh, state)
    evaluate = batches.jit_eval(make_eval(mcfg), mesh, state.params)
    n_rows, batch_size = len(rows.prompt), scfg.batch_size

    def step_fn(state, i, key):
        idx = batches.train_rows(n_rows, batch_size, i, run.data_seed)
        return step(state, batches.put_batch(make_batch(rows, idx), mesh), key)

    def eval_fn(state):
        correct, count = batches.evaluate_sums(
            evaluate, state.params, val, make_batch, scfg.eval_batch_size, mesh
        )
        return {"val_accuracy": correct / max(count, 1.0), f"val_{what}": count}

    result = loop.run_stage(
        **handoff.loop_args(run, setup, scfg, root_key=k_steps),
        state=state, step_fn=step_fn, n_steps=scfg.steps, eval_fn=eval_fn if len(val.prompt) else None,
        tokens_per_step=per_row * batch_size * mcfg.block_size,
    )  # fmt: skip
    if not handoff.stage_finished(run.out, run.stage, scfg.steps):
        return result
    meta = checkpoint.restore_meta(run.out, run.stage)
    if "reward_norm" in meta and not result.history:
        return result  # finished earlier: nothing new to report
    if "reward_norm" not in meta:  # also after a kill between the last step and this save
        meta["reward_norm"] = reference_stats(
            setup, result.state.params, reference(), scfg.norm_rows, scfg.eval_batch_size, run.data_seed
        )
        checkpoint.save(
            run.out, run.stage, meta["step"], result.state, meta=meta, keep=2,
            tokenizer=setup.tokenizer_path, overwrite=True,
        )  # fmt: skip
    last = (result.history or [{}])[-1]
    handoff.write_json(
        run.out_path / f"{run.stage}_summary.json",
        {
            **result.summary,
            **(summary or {}),
            f"train_{what}": n_rows,
            f"val_{what}": len(val.prompt),
            "val_accuracy": last.get("eval/val_accuracy"),
            "reward_norm": meta["reward_norm"],
            "last": last,
        },
    )
    return result
