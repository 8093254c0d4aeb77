"""What the three TL;DR stages share: the config, the setup (mesh, tokenizer, model), the data as
fixed-shape token arrays, batch selection and the checkpoint handoff between stages.

Data layout (every stage): a prompt is left-padded to P = `max_prompt_tokens` and an answer is
right-padded to S = `max_summary_tokens`, so a training row is [prompt | answer] of T = P + S tokens,
exactly the layout of a PPO rollout. The prompt is InstructGPT's

    SUBREDDIT: r/{subreddit}\\nTITLE: {title}\\nPOST: {post}\\nTL;DR:

with the post cut at a paragraph / sentence / word boundary to fit P (rows whose header alone does not
fit are dropped), and an answer is " " + summary + <|endoftext|>, cut to S tokens with the end-of-text
kept, so the SFT model learns to stop and the reward model reads its score at that token.

Stage handoff (checkpoints under --out, local or gs://):
    sft: from Hugging Face weights (--init-from: GPT-2, Llama, Mistral, Qwen) or a random init (--model tiny)
    rm:  trunk from sft, zero-init scalar head; saves the reward normalisation in its meta
    ppo: policy and frozen reference from sft, value model from rm (normalisation folded in)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from experiments.tldr import flags
from jaxrlhf import checkpoint, data, hf, hf_decoders, model, parallel, rundir, runner, train
from jaxrlhf import tokenizers as jaxrlhf_tokenizers
from jaxrlhf.config import FAMILY_PRESETS, MODEL_PRESETS, ModelConfig, check_at_least, flag_message
from jaxrlhf.rl import FIELD_ALGOS, RLConfig, inactive_fields
from jaxrlhf.tokenizers import GPT2Tokenizer, Tokenizer

STAGES = ("sft", "rm", "ppo")
REWARD_NORMS = ("reference_mean", "policy_gain_bias", "none")
TINY = (2, 2, 32)  # n_layer, n_head, n_embd of --model tiny
GPT2_SIZES = tuple(name for name in MODEL_PRESETS if name.startswith("gpt2"))  # hub weights of these names
MODELS = ("tiny", *GPT2_SIZES, *FAMILY_PRESETS)
# Fields that only change logging / checkpoint cadence: left out of the resume check.
_CADENCE_FIELDS = ("eval_every", "ckpt_every", "log_every", "sample_every", "samples_logged")


# ------------------------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where the TL;DR data is and how it becomes token arrays.

    Attributes:
      data_dir: folder with the TL;DR files (None: $JAXRLHF_DATA_DIR, else OpenAI's blobs, online).
      cache_dir: where TFDS prepares them (None: $JAXRLHF_CACHE_DIR or ~/.cache/jaxrlhf).
      tokenizer_dir: a tokenizer directory (tokenizer.json, or GPT-2's vocab.json + merges.txt or
        encoder.json + vocab.bpe); None: the --init-from directory, else $JAXRLHF_DATA_DIR/gpt2_tokenizer,
        else the hub's "gpt2" (online).
      summary_split: post/summary split for SFT, the reward normalisation and the PPO prompts.
      summary_val_split: held-out post/summary split; "" carves `val_size` rows out of summary_split.
      comparison_split: human comparisons for the reward model.
      comparison_val_split: held-out comparisons; "" carves `val_size` rows out of comparison_split.
      val_size: rows carved out for a "" val split: a count (>= 1) or a fraction (< 1).
      max_rows: use at most this many rows of each training split (0: all).
      max_val_rows: use at most this many held-out rows for evaluation (0: all).
      max_prompt_tokens: P, the prompt budget.
      max_summary_tokens: S, the answer budget (end-of-text included) and the PPO response length R.
      seed: fixes the carved splits and the batch order.
    """

    data_dir: str | None = None
    cache_dir: str | None = None
    tokenizer_dir: str | None = None
    summary_split: str = "train"
    summary_val_split: str = "validation"
    comparison_split: str = "train"
    comparison_val_split: str = "validation"
    val_size: float = 256.0
    max_rows: int = 0
    max_val_rows: int = 2048
    max_prompt_tokens: int = 512
    max_summary_tokens: int = 53
    seed: int = 0

    def __post_init__(self):
        if not self.val_size > 0:
            raise ValueError(f"val_size={self.val_size}; use a count of rows >= 1 or a fraction in (0, 1)")
        check_at_least(self, 0, "max_rows", "max_val_rows")
        check_at_least(self, 1, "max_prompt_tokens")
        if self.max_summary_tokens < 2:
            raise ValueError(
                f"max_summary_tokens={self.max_summary_tokens}; an answer needs a token and the end-of-text, "
                "so use >= 2"
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class SFTConfig:
    """Supervised fine-tuning on post -> reference summary (loss on summary tokens only).

    Attributes:
      steps: optimizer steps (1800 = one epoch of the 116k OpenAI training posts at batch 64).
      batch_size: global batch (a multiple of the device count).
      eval_batch_size: global batch of the held-out loss.
      eval_every: held-out loss every this many steps (and at the end).
      ckpt_every: checkpoint every this many steps (and at the end).
      log_every: write metrics every this many steps.
      optim: AdamW settings; total_steps None means `steps`.
    """

    steps: int = 1800
    batch_size: int = 64
    eval_batch_size: int = 64
    eval_every: int = 200
    ckpt_every: int = 500
    log_every: int = 10
    optim: train.OptimConfig = dataclasses.field(
        default_factory=lambda: train.OptimConfig(lr=5e-5, warmup_steps=100, weight_decay=0.0)
    )

    def __post_init__(self):
        check_at_least(self, 1, "steps", "batch_size", "eval_batch_size", "log_every")
        check_at_least(self, 0, "eval_every", "ckpt_every")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RMConfig:
    """Pairwise (Bradley-Terry) reward model on human comparisons, read at the last real token.

    Attributes:
      steps: optimizer steps (1450 = one epoch of the 92.9k OpenAI training comparisons at batch 64).
      batch_size: global number of comparisons per step.
      eval_batch_size: global comparisons per held-out accuracy batch.
      eval_every: held-out accuracy every this many steps (and at the end).
      ckpt_every: checkpoint every this many steps (and at the end).
      log_every: write metrics every this many steps.
      norm_rows: reference summaries scored for the reward normalisation (mean / std).
      optim: AdamW settings; total_steps None means `steps`.
    """

    steps: int = 1450
    batch_size: int = 64
    eval_batch_size: int = 64
    eval_every: int = 200
    ckpt_every: int = 500
    log_every: int = 10
    norm_rows: int = 1024
    optim: train.OptimConfig = dataclasses.field(
        default_factory=lambda: train.OptimConfig(lr=3e-5, warmup_steps=50, weight_decay=0.0)
    )

    def __post_init__(self):
        check_at_least(self, 1, "steps", "batch_size", "eval_batch_size", "log_every", "norm_rows")
        check_at_least(self, 0, "eval_every", "ckpt_every")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PPOConfig:
    """RL (PPO, PG, GRPO or RLOO: rl.algo) against the normalised reward model with a KL penalty to SFT.

    Attributes:
      iterations: rollout + update rounds.
      batch_size: global rollouts per iteration (split into rl.minibatches); for grpo / rloo,
        batch_size / rl.group_size prompts with rl.group_size summaries each.
      temperature: sampling temperature of the rollouts; the policy scored and optimised is the
        tempered one, log_softmax(logits / T), as in lm-human-preferences and TRL.
      top_k: top-k filter of the rollouts (0 = off).
      top_p: nucleus filter of the rollouts (1.0 = off).
      eval_every: reward / KL on held-out and on training prompts every this many iterations (and
        before the first, at the end).
      eval_batches: batches (of batch_size prompts) per evaluation, of each prompt set.
      sample_every: write training samples every this many iterations.
      samples_logged: samples written per evaluation / sample step.
      ckpt_every: checkpoint every this many iterations (and at the end).
      log_every: write metrics every this many iterations.
      optim: AdamW settings of the policy (and of the value model, but for its lr); each model has its
        own optimizer and gradient clipping; total_steps None means iterations x epochs x minibatches.
      value_lr: peak learning rate of the value model (None: optim.lr; ppo only).
      reward_norm: how raw reward-model scores become the reward: "reference_mean" subtracts the mean
        score of rm.norm_rows reference summaries, so they score 0 on average (Stiennon et al. 2020,
        "Learning to summarize from human feedback"; Huang et al. 2024, "The N+ Implementation
        Details of RLHF with PPO"; the default KL 0.05 and no-EOS penalty -1 are on this scale);
        "policy_gain_bias" applies the gain and bias that give samples of the initial (SFT) policy mean 0
        and std 1 (Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences";
        lm-human-preferences normalises its reward model so on samples of the reference policy),
        measured on norm_prompts training prompts at this stage's sampling settings; "none" keeps the
        raw scores.
      norm_prompts: training prompts sampled for "policy_gain_bias".
      rl: the RL / KL settings (jaxrlhf.rl.RLConfig); rl.kl_target set = adaptive KL; rl.ptx_coef > 0
        adds PPO-ptx's LM loss on a batch_size batch of training posts with their reference summaries
        (every token a target: the TL;DR text the models were trained on stands in for InstructGPT's
        pretraining mix).
    """

    iterations: int = 1000
    batch_size: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    eval_every: int = 50
    eval_batches: int = 2
    sample_every: int = 10
    samples_logged: int = 4
    ckpt_every: int = 100
    log_every: int = 1
    optim: train.OptimConfig = dataclasses.field(
        default_factory=lambda: train.OptimConfig(
            lr=1e-5, schedule="linear", min_lr_ratio=0.0, weight_decay=0.0
        )
    )
    value_lr: float | None = None
    reward_norm: str = "reference_mean"
    norm_prompts: int = 256
    rl: RLConfig = dataclasses.field(
        default_factory=lambda: RLConfig(kl_coef=0.05, epochs=4, minibatches=4, no_eos_penalty=-1.0)
    )

    def __post_init__(self):
        if self.reward_norm not in REWARD_NORMS:
            raise ValueError(f"--ppo.reward_norm {self.reward_norm!r}; use one of {', '.join(REWARD_NORMS)}")
        for name in ("iterations", "batch_size", "eval_batches", "norm_prompts", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"--ppo.{name} {getattr(self, name)}; it must be >= 1")
        check_at_least(self, 0, "eval_every", "sample_every", "samples_logged", "ckpt_every")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature={self.temperature}; use a finite value >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k}; use 0 (off) or a positive k")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p}; use a value in (0, 1] (1 = off)")
        if self.value_lr is not None and not self.value_lr > 0:
            raise ValueError(f"value_lr={self.value_lr}; use a positive learning rate, or none (optim.lr)")
        if self.rl.group_size and self.batch_size % self.rl.group_size:
            raise ValueError(
                f"--ppo.batch_size {self.batch_size} is not a whole number of groups of --ppo.rl.group_size "
                f"{self.rl.group_size}; make it a multiple"
            )
        if self.rl.algo in FIELD_ALGOS["minibatches"] and self.batch_size % self.rl.minibatches:
            raise ValueError(
                f"--ppo.batch_size {self.batch_size} is not divisible by --ppo.rl.minibatches "
                f"{self.rl.minibatches}; change one"
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class TldrConfig:
    """The whole TL;DR run: model, output, mesh, data and the three stages.

    Attributes:
      model: the architecture: "tiny" (a random 2-layer width-32 GPT), a GPT-2 size (gpt2, gpt2-medium,
        gpt2-large, gpt2-xl: the hub's weights unless --init-from), or an open model's shape
        ("tiny-llama": a random 2-layer Llama with GQA; llama3.2-1b, qwen2.5-0.5b, ...: with --init-from
        DIR or random). Random models take the tokenizer's vocabulary. None: the --init-from directory's
        architecture, else gpt2.
      init_from: SFT's starting weights: a local Hugging Face directory of any supported architecture
        (GPT-2, Llama, Mistral, Qwen2, Qwen3; the architecture comes from its config.json) or a GPT-2 hub
        name; "random" for a random init. None: the hub weights named by a GPT-2 --model (random for
        tiny and tiny-llama).
      n_layer: override the preset's depth (random init only).
      n_head: override the preset's head count (random init only).
      n_embd: override the preset's width (random init only).
      dropout: embedding / residual / attention dropout of SFT and RM (PPO always runs without).
      bf16: bfloat16 matmuls (float32 params, optimizer, logprobs and heads); frozen models in bf16.
      remat: rematerialise each block in the backward pass (less memory, more compute).
      out: run directory, local or gs://; every stage checkpoints under it.
      resume: continue each stage from its latest checkpoint; finished stages are skipped.
      mesh_fsdp: size of the mesh's fsdp axis (params and optimizer state split over it); the data
        axis takes the remaining devices.
      seed: root of every PRNG key (init, dropout, sampling).
      multihost: call jax.distributed.initialize() first (multi-host TPU slices, SLURM / GPU clusters,
        where it finds the other processes itself); every process then runs the same command.
      stages: comma-separated stages to run (run.py).
      stop_after: "STAGE:N" stops that stage after N steps of this invocation without its final
        checkpoint (a preemption drill); continue with --resume.
      progress: show tqdm progress bars.
      data: the data settings.
      sft: the SFT stage.
      rm: the reward-model stage.
      ppo: the PPO stage.
    """

    model: str | None = None
    init_from: str | None = None
    n_layer: int | None = None
    n_head: int | None = None
    n_embd: int | None = None
    dropout: float = 0.0
    bf16: bool = False
    remat: bool = False
    out: str = "runs/tldr"
    resume: bool = False
    mesh_fsdp: int = 1
    seed: int = 0
    multihost: bool = False
    stages: str = ",".join(STAGES)
    stop_after: str = ""
    progress: bool = True
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    sft: SFTConfig = dataclasses.field(default_factory=SFTConfig)
    rm: RMConfig = dataclasses.field(default_factory=RMConfig)
    ppo: PPOConfig = dataclasses.field(default_factory=PPOConfig)

    def __post_init__(self):
        if self.model is not None and self.model not in MODELS:
            raise ValueError(f"--model {self.model!r}; use one of {', '.join(MODELS)}")
        unknown = set(self.stage_list) - set(STAGES)
        if unknown:
            raise ValueError(f"--stages has unknown {sorted(unknown)}; use a subset of {','.join(STAGES)}")
        if not self.stage_list:
            raise ValueError(f"stages={self.stages!r}; name at least one of {','.join(STAGES)}")
        check_at_least(self, 1, "mesh_fsdp", "n_layer", "n_head", "n_embd")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout}; use a rate in [0, 1)")
        if self.stop_after:
            name, _, n = self.stop_after.partition(":")
            if name not in STAGES or not n.isdigit():
                raise ValueError(f"stop_after={self.stop_after!r}; use STAGE:N, e.g. ppo:3")

    @property
    def stage_list(self) -> list[str]:
        return [s.strip() for s in self.stages.split(",") if s.strip()]

    def stop_after_for(self, stage: str) -> int | None:
        """Steps this invocation may run of `stage` (None: to the end)."""
        if not self.stop_after:
            return None
        name, _, n = self.stop_after.partition(":")  # checked in __post_init__
        return int(n) if name == stage else None


def inactive_flags(cfg: TldrConfig, given) -> list[str]:
    """The flags among `given` (config paths set on the command line) that would do nothing here."""
    algo, bad = cfg.ppo.rl.algo, []
    rl_given = [path[2] for path in given if path[:2] == ("ppo", "rl") and len(path) == 3]
    bad += [f"--ppo.rl.{name}" for name in inactive_fields(algo, rl_given)]
    if ("ppo", "value_lr") in given and algo != "ppo":
        bad.append("--ppo.value_lr")
    if ("ppo", "norm_prompts") in given and cfg.ppo.reward_norm != "policy_gain_bias":
        bad.append("--ppo.norm_prompts")
    return bad


def check_config(cfg: TldrConfig) -> None:
    """What the configs cannot check alone: the model they make (a local --init-from directory's
    config.json included), and the architecture flags against pretrained weights.

    Raises:
      ValueError: one line naming the flags and the fix.
    """
    source = init_source(cfg)
    if source is None and cfg.init_from is None and cfg.model in FAMILY_PRESETS and cfg.model != "tiny-llama":
        raise ValueError(
            f"--model {cfg.model} has no weights to download here: pass --init-from DIR (a local Hugging "
            "Face directory of the model) or --init-from random"
        )
    if source is not None and not os.path.isdir(source) and source not in GPT2_SIZES:
        # A hub name other than GPT-2's: its architecture would be known only after a download.
        raise ValueError(
            f"--init-from {source} is not a local directory; download the model (config.json, safetensors, "
            "tokenizer files) and pass its directory (hub names: GPT-2 sizes only)"
        )
    try:
        mcfg = model_config(cfg)
    except ValueError as err:
        raise ValueError(flags_message(str(err), ModelConfig)) from None
    if source is None:
        return
    fixed = [flags.flag_names((name,))[0] for name in ("n_layer", "n_head", "n_embd") if getattr(cfg, name)]
    if fixed:
        verb, pronoun = ("acts", "it") if len(fixed) == 1 else ("act", "them")
        raise ValueError(
            f"{', '.join(fixed)} {verb} for a random init only (--model tiny or --init-from random); the "
            f"weights of {source} fix the architecture: drop {pronoun}"
        )
    if source in GPT2_SIZES and mcfg.block_size > 1024:
        raise ValueError(
            f"--data.max_prompt_tokens {cfg.data.max_prompt_tokens} + --data.max_summary_tokens "
            f"{cfg.data.max_summary_tokens} = {mcfg.block_size} tokens, more than GPT-2's 1024 positions; "
            "lower them"
        )


def flags_message(message: str, cls: type) -> str:
    """A top-level config's `field=value; fix` error as `--field value; fix`."""
    return flag_message(message, cls, lambda name: flags.flag_names((name,))[0])


def parse_args(argv=None, *, description: str = "", prog: str | None = None) -> TldrConfig:
    """The TldrConfig of `argv`; a bad value, or a flag that does nothing for the chosen algorithm /
    normalisation, exits with a one-line error before any work."""
    parser = flags.make_parser(TldrConfig(), description=description, prog=prog)
    overrides = {tuple(dest.split(".")): value for dest, value in vars(parser.parse_args(argv)).items()}
    try:
        cfg = flags.replace_paths(TldrConfig(), overrides)
        check_config(cfg)
    except (TypeError, ValueError) as err:
        parser.error(str(err))
    inactive = inactive_flags(cfg, overrides)
    if inactive:
        one = len(inactive) == 1
        parser.error(
            f"{', '.join(inactive)} {'does' if one else 'do'} nothing with --ppo.rl.algo {cfg.ppo.rl.algo} "
            f"and --ppo.reward_norm {cfg.ppo.reward_norm}; drop {'it' if one else 'them'}"
        )
    return cfg


def stage_meta(cfg: TldrConfig, stage: str) -> dict:
    """The checkpoint meta of `stage`: everything that must match to resume it (not locations,
    mesh, or logging cadence)."""
    stage_cfg = dataclasses.asdict(getattr(cfg, stage))
    for name in _CADENCE_FIELDS:
        stage_cfg.pop(name, None)
    model_keys = ("model", "init_from", "n_layer", "n_head", "n_embd", "dropout", "bf16", "remat", "seed")
    data_cfg = dataclasses.asdict(cfg.data)
    for name in ("data_dir", "cache_dir", "tokenizer_dir"):
        data_cfg.pop(name)
    config = {"model": {k: getattr(cfg, k) for k in model_keys}, "data": data_cfg, stage: stage_cfg}
    return {"config": config}


# -------------------------------------------------------------------------------------------- setup


@dataclasses.dataclass(frozen=True)
class Setup:
    """What every stage needs: the config, the model config, the tokenizer (and a local copy of its
    files to save with each checkpoint) and the device mesh."""

    cfg: TldrConfig
    model_cfg: ModelConfig
    tokenizer: Tokenizer
    tokenizer_path: str
    mesh: jax.sharding.Mesh

    def close(self) -> None:
        """Remove the temporary copy of the tokenizer files."""
        shutil.rmtree(self.tokenizer_path, ignore_errors=True)


def model_config(cfg: TldrConfig, vocab_size: int = 50257) -> ModelConfig:
    """The model of --model / --init-from with block_size P + S, the dropout and dtype flags applied.

    A local --init-from directory gives the architecture (its config.json; --model, when given, must
    agree); a random init takes `vocab_size` (the tokenizer's) and the --n-layer / --n-head / --n-embd
    overrides. Params are float32 (the optimizer's); --bf16 sets the compute dtype.
    """
    length = cfg.data.max_prompt_tokens + cfg.data.max_summary_tokens
    common = dict(
        block_size=length,
        embd_pdrop=cfg.dropout,
        resid_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
        param_dtype="float32",
        compute_dtype="bfloat16" if cfg.bf16 else "float32",
        remat=cfg.remat,
    )
    source = init_source(cfg)
    if source is not None and os.path.isdir(source):
        try:
            file_cfg = hf.read_config(source)
        except ValueError as err:
            raise ValueError(f"--init-from {source}: {err}") from None
        if cfg.model is not None:  # a named shape must be the directory's
            bad = hf_decoders.architecture_differences(_preset(cfg, file_cfg.vocab_size), file_cfg)
            if bad:
                raise ValueError(
                    f"--model {cfg.model} is not the architecture of --init-from {source} "
                    f"({'; '.join(bad)}); drop --model (the directory's config.json gives it)"
                )
        if file_cfg.position == "learned" and length > file_cfg.block_size:
            raise ValueError(
                f"--data.max_prompt_tokens {cfg.data.max_prompt_tokens} + --data.max_summary_tokens "
                f"{cfg.data.max_summary_tokens} = {length} tokens, more than the {file_cfg.block_size} "
                f"positions of {source}; lower them"
            )
        return dataclasses.replace(file_cfg, **common)
    preset = _preset(cfg, vocab_size)
    sizes = {name: getattr(cfg, name) for name in ("n_layer", "n_head", "n_embd") if getattr(cfg, name)}
    return dataclasses.replace(preset, **sizes, **common)


def _preset(cfg: TldrConfig, vocab_size: int) -> ModelConfig:
    name = cfg.model or "gpt2"
    if name == "tiny":
        n_layer, n_head, n_embd = TINY
        return ModelConfig(
            vocab_size=vocab_size, block_size=1024, n_layer=n_layer, n_head=n_head, n_embd=n_embd
        )
    return ModelConfig.preset(name, vocab_size=vocab_size)


def init_source(cfg: TldrConfig) -> str | None:
    """Where SFT's weights come from: a directory or hub name, or None for a random init."""
    if cfg.init_from is None:
        name = cfg.model or "gpt2"
        return name if name in GPT2_SIZES else None
    return None if cfg.init_from == "random" else cfg.init_from


def load_tokenizer(cfg: TldrConfig) -> Tokenizer:
    """The tokenizer from --data.tokenizer_dir, the --init-from directory, the data dir's GPT-2 BPE or the
    hub's "gpt2" (see `tokenizers.load_tokenizer`: tokenizer.json, or GPT-2's BPE files).

    A directory without tokenizer files is passed over (but --data.tokenizer_dir's); one with a bad or
    half pair of files is an error naming the file, never a silent fall-back to another tokenizer.
    """
    given = cfg.data.tokenizer_dir
    if given and not os.path.isdir(given):
        raise FileNotFoundError(
            f"--data.tokenizer_dir {given} is not a directory; pass the folder of tokenizer.json or "
            "vocab.json"
        )
    candidates = [given, init_source(cfg)]
    if os.environ.get(data.common.ENV_DATA_DIR):
        candidates.append(os.path.join(os.environ[data.common.ENV_DATA_DIR], "gpt2_tokenizer"))
    for path in candidates:
        if path and os.path.isdir(path):
            try:  # a TokenizerFileError (bad files) is never passed over
                return jaxrlhf_tokenizers.load_tokenizer(path)
            except FileNotFoundError:
                if path == given:
                    raise
    try:
        from huggingface_hub import snapshot_download

        return GPT2Tokenizer.from_dir(snapshot_download("gpt2", allow_patterns=["vocab.json", "merges.txt"]))
    except Exception as err:
        raise OSError(
            f"no GPT-2 tokenizer found and the hub's 'gpt2' could not be fetched ({type(err).__name__}); "
            "pass --data.tokenizer_dir DIR with vocab.json + merges.txt"
        ) from err


def make_setup(cfg: TldrConfig) -> Setup:
    """The mesh, model config and tokenizer of `cfg`, after the checks that need no data: --out, the
    device count, a local --init-from config.json. Call `Setup.close()` when done (or use `main`)."""
    if cfg.multihost:
        # Not parallel.initialize_distributed(): it asks jax.default_backend() first, which starts the
        # backend, after which jax.distributed.initialize() refuses to run (so it fails on TPU VMs).
        jax.distributed.initialize()
    runner.check_output_dir(cfg.out, flag="--out")
    n_devices = len(jax.devices())
    if n_devices % cfg.mesh_fsdp:
        raise ValueError(
            f"--mesh-fsdp {cfg.mesh_fsdp} does not divide the {n_devices} devices; use a divisor of "
            f"{n_devices}"
        )
    mesh = parallel.make_mesh(fsdp=cfg.mesh_fsdp)
    n = parallel.batch_size_multiple(mesh)
    sizes = {
        "--sft.batch_size": cfg.sft.batch_size,
        "--sft.eval_batch_size": cfg.sft.eval_batch_size,
        "--rm.batch_size": cfg.rm.batch_size,
        "--rm.eval_batch_size": cfg.rm.eval_batch_size,
        "--ppo.batch_size": cfg.ppo.batch_size,
    }
    bad = [f"{k} {v}" for k, v in sizes.items() if v % n]
    if bad:
        raise ValueError(
            f"{', '.join(bad)} not divisible by the {n} devices of the mesh; use multiples of {n}"
        )
    tokenizer = load_tokenizer(cfg)
    model_cfg = model_config(cfg, tokenizer.vocab_size)
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} ids, more than the model's vocab_size "
            f"{model_cfg.vocab_size} (--init-from {init_source(cfg)}); pass the model's own tokenizer "
            "(--data.tokenizer_dir)"
        )
    tokenizer_path = tempfile.mkdtemp(prefix="tldr_tokenizer_")
    try:
        tokenizer.save(tokenizer_path)
    except BaseException:
        shutil.rmtree(tokenizer_path, ignore_errors=True)
        raise
    return Setup(cfg, model_cfg, tokenizer, tokenizer_path, mesh)


class StageError(RuntimeError):
    """An earlier stage's checkpoint is missing or unfinished (run or finish that stage first)."""


def main(
    run_stages,
    argv=None,
    *,
    stages: Iterable[str] | None = None,
    description: str = "",
    prog: str | None = None,
) -> int:
    """An entry point: parse `argv`, set up, `run_stages(setup)` (an exit code, or a stage's result for 0)
    holding --out (`guarded_out` for `stages`, default --stages).

    A bad flag exits 2 from the parser; a refused --out (held by another run, checkpoints without
    --resume, another config), device count, tokenizer, checkpoint or data file, or a non-finite loss is
    one line on stderr and exit 1. The temporary tokenizer copy is removed whatever happens.
    """
    cfg = parse_args(argv, description=description, prog=prog)
    setup = None
    try:
        setup = make_setup(cfg)
        with guarded_out(cfg, cfg.stage_list if stages is None else stages):
            code = run_stages(setup)
        return code if isinstance(code, int) else 0  # a stage's run returns its StageResult
    except (OSError, ValueError, StageError, runner.NonFiniteError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 1
    finally:
        if setup is not None:
            setup.close()


def initial_params(setup: Setup, key: jax.Array) -> model.Params:
    """SFT's starting params: Hugging Face weights (--init-from, any supported architecture) or a random
    init."""
    source = init_source(setup.cfg)
    if source is None:
        return model.init_params(key, setup.model_cfg)
    params, _ = hf.load(source, setup.model_cfg)
    return params


def main_process() -> bool:
    return jax.process_index() == 0


def write_json(path: epath.Path, record: dict) -> None:
    if main_process():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2) + "\n")


# --------------------------------------------------------------------------------------------- data


class Summaries(NamedTuple):
    """Posts with reference summaries, as token arrays (the SFT data and the PPO prompts).

    Attributes:
      prompt: [N, P] int32, left-padded.   prompt_mask: [N, P] bool.
      summary: [N, S] int32, " " + summary + <|endoftext|>, right-padded.   summary_mask: [N, S] bool.
    """

    prompt: np.ndarray
    prompt_mask: np.ndarray
    summary: np.ndarray
    summary_mask: np.ndarray


class Comparisons(NamedTuple):
    """Posts with a human-preferred and a rejected summary.

    Attributes:
      prompt: [N, P] int32, left-padded.   prompt_mask: [N, P] bool.
      answers: [N, 2, S] int32, chosen first.   answers_mask: [N, 2, S] bool.
    """

    prompt: np.ndarray
    prompt_mask: np.ndarray
    answers: np.ndarray
    answers_mask: np.ndarray


def encode_prompts(tokenizer, rows: list[dict], max_tokens: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Prompts of `rows` in the TL;DR format, left-padded: (ids [N, P], mask [N, P], kept row indices).
    A tokenizer with a beginning-of-text id (Llama's, from its tokenizer_config.json) starts each prompt
    with it, as the model was trained; GPT-2's has none. Rows whose prompt cannot fit even with the post
    cut to one word are dropped."""
    bos = getattr(tokenizer, "bos_id", None)
    start = [] if bos is None else [bos]
    texts, kept = [], []
    for i, row in enumerate(rows):
        try:
            text = data.format_tldr_prompt(
                row["subreddit"], row["title"], row["post"], max_tokens - len(start),
                lambda s: len(tokenizer.encode(s)),
            )  # fmt: skip
        except ValueError:
            continue
        texts.append(text)
        kept.append(i)
    seqs = [start + ids for ids in tokenizer.encode_many(texts)]
    ids, mask = data.pad_batch(seqs, max_tokens, pad_id=tokenizer.pad_id, side="left")
    return ids, mask, kept


def encode_answers(tokenizer, texts: list[str], max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """ " " + text + <|endoftext|>, cut to `max_tokens` keeping the end-of-text, right-padded. [N, S]."""
    seqs = [
        ids[: max_tokens - 1] + [tokenizer.eos_id] for ids in tokenizer.encode_many(" " + t for t in texts)
    ]
    return data.pad_batch(seqs, max_tokens, pad_id=tokenizer.eos_id, side="right")


_KINDS = {  # what `load_summaries` / `load_comparisons` read: loader, spec, file finder, split names
    "pairs": (data.load_tldr, data.tldr.TLDR_SPEC, data.tldr.find_tldr_files, data.common.SPLIT_ALIASES),
    "comparisons": (
        data.load_comparisons,
        data.tldr.COMPARISONS_SPEC,
        data.tldr.find_comparison_files,
        data.tldr.COMPARISON_SPLIT_ALIASES,
    ),
}


def describe_split(kind: str, split: str, cfg: DataConfig) -> str:
    """The files a split is read from, for messages: "the test split of /d/tldr/tldr_test500_dove.jsonl"."""
    _, spec, find, aliases = _KINDS[kind]
    split = data.common.canonical_split(split, aliases)
    try:
        folder = data.common.resolve_source_dir(spec, cfg.data_dir, cache_dir=cfg.cache_dir)
        files = ", ".join(str(path) for path in data.tldr.split_files(find(folder), split))
    except (OSError, ValueError):
        files = spec.name
    return f"the {split} split of {files}"


def _split_rows(kind: str, split: str, val_split: str, cfg: DataConfig) -> tuple[list[dict], list[dict], str]:
    """(train rows, held-out rows, where the train rows come from): two splits, or held-out rows carved
    out of one split."""
    load = _KINDS[kind][0]
    where = describe_split(kind, split, cfg)
    rows = load(split, cfg.data_dir, cache_dir=cfg.cache_dir)
    if val_split:
        val_rows = load(val_split, cfg.data_dir, cache_dir=cfg.cache_dir)
    else:
        val_size = int(cfg.val_size) if cfg.val_size >= 1 else float(cfg.val_size)
        n_val = val_size if isinstance(val_size, int) else int(round(val_size * len(rows)))
        if n_val >= len(rows):
            raise ValueError(
                f"--data.val_size {cfg.val_size:g} carves {n_val} held-out rows out of the {len(rows)} rows "
                f"of {where}, leaving none to train on; lower it (a count, or a fraction < 1)"
            )
        train_idx, val_idx = data.train_val_split(len(rows), val_size, seed=cfg.seed)
        rows, val_rows = [rows[i] for i in train_idx], [rows[i] for i in val_idx]
    if cfg.max_rows:
        rows = rows[: cfg.max_rows]
    if cfg.max_val_rows:
        val_rows = val_rows[: cfg.max_val_rows]
    return rows, val_rows, where


def _check_rows(n_rows: int, n_kept: int, cfg: DataConfig, where: str, need: tuple[int, str] | None):
    """Refuse rows whose prompts do not fit, and fewer usable rows than one batch (`need`: its size and
    flag), naming the files, the count and the flag."""
    budget = f"--data.max_prompt_tokens {cfg.max_prompt_tokens}"
    if n_rows and not n_kept:
        raise ValueError(
            f"{budget} is too small: not one of the {n_rows} prompts of {where} fits, even with its post cut "
            "to a word (the SUBREDDIT / TITLE header and 'TL;DR:' alone need more tokens); raise it"
        )
    if need is not None and n_kept < need[0]:
        size, flag = need
        notes = []
        if n_rows > n_kept:
            notes.append(f"{n_rows - n_kept} of its {n_rows} prompts do not fit in {budget}")
        if cfg.max_rows and n_rows == cfg.max_rows:
            notes.append(f"--data.max_rows {cfg.max_rows}")
        note = f" ({'; '.join(notes)})" if notes else ""
        raise ValueError(
            f"{where} has {n_kept} usable rows{note}, fewer than one {flag} {size} batch: lower {flag} or "
            "use more data"
        )


def _encode_summaries(tokenizer, rows: list[dict], cfg: DataConfig, where: str, need=None) -> Summaries:
    prompt, prompt_mask, kept = encode_prompts(tokenizer, rows, cfg.max_prompt_tokens)
    _check_rows(len(rows), len(kept), cfg, where, need)
    texts = [rows[i]["summary"] for i in kept]
    if texts and not any(texts):
        raise ValueError(
            f"every reference summary of {where} is empty ({len(texts)} rows): there is nothing to learn "
            "from; fill the summary field"
        )
    summary, summary_mask = encode_answers(tokenizer, texts, cfg.max_summary_tokens)
    return Summaries(prompt, prompt_mask, summary, summary_mask)


def _encode_comparisons(tokenizer, rows: list[dict], cfg: DataConfig, where: str, need=None) -> Comparisons:
    prompt, prompt_mask, kept = encode_prompts(tokenizer, rows, cfg.max_prompt_tokens)
    _check_rows(len(rows), len(kept), cfg, where, need)
    texts = [t for i in kept for t in (rows[i]["chosen"], rows[i]["rejected"])]
    answers, answers_mask = encode_answers(tokenizer, texts, cfg.max_summary_tokens)
    s = cfg.max_summary_tokens
    return Comparisons(prompt, prompt_mask, answers.reshape(-1, 2, s), answers_mask.reshape(-1, 2, s))


def load_summaries(setup: Setup, need: tuple[int, str] | None = None) -> tuple[Summaries, Summaries]:
    """(train, held-out) post/summary arrays.

    Args:
      setup: the run's setup.
      need: (rows, flag): refuse fewer usable training rows than one batch of this flag.

    Raises:
      ValueError: a bad file (file:line and field), prompts that cannot fit --data.max_prompt_tokens, only
        empty summaries, or fewer rows than `need`; one line naming the files and the count.
    """
    cfg = setup.cfg.data
    rows, val_rows, where = _split_rows("pairs", cfg.summary_split, cfg.summary_val_split, cfg)
    val_where = describe_split("pairs", cfg.summary_val_split, cfg) if cfg.summary_val_split else where
    return (
        _encode_summaries(setup.tokenizer, rows, cfg, where, need),
        _encode_summaries(setup.tokenizer, val_rows, cfg, f"the held-out rows of {val_where}"),
    )


def load_comparisons(setup: Setup, need: tuple[int, str] | None = None) -> tuple[Comparisons, Comparisons]:
    """(train, held-out) comparison arrays; checked as in `load_summaries`."""
    cfg = setup.cfg.data
    rows, val_rows, where = _split_rows("comparisons", cfg.comparison_split, cfg.comparison_val_split, cfg)
    val_where = (
        describe_split("comparisons", cfg.comparison_val_split, cfg) if cfg.comparison_val_split else where
    )
    return (
        _encode_comparisons(setup.tokenizer, rows, cfg, where, need),
        _encode_comparisons(setup.tokenizer, val_rows, cfg, f"the held-out rows of {val_where}"),
    )


def lm_batch(d: Summaries, idx: np.ndarray, valid: np.ndarray | None = None) -> train.LMBatch:
    """[prompt | summary] rows `idx` with the loss on summary tokens (and only on `valid` rows)."""
    loss_mask = np.concatenate([np.zeros_like(d.prompt_mask[idx]), d.summary_mask[idx]], axis=1)
    if valid is not None:
        loss_mask &= valid[:, None]
    return train.LMBatch(
        tokens=np.concatenate([d.prompt[idx], d.summary[idx]], axis=1),
        mask=np.concatenate([d.prompt_mask[idx], d.summary_mask[idx]], axis=1),
        loss_mask=loss_mask,
    )


def rank_batch(d: Comparisons, idx: np.ndarray, valid: np.ndarray | None = None) -> train.RankBatch:
    """[prompt | answer] for the chosen and rejected answer of rows `idx`: tokens [B, 2, P + S]."""
    prompt = np.repeat(d.prompt[idx][:, None], 2, axis=1)  # [B, 2, P]
    prompt_mask = np.repeat(d.prompt_mask[idx][:, None], 2, axis=1)
    rank_mask = np.ones((len(idx), 2), bool) if valid is None else np.repeat(valid[:, None], 2, axis=1)
    return train.RankBatch(
        tokens=np.concatenate([prompt, d.answers[idx]], axis=2),
        mask=np.concatenate([prompt_mask, d.answers_mask[idx]], axis=2),
        rank_mask=rank_mask,
    )


# ----------------------------------------------------------------------------------------- batching


def train_rows(n_rows: int, batch_size: int, step: int, seed: int) -> np.ndarray:
    """Global row indices of `step`'s batch: epochs of (seed, epoch)-fixed permutations, so the data
    position is the step number and a resumed run reads the same batches."""
    per_epoch = n_rows // batch_size
    if per_epoch == 0:
        raise ValueError(f"{n_rows} rows are fewer than one batch of {batch_size}; lower the batch size")
    epoch, b = divmod(step, per_epoch)
    return data.epoch_permutation(n_rows, seed=seed, epoch=epoch)[b * batch_size : (b + 1) * batch_size]


def eval_rows(n_rows: int, batch_size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Every row once in fixed-size batches: (indices [B], valid [B]); the last batch is padded with
    row 0 marked invalid, so one compiled program evaluates the whole set."""
    batches = []
    for start in range(0, n_rows, batch_size):
        idx = np.arange(start, start + batch_size)
        valid = idx < n_rows
        batches.append((np.where(valid, idx, 0), valid))
    return batches


def local(batch: Any) -> Any:
    """This process's contiguous share of a global host batch (every process holds all the data)."""
    n, i = jax.process_count(), jax.process_index()
    return jax.tree.map(lambda x: x[i * (len(x) // n) : (i + 1) * (len(x) // n)], batch)


def put_batch(batch: Any, mesh) -> Any:
    return parallel.shard_batch(local(batch), mesh)


def jit_eval(fn, mesh, params) -> Any:
    """jax.jit of `fn(params, batch) -> outputs` with params sharded like a train state and the
    batch split over the mesh; outputs replicated."""
    return jax.jit(
        fn,
        in_shardings=(parallel.tree_shardings(params, mesh), parallel.batch_sharding(mesh)),
        out_shardings=parallel.replicated(mesh),
    )


# --------------------------------------------------------------------------------------- checkpoints


def state_target(setup: Setup, init_fn) -> Any:
    """Abstract sharded target of the state `init_fn(key)` builds, to restore a checkpoint into."""
    shapes = jax.eval_shape(init_fn, jax.random.key(0))
    return checkpoint.abstract_like(shapes, parallel.tree_shardings(shapes, setup.mesh))


def stage_steps(cfg: TldrConfig, stage: str) -> int:
    return {"sft": cfg.sft.steps, "rm": cfg.rm.steps, "ppo": cfg.ppo.iterations}[stage]


def stage_finished(setup: Setup, stage: str) -> bool:
    """Whether `stage`'s newest good checkpoint under --out is at its last step (a damaged last step
    does not count: `--resume` falls back past it)."""
    step, _ = checkpoint.latest_good_step(setup.cfg.out, stage)
    return step is not None and step >= stage_steps(setup.cfg, stage)


@contextlib.contextmanager
def guarded_out(cfg: TldrConfig, stages: Iterable[str]):
    """Hold --out's lock and meet every refusal of `stages` before anything is written there: another
    run holding --out, a fresh run over checkpoints, a resume with another config, a stage whose
    checkpoints are all damaged. A refusal exits with one line and leaves --out as it was."""
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(rundir.lock(cfg.out))
            rundir.check_resume(cfg.out, {s: stage_meta(cfg, s) for s in stages}, resume=cfg.resume)
        except (FileExistsError, ValueError, rundir.RunDirBusyError) as err:
            raise SystemExit(f"error: {err}") from None
        yield


def restore_finished(setup: Setup, stage: str, target: Any) -> tuple[Any, dict]:
    """The final state + meta of an earlier stage; a one-line error if it is missing or unfinished."""
    out = setup.cfg.out
    if not checkpoint.has_stage(out, stage):
        raise FileNotFoundError(f"no {stage} checkpoint under {out}: run the {stage} stage first")
    meta = checkpoint.restore_meta(out, stage)
    total = stage_steps(setup.cfg, stage)
    if meta["step"] < total:
        raise StageError(
            f"the {stage} stage under {out} stopped at step {meta['step']} of {total}: "
            f"finish it with --stages {stage} --resume"
        )
    return checkpoint.restore(out, stage, target)


def sft_state_init(setup: Setup):
    """key -> SFT TrainState (the structure SFT checkpoints hold)."""
    tx = train.make_optimizer(sft_optim(setup.cfg))
    return lambda key: train.init_train_state(model.init_params(key, setup.model_cfg), tx)


def sft_optim(cfg: TldrConfig) -> train.OptimConfig:
    return dataclasses.replace(cfg.sft.optim, total_steps=cfg.sft.optim.total_steps or cfg.sft.steps)


def rm_optim(cfg: TldrConfig) -> train.OptimConfig:
    return dataclasses.replace(cfg.rm.optim, total_steps=cfg.rm.optim.total_steps or cfg.rm.steps)


def rm_state_init(setup: Setup):
    """key -> reward-model TrainState over a scalar model {"gpt", "head"}."""
    tx = train.make_optimizer(rm_optim(setup.cfg))
    return lambda key: train.init_train_state(model.init_scalar_model(key, setup.model_cfg), tx)


def to_bf16(params: Any) -> Any:
    """Float leaves cast to bfloat16 (frozen models under --bf16: half the memory)."""
    return jax.tree.map(
        lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x, params
    )
