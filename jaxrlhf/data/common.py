"""Where data comes from, how downloads are checked, and how a TFDS builder is prepared and read.

A data set's source folder (the raw csv/tsv/jsonl files) is found in this order:

1. an explicit `data_dir` argument (the folder holding the files, or a parent with a `<name>/`
   subfolder); if it does not hold the files, that is an error (no silent fallback to a download);
2. the environment variable `JAXRLHF_DATA_DIR` (subfolders `tweets/`, `tldr/`, `sst2/`; the folder
   itself is also accepted); a folder without the files falls through to 3, since it may cover
   other data sets only;
3. an earlier download in `<cache>/downloads/<name>/`;
4. a download of the pinned URLs into that folder, each file checked against its sha256 where one
   is pinned.

`<cache>` is the `cache_dir` argument, else `JAXRLHF_CACHE_DIR`, else `~/.cache/jaxrlhf`. Offline
with no data, the loaders raise `DataNotFoundError` with one line that says what to do; a cache that
cannot be created (a read-only HOME) is a `CacheDirError` naming the folder and the setting to change.

A `tfds.core.GeneratorBasedBuilder` turns the source files into array_record files under
`<cache>/tfds/<name>-<fingerprint>/`; the fingerprint covers the source files' names, sizes and
mtimes, so a second call reuses the prepared data and a changed source is prepared afresh. Reading
goes through `builder.as_data_source(split)`, which needs no TensorFlow.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

ENV_DATA_DIR = "JAXRLHF_DATA_DIR"
ENV_CACHE_DIR = "JAXRLHF_CACHE_DIR"
DEFAULT_CACHE_DIR = "~/.cache/jaxrlhf"

# Names users reach for, mapped onto the split names the builders write.
SPLIT_ALIASES = {"valid": "validation", "val": "validation", "dev": "validation"}


class DataNotFoundError(FileNotFoundError):
    """No local copy of a data set was found and it could not be downloaded."""


class ChecksumError(ValueError):
    """A downloaded file's sha256 differs from the pinned one."""


class DataFormatError(ValueError):
    """A source file that does not read as its data set; the message names the file, line and field."""


class CacheDirError(ValueError):
    """The cache folder cannot be created or written (a read-only HOME); the message names it and the way
    out. A ValueError, so that a pipeline prints it as one line, not as a fault under --out."""


_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
_UTF8_BOM = b"\xef\xbb\xbf"


def read_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """(line number from 1, text) of each line of a UTF-8 text file, line endings kept (for csv).

    A UTF-8 byte-order mark (Excel's "CSV UTF-8") is dropped and CRLF endings are kept as they are; a
    UTF-16 file or a byte that is not UTF-8 (a Latin-1 / Windows-1252 export) is a `DataFormatError`
    naming the file and the line. Streams: a large file is never held in memory whole.
    """
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if number == 1:
                if raw.startswith(_UTF16_BOMS):
                    raise DataFormatError(
                        f"{path} is UTF-16 (it starts with a UTF-16 byte-order mark); save it as UTF-8"
                    )
                raw = raw.removeprefix(_UTF8_BOM)
            if b"\x00" in raw:
                raise DataFormatError(
                    f"{path}:{number}: NUL bytes, as in a UTF-16 or binary file; save it as UTF-8 text"
                )
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as err:
                column = len(raw[: err.start].decode("utf-8", "replace")) + 1
                raise DataFormatError(
                    f"{path}:{number}: byte 0x{raw[err.start]:02x} at column {column} is not UTF-8 (a "
                    "Latin-1 or Windows-1252 file?); save the file as UTF-8"
                ) from None


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataSpec:
    """How to find, download and describe one data set's source files.

    Attributes:
      name: the data set's name in messages, e.g. "tweets".
      subdir: its folder under `JAXRLHF_DATA_DIR` and under `<cache>/downloads/`.
      expects: the files a source folder must hold, in words, for error messages.
      find_files: folder -> the source files in it that the builder reads; empty when the folder
        has no data.
      downloads: relative path -> (url, sha256 or None) of the files to download when there is no
        local copy.
    """

    name: str
    subdir: str
    expects: str
    find_files: Callable[[pathlib.Path], list[pathlib.Path]]
    downloads: Mapping[str, tuple[str, str | None]]


def file_spec(
    name: str,
    required: Sequence[str],
    downloads: Mapping[str, tuple[str, str | None]],
    optional: Sequence[str] = (),
) -> DataSpec:
    """The DataSpec of a data set whose folder holds fixed file names: `required` ones (all present, or the
    folder has no data) and `optional` ones (read when present)."""

    def find_files(folder: pathlib.Path) -> list[pathlib.Path]:
        if not all((folder / f).is_file() for f in required):
            return []
        return [folder / f for f in required] + [folder / f for f in optional if (folder / f).is_file()]

    expects = " and ".join(required) + (f" ({', '.join(optional)} optional)" if optional else "")
    return DataSpec(name=name, subdir=name, expects=expects, find_files=find_files, downloads=downloads)


class SourceBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A builder of one of our data sets: a subclass names `name`, `SPEC` (its DataSpec) and
    `RELEASE_NOTES`; its code path (TFDS cannot locate code in the `jaxrlhf` namespace package), version
    and manual-download message follow."""

    SPEC: DataSpec
    VERSION = tfds.core.Version("1.0.0")

    def __init_subclass__(cls, **kwargs):
        cls.code_path = pathlib.Path(sys.modules[cls.__module__].__file__)
        cls.MANUAL_DOWNLOAD_INSTRUCTIONS = f"Put {cls.SPEC.expects} in the manual dir."
        super().__init_subclass__(**kwargs)


def dataset_info(
    builder: tfds.core.GeneratorBasedBuilder, features: dict, homepage: str
) -> tfds.core.DatasetInfo:
    """A builder's DatasetInfo: its module's docstring, `features`, `homepage`, rows kept in file order."""
    return tfds.core.DatasetInfo(
        builder=builder,
        description=sys.modules[type(builder).__module__].__doc__,
        features=tfds.features.FeaturesDict(features),
        homepage=homepage,
        disable_shuffling=True,  # keep the file order
    )


def cache_root(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """The cache folder: `cache_dir`, else `$JAXRLHF_CACHE_DIR`, else `~/.cache/jaxrlhf`."""
    root = cache_dir or os.environ.get(ENV_CACHE_DIR) or DEFAULT_CACHE_DIR
    return pathlib.Path(root).expanduser()


def make_cache_dir(folder: pathlib.Path, cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """Creates `folder`, a folder under `cache_root(cache_dir)`, before anything is written there.

    Raises:
      CacheDirError: one line naming the cache folder, where it was set, why it cannot be made, and the
        setting that moves it: the `cache_dir` given (--data.cache_dir), else $JAXRLHF_CACHE_DIR.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        why = err.strerror or type(err).__name__
        if cache_dir:
            given, fix = "--data.cache_dir", "pass a --data.cache_dir you can write to"
        elif os.environ.get(ENV_CACHE_DIR):
            given, fix = f"${ENV_CACHE_DIR}", f"set {ENV_CACHE_DIR} to a directory you can write to"
        else:
            given = f"the default {DEFAULT_CACHE_DIR}"
            fix = f"set {ENV_CACHE_DIR} (or pass --data.cache_dir) to a directory you can write to"
        raise CacheDirError(
            f"cannot write the data cache {cache_root(cache_dir)} ({given}): {why}; {fix}"
        ) from None
    return folder


def canonical_split(split: str, aliases: Mapping[str, str] = SPLIT_ALIASES) -> str:
    """Maps a user's split name ("valid", "dev", ...) onto the builders' names."""
    split = str(split)
    return aliases.get(split.lower(), split)


def _holding_folder(spec: DataSpec, folder: pathlib.Path) -> pathlib.Path | None:
    """`folder` or `folder/<subdir>`, whichever holds the data set's files; None if neither does."""
    for candidate in (folder, folder / spec.subdir):
        if candidate.is_dir() and spec.find_files(candidate):
            return candidate
    return None


def _not_found_message(spec: DataSpec, reason: str = "") -> str:
    reason = f" ({reason})" if reason else ""
    return (
        f"{spec.name} data not found{reason}: pass --data-dir DIR or set {ENV_DATA_DIR} "
        f"to a folder with {spec.expects} (or with a {spec.subdir}/ subfolder holding them), "
        "or connect to the network to download it"
    )


def download_files(spec: DataSpec, dest: pathlib.Path) -> pathlib.Path:
    """Downloads `spec.downloads` into `dest` (skipping files already there), checking sha256.

    Each file is written to `<file>.part` and renamed only after its hash matched, so a file in
    `dest` is always complete and verified.

    Raises:
      DataNotFoundError: the network (or the URL) could not be reached; one line saying what to do.
      ChecksumError: a file's sha256 differs from the pinned value.
    """
    if not spec.downloads:
        raise DataNotFoundError(_not_found_message(spec, "no download URL is known"))
    for rel_path, (url, expected_sha256) in spec.downloads.items():
        target = dest / rel_path
        if target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        part = target.with_name(target.name + ".part")
        digest = hashlib.sha256()
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(part, "wb") as f:
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    digest.update(chunk)
                    f.write(chunk)
        except urllib.error.HTTPError as e:
            part.unlink(missing_ok=True)
            raise DataNotFoundError(_not_found_message(spec, f"HTTP {e.code} for {url}")) from e
        except (urllib.error.URLError, OSError) as e:
            part.unlink(missing_ok=True)
            raise DataNotFoundError(_not_found_message(spec, f"could not download {url}")) from e
        actual = digest.hexdigest()
        if expected_sha256 is not None and actual != expected_sha256:
            part.unlink(missing_ok=True)
            raise ChecksumError(
                f"sha256 mismatch for {url}: expected {expected_sha256}, got {actual}; the "
                "download is corrupt or the upstream file changed, so it was not used"
            )
        part.replace(target)
    return dest


def resolve_source_dir(
    spec: DataSpec,
    data_dir: str | os.PathLike | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
) -> pathlib.Path:
    """Source folder of `spec`: `data_dir` > `$JAXRLHF_DATA_DIR` > cache > download."""
    if data_dir is not None:
        folder = pathlib.Path(data_dir).expanduser()
        found = _holding_folder(spec, folder)
        if found is None:
            raise DataNotFoundError(
                f"{spec.name} data not found in {folder} (nor {folder / spec.subdir}): "
                f"expected {spec.expects}"
            )
        return found
    if env_dir := os.environ.get(ENV_DATA_DIR):
        found = _holding_folder(spec, pathlib.Path(env_dir).expanduser())
        if found is not None:
            return found
    downloaded = cache_root(cache_dir) / "downloads" / spec.subdir
    if all((downloaded / rel_path).exists() for rel_path in spec.downloads) and spec.downloads:
        return downloaded
    return download_files(spec, make_cache_dir(downloaded, cache_dir))


def builder_source_dir(dl_manager: Any, spec: DataSpec) -> pathlib.Path:
    """For `_split_generators`: the manual dir if one was given, else a checked download."""
    try:
        manual_dir = pathlib.Path(dl_manager.manual_dir)
    except AssertionError:  # TFDS raises this when no manual dir was given (or it is empty)
        return download_files(spec, pathlib.Path(dl_manager.download_dir) / spec.subdir)
    found = _holding_folder(spec, manual_dir)
    if found is None:
        raise DataNotFoundError(
            f"{spec.name} data not found in manual dir {manual_dir}: expected {spec.expects}"
        )
    return found


def source_fingerprint(files: list[pathlib.Path], root: pathlib.Path) -> str:
    """A short hash of the source files' relative names, sizes and mtimes."""
    stats = [
        (str(path.relative_to(root)), path.stat().st_size, path.stat().st_mtime_ns) for path in sorted(files)
    ]
    return hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:16]


def prepare_builder(
    builder_cls: type[tfds.core.GeneratorBasedBuilder],
    spec: DataSpec,
    source_dir: pathlib.Path,
    *,
    cache_dir: str | os.PathLike | None = None,
) -> tfds.core.GeneratorBasedBuilder:
    """Prepares `builder_cls` from `source_dir` as array_record under `<cache>/tfds/`, once."""
    fingerprint = source_fingerprint(spec.find_files(source_dir), source_dir)
    tfds_dir = cache_root(cache_dir) / "tfds" / f"{spec.subdir}-{fingerprint}"
    if not tfds_dir.is_dir():  # a prepared cache on a read-only disk is still read
        make_cache_dir(tfds_dir, cache_dir)
    builder = builder_cls(data_dir=os.fspath(tfds_dir), file_format="array_record")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(source_dir), try_download_gcs=False)
    )
    return builder


def _to_python(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if isinstance(value, np.generic):
        return value.item()
    return value


def read_split(builder: tfds.core.GeneratorBasedBuilder, split: str) -> list[dict[str, Any]]:
    """Every row of a prepared split as a dict of Python values (Text -> str, ClassLabel -> int)."""
    if split not in builder.info.splits:
        available = ", ".join(sorted(builder.info.splits)) or "none"
        raise ValueError(f"{builder.name} has no split {split!r}; available: {available}")
    source = builder.as_data_source(split=split)
    rows = source.__getitems__(list(range(len(source))))  # one batched read: much faster than a loop
    return [{key: _to_python(value) for key, value in row.items()} for row in rows]


def load_rows(
    builder_cls: type[tfds.core.GeneratorBasedBuilder],
    spec: DataSpec,
    split: str,
    data_dir: str | os.PathLike | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
) -> list[dict[str, Any]]:
    """Finds (or downloads) the source, prepares the builder once, and reads one split."""
    source_dir = resolve_source_dir(spec, data_dir, cache_dir=cache_dir)
    builder = prepare_builder(builder_cls, spec, source_dir, cache_dir=cache_dir)
    return read_split(builder, split)
