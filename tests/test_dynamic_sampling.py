"""DAPO's dynamic sampling in the RL stage (`RLStageConfig.dynamic_sampling_rounds`): groups whose answers all
score the same are dropped and replaced by groups of fresh rounds, the batch stays full, the extra rounds are
bounded and reported, and with no tie the stage is unchanged. HappyGPT's RL stage on a random gpt-nano with
a scripted host reward: the scores of each sampling round are fixed in advance, so which groups the update
must see is known without reading the stage's code."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from jaxrlhf import happy, models, parallel
from jaxrlhf.engine import flags
from jaxrlhf.rollout import pairs
from jaxrlhf.stages import policy, recipe

GROUP, BATCH = 4, 16  # 4 groups of 4 answers per round
TIMING = ("_s", "steps_per_s", "tokens_per_s")


class Scripted:
    """A host reward returning the next of `rounds` score vectors at each call, recording each call."""

    def __init__(self, rounds):
        self.rounds, self.calls = [np.asarray(r, np.float32) for r in rounds], 0

    def __call__(self, rollout):
        assert len(rollout.response) == BATCH
        scores = self.rounds[min(self.calls, len(self.rounds) - 1)]
        self.calls += 1
        return scores


def _run(tmp_path, shared_data, name, reward, rounds_cap):
    data = str(shared_data / "tweets")
    argv = ["--quick", "--model", "gpt-nano", "--progress", "false", "--data.data_dir", data, "--out",
            str(tmp_path / name), "--rl.algo", "grpo", "--rl.iterations", "1", "--rl.batch_size", str(BATCH),
            "--rl.group_size", str(GROUP), "--rl.eval_batches", "0", "--compile-cache", "",
            "--rl.dynamic_sampling_rounds", str(rounds_cap)]  # fmt: skip
    r = happy.RECIPE
    cfg, _ = flags.parse(r.defaults, argv, inactive=r.inactive, renamed=r.renamed, adjust=r.adjust)
    setup = happy.make_setup(cfg)
    setup = dataclasses.replace(setup, mesh=parallel.make_mesh(devices=jax.devices()[:1]))
    rows = setup.extras["rows"]
    policy.run_rl_stage(
        setup, cfg.rl, recipe.stage_run(cfg, "rl", 3), prompts=rows["train"], val=rows["test"],
        policy=models.init_params(jax.random.key(0), setup.model_cfg), reward=policy.HostReward(reward),
        response_len=cfg.data.block_size - 1,
    )  # fmt: skip
    return json.loads((tmp_path / name / "rl.jsonl").read_text().splitlines()[0])


def test_tied_groups_are_replaced_and_the_rounds_are_bounded(tmp_path, shared_data):
    # Round 0: groups 1 and 3 tie; round 1: only group 2 differs; round 2: group 0 differs.
    rounds = [
        [0, 1, 0, 1, 2, 2, 2, 2, 1, 0, 0, 0, 5, 5, 5, 5],
        [3, 3, 3, 3, 1, 1, 1, 1, 0, 0, 1, 1, 7, 7, 7, 7],
        [4, 0, 0, 0, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6],
    ]
    reward = Scripted(rounds)
    got = _run(tmp_path, shared_data, "ties", reward, rounds_cap=3)
    # Kept in order: round 0's groups 0 and 2, round 1's group 2, round 2's group 0; round 3 never ran.
    learned = np.concatenate([rounds[0][0:4], rounds[0][8:12], rounds[1][8:12], rounds[2][0:4]])
    assert reward.calls == 3
    assert got["dynamic_rounds"] == 2 and got["dynamic_filled_groups"] == 0
    assert got["dynamic_kept_fraction"] == pytest.approx(4 / 12)
    assert got["reward"] == pytest.approx(float(np.mean(learned)))
    assert got["reward_std"] == pytest.approx(float(np.std(learned)), rel=1e-5)
    assert got["reward_sampled"] == pytest.approx(float(np.mean(rounds)))

    # Never enough: the cap holds, and round 0's tied groups fill the batch (still 16 rows).
    always_tied = Scripted([[1] * 4 + [0, 1, 1, 1] + [2] * 8, [3] * 16])  # later rounds: every group ties
    capped = _run(tmp_path, shared_data, "capped", always_tied, rounds_cap=2)
    assert always_tied.calls == 3
    assert capped["dynamic_rounds"] == 2 and capped["dynamic_filled_groups"] == 3
    # The batch: round 0's differing group 1, then its tied groups 0, 2, 3 in order (= round 0 itself).
    assert capped["reward"] == pytest.approx(float(np.mean([1] * 4 + [0, 1, 1, 1] + [2] * 8)))


def test_with_no_tie_dynamic_sampling_is_an_identity(tmp_path, shared_data):
    scores = np.arange(BATCH, dtype=np.float32) % 5  # every group differs
    off = _run(tmp_path, shared_data, "off", Scripted([scores]), rounds_cap=0)
    reward = Scripted([scores])
    on = _run(tmp_path, shared_data, "on", reward, rounds_cap=3)
    assert reward.calls == 1 and on["dynamic_rounds"] == 0 and on["dynamic_kept_fraction"] == 1.0
    values = sorted(k for k, v in off.items() if isinstance(v, float) and not k.endswith(TIMING))
    assert {"policy_loss", "approx_kl", "grad_norm", "reward"} <= set(values)
    assert {k: on[k] for k in values} == {k: off[k] for k in values}


def test_differing_groups_in_order_then_the_first_rounds_ties():
    r0 = np.array([1, 1, 0, 2, 2, 2, 3, 3])  # groups of 2: differs, ties, ties, ties
    r1 = np.array([5, 5, 0, 1, 4, 4, 7, 8])  # ties, differs, ties, differs
    rows, stats = pairs.differing_groups([r0], 2, 4)
    np.testing.assert_array_equal(rows, [2, 3, 0, 1, 4, 5, 6, 7])  # the differing group, then the tied ones
    assert stats == {"kept_fraction": 0.25, "filled_groups": 3}
    rows, stats = pairs.differing_groups([r0, r1], 2, 3)
    np.testing.assert_array_equal(rows, [2, 3, 10, 11, 14, 15])
    assert stats == {"kept_fraction": 3 / 8, "filled_groups": 0}
    with pytest.raises(ValueError, match="each needs 4 groups of 2"):
        pairs.differing_groups([r0[:6]], 2, 4)


def test_dynamic_sampling_is_refused_where_it_cannot_act():
    with pytest.raises(ValueError, match="dynamic_sampling_rounds=2 drops groups of equal scores"):
        policy.RLStageConfig(dynamic_sampling_rounds=2)  # ppo: no groups
    bad = policy.inactive_flags(policy.RLStageConfig(), [("dynamic_sampling_rounds",)])
    assert bad == ["--rl.dynamic_sampling_rounds"]
