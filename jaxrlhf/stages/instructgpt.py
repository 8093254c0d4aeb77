"""InstructGPT's three stages as a recipe (Ouyang et al. 2022; Stiennon et al. 2020): SFT on reference
answers, a reward model from the SFT model, RL of the SFT policy against it. The TL;DR and SST-2 pipelines
are this recipe with their own data (`Data`).

Stage handoff (checkpoints under --out, local or gs://):
    sft: from Hugging Face weights (--init-from: GPT-2, Llama, Mistral, Qwen) or a random init
    rm:  trunk from sft, zero-init scalar head; saves the reward normalisation in its meta
    rl:  policy and frozen reference from sft, the reward model from rm (ppo's value model too, the
         normalisation folded into its head)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, NamedTuple

import jax

from jaxrlhf.stages import handoff, lm, policy, recipe, reward
from jaxrlhf.stages import setup as stage_setup
from jaxrlhf.stages.setup import Setup

STAGES = ("sft", "rm", "rl")
# The flags of the last round's spelling: the RL stage was "ppo" and its algorithm settings nested "rl".
RENAMED = {"--ppo.rl.": "--rl.", "--ppo.": "--rl.", "--mesh_fsdp": "--mesh-fsdp"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class InstructConfig(recipe.RecipeConfig):
    """The stage fields of the three-stage recipe (a pipeline adds `data`).

    Attributes:
      sft: the SFT stage.
      rm: the reward-model stage.
      rl: the RL stage (--rl.algo ppo, pg, grpo, rloo, reinforce_pp, rebel, dpo, ipo).
    """

    STAGES: ClassVar[tuple[str, ...]] = STAGES

    sft: lm.LMStageConfig = dataclasses.field(default_factory=lm.LMStageConfig)
    rm: reward.RewardStageConfig = dataclasses.field(default_factory=reward.RewardStageConfig)
    rl: policy.RLStageConfig = dataclasses.field(default_factory=policy.RLStageConfig)


class Data(NamedTuple):
    """What a pipeline's data gives the three stages (each a function of the setup).

    Attributes:
      sft: (setup, need) -> (training rows, held-out rows) as PromptAnswers; `need` = (rows, flag) of one
        batch, refused with one line below it.
      rm: (setup, need) -> (kind "pairwise" or "binary", training rows, held-out rows, () -> the reference
        rows the normalisation scores, extra summary fields).
      rl: (setup, need) -> (training prompts, held-out prompts, the PPO-ptx text or None) as PromptAnswers.
      length: cfg -> (T, the flags that make it): the longest row.
      response_len: cfg -> R, the most tokens the RL stage samples.
      answer_key: the name of a response in the RL stage's sample records.
    """

    sft: Callable
    rm: Callable
    rl: Callable
    length: Callable[[Any], tuple[int, str]]
    response_len: Callable[[Any], int]
    answer_key: str = "answer"


def steps(cfg, stage: str) -> int:
    return {"sft": cfg.sft.steps, "rm": cfg.rm.steps, "rl": cfg.rl.iterations}[stage]


def stage_run(cfg, stage: str) -> handoff.StageRun:
    """Where and how `stage` runs; its root key fold_in(seed, 1 / 2 / 3). The RL stage splits that key into
    its steps', its evaluations' and its normalisation samples' keys."""
    index = STAGES.index(stage) + 1
    run = recipe.stage_run(cfg, stage, index)
    if stage != "rl":
        return run
    keys = jax.random.split(run.root_key, 3)
    return dataclasses.replace(run, root_key=keys[0], aux_keys=keys[1:])


def finished(setup: Setup, stage: str) -> bool:
    """Whether `stage` is complete under --out (rm: with the reward normalisation stored)."""
    out, n = setup.cfg.out, steps(setup.cfg, stage)
    if stage == "rm":
        return reward.reward_finished(out, stage, n)
    return handoff.stage_finished(out, stage, n)


def sft_state_init(setup: Setup):
    return lm.lm_state_init(setup, setup.cfg.sft)


def rm_state_init(setup: Setup):
    return reward.reward_state_init(setup, setup.cfg.rm)


def make_recipe(name: str, defaults: InstructConfig, data: Data, *, renamed: Mapping[str, str] | None = None,
                description: str = "") -> recipe.Recipe:  # fmt: skip
    """The recipe of a three-stage pipeline over `data`."""

    def run_sft(setup: Setup):
        cfg = setup.cfg
        rows, val = data.sft(setup, (cfg.sft.batch_size, "--sft.batch_size"))
        run = stage_run(cfg, "sft")
        k_init, k_steps = jax.random.split(run.root_key)
        params = stage_setup.initial_params(setup, k_init)
        return lm.run_lm_stage(setup, cfg.sft, dataclasses.replace(run, root_key=k_steps), rows, val, params)

    def run_rm(setup: Setup):
        cfg = setup.cfg
        kind, rows, val, reference, summary = data.rm(setup, (cfg.rm.batch_size, "--rm.batch_size"))
        target = handoff.state_target(setup.mesh, sft_state_init(setup))
        return reward.run_reward_stage(
            setup, cfg.rm, stage_run(cfg, "rm"), kind=kind, rows=rows, val=val,
            trunk=handoff.restore_finished(cfg.out, "sft", cfg.sft.steps, target)[0].params,
            reference=reference, summary=summary,
        )  # fmt: skip

    def run_rl(setup: Setup):
        cfg, pcfg = setup.cfg, setup.cfg.rl
        group = pcfg.rl.group_size or 1
        flag = "--rl.batch_size" if group == 1 else "--rl.batch_size / --rl.group_size"
        prompts, val, ptx = data.rl(setup, (pcfg.batch_size // group, flag))
        sft_params, rm_params, reference = policy.restore_rl_inputs(
            setup, cfg.out, sft=("sft", cfg.sft.steps, sft_state_init(setup)),
            rm=("rm", cfg.rm.steps, rm_state_init(setup)),
        )  # fmt: skip
        return policy.run_rl_stage(
            setup, pcfg, stage_run(cfg, "rl"), prompts=prompts, val=val, policy=sft_params,
            reward=policy.LearnedReward(rm_params, reference), response_len=data.response_len(cfg),
            ptx_rows=ptx, answer_key=data.answer_key,
        )  # fmt: skip

    def make_setup(cfg):
        length, length_flags = data.length(cfg)
        sizes = {"--sft.batch_size": cfg.sft.batch_size, "--sft.eval_batch_size": cfg.sft.eval_batch_size,
                 "--rm.batch_size": cfg.rm.batch_size, "--rm.eval_batch_size": cfg.rm.eval_batch_size,
                 "--rl.batch_size": cfg.rl.batch_size}  # fmt: skip
        return stage_setup.make_setup(cfg, batch_sizes=sizes, length=length, length_flags=length_flags,
                                      tokenizer_dir=cfg.data.tokenizer_dir)  # fmt: skip

    def check(cfg):
        stage_setup.check_model(stage_setup.model_spec(cfg), *data.length(cfg))

    return recipe.Recipe(
        name=name, defaults=defaults, make_setup=make_setup,
        runners={"sft": run_sft, "rm": run_rm, "rl": run_rl}, steps=steps, finished=finished, check=check,
        inactive=policy.inactive_line, renamed={**RENAMED, **(renamed or {})},
        exports=lambda cfg: {"policy": "rl", "reward_model": "rm"},
        description=description,
    )  # fmt: skip
