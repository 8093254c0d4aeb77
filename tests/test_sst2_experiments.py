"""experiments/sst2 on the stage layer: the binary reward-model loss against NumPy and a known optimum, the
data layout of the PPO prompts, the flags, and SFT -> RM -> PPO end to end in a subprocess (a tiny random
GPT over the 50257 GPT-2 BPE ids, on the first rows of the shared SST-2 files), GRPO + PPO-ptx + Ziegler's
normalisation from the same SFT and RM, then `--resume` as a no-op."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

import _helpers  # noqa: E402  (tests/)

from experiments.sst2 import recipe as common  # noqa: E402
from jaxrlhf import losses  # noqa: E402
from jaxrlhf.engine import checkpoint, flags  # noqa: E402
from jaxrlhf.stages import setup as stage_setup  # noqa: E402
from jaxrlhf.stages.batches import PromptAnswers  # noqa: E402


def parse_args(argv):
    """The Sst2Config of `argv`, parsed and checked as `python -m experiments.sst2` does."""
    return _helpers.parse_recipe(common.RECIPE, argv)


def model_config(cfg):
    """The model of --model / --init-from with block_size `cfg.data.length`."""
    return stage_setup.model_config(stage_setup.model_spec(cfg), *common.length(cfg))


# ---------------------------------------------------------------------------------- the RM loss


def _numpy_logistic_loss(scores, labels, mask):
    """-[y log sigmoid(s) + (1 - y) log(1 - sigmoid(s))], averaged over real rows, one row at a time."""
    total, count = 0.0, 0
    for s, y, m in zip(scores, labels, mask, strict=True):
        if not m:
            continue
        p = 1.0 / (1.0 + np.exp(-float(s)))
        total += -(y * np.log(p) + (1 - y) * np.log(1.0 - p))
        count += 1
    return total / max(count, 1)


def test_binary_rm_loss_is_the_logistic_loss():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=12).astype(np.float32) * 3
    labels = rng.integers(0, 2, size=12)
    mask = np.ones(12, bool)
    mask[[3, 7]] = False
    scores[3] = 1e30  # padding: garbage never reaches the loss
    loss, metrics = jax.jit(losses.binary_rm_loss)(scores, labels, mask)
    np.testing.assert_allclose(loss, _numpy_logistic_loss(scores, labels, mask), rtol=1e-5)
    real = mask.copy()
    np.testing.assert_allclose(
        metrics["accuracy"], np.mean((scores[real] > 0) == (labels[real] == 1)), rtol=1e-6
    )
    np.testing.assert_allclose(metrics["positive_score"], scores[real & (labels == 1)].mean(), rtol=1e-5)
    grads = jax.grad(lambda s: losses.binary_rm_loss(s, labels, mask)[0])(jnp.asarray(scores))
    # d/ds softplus(-(2y - 1) s) / n = (sigmoid(s) - y) / n on real rows, 0 on padding.
    expected = np.where(mask, (1 / (1 + np.exp(-scores.astype(np.float64))) - labels) / mask.sum(), 0.0)
    np.testing.assert_allclose(grads, expected, rtol=1e-5, atol=1e-7)


def test_binary_rm_loss_reaches_the_known_optimum_of_a_constant_score():
    """With one score shared by every row, the loss is minimised at the log-odds of the positive rate:
    s* = log(k / (n - k)), where the loss is the binary entropy of k / n."""
    labels = np.array([1, 1, 1, 0, 1, 0, 1, 1])  # k / n = 6 / 8
    optimiser = optax.sgd(1.0)
    s = jnp.zeros(())
    state = optimiser.init(s)
    grad = jax.jit(jax.grad(lambda s: losses.binary_rm_loss(jnp.full(8, s), labels)[0]))
    for _ in range(500):
        updates, state = optimiser.update(grad(s), state)
        s = optax.apply_updates(s, updates)
    np.testing.assert_allclose(s, np.log(6 / 2), rtol=1e-4)
    loss, _ = losses.binary_rm_loss(jnp.full(8, s), labels)
    np.testing.assert_allclose(loss, -(0.75 * np.log(0.75) + 0.25 * np.log(0.25)), rtol=1e-5)


# ---------------------------------------------------------------------------------- data layout


def test_ppo_prompts_are_sentence_openings_and_the_rest_is_the_answer():
    eos = 9
    answer = np.array([[1, 2, 3, 4, 5, eos], [6, eos, eos, eos, eos, eos]], np.int32)
    answer_mask = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]], bool)
    rows = PromptAnswers(np.full((2, 1), eos, np.int32), np.ones((2, 1), bool), answer, answer_mask)
    split = common.split_prompts(rows, common.DataConfig(prompt_tokens=3))
    np.testing.assert_array_equal(split.prompt, [[eos, 1, 2, 3], [eos, eos, eos, 6]])
    np.testing.assert_array_equal(split.prompt_mask, [[1, 1, 1, 1], [0, 0, 1, 1]])
    np.testing.assert_array_equal(split.answer[split.answer_mask], [4, 5, eos, eos])  # what is left
    np.testing.assert_array_equal(split.answer_mask.sum(1), [3, 1])


# ---------------------------------------------------------------------------------------- flags


def test_flags_list_every_field_and_refuse_what_does_nothing(capsys):
    text = flags.make_parser(common.Sst2Config()).format_help()
    assert len(flags.leaf_paths(common.Sst2Config)) == len(flags.leaves(common.Sst2Config))
    for leaf in flags.leaves(common.Sst2Config):
        assert flags.flag_names(leaf.flag_path)[0] in text, leaf.path
    cfg = parse_args(["--model", "tiny", "--rl.algo", "grpo", "--rl.group_size", "4"])
    assert cfg.rl.rl.group_size == 4
    assert model_config(cfg).block_size == 1 + 4 + 48
    for bad, why in (
        (
            ["--rl.algo", "grpo", "--rl.group_size", "4", "--rl.value_lr", "1e-5"],
            "--rl.value_lr does",
        ),
        (["--model", "gpt3"], "--model 'gpt3'; use one of"),
        (["--stages", "sft,dpo"], "--stages has unknown ['dpo']"),
        (["--data.max_tokens", "1"], "--data.max_tokens 1; it must be >= 2"),
        (["--model", "gpt2", "--n-layer", "3"], "--n-layer acts for a random init only"),
    ):
        with pytest.raises(SystemExit):
            parse_args(bad)
        err = capsys.readouterr().err
        assert why in err and err.count("\n") == 1, (bad, err)


# ---------------------------------------------------------------------------------- end to end

SFT_STEPS, RM_STEPS, PPO_ITERATIONS = 30, 150, 12


def _sample_data(shared_data, folder: pathlib.Path) -> pathlib.Path:
    """The first 3000 training and 256 validation sentences of the shared SST-2 files."""
    folder.mkdir()
    for name, rows in (("train.tsv", 3000), ("dev.tsv", 256)):
        lines = (shared_data / "sst2" / name).read_text(encoding="utf-8").splitlines(True)
        (folder / name).write_text("".join(lines[: rows + 1]), encoding="utf-8")
    return folder


def _args(shared_data, data_dir, out, cache):
    """--model tiny (2 layers, width 32) over the 50257 BPE ids; sentences of S = 16 tokens, PPO prompts of
    the end-of-text and 3 tokens, responses of 8."""
    args = [
        "--model", "tiny", "--out", out, "--progress", "false",
        "--data.data_dir", data_dir, "--data.cache_dir", cache,
        "--data.tokenizer_dir", shared_data / "gpt2_tokenizer", "--data.max_val_rows", 128,
        "--data.max_tokens", 16, "--data.prompt_tokens", 3, "--data.response_tokens", 8,
        "--sft.steps", SFT_STEPS, "--sft.batch_size", 16, "--sft.eval_batch_size", 64, "--sft.eval_every", 30,
        "--sft.log_every", 1, "--sft.optim.lr", 1e-2, "--sft.optim.warmup_steps", 0,
        "--rm.steps", RM_STEPS, "--rm.batch_size", 64, "--rm.eval_batch_size", 64, "--rm.eval_every", 75,
        "--rm.log_every", 10, "--rm.optim.lr", 1e-2, "--rm.optim.warmup_steps", 0, "--rm.norm_rows", 64,
        "--rl.iterations", PPO_ITERATIONS, "--rl.batch_size", 32, "--rl.eval_every", 6,
        "--rl.eval_batches", 1, "--rl.sample_every", 6, "--rl.optim.lr", 2e-3,
        "--rl.optim.schedule", "constant", "--rl.epochs", 2, "--rl.minibatches", 2,
    ]  # fmt: skip
    return [str(a) for a in args]


def _run(args, cache=None):
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": "1", "HF_HUB_OFFLINE": "1", "JAXRLHF_DATA_DIR": ""}
    # A persistent XLA cache shared by two calls: the PPO evaluator compiles once ("": none).
    args = [*args, "--compile-cache", "" if cache is None else str(cache)]
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.sst2", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stderr


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _snapshot(out: pathlib.Path) -> dict:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.mark.filterwarnings("ignore")
def test_sft_rm_ppo_end_to_end_then_resume_is_a_no_op(shared_data, tmp_path):
    out = tmp_path / "run"
    data_dir = _sample_data(shared_data, tmp_path / "sst2")
    # --out relative to the repository root, where the command runs, as a user's `--out runs/sst2`.
    args = _args(shared_data, data_dir, os.path.relpath(out, REPO), tmp_path / "cache")
    _run(args, cache=tmp_path / "xla")

    # SFT: the LM loss on every sentence token falls; held-out loss on validation sentences.
    sft_log = _records(out / "sft.jsonl")
    assert [r["step"] for r in sft_log] == list(range(1, SFT_STEPS + 1))
    assert sft_log[-1]["loss"] < sft_log[0]["loss"] - 2.0, (sft_log[0], sft_log[-1])
    val_losses = [r["eval/val_loss"] for r in sft_log if "eval/val_loss" in r]
    assert len(val_losses) == 1 and val_losses[-1] < np.log(50257) - 2.0

    # RM: accuracy on the 128 held-out validation sentences (none of them trained on) clearly above
    # chance (the sample is 53% positive; 0.6 is more than 2 standard deviations of chance on 128 rows).
    rm_summary = json.loads((out / "rm_summary.json").read_text())
    assert rm_summary["val_rows"] == 128 and rm_summary["train_rows"] == 3000
    assert rm_summary["val_accuracy"] > 0.6, rm_summary
    norm = checkpoint.restore_meta(out, "rm")["reward_norm"]
    assert norm["rows"] == 64 and norm["std"] > 0

    # PPO: the RM score (the reward, --rl.reward_norm none) of responses to the fixed held-out prompts,
    # sampled with fixed keys, rises; KL to the SFT model is 0 at the start and finite after.
    summary = json.loads((out / "rl_summary.json").read_text())
    initial, final = summary["initial_eval"], summary["last"]
    assert summary["reward_norm"]["kind"] == "none"
    assert final["eval/val_rm_score"] > initial["val_rm_score"] + 0.2, (initial, final)
    assert final["eval/train_rm_score"] > initial["train_rm_score"] + 0.2, (initial, final)
    assert abs(initial["val_kl"]) < 1e-3 and abs(initial["val_kl_per_token"]) < 1e-3
    ppo_log = _records(out / "rl.jsonl")
    assert [r["step"] for r in ppo_log] == list(range(1, PPO_ITERATIONS + 1))
    kls = [r[k] for r in ppo_log for k in ("kl_per_token", "kl_per_sequence")]
    kls += [final[f"eval/{s}_{k}"] for s in ("val", "train") for k in ("kl", "kl_per_token")]
    assert np.all(np.isfinite(kls)) and final["eval/val_kl"] > 0, kls
    samples = _records(out / "rl_samples.jsonl")
    assert sorted({s["iteration"] for s in samples if s["split"] == "val"}) == [0, 6, 12]
    assert all(
        s["prompt"].startswith("<|endoftext|>") and isinstance(s["continuation"], str) for s in samples
    )
    for stage, steps in (("sft", SFT_STEPS), ("rm", RM_STEPS), ("rl", PPO_ITERATIONS)):
        assert checkpoint.latest_step(out, stage) == steps

    # The other RL wiring of the shared stage (jaxrlhf.pipeline.policy; TL;DR runs the same code) from the
    # same SFT and RM: GRPO (4 continuations of each of 8 prompts), PPO-ptx on the rest of the training
    # sentences, and Ziegler's normalisation on samples of the initial policy.
    grpo_out = tmp_path / "grpo"
    grpo_out.mkdir()
    for stage in ("sft", "rm"):
        (grpo_out / stage).symlink_to(out / stage)
    grpo_args = [a if a != os.path.relpath(out, REPO) else str(grpo_out) for a in args]
    # --resume: the symlinked sft and rm are finished and skipped, only rl runs (a fresh run over a
    # non-empty --out is refused).
    grpo_args += [
        "--resume",
        "--rl.iterations",
        "2",
        "--rl.eval_every",
        "2",
        "--rl.algo",
        "grpo",
    ]
    grpo_args += [
        "--rl.group_size",
        "4",
        "--rl.ptx_coef",
        "0.5",
        "--rl.reward_norm",
        "policy_gain_bias",
    ]
    grpo_args += ["--rl.norm_prompts", "64"]
    _run(grpo_args, cache=tmp_path / "xla")
    grpo_log = _records(grpo_out / "rl.jsonl")
    assert [r["step"] for r in grpo_log] == [1, 2]
    assert all(np.isfinite(r["ptx_loss"]) and 0.0 < r["ptx_loss"] < np.log(50257) for r in grpo_log)
    assert "value_loss" not in grpo_log[0] and "explained_variance" not in grpo_log[0]
    grpo_summary = json.loads((grpo_out / "rl_summary.json").read_text())
    norm = grpo_summary["reward_norm"]
    assert norm["kind"] == "policy_gain_bias" and norm["policy_samples"] == 64
    np.testing.assert_allclose(norm["gain"], 1.0 / norm["policy_std"], rtol=1e-4)
    np.testing.assert_allclose(norm["bias"], -norm["policy_mean"] / norm["policy_std"], rtol=1e-4, atol=1e-6)
    # Other samples of the same initial policy (other prompts, other keys) score about 0 after it.
    assert abs(grpo_summary["initial_eval"]["train_rm_score"]) < 0.6, grpo_summary["initial_eval"]

    # --resume on the finished run: nothing to do (every stage at its last step), not a byte of --out changed.
    before = _snapshot(out)
    log = _run([*args, "--resume"])
    assert log.strip().splitlines()[-1].startswith("nothing to do: "), log
    assert _snapshot(out) == before
