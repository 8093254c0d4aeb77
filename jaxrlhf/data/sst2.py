"""GLUE SST-2 (binary Stanford Sentiment Treebank) as a TFDS builder.

Source files (GLUE layout, a header line, tab-separated, no quoting): `train.tsv` and `dev.tsv`
(sentence<TAB>label, 67,349 / 872 rows) and optionally `test.tsv` (index<TAB>sentence, 1,821
unlabeled rows). Splits: train, validation (dev.tsv) and, when test.tsv is present, test with
label -1 (GLUE keeps the test labels private). Sentences are lower-cased and tokenised as in GLUE;
the trailing space before the tab is stripped. Downloads come from a pinned GitHub commit and are
checked against their sha256.
"""

from __future__ import annotations

import os
import pathlib

import tensorflow_datasets as tfds

from jaxrlhf.data import common

LABELS = ("negative", "positive")

_BASE_URL = (
    "https://raw.githubusercontent.com/brunnurs/binary-classification-bert/"
    "0243c04ab8def6275a5a5a0e08d3921185cebd0d/data/SST2"
)
DOWNLOADS = {
    "train.tsv": (
        f"{_BASE_URL}/train.tsv",
        "5c47819a1d04cfabc7afcc79a919c97b0b367101ad42d3ff148d67bf501384c2",
    ),
    "dev.tsv": (
        f"{_BASE_URL}/dev.tsv",
        "54a9c12c77e402fc14d6a66a506f24d999f596b0176eb777c972cccc2f9cc4b0",
    ),
    "test.tsv": (
        f"{_BASE_URL}/test.tsv",
        "69a938605609b3e6663b4487918fe1565eb293734e6e520d0366d1d412fd2a13",
    ),
}


SPEC = common.file_spec("sst2", ("train.tsv", "dev.tsv"), DOWNLOADS, optional=("test.tsv",))


class Sst2Builder(common.SourceBuilder):
    """SST-2: features sentence, label (ClassLabel negative/positive, -1 on test)."""

    name = "jaxrlhf_sst2"
    SPEC = SPEC
    RELEASE_NOTES = {"1.0.0": "GLUE SST-2 train/dev/test tsv."}

    def _info(self) -> tfds.core.DatasetInfo:
        return common.dataset_info(
            self,
            {"sentence": tfds.features.Text(), "label": tfds.features.ClassLabel(names=LABELS)},
            "https://gluebenchmark.com/",
        )

    def _split_generators(self, dl_manager):
        source_dir = common.builder_source_dir(dl_manager, SPEC)
        splits = {
            "train": self._generate_examples(source_dir / "train.tsv", labeled=True),
            "validation": self._generate_examples(source_dir / "dev.tsv", labeled=True),
        }
        if (source_dir / "test.tsv").is_file():
            splits["test"] = self._generate_examples(source_dir / "test.tsv", labeled=False)
        return splits

    def _generate_examples(self, path: pathlib.Path, labeled: bool):
        with open(path, encoding="utf-8") as f:
            next(f)  # header
            for index, line in enumerate(f):
                fields = line.rstrip("\n").split("\t")
                if labeled:  # sentence<TAB>label
                    sentence, label = fields[0], int(fields[1])
                else:  # index<TAB>sentence
                    sentence, label = fields[1], -1
                yield index, {"sentence": sentence.strip(), "label": label}


def load_sst2(
    split: str,
    data_dir: str | os.PathLike | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
) -> list[dict[str, str | int]]:
    """Loads one split of SST-2 through `Sst2Builder`.

    Args:
      split: "train" (67,349), "validation" or "dev" (872), or "test" (1,821, label -1).
      data_dir: folder with train.tsv and dev.tsv (or with an sst2/ subfolder); see `common` for the
        fallbacks.
      cache_dir: where downloads and prepared TFDS data live.

    Returns:
      Rows in file order, each {"sentence": str, "label": int}: 0 negative, 1 positive, -1 unknown.
    """
    split = common.canonical_split(split)
    return common.load_rows(Sst2Builder, SPEC, split, data_dir, cache_dir=cache_dir)
