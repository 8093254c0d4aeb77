"""GLUE SST-2 (binary Stanford Sentiment Treebank) as a TFDS builder.

Source files (GLUE layout, a header line, tab-separated, no quoting): `train.tsv` and `dev.tsv`
(sentence<TAB>label, 67,349 / 872 rows) and optionally `test.tsv` (index<TAB>sentence, 1,821
unlabeled rows). Splits: train, validation (dev.tsv) and, when test.tsv is present, test with
label -1 (GLUE keeps the test labels private). Sentences are lower-cased and tokenised as in GLUE;
the trailing space before the tab is stripped. Downloads come from a pinned GitHub commit and are
checked against their sha256.

The files are read strictly (`read_tsv`): a row without its two fields or a label other than 0 / 1 (SST-2
is binary: "2" or "pos" is a mistake, not a third class) is a `common.DataFormatError` naming the file and
the line, raised before TFDS writes any split.
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


FILES = {"train": "train.tsv", "validation": "dev.tsv", "test": "test.tsv"}  # split -> its file
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
        # Every file is read (and checked) before TFDS starts writing any split.
        rows = {split: read_tsv(source_dir / name) for split, name in FILES.items() if split != "test"}
        if (source_dir / FILES["test"]).is_file():
            rows["test"] = read_tsv(source_dir / FILES["test"], labeled=False)
        return {split: self._generate_examples(split_rows) for split, split_rows in rows.items()}

    def _generate_examples(self, rows: list[dict]):
        yield from enumerate(rows)


def read_tsv(path: pathlib.Path, labeled: bool = True) -> list[dict[str, str | int]]:
    """Every row of an SST-2 tsv as {"sentence" (stripped), "label"} in file order: sentence<TAB>label
    (0 or 1) when `labeled`, else index<TAB>sentence with label -1. Blank lines are skipped.

    Raises:
      common.DataFormatError: one line naming the file and line of the first row that does not read: not
        two tab-separated fields, a label other than 0 / 1, not UTF-8.
    """
    header = "sentence<TAB>label" if labeled else "index<TAB>sentence"
    rows = []
    for number, text in common.read_lines(path):
        line = text.rstrip("\r\n")
        if number == 1 or not line.strip():  # the header, a blank line
            continue
        fields = line.split("\t")
        if len(fields) != 2:
            raise common.DataFormatError(
                f"{path}:{number}: {len(fields)} tab-separated fields; expected 2 ({header})"
            )
        if not labeled:
            rows.append({"sentence": fields[1].strip(), "label": -1})
            continue
        label = fields[1].strip()
        if label not in ("0", "1"):
            raise common.DataFormatError(
                f"{path}:{number}: label {fields[1]!r} is not 0 (negative) or 1 (positive); SST-2 has two "
                "classes: fix or drop the row"
            )
        rows.append({"sentence": fields[0].strip(), "label": int(label)})
    return rows


def source_file(
    split: str, data_dir: str | os.PathLike | None = None, *, cache_dir: str | os.PathLike | None = None
) -> pathlib.Path:
    """The tsv file `load_sst2(split, data_dir)` reads (after that call found or downloaded it)."""
    folder = common.resolve_source_dir(SPEC, data_dir, cache_dir=cache_dir)
    return folder / FILES.get(common.canonical_split(split), f"{split}.tsv")


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
