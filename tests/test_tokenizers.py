"""Tokenizers: CharTokenizer behaviour; GPT-2 BPE parity with tiktoken (independent reference)."""

import itertools
import os
from unittest import mock

import numpy as np
import pytest
import tiktoken
from hypothesis import given, settings
from hypothesis import strategies as st
from tiktoken.load import load_tiktoken_bpe

from jaxrlhf.text import (
    CharTokenizer,
    GPT2Tokenizer,
    load_tokenizer,
    pad_batch,
)
from jaxrlhf.text.tokenizer import GPT2_EOS

# GPT-2's pre-tokenisation regex, as in openai/gpt-2 src/encoder.py.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

FRAGMENTS = [
    "",
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "I'm sure they'll say it's what we've done; I'd've. DON'T 'S 's",
    "numbers 0 12 345 6789 3.14159 -42 1e10 1,000,000",
    "punctuation!? ... -- (a) [b] {c} <d> @#$%^&*_+=~`|\\/",
    "café naïve façade Ünïcödé Straße",
    "日本語のテキスト 中文 한국어",
    "Привет мир Ελληνικά עברית العربية हिन्दी",
    "emoji 😀👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️ 🤖",
    "combining e\u0301 a\u0308 \u0915\u094d\u0937",
    "zero\u200bwidth\u200djoiner\ufeff",
    "   leading spaces",
    "trailing spaces   ",
    "multiple     spaces   between",
    "\ttabs\t\tand\t \tspaces\t",
    "new\nlines\n\n\nand\r\nwindows\r\n",
    " \n \t \n\n  ",
    "\u00a0nbsp\u2003em\u3000ideographic\u2028line",
    GPT2_EOS,
    f"before{GPT2_EOS}after",
    f" {GPT2_EOS} {GPT2_EOS}{GPT2_EOS}\n{GPT2_EOS}",
    "<|endoftext|  <|endoftext|>> <|endoftext |>",
    "code:\n    def f(x):\n        return x ** 2  # square\n",
    "a" * 300,
    "ab " * 100,
]
SEPARATORS = ["", " ", "  ", "\n", "\t", " \n ", GPT2_EOS]


def corpus() -> list[str]:
    """A few hundred strings: every fragment, and fragment pairs glued by each separator."""
    pairs = itertools.combinations(FRAGMENTS[1:12] + FRAGMENTS[12:22], 2)
    glued = [a + sep + b for (a, b), sep in zip(pairs, itertools.cycle(SEPARATORS))]
    return FRAGMENTS + glued


@pytest.fixture(scope="module")
def bpe_dir(shared_data):
    return shared_data / "gpt2_tokenizer"


@pytest.fixture(scope="module")
def gpt2(bpe_dir) -> GPT2Tokenizer:
    return GPT2Tokenizer.from_files(bpe_dir / "vocab.json", bpe_dir / "merges.txt")


@pytest.fixture(scope="module")
def reference(bpe_dir) -> tiktoken.Encoding:
    # An empty cache dir makes tiktoken read the local file without writing a cache copy.
    with mock.patch.dict(os.environ, {"TIKTOKEN_CACHE_DIR": ""}):
        ranks = load_tiktoken_bpe(str(bpe_dir / "gpt2.tiktoken"))
    return tiktoken.Encoding(
        name="gpt2_reference",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={GPT2_EOS: 50256},
    )


def reference_encode(reference, text):
    return reference.encode(text, allowed_special="all")


# ------------------------------------------------------------------------------------------- GPT-2


def test_gpt2_known_ids(gpt2):
    assert gpt2.vocab_size == 50257
    assert gpt2.eos_id == 50256
    assert gpt2.encode("Hello world the") == [15496, 995, 262]
    assert gpt2.encode(f"a{GPT2_EOS}") == [64, 50256]


def test_gpt2_matches_tiktoken_on_corpus(gpt2, reference):
    texts = corpus()
    assert len(texts) > 200
    mismatches = [t for t in texts if gpt2.encode(t) != reference_encode(reference, t)]
    assert not mismatches, f"{len(mismatches)} mismatches, first: {mismatches[0]!r}"
    # The batched (Rust-parallel) path gives the same ids.
    assert gpt2.encode_many(texts) == [reference_encode(reference, t) for t in texts]


def test_gpt2_round_trips_corpus(gpt2):
    for text in corpus():
        assert gpt2.decode(gpt2.encode(text)) == text


@settings(max_examples=300, deadline=None, derandomize=True)
@given(text=st.text(max_size=120))
def test_gpt2_matches_tiktoken_on_random_unicode(gpt2, reference, text):
    ids = gpt2.encode(text)
    assert ids == reference_encode(reference, text)
    assert gpt2.decode(ids) == text


@settings(max_examples=300, deadline=None, derandomize=True)
@given(pieces=st.lists(st.sampled_from(list(" \t\n\r\u00a0ab'sé😀.,0<|>") + [GPT2_EOS, "'ll"])))
def test_gpt2_matches_tiktoken_on_whitespace_and_specials(gpt2, reference, pieces):
    text = "".join(pieces)
    ids = gpt2.encode(text)
    assert ids == reference_encode(reference, text)
    assert gpt2.decode(ids) == text


def test_gpt2_file_formats_agree(bpe_dir, gpt2):
    openai = GPT2Tokenizer.from_openai_files(bpe_dir / "encoder.json", bpe_dir / "vocab.bpe")
    assert openai.vocab == gpt2.vocab
    assert openai.merges == gpt2.merges
    assert len(gpt2.merges) == 50000
    assert openai.encode_many(corpus()) == gpt2.encode_many(corpus())
    assert GPT2Tokenizer.from_dir(bpe_dir).encode_many(corpus()) == gpt2.encode_many(corpus())


def test_gpt2_from_dir_accepts_openai_pair_alone(tmp_path, bpe_dir, gpt2):
    for name in ("encoder.json", "vocab.bpe"):
        (tmp_path / name).write_bytes((bpe_dir / name).read_bytes())
    assert GPT2Tokenizer.from_dir(tmp_path).encode_many(corpus()) == gpt2.encode_many(corpus())
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        GPT2Tokenizer.from_dir(tmp_path / "missing")


def test_gpt2_save_load_round_trip(tmp_path, gpt2):
    gpt2.save(tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    assert isinstance(loaded, GPT2Tokenizer)
    assert loaded.vocab == gpt2.vocab and loaded.merges == gpt2.merges
    assert loaded.encode_many(corpus()) == gpt2.encode_many(corpus())


def test_gpt2_batch_and_stop_at_eos(gpt2):
    texts = ["Hello world", "a", " the the the"]
    ids, mask = gpt2.encode_batch(texts, 5, side="left")
    assert ids.dtype == np.int32 and mask.dtype == bool
    np.testing.assert_array_equal(ids[0], [50256, 50256, 50256, 15496, 995])
    np.testing.assert_array_equal(mask.sum(-1), [2, 1, 3])
    assert gpt2.decode_batch(ids, mask) == texts
    assert gpt2.decode(np.array([15496, 50256, 995]), stop_at_eos=True) == "Hello"
    assert gpt2.decode([15496, 50256, 995]) == f"Hello{GPT2_EOS} world"
    with pytest.raises(ValueError, match="outside"):
        gpt2.decode([15496, 50257])


# -------------------------------------------------------------------------------------- characters


def test_char_vocab_is_sorted_and_deterministic():
    tok = CharTokenizer.from_corpus(["ba", "c"])
    assert tok.chars == ("a", "b", "c", "⏎")
    assert tok == CharTokenizer.from_corpus(["c", "ab", "a"])
    assert (tok.vocab_size, tok.eos_id) == (4, 3)
    assert tok.encode("cab⏎") == [2, 0, 1, 3]
    assert tok.decode([2, 0, 1, 3]) == "cab⏎"
    assert tok.decode([2, 3, 0], stop_at_eos=True) == "c"


def test_char_round_trip():
    texts = ["Hello, world!", "  tabs\tand\nnewlines  ", "émoji 😀 ok"]
    tok = CharTokenizer.from_corpus(texts)
    for text in texts:
        assert tok.decode(tok.encode(text)) == text


def test_char_unknown_characters_raise_one_line_error():
    tok = CharTokenizer.from_corpus(["abc"])
    with pytest.raises(ValueError, match=r"2 character\(s\).*'xz'.*unk=") as err:
        tok.encode("axbzx")
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="outside"):
        tok.decode([4])
    with pytest.raises(ValueError, match="outside"):
        tok.decode([-1])
    with pytest.raises(ValueError, match="single character"):
        CharTokenizer.from_corpus(["abc"], eos="<eos>")


def test_char_unknown_characters_map_to_unk():
    tok = CharTokenizer.from_corpus(["abc"], unk="?")
    assert tok.chars == ("?", "a", "b", "c", "⏎")
    assert tok.unk_id == 0
    assert tok.encode("axb") == [1, 0, 2]


def test_char_batch_padding_and_truncation():
    tok = CharTokenizer.from_corpus(["abc"])  # a=0 b=1 c=2 ⏎=3
    ids, mask = tok.encode_batch(["ab", "cab", ""], 4, side="left")
    np.testing.assert_array_equal(ids, [[3, 3, 0, 1], [3, 2, 0, 1], [3, 3, 3, 3]])
    np.testing.assert_array_equal(mask, [[0, 0, 1, 1], [0, 1, 1, 1], [0, 0, 0, 0]])
    ids, mask = tok.encode_batch(["ab", "cab"], side="right")
    np.testing.assert_array_equal(ids, [[0, 1, 3], [2, 0, 1]])
    np.testing.assert_array_equal(mask, [[1, 1, 0], [1, 1, 1]])
    assert tok.decode_batch(ids, mask) == ["ab", "cab"]
    with pytest.raises(ValueError, match="truncate"):
        tok.encode_batch(["abcab"], 3)
    np.testing.assert_array_equal(tok.encode_batch(["abcab"], 3, truncate="left")[0], [[2, 0, 1]])
    np.testing.assert_array_equal(tok.encode_batch(["abcab"], 3, truncate="right")[0], [[0, 1, 2]])
    with pytest.raises(ValueError, match="side="):
        pad_batch([[1]], 2, pad_id=0, side="middle")


@pytest.mark.parametrize("name", ["tok.json", "tok_dir"])
def test_char_save_load_round_trip(tmp_path, name):
    tok = CharTokenizer.from_corpus(["héllo\twörld 😀"], eos="␄", unk="?")
    tok.save(tmp_path / name)
    for loaded in (CharTokenizer.load(tmp_path / name), load_tokenizer(tmp_path / name)):
        assert loaded == tok
        assert loaded.encode("héllo?x") == tok.encode("héllo?x")
        assert (loaded.eos_id, loaded.unk_id) == (tok.eos_id, tok.unk_id)


def test_load_tokenizer_rejects_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        load_tokenizer(tmp_path / "nothing")
