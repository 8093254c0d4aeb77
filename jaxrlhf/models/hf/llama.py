"""Llama 3, Mistral, Qwen 2 / 2.5 and Qwen 3 names in transformers (`LlamaForCausalLM` and its descendants,
and their `*ForSequenceClassification` reward models).

The families share one layout: `model.layers.{i}.` blocks with separate q / k / v / o projections, a gated
MLP (gate / up / down) and RMSNorms, `torch.nn.Linear` weights stored [D_out, D_in] (y = x W^T). They map
onto our stacked [L, D_in, D_out] kernels by a transpose; q, k and v are concatenated into our
[q | k | v] c_attn kernel, gate and up into the SwiGLU c_fc kernel, and the RMSNorm `weight` is our
`scale`. The differences are config switches: GQA (`num_key_value_heads`), Qwen 2's q / k / v biases,
Qwen 3's per-head q / k RMSNorm and explicit `head_dim`, Llama 3.1's "llama3" RoPE scaling, tied or untied
embeddings. Both config spellings are read: `rope_theta` + `rope_scaling` (the hub's files) and
transformers 5's `rope_parameters`.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from jaxrlhf.models.config import ModelConfig
from jaxrlhf.models.hf.convert import Tensor

PREFIX = "model."
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
# The same trunks with a one-label score head instead of the LM head (reward models), and ArmoRM's Llama
# with its gated multi-objective head (`hf.armorm`).
REWARD_ARCHITECTURES = {**{name.replace("ForCausalLM", "ForSequenceClassification"): family
                           for name, family in ARCHITECTURES.items()},
                        "LlamaForRewardModelWithGating": "llama"}  # fmt: skip
SCORE = "score.weight"  # a *ForSequenceClassification's head: [num_labels, D], no bias


def tensors(cfg: ModelConfig) -> list[Tensor]:
    """The name table: our leaf <- transformers tensors, for import and export alike."""
    N, K, H, F = cfg.n_head, cfg.kv_heads, cfg.head_dim, cfg.mlp_dim
    qkv = tuple(f"layers.{{i}}.self_attn.{n}_proj" for n in "qkv")
    table = [
        Tensor(("wte",), ("embed_tokens.weight",)),
        Tensor(("ln_f", "scale"), ("norm.weight",)),
        Tensor(("blocks", "ln_1", "scale"), ("layers.{i}.input_layernorm.weight",)),
        Tensor(("blocks", "ln_2", "scale"), ("layers.{i}.post_attention_layernorm.weight",)),
        Tensor(("blocks", "attn", "c_attn", "kernel"), tuple(f"{n}.weight" for n in qkv), transpose=True,
               split=lambda c: (N * H, K * H, K * H)),
        Tensor(("blocks", "attn", "c_proj", "kernel"), ("layers.{i}.self_attn.o_proj.weight",),
               transpose=True),
        Tensor(("blocks", "mlp", "c_fc", "kernel"),
               ("layers.{i}.mlp.gate_proj.weight", "layers.{i}.mlp.up_proj.weight"), transpose=True,
               split=lambda c: (F, F)),
        Tensor(("blocks", "mlp", "c_proj", "kernel"), ("layers.{i}.mlp.down_proj.weight",), transpose=True),
    ]  # fmt: skip
    if cfg.has_qkv_bias:
        table.append(Tensor(("blocks", "attn", "c_attn", "bias"), tuple(f"{n}.bias" for n in qkv),
                            split=lambda c: (N * H, K * H, K * H)))  # fmt: skip
    if cfg.bias:
        table.append(Tensor(("blocks", "attn", "c_proj", "bias"), ("layers.{i}.self_attn.o_proj.bias",)))
    if cfg.qk_norm:
        table += [Tensor(("blocks", "attn", f"{n}_norm", "scale"),
                         (f"layers.{{i}}.self_attn.{n}_norm.weight",))
                  for n in "qk"]  # fmt: skip
    if not cfg.tie_embeddings:
        table.append(Tensor(("lm_head",), ("lm_head.weight",)))
    return table


def skip(name: str, state: Mapping) -> bool:
    """Tensors of a checkpoint that carry nothing of ours: a tied head's copy of the embeddings (one that
    differs from them contradicts a config that ties them, and is refused)."""
    if name != "lm_head.weight" or "embed_tokens.weight" not in state:
        return False
    if not np.array_equal(state[name](), state["embed_tokens.weight"]()):
        raise ValueError(
            "lm_head.weight differs from embed_tokens.weight, and config.json ties them (tie_word_embeddings "
            "true): the weights and config.json disagree"
        )
    return True


def _rope(get) -> tuple[float, tuple | None]:
    """(rope_theta, our llama3 rope_scaling tuple or None) from either config spelling."""
    params = dict(get("rope_parameters") or {})
    legacy = dict(get("rope_scaling") or {})
    merged = {**legacy, **params}
    theta = float(merged.get("rope_theta", get("rope_theta", 10000.0)))
    kind = merged.get("rope_type", merged.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise ValueError(f"unsupported rope_type {kind!r} (supported: default, llama3).")
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    return theta, (
        float(merged[keys[0]]),
        float(merged[keys[1]]),
        float(merged[keys[2]]),
        int(merged[keys[3]]),
    )


def config_from_hf(hf_config: Mapping) -> ModelConfig:
    """A ModelConfig from a Llama / Mistral / Qwen2 / Qwen3 config.json dict; refuses what we do not
    implement (sliding-window attention, MLP or o_proj biases, other activations or RoPE types)."""
    get = hf_config.get
    by_type = {family: name for name, family in ARCHITECTURES.items()}
    architecture = (get("architectures") or [by_type.get(get("model_type"), get("model_type"))])[0]
    family = ARCHITECTURES.get(architecture, REWARD_ARCHITECTURES.get(architecture))
    if family is None:
        supported = [*ARCHITECTURES, *REWARD_ARCHITECTURES]
        raise ValueError(f"architecture {architecture!r}; supported: {', '.join(supported)}.")
    window = get("sliding_window")
    max_len = int(get("max_position_embeddings", 4096))
    checks = [
        (get("hidden_act", "silu") == "silu", f"hidden_act={get('hidden_act')!r} (need 'silu')"),
        (not get("mlp_bias", False), "mlp_bias=True"),
        (window is None or window >= max_len or not get("use_sliding_window", family == "mistral"),
         f"sliding_window={window} (sliding-window attention is not implemented)"),
    ]  # fmt: skip
    bad = [why for ok, why in checks if not ok]
    if bad:
        raise ValueError(f"unsupported {architecture} config: {'; '.join(bad)}.")
    theta, scaling = _rope(get)
    d, n = int(get("hidden_size")), int(get("num_attention_heads"))
    head = get("head_dim")
    attention_bias = bool(get("attention_bias", False))
    return ModelConfig(
        family=family,
        vocab_size=int(get("vocab_size")),
        block_size=max_len,
        n_layer=int(get("num_hidden_layers")),
        n_head=n,
        n_kv_head=int(get("num_key_value_heads") or n),
        n_embd=d,
        head_size=None if head in (None, d // n) else int(head),
        intermediate_size=int(get("intermediate_size")),
        norm="rmsnorm",
        position="rope",
        rope_theta=theta,
        rope_scaling=scaling,
        mlp="swiglu",
        bias=attention_bias,  # Llama's attention_bias puts biases on q, k, v and o
        qkv_bias=True if family == "qwen2" else None,
        qk_norm=family == "qwen3",
        tie_embeddings=bool(get("tie_word_embeddings", False)),
        ln_eps=float(get("rms_norm_eps", 1e-6)),
        attn_pdrop=float(get("attention_dropout", 0.0)),
    )


def config_to_hf(cfg: ModelConfig, architecture: str, **token_ids) -> dict:
    """The config.json dict transformers reads for `cfg` as `architecture` (bos / eos / pad ids as
    keyword arguments, e.g. eos_token_id=128001)."""
    family = {**ARCHITECTURES, **REWARD_ARCHITECTURES}[architecture]
    if cfg.position != "rope" or cfg.norm != "rmsnorm" or cfg.mlp != "swiglu":
        raise ValueError(f"{architecture} needs position='rope', norm='rmsnorm', mlp='swiglu'.")
    if family == "qwen2" and not (cfg.has_qkv_bias and not cfg.bias):
        raise ValueError(
            "Qwen2ForCausalLM has q / k / v biases and no others: set bias=False, qkv_bias=True."
        )
    if family == "qwen3" and not cfg.qk_norm:
        raise ValueError("Qwen3ForCausalLM has qk-norm: set qk_norm=True.")
    if family in ("llama", "mistral") and (cfg.qk_norm or cfg.has_qkv_bias != cfg.bias):
        raise ValueError(f"{architecture} has no qk-norm and biases on all attention projections or none.")
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        factor, low, high, original = cfg.rope_scaling
        rope = {"rope_type": "llama3", "rope_theta": cfg.rope_theta, "factor": factor, "low_freq_factor": low,
                "high_freq_factor": high, "original_max_position_embeddings": original}  # fmt: skip
    out = {
        "architectures": [architecture],
        "model_type": family,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.block_size,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.kv_heads,
        "hidden_size": cfg.n_embd,
        "head_dim": cfg.head_dim,
        "intermediate_size": cfg.mlp_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.ln_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "rope_theta": cfg.rope_theta,  # both spellings: older readers take these two
        "rope_scaling": None
        if cfg.rope_scaling is None
        else {k: v for k, v in rope.items() if k != "rope_theta"},
        "rope_parameters": rope,
        "sliding_window": None,
        "use_sliding_window": False,
        "dtype": cfg.param_dtype,
        **token_ids,
    }
    if family in ("llama", "qwen3"):
        out["attention_bias"] = cfg.bias
    return out
