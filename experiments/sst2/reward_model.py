"""Stage 2: a sentiment reward model on the SST-2 labels, initialised from the SFT model.

    python -m experiments.sst2.reward_model --model gpt2 --out runs/sst2 [--resume] [--bf16]

A scalar model {"gpt": SFT trunk, "head": zero-init linear head} scores [eos | sentence] at its last real
token (the end-of-text); the score is the logit of "positive", trained with the logistic loss
softplus(-(2y - 1) s) (losses.binary_rm_loss; jaxrlhf.pipeline.reward, kind "binary"). Held-out accuracy
(score > 0 = positive) on the validation split every --rm.eval_every steps. The (mean, std) of the scores
of --rm.norm_rows training sentences is stored as "reward_norm" (used by --ppo.reward_norm
reference_mean). Writes <out>/rm/<step>/, <out>/rm.jsonl and <out>/rm_summary.json.
"""

from __future__ import annotations

import sys

from experiments.sst2 import common
from jaxrlhf import runner
from jaxrlhf.pipeline import handoff, reward


def run(setup: common.Setup) -> runner.StageResult:
    cfg = setup.cfg
    rows, val = common.load_labelled(setup, need=(cfg.rm.batch_size, "--rm.batch_size"))
    target = handoff.state_target(setup, common.sft_state_init(setup))
    return reward.run_reward_stage(
        setup,
        cfg.rm,
        common.stage_run(cfg, "rm"),
        kind="binary",
        rows=rows,
        val=val,
        trunk=handoff.restore_finished(cfg.out, "sft", cfg.sft.steps, target)[0].params,
        reference=lambda: common.PromptAnswers(*rows[:4]),
        summary={"val_positive_fraction": float(val.label.mean()) if len(val.label) else None},
    )


def main(argv=None) -> int:
    prog = "python -m experiments.sst2.reward_model"
    return common.main(run, argv, stages=["rm"], description=__doc__, prog=prog)


if __name__ == "__main__":
    sys.exit(main())
