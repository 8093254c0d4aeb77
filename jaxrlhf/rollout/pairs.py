"""Online preference data for REBEL and DPO: n answers per prompt -> (chosen, rejected) pairs -> PrefBatch.

One iteration, as in REBEL (Gao et al. 2024, "REBEL: Reinforcement Learning via Regressing Relative
Rewards", Algorithm 1) and online DPO:

  rollout   = generate_answers(policy, prompt, prompt_mask, cfg, sample_cfg, n, key=k)  (device, [B*n])
  rewards   = reward_fn(rollout)                                                        ([B*n])
  ref       = rollout_logprobs(ref_params, rollout, cfg)  # REBEL: ref_params = the policy pi_t itself
  rewards   = rebel_rewards(rewards, ...)                 # REBEL, optional: KL to SFT, no-EOS penalty
  selection = select_pairs(rollout.response, rollout.response_mask, rewards, n)        (host NumPy)
  batch     = build_pref_batch(rollout, selection, ref)   # PrefBatch, [B] pairs, padded
  state, metrics = rebel_step(state, batch, key=k)        # several passes over the pairs; or dpo_step

Row i * n + j of the rollout is answer j of prompt i. Pair selection is data dependent, so it runs on the
host; everything with a model in it (sampling, logprobs, the step) has static shapes: the batch always
has `num_pairs` pairs (padding has `pair_mask` False), so the jitted step compiles once.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf.models import ModelConfig, transformer
from jaxrlhf.rollout import sampler
from jaxrlhf.rollout.sampler import Rollout, SampleConfig

# ----------------------------------------------------------------------------------------- sampling


def generate_answers(
    params,
    prompt: jax.Array,
    prompt_mask: jax.Array,
    model_cfg: ModelConfig,
    sample_cfg: SampleConfig,
    n: int,
    *,
    key: jax.Array,
) -> Rollout:
    """n sampled answers to each prompt, from one batched sampler call.

    Args:
      params: GPT params of the sampling policy.
      prompt: [B, P] int ids, left-padded (may be sharded over the batch).
      prompt_mask: [B, P] bool, True = real token.
      model_cfg: the model config.
      sample_cfg: sampling config (temperature > 0 for distinct answers).
      n: answers per prompt (>= 1).
      key: PRNG key; each row draws its own noise from it.

    Returns:
      Rollout of B * n rows; row i * n + j is answer j to prompt i.
    """
    if n < 1:
        raise ValueError(f"n={n}; generate at least one answer per prompt.")
    prompt = jnp.repeat(prompt, n, axis=0, total_repeat_length=prompt.shape[0] * n)  # [B*n, P]
    prompt_mask = jnp.repeat(prompt_mask, n, axis=0, total_repeat_length=prompt_mask.shape[0] * n)
    return sampler.sample(params, prompt, prompt_mask, model_cfg, sample_cfg, key=key)


def answer_loss_mask(rollout: Rollout) -> jax.Array:
    """[B, P + R] bool, True on the response tokens (the EOS included), False on the prompt."""
    return jnp.concatenate([jnp.zeros_like(rollout.prompt_mask, bool), rollout.response_mask], axis=1)


def rollout_logprobs(params, rollout: Rollout, cfg: ModelConfig, *, temperature: float = 1.0) -> jax.Array:
    """Sequence logprob of every answer under `params` at `temperature`, from a teacher-forced forward.

    log pi(y | x) = sum_t log pi(y_t | x, y_<t) over the response tokens (EOS included), pi the model's
    policy at `temperature` (logits / T: the policy the sampler draws from at T, before top-k / top-p),
    computed with `models.transformer.answer_logprobs`, exactly as the DPO / REBEL steps compute the policy
    side at the same temperature. REBEL's pi_t and its KL term, and online DPO's reference, are taken at
    the sampling temperature (as the REBEL authors' code does: logits / T everywhere).

    Args:
      params: GPT params (the DPO reference, or REBEL's pi_t: the policy that generated the rollout).
      rollout: [B*n] rows.
      cfg: the model config of `params`.
      temperature: the sampling temperature (a Python float).

    Returns:
      [B*n] float32.
    """
    return transformer.answer_logprobs(
        params, rollout.tokens, rollout.mask, answer_loss_mask(rollout), cfg, temperature=temperature
    )


def sampler_logprobs(rollout: Rollout) -> jax.Array:
    """Sequence logprobs recorded by the sampler: rollout.logprobs summed over response_mask, [B*n].

    Free (no forward pass) and equal to `rollout_logprobs(sampling params, ..., temperature=T)` up to
    float error (the sampler records the tempered, unfiltered logprobs log_softmax(logits / T)), but
    computed by the KV-cache decode path, so not bit-identical to the training forward. Prefer
    `rollout_logprobs` for REBEL's pi_t.
    """
    return jnp.sum(jnp.where(rollout.response_mask, rollout.logprobs, 0.0), axis=-1)


# ------------------------------------------------------------------------------------------ pairing


class PrefBatch(NamedTuple):
    """Preference pairs for DPO and REBEL; index 0 of axis 1 is the chosen (better) answer.

    Attributes:
      tokens: [B, 2, T] prompt + answer ids.
      mask: [B, 2, T] bool, True = real token.
      loss_mask: [B, 2, T] bool, True on answer tokens (the tokens whose logprobs count).
      ref_logprobs: [B, 2] sequence logprobs of the answers under the reference policy (DPO) or the
        policy that generated them (REBEL's pi_t).
      rewards: [B, 2] rewards of the answers (REBEL; ignored by DPO).
      pair_mask: [B] bool, True = a real pair.
    """

    tokens: jax.Array
    mask: jax.Array
    loss_mask: jax.Array
    ref_logprobs: jax.Array
    rewards: jax.Array
    pair_mask: jax.Array


class PairSelection(NamedTuple):
    """The pairs `select_pairs` chose, as host NumPy arrays, plus what it dropped.

    Attributes:
      prompt_index: [M] int64 prompt i of each pair (increasing).
      chosen_index: [M] int64 rollout row (i * n + j) of the higher-reward answer.
      rejected_index: [M] int64 rollout row of the lower-reward answer.
      chosen_reward: [M] float32.
      rejected_reward: [M] float32.
      num_prompts: B, the number of prompts in the rollout.
      num_unfinished: answers dropped for not emitting a stop token (cut at the length budget).
      num_too_long: answers dropped for exceeding `max_answer_tokens`.
      num_too_short: answers dropped for having fewer than `min_answer_tokens`.
      num_duplicate: answers dropped as a repeat of an earlier answer to the same prompt.
      num_too_few: prompts skipped for having fewer than 2 answers left.
      num_tied: prompts skipped because their best and worst remaining rewards are equal.
    """

    prompt_index: np.ndarray
    chosen_index: np.ndarray
    rejected_index: np.ndarray
    chosen_reward: np.ndarray
    rejected_reward: np.ndarray
    num_prompts: int
    num_unfinished: int
    num_too_long: int
    num_too_short: int
    num_duplicate: int
    num_too_few: int
    num_tied: int

    @property
    def num_pairs(self) -> int:
        return len(self.prompt_index)

    def metrics(self) -> dict[str, float]:
        """Flat dict of scalars for logging; "no_pairs" is 1 when not one prompt gave a pair (an update
        that learns nothing: a driver counts these and fails a stage made only of them)."""
        margin = self.chosen_reward - self.rejected_reward
        return {
            "pairs": float(self.num_pairs),
            "no_pairs": float(self.num_pairs == 0),
            "pair_fraction": self.num_pairs / max(self.num_prompts, 1),
            "dropped_unfinished": float(self.num_unfinished),
            "dropped_too_long": float(self.num_too_long),
            "dropped_too_short": float(self.num_too_short),
            "dropped_duplicate": float(self.num_duplicate),
            "skipped_too_few": float(self.num_too_few),
            "skipped_tied": float(self.num_tied),
            "reward_margin": float(margin.mean()) if len(margin) else 0.0,
        }


def select_pairs(
    answers: np.ndarray,
    answer_mask: np.ndarray,
    rewards: np.ndarray,
    n: int,
    *,
    max_answer_tokens: int | None = None,
    min_answer_tokens: int = 1,
    finished: np.ndarray | None = None,
) -> PairSelection:
    """Pick a (best, worst) answer pair per prompt, on the host.

    For prompt i (rows i * n .. i * n + n - 1), in this order:
      0. with `finished`, an answer that never emitted a stop token is dropped (`num_unfinished`): it was
         cut at the sampler's budget, so it is longer than any length limit;
      1. the length of an answer is the number of True entries of its mask row (with
         `Rollout.response_mask` that counts the end-of-text token); answers longer than
         `max_answer_tokens` or shorter than `min_answer_tokens` are dropped;
      2. among the rest, an answer whose real tokens (`answers[row][answer_mask[row]]`) equal those of an
         earlier (lower-row) answer is dropped, so the first copy is kept;
      3. with fewer than 2 answers left the prompt is skipped (`num_too_few`);
      4. chosen = the highest reward, rejected = the lowest, each tie going to the lowest row; if the two
         rewards are equal the prompt is skipped (`num_tied`).

    Args:
      answers: [B*n, R] int response ids (e.g. `rollout.response`).
      answer_mask: [B*n, R] bool, True = real token.
      rewards: [B*n] finite rewards.
      n: answers per prompt.
      max_answer_tokens: longest allowed answer; None = no limit.
      min_answer_tokens: shortest allowed answer.
      finished: optional [B*n] bool, True where the answer emitted a stop token (`Rollout.finished`).

    Returns:
      PairSelection (pairs in increasing prompt order).
    """
    answers = np.asarray(answers)
    answer_mask = np.asarray(answer_mask, bool)
    rewards = np.asarray(rewards, np.float32)
    if n < 2:
        raise ValueError(f"n={n}; a pair needs at least 2 answers per prompt.")
    if answers.ndim != 2 or answer_mask.shape != answers.shape:
        raise ValueError(
            f"answers {answers.shape} and answer_mask {answer_mask.shape} must be the same [B*n, R] shape."
        )
    rows = answers.shape[0]
    if rows % n:
        raise ValueError(f"{rows} answer rows is not a multiple of n={n}; rows must be [B*n].")
    if rewards.shape != (rows,):
        raise ValueError(f"rewards have shape {rewards.shape}; expected ({rows},), one per answer.")
    if not np.all(np.isfinite(rewards)):
        raise ValueError(
            f"rewards are not finite at rows {np.flatnonzero(~np.isfinite(rewards))[:10].tolist()}."
        )
    if max_answer_tokens is not None and max_answer_tokens < min_answer_tokens:
        raise ValueError(f"max_answer_tokens={max_answer_tokens} < min_answer_tokens={min_answer_tokens}.")

    unfinished = np.zeros(rows, bool) if finished is None else ~np.asarray(finished, bool).reshape(rows)
    lengths = answer_mask.sum(axis=-1)
    too_long = lengths > max_answer_tokens if max_answer_tokens is not None else np.zeros(rows, bool)
    too_short = lengths < min_answer_tokens
    counts = dict(
        num_unfinished=0, num_too_long=0, num_too_short=0, num_duplicate=0, num_too_few=0, num_tied=0
    )
    prompt_index, chosen_index, rejected_index = [], [], []
    for i in range(rows // n):
        kept, seen = [], set()
        for row in range(i * n, (i + 1) * n):
            if unfinished[row]:
                counts["num_unfinished"] += 1
                continue
            if too_long[row]:
                counts["num_too_long"] += 1
                continue
            if too_short[row]:
                counts["num_too_short"] += 1
                continue
            content = tuple(answers[row][answer_mask[row]].tolist())
            if content in seen:
                counts["num_duplicate"] += 1
                continue
            seen.add(content)
            kept.append(row)
        if len(kept) < 2:
            counts["num_too_few"] += 1
            continue
        kept_rewards = rewards[kept]
        best = kept[int(np.argmax(kept_rewards))]  # argmax / argmin return the first extremum
        worst = kept[int(np.argmin(kept_rewards))]
        if rewards[best] == rewards[worst]:
            counts["num_tied"] += 1
            continue
        prompt_index.append(i)
        chosen_index.append(best)
        rejected_index.append(worst)
    chosen_index = np.asarray(chosen_index, np.int64)
    rejected_index = np.asarray(rejected_index, np.int64)
    return PairSelection(
        prompt_index=np.asarray(prompt_index, np.int64),
        chosen_index=chosen_index,
        rejected_index=rejected_index,
        chosen_reward=rewards[chosen_index],
        rejected_reward=rewards[rejected_index],
        num_prompts=rows // n,
        **counts,
    )


class Pairs(NamedTuple):
    """Pairs of rollout rows, as `select_pairs` chose them (a `PairSelection` has these fields too).

    Attributes:
      chosen_index: [M] int rollout row of the better answer.   rejected_index: [M] int.
      chosen_reward: [M] float32.   rejected_reward: [M] float32.
    """

    chosen_index: np.ndarray
    rejected_index: np.ndarray
    chosen_reward: np.ndarray
    rejected_reward: np.ndarray


def differing_groups(round_scores, group_size: int, groups: int) -> tuple[np.ndarray, dict]:
    """DAPO's dynamic-sampling selection (Yu et al. 2025, section 3.2), on the host: from rounds of sampled
    groups, the rows of `groups` groups whose answers do not all score the same (a tie carries no
    gradient under a group baseline), first round first; tied groups of the first round fill what is
    missing.

    Args:
      round_scores: one [B] score array per sampling round, each B a multiple of `group_size` (rows
        [iK, (i + 1)K) of a round are group i).
      group_size: K.
      groups: how many groups the batch holds.

    Returns:
      (rows [groups * K] into the rounds' concatenated rows, stats) with "kept_fraction" (differing groups
      / all groups sampled) and "filled_groups" (tied groups used to fill; 0 once the rounds have enough).
    """
    sizes = [len(s) for s in round_scores]
    if any(n % group_size or n < groups * group_size for n in sizes):
        raise ValueError(
            f"differing_groups: rounds of {sizes} rows; each needs {groups} groups of {group_size}"
        )
    differing, tied, start = [], [], 0
    for r, scores in enumerate(round_scores):
        spread = np.ptp(np.asarray(scores, np.float64).reshape(-1, group_size), axis=1)
        firsts = start + group_size * np.arange(len(spread))
        differing += list(firsts[spread > 0])
        tied += list(firsts[spread == 0]) if r == 0 else []
        start += len(scores)
    chosen = (differing + tied)[:groups]
    rows = (np.asarray(chosen, np.int64)[:, None] + np.arange(group_size)).reshape(-1)
    total = sum(sizes) // group_size
    return rows, {"kept_fraction": len(differing) / total, "filled_groups": max(groups - len(differing), 0)}


def rows_as_rollout(rows) -> Rollout:
    """A host Rollout of written rows ({"prompt", "prompt_mask", "response", "response_mask", "finished",
    ...} NumPy arrays, e.g. an online generate stage's shards)."""
    return Rollout(
        prompt=rows["prompt"], prompt_mask=rows["prompt_mask"], response=rows["response"],
        response_mask=rows["response_mask"], logprobs=np.zeros(rows["response"].shape, np.float32),
        finished=rows["finished"],
    )  # fmt: skip


def build_pref_batch(
    rollout: Rollout,
    selection: Pairs | PairSelection,
    ref_logprobs: np.ndarray,
    num_pairs: int | None = None,
) -> PrefBatch:
    """Pack the selected pairs into a fixed-size `PrefBatch` (host NumPy arrays).

    Each answer is its rollout row unchanged: the left-padded prompt then the response, T = P + R, with
    `loss_mask` True on the response tokens (`response_mask`, the EOS included). Pairs beyond
    `selection.num_pairs` are padding: zero tokens, all-False masks, zero rewards and ref logprobs,
    `pair_mask` False.

    Args:
      rollout: the [B*n]-row rollout the selection was made on.
      selection: the pairs (`select_pairs`'s PairSelection, or Pairs).
      ref_logprobs: [B*n] sequence logprob of every answer under the reference: for REBEL the generating
        policy pi_t, for DPO the frozen reference. Use `rollout_logprobs(ref_params, rollout, cfg)`
        (teacher-forced training forward, the same computation as the step's policy side; exact for
        REBEL's log pi/pi_t) or `sampler_logprobs(rollout)` (free, close but not bit-identical).
      num_pairs: pairs in the batch (fixed, so the jitted step compiles once, e.g. the number of prompts:
        the most pairs a selection can hold); None = the selection's. Must be a multiple of the device
        count to shard.

    Returns:
      PrefBatch with tokens / mask / loss_mask [num_pairs, 2, P + R], ref_logprobs / rewards
      [num_pairs, 2] (index 0 = chosen) and pair_mask [num_pairs].
    """
    tokens = np.asarray(rollout.tokens)
    mask = np.asarray(rollout.mask, bool)
    loss_mask = np.asarray(answer_loss_mask(rollout), bool)
    ref_logprobs = np.asarray(ref_logprobs, np.float32)
    rows = tokens.shape[0]
    if ref_logprobs.shape != (rows,):
        raise ValueError(f"ref_logprobs have shape {ref_logprobs.shape}; expected ({rows},), one per answer.")
    m = len(selection.chosen_index)
    num_pairs = m if num_pairs is None else num_pairs
    if m > num_pairs:
        raise ValueError(f"the selection has {m} pairs but num_pairs={num_pairs}; raise num_pairs.")
    index = np.stack([selection.chosen_index, selection.rejected_index], axis=1)  # [M, 2]
    if not np.all(np.isfinite(ref_logprobs[index])):
        raise ValueError("ref_logprobs are not finite for some selected answer.")

    def pack(x: np.ndarray) -> np.ndarray:
        out = np.zeros((num_pairs, 2, *x.shape[1:]), x.dtype)
        out[:m] = x[index]
        return out

    pair_mask = np.zeros((num_pairs,), bool)
    pair_mask[:m] = True
    rewards = np.zeros((num_pairs, 2), np.float32)
    rewards[:m, 0] = selection.chosen_reward
    rewards[:m, 1] = selection.rejected_reward
    return PrefBatch(
        tokens=pack(tokens.astype(np.int32)),
        mask=pack(mask),
        loss_mask=pack(loss_mask),
        ref_logprobs=pack(ref_logprobs),
        rewards=rewards,
        pair_mask=pair_mask,
    )
