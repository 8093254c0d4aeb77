"""GRPO on GSM8K with a verifiable reward (RLVR; Shao et al. 2024, "DeepSeekMath"; Lambert et al. 2024,
"Tulu 3"): an instruct model answers grade-school word problems, a rule checks the final number, the policy
is optimised on that 0 / 1 reward. One stage, "rl", on the shared RL stage (`stages.policy`).

    python -m experiments.gsm8k --init-from /models/Qwen2.5-1.5B-Instruct --bf16 --out runs/gsm8k
    python -m experiments.gsm8k ... --resume                                   # continue a stopped run

A prompt is the model's chat template around one user turn, the question and `--data.instruction` (end
with "#### <number>"), with the generation prompt added, left-padded to P = --data.max_prompt_tokens
(special tokens counted; longer prompts are dropped and counted). The policy samples up to
R = --data.max_answer_tokens tokens (its end-of-turn included); the reward is
`data.gsm8k_reward` of the decoded answer against the row's gold number: 1 right, 0 wrong, malformed or
missing; an answer cut at the budget scores --rl.no_eos_penalty (0 here: a truncated answer is wrong,
whatever number it holds). Held-out accuracy is the RL stage's evaluation on --data.val_split (test):
"eval/val_score" in <out>/rl.jsonl, one sample per question at the rollout temperature.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import numpy as np

from jaxrlhf import data, rollout, train
from jaxrlhf.rollout import Rollout
from jaxrlhf.stages import policy, recipe
from jaxrlhf.stages import setup as stage_setup
from jaxrlhf.stages.batches import PromptAnswers
from jaxrlhf.stages.handoff import HostReward
from jaxrlhf.stages.setup import Setup
from jaxrlhf.text import HFTokenizer, pad_batch
from jaxrlhf.validate import check_at_least

STAGES = ("rl",)
INSTRUCTION = (
    "Solve the problem step by step. Then write the final answer on its own last line as "
    '"#### <number>", with the number alone (no units).'
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where GSM8K is and how a question becomes a prompt.

    Attributes:
      data_dir: folder with train.jsonl / test.jsonl (None: $JAXRLHF_DATA_DIR/gsm8k, else the pinned,
        hash-checked download of openai/grade-school-math).
      cache_dir: where TFDS prepares them (None: $JAXRLHF_CACHE_DIR or ~/.cache/jaxrlhf).
      tokenizer_dir: a chat model's tokenizer directory (tokenizer.json + tokenizer_config.json with a chat
        template); None: the --init-from directory.
      system_prompt: a system message before each question (None: none, the template's default).
      instruction: the text after the question in the user turn.
      date_string: the template variable `date_string` (Llama 3.x print a date; fixed so that a resume on
        another day writes the same prompts).
      train_split: the questions RL samples from.
      val_split: the held-out questions of the evaluation.
      max_prompt_tokens: P, the templated prompt's budget (special tokens counted); longer prompts are
        dropped and counted.
      max_answer_tokens: R, the most tokens sampled per answer (the end-of-turn included).
      max_rows: use at most this many training questions (0: all).
      max_val_rows: use at most this many held-out questions (0: all; the evaluation reads the first
        --rl.eval_batches x --rl.batch_size of them).
      seed: fixes the order of the questions.
    """

    data_dir: str | None = None
    cache_dir: str | None = None
    tokenizer_dir: str | None = None
    system_prompt: str | None = None
    instruction: str = INSTRUCTION
    date_string: str = "26 Jul 2024"
    train_split: str = "train"
    val_split: str = "test"
    max_prompt_tokens: int = 384
    max_answer_tokens: int = 512
    max_rows: int = 0
    max_val_rows: int = 0
    seed: int = 0

    def __post_init__(self):
        check_at_least(self, 1, "max_prompt_tokens")
        check_at_least(self, 2, "max_answer_tokens")
        check_at_least(self, 0, "max_rows", "max_val_rows", "seed")


def _rl_defaults() -> policy.RLStageConfig:
    """GRPO as DeepSeekMath runs it (train.RLConfig's grpo defaults: k3 KL 0.04 as a loss, advantages
    standardised in each group, one update per batch): 8 answers to each of 8 questions per iteration,
    a constant 1e-6 learning rate, the verifier's raw 0 / 1 score (no reward model, so no normalisation
    and no value model)."""
    return policy.RLStageConfig(
        iterations=500, batch_size=64, eval_every=50, eval_batches=4, sample_every=10, ckpt_every=50,
        optim=train.OptimConfig(lr=1e-6, schedule="constant", weight_decay=0.0),
        value_from="policy", reward_norm="none",
        rl=train.RLConfig(algo="grpo", group_size=8, minibatches=1, no_eos_penalty=0.0),
    )  # fmt: skip


@dataclasses.dataclass(frozen=True, kw_only=True)
class GsmConfig(recipe.RecipeConfig):
    """The whole GSM8K run: model, output, mesh, data and the RL stage.

    Attributes:
      data: the data settings.
      rl: the RL stage (GRPO by default; any --rl.algo of the RL stage but ppo's reward-model value).
    """

    STAGES: ClassVar[tuple[str, ...]] = STAGES

    out: str = "runs/gsm8k"
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    rl: policy.RLStageConfig = dataclasses.field(default_factory=_rl_defaults)


def length(cfg: GsmConfig) -> tuple[int, str]:
    """T, the longest row (prompt and answer), and the flags that make it."""
    d = cfg.data
    return (
        d.max_prompt_tokens + d.max_answer_tokens,
        f"--data.max_prompt_tokens {d.max_prompt_tokens} + --data.max_answer_tokens {d.max_answer_tokens}",
    )


# -------------------------------------------------------------------------------------------- data


def messages(question: str, cfg: DataConfig) -> list[dict]:
    """The conversation of one question: an optional system message, then the question and the
    instruction as the user turn."""
    system = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt is not None else []
    return [*system, {"role": "user", "content": f"{question}\n\n{cfg.instruction}"}]


def encode_prompts(tokenizer: HFTokenizer, rows: list[dict], cfg: DataConfig) -> tuple[PromptAnswers, list]:
    """The chat-templated prompts of `rows` (generation prompt added), left-padded to P; prompts longer
    than P are dropped. Returns (the prompts, with empty [N, 1] answers: RL needs none; the golds of the
    kept rows)."""
    seqs, golds = [], []
    for row in rows:
        enc = tokenizer.apply_chat_template(
            messages(row["question"], cfg), add_generation_prompt=True, date_string=cfg.date_string
        )
        if len(enc.ids) <= cfg.max_prompt_tokens:
            seqs.append(enc.ids)
            golds.append(row["final"])
    p = cfg.max_prompt_tokens
    ids, mask = pad_batch(seqs, p, pad_id=tokenizer.pad_id, side="left") if seqs else (
        np.zeros((0, p), np.int32), np.zeros((0, p), bool))  # fmt: skip
    n = len(seqs)
    answers = np.zeros((n, 1), np.int32), np.zeros((n, 1), bool)
    return PromptAnswers(ids.astype(np.int32), mask, *answers), golds


def load_prompts(setup: Setup, split: str, limit: int) -> tuple[PromptAnswers, list[str], dict]:
    """(prompts, golds, {"rows", "dropped_long_prompt"}) of the first `limit` rows (0: all) of `split`."""
    cfg = setup.cfg.data
    rows = data.load_gsm8k(split, cfg.data_dir, cache_dir=cfg.cache_dir)
    rows = rows[:limit] if limit else rows
    prompts, golds = encode_prompts(setup.tokenizer, rows, cfg)
    return prompts, golds, {"rows": len(rows), "dropped_long_prompt": len(rows) - len(golds)}


def prompt_key(ids: np.ndarray, mask: np.ndarray) -> bytes:
    """A prompt's identity: its real token ids (padding, and so the pad width, left out)."""
    return np.asarray(ids)[np.asarray(mask, bool)].astype(np.int32).tobytes()


def make_reward(tokenizer, prompt_sets: list[tuple[PromptAnswers, list[str]]]) -> HostReward:
    """The verifier as the RL stage's host reward: each rollout row's gold is found by its prompt's tokens
    (a rollout carries its prompt, not its row index), its answer decoded as `rollout.make_text_reward`
    decodes it and scored by `data.gsm8k_reward`.

    Args:
      tokenizer: the policy's tokenizer (its stop ids end an answer).
      prompt_sets: (prompts, their golds) of every prompt set the stage samples (training and held-out).

    Raises:
      ValueError: two identical prompts with different golds (when built), or a rollout prompt that is
        none of `prompt_sets`' (when scoring): never a silent 0.
    """
    gold_of: dict[bytes, str] = {}
    for prompts, golds in prompt_sets:
        for ids, mask, gold in zip(prompts.prompt, prompts.prompt_mask, golds, strict=True):
            key = prompt_key(ids, mask)
            if gold_of.setdefault(key, gold) != gold:
                raise ValueError(
                    f"two GSM8K questions with the same prompt have different answers ({gold_of[key]} and "
                    f"{gold}): deduplicate the data"
                )

    def score(batch: Rollout) -> np.ndarray:
        keys = [prompt_key(ids, mask) for ids, mask in zip(batch.prompt, batch.prompt_mask, strict=True)]
        missing = [i for i, key in enumerate(keys) if key not in gold_of]
        if missing:
            raise ValueError(f"rollout rows {missing[:5]} have prompts that are no GSM8K question of the run")
        golds = [gold_of[key] for key in keys]
        return rollout.make_text_reward(tokenizer, lambda texts: data.gsm8k_reward(texts, golds))(batch)

    return HostReward(score)


# ------------------------------------------------------------------------------------------ stages


def chat_tokenizer(cfg: GsmConfig) -> HFTokenizer:
    """The policy's tokenizer, refused unless it has a chat template (`stages.setup.chat_tokenizer`)."""
    return stage_setup.chat_tokenizer(cfg, "GSM8K")


def make_setup(cfg: GsmConfig) -> Setup:
    n, flags_ = length(cfg)
    return stage_setup.make_setup(cfg, batch_sizes={"--rl.batch_size": cfg.rl.batch_size}, length=n,
                                  length_flags=flags_, tokenizer=chat_tokenizer(cfg))  # fmt: skip


def run_rl(setup: Setup):
    """GRPO (or --rl.algo) of the --init-from model against the verifier; held-out accuracy on val."""
    cfg = setup.cfg
    d, pcfg = cfg.data, cfg.rl
    prompts, golds, counts = load_prompts(setup, d.train_split, d.max_rows)
    val, val_golds, val_counts = load_prompts(setup, d.val_split, d.max_val_rows)
    group = pcfg.rl.group_size or 1
    need = pcfg.batch_size // group
    if len(golds) < need:
        raise ValueError(
            f"{len(golds)} GSM8K {d.train_split} questions fit --data.max_prompt_tokens "
            f"{d.max_prompt_tokens} ({counts}), fewer than one batch of {need} (--rl.batch_size / "
            "--rl.group_size): raise --data.max_prompt_tokens or --data.max_rows, or lower --rl.batch_size"
        )
    params = stage_setup.initial_params(setup, jax.random.fold_in(jax.random.key(cfg.seed), 0))
    return policy.run_rl_stage(
        setup, pcfg, recipe.stage_run(cfg, "rl", 1), prompts=prompts, val=val, policy=params,
        reward=make_reward(setup.tokenizer, [(prompts, golds), (val, val_golds)]),
        response_len=d.max_answer_tokens, answer_key="solution",
        summary={"train_counts": counts, "val_counts": val_counts},
    )  # fmt: skip


def check(cfg: GsmConfig) -> None:
    stage_setup.check_model(stage_setup.model_spec(cfg), *length(cfg))
    if cfg.rl.rl.ptx_coef:
        raise ValueError(
            f"--rl.ptx_coef {cfg.rl.rl.ptx_coef}: the GSM8K recipe has no pretraining text to mix in; drop it"
        )
    if cfg.rl.reward_norm != "none":
        raise ValueError(
            f"--rl.reward_norm {cfg.rl.reward_norm}: the verifier's 0 / 1 score has no reward model to "
            "normalise; drop it"
        )


RECIPE = recipe.Recipe(
    name="gsm8k", defaults=GsmConfig(), make_setup=make_setup, runners={"rl": run_rl},
    steps=lambda cfg, stage: cfg.rl.iterations, check=check, inactive=policy.inactive_line,
    exports=lambda cfg: {"policy": "rl"}, description=__doc__,
)  # fmt: skip
