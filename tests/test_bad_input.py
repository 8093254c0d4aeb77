"""Bad input is refused before any work, in one line that says what is wrong and what to do (issue 15).

Two tables. Pipeline cases call the entry points in-process (`happy.main`, the TL;DR and SST-2 recipes') on
small copies of the shared data with one fault injected, and check the exit code, that stderr is exactly
one line holding the expected words, and that the `--out` tree is byte-identical afterwards (every file
hashed; mostly it must still not exist). Library cases call the function and check its one-line ValueError.
Nothing here trains or compiles a model step, so the file runs in seconds.
"""

import dataclasses
import errno
import functools
import hashlib
import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from experiments.sst2 import recipe as sst2_recipe  # noqa: E402
from experiments.tldr import recipe as tldr_recipe  # noqa: E402
from jaxrlhf import happy, models  # noqa: E402
from jaxrlhf.data import load_sst2, load_tweets, tweets  # noqa: E402
from jaxrlhf.engine import flags, loop, outdir  # noqa: E402
from jaxrlhf.models import ModelConfig, hf  # noqa: E402
from jaxrlhf.rollout import SampleConfig, sampler, scoring  # noqa: E402
from jaxrlhf.rollout import pairs as pairs_lib  # noqa: E402
from jaxrlhf.stages import preference  # noqa: E402
from jaxrlhf.stages import recipe as stage_recipe  # noqa: E402
from jaxrlhf.text import GPT2Tokenizer  # noqa: E402

N_DEVICES = 8  # conftest.py


def tldr_main(argv):
    """`python -m experiments.tldr` in this process."""
    return stage_recipe.main(tldr_recipe.RECIPE, argv)


def sst2_main(argv):
    """`python -m experiments.sst2` in this process."""
    return stage_recipe.main(sst2_recipe.RECIPE, argv)


def parse_args(recipe, argv):
    """A recipe's config from a command line, as its command parses it."""
    return flags.parse_checked(recipe.defaults, argv, check=recipe.check, inactive=recipe.inactive,
                               renamed=recipe.renamed, adjust=recipe.adjust)  # fmt: skip


@pytest.fixture(autouse=True)
def _quiet_tfds(monkeypatch, tmp_path):
    """No TFDS progress bars on stderr (they would hide whether the refusal is one line), the prepared data
    in the test's own cache, no data or temporary folders outside tmp_path."""
    tfds.disable_progress_bar()
    monkeypatch.setenv("JAXRLHF_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("JAXRLHF_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    yield
    tfds.enable_progress_bar()


# ------------------------------------------------------------------------------------------ helpers


def tree_hash(path: pathlib.Path, skip: tuple[str, ...] = ()) -> dict[str, str] | str | None:
    """Every file under `path` -> sha256 (folders too, as "dir"), but under the top-level names `skip`; a
    plain file's own hash; None if absent."""
    if not path.exists():
        return None
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    return {
        str(p.relative_to(path)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.relative_to(path).parts[0] not in skip
    }


def edit_line(path: pathlib.Path, number: int, new: str | None) -> None:
    """Replace line `number` (from 1) of a text file by `new` (None: delete it)."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    lines[number - 1 : number] = [] if new is None else [new]
    path.write_text("".join(lines), encoding="utf-8")


@pytest.fixture(scope="module")
def tweets_dir(tmp_path_factory, shared_data) -> pathlib.Path:
    """The first 200 train and 100 test tweets of the shared csv files."""
    folder = tmp_path_factory.mktemp("tweets")
    for name, rows in (("train.csv", 200), ("test.csv", 100)):
        lines = (shared_data / "tweets" / name).read_text(encoding="utf-8").splitlines(keepends=True)
        (folder / name).write_text("".join(lines[: rows + 1]), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def tldr_dir(tmp_path_factory, shared_data) -> pathlib.Path:
    """The first 40 TL;DR test posts with reference summaries (dove format), as a test split."""
    folder = tmp_path_factory.mktemp("tldr")
    lines = (shared_data / "tldr" / "tldr_test500_dove.jsonl").read_text(encoding="utf-8").splitlines(True)
    (folder / "tldr_test_small.jsonl").write_text("".join(lines[:40]), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def sst2_dir(tmp_path_factory, shared_data) -> pathlib.Path:
    """The first 200 train and 64 dev sentences of the shared SST-2 tsv files (both classes in each)."""
    folder = tmp_path_factory.mktemp("sst2")
    for name, rows in (("train.tsv", 200), ("dev.tsv", 64)):
        lines = (shared_data / "sst2" / name).read_text(encoding="utf-8").splitlines(keepends=True)
        (folder / name).write_text("".join(lines[: rows + 1]), encoding="utf-8")
    return folder


@dataclasses.dataclass
class Inputs:
    """What a pipeline case builds on: fresh copies of the small data sets under its tmp_path."""

    tmp: pathlib.Path
    shared: pathlib.Path
    tweets_src: pathlib.Path
    tldr_src: pathlib.Path
    sst2_src: pathlib.Path | None = None

    @property
    def out(self) -> pathlib.Path:
        return self.tmp / "out"

    def tweets(self, fault: Callable[[pathlib.Path], None] | None = None, file: str = "train.csv"):
        folder = self.tmp / "tweets"
        shutil.copytree(self.tweets_src, folder)
        if fault is not None:
            fault(folder / file)
        return folder

    def tldr(self, fault: Callable[[pathlib.Path], None] | None = None):
        folder = self.tmp / "tldr"
        shutil.copytree(self.tldr_src, folder)
        if fault is not None:
            fault(folder / "tldr_test_small.jsonl")
        return folder

    def sst2(self, fault: Callable[[pathlib.Path], None] | None = None):
        folder = self.tmp / "sst2"
        shutil.copytree(self.sst2_src, folder)
        if fault is not None:
            fault(folder / "train.tsv")
        return folder


def happy_args(inputs: Inputs, *extra: str, data_dir=None) -> list[str]:
    data_dir = inputs.tweets() if data_dir is None else data_dir
    return [
        "--quick", "--progress", "false", "--compile-cache", "", "--data.data_dir", str(data_dir),
        "--out", str(inputs.out), "--pretrain.batch_size", "16", "--sft.batch_size", "16",
        "--rl.batch_size", "16", *extra,
    ]  # fmt: skip


def tldr_args(inputs: Inputs, *extra: str, data_dir=None, tokenizer_dir=None) -> list[str]:
    data_dir = inputs.tldr() if data_dir is None else data_dir
    tokenizer_dir = inputs.shared / "gpt2_tokenizer" if tokenizer_dir is None else tokenizer_dir
    return [
        "--model", "tiny", "--out", str(inputs.out), "--progress", "false", "--stages", "sft",
        "--data.data_dir", str(data_dir), "--data.cache_dir", str(inputs.tmp / "cache"),
        "--data.tokenizer_dir", str(tokenizer_dir), "--data.summary_split", "test",
        "--data.summary_val_split", "", "--data.val_size", "8", "--data.max_prompt_tokens", "64",
        "--data.max_summary_tokens", "16", "--sft.batch_size", "8", "--sft.eval_batch_size", "8", *extra,
    ]  # fmt: skip


def sst2_args(inputs: Inputs, *extra: str, data_dir=None) -> list[str]:
    data_dir = inputs.sst2() if data_dir is None else data_dir
    return [
        "--model", "tiny", "--out", str(inputs.out), "--progress", "false", "--compile-cache", "",
        "--data.data_dir", str(data_dir), "--data.cache_dir", str(inputs.tmp / "cache"),
        "--data.tokenizer_dir", str(inputs.shared / "gpt2_tokenizer"), "--data.max_tokens", "16",
        "--sft.batch_size", "8", "--sft.eval_batch_size", "8", "--rm.batch_size", "8",
        "--rm.eval_batch_size", "8", "--rl.batch_size", "8", *extra,
    ]  # fmt: skip


def _make_file(path: pathlib.Path) -> pathlib.Path:
    path.write_text("not a directory\n")
    return path


def _read_only(inputs: Inputs, monkeypatch) -> None:
    """--out inside a folder without write permission. As root every folder is writable, so there the
    permission bits stand in for os.access (the check itself is what is tested)."""
    parent = inputs.tmp / "locked"
    parent.mkdir()
    parent.chmod(0o555)
    if os.geteuid() == 0:
        real = os.access

        def access(path, mode):
            return real(path, mode) and not (mode & os.W_OK and not os.stat(path).st_mode & 0o200)

        monkeypatch.setattr(os, "access", access)


def _tldr_rows(path: pathlib.Path, change: Callable[[int, dict], dict]) -> None:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    path.write_text("".join(json.dumps(change(i, r)) + "\n" for i, r in enumerate(rows)), encoding="utf-8")


def _cut_vocab_alone(inputs: Inputs) -> pathlib.Path:
    folder = inputs.tmp / "tok"
    folder.mkdir()
    shutil.copy(inputs.shared / "gpt2_tokenizer" / "vocab.json", folder)
    return folder


# --------------------------------------------------------------------------------- pipeline table


@dataclasses.dataclass
class Case:
    """main(argv) must exit `code` with one line on stderr holding every string of `expect`."""

    name: str
    build: Callable  # (inputs, monkeypatch) -> (main, argv, the --out path)
    expect: tuple[str, ...]
    code: int = 1
    error: type[Exception] = ValueError  # what a library case raises


def happy_case(*extra, data=None):
    """A happy case's build: its flags, and optionally a function making its data folder."""

    def build(inputs, monkeypatch):
        folder = data(inputs) if data is not None else None
        return happy.main, happy_args(inputs, *extra, data_dir=folder), inputs.out

    return build


def tldr_case(*extra, data=None, main=None):
    """A TL;DR case's build: its flags, a function making its data folder, its entry point."""

    def build(inputs, monkeypatch):
        folder = data(inputs) if data is not None else None
        return main or tldr_main, tldr_args(inputs, *extra, data_dir=folder), inputs.out

    return build


def _out_case(kind: str, pipeline: str):
    def build(inputs, monkeypatch):
        if kind == "file":
            out = _make_file(inputs.tmp / "out.txt")
        elif kind == "under_file":
            out = _make_file(inputs.tmp / "a_file") / "run"
        else:
            _read_only(inputs, monkeypatch)
            out = inputs.tmp / "locked" / "run"
        args = happy_args(inputs) if pipeline == "happy" else tldr_args(inputs)
        args[args.index("--out") + 1] = str(out)
        return (happy.main if pipeline == "happy" else tldr_main), args, out

    return build


def _empty_out_case(pipeline: str):
    """`--out ''`: refused by the parser; the --out the test watches is the usual one (never created)."""

    def build(inputs, monkeypatch):
        args = happy_args(inputs) if pipeline == "happy" else tldr_args(inputs)
        args[args.index("--out") + 1] = ""
        return (happy.main if pipeline == "happy" else tldr_main), args, inputs.out

    return build


def sst2_case(*extra, fault=None):
    """An SST-2 case's build: its flags, and optionally a fault in its train.tsv."""

    def build(inputs, monkeypatch):
        return sst2_main, sst2_args(inputs, *extra, data_dir=inputs.sst2(fault)), inputs.out

    return build


def _sst2_only(label: str):
    """Keep the header and the rows of one label."""

    def fault(path):
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        kept = [x for x in lines[1:] if x.rstrip("\n").split("\t")[1] == label]
        path.write_text(lines[0] + "".join(kept), encoding="utf-8")

    return fault


def _sst2_negative_first(path):
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    path.write_text(lines[0] + "".join(sorted(lines[1:], key=lambda x: x.rstrip("\n")[-1])), encoding="utf-8")


def _unwritable_home(inputs, monkeypatch):
    """A happy run with no JAXRLHF_CACHE_DIR and a HOME where ~/.cache cannot be made: a folder without
    write permission, or as root (where chmod stops no write) a path under a regular file."""
    home = inputs.tmp / "home"
    home.mkdir()
    home.chmod(0o500)
    if os.access(home, os.W_OK):
        home.chmod(0o700)
        home.rmdir()
        home = _make_file(inputs.tmp / "home_file") / "home"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("JAXRLHF_CACHE_DIR")
    return happy.main, happy_args(inputs), inputs.out


def _train_csv(fault):
    return lambda inputs: inputs.tweets(fault)


def _tldr_file(fault):
    return lambda inputs: inputs.tldr(fault)


def _cut_json_line(path):
    edit_line(path, 5, path.read_text(encoding="utf-8").splitlines()[4][:80] + "\n")


def _drop_title(path):
    _tldr_rows(path, lambda n, row: {k: v for k, v in row.items() if not (n == 6 and k == "title")})


def _null_summary(path):
    _tldr_rows(path, lambda n, row: {**row, "gold_response": None} if n == 8 else row)


def _blank_summaries(path):
    _tldr_rows(path, lambda n, row: {**row, "gold_response": "  "})


def _only(sentiments):
    def fault(path):
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        path.write_text(lines[0] + "".join(x for x in lines[1:] if x.rstrip().split(",")[-1] in sentiments))

    return fault


PIPELINE_CASES = [
    # happy: flags (the configs' __post_init__ and the command's cross checks), exit 2, before any work
    Case(
        "happy_temperature",
        happy_case("--rl.temperature", "-1"),
        ("--rl.temperature -1.0", "use a finite value >= 0"),
        2,
    ),
    Case("happy_top_k", happy_case("--rl.top_k", "-1"), ("--rl.top_k -1", "use 0 (off) or a positive k"), 2),
    Case(
        "happy_block_size",
        happy_case("--data.block_size", "1"),
        ("--data.block_size 1", "block_size - 1 characters", "use >= 2"),
        2,
    ),
    Case(
        "happy_pretrain_steps",
        happy_case("--pretrain.steps", "-1"),
        ("--pretrain.steps -1", "it must be >= 1"),
        2,
    ),
    Case(
        "happy_muon_lr_with_adamw",
        happy_case("--sft.optim.muon_lr", "0.01"),
        ("--sft.optim.muon_lr 0.01", "does nothing with optimizer 'adamw'"),
        2,
    ),
    Case(
        "happy_batch_zero", happy_case("--sft.batch_size", "0"), ("--sft.batch_size 0", "it must be >= 1"), 2
    ),
    Case(
        "happy_group_size",
        happy_case("--rl.algo", "rebel", "--rl.group_size", "0"),
        ("--rl.group_size 0", "at least 2 answers"),
        2,
    ),
    Case(
        "happy_rebel_minibatches",
        happy_case("--rl.algo", "rebel", "--rl.minibatches", "3"),
        ("--rl.minibatches 3 must divide the 4 pairs of an iteration", "--rl.group_size 4"),
        2,
    ),
    Case(
        "happy_micro_batches",
        happy_case("--rl.batch_size", "30", "--rl.micro_batches", "4"),
        ("--rl.micro_batches 4 must divide an update's 15 rows", "--rl.micro_batches 1"),
        2,
    ),
    Case(
        "happy_kl_target",
        happy_case("--rl.kl_target", "0"),
        ("--rl.kl_target 0.0", "positive KL", "or none"),
        2,
    ),
    Case(
        "happy_greedy_pairs",
        happy_case("--rl.algo", "dpo", "--rl.temperature", "0"),
        ("--rl.temperature 0", "identical", "use a temperature > 0"),
        2,
    ),
    Case(
        "happy_bad_bool",
        happy_case("--rl.algo", "dpo", "--rl.average_logprobs", "maybe"),
        ("expected true or false",),
        2,
    ),
    # happy: devices, checked by the shared setup as TL;DR's are (exit 1)
    Case(
        "happy_rl_batch_devices",
        happy_case("--rl.batch_size", "12"),
        ("--rl.batch_size 12 not divisible by the 8 devices", "use multiples of 8"),
    ),
    Case(
        "happy_fsdp_devices",
        happy_case("--mesh-fsdp", "3"),
        ("--mesh-fsdp 3 does not divide the 8 devices", "divisor of 8"),
    ),
    # happy: --out, before the data is read
    *(
        Case(
            f"happy_{flag[2:].replace('.', '_')}_inf",
            happy_case(flag, "inf"),
            (f"argument {flag}: 'inf' is not finite", "use a finite number"),
            2,
        )
        for flag in ("--rl.optim.lr", "--rl.kl_target", "--rl.clip_eps")
    ),
    Case("happy_out_is_file", _out_case("file", "happy"), ("--out", "out.txt is a file", "pass a directory")),
    Case("happy_out_under_file", _out_case("under_file", "happy"), ("a_file, which is a file", "outside it")),
    Case("happy_out_read_only", _out_case("read_only", "happy"), ("locked is read-only", "you can write to")),
    Case("happy_out_empty", _empty_out_case("happy"), ("--out ''", "name a run directory"), 2),
    # happy: the csv files, file:line and field
    Case(
        "happy_truncated_row",
        happy_case(data=_train_csv(lambda p: edit_line(p, 50, "abc123,a cut row\n"))),
        ("train.csv:50: 2 fields where the header", "has 4", "truncated"),
    ),
    Case(
        "happy_unbalanced_quote",
        happy_case(data=_train_csv(lambda p: edit_line(p, 60, 'x1,"open text,sel,neutral\n'))),
        ("train.csv:60: an unbalanced quote", "doubling the quotes"),
    ),
    Case(
        "happy_renamed_column",
        happy_case(data=_train_csv(lambda p: edit_line(p, 1, "textID,text,selected_text,label\n"))),
        ("train.csv:1: no 'sentiment' column", "label", "expected the columns textID,text,sentiment"),
    ),
    Case(
        "happy_unknown_label",
        happy_case(data=_train_csv(lambda p: edit_line(p, 40, "x1,so good,good,happy\n"))),
        ("train.csv:40: sentiment 'happy'", "negative, neutral, positive"),
    ),
    Case(
        "happy_utf16",
        happy_case(data=_train_csv(lambda p: p.write_bytes(p.read_text().encode("utf-16")))),
        ("train.csv is UTF-16", "save it as UTF-8"),
    ),
    Case(
        "happy_latin1",
        happy_case(
            data=lambda i: i.tweets(
                lambda p: p.write_bytes(
                    p.read_bytes() + "x9,caf\u00e9 at noon,caf\u00e9,positive\n".encode("latin-1")
                ),
                file="test.csv",
            )
        ),
        ("test.csv:102: byte 0xe9 at column 7 is not UTF-8", "Latin-1", "save the file as UTF-8"),
    ),
    # happy: too little data for a batch, no row of the label SFT trains on
    Case(
        "happy_fewer_rows_than_batch",
        happy_case("--pretrain.batch_size", "256"),
        (
            "train.csv has 200 tweets with text",
            "fewer than one --pretrain.batch_size 256 batch",
            "lower --pretrain.batch_size",
        ),
    ),
    Case(
        "happy_no_positive_tweets",
        happy_case(data=_train_csv(_only(("negative", "neutral")))),
        ("train.csv has 0 positive tweets", "--sft.batch_size 16 batch for SFT"),
    ),
    # happy: the default data cache under a HOME that cannot be written, before anything under --out
    Case(
        "happy_unwritable_home_cache",
        _unwritable_home,
        (
            "cannot write the data cache",
            "/.cache/jaxrlhf (the default ~/.cache/jaxrlhf)",
            "set JAXRLHF_CACHE_DIR (or pass --data.cache_dir) to a directory you can write to",
        ),
    ),
    # SST-2: train.tsv labels, file:line; one class only is refused before SFT trains
    Case(
        "sst2_label_outside_classes",
        sst2_case(fault=lambda p: edit_line(p, 40, "so good\t2\n")),
        ("train.tsv:40: label '2' is not 0 (negative) or 1 (positive)", "fix or drop the row"),
    ),
    Case(
        "sst2_label_word",
        sst2_case(fault=lambda p: edit_line(p, 41, "so good \tpos\n")),
        ("train.tsv:41: label 'pos' is not 0 (negative) or 1 (positive)",),
    ),
    Case(
        "sst2_only_positive",
        sst2_case(fault=_sst2_only("1")),
        (
            "train.tsv: every label of its",
            "sentences is 1 (positive), none is 0",
            "the reward model needs both classes: add negative sentences",
        ),
    ),
    Case(
        "sst2_only_negative_in_max_rows",
        sst2_case("--data.max_rows", "8", fault=_sst2_negative_first),
        (
            "train.tsv: every label of its first 8 sentences (--data.max_rows 8) is 0 (negative)",
            "raise --data.max_rows or add positive sentences",
        ),
    ),
    # TL;DR: flags, exit 2
    Case("tldr_sft_steps", tldr_case("--sft.steps", "0"), ("--sft.steps 0", "it must be >= 1"), 2),
    Case(
        "tldr_summary_tokens",
        tldr_case("--data.max_summary_tokens", "1"),
        ("--data.max_summary_tokens 1", "use >= 2"),
        2,
    ),
    Case("tldr_stop_after", tldr_case("--stop-after", "rl"), ("--stop-after 'rl'", "use STAGE:N"), 2),
    Case(
        "tldr_temperature",
        tldr_case("--rl.temperature", "-1"),
        ("--rl.temperature -1.0", "finite value >= 0"),
        2,
    ),
    Case(
        "tldr_optim_warmup",
        tldr_case("--sft.optim.warmup_steps", "-1"),
        ("--sft.optim.warmup_steps -1", ">= 0"),
        2,
    ),
    Case("tldr_rl_epochs", tldr_case("--rl.epochs", "0"), ("--rl.epochs 0", "it must be >= 1"), 2),
    Case(
        "tldr_n_layer_with_weights",
        tldr_case("--model", "gpt2", "--n-layer", "3"),
        ("--n-layer acts for a random init only", "drop it"),
        2,
    ),
    # TL;DR: devices, --out, tokenizer files (exit 1, one line instead of a traceback)
    Case(
        "tldr_batch_devices",
        tldr_case("--sft.batch_size", "12"),
        ("--sft.batch_size 12 not divisible by the 8 devices", "use multiples of 8"),
    ),
    Case("tldr_out_is_file", _out_case("file", "tldr"), ("--out", "out.txt is a file", "pass a directory")),
    Case("tldr_out_empty", _empty_out_case("tldr"), ("--out ''", "name a run directory"), 2),
    Case(
        "tldr_tokenizer_vocab_alone",
        lambda i, mp: (tldr_main, tldr_args(i, tokenizer_dir=_cut_vocab_alone(i)), i.out),
        ("vocab.json has no merges.txt beside it", "copy the missing file"),
    ),
    # TL;DR: the jsonl files, file:line and field; the data against the flags
    Case(
        "tldr_bad_json_line",
        tldr_case(data=_tldr_file(_cut_json_line)),
        ("tldr_test_small.jsonl:5: not valid JSON", "one JSON object"),
    ),
    Case(
        "tldr_missing_field",
        tldr_case(data=_tldr_file(_drop_title)),
        ("tldr_test_small.jsonl:7: no field 'title'", "dove", "instruction_id, subreddit, title"),
    ),
    Case(
        "tldr_null_summary",
        tldr_case(data=_tldr_file(_null_summary)),
        ("tldr_test_small.jsonl:9: field 'gold_response' is null", "expected a string"),
    ),
    Case(
        "tldr_all_empty_summaries",
        tldr_case(data=_tldr_file(_blank_summaries)),
        ("every reference summary of the test split of", "tldr_test_small.jsonl", "is empty"),
    ),
    Case(
        "tldr_prompt_budget",
        tldr_case("--data.max_prompt_tokens", "4"),
        ("--data.max_prompt_tokens 4 is too small", "not one of the 32 prompts", "raise it"),
    ),
    Case(
        "tldr_fewer_rows_than_batch",
        tldr_case("--sft.batch_size", "64"),
        ("tldr_test_small.jsonl has", "usable rows", "fewer than one --sft.batch_size 64 batch"),
    ),
    Case(
        "tldr_sft_entry_bad_json",
        tldr_case("--stages", "sft", data=_tldr_file(_cut_json_line), main=tldr_main),
        ("tldr_test_small.jsonl:5: not valid JSON",),
    ),
]


@pytest.mark.parametrize("case", PIPELINE_CASES, ids=lambda c: c.name)
def test_pipeline_refuses_in_one_line_and_writes_nothing(case, tmp_path, shared_data, tweets_dir, tldr_dir,
                                                         sst2_dir, capsys, monkeypatch):  # fmt: skip
    inputs = Inputs(tmp_path, shared_data, tweets_dir, tldr_dir, sst2_dir)
    main, argv, out = case.build(inputs, monkeypatch)
    before, everything_before = tree_hash(out), tree_hash(tmp_path, skip=("cache", "tmp"))
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == case.code, err
    assert len(err) == 1, err
    assert "error:" in err[0] and all(s in err[0] for s in case.expect), err[0]
    assert tree_hash(out) == before, "the refused run changed --out"
    # Nor anything else but the prepared data (TFDS leaves an empty tmp*tfds folder in the temp dir when it
    # prepares): nothing beside --out, no temporary copy of the TL;DR tokenizer.
    assert tree_hash(tmp_path, skip=("cache", "tmp")) == everything_before
    assert not list((tmp_path / "tmp").glob("tldr_tokenizer_*"))


# ---------------------------------------------------------------------------------- library table

TINY = ModelConfig(vocab_size=11, block_size=12, n_layer=2, n_head=2, n_embd=16)


def _shapes(init):
    """The params `init(key, TINY)` makes, as shapes: the checks read nothing else."""
    return jax.eval_shape(functools.partial(init, cfg=TINY), jax.random.key(0))


def _sample(prompt, mask, **sample_kw):
    def call(tmp):
        cfg = SampleConfig(max_new_tokens=4, **sample_kw)
        ids, prompt_mask = (
            jnp.asarray(prompt, jnp.int32).reshape(-1, 2),
            jnp.asarray(mask, bool).reshape(-1, 2),
        )
        return sampler.sample(_shapes(models.init_params), ids, prompt_mask, TINY, cfg, key=jax.random.key(0))

    return call


def _reward(**cfg_changes):
    return lambda tmp: scoring.make_learned_reward(
        _shapes(models.init_scalar_model), dataclasses.replace(TINY, **cfg_changes)
    )


def _lm_as_reward(tmp):
    return scoring.make_learned_reward(_shapes(models.init_params), TINY)


def _bpe(shared: pathlib.Path, tmp: pathlib.Path, vocab=None, merges=None) -> pathlib.Path:
    """A copy of the GPT-2 tokenizer files, each optionally rewritten by a text -> text function."""
    folder = tmp / "bpe"
    folder.mkdir(exist_ok=True)
    for name, change in (("vocab.json", vocab), ("merges.txt", merges)):
        text = (shared / "gpt2_tokenizer" / name).read_text(encoding="utf-8")
        (folder / name).write_text(change(text) if change else text, encoding="utf-8")
    return folder


def _tokenizer(**changes):
    return lambda tmp, shared: GPT2Tokenizer.from_dir(_bpe(shared, tmp, **changes))


def _hf_dir(tmp: pathlib.Path) -> pathlib.Path:
    """A tiny GPT-2 checkpoint (zero weights: only the files matter here)."""
    params = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), _shapes(models.init_params))
    hf.save(params, TINY, tmp / "hf")
    return tmp / "hf"


def _truncated_safetensors(tmp, shared):
    folder = _hf_dir(tmp)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    return hf.load(folder)


def _corrupt_config(tmp, shared):
    folder = _hf_dir(tmp)
    (folder / "config.json").write_text((folder / "config.json").read_text()[:40])
    return hf.load(folder)


def _sharded_hf_dir(tmp: pathlib.Path, single_beside: bool) -> pathlib.Path:
    """A tiny GPT-2 checkpoint in 12 shards + an index, the second shard gone; optionally with a whole
    model.safetensors beside the index."""
    params = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), _shapes(models.init_params))
    hf.save(params, TINY, tmp / "hf", max_shard_bytes=2000)
    (tmp / "hf" / "model-00002-of-00012.safetensors").unlink()
    if single_beside:
        shutil.copy(_hf_dir(tmp / "whole") / "model.safetensors", tmp / "hf")
    return hf.load(tmp / "hf")


def _nan_weight(tmp, shared):
    """One NaN in a block's MLP weight, as a diverged run would save."""
    import safetensors.numpy  # noqa: PLC0415

    path = _hf_dir(tmp) / "model.safetensors"
    tensors = safetensors.numpy.load_file(path)
    tensors["transformer.h.1.mlp.c_fc.weight"][3, 5] = np.nan
    safetensors.numpy.save_file(tensors, path, metadata={"format": "pt"})
    return hf.load(path.parent)


def _cache_under_file(tmp, shared):
    return load_sst2("validation", shared / "sst2", cache_dir=_make_file(tmp / "a_file") / "cache")


def _lib(fn):  # a library case's call taking only tmp_path
    return lambda tmp, shared: fn(tmp)


def _cut_lines(n):
    return lambda text: "".join(text.splitlines(keepends=True)[:n])


LIBRARY_CASES = [
    Case(
        "sample_prompt_outside_vocab",
        _lib(_sample([[3, 11]], [[True, True]])),
        (
            "prompt ids [11] are outside the vocabulary [0, 11)",
            "encode the prompts with the model's tokenizer",
        ),
    ),
    Case(
        "sample_eos_outside_vocab",
        _lib(_sample([[3, 4]], [[True, True]], eos_id=11)),
        ("eos_id=11 is outside the vocabulary [0, 11)", "never stop", "use the tokenizer's id"),
    ),
    Case(
        "sample_empty_batch",
        _lib(_sample([], [])),
        ("the prompt batch is empty (B = 0)", "at least one prompt row"),
    ),
    Case(
        "reward_n_embd", _lib(_reward(n_embd=32)), ("cfg.n_embd=32 does not match", "16 wide", "the config")
    ),
    Case("reward_vocab", _lib(_reward(vocab_size=50)), ("cfg.vocab_size=50", "wte has 11 rows")),
    Case("reward_n_layer", _lib(_reward(n_layer=3)), ("cfg.n_layer=3", "they stack 2 blocks")),
    Case(
        "reward_lm_params", _lib(_lm_as_reward), ("LM (GPT) params without a scalar head", "init_scalar_head")
    ),
    Case(
        "merges_cut_at_a_line",
        _tokenizer(merges=_cut_lines(30001)),
        ("merges.txt: 30000 merges, but 20000 tokens of", "cut short", "copy it again"),
    ),
    Case(
        "merges_cut_mid_line",
        _tokenizer(merges=lambda text: text[: len(text) // 2]),
        ("merges.txt:", "cut", "copy"),
    ),
    Case(
        "vocab_truncated",
        _tokenizer(vocab=lambda text: text[: len(text) // 3]),
        ("vocab.json: not a JSON vocabulary", "truncated or corrupt"),
    ),
    Case(
        "tokenizer_vocab_alone",
        lambda tmp, shared: GPT2Tokenizer.from_dir(_cut_vocab_alone(Inputs(tmp, shared, tmp, tmp))),
        ("vocab.json has no merges.txt beside it",),
    ),
    Case(
        "hf_truncated_safetensors",
        _truncated_safetensors,
        ("model.safetensors: not a readable safetensors file", "truncated or corrupt"),
    ),
    Case("hf_corrupt_config_json", _corrupt_config, ("config.json: not valid JSON", "truncated or corrupt")),
    Case(
        "hf_index_names_a_missing_shard",
        _lib(lambda tmp: _sharded_hf_dir(tmp, single_beside=False)),
        (
            "model.safetensors.index.json names the shard model-00002-of-00012.safetensors, missing from",
            "; copy the missing shard",
        ),
        error=FileNotFoundError,
    ),  # fmt: skip
    Case(
        "hf_index_missing_shard_single_file_beside",
        _lib(lambda tmp: _sharded_hf_dir(tmp, single_beside=True)),
        (
            "names the shard model-00002-of-00012.safetensors",
            "model.safetensors lies beside it: remove the index to load that file instead",
        ),
        error=FileNotFoundError,
    ),  # fmt: skip
    Case(
        "hf_nan_weight",
        _nan_weight,
        (
            "model.safetensors: tensor 'transformer.h.1.mlp.c_fc.weight' holds NaN or inf",
            "(1 of its 1024 values)",
            "use another checkpoint",
        ),
    ),  # fmt: skip
    Case(
        "data_cache_dir_not_writable",
        _cache_under_file,
        (
            "cannot write the data cache",
            "a_file/cache (--data.cache_dir): Not a directory",
            "pass a --data.cache_dir you can write to",
        ),
    ),  # fmt: skip
]


@pytest.mark.parametrize("case", LIBRARY_CASES, ids=lambda c: c.name)
def test_library_refuses_in_one_line(case, tmp_path, shared_data):
    with pytest.raises(case.error) as err:
        case.build(tmp_path, shared_data)
    message = str(err.value)
    assert "\n" not in message and all(s in message for s in case.expect), message


# ------------------------------------------------------------------------------ what must still load


def test_csv_with_excel_bom_and_crlf_loads_as_the_plain_file(tweets_dir, tmp_path):
    excel = tmp_path / "excel"
    excel.mkdir()
    for name in ("train.csv", "test.csv"):
        text = (tweets_dir / name).read_text(encoding="utf-8")
        (excel / name).write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode("utf-8"))
    assert load_tweets("train", excel) == load_tweets("train", tweets_dir)
    assert len(tweets.read_csv(excel / "test.csv")) == 100


def test_optional_flags_can_be_set_back_to_none():
    cfg = parse_args(happy.RECIPE, ["--rl.kl_target", "none"])
    assert cfg.rl.rl.kl_target is None
    cfg = parse_args(happy.RECIPE, ["--rl.kl_target", "6"])
    assert cfg.rl.rl.kl_target == 6.0
    tldr = parse_args(tldr_recipe.RECIPE, ["--rl.kl_target", "none", "--rl.value_lr", "None"])
    assert tldr.rl.rl.kl_target is None and tldr.rl.value_lr is None


@pytest.mark.parametrize("pipeline", ["happy", "tldr"])
def test_an_out_path_too_long_is_refused_in_one_line(pipeline, tmp_path, shared_data, tweets_dir, tldr_dir,
                                                     capsys):  # fmt: skip
    inputs = Inputs(tmp_path, shared_data, tweets_dir, tldr_dir)
    args = happy_args(inputs) if pipeline == "happy" else tldr_args(inputs)
    args[args.index("--out") + 1] = str(tmp_path / ("x" * 300) / "run")  # a name over NAME_MAX (255)
    everything_before = tree_hash(tmp_path, skip=("cache", "tmp"))
    capsys.readouterr()
    code = (happy.main if pipeline == "happy" else tldr_main)(args)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith("error: --out ") and "too long for the file system" in err[0], err[0]
    assert "use a shorter --out" in err[0], err[0]
    assert tree_hash(tmp_path, skip=("cache", "tmp")) == everything_before


def test_a_full_disk_during_a_save_is_one_line(tmp_path, shared_data, tweets_dir, tldr_dir, capsys,
                                               monkeypatch):  # fmt: skip
    """ENOSPC while a checkpoint is written: one line naming --out and what to do, exit code 1, no
    traceback."""
    from jaxrlhf.engine import checkpoint  # noqa: PLC0415

    def full(run_dir, stage, step, *args, **kwargs):
        where = pathlib.Path(run_dir) / stage / str(step)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(where))

    monkeypatch.setattr(checkpoint, "save", full)
    inputs = Inputs(tmp_path, shared_data, tweets_dir, tldr_dir)
    args = happy_args(
        inputs, "--pretrain.steps", "2", "--pretrain.ckpt_every", "1", "--pretrain.eval_rows", "16"
    )
    capsys.readouterr()
    code = happy.main(args)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith(f"error: no space left on the device of --out {inputs.out} ("), err[0]
    assert "free space and rerun with --resume" in err[0], err[0]


def test_output_dir_check_creates_nothing(tmp_path):
    outdir.check_output_dir(tmp_path / "a" / "b")  # a new folder two levels down is fine
    assert not (tmp_path / "a").exists()


# -------------------------------------------------------------------- preference stages without pairs


def test_a_selection_without_pairs_is_counted_in_its_metrics():
    ids = np.array([[1, 2], [3, 4], [5, 6], [5, 6]])
    mask = np.ones_like(ids, bool)
    tied = pairs_lib.select_pairs(ids, mask, np.zeros(4, np.float32), 2)
    assert tied.metrics()["no_pairs"] == 1.0 and tied.metrics()["skipped_tied"] == 1.0
    assert tied.metrics()["dropped_duplicate"] == 1.0  # prompt 1's answers are one answer twice
    told_apart = pairs_lib.select_pairs(ids, mask, np.array([0.0, 1.0, 0.0, 0.0], np.float32), 2)
    assert told_apart.metrics()["no_pairs"] == 0.0 and told_apart.num_pairs == 1


def test_a_pair_stage_where_no_iteration_had_pairs_fails(tmp_path):
    cfg = parse_args(happy.RECIPE, ["--rl.algo", "rebel"]).rl.rl  # 4 answers per prompt
    metrics = tmp_path / "rl.jsonl"
    some = [{"step": 1, "no_pairs": 1.0, "skipped_tied": 4.0}, {"step": 2, "no_pairs": 0.0, "pairs": 3.0}]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in some))
    result = loop.StageResult(state=None, history=some, summary={})
    preference.check_pairs(cfg, result, metrics)  # one iteration learned: the stage stands
    assert result.summary["no_pair_iterations"] == 1
    none = [{"step": i, "no_pairs": 1.0, "skipped_tied": 4.0} for i in (1, 2, 3)]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in none))
    with pytest.raises(preference.NoPairsError) as err:
        preference.check_pairs(cfg, loop.StageResult(state=None, history=none, summary={}), metrics)
    message = str(err.value)
    assert "\n" not in message and "none of the 3 rebel iterations had a pair" in message
    assert "raise --rl.group_size or --rl.temperature" in message
