"""scripts/memory_plan.py: its state bytes are the shards `parallel.put` really makes, its CLI writes JSON."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import jax
import optax
import pytest

from jaxrlhf import models, parallel, train

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = [
    "--preset",
    "tiny-llama",
    "--max-prompt-tokens",
    "20",
    "--max-answer-tokens",
    "11",
    "--template-tokens",
    "2",
]


@pytest.fixture(scope="module")
def memory_plan():
    spec = importlib.util.spec_from_file_location("memory_plan", REPO / "scripts" / "memory_plan.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _device0_bytes(tree) -> int:
    return sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree))


def test_state_bytes_are_the_real_shards(memory_plan):
    args = memory_plan.parse_args([*TINY, "--hardware", "v5e-8", "--mu-dtype", "bfloat16"])
    plan = memory_plan.plan(args, "v5e-8")
    cfg = memory_plan.model_cfg(args)
    tx = train.make_optimizer(train.OptimConfig(lr=3e-7, mu_dtype="bfloat16"))
    mesh = parallel.make_mesh(1, 8)
    state = parallel.put(train.init_train_state(models.init_params(jax.random.key(0), cfg), tx), mesh)
    is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)  # noqa: E731
    (adam,) = [s for s in jax.tree.leaves(state.opt_state, is_leaf=is_adam) if is_adam(s)]
    rebel = plan["stages"]["rebel"]
    assert rebel["params (float32)"] == rebel["gradients"] == _device0_bytes(state.params)
    assert rebel["Adam mu (bfloat16)"] == _device0_bytes(adam.mu)
    assert rebel["Adam nu (float32)"] == _device0_bytes(adam.nu) == 2 * rebel["Adam mu (bfloat16)"]
    assert plan["stages"]["generate"]["policy params"] == _device0_bytes(state.params)
    # The activation formulas at the pipeline's lengths: P = 20 + 2, R = 11 + 1, rows split over 8 devices.
    P, R = 22, 12
    assert plan["lengths"] == {"P": P, "R": R, "T": P + R, "score_T": 128, "logprob_slice": P + R - 1}
    assert plan["rows_per_device"] == {"generate": 5, "score": 2, "rebel": 2}
    L, D, K, H = cfg.n_layer, cfg.n_embd, cfg.kv_heads, cfg.head_dim
    assert rebel["saved block inputs"] == L * 2 * (P + R) * D * 2
    assert plan["stages"]["generate"]["KV cache"] == 2 * L * 5 * K * (P + R) * H * 2
    assert all(plan["fits"].values())


def test_cli_prints_and_writes_every_hardware(tmp_path):
    out = tmp_path / "plan.json"
    cmd = [sys.executable, "scripts/memory_plan.py", *TINY, "--hardware", "v5e-8,v4-8", "--out", str(out)]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
    }
    run = dict(cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    result = subprocess.run(cmd, check=True, **run)
    assert "TPU v5e-8" in result.stdout and "TPU v4-8" in result.stdout and "= total" in result.stdout
    plans = json.loads(out.read_text())["plans"]
    assert [p["hardware"] for p in plans] == ["v5e-8", "v4-8"]
    assert [p["mesh"]["fsdp"] for p in plans] == [8, 4]
    bad = subprocess.run(
        [*cmd[:2], "--hardware", "v9"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert bad.returncode == 2 and "--hardware v9; use one of" in bad.stderr
