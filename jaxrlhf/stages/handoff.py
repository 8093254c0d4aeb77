"""Between stages: what a stage run is (`StageRun`) and the checkpoint handoff from an earlier stage; files
a stage writes beside its checkpoints (from process 0)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np
from etils import epath

from jaxrlhf import parallel
from jaxrlhf.engine import checkpoint, memory
from jaxrlhf.rollout import Rollout
from jaxrlhf.validate import check_at_least


class StageError(RuntimeError):
    """An earlier stage's checkpoint is missing or unfinished (run or finish that stage first)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class StepsConfig:
    """What a supervised stage's loop needs (LM and reward stages add their data fields and optimizer).

    Attributes:
      steps: optimizer steps.
      batch_size: global rows (or comparisons) per step (a multiple of the device count).
      eval_batch_size: global rows (or comparisons) per held-out batch.
      eval_every: held-out evaluation every this many steps (and at the end).
      ckpt_every: checkpoint every this many steps (and at the end).
      log_every: write metrics every this many steps.
    """

    steps: int = 1000
    batch_size: int = 64
    eval_batch_size: int = 64
    eval_every: int = 200
    ckpt_every: int = 500
    log_every: int = 10

    def __post_init__(self):
        check_at_least(self, 1, "steps", "batch_size", "eval_batch_size", "log_every")
        check_at_least(self, 0, "eval_every", "ckpt_every")

    @property
    def full_optim(self):
        """The stage's `optim` with total_steps filled in (default: `steps`)."""
        return dataclasses.replace(self.optim, total_steps=self.optim.total_steps or self.steps)


@dataclasses.dataclass(frozen=True, kw_only=True)
class StageRun:
    """Where and how one stage runs (what `loop.run_stage` needs beyond the stage's own config).

    Attributes:
      stage: its name: checkpoints under <out>/<stage>/, metrics in <out>/<stage>.jsonl, the summary in
        <out>/<stage>_summary.json.
      out: the run directory (--out).
      resume: continue from the stage's newest good checkpoint.
      meta: what must match to resume (`{"config": ...}`), saved with every checkpoint.
      root_key: the stage's root PRNG key.
      data_seed: fixes the batch order.
      progress: tqdm bars.
      stop_after: stop after this many steps of this invocation (None: to the end).
      aux_keys: [2] keys a stage uses beside its steps' (the RL stage's evaluations and normalisation
        samples); None: folded from root_key.
      tensorboard: the metrics as TensorBoard events too (<out>/tb/<stage>/).
      wandb: a Weights & Biases project the metrics go to too (None: none).
    """

    stage: str
    out: str
    resume: bool
    meta: dict
    root_key: jax.Array
    data_seed: int
    progress: bool = True
    stop_after: int | None = None
    aux_keys: jax.Array | None = None
    tensorboard: bool = True
    wandb: str | None = None

    @property
    def out_path(self) -> epath.Path:
        return epath.Path(self.out)


def run_meta(run: StageRun, setup, **extra) -> dict:
    """The meta saved with the stage's checkpoints: `run.meta` (checked on resume), the model config the
    params are for (what an export reads: `jaxrlhf.export`) and `extra`."""
    return {**run.meta, "model_config": json.loads(json.dumps(dataclasses.asdict(setup.model_cfg))), **extra}


def loop_args(run: StageRun, setup, scfg, *, root_key=None, meta: dict | None = None) -> dict:
    """The arguments of `loop.run_stage` that the stage `run` describes: its directory, name, resume flag,
    meta (`run_meta` plus `meta`), tokenizer, progress, stop-after, metric sinks, and the stage config
    `scfg`'s ckpt_every and log_every (and eval_every when it has one); `root_key` defaults to the run's.
    A stage adds its state, step_fn, n_steps (and eval_fn, tokens_per_step)."""
    out = dict(
        run_dir=run.out, stage=run.stage, root_key=run.root_key if root_key is None else root_key,
        resume=run.resume, meta=run_meta(run, setup, **(meta or {})), tokenizer=setup.tokenizer_path,
        progress=run.progress, stop_after=run.stop_after, tensorboard=run.tensorboard, wandb=run.wandb,
        ckpt_every=scfg.ckpt_every, log_every=scfg.log_every,
    )  # fmt: skip
    if hasattr(scfg, "eval_every"):
        out["eval_every"] = scfg.eval_every
    return out


def place_state(state: Any, mesh) -> Any:
    """`parallel.put(state, mesh)`, then the programs that built it dropped: a state built op by op
    (params, optimizer moments, a value head) compiles one small program per op and shape, each holding
    ~1 MB of host memory on XLA:CPU for as long as JAX caches them (`memory.drop_programs`)."""
    state = parallel.put(state, mesh)
    memory.drop_programs()
    return state


# --------------------------------------------------------------------------------------- checkpoints


def state_target(mesh, init_fn) -> Any:
    """Abstract sharded target of the state `init_fn(key)` builds, to restore a checkpoint into."""
    shapes = jax.eval_shape(init_fn, jax.random.key(0))
    return checkpoint.abstract_like(shapes, parallel.tree_shardings(shapes, mesh))


def stage_finished(out: str, stage: str, steps: int) -> bool:
    """Whether `stage`'s newest good checkpoint under `out` is at its last step `steps` (a damaged last
    step does not count: `--resume` falls back past it)."""
    step, _ = checkpoint.latest_good_step(out, stage)
    return step is not None and step >= steps


def restore_finished(out: str, stage: str, steps: int, target: Any) -> tuple[Any, dict]:
    """The final state + meta of an earlier stage of `steps` steps.

    Raises:
      FileNotFoundError: no checkpoint of `stage` under `out`.
      StageError: the stage stopped before its last step.
    """
    if not checkpoint.has_stage(out, stage):
        raise FileNotFoundError(f"no {stage} checkpoint under {out}: run the {stage} stage first")
    meta = checkpoint.restore_meta(out, stage)
    if meta["step"] < steps:
        raise StageError(
            f"the {stage} stage under {out} stopped at step {meta['step']} of {steps}: "
            f"finish it with --stages {stage} --resume"
        )
    return checkpoint.restore(out, stage, target)


def main_process() -> bool:
    return jax.process_index() == 0


def write_json(path: epath.Path, record: dict) -> None:
    """`record` as indented JSON at `path` (local or gs://), from process 0 only; written whole (a .tmp file
    renamed over it: a data stage counts as finished once its summary exists)."""
    if main_process():
        path = epath.Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / (path.name + ".tmp")
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        tmp.replace(path)


# ------------------------------------------------------------------- rewards handed to an RL stage


class LearnedReward(NamedTuple):
    """A reward model {"gpt", "head"} of the policy's architecture, scored inside the jitted iteration.

    Attributes:
      params: the scalar model.
      reference: the reward stage's statistics of reference-row scores ({"mean", "std", "rows"}), for
        reward_norm "reference_mean".
    """

    params: dict
    reference: dict


class HostReward(NamedTuple):
    """A reward computed on the host between the sampler and the learner.

    Attributes:
      score: rollout (host NumPy arrays) -> [B] float32 scores (e.g. `rollout.make_text_reward`).
    """

    score: Callable[[Rollout], np.ndarray]
