"""Data sets through their TFDS builders, the TL;DR prompt, padding and batch order.

Nothing downloads: an autouse fixture makes every http(s) urlopen fail as if offline; download
paths are exercised with file:// URLs to copies in tmp folders.
"""

import collections
import dataclasses
import hashlib
import json
import pathlib
import urllib.error
import urllib.request

import numpy as np
import pytest

from jaxrlhf.data import (
    ChecksumError,
    DataFormatError,
    DataNotFoundError,
    common,
    format_tldr_prompt,
    load_comparisons,
    load_sst2,
    load_tldr,
    load_tweets,
    load_ultrafeedback,
    sst2,
    tldr,
    tweets,
    ultrafeedback,
)
from jaxrlhf.stages.batches import train_val_split  # noqa: E402
from jaxrlhf.text import pad_batch  # noqa: E402

_real_urlopen = urllib.request.urlopen


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No network and no user settings: http(s) fails like a machine without a connection."""

    def urlopen(url, *args, **kwargs):
        if not str(url).startswith("file:"):
            raise urllib.error.URLError("network disabled in tests")
        return _real_urlopen(url, *args, **kwargs)

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    monkeypatch.delenv(common.ENV_DATA_DIR, raising=False)
    monkeypatch.delenv(common.ENV_CACHE_DIR, raising=False)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> pathlib.Path:
    """One cache (TFDS data dir) per module, so each data set is prepared once."""
    return tmp_path_factory.mktemp("jaxrlhf_cache")


def _file_url(path: pathlib.Path) -> str:
    return path.resolve().as_uri()


# ------------------------------------------------------------------------------ tweets


def test_tweets_counts_and_rows(shared_data, cache):
    train = load_tweets("train", shared_data, cache_dir=cache)
    test = load_tweets("test", shared_data / "tweets", cache_dir=cache)  # the folder itself works too
    assert len(train) == 27_480  # 27,481 minus the empty row
    assert len(test) == 3_534
    assert collections.Counter(r["sentiment"] for r in train) == {
        "neutral": 11_117,  # 11,118 in PROVENANCE, minus the empty (neutral) row
        "positive": 8_582,
        "negative": 7_781,
    }
    assert collections.Counter(r["sentiment"] for r in test) == {
        "neutral": 1_430,
        "positive": 1_103,
        "negative": 1_001,
    }
    assert train[0] == {
        "text": "I`d have responded, if I were going",
        "sentiment": "neutral",
        "text_id": "cb774db0d1",
    }
    assert train[1]["text"] == "Sooo SAD I will miss you here in San Diego!!!"
    assert train[1]["sentiment"] == "negative"
    assert test[-1] == {
        "text": "http://twitpic.com/4woj2 - omgssh  ang cute ng bby.!",
        "sentiment": "positive",
        "text_id": "469e15c5a8",
    }
    assert "fdb77c3752" not in {r["text_id"] for r in train}
    assert all(r["text"] and r["text"] == r["text"].strip() for r in train)


def test_tweets_env_var_and_prepared_data_reused(shared_data, cache, monkeypatch):
    load_tweets("test", shared_data, cache_dir=cache)  # prepared (a no-op if an earlier test did)
    prepared = sorted((cache / "tfds").glob("tweets-*"))

    def fail(*args, **kwargs):
        raise AssertionError("the prepared tweets were regenerated")

    monkeypatch.setattr(tweets.TweetsBuilder, "_generate_examples", fail)
    monkeypatch.setenv(common.ENV_DATA_DIR, str(shared_data))
    monkeypatch.setenv(common.ENV_CACHE_DIR, str(cache))
    test = load_tweets("test")
    assert len(test) == 3_534
    assert sorted((cache / "tfds").glob("tweets-*")) == prepared
    with pytest.raises(ValueError, match="no split 'validation'"):
        load_tweets("valid")


# ------------------------------------------------------------------------------ offline / checksums


def test_offline_without_data_is_one_clear_line(tmp_path):
    with pytest.raises(DataNotFoundError) as excinfo:
        load_tweets("train", cache_dir=tmp_path)
    message = str(excinfo.value)
    assert "\n" not in message
    assert message.startswith("tweets data not found")
    assert "pass --data-dir DIR or set JAXRLHF_DATA_DIR to a folder with train.csv and test.csv" in message
    assert message.endswith("or connect to the network to download it")
    assert not list((tmp_path / "downloads").rglob("*.part"))


def test_explicit_data_dir_without_files(tmp_path):
    with pytest.raises(DataNotFoundError, match=r"sst2 data not found in .*expected train.tsv"):
        load_sst2("train", tmp_path, cache_dir=tmp_path)


def _tiny_tweets(folder: pathlib.Path) -> dict[str, str]:
    folder.mkdir(parents=True)
    (folder / "train.csv").write_text(
        'textID,text,selected_text,sentiment\na1," hi there",hi,positive\na2,,,neutral\na3,meh,meh,negative\n'
    )
    (folder / "test.csv").write_text("textID,text,sentiment\nb1,ok then,neutral\n")
    return {
        name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in ("train.csv", "test.csv")
    }


def _patch_downloads(monkeypatch, folder: pathlib.Path, hashes: dict[str, str]) -> None:
    downloads = {name: (_file_url(folder / name), sha) for name, sha in hashes.items()}
    monkeypatch.setattr(tweets, "SPEC", dataclasses.replace(tweets.SPEC, downloads=downloads))


def test_sha256_mismatch_is_an_error(shared_data, tmp_path, monkeypatch):
    source = tmp_path / "source"
    source.mkdir()
    corrupted = bytearray((shared_data / "tweets" / "train.csv").read_bytes())
    corrupted[100] ^= 0x01
    (source / "train.csv").write_bytes(bytes(corrupted))
    (source / "test.csv").write_bytes((shared_data / "tweets" / "test.csv").read_bytes())
    pinned = {name: sha for name, (_, sha) in tweets.DOWNLOADS.items()}
    _patch_downloads(monkeypatch, source, pinned)
    with pytest.raises(ChecksumError, match="sha256 mismatch for file:.*train.csv: expected 1922"):
        load_tweets("train", cache_dir=tmp_path / "cache")
    assert not list((tmp_path / "cache").rglob("train.csv*"))  # nothing unverified left behind

    # An intact file against a wrong expected hash fails the same way.
    _patch_downloads(monkeypatch, source, {"test.csv": "0" * 64})
    with pytest.raises(ChecksumError, match="expected 0000"):
        load_tweets("test", cache_dir=tmp_path / "cache")


def test_download_path_with_matching_hashes(tmp_path, monkeypatch):
    hashes = _tiny_tweets(tmp_path / "source")
    _patch_downloads(monkeypatch, tmp_path / "source", hashes)
    rows = load_tweets("train", cache_dir=tmp_path / "cache")
    assert rows == [
        {"text": "hi there", "sentiment": "positive", "text_id": "a1"},
        {"text": "meh", "sentiment": "negative", "text_id": "a3"},
    ]
    assert (tmp_path / "cache" / "downloads" / "tweets" / "train.csv").is_file()
    # A builder used on its own (no manual dir) downloads into its own folder with the same checks.
    builder = tweets.TweetsBuilder(data_dir=str(tmp_path / "standalone"), file_format="array_record")
    builder.download_and_prepare(download_config=common.tfds.download.DownloadConfig(try_download_gcs=False))
    assert len(builder.as_data_source(split="test")) == 1


# ------------------------------------------------------------------------------ TL;DR


def test_tldr_dove_pairs(shared_data, cache):
    rows = load_tldr("test", shared_data, cache_dir=cache)
    assert len(rows) == 500
    assert rows[0]["id"] == "t3_1wbdsh"
    assert rows[0]["subreddit"] == "relationships"
    assert rows[0]["title"].startswith("Me [19 F] with my friend [19 M], not sure if I may have")
    assert rows[0]["post"].startswith("Hello hello everybody. I hope this isn't too trivial")
    assert rows[0]["summary"].startswith("I really like this guy, but after having sex with him")
    assert rows[-1]["id"] == "t3_23ed9f"
    assert rows[-1]["subreddit"] == "relationship_advice"
    assert rows[-1]["summary"].startswith("Haven't been in a relationship in 6+ years, starting")
    assert collections.Counter(r["subreddit"] for r in rows)["relationships"] == 267
    raw = [json.loads(line) for line in open(shared_data / "tldr" / "tldr_test500_dove.jsonl")]
    assert [r["summary"] for r in rows] == [r["gold_response"].strip() for r in raw]
    assert [r["post"] for r in rows] == [r["instruction"].strip() for r in raw]
    with pytest.raises(ValueError, match="no split 'train'; available: test"):
        load_tldr("train", shared_data, cache_dir=cache)


def test_vertex_comparisons(shared_data, cache):
    rows = load_comparisons("train", shared_data / "tldr", cache_dir=cache)
    assert len(rows) == 929
    assert rows[0]["chosen"].startswith("Ex is threatening me with legal action because I've")  # choice 0
    assert rows[0]["rejected"] == (
        "Ex-boyfriend is threatening me with legal action because I was mean to him. I don't know what to do."
    )
    assert rows[1]["chosen"] == (  # choice 1
        "When applying to many jobs through a single university jobs portal, is just one HR person "
        "reading ALL my applications?"
    )
    assert rows[1]["rejected"] == (
        "When applying through a massive job portal, is just one HR person seeing ALL of them?"
    )
    assert rows[-1]["chosen"].startswith("I suck at emotional support")  # choice 1
    assert rows[1]["post"].startswith("I live right next to a huge university")
    assert rows[0]["post"].endswith("a bigger mess than it needs to be.")  # " [summary]: " removed
    assert all(r["subreddit"] == "" and r["title"] == "" for r in rows)
    raw = [json.loads(line) for line in open(shared_data / "tldr" / "comparisons929_vertex_small.jsonl")]
    first_chosen = sum(r["chosen"] == x["candidate_0"].strip() for r, x in zip(rows, raw, strict=True))
    assert first_chosen == 473  # choice 0 count in PROVENANCE


def _write_jsonl(path: pathlib.Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_other_tldr_formats(tmp_path):
    folder = tmp_path / "tldr"
    post = {"id": "t3_a", "subreddit": "tifu", "title": "T", "post": " P1\n\nP2 "}
    _write_jsonl(folder / "tldr_3_filtered" / "valid.jsonl", [{**post, "summary": " short"}])
    carper_prompt = "SUBREDDIT: r/AskReddit\nTITLE: Why?\nPOST: Because.\nSo.\nTL;DR:"
    _write_jsonl(folder / "tldr_carper_train.jsonl", [{"prompt": carper_prompt, "label": " because"}])
    info = {"id": "t3_b", "subreddit": "pets", "title": "Dog", "post": "My dog."}
    openai = [
        {
            "info": info,
            "summaries": [{"text": " A"}, {"text": " B"}],
            "choice": 1,
            "split": "train",
        },
        {
            "info": info,
            "summaries": [{"text": " C"}, {"text": " D"}],
            "choice": 0,
            "split": "valid2",
        },
        {
            "info": {"id": "x", "article": "cnn"},
            "summaries": [{"text": "E"}, {"text": "F"}],
            "choice": 0,
            "split": "train",
        },  # CNN/DM: skipped
    ]
    _write_jsonl(folder / "comparisons" / "batch3.json", openai)
    carper = {"prompt": carper_prompt, "chosen": "TL;DR: good", "rejected": "TL;DR: bad"}
    _write_jsonl(folder / "comparisons_carper_valid1.jsonl", [carper])

    assert load_tldr("valid", folder, cache_dir=tmp_path) == [
        {"id": "t3_a", "subreddit": "tifu", "title": "T", "post": "P1\n\nP2", "summary": "short"}
    ]
    assert load_tldr("train", tmp_path, cache_dir=tmp_path) == [
        {
            "id": "",
            "subreddit": "AskReddit",
            "title": "Why?",
            "post": "Because.\nSo.",
            "summary": "because",
        }
    ]
    fields = {"id": "t3_b", "subreddit": "pets", "title": "Dog", "post": "My dog."}
    assert load_comparisons("train", folder, cache_dir=tmp_path) == [
        {**fields, "chosen": "B", "rejected": "A"}
    ]
    assert load_comparisons("valid2", folder, cache_dir=tmp_path) == [
        {**fields, "chosen": "C", "rejected": "D"}
    ]
    assert load_comparisons("validation", folder, cache_dir=tmp_path) == [
        {
            "id": "",
            "subreddit": "AskReddit",
            "title": "Why?",
            "post": "Because.\nSo.",
            "chosen": "good",
            "rejected": "bad",
        }
    ]


def test_split_from_name():
    names = {
        "tldr_test500_dove.jsonl": "test",
        "comparisons929_vertex_small.jsonl": None,
        "valid.jsonl": "validation",
        "comparisons_valid1.jsonl": "validation",
        "comparisons_valid2.jsonl": "test",
        "tldr_train.jsonl": "train",
    }
    assert {name: tldr.split_from_name(pathlib.Path(name)) for name in names} == names


# ------------------------------------------------------------------------------ TL;DR prompt


def _words(text: str) -> int:
    return len(text.split())


# Header "SUBREDDIT: r/test" (2 words) + "TITLE: A title" (3) + "POST:" + "TL;DR:" (1 each) = 7.
_POST = "First para one. Second sentence here.\n\nSecond para words go on and on."
_HEAD = "SUBREDDIT: r/test\nTITLE: A title\nPOST: "


@pytest.mark.parametrize(
    "budget, body",
    [
        (20, _POST),  # 7 + 13 words: fits whole
        (19, "First para one. Second sentence here."),  # paragraph boundary
        (12, "First para one."),  # first paragraph (13) too long: sentence boundary
        (9, "First para"),  # first sentence (10) too long: word boundary
        (8, "First"),
    ],
)
def test_format_tldr_prompt_truncation(budget, body):
    prompt = format_tldr_prompt("test", "A title", _POST, budget, _words)
    assert prompt == _HEAD + body + "\nTL;DR:"
    assert _words(prompt) <= budget


def test_format_tldr_prompt_keeps_last_fitting_paragraph():
    post = "One.\nTwo two.\nThree three three.\nFour."
    # 7 header words: "One.\nTwo two." makes 10 <= 11; adding "Three three three." makes 13.
    assert format_tldr_prompt("test", "A title", post, 11, _words) == (_HEAD + "One.\nTwo two.\nTL;DR:")


def test_format_tldr_prompt_errors_and_vertex_post():
    with pytest.raises(ValueError, match="does not fit in 7 tokens"):
        format_tldr_prompt("test", "A title", _POST, 7, _words)
    vertex_post = "I had a problem. [summary]: "
    assert format_tldr_prompt("", "", vertex_post, 100, _words) == "POST: I had a problem.\nTL;DR:"
    assert format_tldr_prompt("pets", "Dog", "My dog.", 100, len) == (
        "SUBREDDIT: r/pets\nTITLE: Dog\nPOST: My dog.\nTL;DR:"
    )


# ------------------------------------------------------------------------------ SST-2


def test_sst2_counts(shared_data, cache):
    train = load_sst2("train", shared_data, cache_dir=cache)
    dev = load_sst2("dev", shared_data, cache_dir=cache)
    test = load_sst2("test", shared_data, cache_dir=cache)
    assert len(train) == 67_349 and len(dev) == 872 and len(test) == 1_821
    assert collections.Counter(r["label"] for r in train) == {1: 37_569, 0: 29_780}
    assert collections.Counter(r["label"] for r in dev) == {1: 444, 0: 428}
    assert {r["label"] for r in test} == {-1}
    assert train[0] == {"sentence": "hide new secretions from the parental units", "label": 0}
    assert train[-1]["sentence"].startswith("this new jangle of noise , mayhem and stupidity")
    assert dev[0] == {"sentence": "it 's a charming and often affecting journey .", "label": 1}
    assert test[0] == {"sentence": "uneasy mishmash of styles and genres .", "label": -1}
    assert sst2.LABELS[train[0]["label"]] == "negative"


# ------------------------------------------------------------------------------ batching


def test_pad_batch_right_and_left():
    ids, mask = pad_batch([[5, 6, 7], [8]], 4, pad_id=0, side="right")
    np.testing.assert_array_equal(ids, [[5, 6, 7, 0], [8, 0, 0, 0]])
    np.testing.assert_array_equal(mask, [[1, 1, 1, 0], [1, 0, 0, 0]])
    assert ids.dtype == np.int32 and mask.dtype == bool
    ids, mask = pad_batch([[5, 6, 7], [8], []], 4, pad_id=9, side="left")
    np.testing.assert_array_equal(ids, [[9, 5, 6, 7], [9, 9, 9, 8], [9, 9, 9, 9]])
    np.testing.assert_array_equal(mask, [[0, 1, 1, 1], [0, 0, 0, 1], [0, 0, 0, 0]])


def test_pad_batch_truncation():
    with pytest.raises(ValueError, match="1 of 2 sequences are longer than length=3"):
        pad_batch([[1], [1, 2, 3, 4, 5]], 3, pad_id=0, side="left")
    ids, mask = pad_batch([[1], [1, 2, 3, 4, 5]], 3, pad_id=0, truncate="left", side="left")
    np.testing.assert_array_equal(ids, [[0, 0, 1], [3, 4, 5]])
    np.testing.assert_array_equal(mask, [[0, 0, 1], [1, 1, 1]])
    ids, _ = pad_batch([[1, 2, 3, 4, 5]], 3, pad_id=0, truncate="right", side="right")
    np.testing.assert_array_equal(ids, [[1, 2, 3]])


def test_train_val_split():
    train, val = train_val_split(100, 0.1, seed=3)
    assert len(val) == 10 and len(train) == 90
    np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), np.arange(100))
    again_train, again_val = train_val_split(100, 10, seed=3)
    np.testing.assert_array_equal(val, again_val)
    np.testing.assert_array_equal(train, again_train)
    assert not np.array_equal(val, train_val_split(100, 10, seed=4)[1])


# ------------------------------------------------------------------------------ UltraFeedback


def test_ultrafeedback_rows_as_provenance_describes(shared_data, cache):
    """The 1,000 + 200 shared rows, with the facts PROVENANCE.md records (ties, an empty reply, identical
    pairs, CRLF inside replies kept, no chosen below rejected, disjoint prompts)."""
    train = load_ultrafeedback("train", shared_data, cache_dir=cache)
    val = load_ultrafeedback("eval", shared_data, cache_dir=cache)
    assert len(train) == 1_000 and len(val) == 200
    assert sum(r["score_chosen"] == r["score_rejected"] for r in train) == 111
    assert sum(r["score_chosen"] == r["score_rejected"] for r in val) == 25
    assert not any(r["score_chosen"] < r["score_rejected"] for r in train + val)
    assert [r["source_index"] for r in train if r["chosen"] == ""] == [28230]
    assert sorted(r["source_index"] for r in train if r["chosen"] == r["rejected"]) == [
        14571,
        16242,
        35635,
        44516,
    ]
    assert sum("\r\n" in r["prompt"] + r["chosen"] + r["rejected"] for r in train) == 8  # kept
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in val}
    for rows, name in ((train, "train_clean.jsonl"), (val, "eval_clean.jsonl")):  # every row as in the file
        raw = [json.loads(x) for x in (shared_data / "ultrafeedback" / name).read_text().splitlines()]
        assert [(r["prompt"], r["chosen"], r["rejected"], r["source_index"]) for r in rows] == [
            (x["prompt"], x["chosen"], x["rejected"], x["source_index"]) for x in raw
        ]
        assert [r["score_chosen"] - r["score_rejected"] for r in rows] == [
            x["metadata"]["score_chosen"] - x["metadata"]["score_rejected"] for x in raw
        ]


def test_ultrafeedback_pinned_download_and_bad_rows(shared_data, tmp_path, monkeypatch):
    """The pinned sha256 are the shared files' (served here from file:// URLs); a row without its
    rejected reply is an error naming the file, the line and the field."""
    downloads = {
        name: (_file_url(shared_data / "ultrafeedback" / name), sha)
        for name, (_, sha) in ultrafeedback.DOWNLOADS.items()
    }
    monkeypatch.setattr(ultrafeedback, "SPEC", dataclasses.replace(ultrafeedback.SPEC, downloads=downloads))
    assert len(load_ultrafeedback("validation", cache_dir=tmp_path / "cache")) == 200
    bad = tmp_path / "bad"
    bad.mkdir()
    lines = (shared_data / "ultrafeedback" / "eval_clean.jsonl").read_text().splitlines()
    row = json.loads(lines[2])
    del row["rejected"]
    (bad / "eval_clean.jsonl").write_text("\n".join([*lines[:2], json.dumps(row), *lines[3:]]) + "\n")
    (bad / "train_clean.jsonl").write_text(lines[0] + "\n")
    with pytest.raises(
        DataFormatError, match=r"eval_clean.jsonl:3: field 'rejected' must be text \(missing\)"
    ):
        load_ultrafeedback("validation", bad, cache_dir=tmp_path / "cache2")
