"""Positive movie-review continuations on SST-2 (GLUE; Socher et al. 2013), the sentiment task of Ziegler
et al. 2019 on real text: SFT -> binary sentiment reward model -> RL, the three-stage recipe of
`jaxrlhf.stages.instructgpt` on this data.

    python -m experiments.sst2 --model gpt2 --out runs/sst2

Data layout: a sentence is " " + sentence + <|endoftext|>, cut to S = `max_tokens` with the end-of-text
kept, after a one-token prompt (the end-of-text, GPT-2's beginning of a document):

    sft: [eos | sentence], the LM loss on every sentence token
    rm:  the same rows with their labels; the score at the last real token is the logit of "positive"
         (kind "binary"); held-out accuracy on the validation split
    rl:  prompts [eos | the first `prompt_tokens` tokens of a sentence], left-padded; responses of up to
         `response_tokens` tokens; reward = the RM's score; the rest of each training sentence is the
         PPO-ptx text. Held-out reward / KL on the first validation sentences' prompts.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxrlhf import data
from jaxrlhf.data import sst2 as sst2_data
from jaxrlhf.stages import instructgpt, lm, policy, reward
from jaxrlhf.stages.batches import PromptAnswers, encode_answers
from jaxrlhf.stages.reward import Labelled
from jaxrlhf.stages.setup import Setup
from jaxrlhf.train import RLConfig
from jaxrlhf.validate import check_at_least


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where SST-2 is and how it becomes token arrays.

    Attributes:
      data_dir: folder with train.tsv and dev.tsv (None: $JAXRLHF_DATA_DIR/sst2, else a pinned download).
      cache_dir: where TFDS prepares them (None: $JAXRLHF_CACHE_DIR or ~/.cache/jaxrlhf).
      tokenizer_dir: a tokenizer directory (tokenizer.json, or GPT-2's vocab.json + merges.txt); None:
        the --init-from directory, else $JAXRLHF_DATA_DIR/gpt2_tokenizer, else the hub's "gpt2" (online).
      train_split: sentences for SFT, the reward model and the PPO prompts.
      val_split: held-out sentences: the SFT loss, the RM accuracy and the PPO evaluation prompts.
      max_rows: use at most this many training sentences (0: all).
      max_val_rows: use at most this many held-out sentences (0: all).
      max_tokens: S, tokens of a sentence (end-of-text included).
      prompt_tokens: tokens of a sentence that start a PPO prompt (after the end-of-text).
      response_tokens: R, the most tokens PPO samples after a prompt.
      seed: fixes the batch order.
    """

    data_dir: str | None = None
    cache_dir: str | None = None
    tokenizer_dir: str | None = None
    train_split: str = "train"
    val_split: str = "validation"
    max_rows: int = 0
    max_val_rows: int = 0
    max_tokens: int = 48
    prompt_tokens: int = 4
    response_tokens: int = 16
    seed: int = 0

    def __post_init__(self):
        check_at_least(self, 0, "max_rows", "max_val_rows")
        check_at_least(self, 1, "prompt_tokens", "response_tokens")
        check_at_least(self, 2, "max_tokens")

    @property
    def prompt_len(self) -> int:
        """P of the PPO prompts: the end-of-text and `prompt_tokens`."""
        return 1 + self.prompt_tokens

    @property
    def length(self) -> int:
        """T, the longest row: a PPO prompt and the longer of a sentence's rest and a response."""
        return self.prompt_len + max(self.max_tokens, self.response_tokens)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Sst2Config(instructgpt.InstructConfig):
    """The whole SST-2 run: model, output, mesh, data and the three stages.

    Attributes:
      data: the data settings.
      sft: the LM stage on training sentences.
      rm: the sentiment reward model (logistic loss on the labels).
      rl: the RL stage: positive continuations of sentence openings.
    """

    out: str = "runs/sst2"
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    sft: lm.LMStageConfig = dataclasses.field(
        default_factory=lambda: lm.LMStageConfig(
            steps=2000,
            batch_size=64,
            eval_every=250,
            optim=dataclasses.replace(lm.LMStageConfig().optim, lr=1e-4),
        )
    )
    rm: reward.RewardStageConfig = dataclasses.field(
        default_factory=lambda: reward.RewardStageConfig(
            steps=1000, batch_size=64, eval_every=250, norm_rows=1024
        )
    )
    rl: policy.RLStageConfig = dataclasses.field(
        default_factory=lambda: policy.RLStageConfig(
            iterations=200,
            batch_size=64,
            eval_every=20,
            sample_every=10,
            reward_norm="none",
            rl=RLConfig(kl_coef=0.1, epochs=4, minibatches=4),
        )
    )


def length(cfg: Sst2Config) -> tuple[int, str]:
    """T, the longest row, and the flags that make it (for messages)."""
    d = cfg.data
    return d.length, (f"1 + --data.prompt_tokens {d.prompt_tokens} + max(--data.max_tokens {d.max_tokens}, "
                      f"--data.response_tokens {d.response_tokens})")  # fmt: skip


def encode_sentences(tokenizer, sentences: list[str], cfg: DataConfig) -> PromptAnswers:
    """[eos] prompts and " " + sentence + eos answers cut to `max_tokens`: prompt [N, 1], answer [N, S]."""
    answer, answer_mask = encode_answers(tokenizer, sentences, cfg.max_tokens)
    n = len(sentences)
    return PromptAnswers(
        np.full((n, 1), tokenizer.eos_id, np.int32),
        np.ones((n, 1), bool),
        answer.astype(np.int32),
        answer_mask,
    )


def split_prompts(rows: PromptAnswers, cfg: DataConfig) -> PromptAnswers:
    """Sentences as PPO prompts: [eos | first prompt_tokens tokens] left-padded to P = 1 + prompt_tokens,
    the rest of the sentence (end-of-text included) right-padded to S as the answer. A sentence of no more
    tokens than the prompt keeps one token (at least its end-of-text) for the answer."""
    k, s = cfg.prompt_tokens, rows.answer.shape[1]
    n = len(rows.answer)
    prompt = np.zeros((n, 1 + k), np.int32)
    prompt_mask = np.zeros((n, 1 + k), bool)
    answer = np.zeros((n, s), np.int32)
    answer_mask = np.zeros((n, s), bool)
    for i in range(n):
        ids = rows.answer[i][rows.answer_mask[i]]
        head = min(k, len(ids) - 1)
        opening = np.concatenate([rows.prompt[i][rows.prompt_mask[i]][-1:], ids[:head]])
        prompt[i, 1 + k - len(opening) :], prompt_mask[i, 1 + k - len(opening) :] = opening, True
        prompt[i, : 1 + k - len(opening)] = rows.prompt[i, 0]  # padding id: the end-of-text
        rest = ids[head:]
        answer[i, : len(rest)], answer_mask[i, : len(rest)] = rest, True
        answer[i, len(rest) :] = rows.prompt[i, 0]
    return PromptAnswers(prompt, prompt_mask, answer, answer_mask)


def _rows(split: str, cfg: DataConfig, limit: int) -> list[dict]:
    rows = data.load_sst2(split, cfg.data_dir, cache_dir=cfg.cache_dir)
    rows = [r for r in rows if r["label"] in (0, 1)]
    return rows[:limit] if limit else rows


def _check_rows(n: int, need: tuple[int, str] | None, split: str, cfg: DataConfig) -> None:
    if need is not None and n < need[0]:
        note = f" (--data.max_rows {cfg.max_rows})" if cfg.max_rows else ""
        raise ValueError(
            f"the {split} split of SST-2 has {n} labelled sentences{note}, fewer than one {need[1]} "
            f"{need[0]} batch: lower {need[1]} or use more data"
        )


def _check_classes(rows: list[dict], split: str, cfg: DataConfig) -> None:
    """Refuse training sentences of one class: the reward model would learn a constant (and exit 0)."""
    labels = {r["label"] for r in rows}
    if len(labels) != 1:
        return
    (label,) = labels
    file = sst2_data.source_file(split, cfg.data_dir, cache_dir=cfg.cache_dir)
    used = (
        f"first {len(rows)} sentences (--data.max_rows {cfg.max_rows})"
        if cfg.max_rows
        else f"{len(rows)} sentences"
    )
    more = "raise --data.max_rows or add" if cfg.max_rows else "add"
    other = 1 - label
    raise data.DataFormatError(
        f"{file}: every label of its {used} is {label} ({sst2_data.LABELS[label]}), none is {other}; the "
        f"reward model needs both classes: {more} {sst2_data.LABELS[other]} sentences"
    )


def load_labelled(setup: Setup, need: tuple[int, str] | None = None) -> tuple[Labelled, Labelled]:
    """(train, held-out) sentences with their labels as token arrays.

    Args:
      setup: the run's setup.
      need: (rows, flag): refuse fewer training sentences than one batch of this flag.

    Raises:
      ValueError: a bad file, fewer sentences than `need`, or (when this run trains the reward model) training
        sentences of one class only; one line naming the split or file and the flag. Every stage reads
        this, so the refusal comes before SFT trains.
    """
    cfg = setup.cfg.data
    out = []
    for split, limit, check, train in (
        (cfg.train_split, cfg.max_rows, need, True),
        (cfg.val_split, cfg.max_val_rows, None, False),
    ):
        rows = _rows(split, cfg, limit)
        _check_rows(len(rows), check, split, cfg)
        if train and "rm" in setup.cfg.stage_list:
            _check_classes(rows, split, cfg)
        encoded = encode_sentences(setup.tokenizer, [r["sentence"] for r in rows], cfg)
        out.append(Labelled(*encoded, np.asarray([r["label"] for r in rows], np.int32)))
    return out[0], out[1]


def load_sentences(setup: Setup, need: tuple[int, str] | None = None) -> tuple[PromptAnswers, PromptAnswers]:
    """(train, held-out) sentences as [eos | sentence] rows (SFT), checked as in `load_labelled`."""
    train, val = load_labelled(setup, need)
    return PromptAnswers(*train[:4]), PromptAnswers(*val[:4])


def rm_data(setup: Setup, need):
    rows, val = load_labelled(setup, need)
    summary = {"val_positive_fraction": float(val.label.mean()) if len(val.label) else None}
    return "binary", rows, val, lambda: PromptAnswers(*rows[:4]), summary


def rl_data(setup: Setup, need):
    sentences, val = load_sentences(setup, need)
    return split_prompts(sentences, setup.cfg.data), split_prompts(val, setup.cfg.data), None


RECIPE = instructgpt.make_recipe(
    "sst2", Sst2Config(),
    instructgpt.Data(sft=lambda setup, need: load_sentences(setup, need), rm=rm_data, rl=rl_data,
                     length=length, response_len=lambda cfg: cfg.data.response_tokens,
                     answer_key="continuation"),
    description=__doc__,
)  # fmt: skip
