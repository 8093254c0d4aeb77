"""What the three TL;DR stages share: the config and the data as fixed-shape token arrays; the setup,
batching, stage bodies and checkpoint handoff are the stage layer's (jaxrlhf.pipeline).

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

import dataclasses
from collections.abc import Iterable

import numpy as np

from jaxrlhf import data, flags
from jaxrlhf.config import ModelConfig, check_at_least
from jaxrlhf.pipeline import handoff, lm, policy, recipe, reward
from jaxrlhf.pipeline import setup as stage_setup
from jaxrlhf.pipeline.handoff import PromptAnswers, StageRun, encode_answers
from jaxrlhf.pipeline.lm import LMStageConfig
from jaxrlhf.pipeline.policy import RLStageConfig
from jaxrlhf.pipeline.reward import Comparisons, RewardStageConfig
from jaxrlhf.pipeline.setup import MODELS, Setup

STAGES = ("sft", "rm", "ppo")


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
      sft: the SFT stage (1800 steps = one epoch of the 116k OpenAI training posts at batch 64).
      rm: the reward-model stage (1450 steps = one epoch of the 92.9k OpenAI training comparisons at
        batch 64).
      ppo: the RL stage.
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
    sft: LMStageConfig = dataclasses.field(default_factory=LMStageConfig)
    rm: RewardStageConfig = dataclasses.field(default_factory=RewardStageConfig)
    ppo: RLStageConfig = dataclasses.field(default_factory=RLStageConfig)

    def __post_init__(self):
        if self.model is not None and self.model not in MODELS:
            raise ValueError(f"--model {self.model!r}; use one of {', '.join(MODELS)}")
        recipe.check_stages(self.stages, self.stop_after, STAGES)
        check_at_least(self, 1, "mesh_fsdp", "n_layer", "n_head", "n_embd")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout}; use a rate in [0, 1)")

    @property
    def stage_list(self) -> list[str]:
        return recipe.stage_list(self.stages)

    def stop_after_for(self, stage: str) -> int | None:
        """Steps this invocation may run of `stage` (None: to the end)."""
        return recipe.stop_after_for(self.stop_after, stage)


def inactive_flags(cfg: TldrConfig, given) -> list[str]:
    """The flags among `given` (config paths set on the command line) that would do nothing here."""
    return policy.inactive_flags(cfg.ppo, [path[1:] for path in given if path[:1] == ("ppo",)], "--ppo")


def length_flags(cfg: TldrConfig) -> str:
    """The flags that make the model's block size, for messages."""
    return (
        f"--data.max_prompt_tokens {cfg.data.max_prompt_tokens} + --data.max_summary_tokens "
        f"{cfg.data.max_summary_tokens}"
    )


def row_length(cfg: TldrConfig) -> int:
    return cfg.data.max_prompt_tokens + cfg.data.max_summary_tokens


def check_config(cfg: TldrConfig) -> None:
    """What the configs cannot check alone: the model they make (a local --init-from directory's
    config.json included), and the architecture flags against pretrained weights.

    Raises:
      ValueError: one line naming the flags and the fix.
    """
    stage_setup.check_model(stage_setup.model_spec(cfg), row_length(cfg), length_flags(cfg))


def _inactive_message(cfg: TldrConfig, given) -> str:
    inactive = inactive_flags(cfg, given)
    if not inactive:
        return ""
    one = len(inactive) == 1
    return (
        f"{', '.join(inactive)} {'does' if one else 'do'} nothing with --ppo.rl.algo {cfg.ppo.rl.algo} "
        f"and --ppo.reward_norm {cfg.ppo.reward_norm}; drop {'it' if one else 'them'}"
    )


def parse_args(argv=None, *, description: str = "", prog: str | None = None) -> TldrConfig:
    """The TldrConfig of `argv`; a bad value, or a flag that does nothing for the chosen algorithm /
    normalisation, exits with a one-line error before any work."""
    return flags.parse_checked(
        TldrConfig(), argv, check=check_config, inactive=_inactive_message, description=description, prog=prog
    )


def stage_meta(cfg: TldrConfig, stage: str) -> dict:
    """The checkpoint meta of `stage`: everything that must match to resume it (recipe.stage_meta)."""
    return recipe.stage_meta(cfg, stage)


def stage_steps(cfg: TldrConfig, stage: str) -> int:
    return {"sft": cfg.sft.steps, "rm": cfg.rm.steps, "ppo": cfg.ppo.iterations}[stage]


def stage_run(cfg: TldrConfig, stage: str) -> StageRun:
    """Where and how `stage` runs, its root key fold_in(seed, 1 / 2 / 3)."""
    return recipe.stage_run(cfg, stage, STAGES.index(stage) + 1)


def stage_finished(setup: Setup, stage: str) -> bool:
    """Whether `stage` is complete under --out (for rm: with the reward normalisation stored)."""
    out, steps = setup.cfg.out, stage_steps(setup.cfg, stage)
    if stage == "rm":
        return reward.reward_finished(out, stage, steps)
    return handoff.stage_finished(out, stage, steps)


# -------------------------------------------------------------------------------------------- setup


def model_config(cfg: TldrConfig, vocab_size: int = 50257) -> ModelConfig:
    """The model of --model / --init-from with block_size P + S (jaxrlhf.pipeline.setup.model_config)."""
    return stage_setup.model_config(
        stage_setup.model_spec(cfg), row_length(cfg), length_flags(cfg), vocab_size
    )


def make_setup(cfg: TldrConfig) -> Setup:
    """The mesh, model config and tokenizer of `cfg`, after the checks that need no data."""
    sizes = {
        "--sft.batch_size": cfg.sft.batch_size,
        "--sft.eval_batch_size": cfg.sft.eval_batch_size,
        "--rm.batch_size": cfg.rm.batch_size,
        "--rm.eval_batch_size": cfg.rm.eval_batch_size,
        "--ppo.batch_size": cfg.ppo.batch_size,
    }
    return stage_setup.make_setup(
        cfg, out=cfg.out, mesh_fsdp=cfg.mesh_fsdp, multihost=cfg.multihost, batch_sizes=sizes,
        length=row_length(cfg), length_flags=length_flags(cfg), tokenizer_dir=cfg.data.tokenizer_dir,
    )  # fmt: skip


def main(
    run_stages,
    argv=None,
    *,
    stages: Iterable[str] | None = None,
    description: str = "",
    prog: str | None = None,
) -> int:
    """An entry point: parse `argv`, set up and `run_stages(setup)` holding --out, refusing a bad --out
    for `stages` (default --stages) before any write (jaxrlhf.pipeline.setup.main)."""
    cfg = parse_args(argv, description=description, prog=prog)
    names = cfg.stage_list if stages is None else stages
    return stage_setup.main(
        lambda: make_setup(cfg), run_stages, out=cfg.out, metas={s: stage_meta(cfg, s) for s in names},
        resume=cfg.resume,
    )  # fmt: skip


def sft_state_init(setup: Setup):
    """key -> SFT TrainState (the structure SFT checkpoints hold)."""
    return lm.lm_state_init(setup, setup.cfg.sft)


def rm_state_init(setup: Setup):
    """key -> reward-model TrainState over a scalar model {"gpt", "head"}."""
    return reward.reward_state_init(setup, setup.cfg.rm)


# --------------------------------------------------------------------------------------------- data


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


def _encode_summaries(tokenizer, rows: list[dict], cfg: DataConfig, where: str, need=None) -> PromptAnswers:
    prompt, prompt_mask, kept = encode_prompts(tokenizer, rows, cfg.max_prompt_tokens)
    _check_rows(len(rows), len(kept), cfg, where, need)
    texts = [rows[i]["summary"] for i in kept]
    if texts and not any(texts):
        raise ValueError(
            f"every reference summary of {where} is empty ({len(texts)} rows): there is nothing to learn "
            "from; fill the summary field"
        )
    summary, summary_mask = encode_answers(tokenizer, texts, cfg.max_summary_tokens)
    return PromptAnswers(prompt, prompt_mask, summary, summary_mask)


def _encode_comparisons(tokenizer, rows: list[dict], cfg: DataConfig, where: str, need=None) -> Comparisons:
    prompt, prompt_mask, kept = encode_prompts(tokenizer, rows, cfg.max_prompt_tokens)
    _check_rows(len(rows), len(kept), cfg, where, need)
    texts = [t for i in kept for t in (rows[i]["chosen"], rows[i]["rejected"])]
    answers, answers_mask = encode_answers(tokenizer, texts, cfg.max_summary_tokens)
    s = cfg.max_summary_tokens
    return Comparisons(prompt, prompt_mask, answers.reshape(-1, 2, s), answers_mask.reshape(-1, 2, s))


def load_summaries(setup: Setup, need: tuple[int, str] | None = None) -> tuple[PromptAnswers, PromptAnswers]:
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
