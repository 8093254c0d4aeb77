"""What every entry point runs on: the stage loop, the run directory, checkpoints, flags, host memory.

    loop        run_stage: resume, per-step keys, metrics (JSONL + TensorBoard), progress, checkpoints,
                NaN checks, SIGTERM / SIGINT saves
    outdir      one run per --out (its lock), every refusal before a write (check_resume)
    checkpoint  save / restore / latest_good_step around orbax (the only module importing it), checksums
    flags       frozen dataclass configs <-> command-line flags and --config files (the only parser)
    memory      host-memory levers and RSS tracking (XLA:CPU)

Imports nothing of jaxrlhf but `jaxrlhf.validate`; `stages` and the pipelines build on it.
"""

from jaxrlhf.engine import checkpoint, flags, loop, memory, outdir

__all__ = ["checkpoint", "flags", "loop", "memory", "outdir"]
