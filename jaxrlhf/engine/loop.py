"""The loop around a stage: resume, per-step keys, timing, metrics JSONL, tqdm, checkpoints, NaN checks.

A stage is `n_steps` calls of `step_fn(state, step, key) -> (state, metrics)`, where `step_fn` fetches
its own batch for `step` (so the data position is the step number) and calls jitted code; `key` is
`fold_in(root_key, step)`, so a resumed run replays the same randomness and the same data, and ends
bitwise equal to an uninterrupted one.

Faults (the pipelines rely on these):
  - `outdir.check_resume` runs every refusal of a resume (or of a fresh run over finished stages)
    before a pipeline writes anything; `outdir.lock` allows one run per run directory.
  - On resume a damaged latest checkpoint is set aside with a one-line warning and the stage goes on
    from the newest good one (`checkpoint.latest_good_step`).
  - SIGTERM or SIGINT (Ctrl-C) during a stage saves a checkpoint at the next step boundary and raises
    `Preempted`
    (exit code 143, 130 for SIGINT) after one line on stderr; a resume then continues as after a SIGKILL.
    Other loops that write whole pieces (the online data stages' shards) stop the same way
    (`stop_requests`, `preempted`). Outside such loops (setup, data preparation) a pipeline's `interrupts`
    turns Ctrl-C into a KeyboardInterrupt at once and remembers it (`interrupted`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import pathlib
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from jaxrlhf.engine import checkpoint, memory, outdir

PathLike = str | os.PathLike


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
    """Append-only JSONL, one record per line, written by process 0 through etils epath (local or
    gs://); on resume, records after the resumed step are dropped so the file reads like an
    uninterrupted run.

    Local files are appended to and flushed per record. Object stores (gs://) cannot append, so there
    the whole file is rewritten at most every `flush_every_s` seconds, by `flush()` (run_stage calls it
    before each checkpoint, so every record up to a checkpoint is stored) and by `close()`.
    """

    def __init__(self, path: PathLike, resume_step: int | None = None, *, flush_every_s: float = 30.0):
        self.path = checkpoint.resolve(path)
        self._main = jax.process_index() == 0
        self._append = not checkpoint.is_remote(path)
        self._lines: list[str] = []
        self._file = None
        self._flush_every_s, self._flushed_at = flush_every_s, time.monotonic()
        if not self._main:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        keep = []
        if resume_step is not None and self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill
                if rec.get("step", -1) <= resume_step:
                    keep.append(line)
        self.path.write_text("".join(x + "\n" for x in keep))
        if self._append:
            self._file = self.path.open("a")
        else:
            self._lines = keep

    def write(self, record: dict) -> None:
        if not self._main:
            return
        line = json.dumps(record)
        if self._file is not None:
            self._file.write(line + "\n")
            self._file.flush()
        else:
            self._lines.append(line)
            if time.monotonic() - self._flushed_at >= self._flush_every_s:
                self.flush()

    def flush(self) -> None:
        """Make every record written so far durable (a no-op for local files, already flushed)."""
        if self._main and self._file is None:
            self.path.write_text("".join(x + "\n" for x in self._lines))
            self._flushed_at = time.monotonic()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        else:
            self.flush()


class ScalarSinks:
    """The records of `MetricsWriter` as TensorBoard scalars (tensorboardX event files under
    <run_dir>/tb/<stage>/) and, when a project is named, Weights & Biases (`wandb`, installed by the user),
    from process 0. On resume, TensorBoard drops the events after the resumed step (`purge_step`), as the
    JSONL does. On gs:// the event file is written locally and copied up at each flush."""

    def __init__(self, run_dir: PathLike, stage: str, resume_step: int | None, *, tensorboard: bool = True,
                 wandb: str | None = None, config: dict | None = None):  # fmt: skip
        self.stage, self._tb, self._wandb, self._remote, self._logdir = stage, None, None, None, None
        if jax.process_index() != 0:
            return
        if tensorboard:
            target = checkpoint.resolve(run_dir) / "tb" / stage
            if checkpoint.is_remote(run_dir):
                import tempfile  # noqa: PLC0415

                self._remote, logdir = target, tempfile.mkdtemp(prefix="jaxrlhf_tb_")
            else:
                target.mkdir(parents=True, exist_ok=True)
                logdir = os.fspath(target)
            self._logdir = logdir
            self._tb = self._open(purge_step=resume_step + 1 if resume_step is not None else None)
        if wandb:
            import wandb as wandb_lib  # noqa: PLC0415  (checked at parse time: `check_wandb`)

            self._wandb = wandb_lib.init(project=wandb, name=f"{checkpoint.resolve(run_dir).name}/{stage}",
                                         config=config, resume="allow", reinit=True)  # fmt: skip

    def write(self, record: dict) -> None:
        step = int(record["step"])
        values = {k: float(v) for k, v in record.items() if k != "step" and isinstance(v, int | float)}
        if self._tb is not None:
            for name, value in values.items():
                self._tb.add_scalar(name, value, step)
        if self._wandb is not None:
            self._wandb.log(
                {f"{self.stage}/{k}": v for k, v in values.items()} | {f"{self.stage}/step": step}
            )

    def _open(self, purge_step: int | None = None):
        """A tensorboardX writer on a new event file (named to the nanosecond and the process: a resume within
        the same second must not truncate the file before it)."""
        suffix = f".{os.getpid()}.{time.time_ns()}"
        return _summary_writer_class()(
            self._logdir, purge_step=purge_step, flush_secs=30, filename_suffix=suffix
        )

    def flush(self) -> None:
        """Every event written so far on disk (and on gs://): tensorboardX's own flush does not wait for its
        writer thread, its close does; the next events go to a new file."""
        if self._tb is not None:
            self._tb.close()
            self._copy_up()
            self._tb = self._open()

    def _copy_up(self) -> None:
        if self._remote is not None:
            self._remote.mkdir(parents=True, exist_ok=True)
            for path in pathlib.Path(self._logdir).iterdir():
                (self._remote / path.name).write_bytes(path.read_bytes())

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._copy_up()
            if self._remote is not None:  # the local copy of a gs:// log dir
                shutil.rmtree(self._logdir, ignore_errors=True)
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _summary_writer_class():
    """tensorboardX's SummaryWriter, loaded without torch: tensorboardX imports torch wherever it is
    installed, for torch-tensor features that scalars never use, which costs a run ~1.3 s and ~170 MB of
    peak RSS (HappyGPT's whole default run: 790 MB instead of 620). Where torch is already loaded, or
    tensorboardX is, nothing changes."""
    if "torch" in sys.modules or "tensorboardX" in sys.modules:
        from tensorboardX import SummaryWriter  # noqa: PLC0415

        return SummaryWriter
    sys.modules["torch"] = None  # `import torch` raises ImportError while tensorboardX loads (it allows that)
    try:
        from tensorboardX import SummaryWriter  # noqa: PLC0415
    finally:
        del sys.modules["torch"]
    return SummaryWriter


def check_wandb(project: str) -> None:
    """Refuse --wandb PROJECT where wandb is not installed (one line, before any work)."""
    if project:
        try:
            import wandb  # noqa: F401, PLC0415
        except ImportError:
            raise ValueError(
                f"wandb={project!r}; Weights & Biases is not installed: pip install wandb, or drop it"
            ) from None


def read_metrics(path: PathLike) -> list[dict]:
    return [json.loads(x) for x in checkpoint.resolve(path).read_text().splitlines() if x.strip()]


# -------------------------------------------------------------------------------------- preemption


class Preempted(SystemExit):
    """SIGTERM or SIGINT stopped a stage after saving it at a step boundary; exits with 128 + the signal
    (143 for SIGTERM, 130 for SIGINT), what a shell reports for a process that signal ended."""

    def __init__(self, message: str, signum: int = signal.SIGTERM):
        super().__init__(128 + signum)
        self.message = message

    def __str__(self) -> str:
        return self.message


class _Interrupt:
    """The SIGINT that `interrupts` raised as a KeyboardInterrupt (0: none), kept until it ends."""

    signum = 0


@contextlib.contextmanager
def interrupts():
    """While inside (a pipeline's whole run), Ctrl-C (SIGINT) outside a step loop raises KeyboardInterrupt at
    once and is remembered (`interrupted`): Python drops a KeyboardInterrupt raised inside a garbage
    collector callback or a __del__ (it only prints "Exception ignored"), so the run checks at its next
    boundary (a stage, a shard, a step: `stop_requests` takes it as a stop request) and stops there. Those
    dropped KeyboardInterrupts are not printed. Main thread only (signal handlers live there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        _Interrupt.signum = signum
        raise KeyboardInterrupt

    def unraisable(info):
        if not (info.exc_type and issubclass(info.exc_type, KeyboardInterrupt)):
            hook(info)

    hook = sys.unraisablehook
    previous = signal.signal(signal.SIGINT, handler)
    sys.unraisablehook = unraisable
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        sys.unraisablehook = hook
        _Interrupt.signum = 0


def interrupted() -> bool:
    """Whether a Ctrl-C arrived under `interrupts` (even one whose KeyboardInterrupt was dropped)."""
    return bool(_Interrupt.signum)


def check_interrupted() -> None:
    """Raise KeyboardInterrupt if a Ctrl-C arrived under `interrupts` (a boundary of the run)."""
    if _Interrupt.signum:
        raise KeyboardInterrupt


class StopRequests:
    """The first stopping signal (SIGTERM or SIGINT) that arrived while inside, or 0 (a Ctrl-C that arrived
    before, under `interrupts`, counts); a second SIGINT raises KeyboardInterrupt at once (a user who does
    not want to wait for the boundary)."""

    def __init__(self):
        self.signum = _Interrupt.signum

    def _handler(self, signum, frame):
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = self.signum or signum


@contextlib.contextmanager
def stop_requests():
    """Catch SIGTERM and SIGINT while inside (main thread only: signal handlers live there): a loop checks
    `stop_requested` at each boundary and stops there (`preempted`)."""
    requests = StopRequests()
    if threading.current_thread() is not threading.main_thread():
        yield requests
        return
    previous = {s: signal.signal(s, requests._handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield requests
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def stop_requested(requests: StopRequests) -> int:
    """The signal any process got (0: none); collective with several processes, so all stop at one step."""
    if jax.process_count() == 1:
        return requests.signum
    from jax.experimental import multihost_utils

    return int(np.max(multihost_utils.process_allgather(np.int32(requests.signum))))


def preempted(signum: int, what: str) -> Preempted:
    """The `Preempted` of a loop stopped at a boundary by `signum`, its one line printed (process 0):
    "<SIGNAL>: stopped <what>; rerun with --resume to continue (exit code N)"."""
    message = (
        f"{signal.Signals(signum).name}: stopped {what}; rerun with --resume to continue (exit code "
        f"{128 + signum})"
    )
    if jax.process_index() == 0:
        print(message, file=sys.stderr, flush=True)
    return Preempted(message, signum)


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
    run_dir: PathLike,
    stage: str,
    state: Any,
    step_fn: Callable[[Any, int, jax.Array], tuple[Any, dict]],
    n_steps: int,
    root_key: jax.Array,
    resume: bool = False,
    meta: dict | None = None,
    ckpt_every: int = 0,
    keep: int = 2,
    tokenizer: PathLike | None = None,
    eval_fn: Callable[[Any], dict] | None = None,
    eval_every: int = 0,
    log_every: int = 1,
    tokens_per_step: int | None = None,
    progress: bool = True,
    stop_after: int | None = None,
    tensorboard: bool = True,
    wandb: str | None = None,
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
      resume: continue from the stage's newest good checkpoint if there is one; damaged newer ones
        are renamed to `<step>.damaged` with a one-line warning on stderr.
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
      tensorboard: the metrics as TensorBoard events under <run_dir>/tb/<stage>/ too.
      wandb: a Weights & Biases project the metrics go to too (None: none).

    Returns:
      StageResult(state, history of metric records, summary with wall / compile / step times).

    Raises:
      Preempted: SIGTERM or SIGINT arrived during the stage; the state was saved at the next step boundary.
      FileExistsError, ValueError, checkpoint.DamagedCheckpointError: see `outdir.check_resume`.
    """
    meta = dict(meta or {})
    start = 0
    if resume:
        good, damaged = checkpoint.latest_good_step(run_dir, stage)
        if good is not None:
            meta_check = {"config": meta.get("config")} if "config" in meta else None
            state, saved = checkpoint.restore(run_dir, stage, state, step=good, meta_check=meta_check)
            start = int(saved["step"])
        if damaged:  # only once the good step restored: a refused resume renames nothing
            moved = checkpoint.set_aside(run_dir, stage, list(damaged))
            if jax.process_index() == 0:
                what = "; ".join(f"step {s} ({damaged[s]}) moved to {moved[s].name}" for s in sorted(damaged))
                print(
                    f"warning: {stage} checkpoint damaged under {checkpoint.resolve(run_dir) / stage}: "
                    f"{what}; resuming from step {good}",
                    file=sys.stderr,
                    flush=True,
                )
    elif checkpoint.has_stage(run_dir, stage):
        raise outdir.exists_error(run_dir, stage)
    writer = MetricsWriter(checkpoint.resolve(run_dir) / f"{stage}.jsonl", start if resume else None)
    sinks = ScalarSinks(run_dir, stage, start if resume else None, tensorboard=tensorboard, wandb=wandb,
                        config=(meta or {}).get("config"))  # fmt: skip
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
        writer.flush()  # the metrics up to a checkpoint are stored before it is
        sinks.flush()
        checkpoint.save(
            run_dir, stage, step, state, meta={**meta, "step": step}, keep=keep, tokenizer=tokenizer
        )

    trim = memory.PeriodicTrim()  # freed heap back to the OS about once a second (jaxrlhf.memory)
    end = n_steps if stop_after is None else min(n_steps, start + stop_after)
    stopped_at = None  # the step a SIGTERM stopped the stage at (saved there)
    try:
        with stop_requests() as requests:
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
                    sinks.write(record)
                    history.append(record)
                    bar.set_postfix({k: f"{v:.4g}" for k, v in list(values.items())[:4]}, refresh=False)
                bar.update(1)
                trim()
                stop = stop_requested(requests)
                if ((ckpt_every and (step + 1) % ckpt_every == 0) or stop) and not last:
                    save(step + 1)
                if stop:
                    stopped_at, end = step + 1, step + 1
                    break
            if end == n_steps and (start < n_steps or not checkpoint.has_stage(run_dir, stage)):
                save(n_steps)
            if stopped_at is None and stop_requested(requests):  # during the final save or evaluation
                stopped_at = end
    finally:
        bar.close()
        writer.close()
        sinks.close()
        compile_time.close()
    if stopped_at is not None:
        raise preempted(
            stop_requested(requests),
            f"{stage} at step {stopped_at} of {n_steps}, checkpoint saved under "
            f"{checkpoint.resolve(run_dir) / stage}",
        )
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


def plot_metrics(path: PathLike, history: list[dict], keys: tuple[str, ...]) -> None:
    """A PNG at `path` (local or gs://) with one panel per key of `keys` the records of `history` hold,
    against their "step"; nothing when none does. (matplotlib is imported here only: ~25 MB held.)"""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    series = {k: [(r["step"], r[k]) for r in history if k in r] for k in keys}
    keys = [k for k, v in series.items() if v]
    if not keys:
        return
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
    for ax, k in zip(axes[0], keys, strict=True):
        xs, ys = zip(*series[k], strict=True)
        ax.plot(xs, ys, marker="." if len(xs) < 30 else None)
        ax.set_title(k)
        ax.set_xlabel("step")
    fig.tight_layout()
    with checkpoint.resolve(path).open("wb") as f:
        fig.savefig(f, format="png", dpi=80)
    plt.close(fig)
