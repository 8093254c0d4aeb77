"""The stage layer every pipeline runs on (HappyGPT, experiments/tldr, sst2, ultrafeedback): functions and
small frozen configs, no framework.

    setup       the model / tokenizer / mesh of --model / --init-from; `main` (refusals before any write)
    recipe      what a pipeline config has in common: stage metas, keys, --stages / --stop-after, the loop
    handoff     StageRun, checkpoints between stages
    batches     rows as fixed-shape token arrays, batch selection, sharded batches, jitted evaluation
    lm          the LM / SFT stage over [prompt | answer] rows with a loss mask
    reward      the reward-model stage: pairwise comparisons or labelled rows, a scalar head on a trunk
    policy      the RL stage (PPO, PG, GRPO, RLOO) against a learned or a host reward, with a KL to the
                reference (policy_programs: its jitted iteration and evaluation)
    online      the data stages of an online preference pipeline: generate, score (written as shards)
    preference  pair selection and the update on a fixed pair set (REBEL, DPO, IPO)

A pipeline (a recipe) owns its data and configs and calls these in order; a stage takes its own stage
config, the setup and its inputs, never the pipeline's whole config.
"""
