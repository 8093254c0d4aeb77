"""The RLHF sentiment example on SST-2: SFT on movie-review sentences -> a sentiment reward model ->
PPO (or pg / grpo / rloo) towards positive continuations. After Ziegler et al. 2019 ("Fine-Tuning Language
Models from Human Preferences", the sentiment task) and TRL's sentiment notebook, on the stage layer
(jaxrlhf.pipeline).

    python -m experiments.sst2.run --model gpt2 --out runs/sst2          # all three stages
    python -m experiments.sst2.sft | reward_model | ppo --out runs/sst2  # one stage at a time

See common.py for the config (every field is a flag; --help lists them) and the data layout.
"""
