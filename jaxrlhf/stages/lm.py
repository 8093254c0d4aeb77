"""The LM / SFT stage: next-token cross-entropy on the answer tokens of [prompt | answer] rows (`train.lm`:
the LM head runs on the answer positions only); held-out NLL per answer token. A prompt of one token (e.g.
the end-of-text as a beginning-of-sequence) makes it plain language modelling of the answers."""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxrlhf import models, parallel, train
from jaxrlhf.engine import loop
from jaxrlhf.stages import batches, handoff
from jaxrlhf.stages.batches import PromptAnswers
from jaxrlhf.stages.handoff import StageRun
from jaxrlhf.stages.setup import Setup
from jaxrlhf.validate import check_at_least


@dataclasses.dataclass(frozen=True, kw_only=True)
class LMStageConfig(handoff.StepsConfig):
    """Supervised fine-tuning on prompt -> answer (loss on answer tokens only).

    Attributes:
      eval_every: held-out loss every this many steps (and at the end).
      eval_rows: held-out rows the loss is measured on (the first ones; 0: all).
      optim: the optimizer (AdamW or Muon) and its schedule; total_steps None means `steps`.
    """

    steps: int = 1800
    eval_rows: int = 0
    optim: train.OptimConfig = train.optim_field(lr=5e-5, warmup_steps=100, weight_decay=0.0)

    def __post_init__(self):
        super().__post_init__()
        check_at_least(self, 0, "eval_rows")


def lm_state_init(setup: Setup, scfg: LMStageConfig):
    """key -> the TrainState this stage checkpoints (to restore it in a later stage)."""
    tx = train.make_optimizer(scfg.full_optim)
    return lambda key: train.init_train_state(models.init_params(key, setup.model_cfg), tx)


def run_lm_stage(
    setup: Setup,
    scfg: LMStageConfig,
    run: StageRun,
    rows: PromptAnswers,
    val: PromptAnswers,
    params: models.Params,
    summary: dict | None = None,
) -> loop.StageResult:
    """Run (or resume) the stage from `params`; writes <out>/<stage>/, <stage>.jsonl, <stage>_summary.json.

    Args:
      setup: the run's setup.
      scfg: this stage's config.
      run: where and how it runs.
      rows: training rows (at least one batch).
      val: held-out rows (none: no evaluation).
      params: the starting params.
      summary: extra fields of the summary file.

    Returns:
      The runner's StageResult.
    """
    mesh, mcfg = setup.mesh, setup.model_cfg
    tx = train.make_optimizer(scfg.full_optim)
    state = handoff.place_state(train.init_train_state(params, tx), mesh)
    prompt_len = rows.prompt.shape[1]
    if scfg.eval_rows:
        val = batches.subset(val, np.arange(min(scfg.eval_rows, len(val.prompt))))
    step = parallel.jit_step(train.make_lm_step(mcfg, tx, prompt_len=prompt_len), mesh, state)
    evaluate = batches.jit_eval(train.make_lm_eval(mcfg, prompt_len=prompt_len), mesh, state.params)
    n_rows, batch_size = len(rows.prompt), scfg.batch_size

    def step_fn(state, i, key):
        idx = batches.train_rows(n_rows, batch_size, i, run.data_seed)
        return step(state, batches.put_batch(batches.lm_batch(rows, idx), mesh), key)

    def eval_fn(state):
        nll, n_tokens = batches.evaluate_sums(
            evaluate, state.params, val, batches.lm_batch, scfg.eval_batch_size, mesh
        )
        return {"val_loss": nll / max(n_tokens, 1.0), "val_tokens": n_tokens}

    result = loop.run_stage(
        **handoff.loop_args(run, setup, scfg),
        state=state, step_fn=step_fn, n_steps=scfg.steps, eval_fn=eval_fn if len(val.prompt) else None,
        tokens_per_step=batch_size * (rows.prompt.shape[1] + rows.answer.shape[1]),
    )  # fmt: skip
    handoff.write_json(
        run.out_path / f"{run.stage}_summary.json",
        {
            **result.summary,
            **(summary or {}),
            "train_rows": n_rows,
            "val_rows": len(val.prompt),
            "last": (result.history or [{}])[-1],
        },
    )
    return result
