"""Tokenizer files: `load_tokenizer` reads any kind back; `save_for_transformers` writes any kind as a
`transformers` fast tokenizer (tokenizer.json + tokenizer_config.json)."""

from __future__ import annotations

import json
import os

import tokenizers as hf_tokenizers
from tokenizers import decoders, models, pre_tokenizers

from jaxrlhf.text.hf_tokenizer import HF_CONFIG_FILE, HFTokenizer
from jaxrlhf.text.tokenizer import (
    _CHAR_FILE_MAX_BYTES,
    _HF_FILES,
    _OPENAI_FILES,
    CHAR_TOKENIZER_FILE,
    HF_TOKENIZER_FILE,
    CharTokenizer,
    GPT2Tokenizer,
    HFBackedTokenizer,
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


def _char_model(tokenizer: CharTokenizer) -> hf_tokenizers.Tokenizer:
    """A CharTokenizer as a `tokenizers` one: a word-level vocabulary over single code points, the text
    split into code points, decoded by concatenation (unknown characters map to `unk`)."""
    vocab = {c: i for i, c in enumerate(tokenizer.chars)}
    tok = hf_tokenizers.Tokenizer(models.WordLevel(vocab, unk_token=tokenizer.unk or tokenizer.eos))
    tok.pre_tokenizer = pre_tokenizers.Split(hf_tokenizers.Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return tok


def save_for_transformers(tokenizer: Tokenizer, path: str | os.PathLike) -> None:
    """Write `tokenizer` where `transformers.AutoTokenizer.from_pretrained(path)` reads it as a fast
    tokenizer giving the same ids: an HFTokenizer's own files, else tokenizer.json (GPT-2's BPE, or a
    CharTokenizer as a word-level model over characters) and a tokenizer_config.json naming the
    end-of-text (and pad) token."""
    os.makedirs(path, exist_ok=True)
    if isinstance(tokenizer, HFTokenizer):
        tokenizer.save(path)
        return
    if isinstance(tokenizer, CharTokenizer):
        tok, eos, unk = _char_model(tokenizer), tokenizer.eos, tokenizer.unk
    elif isinstance(tokenizer, HFBackedTokenizer):
        tok, eos, unk = tokenizer._tok, tokenizer.eos, None
    else:
        raise TypeError(f"no transformers format for a {type(tokenizer).__name__}")
    tok.save(os.path.join(path, HF_TOKENIZER_FILE))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "pad_token": eos,
              "clean_up_tokenization_spaces": False}  # fmt: skip
    if unk is not None:
        config["unk_token"] = unk
    with open(os.path.join(path, HF_CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(config, f, ensure_ascii=False, indent=2)
