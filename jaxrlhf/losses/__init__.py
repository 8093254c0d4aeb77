"""Every RLHF loss and estimator as a pure function: arrays in, `(loss, metrics)` out.

Each function stands alone so it can be lifted into other code: no model or config objects, no
hidden state, jittable and vmappable. Conventions:

- Per-token arrays are [B, R], aligned to response tokens, with one bool `response_mask` [B, R]
  (True = real). Sequence-level arrays (scores, rewards, sequence logprobs) are [B]; groups of
  answers to one prompt are [B, K].
- A loss computes a per-token (or per-pair) array and reduces it once with `ops.masked_mean`, which
  divides by max(count, 1): a fully masked row adds nothing and an empty batch gives a finite 0.
- Padded entries are zeroed before any exp or square, so garbage in padding never reaches the loss
  or its gradient.
- `metrics` is a flat dict of scalar arrays that always contains "loss".
- What the formula treats as constant (advantages, returns, old logprobs and values, reference
  logprobs, reward targets) goes through `jax.lax.stop_gradient`.
- String and None options (`kind`, `loss_type`, `clip_eps_high`, `dual_clip`, `logits`,
  `aggregation`, `ratio_level`, `level`, `mode`) are static Python values; an unknown option raises
  ValueError.
- Computation runs in at least float32 (bf16 inputs are promoted).
- Arguments are checked before anything is computed, with a one-line ValueError naming the function and
  the argument: every array's shape against the others (static, so also under `jax.jit`, `jax.vmap` and
  `jax.shard_map`, with the per-example / per-device shapes), and parameters (beta, eta, clip ranges > 0;
  CISPO's clip ranges >= 0; gamma, lam in [0, 1]; label_smoothing in [0, 0.5); top_fraction in (0, 1]; an
  importance-weight cap >= 1; finiteness) when they arrive as concrete numbers.
  A parameter passed as a traced value is checked for its rank only. The checks are Python code that
  runs at trace time: compiled programs contain none of them. An all-False mask where a mean is taken
  gives 0, never NaN (a fully padded micro-batch or shard is legal).

Data parallelism with `jax.shard_map`: every loss or estimator that reduces over the batch takes an
optional keyword `axis_name` (a mesh axis name or a tuple of them) over which axis 0 is split. Inside
the shard_map it then returns the loss and metrics of the *global* batch, the same on every device:
means are psum(sum) / psum(count), variances and whitening use the global mean and count, sequence
means and Dr. GRPO's normaliser count the global rows, ratio_max is a pmax. Without `axis_name` the
result is what it always was (bit for bit). Per-row functions take no `axis_name`: `sequence_logprobs`,
`kl_penalty`, `shaped_rewards`, `compute_gae`, and the group baselines `rloo_advantages` /
`grpo_advantages`, whose groups must each live on one device (see `losses.advantages`).
`mismatch_weights` computes its weights per token or row and takes `axis_name` for its metrics only;
`entropy_mask` thresholds at the global batch's order statistic (an all_gather of the entropies).

A data-parallel step then differentiates the global loss directly (measured on JAX 0.10 with
shard_map's default `check_vma=True`): with params replicated (`P()`) and the batch split (`P('data')`),
`jax.grad(loss)(params, shard)` inside the shard_map is already the global gradient, identical on
every device, so the optimizer update runs inside with no `pmean` of the gradients (see `jaxrlhf.ops`
for what was measured, and for `check_vma=False`, where the gradients must be pmean'd).

The functions live in one module per family and are all re-exported here:
  lm          sequence_logprobs, sft_loss
  reward      pairwise_rm_loss, binary_rm_loss, kway_rm_loss, reward_gain_bias, reward_centring_loss
  kl          kl_penalty, shaped_rewards, kl_loss, KLControllerState, init/update_kl_controller
  advantages  compute_gae, whiten_advantages, reinforce_pp_advantages, rloo_advantages, grpo_advantages
  policy      AGGREGATIONS, RATIO_LEVELS, aggregate, pg_loss, ppo_policy_loss, cispo_loss, value_loss,
              entropy_bonus, entropy_mask, MISMATCH_LEVELS, MISMATCH_MODES, mismatch_weights
  preference  rebel_loss, dpo_loss
"""

from jaxrlhf.losses.advantages import (
    compute_gae,
    grpo_advantages,
    reinforce_pp_advantages,
    rloo_advantages,
    whiten_advantages,
)
from jaxrlhf.losses.kl import (
    KLControllerState,
    init_kl_controller,
    kl_loss,
    kl_penalty,
    shaped_rewards,
    update_kl_controller,
)
from jaxrlhf.losses.lm import sequence_logprobs, sft_loss
from jaxrlhf.losses.policy import (
    AGGREGATIONS,
    MISMATCH_LEVELS,
    MISMATCH_MODES,
    RATIO_LEVELS,
    aggregate,
    cispo_loss,
    entropy_bonus,
    entropy_mask,
    mismatch_weights,
    pg_loss,
    ppo_policy_loss,
    value_loss,
)
from jaxrlhf.losses.preference import dpo_loss, rebel_loss
from jaxrlhf.losses.reward import (
    binary_rm_loss,
    kway_rm_loss,
    pairwise_rm_loss,
    reward_centring_loss,
    reward_gain_bias,
)

__all__ = [
    "AGGREGATIONS",
    "MISMATCH_LEVELS",
    "MISMATCH_MODES",
    "RATIO_LEVELS",
    "KLControllerState",
    "aggregate",
    "cispo_loss",
    "compute_gae",
    "dpo_loss",
    "entropy_bonus",
    "entropy_mask",
    "grpo_advantages",
    "init_kl_controller",
    "kl_loss",
    "kl_penalty",
    "kway_rm_loss",
    "mismatch_weights",
    "pairwise_rm_loss",
    "binary_rm_loss",
    "pg_loss",
    "ppo_policy_loss",
    "rebel_loss",
    "reinforce_pp_advantages",
    "reward_centring_loss",
    "reward_gain_bias",
    "rloo_advantages",
    "sequence_logprobs",
    "sft_loss",
    "shaped_rewards",
    "update_kl_controller",
    "value_loss",
    "whiten_advantages",
]
