"""One code path, 1 == 8 devices: HappyGPT's RL stage on one device, on 8 (data) and on 4 x 2 (data x
fsdp) samples the same rollouts and reports the same first-iteration metrics, and XLA compiles it without
replicating a sharded tensor to reshard it ("Involuntary full rematerialization").

The three runs go in one fresh interpreter (this file run as a script), as a user's command would: XLA's
own stderr is then read whole (pytest's fd capture would swallow a fatal line), and the runs do not share
the test worker's process with a thousand other tests' programs (in 2 of 5 full CI runs the 8-device
run aborted there inside XLA, never in a process of its own)."""

import dataclasses
import json
import pathlib
import subprocess
import sys

import jax
import numpy as np

from jaxrlhf import happy, models, parallel
from jaxrlhf.engine import flags
from jaxrlhf.rollout import make_text_reward, vader_scores
from jaxrlhf.stages import policy, recipe

TIMING = ("_s", "steps_per_s", "tokens_per_s")


def _first_iteration(tmp_path, shared_data, name, devices, fsdp):
    """HappyGPT's RL stage for one iteration on `devices` devices (fsdp of them per model copy), from a
    random policy; writes <tmp_path>/<name>/rl.jsonl."""
    r = happy.RECIPE
    argv = ["--quick", "--progress", "false", "--data.data_dir", str(shared_data / "tweets"), "--out",
            str(tmp_path / name), "--rl.iterations", "1", "--rl.batch_size", "16", "--rl.eval_batches", "0",
            "--mesh-fsdp", str(fsdp), "--compile-cache", ""]  # fmt: skip
    cfg, _ = flags.parse(r.defaults, argv, inactive=r.inactive, renamed=r.renamed, adjust=r.adjust)
    setup = happy.make_setup(cfg)
    mesh = parallel.make_mesh(fsdp=fsdp, devices=jax.devices()[:devices])
    setup = dataclasses.replace(setup, mesh=mesh)
    rows = setup.extras["rows"]
    params = models.init_params(jax.random.key(0), setup.model_cfg)  # the policy the stage starts from
    policy.run_rl_stage(
        setup, cfg.rl, recipe.stage_run(cfg, "rl", 3), prompts=rows["train"], val=rows["test"], policy=params,
        reward=policy.HostReward(make_text_reward(setup.tokenizer, vader_scores)),
        response_len=cfg.data.block_size - 1, ptx_rows=rows["train"],
    )  # fmt: skip


RUNS = (("one", 1, 1), ("8x1", 8, 1), ("8x2", 8, 2))


def test_happy_rl_first_iteration_is_the_same_on_8_devices(tmp_path, shared_data):
    proc = subprocess.run(
        [sys.executable, __file__, str(tmp_path), str(shared_data)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "Involuntary full rematerialization" not in proc.stderr
    one, *many = (
        json.loads((tmp_path / name / "rl.jsonl").read_text().splitlines()[0]) for name, _, _ in RUNS
    )
    for record in many:
        _same(one, record)


def _same(one, many):
    # The same rollouts: the same VADER rewards of the decoded tweets, the same lengths.
    for key in ("reward", "reward_std", "response_length", "finished_fraction"):
        assert many[key] == one[key], key
    values = sorted(k for k, v in one.items() if isinstance(v, float) and not k.endswith(TIMING))
    assert len(values) > 10 and {"approx_kl", "grad_norm", "policy_loss", "value_loss"} <= set(values)
    np.testing.assert_allclose([many[k] for k in values], [one[k] for k in values], rtol=1e-5, atol=1e-6,
                               err_msg=str(values))  # fmt: skip


if __name__ == "__main__":
    jax.config.update("jax_num_cpu_devices", 8)
    out, data = map(pathlib.Path, sys.argv[1:3])
    for run_name, n_devices, n_fsdp in RUNS:
        _first_iteration(out, data, run_name, n_devices, n_fsdp)
