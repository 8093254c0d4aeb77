"""The SST-2 recipe's config and data; everything else is the stage layer's (jaxrlhf.pipeline).

Data layout: a sentence is " " + sentence + <|endoftext|>, cut to S = `max_tokens` with the end-of-text
kept, after a one-token prompt (the end-of-text, GPT-2's beginning of a document):

    sft: [eos | sentence], the LM loss on every sentence token (jaxrlhf.pipeline.lm)
    rm:  the same rows with their labels; the score at the last real token is the logit of "positive"
         (jaxrlhf.pipeline.reward, kind "binary"); held-out accuracy on the validation split
    ppo: prompts [eos | the first `prompt_tokens` tokens of a sentence], left-padded; responses of up to
         `response_tokens` tokens; reward = the RM's score; the rest of each training sentence is the
         PPO-ptx text. Held-out reward / KL on the first validation sentences' prompts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import numpy as np

from jaxrlhf import data, flags, rl
from jaxrlhf.config import ModelConfig, check_at_least, flag_message
from jaxrlhf.pipeline import handoff, lm, policy, recipe, reward
from jaxrlhf.pipeline import setup as stage_setup
from jaxrlhf.pipeline.handoff import PromptAnswers, StageRun
from jaxrlhf.pipeline.lm import LMStageConfig
from jaxrlhf.pipeline.policy import RLStageConfig
from jaxrlhf.pipeline.reward import Labelled, RewardStageConfig
from jaxrlhf.pipeline.setup import Setup

STAGES = ("sft", "rm", "ppo")


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
class Sst2Config:
    """The whole SST-2 run: model, output, mesh, data and the three stages.

    Attributes:
      model: the architecture: "tiny" (a random 2-layer width-32 GPT), a GPT-2 size (gpt2, gpt2-medium,
        gpt2-large, gpt2-xl: the hub's weights unless --init-from), or an open model's shape ("tiny-llama",
        llama3.2-1b, qwen2.5-0.5b, ...: with --init-from DIR or random). Random models take the
        tokenizer's vocabulary. None: the --init-from directory's architecture, else gpt2.
      init_from: SFT's starting weights: a local Hugging Face directory of any supported architecture or a
        GPT-2 hub name; "random" for a random init. None: the hub weights of a GPT-2 --model.
      n_layer: override the preset's depth (random init only).
      n_head: override the preset's head count (random init only).
      n_embd: override the preset's width (random init only).
      dropout: embedding / residual / attention dropout of SFT and RM (PPO always runs without).
      bf16: bfloat16 matmuls (float32 params, optimizer, logprobs and heads); frozen models in bf16.
      remat: rematerialise each block in the backward pass.
      out: run directory, local or gs://; every stage checkpoints under it.
      resume: continue each stage from its latest checkpoint; finished stages are skipped.
      mesh_fsdp: size of the mesh's fsdp axis; the data axis takes the remaining devices.
      seed: root of every PRNG key (init, dropout, sampling).
      multihost: call jax.distributed.initialize() first; every process runs the same command.
      stages: comma-separated stages to run (run.py).
      stop_after: "STAGE:N" stops that stage after N steps of this invocation (continue with --resume).
      progress: show tqdm progress bars.
      data: the data settings.
      sft: the LM stage on training sentences.
      rm: the sentiment reward model (logistic loss on the labels).
      ppo: the RL stage: positive continuations of sentence openings.
    """

    model: str | None = None
    init_from: str | None = None
    n_layer: int | None = None
    n_head: int | None = None
    n_embd: int | None = None
    dropout: float = 0.0
    bf16: bool = False
    remat: bool = False
    out: str = "runs/sst2"
    resume: bool = False
    mesh_fsdp: int = 1
    seed: int = 0
    multihost: bool = False
    stages: str = ",".join(STAGES)
    stop_after: str = ""
    progress: bool = True
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    sft: LMStageConfig = dataclasses.field(
        default_factory=lambda: LMStageConfig(
            steps=2000,
            batch_size=64,
            eval_every=250,
            optim=dataclasses.replace(LMStageConfig().optim, lr=1e-4),
        )
    )
    rm: RewardStageConfig = dataclasses.field(
        default_factory=lambda: RewardStageConfig(steps=1000, batch_size=64, eval_every=250, norm_rows=1024)
    )
    ppo: RLStageConfig = dataclasses.field(
        default_factory=lambda: RLStageConfig(
            iterations=200,
            batch_size=64,
            eval_every=20,
            sample_every=10,
            reward_norm="none",
            rl=rl.RLConfig(kl_coef=0.1, epochs=4, minibatches=4),
        )
    )

    def __post_init__(self):
        try:
            stage_setup.model_spec(self)
        except ValueError as err:
            raise ValueError(flag_message(str(err), stage_setup.ModelSpec, stage_setup.flag)) from None
        recipe.check_stages(self.stages, self.stop_after, STAGES)
        check_at_least(self, 1, "mesh_fsdp")

    @property
    def stage_list(self) -> list[str]:
        return recipe.stage_list(self.stages)


def length_flags(cfg: Sst2Config) -> str:
    """The flags that make the model's block size, for messages."""
    d = cfg.data
    return (
        f"1 + --data.prompt_tokens {d.prompt_tokens} + max(--data.max_tokens {d.max_tokens}, "
        f"--data.response_tokens {d.response_tokens})"
    )


def _inactive_message(cfg: Sst2Config, given) -> str:
    inactive = policy.inactive_flags(cfg.ppo, [path[1:] for path in given if path[:1] == ("ppo",)], "--ppo")
    if not inactive:
        return ""
    one = len(inactive) == 1
    return (
        f"{', '.join(inactive)} {'does' if one else 'do'} nothing with --ppo.rl.algo {cfg.ppo.rl.algo} "
        f"and --ppo.reward_norm {cfg.ppo.reward_norm}; drop {'it' if one else 'them'}"
    )


def parse_args(argv=None, *, description: str = "", prog: str | None = None) -> Sst2Config:
    """The Sst2Config of `argv`; a bad value, or a flag that does nothing, exits 2 with one line."""
    return flags.parse_checked(
        Sst2Config(),
        argv,
        check=lambda cfg: stage_setup.check_model(
            stage_setup.model_spec(cfg), cfg.data.length, length_flags(cfg)
        ),
        inactive=_inactive_message,
        description=description,
        prog=prog,
    )


def stage_steps(cfg: Sst2Config, stage: str) -> int:
    return {"sft": cfg.sft.steps, "rm": cfg.rm.steps, "ppo": cfg.ppo.iterations}[stage]


def stage_run(cfg: Sst2Config, stage: str) -> StageRun:
    """Where and how `stage` runs, its root key fold_in(seed, 1 / 2 / 3)."""
    return recipe.stage_run(cfg, stage, STAGES.index(stage) + 1)


def stage_finished(setup: Setup, stage: str) -> bool:
    """Whether `stage` is complete under --out (for rm: with the reward normalisation stored)."""
    out, steps = setup.cfg.out, stage_steps(setup.cfg, stage)
    if stage == "rm":
        return reward.reward_finished(out, stage, steps)
    return handoff.stage_finished(out, stage, steps)


def make_setup(cfg: Sst2Config) -> Setup:
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
        length=cfg.data.length, length_flags=length_flags(cfg), tokenizer_dir=cfg.data.tokenizer_dir,
    )  # fmt: skip


def model_config(cfg: Sst2Config, vocab_size: int = 50257) -> ModelConfig:
    """The model of --model / --init-from with block_size `cfg.data.length`."""
    return stage_setup.model_config(
        stage_setup.model_spec(cfg), cfg.data.length, length_flags(cfg), vocab_size
    )


def main(
    run_stages,
    argv=None,
    *,
    stages: Iterable[str] | None = None,
    description: str = "",
    prog: str | None = None,
) -> int:
    """An entry point: parse `argv`, set up and `run_stages(setup)` holding --out (pipeline.setup.main)."""
    cfg = parse_args(argv, description=description, prog=prog)
    names = cfg.stage_list if stages is None else stages
    return stage_setup.main(
        lambda: make_setup(cfg), run_stages, out=cfg.out,
        metas={s: recipe.stage_meta(cfg, s) for s in names}, resume=cfg.resume,
    )  # fmt: skip


def sft_state_init(setup: Setup):
    return lm.lm_state_init(setup, setup.cfg.sft)


def rm_state_init(setup: Setup):
    return reward.reward_state_init(setup, setup.cfg.rm)


# --------------------------------------------------------------------------------------------- data


def encode_sentences(tokenizer, sentences: list[str], cfg: DataConfig) -> PromptAnswers:
    """[eos] prompts and " " + sentence + eos answers cut to `max_tokens`: prompt [N, 1], answer [N, S]."""
    answer, answer_mask = handoff.encode_answers(tokenizer, sentences, cfg.max_tokens)
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


def load_labelled(setup: Setup, need: tuple[int, str] | None = None) -> tuple[Labelled, Labelled]:
    """(train, held-out) sentences with their labels as token arrays.

    Args:
      setup: the run's setup.
      need: (rows, flag): refuse fewer training sentences than one batch of this flag.

    Raises:
      ValueError: a bad file or fewer sentences than `need`; one line naming the split and the flag.
    """
    cfg = setup.cfg.data
    out = []
    for split, limit, check in (
        (cfg.train_split, cfg.max_rows, need),
        (cfg.val_split, cfg.max_val_rows, None),
    ):
        rows = _rows(split, cfg, limit)
        _check_rows(len(rows), check, split, cfg)
        encoded = encode_sentences(setup.tokenizer, [r["sentence"] for r in rows], cfg)
        out.append(Labelled(*encoded, np.asarray([r["label"] for r in rows], np.int32)))
    return out[0], out[1]


def load_sentences(setup: Setup, need: tuple[int, str] | None = None) -> tuple[PromptAnswers, PromptAnswers]:
    """(train, held-out) sentences as [eos | sentence] rows (SFT), checked as in `load_labelled`."""
    train, val = load_labelled(setup, need)
    return PromptAnswers(*train[:4]), PromptAnswers(*val[:4])
