"""GSM8K (Cobbe et al. 2021, "Training Verifiers to Solve Math Word Problems") as a TFDS builder, and the
answer checker of a verifiable reward on it.

Source files (JSON Lines, one row per line): `train.jsonl` (7,473 rows) and `test.jsonl` (1,319), each row
{"question": str, "answer": str}: a grade-school word problem and its worked solution, whose last line is
"#### <final answer>" (an integer, sometimes written with thousands commas: "#### 1,080"). Features:
question, answer (the whole solution, its "<<48/2=24>>" calculator notes kept) and final (the number after
the last "####" as a canonical string: `canonical_number`, "1,080" -> "1080"). Splits: train, test.
A row without a "####" line, or whose final answer is not a number, is a `common.DataFormatError` naming
the file and the line.

Provenance of the download: openai/grade-school-math at commit 3101c7d5072418e28b9008a6636bde82a006892c
(2021-11-19; the data files are unchanged since the release commit b0bb162), files
grade_school_math/data/{train,test}.jsonl, fetched from raw.githubusercontent.com and checked against
the sha256 of those blobs at that commit (computed from a clone of the repository).

The checker (`extract_answer`, `gsm8k_reward`) reads the model's final answer as the first number after
the last "####" when the text has one, else as the last number anywhere in the text, and compares it with
the gold as a canonical string (commas, "$" and a trailing period dropped, "72.00" == "72", "-0" == "0").
Graders differ here: the repository's own `extract_answer` and lm-evaluation-harness's "strict-match"
take the first "#### <number>" only (else no answer); lm-evaluation-harness's "flexible-extract" takes
the last number in the text, and compares strings with commas, "$" and the trailing "." removed (so
"72.00" != "72" there). Our fallback is the flexible one, so a model that has not yet learnt the "####"
format still earns reward for a right last number (what makes GRPO's first groups differ); the last
"####" rather than the first, because a model that restates the format ("end with #### <number>")
before answering would otherwise be read at its restatement. Fractions, percentages as fractions and
LaTeX (\\boxed{}) are not parsed: GSM8K's answers are integers.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
from collections.abc import Sequence

import numpy as np
import tensorflow_datasets as tfds

from jaxrlhf.data import common

_BASE_URL = (
    "https://raw.githubusercontent.com/openai/grade-school-math/"
    "3101c7d5072418e28b9008a6636bde82a006892c/grade_school_math/data"
)
DOWNLOADS = {
    "train.jsonl": (
        f"{_BASE_URL}/train.jsonl",
        "17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465",
    ),
    "test.jsonl": (
        f"{_BASE_URL}/test.jsonl",
        "3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14",
    ),
}
FILES = {"train": "train.jsonl", "test": "test.jsonl"}  # split -> its file
SPEC = common.file_spec("gsm8k", tuple(FILES.values()), DOWNLOADS)
MARKER = "####"

# A number as written in a solution: an optional minus (not one joining two words or numbers, as in
# "3-4"), an optional "$", an integer with thousands commas ("1,234") or without, an optional decimal
# part. "1,2345" reads as 1 and 2345; "72." as 72 (the period ends the sentence).
_NUMBER = re.compile(
    r"(?:(?<![\w.)\]])(?P<sign>[-\u2212]))?(?:\$\s?)?"
    r"(?P<int>\d{1,3}(?:,\d{3})+(?!\d|,\d)|\d+)(?P<frac>\.\d+)?"
)


# ------------------------------------------------------------------------------------ answer checker


def _canonical(match: re.Match) -> str:
    """The number of a `_NUMBER` match as a canonical string: no commas, no leading zeros, no trailing
    fractional zeros, no sign on zero ("-0.50" -> "-0.5", "072.00" -> "72", "-0" -> "0"). Exact string
    arithmetic: no float rounding, no limit on the digits."""
    integer = match["int"].replace(",", "").lstrip("0") or "0"
    fraction = (match["frac"] or "").rstrip("0").rstrip(".")
    if integer == "0" and not fraction:
        return "0"
    return ("-" if match["sign"] else "") + integer + fraction


def canonical_number(text: str) -> str | None:
    """`text` as a canonical number string if it is one number ("$1,080." -> "1080", "-5" -> "-5",
    "72.00" -> "72"), surrounding whitespace allowed; None otherwise ("", "12 apples", "1/2")."""
    stripped = text.strip()
    stripped = stripped[:-1] if stripped.endswith(".") else stripped
    match = _NUMBER.fullmatch(stripped)
    return None if match is None else _canonical(match)


def extract_answer(text: str) -> str | None:
    """The final answer of a solution text as a canonical number string (see the module doc), or None.

    The first number after the last "####" if the text has a "####" (None if nothing after it reads as a
    number: the model gave its answer line and it is malformed), else the last number in the text.

    Args:
      text: a model's response (or a gold solution); anything that is not a string gives None.

    Returns:
      e.g. "72", "-5", "1234", "0.5"; None when there is no number to read.
    """
    if not isinstance(text, str):
        return None
    _, marker, tail = text.rpartition(MARKER)
    if marker:
        match = _NUMBER.search(tail)
        return None if match is None else _canonical(match)
    numbers = list(_NUMBER.finditer(text))
    return _canonical(numbers[-1]) if numbers else None


def gsm8k_reward(texts: Sequence[str], golds: Sequence[str]) -> np.ndarray:
    """1.0 where a response's final answer (`extract_answer`) equals its gold number, else 0.0.

    A missing or malformed answer (no number, an empty text, a text that is not a string) scores 0.0,
    never an exception.

    Args:
      texts: B responses.
      golds: B gold answers: a number ("72", "1,080") or a whole GSM8K solution ending in "#### 72".

    Returns:
      [B] float32 of 0.0 / 1.0.

    Raises:
      ValueError: `texts` and `golds` differ in length, or a gold has no number (a bad gold is the
        data's fault, not the model's: it is refused rather than scored 0 for every answer).
    """
    if isinstance(texts, str) or isinstance(golds, str):
        raise ValueError("gsm8k_reward takes lists of texts and golds, not one string; wrap them in lists")
    if len(texts) != len(golds):
        raise ValueError(f"{len(texts)} texts but {len(golds)} golds; pass one gold per text")
    scores = np.zeros(len(texts), np.float32)
    for i, (text, gold) in enumerate(zip(texts, golds, strict=True)):
        want = canonical_number(str(gold)) or extract_answer(str(gold))
        if want is None:
            raise ValueError(f"gold {i} ({str(gold)[:40]!r}) holds no number")
        scores[i] = float(extract_answer(text) == want)
    return scores


# ------------------------------------------------------------------------------------------- files


def parse_row(text: str, where: str) -> dict[str, str]:
    """One JSONL line -> {question, answer, final}.

    Raises:
      common.DataFormatError: `where` (file:line) and what is wrong: not a JSON object, a missing or
        non-text field, no "####" line, a final answer that is not a number.
    """
    try:
        row = json.loads(text)
    except json.JSONDecodeError as err:
        raise common.DataFormatError(f"{where}: not a JSON object ({err.msg}, column {err.colno})") from None
    if not isinstance(row, dict):
        raise common.DataFormatError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for name in ("question", "answer"):
        if not isinstance(row.get(name), str):
            got = "missing" if name not in row else type(row[name]).__name__
            raise common.DataFormatError(f"{where}: field {name!r} must be text ({got})")
    _, marker, tail = row["answer"].rpartition(MARKER)
    if not marker:
        raise common.DataFormatError(
            f"{where}: the answer has no '{MARKER} <number>' line; GSM8K solutions end with one"
        )
    final = canonical_number(tail)
    if final is None:
        raise common.DataFormatError(f"{where}: the final answer {tail.strip()[:40]!r} is not a number")
    return {"question": row["question"].strip(), "answer": row["answer"].strip(), "final": final}


def read_jsonl(path: pathlib.Path) -> list[dict[str, str]]:
    """Every row of a GSM8K file, in file order (blank lines skipped); see `parse_row`."""
    return [parse_row(text, f"{path}:{n}") for n, text in common.read_lines(path) if text.strip()]


class Gsm8kBuilder(common.SourceBuilder):
    """GSM8K: features question, answer (the solution), final (the canonical gold number); splits train
    and test."""

    name = "jaxrlhf_gsm8k"
    SPEC = SPEC
    RELEASE_NOTES = {"1.0.0": "openai/grade-school-math train/test jsonl; final answer extracted."}

    def _info(self) -> tfds.core.DatasetInfo:
        text = tfds.features.Text()
        return common.dataset_info(
            self,
            {"question": text, "answer": text, "final": text},
            "https://github.com/openai/grade-school-math",
        )

    def _split_generators(self, dl_manager):
        source_dir = common.builder_source_dir(dl_manager, SPEC)
        # Both files are read (and checked) before TFDS starts writing either split.
        rows = {split: read_jsonl(source_dir / name) for split, name in FILES.items()}
        return {split: self._generate_examples(split_rows) for split, split_rows in rows.items()}

    def _generate_examples(self, rows: list[dict[str, str]]):
        yield from enumerate(rows)


def load_gsm8k(
    split: str,
    data_dir: str | os.PathLike | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
) -> list[dict[str, str]]:
    """Loads one split of GSM8K through `Gsm8kBuilder`.

    Args:
      split: "train" (7,473 rows) or "test" (1,319).
      data_dir: folder with train.jsonl and test.jsonl (or with a gsm8k/ subfolder); see `common` for the
        fallbacks ($JAXRLHF_DATA_DIR, then the checked download).
      cache_dir: where downloads and prepared TFDS data live.

    Returns:
      Rows in file order, each {"question", "answer", "final": str}.
    """
    split = common.canonical_split(split)
    return common.load_rows(Gsm8kBuilder, SPEC, split, data_dir, cache_dir=cache_dir)
