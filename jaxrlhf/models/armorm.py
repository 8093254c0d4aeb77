"""ArmoRM's head (RLHFlow's `LlamaForRewardModelWithGating`): 19 per-objective rewards mixed by a gate
that reads the prompt, as pure functions of the trunk's final hidden states.

The published model (https://huggingface.co/RLHFlow/ArmoRM-Llama3-8B-v0.1, `modeling_custom.py`) scores a
right-padded batch of whole conversations with the Llama decoder's hidden states H (after the final norm):

    rewards  r = W H[t]                      t: the last real token; W [K, D] `regression_layer.weight`
    gate     g = s * softmax(u / tau)        u = MLP(H[p]): `gating_n_hidden` ReLU layers of width
                                             `gating_hidden_dim`, then a linear layer to K (all with
                                             biases); s `gating.logit_scale`, tau `gating_temperature`
    score    sum_j g_j (r M)_j               M [K, K] `reward_transform_matrix`, as stored

p is the first position of the LAST occurrence of the assistant header pattern
`<|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n` (Llama 3 ids `ASSISTANT_PATTERN`): a causal
state that has seen the prompt and nothing of the answer. Here t and p are read from the mask (real
tokens only), so left- and right-padded rows score alike; on right-padded rows that is the published
model's reading.

The head's params (`hf.load_reward_model` builds them) sit beside the trunk as {"gpt": trunk, "armorm":
head}:

    regression [D, K]   gating {"layers": [{"kernel" [in, out], "bias" [out]}, ...], "logit_scale" [],
    transform [K, K]            "temperature" []}           pattern [P] int32 (the gate's token ids)

all float32 but the pattern. A row without the pattern has no gate: under jit its score and gate are NaN;
called eagerly (concrete tokens), the row is refused in one line (`check_gating_pattern`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf import ops

HEAD = "armorm"  # the head's key beside "gpt" in a reward model's params
# The reward model's objectives, in the order of its 19 rewards (the model card's attribute list).
OBJECTIVES = (
    "helpsteer-helpfulness", "helpsteer-correctness", "helpsteer-coherence", "helpsteer-complexity",
    "helpsteer-verbosity", "ultrafeedback-overall_score", "ultrafeedback-instruction_following",
    "ultrafeedback-truthfulness", "ultrafeedback-honesty", "ultrafeedback-helpfulness",
    "beavertails-is_safe", "prometheus-score", "argilla-overall_quality", "argilla-judge_lm",
    "code-complexity", "code-style", "code-explanation", "code-instruction-following", "code-readability",
)  # fmt: skip
# `<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n` in Llama 3's tokenizer: the constant
# modeling_custom.py searches for (it does not read them from the config or the tokenizer).
ASSISTANT_PATTERN = (128009, 128006, 78191, 128007, 271)
PATTERN_TEXT = "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n"


class ArmoOutputs(NamedTuple):
    """score [B], rewards [B, K] (r, before the transform), gating [B, K] (g, summing to logit_scale);
    float32."""

    score: jax.Array
    rewards: jax.Array
    gating: jax.Array


def is_armorm(params) -> bool:
    """Whether `params` is an ArmoRM reward model {"gpt", "armorm"} (static under jit: a tree key)."""
    return isinstance(params, Mapping) and HEAD in params


def gating_positions(tokens: jax.Array, mask: jax.Array, pattern) -> tuple[jax.Array, jax.Array]:
    """(p [B] int32, found [B] bool): the start of the last occurrence of `pattern` ([P] ids) among the real
    tokens of each row (all P positions real and consecutive); p = 0 where it does not occur."""
    B, T = tokens.shape
    P = len(pattern) if isinstance(pattern, Sequence) else pattern.shape[0]
    if T < P:
        return jnp.zeros((B,), jnp.int32), jnp.zeros((B,), bool)
    n = T - P + 1
    mask = mask.astype(bool)
    hit = jnp.ones((B, n), bool)
    for i in range(P):  # P is a handful of ids: P shifted compares of [B, n]
        hit = hit & (tokens[:, i : i + n] == pattern[i]) & mask[:, i : i + n]
    last = jnp.max(jnp.where(hit, jnp.arange(n, dtype=jnp.int32), -1), axis=-1)
    return jnp.maximum(last, 0), last >= 0


def gate(gating: Mapping, x: jax.Array) -> jax.Array:
    """The gating network on prompt states x [B, D]: logit_scale * softmax(MLP(x) / temperature), [B, K]."""
    layers = gating["layers"]
    for layer in layers[:-1]:
        x = jax.nn.relu(x @ layer["kernel"] + layer["bias"])
    u = x @ layers[-1]["kernel"] + layers[-1]["bias"]
    return gating["logit_scale"] * jax.nn.softmax(u / gating["temperature"], axis=-1)


def head_outputs(head: Mapping, hidden: jax.Array, tokens: jax.Array, mask: jax.Array) -> ArmoOutputs:
    """ArmoRM's outputs from the trunk's final hidden states [B, T, D] (`models.armorm_outputs` runs the
    trunk first). Rows without the gating pattern get NaN score and gate."""
    mask = mask.astype(bool)
    check_if_concrete(head, tokens, mask)
    rewards = ops.gather_last(hidden, mask).astype(jnp.float32) @ head["regression"]  # [B, K]
    pos, found = gating_positions(tokens, mask, head["pattern"])
    prompt_state = jnp.take_along_axis(hidden, pos[:, None, None], axis=1)[:, 0].astype(jnp.float32)
    g = jnp.where(found[:, None], gate(head["gating"], prompt_state), jnp.nan)  # [B, K]
    score = jnp.sum(g * (rewards @ head["transform"]), axis=-1)
    return ArmoOutputs(score, rewards, g)


def check_gating_pattern(params: Mapping, tokens, mask) -> None:
    """Refuse, in one line, rows of (tokens, mask) [B, T] without the gate's token pattern among their real
    tokens. `params`: the reward model {"gpt", "armorm"} or its head.

    Raises:
      ValueError: how many rows lack it, the first one, the pattern, and the fix.
    """
    head = params[HEAD] if is_armorm(params) else params
    pattern = tuple(int(i) for i in np.asarray(head["pattern"]))
    _, found = gating_positions(np.asarray(tokens), np.asarray(mask), np.asarray(pattern))
    missing = np.flatnonzero(~np.asarray(found))
    if missing.size:
        what = f" ({PATTERN_TEXT} in Llama 3)" if pattern == ASSISTANT_PATTERN else ""
        raise ValueError(
            f"{missing.size} of {len(found)} sequences (row {missing[0]} first) have no assistant turn for "
            f"ArmoRM's gate: the token pattern {list(pattern)}{what} does not occur among their real "
            "tokens; score whole conversations rendered with the reward model's chat template"
        )


def check_if_concrete(params: Mapping, tokens, mask) -> None:
    """`check_gating_pattern` where tokens, mask and pattern are concrete (an eager call); nothing under
    jit, where a row without the pattern scores NaN instead."""
    head = params[HEAD] if is_armorm(params) else params
    if not any(isinstance(x, jax.core.Tracer) for x in (tokens, mask, head["pattern"])):
        check_gating_pattern(head, tokens, mask)
