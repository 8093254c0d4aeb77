"""`load_tokenizer`: any tokenizer back from its files, whichever kind wrote them."""

from __future__ import annotations

import json
import os

from jaxrlhf.text.hf_tokenizer import HFTokenizer
from jaxrlhf.text.tokenizer import (
    _CHAR_FILE_MAX_BYTES,
    _HF_FILES,
    _OPENAI_FILES,
    CHAR_TOKENIZER_FILE,
    HF_TOKENIZER_FILE,
    CharTokenizer,
    GPT2Tokenizer,
    Tokenizer,
)


def _is_char_file(path: str | os.PathLike) -> bool:
    """Whether a .json file is a CharTokenizer's (HappyGPT names its run's copy tokenizer.json too).
    Files too large to be one are not parsed here (the Hugging Face reader parses them once)."""
    try:
        if os.path.getsize(path) > _CHAR_FILE_MAX_BYTES:
            return False
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
    except (OSError, ValueError):
        return False  # the Hugging Face reader names the problem
    return isinstance(spec, dict) and spec.get("kind") == "char"


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load what `save` wrote: a CharTokenizer .json file or directory, a Hugging Face directory (or its
    tokenizer.json; preferred when GPT-2 files sit beside it), or a GPT-2 directory.

    Raises:
      FileNotFoundError: nothing at `path`, or a directory with none of those files (the message lists them).
      TokenizerFileError: a tokenizer file that is truncated, corrupt or inconsistent.
    """
    if os.path.isfile(path) and os.path.basename(path) == HF_TOKENIZER_FILE and not _is_char_file(path):
        return HFTokenizer.from_dir(os.path.dirname(os.path.abspath(path)))
    if os.path.isfile(path) or os.path.isfile(os.path.join(path, CHAR_TOKENIZER_FILE)):
        return CharTokenizer.load(path)
    if os.path.isfile(os.path.join(path, HF_TOKENIZER_FILE)):
        if _is_char_file(os.path.join(path, HF_TOKENIZER_FILE)):
            return CharTokenizer.load(os.path.join(path, HF_TOKENIZER_FILE))
        return HFTokenizer.from_dir(path)
    if os.path.isdir(path):
        if any(os.path.isfile(os.path.join(path, n)) for n in (*_HF_FILES, *_OPENAI_FILES)):
            return GPT2Tokenizer.from_dir(path)
        raise FileNotFoundError(
            f"no tokenizer in {path}: looked for {HF_TOKENIZER_FILE} (Hugging Face), vocab.json + merges.txt "
            f"or encoder.json + vocab.bpe (GPT-2) and {CHAR_TOKENIZER_FILE}; pass the directory a tokenizer "
            "was saved to"
        )
    raise FileNotFoundError(f"no tokenizer at {path}: expected a .json file or a directory.")
