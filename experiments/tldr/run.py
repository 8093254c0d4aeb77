"""InstructGPT on TL;DR, all stages: SFT -> reward model -> PPO, each checkpointed under --out.

    python -m experiments.tldr.run --model gpt2 --out runs/tldr                     # GPT-2 124M from the hub
    python -m experiments.tldr.run --model gpt2-medium --init-from /ckpts/gpt2-medium --bf16 \\
        --mesh-fsdp 4 --out gs://bucket/tldr                                         # a TPU VM
    python -m experiments.tldr.run --model tiny --out runs/tiny --data.max_prompt_tokens 64 ...
    python -m experiments.tldr.run ... --resume        # continue: finished stages are skipped

A stage that stops early (--stop-after STAGE:N, a kill, or SIGTERM: that saves at the next step and exits
with code 143) ends the pipeline; rerun with --resume. `--resume` on a finished run changes nothing.
Every field of the config is a flag (--help); see common.py for the data layout and stage handoff.
"""

from __future__ import annotations

import sys

from experiments.tldr import common, ppo, reward_model, sft
from jaxrlhf.pipeline import recipe

RUNNERS = {"sft": sft.run, "rm": reward_model.run, "ppo": ppo.run}


def main(argv=None) -> int:
    """The pipeline; exit code 0, 2 for a bad flag, 1 for a refusal (one line on stderr: see common.main)."""
    return common.main(run_stages, argv, description=__doc__, prog="python -m experiments.tldr.run")


def run_stages(setup: common.Setup) -> int:
    cfg = setup.cfg
    return recipe.run_stages(
        setup, cfg.stage_list, RUNNERS, common.stage_finished, resume=cfg.resume, tag="tldr"
    )


if __name__ == "__main__":
    sys.exit(main())
