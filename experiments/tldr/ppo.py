"""Stage 3: RL of the SFT policy against the reward model, with a KL penalty to SFT.

    python -m experiments.tldr.ppo --model gpt2 --out runs/tldr [--resume] [--bf16] [--mesh-fsdp N]

One iteration is one jitted program over every device (jaxrlhf.pipeline.policy): sample summaries of a
batch of training prompts, score [prompt | summary] with the reward model at its last real token (the
end-of-text), normalised by --ppo.reward_norm (by default minus the mean score of reference summaries),
replace the score of a summary without end-of-text by --ppo.rl.no_eos_penalty, then jaxrlhf.rl's learn.
--ppo.rl.algo ppo (default): per-token KL to the frozen SFT model in the reward (fixed beta, or adaptive
with --ppo.rl.kl_target), GAE, whitened advantages and --ppo.rl.epochs x --ppo.rl.minibatches clipped
PPO updates of policy and value; the value model starts as the reward model with the normalisation
folded into its head, so its first values are on the scale of the rewards. pg: one policy-gradient
update on the reward-to-go. grpo / rloo: --ppo.rl.group_size summaries of each of batch_size /
group_size prompts, group-relative advantages, no value model. --ppo.rl.ptx_coef G adds PPO-ptx's
LM loss on training posts with their reference summaries. Held-out reward and KL every
--ppo.eval_every iterations, with sample summaries in <out>/ppo_samples.jsonl; metrics in
<out>/ppo.jsonl; <out>/ppo_summary.json at the end.
"""

from __future__ import annotations

import sys

from experiments.tldr import common
from jaxrlhf import runner
from jaxrlhf.pipeline import policy


def run(setup: common.Setup) -> runner.StageResult:
    cfg, pcfg = setup.cfg, setup.cfg.ppo
    group_size = pcfg.rl.group_size or 1
    flag = "--ppo.batch_size" if group_size == 1 else "--ppo.batch_size / --ppo.rl.group_size"
    prompts, val = common.load_summaries(setup, need=(pcfg.batch_size // group_size, flag))
    sft_params, rm_params, reference = policy.restore_rl_inputs(
        setup,
        cfg.out,
        sft=("sft", cfg.sft.steps, common.sft_state_init(setup)),
        rm=("rm", cfg.rm.steps, common.rm_state_init(setup)),
    )
    return policy.run_rl_stage(
        setup,
        pcfg,
        common.stage_run(cfg, "ppo"),
        prompts=prompts,
        val=val,
        policy=sft_params,
        rm_params=rm_params,
        reference=reference,
        response_len=cfg.data.max_summary_tokens,
        answer_key="summary",
    )


def main(argv=None) -> int:
    return common.main(run, argv, stages=["ppo"], description=__doc__, prog="python -m experiments.tldr.ppo")


if __name__ == "__main__":
    sys.exit(main())
