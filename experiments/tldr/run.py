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
import time

from experiments.tldr import common, ppo, reward_model, sft
from jaxrlhf import checkpoint

RUNNERS = {"sft": sft.run, "rm": reward_model.run, "ppo": ppo.run}


def main(argv=None) -> int:
    """The pipeline; exit code 0, 2 for a bad flag, 1 for a refusal (one line on stderr: see common.main)."""
    return common.main(run_stages, argv, description=__doc__, prog="python -m experiments.tldr.run")


def run_stages(setup: common.Setup) -> int:
    cfg = setup.cfg
    for stage in cfg.stage_list:
        if cfg.resume and _complete(setup, stage):
            _say(f"[tldr] {stage}: finished earlier, skipped")
            continue
        t0 = time.perf_counter()
        result = RUNNERS[stage](setup)
        _say(f"[tldr] {stage}: {result.summary} ({time.perf_counter() - t0:.1f} s)")
        if not _complete(setup, stage):
            _say(f"[tldr] {stage} stopped before its last step; continue with --resume")
            return 0
    return 0


def _complete(setup: common.Setup, stage: str) -> bool:
    """The stage reached its last step (and, for rm, stored the reward normalisation)."""
    if not common.stage_finished(setup, stage):
        return False
    return stage != "rm" or "reward_norm" in checkpoint.restore_meta(setup.cfg.out, "rm")


def _say(text: str) -> None:
    if common.main_process():
        print(text, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
