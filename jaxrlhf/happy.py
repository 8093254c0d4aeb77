"""HappyGPT: `python -m jaxrlhf.happy` pretrains a char-level GPT on tweets, fine-tunes it on the positive
ones, then optimises it against VADER sentiment (PPO by default; --rl.algo pg, grpo, rloo, reinforce_pp,
rebel, dpo or ipo) with a KL penalty to the SFT model.

minRLHF's recipe (ttumiel/minRLHF, projects/happy_gpt) on the stage layer: every tweet is a row
"⏎" + text + "⏎" cut to block_size + 1 characters (the "⏎" prompt, then the text); gpt-micro, block 32;
RL samples 32 tweets per iteration from the "⏎" prompt and scores their decoded text with VADER (or, with
--reward learned, a sentiment reward model trained on the tweets' labels). Defaults are tuned for
time-to-quality on a laptop CPU (docs/benchmarks.md); every one is a flag (--help), --quick is a tiny run.

Outputs under --out (local or gs://): <stage>/ orbax checkpoints, <stage>.jsonl metrics (and TensorBoard
events under tb/), <stage>.png plots, tokenizer.json, samples.txt, summary.json, run.json. `--resume`
continues a stopped run from the last good checkpoint of the stage it was in, and leaves a finished run as
it is. Refusals and faults: docs/faults.md.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import ClassVar, Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf import models
from jaxrlhf.data import load_tweets, tweets
from jaxrlhf.engine import checkpoint, flags, loop, memory
from jaxrlhf.rollout import SampleConfig, make_text_reward, sample, vader_scores
from jaxrlhf.stages import batches, handoff, lm, policy, recipe, reward
from jaxrlhf.stages import setup as stage_setup
from jaxrlhf.stages.batches import PromptAnswers
from jaxrlhf.text import CharTokenizer
from jaxrlhf.train import OptimConfig, RLConfig
from jaxrlhf.validate import check_at_least

EOS = "⏎"


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    """The tweets.

    Attributes:
      data_dir: folder with the tweets' train.csv / test.csv (None: $JAXRLHF_DATA_DIR, else a checked
        download cached under ~/.cache/jaxrlhf).
      cache_dir: where TFDS prepares them (None: $JAXRLHF_CACHE_DIR or ~/.cache/jaxrlhf).
      block_size: the model's context: a tweet row is "⏎" + text + "⏎" cut to block_size + 1 characters.
      seed: fixes the batch order.
    """

    data_dir: str | None = None
    cache_dir: str | None = None
    block_size: int = 32
    seed: int = 0

    def __post_init__(self):
        if not self.block_size >= 2:
            raise ValueError(
                f"block_size={self.block_size}; HappyGPT samples block_size - 1 characters after a "
                "one-character prompt, so use >= 2"
            )
        check_at_least(self, 0, "seed")


@dataclasses.dataclass(frozen=True, kw_only=True)
class HappyConfig(recipe.RecipeConfig):
    """HappyGPT: pretrain -> SFT -> (a learned reward model) -> RL, every stage a flag prefix.

    Attributes:
      reward: "vader" (VADER compound score of the decoded tweet) or "learned" (a sentiment reward model
        trained on the tweets' labels, the rm stage).
      quick: a tiny run for tests and smoke checks (QUICK's settings for every field not given).
      data: the tweets.
      pretrain: language modelling of every tweet (Muon).
      sft: the same on the positive tweets.
      rm: the learned reward model (--reward learned only): Bradley-Terry on (positive, negative) tweets.
      rl: the RL stage (--rl.algo ppo, pg, grpo, rloo, reinforce_pp, rebel, dpo, ipo).
    """

    STAGES: ClassVar[tuple[str, ...]] = ("pretrain", "sft", "rm", "rl")

    model: str | None = "gpt-micro"
    out: str = "runs/happy"
    reward: Literal["vader", "learned"] = "vader"
    quick: bool = False
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    # Muon reaches AdamW's 2,500-step validation loss in 1,000 steps (docs/benchmarks.md).
    pretrain: lm.LMStageConfig = dataclasses.field(default_factory=lambda: lm.LMStageConfig(
        steps=1000, batch_size=64, eval_every=0, ckpt_every=250,
        optim=OptimConfig(optimizer="muon", lr=4e-3, warmup_steps=50, weight_decay=0.0),
    ))  # fmt: skip
    sft: lm.LMStageConfig = dataclasses.field(default_factory=lambda: lm.LMStageConfig(
        steps=200, batch_size=64, eval_every=0, ckpt_every=50,
        optim=OptimConfig(lr=3e-4, warmup_steps=20, min_lr_ratio=0.3),
    ))  # fmt: skip
    rm: reward.RewardStageConfig = dataclasses.field(default_factory=lambda: reward.RewardStageConfig(
        steps=200, batch_size=64, eval_every=0, ckpt_every=50, log_every=20, norm_rows=256,
        optim=OptimConfig(lr=1e-3, warmup_steps=10),
    ))  # fmt: skip
    rl: policy.RLStageConfig = dataclasses.field(default_factory=lambda: policy.RLStageConfig(
        iterations=200, batch_size=32, top_k=30, eval_every=0, eval_batches=0, sample_every=0, ckpt_every=50,
        optim=OptimConfig(lr=3e-4, weight_decay=0.0, schedule="constant"), value_from="policy",
        reward_norm="none", rl=RLConfig(kl_coef=0.05, micro_batches=2),
    ))  # fmt: skip

    def __post_init__(self):
        super().__post_init__()
        if self.model not in models.SMALL_GPTS:
            raise ValueError(
                f"model={self.model!r}; HappyGPT trains a random {', '.join(models.SMALL_GPTS)} from scratch"
            )


# --quick (a tiny run, < 1 minute of steps) and the settings --rl.algo brings, for fields not given.
QUICK = {
    ("pretrain", "steps"): 40, ("pretrain", "eval_rows"): 512, ("pretrain", "ckpt_every"): 10,
    ("pretrain", "optim", "optimizer"): "adamw", ("pretrain", "optim", "lr"): 3e-3,
    ("pretrain", "optim", "warmup_steps"): 5, ("pretrain", "optim", "weight_decay"): 0.1,
    ("sft", "steps"): 10, ("sft", "eval_rows"): 256, ("sft", "ckpt_every"): 2, ("sft", "optim", "lr"): 1e-3,
    ("sft", "optim", "warmup_steps"): 2, ("sft", "optim", "min_lr_ratio"): 0.1,
    ("rl", "iterations"): 16, ("rl", "ckpt_every"): 4, ("rl", "optim", "lr"): 3e-3,
    ("rl", "rl", "kl_coef"): 0.02, ("rl", "rl", "epochs"): 4, ("rl", "rl", "minibatches"): 2,
}  # fmt: skip
# One pass per rollout for ppo / grpo / rloo (HappyGPT's time-to-quality setting); REBEL: its authors' 4
# passes (ZhaolinGao/REBEL src/tldr/rebel.py noptepochs) at a 10x lower lr (3e-4 overshoots each pair set
# and garbles the tweets); groups of 4 answers.
ALGO_SETTINGS = {
    "ppo": {("rl", "rl", "epochs"): 1},
    "grpo": {("rl", "rl", "epochs"): 1, ("rl", "rl", "group_size"): 4},
    "rloo": {("rl", "rl", "epochs"): 1, ("rl", "rl", "group_size"): 4},
    "rebel": {("rl", "rl", "epochs"): 4, ("rl", "rl", "group_size"): 4, ("rl", "optim", "lr"): 3e-5},
    "dpo": {("rl", "rl", "group_size"): 4},
    "ipo": {("rl", "rl", "group_size"): 4},
}
RENAMED = {
    "--fsdp": "--mesh-fsdp", "--data-dir": "--data.data_dir", "--quiet": "--progress false",
    "--algo": "--rl.algo", "--block_size": "--data.block_size", "--block-size": "--data.block_size",
    "--rl.iters": "--rl.iterations", "--rl.pairs_n": "--rl.group_size", "--rl.dpo_beta": "--rl.beta",
    "--rl.lr": "--rl.optim.lr",
    **{f"--{stage}.{name}": f"--{stage}.optim.{name}" for stage in ("pretrain", "sft")
       for name in ("lr", "optimizer", "muon_lr", "warmup_steps", "weight_decay", "min_lr_ratio")},
}  # fmt: skip



def stage_names(cfg: HappyConfig) -> list[str]:
    return [s for s in cfg.stage_list if s != "rm" or cfg.reward == "learned"]


def steps(cfg: HappyConfig, stage: str) -> int:
    return {
        "pretrain": cfg.pretrain.steps,
        "sft": cfg.sft.steps,
        "rm": cfg.rm.steps,
        "rl": cfg.rl.iterations,
    }[stage]


# ------------------------------------------------------------------------------------------- data


def encode_rows(tokenizer: CharTokenizer, texts: list[str], length: int) -> PromptAnswers:
    """Each text as "⏎" + text + "⏎" cut to `length` ids: the "⏎" prompt [N, 1] and the rest [N, length - 1],
    right-padded."""
    ids = np.full((len(texts), length), tokenizer.eos_id, np.int32)
    mask = np.zeros((len(texts), length), bool)
    for i, text in enumerate(texts):
        row = tokenizer.encode(EOS + text + EOS)[:length]
        ids[i, : len(row)], mask[i, : len(row)] = row, True
    return PromptAnswers(ids[:, :1], mask[:, :1], ids[:, 1:], mask[:, 1:])


def check_data(cfg: HappyConfig, train_rows: list[dict], test_rows: list[dict]) -> None:
    """Refuse data that cannot fill the batches of the stages, naming the file, the count and the flag."""

    def count(rows, sentiment=None):
        return sum(1 for r in rows if sentiment is None or r["sentiment"] == sentiment)

    train_csv, test_csv = (tweets.source_file(s, cfg.data.data_dir) for s in ("train", "test"))
    needs = [
        (train_csv, count(train_rows), None, cfg.pretrain.batch_size, "--pretrain.batch_size", "pretraining"),
        (train_csv, count(train_rows, "positive"), "positive", cfg.sft.batch_size, "--sft.batch_size", "SFT"),
        (test_csv, count(test_rows), None, 1, None, "validation"),
        (test_csv, count(test_rows, "positive"), "positive", 1, None, "SFT's validation"),
    ]
    if cfg.rl.rl.ptx_coef:
        needs.append((train_csv, count(train_rows), None, cfg.rl.batch_size, "--rl.batch_size", "PPO-ptx"))
    if cfg.reward == "learned":
        for rows, path in ((train_rows, train_csv), (test_rows, test_csv)):
            for sentiment in ("positive", "negative"):
                needs.append((path, count(rows, sentiment), sentiment, 1, None, "the learned reward model"))
    for path, n, sentiment, need, flag, stage in needs:
        if n >= need:
            continue
        what = f"{n} {sentiment + ' ' if sentiment else ''}tweet{'s' * (n != 1)} with text"
        if flag is None:
            raise ValueError(f"{path} has {what}; {stage} needs at least {need}: use a fuller file")
        raise ValueError(
            f"{path} has {what}, fewer than one {flag} {need} batch for {stage}: lower {flag} "
            "or use more data"
        )


def make_setup(cfg: HappyConfig) -> stage_setup.Setup:
    """The tweets (checked), their character tokenizer (checked against --out's on --resume), the model and
    the mesh."""
    data = {s: [r for r in load_tweets(s, cfg.data.data_dir, cache_dir=cfg.data.cache_dir)
                if r["text"].strip()]
            for s in ("train", "test")}  # fmt: skip
    check_data(cfg, data["train"], data["test"])
    tokenizer = CharTokenizer.from_corpus([r["text"] for r in data["train"]], eos=EOS, unk="?")
    saved = checkpoint.resolve(cfg.out) / "tokenizer.json"
    if cfg.resume and saved.exists():
        try:
            old = CharTokenizer.load_text(saved.read_text())
        except ValueError:
            old = None
        if old != tokenizer:
            raise ValueError(
                f"the tokenizer built from this --data.data_dir ({tokenizer.vocab_size} characters) differs "
                f"from {saved} ({f'{old.vocab_size} characters' if old else 'unreadable'}), which the "
                "checkpoints were trained with: resume with the --data.data_dir the run started with, or use "
                "a fresh --out"
            )
    sizes = {"--pretrain.batch_size": cfg.pretrain.batch_size, "--sft.batch_size": cfg.sft.batch_size,
             "--rl.batch_size": cfg.rl.batch_size}  # fmt: skip
    if cfg.reward == "learned":
        sizes["--rm.batch_size"] = cfg.rm.batch_size
    setup_ = stage_setup.make_setup(cfg, batch_sizes=sizes, length=cfg.data.block_size,
                                    length_flags="--data.block_size", tokenizer=tokenizer)  # fmt: skip
    rows = {s: encode_rows(tokenizer, [r["text"] for r in data[s]], cfg.data.block_size + 1) for s in data}
    positive = {s: np.array([r["sentiment"] == "positive" for r in data[s]]) for s in data}
    setup_.extras.update(
        data=data, rows=rows, positive={s: batches.subset(rows[s], positive[s]) for s in data},
        summary={"config": flags.config_json(cfg), "devices": len(jax.devices())},
        t_start=time.perf_counter(),
    )  # fmt: skip
    return setup_


# ----------------------------------------------------------------------------------------- stages


def stage_run(cfg: HappyConfig, stage: str) -> handoff.StageRun:
    return recipe.stage_run(cfg, stage, {"pretrain": 1, "sft": 2, "rl": 3, "rm": 4}[stage])


def _final_params(setup_: stage_setup.Setup, stage: str):
    """The stage's final params, from its last checkpoint (what the next stage starts from)."""
    cfg = setup_.cfg
    init = {
        "pretrain": lambda: lm.lm_state_init(setup_, cfg.pretrain),
        "sft": lambda: lm.lm_state_init(setup_, cfg.sft),
        "rm": lambda: reward.reward_state_init(setup_, cfg.rm),
        "rl": lambda: policy.rl_state_init(setup_, cfg.rl),
    }
    target = handoff.state_target(setup_.mesh, init[stage]())
    state, _ = handoff.restore_finished(cfg.out, stage, steps(cfg, stage), target)
    return policy.trained_policy(state, cfg.rl) if stage == "rl" else state.params


def run_pretrain(setup_: stage_setup.Setup):
    cfg, rows = setup_.cfg, setup_.extras["rows"]
    saved = checkpoint.resolve(cfg.out) / "tokenizer.json"
    if handoff.main_process() and not saved.exists():
        saved.write_text(setup_.tokenizer.to_text())
    init = models.init_params(jax.random.key(cfg.seed), setup_.model_cfg)
    return lm.run_lm_stage(
        setup_, cfg.pretrain, stage_run(cfg, "pretrain"), rows["train"], rows["test"], init
    )


def run_sft(setup_: stage_setup.Setup):
    cfg, rows = setup_.cfg, setup_.extras["positive"]
    return lm.run_lm_stage(setup_, cfg.sft, stage_run(cfg, "sft"), rows["train"], rows["test"],
                           _final_params(setup_, "pretrain"))  # fmt: skip


def comparisons(setup_: stage_setup.Setup, split: str, seed: int) -> reward.Comparisons:
    """(positive, negative) tweet pairs of a split: every positive tweet with a negative one in a fixed
    shuffled order, as many pairs as the smaller class has tweets."""
    pos = setup_.extras["positive"][split]
    negative = np.array([r["sentiment"] == "negative" for r in setup_.extras["data"][split]])
    neg = batches.subset(setup_.extras["rows"][split], negative)
    n = min(len(pos.prompt), len(neg.prompt))
    order = np.random.default_rng(seed).permutation(len(neg.prompt))[:n]
    answers = np.stack([pos.answer[:n], neg.answer[order]], 1)
    answers_mask = np.stack([pos.answer_mask[:n], neg.answer_mask[order]], 1)
    return reward.Comparisons(pos.prompt[:n], pos.prompt_mask[:n], answers, answers_mask)


def run_rm(setup_: stage_setup.Setup):
    cfg = setup_.cfg
    return reward.run_reward_stage(
        setup_, cfg.rm, stage_run(cfg, "rm"), kind="pairwise",
        rows=comparisons(setup_, "train", cfg.data.seed), val=comparisons(setup_, "test", cfg.data.seed),
        trunk=_final_params(setup_, "pretrain"), reference=lambda: setup_.extras["positive"]["train"],
    )  # fmt: skip


def run_rl(setup_: stage_setup.Setup):
    cfg, rows = setup_.cfg, setup_.extras["rows"]
    if cfg.reward == "learned":
        meta = checkpoint.restore_meta(cfg.out, "rm")
        score = policy.LearnedReward(_final_params(setup_, "rm"), meta["reward_norm"])
    else:
        score = policy.HostReward(make_text_reward(setup_.tokenizer, vader_scores))
    # Every row's prompt is the "⏎" that starts a tweet; the rows' tweets are PPO-ptx's pretraining text.
    return policy.run_rl_stage(
        setup_, cfg.rl, stage_run(cfg, "rl"), prompts=rows["train"], val=rows["test"],
        policy=_final_params(setup_, "sft"), reward=score, response_len=cfg.data.block_size - 1,
        ptx_rows=rows["train"],
    )  # fmt: skip


# ---------------------------------------------------------------------------------------- the end


def sample_tweets(params, setup_: stage_setup.Setup, n: int, *, key) -> list[str]:
    """n tweets sampled from the "⏎" prompt at the RL stage's sampling settings."""
    cfg, tok = setup_.cfg, setup_.tokenizer
    mcfg = dataclasses.replace(setup_.model_cfg, embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0)
    scfg = SampleConfig(max_new_tokens=cfg.data.block_size - 1, top_k=cfg.rl.top_k, eos_id=tok.eos_id)
    ro = sample(params, jnp.full((n, 1), tok.eos_id, jnp.int32), jnp.ones((n, 1), bool), mcfg, scfg, key=key)
    return tok.decode_batch(np.asarray(ro.response), np.asarray(ro.response_mask), stop_at_eos=True)


def distinct_n(texts: list[str], n: int = 2) -> float:
    """Distinct-n over words: unique n-grams / all n-grams across the texts."""
    grams = [tuple(w[i : i + n]) for t in texts for w in [t.split()] for i in range(len(w) - n + 1)]
    return len(set(grams)) / max(len(grams), 1)


def after(setup_: stage_setup.Setup, cfg: HappyConfig) -> None:
    """Samples of each stage's final policy (samples.txt), the curves, summary.json, the last line; once
    pretraining, SFT and RL have all finished (a --stages run of fewer ends without them)."""
    if not all(handoff.stage_finished(cfg.out, s, steps(cfg, s)) for s in ("pretrain", "sft", "rl")):
        return
    out, summary = checkpoint.resolve(cfg.out), setup_.extras["summary"]
    say = (lambda *a, **k: print(*a, **k, flush=True)) if cfg.progress else (lambda *a, **k: None)
    texts, scores, titles = {}, {}, ("after pretraining", "after SFT (before RL)", "after RL")
    with (out / "samples.txt").open("w") as f:
        for i, (stage, title) in enumerate(zip(("pretrain", "sft", "rl"), titles, strict=True)):
            texts[stage] = sample_tweets(
                _final_params(setup_, stage), setup_, 32, key=jax.random.key(100 + i)
            )
            scores[stage] = vader_scores(texts[stage])
            say(f"\n--- {title}: mean VADER {scores[stage].mean():.3f}, "
                f"distinct-2 {distinct_n(texts[stage]):.3f}",
                *(f"  {t}" for t in texts[stage][:8]), sep="\n")  # fmt: skip
            f.write(f"# {title}\n" + "".join(f"{t}\n" for t in texts[stage]) + "\n")
    memory.drop_programs()
    history = {s: loop.read_metrics(out / f"{s}.jsonl") for s in ("pretrain", "sft", "rl")}
    for stage, keys in (("pretrain", ("loss", "eval/val_loss")), ("sft", ("loss", "eval/val_loss")),
                        ("rl", ("reward", "kl_per_token", "clipfrac", "value_loss", "loss"))):  # fmt: skip
        loop.plot_metrics(out / f"{stage}.png", history[stage], keys)
    stage_summaries = {
        s: json.loads((out / f"{s}_summary.json").read_text()) for s in ("pretrain", "sft", "rl")
    }
    for s, record in stage_summaries.items():
        if s not in setup_.extras.get(
            "memory", {}
        ):  # finished by an earlier invocation: no steps ran in this one
            record.update(steps=0, finished_earlier=True)
    last = history["rl"][-min(10, len(history["rl"])) :]
    summary["stages"] = stage_summaries
    summary["val_loss"] = {s: stage_summaries[s]["last"].get("eval/val_loss") for s in ("pretrain", "sft")}
    summary["rl"] = {
        "reward_first": history["rl"][0]["reward"] if history["rl"] else None,
        "reward_last10": float(np.mean([r["reward"] for r in last])) if last else None,
        "kl_per_token_last10": float(np.mean([r["kl_per_token"] for r in last])) if last else None,
        "vader_before": float(scores["sft"].mean()), "vader_after": float(scores["rl"].mean()),
        "distinct2_before": distinct_n(texts["sft"]), "distinct2_after": distinct_n(texts["rl"]),
    }  # fmt: skip
    if cfg.reward == "learned":
        summary["reward_model_accuracy"] = json.loads((out / "rm_summary.json").read_text()).get(
            "val_accuracy"
        )
    summary["wall_s"] = round(time.perf_counter() - setup_.extras["t_start"], 2)
    summary["memory"] = {
        **setup_.extras.get("memory", {}),
        "end": memory.snapshot(),  # peak_rss_mb: the run's
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }  # lean_host_memory's, if it acted
    handoff.write_json(out / "summary.json", summary)
    print(f"\nHappyGPT done in {summary['wall_s']:.0f} s: pretrain val "
          f"{summary['val_loss']['pretrain']:.3f}, SFT val {summary['val_loss']['sft']:.3f}, RL reward "
          f"{summary['rl']['reward_last10']:.3f} (KL/token {summary['rl']['kl_per_token_last10']:.3f}), "
          f"outputs in {cfg.out}", flush=True)  # fmt: skip


RECIPE = recipe.Recipe(
    name="happy", defaults=HappyConfig(), make_setup=make_setup, steps=steps, names=stage_names,
    runners={"pretrain": run_pretrain, "sft": run_sft, "rm": run_rm, "rl": run_rl},
    inactive=policy.inactive_line, renamed=RENAMED, adjust=recipe.preset_adjust(QUICK, ALGO_SETTINGS, "ppo"),
    prepare=memory.lean_host_memory, after=after, track_memory=True,
    complete=lambda cfg: (checkpoint.resolve(cfg.out) / "summary.json").exists(),
    exports=lambda cfg: {"policy": "rl", **({"reward_model": "rm"} if cfg.reward == "learned" else {})},
    description="HappyGPT: pretrain -> SFT -> RL against VADER sentiment, on a laptop CPU.",
)  # fmt: skip


def main(argv=None) -> int:
    """The command; exit codes as `stages.recipe.main`."""
    return recipe.main(RECIPE, argv, prog="python -m jaxrlhf.happy")


if __name__ == "__main__":
    sys.exit(main())
