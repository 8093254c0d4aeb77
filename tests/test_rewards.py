"""jaxrlhf.rewards: VADER on decoded responses, the learned reward, the no-EOS penalty."""

import _helpers  # noqa: E402  (tests/)
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from jaxrlhf import models
from jaxrlhf.rollout import Rollout, scoring
from jaxrlhf.text import CharTokenizer

TOL = dict(rtol=1e-5, atol=1e-5)


random_params = _helpers.random_params


def test_vader_scores_known_strings():
    texts = ["I love you", "I hate this", "", "The table is brown."]
    scores = scoring.vader_scores(texts)
    assert scores.dtype == np.float32 and scores.shape == (4,)
    assert scores[0] > 0.5
    assert scores[1] < 0.0
    assert scores[2] == 0.0 and scores[3] == 0.0
    analyzer = SentimentIntensityAnalyzer()
    expected = [analyzer.polarity_scores(t)["compound"] for t in texts]
    np.testing.assert_allclose(scores, expected, **TOL)
    assert scoring.vader_scores([]).shape == (0,)
    with pytest.raises(ValueError, match="list of texts"):
        scoring.vader_scores("I love you")


def _hand_rollout(tok: CharTokenizer) -> Rollout:
    """Three rows: finished, unfinished, EOS-only; junk characters after the mask must be ignored."""
    eos = tok.eos
    rows = [("I love you" + eos, "hate"), ("I hate this", "love!"), (eos, "love you")]
    R = 16
    response = np.zeros((3, R), np.int32)
    response_mask = np.zeros((3, R), bool)
    for b, (real, junk) in enumerate(rows):
        ids = tok.encode(real + junk)
        response[b, : len(ids)] = ids
        response_mask[b, : len(real)] = True
    prompt = np.asarray([tok.encode("ab")] * 3, np.int32)
    return Rollout(
        prompt=prompt,
        prompt_mask=np.ones(prompt.shape, bool),
        response=response,
        response_mask=response_mask,
        logprobs=np.zeros((3, R), np.float32),
        finished=np.asarray([True, False, True]),
    )


def test_text_reward_scores_the_response_up_to_eos():
    tok = CharTokenizer.from_corpus(["I love you", "I hate this!", "ab"])
    rollout = _hand_rollout(tok)
    seen = []

    def record(texts):
        seen.extend(texts)
        return scoring.vader_scores(texts)

    scores = scoring.make_text_reward(tok, record)(rollout)
    assert seen == ["I love you", "I hate this", ""]
    np.testing.assert_array_equal(scores, scoring.vader_scores(seen))
    assert scores.dtype == np.float32 and scores[0] > 0.5 and scores[1] < 0 and scores[2] == 0


def test_text_reward_rejects_bad_scores():
    tok = CharTokenizer.from_corpus(["I love you", "I hate this!", "ab"])
    rollout = _hand_rollout(tok)
    with pytest.raises(ValueError, match="one score per text"):
        scoring.make_text_reward(tok, lambda texts: np.zeros(len(texts) + 1))(rollout)
    with pytest.raises(ValueError, match=r"non-finite scores at rows \[1\]"):
        scoring.make_text_reward(tok, lambda texts: np.asarray([0.0, np.nan, 1.0]))(rollout)


def test_learned_reward_is_the_scalar_model_at_the_last_real_token(tiny_cfg):
    rng = np.random.default_rng(0)
    head = {
        "kernel": jnp.asarray(rng.standard_normal(tiny_cfg.n_embd), jnp.float32),
        "bias": jnp.float32(0.3),
    }
    scalar = {"gpt": random_params(tiny_cfg, 1), "head": head}
    prompt = rng.integers(1, tiny_cfg.vocab_size, (4, 5)).astype(np.int32)
    prompt_mask = np.ones((4, 5), bool)
    prompt_mask[1, :2] = prompt_mask[3, :4] = False
    response = rng.integers(0, tiny_cfg.vocab_size, (4, 8)).astype(np.int32)
    response_mask = np.arange(8) < np.asarray([8, 3, 1, 5])[:, None]  # [4, 8], True through "EOS"
    rollout = Rollout(
        prompt=prompt,
        prompt_mask=prompt_mask,
        response=response,
        response_mask=response_mask,
        logprobs=np.zeros((4, 8), np.float32),
        finished=response_mask[:, -1] == 0,
    )
    # Reference: each row's real tokens moved to the front of an all-real row. Causal attention makes the
    # junk after them irrelevant, so position len - 1 holds the unpadded row's score: no padding masks.
    tokens, mask = np.asarray(rollout.tokens), np.asarray(rollout.mask)
    packed = np.zeros_like(tokens)
    lengths = mask.sum(-1)
    for row in range(4):
        packed[row, : lengths[row]] = tokens[row][mask[row]]
    scalar_fn = jax.jit(models.scalar_fn, static_argnums=3)
    values = np.asarray(scalar_fn(scalar, packed, np.ones(packed.shape, bool), tiny_cfg))
    expected = np.asarray([values[row, lengths[row] - 1] for row in range(4)])

    scores = jax.jit(scoring.make_learned_reward(scalar, tiny_cfg))(rollout)
    assert scores.shape == (4,) and scores.dtype == jnp.float32
    np.testing.assert_allclose(scores, expected, **TOL)
    np.testing.assert_allclose(
        scores,
        jax.jit(models.sequence_scores, static_argnums=3)(scalar, rollout.tokens, rollout.mask, tiny_cfg),
        **TOL,
    )
    assert np.std(expected) > 1e-3  # rows really differ, so a wrong position would be caught

    normalised = jax.jit(scoring.make_learned_reward(scalar, tiny_cfg, normalise=(0.5, 2.0)))(rollout)
    np.testing.assert_allclose(normalised, (expected - 0.5) / 2.0, **TOL)
    with pytest.raises(ValueError, match="std > 0"):
        scoring.make_learned_reward(scalar, tiny_cfg, normalise=(0.0, 0.0))


def test_no_eos_penalty_replaces_unfinished_scores():
    scores = np.asarray([0.5, -0.2, 0.9], np.float32)
    finished = np.asarray([True, False, False])
    out = scoring.penalise_unfinished(scores, finished, -1.0)
    np.testing.assert_array_equal(out, [0.5, -1.0, -1.0])
    jitted = jax.jit(scoring.penalise_unfinished)(jnp.asarray(scores), jnp.asarray(finished), -3.0)
    np.testing.assert_array_equal(jitted, [0.5, -3.0, -3.0])
