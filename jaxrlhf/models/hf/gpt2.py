"""GPT-2's names in transformers (`GPT2LMHeadModel`, `GPT2Model`, `GPT2ForSequenceClassification`).

Blocks live under `transformer.h.{i}.`; the dense layers are `Conv1D`, whose weight is already [D_in, D_out]
(y = x W + b), so they map onto our stacked kernels with no transpose, and the fused c_attn splits into
q, k, v in our order. LayerNorm `weight` is our `scale`. The LM head is tied to `wte` (an `lm_head.weight`
equal to it is accepted and skipped); the `attn.bias` / `attn.masked_bias` buffers of older files (a causal
mask and a constant) carry nothing.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from jaxrlhf.models.config import ModelConfig
from jaxrlhf.models.hf.convert import Tensor

FAMILY = "gpt2"
PREFIX = "transformer."  # GPT2LMHeadModel's trunk; the hub's bare GPT2Model files have none
ARCHITECTURES = {"GPT2LMHeadModel": "gpt2", "GPT2Model": "gpt2"}
REWARD_ARCHITECTURES = {"GPT2ForSequenceClassification": "gpt2"}
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # = jax.nn.gelu(approximate=True)
_BUFFERS = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")

_LN = ("scale", "weight"), ("bias", "bias")


def tensors(cfg: ModelConfig) -> list[Tensor]:
    """The name table: our leaf <- transformers tensor, for import and export alike."""
    table = [
        Tensor(("wte",), ("wte.weight",)),
        Tensor(("wpe",), ("wpe.weight",), rows=lambda c: c.block_size),
        Tensor(("ln_f", "scale"), ("ln_f.weight",)),
        Tensor(("ln_f", "bias"), ("ln_f.bias",)),
    ]
    for ln in ("ln_1", "ln_2"):
        table += [Tensor(("blocks", ln, ours), (f"h.{{i}}.{ln}.{theirs}",)) for ours, theirs in _LN]
    for part in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
        path = ("blocks", *part.split("."))
        table += [
            Tensor((*path, "kernel"), (f"h.{{i}}.{part}.weight",)),
            Tensor((*path, "bias"), (f"h.{{i}}.{part}.bias",)),
        ]
    return table


def skip(name: str, state: Mapping) -> bool:
    """Tensors that carry nothing of ours: the attention buffers, and a head tied to wte."""
    if _BUFFERS.fullmatch(name):
        return True
    if name == "lm_head.weight":
        lm_head, wte = state[name](), state["wte.weight"]() if "wte.weight" in state else None
        if wte is None or not np.array_equal(lm_head, wte):
            raise ValueError(
                "lm_head.weight differs from wte.weight; only tied GPT-2 LM heads are supported."
            )
        return True
    return False


def config_from_hf(hf_config: Mapping) -> ModelConfig:
    """A ModelConfig from a GPT-2 config.json dict; refuses what this decoder does not implement."""
    get = hf_config.get
    d = get("n_embd", 768)
    checks = [
        (get("model_type", "gpt2") == "gpt2", f"model_type={get('model_type')!r} (need 'gpt2')"),
        (get("activation_function", "gelu_new") in _TANH_GELUS,
         f"activation_function={get('activation_function')!r} (need one of {_TANH_GELUS})"),
        (get("n_inner") is None or get("n_inner") % d == 0,
         f"n_inner={get('n_inner')} (need None or a multiple of n_embd={d})"),
        (get("scale_attn_weights", True), "scale_attn_weights=False"),
        (not get("scale_attn_by_inverse_layer_idx", False), "scale_attn_by_inverse_layer_idx=True"),
        (not get("add_cross_attention", False), "add_cross_attention=True"),
        (get("tie_word_embeddings", True), "tie_word_embeddings=False"),
    ]  # fmt: skip
    bad = [why for ok, why in checks if not ok]
    if bad:
        raise ValueError(f"unsupported GPT-2 config: {'; '.join(bad)}.")
    return ModelConfig(
        vocab_size=get("vocab_size", 50257),
        block_size=get("n_positions", 1024),
        n_layer=get("n_layer", 12),
        n_head=get("n_head", 12),
        n_embd=d,
        mlp_ratio=4 if get("n_inner") is None else get("n_inner") // d,
        embd_pdrop=get("embd_pdrop", 0.1),
        resid_pdrop=get("resid_pdrop", 0.1),
        attn_pdrop=get("attn_pdrop", 0.1),
        ln_eps=get("layer_norm_epsilon", 1e-5),
    )


def config_to_hf(cfg: ModelConfig, architecture: str = "GPT2LMHeadModel", **token_ids) -> dict:
    """The config.json dict that transformers reads for `cfg`. `eos_token_id` is GPT-2's bos and eos (one
    id); None means 50256 for the 50257-token GPT-2 vocabulary and null otherwise (transformers' default
    50256 would not exist)."""
    unknown = set(token_ids) - {"eos_token_id", "bos_token_id", "pad_token_id"}
    if unknown:
        raise ValueError(f"{sorted(unknown)} are not token ids of a GPT-2 config.json")
    if cfg.position != "learned" or cfg.norm != "layernorm" or cfg.mlp != "gelu" or not cfg.bias:
        raise ValueError("GPT-2 needs position='learned', norm='layernorm', mlp='gelu' and biases")
    if not cfg.tie_embeddings or cfg.mlp_dim % cfg.n_embd or cfg.kv_heads != cfg.n_head or cfg.head_size:
        raise ValueError("GPT-2 has a tied LM head, an MLP width a multiple of n_embd and no GQA / head_size")
    eos = token_ids.get("eos_token_id")
    if eos is None and cfg.vocab_size == 50257:
        eos = 50256
    return {
        "architectures": [architecture],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.block_size,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_embd": cfg.n_embd,
        "n_inner": None if cfg.mlp_dim == 4 * cfg.n_embd else cfg.mlp_dim,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": cfg.ln_eps,
        "embd_pdrop": cfg.embd_pdrop,
        "resid_pdrop": cfg.resid_pdrop,
        "attn_pdrop": cfg.attn_pdrop,
        "tie_word_embeddings": True,
        "bos_token_id": token_ids.get("bos_token_id", eos),
        "eos_token_id": eos,
        "pad_token_id": token_ids.get("pad_token_id"),
        "dtype": cfg.param_dtype,
    }
