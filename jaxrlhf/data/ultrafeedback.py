"""UltraFeedback (binarized) preference rows as a TFDS builder: prompt, chosen, rejected, GPT-4 scores.

Source files (JSON Lines, one row per line): `train_clean.jsonl` and `eval_clean.jsonl`, each row
{"prompt": str, "chosen": str, "rejected": str, "source_index": int, "metadata": {"score_chosen": float,
"score_rejected": float}}: a single-turn user prompt, the assistant reply with the higher GPT-4 overall
score (1-10) and one other, as in HuggingFaceH4/ultrafeedback_binarized (Cui et al. 2023). The download is
the 1,000 + 200 rows of a public study's processed split (a seeded shuffle of trl-lib's 62,135-row
ultrafeedback_binarized train split), from a pinned GitHub commit, checked against its sha256. A larger set
in the same format (e.g. the full binarized set written as these two files) is read from a local
directory. Splits: train (train_clean.jsonl) and validation (eval_clean.jsonl).

Quirks kept, not cleaned: ties (score_chosen == score_rejected), an empty reply, chosen == rejected; a
pipeline decides what to drop (`jaxrlhf.preference`'s filters).
"""

from __future__ import annotations

import json
import math
import os
import pathlib

import numpy as np
import tensorflow_datasets as tfds

from jaxrlhf.data import common

_BASE_URL = (
    "https://raw.githubusercontent.com/kkminions888-ops/ultrafeedback-dpo-noise-study/"
    "8ad75460fafaad5bbabbed6e7f3ba80d0a3f3576/data/processed"
)
DOWNLOADS = {
    "train_clean.jsonl": (
        f"{_BASE_URL}/train_clean.jsonl",
        "136b0163cbca47cc562ce260e4be38745f638563bce2930771da8cd8c9791c8e",
    ),
    "eval_clean.jsonl": (
        f"{_BASE_URL}/eval_clean.jsonl",
        "932ea766ae90386f0a6c0c764162d28321c3ebfd7cd4c534aa5c0589bc9c2e0c",
    ),
}
_FILES = {"train": "train_clean.jsonl", "validation": "eval_clean.jsonl"}


SPEC = common.file_spec("ultrafeedback", tuple(_FILES.values()), DOWNLOADS)


def parse_row(text: str, where: str) -> dict:
    """One JSONL line -> {prompt, chosen, rejected, score_chosen, score_rejected, source_index}.

    Raises:
      common.DataFormatError: `where` (file:line) and the field that is missing or of the wrong type.
    """
    try:
        row = json.loads(text)
    except json.JSONDecodeError as err:
        raise common.DataFormatError(f"{where}: not a JSON object ({err.msg}, column {err.colno})") from None
    if not isinstance(row, dict):
        raise common.DataFormatError(f"{where}: expected a JSON object, got {type(row).__name__}")
    out = {}
    for name in ("prompt", "chosen", "rejected"):
        if not isinstance(row.get(name), str):
            got = "missing" if name not in row else type(row[name]).__name__
            raise common.DataFormatError(f"{where}: field {name!r} must be text ({got})")
        out[name] = row[name]
    scores = row.get("metadata")
    for name in ("score_chosen", "score_rejected"):
        value = scores.get(name) if isinstance(scores, dict) else None
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise common.DataFormatError(
                f"{where}: field metadata.{name} must be a finite number (got {value!r})"
            )
        out[name] = float(value)
    index = row.get("source_index", -1)
    if isinstance(index, bool) or not isinstance(index, int):
        raise common.DataFormatError(f"{where}: field source_index must be an integer (got {index!r})")
    out["source_index"] = index
    return out


class UltraFeedbackBuilder(common.SourceBuilder):
    """UltraFeedback binarized: prompt, chosen, rejected (text), score_chosen, score_rejected (float32),
    source_index (int64)."""

    name = "jaxrlhf_ultrafeedback"
    SPEC = SPEC
    RELEASE_NOTES = {"1.0.0": "ultrafeedback_binarized rows: prompt, chosen, rejected, GPT-4 scores."}

    def _info(self) -> tfds.core.DatasetInfo:
        text = tfds.features.Text()
        return common.dataset_info(
            self,
            {
                "prompt": text,
                "chosen": text,
                "rejected": text,
                "score_chosen": tfds.features.Scalar(dtype=np.float32),
                "score_rejected": tfds.features.Scalar(dtype=np.float32),
                "source_index": tfds.features.Scalar(dtype=np.int64),
            },
            "https://huggingface.co/datasets/HuggingFaceH4/ultrafeedback_binarized",
        )

    def _split_generators(self, dl_manager):
        source_dir = common.builder_source_dir(dl_manager, SPEC)
        return {split: self._generate_examples(source_dir / name) for split, name in _FILES.items()}

    def _generate_examples(self, path: pathlib.Path):
        for number, text in common.read_lines(path):
            if text.strip():
                yield number, parse_row(text, f"{path}:{number}")


def load_ultrafeedback(
    split: str,
    data_dir: str | os.PathLike | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
) -> list[dict]:
    """Loads one split of UltraFeedback (binarized) through `UltraFeedbackBuilder`.

    Args:
      split: "train" (1,000 rows in the pinned download) or "validation" / "eval" (200).
      data_dir: folder with train_clean.jsonl and eval_clean.jsonl (or with an ultrafeedback/ subfolder);
        see `common` for the fallbacks.
      cache_dir: where downloads and prepared TFDS data live.

    Returns:
      Rows in file order: {"prompt", "chosen", "rejected": str, "score_chosen", "score_rejected": float,
      "source_index": int}.
    """
    split = common.canonical_split(split, {**common.SPLIT_ALIASES, "eval": "validation"})
    return common.load_rows(UltraFeedbackBuilder, SPEC, split, data_dir, cache_dir=cache_dir)
