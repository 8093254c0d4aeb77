"""What a rollout scores: reward functions `fn(rollout) -> [B] float32`, the no-EOS penalty, REBEL's
reward, and the normalisations of a reward model's scores.

Two kinds of reward, used the same way by the RL and preference stages:

  host (NumPy): `make_text_reward(tokenizer, vader_scores)` decodes each response and scores the text,
    e.g. VADER sentiment for HappyGPT. Not jittable; call it between the sampler and the update.
  JAX: `make_learned_reward(scalar_params, cfg)` reads a reward model at the last real token. Pure and
    jittable, so a whole RL iteration (sample, score, update) can be one program.

`penalise_unfinished` replaces the score of responses that never emitted end-of-text (InstructGPT-style
"missing EOS" penalty): the one rule every stage applies (`train.RLConfig.no_eos_penalty`,
`rebel_rewards`, the policy stage's evaluation). `overlong_penalty` is DAPO's soft length penalty
(`train.RLConfig.overlong_cache`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf.models import ModelConfig, transformer
from jaxrlhf.rollout.sampler import Rollout
from jaxrlhf.text import Tokenizer


@functools.cache
def _vader_analyzer():
    """The VADER analyzer, built once per process (it reads its lexicon from disk)."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def vader_scores(texts: Sequence[str]) -> np.ndarray:
    """VADER compound sentiment of each text (Hutto & Gilbert 2014), in [-1, 1]; 0 for an empty text.

    Args:
      texts: B strings.

    Returns:
      [B] float32 NumPy array of compound scores (> 0.05 is conventionally "positive").
    """
    if isinstance(texts, str):
        raise ValueError("vader_scores takes a list of texts, not one string; wrap it in a list.")
    analyzer = _vader_analyzer()
    return np.asarray([analyzer.polarity_scores(t)["compound"] for t in texts], np.float32).reshape(-1)


def make_text_reward(
    tokenizer: Tokenizer, score_texts: Callable[[list[str]], np.ndarray]
) -> Callable[[Rollout], np.ndarray]:
    """A host reward that decodes each response and scores its text.

    The text of a row is its response tokens where `response_mask` is True, up to and excluding the
    first stop id (`tokenizer.stop_ids`: its EOS, and a chat model's end-of-turn); the prompt is not scored.

    Args:
      tokenizer: decodes response ids (its `stop_ids` should be the sampler's `SampleConfig.stops`).
      score_texts: B texts -> [B] scores, e.g. `vader_scores`.

    Returns:
      fn(rollout) -> [B] float32 NumPy scores; a score_texts output of the wrong length or with a
      non-finite value is a ValueError.
    """

    def reward_fn(rollout: Rollout) -> np.ndarray:
        response = np.asarray(rollout.response)
        texts = tokenizer.decode_batch(response, np.asarray(rollout.response_mask), stop_at_eos=True)
        scores = np.asarray(score_texts(texts), np.float32)
        if scores.shape != (response.shape[0],):
            raise ValueError(
                f"score_texts returned shape {scores.shape} for {response.shape[0]} texts; "
                "it must return one score per text."
            )
        if not np.all(np.isfinite(scores)):
            bad = np.flatnonzero(~np.isfinite(scores))
            raise ValueError(f"score_texts returned non-finite scores at rows {bad[:10].tolist()}.")
        return scores

    return reward_fn


def make_learned_reward(
    scalar_params, cfg: ModelConfig, *, normalise: tuple[float, float] | None = None
) -> Callable[[Rollout], jax.Array]:
    """A pure JAX reward: the reward model's score of prompt + response.

    Args:
      scalar_params: a scalar model {"gpt", "head"} (a trained reward model).
      cfg: its model config.
      normalise: optional (mean, std): scores become (score - mean) / std, e.g. the statistics of the
        reward model on SFT samples (Ziegler et al. 2019 normalise rewards to mean 0, std 1).

    Returns:
      fn(rollout) -> [B] float32 jax array, jittable (params are closed over as constants; pass them
      through a jitted caller's arguments instead if they change between calls).

    Raises:
      ValueError: `scalar_params` are LM params (no scalar head) or not a scalar model, or `cfg` does not
        match their shapes (vocab_size, n_embd, n_layer, mlp_ratio, block_size; the field is named).
        n_head leaves no trace in the weights' shapes, so it is not checked: take it from the config the
        reward model was trained with.
    """
    transformer.check_scalar_model(scalar_params, cfg)
    if normalise is not None:
        mean, std = normalise
        if not (np.isfinite(mean) and np.isfinite(std) and std > 0):
            raise ValueError(f"normalise={normalise}; use (mean, std) with finite mean and std > 0.")

    def reward_fn(rollout: Rollout) -> jax.Array:
        scores = transformer.sequence_scores(scalar_params, rollout.tokens, rollout.mask, cfg)  # [B]
        if normalise is not None:
            scores = (scores - mean) / std
        return scores

    return reward_fn


def overlong_penalty(lengths: jax.Array, max_len: int, cache: int) -> jax.Array:
    """DAPO's soft overlong punishment (Yu et al. 2025, "DAPO", eq. 13), added to a response's score:

      0                              for |y| <= L_max - L_cache,
      ((L_max - L_cache) - |y|) / L_cache   for L_max - L_cache < |y| <= L_max,
      -1                             for |y| > L_max,

    a linear ramp from 0 to -1 over the last `cache` tokens allowed (TRL's
    get_soft_overlong_punishment(max_completion_len, soft_punish_cache) is the same function).

    Args:
      lengths: [B] response lengths |y| in tokens.
      max_len: L_max, the most tokens a response may have (the sampler's max_new_tokens).
      cache: L_cache, 1 <= cache <= max_len.

    Returns:
      [B] float32 in [-1, 0].
    """
    if not 1 <= cache <= max_len:
        raise ValueError(f"overlong_penalty: cache={cache}; use 1 <= cache <= max_len={max_len}")
    lengths = jnp.asarray(lengths, jnp.float32)
    ramp = ((max_len - cache) - lengths) / cache
    return jnp.where(lengths > max_len, -1.0, jnp.minimum(ramp, 0.0)).astype(jnp.float32)


def penalise_unfinished(scores: jax.Array, finished: jax.Array, penalty: float) -> jax.Array:
    """Scores with every unfinished response's score replaced by `penalty`.

    Args:
      scores: [B] sequence scores.
      finished: [B] bool, True where the response emitted a stop id (`Rollout.finished`: eos_id or stop_ids).
      penalty: the score an unfinished response gets (e.g. -1.0 for VADER's [-1, 1] range).

    Returns:
      [B] float32 (a jax array; works on NumPy inputs too).
    """
    scores = jnp.asarray(scores, jnp.float32)
    return jnp.where(jnp.asarray(finished, bool), scores, jnp.float32(penalty))


def rebel_rewards(
    scores: jax.Array,
    finished: jax.Array,
    policy_logprobs: jax.Array,
    sft_logprobs: jax.Array,
    *,
    kl_coef: float = 0.0,
    no_eos_penalty: float | None = None,
) -> jax.Array:
    """The REBEL authors' reward (ZhaolinGao/REBEL `src/tldr/rebel.py`): the score, replaced by a fixed
    `no_eos_penalty` for an answer that never emitted end-of-text, minus kl_coef x its sequence KL to the
    SFT reference, log pi_t(y) - log pi_sft(y) (the k1 estimate at the sampled answer).

      r(y) = (score(y) if finished(y) else no_eos_penalty) - kl_coef [log pi_t(y) - log pi_sft(y)]

    Their defaults: kl_coef 0.05; penalty -1 on TL;DR, -4 on UltraFeedback and Nectar.

    Args:
      scores: [B*n] sequence scores.
      finished: [B*n] bool, True where the answer emitted end-of-text (`Rollout.finished`).
      policy_logprobs: [B*n] sequence logprobs under pi_t, the policy that sampled (the same values as
        the PrefBatch's `ref_logprobs`, e.g. `rollout_logprobs(state.params, rollout, cfg)`).
      sft_logprobs: [B*n] sequence logprobs under the frozen SFT reference.
      kl_coef: weight of the KL term (0 = none).
      no_eos_penalty: the score of an unfinished answer; None = keep its score.

    Returns:
      [B*n] float32 rewards, to select pairs on and regress onto.
    """
    scores = jnp.asarray(scores, jnp.float32)
    if no_eos_penalty is not None:
        scores = penalise_unfinished(scores, finished, no_eos_penalty)
    kl = jnp.asarray(policy_logprobs, jnp.float32) - jnp.asarray(sft_logprobs, jnp.float32)
    return scores - kl_coef * kl


# -------------------------------------------------------------------------------- normalisations


def normalised_scores(rm_params, rollout: Rollout, cfg: ModelConfig, norm: dict) -> jax.Array:
    """gain * (RM score of prompt + response at its last real token) + bias: [B] float32."""
    scores = transformer.sequence_scores(rm_params, rollout.tokens, rollout.mask, cfg)
    return norm["gain"] * scores + norm["bias"]


def value_from_reward_model(rm_params, norm: dict):
    """The reward model with gain * score + bias folded into its linear head."""
    head = rm_params["head"]
    kernel = head["kernel"] * norm["gain"]
    bias = head["bias"] * norm["gain"] + norm["bias"]
    return {"gpt": rm_params["gpt"], "head": {"kernel": kernel, "bias": bias}}


def reference_norm(kind: str, reference: dict) -> dict:
    """The normalisation of reward_norm "reference_mean" or "none", from the RM stage's
    statistics of reference-row scores ({"mean", "std", "rows"})."""
    bias = -reference["mean"] if kind == "reference_mean" else 0.0
    return {"kind": kind, "gain": 1.0, "bias": float(bias), "reference": reference}
