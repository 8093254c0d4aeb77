"""Autoregressive sampling: one `lax.while_loop` over a KV cache.

`sample(params, prompt, prompt_mask, model_cfg, sample_cfg, *, key)` encodes a left-padded prompt once
(prefill), then draws one token per step for every row until each row has emitted a stop id (`eos_id` or one
of `stop_ids`, e.g. a chat model's end-of-turn) or the response budget R is spent, exiting early when every
row is done. Shapes are static: a second call with the same shapes reuses the compiled program.

The returned `logprobs` are those of the sampled tokens under the tempered policy, log_softmax(logits / T)
before top-k / top-p filtering (`policy_logits`), i.e. exactly what a teacher-forced forward of the same
sequence gives at the same temperature, which is what RL losses optimise (as lm-human-preferences and TRL
do). With top-k / top-p the tokens are drawn from the filtered distribution, so an update on these logprobs
is slightly off-policy; `rl` reports how far (the KL between the two) and can use the filtered ones instead.

The response mask is derived after the loop rather than written each step; the XLA:CPU tunings of the
loop (top-k / top-p from an int32-key sort, pre-broadcast decode biases, pre-drawn noise) are named helpers
in `jaxrlhf.xla_cpu`.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf import ops, xla_cpu
from jaxrlhf.models import ModelConfig, kv_cache, transformer


@dataclasses.dataclass(frozen=True, kw_only=True)
class SampleConfig:
    """How `sample` draws a response.

    Attributes:
      max_new_tokens: R, the response length budget (static shape of the response).
      temperature: softmax temperature; 0 means greedy argmax.
      top_k: keep only the k most likely tokens (0 = off).
      top_p: nucleus sampling, keep the smallest set with mass >= top_p (1.0 = off).
      eos_id: end-of-text id; a sequence stops after emitting it (None = never stops early).
      stop_ids: more ids a sequence stops after, e.g. a chat model's end-of-turn (`HFTokenizer.stop_ids`:
        Llama 3 Instruct ends a turn with <|eot_id|> and a text with <|end_of_text|>). Stored sorted and
        deduplicated.
      pad_id: id written into response slots after a sequence has stopped.
    """

    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    eos_id: int | None = None
    stop_ids: tuple[int, ...] = ()
    pad_id: int = 0

    def __post_init__(self):
        ids = self.stop_ids
        if isinstance(ids, int | str) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise ValueError(f"stop_ids={ids!r}; pass a tuple of token ids (ints), e.g. tokenizer.stop_ids.")
        if any(i < 0 for i in ids):
            raise ValueError(f"stop_ids={ids!r}; token ids are >= 0.")
        object.__setattr__(self, "stop_ids", tuple(sorted(set(ids))))  # hashable, one spelling per set
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens}; it must be >= 1.")
        if self.temperature < 0 or not math.isfinite(self.temperature):
            raise ValueError(f"temperature={self.temperature}; use a finite value >= 0 (0 = greedy).")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k}; use 0 (off) or a positive k.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p}; use a value in (0, 1] (1 = off).")

    @property
    def filters(self) -> bool:
        """Whether top-k or top-p truncates the distribution tokens are drawn from."""
        return bool(self.top_k or self.top_p < 1.0)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def stops(self) -> tuple[int, ...]:
        """Every id a sequence stops after: eos_id (when set) and stop_ids, sorted."""
        return tuple(sorted({*self.stop_ids, *(() if self.eos_id is None else (self.eos_id,))}))


@flax.struct.dataclass
class Rollout:
    """A batch of sampled responses.

    Attributes:
      prompt: [B, P] int32 prompt ids (left-padded).
      prompt_mask: [B, P] bool.
      response: [B, R] int32 sampled ids; `pad_id` after a row stopped.
      response_mask: [B, R] bool, True up to and including the first stop token (eos_id or stop_ids).
      logprobs: [B, R] float32 log pi_T(response_t | prefix) of the tempered, unfiltered policy
        (`policy_logits`; temperature 1 when greedy); 0 where masked.
      finished: [B] bool, True where the row emitted a stop token (eos_id or one of stop_ids).
    """

    prompt: jax.Array
    prompt_mask: jax.Array
    response: jax.Array
    response_mask: jax.Array
    logprobs: jax.Array
    finished: jax.Array

    @property
    def tokens(self) -> jax.Array:
        """[B, P + R] prompt followed by response."""
        return jnp.concatenate([self.prompt, self.response], axis=1)

    @property
    def mask(self) -> jax.Array:
        """[B, P + R] bool mask of real tokens."""
        return jnp.concatenate([self.prompt_mask, self.response_mask], axis=1)

    @property
    def response_length(self) -> jax.Array:
        """[B] int32 number of real response tokens."""
        return jnp.sum(self.response_mask, axis=-1, dtype=jnp.int32)


def policy_logits(logits: jax.Array, cfg: SampleConfig, *, filtered: bool = False) -> jax.Array:
    """The logits of the policy `sample` draws from, as RL scores and optimises it: [..., V] float32.

    logits / T (T = 1 when greedy); with `filtered`, top-k / top-p applied too (`truncate_logits`), the
    exact distribution tokens are drawn from. log_softmax of either is a normalised log-policy.
    """
    logits = logits.astype(jnp.float32)
    logits = logits if cfg.greedy else logits / cfg.temperature
    return truncate_logits(logits, cfg) if filtered else logits


def truncate_logits(logits: jax.Array, cfg: SampleConfig) -> jax.Array:
    """Top-k and top-p (no temperature) applied to [..., V] logits; removed entries get finfo.min."""
    shape = logits.shape
    return _truncate_rows(logits.astype(jnp.float32).reshape(-1, shape[-1]), cfg).reshape(shape)


def _truncate_rows(logits: jax.Array, cfg: SampleConfig) -> jax.Array:  # [B, V] -> [B, V]
    """Top-k keeps every entry >= the k-th largest value (ties with it are all kept, so more than k may
    survive); top-p the smallest set of largest entries whose mass reaches top_p. NaN logits are not
    ordered (a NaN row samples garbage either way)."""
    neg = jnp.finfo(jnp.float32).min
    if cfg.top_k and cfg.top_k < logits.shape[-1]:
        logits = jnp.where(logits < xla_cpu.kth_largest(logits, cfg.top_k), neg, logits)
    if cfg.top_p < 1.0:
        sorted_logits = xla_cpu.sort_descending(logits)  # [B, V]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        # The smallest prefix with mass >= top_p: keep a token while the mass before it is < top_p.
        kept = jnp.where(mass_before < cfg.top_p, sorted_logits, jnp.inf)
        threshold = jnp.min(kept, axis=-1, keepdims=True)  # [B, 1]
        logits = jnp.where(logits < threshold, neg, logits)
    return logits


class _LoopState(flax.struct.PyTreeNode):
    step: jax.Array  # [] int32
    done: jax.Array  # [B] bool
    response: jax.Array  # [B, R]
    logprobs: jax.Array  # [B, R]
    logits: jax.Array  # [B, V] next-token logits
    cache: kv_cache.KVCache
    key: jax.Array


def _check_static(prompt, prompt_mask, model_cfg: ModelConfig, cfg: SampleConfig) -> None:
    """One-line errors from shapes and the configs alone (trace time: no cost in the compiled program)."""
    V = model_cfg.vocab_size
    for name in ("eos_id", "pad_id"):
        value = getattr(cfg, name)
        if value is not None and not 0 <= value < V:
            never = " (a sequence would never stop)" if name == "eos_id" else ""
            raise ValueError(
                f"{name}={value} is outside the vocabulary [0, {V}){never}; use the tokenizer's id"
            )
    outside = [i for i in cfg.stop_ids if i >= V]
    if outside:
        raise ValueError(
            f"stop_ids has {outside[0]}, outside the vocabulary [0, {V}) (a sequence would never stop on "
            "it); use the tokenizer's ids (tokenizer.stop_ids)"
        )
    if len(prompt.shape) != 2 or tuple(prompt_mask.shape) != tuple(prompt.shape):
        raise ValueError(
            f"prompt {tuple(prompt.shape)} and prompt_mask {tuple(prompt_mask.shape)} must both be [B, P]"
        )
    if prompt.shape[0] == 0:
        raise ValueError("the prompt batch is empty (B = 0); pass at least one prompt row")
    if prompt.shape[1] == 0:
        raise ValueError("the prompts have no tokens (P = 0); start each row with a real token, e.g. eos_id")


def check_prompt_ids(prompt, prompt_mask, vocab_size: int) -> None:
    """Raise a one-line error if a real token of a concrete prompt is outside [0, vocab_size) (the embedding
    lookup would clamp it silently). Traced or not fully addressable prompts are not checked."""
    arrays = (prompt, prompt_mask)
    if any(isinstance(x, jax.core.Tracer) or not getattr(x, "is_fully_addressable", True) for x in arrays):
        return
    ids = np.asarray(prompt)[np.asarray(prompt_mask, bool)]
    bad = ids[(ids < 0) | (ids >= vocab_size)]
    if bad.size:
        raise ValueError(
            f"prompt ids {sorted(set(bad.tolist()))[:5]} are outside the vocabulary [0, {vocab_size}); "
            "encode the prompts with the model's tokenizer"
        )


def _sample_impl(params, prompt, prompt_mask, model_cfg: ModelConfig, cfg: SampleConfig, key):
    _check_static(prompt, prompt_mask, model_cfg, cfg)
    B, P = prompt.shape
    R = cfg.max_new_tokens
    prompt_mask = prompt_mask.astype(bool)
    params = kv_cache.unstack_blocks(params)
    hidden, cache = kv_cache.prefill(params, prompt, prompt_mask, model_cfg, P + R)
    logits = transformer.lm_logits(params, hidden[:, -1], model_cfg)  # [B, V]

    step_params = kv_cache.decoding_params(params, B)

    def cond(s: _LoopState):
        return (s.step < R) & ~jnp.all(s.done)

    V = model_cfg.vocab_size
    # Gumbel-max sampling, its noise drawn before the loop when small (xla_cpu.predraw_gumbel).
    noise = None if cfg.greedy else xla_cpu.predraw_gumbel(key, R, B, V)
    predraw = noise is not None

    def body(s: _LoopState):
        key, k_tok = jax.random.split(s.key) if not predraw else (s.key, None)
        tempered = policy_logits(s.logits, cfg)  # [B, V]: its logprobs are recorded
        filtered = truncate_logits(tempered, cfg)  # what the token is drawn from
        if cfg.greedy:
            token = jnp.argmax(filtered, axis=-1)
        elif predraw:
            token = jnp.argmax(filtered + noise[s.step], axis=-1)
        else:
            token = jax.random.categorical(k_tok, filtered, axis=-1)
        token = token.astype(jnp.int32)
        live = ~s.done
        token = jnp.where(live, token, cfg.pad_id)
        logprob = jnp.where(live, ops.token_logprobs(tempered, token), 0.0)
        done = s.done
        for stop in cfg.stops:  # eos_id and stop_ids; one compare each (no stops: never done early)
            done = done | (token == stop)
        response = jax.lax.dynamic_update_slice(s.response, token[:, None], (0, s.step))
        logprobs = jax.lax.dynamic_update_slice(s.logprobs, logprob[:, None], (0, s.step))
        hidden, cache = kv_cache.decode_step(step_params, token, s.cache, model_cfg, live)
        logits = transformer.lm_logits(step_params, hidden, model_cfg)
        return _LoopState(s.step + 1, done, response, logprobs, logits, cache, key)

    init = _LoopState(
        step=jnp.zeros((), jnp.int32),
        done=jnp.zeros((B,), bool),
        response=jnp.full((B, R), cfg.pad_id, jnp.int32),
        logprobs=jnp.zeros((B, R), jnp.float32),
        logits=logits,
        cache=cache,
        key=key,
    )
    out = jax.lax.while_loop(cond, body, init)
    # A row is live at step t iff it emitted no stop before t: derived once here rather than written each
    # step (one op fewer per step). Steps an early exit skipped all come after every row's stop.
    is_stop = jnp.zeros((B, R), bool)
    for stop in cfg.stops:
        is_stop = is_stop | (out.response == stop)
    stops_before = jnp.cumsum(is_stop, axis=-1, dtype=jnp.int32) - is_stop  # [B, R]
    response_mask = stops_before == 0
    return Rollout(prompt, prompt_mask, out.response, response_mask, out.logprobs, out.done)


_sample_jit = jax.jit(_sample_impl, static_argnums=(3, 4))


def check_left_padded(prompt_mask) -> None:
    """Raise a one-line error unless every row of a concrete mask is left-padded and non-empty."""
    if isinstance(prompt_mask, jax.core.Tracer):
        return
    # On the host when the mask is all here: a few jnp ops would cost a dispatch and a sync each call.
    fully_here = getattr(prompt_mask, "is_fully_addressable", True)
    xp = np if fully_here else jnp
    m = np.asarray(prompt_mask, bool) if fully_here else jnp.asarray(prompt_mask, bool)
    if not bool(xp.all(m[:, -1])) or bool(xp.any(m[:, :-1] & ~m[:, 1:])):
        raise ValueError(
            "prompt_mask must be left-padded with a real last token in every row; pad prompts on the "
            "left (e.g. CharTokenizer.encode_batch(..., pad='left'))."
        )


def sample(
    params,
    prompt: jax.Array,
    prompt_mask: jax.Array,
    model_cfg: ModelConfig,
    cfg: SampleConfig,
    *,
    key: jax.Array,
) -> Rollout:
    """Sample up to `cfg.max_new_tokens` tokens after each prompt.

    Args:
      params: GPT params.
      prompt: [B, P] int ids, left-padded.
      prompt_mask: [B, P] bool, True = real token.
      model_cfg: the model config (static).
      cfg: sampling config (static): temperature (0 = greedy), top_k, top_p, eos_id, stop_ids, pad_id.
      key: PRNG key; the same key gives the same rollout.

    Returns:
      Rollout with response / response_mask / logprobs of shape [B, R].

    Raises:
      ValueError: an empty batch, prompt ids (real tokens of a concrete prompt) or eos_id / stop_ids /
        pad_id outside the vocabulary, params that do not match model_cfg, or a prompt that is not
        left-padded.
    """
    _check_static(prompt, prompt_mask, model_cfg, cfg)
    transformer.check_params(params, model_cfg)
    if prompt.shape[1] + cfg.max_new_tokens > model_cfg.block_size:
        raise ValueError(
            f"prompt length {prompt.shape[1]} + max_new_tokens {cfg.max_new_tokens} exceeds "
            f"block_size={model_cfg.block_size}; shorten the prompt or the response budget."
        )
    check_left_padded(prompt_mask)
    check_prompt_ids(prompt, prompt_mask, model_cfg.vocab_size)
    if isinstance(prompt, jax.core.Tracer) or isinstance(key, jax.core.Tracer):
        return _sample_impl(params, prompt, prompt_mask, model_cfg, cfg, key)
    return _sample_jit(params, prompt, prompt_mask, model_cfg, cfg, key)


sample_fn = functools.partial(_sample_impl)  # the un-jitted body, for composing into a larger jitted program
