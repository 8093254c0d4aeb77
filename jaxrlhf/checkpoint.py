"""Checkpoints: save / restore / latest, one directory per pipeline stage, around orbax.

The only module in jaxrlhf that imports orbax. On disk (local or `gs://`, through etils epath):

    <run_dir>/<stage>/<step>/state/       the train state: a pytree of arrays (jax, NumPy, scalars)
    <run_dir>/<stage>/<step>/meta/        a JSON dict: data position, PRNG position, config, ...
    <run_dir>/<stage>/<step>/tokenizer/   optional: the tokenizer's files, as JSON text

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

Multi-process: every process calls `save` and `restore` (they are collective, like the jitted step);
`latest_step`, `has_stage`, `restore_meta` and `restore_tokenizer` only read files and can be called
from any subset of processes.

Restoring against an abstract target is the usual pattern:

    target = checkpoint.abstract_like(jax.eval_shape(init_state, key, cfg), shardings)
    state, meta = checkpoint.restore(run_dir, "sft", target, meta_check={"config": cfg_dict})
"""

from __future__ import annotations

import json
import operator
import os
import re
from collections.abc import Mapping
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
_UNSET = object()


# --------------------------------------------------------------------------------------- paths

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")  # gs://, s3://, file://, ...


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


def latest_step(run_dir: PathLike, stage: str) -> int | None:
    """The newest finished step of `stage` under `run_dir`, or None if it has none."""
    return max(all_steps(run_dir, stage), default=None)


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
        return steps[-1]
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


# ---------------------------------------------------------------------------------------- save


def _nonfinite_leaf(state) -> str | None:
    """The path of the first float leaf holding NaN or inf, or None; one host sync in all."""
    paths, flags = [], []
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        if isinstance(leaf, jax.Array):
            if jnp.issubdtype(leaf.dtype, jnp.inexact):
                paths.append(path)
                flags.append(jnp.all(jnp.isfinite(leaf)))  # stays on device until device_get
        elif isinstance(leaf, float | complex | np.ndarray | np.generic):
            if np.issubdtype(np.asarray(leaf).dtype, np.inexact):
                paths.append(path)
                flags.append(np.all(np.isfinite(leaf)))
    for path, ok in zip(paths, jax.device_get(flags), strict=True):
        if not ok:
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
    exists = step in all_steps(run_dir, stage)
    if jax.process_count() > 1:
        # Process 0's answer for all: a fast process must not see the step a slow one just wrote.
        exists = bool(ocp.multihost.broadcast_one_to_all(np.int32(exists)))
    if exists and not overwrite:
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


def _check_meta(meta: dict, meta_check: Mapping[str, Any], where: str) -> None:
    """One-line ValueError naming every key of `meta_check` whose value differs from `meta`."""
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
            items = ", ".join(f"{p}={_render(pick(s, e))}" if p else _render(pick(s, e)) for p, s, e in diffs)
            parts.append(f"{top} {items}" if diffs[0][0] else f"{top}={items}")
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


def restore_meta(run_dir: PathLike, stage: str, step: int | None = None) -> dict:
    """The `meta` dict saved with `step` (default: the latest) of `stage`."""
    step = _resolve_step(run_dir, stage, step)
    return dict(ocp.JsonCheckpointHandler().restore(_step_dir(run_dir, stage, step) / _META))


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
      ValueError: a `meta_check` key differs, or the target's tree paths, shapes or dtypes differ
        from the checkpoint's.
    """
    step = _resolve_step(run_dir, stage, step)
    where = f"{_stage_dir(run_dir, stage)} step {step}"
    meta = restore_meta(run_dir, stage, step)
    if meta_check:
        _check_meta(meta, meta_check, where)
    target = abstract_like(target)
    # Reads the step's state item directly: unlike a CheckpointManager, this never cleans up the
    # temporary directory of a save that another process (the trainer) has in flight.
    state_dir = _step_dir(run_dir, stage, step) / _STATE
    _check_tree(ocp.StandardCheckpointHandler().metadata(state_dir).tree, target, where)
    with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as checkpointer:
        state = checkpointer.restore(state_dir, args=ocp.args.StandardRestore(target))
    return state, meta


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
    spec = ocp.JsonCheckpointHandler().restore(item)
    out = epath.Path(dest) / spec["name"]
    root = out if spec["is_dir"] else out.parent
    root.mkdir(parents=True, exist_ok=True)
    for name, text in spec["files"].items():
        (root / name).write_text(text)
    return out
