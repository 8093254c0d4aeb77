"""InstructGPT on Reddit TL;DR (Stiennon et al. 2020, "Learning to summarize from human feedback"; Ouyang et
al. 2022): SFT -> pairwise reward model -> RL, the three-stage recipe of `jaxrlhf.stages.instructgpt` on this
data.

    python -m experiments.tldr --model gpt2 --out runs/tldr                        # GPT-2 124M from the hub
    python -m experiments.tldr --init-from /ckpts/gpt2-medium --bf16 --mesh-fsdp 4 --out gs://bucket/tldr
    python -m experiments.tldr ... --stages rl --resume                           # one stage, continued

Data layout (every stage): a prompt is left-padded to P = `max_prompt_tokens` and an answer is
right-padded to S = `max_summary_tokens`, so a training row is [prompt | answer] of T = P + S tokens,
exactly the layout of an RL rollout. The prompt is InstructGPT's

    SUBREDDIT: r/{subreddit}\nTITLE: {title}\nPOST: {post}\nTL;DR:

with the post cut at a paragraph / sentence / word boundary to fit P (rows whose header alone does not
fit are dropped), and an answer is " " + summary + <|endoftext|>, cut to S tokens with the end-of-text
kept, so the SFT model learns to stop and the reward model reads its score at that token.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxrlhf import data
from jaxrlhf.stages import instructgpt, lm, policy, reward
from jaxrlhf.stages.batches import PromptAnswers, encode_answers, train_val_split
from jaxrlhf.stages.reward import Comparisons
from jaxrlhf.stages.setup import Setup
from jaxrlhf.text import pad_batch
from jaxrlhf.validate import check_at_least


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
class TldrConfig(instructgpt.InstructConfig):
    """The whole TL;DR run: model, output, mesh, data and the three stages.

    Attributes:
      data: the data settings.
      sft: the SFT stage (1800 steps = one epoch of the 116k OpenAI training posts at batch 64).
      rm: the reward-model stage (1450 steps = one epoch of the 92.9k OpenAI training comparisons at
        batch 64).
      rl: the RL stage (PPO by default; --rl.algo pg, grpo, rloo, rebel, dpo, ipo).
    """

    out: str = "runs/tldr"
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    sft: lm.LMStageConfig = dataclasses.field(default_factory=lm.LMStageConfig)
    rm: reward.RewardStageConfig = dataclasses.field(default_factory=reward.RewardStageConfig)
    rl: policy.RLStageConfig = dataclasses.field(default_factory=policy.RLStageConfig)


def length(cfg: TldrConfig) -> tuple[int, str]:
    """T, the longest row, and the flags that make it (for messages)."""
    d = cfg.data
    return (
        d.max_prompt_tokens + d.max_summary_tokens,
        f"--data.max_prompt_tokens {d.max_prompt_tokens} + --data.max_summary_tokens {d.max_summary_tokens}",
    )


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
    ids, mask = pad_batch(seqs, max_tokens, pad_id=tokenizer.pad_id, side="left")
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
        train_idx, val_idx = train_val_split(len(rows), val_size, seed=cfg.seed)
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


def sft_data(setup: Setup, need):
    return load_summaries(setup, need)


def rm_data(setup: Setup, need):
    comparisons, val = load_comparisons(setup, need)
    return "pairwise", comparisons, val, lambda: load_summaries(setup)[0], None


def rl_data(setup: Setup, need):
    prompts, val = load_summaries(setup, need)
    return prompts, val, None  # PPO-ptx: the prompts with their reference summaries


RECIPE = instructgpt.make_recipe(
    "tldr", TldrConfig(),
    instructgpt.Data(sft=sft_data, rm=rm_data, rl=rl_data, length=length,
                     response_len=lambda cfg: cfg.data.max_summary_tokens, answer_key="summary"),
    description=__doc__,
)  # fmt: skip
