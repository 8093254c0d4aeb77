"""Engine end to end in subprocesses: SIGKILL + resume is bitwise exact; SIGTERM saves at a step boundary
and exits 143; 2 processes x 4 devices (gloo) equal one process; compile_s is JAX's compile time."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxrlhf import parallel, train

JOB = str(pathlib.Path(__file__).with_name("_engine_job.py"))
REPO = pathlib.Path(__file__).resolve().parents[1]


def _env():
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run(*args, check=True, cache=None):
    env = _env()
    if (
        cache is not None
    ):  # a persistent XLA cache shared by the calls of one test: each program compiles once
        env.update(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    proc = subprocess.run([sys.executable, JOB, *args], env=env, capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"job {args} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def _leaves(path):
    with np.load(path) as f:
        return [f[k] for k in sorted(f.files, key=lambda s: int(s.split("_")[1]))]


def test_sigkill_then_resume_is_bitwise_identical(tmp_path):
    xla = tmp_path / "xla"
    _run("resume", str(tmp_path / "a"), str(tmp_path / "a.npz"), cache=xla)
    killed = _run(
        "resume", str(tmp_path / "b"), str(tmp_path / "b.npz"), "--kill-at", "7", check=False, cache=xla
    )
    assert killed.returncode == -signal.SIGKILL
    assert sorted(p.name for p in (tmp_path / "b" / "pretrain").iterdir() if p.name.isdigit()) == ["3", "6"]
    _run("resume", str(tmp_path / "b"), str(tmp_path / "b.npz"), "--resume", cache=xla)
    a, b = _leaves(tmp_path / "a.npz"), _leaves(tmp_path / "b.npz")
    assert len(a) == len(b) > 0
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    lines = (tmp_path / "b" / "pretrain.jsonl").read_text().splitlines()
    assert len(lines) == 12  # the metrics file reads like an uninterrupted run
    # SIGTERM (a preemption notice) during step 7: a checkpoint at the step boundary after it, one line,
    # exit code 143. (That resuming from it is bitwise exact: tests/test_faults.py, in-process.)
    term = _run(
        "resume", str(tmp_path / "t"), str(tmp_path / "t.npz"), "--term-at", "7", check=False, cache=xla
    )
    assert term.returncode == 143, term.stderr[-3000:]
    last = term.stderr.strip().splitlines()[-1]
    assert last.startswith("SIGTERM: stopped pretrain at step 8 of 12") and "--resume" in last, last
    assert sorted(p.name for p in (tmp_path / "t" / "pretrain").iterdir() if p.name.isdigit()) == ["6", "8"]
    assert [
        json.loads(x)["step"] for x in (tmp_path / "t" / "pretrain.jsonl").read_text().splitlines()
    ] == list(range(1, 9))
    # (A checkpoint from another config, or a fresh run over checkpoints, is refused in one line before
    # anything is written: tests/test_checkpoint.py and tests/test_faults.py, in-process.)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one(tmp_path):
    import _engine_job  # noqa: F401  (same directory; for lm_setup)

    port = _free_port()
    out = tmp_path / "multi.npz"
    procs = [
        subprocess.Popen(
            [sys.executable, JOB, "multi", str(pid), str(port), str(out)],
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for pid in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    got = _leaves(out)
    # The same two steps in this process on one device.
    cfg, tx, state, data = _engine_job.lm_setup()
    mesh = parallel.make_mesh(1, 1, devices=jax.devices()[:1])
    step = parallel.jit_step(train.make_lm_step(cfg, tx), mesh, state)
    state = parallel.put(state, mesh)
    rows = data[:8]
    mask = np.ones_like(rows, bool)
    batch = parallel.shard_batch(train.LMBatch(rows, mask, mask), mesh)
    losses = []
    for i in range(2):
        state, metrics = step(state, batch, jax.random.fold_in(jax.random.key(7), i))
        losses.append(float(metrics["loss"]))
    np.testing.assert_allclose(got[0], losses, rtol=1e-5)
    for x, y in zip(got[1:], jax.tree.leaves(jax.device_get(state.params)), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)


@pytest.fixture(autouse=True)
def _job_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(pathlib.Path(__file__).parent))


def test_compile_s_is_the_time_jax_spends_compiling(tmp_path):
    """compile_s counts JAX's own compile events: a slow first step that compiles nothing adds nothing
    (the old first-step-minus-steady-step estimate read its 0.6 s as compilation), and a step whose
    program is new each time adds each program's compilation."""
    import time

    import jax.numpy as jnp

    from jaxrlhf.engine import loop

    def slow_first(state, i, key):
        if i == 0:
            time.sleep(0.6)
        return state, {"x": float(i)}

    state = {"w": np.zeros(3, np.float32)}
    run = dict(state=state, n_steps=3, root_key=jax.random.key(0), progress=False)
    # The first stage of a process compiles the engine's own small programs (key folding, saving).
    loop.run_stage(run_dir=str(tmp_path / "warm"), stage="s", step_fn=slow_first, **run)
    summary = loop.run_stage(run_dir=str(tmp_path / "a"), stage="s", step_fn=slow_first, **run).summary
    assert summary["compile_s"] < 0.02 and summary["first_step_overhead_s"] >= 0.25, summary

    def fresh_program(state, i, key):
        # A new function object each step: jit traces and compiles it again.
        f = jax.jit(lambda w: jnp.sin(w) * (i + 1))
        return {"w": f(state["w"])}, {"x": float(i)}

    t0 = time.perf_counter()
    summary = loop.run_stage(run_dir=str(tmp_path / "b"), stage="s", step_fn=fresh_program, **run).summary
    assert 0.0 < summary["compile_s"] < time.perf_counter() - t0, summary
