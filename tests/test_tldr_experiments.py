"""experiments/tldr: the data layout, the flags, the summary-only SFT loss, SFT from a local Hugging Face
directory of another architecture, and SFT -> RM -> PPO end to end (in subprocesses, on the shared TL;DR
samples, with a tiny random Llama over the 50257 GPT-2 BPE ids)."""

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

from experiments.tldr import recipe as common  # noqa: E402
from jaxrlhf import models, parallel, train  # noqa: E402
from jaxrlhf.data import load_tldr  # noqa: E402
from jaxrlhf.engine import checkpoint, flags  # noqa: E402
from jaxrlhf.models import ModelConfig  # noqa: E402
from jaxrlhf.rollout import SampleConfig, scoring  # noqa: E402
from jaxrlhf.stages import batches, instructgpt, reward  # noqa: E402
from jaxrlhf.stages import policy_programs as rl_programs  # noqa: E402
from jaxrlhf.stages import recipe as stage_recipe  # noqa: E402
from jaxrlhf.stages import setup as stage_setup  # noqa: E402
from jaxrlhf.text import GPT2Tokenizer  # noqa: E402


def parse_args(argv):
    """The TldrConfig of `argv`, parsed and checked as `python -m experiments.tldr` does."""
    return _helpers.parse_recipe(common.RECIPE, argv)


def model_config(cfg):
    """The model of --model / --init-from with block_size P + S."""
    return stage_setup.model_config(stage_setup.model_spec(cfg), *common.length(cfg))


@pytest.fixture(scope="module")
def tokenizer(shared_data):
    return GPT2Tokenizer.from_dir(shared_data / "gpt2_tokenizer")


# ----------------------------------------------------------------------------------------- data layout


def test_prompts_and_summaries_in_the_instructgpt_layout(tokenizer, shared_data, tmp_path):
    rows = load_tldr("test", shared_data / "tldr", cache_dir=tmp_path)[:40]
    long_post = " ".join(f"Sentence number {i} is here." for i in range(200))
    rows.append({"subreddit": "tifu", "title": "A title", "post": long_post, "summary": "word " * 100})
    rows.append({"subreddit": "AskReddit", "title": "very long title " * 40, "post": "x", "summary": "y"})
    p, s = 64, 16
    prompt, prompt_mask, kept = common.encode_prompts(tokenizer, rows, p)
    assert kept == list(range(len(rows) - 1)), "the row whose header cannot fit is dropped, no other"
    assert prompt.shape == (len(kept), p) and prompt_mask.dtype == bool
    assert np.all(prompt_mask[:, -1]) and np.all(prompt_mask[:, :-1] <= prompt_mask[:, 1:]), "left-padded"
    for ids, mask, i in zip(prompt, prompt_mask, kept, strict=True):
        text = tokenizer.decode(ids[mask])
        row = rows[i]
        assert text.startswith(f"SUBREDDIT: r/{row['subreddit']}\nTITLE: {row['title']}\nPOST: ")
        assert text.endswith("\nTL;DR:") and len(tokenizer.encode(text)) <= p

    # A tokenizer with a beginning-of-text id (Llama's) starts every prompt with it, within the budget.
    class WithBos:
        bos_id, pad_id = 50256, tokenizer.pad_id  # an id no prompt text makes
        encode, encode_many = tokenizer.encode, tokenizer.encode_many

    with_bos, bos_mask, bos_kept = common.encode_prompts(WithBos(), rows, p)
    assert bos_kept == kept and bos_mask.shape == (len(kept), p)
    for ids, mask in zip(with_bos, bos_mask, strict=True):
        real = ids[mask].tolist()
        assert real[0] == 50256 and 50256 not in real[1:] and tokenizer.decode(real[1:]).endswith("\nTL;DR:")
    cut = tokenizer.decode(prompt[-1][prompt_mask[-1]])
    assert "Sentence number 0 is here." in cut and "Sentence number 199" not in cut, "post cut to fit"
    assert cut.split("POST: ")[1].removesuffix("\nTL;DR:").endswith("here."), "cut at a sentence end"

    summaries = [rows[i]["summary"] for i in kept]
    answer, answer_mask = batches.encode_answers(tokenizer, summaries, s)
    for ids, mask, text in zip(answer, answer_mask, summaries, strict=True):
        real = ids[mask].tolist()
        assert real[-1] == tokenizer.eos_id and real.count(tokenizer.eos_id) == 1
        assert np.all(mask[: len(real)]) and not np.any(mask[len(real) :]), "right-padded"
        expected = tokenizer.encode(" " + text)[: s - 1]
        assert real[:-1] == expected, "' ' + summary, cut to S - 1 tokens, then <|endoftext|>"
    assert answer_mask[-1].all(), "the 100-word summary fills the budget and still ends in EOS"

    data = batches.PromptAnswers(prompt, prompt_mask, answer, answer_mask)
    idx = np.array([3, 0, 5])
    valid = np.array([True, True, False])
    batch = batches.lm_batch(data, idx, valid)
    np.testing.assert_array_equal(batch.tokens, np.concatenate([prompt[idx], answer[idx]], axis=1))
    np.testing.assert_array_equal(batch.mask, np.concatenate([prompt_mask[idx], answer_mask[idx]], axis=1))
    assert not batch.loss_mask[:, :p].any(), "no loss on prompt tokens"
    np.testing.assert_array_equal(batch.loss_mask[:, p:], answer_mask[idx] & valid[:, None])


def test_eval_rows_cover_every_row_once_in_fixed_shapes():
    rows = batches.eval_rows(10, 4)
    assert [len(idx) for idx, _ in rows] == [4, 4, 4]
    covered = np.concatenate([idx[valid] for idx, valid in rows])
    np.testing.assert_array_equal(covered, np.arange(10))


def test_train_rows_depend_only_on_the_step():
    a = [batches.train_rows(10, 4, step, seed=3) for step in range(6)]
    b = [batches.train_rows(10, 4, step, seed=3) for step in range(6)]
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert len(np.unique(np.concatenate(a[:2]))) == 8, "batches of one epoch do not repeat rows"


# ----------------------------------------------------------------------------------------------- flags


def test_help_lists_every_config_field_with_its_default():
    text = flags.make_parser(common.TldrConfig()).format_help()
    paths = flags.leaf_paths(common.TldrConfig)
    assert len(paths) > 60
    for leaf in flags.leaves(common.TldrConfig):
        assert flags.flag_names(leaf.flag_path)[0] in text, leaf.path
    assert "--rl.kl_target" in text and "--mesh-fsdp" in text and "(default: 0.05)" in text


def test_flags_set_nested_fields_and_refuse_bad_values(capsys):
    cfg = parse_args(
        [
            "--rl.kl_coef",
            "0.2",
            "--rl.kl_target",
            "6",
            "--resume",
            "--bf16",
            "false",
            "--mesh-fsdp",
            "2",
        ]
        + ["--sft.optim.lr", "1e-4", "--data.summary_val_split", "", "--init-from", "none"]
    )
    assert cfg.rl.rl.kl_coef == 0.2 and cfg.rl.rl.kl_target == 6.0 and cfg.rl.rl.resolved().epochs == 4
    assert cfg.resume is True and cfg.bf16 is False and cfg.mesh_fsdp == 2
    assert cfg.sft.optim.lr == 1e-4 and cfg.rm.optim.lr == reward.RewardStageConfig().optim.lr
    assert cfg.data.summary_val_split == "" and cfg.init_from is None
    grpo = parse_args(
        ["--rl.algo", "grpo", "--rl.group_size", "4", "--rl.ptx_coef", "0.5"]
        + ["--rl.reward_norm", "policy_gain_bias", "--rl.norm_prompts", "64"]
    )
    assert grpo.rl.rl.group_size == 4 and grpo.rl.rl.ptx_coef == 0.5 and grpo.rl.norm_prompts == 64
    for bad in (["--rl.kl_kind", "k9"], ["--model", "gpt5"], ["--sft.steps", "1.5"]):
        with pytest.raises(SystemExit):
            parse_args(bad)
    assert "error" in capsys.readouterr().err
    # Options this stage would ignore, or a KL estimator with the wrong gradient in the reward: refused.
    for bad, why in (
        (["--rl.group_size", "4"], "group_size acts for grpo, rloo and reinforce_pp only"),
        (["--rl.kl_kind", "k3"], "only k1"),
        (["--rl.algo", "grpo", "--rl.group_size", "3"], "not a whole number of groups"),
        (
            ["--rl.algo", "rloo", "--rl.group_size", "4", "--rl.vf_coef", "0.5"],
            "--rl.vf_coef does",
        ),
        (
            ["--rl.algo", "grpo", "--rl.group_size", "4", "--rl.value_lr", "1e-5"],
            "--rl.value_lr does",
        ),
        (
            ["--rl.algo", "pg", "--rl.epochs", "2", "--rl.lam", "0.9"],
            "--rl.epochs, --rl.lam do",
        ),
        (["--rl.norm_prompts", "64"], "--rl.norm_prompts does nothing"),
        (["--rl.reward_norm", "std"], "choose one of reference_mean, policy_gain_bias, none"),
        (["--rl.batch_size", "0"], "--rl.batch_size 0; it must be >= 1"),
    ):
        with pytest.raises(SystemExit):
            parse_args(bad)
        assert why in capsys.readouterr().err, bad


# ------------------------------------------------------------------------------------------ SFT loss


def test_summary_only_sft_step_matches_the_library_lm_step():
    """The LM head on summary positions only gives the loss and gradients of train.make_lm_step."""
    cfg = ModelConfig(vocab_size=61, block_size=12, n_layer=2, n_head=2, n_embd=16)
    p, s, b = 7, 5, 3
    key = jax.random.key(0)
    params = models.init_params(key, cfg)
    tokens = np.asarray(jax.random.randint(jax.random.fold_in(key, 1), (b, p + s), 0, 61), np.int32)
    prompt_mask = np.arange(p)[None, :] >= np.array([0, 2, 5])[:, None]  # left-padded
    summary_mask = np.arange(s)[None, :] < np.array([5, 1, 3])[:, None]  # right-padded
    batch = train.LMBatch(
        tokens=tokens,
        mask=np.concatenate([prompt_mask, summary_mask], axis=1),
        loss_mask=np.concatenate([np.zeros_like(prompt_mask), summary_mask], axis=1),
    )
    tx = train.make_optimizer(train.OptimConfig(lr=1e-2))
    state = train.init_train_state(params, tx)
    new, metrics = jax.jit(train.make_lm_step(cfg, tx, prompt_len=p))(state, batch)
    ref_new, ref_metrics = jax.jit(train.make_lm_step(cfg, tx))(state, batch)
    np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5)
    np.testing.assert_allclose(metrics["grad_norm"], ref_metrics["grad_norm"], rtol=1e-5)
    jax.tree.map(
        lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), new.params, ref_new.params
    )
    nll, n = jax.jit(train.make_lm_eval(cfg, prompt_len=p))(params, batch)
    ref_nll, ref_n = jax.jit(train.make_lm_eval(cfg))(params, batch)
    np.testing.assert_allclose(nll, ref_nll, rtol=1e-5)
    assert float(n) == float(ref_n) == 9.0
    assert jnp.isfinite(metrics["loss"])


# ----------------------------------------------------------------------------------------------- PPO


def test_value_model_starts_as_the_normalised_reward_model():
    cfg = ModelConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=8)
    rm = models.init_scalar_model(jax.random.key(0), cfg)
    rm["head"] = models.init_scalar_head(jax.random.key(1), cfg, scale=1.0)
    norm = {"gain": 4.0, "bias": -1.2}
    tokens = jax.random.randint(jax.random.key(2), (3, 8), 0, 50)
    mask = np.arange(8)[None, :] < np.array([8, 5, 2])[:, None]
    value = scoring.value_from_reward_model(rm, norm)
    scores = jax.jit(models.sequence_scores, static_argnums=3)  # eager, the GPT is op-by-op and slow
    expected = 4.0 * scores(rm, tokens, mask, cfg) - 1.2
    np.testing.assert_allclose(scores(value, tokens, mask, cfg), expected, rtol=1e-5, atol=1e-6)


def test_ppo_iteration_sharded_equals_single_device():
    """Two PPO iterations + an evaluation on a (data 4, fsdp 2) mesh of 8 CPU devices give the
    single-device numbers: the programs are written on the global batch and only the shardings differ."""
    cfg = ModelConfig(vocab_size=128, block_size=10, n_layer=1, n_head=2, n_embd=32)  # leaves big enough
    b, p, r, eos = 8, 6, 4, 3  # for the FSDP rule to split them
    k_policy, k_rm, k_head, k_prompt, k_run = jax.random.split(jax.random.key(0), 5)
    policy = models.init_params(k_policy, cfg)
    rm = {"gpt": models.init_params(k_rm, cfg), "head": models.init_scalar_head(k_head, cfg, scale=1.0)}
    norm = {"gain": 2.0, "bias": -0.2}
    rl_cfg = train.RLConfig(kl_coef=0.05, epochs=2, minibatches=2, no_eos_penalty=-1.0)
    sample_cfg = SampleConfig(max_new_tokens=r, eos_id=eos, pad_id=eos)
    prompt = np.asarray(jax.random.randint(k_prompt, (b, p), 4, 128), np.int32)
    prompt_mask = np.arange(p)[None, :] >= np.array([0, 1, 2, 3, 0, 5, 4, 0])[:, None]

    def run(mesh):
        # SGD: Adam turns rounding-level differences of near-zero gradients into lr-sized steps.
        tx = optax.sgd(0.05)
        params = train.init_rl_params(policy, scoring.value_from_reward_model(rm, norm), rl_cfg)
        state = parallel.put(train.init_rl_state(params, tx, rl_cfg), mesh)
        ref_params, rm_params = parallel.put(policy, mesh), parallel.put(rm, mesh)
        iteration = rl_programs.jit_iteration(
            rl_programs.make_iteration(cfg, sample_cfg, tx, rl_cfg, norm, cfg),
            mesh, state, ref_params, rm_params,
        )  # fmt: skip
        evaluate = rl_programs.jit_evaluate(
            rl_programs.make_evaluate(cfg, sample_cfg, cfg, learned=True),
            mesh, state.params["policy"], ref_params, rm_params,
        )  # fmt: skip
        batch = parallel.shard_batch((prompt, prompt_mask), mesh)
        history = []
        for i in range(2):
            key = jax.random.fold_in(k_run, i)
            state, metrics, _ = iteration(state, ref_params, rm_params, *batch, key, None)
            history.append({k: float(v) for k, v in jax.device_get(metrics).items()})
        rows, rollout = evaluate(state.params["policy"], ref_params, rm_params, *batch, k_run)
        return history, jax.device_get(rows), jax.device_get(rollout.response), jax.device_get(state.params)

    single = run(parallel.make_mesh(1, 1, devices=jax.devices()[:1]))
    mesh = parallel.make_mesh(data=4, fsdp=2)
    sharded = run(mesh)
    assert parallel.tree_shardings(policy, mesh)["wte"].spec != (), "the FSDP rule splits the embedding"
    # atol 1e-5 on metrics and per-row KL: they are differences of float32 sums of ~20-nat sequence
    # logprobs, so a different reduction order alone moves them by a few 1e-6.
    for got, want in zip(sharded[0], single[0], strict=True):
        assert got.keys() == want.keys() and want["finite"] == 1.0 and want["approx_kl"] > 0
        for k in want:
            np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-5, err_msg=k)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5), sharded[1], single[1])
    np.testing.assert_array_equal(sharded[2], single[2])
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), sharded[3], single[3])


def test_sft_starts_from_a_local_hugging_face_directory_of_another_architecture(
    shared_data, tmp_path, capsys
):
    """--init-from a Qwen3 directory (qk-norm, head_dim != width / heads, GQA) written by transformers: the
    architecture comes from its config.json, and SFT at learning rate 1e-12 ends on its weights. A
    --model that contradicts the directory is refused before any work."""
    import torch
    import transformers

    from jaxrlhf.models import hf

    torch.manual_seed(0)
    config = transformers.Qwen3Config(
        vocab_size=50257, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=128, tie_word_embeddings=True,
    )  # fmt: skip
    transformers.Qwen3ForCausalLM(config).save_pretrained(tmp_path / "qwen3")
    out = tmp_path / "run"
    argv = [
        "--init-from", str(tmp_path / "qwen3"), "--out", str(out), "--progress", "false", "--stages", "sft",
        "--data.data_dir", str(shared_data / "tldr"), "--data.cache_dir", str(tmp_path / "cache"),
        "--data.tokenizer_dir", str(shared_data / "gpt2_tokenizer"), "--data.summary_split", "test",
        "--data.summary_val_split", "", "--data.val_size", "16", "--data.max_val_rows", "16",
        "--data.max_prompt_tokens", "64", "--data.max_summary_tokens", "8",
        "--sft.steps", "1", "--sft.batch_size", "8", "--sft.eval_batch_size", "16", "--sft.optim.lr", "1e-12",
        "--sft.optim.warmup_steps", "0", "--compile-cache", "",
    ]  # fmt: skip
    with pytest.raises(SystemExit):
        parse_args(["--model", "gpt2", *argv])
    assert "--model gpt2 is not the architecture of --init-from" in capsys.readouterr().err
    assert not out.exists()
    assert stage_recipe.main(common.RECIPE, argv) == 0
    cfg = parse_args(argv)
    mcfg = model_config(cfg)
    assert mcfg.qk_norm and mcfg.head_dim == 16 and mcfg.kv_heads == 2 and mcfg.block_size == 72
    one_device = parallel.make_mesh(1, 1, devices=jax.devices()[:1])
    state, _ = checkpoint.restore(out, "sft", jax.eval_shape(instructgpt.sft_state_init(common.Setup(
        cfg, mcfg, None, "", one_device)), jax.random.key(0)))  # fmt: skip
    weights, _ = hf.load(tmp_path / "qwen3", mcfg)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(weights), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-8)
    assert np.isfinite(_records(out / "sft.jsonl")[0]["loss"])


# ---------------------------------------------------------------------------------------- end to end

SFT_STEPS, RM_STEPS, PPO_ITERATIONS, PPO_STOP = 60, 60, 16, 12


def _pipeline_args(shared_data, out, cache):
    """tiny-llama (2 layers, width 64, RMSNorm, RoPE, SwiGLU, GQA 4 / 2) over the 50257 BPE ids, on P = 64
    prompt and S = 16 summary tokens.
    SFT runs long enough for the policy to be far from uniform over the vocabulary (summary loss ~6):
    from a near-uniform policy no sampled token recurs and PPO has nothing to learn from."""
    tiny = [
        "--model", "tiny-llama", "--out", str(out), "--progress", "false",
        "--data.data_dir", str(shared_data / "tldr"), "--data.cache_dir", str(cache),
        "--data.tokenizer_dir", str(shared_data / "gpt2_tokenizer"),
        "--data.summary_split", "test", "--data.summary_val_split", "", "--data.comparison_val_split", "",
        "--data.val_size", "64", "--data.max_val_rows", "64",
        "--data.max_prompt_tokens", "64", "--data.max_summary_tokens", "16",
    ]  # fmt: skip
    stages = [
        "--sft.steps", SFT_STEPS, "--sft.batch_size", 16, "--sft.eval_batch_size", 32, "--sft.eval_every", 30,
        "--sft.ckpt_every", 30, "--sft.log_every", 1, "--sft.optim.lr", 1e-2, "--sft.optim.warmup_steps", 0,
        "--rm.steps", RM_STEPS, "--rm.batch_size", 16, "--rm.eval_batch_size", 32, "--rm.eval_every", 30,
        "--rm.log_every", 1, "--rm.optim.lr", 1e-2, "--rm.optim.warmup_steps", 0, "--rm.norm_rows", 64,
        "--rl.iterations", PPO_ITERATIONS, "--rl.batch_size", 16, "--rl.eval_every", 8,
        "--rl.eval_batches", 2, "--rl.sample_every", 4, "--rl.ckpt_every", 4, "--rl.optim.lr", 2e-3,
        "--rl.optim.schedule", "constant", "--rl.epochs", 2, "--rl.minibatches", 2,
    ]  # fmt: skip
    return tiny + [str(x) for x in stages]


def _run_pipeline(args, devices: int, cache=None):
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": str(devices), "HF_HUB_OFFLINE": "1", "JAXRLHF_DATA_DIR": ""}
    # A persistent XLA cache shared by the calls of one test: same programs compile once ("": none).
    args = [*args, "--compile-cache", "" if cache is None else str(cache)]
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.tldr", *args],
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


def test_sft_rm_ppo_end_to_end_with_resume(shared_data, tmp_path):
    out, cache = tmp_path / "run", tmp_path / "cache"
    # `--out` relative to the repository root, where the command runs: orbax >= 0.12 refuses relative
    # checkpoint paths, so this is what a user's `--out runs/tldr` goes through.
    args = _pipeline_args(shared_data, os.path.relpath(out, REPO), cache)
    # First call: every stage, PPO stopped after 12 iterations (a preemption after the step-12 checkpoint).
    xla_cache = tmp_path / "xla"
    log = _run_pipeline([*args, "--stop-after", f"rl:{PPO_STOP}"], devices=1, cache=xla_cache)
    assert "rl stopped before its last step" in log
    assert checkpoint.all_steps(out, "rl") == [8, 12], "the newest two checkpoints are kept"
    first_ppo = _records(out / "rl.jsonl")
    assert [r["step"] for r in first_ppo] == list(range(1, PPO_STOP + 1))
    # Second call: resume onto another mesh (2 devices, data parallel; FSDP: the sharded test above).
    log = _run_pipeline([*args, "--resume"], devices=2)
    assert "sft: finished earlier, skipped" in log and "rm: finished earlier, skipped" in log

    # SFT: the summary loss falls, held-out loss measured.
    sft_log = _records(out / "sft.jsonl")
    assert [r["step"] for r in sft_log] == list(range(1, SFT_STEPS + 1))
    assert sft_log[-1]["loss"] < sft_log[0]["loss"] - 1.0
    val_losses = [r["eval/val_loss"] for r in sft_log if "eval/val_loss" in r]
    assert len(val_losses) == 2 and val_losses[-1] < val_losses[0] < np.log(50257)

    # RM: held-out accuracy on carved-out comparisons, and the normalisation in the checkpoint meta.
    rm_summary = json.loads((out / "rm_summary.json").read_text())
    assert 0.0 <= rm_summary["val_accuracy"] <= 1.0 and rm_summary["val_pairs"] == 64
    norm = checkpoint.restore_meta(out, "rm")["reward_norm"]
    assert norm["rows"] == 64 and norm["std"] > 0 and np.isfinite(norm["mean"])

    # PPO: continued from step 12 to the end (no step repeated or missing); the score PPO maximises (the
    # normalised RM score, -1 for a summary without end-of-text) rises on a fixed set of training prompts
    # sampled with fixed keys; KL to the SFT model stays finite; held-out reward and KL are measured.
    ppo_log = _records(out / "rl.jsonl")
    assert [r["step"] for r in ppo_log] == list(range(1, PPO_ITERATIONS + 1))
    assert ppo_log[:PPO_STOP] == first_ppo, "records before the resume point are kept as they were"
    assert checkpoint.restore_meta(out, "rl")["step"] == PPO_ITERATIONS
    summary = json.loads((out / "rl_summary.json").read_text())
    initial, final = summary["initial_eval"], summary["last"]
    assert final["eval/train_score"] > initial["train_score"] + 0.2, (initial, final)
    kls = [r["kl_per_sequence"] for r in ppo_log] + [
        r[k] for r in ppo_log for k in r if k.startswith("eval/") and k.endswith("_kl")
    ]
    assert len(kls) == PPO_ITERATIONS + 4 and np.all(np.isfinite(kls)) and np.all(np.abs(kls) < 50.0), kls
    assert abs(initial["val_kl"]) < 1e-3, "the policy starts as the reference"
    for key in ("val_score", "val_rm_score", "val_finished", "val_length"):
        assert np.isfinite(final[f"eval/{key}"]) and np.isfinite(initial[key])
    samples = _records(out / "rl_samples.jsonl")
    assert sorted({s["iteration"] for s in samples if s["split"] == "val"}) == [0, 8, 16]
    assert sorted({s["iteration"] for s in samples if s["split"] == "train"}) == [4, 8, 12, 16]
    assert all(s["prompt"].endswith("TL;DR:") and isinstance(s["summary"], str) for s in samples)

    for stage, steps in (("sft", SFT_STEPS), ("rm", RM_STEPS), ("rl", PPO_ITERATIONS)):
        assert checkpoint.latest_step(out, stage) == steps
        assert (out / f"{stage}_summary.json").exists()
