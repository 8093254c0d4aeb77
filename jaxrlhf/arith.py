"""Arithmetic with a verifiable reward: `python -m jaxrlhf.arith` trains a char-level GPT on generated
problems ("⏎417-58=" -> "359⏎"), then optimises it with GRPO (default; --rl.algo rloo, reinforce_pp, ppo,
pg, rebel, dpo, ipo, and DAPO / Dr. GRPO / CISPO through the RL flags) against an exact-match reward, and
reports greedy accuracy on held-out problems before and after RL.

minGPT's `adder` project is the ancestor; the reward is DeepSeek-R1's pair of rule rewards (Guo et al.
2025): 1 for the right answer, `format_reward` for a wrong one in the right format (an integer in canonical
form, then the end mark "⏎"), 0 otherwise.

The problems: a op b with a, b uniform in [0, 10^digits) and op one of --data.ops ("+", "-", "*"). A problem
is held out when the CRC32 of its text ends in 0 mod 10 (a tenth of all problems, whatever the seed): the
SFT rows and the RL prompts are drawn from the other nine tenths, the evaluation from this tenth with a
fixed seed, so every run (any --seed, --data.seed) is scored on the same held-out problems.

Outputs under --out: sft/ and rl/ checkpoints, sft.jsonl / rl.jsonl metrics, rl_samples.jsonl, plots,
accuracy.json (held-out accuracy of the SFT and RL models, greedy and sampled, per operator),
samples.txt, summary.json, run.json. `--resume` continues a stopped run. Every default is a flag (--help);
--quick is a tiny run.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import time
import zlib
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf import models
from jaxrlhf.engine import checkpoint, flags, loop, memory
from jaxrlhf.rollout import SampleConfig, sample
from jaxrlhf.stages import handoff, lm, policy, recipe
from jaxrlhf.stages import setup as stage_setup
from jaxrlhf.stages.batches import PromptAnswers
from jaxrlhf.text import CharTokenizer
from jaxrlhf.train import OptimConfig, RLConfig
from jaxrlhf.validate import check_at_least, check_range

EOS = "⏎"
OPS = "+-*"
ALPHABET = "0123456789" + OPS + "="
HELDOUT_SEED = 20261208  # the held-out problems every run is evaluated on
ANSWER = re.compile(r"0|-?[1-9][0-9]*")  # an integer in canonical form ("0", "-7"; not "-0", "07")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    """The generated problems (two-digit sums and differences by default).

    Attributes:
      ops: the operators problems use, a subset of "+-*".
      digits: the operands' most digits (a, b uniform in [0, 10^digits)).
      train_problems: problems the SFT stage trains on (drawn once, from the non-held-out nine tenths).
      heldout_problems: held-out problems the accuracy is measured on.
      seed: fixes the training problems and the batch order.
    """

    ops: str = "+-"
    digits: int = 2
    train_problems: int = 20_000
    heldout_problems: int = 1000
    seed: int = 0

    def __post_init__(self):
        if not self.ops or set(self.ops) - set(OPS) or len(set(self.ops)) != len(self.ops):
            raise ValueError(f"ops={self.ops!r}; use distinct operators of {OPS!r}, e.g. '+-'")
        check_range(self, "digits", 1, 6)
        check_at_least(self, 1, "train_problems", "heldout_problems")
        check_at_least(self, 0, "seed")

    @property
    def answer_chars(self) -> int:
        """The longest answer in characters: a product has up to 2 x digits digits, a difference a sign."""
        return 2 * self.digits if "*" in self.ops else self.digits + 1

    @property
    def prompt_chars(self) -> int:
        """"⏎" + a + op + b + "=" at the longest."""
        return 2 * self.digits + 3


@dataclasses.dataclass(frozen=True, kw_only=True)
class ArithConfig(recipe.RecipeConfig):
    """Arithmetic: SFT on generated problems -> RL against the exact-match reward.

    Attributes:
      format_reward: the reward of a wrong answer in the right format (the right one scores 1).
      quick: a tiny run for tests and smoke checks (QUICK's settings for every field not given).
      data: the problems.
      sft: supervised training on problem -> answer (the loss on the answer and its end mark).
      rl: the RL stage (--rl.algo grpo, rloo, reinforce_pp, ppo, pg, rebel, dpo, ipo).
    """

    STAGES: ClassVar[tuple[str, ...]] = ("sft", "rl")

    model: str | None = "gpt-nano"
    out: str = "runs/arith"
    format_reward: float = 0.1
    quick: bool = False
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    sft: lm.LMStageConfig = dataclasses.field(default_factory=lambda: lm.LMStageConfig(
        steps=1500, batch_size=128, eval_every=0, ckpt_every=500, eval_rows=1000,
        optim=OptimConfig(lr=3e-3, warmup_steps=30, weight_decay=0.1, min_lr_ratio=0.1),
    ))  # fmt: skip
    # One update per batch of 32 problems x 8 answers (TRL's GRPO: num_iterations 1); Adam at 2e-5 (5e-5
    # climbs faster, then falls back: docs/benchmarks.md).
    rl: policy.RLStageConfig = dataclasses.field(default_factory=lambda: policy.RLStageConfig(
        iterations=200, batch_size=256, eval_every=50, eval_batches=2, sample_every=0, ckpt_every=50,
        optim=OptimConfig(lr=2e-5, weight_decay=0.0, schedule="constant"), value_from="policy",
        reward_norm="none", rl=RLConfig(algo="grpo", group_size=8, minibatches=1),
    ))  # fmt: skip

    def __post_init__(self):
        super().__post_init__()
        if self.model not in models.SMALL_GPTS:
            raise ValueError(f"model={self.model!r}; arithmetic trains a random "
                             f"{', '.join(models.SMALL_GPTS)} from scratch")  # fmt: skip
        if not (np.isfinite(self.format_reward) and 0 <= self.format_reward < 1):
            raise ValueError(f"format_reward={self.format_reward}; use a value in [0, 1) (a right answer "
                             "scores 1)")  # fmt: skip


QUICK = {
    ("sft", "steps"): 300, ("sft", "ckpt_every"): 100, ("sft", "eval_rows"): 256, ("sft", "batch_size"): 64,
    ("data", "train_problems"): 2000, ("data", "heldout_problems"): 128,
    ("rl", "iterations"): 8, ("rl", "ckpt_every"): 4, ("rl", "eval_every"): 4, ("rl", "batch_size"): 64,
    ("rl", "eval_batches"): 1,
}  # fmt: skip
# Groups of 8 answers for the grouped algorithms (DeepSeekMath's GRPO samples 64; TRL's default is 8);
# the pair algorithms choose best / worst of 8.
ALGO_SETTINGS = {
    "ppo": {("rl", "rl", "group_size"): None},
    "pg": {("rl", "rl", "group_size"): None},
}



def steps(cfg: ArithConfig, stage: str) -> int:
    return {"sft": cfg.sft.steps, "rl": cfg.rl.iterations}[stage]


# ------------------------------------------------------------------------------------------- data


def solve(a: int, op: str, b: int) -> int:
    return {"+": a + b, "-": a - b, "*": a * b}[op]


def held_out(text: str) -> bool:
    """Whether the problem `text` ("417-58") is in the held-out tenth."""
    return zlib.crc32(text.encode()) % 10 == 0


def draw_problems(n: int, dcfg: DataConfig, *, heldout: bool, seed: int) -> list[tuple[int, str, int]]:
    """n problems (a, op, b) of the held-out tenth or of the other nine tenths, drawn with `seed`; distinct
    where that part holds at least 2n problems, with repeats otherwise."""
    rng = np.random.default_rng(seed)
    part = len(dcfg.ops) * 10 ** (2 * dcfg.digits) * (0.1 if heldout else 0.9)
    out, seen = [], set()
    while len(out) < n:
        a, b = (int(x) for x in rng.integers(0, 10**dcfg.digits, 2))
        op = dcfg.ops[int(rng.integers(len(dcfg.ops)))]
        text = f"{a}{op}{b}"
        if held_out(text) != heldout or (text in seen and part >= 2 * n):
            continue
        seen.add(text)
        out.append((a, op, b))
    return out


def encode_problems(tokenizer: CharTokenizer, problems, dcfg: DataConfig) -> PromptAnswers:
    """Prompts "⏎a op b=" left-padded to `prompt_chars`; answers "c⏎" right-padded to `answer_chars` + 1."""
    p_len, a_len = dcfg.prompt_chars, dcfg.answer_chars + 1
    n, pad = len(problems), tokenizer.eos_id
    prompt, answer = np.full((n, p_len), pad, np.int32), np.full((n, a_len), pad, np.int32)
    prompt_mask, answer_mask = np.zeros((n, p_len), bool), np.zeros((n, a_len), bool)
    for i, (a, op, b) in enumerate(problems):
        p = tokenizer.encode(f"{EOS}{a}{op}{b}=")
        c = tokenizer.encode(f"{solve(a, op, b)}{EOS}")
        prompt[i, p_len - len(p) :], prompt_mask[i, p_len - len(p) :] = p, True
        answer[i, : len(c)], answer_mask[i, : len(c)] = c, True
    return PromptAnswers(prompt, prompt_mask, answer, answer_mask)


def check_answers(problems: list[str], answers: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """([N] right, [N] well formed) for answers (text before the end mark, None where the answer never
    ended) to problems ("417-58="); well formed is an integer in canonical form ("-7", "0", not "07")."""
    right, formed = np.zeros(len(answers), bool), np.zeros(len(answers), bool)
    for i, (problem, answer) in enumerate(zip(problems, answers, strict=True)):
        m = re.fullmatch(r"(\d+)([-+*])(\d+)=", problem)
        if m is None:
            raise ValueError(f"{problem!r} is not a problem 'a op b='")
        formed[i] = answer is not None and ANSWER.fullmatch(answer) is not None
        right[i] = formed[i] and int(answer) == solve(int(m[1]), m[2], int(m[3]))
    return right, formed


def decode_rollout(tokenizer: CharTokenizer, rollout) -> tuple[list[str], list[str | None]]:
    """The problems ("417-58=") and answers (None where no end mark was sampled) of a host rollout."""
    prompts = tokenizer.decode_batch(np.asarray(rollout.prompt), np.asarray(rollout.prompt_mask))
    answers = tokenizer.decode_batch(np.asarray(rollout.response), np.asarray(rollout.response_mask),
                                     stop_at_eos=True)  # fmt: skip
    finished = np.asarray(rollout.finished)
    answers = [a if f else None for a, f in zip(answers, finished, strict=True)]
    return [p.lstrip(EOS) for p in prompts], answers


def make_reward(tokenizer: CharTokenizer, format_reward: float):
    """The host reward: 1 for the right answer, format_reward for a wrong well-formed one, else 0."""

    def score(rollout) -> np.ndarray:
        right, formed = check_answers(*decode_rollout(tokenizer, rollout))
        return np.where(right, 1.0, np.where(formed, format_reward, 0.0)).astype(np.float32)

    return score


def make_setup(cfg: ArithConfig) -> stage_setup.Setup:
    """The problems, their character tokenizer, the model and the mesh."""
    dcfg = cfg.data
    tokenizer = CharTokenizer.from_corpus([ALPHABET], eos=EOS)
    sizes = {"--sft.batch_size": cfg.sft.batch_size, "--rl.batch_size": cfg.rl.batch_size}
    length = dcfg.prompt_chars + dcfg.answer_chars + 1
    setup_ = stage_setup.make_setup(cfg, batch_sizes=sizes, length=length, length_flags="--data.digits",
                                    tokenizer=tokenizer)  # fmt: skip
    train = draw_problems(dcfg.train_problems, dcfg, heldout=False, seed=dcfg.seed)
    heldout = draw_problems(dcfg.heldout_problems, dcfg, heldout=True, seed=HELDOUT_SEED)
    setup_.extras.update(
        train=encode_problems(tokenizer, train, dcfg), heldout=encode_problems(tokenizer, heldout, dcfg),
        heldout_ops=np.array([op for _, op, _ in heldout]),
        summary={"config": flags.config_json(cfg), "devices": len(jax.devices())},
        t_start=time.perf_counter(),
    )  # fmt: skip
    return setup_


# ----------------------------------------------------------------------------------------- stages


def stage_run(cfg: ArithConfig, stage: str) -> handoff.StageRun:
    return recipe.stage_run(cfg, stage, {"sft": 1, "rl": 2}[stage])


def final_params(setup_: stage_setup.Setup, stage: str):
    """The stage's final params, from its last checkpoint."""
    cfg = setup_.cfg
    init = lm.lm_state_init(setup_, cfg.sft) if stage == "sft" else policy.rl_state_init(setup_, cfg.rl)
    state, _ = handoff.restore_finished(cfg.out, stage, steps(cfg, stage),
                                        handoff.state_target(setup_.mesh, init))  # fmt: skip
    return policy.trained_policy(state, cfg.rl) if stage == "rl" else state.params


def run_sft(setup_: stage_setup.Setup):
    cfg, ex = setup_.cfg, setup_.extras
    init = models.init_params(jax.random.key(cfg.seed), setup_.model_cfg)
    return lm.run_lm_stage(setup_, cfg.sft, stage_run(cfg, "sft"), ex["train"], ex["heldout"], init)


def run_rl(setup_: stage_setup.Setup):
    cfg, ex = setup_.cfg, setup_.extras
    return policy.run_rl_stage(
        setup_, cfg.rl, stage_run(cfg, "rl"), prompts=ex["train"], val=ex["heldout"],
        policy=final_params(setup_, "sft"), reward=handoff.HostReward(make_reward(setup_.tokenizer,
                                                                                  cfg.format_reward)),
        response_len=cfg.data.answer_chars + 1,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------- the end


def accuracy(params, setup_: stage_setup.Setup, *, temperature: float, key) -> dict:
    """Held-out accuracy of `params`: the fraction answered right (greedy at temperature 0), overall and
    per operator, with the fraction well formed and the first answers as text."""
    ex, tok, dcfg = setup_.extras, setup_.tokenizer, setup_.cfg.data
    mcfg = dataclasses.replace(setup_.model_cfg, embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0)
    scfg = SampleConfig(max_new_tokens=dcfg.answer_chars + 1, temperature=temperature, eos_id=tok.eos_id)
    rows = ex["heldout"]
    ro = jax.device_get(sample(params, jnp.asarray(rows.prompt), jnp.asarray(rows.prompt_mask), mcfg, scfg,
                               key=key))  # fmt: skip
    problems, answers = decode_rollout(tok, ro)
    right, formed = check_answers(problems, answers)
    ops = ex["heldout_ops"]
    return {
        "accuracy": float(right.mean()), "well_formed": float(formed.mean()),
        "by_op": {op: float(right[ops == op].mean()) for op in dcfg.ops if (ops == op).any()},
        "examples": [f"{p}{a if a is not None else '(no end)'}{'' if r else '  x'}"
                     for p, a, r in zip(problems[:16], answers[:16], right[:16], strict=True)],
    }  # fmt: skip


def after(setup_: stage_setup.Setup, cfg: ArithConfig) -> None:
    """Held-out accuracy of the SFT and RL models (accuracy.json, samples.txt), the curves,
    summary.json, the last line; once both stages have finished."""
    if not all(handoff.stage_finished(cfg.out, s, steps(cfg, s)) for s in ("sft", "rl")):
        return
    out, summary = checkpoint.resolve(cfg.out), setup_.extras["summary"]
    result = {}
    for stage in ("sft", "rl"):
        params = final_params(setup_, stage)
        result[stage] = {
            "greedy": accuracy(params, setup_, temperature=0.0, key=jax.random.key(0)),
            "sampled": accuracy(params, setup_, temperature=1.0, key=jax.random.key(1)),
        }
    with (out / "samples.txt").open("w") as f:
        for stage, title in (("sft", "after SFT (before RL)"), ("rl", "after RL")):
            f.write(f"# {title}, greedy\n" + "".join(f"{t}\n" for t in result[stage]["greedy"]["examples"]))
    history = {s: loop.read_metrics(out / f"{s}.jsonl") for s in ("sft", "rl")}
    loop.plot_metrics(out / "sft.png", history["sft"], ("loss", "eval/val_loss"))
    loop.plot_metrics(out / "rl.png", history["rl"], ("reward", "kl_per_token", "eval/val_reward"))
    slim = {s: {k: {m: v for m, v in r.items() if m != "examples"} for k, r in result[s].items()}
            for s in result}  # fmt: skip
    handoff.write_json(out / "accuracy.json", slim)
    summary["accuracy"] = slim
    summary["heldout_problems"] = cfg.data.heldout_problems
    summary["wall_s"] = round(time.perf_counter() - setup_.extras["t_start"], 2)
    summary["memory"] = {**setup_.extras.get("memory", {}), "end": memory.snapshot()}  # the run's peak RSS
    handoff.write_json(out / "summary.json", summary)
    sft, rl = slim["sft"]["greedy"]["accuracy"], slim["rl"]["greedy"]["accuracy"]
    print(f"\narith done in {summary['wall_s']:.0f} s: held-out accuracy (greedy, "
          f"{cfg.data.heldout_problems} problems) {sft:.3f} after SFT, {rl:.3f} after RL "
          f"({cfg.rl.rl.algo}); outputs in {cfg.out}", flush=True)  # fmt: skip


RECIPE = recipe.Recipe(
    name="arith", defaults=ArithConfig(), make_setup=make_setup, steps=steps,
    runners={"sft": run_sft, "rl": run_rl}, inactive=policy.inactive_line,
    adjust=recipe.preset_adjust(QUICK, ALGO_SETTINGS, "grpo"), prepare=memory.lean_host_memory,
    after=after,
    complete=lambda cfg: (checkpoint.resolve(cfg.out) / "summary.json").exists(),
    exports=lambda cfg: {"policy": "rl"}, track_memory=True,
    description="Arithmetic: SFT a char-level GPT on generated problems, then RL (GRPO) on the exact answer.",
)  # fmt: skip


def main(argv=None) -> int:
    """The command; exit codes as `stages.recipe.main`."""
    return recipe.main(RECIPE, argv, prog="python -m jaxrlhf.arith")


if __name__ == "__main__":
    sys.exit(main())

