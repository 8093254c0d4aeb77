"""What a pipeline's top-level config has in common, and the loop over its stages.

The convention (experiments/tldr's TldrConfig, experiments/sst2's Sst2Config): the `setup.ModelSpec`
fields, `out`, `resume`, `seed`, `progress`, `stages` ("sft,rm,ppo"), `stop_after` ("STAGE:N") at the top
level, a `data` config with `data_dir`, `cache_dir`, `tokenizer_dir` and `seed`, and one field per stage
holding that stage's config. The functions here read only those fields.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

from jaxrlhf.pipeline import handoff
from jaxrlhf.pipeline.handoff import StageRun
from jaxrlhf.pipeline.setup import Setup

# Fields that only change logging / checkpoint cadence: left out of the resume check.
CADENCE_FIELDS = ("eval_every", "ckpt_every", "log_every", "sample_every", "samples_logged")
MODEL_KEYS = ("model", "init_from", "n_layer", "n_head", "n_embd", "dropout", "bf16", "remat", "seed")
LOCATION_FIELDS = ("data_dir", "cache_dir", "tokenizer_dir")


def stage_list(stages: str) -> list[str]:
    """The names of a comma-separated --stages."""
    return [s.strip() for s in stages.split(",") if s.strip()]


def check_stages(stages: str, stop_after: str, known: Sequence[str]) -> None:
    """Refuse a --stages naming no or unknown stages and a --stop-after that is not STAGE:N.

    Raises:
      ValueError: one line naming the flag and the fix.
    """
    names = stage_list(stages)
    unknown = set(names) - set(known)
    if unknown:
        raise ValueError(f"--stages has unknown {sorted(unknown)}; use a subset of {','.join(known)}")
    if not names:
        raise ValueError(f"stages={stages!r}; name at least one of {','.join(known)}")
    if stop_after:
        name, _, n = stop_after.partition(":")
        if name not in known or not n.isdigit():
            raise ValueError(f"stop_after={stop_after!r}; use STAGE:N, e.g. {known[-1]}:3")


def stop_after_for(stop_after: str, stage: str) -> int | None:
    """Steps this invocation may run of `stage` under a checked --stop-after (None: to the end)."""
    if not stop_after:
        return None
    name, _, n = stop_after.partition(":")
    return int(n) if name == stage else None


def stage_meta(cfg: Any, stage: str) -> dict:
    """The checkpoint meta of `stage`: everything that must match to resume it (not locations, mesh, or
    logging cadence): {"config": {"model": ..., "data": ..., stage: ...}}."""
    stage_cfg = dataclasses.asdict(getattr(cfg, stage))
    for name in CADENCE_FIELDS:
        stage_cfg.pop(name, None)
    data_cfg = dataclasses.asdict(cfg.data)
    for name in LOCATION_FIELDS:
        data_cfg.pop(name, None)
    config = {"model": {k: getattr(cfg, k) for k in MODEL_KEYS}, "data": data_cfg, stage: stage_cfg}
    return {"config": config}


def stage_run(cfg: Any, stage: str, index: int) -> StageRun:
    """Where and how `stage` runs; its root key is fold_in(key(seed), index)."""
    return StageRun(
        stage=stage,
        out=cfg.out,
        resume=cfg.resume,
        meta=stage_meta(cfg, stage),
        root_key=jax.random.fold_in(jax.random.key(cfg.seed), index),
        data_seed=cfg.data.seed,
        progress=cfg.progress,
        stop_after=stop_after_for(cfg.stop_after, stage),
    )


def say(text: str) -> None:
    """One line on stderr from process 0."""
    if handoff.main_process():
        print(text, file=sys.stderr, flush=True)


def run_stages(
    setup: Setup,
    names: Sequence[str],
    runners: Mapping[str, Callable[[Setup], Any]],
    finished: Callable[[Setup, str], bool],
    *,
    resume: bool,
    tag: str,
) -> int:
    """Run the stages `names` in order; with `resume`, finished ones are skipped. A stage that stops
    before its last step (--stop-after) ends the pipeline with a line saying to resume. Returns 0."""
    for stage in names:
        if resume and finished(setup, stage):
            say(f"[{tag}] {stage}: finished earlier, skipped")
            continue
        t0 = time.perf_counter()
        result = runners[stage](setup)
        say(f"[{tag}] {stage}: {result.summary} ({time.perf_counter() - t0:.1f} s)")
        if not finished(setup, stage):
            say(f"[{tag}] {stage} stopped before its last step; continue with --resume")
            return 0
    return 0
