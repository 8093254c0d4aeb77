"""Checkpoints: save / restore / latest, one directory per pipeline stage, around orbax.

The only module in jaxrlhf that imports orbax. On disk (local or `gs://`, through etils epath):

    <run_dir>/<stage>/<step>/state/       the train state: a pytree of arrays (jax, NumPy, scalars)
    <run_dir>/<stage>/<step>/meta/        a JSON dict: data position, PRNG position, config, ...
    <run_dir>/<stage>/<step>/tokenizer/   optional: the tokenizer's files, as JSON text
    <run_dir>/<stage>/<step>/checksums.json   size + sha256 of every other file of the step
    <run_dir>/<stage>/<step>.damaged/     a step that failed its checksums, set aside by `set_aside`

Guarantees:
  - A save is atomic. Orbax writes `<step>.orbax-checkpoint-tmp*/` and renames it to `<step>/` once
    every item is written (on GCS, where rename is not atomic, it writes `commit_success.txt`
    last). Listing only sees finished steps, so a process killed mid-save leaves the last good step
    as the latest; the next save removes the half-written temporary directory.
  - Pruning old steps (`keep`) renames them into `<stage>/.deleting/` first on local disks, so a
    kill during deletion never leaves a half-deleted step that looks finished.
  - A save never overwrites a step (unless `overwrite=True`) and never writes NaN or inf.
  - Typed PRNG key arrays (`jax.random.key`) are stored as their raw key data and come back typed,
    with the implementation of the restore target's keys.
  - Damage is detected, not loaded. Once orbax has finalised a step, process 0 records the size and
    sha256 of each of its files in `checksums.json` (written to a temporary name, then renamed).
    `restore`, `restore_meta`, `restore_tokenizer` and `check_meta` verify what they read first and
    raise a one-line `DamagedCheckpointError` naming the step and the file: a truncated or emptied
    file, broken JSON, flipped bytes, or a step without `checksums.json` although an older step of
    the stage has one (its save did not finish). Steps saved before checksums existed (none of the
    stage's older steps has one) are read unverified. `latest_good_step` finds the newest step that
    verifies; `set_aside` renames damaged steps to `<step>.damaged`, which orbax neither lists nor
    prunes, so retention (`keep`) only ever counts good steps. Verifying reads every file of the
    step; on a local disk a step that verified is not read again by the same process while its files'
    sizes and modification times stay the same (on gs:// each verification reads it again).

Multi-process: every process calls `save`, `restore`, `verify`, `latest_good_step` and `set_aside` (they are
collective, like the jitted step: process 0 hashes, renames and tells the others); `latest_step`,
`has_stage`, `restore_meta`, `check_meta` and `restore_tokenizer` only read files and can be called
from any subset of processes.

Restoring against an abstract target is the usual pattern:

    target = checkpoint.abstract_like(jax.eval_shape(init_state, key, cfg), shardings)
    state, meta = checkpoint.restore(run_dir, "sft", target, meta_check={"config": cfg_dict})
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import itertools
import json
import operator
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

PathLike = str | os.PathLike

_STATE, _META, _TOKENIZER = "state", "meta", "tokenizer"
# Where pruned steps are renamed before deletion; not a step name, so listing never sees it.
_DELETING = ".deleting"
_CHECKSUMS = "checksums.json"
# Suffix of a damaged step set aside: "12.damaged" is not a step name for orbax (digits only).
_DAMAGED = ".damaged"
_UNSET = object()


class DamagedCheckpointError(ValueError):
    """A checkpoint step's files differ from what was saved, or orbax could not read them."""


# --------------------------------------------------------------------------------------- paths

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")  # gs://, s3://, file://, ...


def is_remote(run_dir: PathLike) -> bool:
    """Whether `run_dir` is a URL (gs://...) rather than a local path."""
    return bool(_URL.match(os.fspath(run_dir)))


def resolve(run_dir: PathLike) -> epath.Path:
    """`run_dir` as the checkpoint layer uses it: a local path made absolute, a URL kept as it is.

    Every path reaches orbax through here: orbax-checkpoint >= 0.12 refuses relative paths, and a
    relative `--out` (the pipelines' default, `runs/...`) must work whatever orbax version is installed.
    Relative paths are taken against the current directory at the call, `~` is expanded.
    """
    text = os.fspath(run_dir)
    if _URL.match(text):
        return epath.Path(text)
    return epath.Path(os.path.abspath(os.path.expanduser(text)))


def _stage_dir(run_dir: PathLike, stage: str) -> epath.Path:
    return resolve(run_dir) / stage


def _step_dir(run_dir: PathLike, stage: str, step: int) -> epath.Path:
    return ocp.path.step.build_step_path(
        _stage_dir(run_dir, stage), ocp.path.step.standard_name_format(), step
    )


def all_steps(run_dir: PathLike, stage: str) -> list[int]:
    """The finished checkpoint steps of a stage, ascending ([] if none); ignores temporary dirs."""
    return sorted(ocp.utils.checkpoint_steps(_stage_dir(run_dir, stage)))


def _unfinished(run_dir: PathLike, stage: str, step: int, steps: Sequence[int]) -> bool:
    """A step orbax finalised whose save was killed before its checksums were written: no checksum file
    although an older step has one. It is not a checkpoint (`latest_step` skips it, `save` replaces it)."""
    if (_step_dir(run_dir, stage, step) / _CHECKSUMS).exists():
        return False
    return any((_step_dir(run_dir, stage, s) / _CHECKSUMS).exists() for s in steps if s < step)


def latest_step(run_dir: PathLike, stage: str) -> int | None:
    """The newest finished step of `stage` under `run_dir` (a save killed before its checksums were
    written does not count), or None if it has none."""
    steps = all_steps(run_dir, stage)
    return next((s for s in reversed(steps) if not _unfinished(run_dir, stage, s, steps)), None)


def has_stage(run_dir: PathLike, stage: str) -> bool:
    """Whether `stage` has at least one finished checkpoint under `run_dir`."""
    return latest_step(run_dir, stage) is not None


def _resolve_step(run_dir: PathLike, stage: str, step: int | None) -> int:
    """`step`, or the latest one; one-line FileNotFoundError if the stage or the step is missing."""
    steps = all_steps(run_dir, stage)
    if not steps:
        raise FileNotFoundError(
            f"no checkpoint for stage {stage!r} under {run_dir}: run the {stage} stage first (or check --out)"
        )
    if step is None:
        return latest_step(run_dir, stage)
    if step not in steps:
        raise FileNotFoundError(
            f"checkpoint {_stage_dir(run_dir, stage)} has no step {step} "
            f"(it has {', '.join(map(str, steps))}): pass one of those, or step=None for the latest"
        )
    return step


def _manager(stage_dir: epath.Path, keep: int | None) -> ocp.CheckpointManager:
    """A synchronous manager that writes one stage directory; the caller closes it."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        create=True,
        cleanup_tmp_directories=True,  # half-written saves of a killed process
        enable_async_checkpointing=False,  # save returns once the step is finalised
        todelete_subdir=_DELETING,  # ignored on GCS, where orbax deletes in place
    )
    handlers = {
        _STATE: ocp.StandardCheckpointHandler(),
        _META: ocp.JsonCheckpointHandler(),
        _TOKENIZER: ocp.JsonCheckpointHandler(),
    }
    return ocp.CheckpointManager(stage_dir, item_handlers=handlers, options=options)


def _empty_trash(stage_dir: epath.Path) -> None:
    """Delete steps that pruning renamed into `.deleting/` (one process; nobody reads them)."""
    trash = stage_dir / _DELETING
    if jax.process_index() == 0 and trash.exists():
        trash.rmtree()


# ----------------------------------------------------------------------------------- checksums

# Step dir + checksums -> the stat signature its files had when they last verified (see `_problem`).
_VERIFIED: dict[str, tuple] = {}
# Barrier names must be unique per call; every process calls in the same order, so counts agree.
_BARRIERS = itertools.count()


def _barrier(what: str) -> None:
    """Wait for every process (a no-op with one)."""
    if jax.process_count() > 1:
        ocp.multihost.sync_global_processes(f"jaxrlhf_{what}_{next(_BARRIERS)}")


def _files(root: epath.Path) -> list[str]:
    """Every file under `root` but the checksum file, as sorted '/'-separated relative paths."""
    out = []
    for folder, _, names in root.walk():
        for name in names:
            rel = (folder / name).relative_to(root).as_posix()
            if rel != _CHECKSUMS and not rel.startswith(_CHECKSUMS + "."):
                out.append(rel)
    return sorted(out)


def _digest(path: epath.Path) -> tuple[int, str]:
    """(bytes, sha256 hex) of one file, read in 16 MiB chunks (hashlib drops the GIL on them)."""
    h, size = hashlib.sha256(), 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def _digests(root: epath.Path, rels: Sequence[str]) -> dict[str, tuple[int, str]]:
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        return dict(zip(rels, pool.map(lambda rel: _digest(root / rel), rels), strict=True))


def _write_checksums(step_dir: epath.Path) -> None:
    """Record size + sha256 of every file of a finalised step (process 0; the others wait)."""
    if jax.process_index() == 0:
        rels = _files(step_dir)
        files = {rel: {"bytes": n, "sha256": h} for rel, (n, h) in _digests(step_dir, rels).items()}
        tmp = step_dir / (_CHECKSUMS + ".tmp")
        tmp.write_text(json.dumps({"algorithm": "sha256", "files": files}, indent=1))
        tmp.replace(step_dir / _CHECKSUMS)  # a kill mid-write leaves no half checksum file
    _barrier("checksums")


def _signature(step_dir: epath.Path, rels: Sequence[str]) -> tuple | None:
    """Sizes and modification times of the files (local dirs only; None elsewhere)."""
    if is_remote(step_dir):
        return None
    try:
        return tuple((rel, st.st_size, st.st_mtime_ns) for rel in rels for st in [os.stat(step_dir / rel)])
    except OSError:
        return None


def _problem(run_dir: PathLike, stage: str, step: int, items: Sequence[str] | None = None) -> str | None:
    """What is wrong with step `step` of `stage` (its files `items/...` only, if given), or None.

    A step without a checksum file is unverifiable (None) unless an older step of the stage has one.
    """
    step_dir = _step_dir(run_dir, stage, step)
    record = step_dir / _CHECKSUMS
    if not record.exists():
        older = [s for s in all_steps(run_dir, stage) if s < step]
        if any((_step_dir(run_dir, stage, s) / _CHECKSUMS).exists() for s in older):
            return f"it has no {_CHECKSUMS} although the older steps have one: its save did not finish"
        return None
    try:
        text = record.read_text()
        files = {rel: (int(f["bytes"]), str(f["sha256"])) for rel, f in json.loads(text)["files"].items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"its {_CHECKSUMS} is unreadable"
    wanted = sorted(rel for rel in files if items is None or rel.split("/")[0] in items)
    missing = [r for r in wanted if not (step_dir / r).exists()]
    if missing:
        more = f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""
        return f"{missing[0]}{more} is missing"
    signature = _signature(step_dir, wanted)
    key = f"{step_dir}|{hashlib.sha256(text.encode()).hexdigest()}|{','.join(wanted)}"
    if signature is not None and _VERIFIED.get(key) == signature:
        return None
    for rel, (size, sha) in _digests(step_dir, wanted).items():
        if size != files[rel][0]:
            return f"{rel} is {size} bytes, {files[rel][0]} when saved (truncated or overwritten)"
        if sha != files[rel][1]:
            return f"{rel} differs from what was saved (sha256 mismatch: flipped or overwritten bytes)"
    if signature is not None:
        _VERIFIED[key] = signature
    return None


def _agreed_problem(run_dir: PathLike, stage: str, step: int, items=None) -> str | None:
    """`_problem` as process 0 sees it, told to every process (the others get a short reason)."""
    problem = _problem(run_dir, stage, step, items) if jax.process_index() == 0 else None
    if jax.process_count() > 1:
        bad = bool(ocp.multihost.broadcast_one_to_all(np.int32(problem is not None)))
        problem = problem or ("process 0 found it damaged" if bad else None)
    return problem


def _damaged(run_dir: PathLike, stage: str, step: int, problem: str) -> DamagedCheckpointError:
    return DamagedCheckpointError(
        f"checkpoint {_stage_dir(run_dir, stage)} step {step} is damaged: {problem}; restore an earlier "
        "step (a pipeline's --resume falls back to the newest good one)"
    )


def verify(run_dir: PathLike, stage: str, step: int | None = None) -> int:
    """Check every file of `step` (default: the latest) against its checksums; returns the step.

    Raises:
      FileNotFoundError: the stage or step does not exist.
      DamagedCheckpointError: a file is missing, truncated or changed (one line naming it).
    """
    step = _resolve_step(run_dir, stage, step)
    problem = _agreed_problem(run_dir, stage, step)
    if problem:
        raise _damaged(run_dir, stage, step, problem)
    return step


def latest_good_step(run_dir: PathLike, stage: str) -> tuple[int | None, dict[int, str]]:
    """The newest step of `stage` that verifies, and what is wrong with each newer (damaged) step.

    Collective. Nothing is renamed; pass the damaged steps to `set_aside` once the run goes on.

    Returns:
      (step, {damaged step: problem}); (None, {}) if the stage has no checkpoint.

    Raises:
      DamagedCheckpointError: the stage has checkpoints and every one is damaged.
    """
    damaged = {}
    for step in reversed(all_steps(run_dir, stage)):
        problem = _agreed_problem(run_dir, stage, step)
        if problem is None:
            return step, damaged
        damaged[step] = problem
    if damaged:
        listed = "; ".join(f"step {s}: {p}" for s, p in sorted(damaged.items()))
        raise DamagedCheckpointError(
            f"every checkpoint of {_stage_dir(run_dir, stage)} is damaged ({listed}); restore them from "
            "a copy, or move that directory aside to run the stage again from its start"
        )
    return None, damaged


def set_aside(run_dir: PathLike, stage: str, steps: Sequence[int]) -> dict[int, epath.Path]:
    """Rename damaged `steps` to `<stage>/<step>.damaged` (kept for inspection, never listed).

    Collective: process 0 renames, the others wait. Returns {step: its new path}.
    """
    moved = {}
    for step in sorted(steps):
        src = _step_dir(run_dir, stage, step)
        dst, n = src.with_name(src.name + _DAMAGED), 1
        while dst.exists():
            n += 1
            dst = src.with_name(f"{src.name}{_DAMAGED}-{n}")
        if jax.process_index() == 0:
            src.rename(dst)
        moved[step] = dst
    _barrier("set_aside")
    return moved


# ---------------------------------------------------------------------------------------- save


@jax.jit
def _all_finite(leaves: list[jax.Array]) -> jax.Array:
    return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])  # [N] bool


def _nonfinite_leaf(state) -> str | None:
    """The path of the first float leaf holding NaN or inf, or None; one host sync in all.

    The device leaves are checked by one compiled program per set of devices they live on, not op by
    op: an eager `isfinite` per leaf shape would compile two programs per shape, ~1 MB of host memory
    each on XLA:CPU (22 programs, +24 MB, for HappyGPT's Muon state; one program: +3 MB).
    """
    paths, flags = [], {}
    groups: dict[frozenset, list[tuple[int, jax.Array]]] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        if isinstance(leaf, jax.Array):
            if jnp.issubdtype(leaf.dtype, jnp.inexact):
                groups.setdefault(frozenset(leaf.sharding.device_set), []).append((len(paths), leaf))
                paths.append(path)
        elif isinstance(leaf, float | complex | np.ndarray | np.generic):
            if np.issubdtype(np.asarray(leaf).dtype, np.inexact):
                flags[len(paths)] = np.all(np.isfinite(leaf))
                paths.append(path)
    on_device = {tuple(i for i, _ in g): _all_finite([x for _, x in g]) for g in groups.values()}
    for indices, ok in jax.device_get(on_device).items():
        flags.update(zip(indices, ok, strict=True))
    for i, path in enumerate(paths):
        if not flags[i]:
            return jax.tree_util.keystr(path, simple=True, separator=".")
    return None


def _json_text(value: Any, what: str) -> Any:
    """`value` as JSON would give it back (tuples become lists); one-line error if it can't be."""
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} must be plain JSON (dicts, lists, str, finite numbers): {e}") from None


def _read_tokenizer_files(path: PathLike) -> dict:
    """A tokenizer file, or the files in a tokenizer directory, as JSON: {name: text}."""
    path = epath.Path(path)
    if path.is_dir():
        files = {f.name: f.read_text() for f in sorted(path.iterdir()) if f.is_file()}
    elif path.is_file():
        files = {path.name: path.read_text()}
    else:
        raise FileNotFoundError(f"no tokenizer at {path}: pass the file or directory it was saved to")
    return {"name": path.name, "is_dir": path.is_dir(), "files": files}


def save(
    run_dir: PathLike,
    stage: str,
    step: int,
    state: Any,
    *,
    meta: Mapping[str, Any] | None = None,
    keep: int | None = 3,
    tokenizer: PathLike | None = None,
    overwrite: bool = False,
) -> epath.Path:
    """Write `state` (+ `meta`, tokenizer) as checkpoint `step` of `stage`; keep the newest `keep`.

    Blocks until the step is finalised. Collective: with several processes, all of them call it.

    Args:
      run_dir: the run's directory (local path or gs://...); the stage gets its own subdirectory.
      stage: e.g. "pretrain", "sft", "rl".
      step: the step number; a checkpoint with this number must not exist yet.
      state: any pytree of jax arrays (sharded or not, typed PRNG keys included), NumPy arrays and
        Python scalars. Float leaves must be finite.
      meta: a JSON-able dict restored by `restore` / `restore_meta`: data position
        ({"epoch": ..., "batch_index": ...}), PRNG position, the config as a dict, anything else.
      keep: how many steps of this stage to keep (the newest); None keeps all.
      tokenizer: a tokenizer file, or a directory of files (what `Tokenizer.save` wrote), to store
        with the step; get it back with `restore_tokenizer`.
      overwrite: replace an existing `step` instead of raising. Not atomic: a kill between the
        delete and the end of the save leaves the previous step as the latest.

    Returns:
      The step's directory.

    Raises:
      ValueError: a float leaf holds NaN or inf (nothing is written), `meta` is not plain JSON, or
        `step` exists and `overwrite` is False.
    """
    step = operator.index(step)  # an int, np.int64 or integer jax scalar; not a float
    stage_dir = _stage_dir(run_dir, stage)
    step_dir = _step_dir(run_dir, stage, step)
    if keep is not None and keep < 1:
        raise ValueError(f"keep={keep}: keep at least 1 checkpoint (or None to keep all)")
    bad = _nonfinite_leaf(state)
    if bad is not None:
        raise ValueError(
            f"refusing to save {stage_dir} step {step}: state leaf {bad} holds NaN or inf, nothing "
            "was written; check the loss and learning rate, or resume from the last good step"
        )
    meta = _json_text(dict(meta or {}), "meta")
    items = {_STATE: ocp.args.StandardSave(state), _META: ocp.args.JsonSave(meta)}
    if tokenizer is not None:
        items[_TOKENIZER] = ocp.args.JsonSave(_read_tokenizer_files(tokenizer))
    steps = all_steps(run_dir, stage)
    exists = step in steps
    # A save of this step killed before its checksums (no checkpoint, see `latest_step`) is replaced.
    replace = exists and (overwrite or _unfinished(run_dir, stage, step, steps))
    if jax.process_count() > 1:
        # Process 0's answer for all: a fast process must not see the step a slow one just wrote.
        exists, replace = (bool(x) for x in ocp.multihost.broadcast_one_to_all(np.int32([exists, replace])))
    if exists and not replace:
        raise ValueError(
            f"checkpoint {step_dir} already exists: pass overwrite=True, resume from it, or use a fresh --out"
        )

    manager = _manager(stage_dir, keep)
    try:
        if exists:
            manager.delete(step)
        saved = manager.save(step, args=ocp.args.Composite(**items), force=True)
        manager.wait_until_finished()
    finally:
        manager.close()
    if not saved:
        raise RuntimeError(f"orbax declined to save {step_dir}")
    _empty_trash(stage_dir)
    _write_checksums(step_dir)
    return step_dir


# ------------------------------------------------------------------------------------- restore


def _default_sharding() -> jax.sharding.Sharding:
    """Where a target leaf without a sharding goes: device 0, or replicated across processes."""
    if jax.process_count() == 1:
        return jax.sharding.SingleDeviceSharding(jax.devices()[0])
    mesh = jax.make_mesh((jax.device_count(),), ("devices",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def _abstract_leaf(path, leaf, sharding):
    if isinstance(leaf, np.ndarray | np.generic | int | float | complex | bool | str):
        return leaf  # host values come back as the same host type
    name = jax.tree_util.keystr(path, simple=True, separator=".")
    if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
        raise TypeError(f"abstract_like: leaf {name} is a {type(leaf).__name__}, not an array")
    sharding = sharding or getattr(leaf, "sharding", None) or _default_sharding()
    try:
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)
    except ValueError as e:  # e.g. a rank-1 PartitionSpec on a scalar
        raise ValueError(f"abstract_like: leaf {name}: {e}") from None


def abstract_like(tree: Any, shardings: Any = None) -> Any:
    """`tree` as ShapeDtypeStructs that carry shardings: the target `restore` expects.

    Args:
      tree: a pytree of jax arrays or ShapeDtypeStructs (e.g. `jax.eval_shape(init_fn, ...)`).
        NumPy arrays and Python scalars are kept: they restore as the same host types.
      shardings: None keeps each leaf's own sharding (leaves without one go to device 0, or are
        replicated when there are several processes); a single `jax.sharding.Sharding` applies to
        every leaf; a pytree of shardings whose structure is a prefix of `tree`'s applies to the
        corresponding subtrees (None entries keep the leaves' own).

    Returns:
      A pytree of `jax.ShapeDtypeStruct(shape, dtype, sharding=...)` shaped like `tree`.
    """

    def over_subtree(prefix, sharding, subtree):
        return jax.tree_util.tree_map_with_path(
            lambda path, x: _abstract_leaf(prefix + path, x, sharding), subtree
        )

    return jax.tree_util.tree_map_with_path(
        over_subtree,
        shardings,
        tree,
        is_leaf=lambda x: x is None or isinstance(x, jax.sharding.Sharding),
    )


def _render(value) -> str:
    text = "<unset>" if value is _UNSET else json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _differences(stored, expected, path: str = ""):
    """(dotted path, stored, expected) for every JSON leaf where the two differ."""
    if isinstance(stored, dict) and isinstance(expected, dict):
        for k in sorted(stored.keys() | expected.keys()):
            sub = f"{path}.{k}" if path else k
            yield from _differences(stored.get(k, _UNSET), expected.get(k, _UNSET), sub)
    elif stored != expected or type(stored) is not type(expected):
        yield path, stored, expected


def _check_meta(
    meta: dict, meta_check: Mapping[str, Any], where: str, label: Callable[[str], str | None] | None = None
) -> None:
    """One-line ValueError naming every key of `meta_check` whose value differs from `meta`; `label` maps
    a differing key's dotted path ("config.model.model") to the flag that sets it ("--model"), or None."""
    groups = []  # (top-level key, [(subpath, stored, expected)])
    for top, expected in _json_text(dict(meta_check), "meta_check").items():
        diffs = list(_differences(meta.get(top, _UNSET), expected))
        if diffs:
            groups.append((top, diffs))
    if not groups:
        return

    def describe(pick) -> str:
        parts = []
        for top, diffs in groups:
            flagged = [(label(f"{top}.{p}" if p else top) if label else None, p, s, e) for p, s, e in diffs]
            parts += [f"{flag} {_render(pick(s, e))}" for flag, p, s, e in flagged if flag]
            plain = [(p, s, e) for flag, p, s, e in flagged if not flag]
            if plain:
                items = ", ".join(
                    f"{p}={_render(pick(s, e))}" if p else _render(pick(s, e)) for p, s, e in plain
                )
                parts.append(f"{top} {items}" if plain[0][0] else f"{top}={items}")
        return " and ".join(parts)

    raise ValueError(
        f"checkpoint {where} was written with {describe(lambda s, e: s)}, this run has "
        f"{describe(lambda s, e: e)}: use a matching config or a fresh --out"
    )


def _stored_like(leaf):
    """The (shape, dtype) a target leaf is stored as: typed PRNG keys are stored as key data."""
    if isinstance(leaf, jax.ShapeDtypeStruct) and jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        data = jax.eval_shape(jax.random.key_data, leaf)
        return tuple(data.shape), np.dtype(data.dtype)
    if isinstance(leaf, int | float | complex | bool):
        return (), None  # Python scalars: any stored scalar dtype
    return tuple(np.shape(leaf)), np.dtype(leaf.dtype)


def _check_tree(stored_tree, target, where: str) -> None:
    """One-line ValueError if the target's leaf paths, shapes or dtypes differ from the stored."""

    def by_path(tree):
        leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
        return {jax.tree_util.keystr(p, simple=True, separator="."): x for p, x in leaves}

    stored, wanted = by_path(stored_tree), by_path(target)
    problems = []

    def report(label, names):
        if names:
            more = f" (+{len(names) - 3} more)" if len(names) > 3 else ""
            problems.append(f"{label} {', '.join(names[:3])}{more}")

    report("missing from the checkpoint:", [p for p in wanted if p not in stored])
    report("not in the target:", [p for p in stored if p not in wanted])
    mismatched = []
    for p in wanted.keys() & stored.keys():
        shape, dtype = _stored_like(wanted[p])
        s = stored[p]  # orbax's ArrayMetadata / ScalarMetadata
        s_shape, s_dtype = tuple(s.shape), s.dtype and np.dtype(s.dtype)
        if shape != s_shape or (dtype is not None and s_dtype is not None and dtype != s_dtype):
            mismatched.append(f"{p} is {s_dtype}{list(s_shape)} in it, {dtype}{list(shape)} here")
    report("", sorted(mismatched))
    indivisible = []
    for p, leaf in wanted.items():
        if isinstance(leaf, jax.ShapeDtypeStruct):
            try:
                leaf.sharding.shard_shape(leaf.shape)
            except ValueError:
                indivisible.append(
                    f"{p} {list(leaf.shape)} over {getattr(leaf.sharding, 'spec', leaf.sharding)}"
                )
    report("shape does not divide over its sharding:", sorted(indivisible))
    if problems:
        raise ValueError(
            f"checkpoint {where} does not match the restore target: "
            f"{'; '.join(x.strip() for x in problems)}; build the target from the config that "
            "wrote it (or use a fresh --out)"
        )


def _unreadable(run_dir: PathLike, stage: str, step: int, err: Exception) -> DamagedCheckpointError:
    """A one-line error for what orbax / tensorstore raised reading a step that had no checksums."""
    lines = str(err).strip().splitlines() or [""]
    first = lines[0] if len(lines[0]) <= 200 else lines[0][:197] + "..."
    return _damaged(run_dir, stage, step, f"orbax could not read it ({type(err).__name__}: {first})")


def _check_files(run_dir: PathLike, stage: str, step: int, items: Sequence[str] | None) -> None:
    """Raise a one-line DamagedCheckpointError if the files of `items` of a step fail their checksums
    (not collective: each caller reads them; used for the small meta and tokenizer items)."""
    problem = _problem(run_dir, stage, step, items)
    if problem:
        raise _damaged(run_dir, stage, step, problem)


def restore_meta(run_dir: PathLike, stage: str, step: int | None = None) -> dict:
    """The `meta` dict saved with `step` (default: the latest) of `stage`, its files verified first.

    Raises:
      FileNotFoundError: the stage or step does not exist.
      DamagedCheckpointError: the meta files fail their checksums or do not parse.
    """
    step = _resolve_step(run_dir, stage, step)
    _check_files(run_dir, stage, step, [_META])
    try:
        return dict(ocp.JsonCheckpointHandler().restore(_step_dir(run_dir, stage, step) / _META))
    except Exception as err:  # orbax / json errors of a step without checksums
        raise _unreadable(run_dir, stage, step, err) from None


def check_meta(
    run_dir: PathLike,
    stage: str,
    meta_check: Mapping[str, Any],
    *,
    step: int | None = None,
    label: Callable[[str], str | None] | None = None,
) -> dict:
    """`restore`'s meta check alone: a one-line ValueError unless every key of `meta_check` equals the
    meta saved with `step` (default: the latest); `label` names a key's flag (see `_check_meta`). Reads
    only the meta; returns it."""
    step = _resolve_step(run_dir, stage, step)
    meta = restore_meta(run_dir, stage, step)
    _check_meta(meta, meta_check, f"{_stage_dir(run_dir, stage)} step {step}", label)
    return meta


def restore(
    run_dir: PathLike,
    stage: str,
    target: Any,
    *,
    step: int | None = None,
    meta_check: Mapping[str, Any] | None = None,
) -> tuple[Any, dict]:
    """Read checkpoint `step` (default: the latest) of `stage` into the structure of `target`.

    Collective: with several processes, all of them call it.

    Args:
      run_dir: the run's directory (local path or gs://...).
      stage: the stage name given to `save`.
      target: the state's structure: an abstract pytree (`jax.eval_shape`, ShapeDtypeStructs,
        optionally with `.sharding`) or a concrete one (its arrays' shardings are used). Arrays
        come back with the target's shardings, whatever mesh saved them; see `abstract_like`.
        Shapes and dtypes must match the checkpoint exactly (cast after restoring if you want to).
      step: which step; None is the latest.
      meta_check: e.g. {"config": cfg_dict}; every key must equal the stored meta's.

    Returns:
      (state, meta): the state with `target`'s structure and shardings, and the saved meta dict.

    Raises:
      FileNotFoundError: the stage or step does not exist.
      DamagedCheckpointError: a file of the step fails its checksums, or orbax cannot read it.
      ValueError: a `meta_check` key differs, or the target's tree paths, shapes or dtypes differ
        from the checkpoint's.
    """
    step = verify(run_dir, stage, step)
    where = f"{_stage_dir(run_dir, stage)} step {step}"
    meta = restore_meta(run_dir, stage, step)
    if meta_check:
        _check_meta(meta, meta_check, where)
    target = abstract_like(target)
    # Reads the step's state item directly: unlike a CheckpointManager, this never cleans up the
    # temporary directory of a save that another process (the trainer) has in flight.
    state_dir = _step_dir(run_dir, stage, step) / _STATE
    try:
        stored = ocp.StandardCheckpointHandler().metadata(state_dir).tree
    except Exception as err:  # a damaged step without checksums
        raise _unreadable(run_dir, stage, step, err) from None
    _check_tree(stored, target, where)
    try:
        with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as checkpointer:
            state = checkpointer.restore(state_dir, args=ocp.args.StandardRestore(target))
    except Exception as err:  # tensorstore's many-line errors, as one line
        raise _unreadable(run_dir, stage, step, err) from None
    return state, meta


def restore_params(run_dir: PathLike, stage: str, *, step: int | None = None) -> tuple[Any, dict]:
    """The `params` of a stage's checkpoint (default: the latest step), as host NumPy arrays, without
    knowing the state's structure (the stored tree is the target), and its meta: what an export of any
    stage reads. Typed PRNG keys in the state come back as their raw data (only the params are used).

    Raises:
      FileNotFoundError, DamagedCheckpointError: as `restore`.
    """
    step = verify(run_dir, stage, step)
    state_dir = _step_dir(run_dir, stage, step) / _STATE
    try:
        stored = ocp.StandardCheckpointHandler().metadata(state_dir).tree
    except Exception as err:
        raise _unreadable(run_dir, stage, step, err) from None
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    # The whole stored tree (orbax 0.12 reads no subtree alone); only the params are kept.
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), stored)
    try:
        with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as checkpointer:
            state = checkpointer.restore(state_dir, args=ocp.args.StandardRestore(target))
    except Exception as err:
        raise _unreadable(run_dir, stage, step, err) from None
    return jax.tree.map(np.asarray, state["params"]), restore_meta(run_dir, stage, step)


def restore_tokenizer(
    run_dir: PathLike, stage: str, dest: PathLike, *, step: int | None = None
) -> epath.Path:
    """Write the tokenizer saved with `step` (default: the latest) under `dest`.

    Returns:
      The path to load it from (e.g. with `jaxrlhf.tokenizers.load_tokenizer`): `dest/<name>`
      where <name> is the file or directory name passed to `save`.
    """
    step = _resolve_step(run_dir, stage, step)
    item = _step_dir(run_dir, stage, step) / _TOKENIZER
    if not item.exists():
        raise FileNotFoundError(
            f"checkpoint {_stage_dir(run_dir, stage)} step {step} holds no tokenizer: pass tokenizer= to save"
        )
    _check_files(run_dir, stage, step, [_TOKENIZER])
    try:
        spec = ocp.JsonCheckpointHandler().restore(item)
    except Exception as err:
        raise _unreadable(run_dir, stage, step, err) from None
    out = epath.Path(dest) / spec["name"]
    root = out if spec["is_dir"] else out.parent
    root.mkdir(parents=True, exist_ok=True)
    for name, text in spec["files"].items():
        (root / name).write_text(text)
    return out
