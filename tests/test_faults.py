"""Faults: a refused run writes nothing, `--resume` on a finished run changes nothing, one run per
`--out`, another pipeline's run is not resumed, a damaged checkpoint is refused or fallen back past,
SIGTERM and SIGINT save and resume bitwise, and metrics reach gs:// through epath.

One table, `CASES`: each case starts from a copy of one finished run built once per module, may break
it (`setup`), runs the command in this process (`act`) and checks the one line that the command printed
or raised (what is wrong and what to do); where the issue demands it, the `--out` tree is byte-identical
afterwards. The happy and TL;DR runs are made of their pipelines' own stage metas with tiny states: the
refusals and the no-op read only metas, so nothing is trained (tests/test_happy.py checks the no-op on a
run that really trained). The damaged-checkpoint and SIGTERM cases use a tiny stage in loop.run_stage.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.tldr import recipe as tldr_recipe
from jaxrlhf import happy
from jaxrlhf.engine import checkpoint, flags, loop, outdir
from jaxrlhf.stages import instructgpt
from jaxrlhf.stages import recipe as stage_recipe

# ------------------------------------------------------------------------------------------- helpers


def tree(root: pathlib.Path) -> dict[str, str | None]:
    """Every path under `root`: sha256 of each file, None for each directory."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
        for p in sorted(root.rglob("*"))
    }


def last_line(text: str) -> str:
    lines = [x for x in text.strip().splitlines() if x.strip()]
    return lines[-1] if lines else ""


def write_lock(out: pathlib.Path, pid: int) -> None:
    info = {"pid": pid, "host": socket.gethostname(), "started": "2026-01-01T00:00:00+00:00"}
    (out / outdir.LOCK_FILE).write_text(json.dumps(info))


def parse_args(recipe, argv):
    """A recipe's config from a command line, as its command parses it."""
    return flags.parse_checked(recipe.defaults, argv, check=recipe.check, inactive=recipe.inactive,
                               renamed=recipe.renamed, adjust=recipe.adjust)  # fmt: skip


def write_run_file(out: pathlib.Path, recipe, cfg) -> None:
    """<out>/run.json as the recipe's command writes it: the pipeline's name and its flags."""
    record = {"pipeline": recipe.name, "flags": flags.config_json(cfg)}
    (out / stage_recipe.RUN_FILE).write_text(json.dumps(record, indent=2) + "\n")


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()  # exited and reaped: no process has this pid now
    return proc.pid


# ------------------------------------------------------------------------------ a tiny stage, in-process

N_STEPS, EVERY = 12, 3  # checkpoints at 3, 6, 9, 12; keep=2 leaves 9 and 12


@jax.jit
def _update(w, key):
    return w * 0.9 + 0.1 * jax.random.normal(key, w.shape)


def run_tiny(out, *, resume=False, sigterm_at=None, stop_signal=signal.SIGTERM):
    """12 steps of a jitted update of a [64] float32 state, checkpointed every 3 steps; the final state.
    `stop_signal` (SIGTERM, or SIGINT as Ctrl-C sends it) arrives in the middle of step `sigterm_at`."""

    def step_fn(state, i, key):
        if i == sigterm_at:
            os.kill(os.getpid(), stop_signal)
        w = _update(state["w"], key)
        return {"w": w, "step": state["step"] + 1}, {"mean": jnp.mean(w)}

    state = {"w": jnp.zeros(64, jnp.float32), "step": jnp.int32(0)}
    result = loop.run_stage(
        run_dir=out,
        stage="s",
        state=state,
        step_fn=step_fn,
        n_steps=N_STEPS,
        root_key=jax.random.key(3),
        resume=resume,
        meta={"config": {"width": 64}},
        ckpt_every=EVERY,
        progress=False,
    )
    return np.asarray(result.state["w"])


def largest_file(folder: pathlib.Path) -> pathlib.Path:
    return max(
        (p for p in folder.rglob("*") if p.is_file() and p.parent.name == "d"), key=lambda p: p.stat().st_size
    )


def truncate(path: pathlib.Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_byte(path: pathlib.Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


# Damage to one step directory -> the words that name it in the one-line message.
DAMAGE: dict[str, tuple[Callable[[pathlib.Path], None], str]] = {
    "truncated_tensor_file": (
        lambda step: truncate(largest_file(step / "state")),
        r"state/\S+/d/\w+ is \d+ bytes, \d+ when saved \(truncated or overwritten\)",
    ),
    "empty_manifest": (
        lambda step: (step / "state" / "manifest.ocdbt").write_bytes(b""),
        r"state/manifest\.ocdbt is 0 bytes, \d+ when saved",
    ),
    "broken_meta_json": (
        lambda step: truncate(step / "meta" / "metadata"),
        r"meta/metadata is \d+ bytes, \d+ when saved",
    ),
    "flipped_byte": (
        lambda step: flip_byte(largest_file(step / "state")),
        r"state/\S+ differs from what was saved \(sha256 mismatch",
    ),
    "missing_checksums": (
        lambda step: (step / "checksums.json").unlink(),
        r"it has no checksums\.json although the older steps have one: its save did not finish",
    ),
}


# ---------------------------------------------------------------------------------- finished runs


@pytest.fixture(scope="module")
def module_env(tmp_path_factory):
    """Prepared data and caches under the module's temporary folder, not the user's home."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JAXRLHF_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        mp.setenv("JAXRLHF_DATA_DIR", "")
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "out"
    final = run_tiny(out)
    return out, final


@pytest.fixture(scope="module")
def tweets(tmp_path_factory, shared_data):
    """Two small tweet folders: `a` (400 + 100 rows of the shared data) and `b`, with one more
    character in a training tweet (so the tokenizer differs)."""
    root = tmp_path_factory.mktemp("tweets")
    train = (shared_data / "tweets" / "train.csv").read_text().splitlines()[:401]
    test = (shared_data / "tweets" / "test.csv").read_text().splitlines()[:101]
    for name, extra in (("a", []), ("b", ["zzzzzzzzzz,a tweet with an Ω,Ω,positive"])):
        (root / name).mkdir()
        (root / name / "train.csv").write_text("\n".join(train + extra) + "\n")
        (root / name / "test.csv").write_text("\n".join(test) + "\n")
    return root


def happy_args(out, data_dir, *extra):
    return [
        "--quick",
        "--progress",
        "false",
        "--compile-cache",
        "",
        "--data.data_dir",
        str(data_dir),
        "--out",
        str(out),
        *extra,
    ]


@pytest.fixture(scope="module")
def happy_run(tmp_path_factory, tweets, module_env):
    """What a finished `python -m jaxrlhf.happy --quick` leaves, its checkpoints carrying happy's own
    stage metas (tiny states: nothing here restores them)."""
    out = tmp_path_factory.mktemp("happy") / "out"
    out.mkdir()
    cfg = parse_args(happy.RECIPE, happy_args(out, tweets / "a"))
    setup = happy.make_setup(cfg)  # the tweets' tokenizer, as the run builds it
    (out / "tokenizer.json").write_text(setup.tokenizer.to_text())
    setup.close()
    write_run_file(out, happy.RECIPE, cfg)
    for stage in happy.stage_names(cfg):
        meta, steps = happy.RECIPE.stage_meta(cfg, stage), happy.steps(cfg, stage)
        for step in (steps // 2, steps):
            state = {"w": np.full(3, step, np.float32)}
            checkpoint.save(
                out, stage, step, state, meta={**meta, "step": step}, tokenizer=out / "tokenizer.json"
            )
        (out / f"{stage}.jsonl").write_text(
            json.dumps({"step": steps, "reward": 0.5, "kl_per_token": 0.1}) + "\n"
        )
        (out / f"{stage}_summary.json").write_text(json.dumps({"stage": stage, "steps": steps}) + "\n")
        (out / f"{stage}.png").write_bytes(b"\x89PNG")
    (out / "samples.txt").write_text("# after RL\nhappy tweet\n")
    (out / "summary.json").write_text(json.dumps({"rl": {"reward_last10": 0.5}}))
    return out


def tldr_args(out, shared_data, *extra):
    """The tiny TL;DR run's flags: the stage lengths of the stages `--stages` (if given) names."""
    chosen = extra[extra.index("--stages") + 1].split(",") if "--stages" in extra else ["sft", "rm", "rl"]
    lengths = {"sft": ["--sft.steps", "4"], "rm": ["--rm.steps", "4"], "rl": ["--rl.iterations", "4"]}
    return [
        "--model", "tiny", "--out", str(out), "--progress", "false",
        "--data.data_dir", str(shared_data / "tldr"),
        "--data.tokenizer_dir", str(shared_data / "gpt2_tokenizer"),
        *(flag for stage in chosen for flag in lengths[stage]), *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def tldr_run(tmp_path_factory, shared_data, module_env):
    """What a finished `python -m experiments.tldr` leaves, with the stages' own metas."""
    out = tmp_path_factory.mktemp("tldr") / "out"
    cfg = parse_args(tldr_recipe.RECIPE, tldr_args(out, shared_data))
    for stage in instructgpt.STAGES:
        steps = instructgpt.steps(cfg, stage)
        meta = {**tldr_recipe.RECIPE.stage_meta(cfg, stage), "step": steps}
        if stage == "rm":
            meta["reward_norm"] = {"mean": 0.0, "std": 1.0, "rows": 8}
        checkpoint.save(out, stage, steps, {"w": np.zeros(2, np.float32)}, meta=meta)
        (out / f"{stage}.jsonl").write_text(json.dumps({"step": steps}) + "\n")
        (out / f"{stage}_summary.json").write_text("{}\n")
    (out / "rl_initial_eval.json").write_text('{"val_score": -0.4}\n')
    (out / "rl_samples.jsonl").write_text('{"iteration": 4}\n')
    write_run_file(out, tldr_recipe.RECIPE, cfg)
    return out


# ---------------------------------------------------------------------------------------- the table


@dataclasses.dataclass(frozen=True)
class Case:
    """run: the finished run the case starts from ("happy", "tldr", "tiny" or "empty").
    setup(out): breaks it; act(out, ctx) -> the one line to check; expect: a regex it must match;
    unchanged: the --out tree after equals the tree after setup, but for the paths in `gone`."""

    run: str
    act: Callable
    expect: str
    setup: Callable = lambda out: None
    unchanged: bool = True
    gone: tuple[str, ...] = ()


@dataclasses.dataclass
class Ctx:
    capsys: pytest.CaptureFixture
    tweets: pathlib.Path | None
    shared_data: pathlib.Path
    tiny_final: np.ndarray


def happy_main(out, ctx, *extra, data="a", rc=None):
    code = happy.main(happy_args(out, ctx.tweets / data, *extra))
    err = ctx.capsys.readouterr().err
    assert rc is None or code == rc, err[-2000:]
    return last_line(err)


def tldr_main(out, ctx, *extra, rc=None):
    """`python -m experiments.tldr` in this process: its last stderr line."""
    code = stage_recipe.main(tldr_recipe.RECIPE, tldr_args(out, ctx.shared_data, *extra))
    err = ctx.capsys.readouterr().err
    assert rc is None or code == rc, err[-2000:]
    return last_line(err)


def only_line(main, argv, ctx, rc):
    """Run `main(argv)`: exit code `rc` and exactly one stderr line, which it returns."""
    code = main(argv)
    err = ctx.capsys.readouterr().err
    assert code == rc and len(err.strip().splitlines()) == 1, err[-2000:]
    return err.strip()


def drop_checkpoints(out):
    """A finished happy run whose checkpoint folders were deleted: its outputs (summaries, metrics,
    samples, plots, run.json) remain."""
    for stage in ("pretrain", "sft", "rl", "rm"):
        shutil.rmtree(out / stage, ignore_errors=True)
    assert (out / "summary.json").exists() and not (out / "rl").exists()


def stale_lock_then_noop(out, ctx):
    err = (happy.main(happy_args(out, ctx.tweets / "a", "--resume")), ctx.capsys.readouterr().err)[1]
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert len(lines) == 2 and lines[1].startswith("nothing to do"), err
    return lines[0]


def fallback(out, ctx):
    final = run_tiny(out, resume=True)
    err = ctx.capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err  # one warning line, nothing else
    np.testing.assert_array_equal(final, ctx.tiny_final)  # continued from step 9, bitwise
    # The good step 9 is kept, the damaged 12 is set aside, and retention saw only good steps.
    assert sorted(p.name for p in (out / "s").iterdir()) == ["12", "12.damaged", "9"]
    assert checkpoint.all_steps(out, "s") == [9, 12]
    return last_line(err)


def restore_step_12(out, ctx):
    with pytest.raises(checkpoint.DamagedCheckpointError) as e:
        checkpoint.restore(out, "s", {"w": jnp.zeros(64, jnp.float32), "step": jnp.int32(0)}, step=12)
    return str(e.value)


def resume_tiny_error(out, ctx):
    with pytest.raises(checkpoint.DamagedCheckpointError) as e:
        run_tiny(out, resume=True)
    return str(e.value)


def sigterm_then_resume(out, ctx):
    with pytest.raises(SystemExit) as e:
        run_tiny(out, sigterm_at=7)  # the signal arrives in the middle of step 7
    assert e.value.code == 128 + signal.SIGTERM == 143
    line = last_line(ctx.capsys.readouterr().err)
    assert checkpoint.all_steps(out, "s") == [6, 8]  # saved at the step boundary after step 7
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone again
    np.testing.assert_array_equal(run_tiny(out, resume=True), ctx.tiny_final)  # bitwise, as after SIGKILL
    assert [r["step"] for r in loop.read_metrics(out / "s.jsonl")] == list(range(1, N_STEPS + 1))
    return line


NOOP = r"^nothing to do: \S+ holds a finished {} run .* left as it is\. Use a fresh --out to run again\.$"
NOT_EMPTY = r"^error: --out \S+ is not empty \(it holds [^)]+\): pass --resume to continue the run there"


def sigint_then_resume(out, ctx):
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit) as e:
        run_tiny(out, sigterm_at=7, stop_signal=signal.SIGINT)  # Ctrl-C in the middle of step 7
    assert e.value.code == 128 + signal.SIGINT == 130
    line = last_line(ctx.capsys.readouterr().err)
    assert checkpoint.all_steps(out, "s") == [6, 8]  # saved at the step boundary after step 7, as SIGTERM
    assert signal.getsignal(signal.SIGINT) is handler  # Ctrl-C is Python's again
    np.testing.assert_array_equal(run_tiny(out, resume=True), ctx.tiny_final)
    assert [r["step"] for r in loop.read_metrics(out / "s.jsonl")] == list(range(1, N_STEPS + 1))
    return line


OTHER_PIPELINE = (
    r"^error: --out \S+ holds a {} run \(\S+run\.json\), not a {} run: resume it with its own command, or "
    r"use another --out$"
)
LOCK_HELD = r"error: .* is in use by pid {pid} on {host} \(since [^)]+\): wait for that run to end or use another --out; if it is not running, delete \S+run\.lock$"  # noqa: E501

CASES: dict[str, Case] = {
    # 1. --resume on a finished run is a no-op that leaves every file as it was.
    "happy_resume_finished_is_noop": Case(
        "happy",
        lambda out, ctx: happy_main(out, ctx, "--resume", rc=0),
        NOOP.format("happy"),
    ),
    "tldr_resume_finished_is_noop": Case(
        "tldr",
        lambda out, ctx: tldr_main(out, ctx, "--resume", rc=0),
        NOOP.format("tldr"),
    ),
    # 2. A refused run writes nothing.
    "happy_second_run_refused": Case(
        "happy",
        lambda out, ctx: happy_main(out, ctx, rc=1),
        NOT_EMPTY,
    ),
    "happy_resume_other_data_dir_refused": Case(
        "happy",
        lambda out, ctx: happy_main(out, ctx, "--resume", data="b", rc=1),
        r"^error: the tokenizer built from this --data\.data_dir \(\d+ characters\) differs from "
        r"\S+tokenizer\.json \(\d+ characters\), .*: resume with the --data\.data_dir the run started with, "
        r"or use a fresh --out$",
    ),
    "happy_resume_other_config_refused": Case(
        "happy",
        lambda out, ctx: happy_main(out, ctx, "--resume", "--sft.optim.lr", "0.5", rc=1),
        r"^error: checkpoint \S+/sft step 10 was written with --sft\.optim\.lr 0\.001, this run has "
        r"--sft\.optim\.lr 0\.5: use a matching config or a fresh --out$",
    ),
    # Outputs without checkpoints still hold a run: a fresh run there is refused before any write.
    "happy_rerun_over_outputs_without_checkpoints_refused": Case(
        "happy",
        lambda out, ctx: only_line(happy.main, happy_args(out, ctx.tweets / "a"), ctx, rc=1),
        NOT_EMPTY,
        setup=drop_checkpoints,
    ),
    "tldr_resume_with_another_model_refused": Case(
        "tldr",
        lambda out, ctx: only_line(
            lambda argv: stage_recipe.main(tldr_recipe.RECIPE, argv),
            tldr_args(out, ctx.shared_data, "--resume", "--model", "tiny-llama"),
            ctx,
            rc=1,
        ),
        r'^error: checkpoint \S+/sft step 4 was written with --model "tiny", this run has --model '
        r'"tiny-llama": use a matching config or a fresh --out$',
    ),
    "tldr_second_run_refused": Case(
        "tldr",
        lambda out, ctx: tldr_main(out, ctx, rc=1),
        NOT_EMPTY,
    ),
    "tldr_rl_rerun_refused_before_initial_eval": Case(  # it used to rewrite rl_initial_eval.json first
        "tldr",
        lambda out, ctx: tldr_main(out, ctx, "--stages", "rl", rc=1),
        NOT_EMPTY,
    ),
    # --resume of another pipeline's run is refused before anything is written.
    "happy_resume_of_a_tldr_run_refused": Case(
        "tldr",
        lambda out, ctx: happy_main(out, ctx, "--resume", rc=1),
        OTHER_PIPELINE.format("tldr", "happy"),
    ),
    "tldr_resume_of_a_happy_run_refused": Case(
        "happy",
        lambda out, ctx: tldr_main(out, ctx, "--resume", rc=1),
        OTHER_PIPELINE.format("happy", "tldr"),
    ),
    # 3. One run per --out.
    "happy_lock_held_by_live_process": Case(
        "happy",
        lambda out, ctx: happy_main(out, ctx, "--resume", rc=1),
        LOCK_HELD.format(pid=os.getpid(), host=re.escape(socket.gethostname())),
        setup=lambda out: write_lock(out, os.getpid()),
    ),
    "tldr_lock_held_by_live_process": Case(
        "tldr",
        lambda out, ctx: tldr_main(out, ctx, "--resume", rc=1),
        LOCK_HELD.format(pid=os.getpid(), host=re.escape(socket.gethostname())),
        setup=lambda out: write_lock(out, os.getpid()),
    ),
    "happy_stale_lock_taken_over": Case(
        "happy",
        stale_lock_then_noop,
        r"^warning: taking over the stale lock \S+run\.lock of pid \d+ on \S+ \(started [^;]+; "
        r"that process is gone\)$",
        setup=lambda out: write_lock(out, dead_pid()),
        gone=("run.lock",),
    ),
    # 4. Damaged checkpoints: a resume falls back past the latest step; an explicit restore refuses it.
    **{
        f"fallback_{kind}": Case(
            "tiny",
            fallback,
            rf"^warning: s checkpoint damaged under \S+/s: step 12 \({problem}.*\) moved to 12\.damaged; "
            r"resuming from step 9$",
            setup=lambda out, damage=damage: damage(out / "s" / "12"),
            unchanged=False,
        )
        for kind, (damage, problem) in DAMAGE.items()
    },
    **{
        f"restore_{kind}_refused": Case(
            "tiny",
            restore_step_12,
            rf"^checkpoint \S+/s step 12 is damaged: {problem}.*; restore an earlier step \(a pipeline's "
            r"--resume falls back to the newest good one\)$",
            setup=lambda out, damage=damage: damage(out / "s" / "12"),
        )
        for kind, (damage, problem) in DAMAGE.items()
    },
    # Steps saved before checksums existed are read unverified; damage there is still one line.
    **{
        f"restore_unverified_{kind}_refused": Case(
            "tiny",
            restore_step_12,
            r"^checkpoint \S+/s step 12 is damaged: orbax could not read it \(\w+: .*\); restore an earlier",
            setup=lambda out, damage=damage: (
                [p.unlink() for p in (out / "s").glob("*/checksums.json")],
                damage(out / "s" / "12"),
            ),
        )
        for kind, (damage, _) in DAMAGE.items()
        if kind in ("empty_manifest", "broken_meta_json")
    },
    "every_step_damaged_refused": Case(
        "tiny",
        resume_tiny_error,
        r"^every checkpoint of \S+/s is damaged \(step 9: state/\S+ is \d+ bytes.*; "
        r"step 12: meta/metadata is \d+ bytes.*\); restore them from a copy, or move that directory aside "
        r"to run the stage again from its start$",
        setup=lambda out: (
            DAMAGE["truncated_tensor_file"][0](out / "s" / "9"),
            truncate(out / "s/12/meta/metadata"),
        ),
    ),
    # 5. SIGTERM: a checkpoint at the next step boundary, one line, exit code 143, a bitwise resume.
    "sigterm_saves_and_resumes_bitwise": Case(
        "empty",
        sigterm_then_resume,
        r"^SIGTERM: stopped s at step 8 of 12, checkpoint saved under \S+/s; rerun with --resume to continue "
        r"\(exit code 143\)$",
        unchanged=False,
    ),
    # SIGINT (Ctrl-C) during a step: the same save at the next step boundary, exit code 130.
    "sigint_saves_and_resumes_bitwise": Case(
        "empty",
        sigint_then_resume,
        r"^SIGINT: stopped s at step 8 of 12, checkpoint saved under \S+/s; rerun with --resume to continue "
        r"\(exit code 130\)$",
        unchanged=False,
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_fault(name, request, tmp_path, capsys, shared_data):
    case = CASES[name]
    out = tmp_path / "out"
    tiny_out, tiny_final = request.getfixturevalue("tiny_run")
    if case.run == "empty":
        out.mkdir()
    else:
        source = tiny_out if case.run == "tiny" else request.getfixturevalue(f"{case.run}_run")
        shutil.copytree(source, out)
    tweets = request.getfixturevalue("tweets") if case.run in ("happy", "tldr") else None
    case.setup(out)
    before = tree(out)
    capsys.readouterr()
    line = case.act(out, Ctx(capsys, tweets, shared_data, tiny_final))
    assert "\n" not in line and re.search(case.expect, line), line
    if case.unchanged:
        assert tree(out) == {k: v for k, v in before.items() if k not in case.gone}


# ------------------------------------------------------------------------------------ beyond the table


def test_steps_saved_before_checksums_resume_unverified(tiny_run, tmp_path, capsys):
    """A run whose steps have no checksums.json (written before checksums existed) still resumes."""
    out = tmp_path / "out"
    shutil.copytree(tiny_run[0], out)
    for step in (9, 12):
        (out / "s" / str(step) / "checksums.json").unlink()
    shutil.rmtree(out / "s" / "12")  # resume from 9, then save 12 again (with checksums)
    np.testing.assert_array_equal(run_tiny(out, resume=True), tiny_run[1])
    assert capsys.readouterr().err == ""
    assert (out / "s" / "12" / "checksums.json").exists() and checkpoint.verify(out, "s") == 12


def test_metrics_and_lock_reach_gs_through_epath(tmp_path, monkeypatch, gcs):
    """`<stage>.jsonl` and `run.lock` go through etils epath, so a gs:// --out gets them, not a local
    `./gs:/...` folder. On an object store the metrics file is rewritten whole (no appends): every record
    is there after flush() (the runner calls it before each checkpoint) and close(); a resume drops the
    records after the resumed step."""
    monkeypatch.chdir(tmp_path)
    bucket = tmp_path / "gcs"
    with gcs(bucket):
        writer = loop.MetricsWriter("gs://b/run/s.jsonl", flush_every_s=3600)
        for step in (1, 2, 3):
            writer.write({"step": step, "loss": 1.0 / step})
        assert not (bucket / "b/run/s.jsonl").read_text()  # buffered: no append on an object store
        writer.flush()
        assert [r["step"] for r in loop.read_metrics("gs://b/run/s.jsonl")] == [1, 2, 3]
        writer.write({"step": 4})
        writer.close()
        assert [r["step"] for r in loop.read_metrics("gs://b/run/s.jsonl")] == [1, 2, 3, 4]
        loop.MetricsWriter("gs://b/run/s.jsonl", resume_step=2).close()
        assert [r["step"] for r in loop.read_metrics("gs://b/run/s.jsonl")] == [1, 2]

        with outdir.lock("gs://b/run") as lock:
            assert json.loads((bucket / "b/run/run.lock").read_text())["pid"] == os.getpid()
            with pytest.raises(outdir.RunDirBusyError, match=rf"in use by pid {os.getpid()} on "):
                with outdir.lock("gs://b/run"):
                    pass
        assert lock is not None and not (bucket / "b/run/run.lock").exists()
    assert not (tmp_path / "gs:").exists()
