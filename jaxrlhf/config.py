"""Frozen, hashable configs. Every static value a jitted function needs lives here.

Configs are `frozen=True, kw_only=True` dataclasses so they can be passed as static arguments to `jax.jit`
and hashed into compilation caches. Never mutate one; use `dataclasses.replace`.
"""

from __future__ import annotations

import dataclasses
import math
import re
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


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """A minGPT / GPT-2 decoder.

    Attributes:
      vocab_size: V, number of token ids (GPT-2: 50257).
      block_size: maximum sequence length (size of the position table).
      n_layer: L, number of transformer blocks.
      n_head: N, attention heads per block.
      n_embd: D, model width; head dim H = D / N.
      mlp_ratio: F = mlp_ratio * D.
      embd_pdrop: dropout on token + position embeddings.
      resid_pdrop: dropout on each residual branch.
      attn_pdrop: dropout on attention probabilities.
      ln_eps: layer-norm epsilon (GPT-2: 1e-5).
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
    embd_pdrop: float = 0.0
    resid_pdrop: float = 0.0
    attn_pdrop: float = 0.0
    ln_eps: float = 1e-5
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    remat: bool = False

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(
                f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}; pick a width that is."
            )
        for name in ("param_dtype", "compute_dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ValueError(f"{name}={getattr(self, name)!r}; use one of {sorted(_DTYPES)}.")
        if min(self.vocab_size, self.block_size, self.n_layer) < 1:
            raise ValueError("vocab_size, block_size and n_layer must all be >= 1.")

    @classmethod
    def preset(cls, name: str, **overrides) -> ModelConfig:
        """A named size ("gpt-micro", "gpt2", ...); GPT-2 sizes default to V=50257, block 1024."""
        if name not in MODEL_PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {list(MODEL_PRESETS)}.")
        n_layer, n_head, n_embd = MODEL_PRESETS[name]
        kw = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd)
        if name.startswith("gpt2"):
            kw.update(vocab_size=50257, block_size=1024, embd_pdrop=0.1, resid_pdrop=0.1, attn_pdrop=0.1)
        kw.update(overrides)
        return cls(**kw)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mlp_dim(self) -> int:
        return self.mlp_ratio * self.n_embd

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
        """Parameter count (tied LM head counted once)."""
        d, f, layer = self.n_embd, self.mlp_dim, self.n_layer
        per_block = 4 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * f + f) + (f * d + d)
        return self.vocab_size * d + self.block_size * d + layer * per_block + 2 * d

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token (2 per MAC), attention included (PaLM appendix B)."""
        n_matmul = self.num_params - self.block_size * self.n_embd
        return 2 * n_matmul + 2 * self.n_layer * seq_len * self.n_embd


@dataclasses.dataclass(frozen=True, kw_only=True)
class SampleConfig:
    """How `jaxrlhf.sampling.sample` draws a response.

    Attributes:
      max_new_tokens: R, the response length budget (static shape of the response).
      temperature: softmax temperature; 0 means greedy argmax.
      top_k: keep only the k most likely tokens (0 = off).
      top_p: nucleus sampling, keep the smallest set with mass >= top_p (1.0 = off).
      eos_id: end-of-text id; a sequence stops after emitting it (None = never stops early).
      pad_id: id written into response slots after a sequence has stopped.
    """

    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    eos_id: int | None = None
    pad_id: int = 0

    def __post_init__(self):
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
