"""The stage layer every pipeline runs on (experiments/tldr, experiments/sst2): functions and small frozen
configs, no framework.

    setup.py     the model / tokenizer / mesh of --model / --init-from, `main` (refusals before any write)
    handoff.py   checkpoints between stages, batch selection, sharded host batches, jitted evaluation
    lm.py        the LM / SFT stage over [prompt | answer] rows with a loss mask
    reward.py    the reward-model stage: pairwise comparisons or labelled rows, a scalar head on a trunk
    policy.py    the RL stage (jaxrlhf.rl's algorithms) against a reward model, with a KL to the reference
    rl_programs.py  its jitted iteration and evaluation, reward normalisations, value model from the RM
    recipe.py    a pipeline config's shared fields (stage metas, keys, --stages / --stop-after) and stage loop

A pipeline (a recipe) owns its data and configs and calls these in order; a stage takes its own stage
config, the setup and its inputs, never the pipeline's whole config.
"""
