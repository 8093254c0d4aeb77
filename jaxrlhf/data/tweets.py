"""Kaggle tweet-sentiment-extraction as a TFDS builder: tweets labelled negative/neutral/positive.

Source files: `train.csv` (textID,text,selected_text,sentiment; 27,481 rows) and `test.csv`
(textID,text,sentiment; 3,534 rows), read from a local folder or downloaded from a pinned GitHub
commit and checked against their sha256. The one train row with an empty text (textID fdb77c3752)
is dropped, leaving 27,480. Texts are stripped of surrounding whitespace (the export leaves a
leading space where an @mention was removed). Rows keep the csv order.
"""

from __future__ import annotations

import csv
import os
import pathlib

import tensorflow_datasets as tfds

from jaxrlhf.data import common

SENTIMENTS = ("negative", "neutral", "positive")

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


def _find_files(folder: pathlib.Path) -> list[pathlib.Path]:
    files = [folder / "train.csv", folder / "test.csv"]
    return files if all(path.is_file() for path in files) else []


SPEC = common.DataSpec(
    name="tweets",
    subdir="tweets",
    expects="train.csv and test.csv",
    find_files=_find_files,
    downloads=DOWNLOADS,
)


class TweetsBuilder(tfds.core.GeneratorBasedBuilder):
    """Tweet sentiment: features text, sentiment (ClassLabel), text_id; splits train and test."""

    name = "jaxrlhf_tweets"
    code_path = pathlib.Path(__file__)  # TFDS can't locate code in the `jaxrlhf` namespace package
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Kaggle tweet-sentiment-extraction; empty texts dropped."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put the Kaggle tweet-sentiment-extraction train.csv and test.csv in the manual dir."
    )

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "text": tfds.features.Text(),
                    "sentiment": tfds.features.ClassLabel(names=SENTIMENTS),
                    "text_id": tfds.features.Text(),
                }
            ),
            homepage="https://www.kaggle.com/c/tweet-sentiment-extraction",
            disable_shuffling=True,  # keep the csv order; shuffling is the batch iterator's job
        )

    def _split_generators(self, dl_manager):
        source_dir = common.builder_source_dir(dl_manager, SPEC)
        return {
            "train": self._generate_examples(source_dir / "train.csv"),
            "test": self._generate_examples(source_dir / "test.csv"),
        }

    def _generate_examples(self, path: pathlib.Path):
        with open(path, newline="", encoding="utf-8") as f:
            for index, row in enumerate(csv.DictReader(f)):
                text = row["text"].strip()
                if not text:
                    continue
                yield index, {"text": text, "sentiment": row["sentiment"], "text_id": row["textID"]}


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
