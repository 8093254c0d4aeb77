"""Llama 3, Mistral, Qwen 2 / 2.5 and Qwen 3 weights <-> Hugging Face `transformers` state dicts.

The families share one layout in transformers (`LlamaForCausalLM` and its descendants): `model.layers.{i}.`
blocks with separate q / k / v / o projections, a gated MLP (gate / up / down) and RMSNorms, `torch.nn.Linear`
weights stored [D_out, D_in] (y = x W^T). They map onto our stacked [L, D_in, D_out] kernels by a transpose;
q, k and v are fused into our [q | k | v] c_attn kernel, gate and up into the SwiGLU c_fc kernel, and the
RMSNorm `weight` is our `scale`. The differences are config switches: GQA (`num_key_value_heads`), Qwen 2's
q / k / v biases, Qwen 3's per-head q / k RMSNorm and explicit `head_dim`, Llama 3.1's "llama3" RoPE scaling,
tied or untied embeddings. Both config spellings are read: `rope_theta` + `rope_scaling` (the hub's files)
and transformers 5's `rope_parameters`.

The pure functions here do the mapping on NumPy arrays; transformers itself is never imported.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np

from jaxrlhf.config import ModelConfig
from jaxrlhf.model import Params

ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
_PREFIX = "model."


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
    family = ARCHITECTURES.get(architecture)
    if family is None:
        raise ValueError(f"architecture {architecture!r}; supported: {', '.join(ARCHITECTURES)}.")
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


def config_to_hf(cfg: ModelConfig, architecture: str = "LlamaForCausalLM", **token_ids) -> dict:
    """The config.json dict transformers reads for `cfg` as `architecture` (bos / eos / pad ids as
    keyword arguments, e.g. eos_token_id=128001)."""
    family = ARCHITECTURES[architecture]
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


def _block_names(cfg: ModelConfig) -> dict[tuple[str, ...], str]:
    names = {
        ("ln_1", "scale"): "input_layernorm.weight",
        ("ln_2", "scale"): "post_attention_layernorm.weight",
        ("mlp", "c_proj", "kernel"): "mlp.down_proj.weight",
        ("attn", "c_proj", "kernel"): "self_attn.o_proj.weight",
    }
    if cfg.bias:
        names[("attn", "c_proj", "bias")] = "self_attn.o_proj.bias"
    if cfg.qk_norm:
        names[("attn", "q_norm", "scale")] = "self_attn.q_norm.weight"
        names[("attn", "k_norm", "scale")] = "self_attn.k_norm.weight"
    return names


def params_from_hf(state: Mapping[str, np.ndarray], cfg: ModelConfig) -> Params:
    """Our param tree (float32 NumPy leaves) from a transformers state dict of NumPy arrays (`model.`-prefixed
    names, or bare LlamaModel names). Missing or misshapen tensors raise, naming them."""
    state = {(k[len(_PREFIX) :] if k.startswith(_PREFIX) else k): v for k, v in state.items()}
    L, N, K, H = cfg.n_layer, cfg.n_head, cfg.kv_heads, cfg.head_dim

    def get(name, shape):
        if name not in state:
            raise ValueError(
                f"the checkpoint has no tensor {name!r} (a {cfg.n_layer}-layer {cfg.norm} model)"
            )
        x = np.asarray(state[name], np.float32)
        if x.shape != shape:
            raise ValueError(f"tensor {name!r} has shape {x.shape}; the config expects {shape}")
        return x

    def stack(fn):
        return np.stack([fn(f"layers.{i}.") for i in range(L)])

    def kernel(name, dout, din):
        return stack(lambda p: get(p + name, (dout, din)).T)  # [L, din, dout]

    D, F = cfg.n_embd, cfg.mlp_dim
    qkv = [("q_proj", N * H), ("k_proj", K * H), ("v_proj", K * H)]
    attn = {
        "c_attn": {
            "kernel": np.concatenate([kernel(f"self_attn.{n}.weight", o, D) for n, o in qkv], axis=-1)
        },
        "c_proj": {"kernel": kernel("self_attn.o_proj.weight", D, N * H)},
    }
    if cfg.has_qkv_bias:
        biases = [stack(lambda p, n=n, o=o: get(p + f"self_attn.{n}.bias", (o,))) for n, o in qkv]
        attn["c_attn"]["bias"] = np.concatenate(biases, axis=-1)
    if cfg.bias:
        attn["c_proj"]["bias"] = stack(lambda p: get(p + "self_attn.o_proj.bias", (D,)))
    if cfg.qk_norm:
        attn["q_norm"] = {"scale": stack(lambda p: get(p + "self_attn.q_norm.weight", (H,)))}
        attn["k_norm"] = {"scale": stack(lambda p: get(p + "self_attn.k_norm.weight", (H,)))}
    gate_up = [kernel("mlp.gate_proj.weight", F, D), kernel("mlp.up_proj.weight", F, D)]
    params = {
        "wte": get("embed_tokens.weight", (cfg.vocab_size, D)),
        "blocks": {
            "ln_1": {"scale": stack(lambda p: get(p + "input_layernorm.weight", (D,)))},
            "attn": attn,
            "ln_2": {"scale": stack(lambda p: get(p + "post_attention_layernorm.weight", (D,)))},
            "mlp": {"c_fc": {"kernel": np.concatenate(gate_up, axis=-1)},
                    "c_proj": {"kernel": kernel("mlp.down_proj.weight", D, F)}},
        },
        "ln_f": {"scale": get("norm.weight", (D,))},
    }  # fmt: skip
    if not cfg.tie_embeddings:
        name = "lm_head.weight" if "lm_head.weight" in state else "embed_tokens.weight"
        params["lm_head"] = get(name, (cfg.vocab_size, D))
    return params


def hf_from_params(params: Params, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """The transformers state dict (float32 NumPy, `model.`-prefixed, plus lm_head.weight) of our params."""
    p = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
    b = p["blocks"]
    N, K, H, F = cfg.n_head, cfg.kv_heads, cfg.head_dim, cfg.mlp_dim
    splits = [N * H, (N + K) * H]
    out = {"model.embed_tokens.weight": p["wte"], "model.norm.weight": p["ln_f"]["scale"]}
    out["lm_head.weight"] = p["wte"] if cfg.tie_embeddings else p["lm_head"]
    for i in range(cfg.n_layer):
        pre = f"model.layers.{i}."
        q, k, v = np.split(b["attn"]["c_attn"]["kernel"][i], splits, axis=-1)
        for name, w in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
            out[pre + f"self_attn.{name}.weight"] = np.ascontiguousarray(w.T)
        if cfg.has_qkv_bias:
            for name, w in zip(
                ("q_proj", "k_proj", "v_proj"), np.split(b["attn"]["c_attn"]["bias"][i], splits), strict=True
            ):
                out[pre + f"self_attn.{name}.bias"] = w
        out[pre + "self_attn.o_proj.weight"] = np.ascontiguousarray(b["attn"]["c_proj"]["kernel"][i].T)
        if cfg.bias:
            out[pre + "self_attn.o_proj.bias"] = b["attn"]["c_proj"]["bias"][i]
        if cfg.qk_norm:
            out[pre + "self_attn.q_norm.weight"] = b["attn"]["q_norm"]["scale"][i]
            out[pre + "self_attn.k_norm.weight"] = b["attn"]["k_norm"]["scale"][i]
        gate, up = np.split(b["mlp"]["c_fc"]["kernel"][i], [F], axis=-1)
        out[pre + "mlp.gate_proj.weight"] = np.ascontiguousarray(gate.T)
        out[pre + "mlp.up_proj.weight"] = np.ascontiguousarray(up.T)
        out[pre + "mlp.down_proj.weight"] = np.ascontiguousarray(b["mlp"]["c_proj"]["kernel"][i].T)
        out[pre + "input_layernorm.weight"] = b["ln_1"]["scale"][i]
        out[pre + "post_attention_layernorm.weight"] = b["ln_2"]["scale"][i]
    return out
