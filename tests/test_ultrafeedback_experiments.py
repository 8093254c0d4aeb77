"""experiments/ultrafeedback: the filter's counts against a hand count, the chat-templated prompt layout, the
pair update's wiring, a Hugging Face reward model with another tokenizer (re-tokenized, against
transformers), and the whole pipeline end to end (rm, then 2 iterations of generate -> score -> filter ->
rebel) on a tiny Llama "instruct" model over the shared UltraFeedback sample, then the same run's rm and
first iteration stopped in the middle of every kind of stage and resumed, which must end with the same
result.

The base model is the local Hugging Face directory of scripts/tiny_chat_model.py, built here: a byte-level
BPE of 1,024 ids trained on the sample's text plus Llama 3's special tokens and the real Llama 3.2 chat
template, and a random tiny Llama given 40 LM steps on chat-templated prompts with answers cut to 3-12
tokens, so that it ends its turns (a random model never emits <|eot_id|> within the budget)."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from etils import epath

REPO = pathlib.Path(__file__).resolve().parents[1]

from experiments.ultrafeedback import encoding, stages  # noqa: E402
from experiments.ultrafeedback import recipe as common  # noqa: E402
from jaxrlhf import data, models, ops, train  # noqa: E402
from jaxrlhf.engine import flags  # noqa: E402
from jaxrlhf.stages import online  # noqa: E402
from jaxrlhf.stages import preference as pairs  # noqa: E402
from jaxrlhf.stages import recipe as stage_recipe  # noqa: E402
from jaxrlhf.text import HFTokenizer  # noqa: E402

sys.path.insert(0, str(REPO / "scripts"))
import tiny_chat_model  # noqa: E402

DATE = tiny_chat_model.DATE


def parse_args(argv):
    """The UfConfig of `argv`, parsed and checked as `python -m experiments.ultrafeedback` does."""
    r = stages.RECIPE
    return flags.parse_checked(
        r.defaults, argv, check=r.check, inactive=r.inactive, renamed=r.renamed, adjust=r.adjust
    )


@pytest.fixture(scope="module")
def base_dir(shared_data, tmp_path_factory) -> pathlib.Path:
    """The tiny Llama "instruct" model directory of scripts/tiny_chat_model.py (see the module doc)."""
    out = tmp_path_factory.mktemp("uf")
    return tiny_chat_model.build(out / "base", shared_data / "ultrafeedback", cache_dir=out / "cache")


# ------------------------------------------------------------------------------------------- flags


def test_flags_list_every_field_and_refuse_what_does_nothing(shared_data, tmp_path, capsys):
    text = flags.make_parser(common.UfConfig()).format_help()
    assert len(flags.leaf_paths(common.UfConfig)) == len(flags.leaves(common.UfConfig))
    for leaf in flags.leaves(common.UfConfig):
        assert flags.flag_names(leaf.flag_path)[0] in text, leaf.path
    cfg = parse_args(["--model", "tiny-llama", "--iterations", "3", "--stop-after", "rebel_3:2"])
    assert common.instance_names(cfg)[-4:] == ["generate_3", "score_3", "filter_3", "rebel_3"]
    assert common.stop_after_for(cfg, "rebel_3") == 2 and common.stop_after_for(cfg, "rebel_2") is None
    for bad, why in (
        (["--rebel.algo", "ppo"], "--rebel.algo 'ppo'; use one of rebel, dpo, ipo"),
        (["--score.reward", "hf"], "pass a directory with reward 'hf'"),
        (["--stop-after", "generate:1"], "use STAGE:N with a stage of this run, e.g. rebel_1:3"),
        (["--iteration", "3"], "--iteration 3; use 0 (all) or one of 1..iterations 2"),
        (["--rebel.beta", "0.5"], "--rebel.beta does nothing with --rebel.algo rebel"),
        (["--rebel.algo", "dpo", "--rebel.eta", "2"], "--rebel.eta does nothing with --rebel.algo dpo"),
        (
            ["--score.reward", "vader"],
            "--stages rm trains a reward model that --score.reward vader does not use",
        ),
        (["--filter.max_answer_tokens", "2000"], "the sampler's budget; lower it"),
        (["--generate.answers", "1"], "--generate.answers 1; it must be >= 2"),
        (["--generate.temperature", "0"], "sample with a temperature > 0"),
    ):
        with pytest.raises(SystemExit):
            parse_args(["--model", "tiny-llama", *bad])
        err = capsys.readouterr().err
        assert why in err and err.count("\n") == 1, (bad, err)
    # A tokenizer without a chat template is refused before anything is written. (The per-stage
    # commands, e.g. experiments.ultrafeedback.rebel refusing --stages, are gone: one entry, --stages.)
    out = tmp_path / "out"
    argv = ["--model", "tiny-llama", "--out", str(out), "--compile-cache", "",
            "--data.tokenizer_dir", str(shared_data / "gpt2_tokenizer")]  # fmt: skip
    code = stage_recipe.main(stages.RECIPE, argv)
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "has no chat template" in err, err
    assert not out.exists()


# ------------------------------------------------------------------------------------------ filter


def test_filter_drops_and_counts_against_a_hand_count():
    """3 answers per prompt; eot = 9 is special and not counted; limit 3 tokens."""
    eot, pad = 9, 0
    answers = [
        # prompt 0: answers 0 and 1 are the same text (1 dropped as a duplicate); pair (2, 0)
        ([1, 2, eot], True, 0.5), ([1, 2, eot], True, 0.9), ([3, eot, pad], True, 0.7),
        # prompt 1: every answer scores 0.2: tied, skipped
        ([1, eot, pad], True, 0.2), ([2, eot, pad], True, 0.2), ([4, 4, eot], True, 0.2),
        # prompt 2: one unfinished, one of 4 real tokens (too long), one left: too few
        ([5, 5, 5], False, 1.0), ([5, 6, 7], True, 0.0), ([6, eot, pad], True, 0.3),
        # prompt 3: special tokens are not counted: [1, 2, 3, eot] has 3 tokens and fits; pair (9, 11)
        ([1, 2, 3], True, 2.0), ([eot, pad, pad], True, 0.1), ([2, eot, pad], True, -1.0),
    ]  # fmt: skip
    response = np.array([a for a, _, _ in answers])
    mask = response != pad
    mask[7] = [True, True, True]  # row 7: 3 tokens + an eot beyond the row: give it 4 real tokens
    response = np.concatenate([response, np.full((12, 1), eot)], axis=1)
    mask = np.concatenate([mask, np.zeros((12, 1), bool)], axis=1)
    mask[7, 3] = True
    response[7, 3] = 8  # a fourth real token
    rows = {"response": response, "response_mask": mask, "finished": np.array([f for _, f, _ in answers])}
    rewards = np.array([r for _, _, r in answers], np.float32)
    sel = pairs.filter_answers(rows, rewards, 3, special_ids={eot}, max_answer_tokens=3, min_answer_tokens=1)
    # Row 10 is the end-of-turn alone: 0 tokens, too short.
    assert (sel.num_duplicate, sel.num_tied, sel.num_unfinished, sel.num_too_long) == (1, 1, 1, 1)
    assert (sel.num_too_short, sel.num_too_few) == (1, 1)
    np.testing.assert_array_equal(sel.prompt_index, [0, 3])
    np.testing.assert_array_equal(sel.chosen_index, [2, 9])
    np.testing.assert_array_equal(sel.rejected_index, [0, 11])
    stats = pairs.selection_stats(sel)
    assert stats["pairs"] == 2 and stats["skipped_tied"] == 1
    np.testing.assert_allclose(stats["mean_reward_margin"], ((0.7 - 0.5) + (2.0 + 1.0)) / 2, rtol=1e-6)


# ----------------------------------------------------------------------------------- pair update


def test_pair_step_dpo_learns_and_skips_padding(tiny_cfg):
    """DPO through the pair stage's step: the loss falls over the passes of one batch, and a batch of
    padding alone leaves the state unchanged (Adam's momentum must not move the policy on no data)."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, tiny_cfg.vocab_size, (8, 2, 12)).astype(np.int32)
    mask = np.ones((8, 2, 12), bool)
    loss_mask = np.zeros((8, 2, 12), bool)
    loss_mask[..., 6:] = True
    params = models.init_params(jax.random.key(1), tiny_cfg)
    ref = np.asarray(
        train.pair_logprobs(params, train.PrefBatch(tokens, mask, loss_mask, None, None, None), tiny_cfg)
    )
    batch = train.PrefBatch(tokens, mask, loss_mask, ref, np.zeros((8, 2), np.float32), np.ones(8, bool))

    class FakeSetup:
        model_cfg = tiny_cfg

    for algo in ("dpo",):
        pcfg = pairs.PairStageConfig(algo=algo, epochs=6, optim=train.OptimConfig(lr=1e-2, weight_decay=0.0))
        tx = pcfg.optimizer(8)
        step = jax.jit(pairs.make_pair_step(FakeSetup, pcfg, tx))
        state = train.init_train_state(params, tx)
        new, metrics = step(state, batch, key=None)
        assert float(metrics["final_loss"]) < float(metrics["initial_loss"]) - 0.05, (algo, metrics)
        padding = batch._replace(pair_mask=np.zeros(8, bool))
        same, _ = step(new, padding, key=None)
        for a, b in zip(jax.tree.leaves(same.params), jax.tree.leaves(new.params), strict=True):
            np.testing.assert_array_equal(a, b)


# -------------------------------------------------------------------------------------- the prompts


def _args(base_dir, shared_data, out, tmp) -> list[str]:
    """Prompts of at most 128 tokens, answers of at most 24 (+ the end-of-turn), reward-model pairs with
    answers of at most 256; 16 prompts x 4 answers per iteration."""
    args = [
        "--init-from", base_dir, "--out", out, "--progress", "false",
        "--data.data_dir", shared_data / "ultrafeedback", "--data.cache_dir", tmp / "cache",
        "--data.max_prompt_tokens", 128, "--data.max_answer_tokens", 24, "--data.rm_answer_tokens", 256,
        "--rm.steps", 24, "--rm.batch_size", 16, "--rm.eval_every", 24, "--rm.ckpt_every", 5,
        "--rm.norm_rows", 32, "--rm.optim.lr", 1e-3, "--rm.optim.warmup_steps", 0,
        "--generate.prompts", 16, "--generate.answers", 4, "--generate.batch_size", 8,
        "--score.batch_size", 32, "--rebel.batch_size", 8, "--rebel.ckpt_every", 1,
        "--rebel.optim.lr", 1e-4, "--rebel.optim.schedule", "constant",
    ]  # fmt: skip
    return [str(a) for a in args]


def test_prompts_are_the_chat_template_left_padded_and_long_ones_are_counted(base_dir, shared_data, tmp_path):
    cfg = parse_args(_args(base_dir, shared_data, tmp_path / "out", tmp_path))
    setup = common.make_setup(cfg)
    try:
        prompts, counts = encoding.iteration_prompts(setup, 2)
        tok = setup.tokenizer
        rows = data.load_ultrafeedback("train", shared_data / "ultrafeedback", cache_dir=tmp_path / "cache")
        # An independent count: a prompt's tokens without the special ones.
        too_long = 0
        for r in rows:
            text = tok.render_chat([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True,
                                   date_string=DATE)  # fmt: skip
            ids = tok.encode(text)
            too_long += sum(i not in tok.special_ids for i in ids) > 128
        assert counts == {"train_prompts": 1000, "dropped_empty_prompt": 0, "dropped_long_prompt": too_long}
        assert 0 < too_long < 1000
        assert len(prompts.index) == 16
        for ids, mask, i, text in zip(
            prompts.prompt, prompts.prompt_mask, prompts.index, prompts.texts, strict=True
        ):
            assert text == rows[i]["prompt"]
            assert mask[-1] and np.all(np.diff(mask.astype(int)) >= 0)  # left-padded
            want = tok.render_chat(
                [{"role": "user", "content": text}], add_generation_prompt=True, date_string=DATE
            )
            assert tok.decode(ids[mask]) == want and want.startswith(
                "<|begin_of_text|><|start_header_id|>system"
            )
            assert want.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
        # Iteration 2 takes the next 16 prompts that fit after iteration 1's.
        first, _ = encoding.iteration_prompts(setup, 1)
        assert first.index[-1] < prompts.index[0]
    finally:
        setup.close()


def test_hf_reward_model_with_another_tokenizer_is_re_tokenized_and_scores_as_transformers(
    base_dir, shared_data, tmp_path
):
    """A LlamaForSequenceClassification with its own tokenizer (another vocabulary, Llama 3.1's template):
    each (prompt, answer) is rendered with the reward model's template and tokenized with its tokenizer,
    and the scores equal transformers' on those ids."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    rm_dir = tmp_path / "rm"
    ids = tiny_chat_model.tokenizer_dir(
        rm_dir, shared_data / "ultrafeedback", vocab_size=600, template="llama3.1"
    )
    rm_tok = HFTokenizer.from_dir(rm_dir)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=rm_tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, num_labels=1,
        pad_token_id=ids["<|end_of_text|>"], tie_word_embeddings=False,
    )  # fmt: skip
    reference = transformers.LlamaForSequenceClassification(config).eval()
    with torch.no_grad():
        reference.score.weight.normal_(0.0, 1.0)
    reference.save_pretrained(rm_dir)
    args = _args(base_dir, shared_data, tmp_path / "out", tmp_path)
    args += [
        "--stages",
        "generate,score,filter,rebel",
        "--score.reward",
        "hf",
        "--score.reward_model",
        str(rm_dir),
    ]
    setup = common.make_setup(parse_args(args))
    try:
        assert stages.same_tokenizer(setup.tokenizer, setup.tokenizer)
        assert not stages.same_tokenizer(setup.tokenizer, rm_tok)
        scorer, retokenized = stages.hf_scorer(setup)
        assert retokenized
        texts = [
            {"prompt": "How do I boil an egg?", "answers": ["Put it in boiling water.", "Eggs.", "No idea"]},
            {"prompt": "Name a colour.", "answers": ["Blue", "I like green a lot"]},
        ]
        ours = scorer({}, texts)
        want = []
        for rec in texts:
            for answer in rec["answers"]:
                conv = [{"role": "user", "content": rec["prompt"]}, {"role": "assistant", "content": answer}]
                rm_ids = rm_tok.apply_chat_template(conv, date_string=DATE).ids
                with torch.no_grad():
                    want.append(float(reference(torch.tensor([rm_ids])).logits[0, 0]))
        np.testing.assert_allclose(ours, want, rtol=1e-4, atol=1e-4)
        assert np.std(want) > 1e-3
    finally:
        setup.close()


# ----------------------------------------------------------------------------------- end to end


def _run(args, cache, check=True):
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": "1", "HF_HUB_OFFLINE": "1", "JAXRLHF_DATA_DIR": ""}
    # A persistent XLA cache shared by the calls of one test: each program compiles once.
    env.update(JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.ultrafeedback", *args, "--compile-cache", str(cache)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _data_files(out: pathlib.Path) -> dict:
    """Every written array and text of the iterations (timing fields left out)."""
    files = {}
    for p in sorted(out.glob("iter_*/**/*")):
        if p.suffix == ".npz":
            with np.load(p) as z:
                files[str(p.relative_to(out))] = {k: z[k] for k in z.files}
        elif p.suffix in (".jsonl", ".json"):
            files[str(p.relative_to(out))] = p.read_text()
    for p in out.glob("iter_*/*.json"):
        record = json.loads(p.read_text())
        files[str(p.relative_to(out))] = {
            k: v for k, v in record.items() if "_s" not in k and "per_s" not in k
        }
    return files


@pytest.mark.filterwarnings("ignore")
def test_pipeline_end_to_end_then_killed_in_every_stage_and_resumed(base_dir, shared_data, tmp_path):
    cache = tmp_path / "xla"
    out = tmp_path / "a"
    # --out relative to the repository root, where the command runs, as a user's `--out runs/uf`.
    _run(_args(base_dir, shared_data, os.path.relpath(out, REPO), tmp_path), cache)

    # rm: Bradley-Terry on the sample's pairs that fit, accuracy on held-out pairs.
    rm = json.loads((out / "rm_summary.json").read_text())
    assert rm["train_counts"]["rows"] == 1000 and rm["train_pairs"] == rm["train_counts"]["pairs"] > 16
    assert rm["val_pairs"] > 0 and 0.0 <= rm["val_accuracy"] <= 1.0

    cfg = parse_args(_args(base_dir, shared_data, out, tmp_path))
    setup = common.make_setup(cfg)
    tok = setup.tokenizer
    try:
        for t in (1, 2):
            root = out / f"iter_{t}"
            gen = json.loads((root / "generate.json").read_text())
            rows = online.read_shards(epath.Path(root / "generate"), gen["shards"])
            texts = [
                json.loads(x)
                for k in range(gen["shards"])
                for x in (root / "generate" / f"shard_{k:05d}.jsonl").read_text().splitlines()
            ]
            assert len(rows["response"]) == 64 == 4 * len(texts)
            # The layout: [PAD]... PROMPT | ANSWER <stop> [PAD]...; prompts decode to the template's text.
            pm, rm_ = rows["prompt_mask"], rows["response_mask"]
            assert pm[:, -1].all() and (np.diff(pm.astype(int), axis=1) >= 0).all()
            assert rm_[:, 0].all() and (np.diff(rm_.astype(int), axis=1) <= 0).all()
            for i in range(0, 64, 4):
                want = tok.render_chat([{"role": "user", "content": texts[i // 4]["prompt"]}],
                                       add_generation_prompt=True, date_string=DATE)  # fmt: skip
                assert tok.decode(rows["prompt"][i][pm[i]]) == want
            stop = np.isin(rows["response"], list(tok.stop_ids)) & rm_
            last = rm_.sum(1) - 1
            np.testing.assert_array_equal(
                stop[np.arange(64), last], rows["finished"]
            )  # a finished row ends on its stop id
            assert 0.5 < rows["finished"].mean() < 1.0, rows["finished"].mean()
            # The filter's counts, recounted here from the rows and the scores.
            scores = online.read_shards(epath.Path(root / "score"), gen["shards"])["scores"]
            stats = json.loads((root / "filter.json").read_text())
            content = (rm_ & ~np.isin(rows["response"], list(tok.special_ids))).sum(1)
            unfinished = (~rows["finished"]).sum()
            usable = rows["finished"] & (content >= 1) & (content <= 24)
            assert stats["dropped_unfinished"] == unfinished
            assert (
                stats["dropped_unfinished"] + stats["dropped_too_long"] + stats["dropped_too_short"]
                == (~usable).sum()
            )
            selected = dict(np.load(root / "filter" / "pairs.npz"))
            assert stats["pairs"] == len(selected["chosen"]) > 4
            assert stats["pairs"] + stats["skipped_tied"] + stats["skipped_too_few"] == 16
            for c, r in zip(selected["chosen"], selected["rejected"], strict=True):
                group = np.arange(c // 4 * 4, c // 4 * 4 + 4)
                ok = group[usable[group]]
                assert r // 4 == c // 4 and scores[c] == scores[ok].max() and scores[r] == scores[ok].min()
            # REBEL: within each batch the regression loss falls over the epochs; over the pairs the
            # log-ratio gap moves toward eta x the reward difference.
            log = [json.loads(x) for x in (out / f"rebel_{t}.jsonl").read_text().splitlines()]
            assert len(log) == -(-stats["pairs"] // 8) and all(
                r["final_loss"] < r["initial_loss"] for r in log
            ), log
            regression = json.loads((out / f"rebel_{t}_summary.json").read_text())["regression"]
            assert regression["mse_after"] < 0.7 * regression["mse_before"], regression
            assert regression["correlation_after"] > 0.5, regression
        # Iteration 2 sampled from iteration 1's policy: the sampler's logprobs (KV-cache decode) are the
        # teacher-forced logprobs of rebel_1's weights, not of the base model's.
        gen2 = json.loads((out / "iter_2" / "generate.json").read_text())
        assert gen2["policy"].startswith("rebel_1")
        params1, _ = stages.policy_params(setup, 2)
        base = common.base_params(setup)
        assert gen2["policy_fingerprint"] == online.params_fingerprint(params1)
        assert gen2["policy_fingerprint"] != online.params_fingerprint(base)
        rows = online.read_shards(epath.Path(out / "iter_2" / "generate"), gen2["shards"])
        tokens = np.concatenate([rows["prompt"], rows["response"]], 1)
        mask = np.concatenate([rows["prompt_mask"], rows["response_mask"]], 1)
        loss_mask = np.concatenate([np.zeros_like(rows["prompt_mask"]), rows["response_mask"]], 1)

        def forward(p):  # the tempered policy the sampler draws from: log_softmax(logits / 0.8)
            logits = models.logits_fn(p, tokens, mask, setup.model_cfg) / cfg.generate.temperature
            lp = ops.token_logprobs(logits[:, :-1], tokens[:, 1:])
            return ops.masked_sum(lp, loss_mask[:, 1:], axis=-1)

        forward = jax.jit(forward)
        lp1, lp0 = np.asarray(forward(params1)), np.asarray(forward(base))
        np.testing.assert_allclose(rows["sampler_logprobs"], lp1, atol=2e-3)
        assert np.abs(rows["sampler_logprobs"] - lp0).mean() > 0.05
    finally:
        setup.close()

    # The same run's first iteration, stopped in the middle of each kind of stage and resumed: rm after
    # 12 steps (its checkpoint is at 10), generate and score after one shard of two, a cut .tmp left by
    # the filter, rebel after one step. (Iteration 2 resumes through the same code.)
    b = tmp_path / "b"
    args = [*_args(base_dir, shared_data, b, tmp_path), "--iterations", "1"]
    for stop in ("rm:12", "generate_1:1", "score_1:1", "rebel_1:1"):
        proc = _run([*args, "--stop-after", stop] + (["--resume"] if stop != "rm:12" else []), cache)
        assert "stopped before its last step; continue with --resume" in proc.stderr, proc.stderr[-2000:]
        if stop == "score_1:1":
            (b / "iter_1" / "filter").mkdir(parents=True, exist_ok=True)
            (b / "iter_1" / "filter" / "pairs.npz.tmp").write_bytes(b"cut")
    _run([*args, "--resume"], cache)
    a_files = {k: v for k, v in _data_files(out).items() if k.startswith("iter_1")}
    b_files = _data_files(b)
    assert a_files.keys() == b_files.keys()
    for name, value in a_files.items():
        if isinstance(value, dict) and value and isinstance(next(iter(value.values())), np.ndarray):
            for k in value:
                np.testing.assert_array_equal(value[k], b_files[name][k], err_msg=f"{name}:{k}")
        else:
            assert value == b_files[name], name
    sa = json.loads((out / "rebel_1_summary.json").read_text())
    sb = json.loads((b / "rebel_1_summary.json").read_text())
    assert sa["regression"] == sb["regression"]  # computed from the final weights
    # Rerunning a finished run is a no-op; a fresh run over it is refused before anything is written.
    proc = _run([*args, "--resume"], cache)
    assert proc.stderr.strip().splitlines()[-1].startswith("nothing to do: "), proc.stderr  # all 5 finished
    proc = _run(args, cache, check=False)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "--resume" in proc.stderr, proc.stderr

    # An iteration whose answers all tie leaves no pair: one line, nothing trained.
    c = tmp_path / "c"
    shutil.copytree(b, c, ignore=shutil.ignore_patterns("filter*", "rebel_1*", "*.lock"))
    for k in range(2):
        np.savez(c / "iter_1" / "score" / f"shard_{k:05d}.npz", scores=np.zeros(32, np.float32))
    c_args = [*_args(base_dir, shared_data, c, tmp_path), "--resume", "--stages", "filter,rebel",
              "--iteration", "1"]  # fmt: skip
    # The full command line's flags of stages this run does not train, that change none of its stages, are
    # refused by name (they would be silently ignored) ...
    proc = _run(c_args, cache, check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "--rm.eval_every, --rm.ckpt_every, --generate.batch_size act on stages" in proc.stderr, proc.stderr
    # ... and without them the run goes on.
    for flag in ("--rm.eval_every", "--rm.ckpt_every", "--generate.batch_size"):
        i = c_args.index(flag)
        del c_args[i : i + 2]
    proc = _run(c_args, cache, check=False)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert "iteration 1: no pairs left after the filter" in proc.stderr and "skipped_tied" in proc.stderr
    assert not (c / "rebel_1").exists()


def test_params_fingerprint_is_exact_on_any_mesh():
    """The digest generate.json records (which weights sampled the answers) is the same for params on one
    device and split over 8 (a float sum would round by the split), and moves with a one-ulp change or a
    reordering of one leaf."""
    import jax.numpy as jnp  # noqa: PLC0415
    from jax.sharding import NamedSharding  # noqa: PLC0415
    from jax.sharding import PartitionSpec as P  # noqa: PLC0415

    rng = np.random.default_rng(0)
    params = {
        "w": jnp.asarray(rng.normal(size=(64, 48)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=(7,)), jnp.bfloat16),
        "s": jnp.float32(3.0),
    }
    mesh = jax.make_mesh((8,), ("data",))
    split = {**params, "w": jax.device_put(params["w"], NamedSharding(mesh, P("data")))}
    digest = online.params_fingerprint(params)
    assert online.params_fingerprint(split) == digest
    one_ulp = np.nextafter(np.float32(params["w"][3, 5]), np.float32(np.inf))
    assert online.params_fingerprint({**params, "w": params["w"].at[3, 5].set(one_ulp)}) != digest
    assert online.params_fingerprint({**params, "w": params["w"][::-1]}) != digest
