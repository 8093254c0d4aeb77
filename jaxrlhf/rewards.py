"""Reward functions: `fn(rollout) -> [B] float32` sequence scores.

Two kinds, used the same way by the RL and preference pipelines:

  host (NumPy): `make_text_reward(tokenizer, vader_scores)` decodes each response and scores the text,
    e.g. VADER sentiment for HappyGPT. Not jittable; call it between the sampler and the update.
  JAX: `make_learned_reward(scalar_params, cfg)` reads a reward model at the last real token. Pure and
    jittable, so a whole RL iteration (sample, score, update) can be one program.

`no_eos_penalty` replaces the score of responses that never emitted end-of-text (InstructGPT-style
"missing EOS" penalty, the same rule as `rl.RLConfig.no_eos_penalty`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf import model, ops
from jaxrlhf.config import ModelConfig
from jaxrlhf.sampling import Rollout
from jaxrlhf.tokenizers import Tokenizer


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


def learned_scores(scalar_params, tokens: jax.Array, mask: jax.Array, cfg: ModelConfig) -> jax.Array:
    """A scalar model read at the last real token of each row: [B, T] -> [B] float32.

    The same rule as `train.sequence_scores` (the reward-model training objective scores this position).
    """
    values = model.scalar_fn(scalar_params, tokens, mask, cfg)  # [B, T]
    return ops.gather_last(values, mask)


def check_scalar_model(scalar_params, cfg: ModelConfig, what: str = "reward model") -> None:
    """Raise a one-line ValueError unless `scalar_params` is a scalar model {"gpt", "head"} whose shapes
    match `cfg` (see `model.check_params`)."""
    if isinstance(scalar_params, Mapping) and "wte" in scalar_params:
        raise ValueError(
            f"the {what} params are LM (GPT) params without a scalar head; a reward model is "
            '{"gpt": params, "head": model.init_scalar_head(...)} trained with train.make_rm_step'
        )
    if not isinstance(scalar_params, Mapping) or not {"gpt", "head"} <= set(scalar_params):
        keys = sorted(scalar_params) if isinstance(scalar_params, Mapping) else type(scalar_params).__name__
        raise ValueError(f"the {what} params are not a scalar model {{'gpt', 'head'}} (got {keys})")
    model.check_params(scalar_params["gpt"], cfg, what=f"{what}'s params")
    kernel = np.shape(scalar_params["head"]["kernel"])
    if kernel != (cfg.n_embd,):
        raise ValueError(
            f"the {what}'s head kernel is {kernel}, expected ({cfg.n_embd},) for n_embd={cfg.n_embd}"
        )


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
    check_scalar_model(scalar_params, cfg)
    if normalise is not None:
        mean, std = normalise
        if not (np.isfinite(mean) and np.isfinite(std) and std > 0):
            raise ValueError(f"normalise={normalise}; use (mean, std) with finite mean and std > 0.")

    def reward_fn(rollout: Rollout) -> jax.Array:
        scores = learned_scores(scalar_params, rollout.tokens, rollout.mask, cfg)  # [B]
        if normalise is not None:
            scores = (scores - mean) / std
        return scores

    return reward_fn


def no_eos_penalty(scores: jax.Array, finished: jax.Array, penalty: float) -> jax.Array:
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
