"""Stage 1: language modelling of SST-2 training sentences (the loss on every sentence token).

    python -m experiments.sst2.sft --model gpt2 --out runs/sst2 [--resume] [--bf16] [--mesh-fsdp N]

[eos | " " + sentence + eos] rows (jaxrlhf.pipeline.lm with a one-token prompt); held-out NLL per token
on the validation sentences every --sft.eval_every steps. Writes <out>/sft/<step>/, <out>/sft.jsonl and
<out>/sft_summary.json.
"""

from __future__ import annotations

import dataclasses
import sys

import jax

from experiments.sst2 import common
from jaxrlhf import runner
from jaxrlhf.pipeline import lm
from jaxrlhf.pipeline import setup as stage_setup


def run(setup: common.Setup) -> runner.StageResult:
    cfg = setup.cfg
    rows, val = common.load_sentences(setup, need=(cfg.sft.batch_size, "--sft.batch_size"))
    run = common.stage_run(cfg, "sft")
    k_init, k_steps = jax.random.split(run.root_key)
    params = stage_setup.initial_params(setup, k_init)
    return lm.run_lm_stage(setup, cfg.sft, dataclasses.replace(run, root_key=k_steps), rows, val, params)


def main(argv=None) -> int:
    return common.main(run, argv, stages=["sft"], description=__doc__, prog="python -m experiments.sst2.sft")


if __name__ == "__main__":
    sys.exit(main())
