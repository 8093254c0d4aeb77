"""Stage 1: supervised fine-tuning on TL;DR post -> reference summary.

    python -m experiments.tldr.sft --model gpt2 --out runs/tldr [--resume] [--bf16] [--mesh-fsdp N]

Next-token cross-entropy on the summary tokens only (jaxrlhf.pipeline.lm: the LM head run on the summary
positions only), global batches split over every device; held-out NLL per summary token every
--sft.eval_every steps. Writes <out>/sft/<step>/ (checkpoints), <out>/sft.jsonl (metrics) and
<out>/sft_summary.json.
"""

from __future__ import annotations

import dataclasses
import sys

import jax

from experiments.tldr import common
from jaxrlhf import runner
from jaxrlhf.pipeline import lm
from jaxrlhf.pipeline import setup as stage_setup


def run(setup: common.Setup) -> runner.StageResult:
    cfg = setup.cfg
    rows, val = common.load_summaries(setup, need=(cfg.sft.batch_size, "--sft.batch_size"))
    run = common.stage_run(cfg, "sft")
    k_init, k_steps = jax.random.split(run.root_key)
    params = stage_setup.initial_params(setup, k_init)
    return lm.run_lm_stage(setup, cfg.sft, dataclasses.replace(run, root_key=k_steps), rows, val, params)


def main(argv=None) -> int:
    return common.main(run, argv, stages=["sft"], description=__doc__, prog="python -m experiments.tldr.sft")


if __name__ == "__main__":
    sys.exit(main())
