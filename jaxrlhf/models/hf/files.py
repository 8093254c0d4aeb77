"""The files of a Hugging Face checkpoint directory: config.json and other JSON, safetensors in (one reader)
and out (one writer, sharded), the legacy pytorch_model.bin, and the hub for GPT-2's names.

Every fault is one line naming the file: a missing, cut-short or corrupt JSON or safetensors file, an
index naming a shard that is not there (with the single-file checkpoint beside it, if there is one), a
tensor holding NaN or inf (refused as it is read: it would otherwise load and fail at the first step).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping

import ml_dtypes
import numpy as np
from etils import epath

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}  # fmt: skip
_FLOATS = (ml_dtypes.bfloat16,)  # float dtypes whose NumPy kind is not "f"
_FINITE_CHUNK = 1 << 24  # values checked at a time: the check's bool mask stays small for any tensor


def check_finite(array: np.ndarray, name: str, path: str) -> np.ndarray:
    """`array` (tensor `name` of the file `path`) if every value is finite; cheap: one pass in chunks.

    A checkpoint with NaN or inf (a diverged run's save, a corrupt copy) would load and fail only at the
    first step, blaming the learning rate; refused here, naming the tensor and the file.

    Raises:
      ValueError: one line naming the tensor, the file and how many values are not finite.
    """
    if array.dtype.kind not in "fc" and array.dtype not in _FLOATS:
        return array
    flat = array.reshape(-1)
    bad = 0
    for start in range(0, flat.size, _FINITE_CHUNK):
        bad += int(np.count_nonzero(~np.isfinite(flat[start : start + _FINITE_CHUNK])))
    if bad:
        raise ValueError(
            f"{path}: tensor {name!r} holds NaN or inf ({bad} of its {flat.size} values): the weights are "
            "corrupt or were saved after training diverged; use another checkpoint"
        )
    return array


def read_json(path: str | os.PathLike, what: str = "a JSON object") -> dict:
    """A JSON object file (local or gs://): config.json, an index, a run's meta.

    Raises:
      FileNotFoundError / ValueError: one line naming the file: missing, not JSON (cut short or
        corrupt), or not an object.
    """
    path = epath.Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"no {path}: expected {what}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not valid JSON (not UTF-8): the file is corrupt; copy it again") from None
    try:
        out = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{path}: not valid JSON ({err.msg}: line {err.lineno} column {err.colno}): the file is "
            "truncated or corrupt; copy it again"
        ) from None
    if not isinstance(out, dict):
        raise ValueError(f"{path}: expected {what}, found {type(out).__name__}")
    return out


def safetensors_views(path: str) -> dict[str, Callable[[], np.ndarray]]:
    """name -> a function reading that tensor of the safetensors file `path` into a new NumPy array.

    The format is an 8-byte little-endian header length, a JSON header {name: {dtype, shape,
    data_offsets}} and the raw bytes. Reading it here gives bfloat16 too (ml_dtypes), which the
    safetensors package's NumPy reader cannot, and reads only the tensor asked for, into memory freed
    with the array (no memory map whose pages would stay resident). A tensor read is checked finite
    (`check_finite`); one never read (a skipped buffer) is not.
    """
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
            if not isinstance(header, dict):
                raise ValueError
            end = os.fstat(f.fileno()).st_size
    except (ValueError, MemoryError, OverflowError, UnicodeDecodeError):
        raise ValueError(
            f"{path}: not a readable safetensors file (its header is cut or corrupt): an interrupted "
            "download? copy it again"
        ) from None
    header.pop("__metadata__", None)
    unknown = {str(info.get("dtype")) for info in header.values()} - set(_DTYPES)
    if unknown:
        raise ValueError(f"{path}: tensors of dtype {sorted(unknown)} are not supported")
    base = 8 + size
    last = max((info["data_offsets"][1] for info in header.values()), default=0)
    if base + last > end:
        raise ValueError(
            f"{path}: not a readable safetensors file: it is truncated or corrupt (its tensors need "
            f"{base + last} bytes, it has {end}); copy it again"
        )

    def read(name, info):
        start, stop = info["data_offsets"]
        out = np.empty(info["shape"], _DTYPES[info["dtype"]])
        with open(path, "rb") as f:
            f.seek(base + start)
            if f.readinto(memoryview(out.reshape(-1).view(np.uint8))) != stop - start:
                raise ValueError(
                    f"{path}: not a readable safetensors file: it is truncated (tensor data ends early); "
                    "copy it again"
                )
        return check_finite(out, name, path)

    return {name: (lambda name=name, info=info: read(name, info)) for name, info in header.items()}


def tensor_views(directory: str) -> dict[str, Callable[[], np.ndarray]]:
    """name -> a reader of that tensor, over every weights file of a checkpoint directory: model.safetensors,
    the shards an index names, or a legacy pytorch_model.bin (read whole, through torch).

    Raises:
      FileNotFoundError / ValueError: no weights, an unreadable index, or a shard it names missing.
    """
    index = os.path.join(directory, INDEX)
    single = os.path.join(directory, SINGLE)
    if os.path.isfile(index):
        weight_map = read_json(index, "a safetensors index").get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: no weight_map object: not a safetensors index; copy it again")
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not os.path.isfile(os.path.join(directory, f))]
        if missing:
            more = f" (and {len(missing) - 1} more of its {len(files)} shards)" if len(missing) > 1 else ""
            fix = "copy the missing shard"
            if os.path.isfile(single):
                fix = f"{SINGLE} lies beside it: remove the index to load that file instead, or {fix}"
            raise FileNotFoundError(
                f"{index} names the shard {missing[0]}, missing from {directory}{more}; {fix}"
            )
    elif os.path.isfile(single):
        files = [SINGLE]
    elif os.path.isfile(os.path.join(directory, TORCH_BIN)):
        return _torch_views(os.path.join(directory, TORCH_BIN))
    else:
        raise FileNotFoundError(
            f"no weights in {directory}: expected {SINGLE}, {INDEX} (and its shards) or {TORCH_BIN}"
        )
    views = {}
    for file in files:
        views.update(safetensors_views(os.path.join(directory, file)))
    return views


def _torch_views(path: str) -> dict[str, Callable[[], np.ndarray]]:
    import torch  # only for legacy checkpoints; not a dependency otherwise

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a cut file raises zipfile / pickle errors of many kinds
        raise ValueError(
            f"{path}: not a readable PyTorch checkpoint ({type(err).__name__}); copy it again"
        ) from None

    def host(tensor):
        if tensor.dtype == torch.bfloat16:
            return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return tensor.numpy()

    return {name: (lambda name=name, t=t: check_finite(host(t), name, path)) for name, t in state.items()}


def write_safetensors(
    out_dir: str, tensors: Iterable[tuple[str, np.ndarray]], *, max_shard_bytes: int = 2 << 30
) -> None:
    """Write named arrays as model.safetensors, or as model-0000k-of-0000n.safetensors shards + an index
    once they pass `max_shard_bytes`; each shard is written under a temporary name and renamed, so a kill
    leaves no file that looks whole. The host holds one shard at a time."""
    os.makedirs(out_dir, exist_ok=True)
    shards, current, size = [], {}, 0
    for name, array in tensors:
        if current and size + array.nbytes > max_shard_bytes:
            shards.append(_write_shard(out_dir, len(shards), current))
            current, size = {}, 0
        current[name] = np.ascontiguousarray(array)
        size += array.nbytes
    shards.append(_write_shard(out_dir, len(shards), current))
    final = [SINGLE] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]  # fmt: skip
    weight_map = {}
    for (tmp, names), name in zip(shards, final, strict=True):
        os.replace(tmp, os.path.join(out_dir, name))
        weight_map.update(dict.fromkeys(names, name))
    if len(shards) > 1:
        total = sum(os.path.getsize(os.path.join(out_dir, f)) for f in final)
        write_json(
            os.path.join(out_dir, INDEX), {"metadata": {"total_size": total}, "weight_map": weight_map}
        )


def _write_shard(out_dir: str, i: int, tensors: Mapping[str, np.ndarray]) -> tuple[str, list[str]]:
    """One safetensors file under a temporary name, with save_pretrained's "format": "pt" metadata (which
    transformers 4.x checks)."""
    import safetensors.numpy

    path = os.path.join(out_dir, f".shard-{i}.safetensors.tmp")
    safetensors.numpy.save_file(dict(tensors), path, metadata={"format": "pt"})
    return path, list(tensors)


def write_json(path: str, record: dict) -> None:
    """`record` as indented JSON, written under a temporary name and renamed."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def local_dir(path_or_name: str | os.PathLike, hub_names: Iterable[str] = ()) -> str:
    """A local checkpoint directory: `path_or_name` itself, or for a hub name in `hub_names` (GPT-2's) its
    snapshot (config, safetensors; online, or from the hub cache)."""
    directory = os.fspath(path_or_name)
    if os.path.isdir(directory):
        return directory
    if directory not in tuple(hub_names):
        raise FileNotFoundError(
            f"{directory} is not a directory; pass a local Hugging Face model directory (config.json + "
            f"model.safetensors){' or one of ' + ', '.join(hub_names) if hub_names else ''}"
        )
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(directory, allow_patterns=["config.json", "*.safetensors", INDEX])
    except Exception as err:
        cause = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise OSError(
            f"{directory!r} is not a local directory and could not be fetched from the Hugging Face Hub "
            f"({type(err).__name__}: {cause[:200]}); pass a directory with config.json and "
            "model.safetensors, or run once online to fill the hub cache."
        ) from err
