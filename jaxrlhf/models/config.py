"""The model config and the one table of named models.

`ModelConfig` is a frozen, hashable dataclass: every static value the model's jitted functions need, so
it can be a static argument of `jax.jit`. Never mutate one; use `dataclasses.replace`. The architecture
is a set of plain fields (norm, position, mlp, heads, biases, qk-norm, tied head): GPT-2, Llama 3,
Mistral and Qwen are one decoder with other switches, and a new family is a few fields plus a name table
in `models.hf` (docs/models.md, "Adding a family").
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jaxrlhf.validate import check_at_least, check_choice, check_positive, check_range

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
FAMILIES = ("gpt2", "llama", "mistral", "qwen2", "qwen3")

_GPT2 = dict(vocab_size=50257, block_size=1024, embd_pdrop=0.1, resid_pdrop=0.1, attn_pdrop=0.1)
_LLAMA = dict(norm="rmsnorm", position="rope", mlp="swiglu", bias=False, family="llama")
_LLAMA3 = dict(_LLAMA, vocab_size=128256, block_size=131072, rope_theta=500000.0, n_kv_head=8, ln_eps=1e-5)
_QWEN = dict(_LLAMA, vocab_size=151936, rope_theta=1000000.0, ln_eps=1e-6)
# name -> ModelConfig fields. minGPT's small GPTs leave vocab_size and block_size to the caller; the
# released models' entries are their Hugging Face config.json.
PRESETS = {
    "gpt-nano": dict(n_layer=3, n_head=3, n_embd=48),
    "gpt-micro": dict(n_layer=4, n_head=4, n_embd=128),
    "gpt-mini": dict(n_layer=6, n_head=6, n_embd=192),
    # A random 2-layer GPT for CPU tests and smoke runs of the pipelines (vocab_size from the tokenizer).
    "tiny": dict(n_layer=2, n_head=2, n_embd=32, block_size=1024),
    "gpt2": dict(_GPT2, n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(_GPT2, n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(_GPT2, n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(_GPT2, n_layer=48, n_head=25, n_embd=1600),
    "llama3.2-1b": dict(_LLAMA3, n_layer=16, n_head=32, n_embd=2048, intermediate_size=8192,
                        rope_scaling=(32.0, 1.0, 4.0, 8192)),
    "llama3.2-3b": dict(_LLAMA3, n_layer=28, n_head=24, n_embd=3072, intermediate_size=8192,
                        rope_scaling=(32.0, 1.0, 4.0, 8192)),
    "llama3.1-8b": dict(_LLAMA3, n_layer=32, n_head=32, n_embd=4096, intermediate_size=14336,
                        rope_scaling=(8.0, 1.0, 4.0, 8192), tie_embeddings=False),
    "mistral-7b-v0.3": dict(_LLAMA, family="mistral", vocab_size=32768, block_size=32768, n_layer=32,
                            n_head=32, n_kv_head=8, n_embd=4096, intermediate_size=14336,
                            rope_theta=1000000.0, tie_embeddings=False),
    "qwen2.5-0.5b": dict(_QWEN, family="qwen2", block_size=32768, n_layer=24, n_head=14, n_kv_head=2,
                         n_embd=896, intermediate_size=4864, qkv_bias=True),
    "qwen3-0.6b": dict(_QWEN, family="qwen3", block_size=40960, n_layer=28, n_head=16, n_kv_head=8,
                       n_embd=1024, head_size=128, intermediate_size=3072, qk_norm=True),
    # A random Llama-style model for CPU tests and smoke runs: RMSNorm, RoPE, SwiGLU, GQA (4 heads, 2 kv).
    "tiny-llama": dict(_LLAMA, vocab_size=512, block_size=256, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                       intermediate_size=160),
}  # fmt: skip
# minGPT's small GPTs: random inits sized to a pipeline's own (character) vocabulary (HappyGPT, arithmetic).
SMALL_GPTS = ("gpt-nano", "gpt-micro", "gpt-mini", "tiny")
# The presets whose weights a pipeline can download by name (the hub's GPT-2 checkpoints).
HUB_PRESETS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")


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
      family: the Hugging Face class the weights are named and exported as ("gpt2", "llama", "mistral",
        "qwen2", "qwen3"); None: the one the switches imply (qk-norm: qwen3, q / k / v biases only:
        qwen2, other RoPE models: llama, learned positions: gpt2).
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
    family: str | None = None

    def __post_init__(self):
        check_at_least(
            self,
            1,
            "vocab_size",
            "block_size",
            "n_layer",
            "n_head",
            "n_embd",
            "mlp_ratio",
            "intermediate_size",
            "n_kv_head",
            "head_size",
        )
        if self.head_size is None and self.n_embd % self.n_head:
            raise ValueError(
                f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}; pick a width that is "
                "(or set head_size)."
            )
        if self.n_head % self.kv_heads:
            raise ValueError(f"n_head={self.n_head} is not a multiple of n_kv_head={self.n_kv_head}.")
        for name, allowed in (
            ("norm", ("layernorm", "rmsnorm")),
            ("position", ("learned", "rope")),
            ("mlp", ("gelu", "swiglu")),
            ("param_dtype", tuple(_DTYPES)),
            ("compute_dtype", tuple(_DTYPES)),
        ):
            check_choice(self, name, allowed)
        if self.family is not None:
            check_choice(self, "family", FAMILIES)
        if self.position == "rope" and self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head dim, not {self.head_dim}.")
        if self.rope_scaling is not None and (self.position != "rope" or len(self.rope_scaling) != 4):
            raise ValueError(
                "rope_scaling is llama3's (factor, low_freq_factor, high_freq_factor, original_max_len) "
                "and needs position='rope'."
            )
        check_positive(self, "rope_theta", "ln_eps")
        for name in ("embd_pdrop", "resid_pdrop", "attn_pdrop"):
            check_range(self, name, 0.0, 1.0, high_open=True)

    @classmethod
    def preset(cls, name: str, **overrides) -> ModelConfig:
        """A named model of `PRESETS` ("gpt-micro", "gpt2", "llama3.2-1b", ...) with fields overridden (a
        minGPT size needs vocab_size and block_size)."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}.")
        return cls(**{**PRESETS[name], **overrides})

    @property
    def hf_family(self) -> str:
        """`family`, or the family the architecture switches imply."""
        if self.family is not None:
            return self.family
        if self.position == "learned":
            return "gpt2"
        if self.qk_norm:
            return "qwen3"
        return "qwen2" if self.has_qkv_bias and not self.bias else "llama"

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
