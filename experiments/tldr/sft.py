"""Stage 1: supervised fine-tuning on TL;DR post -> reference summary.

    python -m experiments.tldr.sft --model gpt2 --out runs/tldr [--resume] [--bf16] [--mesh-fsdp N]

Next-token cross-entropy on the summary tokens only (jaxrlhf.train.make_lm_step with the LM head run
on the summary positions only), global batches split over every device; held-out NLL per summary token
every --sft.eval_every steps. Writes <out>/sft/<step>/ (checkpoints), <out>/sft.jsonl (metrics) and
<out>/sft_summary.json.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
from etils import epath

from experiments.tldr import common
from jaxrlhf import losses, model, ops, parallel, runner, train
from jaxrlhf.config import ModelConfig


def summary_logits(params, batch: train.LMBatch, prompt_len: int, cfg: ModelConfig, *, key=None):
    """Next-token logits of the summary tokens only: [B, P + S] -> [B, S, V] float32.

    The LM head runs on the S hidden states that predict summary tokens (positions P-1 .. P+S-2)
    instead of all P + S: at P = 512, S = 53 that is a tenth of the [B, T, V] logits' memory.
    """
    hidden = model.forward(params, batch.tokens[:, :-1], batch.mask[:, :-1], cfg, key=key)  # [B, T-1, D]
    hidden = hidden[:, prompt_len - 1 :]  # [B, S, D]: the states that predict summary tokens
    return model.lm_logits(params, hidden, cfg)


def make_sft_step(cfg: ModelConfig, tx, prompt_len: int):
    """`train.make_lm_step` for [prompt | summary] rows: cross-entropy on summary tokens only."""

    def loss_fn(params, batch: train.LMBatch, key):
        logits = summary_logits(params, batch, prompt_len, cfg, key=key)  # [B, S, V]
        targets_mask = batch.loss_mask[:, prompt_len:] & batch.mask[:, prompt_len:]
        return losses.sft_loss(logits, batch.tokens[:, prompt_len:], targets_mask)

    def step(state: train.TrainState, batch: train.LMBatch, *, key=None):
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, key)
        state, opt_metrics = train.apply_gradients(state, grads, loss, tx)
        return state, {**metrics, **opt_metrics}

    return step


def make_sft_eval(cfg: ModelConfig, prompt_len: int):
    """(params, LMBatch) -> (sum of summary-token NLL, number of summary tokens)."""

    def evaluate(params, batch: train.LMBatch):
        logits = summary_logits(params, batch, prompt_len, cfg)
        targets_mask = batch.loss_mask[:, prompt_len:] & batch.mask[:, prompt_len:]
        nll = -ops.token_logprobs(logits, batch.tokens[:, prompt_len:])  # [B, S]
        return ops.masked_sum(nll, targets_mask), jnp.sum(targets_mask, dtype=jnp.float32)

    return evaluate


def run(setup: common.Setup) -> runner.StageResult:
    cfg = setup.cfg
    mesh, mcfg = setup.mesh, setup.model_cfg
    data, val = common.load_summaries(setup, need=(cfg.sft.batch_size, "--sft.batch_size"))
    root = jax.random.fold_in(jax.random.key(cfg.seed), 1)
    k_init, k_steps = jax.random.split(root)

    tx = train.make_optimizer(common.sft_optim(cfg))
    state = parallel.put(train.init_train_state(common.initial_params(setup, k_init), tx), mesh)
    prompt_len = cfg.data.max_prompt_tokens
    step = parallel.jit_step(make_sft_step(mcfg, tx, prompt_len), mesh, state)
    evaluate = common.jit_eval(make_sft_eval(mcfg, prompt_len), mesh, state.params)
    n_rows, batch_size = len(data.prompt), cfg.sft.batch_size

    def step_fn(state, i, key):
        idx = common.train_rows(n_rows, batch_size, i, cfg.data.seed)
        return step(state, common.put_batch(common.lm_batch(data, idx), mesh), key)

    def eval_fn(state):
        nll, n_tokens = 0.0, 0.0
        for idx, valid in common.eval_rows(len(val.prompt), cfg.sft.eval_batch_size):
            batch_nll, batch_tokens = evaluate(
                state.params, common.put_batch(common.lm_batch(val, idx, valid), mesh)
            )
            nll, n_tokens = nll + float(batch_nll), n_tokens + float(batch_tokens)
        return {"val_loss": nll / max(n_tokens, 1.0), "val_tokens": n_tokens}

    result = runner.run_stage(
        run_dir=cfg.out,
        stage="sft",
        state=state,
        step_fn=step_fn,
        n_steps=cfg.sft.steps,
        root_key=k_steps,
        resume=cfg.resume,
        meta=common.stage_meta(cfg, "sft"),
        ckpt_every=cfg.sft.ckpt_every,
        tokenizer=setup.tokenizer_path,
        eval_fn=eval_fn if len(val.prompt) else None,
        eval_every=cfg.sft.eval_every,
        log_every=cfg.sft.log_every,
        tokens_per_step=batch_size * (data.prompt.shape[1] + data.summary.shape[1]),
        progress=cfg.progress,
        stop_after=cfg.stop_after_for("sft"),
    )
    common.write_json(
        epath.Path(cfg.out) / "sft_summary.json",
        {
            **result.summary,
            "train_rows": n_rows,
            "val_rows": len(val.prompt),
            "last": (result.history or [{}])[-1],
        },
    )
    return result


def main(argv=None) -> int:
    return common.main(run, argv, stages=["sft"], description=__doc__, prog="python -m experiments.tldr.sft")


if __name__ == "__main__":
    sys.exit(main())
