"""The run directory (`--out`) of a pipeline: one run at a time, and every refusal before any write.

    with outdir.lock(out):                                   # <out>/run.lock: pid, host, start time
        steps = outdir.check_resume(out, {stage: meta, ...}, resume=resume)
        ...                                                   # only now open outputs for writing

`check_resume` is what `loop.run_stage` would refuse (a fresh run over a stage with checkpoints, a
resume with another config, a stage whose checkpoints are all damaged), asked before a pipeline writes
tokenizers, samples or summaries, so that a refused run leaves `--out` as it was.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import pathlib
import socket
import sys
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from etils import epath

from jaxrlhf.engine import checkpoint

PathLike = str | os.PathLike
LOCK_FILE = "run.lock"


class RunDirBusyError(RuntimeError):
    """Another run holds the run directory's lock."""


def _lock_text() -> str:
    started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": started})


def _holder(path: epath.Path) -> dict | None:
    """The lock's {"pid", "host", "started"}, or None if it cannot be read (gone or cut short)."""
    try:
        holder = json.loads(path.read_text())
        return holder if isinstance(holder.get("pid"), int) and isinstance(holder.get("host"), str) else None
    except (OSError, ValueError, AttributeError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _busy(run_dir: PathLike, path: epath.Path, holder: dict | None) -> RunDirBusyError:
    if holder is None:
        return RunDirBusyError(
            f"{path} exists but cannot be read: if no run is using {run_dir}, delete it and rerun"
        )
    return RunDirBusyError(
        f"{run_dir} is in use by pid {holder['pid']} on {holder['host']} (since {holder.get('started')}): "
        f"wait for that run to end or use another --out; if it is not running, delete {path}"
    )


def _create_exclusive(path: epath.Path, text: str) -> bool:
    """Create `path` holding `text` unless it exists: atomic on a local disk (O_EXCL); on an object
    store (gs://) a check-then-write, re-read to catch a simultaneous writer (best effort)."""
    if checkpoint.is_remote(path):
        if path.exists():
            return False
        path.write_text(text)
        return path.read_text() == text
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return True


def _remove_if(path: epath.Path, holder: dict) -> bool:
    """Remove the lock if it still names `holder`. Locally by an atomic rename to a private name
    first, so that of two runs taking over one stale lock only one removes it (and never a fresh lock
    the other just wrote, which goes back); returns whether this call removed it."""
    if checkpoint.is_remote(path):
        path.unlink(missing_ok=True)
        return True
    private = path.with_name(f"{path.name}.{os.getpid()}")
    try:
        os.rename(path, private)
    except FileNotFoundError:
        return False  # another run took it over first
    if _holder(private) != holder:
        with contextlib.suppress(FileExistsError):
            os.link(private, path)  # put a fresh lock back, unless yet another run holds one
        os.unlink(private)
        return False
    os.unlink(private)
    return True


def _acquire(run_dir: PathLike, path: epath.Path, text: str) -> None:
    """Create the lock, or take over a stale one; a one-line RunDirBusyError if another run holds it."""
    if _create_exclusive(path, text):
        return
    holder = _holder(path)
    stale = holder is not None and holder["host"] == socket.gethostname() and not _alive(holder["pid"])
    if not stale:
        raise _busy(run_dir, path, holder)
    print(
        f"warning: taking over the stale lock {path} of pid {holder['pid']} on {holder['host']} "
        f"(started {holder.get('started')}; that process is gone)",
        file=sys.stderr,
        flush=True,
    )
    if not (_remove_if(path, holder) and _create_exclusive(path, text)):
        raise _busy(run_dir, path, _holder(path))


def _agree(error: Exception | None, run_dir: PathLike) -> None:
    """Raise on every process if process 0 could not take the lock (they would wait for it forever)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        ok = bool(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
        error = error or (
            None if ok else RunDirBusyError(f"process 0 could not lock {run_dir}: see its error")
        )
    if error is not None:
        raise error


@contextlib.contextmanager
def lock(run_dir: PathLike):
    """One run per run directory: hold `<run_dir>/run.lock` (pid, host, start time) while inside.

    Created atomically on local disks; on gs:// a best effort (check, write, re-read: two runs starting
    within the same moment may both pass). A lock of a process that is gone on this same host is taken
    over with a one-line warning; any other existing lock raises a one-line RunDirBusyError. The lock is
    removed on the way out (errors included), and so is `run_dir` if this created it and it is empty.
    Only process 0 takes it; with several processes all of them call this and all raise if it fails.
    """
    if jax.process_index() != 0:
        _agree(None, run_dir)
        yield None
        return
    root = checkpoint.resolve(run_dir)
    created = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    path, text = root / LOCK_FILE, _lock_text()
    try:
        try:
            _acquire(run_dir, path, text)
            error = None
        except (RunDirBusyError, OSError) as err:  # e.g. a read-only --out: raised on every process
            error = err
        _agree(error, run_dir)
        yield path
    finally:
        if path.exists() and _holder(path) == json.loads(text):
            path.unlink(missing_ok=True)
        if created and root.exists() and not any(root.iterdir()):
            root.rmdir()


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


def exists_error(run_dir: PathLike, stage: str) -> FileExistsError:
    return FileExistsError(
        f"{checkpoint.resolve(run_dir) / stage} already holds checkpoints; pass resume=True "
        "(--resume) to continue it, or use another output directory."
    )


def check_resume(
    run_dir: PathLike,
    stages: Mapping[str, Mapping[str, Any] | None],
    *,
    resume: bool,
    label: Callable[[str], str | None] | None = None,
) -> dict[str, int | None]:
    """Every refusal a run over `run_dir` would meet in `stages`, before it writes anything.

    Args:
      run_dir: the run directory.
      stages: {stage: the meta `run_stage` will get (its "config" is checked), or None}.
      resume: whether the run resumes (`--resume`).
      label: maps a meta key's dotted path to the flag that sets it, for the refusal's line (or None).

    Returns:
      {stage: the step its resume starts from (the newest good checkpoint), or None}.

    Raises:
      FileExistsError: not resuming and a stage already has checkpoints.
      checkpoint.DamagedCheckpointError: resuming and every checkpoint of a stage is damaged.
      ValueError: resuming and a stage's checkpoint was written with another config.
    """
    steps: dict[str, int | None] = {}
    for stage, meta in stages.items():
        if not resume:
            if checkpoint.has_stage(run_dir, stage):
                raise exists_error(run_dir, stage)
            steps[stage] = None
            continue
        step, _ = checkpoint.latest_good_step(run_dir, stage)
        if step is not None and meta and "config" in meta:
            checkpoint.check_meta(run_dir, stage, {"config": meta["config"]}, step=step, label=label)
        steps[stage] = step
    return steps
