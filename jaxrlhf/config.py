"""Frozen, hashable configs. Every static value a jitted function needs lives here.

Configs are `frozen=True, kw_only=True` dataclasses so they can be passed as static arguments to `jax.jit`
and hashed into compilation caches. Never mutate one; use `dataclasses.replace`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import types
import typing
from collections.abc import Callable

import jax.numpy as jnp

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# name -> (n_layer, n_head, n_embd). minGPT names for the small ones, GPT-2 names for the released sizes.
MODEL_PRESETS = {
    "gpt-nano": (3, 3, 48),
    "gpt-micro": (4, 4, 128),
    "gpt-mini": (6, 6, 192),
    "gpt2": (12, 12, 768),
    "gpt2-medium": (24, 16, 1024),
    "gpt2-large": (36, 20, 1280),
    "gpt2-xl": (48, 25, 1600),
}

_LLAMA = dict(norm="rmsnorm", position="rope", mlp="swiglu", bias=False)
_LLAMA3 = dict(_LLAMA, vocab_size=128256, block_size=131072, rope_theta=500000.0, n_kv_head=8, ln_eps=1e-5)
_QWEN = dict(_LLAMA, vocab_size=151936, rope_theta=1000000.0, ln_eps=1e-6)
# name -> every ModelConfig field of a released open model (its Hugging Face config.json).
FAMILY_PRESETS = {
    "llama3.2-1b": dict(_LLAMA3, n_layer=16, n_head=32, n_embd=2048, intermediate_size=8192,
                        rope_scaling=(32.0, 1.0, 4.0, 8192)),
    "llama3.2-3b": dict(_LLAMA3, n_layer=28, n_head=24, n_embd=3072, intermediate_size=8192,
                        rope_scaling=(32.0, 1.0, 4.0, 8192)),
    "llama3.1-8b": dict(_LLAMA3, n_layer=32, n_head=32, n_embd=4096, intermediate_size=14336,
                        rope_scaling=(8.0, 1.0, 4.0, 8192), tie_embeddings=False),
    "mistral-7b-v0.3": dict(_LLAMA, vocab_size=32768, block_size=32768, n_layer=32, n_head=32, n_kv_head=8,
                            n_embd=4096, intermediate_size=14336, rope_theta=1000000.0, tie_embeddings=False),
    "qwen2.5-0.5b": dict(_QWEN, block_size=32768, n_layer=24, n_head=14, n_kv_head=2, n_embd=896,
                         intermediate_size=4864, qkv_bias=True),
    "qwen3-0.6b": dict(_QWEN, block_size=40960, n_layer=28, n_head=16, n_kv_head=8, n_embd=1024,
                       head_size=128, intermediate_size=3072, qk_norm=True),
    # A random Llama-style model for CPU tests and smoke runs: RMSNorm, RoPE, SwiGLU, GQA (4 heads, 2 kv).
    "tiny-llama": dict(_LLAMA, vocab_size=512, block_size=256, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                       intermediate_size=160),
}  # fmt: skip


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """A pre-norm decoder: minGPT / GPT-2 by default, Llama / Mistral / Qwen by its architecture fields.

    Attributes:
      vocab_size: V, number of token ids (GPT-2: 50257).
      block_size: maximum sequence length (size of the position table; RoPE models: the context length).
      n_layer: L, number of transformer blocks.
      n_head: N, attention (query) heads per block.
      n_embd: D, model width.
      mlp_ratio: F = mlp_ratio * D when intermediate_size is None.
      intermediate_size: F, the MLP width, when it is not a multiple of D (Llama, Qwen).
      n_kv_head: K, key / value heads (grouped-query attention: N / K query heads share one); None = N.
      head_size: H, the head dim, when it is not D / N (Qwen3); None = D / N.
      norm: "layernorm" (GPT-2: scale and bias) or "rmsnorm" (Llama, Qwen: scale only).
      position: "learned" (a [block_size, D] table added to the embeddings) or "rope" (rotary embeddings
        on q and k, HF's rotate-half layout).
      rope_theta: RoPE base (Llama 3: 500000; Qwen 2.5: 1000000).
      rope_scaling: Llama 3.1 / 3.2's "llama3" frequency scaling as (factor, low_freq_factor,
        high_freq_factor, original_max_position_embeddings), or None.
      mlp: "gelu" (GPT-2's tanh GELU, c_fc -> c_proj) or "swiglu" (down(silu(gate x) * up x); c_fc holds
        [gate | up]).
      bias: dense layers have biases (GPT-2); False for Llama / Mistral / Qwen.
      qkv_bias: the q / k / v projection has a bias even when `bias` is False (Qwen 2 / 2.5); None = bias.
      qk_norm: RMSNorm over the head dim of q and k before RoPE (Qwen3).
      tie_embeddings: the LM head is wte (GPT-2, Llama 3.2 1B / 3B, Qwen 0.5B); False: its own lm_head.
      embd_pdrop: dropout on token + position embeddings.
      resid_pdrop: dropout on each residual branch.
      attn_pdrop: dropout on attention probabilities.
      ln_eps: layer-norm / RMSNorm epsilon (GPT-2: 1e-5; Llama 3: 1e-5; Qwen: 1e-6).
      param_dtype: dtype params are created and stored in ("float32", "bfloat16").
      compute_dtype: dtype of matmuls and activations; log-softmax, logprobs and heads stay float32.
      remat: rematerialise each block in the backward pass (saves memory on big models).
    """

    vocab_size: int
    block_size: int
    n_layer: int
    n_head: int
    n_embd: int
    mlp_ratio: int = 4
    intermediate_size: int | None = None
    n_kv_head: int | None = None
    head_size: int | None = None
    norm: str = "layernorm"
    position: str = "learned"
    rope_theta: float = 10000.0
    rope_scaling: tuple[float, float, float, int] | None = None
    mlp: str = "gelu"
    bias: bool = True
    qkv_bias: bool | None = None
    qk_norm: bool = False
    tie_embeddings: bool = True
    embd_pdrop: float = 0.0
    resid_pdrop: float = 0.0
    attn_pdrop: float = 0.0
    ln_eps: float = 1e-5
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    remat: bool = False

    def __post_init__(self):
        if self.head_size is None and self.n_embd % self.n_head:
            raise ValueError(
                f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}; pick a width that is "
                "(or set head_size)."
            )
        if self.n_head % self.kv_heads:
            raise ValueError(f"n_head={self.n_head} is not a multiple of n_kv_head={self.n_kv_head}.")
        choices = {
            "norm": ("layernorm", "rmsnorm"),
            "position": ("learned", "rope"),
            "mlp": ("gelu", "swiglu"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}; use one of {', '.join(allowed)}.")
        if self.position == "rope" and self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head dim, not {self.head_dim}.")
        if self.rope_scaling is not None and (self.position != "rope" or len(self.rope_scaling) != 4):
            raise ValueError(
                "rope_scaling is llama3's (factor, low_freq_factor, high_freq_factor, original_max_len) "
                "and needs position='rope'."
            )
        for name in ("param_dtype", "compute_dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ValueError(f"{name}={getattr(self, name)!r}; use one of {sorted(_DTYPES)}.")
        if min(self.vocab_size, self.block_size, self.n_layer) < 1:
            raise ValueError("vocab_size, block_size and n_layer must all be >= 1.")

    @classmethod
    def preset(cls, name: str, **overrides) -> ModelConfig:
        """A named model: a minGPT / GPT-2 size ("gpt-micro", "gpt2", ...; GPT-2 sizes default to V=50257,
        block 1024) or an open model's architecture (FAMILY_PRESETS: "llama3.2-1b", "qwen3-0.6b", ...)."""
        if name in FAMILY_PRESETS:
            return cls(**{**FAMILY_PRESETS[name], **overrides})
        if name not in MODEL_PRESETS:
            names = [*MODEL_PRESETS, *FAMILY_PRESETS]
            raise ValueError(f"unknown model preset {name!r}; choose one of {names}.")
        n_layer, n_head, n_embd = MODEL_PRESETS[name]
        kw = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd)
        if name.startswith("gpt2"):
            kw.update(vocab_size=50257, block_size=1024, embd_pdrop=0.1, resid_pdrop=0.1, attn_pdrop=0.1)
        kw.update(overrides)
        return cls(**kw)

    @property
    def head_dim(self) -> int:
        return self.head_size or self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def has_qkv_bias(self) -> bool:
        return self.bias if self.qkv_bias is None else self.qkv_bias

    @property
    def mlp_dim(self) -> int:
        return self.intermediate_size or self.mlp_ratio * self.n_embd

    @property
    def dtype(self):
        """The compute dtype as a jnp dtype."""
        return _DTYPES[self.compute_dtype]

    @property
    def pdtype(self):
        """The parameter dtype as a jnp dtype."""
        return _DTYPES[self.param_dtype]

    @property
    def num_params(self) -> int:
        """Parameter count (a tied LM head counted once)."""
        d, f, layer, h = self.n_embd, self.mlp_dim, self.n_layer, self.head_dim
        qkv = (self.n_head + 2 * self.kv_heads) * h
        norm = 2 * d if self.norm == "layernorm" else d
        per_block = 2 * norm + d * qkv + self.n_head * h * d + (3 if self.mlp == "swiglu" else 2) * d * f
        if self.bias:
            per_block += d + (2 * f if self.mlp == "swiglu" else f) + d
        if self.has_qkv_bias:
            per_block += qkv
        if self.qk_norm:
            per_block += 2 * h
        embeddings = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        positions = self.block_size * d if self.position == "learned" else 0
        return embeddings + positions + layer * per_block + norm

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token (2 per MAC), attention included (PaLM appendix B)."""
        lookups = self.block_size * self.n_embd if self.position == "learned" else 0
        if not self.tie_embeddings:
            lookups += self.vocab_size * self.n_embd  # wte is a lookup; the untied lm_head is the matmul
        n_matmul = self.num_params - lookups
        return 2 * n_matmul + 2 * self.n_layer * seq_len * self.n_head * self.head_dim


@dataclasses.dataclass(frozen=True, kw_only=True)
class SampleConfig:
    """How `jaxrlhf.sampling.sample` draws a response.

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
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def stops(self) -> tuple[int, ...]:
        """Every id a sequence stops after: eos_id (when set) and stop_ids, sorted."""
        return tuple(sorted({*self.stop_ids, *(() if self.eos_id is None else (self.eos_id,))}))


# ----------------------------------------------------------------------------------------- validation


def check_at_least(cfg, minimum: float, *names: str) -> None:
    """Raise `name=value; it must be >= minimum` for the first of `cfg`'s fields `names` below `minimum`."""
    for name in names:
        value = getattr(cfg, name)
        if value is not None and value < minimum:
            raise ValueError(f"{name}={value}; it must be >= {minimum}")


_FIELD_MESSAGE = re.compile(r"^(\w+)=(.*)$", re.DOTALL)


def flag_message(message: str, cls: type, flag: Callable[[str], str]) -> str:
    """A config error as its command-line flag says it.

    Configs word an error about one field as `field=value; what to do`; for a field of the dataclass `cls`
    this becomes `--flag value; what to do`, with `flag(field)` the flag's spelling (e.g. "--rl.top_k").
    Other messages are returned as they are.
    """
    match = _FIELD_MESSAGE.match(message)
    if match and match[1] in {f.name for f in dataclasses.fields(cls)}:
        return f"{flag(match[1])} {match[2]}"
    return message


def parse_bool(text: str) -> bool:
    """A boolean flag value: 1/true/yes/on or 0/false/no/off (any case); anything else is refused."""
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def flag_parser(annotation) -> Callable[[str], object]:
    """The command-line parser of a config field's annotation: int, float, str, bool (`parse_bool`), or
    `X | None` ("none" / "null" give None). Shared by every pipeline's flags-from-dataclasses parser."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (types.UnionType, typing.Union) and type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        parse = flag_parser(inner)
        return lambda text: None if text.strip().lower() in ("none", "null") else parse(text)
    if annotation is bool:
        return parse_bool
    if annotation in (int, float, str):
        return annotation
    raise TypeError(f"no flag parser for annotation {annotation!r}")
