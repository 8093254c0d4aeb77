"""The loop around a stage: resume, per-step keys, timing, metrics JSONL, tqdm, checkpoints, NaN checks.

A stage is `n_steps` calls of `step_fn(state, step, key) -> (state, metrics)`, where `step_fn` fetches
its own batch for `step` (so the data position is the step number) and calls jitted code; `key` is
`fold_in(root_key, step)`, so a resumed run replays the same randomness and the same data, and ends
bitwise equal to an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
from tqdm.auto import tqdm

from jaxrlhf import checkpoint


class NonFiniteError(FloatingPointError):
    """A loss, gradient or reward was NaN or inf; the update was not applied."""


def check_finite(metrics: dict[str, float], stage: str, step: int) -> None:
    """Raise a one-line NonFiniteError if `metrics` report a skipped update or hold NaN/inf."""
    bad = [k for k, v in metrics.items() if not math.isfinite(v)]
    if metrics.get("finite", 1.0) < 1.0 or bad:
        what = ", ".join(bad) if bad else "loss or gradient"
        raise NonFiniteError(
            f"{stage} step {step}: non-finite {what}; the update was not applied and no checkpoint was "
            "written. Lower the learning rate, check the data/rewards, or resume from the last checkpoint."
        )


class MetricsWriter:
    """Append-only JSONL, one record per line; on resume, records after the resumed step are dropped
    so the file reads like an uninterrupted run."""

    def __init__(self, path: str | pathlib.Path, resume_step: int | None = None):
        self.path = pathlib.Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            keep = []
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill
                if rec.get("step", -1) <= resume_step:
                    keep.append(line)
            self.path.write_text("".join(x + "\n" for x in keep))
        self._file = open(self.path, "a")

    def write(self, record: dict) -> None:
        if jax.process_index() == 0:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()

    def close(self) -> None:
        self._file.close()


def check_output_dir(path: str | os.PathLike, *, flag: str = "--out") -> None:
    """Refuse, before any work, a run directory that cannot be written: a file, a path under a file, or a
    folder this process may not write into. Nothing is created. Remote paths (gs://...) are not checked.

    Raises:
      NotADirectoryError / PermissionError: one line naming `flag`, the path and the fix.
    """
    text = os.fspath(path)
    if "://" in text:
        return
    target = pathlib.Path(text).expanduser().absolute()
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(
            f"{flag} {text} is a file, not a directory; pass a directory (it is created if missing)"
        )
    existing = target
    while not existing.exists():  # the nearest existing folder, where the run would create its own
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(
            f"{flag} {text} is under {existing}, which is a file; pass a directory path outside it"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(
            f"{flag} {text}: {existing} is read-only for this user; pass a directory you can write to"
        )


def read_metrics(path: str | pathlib.Path) -> list[dict]:
    return [json.loads(x) for x in pathlib.Path(path).read_text().splitlines() if x.strip()]


@dataclasses.dataclass
class StageResult:
    state: Any
    history: list[dict]
    summary: dict


class CompileTimer:
    """Seconds JAX spends compiling while it is open: the trace, lowering and XLA-compile durations
    JAX reports through jax.monitoring ("/jax/core/compile/..."), summed over every program."""

    def __init__(self):
        self.seconds = 0.0
        self._listener = self._record  # one bound method, so that close() removes what was added
        jax.monitoring.register_event_duration_secs_listener(self._listener)

    def _record(self, event: str, duration: float, **_) -> None:
        if event.startswith("/jax/core/compile/"):
            self.seconds += duration

    def close(self) -> None:
        jax.monitoring.unregister_event_duration_listener(self._listener)


def run_stage(
    *,
    run_dir: str | pathlib.Path,
    stage: str,
    state: Any,
    step_fn: Callable[[Any, int, jax.Array], tuple[Any, dict]],
    n_steps: int,
    root_key: jax.Array,
    resume: bool = False,
    meta: dict | None = None,
    ckpt_every: int = 0,
    keep: int = 2,
    tokenizer: str | pathlib.Path | None = None,
    eval_fn: Callable[[Any], dict] | None = None,
    eval_every: int = 0,
    log_every: int = 1,
    tokens_per_step: int | None = None,
    progress: bool = True,
    stop_after: int | None = None,
) -> StageResult:
    """Run (or resume) one stage and checkpoint it.

    Args:
      run_dir: the run directory; this stage writes `<run_dir>/<stage>/` (checkpoints) and
        `<run_dir>/<stage>.jsonl` (metrics).
      stage: stage name.
      state: the initial state (its shardings are used to restore onto, whatever mesh saved it).
      step_fn: (state, step, key) -> (state, metrics of scalars).
      n_steps: total steps of the stage.
      root_key: the stage's root key; step keys are fold_in(root_key, step).
      resume: continue from the stage's latest checkpoint if there is one.
      meta: JSON-able dict saved with every checkpoint and checked on resume (e.g. the configs), so a
        checkpoint from another config is refused with a one-line error.
      ckpt_every: checkpoint every this many steps (0: only at the end).
      keep: checkpoints kept per stage.
      tokenizer: tokenizer file / directory saved with each checkpoint.
      eval_fn: state -> dict of scalars, run every `eval_every` steps and at the end.
      log_every: fetch and write metrics every this many steps (and the first and last).
      tokens_per_step: for tokens/s in the summary.
      progress: show a tqdm bar.
      stop_after: stop (without the final save) after this many steps of this call (tests of resume).

    Returns:
      StageResult(state, history of metric records, summary with wall / compile / step times).
    """
    meta = dict(meta or {})
    start = 0
    if resume and checkpoint.has_stage(run_dir, stage):
        state, saved = checkpoint.restore(
            run_dir, stage, state, meta_check={"config": meta.get("config")} if "config" in meta else None
        )
        start = int(saved["step"])
    elif not resume and checkpoint.has_stage(run_dir, stage):
        raise FileExistsError(
            f"{pathlib.Path(run_dir) / stage} already holds checkpoints; pass resume=True "
            "(--resume) to continue it, or use another output directory."
        )
    writer = MetricsWriter(pathlib.Path(run_dir) / f"{stage}.jsonl", start if resume else None)
    compile_time = CompileTimer()
    history: list[dict] = []
    t_stage = time.perf_counter()
    first_step_s = None
    t_after_first = None
    eval_s = 0.0
    bar = tqdm(
        total=n_steps,
        initial=start,
        desc=stage,
        disable=not progress or jax.process_index() != 0,
        file=sys.stderr,
        dynamic_ncols=True,
        leave=True,
    )

    def save(step: int):
        checkpoint.save(
            run_dir, stage, step, state, meta={**meta, "step": step}, keep=keep, tokenizer=tokenizer
        )

    end = n_steps if stop_after is None else min(n_steps, start + stop_after)
    try:
        for step in range(start, end):
            key = jax.random.fold_in(root_key, step)
            t0 = time.perf_counter()
            state, metrics = step_fn(state, step, key)
            last = step == n_steps - 1
            if step % log_every == 0 or last or step == start:
                values = {k: float(v) for k, v in jax.device_get(metrics).items()}
                check_finite(values, stage, step)
            else:
                values = None
            if first_step_s is None:
                jax.block_until_ready(state)
                t_after_first = time.perf_counter()
                first_step_s = t_after_first - t0
            if eval_fn is not None and ((eval_every and (step + 1) % eval_every == 0) or last):
                values = values or {k: float(v) for k, v in jax.device_get(metrics).items()}
                t_eval = time.perf_counter()
                values.update({f"eval/{k}": float(v) for k, v in eval_fn(state).items()})
                eval_s += time.perf_counter() - t_eval
            if values is not None:
                record = {"step": step + 1, **values, "time_s": round(time.perf_counter() - t_stage, 4)}
                writer.write(record)
                history.append(record)
                bar.set_postfix({k: f"{v:.4g}" for k, v in list(values.items())[:4]}, refresh=False)
            bar.update(1)
            if ckpt_every and (step + 1) % ckpt_every == 0 and not last:
                save(step + 1)
        if end == n_steps and (start < n_steps or not checkpoint.has_stage(run_dir, stage)):
            save(n_steps)
    finally:
        bar.close()
        writer.close()
        compile_time.close()
    jax.block_until_ready(state)
    t_end = time.perf_counter()
    wall = t_end - t_stage
    steps_run = end - start
    # Steady-state time per step: everything after the first (compiling) step, synchronised at the end.
    typical = (t_end - t_after_first - eval_s) / (steps_run - 1) if steps_run > 1 and t_after_first else 0.0
    summary = {
        "stage": stage,
        "steps": steps_run,
        "eval_s": round(eval_s, 3),
        "wall_s": round(wall, 3),
        # Tracing, lowering and XLA compilation of every program the stage compiled (steps, evaluation).
        "compile_s": round(compile_time.seconds, 3),
        # The first step's time beyond a steady step: its compilation and first-call setup.
        "first_step_overhead_s": round(max((first_step_s or 0.0) - typical, 0.0), 3),
        "step_s": round(typical, 6),
        "steps_per_s": round(1.0 / typical, 2) if typical else None,
    }
    if tokens_per_step and typical:
        summary["tokens_per_s"] = round(tokens_per_step / typical, 1)
    return StageResult(state=state, history=history, summary=summary)
