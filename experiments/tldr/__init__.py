"""InstructGPT on Reddit TL;DR: SFT -> pairwise reward model -> PPO.

After Stiennon et al. 2020 ("Learning to summarize from human feedback") and Ouyang et al. 2022.

    python -m experiments.tldr.run --model gpt2 --out runs/tldr          # all three stages
    python -m experiments.tldr.sft | reward_model | ppo --out runs/tldr  # one stage at a time

See common.py for the config (every field is a flag; --help lists them) and the data layout.
"""
