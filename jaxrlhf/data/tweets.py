"""Kaggle tweet-sentiment-extraction as a TFDS builder: tweets labelled negative/neutral/positive.

Source files: `train.csv` (textID,text,selected_text,sentiment; 27,481 rows) and `test.csv`
(textID,text,sentiment; 3,534 rows), read from a local folder or downloaded from a pinned GitHub
commit and checked against their sha256. The one train row with an empty text (textID fdb77c3752)
is dropped, leaving 27,480. Texts are stripped of surrounding whitespace (the export leaves a
leading space where an @mention was removed). Rows keep the csv order.

The files are read strictly (`read_csv`): a UTF-8 byte-order mark and CRLF line ends are fine; a missing
column, a truncated row, an unbalanced quote, an unknown sentiment or a file that is not UTF-8 is a
`common.DataFormatError` naming the file, the line and the field.
"""

from __future__ import annotations

import csv
import os
import pathlib

import tensorflow_datasets as tfds

from jaxrlhf.data import common

SENTIMENTS = ("negative", "neutral", "positive")
COLUMNS = ("textID", "text", "sentiment")  # train.csv adds selected_text (not read)

_BASE_URL = (
    "https://raw.githubusercontent.com/panthonies/kaggle/"
    "4bb822d626e445c7e0c557ffd8af2a0db75123bc/Tweet-Sentiment-Extraction"
)
DOWNLOADS = {
    "train.csv": (
        f"{_BASE_URL}/train.csv",
        "192204063468a632b2601f6e833c42d7875b618d1a6e5c9529ad8ca58ee6be75",
    ),
    "test.csv": (
        f"{_BASE_URL}/test.csv",
        "4d1fc2995ce88eb7d435f18563e93361f35956c3e74ed22572b9614eff6d04e6",
    ),
}


SPEC = common.file_spec("tweets", ("train.csv", "test.csv"), DOWNLOADS)


class TweetsBuilder(common.SourceBuilder):
    """Tweet sentiment: features text, sentiment (ClassLabel), text_id; splits train and test."""

    name = "jaxrlhf_tweets"
    SPEC = SPEC
    RELEASE_NOTES = {"1.0.0": "Kaggle tweet-sentiment-extraction; empty texts dropped."}

    def _info(self) -> tfds.core.DatasetInfo:
        return common.dataset_info(
            self,
            {
                "text": tfds.features.Text(),
                "sentiment": tfds.features.ClassLabel(names=SENTIMENTS),
                "text_id": tfds.features.Text(),
            },
            "https://www.kaggle.com/c/tweet-sentiment-extraction",
        )

    def _split_generators(self, dl_manager):
        source_dir = common.builder_source_dir(dl_manager, SPEC)
        # Both files are read (and checked) before TFDS starts writing either split.
        rows = {split: read_csv(source_dir / f"{split}.csv") for split in ("train", "test")}
        return {split: self._generate_examples(split_rows) for split, split_rows in rows.items()}

    def _generate_examples(self, rows: list[dict[str, str]]):
        for index, row in enumerate(rows):
            if row["text"]:
                yield index, row


def read_csv(path: pathlib.Path) -> list[dict[str, str]]:
    """Every row of a tweets csv as {"text" (stripped), "sentiment", "text_id"}, in file order.

    Raises:
      common.DataFormatError: one line naming the file and line (and the field) of the first row that
        does not read: no header, a missing column, a row with too few / too many fields (truncated,
        or an unquoted comma), an unbalanced quote, a sentiment outside SENTIMENTS, not UTF-8.
    """
    reader = csv.reader((text for _, text in common.read_lines(path)), strict=True)
    expected = ",".join(COLUMNS)
    try:
        header = [name.strip() for name in next(reader)]
    except StopIteration:
        raise common.DataFormatError(f"{path} is empty; expected a header line {expected}") from None
    except csv.Error as err:
        raise common.DataFormatError(f"{path}:1: the header does not parse ({err})") from None
    missing = [name for name in ("text", "sentiment") if name not in header]
    if missing:
        raise common.DataFormatError(
            f"{path}:1: no {' or '.join(repr(m) for m in missing)} column (the header is "
            f"{','.join(header)}); expected the columns {expected}"
        )
    rows = []
    while True:
        start = reader.line_num + 1  # the physical line the next record starts on
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            raise common.DataFormatError(
                f"{path}:{start}: an unbalanced quote ({err}); quote a text that holds a comma or a quote, "
                'doubling the quotes inside it ("say ""hi""")'
            ) from None
        if not fields:  # a blank line
            continue
        if len(fields) != len(header):
            lines = reader.line_num - start + 1
            if lines > 1:
                why = (
                    f"the record runs over {lines} lines, to line {reader.line_num}: a quote opened on "
                    f"line {start} is closed too late (an unbalanced quote?)"
                )
            elif len(fields) < len(header):
                why = "the row is truncated"
            else:
                why = "a comma in an unquoted text? quote the text"
            raise common.DataFormatError(
                f"{path}:{start}: {len(fields)} fields where the header {','.join(header)} has "
                f"{len(header)}: {why}"
            )
        row = dict(zip(header, fields, strict=True))
        sentiment = row["sentiment"].strip().lower()
        if sentiment not in SENTIMENTS:
            raise common.DataFormatError(
                f"{path}:{start}: sentiment {row['sentiment']!r} is not one of {', '.join(SENTIMENTS)}"
            )
        rows.append({"text": row["text"].strip(), "sentiment": sentiment, "text_id": row.get("textID", "")})
    return rows


def source_file(split: str, data_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """The csv file `load_tweets(split, data_dir)` reads (after that call found or downloaded it)."""
    return common.resolve_source_dir(SPEC, data_dir) / f"{common.canonical_split(split)}.csv"


def load_tweets(
    split: str,
    data_dir: str | os.PathLike | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
) -> list[dict[str, str]]:
    """Loads one split of the tweets through `TweetsBuilder`.

    Args:
      split: "train" (27,480 rows) or "test" (3,534 rows).
      data_dir: folder with train.csv and test.csv (or with a tweets/ subfolder); see `common`
        for the fallbacks ($JAXRLHF_DATA_DIR, then a checked download).
      cache_dir: where downloads and prepared TFDS data live; default $JAXRLHF_CACHE_DIR or
        ~/.cache/jaxrlhf.

    Returns:
      Rows in file order, each {"text": str, "text_id": str,
      "sentiment": "negative" | "neutral" | "positive"}.
    """
    rows = common.load_rows(TweetsBuilder, SPEC, common.canonical_split(split), data_dir, cache_dir=cache_dir)
    for row in rows:
        row["sentiment"] = SENTIMENTS[row["sentiment"]]
    return rows
