"""Stage 2: a pairwise reward model on human TL;DR comparisons, initialised from the SFT model.

    python -m experiments.tldr.reward_model --model gpt2 --out runs/tldr [--resume] [--bf16] [--mesh-fsdp N]

A scalar model {"gpt": SFT trunk, "head": zero-init linear head} scores [prompt | summary] at its last
real token (the end-of-text) and is trained with the Bradley-Terry loss -log sigmoid(r_chosen -
r_rejected) (Stiennon et al. 2020, eq. 1; jaxrlhf.pipeline.reward, kind "pairwise"). Held-out accuracy
every --rm.eval_every steps. After the last step the reward model scores --rm.norm_rows reference
summaries and the (mean, std) of those scores is stored as "reward_norm" in the final checkpoint's meta:
by default PPO subtracts that mean, so reference summaries score 0 on average (Stiennon et al. 2020);
see --ppo.reward_norm for the other choices.
Writes <out>/rm/<step>/, <out>/rm.jsonl and <out>/rm_summary.json.
"""

from __future__ import annotations

import sys

from experiments.tldr import common
from jaxrlhf import runner
from jaxrlhf.pipeline import handoff, reward


def run(setup: common.Setup) -> runner.StageResult:
    cfg = setup.cfg
    comparisons, val = common.load_comparisons(setup, need=(cfg.rm.batch_size, "--rm.batch_size"))
    target = handoff.state_target(setup, common.sft_state_init(setup))
    return reward.run_reward_stage(
        setup,
        cfg.rm,
        common.stage_run(cfg, "rm"),
        kind="pairwise",
        rows=comparisons,
        val=val,
        trunk=handoff.restore_finished(cfg.out, "sft", cfg.sft.steps, target)[0].params,
        reference=lambda: common.load_summaries(setup)[0],
    )


def main(argv=None) -> int:
    prog = "python -m experiments.tldr.reward_model"
    return common.main(run, argv, stages=["rm"], description=__doc__, prog=prog)


if __name__ == "__main__":
    sys.exit(main())
