"""Reddit TL;DR ("Learning to summarize from human feedback") as two TFDS builders, and its prompt.

`TldrBuilder`: post -> reference summary pairs; features id, subreddit, title, post, summary.
`ComparisonsBuilder`: human preferences between two summaries of a post; features id, subreddit,
title, post, chosen, rejected.

Each file's format is detected from the keys of its first row:

    pairs        OpenAI tldr_3_filtered  {id, subreddit, title, post, summary}
                 CarperAI                {prompt, label}, prompt = "SUBREDDIT: r/..\nTITLE: ..
                                         \nPOST: ..\nTL;DR:"
                 dove                    {instruction_id, subreddit, title, instruction,
                                         gold_response}
    comparisons  OpenAI comparisons      {info: {id, subreddit, title, post},
                                         summaries: [{text}, {text}], choice}
                 CarperAI                {prompt, chosen, rejected}
                 vertex                  {input_text, candidate_0, candidate_1, choice}
                                         (the post only: no subreddit or title)

Fields a format lacks are empty strings. Posts, titles and summaries are stripped of surrounding
whitespace; a CarperAI summary's leading "TL;DR:" and the vertex post's trailing " [summary]: " are
removed, so a training target is `prompt + " " + summary`. OpenAI comparison rows without a Reddit
post (the CNN/DM batches) are skipped.

Files in the tldr folder (`$JAXRLHF_DATA_DIR/tldr/` or the `data_dir` argument), and their split:

    pairs        tldr*.jsonl, tldr_3_filtered/*.jsonl   split from the file name, else train
    comparisons  comparisons*.jsonl, comparisons/*.json[l], batch*.json
                                                        OpenAI rows: their `split` field (train,
                                                        valid1 -> validation, valid2 -> test);
                                                        other files: from the name, else train

A file name's split is its first token that reads train, valid/validation/val/dev/valid1
(-> validation) or test/valid2 (-> test): "tldr_test500_dove.jsonl" is test,
"comparisons929_vertex_small.jsonl" is train.

Every line is one JSON object of the file's format. A line that is not JSON, a row without a field its
format needs, or a field that is null (or not text) is a `common.DataFormatError` naming the file, the
line and the field.

Downloads (online only) are OpenAI's public blobs: tldr_3_filtered/{train,valid,test}.jsonl and
comparisons/batch{3..22}.json (the Reddit batches; there is no batch21). Those blobs are not
content-addressed and no trusted sha256 was available to pin, so they are not hash-checked.
"""

from __future__ import annotations

import json
import os
import pathlib
import re

import tensorflow_datasets as tfds

from jaxrlhf.data import common
from jaxrlhf.data.tldr_prompt import clean_post, format_tldr_prompt  # noqa: F401 (re-exported)

_BLOB = "https://openaipublic.blob.core.windows.net/summarize-from-feedback"
TLDR_DOWNLOADS = {
    f"tldr_3_filtered/{name}.jsonl": (f"{_BLOB}/datasets/tldr_3_filtered/{name}.jsonl", None)
    for name in ("train", "valid", "test")
}
COMPARISON_BATCHES = (*range(3, 21), 22)
COMPARISONS_DOWNLOADS = {
    f"comparisons/batch{i}.json": (f"{_BLOB}/dataset/comparisons/batch{i}.json", None)
    for i in COMPARISON_BATCHES
}
COMPARISON_SPLIT_ALIASES = {**common.SPLIT_ALIASES, "valid1": "validation", "valid2": "test"}
_OPENAI_COMPARISON_SPLITS = {"train": "train", "valid1": "validation", "valid2": "test"}
_PROMPT_RE = re.compile(
    r"^SUBREDDIT: r/(?P<subreddit>[^\n]*)\nTITLE: (?P<title>[^\n]*)\n"
    r"POST: (?P<post>.*?)\s*(?:TL;DR:\s*)?$",
    re.DOTALL,
)


# -------------------------------------------------------------------------------- formats and files


def split_from_name(path: pathlib.Path) -> str | None:
    """The split a file name names ("tldr_test500_dove" -> "test"), or None."""
    for token in re.findall(r"[a-z]+\d*", path.stem.lower()):
        if token == "valid2" or token.startswith("test"):
            return "test"
        if token.startswith("train"):
            return "train"
        if token.startswith("valid") or token in ("val", "dev"):
            return "validation"
    return None


def _read_jsonl(path: pathlib.Path) -> list[tuple[int, dict]]:
    """(line number, row) of every non-blank line; a line that is not a JSON object names the file:line."""
    rows = []
    for number, text in common.read_lines(path):
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as err:
            raise common.DataFormatError(
                f"{path}:{number}: not valid JSON ({err.msg}: column {err.colno}); every line must be one "
                "JSON object (a line cut short, or two lines run together?)"
            ) from None
        if not isinstance(row, dict):
            raise common.DataFormatError(
                f"{path}:{number}: a JSON {type(row).__name__}, expected one JSON object per line"
            )
        rows.append((number, row))
    return rows


_FORMATS = (
    ("openai_tldr", {"post", "summary"}),
    ("dove", {"instruction", "gold_response"}),
    ("carper_tldr", {"prompt", "label"}),
    ("openai_comparisons", {"info", "summaries", "choice"}),
    ("vertex_comparisons", {"input_text", "candidate_0", "candidate_1", "choice"}),
    ("carper_comparisons", {"prompt", "chosen", "rejected"}),
)
# The fields each format's rows must have (beyond the keys that identify it), for error messages.
FORMAT_FIELDS = {
    "openai_tldr": ("subreddit", "title", "post", "summary"),
    "dove": ("instruction_id", "subreddit", "title", "instruction", "gold_response"),
    "carper_tldr": ("prompt", "label"),
    "openai_comparisons": ("info", "summaries", "choice"),
    "vertex_comparisons": ("input_text", "candidate_0", "candidate_1", "choice"),
    "carper_comparisons": ("prompt", "chosen", "rejected"),
}


def detect_format(row: dict) -> str:
    """A row's format from its keys: openai_tldr, carper_tldr, dove, openai_comparisons, ..."""
    keys = set(row)
    for name, required in _FORMATS:
        if required <= keys:
            return name
    known = "; ".join(f"{name}: {', '.join(fields)}" for name, fields in FORMAT_FIELDS.items())
    raise common.DataFormatError(
        f"unknown TL;DR row format with keys {sorted(keys)}; expected the keys of {known}"
    )


class FieldError(common.DataFormatError):
    """A row lacks a field its format needs, or the field is null / of the wrong type."""


def _text(row: dict, name: str, where: str = "", *, nullable: bool = False) -> str:
    """row[name] as a string; a missing, null (unless `nullable`: "") or non-text value is a FieldError
    naming the field."""
    label = f"{where}{name}"
    if name not in row:
        raise FieldError(f"no field {label!r}")
    value = row[name]
    if value is None and nullable:
        return ""
    if not isinstance(value, str):
        shown = "null" if value is None else json.dumps(value)[:40]
        raise FieldError(f"field {label!r} is {shown}; expected a string")
    return value


def _choice(row: dict) -> int:
    if "choice" not in row:
        raise FieldError("no field 'choice'")
    choice = row["choice"]
    if choice not in (0, 1) or isinstance(choice, bool):
        raise FieldError(f"field 'choice' is {json.dumps(choice)[:40]}; expected 0 or 1")
    return int(choice)


def _clean_summary(text: str) -> str:
    text = text.strip()
    if text.startswith("TL;DR:"):
        text = text[len("TL;DR:") :].strip()
    return text


def _parse_prompt(prompt: str) -> dict[str, str]:
    match = _PROMPT_RE.match(prompt.strip())
    if match is None:  # not the SUBREDDIT/TITLE/POST layout: keep the whole prompt as the post
        return {"subreddit": "", "title": "", "post": clean_post(prompt)}
    return {
        "subreddit": match["subreddit"].strip(),
        "title": match["title"].strip(),
        "post": clean_post(match["post"]),
    }


def _post_fields(id_: str, subreddit: str, title: str, post: str) -> dict[str, str]:
    return {
        "id": id_,
        "subreddit": subreddit.strip(),
        "title": title.strip(),
        "post": clean_post(post),
    }


def normalize_pair(row: dict, fmt: str) -> dict[str, str]:
    """One post/summary row of format `fmt` -> {id, subreddit, title, post, summary}.

    Raises:
      FieldError: a field of the format is missing, null or not text.
    """
    if fmt == "openai_tldr":
        id_ = str(row.get("id") or "")
        fields = _post_fields(
            id_,
            _text(row, "subreddit", nullable=True),
            _text(row, "title", nullable=True),
            _text(row, "post"),
        )
        return {**fields, "summary": _clean_summary(_text(row, "summary"))}
    if fmt == "dove":
        fields = _post_fields(
            _text(row, "instruction_id"),
            _text(row, "subreddit", nullable=True),
            _text(row, "title", nullable=True),
            _text(row, "instruction"),
        )
        return {**fields, "summary": _clean_summary(_text(row, "gold_response"))}
    if fmt == "carper_tldr":
        return {
            "id": "",
            **_parse_prompt(_text(row, "prompt")),
            "summary": _clean_summary(_text(row, "label")),
        }
    raise ValueError(f"{fmt} rows are comparisons, not post/summary pairs")


def normalize_comparison(row: dict, fmt: str) -> dict[str, str] | None:
    """A comparison row -> {id, subreddit, title, post, chosen, rejected}; None without a post.

    Raises:
      FieldError: a field of the format is missing, null or not text.
    """
    if fmt == "openai_comparisons":
        info = row.get("info")
        if not isinstance(info, dict):
            raise FieldError(f"field 'info' is {json.dumps(info)[:40]}; expected an object")
        if not info.get("post"):  # CNN/DM article batches
            return None
        summaries = row.get("summaries")
        if (
            not isinstance(summaries, list)
            or len(summaries) != 2
            or not all(isinstance(x, dict) for x in summaries)
        ):
            raise FieldError(
                f"field 'summaries' is {json.dumps(summaries)[:40]}; expected two {{\"text\": ...}}"
            )
        texts = [_text(summary, "text", f"summaries[{i}].") for i, summary in enumerate(summaries)]
        choice = _choice(row)
        fields = _post_fields(
            str(info.get("id") or ""),
            _text(info, "subreddit", "info.", nullable=True),
            _text(info, "title", "info.", nullable=True),
            _text(info, "post", "info."),
        )
        chosen, rejected = texts[choice], texts[1 - choice]
    elif fmt == "vertex_comparisons":
        choice = _choice(row)
        fields = _post_fields("", "", "", _text(row, "input_text"))
        chosen, rejected = _text(row, f"candidate_{choice}"), _text(row, f"candidate_{1 - choice}")
    elif fmt == "carper_comparisons":
        fields = {"id": "", **_parse_prompt(_text(row, "prompt"))}
        chosen, rejected = _text(row, "chosen"), _text(row, "rejected")
    else:
        raise ValueError(f"{fmt} rows are post/summary pairs, not comparisons")
    return {**fields, "chosen": _clean_summary(chosen), "rejected": _clean_summary(rejected)}


def _row_error(path: pathlib.Path, number: int, fmt: str, err: Exception) -> common.DataFormatError:
    return common.DataFormatError(
        f"{path}:{number}: {err} (the file's first row makes it {fmt}, whose rows have "
        f"{', '.join(FORMAT_FIELDS[fmt])})"
    )


def find_tldr_files(folder: pathlib.Path) -> list[pathlib.Path]:
    """Post/summary files in `folder`: tldr*.jsonl and tldr_3_filtered/*.jsonl."""
    return sorted(folder.glob("tldr*.jsonl")) + sorted(folder.glob("tldr_3_filtered/*.jsonl"))


def find_comparison_files(folder: pathlib.Path) -> list[pathlib.Path]:
    """Comparison files in `folder`: comparisons*.jsonl, comparisons/*.json[l] and batch*.json."""
    return (
        sorted(folder.glob("comparisons*.jsonl"))
        + sorted(folder.glob("comparisons/*.json"))
        + sorted(folder.glob("comparisons/*.jsonl"))
        + sorted(folder.glob("batch*.json"))
    )


def _file_format(path: pathlib.Path, rows: list[tuple[int, dict]]) -> str:
    number, first = rows[0]
    try:
        return detect_format(first)
    except common.DataFormatError as err:
        raise common.DataFormatError(f"{path}:{number}: {err}") from None


def _read_rows(files: list[pathlib.Path], normalize, split_of) -> dict[str, list[dict[str, str]]]:
    """`normalize(row, fmt)` of every row of `files` (None: dropped), grouped by `split_of(path, number,
    row, fmt)`; a row that does not read is a DataFormatError naming file:line and field."""
    by_split: dict[str, list[dict[str, str]]] = {}
    for path in files:
        rows = _read_jsonl(path)
        if not rows:
            continue
        fmt = _file_format(path, rows)
        for number, row in rows:
            split = split_of(path, number, row, fmt)
            try:
                normalized = normalize(row, fmt)
            except FieldError as err:
                raise _row_error(path, number, fmt, err) from None
            except ValueError as err:  # a file of the other kind (pairs among comparisons, or back)
                raise common.DataFormatError(f"{path}:{number}: {err}") from None
            if normalized is not None:
                by_split.setdefault(split, []).append(normalized)
    return by_split


def read_pairs(files: list[pathlib.Path]) -> dict[str, list[dict[str, str]]]:
    """Normalised post/summary rows from `files`, grouped by split (empty splits left out).

    Raises:
      common.DataFormatError: file:line and field of the first row that does not read.
    """
    return _read_rows(files, normalize_pair, lambda path, *_: split_from_name(path) or "train")


def _comparison_split(path: pathlib.Path, number: int, row: dict, fmt: str) -> str:
    if fmt != "openai_comparisons":
        return split_from_name(path) or "train"
    split = _OPENAI_COMPARISON_SPLITS.get(row.get("split", ""))
    if split is None:
        raise common.DataFormatError(
            f"{path}:{number}: field 'split' is {row.get('split')!r}; expected one of "
            f"{', '.join(_OPENAI_COMPARISON_SPLITS)}"
        )
    return split


def read_comparisons(files: list[pathlib.Path]) -> dict[str, list[dict[str, str]]]:
    """Normalised comparison rows from `files`, grouped by split (empty splits left out).

    Raises:
      common.DataFormatError: file:line and field of the first row that does not read.
    """
    return _read_rows(files, normalize_comparison, _comparison_split)


def split_files(files: list[pathlib.Path], split: str) -> list[pathlib.Path]:
    """The files among `files` whose name gives `split` (a name with no split counts as train); all of
    them if none does (OpenAI comparison batches carry their split per row)."""
    named = [path for path in files if (split_from_name(path) or "train") == split]
    return named or list(files)


TLDR_SPEC = common.DataSpec(
    name="tldr",
    subdir="tldr",
    expects="TL;DR post/summary files (tldr*.jsonl or tldr_3_filtered/{train,valid,test}.jsonl)",
    find_files=find_tldr_files,
    downloads=TLDR_DOWNLOADS,
)
COMPARISONS_SPEC = common.DataSpec(
    name="tldr comparisons",
    subdir="tldr",
    expects="TL;DR comparison files (comparisons*.jsonl or comparisons/batch*.json)",
    find_files=find_comparison_files,
    downloads=COMPARISONS_DOWNLOADS,
)

_POST_FEATURES = ("id", "subreddit", "title", "post")


def _generate(rows: list[dict[str, str]]):
    yield from enumerate(rows)


class TldrBuilder(common.SourceBuilder):
    """TL;DR post -> reference summary pairs; splits train / validation / test where files exist."""

    name = "jaxrlhf_tldr"
    SPEC = TLDR_SPEC
    RELEASE_NOTES = {"1.0.0": "OpenAI / CarperAI / dove formats normalised."}

    def _info(self) -> tfds.core.DatasetInfo:
        names = (*_POST_FEATURES, "summary")
        return common.dataset_info(
            self,
            {k: tfds.features.Text() for k in names},
            "https://github.com/openai/summarize-from-feedback",
        )

    def _split_generators(self, dl_manager):
        source_dir = common.builder_source_dir(dl_manager, TLDR_SPEC)
        by_split = read_pairs(find_tldr_files(source_dir))
        return {split: self._generate_examples(rows) for split, rows in by_split.items()}

    def _generate_examples(self, rows):
        return _generate(rows)


class ComparisonsBuilder(common.SourceBuilder):
    """TL;DR human comparisons (chosen vs rejected); splits train / validation / test if present."""

    name = "jaxrlhf_tldr_comparisons"
    SPEC = COMPARISONS_SPEC
    RELEASE_NOTES = {"1.0.0": "OpenAI / CarperAI / vertex formats normalised."}

    def _info(self) -> tfds.core.DatasetInfo:
        names = (*_POST_FEATURES, "chosen", "rejected")
        return common.dataset_info(
            self,
            {k: tfds.features.Text() for k in names},
            "https://github.com/openai/summarize-from-feedback",
        )

    def _split_generators(self, dl_manager):
        source_dir = common.builder_source_dir(dl_manager, COMPARISONS_SPEC)
        by_split = read_comparisons(find_comparison_files(source_dir))
        return {split: self._generate_examples(rows) for split, rows in by_split.items()}

    def _generate_examples(self, rows):
        return _generate(rows)


def load_tldr(
    split: str,
    data_dir: str | os.PathLike | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
) -> list[dict[str, str]]:
    """Loads TL;DR post/summary pairs through `TldrBuilder`.

    Args:
      split: "train", "validation" (or "valid") or "test"; only splits with files exist.
      data_dir: the tldr folder (or a parent with a tldr/ subfolder); see `common` for the
        fallbacks.
      cache_dir: where downloads and prepared TFDS data live.

    Returns:
      Rows in file order, each {"id", "subreddit", "title", "post", "summary"} (str; "" where
      unknown).
    """
    split = common.canonical_split(split)
    return common.load_rows(TldrBuilder, TLDR_SPEC, split, data_dir, cache_dir=cache_dir)


def load_comparisons(
    split: str,
    data_dir: str | os.PathLike | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
) -> list[dict[str, str]]:
    """Loads TL;DR human comparisons through `ComparisonsBuilder`.

    Args:
      split: "train", "validation" (OpenAI valid1; "valid1" works too) or "test" (OpenAI valid2;
        "valid2" works too).
      data_dir: the tldr folder (or a parent with a tldr/ subfolder); see `common` for the
        fallbacks.
      cache_dir: where downloads and prepared TFDS data live.

    Returns:
      Rows in file order, each {"id", "subreddit", "title", "post", "chosen", "rejected"} (str;
      "" where the format lacks a field).
    """
    split = common.canonical_split(split, COMPARISON_SPLIT_ALIASES)
    return common.load_rows(ComparisonsBuilder, COMPARISONS_SPEC, split, data_dir, cache_dir=cache_dir)
