"""HappyGPT: `python -m jaxrlhf.happy` pretrains a char-level GPT on tweets, SFTs it on the positive ones,
then optimises it against VADER sentiment (PPO, PG, REBEL or DPO) with a KL penalty to the SFT model.

The minRLHF recipe (ttumiel/minRLHF, projects/happy_gpt) re-created on jaxrlhf: every tweet is a row
"⏎" + text + "⏎" cut to block_size + 1 characters; gpt-micro, block 32; RL samples 32 tweets per iteration
from the "⏎" prompt. Defaults are tuned for time-to-quality on a laptop CPU (see README); every one is a
flag (`--help`).

Outputs under --out (local or gs://): <stage>/ orbax checkpoints, <stage>.jsonl metrics, <stage>.png
plots (written at the end), tokenizer.json, samples.txt, summary.json. `--resume` continues a killed run
from the last good checkpoint of the stage it was in, and leaves a finished run as it is.

Everything is checked before any work, in this order, each failure one line on stderr: the flags (the
configs' `__post_init__`, exit 2), the device count (batch sizes, --fsdp; exit 2), --out (a file or
read-only, held by another run: exit 1), then the data as it is loaded (a bad row names its file and line;
too few rows for a batch, or no positive tweet for SFT, name the file, the count and the flag; exit 1), then
the checkpoints (a fresh run over checkpoints, a resume with another config or data: exit 1). A refused run
leaves --out as it was.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import pathlib
import sys
import tempfile
import time
import typing
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf import (
    checkpoint,
    memory,
    model,
    parallel,
    preference,
    rewards,
    rl,
    rundir,
    runner,
    sampling,
    train,
)
from jaxrlhf.config import MODEL_PRESETS, ModelConfig, SampleConfig, check_at_least, flag_message, flag_parser
from jaxrlhf.data import load_tweets, tweets
from jaxrlhf.tokenizers import CharTokenizer

EOS = "⏎"
HAPPY_ALGOS = ("ppo", "pg", "grpo", "rloo", "rebel", "dpo", "ipo")
PAIR_ALGOS = ("rebel", "dpo", "ipo")  # learn from best/worst pairs of pairs_n answers
LEARNED_RM_BATCH = 64  # (positive, negative) pairs per step of the learned reward model


@dataclasses.dataclass(frozen=True, kw_only=True)
class LMStageConfig:
    """A language-modelling stage (pretraining or SFT).

    Attributes:
      steps: optimizer steps.
      batch_size: rows (tweets) per step.
      optimizer: "adamw" or "muon" (Muon on the matrices, AdamW at `lr` on the rest; train.OptimConfig).
      muon_lr: Muon's peak learning rate (muon only; None = 0.02).
      lr: peak learning rate (under muon: of the embeddings, biases and layer norms).
      warmup_steps: linear warmup.
      min_lr_ratio: final lr / peak lr (cosine decay).
      weight_decay: AdamW decay on matrices.
      eval_every: validation every this many steps (0: only at the end).
      eval_rows: validation rows used (0: the whole test split).
    """

    steps: int
    batch_size: int = 128
    optimizer: str = "adamw"
    muon_lr: float | None = None
    lr: float = 3e-3
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    eval_every: int = 0
    eval_rows: int = 0

    def __post_init__(self):
        check_at_least(self, 1, "steps", "batch_size")
        check_at_least(self, 0, "warmup_steps", "weight_decay", "eval_every", "eval_rows")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr}; use a positive learning rate")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio={self.min_lr_ratio}; use a fraction in [0, 1] of lr")
        self.optim_config()  # optimizer / muon_lr checked here, before any work

    def optim_config(self) -> train.OptimConfig:
        return train.OptimConfig(
            optimizer=self.optimizer,
            muon_lr=self.muon_lr,
            lr=self.lr,
            warmup_steps=self.warmup_steps,
            total_steps=self.steps,
            min_lr_ratio=self.min_lr_ratio,
            weight_decay=self.weight_decay,
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class RLStageConfig:
    """The RL stage.

    Attributes:
      iters: RL iterations (rollout + update).
      batch_size: tweets sampled per iteration.
      lr: Adam learning rate (constant); None = the algorithm's default (`rl_settings`): 3e-4, and 3e-5
        for rebel, whose passes fit each pair set (at 3e-4 they overshoot it and garble the tweets).
      kl_coef: beta of the per-token KL penalty to the SFT model (ppo, pg, grpo, rloo); for rebel the
        weight of the sequence KL of pi_t to the SFT model in the reward, as in the REBEL authors' code
        (`preference.rebel_rewards`; their default is 0.05 too).
      kl_target: adaptive-controller KL target per sequence (None: fixed beta; ppo, pg, grpo, rloo).
      epochs: passes over each rollout (ppo, grpo, rloo) or each fixed pair set (rebel); None = the
        algorithm's default (`rl_settings`): 1 for ppo / grpo / rloo (HappyGPT's time-to-quality
        setting), 4 for rebel (the REBEL authors' `noptepochs`).
      minibatches: updates per pass (ppo, grpo, rloo, rebel; it must divide the rows, or rebel's pairs).
      micro_batches: slices each update's gradient is accumulated over, one after another (ppo, pg,
        grpo, rloo; it must divide a minibatch's rows): the same update up to float rounding, with the
        activations of 1 / micro_batches of the rows alive at a time (`rl.RLConfig.micro_batches`).
        2 by default: the RL stage's peak memory ~14 MB lower at the same speed (README).
      clip_eps: PPO ratio clip.
      vf_coef: value-loss weight.
      lam: GAE lambda.
      top_k: sampling top-k.
      temperature: sampling temperature.
      pairs_n: answers per prompt: the GRPO / RLOO group size, or the REBEL / DPO / IPO answers whose best
        and worst form a pair.
      eta: REBEL's eta.
      dpo_beta: DPO's (and IPO's) beta.
      average_logprobs: DPO / IPO on each answer's per-token mean logprob instead of its sum (TRL's IPO).
      ptx_coef: PPO-ptx's gamma (InstructGPT eq. 2): each update also minimises gamma x the next-token
        loss of `batch_size` pretraining tweets; 0 = off.
      no_eos_penalty: the reward of a tweet that never emitted "⏎" within the block (None: keep its
        score); ppo, pg, grpo, rloo and rebel (the REBEL authors' fixed penalty, -1 on TL;DR).
    """

    iters: int = 200
    batch_size: int = 32
    lr: float | None = None
    kl_coef: float = 0.05
    kl_target: float | None = None
    epochs: int | None = None
    minibatches: int = 1
    micro_batches: int = 2
    clip_eps: float = 0.2
    vf_coef: float = 0.1
    lam: float = 0.95
    top_k: int = 30
    temperature: float = 1.0
    pairs_n: int = 4
    eta: float = 1.0
    dpo_beta: float = 0.1
    average_logprobs: bool = False
    ptx_coef: float = 0.0
    no_eos_penalty: float | None = None

    def __post_init__(self):
        check_at_least(self, 1, "iters", "batch_size", "epochs", "minibatches", "micro_batches")
        if self.no_eos_penalty is not None and not math.isfinite(self.no_eos_penalty):
            raise ValueError(f"no_eos_penalty={self.no_eos_penalty}; use a finite reward, or none (off)")
        check_at_least(self, 0, "kl_coef", "vf_coef", "ptx_coef")
        if self.pairs_n < 2:
            raise ValueError(f"pairs_n={self.pairs_n}; a group or a pair needs at least 2 answers per prompt")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k}; use 0 (off) or a positive k")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature={self.temperature}; use a finite value >= 0 (0 = greedy)")
        if self.kl_target is not None and not self.kl_target > 0:
            raise ValueError(
                f"kl_target={self.kl_target}; use a positive KL per sequence, or none (fixed beta)"
            )
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"lam={self.lam}; use a GAE lambda in [0, 1]")
        for name in ("lr", "clip_eps", "eta", "dpo_beta"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)}; it must be > 0")


@dataclasses.dataclass(frozen=True, kw_only=True)
class HappyConfig:
    """The whole pipeline.

    Attributes:
      model: minGPT preset name.
      block_size: context length (tweets are cut to this many characters + 1).
      dropout: dropout on embeddings, residuals and attention during pretraining / SFT.
      algo: RL algorithm: "ppo", "pg", "grpo", "rloo", "rebel", "dpo" or "ipo".
      reward: "vader" (VADER compound score of the decoded tweet) or "learned" (a sentiment reward
        model trained on the tweets' labels; see train_reward_model).
      seed: root seed.
      fsdp: size of the mesh's 'fsdp' axis (the rest of the devices go to 'data').
    """

    model: str = "gpt-micro"
    block_size: int = 32
    dropout: float = 0.0
    algo: str = "ppo"
    reward: str = "vader"
    seed: int = 0
    fsdp: int = 1
    # Muon reaches AdamW's 2,500-step validation loss in 1,000 steps (README; bench_pretrain_levers.py).
    pretrain: LMStageConfig = LMStageConfig(
        steps=1000, batch_size=64, optimizer="muon", lr=4e-3, warmup_steps=50, weight_decay=0.0
    )
    sft: LMStageConfig = LMStageConfig(steps=200, batch_size=64, lr=3e-4, warmup_steps=20, min_lr_ratio=0.3)
    rl: RLStageConfig = RLStageConfig()

    def __post_init__(self):
        if self.model not in MODEL_PRESETS:
            raise ValueError(f"model={self.model!r}; choose one of {', '.join(MODEL_PRESETS)}")
        if self.block_size < 2:
            raise ValueError(
                f"block_size={self.block_size}; HappyGPT samples block_size - 1 characters after a "
                "one-character prompt, so use >= 2"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout}; use a rate in [0, 1)")
        if self.algo not in HAPPY_ALGOS:
            raise ValueError(f"algo={self.algo!r}; choose {', '.join(HAPPY_ALGOS)}")
        if self.reward not in ("vader", "learned"):
            raise ValueError(f"reward={self.reward!r}; choose vader or learned")
        check_at_least(self, 1, "fsdp")


RM_STEPS = 200  # steps of the learned reward model (--reward learned)

QUICK = dict(
    pretrain=LMStageConfig(steps=40, batch_size=64, lr=3e-3, warmup_steps=5, eval_rows=512),
    sft=LMStageConfig(steps=10, batch_size=64, lr=1e-3, warmup_steps=2, eval_rows=256),
    rl=RLStageConfig(iters=16, batch_size=32, lr=3e-3, kl_coef=0.02, epochs=4, minibatches=2),
)


# ------------------------------------------------------------------------------------------ data


def encode_rows(tokenizer: CharTokenizer, texts: list[str], length: int) -> tuple[np.ndarray, np.ndarray]:
    """Each text as "⏎" + text + "⏎", cut to `length` ids and right-padded: ([N, length], [N, length])."""
    ids = np.full((len(texts), length), tokenizer.eos_id, np.int32)
    mask = np.zeros((len(texts), length), bool)
    for i, text in enumerate(texts):
        row = tokenizer.encode(EOS + text + EOS)[:length]
        ids[i, : len(row)] = row
        mask[i, : len(row)] = True
    return ids, mask


def load_data(data_dir):
    """(train rows, test rows) with a non-empty text; a bad csv row is a ValueError naming file:line."""
    train_rows = [r for r in load_tweets("train", data_dir) if r["text"].strip()]
    test_rows = [r for r in load_tweets("test", data_dir) if r["text"].strip()]
    return train_rows, test_rows


def check_data(cfg: HappyConfig, train_rows: list[dict], test_rows: list[dict], data_dir) -> None:
    """Refuse data that cannot fill the batches of the stages, naming the file, the count and the flag."""

    def count(rows, sentiment=None):
        return sum(1 for r in rows if sentiment is None or r["sentiment"] == sentiment)

    train_csv, test_csv = tweets.source_file("train", data_dir), tweets.source_file("test", data_dir)
    needs = [
        (train_csv, count(train_rows), None, cfg.pretrain.batch_size, "--pretrain.batch_size", "pretraining"),
        (train_csv, count(train_rows, "positive"), "positive", cfg.sft.batch_size, "--sft.batch_size", "SFT"),
        (test_csv, count(test_rows), None, 1, None, "validation"),
        (test_csv, count(test_rows, "positive"), "positive", 1, None, "SFT's validation"),
    ]
    if cfg.rl.ptx_coef:
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
            f"{path} has {what}, fewer than one {flag} {need} batch for {stage}: lower {flag} or use "
            "more data"
        )


# ----------------------------------------------------------------------------------------- stages


def _lm_stage(name, cfg: HappyConfig, stage: LMStageConfig, mcfg, params, data, val, mesh, args, tok_path):
    tx = train.make_optimizer(stage.optim_config())
    state = _place(train.init_train_state(params, tx), mesh)
    step = parallel.jit_step(train.make_lm_step(mcfg, tx), mesh, state)
    ids, mask = data
    n, bs = ids.shape[0], stage.batch_size
    per_epoch = n // bs
    seed = cfg.seed

    def batch_at(i):
        epoch, b = divmod(i, per_epoch)
        order = np.random.default_rng([seed, epoch]).permutation(n)
        rows = order[b * bs : (b + 1) * bs]
        return train.LMBatch(ids[rows], mask[rows], mask[rows])

    def step_fn(state, i, key):
        return step(state, parallel.shard_batch(batch_at(i), mesh), key)

    evaluate = make_evaluator(mcfg, val, mesh, stage.eval_rows)
    meta = _lm_meta(name, cfg, mcfg)
    result = runner.run_stage(
        run_dir=args.out,
        stage=name,
        state=state,
        step_fn=step_fn,
        n_steps=stage.steps,
        root_key=jax.random.fold_in(jax.random.key(cfg.seed), {"pretrain": 1, "sft": 2}[name]),
        resume=args.resume,
        meta=meta,
        ckpt_every=max(stage.steps // 4, 1),
        tokenizer=tok_path,
        eval_fn=lambda s: {"loss": evaluate(s.params)},
        eval_every=stage.eval_every,
        log_every=10,
        tokens_per_step=int(bs * (ids.shape[1] - 1)),
        progress=not args.quiet,
    )
    result.summary["val_loss"] = evaluate(result.state.params)
    result.summary["flops_per_step"] = 3 * mcfg.flops_per_token(ids.shape[1] - 1) * bs * (ids.shape[1] - 1)
    return result


def make_evaluator(mcfg, val, mesh, max_rows=0, batch_size=64):
    """Exact token-mean validation NLL over the (first `max_rows`) validation rows.

    64 rows a call: gpt-micro's forward needs 12 MB of XLA temporaries for 64 rows and 103 MB for 256
    (as much as a 64-row training step), and the whole test split takes 0.93 s in 64-row calls against
    1.18 s in 256-row ones (same process, alternated).
    """
    ids, mask = val
    if max_rows:
        ids, mask = ids[:max_rows], mask[:max_rows]
    n_dev = parallel.batch_size_multiple(mesh)
    batch_size = max(batch_size // n_dev, 1) * n_dev
    pad = (-ids.shape[0]) % batch_size
    ids = np.concatenate([ids, np.zeros((pad, ids.shape[1]), ids.dtype)])
    mask = np.concatenate([mask, np.zeros((pad, ids.shape[1]), bool)])
    ev = _lm_eval_jit(mcfg)

    def evaluate(params):
        total = count = 0.0
        for s in range(0, ids.shape[0], batch_size):
            b = train.LMBatch(ids[s : s + batch_size], mask[s : s + batch_size], mask[s : s + batch_size])
            nll, n = ev(params, parallel.shard_batch(b, mesh))
            total += float(nll)
            count += float(n)
        return total / max(count, 1.0)

    return evaluate


@functools.cache
def _lm_eval_jit(mcfg: ModelConfig):
    """One jitted evaluator per model config, shared by the stages (compiled once)."""
    return jax.jit(train.make_lm_eval(mcfg))


def _lm_meta(name: str, cfg: HappyConfig, mcfg: ModelConfig) -> dict:
    # Only what shapes this stage goes in its meta: a later stage's flags may change on --resume.
    return {"config": _stage_meta(cfg, mcfg, getattr(cfg, name)), "stage": name}


def _rm_meta(cfg: HappyConfig, rl_mcfg: ModelConfig) -> dict:
    return {"config": _stage_meta(cfg, rl_mcfg, None)}


def _rl_meta(cfg: HappyConfig, rl_mcfg: ModelConfig) -> dict:
    stage = rl_settings(cfg)  # the values the stage runs with, whatever set them
    return {"config": _stage_meta(cfg, rl_mcfg, stage, algo=cfg.algo, reward=cfg.reward), "stage": "rl"}


def model_config(cfg: HappyConfig, vocab_size: int) -> ModelConfig:
    """The pretraining / SFT model: the --model preset at --block_size, with --dropout."""
    return ModelConfig.preset(
        cfg.model,
        vocab_size=vocab_size,
        block_size=cfg.block_size,
        embd_pdrop=cfg.dropout,
        resid_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
    )


def _rl_model_cfg(mcfg: ModelConfig) -> ModelConfig:
    return dataclasses.replace(mcfg, embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0)


def stage_plan(cfg: HappyConfig, mcfg: ModelConfig) -> dict[str, tuple[dict, int]]:
    """{stage: (its checkpoint meta, its number of steps)} in the order the pipeline runs them."""
    rl_mcfg = _rl_model_cfg(mcfg)
    plan = {name: (_lm_meta(name, cfg, mcfg), getattr(cfg, name).steps) for name in ("pretrain", "sft")}
    if cfg.reward == "learned":
        plan["reward_model"] = (_rm_meta(cfg, rl_mcfg), RM_STEPS)
    plan["rl"] = (_rl_meta(cfg, rl_mcfg), cfg.rl.iters)
    return plan


def _stage_meta(cfg: HappyConfig, mcfg: ModelConfig, stage, **extra) -> dict:
    parts = {
        "model": dataclasses.asdict(mcfg),
        "seed": cfg.seed,
        "stage": stage and dataclasses.asdict(stage),
    }
    return json.loads(json.dumps({**parts, **extra}))


def _jsonable(cfg) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def sample_tweets(params, mcfg, tokenizer, n, *, key, top_k=30, temperature=1.0):
    prompt = jnp.full((n, 1), tokenizer.eos_id, jnp.int32)
    scfg = SampleConfig(
        max_new_tokens=mcfg.block_size - 1, temperature=temperature, top_k=top_k, eos_id=tokenizer.eos_id
    )
    ro = sampling.sample(params, prompt, jnp.ones((n, 1), bool), mcfg, scfg, key=key)
    return tokenizer.decode_batch(np.asarray(ro.response), np.asarray(ro.response_mask), stop_at_eos=True)


def distinct_n(texts: list[str], n: int = 2) -> float:
    """Distinct-n over words: unique n-grams / all n-grams across the texts."""
    grams = [tuple(w[i : i + n]) for t in texts for w in [t.split()] for i in range(len(w) - n + 1)]
    return len(set(grams)) / max(len(grams), 1)


# The RL stage's fields whose default depends on --algo (None in RLStageConfig), and their values.
RL_DEFAULTS = dict(lr=3e-4, epochs=1)
RL_ALGO_DEFAULTS = {
    # the REBEL authors' 4 passes (ZhaolinGao/REBEL src/tldr/rebel.py noptepochs); the lr measured (README)
    "rebel": dict(lr=3e-5, epochs=4),
}


def rl_settings(cfg: HappyConfig) -> RLStageConfig:
    """The RL stage's config with every field --algo sets left unset (None) filled in (`RL_DEFAULTS`)."""
    defaults = {**RL_DEFAULTS, **RL_ALGO_DEFAULTS.get(cfg.algo, {})}
    return dataclasses.replace(cfg.rl, **{k: v for k, v in defaults.items() if getattr(cfg.rl, k) is None})


def _rl_config(cfg: HappyConfig) -> rl.RLConfig:
    """The library RLConfig of --algo ppo / pg / grpo / rloo and the --rl.* flags."""
    rc = rl_settings(cfg)
    group = cfg.algo in ("grpo", "rloo")
    return rl.RLConfig(
        algo=cfg.algo,
        kl_coef=rc.kl_coef,
        kl_target=rc.kl_target,
        lam=rc.lam,
        clip_eps=rc.clip_eps,
        vf_coef=rc.vf_coef,
        epochs=rc.epochs,
        minibatches=rc.minibatches,
        micro_batches=rc.micro_batches,
        # GRPO as in DeepSeekMath: group-standardised advantages and a k3 KL loss term; RLOO as in
        # Ahmadian et al. / TRL: leave-one-out baseline, k1 in the sequence reward.
        group_size=rc.pairs_n if group else None,
        kl_penalty="loss" if cfg.algo == "grpo" else "reward",
        kl_kind="k3" if cfg.algo == "grpo" else "k1",
        loss_agg="seq_mean_token_mean" if cfg.algo == "grpo" else "token_mean",
        whiten_advantages=not group,
        ptx_coef=rc.ptx_coef,
        no_eos_penalty=rc.no_eos_penalty,
    )


def _rl_stage(
    cfg: HappyConfig, mcfg, sft_params, tokenizer, mesh, args, tok_path, reward_host, reward_jax, ptx_data
):
    rc = rl_settings(cfg)
    optim = train.OptimConfig(lr=rc.lr, weight_decay=0.0, grad_clip=1.0)
    tx = train.make_optimizer(optim)
    scfg = SampleConfig(
        max_new_tokens=mcfg.block_size - 1,
        temperature=rc.temperature,
        top_k=rc.top_k,
        eos_id=tokenizer.eos_id,
    )
    ref = parallel.put(sft_params, mesh)
    b = rc.batch_size
    prompt = jnp.full((b, 1), tokenizer.eos_id, jnp.int32)
    prompt_mask = jnp.ones((b, 1), bool)
    prompt, prompt_mask = parallel.shard_batch((prompt, prompt_mask), mesh)
    meta = _rl_meta(cfg, mcfg)

    if cfg.algo in rl.ALGOS:
        rlc = _rl_config(cfg)

        def ptx_at(i):
            """PPO-ptx's pretraining batch for iteration i: `batch_size` tweets of the pretraining set."""
            if not rc.ptx_coef:
                return None
            ids, mask = ptx_data
            rows = np.random.default_rng([cfg.seed, 7, i]).choice(ids.shape[0], b, replace=False)
            return parallel.shard_batch(train.LMBatch(ids[rows], mask[rows], mask[rows]), mesh)

        value = {"gpt": sft_params, "head": model.init_scalar_head(jax.random.key(1), mcfg)}
        value = value if cfg.algo == "ppo" else None
        # Policy and value clipped apart: one global norm would let the value loss shrink policy steps.
        tx = train.make_per_model_optimizer({"policy": optim, "value": optim})
        state = rl.init_rl_state(rl.init_rl_params(sft_params, value, rlc), tx, rlc)
        state = _place(state, mesh)
        sample = jax.jit(lambda p, k: sampling.sample_fn(p, prompt, prompt_mask, mcfg, scfg, k))
        if reward_jax is not None:
            fused = rl.make_fused_iteration(mcfg, scfg, tx, rlc, reward_jax)
            iteration = jax.jit(
                lambda s, k, ptx: fused(s, ref, prompt, prompt_mask, key=k, ptx=ptx), donate_argnums=0
            )

            def step_fn(state, i, key):
                state, metrics, _ = iteration(state, key, ptx_at(i))
                return state, metrics
        else:
            learn = jax.jit(rl.make_learn(mcfg, tx, rlc, sample_cfg=scfg), donate_argnums=0)

            def step_fn(state, i, key):
                k_sample, k_learn = jax.random.split(key)
                # Blocks on the sampler (and the update before it) first: the time is VADER's alone.
                rollout = jax.block_until_ready(sample(state.params["policy"], k_sample))
                t0 = time.perf_counter()
                scores = reward_host(rollout)
                metrics_host = {"reward_host_s": time.perf_counter() - t0}
                state, metrics = learn(state, ref, rollout, jnp.asarray(scores), key=k_learn, ptx=ptx_at(i))
                return state, {**metrics, **metrics_host}

        policy_of = lambda s: s.params["policy"]  # noqa: E731
    else:  # REBEL / DPO / IPO on best/worst pairs of n answers per prompt, regenerated every iteration
        n = rc.pairs_n
        n_prompts = max(b // n, 1)
        pprompt = jnp.full((n_prompts, 1), tokenizer.eos_id, jnp.int32)
        pmask = jnp.ones((n_prompts, 1), bool)
        if cfg.algo == "rebel":
            step = train.make_rebel_step(mcfg, tx, eta=rc.eta, epochs=rc.epochs, minibatches=rc.minibatches)
        else:
            loss_type = "ipo" if cfg.algo == "ipo" else "sigmoid"
            step = train.make_dpo_step(
                mcfg, tx, beta=rc.dpo_beta, loss_type=loss_type, average_logprobs=rc.average_logprobs
            )
        state = _place(train.init_train_state(sft_params, tx), mesh)
        jstep = jax.jit(lambda s, batch, k: step(s, batch, key=k), donate_argnums=0)
        gen = jax.jit(lambda p, k: preference.generate_answers(p, pprompt, pmask, mcfg, scfg, n, key=k))
        logp = jax.jit(lambda p, ro: preference.rollout_logprobs_fn(p, ro, mcfg))

        def step_fn(state, i, key):
            k_gen, k_step = jax.random.split(key)
            rollout = gen(state.params, k_gen)
            scores = reward_host(rollout) if reward_jax is None else np.asarray(reward_jax(rollout))
            pol = logp(state.params, rollout)  # pi_t, the policy that sampled
            ref_lp = logp(ref, rollout)
            # REBEL regresses against pi_t, on its authors' reward (score, no-EOS penalty, KL to SFT);
            # DPO / IPO against the frozen SFT model, on pairs picked by the score.
            if cfg.algo == "rebel":
                base = pol
                pair_rewards = preference.rebel_rewards(
                    scores,
                    rollout.finished,
                    pol,
                    ref_lp,
                    kl_coef=rc.kl_coef,
                    no_eos_penalty=rc.no_eos_penalty,
                )
            else:
                base, pair_rewards = ref_lp, scores
            sel = preference.select_pairs(
                np.asarray(rollout.response), np.asarray(rollout.response_mask), np.asarray(pair_rewards), n
            )
            batch = preference.build_pref_batch(rollout, sel, np.asarray(base), num_pairs=n_prompts)
            # With no pair (every prompt's answers tied or identical) the loss and gradient are 0 (REBEL skips
            # the update; DPO / IPO still take an Adam step on momentum alone).
            state, metrics = jstep(state, batch, k_step)
            rmask = rollout.response_mask
            kl_tok = float(jnp.sum(pol - ref_lp) / jnp.maximum(jnp.sum(rmask), 1))
            pair_metrics = sel.metrics()  # pairs, no_pairs, skipped_tied, dropped_duplicate, ...
            pair_metrics["pair_reward_margin"] = pair_metrics.pop("reward_margin")  # not DPO's implicit one
            return state, {
                **metrics,
                **pair_metrics,
                "reward": float(np.mean(scores)),
                "kl_per_token": kl_tok,
                "response_length": float(jnp.mean(jnp.sum(rmask, -1))),
            }

        policy_of = lambda s: s.params  # noqa: E731

    result = runner.run_stage(
        run_dir=args.out,
        stage="rl",
        state=state,
        step_fn=step_fn,
        n_steps=rc.iters,
        root_key=jax.random.fold_in(jax.random.key(cfg.seed), 3),
        resume=args.resume,
        meta=meta,
        ckpt_every=max(rc.iters // 4, 1),
        tokenizer=tok_path,
        log_every=1,
        progress=not args.quiet,
    )
    if cfg.algo in PAIR_ALGOS:
        check_pairs(cfg, result, checkpoint.resolve(args.out) / "rl.jsonl")
    return result, policy_of(result.state)


class NoPairsError(ValueError):
    """Every iteration of a REBEL / DPO / IPO stage had no pair to learn from: the policy did not move."""


def check_pairs(cfg: HappyConfig, result: runner.StageResult, metrics_path) -> None:
    """Count the stage's iterations without a pair into its summary; raise NoPairsError if that is all of
    them (the whole stage, resumed parts included, as its metrics file records it)."""
    records = runner.read_metrics(metrics_path) if metrics_path.exists() else result.history
    empty = sum(1 for r in records if r.get("no_pairs", 0.0) > 0)
    result.summary["no_pair_iterations"] = empty
    if records and empty == len(records):
        tied = sum(r.get("skipped_tied", 0.0) for r in records)
        raise NoPairsError(
            f"rl: none of the {len(records)} {cfg.algo} iterations had a pair to learn from (every prompt's "
            f"{cfg.rl.pairs_n} answers tied on the reward ({tied:.0f} times) or were identical; no_pairs in "
            f"{metrics_path}), so the policy was not trained: raise --rl.pairs_n or --rl.temperature, or use "
            "a reward that tells the answers apart"
        )


# --------------------------------------------------------------------------------------- learned RM


def train_reward_model(cfg, mcfg, init_params, tokenizer, train_rows, test_rows, mesh, args, tok_path):
    """A sentiment reward model: the pretrained GPT + a scalar head trained with the pairwise loss on
    (positive, negative) tweet pairs; its score is the reward. Returns (params, held-out accuracy)."""
    pos = [r["text"] for r in train_rows if r["sentiment"] == "positive"]
    neg = [r["text"] for r in train_rows if r["sentiment"] == "negative"]
    L = mcfg.block_size
    pi, pm = encode_rows(tokenizer, pos, L)
    ni, nm = encode_rows(tokenizer, neg, L)
    tx = train.make_optimizer(train.OptimConfig(lr=1e-3, warmup_steps=10, total_steps=RM_STEPS))
    params = {"gpt": init_params, "head": model.init_scalar_head(jax.random.key(2), mcfg)}
    state = _place(train.init_train_state(params, tx), mesh)
    step = parallel.jit_step(train.make_rm_step(mcfg, tx), mesh, state)
    bs = LEARNED_RM_BATCH

    def step_fn(state, i, key):
        rng = np.random.default_rng([cfg.seed, i])
        a, c = rng.integers(0, len(pos), bs), rng.integers(0, len(neg), bs)
        batch = train.RankBatch(
            np.stack([pi[a], ni[c]], 1), np.stack([pm[a], nm[c]], 1), np.ones((bs, 2), bool)
        )
        return step(state, parallel.shard_batch(batch, mesh), key)

    result = runner.run_stage(
        run_dir=args.out,
        stage="reward_model",
        state=state,
        step_fn=step_fn,
        n_steps=RM_STEPS,
        root_key=jax.random.key(cfg.seed + 11),
        resume=args.resume,
        meta=_rm_meta(cfg, mcfg),
        tokenizer=tok_path,
        log_every=20,
        progress=not args.quiet,
    )
    tp = [r["text"] for r in test_rows if r["sentiment"] == "positive"]
    tn = [r["text"] for r in test_rows if r["sentiment"] == "negative"]
    m = min(len(tp), len(tn))
    a_i, a_m = encode_rows(tokenizer, tp[:m], L)
    b_i, b_m = encode_rows(tokenizer, tn[:m], L)
    ev = jax.jit(train.make_rm_eval(mcfg))
    correct, total = ev(
        result.state.params,
        train.RankBatch(np.stack([a_i, b_i], 1), np.stack([a_m, b_m], 1), np.ones((m, 2), bool)),
    )
    return result.state.params, float(correct) / float(total)


# ------------------------------------------------------------------------------------------- plots


def plot(out, name: str, series: dict[str, list[tuple[float, float]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k, v in series.items() if v]
    if not keys:
        return
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
    for ax, k in zip(axes[0], keys, strict=True):
        xs, ys = zip(*series[k], strict=True)
        ax.plot(xs, ys, marker="." if len(xs) < 30 else None)
        ax.set_title(k)
        ax.set_xlabel("step")
    fig.tight_layout()
    with (out / f"{name}.png").open("wb") as f:  # an epath: local or gs://
        fig.savefig(f, format="png", dpi=80)
    plt.close(fig)


def _series(history, *keys):
    return {k: [(r["step"], r[k]) for r in history if k in r] for k in keys}


# -------------------------------------------------------------------------------------------- main


def _tokenizer_json(tokenizer: CharTokenizer) -> str:
    """What `tokenizer.save` writes, as text (so it can go to gs:// through epath)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "tokenizer.json"
        tokenizer.save(path)
        return path.read_text(encoding="utf-8")


def _json_or_none(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return None


def _fmt(x, spec=".3f") -> str:
    return "n/a" if x is None else format(x, spec)


def run(cfg: HappyConfig, args) -> dict:
    """The whole pipeline over `args.out`, holding its lock; returns the summary.

    Host memory: glibc's malloc arenas are capped at 2 (`memory.limit_malloc_arenas`; threads that
    JAX started before stay as they are) and freed heap goes back to the OS after every XLA
    compilation (`memory.trim_after_compiles`); glibc would otherwise keep each compile's and each
    thread's peak resident, and the run's peak RSS with them. Neither changes a result. If no JAX
    computation ran yet, XLA:CPU compiles with its classic fusion emitters (`memory.lean_cpu_compiles`:
    ~150 MB less per compile, the same speed; $XLA_FLAGS naming the flag overrides it).
    """
    memory.limit_malloc_arenas()
    memory.lean_cpu_compiles()
    setup_mem = memory.Tracker()  # the data, the tokenizer and the encoded rows, until pretraining
    try:
        with rundir.lock(args.out), memory.trim_after_compiles():
            return _run(cfg, args, setup_mem)
    finally:
        setup_mem.stop()  # no sampler thread outlives a refused or failed run


def _place(state, mesh):
    """`parallel.put(state, mesh)`, then the programs that built it dropped (`_drop_programs`). A state
    built op by op (params, optimizer moments, a value head) compiles one small program per op and
    shape, each holding ~1 MB of host memory on XLA:CPU for as long as JAX caches it: 57 MB for
    pretraining's params and Muon state, 41 MB for PPO's policy, value and Adam state."""
    state = parallel.put(state, mesh)
    _drop_programs()
    return state


def _drop_programs() -> None:
    """Frees every compiled program between stages, so that each stage's compiles start from the RSS of
    the params and data alone: held together, a stage's programs and the next one's set the run's peak.
    Programs compile to the same code again, so no result changes; the few a later stage shares (the
    evaluator, the sampler of the samples) compile again there, or are read back from --compile-cache.
    """
    jax.clear_caches()
    memory.malloc_trim()


def _run(cfg: HappyConfig, args, setup_mem: memory.Tracker) -> dict:
    out = checkpoint.resolve(args.out)  # an epath, local or gs://, like the checkpoints
    t_start = time.perf_counter()
    if getattr(args, "compile_cache", None):
        # Compiled programs persist across runs: a second run (or a --resume) skips most compilation.
        jax.config.update("jax_compilation_cache_dir", str(pathlib.Path(args.compile_cache).expanduser()))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    mesh = parallel.make_mesh(fsdp=cfg.fsdp)
    train_rows, test_rows = load_data(args.data_dir)
    check_data(cfg, train_rows, test_rows, args.data_dir)
    tokenizer = CharTokenizer.from_corpus([r["text"] for r in train_rows], eos=EOS, unk="?")
    mcfg = model_config(cfg, tokenizer.vocab_size)
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))

    # Every refusal before the first write, so that a refused run leaves --out as it was.
    tok_path, tok_text = out / "tokenizer.json", _tokenizer_json(tokenizer)
    if args.resume and tok_path.exists() and _json_or_none(tok_path.read_text()) != json.loads(tok_text):
        saved = _json_or_none(tok_path.read_text())
        saved = (
            f"{len(saved['chars'])} characters"
            if isinstance(saved, dict) and "chars" in saved
            else "unreadable"
        )
        raise ValueError(
            f"the tokenizer built from this --data-dir ({tokenizer.vocab_size} characters) differs from "
            f"{tok_path} ({saved}), which the checkpoints were trained with: resume with the --data-dir "
            "the run started with, or use a fresh --out"
        )
    plan = stage_plan(cfg, mcfg)
    steps = rundir.check_resume(out, {name: meta for name, (meta, _) in plan.items()}, resume=args.resume)
    summary_path = out / "summary.json"
    if args.resume and summary_path.exists() and all(steps[s] == n for s, (_, n) in plan.items()):
        print(
            f"nothing to do: {args.out} holds a finished run (every stage at its last step, summary.json "
            "written); it was left as it is. Use a fresh --out to run again.",
            file=sys.stderr,
            flush=True,
        )
        return json.loads(summary_path.read_text())

    tok_path.write_text(tok_text)
    L = cfg.block_size + 1
    all_train = encode_rows(tokenizer, [r["text"] for r in train_rows], L)
    all_test = encode_rows(tokenizer, [r["text"] for r in test_rows], L)
    is_pos = lambda rows: np.array([r["sentiment"] == "positive" for r in rows])  # noqa: E731
    pos_train = tuple(x[is_pos(train_rows)] for x in all_train)
    pos_test = tuple(x[is_pos(test_rows)] for x in all_test)
    say(
        f"HappyGPT: {mcfg.num_params / 1e6:.2f}M params, vocab {tokenizer.vocab_size}, "
        f"{len(jax.devices())} device(s)"
    )
    summary: dict[str, Any] = {"config": _jsonable(cfg), "devices": len(jax.devices())}
    with (out / "samples.txt").open("w") as samples_file:

        def show(title, params, key, n=8):
            texts = sample_tweets(params, mcfg, tokenizer, 32, key=key, top_k=cfg.rl.top_k)
            scores = rewards.vader_scores(texts)
            say(f"\n--- {title}: mean VADER {scores.mean():.3f}, distinct-2 {distinct_n(texts):.3f}")
            for t in texts[:n]:
                say(f"  {t}")
            samples_file.write(f"# {title}\n" + "".join(f"{t}\n" for t in texts) + "\n")
            samples_file.flush()
            return texts, scores

        # Pretrain -> SFT -> RL; each stage starts from the last one's final checkpoint. Each stage's
        # summary records its host memory (from its start to the next one's: its evaluation and
        # samples included).
        summary["memory"] = {"setup": setup_mem.stop().summary()}
        with memory.track() as mem:
            init = model.init_params(jax.random.key(cfg.seed), mcfg)
            pre = _lm_stage(
                "pretrain", cfg, cfg.pretrain, mcfg, init, all_train, all_test, mesh, args, tok_path
            )
            say(f"pretrain: val loss {pre.summary['val_loss']:.4f} ({pre.summary['wall_s']:.1f} s)")
            _drop_programs()  # the stage's step and evaluator, before the sampler compiles
            show("after pretraining", pre.state.params, jax.random.key(100))
        pre.summary.update(mem.summary())
        _drop_programs()

        with memory.track() as mem:
            sft_cfg = dataclasses.replace(mcfg)
            sft = _lm_stage(
                "sft", cfg, cfg.sft, sft_cfg, pre.state.params, pos_train, pos_test, mesh, args, tok_path
            )
            say(f"sft: val loss {sft.summary['val_loss']:.4f} ({sft.summary['wall_s']:.1f} s)")
            _drop_programs()
            before, before_scores = show("after SFT (before RL)", sft.state.params, jax.random.key(101))
        sft.summary.update(mem.summary())
        _drop_programs()
        rl_mcfg = _rl_model_cfg(mcfg)
        reward_host = rewards.make_text_reward(tokenizer, rewards.vader_scores)
        reward_jax = None
        if cfg.reward == "learned":
            with memory.track() as mem:
                rm_params, acc = train_reward_model(
                    cfg, rl_mcfg, pre.state.params, tokenizer, train_rows, test_rows, mesh, args, tok_path
                )
            summary["memory"]["reward_model"] = mem.summary()
            summary["reward_model_accuracy"] = acc
            say(f"reward model: held-out accuracy {acc:.3f} (positive vs negative test tweets)")
            reward_jax = rewards.make_learned_reward(rm_params, rl_mcfg)
        with memory.track() as mem:
            res, policy = _rl_stage(
                cfg,
                rl_mcfg,
                sft.state.params,
                tokenizer,
                mesh,
                args,
                tok_path,
                reward_host,
                reward_jax,
                all_train,
            )
            _drop_programs()
            after, after_scores = show("after RL", policy, jax.random.key(102))
        res.summary.update(mem.summary())
    # The curves last, from the metrics files (whole stages, also when this call resumed them), once
    # every program is dropped: importing matplotlib holds ~25 MB, which would otherwise add to every
    # later stage's peak.
    _drop_programs()
    rl_history = runner.read_metrics(out / "rl.jsonl")
    plot(out, "pretrain", _series(runner.read_metrics(out / "pretrain.jsonl"), "loss", "eval/loss"))
    plot(out, "sft", _series(runner.read_metrics(out / "sft.jsonl"), "loss", "eval/loss"))
    plot(out, "rl", _series(rl_history, "reward", "kl_per_token", "clipfrac", "value_loss", "loss"))
    last = rl_history[-min(10, len(rl_history)) :]
    summary["stages"] = {"pretrain": pre.summary, "sft": sft.summary, "rl": res.summary}
    summary["rl"] = {
        "reward_first": rl_history[0]["reward"] if rl_history else None,
        "reward_last10": float(np.mean([r["reward"] for r in last])) if last else None,
        "kl_per_token_last10": float(np.mean([r["kl_per_token"] for r in last])) if last else None,
        "vader_before": float(before_scores.mean()),
        "vader_after": float(after_scores.mean()),
        "distinct2_before": distinct_n(before),
        "distinct2_after": distinct_n(after),
    }
    summary["wall_s"] = round(time.perf_counter() - t_start, 2)
    summary["memory"]["end"] = memory.snapshot()  # peak_rss_mb: the whole run's
    summary["memory"]["xla_flags"] = os.environ.get("XLA_FLAGS", "")  # lean_cpu_compiles's, if it acted
    summary_path.write_text(json.dumps(summary, indent=2))
    say(
        f"\nHappyGPT done in {summary['wall_s']:.0f} s: pretrain val {pre.summary['val_loss']:.3f}, "
        f"SFT val {sft.summary['val_loss']:.3f}, RL reward {_fmt(summary['rl']['reward_last10'])} "
        f"(KL/token {_fmt(summary['rl']['kl_per_token_last10'])}), outputs in {args.out}"
    )
    return summary


# --------------------------------------------------------------------------------------------- CLI


def _add_fields(parser, cls, prefix, defaults):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        value = getattr(defaults, f.name)
        if dataclasses.is_dataclass(value):
            _add_fields(parser, type(value), f"{prefix}{f.name}.", value)
            continue
        shown = value
        if cls is RLStageConfig and f.name in RL_DEFAULTS and value is None:
            by_algo = ", ".join(f"{a} {d[f.name]}" for a, d in RL_ALGO_DEFAULTS.items() if f.name in d)
            shown = f"{RL_DEFAULTS[f.name]}; {by_algo}"
        if f.name == "muon_lr" and value is None:
            shown = "none: 0.02 when the stage's optimizer is muon"
        # Only flags given on the command line reach the namespace, so "none" can set a field to None.
        parser.add_argument(
            f"--{prefix}{f.name}",
            type=flag_parser(hints[f.name]),
            default=argparse.SUPPRESS,
            help=f"(default: {shown})",
        )


def _apply(cfg, overrides: dict, prefix=""):
    """`cfg` with the flags in `overrides` applied; a refused value is a ValueError naming its flag."""
    changes = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            changes[f.name] = _apply(value, overrides, f"{prefix}{f.name}.")
        elif prefix + f.name in overrides:
            changes[f.name] = overrides[prefix + f.name]
    try:
        return dataclasses.replace(cfg, **changes)
    except ValueError as err:
        raise ValueError(flag_message(str(err), type(cfg), lambda name: f"--{prefix}{name}")) from None


# RL flags that act only for some algorithms; given for another, they are refused rather than ignored.
_ALGO_FLAGS = {
    "rl.kl_coef": ("ppo", "pg", "grpo", "rloo", "rebel"),
    "rl.kl_target": ("ppo", "pg", "grpo", "rloo"),
    "rl.epochs": ("ppo", "grpo", "rloo", "rebel"),
    "rl.minibatches": ("ppo", "grpo", "rloo", "rebel"),
    "rl.micro_batches": ("ppo", "pg", "grpo", "rloo"),
    "rl.clip_eps": ("ppo", "grpo", "rloo"),
    "rl.vf_coef": ("ppo",),
    "rl.lam": ("ppo",),
    "rl.pairs_n": ("grpo", "rloo", "rebel", "dpo", "ipo"),
    "rl.eta": ("rebel",),
    "rl.dpo_beta": ("dpo", "ipo"),
    "rl.average_logprobs": ("dpo", "ipo"),
    "rl.ptx_coef": ("ppo", "pg", "grpo", "rloo"),
    "rl.no_eos_penalty": ("ppo", "pg", "grpo", "rloo", "rebel"),
}


class ConfigError(ValueError):
    """A flag value (or a combination, or the device count) the run cannot use; found before any work."""


def check_config(cfg: HappyConfig, given) -> None:
    """What the configs cannot check alone: flags that do nothing for --algo, and flag combinations.

    Args:
      cfg: the parsed config.
      given: the config flags set on the command line ("rl.kl_coef", ...).

    Raises:
      ConfigError: one line naming the flags and the fix.
    """
    for flag, algos in _ALGO_FLAGS.items():
        if flag in given and cfg.algo not in algos:
            raise ConfigError(
                f"--{flag} does nothing under --algo {cfg.algo} (it acts for {', '.join(algos)}): drop it"
            )
    rc = cfg.rl
    if cfg.algo in ("grpo", "rloo") and rc.batch_size % rc.pairs_n:
        raise ConfigError(
            f"--rl.batch_size {rc.batch_size} must be a multiple of --rl.pairs_n {rc.pairs_n}, the "
            f"{cfg.algo} group size"
        )
    if cfg.algo in ("ppo", "grpo", "rloo") and rc.batch_size % rc.minibatches:
        raise ConfigError(
            f"--rl.batch_size {rc.batch_size} must be a multiple of --rl.minibatches {rc.minibatches}"
        )
    rows = rc.batch_size // (1 if cfg.algo == "pg" else rc.minibatches)  # an update's rows
    if cfg.algo in rl.ALGOS and rows % rc.micro_batches:
        raise ConfigError(
            f"--rl.micro_batches {rc.micro_batches} must divide an update's {rows} rows (--rl.batch_size "
            f"{rc.batch_size}"
            + ("" if cfg.algo == "pg" else f" / --rl.minibatches {rc.minibatches}")
            + "); --rl.micro_batches 1 runs each update whole"
        )
    pairs = max(rc.batch_size // rc.pairs_n, 1)  # one pair per prompt at most
    if cfg.algo == "rebel" and pairs % rc.minibatches:
        raise ConfigError(
            f"--rl.minibatches {rc.minibatches} must divide the {pairs} pairs of an iteration "
            f"(--rl.batch_size {rc.batch_size} / --rl.pairs_n {rc.pairs_n}, one pair per prompt)"
        )
    if cfg.algo in PAIR_ALGOS and rc.temperature == 0:
        raise ConfigError(
            f"--rl.temperature 0 (greedy) makes the --rl.pairs_n answers of a prompt identical, so "
            f"{cfg.algo} never has a pair: use a temperature > 0"
        )
    # The library's own configs, built now rather than after pretraining (RLConfig for ppo/pg/grpo/rloo).
    if cfg.algo in rl.ALGOS:
        try:
            _rl_config(cfg)
        except ValueError as err:
            raise ConfigError(flag_message(str(err), RLStageConfig, lambda name: f"--rl.{name}")) from None


def check_devices(cfg: HappyConfig, n_devices: int) -> None:
    """The batch sizes and --fsdp against the device count (every batch is split over all devices)."""
    if n_devices % cfg.fsdp:
        raise ConfigError(
            f"--fsdp {cfg.fsdp} does not divide the {n_devices} devices; use a divisor of {n_devices}"
        )
    sizes = {
        "--pretrain.batch_size": cfg.pretrain.batch_size,
        "--sft.batch_size": cfg.sft.batch_size,
        "--rl.batch_size": cfg.rl.batch_size,
    }
    bad = [f"{flag} {size}" for flag, size in sizes.items() if size % n_devices]
    if bad:
        raise ConfigError(
            f"{', '.join(bad)} not divisible by the {n_devices} devices (each batch is split over all of "
            f"them); use multiples of {n_devices}"
        )
    if cfg.reward == "learned" and LEARNED_RM_BATCH % n_devices:
        raise ConfigError(
            f"--reward learned trains on batches of {LEARNED_RM_BATCH} pairs, which {n_devices} devices do "
            "not divide; use --reward vader, or a device count that divides 64"
        )


class _OneLineParser(argparse.ArgumentParser):
    """Errors as one line on stderr (exit 2): the usage of every flag would bury them; --help lists them."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_args(argv=None) -> tuple[HappyConfig, argparse.Namespace]:
    """The config and the other flags of `argv`; a bad flag exits 2 with one line on stderr."""
    p = _OneLineParser(
        prog="python -m jaxrlhf.happy",
        description="HappyGPT: pretrain -> SFT -> RL against VADER sentiment, on a laptop CPU.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--data-dir",
        default=None,
        help="folder with the tweets' train.csv/test.csv "
        "(default: $JAXRLHF_DATA_DIR, else a checked download)",
    )
    p.add_argument("--out", default="runs/happy", help="output directory (default: runs/happy)")
    p.add_argument("--resume", action="store_true", help="continue a killed run from its last checkpoints")
    p.add_argument("--quick", action="store_true", help="a tiny run (< 1 minute) for tests and smoke checks")
    p.add_argument("--quiet", action="store_true", help="no progress bars or samples on stdout")
    p.add_argument(
        "--compile-cache",
        default="~/.cache/jaxrlhf/xla",
        help="persistent XLA compilation cache directory ('' disables it)",
    )
    _add_fields(p, HappyConfig, "", HappyConfig())
    args = p.parse_args(argv)
    given = {
        flag
        for flag in vars(args)
        if flag not in ("data_dir", "out", "resume", "quick", "quiet", "compile_cache")
    }
    try:
        cfg = _apply(HappyConfig(**QUICK) if args.quick else HappyConfig(), vars(args))
        check_config(cfg, given)
    except ValueError as err:
        p.error(str(err))
    return cfg, args


def main(argv=None) -> int:
    """The command: 0 when the pipeline finished, 2 for a refused flag or device count, 1 for any other
    refusal (--out, the data, a non-finite loss, a stage without pairs); each a line on stderr."""
    memory.limit_malloc_arenas()  # before JAX starts its threads (see run)
    memory.lean_cpu_compiles()  # before check_devices starts JAX's CPU client
    cfg, args = parse_args(argv)
    try:
        check_devices(cfg, len(jax.devices()))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        runner.check_output_dir(args.out, flag="--out")
        run(cfg, args)
    except (
        OSError,
        runner.NonFiniteError,
        rundir.RunDirBusyError,
        ValueError,
    ) as e:  # Damaged...: ValueError
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
