"""The LM / SFT stage: next-token cross-entropy on the answer tokens of [prompt | answer] rows, with the LM
head run on the answer positions only; held-out NLL per answer token. A prompt of one token (e.g. the
end-of-text as a beginning-of-sequence) makes it plain language modelling of the answers."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxrlhf import losses, model, ops, parallel, runner, train
from jaxrlhf.config import ModelConfig, check_at_least
from jaxrlhf.pipeline import handoff
from jaxrlhf.pipeline.handoff import PromptAnswers, StageRun
from jaxrlhf.pipeline.setup import Setup


@dataclasses.dataclass(frozen=True, kw_only=True)
class LMStageConfig:
    """Supervised fine-tuning on prompt -> answer (loss on answer tokens only).

    Attributes:
      steps: optimizer steps.
      batch_size: global batch (a multiple of the device count).
      eval_batch_size: global batch of the held-out loss.
      eval_every: held-out loss every this many steps (and at the end).
      ckpt_every: checkpoint every this many steps (and at the end).
      log_every: write metrics every this many steps.
      optim: AdamW settings; total_steps None means `steps`.
    """

    steps: int = 1800
    batch_size: int = 64
    eval_batch_size: int = 64
    eval_every: int = 200
    ckpt_every: int = 500
    log_every: int = 10
    optim: train.OptimConfig = dataclasses.field(
        default_factory=lambda: train.OptimConfig(lr=5e-5, warmup_steps=100, weight_decay=0.0)
    )

    def __post_init__(self):
        check_at_least(self, 1, "steps", "batch_size", "eval_batch_size", "log_every")
        check_at_least(self, 0, "eval_every", "ckpt_every")

    @property
    def full_optim(self) -> train.OptimConfig:
        """`optim` with total_steps filled in."""
        return dataclasses.replace(self.optim, total_steps=self.optim.total_steps or self.steps)


def answer_logits(params, batch: train.LMBatch, prompt_len: int, cfg: ModelConfig, *, key=None):
    """Next-token logits of the answer tokens only: [B, P + S] -> [B, S, V] float32.

    The LM head runs on the S hidden states that predict answer tokens (positions P-1 .. P+S-2)
    instead of all P + S: at P = 512, S = 53 that is a tenth of the [B, T, V] logits' memory.
    """
    hidden = model.forward(params, batch.tokens[:, :-1], batch.mask[:, :-1], cfg, key=key)  # [B, T-1, D]
    hidden = hidden[:, prompt_len - 1 :]  # [B, S, D]: the states that predict answer tokens
    return model.lm_logits(params, hidden, cfg)


def make_sft_step(cfg: ModelConfig, tx, prompt_len: int):
    """`train.make_lm_step` for [prompt | answer] rows: cross-entropy on answer tokens only."""

    def loss_fn(params, batch: train.LMBatch, key):
        logits = answer_logits(params, batch, prompt_len, cfg, key=key)  # [B, S, V]
        targets_mask = batch.loss_mask[:, prompt_len:] & batch.mask[:, prompt_len:]
        return losses.sft_loss(logits, batch.tokens[:, prompt_len:], targets_mask)

    def step(state: train.TrainState, batch: train.LMBatch, *, key=None):
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, key)
        state, opt_metrics = train.apply_gradients(state, grads, loss, tx)
        return state, {**metrics, **opt_metrics}

    return step


def make_sft_eval(cfg: ModelConfig, prompt_len: int):
    """(params, LMBatch) -> (sum of answer-token NLL, number of answer tokens)."""

    def evaluate(params, batch: train.LMBatch):
        logits = answer_logits(params, batch, prompt_len, cfg)
        targets_mask = batch.loss_mask[:, prompt_len:] & batch.mask[:, prompt_len:]
        nll = -ops.token_logprobs(logits, batch.tokens[:, prompt_len:])  # [B, S]
        return ops.masked_sum(nll, targets_mask), jnp.sum(targets_mask, dtype=jnp.float32)

    return evaluate


def lm_state_init(setup: Setup, scfg: LMStageConfig):
    """key -> the TrainState this stage checkpoints (to restore it in a later stage)."""
    tx = train.make_optimizer(scfg.full_optim)
    return lambda key: train.init_train_state(model.init_params(key, setup.model_cfg), tx)


def run_lm_stage(
    setup: Setup,
    scfg: LMStageConfig,
    run: StageRun,
    rows: PromptAnswers,
    val: PromptAnswers,
    params: model.Params,
    summary: dict | None = None,
) -> runner.StageResult:
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
    state = parallel.put(train.init_train_state(params, tx), mesh)
    prompt_len = rows.prompt.shape[1]
    step = parallel.jit_step(make_sft_step(mcfg, tx, prompt_len), mesh, state)
    evaluate = handoff.jit_eval(make_sft_eval(mcfg, prompt_len), mesh, state.params)
    n_rows, batch_size = len(rows.prompt), scfg.batch_size

    def step_fn(state, i, key):
        idx = handoff.train_rows(n_rows, batch_size, i, run.data_seed)
        return step(state, handoff.put_batch(handoff.lm_batch(rows, idx), mesh), key)

    def eval_fn(state):
        nll, n_tokens = handoff.evaluate_sums(
            evaluate, state.params, val, handoff.lm_batch, scfg.eval_batch_size, mesh
        )
        return {"val_loss": nll / max(n_tokens, 1.0), "val_tokens": n_tokens}

    result = runner.run_stage(
        run_dir=run.out,
        stage=run.stage,
        state=state,
        step_fn=step_fn,
        n_steps=scfg.steps,
        root_key=run.root_key,
        resume=run.resume,
        meta=run.meta,
        ckpt_every=scfg.ckpt_every,
        tokenizer=setup.tokenizer_path,
        eval_fn=eval_fn if len(val.prompt) else None,
        eval_every=scfg.eval_every,
        log_every=scfg.log_every,
        tokens_per_step=batch_size * (rows.prompt.shape[1] + rows.answer.shape[1]),
        progress=run.progress,
        stop_after=run.stop_after,
    )
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
