"""Stage 2: a pairwise reward model on human TL;DR comparisons, initialised from the SFT model.

    python -m experiments.tldr.reward_model --model gpt2 --out runs/tldr [--resume] [--bf16] [--mesh-fsdp N]

A scalar model {"gpt": SFT trunk, "head": zero-init linear head} scores [prompt | summary] at its last
real token (the end-of-text) and is trained with the Bradley-Terry loss -log sigmoid(r_chosen -
r_rejected) (Stiennon et al. 2020, eq. 1; jaxrlhf.train.make_rm_step). Held-out accuracy every
--rm.eval_every steps. After the last step the reward model scores --rm.norm_rows reference summaries
and the (mean, std) of those scores is stored as "reward_norm" in the final checkpoint's meta: by default
PPO subtracts that mean, so reference summaries score 0 on average (Stiennon et al. 2020); see
--ppo.reward_norm for the other choices.
Writes <out>/rm/<step>/, <out>/rm.jsonl and <out>/rm_summary.json.
"""

from __future__ import annotations

import sys

import jax
import numpy as np
from etils import epath

from experiments.tldr import common
from jaxrlhf import checkpoint, model, parallel, runner, train


def reward_normalisation(setup: common.Setup, params, summaries: common.Summaries) -> dict:
    """Mean and std of the reward model's scores of prompt + reference summary over `norm_rows`
    training posts (a fixed random subset)."""
    cfg, mesh = setup.cfg, setup.mesh
    n = min(cfg.rm.norm_rows, len(summaries.prompt))
    rows = np.sort(np.random.default_rng(cfg.data.seed).permutation(len(summaries.prompt))[:n])
    subset = common.Summaries(*(x[rows] for x in summaries))

    def score(params, batch: train.LMBatch):
        return train.sequence_scores(params, batch.tokens, batch.mask, setup.model_cfg)  # [B]

    score = common.jit_eval(score, mesh, params)
    scores = []
    for idx, valid in common.eval_rows(n, cfg.rm.eval_batch_size):
        batch_scores = np.asarray(score(params, common.put_batch(common.lm_batch(subset, idx), mesh)))
        scores.append(batch_scores[valid])
    scores = np.concatenate(scores)
    std = float(scores.std())
    return {"mean": float(scores.mean()), "std": std if std > 1e-6 else 1.0, "rows": int(n)}


def run(setup: common.Setup) -> runner.StageResult:
    cfg = setup.cfg
    mesh, mcfg = setup.mesh, setup.model_cfg
    comparisons, val = common.load_comparisons(setup, need=(cfg.rm.batch_size, "--rm.batch_size"))
    root = jax.random.fold_in(jax.random.key(cfg.seed), 2)
    k_head, k_steps = jax.random.split(root)

    sft, _ = common.restore_finished(setup, "sft", common.state_target(setup, common.sft_state_init(setup)))
    tx = train.make_optimizer(common.rm_optim(cfg))
    params = {"gpt": sft.params, "head": model.init_scalar_head(k_head, mcfg)}
    state = parallel.put(train.init_train_state(params, tx), mesh)
    del sft, params
    step = parallel.jit_step(train.make_rm_step(mcfg, tx), mesh, state)
    evaluate = common.jit_eval(train.make_rm_eval(mcfg), mesh, state.params)
    n_rows, batch_size = len(comparisons.prompt), cfg.rm.batch_size

    def step_fn(state, i, key):
        idx = common.train_rows(n_rows, batch_size, i, cfg.data.seed)
        return step(state, common.put_batch(common.rank_batch(comparisons, idx), mesh), key)

    def eval_fn(state):
        correct, pairs = 0.0, 0.0
        for idx, valid in common.eval_rows(len(val.prompt), cfg.rm.eval_batch_size):
            batch = common.put_batch(common.rank_batch(val, idx, valid), mesh)
            batch_correct, batch_pairs = evaluate(state.params, batch)
            correct, pairs = correct + float(batch_correct), pairs + float(batch_pairs)
        return {"val_accuracy": correct / max(pairs, 1.0), "val_pairs": pairs}

    result = runner.run_stage(
        run_dir=cfg.out,
        stage="rm",
        state=state,
        step_fn=step_fn,
        n_steps=cfg.rm.steps,
        root_key=k_steps,
        resume=cfg.resume,
        meta=common.stage_meta(cfg, "rm"),
        ckpt_every=cfg.rm.ckpt_every,
        tokenizer=setup.tokenizer_path,
        eval_fn=eval_fn if len(val.prompt) else None,
        eval_every=cfg.rm.eval_every,
        log_every=cfg.rm.log_every,
        tokens_per_step=2 * batch_size * mcfg.block_size,
        progress=cfg.progress,
        stop_after=cfg.stop_after_for("rm"),
    )
    if not common.stage_finished(setup, "rm"):
        return result
    meta = checkpoint.restore_meta(cfg.out, "rm")
    if "reward_norm" in meta and not result.history:
        return result  # finished earlier: nothing new to report
    if "reward_norm" not in meta:  # also after a kill between the last step and this save
        summaries, _ = common.load_summaries(setup)
        meta["reward_norm"] = reward_normalisation(setup, result.state.params, summaries)
        checkpoint.save(
            cfg.out,
            "rm",
            meta["step"],
            result.state,
            meta=meta,
            keep=2,
            tokenizer=setup.tokenizer_path,
            overwrite=True,
        )
    last = (result.history or [{}])[-1]
    common.write_json(
        epath.Path(cfg.out) / "rm_summary.json",
        {
            **result.summary,
            "train_pairs": n_rows,
            "val_pairs": len(val.prompt),
            "val_accuracy": last.get("eval/val_accuracy"),
            "reward_norm": meta["reward_norm"],
            "last": last,
        },
    )
    return result


def main(argv=None) -> int:
    prog = "python -m experiments.tldr.reward_model"
    return common.main(run, argv, stages=["rm"], description=__doc__, prog=prog)


if __name__ == "__main__":
    sys.exit(main())
