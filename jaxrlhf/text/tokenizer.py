"""Tokenizers: a character-level one (HappyGPT, as in minRLHF), GPT-2's byte-level BPE, and any
Hugging Face `tokenizer.json` (Llama 3, Qwen, Mistral, ...) with its chat template.

All share one API:

  encode(text) -> list[int]            decode(ids, stop_at_eos=False) -> str
  encode_batch(texts, length, side) -> (ids [B, T] int32, mask [B, T] bool)
  decode_batch(ids, mask=None) -> list[str]
  eos_id, pad_id, stop_ids, vocab_size, save(path)     load_tokenizer(path) loads any kind back

Padding: prompts are left-padded, so every row's next token is generated in the same column;
training sequences are usually right-padded. The model derives positions from the mask, so the side
does not change the logits of real tokens. Pad slots hold `pad_id` (`eos_id` unless the tokenizer
files name a pad token) and are False in the mask.

The Hugging Face one, `HFTokenizer`, lives in `text.hf_tokenizer` (stop ids, special ids, chat
templates); `text.load.load_tokenizer` reads any of them back from their files.

This module reads and writes tokenizer files (the BPE runs in Hugging Face `tokenizers`); it never
touches the network.
"""

from __future__ import annotations

import abc
import dataclasses
import json
import os
from collections.abc import Iterable, Sequence
from typing import Literal

import numpy as np
import tokenizers as hf_tokenizers
from tokenizers import decoders, models, pre_tokenizers

CHAR_TOKENIZER_FILE = "char_tokenizer.json"
HF_TOKENIZER_FILE = "tokenizer.json"  # what makes a directory a Hugging Face tokenizer (hf_tokenizer)
GPT2_EOS = "<|endoftext|>"
_HF_FILES = ("vocab.json", "merges.txt")
_OPENAI_FILES = ("encoder.json", "vocab.bpe")


def pad_batch(
    seqs: Sequence[Sequence[int]],
    length: int | None = None,
    *,
    pad_id: int,
    side: Literal["left", "right"],
    truncate: Literal["left", "right"] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Pack token lists into a padded [B, T] batch.

    Args:
      seqs: B lists of token ids.
      length: T; None means the longest sequence.
      pad_id: id written into padded slots.
      side: "left" puts the padding before the tokens (prompts: generation starts in the same column for
        every row), "right" after them (answers, training text).
      truncate: what to do with a sequence longer than T: None raises, "left" drops its first tokens
        (keeps the end), "right" drops its last tokens (keeps the start).

    Returns:
      (ids [B, T] int32, mask [B, T] bool, True = real token).
    """
    if side not in ("left", "right"):
        raise ValueError(f"side={side!r}; use 'left' (prompts) or 'right'.")
    if truncate not in (None, "left", "right"):
        raise ValueError(f"truncate={truncate!r}; use None (raise), 'left' or 'right'.")
    lengths = [len(s) for s in seqs]
    if length is None:
        length = max(lengths, default=0)
    too_long = [n for n in lengths if n > length]
    if too_long and truncate is None:
        raise ValueError(
            f"{len(too_long)} of {len(seqs)} sequences are longer than length={length} "
            f"(longest {max(too_long)}); raise length or pass truncate='left' (keep the end) or "
            "'right' (keep the start)."
        )
    ids = np.full((len(seqs), length), pad_id, np.int32)
    mask = np.zeros((len(seqs), length), bool)
    for row, seq in enumerate(seqs):
        seq = list(seq)
        if len(seq) > length:
            seq = seq[len(seq) - length :] if truncate == "left" else seq[:length]
        n = len(seq)
        cols = slice(length - n, length) if side == "left" else slice(0, n)
        ids[row, cols] = seq
        mask[row, cols] = True
    return ids, mask


class Tokenizer(abc.ABC):
    """The shared API; subclasses implement encode, _decode_ids, save, eos_id and vocab_size."""

    @property
    @abc.abstractmethod
    def eos_id(self) -> int:
        """The end-of-text id."""

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """V, the number of ids (special tokens included)."""

    @property
    def pad_id(self) -> int:
        """The id written into padded slots (always False in the mask): `eos_id` unless overridden."""
        return self.eos_id

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Sorted ids that end a response (`decode(stop_at_eos=True)` cuts at the first): (eos_id,) here."""
        return (self.eos_id,)

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no BOS/EOS added)."""

    @abc.abstractmethod
    def _decode_ids(self, ids: list[int]) -> str: ...

    @abc.abstractmethod
    def save(self, path: str | os.PathLike) -> None:
        """Write the tokenizer so that `load_tokenizer(path)` returns an equal one."""

    def encode_many(self, texts: Iterable[str]) -> list[list[int]]:
        """`encode` on each text."""
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int], stop_at_eos: bool = False) -> str:
        """Text of `ids` (list or 1-D array); `stop_at_eos` keeps only the ids before the first stop id
        (`stop_ids`: the EOS, and for chat models the end-of-turn ids too)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1).tolist()
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:  # the BPE would silently drop them
            raise ValueError(f"ids {bad[:10]} are outside [0, {self.vocab_size}).")
        if stop_at_eos:
            stops = set(self.stop_ids)
            ids = next((ids[:n] for n, i in enumerate(ids) if i in stops), ids)
        return self._decode_ids(ids)

    def encode_batch(
        self,
        texts: Sequence[str],
        length: int | None = None,
        side: Literal["left", "right"] = "left",
        truncate: Literal["left", "right"] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Encode and pad B texts to [B, T] with `pad_id` (see `pad_batch`; prompts by default, so padded
        on the left). Returns (ids int32, mask)."""
        return pad_batch(self.encode_many(texts), length, pad_id=self.pad_id, side=side, truncate=truncate)

    def decode_batch(
        self, ids: np.ndarray, mask: np.ndarray | None = None, stop_at_eos: bool = False
    ) -> list[str]:
        """Decode each row of ids [B, T], keeping only the tokens where mask [B, T] is True."""
        ids = np.asarray(ids)
        mask = np.ones(ids.shape, bool) if mask is None else np.asarray(mask, bool)
        return [self.decode(row[m], stop_at_eos) for row, m in zip(ids, mask, strict=True)]


# ------------------------------------------------------------------------------------ characters


@dataclasses.dataclass(frozen=True)
class CharTokenizer(Tokenizer):
    """One id per character, ids in sorted character order.

    Attributes:
      chars: the vocabulary, sorted, unique single characters; id i is chars[i].
      eos: the end-of-text character (minRLHF writes "⏎").
      unk: a character that unknown characters map to; None makes them an error.
    """

    chars: tuple[str, ...]
    eos: str = "⏎"
    unk: str | None = None
    _ids: dict[str, int] = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self):
        for name in ("eos", "unk"):
            c = getattr(self, name)
            if c is not None and (not isinstance(c, str) or len(c) != 1):
                raise ValueError(f"{name}={c!r}; a CharTokenizer needs a single character.")
        chars = tuple(self.chars)
        if any(len(c) != 1 for c in chars) or list(chars) != sorted(set(chars)):
            raise ValueError("chars must be sorted, unique single characters; use from_corpus.")
        for name in ("eos", "unk"):
            c = getattr(self, name)
            if c is not None and c not in chars:
                raise ValueError(f"{name}={c!r} is not in chars; use from_corpus, which adds it.")
        object.__setattr__(self, "chars", chars)
        object.__setattr__(self, "_ids", {c: i for i, c in enumerate(chars)})

    @classmethod
    def from_corpus(cls, texts: Iterable[str], eos: str = "⏎", unk: str | None = None) -> CharTokenizer:
        """The sorted set of characters in `texts`, plus `eos` (and `unk` if given)."""
        chars = set().union(*(set(t) for t in texts), {eos}, {unk} - {None})
        return cls(tuple(sorted(chars)), eos=eos, unk=unk)

    @property
    def eos_id(self) -> int:
        return self._ids[self.eos]

    @property
    def unk_id(self) -> int | None:
        return None if self.unk is None else self._ids[self.unk]

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        if self.unk is not None:
            return [self._ids.get(c, self.unk_id) for c in text]
        try:
            return [self._ids[c] for c in text]
        except KeyError:
            missing = sorted(set(text) - self._ids.keys())
            shown = "".join(missing[:20]) + ("..." if len(missing) > 20 else "")
            raise ValueError(
                f"{len(missing)} character(s) not in the {self.vocab_size}-character vocabulary: "
                f"{shown!r}; rebuild it with CharTokenizer.from_corpus over text that contains "
                "them, or declare unk='?' to map unknown characters to one id."
            ) from None

    def _decode_ids(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def to_text(self) -> str:
        """The JSON `save` writes: {"kind": "char", "chars", "eos", "unk"}."""
        return json.dumps({"kind": "char", "chars": list(self.chars), "eos": self.eos, "unk": self.unk},
                          ensure_ascii=False)  # fmt: skip

    @classmethod
    def load_text(cls, text: str, where: str = "the text") -> CharTokenizer:
        """The tokenizer of `to_text`'s JSON; a ValueError naming `where` for anything else."""
        try:
            spec = json.loads(text)
            if spec.get("kind") != "char":
                raise ValueError
            return cls(tuple(spec["chars"]), eos=spec["eos"], unk=spec["unk"])
        except (ValueError, TypeError, KeyError, AttributeError):
            raise ValueError(f"{where} is not a CharTokenizer's JSON") from None

    def save(self, path: str | os.PathLike) -> None:
        """Write JSON to `path` if it ends in .json, else to path/char_tokenizer.json."""
        path = _char_file(path)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_text())

    @classmethod
    def load(cls, path: str | os.PathLike) -> CharTokenizer:
        """Read what `save` wrote (a .json file, or a directory holding char_tokenizer.json)."""
        with open(_char_file(path), encoding="utf-8") as f:
            return cls.load_text(f.read(), os.fspath(path))


def _char_file(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    return path if path.endswith(".json") else os.path.join(path, CHAR_TOKENIZER_FILE)


# --------------------------------------------------------------------------------------- GPT-2 BPE


class HFBackedTokenizer(Tokenizer):
    """The text <-> ids half of a tokenizer run by a Hugging Face `tokenizers.Tokenizer` in `self._tok`
    (GPT-2's BPE here, any tokenizer.json in `text.hf_tokenizer`): no special tokens added on encode,
    none skipped on decode."""

    _tok: hf_tokenizers.Tokenizer

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_many(self, texts: Iterable[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def _decode_ids(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)


class GPT2Tokenizer(HFBackedTokenizer):
    """GPT-2's byte-level BPE (50,257 ids; `<|endoftext|>` = 50256 is recognised inside text).

    Built with Hugging Face `tokenizers` from a vocabulary and a merge list, which come in two file
    formats with the same content: Hugging Face's vocab.json + merges.txt, and OpenAI's original
    encoder.json + vocab.bpe.
    """

    def __init__(self, vocab: dict[str, int], merges: Sequence[tuple[str, str]], eos: str = GPT2_EOS):
        if eos not in vocab:
            raise ValueError(f"eos={eos!r} is not in the vocabulary; pass the GPT-2 vocab.json.")
        self.vocab = dict(vocab)
        self.merges = [tuple(m) for m in merges]
        self.eos = eos
        tok = hf_tokenizers.Tokenizer(models.BPE(vocab=self.vocab, merges=self.merges))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([hf_tokenizers.AddedToken(eos, special=True, normalized=False)])
        self._tok = tok

    @classmethod
    def from_files(cls, vocab_json: str | os.PathLike, merges_txt: str | os.PathLike):
        """Hugging Face format: vocab.json and merges.txt."""
        return cls(*_read_bpe(vocab_json, merges_txt))

    @classmethod
    def from_openai_files(cls, encoder_json: str | os.PathLike, vocab_bpe: str | os.PathLike):
        """OpenAI's original format: encoder.json and vocab.bpe."""
        return cls(*_read_bpe(encoder_json, vocab_bpe))

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> GPT2Tokenizer:
        """A directory holding vocab.json + merges.txt, or encoder.json + vocab.bpe.

        Raises:
          FileNotFoundError: neither pair is there (nor one file of one).
          TokenizerFileError: one file of a pair is there without the other, or the files are bad.
        """
        for names, make in ((_HF_FILES, cls.from_files), (_OPENAI_FILES, cls.from_openai_files)):
            files = [os.path.join(path, n) for n in names]
            if all(os.path.isfile(f) for f in files):
                return make(*files)
        for names in (_HF_FILES, _OPENAI_FILES):
            present = [n for n in names if os.path.isfile(os.path.join(path, n))]
            if present:
                (missing,) = set(names) - set(present)
                raise TokenizerFileError(
                    f"{os.path.join(path, present[0])} has no {missing} beside it: a GPT-2 tokenizer needs "
                    f"both {' + '.join(names)}; copy the missing file into {path}"
                )
        raise FileNotFoundError(
            f"no GPT-2 tokenizer in {path}: expected vocab.json + merges.txt or encoder.json + vocab.bpe."
        )

    @property
    def eos_id(self) -> int:
        return self._tok.token_to_id(self.eos)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def __repr__(self) -> str:
        return f"GPT2Tokenizer(vocab_size={self.vocab_size}, eos_id={self.eos_id})"

    def save(self, path: str | os.PathLike) -> None:
        """Write path/vocab.json and path/merges.txt (Hugging Face format)."""
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump(self.vocab, f, ensure_ascii=False)
        with open(os.path.join(path, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in self.merges))


class TokenizerFileError(ValueError):
    """A tokenizer file that is cut short, corrupt, or does not belong with its pair; names the file."""


def _read_bpe(vocab_path, merges_path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Both formats: a JSON token -> id map, and '#version' header + one 'a b' merge per line.

    The two files are checked against each other, since a BPE built from a merges file cut short (even at
    a line boundary) loads without complaint and tokenizes differently: every merge must join two tokens
    of the vocabulary into a third, and every token of the vocabulary longer than one symbol (the
    byte-level alphabet) must be made by some merge, special tokens (`<|...|>`) excepted. GPT-2's 50,257
    ids are 256 bytes + 50,000 merges + <|endoftext|>, so a merges file that lost its last lines leaves
    tokens no merge makes.

    Raises:
      TokenizerFileError: one line naming the file (and line) that is truncated, corrupt or mismatched.
    """
    try:
        with open(vocab_path, encoding="utf-8") as f:
            vocab = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        why = f"{err.msg}: line {err.lineno} column {err.colno}" if hasattr(err, "msg") else "not UTF-8"
        raise TokenizerFileError(
            f"{vocab_path}: not a JSON vocabulary ({why}): the file is truncated or corrupt; copy it again"
        ) from None
    if not isinstance(vocab, dict) or not all(isinstance(i, int) for i in vocab.values()):
        raise TokenizerFileError(f"{vocab_path}: expected a JSON object of token -> integer id")
    merges = []
    try:
        with open(merges_path, encoding="utf-8") as f:
            lines = f.read().split("\n")
    except UnicodeDecodeError:
        raise TokenizerFileError(
            f"{merges_path}: not UTF-8 text: the file is corrupt; copy it again"
        ) from None
    for n, line in enumerate(lines, 1):
        line = line.rstrip("\r")
        if not line or (n == 1 and line.startswith("#version")):
            continue
        pair = line.split(" ")
        if len(pair) != 2 or not all(pair):
            raise TokenizerFileError(
                f"{merges_path}:{n}: expected two space-separated tokens, got {line!r}: the line is cut or "
                "corrupt; copy the file again"
            )
        a, b = pair
        if a not in vocab or b not in vocab or a + b not in vocab:
            missing = next(t for t in (a, b, a + b) if t not in vocab)
            raise TokenizerFileError(
                f"{merges_path}:{n}: merge {line!r} needs {missing!r}, which {vocab_path} lacks: the line is "
                "cut, or the two files come from different tokenizers"
            )
        merges.append((a, b))
    made = {a + b for a, b in merges}
    unmade = [
        t for t in vocab if len(t) > 1 and t not in made and not (t.startswith("<|") and t.endswith("|>"))
    ]
    if unmade:
        raise TokenizerFileError(
            f"{merges_path}: {len(merges)} merges, but {len(unmade)} tokens of {vocab_path} "
            f"(e.g. {unmade[0]!r}) are made by none: the merges file is cut short (it needs "
            f"{len(merges) + len(unmade)} merges); copy it again"
        )
    return vocab, merges


# ----------------------------------------------------------------------------- Hugging Face tokenizer.json


_CHAR_FILE_MAX_BYTES = 2**20  # one entry per character: kilobytes; a Hugging Face tokenizer.json is MBs
