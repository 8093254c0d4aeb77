"""Ctrl-C (SIGINT) outside a step loop, and a damaged shard of a finished data stage.

Ctrl-C in TFDS data preparation (HappyGPT's tweets, in this process) and in the UltraFeedback generate
stage's shard loop (a subprocess) stops the run with one line and exit code 130, leaves only whole files,
and `--resume` continues; a Ctrl-C that Python dropped where it arrived (raised inside a garbage-collector
callback, where Python only prints "Exception ignored") still stops the run at its next boundary, silently
but for that line. A truncated shard of a finished generate stage is one line naming it and the way out;
following it literally rewrites exactly that shard, with the same arrays, and the run finishes.
"""

from __future__ import annotations

import gc
import os
import pathlib
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
from test_faults import tweets  # noqa: F401  (a fixture)
from test_ultrafeedback_experiments import _args, base_dir  # noqa: F401  (base_dir: a fixture)

from jaxrlhf import happy
from jaxrlhf.data import tweets as tweets_data

REPO = pathlib.Path(__file__).resolve().parents[1]


def error_lines(err: str) -> list[str]:
    """stderr's lines without TFDS's progress bars (drawn with carriage returns, whatever --progress)."""
    lines = [x.strip() for x in re.split(r"[\r\n]", err)]
    return [x for x in lines if x and not re.search(r"examples/s|splits/s|\x1b\[A", x)]


# ----------------------------------------------------------------------------------- data preparation


@pytest.mark.parametrize("dropped", [False, True], ids=["raised", "dropped_in_gc_callback"])
def test_ctrl_c_in_data_preparation(dropped, tweets, tmp_path, capsys, monkeypatch):  # noqa: F811
    """A real SIGINT in the middle of TFDS writing the tweets' train split (inside HappyGPT's setup)."""
    monkeypatch.setenv("JAXRLHF_CACHE_DIR", str(tmp_path / "cache"))  # nothing prepared yet
    monkeypatch.setenv("JAXRLHF_DATA_DIR", "")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    generate = tweets_data.TweetsBuilder._generate_examples

    def ctrl_c_in_gc(phase, info):  # the signal handler then runs inside the callback
        gc.callbacks.remove(ctrl_c_in_gc)
        signal.raise_signal(signal.SIGINT)

    def examples(self, rows):
        for i, example in enumerate(generate(self, rows)):
            if i == 5 and len(rows) > 300:  # the train split
                if dropped:
                    gc.callbacks.append(ctrl_c_in_gc)
                    gc.collect()
                else:
                    signal.raise_signal(signal.SIGINT)
            yield example

    monkeypatch.setattr(tweets_data.TweetsBuilder, "_generate_examples", examples)
    handler = signal.getsignal(signal.SIGINT)
    out = tmp_path / "out"
    args = ["--quick", "--progress", "false", "--compile-cache", "", "--data.data_dir", str(tweets / "a")]
    code = happy.main([*args, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 130 and "Traceback" not in err and "Exception ignored" not in err, err
    assert error_lines(err) == [
        "SIGINT: stopped happy before its first stage (setup, data preparation); rerun with --resume to "
        "continue (exit code 130)"
    ], err
    assert signal.getsignal(signal.SIGINT) is handler  # Ctrl-C is Python's again
    assert not out.exists() or not list(out.iterdir())  # nothing written under --out
    # TFDS wrote into an incomplete.* folder and removed it: no half-prepared data set is left (the dropped
    # Ctrl-C let the preparation finish, whole, before the run stopped).
    prepared = sorted(p.name for p in (tmp_path / "cache" / "tfds").glob("*/jaxrlhf_tweets/*"))
    assert prepared == (["1.0.0"] if dropped else []), prepared


# ----------------------------------------------------------------------------------- UltraFeedback

# `python -m experiments.ultrafeedback` with a Ctrl-C (a real SIGINT) right after generate's shard 0 is
# written, i.e. while shard 1 is sampled.
CTRL_C_AFTER_SHARD_0 = """
import runpy, signal, sys
from jaxrlhf.stages import online
write = online.write_npz
def write_then_ctrl_c(path, arrays):
    write(path, arrays)
    if path.name == "shard_00000.npz":
        signal.raise_signal(signal.SIGINT)
online.write_npz = write_then_ctrl_c
sys.argv[0] = "experiments.ultrafeedback"
runpy.run_module("experiments.ultrafeedback", run_name="__main__", alter_sys=True)
"""


def uf_args(base: pathlib.Path, shared_data: pathlib.Path, out: pathlib.Path, tmp: pathlib.Path) -> list[str]:
    """The UltraFeedback test's tiny flags for --stages generate,score (vader: no reward model), over the
    data the base model's fixture prepared; 16 prompts x 4 answers in 2 shards of 8 prompts."""
    args = _args(base, shared_data, out, tmp)
    pairs = dict(zip(args[::2], args[1::2], strict=True))
    pairs = {k: v for k, v in pairs.items() if not k.startswith(("--rm.", "--rebel.", "--score."))}
    pairs.update({"--data.cache_dir": str(base.parent / "cache"), "--score.reward": "vader",
                  "--iterations": "1", "--compile-cache": str(tmp / "xla")})  # fmt: skip
    return [x for kv in pairs.items() for x in kv]


def run_uf(args: list[str], code: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": "1", "HF_HUB_OFFLINE": "1", "JAXRLHF_DATA_DIR": "",
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}  # fmt: skip
    command = ["-c", code] if code else ["-m", "experiments.ultrafeedback"]
    return subprocess.run([sys.executable, *command, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip


def arrays(path: pathlib.Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


@pytest.mark.filterwarnings("ignore")
def test_ultrafeedback_ctrl_c_in_generate_then_a_damaged_shard_rewritten(
    base_dir,  # noqa: F811
    shared_data,
    tmp_path,
):
    out = tmp_path / "out"
    gen = out / "iter_1" / "generate"
    args = uf_args(base_dir, shared_data, out, tmp_path)
    # 1. Ctrl-C while shard 1 is sampled: shard 0 is kept whole, one line, exit code 130.
    proc = run_uf([*args, "--stages", "generate"], CTRL_C_AFTER_SHARD_0)
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert proc.stderr.splitlines() == [
        f"SIGINT: stopped {gen} at shard 1 of 2 (the shards written are whole); rerun with --resume to "
        "continue (exit code 130)"
    ], proc.stderr
    assert sorted(p.name for p in gen.iterdir()) == ["meta.json", "shard_00000.jsonl", "shard_00000.npz"]
    assert not (out / "iter_1" / "generate.json").exists()
    shard0 = (gen / "shard_00000.npz").read_bytes()
    # ... and --resume writes shard 1 and finishes the stage.
    proc = run_uf([*args, "--stages", "generate", "--resume"])
    assert proc.returncode == 0 and "generate_1: {" in proc.stderr, proc.stderr[-3000:]
    assert (gen / "shard_00000.npz").read_bytes() == shard0  # kept as it was
    original = {name: arrays(gen / name) for name in ("shard_00000.npz", "shard_00001.npz")}
    texts = (gen / "shard_00000.jsonl").read_bytes()
    shard1 = (gen / "shard_00001.npz").read_bytes()

    # 2. A truncated shard of the finished generate stage: the next stage says which and what to do.
    (gen / "shard_00000.npz").write_bytes(shard0[: len(shard0) // 2])
    resume = [*args, "--stages", "generate,score", "--resume"]
    proc = run_uf(resume)
    summary = out / "iter_1" / "generate.json"
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.splitlines()[-1] == (
        f"error: {gen / 'shard_00000.npz'} is not a readable .npz: delete it and {summary} (the stage's "
        "summary), then rerun with --resume: the stage writes that shard again from the same key and keeps "
        "the others"
    ), proc.stderr
    assert "Traceback" not in proc.stderr
    # Followed literally, the same command rewrites exactly that shard, with the same arrays, and finishes.
    (gen / "shard_00000.npz").unlink()
    summary.unlink()
    proc = run_uf(resume)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "score_1: {" in proc.stderr and "generate_1: finished earlier" not in proc.stderr, proc.stderr
    assert (gen / "shard_00001.npz").read_bytes() == shard1  # kept, not rewritten
    assert (gen / "shard_00000.jsonl").read_bytes() == texts
    rewritten = arrays(gen / "shard_00000.npz")
    assert rewritten.keys() == original["shard_00000.npz"].keys()
    for key, value in original["shard_00000.npz"].items():
        assert rewritten[key].dtype == value.dtype, key
        np.testing.assert_array_equal(rewritten[key], value, err_msg=key)
    assert summary.exists() and (out / "iter_1" / "score.json").exists()
