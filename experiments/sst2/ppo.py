"""Stage 3: RL of the SFT model towards positive movie-review continuations.

    python -m experiments.sst2.ppo --model gpt2 --out runs/sst2 [--resume] [--ppo.rl.algo grpo ...]

Prompts are the first --data.prompt_tokens tokens of training sentences (after the end-of-text); the
policy writes up to --data.response_tokens tokens; the reward is the reward model's score of [prompt |
response] (the logit of "positive"; --ppo.reward_norm none by default), with a KL penalty to the frozen
SFT model (jaxrlhf.pipeline.policy, any --ppo.rl.algo). Held-out reward and KL (per token and per
sequence) on the openings of the first validation sentences, with fixed keys, every --ppo.eval_every
iterations; samples as text in <out>/ppo_samples.jsonl; metrics in <out>/ppo.jsonl; <out>/ppo_summary.json.
"""

from __future__ import annotations

import sys

from experiments.sst2 import common
from jaxrlhf import runner
from jaxrlhf.pipeline import policy


def run(setup: common.Setup) -> runner.StageResult:
    cfg, pcfg = setup.cfg, setup.cfg.ppo
    group_size = pcfg.rl.group_size or 1
    flag = "--ppo.batch_size" if group_size == 1 else "--ppo.batch_size / --ppo.rl.group_size"
    sentences, val = common.load_sentences(setup, need=(pcfg.batch_size // group_size, flag))
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
        prompts=common.split_prompts(sentences, cfg.data),
        val=common.split_prompts(val, cfg.data),
        policy=sft_params,
        rm_params=rm_params,
        reference=reference,
        response_len=cfg.data.response_tokens,
        answer_key="continuation",
    )


def main(argv=None) -> int:
    return common.main(run, argv, stages=["ppo"], description=__doc__, prog="python -m experiments.sst2.ppo")


if __name__ == "__main__":
    sys.exit(main())
