"""The scalar sinks of `jaxrlhf.engine.loop` (TensorBoard through tensorboardX, optional Weights & Biases)
as a user reads them: event files read back by TensorBoard's own EventAccumulator, a resumed stage's
events (purge_step), a missing or fake `wandb`, and HappyGPT's pretrain stage with --tensorboard, its event
file against its JSONL."""

import json
import pathlib
import subprocess
import sys
import time
import types

import _helpers  # noqa: E402  (tests/)
import jax
import numpy as np
import pytest
import tensorboardX.event_file_writer

from jaxrlhf import happy
from jaxrlhf.engine import flags, loop
from jaxrlhf.stages import recipe

REPO = pathlib.Path(__file__).resolve().parents[1]


read_events = _helpers.read_events
assert_series = _helpers.assert_series


def next_second():
    """Sleep into the next wall-clock second: tensorboardX names event files by the second (see
    test_a_resume_in_the_same_second_keeps_the_earlier_events)."""
    time.sleep(1.02 - time.time() % 1.0)


RECORDS = [
    {"step": 1, "loss": 2.5, "lr": 1e-3, "note": "warm", "time_s": 0.5},
    {"step": 2, "loss": 2.25, "lr": 2e-3, "time_s": 0.75},
    {"step": 3, "loss": 1.875, "lr": 3e-3, "eval/val_loss": 2.0625, "time_s": 1.0},
    {"step": 4, "loss": 1.5, "lr": 4e-3, "time_s": 1.25},
    {"step": 5, "loss": 1.25, "lr": 5e-3, "time_s": 1.5},
    {"step": 6, "loss": 1.125, "lr": 6e-3, "eval/val_loss": 1.5, "time_s": 1.75},
]


def test_scalars_read_back_by_tensorboard(tmp_path):
    sinks = loop.ScalarSinks(tmp_path / "run", "pretrain", None)
    for record in RECORDS:
        sinks.write(record)
    sinks.close()
    logdir = tmp_path / "run" / "tb" / "pretrain"
    assert [p.name.startswith("events.out.tfevents.") for p in logdir.iterdir()] == [True]
    events = read_events(logdir)
    assert set(events) == {"loss", "lr", "eval/val_loss", "time_s"}  # the string "note" is not a scalar
    assert_series(events["loss"], [(1, 2.5), (2, 2.25), (3, 1.875), (4, 1.5), (5, 1.25), (6, 1.125)])
    assert_series(events["lr"], [(1, 1e-3), (2, 2e-3), (3, 3e-3), (4, 4e-3), (5, 5e-3), (6, 6e-3)])
    assert_series(events["eval/val_loss"], [(3, 2.0625), (6, 1.5)])


@pytest.fixture
def slow_tb_worker(monkeypatch):
    """tensorboardX's writer thread takes 0.2 s per event (a loaded machine, made certain): what the
    sinks promise once flush() or close() returns must not depend on that thread being quick."""
    write_event = tensorboardX.event_file_writer.EventsWriter.write_event

    def slow(self, event):
        time.sleep(0.2)
        return write_event(self, event)

    monkeypatch.setattr(tensorboardX.event_file_writer.EventsWriter, "write_event", slow)


def test_close_waits_for_every_event(tmp_path, slow_tb_worker):
    sinks = loop.ScalarSinks(tmp_path / "run", "sft", None)
    for record in RECORDS[:2]:
        sinks.write(record)
    sinks.close()
    assert_series(read_events(tmp_path / "run" / "tb" / "sft")["loss"], [(1, 2.5), (2, 2.25)])


def test_flush_makes_the_events_readable_before_close(tmp_path, slow_tb_worker):
    """run_stage flushes the sinks before each checkpoint (`save`), so that a run killed after the
    checkpoint has every event up to it, as its JSONL does."""
    sinks = loop.ScalarSinks(tmp_path / "run", "sft", None)
    for record in RECORDS[:2]:
        sinks.write(record)
    sinks.flush()
    try:
        assert_series(read_events(tmp_path / "run" / "tb" / "sft")["loss"], [(1, 2.5), (2, 2.25)])
    finally:
        sinks.close()


def test_tensorboard_off_writes_nothing(tmp_path):
    sinks = loop.ScalarSinks(tmp_path / "run", "pretrain", None, tensorboard=False)
    sinks.write(RECORDS[0])
    sinks.close()
    assert not (tmp_path / "run").exists()


def test_a_resumed_stage_shows_each_step_once_with_the_new_values(tmp_path):
    """Steps 1..6 written, the stage resumed from its checkpoint 4 (as run_stage does: resume_step = the
    restored step) and 5..8 written again with new values: TensorBoard shows 1..4 old, 5..8 new."""
    run = tmp_path / "run"
    first = loop.ScalarSinks(run, "rl", None)
    for step in range(1, 7):
        first.write({"step": step, "reward": float(step), "kl": 0.5})
    first.close()
    next_second()
    second = loop.ScalarSinks(run, "rl", 4)
    for step in range(5, 9):
        second.write({"step": step, "reward": 100.0 + step})
    second.close()
    events = read_events(run / "tb" / "rl")
    want = [(s, float(s)) for s in range(1, 5)] + [(s, 100.0 + s) for s in range(5, 9)]
    assert_series(events["reward"], want)
    assert_series(events["kl"], [(1, 0.5), (2, 0.5), (3, 0.5), (4, 0.5)])  # 5, 6 went with the rerun steps


def test_a_resume_in_the_same_second_keeps_the_earlier_events(tmp_path, monkeypatch):
    clock = types.SimpleNamespace(time=lambda: 1_700_000_000.25)  # both writers open in this second
    monkeypatch.setattr(tensorboardX.event_file_writer, "time", clock)
    run = tmp_path / "run"
    first = loop.ScalarSinks(run, "rl", None)
    for step in range(1, 7):
        first.write({"step": step, "reward": float(step)})
    first.close()
    second = loop.ScalarSinks(run, "rl", 4)
    for step in range(5, 9):
        second.write({"step": step, "reward": 100.0 + step})
    second.close()
    assert [s for s, _ in read_events(run / "tb" / "rl")["reward"]] == list(range(1, 9))


def test_run_stage_resume_matches_its_jsonl_in_tensorboard(tmp_path):
    """The loop itself: 8 steps, a checkpoint every 4, stopped after 6; resumed (from checkpoint 4) with a
    step function whose metrics differ. TensorBoard and the JSONL both show 1..4 from the first run and
    5..8 from the second, each once."""
    run_dir = str(tmp_path / "run")

    def stepper(offset):
        def step_fn(state, i, key):
            return {"w": state["w"] + 1.0}, {"loss": offset + 0.5 * i, "lr": 0.25}

        return step_fn

    common = dict(run_dir=run_dir, stage="s", state={"w": np.zeros(2, np.float32)}, n_steps=8,
                  root_key=jax.random.key(0), ckpt_every=4, progress=False)  # fmt: skip
    loop.run_stage(step_fn=stepper(0.0), stop_after=6, **common)
    next_second()
    loop.run_stage(step_fn=stepper(10.0), resume=True, **common)
    want = [(i + 1, 0.5 * i) for i in range(4)] + [(i + 1, 10.0 + 0.5 * i) for i in range(4, 8)]
    events = read_events(tmp_path / "run" / "tb" / "s")
    assert_series(events["loss"], want)
    assert_series(events["lr"], [(s, 0.25) for s in range(1, 9)])
    jsonl = [json.loads(x) for x in (tmp_path / "run" / "s.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in jsonl] == want
    assert_series(events["time_s"], [(r["step"], r["time_s"]) for r in jsonl])


# --------------------------------------------------------------------------------------------- gs://




def test_events_reach_a_gs_run_directory(tmp_path, monkeypatch, slow_tb_worker, gcs):
    """On gs:// the events are written locally and copied up: after close(), every event is there (the
    copy waits for the writer thread), and no local `gs:` folder is made."""
    monkeypatch.chdir(tmp_path)
    bucket = tmp_path / "gcs"
    with gcs(bucket):
        sinks = loop.ScalarSinks("gs://b/run", "pretrain", None)
        for record in RECORDS[:2]:
            sinks.write(record)
        sinks.close()
    assert_series(read_events(bucket / "b" / "run" / "tb" / "pretrain")["loss"], [(1, 2.5), (2, 2.25)])
    assert not (tmp_path / "gs:").exists()


# -------------------------------------------------------------------------------------------- W&B


NOT_INSTALLED = "Weights & Biases is not installed: pip install wandb, or drop it"


def test_wandb_not_installed_is_refused_in_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    with pytest.raises(ValueError) as e:
        loop.check_wandb("my-project")
    assert str(e.value) == f"wandb='my-project'; {NOT_INSTALLED}"
    loop.check_wandb("")  # none asked for: nothing to check
    with pytest.raises(ValueError, match="pip install wandb"):
        happy.HappyConfig(wandb="my-project")
    r = happy.RECIPE
    with pytest.raises(SystemExit) as e:
        flags.parse(r.defaults, ["--wandb", "my-project"], inactive=r.inactive, renamed=r.renamed,
                    adjust=r.adjust, prog="happy")  # fmt: skip
    assert e.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"happy: error: --wandb 'my-project'; {NOT_INSTALLED}"]


@pytest.fixture
def fake_wandb(monkeypatch):
    """A `wandb` module whose init returns a run recording what it was given."""
    calls = {"init": [], "log": [], "finish": 0}

    class Run:
        def log(self, data, **kwargs):
            calls["log"].append((dict(data), kwargs))

        def finish(self):
            calls["finish"] += 1

    def init(**kwargs):
        calls["init"].append(kwargs)
        return Run()

    module = types.ModuleType("wandb")
    module.init = init
    module.log = lambda *a, **k: pytest.fail("module-level wandb.log: the sinks log through the run")
    module.finish = lambda *a, **k: None
    monkeypatch.setitem(sys.modules, "wandb", module)
    return calls


def test_wandb_gets_every_scalar_with_its_step(tmp_path, fake_wandb):
    loop.check_wandb("proj")  # installed: accepted
    sinks = loop.ScalarSinks(tmp_path / "myrun", "sft", None, tensorboard=False, wandb="proj",
                             config={"sft": {"steps": 3}})  # fmt: skip
    for record in RECORDS[:3]:
        sinks.write(record)
    sinks.close()
    (init,) = fake_wandb["init"]
    assert (
        init["project"] == "proj" and init["name"] == "myrun/sft" and init["config"] == {"sft": {"steps": 3}}
    )
    assert [d for d, _ in fake_wandb["log"]] == [
        {"sft/loss": 2.5, "sft/lr": 1e-3, "sft/time_s": 0.5, "sft/step": 1},
        {"sft/loss": 2.25, "sft/lr": 2e-3, "sft/time_s": 0.75, "sft/step": 2},
        {"sft/loss": 1.875, "sft/lr": 3e-3, "sft/eval/val_loss": 2.0625, "sft/time_s": 1.0, "sft/step": 3},
    ]
    assert fake_wandb["finish"] == 1
    assert not (tmp_path / "myrun" / "tb").exists()


def test_recipe_flags_reach_the_stage_run(fake_wandb):
    r = happy.RECIPE
    cfg = flags.parse_checked(r.defaults, ["--tensorboard", "false", "--wandb", "proj"], adjust=r.adjust)
    run = recipe.stage_run(cfg, "sft", 2)
    assert run.tensorboard is False and run.wandb == "proj"
    default = recipe.stage_run(r.defaults, "sft", 2)
    assert default.tensorboard is True and default.wandb is None  # "" -> no project


def test_run_stage_sends_the_loop_metrics_to_wandb(tmp_path, fake_wandb):
    loop.run_stage(run_dir=str(tmp_path / "r"), stage="rl", state={"w": np.zeros(2, np.float32)},
                   step_fn=lambda state, i, key: (state, {"reward": float(i) * 2}), n_steps=3,
                   root_key=jax.random.key(0), progress=False, tensorboard=False, wandb="proj")  # fmt: skip
    assert [(d["rl/step"], d["rl/reward"]) for d, _ in fake_wandb["log"]] == [(1, 0.0), (2, 2.0), (3, 4.0)]
    assert fake_wandb["init"][0]["name"] == "r/rl" and fake_wandb["finish"] == 1


def test_events_are_written_without_loading_torch(tmp_path):
    """tensorboardX imports torch wherever it is installed (a run's peak RSS +170 MB, +1.3 s); the sinks
    load it without: the events are written and torch stays unloaded (and importable afterwards)."""
    code = f"""
import sys
from jaxrlhf.engine import loop
sinks = loop.ScalarSinks({str(tmp_path / "run")!r}, "s", None)
sinks.write({{"step": 1, "loss": 0.5}})
sinks.close()
assert "torch" not in sys.modules, "torch was loaded"
import torch  # noqa: F401
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
    assert read_events(tmp_path / "run" / "tb" / "s")["loss"] == [(1, 0.5)]
