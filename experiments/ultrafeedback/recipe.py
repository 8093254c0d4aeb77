"""The UltraFeedback REBEL recipe (the RLHF guide's pipeline): its config and stage instances (encoding.py:
the data as token arrays; stages.py: the stages).

    rm          a Bradley-Terry reward model on UltraFeedback's chosen / rejected pairs, from the base model
    generate_t  N answers to each of iteration t's prompts from the policy of iteration t - 1 (t = 1: the
                base model), chat-templated prompts left-padded, answers right-padded
    score_t     a reward per answer: the rm stage's model, a Hugging Face sequence-classification reward
                model (--score.reward hf --score.reward_model DIR), or VADER (a rule, for smoke runs)
    filter_t    unfinished / over-long answers, duplicates and ties dropped and counted, (best, worst) pair
                per prompt, <out>/iter_t/filter.json with the counts
    rebel_t     REBEL (or DPO / IPO: --rebel.algo) on the fixed pairs of iteration t

Lengths are counted in tokens without the chat template's special tokens: a prompt of more than
--data.max_prompt_tokens tokens is dropped and counted (never cut); an answer has at most
--data.max_answer_tokens tokens and its end-of-turn (the sampler's budget), one that does not end in time
is dropped as unfinished (--filter.no_eos_penalty -4 keeps it with that reward, as the REBEL authors do).
Iteration t takes the next --generate.prompts training prompts (wrapping).
Data lies under <out>/iter_t/, checkpoints under <out>/rm/ and <out>/rebel_t/.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
from etils import epath

from experiments.ultrafeedback import encoding
from jaxrlhf.models import ModelConfig
from jaxrlhf.rollout import SampleConfig
from jaxrlhf.stages import handoff, online, recipe, reward
from jaxrlhf.stages import setup as stage_setup
from jaxrlhf.stages.handoff import StageRun
from jaxrlhf.stages.online import GenerateConfig
from jaxrlhf.stages.preference import PairStageConfig
from jaxrlhf.stages.reward import RewardStageConfig
from jaxrlhf.stages.setup import Setup
from jaxrlhf.text import HFTokenizer
from jaxrlhf.validate import check_at_least, check_finite

STAGES = ("rm", "generate", "score", "filter", "rebel")
ITERATED = STAGES[1:]
REWARDS = ("rm", "hf", "vader")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where UltraFeedback is and how it becomes token arrays.

    Attributes:
      data_dir: folder with train_clean.jsonl / eval_clean.jsonl (None: $JAXRLHF_DATA_DIR/ultrafeedback,
        else the pinned download of the 1,000 + 200 sample rows).
      cache_dir: where TFDS prepares them (None: $JAXRLHF_CACHE_DIR or ~/.cache/jaxrlhf).
      tokenizer_dir: a chat model's tokenizer directory (tokenizer.json + tokenizer_config.json with a chat
        template); None: the --init-from directory.
      system_prompt: a system message before each prompt (None: none, the template's default).
      date_string: the template variable `date_string` (Llama 3.x print a date; fixed so that a resume on
        another day writes the same prompts).
      max_prompt_tokens: prompts of more tokens (special tokens not counted) are dropped and counted.
      max_answer_tokens: the longest answer (special tokens not counted); the sampler's budget is this
        plus the end-of-turn; reward-model pairs with a longer answer are dropped and counted.
      rm_answer_tokens: the longest answer of a reward-model pair (special tokens not counted; None:
        max_answer_tokens); pairs with a longer answer are dropped and counted.
      max_rm_pairs: use at most this many training comparisons for the rm stage (0: all).
      max_val_rows: use at most this many held-out comparisons (0: all).
      seed: fixes the batch order.
    """

    data_dir: str | None = None
    cache_dir: str | None = None
    tokenizer_dir: str | None = None
    system_prompt: str | None = None
    date_string: str = "26 Jul 2024"
    max_prompt_tokens: int = 1024
    max_answer_tokens: int = 1024
    rm_answer_tokens: int | None = None
    max_rm_pairs: int = 0
    max_val_rows: int = 0
    seed: int = 0

    def __post_init__(self):
        check_at_least(self, 1, "max_prompt_tokens", "max_answer_tokens", "rm_answer_tokens")
        check_at_least(self, 0, "max_rm_pairs", "max_val_rows")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScoreConfig:
    """The reward of an answer.

    Attributes:
      reward: "rm" (the rm stage's model), "hf" (a Hugging Face *ForSequenceClassification reward model,
        --score.reward_model) or "vader" (VADER sentiment of the answer text: a rule for smoke runs).
      reward_model: the local directory of the "hf" reward model (its own tokenizer files; answers are
        re-tokenized with its chat template when its tokenizer is not the policy's).
      batch_size: answers per scoring call (a multiple of the data devices).
    """

    reward: str = "rm"
    reward_model: str | None = None
    batch_size: int = 16

    def __post_init__(self):
        if self.reward not in REWARDS:
            raise ValueError(f"reward={self.reward!r}; use one of {', '.join(REWARDS)}")
        if (self.reward == "hf") != (self.reward_model is not None):
            raise ValueError(
                f"reward_model={self.reward_model!r} with reward {self.reward!r}; pass a directory with "
                "reward 'hf', and only then"
            )
        check_at_least(self, 1, "batch_size")


@dataclasses.dataclass(frozen=True, kw_only=True)
class FilterConfig:
    """Which answers may form a pair.

    Attributes:
      max_answer_tokens: drop longer answers (special tokens not counted; None: --data.max_answer_tokens).
      min_answer_tokens: drop shorter answers.
      no_eos_penalty: None drops an answer that never ends its turn (this recipe's default); a number keeps
        it with this reward instead of its score, as the REBEL authors do (ZhaolinGao/REBEL
        src/ultrafeedback: -4 on their reward scale; the KL term still applies).
    """

    max_answer_tokens: int | None = None
    min_answer_tokens: int = 1
    no_eos_penalty: float | None = None

    def __post_init__(self):
        check_at_least(self, 1, "max_answer_tokens")
        check_at_least(self, 0, "min_answer_tokens")
        check_finite(self, "no_eos_penalty")


@dataclasses.dataclass(frozen=True, kw_only=True)
class UfConfig(recipe.RecipeConfig):
    """The whole UltraFeedback run: model, output, mesh, data and the stages.

    Attributes:
      iterations: T, the online iterations (iteration t samples from the policy of t - 1).
      iteration: run only this iteration's stages (0: iterations 1..T).
      data: the data settings.
      rm: the reward model on UltraFeedback's pairs.
      generate: the answers of each iteration.
      score: the reward of each answer.
      filter: which answers may form a pair.
      rebel: the update on each iteration's pairs.
    """

    STAGES: ClassVar[tuple[str, ...]] = STAGES

    out: str = "runs/ultrafeedback"
    iterations: int = 2
    iteration: int = 0
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    rm: RewardStageConfig = dataclasses.field(
        default_factory=lambda: RewardStageConfig(steps=500, batch_size=32, eval_every=100, norm_rows=256)
    )
    generate: GenerateConfig = dataclasses.field(default_factory=GenerateConfig)
    score: ScoreConfig = dataclasses.field(default_factory=ScoreConfig)
    filter: FilterConfig = dataclasses.field(default_factory=FilterConfig)
    rebel: PairStageConfig = dataclasses.field(default_factory=PairStageConfig)

    def __post_init__(self):
        super().__post_init__()
        check_at_least(self, 1, "iterations")
        check_at_least(self, 0, "iteration")
        if self.iteration > self.iterations:
            raise ValueError(
                f"iteration={self.iteration}; use 0 (all) or one of 1..iterations {self.iterations}"
            )
        if self.stop_after:
            name, _, n = self.stop_after.partition(":")
            if name not in instance_names(self, every=True) or not n.isdigit():
                raise ValueError(
                    f"stop_after={self.stop_after!r}; use STAGE:N with a stage of this run, e.g. rebel_1:3"
                )
        if (
            self.filter.max_answer_tokens is not None
            and self.filter.max_answer_tokens > self.data.max_answer_tokens
        ):
            raise ValueError(
                f"filter.max_answer_tokens={self.filter.max_answer_tokens} is more than "
                f"data.max_answer_tokens {self.data.max_answer_tokens}, the sampler's budget; lower it"
            )

    @property
    def response_len(self) -> int:
        """R, the sampler's budget: the answer and its end-of-turn."""
        return self.data.max_answer_tokens + 1

    @property
    def rm_answer_len(self) -> int:
        """The answer width of reward-model pairs: their budget and the end-of-turn."""
        return (self.data.rm_answer_tokens or self.data.max_answer_tokens) + 1

    @property
    def answer_limit(self) -> int:
        return self.filter.max_answer_tokens or self.data.max_answer_tokens


def instance_names(cfg: UfConfig, every: bool = False) -> list[str]:
    """The stage instances this run executes in order: rm, then generate_t, score_t, filter_t, rebel_t for
    each iteration (`every`: of every stage, not only --stages)."""
    names = STAGES if every else cfg.stage_list
    iterations = [cfg.iteration] if cfg.iteration else range(1, cfg.iterations + 1)
    out = ["rm"] if "rm" in names else []
    for t in iterations:
        out += [f"{s}_{t}" for s in ITERATED if s in names]
    return out


def split_instance(name: str) -> tuple[str, int]:
    """ "rebel_2" -> ("rebel", 2); "rm" -> ("rm", 0)."""
    stage, _, t = name.rpartition("_")
    return (stage, int(t)) if stage else (name, 0)


def length_flags(cfg: UfConfig) -> str:
    d = cfg.data
    return (
        f"--data.max_prompt_tokens {d.max_prompt_tokens} + the chat template's special tokens + "
        f"max(--data.max_answer_tokens {d.max_answer_tokens}, "
        f"--data.rm_answer_tokens {d.rm_answer_tokens}) + 1"
    )


def block_length(cfg: UfConfig, template_special: int = 16) -> int:
    """T, the longest row: a prompt (with the template's special tokens) and the longer answer width."""
    return cfg.data.max_prompt_tokens + template_special + max(cfg.response_len, cfg.rm_answer_len)


def inactive_message(cfg: UfConfig, given) -> str:
    r = cfg.rebel
    inactive = []
    if r.algo == "rebel" and ("rebel", "beta") in given:
        inactive.append("--rebel.beta")
    if r.algo != "rebel":
        inactive += [f"--rebel.{f}" for f in ("eta", "kl_coef") if ("rebel", f) in given]
    if cfg.score.reward != "rm" and "rm" in cfg.stage_list:
        return (
            f"--stages rm trains a reward model that --score.reward {cfg.score.reward} does not use; drop rm"
        )
    if not inactive:
        return ""
    verb = "does" if len(inactive) == 1 else "do"
    return f"{', '.join(inactive)} {verb} nothing with --rebel.algo {r.algo}; drop it"


# --------------------------------------------------------------------------------- metas and layout


def _section(cfg, name: str) -> dict:
    out = dataclasses.asdict(getattr(cfg, name))
    for field in recipe.CADENCE_FIELDS:
        out.pop(field, None)
    return out


def stage_meta(cfg: UfConfig, name: str) -> dict:
    """What must match to resume stage instance `name` (not locations, mesh or logging cadence)."""
    stage, t = split_instance(name)
    data_cfg = {k: v for k, v in dataclasses.asdict(cfg.data).items() if k not in recipe.LOCATION_FIELDS}
    config = {"model": {k: getattr(cfg, k) for k in recipe.MODEL_KEYS}, "data": data_cfg}
    if stage == "rm":
        return {"config": {**config, "rm": _section(cfg, "rm")}}
    config["iteration"] = t
    for section in ("generate", "score", "filter", "rebel"):
        config[section] = _section(cfg, section)
    if cfg.score.reward == "rm":
        config["rm"] = _section(cfg, "rm")
    return {"config": config}


def iter_dir(cfg: UfConfig, t: int) -> epath.Path:
    return epath.Path(cfg.out) / f"iter_{t}"


def stage_run(cfg: UfConfig, name: str) -> StageRun:
    """Where and how a checkpointed stage instance runs: its root key fold_in(seed, index of `name`)."""
    stage, t = split_instance(name)
    index = 1 if stage == "rm" else 1 + 4 * t + ITERATED.index(stage)
    return StageRun(
        stage=name,
        out=cfg.out,
        resume=cfg.resume,
        meta=stage_meta(cfg, name),
        root_key=jax.random.fold_in(jax.random.key(cfg.seed), index),
        data_seed=cfg.data.seed + t,
        progress=cfg.progress,
        stop_after=stop_after_for(cfg, name),
        tensorboard=cfg.tensorboard,
        wandb=cfg.wandb or None,
    )


def stop_after_for(cfg: UfConfig, name: str) -> int | None:
    """Steps (or shards) stage instance `name` may run in this invocation under --stop-after."""
    return recipe.stop_after_for(cfg.stop_after, name)


def pairs_of(cfg: UfConfig, t: int) -> int:
    """The pairs iteration t's filter kept (its summary)."""
    summary = online.require(iter_dir(cfg, t) / "filter.json", f"the filter of iteration {t}",
                             f"run --stages filter --iteration {t}")  # fmt: skip
    return int(summary["pairs"])


def stage_finished(setup: Setup, name: str) -> bool:
    cfg = setup.cfg
    stage, t = split_instance(name)
    if stage == "rm":
        return reward.reward_finished(cfg.out, "rm", cfg.rm.steps)
    if stage == "rebel":
        if not online.done(iter_dir(cfg, t) / "filter.json"):
            return False
        return handoff.stage_finished(cfg.out, name, cfg.rebel.steps(pairs_of(cfg, t)))
    return online.done(iter_dir(cfg, t) / f"{stage}.json")


# ------------------------------------------------------------------------------------------ setup


def chat_tokenizer(cfg: UfConfig) -> HFTokenizer:
    """The policy's tokenizer, refused unless it has a chat template (`stages.setup.chat_tokenizer`)."""
    return stage_setup.chat_tokenizer(cfg, "UltraFeedback")


def make_setup(cfg: UfConfig) -> Setup:
    """The mesh, model config and tokenizer of `cfg`, after the checks that need no data."""
    tok = chat_tokenizer(cfg)
    length = block_length(cfg, encoding.template_special_tokens(tok, cfg.data))
    sizes = {
        "--rm.batch_size": cfg.rm.batch_size,
        "--rm.eval_batch_size": cfg.rm.eval_batch_size,
        "--generate.batch_size": cfg.generate.batch_size,
        "--score.batch_size": cfg.score.batch_size,
        "--rebel.batch_size": cfg.rebel.batch_size,
    }
    return stage_setup.make_setup(cfg, batch_sizes=sizes, length=length, length_flags=length_flags(cfg),
                                  tokenizer=tok)  # fmt: skip


def model_config(cfg: UfConfig, vocab_size: int = 50257) -> ModelConfig:
    return stage_setup.model_config(
        stage_setup.model_spec(cfg), block_length(cfg), length_flags(cfg), vocab_size
    )


def base_params(setup: Setup):
    """The base policy (iteration 0): --init-from's weights, or a random init from fold_in(seed, 0)."""
    return stage_setup.initial_params(setup, jax.random.fold_in(jax.random.key(setup.cfg.seed), 0))


def sample_config(setup: Setup) -> SampleConfig:
    cfg, tok = setup.cfg, setup.tokenizer
    g = cfg.generate
    return SampleConfig(
        max_new_tokens=cfg.response_len, temperature=g.temperature, top_k=g.top_k, top_p=g.top_p,
        eos_id=tok.eos_id, stop_ids=tuple(tok.stop_ids), pad_id=tok.pad_id,
    )  # fmt: skip


def check(cfg: UfConfig) -> None:
    stage_setup.check_model(stage_setup.model_spec(cfg), block_length(cfg), length_flags(cfg))

