"""From a policy to scored data: the sampler, what a rollout scores, and preference pairs.

    sampler   SampleConfig, Rollout, sample (one while_loop over a KV cache), policy_logits
    scoring   rule rewards (VADER on decoded text), learned rewards, the no-EOS penalty, REBEL's reward,
              reward-model normalisations
    pairs     n answers per prompt, (best, worst) pair selection, PrefBatch

Imports `jaxrlhf.models` and `jaxrlhf.text` below it.
"""

from jaxrlhf.rollout import pairs, sampler, scoring

# --------------------------------------------------------------------------------------------- sampler
from jaxrlhf.rollout.sampler import Rollout as Rollout
from jaxrlhf.rollout.sampler import SampleConfig as SampleConfig
from jaxrlhf.rollout.sampler import policy_logits as policy_logits
from jaxrlhf.rollout.sampler import sample as sample
from jaxrlhf.rollout.sampler import sample_fn as sample_fn
from jaxrlhf.rollout.sampler import truncate_logits as truncate_logits

# --------------------------------------------------------------------------------------------- scoring
from jaxrlhf.rollout.scoring import make_learned_reward as make_learned_reward
from jaxrlhf.rollout.scoring import make_text_reward as make_text_reward
from jaxrlhf.rollout.scoring import overlong_penalty as overlong_penalty
from jaxrlhf.rollout.scoring import penalise_unfinished as penalise_unfinished
from jaxrlhf.rollout.scoring import rebel_rewards as rebel_rewards
from jaxrlhf.rollout.scoring import vader_scores as vader_scores

# ----------------------------------------------------------------------------------------------- pairs
from jaxrlhf.rollout.pairs import PairSelection as PairSelection
from jaxrlhf.rollout.pairs import PrefBatch as PrefBatch
from jaxrlhf.rollout.pairs import build_pref_batch as build_pref_batch
from jaxrlhf.rollout.pairs import generate_answers as generate_answers
from jaxrlhf.rollout.pairs import rollout_logprobs as rollout_logprobs
from jaxrlhf.rollout.pairs import select_pairs as select_pairs

__all__ = [
    "PairSelection", "PrefBatch", "Rollout", "SampleConfig", "build_pref_batch", "generate_answers",
    "make_learned_reward", "make_text_reward", "overlong_penalty", "pairs", "penalise_unfinished",
    "policy_logits", "rebel_rewards", "rollout_logprobs", "sample", "sample_fn", "sampler", "scoring",
    "select_pairs", "truncate_logits", "vader_scores",
]  # fmt: skip
