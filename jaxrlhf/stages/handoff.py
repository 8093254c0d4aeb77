"""Between stages: what a stage run is (`StageRun`) and the checkpoint handoff from an earlier stage; files
a stage writes beside its checkpoints (from process 0)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
from etils import epath

from jaxrlhf import parallel
from jaxrlhf.engine import checkpoint, memory


class StageError(RuntimeError):
    """An earlier stage's checkpoint is missing or unfinished (run or finish that stage first)."""


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

    @property
    def out_path(self) -> epath.Path:
        return epath.Path(self.out)


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
    """`record` as indented JSON at `path` (local or gs://), from process 0 only."""
    if main_process():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2) + "\n")


