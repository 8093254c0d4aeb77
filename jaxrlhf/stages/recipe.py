"""A pipeline is a recipe: its config (a `RecipeConfig`), its stages in order and how each runs. `main` is
the one entry point every pipeline shares: flags and `--config` files, the checks before any work, the
setup, `--out` held and guarded, the stages run or skipped, every refusal and fault as one line.

The convention: the model flags (`setup.ModelSpec`), `out`, `resume`, `seed`, `mesh_fsdp`, `progress`,
`stages`, `stop_after` at the top level (`RecipeConfig`), a `data` config with `data_dir`, `cache_dir` (and
`tokenizer_dir`) and `seed`, and one field per stage holding that stage's config. The functions here read
only those fields.

Exit codes: 0 done (or stopped by --stop-after), 1 a refusal or fault (one line on stderr), 2 a bad flag,
130 SIGINT and 143 SIGTERM (the stage saved at a step boundary; `--resume` continues). Ctrl-C (SIGINT)
outside a step or shard loop (setup, data preparation, compiling) stops the run at once with one line and
130 too: files are written whole (checkpoints, shards, prepared data), so `--resume` continues.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import jax
from etils import epath

from jaxrlhf.engine import checkpoint, flags, loop, memory, outdir
from jaxrlhf.engine.flags import flag_message
from jaxrlhf.stages import handoff, setup
from jaxrlhf.stages.handoff import StageError, StageRun
from jaxrlhf.stages.setup import Setup
from jaxrlhf.validate import check_at_least

# Fields that only change logging / checkpoint cadence: left out of the resume check.
CADENCE_FIELDS = ("eval_every", "ckpt_every", "log_every", "sample_every", "samples_logged")
MODEL_KEYS = ("model", "init_from", "n_layer", "n_head", "n_embd", "dropout", "bf16", "remat", "seed")
LOCATION_FIELDS = ("data_dir", "cache_dir", "tokenizer_dir")
RUN_FILE = "run.json"  # <out>/run.json: which pipeline wrote the run, with its flags


@dataclasses.dataclass(frozen=True, kw_only=True)
class RecipeConfig(setup.ModelSpec):
    """The fields every pipeline has (subclasses add `data` and one config per stage).

    Attributes:
      model: the architecture: a preset of models.PRESETS ("tiny", "gpt-micro", a GPT-2 size, an open model's
        shape such as "tiny-llama" or "llama3.2-1b"), or None: the --init-from directory's.
      init_from: the first stage's weights: a local Hugging Face directory of any supported architecture, a
        GPT-2 hub name, "random", or None (GPT-2 sizes: the hub's weights; other presets: random).
      n_layer: override the preset's depth (random init only).
      n_head: override the preset's head count (random init only).
      n_embd: override the preset's width (random init only).
      dropout: embedding / residual / attention dropout of the supervised stages (RL always runs without).
      bf16: bfloat16 matmuls (float32 params, optimizer, logprobs and heads); frozen models in bf16.
      remat: rematerialise each block in the backward pass (less memory, more compute).
      out: run directory, local or gs://; every stage writes under it.
      resume: continue the run in --out: finished stages are skipped, the others continue from their last
        good checkpoint.
      mesh_fsdp: size of the mesh's fsdp axis (params and optimizer state split over it); the data axis
        takes the remaining devices.
      seed: root of every PRNG key (init, dropout, sampling).
      multihost: call jax.distributed.initialize() first (multi-host TPU slices, SLURM / GPU clusters);
        every process then runs the same command.
      stages: comma-separated stages to run, in the pipeline's order.
      stop_after: "STAGE:N" stops that stage after N steps of this invocation without its final checkpoint
        (a preemption drill); continue with --resume.
      progress: show tqdm progress bars (and, where a pipeline prints them, samples).
      compile_cache: persistent XLA compilation cache directory ("" disables it).
      tensorboard: write every stage's metrics as TensorBoard events too (<out>/tb/<stage>/), beside the
        JSONL.
      wandb: a Weights & Biases project to send the metrics to ("" : none; needs `pip install wandb`).
    """

    STAGES: ClassVar[tuple[str, ...]] = ()

    out: str = "runs/run"
    resume: bool = False
    mesh_fsdp: int = 1
    seed: int = 0
    multihost: bool = False
    stages: str = ""
    stop_after: str = ""
    progress: bool = True
    compile_cache: str = "~/.cache/jaxrlhf/xla"
    tensorboard: bool = True
    wandb: str = ""

    def __post_init__(self):
        try:
            super().__post_init__()
        except ValueError as err:
            raise ValueError(flag_message(str(err), setup.ModelSpec, setup.flag)) from None
        if not self.out.strip():
            raise ValueError("out=''; name a run directory (it is created if missing)")
        check_at_least(self, 1, "mesh_fsdp")
        check_at_least(self, 0, "seed")
        check_stages(self.stages or ",".join(self.STAGES), self.stop_after, self.STAGES)
        loop.check_wandb(self.wandb)

    @property
    def stage_list(self) -> list[str]:
        return stage_list(self.stages or ",".join(self.STAGES))

    def stop_after_for(self, stage: str) -> int | None:
        """Steps this invocation may run of `stage` (None: to the end)."""
        return stop_after_for(self.stop_after, stage)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A pipeline: what `main` needs to run it.

    Attributes:
      name: the pipeline's name (in <out>/run.json and messages).
      defaults: its config with every default.
      make_setup: cfg -> Setup (the mesh, model config and tokenizer; may read the data).
      runners: stage -> setup -> its result (a StageResult or a summary holder).
      steps: (cfg, stage) -> its number of steps, for checkpointed stages (others: None).
      names: cfg -> the stage (instance) names this invocation runs, in order (default: --stages).
      finished: (setup, name) -> whether the stage is complete under --out (default: its last checkpoint).
      meta: (cfg, name) -> what must match to resume the stage (default: `stage_meta`).
      checkpointed: name -> whether the stage writes checkpoints (default: it has steps); the others
        (data stages) refuse a mismatch themselves, in `guard`.
      guard: (setup, names) -> None: the pipeline's own refusals before any write (its data stages').
      check: cfg -> None, raising a one-line ValueError the configs cannot raise alone.
      inactive: (cfg, given field paths) -> "" or one line naming flags that do nothing.
      renamed: old flag -> its new spelling (refused with that line).
      adjust: overrides -> overrides (config path -> value, from the command line and --config): adds the
        defaults that depend on other flags (a preset such as --quick, the algorithm) for fields not given.
      prepare: () -> a context manager the whole run holds, entered before JAX starts (host-memory
        levers).
      after: (setup, cfg) -> None, run once every stage of this invocation finished (plots, summaries).
      complete: cfg -> whether `after`'s outputs exist (a --resume of a finished run then changes nothing).
      exports: cfg -> {name: stage}: the stages whose final params are written as Hugging Face directories
        under <out>/hf/<name>/ once every stage finished (`jaxrlhf.export`).
      track_memory: each stage's host memory (`engine.memory.track`) goes to setup.extras["memory"][stage],
        and its compiled programs are dropped after it (before the next stage's compile: a laptop run's
        peak); off where stages reuse programs (online iterations).
      description: the --help text.
    """

    name: str
    defaults: RecipeConfig
    make_setup: Callable[[Any], Setup]
    runners: Mapping[str, Callable[[Setup], Any]]
    steps: Callable[[Any, str], int | None]
    names: Callable[[Any], list[str]] | None = None
    finished: Callable[[Setup, str], bool] | None = None
    meta: Callable[[Any, str], dict] | None = None
    checkpointed: Callable[[str], bool] | None = None
    guard: Callable[[Setup, list[str]], None] | None = None
    check: Callable[[Any], None] | None = None
    inactive: Callable[[Any, list[tuple[str, ...]]], str] | None = None
    renamed: Mapping[str, str] = dataclasses.field(default_factory=dict)
    adjust: Callable[[dict], dict] | None = None
    prepare: Callable[[], Any] | None = None
    after: Callable[[Setup, Any], None] | None = None
    complete: Callable[[Any], bool] | None = None
    exports: Callable[[Any], Mapping[str, str]] | None = None
    track_memory: bool = False
    description: str = ""

    def stage_names(self, cfg) -> list[str]:
        return self.names(cfg) if self.names else cfg.stage_list

    def stage_meta(self, cfg, name: str) -> dict:
        return self.meta(cfg, name) if self.meta else stage_meta(cfg, name)

    def is_finished(self, setup_: Setup, name: str) -> bool:
        if self.finished is not None:
            return self.finished(setup_, name)
        steps = self.steps(setup_.cfg, name)
        return steps is not None and handoff.stage_finished(setup_.cfg.out, name, steps)


def preset_adjust(quick: Mapping, algo_settings: Mapping, default_algo: str) -> Callable[[dict], dict]:
    """A `Recipe.adjust`: `quick`'s settings when --quick is given, then those of --rl.algo (or
    `default_algo`) from `algo_settings`, each for the fields the command line and --config left unset."""

    def adjust(overrides: dict) -> dict:
        out = dict(overrides)
        if out.get(("quick",)):
            for path, value in quick.items():
                out.setdefault(path, value)
        for path, value in algo_settings.get(out.get(("rl", "rl", "algo"), default_algo), {}).items():
            out.setdefault(path, value)
        return out

    return adjust


# ------------------------------------------------------------------------------------------ stages


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
        if name.rpartition("_")[0] not in known and name not in known or not n.isdigit():
            raise ValueError(f"stop_after={stop_after!r}; use STAGE:N, e.g. {known[-1]}:3")


def stop_after_for(stop_after: str, stage: str) -> int | None:
    """Steps this invocation may run of `stage` under a checked --stop-after (None: to the end)."""
    if not stop_after:
        return None
    name, _, n = stop_after.partition(":")
    return int(n) if name == stage else None


def _section(cfg, stage: str) -> dict:
    out = dataclasses.asdict(getattr(cfg, stage))
    for name in CADENCE_FIELDS:
        out.pop(name, None)
    return out


def stage_meta(cfg: Any, stage: str, sections: Sequence[str] | None = None) -> dict:
    """The checkpoint meta of `stage`: everything that must match to resume it (not locations, mesh, or
    logging cadence): {"config": {"model": ..., "data": ..., stage: ...}} (and the `sections` named)."""
    data_cfg = {k: v for k, v in dataclasses.asdict(cfg.data).items() if k not in LOCATION_FIELDS}
    config = {"model": {k: getattr(cfg, k) for k in MODEL_KEYS}, "data": data_cfg}
    for name in sections or [stage]:
        config[name] = _section(cfg, name)
    return {"config": json.loads(json.dumps(config))}


def stage_run(cfg: Any, stage: str, index: int, meta: dict | None = None) -> StageRun:
    """Where and how `stage` runs; its root key is fold_in(key(seed), index)."""
    return StageRun(
        stage=stage,
        out=cfg.out,
        resume=cfg.resume,
        meta=meta if meta is not None else stage_meta(cfg, stage),
        root_key=jax.random.fold_in(jax.random.key(cfg.seed), index),
        data_seed=cfg.data.seed,
        progress=cfg.progress,
        stop_after=stop_after_for(cfg.stop_after, stage),
        tensorboard=cfg.tensorboard,
        wandb=cfg.wandb or None,
    )


def say(text: str) -> None:
    """One line on stderr from process 0."""
    if handoff.main_process():
        print(text, file=sys.stderr, flush=True)


def run_stages(recipe: Recipe, setup_: Setup, names: Sequence[str]) -> bool:
    """Run the stages `names` in order; with --resume, finished ones are skipped. A stage that stops before
    its last step (--stop-after) ends the pipeline with a line saying to resume. Returns whether every stage
    finished."""
    cfg = setup_.cfg
    for name in names:
        try:
            loop.check_interrupted()  # a Ctrl-C whose KeyboardInterrupt was dropped where it arrived
            if cfg.resume and recipe.is_finished(setup_, name):
                say(f"[{recipe.name}] {name}: finished earlier, skipped")
                continue
            t0 = time.perf_counter()
            if recipe.track_memory:
                with memory.track() as mem:
                    result = recipe.runners[name](setup_)
                    memory.drop_programs()
                setup_.extras.setdefault("memory", {})[name] = mem.summary()
            else:
                result = recipe.runners[name](setup_)
        except KeyboardInterrupt:
            raise Interrupted(f"in {name}") from None
        summary = getattr(result, "summary", result)
        say(f"[{recipe.name}] {name}: {summary} ({time.perf_counter() - t0:.1f} s)")
        if not recipe.is_finished(setup_, name):
            say(f"[{recipe.name}] {name} stopped before its last step; continue with --resume")
            return False
    return True


class Interrupted(KeyboardInterrupt):
    """Ctrl-C outside a step loop; `where` says where the run was ("in rm")."""

    def __init__(self, where: str):
        super().__init__(where)
        self.where = where


# -------------------------------------------------------------------------------------------- --out


def _listing(root: epath.Path) -> list[str]:
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def guard_out(recipe: Recipe, cfg, metas: Mapping[str, dict]) -> None:
    """Every refusal of --out before anything is written there (one line, --out left as it was): a fresh
    run over any output (not only checkpoints), another pipeline's run, a resume with another config, a
    stage whose checkpoints are all damaged."""
    root = checkpoint.resolve(cfg.out)
    held = [n for n in _listing(root) if n != outdir.LOCK_FILE]
    if not cfg.resume and held:
        shown = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
        raise FileExistsError(
            f"--out {cfg.out} is not empty (it holds {shown}): pass --resume to continue the run there, or "
            "name a new or empty directory"
        )
    if cfg.resume and (root / RUN_FILE).exists():
        try:
            written_by = json.loads((root / RUN_FILE).read_text()).get("pipeline")
        except (ValueError, AttributeError):
            written_by = None
        if written_by != recipe.name:
            raise ValueError(
                f"--out {cfg.out} holds a {written_by or 'unknown'} run ({root / RUN_FILE}), not a "
                f"{recipe.name} run: resume it with its own command, or use another --out"
            )
    outdir.check_resume(cfg.out, dict(metas), resume=cfg.resume, label=_meta_flag(cfg))


def _meta_flag(cfg) -> Callable[[str], str | None]:
    """The flag of a `stage_meta` key ("config.model.model" -> "--model", "config.rl.rl.kl_coef" ->
    "--rl.kl_coef"); None for a key no flag sets."""
    by_path = {leaf.path: flags.flag_names(leaf.flag_path)[0] for leaf in flags.leaves(type(cfg))}

    def label(dotted: str) -> str | None:
        path = tuple(dotted.split("."))
        if path[:1] != ("config",):
            return None
        path = path[2:] if path[1:2] == ("model",) and len(path) == 3 else path[1:]
        return by_path.get(path)

    return label


def _write_run_file(recipe: Recipe, cfg) -> bool:
    """<out>/run.json: the pipeline and its flags (what `guard_out` reads on --resume); whether this wrote
    it."""
    root = checkpoint.resolve(cfg.out)
    if not handoff.main_process() or (root / RUN_FILE).exists():
        return False
    record = {"pipeline": recipe.name, "flags": flags.config_json(cfg)}
    (root / RUN_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return True


def _forget_run_file(cfg) -> None:
    """Remove run.json when it is all --out holds: a run refused before its first write leaves --out as it
    was."""
    root = checkpoint.resolve(cfg.out)
    if [n for n in _listing(root) if n != outdir.LOCK_FILE] == [RUN_FILE]:
        (root / RUN_FILE).unlink(missing_ok=True)


def export_final(recipe: Recipe, cfg) -> None:
    """The pipeline's final policy (and reward model) as Hugging Face directories under <out>/hf/ (on
    gs://, written locally and copied up)."""
    from jaxrlhf import export  # noqa: PLC0415  (an entry point over this layer)

    if recipe.exports is None or not handoff.main_process():
        return
    for name, stage in recipe.exports(cfg).items():
        if not checkpoint.has_stage(cfg.out, stage):
            continue
        dest = checkpoint.resolve(cfg.out) / "hf" / name
        if checkpoint.is_remote(cfg.out):
            with tempfile.TemporaryDirectory() as tmp:
                export.export(cfg.out, stage, tmp)
                dest.mkdir(parents=True, exist_ok=True)
                for path in sorted(os.listdir(tmp)):
                    (dest / path).write_bytes(epath.Path(tmp, path).read_bytes())
        else:
            export.export(cfg.out, stage, os.fspath(dest))
        say(f"[{recipe.name}] exported {stage} to {dest}")


def _acts(recipe: Recipe, cfg, other, names: Sequence[str], earlier: Sequence[str]) -> bool:
    """Whether `cfg` and `other` differ in a running stage's meta or in the length of another stage."""
    if any(recipe.stage_meta(cfg, n) != recipe.stage_meta(other, n) for n in names):
        return True
    for stage in earlier:
        try:
            if recipe.steps(cfg, stage) != recipe.steps(other, stage):
                return True
        except (KeyError, ValueError, TypeError):  # a stage known only by its instances (rebel_1, ...)
            continue
    return False


def _unused_stage_flags(recipe: Recipe, cfg, given, names: Sequence[str]) -> list[str]:
    """Flags of a stage config whose stage is not among this invocation's --stages and that act on none of
    them: refused, as they would be silently ignored. A flag of another stage acts when it changes what a
    running stage must match to resume (its meta: e.g. UltraFeedback's filter reads --generate.answers)
    or the length of a stage whose finished checkpoint a running stage restores (--sft.steps for
    `--stages rl`). (A finished stage skipped by --resume keeps the flags it ran with: the resume check
    refuses other values.)"""
    running = {n.rpartition("_")[0] or n for n in names}
    out = []
    for path in given:
        if len(path) < 2 or path[0] not in cfg.STAGES or path[0] in running:
            continue
        try:
            other = flags.replace_paths(cfg, {path: flags.value_at(recipe.defaults, path)})
        except (TypeError, ValueError):
            continue  # the config cannot do without it
        if not _acts(recipe, cfg, other, names, [s for s in cfg.STAGES if s not in running]):
            out.append(flags.flag_of(type(cfg), path))
    return out


def _os_error(err: OSError, cfg) -> str:
    """One line for a file-system fault while the run writes under --out."""
    where = f" ({err.filename})" if getattr(err, "filename", None) else ""
    if err.errno == errno.ENOSPC:
        return (f"no space left on the device of --out {cfg.out}{where}: free space and rerun with --resume "
                "(the last finished checkpoint is intact)")  # fmt: skip
    if err.errno == errno.ENAMETOOLONG:
        return f"--out {cfg.out}: a path under it is too long for the file system{where}; use a shorter --out"
    if err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return (
            f"--out {cfg.out}: cannot write there{where} ({os.strerror(err.errno)}); use a writable directory"
        )
    return str(err)


def _fault_line(err: Exception, cfg) -> str | None:
    """The one line of a refusal or fault `main` reports (exit code 1); None: not one of those."""
    if isinstance(err, OSError):
        return _os_error(err, cfg)
    if isinstance(err, (ValueError, StageError, loop.NonFiniteError, outdir.RunDirBusyError)):
        return str(err)
    return None


def _interrupted(recipe: Recipe, where: str) -> int:
    """One line for a Ctrl-C outside a step loop; exit code 130. Ctrl-C is ignored from here on (the
    cleanup that follows runs whole)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # `loop.interrupts` puts the old handler back
    print(f"SIGINT: stopped {recipe.name} {where}; rerun with --resume to continue (exit code 130)",
          file=sys.stderr, flush=True)  # fmt: skip
    return 130


def main(recipe: Recipe, argv: Sequence[str] | None = None, *, prog: str | None = None) -> int:
    """The pipeline's command: parse, check, set up, hold --out, run the stages, `after`. Returns the exit
    code (see the module doc); every refusal or fault is one line on stderr."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg, given = flags.parse(
        recipe.defaults, argv, check=recipe.check, inactive=recipe.inactive, renamed=recipe.renamed,
        adjust=recipe.adjust, description=recipe.description, prog=prog,
    )  # fmt: skip
    setup_ = None
    where = "before its first stage (setup, data preparation)"
    held = contextlib.ExitStack()
    try:
        held.enter_context(loop.interrupts())
        if recipe.prepare is not None:
            held.enter_context(recipe.prepare())
        if cfg.multihost:
            from jaxrlhf import parallel  # noqa: PLC0415

            parallel.initialize_distributed()
        setup.use_compile_cache(cfg.compile_cache)
        outdir.check_output_dir(cfg.out, flag="--out")
        names = recipe.stage_names(cfg)
        unused = _unused_stage_flags(recipe, cfg, given, names)
        if unused:
            print(f"error: {', '.join(unused)} act on stages this run does not train (--stages "
                  f"{','.join(names)}): drop them", file=sys.stderr)  # fmt: skip
            return 2
        setup_ = recipe.make_setup(cfg)
        loop.check_interrupted()  # a Ctrl-C whose KeyboardInterrupt was dropped where it arrived
        if recipe.checkpointed is not None:
            checkpointed = [n for n in names if recipe.checkpointed(n)]
        else:
            checkpointed = [n for n in names if recipe.steps(cfg, n) is not None]
        with outdir.lock(cfg.out):
            guard_out(recipe, cfg, {n: recipe.stage_meta(cfg, n) for n in checkpointed})
            if recipe.guard is not None:
                recipe.guard(setup_, names)
            running = [n for n in names if not (cfg.resume and recipe.is_finished(setup_, n))]
            if not running and cfg.resume and (recipe.complete is None or recipe.complete(cfg)):
                print(f"nothing to do: {cfg.out} holds a finished {recipe.name} run (every stage at its "
                      "last step); it was left as it is. Use a fresh --out to run again.",
                      file=sys.stderr)  # fmt: skip
                return 0
            wrote_run_file = _write_run_file(recipe, cfg)
            try:
                finished = run_stages(recipe, setup_, names)
            except BaseException:
                if wrote_run_file:
                    _forget_run_file(cfg)
                raise
            where = "after its last stage (plots, exports)"
            if finished:
                loop.check_interrupted()
                if recipe.after is not None:
                    recipe.after(setup_, cfg)
                export_final(recipe, cfg)
        return 0
    except loop.Preempted as err:
        return err.code
    except (KeyboardInterrupt, Exception) as err:
        # A Ctrl-C, also one that a library turned into another error where it arrived.
        if isinstance(err, KeyboardInterrupt) or loop.interrupted():
            return _interrupted(recipe, getattr(err, "where", where))
        line = _fault_line(err, cfg)
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr, flush=True)
        return 1
    finally:
        if setup_ is not None:
            setup_.close()
        held.close()
