"""The RL step's configuration: `RLConfig` (every algorithm's settings, each default with its source), the
algorithms it names, and which field acts for which algorithm. Read by `train.policy` (the step) and
`train.experience` (the rollout's logprobs, rewards and advantages)."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

from jaxrlhf import losses
from jaxrlhf.validate import check_at_least, check_choice, check_finite, check_positive, check_range

ALGOS = ("ppo", "pg", "grpo", "rloo", "reinforce_pp")  # optimised with make_learn
CLIPPED = ("ppo", "grpo", "rloo", "reinforce_pp")  # the algorithms with a ratio (PPO's clip or CISPO's)
MISMATCH = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
PAIR_ALGOS = ("rebel", "dpo", "ipo")  # online preference optimisation on best / worst pairs (make_pair_step)
AGGREGATIONS = Literal["token_mean", "seq_mean_token_sum", "seq_mean_token_mean", "constant"]

# The fields each algorithm sets when they are None, and where the numbers come from.
ALGO_DEFAULTS = {
    # lm-human-preferences (Ziegler et al. 2019, train_policy.py): kl_coef 0.2 in the reward (k1), 4 epochs,
    # advantages whitened over the batch; the token-mean loss of TRL's PPO trainer.
    "ppo": dict(kl_coef=0.2, kl_penalty="reward", kl_kind="k1", loss_agg="token_mean", whiten_advantages=True,
                epochs=4),
    "pg": dict(kl_coef=0.2, kl_penalty="reward", kl_kind="k1", loss_agg="token_mean", whiten_advantages=True,
               epochs=1),
    # DeepSeekMath (Shao et al. 2024, eq. 3 and section 4.1.2): beta 0.04 on the k3 estimate as a loss term,
    # advantages standardised within each group and not again over the batch, the per-sequence token mean
    # ("GRPO as written", TRL's loss_type "grpo"), one update per batch (TRL num_iterations 1).
    "grpo": dict(kl_coef=0.04, kl_penalty="loss", kl_kind="k3", loss_agg="seq_mean_token_mean",
                 whiten_advantages=False, epochs=1),
    # RLOO (Ahmadian et al. 2024; TRL's RLOOTrainer): the sequence KL in the reward (k1), the leave-one-out
    # baseline and no further normalisation, REINFORCE on each answer's summed logprob, one update.
    "rloo": dict(kl_coef=0.05, kl_penalty="reward", kl_kind="k1", loss_agg="seq_mean_token_sum",
                 whiten_advantages=False, epochs=1),
    # REINFORCE++ (Hu et al. 2025) as OpenRLHF runs it (--advantage_estimator reinforce, its defaults:
    # init_kl_coef 0.01, kl_estimator k1 in the reward, one epoch, PolicyLoss's token_level_loss): the
    # KL-shaped returns normalised over the global batch (`losses.reinforce_pp_advantages`), not whitened
    # again; PPO's clipped token loss.
    "reinforce_pp": dict(kl_coef=0.01, kl_penalty="reward", kl_kind="k1", loss_agg="token_mean",
                         whiten_advantages=False, epochs=1),
    # The REBEL authors' code (ZhaolinGao/REBEL src/tldr/rebel.py): eta 1, kl_coef 0.05, 4 passes.
    "rebel": dict(kl_coef=0.05, epochs=4),
    # DPO (Rafailov et al. 2023) / IPO (Azar et al. 2023) as TRL's DPOTrainer: one pass; IPO on the
    # per-token mean logprobs.
    "dpo": dict(epochs=1, average_logprobs=False),
    "ipo": dict(epochs=1, average_logprobs=True),
}  # fmt: skip
_RESOLVED = (
    "kl_coef",
    "kl_penalty",
    "kl_kind",
    "loss_agg",
    "whiten_advantages",
    "epochs",
    "average_logprobs",
)
# RLConfig fields that act only for some algorithms: a pipeline refuses one given for another algorithm
# (`inactive_fields`) instead of ignoring it.
FIELD_ALGOS = {
    "group_size": ("grpo", "rloo", "reinforce_pp", *PAIR_ALGOS),
    "grpo_scale_by_std": ("grpo",),
    "gamma": ("ppo", "pg", "reinforce_pp"),
    "lam": ("ppo",),
    "clip_eps": CLIPPED,
    "clip_eps_high": CLIPPED,
    "objective": CLIPPED,
    "value_clip_eps": ("ppo",),
    "vf_coef": ("ppo",),
    "epochs": (*CLIPPED, *PAIR_ALGOS),
    "minibatches": (*CLIPPED, *PAIR_ALGOS),
    "micro_batches": ALGOS,
    "whiten_rewards": ("ppo", "pg"),
    "whiten_advantages": ALGOS,
    "ratio_level": CLIPPED,
    "entropy_top_fraction": ALGOS,
    "overlong_cache": ALGOS,
    "mask_truncated": ALGOS,
    "mismatch": ALGOS,
    "mismatch_cap": ALGOS,
    "loss_agg": ALGOS,
    "kl_coef": (*ALGOS, "rebel"),
    "kl_target": ALGOS,
    "kl_horizon": ALGOS,
    "kl_penalty": ALGOS,
    "kl_kind": ALGOS,
    "ent_coef": ALGOS,
    "dropout": ALGOS,
    "ptx_coef": ALGOS,
    "filtered_logprobs": ALGOS,
    "reuse_sampler_logprobs": ALGOS,
    "eta": ("rebel",),
    "beta": ("dpo", "ipo"),
    "average_logprobs": ("dpo", "ipo"),
    "no_eos_penalty": (*ALGOS, "rebel"),
}


def inactive_fields(algo: str, names) -> list[str]:
    """The RLConfig fields among `names` (e.g. the flags a user gave) that do nothing for `algo`."""
    return [name for name in names if algo not in FIELD_ALGOS.get(name, (*ALGOS, *PAIR_ALGOS))]


@dataclasses.dataclass(frozen=True, kw_only=True)
class RLConfig:
    """Policy-optimisation settings of every online algorithm.

    A field left None takes the algorithm's published default (`ALGO_DEFAULTS`, each with its source):
    `RLConfig(algo="grpo")` is DeepSeekMath's GRPO (k3 KL as a loss with beta 0.04, group-standardised
    advantages not re-whitened, the per-sequence token mean), `RLConfig(algo="ppo")` lm-human-preferences'
    PPO (k1 KL in the reward, beta 0.2, whitened advantages, 4 epochs). `resolved()` fills them in; the
    train functions take either. The rest: PPO numbers are lm-human-preferences' (Ziegler et al. 2019,
    `train_policy.py`: horizon 10000, gamma 1, lam 0.95, cliprange 0.2 and cliprange_value 0.2, vf_coef 0.1,
    one minibatch). It also whitens the rewards (without shifting their mean) before GAE; TRL does not, and
    neither does this default (`whiten_rewards`).

    Attributes:
      algo: "ppo" (clipped surrogate + value head + GAE), "pg" (vanilla policy gradient on reward-to-go),
        "grpo" (clipped surrogate, no value model, each answer's sequence reward standardised within
        its group of `group_size` answers to one prompt: Shao et al. 2024), "rloo" (REINFORCE's
        leave-one-out baseline, r_i - mean_{j != i} r_j: Ahmadian et al. 2024), "reinforce_pp"
        (REINFORCE++, Hu et al. 2025: per-token k1 KL in the reward, returns normalised over the global
        batch, no critic; with group_size, "REINFORCE++-baseline" subtracts each group's mean score
        first), or the online preference algorithms on the best / worst of `group_size` answers: "rebel"
        (Gao et al. 2024), "dpo", "ipo".
      group_size: K, answers per prompt (grpo, rloo, rebel, dpo, ipo: required there; reinforce_pp:
        optional; refused elsewhere); rows [iK, (i + 1)K) of a batch share a prompt.
      grpo_scale_by_std: grpo divides by the group's std; False keeps the mean shift only (Dr. GRPO,
        Liu et al. 2025, with loss_agg "constant").
      ratio_level: "token" (PPO's per-token ratio) or "sequence" (GSPO, Zheng et al. 2025: one
        length-normalised ratio per response, clipped as a whole; ppo, grpo, rloo).
      loss_agg: how per-token policy (and KL) terms become the loss: "token_mean" (every token of the
        batch alike; DAPO), "seq_mean_token_sum", "seq_mean_token_mean" (GRPO as written) or "constant"
        (Dr. GRPO); see `losses.aggregate`. None: the algorithm's.
      kl_coef: initial beta of the KL penalty to the frozen reference (rebel: the weight of the sequence KL
        of pi_t to the reference in the reward). None: the algorithm's.
      kl_target: per-sequence KL target of the adaptive controller (Ziegler et al.); None = fixed beta.
      kl_horizon: the controller's horizon in samples.
      kl_penalty: where the KL penalty goes: "reward" (-beta * k1 on every token of the shaped reward,
        Ziegler et al. / InstructGPT: the policy gradient of that reward is the KL's gradient) or "loss"
        (beta * a k2 / k3 estimate differentiated as a loss term, GRPO's form; see `losses.kl_loss`).
        None: the algorithm's.
      kl_kind: the estimator: "k1" with kl_penalty "reward" (the only one with the right gradient there);
        "k3" (GRPO) or "k2" with "loss". None: the algorithm's.
      gamma: GAE discount.
      lam: GAE lambda (PG uses lambda = 1: reward-to-go).
      clip_eps: PPO ratio clip (eps_low, and eps_high unless clip_eps_high is set).
      clip_eps_high: the upper clip eps of the token ratio ("clip-higher": DAPO, Yu et al. 2025, uses 0.28
        with clip_eps 0.2); with objective "cispo" the importance weight's cap is 1 + clip_eps_high (None:
        4.0, TRL's recommended CISPO epsilon_high 5.0). None: clip_eps.
      objective: the clipped algorithms' policy term: "clip" (PPO's clipped surrogate) or "cispo"
        (MiniMax-M1's CISPO, `losses.cispo_loss`: REINFORCE with a clipped stop-gradient importance weight
        on every token, no lower bound; token ratios only).
      value_clip_eps: PPO value clip (None = unclipped value loss).
      vf_coef: weight of the value loss in the joint loss.
      ent_coef: weight of the entropy bonus.
      epochs: passes over one rollout buffer (pg makes one update). None: the algorithm's.
      minibatches: minibatches per pass (the batch size must be divisible by it).
      micro_batches: slices each minibatch's gradient is accumulated over, one after another (gradient
        accumulation: the same update up to float rounding, with 1 / micro_batches of the rows'
        activations alive at a time); it must divide the minibatch's rows and the ptx batch's.
      whiten_advantages: normalise advantages over the batch's real tokens (for grpo / rloo, after the
        group baseline). None: the algorithm's.
      whiten_rewards: standardise the per-token rewards (score and KL terms) over the batch's real tokens
        and add their mean back, (r - mean) / std + mean (lm-human-preferences' whiten_rewards with
        shift_mean=False; ppo / pg, before GAE).
      no_eos_penalty: score given to a response that never emits a stop id (`Rollout.finished`: the
        sampler's eos_id or stop_ids; None = keep the score).
      overlong_cache: DAPO's soft overlong punishment (Yu et al. 2025, eq. 13): with R the most tokens
        sampled and L this cache, an answer of |y| > R - L tokens adds (R - L - |y|) / L to its score
        (down to -1 at |y| = R); None = off. At most R.
      mask_truncated: answers that never emitted a stop id carry no loss (DAPO's overlong filtering,
        TRL's mask_truncated_completions): they drop out of the policy, KL and value terms and of their
        normalisers, but still count in their group's baseline.
      entropy_top_fraction: only the top q fraction of the batch's response tokens by the sampling
        policy's entropy carry the policy gradient (Wang et al. 2025, "Beyond the 80/20 Rule": q 0.2;
        TRL's top_entropy_quantile); the others get advantage 0, so the loss's normalisers still count
        every real token, as in the paper and TRL. None = every token.
      mismatch: importance-weight the advantages by pi_learner / pi_sampler when the rollouts' sampler
        reports other logprobs than the learner computes (a bfloat16 or quantised sampler, stale weights):
        "token_truncate" (TIS), "token_mask", "sequence_truncate" or "sequence_mask"
        (`losses.mismatch_weights`; TRL's vllm_importance_sampling_mode). None = off.
      mismatch_cap: C >= 1 of the mismatch weights: truncated at C, or masked above it (2.0: the
        truncation level of Yao et al. 2025's TIS).
      dropout: run the policy and value with the model config's dropout in the update. Off by default:
        old and reference logprobs are computed without dropout, so with it the ratio differs from 1
        before any update (lm-human-preferences, TRL and the REBEL code all update without dropout).
      ptx_coef: gamma of PPO-ptx (Ouyang et al. 2022, eq. 2): every update also minimises gamma x the
        next-token loss of a batch of pretraining text (`ptx`, a LMBatch passed to learn / step),
        against regressions on the pretraining distribution; 0 = off (then passing `ptx` is an error).
      filtered_logprobs: score and optimise the top-k / top-p filtered policy (the distribution tokens are
        drawn from) instead of the tempered, unfiltered one. Off by default, as in lm-human-preferences and
        TRL: the update is then slightly off-policy under top-k / top-p, by the "filter_kl" metric.
      reuse_sampler_logprobs: take the old logprobs (the ratio's denominator, k1's policy term) from the
        rollout, as the sampler computed them, instead of a forward of the policy over the rollout, where
        the two are the same function of the same weights: the model's compute dtype float32 (the
        sampler's KV-cache decode and a full forward agree to ~1e-6 there, not in bfloat16), no top-k /
        top-p filter, no entropy mask or mismatch correction (they need the learner's logits). Holds for an
        on-policy rollout of the current params, as the RL stage samples; a rollout from other weights or
        another sampler (a quantised one, vLLM's) needs False. The "old_logprobs_reused" metric says which.
        TRL's and tunix's GRPO skip that forward too.
      eta: REBEL's scale: the optimum moves log pi/pi_t (y) - log pi/pi_t (y') to eta (r(y) - r(y')).
      beta: DPO's / IPO's beta.
      average_logprobs: DPO / IPO on each answer's per-token mean logprob instead of its sum. None: the
        algorithm's (IPO averages, as TRL does).
    """

    algo: Literal["ppo", "pg", "grpo", "rloo", "reinforce_pp", "rebel", "dpo", "ipo"] = "ppo"
    group_size: int | None = None
    grpo_scale_by_std: bool = True
    loss_agg: AGGREGATIONS | None = None
    ratio_level: Literal["token", "sequence"] = "token"
    kl_coef: float | None = None
    kl_target: float | None = None
    kl_horizon: float = 10000.0
    kl_penalty: Literal["reward", "loss"] | None = None
    kl_kind: Literal["k1", "k2", "k3"] | None = None
    gamma: float = 1.0
    lam: float = 0.95
    clip_eps: float = 0.2
    clip_eps_high: float | None = None
    objective: Literal["clip", "cispo"] = "clip"
    value_clip_eps: float | None = 0.2
    vf_coef: float = 0.1
    ent_coef: float = 0.0
    epochs: int | None = None
    minibatches: int = 1
    micro_batches: int = 1
    whiten_advantages: bool | None = None
    whiten_rewards: bool = False
    no_eos_penalty: float | None = None
    overlong_cache: int | None = None
    mask_truncated: bool = False
    entropy_top_fraction: float | None = None
    mismatch: Literal["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"] | None = None
    mismatch_cap: float = 2.0
    dropout: bool = False
    ptx_coef: float = 0.0
    filtered_logprobs: bool = False
    reuse_sampler_logprobs: bool = True
    eta: float = 1.0
    beta: float = 0.1
    average_logprobs: bool | None = None

    def resolved(self) -> RLConfig:
        """This config with every None of `_RESOLVED` set to the algorithm's default (`ALGO_DEFAULTS`)."""
        defaults = ALGO_DEFAULTS[self.algo]
        changes = {k: defaults[k] for k in _RESOLVED if getattr(self, k) is None and k in defaults}
        return dataclasses.replace(self, **changes) if changes else self

    @property
    def pair_algo(self) -> bool:
        return self.algo in PAIR_ALGOS

    def __post_init__(self):
        r = self.resolved() if any(getattr(self, k) is None for k in _RESOLVED) else self
        check_choice(self, "algo", (*ALGOS, *PAIR_ALGOS))
        check_choice(self, "ratio_level", losses.RATIO_LEVELS)
        if self.loss_agg is not None:
            check_choice(self, "loss_agg", losses.AGGREGATIONS)
        if self.ratio_level != "token" and self.algo not in CLIPPED:
            raise ValueError(
                f"ratio_level acts for the clipped algorithms ({', '.join(CLIPPED)}); {self.algo} has no "
                "ratio."
            )
        check_choice(self, "objective", ("clip", "cispo"))
        if self.objective == "cispo" and self.ratio_level != "token":
            raise ValueError("objective 'cispo' weighs token ratios; drop ratio_level 'sequence' (GSPO)")
        if self.mismatch is not None:
            check_choice(self, "mismatch", MISMATCH)
        if not (math.isfinite(self.mismatch_cap) and self.mismatch_cap >= 1):
            raise ValueError(f"mismatch_cap={self.mismatch_cap}; use a finite C >= 1")
        if self.entropy_top_fraction is not None:
            check_range(self, "entropy_top_fraction", 0.0, 1.0, low_open=True)
        if self.overlong_cache is not None:
            check_at_least(self, 1, "overlong_cache")
        grouped = self.algo in FIELD_ALGOS["group_size"] and self.algo != "reinforce_pp"
        if self.algo == "reinforce_pp" and self.group_size is not None and not self.group_size >= 2:
            raise ValueError(
                f"group_size={self.group_size}; REINFORCE++-baseline needs >= 2 answers per prompt (or none: "
                "plain REINFORCE++)"
            )
        if grouped and (self.group_size is None or not self.group_size >= 2):
            raise ValueError(
                f"group_size={self.group_size}; {self.algo} needs >= 2 answers per prompt (a group or a pair "
                "needs at least 2 answers per prompt)"
            )
        if not grouped and self.group_size is not None and self.algo != "reinforce_pp":
            raise ValueError(
                f"group_size={self.group_size} does nothing with algo={self.algo} (group_size acts for grpo, "
                "rloo and reinforce_pp only, and rebel, dpo, ipo: the answers a pair is chosen from); drop it"
            )
        if not self.grpo_scale_by_std and self.algo != "grpo":
            raise ValueError(f"grpo_scale_by_std=False acts for grpo only; drop it for algo {self.algo!r}.")
        check_at_least(self, 1, "epochs", "minibatches", "micro_batches")
        if self.whiten_rewards and self.algo not in ("ppo", "pg"):
            raise ValueError(f"whiten_rewards acts for ppo and pg; {self.algo} uses its group baseline.")
        check_at_least(self, 0, "ptx_coef", "kl_coef", "vf_coef", "ent_coef", "kl_horizon")
        check_positive(self, "clip_eps", "clip_eps_high", "value_clip_eps", "eta", "beta")
        if self.kl_target is not None and not (math.isfinite(self.kl_target) and self.kl_target > 0):
            raise ValueError(
                f"kl_target={self.kl_target}; use a positive KL per sequence, or none (fixed beta)"
            )
        check_range(self, "gamma", 0.0, 1.0)
        check_range(self, "lam", 0.0, 1.0)
        check_finite(self, "no_eos_penalty")
        if self.kl_kind is not None:
            check_choice(self, "kl_kind", ("k1", "k2", "k3"))
        if self.kl_penalty is not None:
            check_choice(self, "kl_penalty", ("reward", "loss"))
        if self.pair_algo:
            return
        if r.kl_penalty == "reward" and r.kl_kind != "k1":
            raise ValueError(
                f"kl_kind={r.kl_kind!r} in the reward does not give the KL's gradient (only k1 does); use "
                "kl_kind 'k1', or kl_penalty 'loss' for a differentiated k2 / k3 term (GRPO's form)"
            )
        if r.kl_penalty == "loss" and r.kl_kind == "k1":
            raise ValueError(
                "kl_kind 'k1' as a loss term has zero expected gradient; use kl_kind 'k3' (GRPO) or 'k2', "
                "or kl_penalty 'reward'"
            )
