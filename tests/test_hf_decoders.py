"""Llama 3 / Mistral / Qwen 2 / Qwen 3 as jaxrlhf's one decoder: parity with tiny random `transformers`
models built here (nothing downloaded), the released models' parameter counts, and the KV cache under
RoPE + grouped-query attention."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from jaxrlhf import hf_decoders, model, ops  # noqa: E402
from jaxrlhf.config import ModelConfig  # noqa: E402

T, LENGTHS = 10, (10, 6, 1, 3)
COMMON = dict(
    vocab_size=97, hidden_size=32, intermediate_size=56, num_hidden_layers=2, max_position_embeddings=64
)
FAMILIES = {
    # GQA 4 / 2, Llama 3.1's rope scaling (original length 16, so all three frequency bands occur), untied.
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, dict(
        num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False, sliding_window=None,
        head_dim=8, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    # q / k / v biases, tied embeddings.
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    # qk-norm, head_dim 16 != hidden / heads = 8, tied.
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
}  # fmt: skip


def _hf_model(family):
    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(0)
    m = model_cls(config_cls(**COMMON, **extra))
    # Randomise every tensor (norm scales around 1, the rest N(0, 0.2)) so that a misrouted weight, bias
    # or norm moves the logits.
    with torch.no_grad():
        for name, p in m.named_parameters():
            base = 1.0 if name.endswith("norm.weight") else 0.0
            p.copy_(base + 0.2 * torch.randn_like(p))
    return m.eval()


def _batch():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, COMMON["vocab_size"], (len(LENGTHS), T)).astype(np.int32)
    mask = np.zeros((len(LENGTHS), T), bool)
    for i, n in enumerate(LENGTHS):  # rows 0-1 left-padded, rows 2-3 right-padded
        mask[i, T - n :] = True if i < 2 else False
        if i >= 2:
            mask[i, :n] = True
    return tokens, mask


def _hf_logits(m, tokens, mask):
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        out = m(
            input_ids=torch.tensor(tokens, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
            position_ids=torch.tensor(positions, dtype=torch.long),
        )
    return out.logits.numpy()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_match_transformers(family):
    m = _hf_model(family)
    cfg = hf_decoders.config_from_hf(m.config.to_dict())
    assert cfg.n_kv_head == FAMILIES[family][2]["num_key_value_heads"] and cfg.position == "rope"
    state = {k: v.numpy() for k, v in m.state_dict().items()}
    params = jax.tree.map(jnp.asarray, hf_decoders.params_from_hf(state, cfg))
    tokens, mask = _batch()
    ours = np.asarray(jax.jit(model.logits_fn, static_argnums=3)(params, tokens, mask, cfg))
    theirs = _hf_logits(m, tokens, mask)
    np.testing.assert_allclose(ours[mask], theirs[mask], rtol=1e-4, atol=1e-4)
    assert np.abs(theirs[mask]).max() > 1.0  # logits far from uniform: the comparison has teeth
    # Export: the state dict we write loads into a fresh transformers model with the same logits.
    back = hf_decoders.hf_from_params(params, cfg)
    config = type(m.config)(**hf_decoders.config_to_hf(cfg, type(m).__name__))
    fresh = type(m)(config).eval()
    missing, unexpected = fresh.load_state_dict({k: torch.tensor(v) for k, v in back.items()}, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    np.testing.assert_allclose(_hf_logits(fresh, tokens, mask)[mask], theirs[mask], rtol=1e-5, atol=1e-5)


def test_llama3_rope_scaling_matters():
    """The scaled frequencies are what transformers uses: dropping the scaling moves the logits."""
    m = _hf_model("llama")
    cfg = hf_decoders.config_from_hf(m.config.to_dict())
    assert cfg.rope_scaling == (8.0, 1.0, 4.0, 16)
    state = {k: v.numpy() for k, v in m.state_dict().items()}
    params = hf_decoders.params_from_hf(state, cfg)
    tokens, mask = _batch()
    plain = ModelConfig(**{**cfg.__dict__, "rope_scaling": None})
    logits = jax.jit(model.logits_fn, static_argnums=3)
    a, b = np.asarray(logits(params, tokens, mask, cfg)), np.asarray(logits(params, tokens, mask, plain))
    assert np.abs(a[mask] - b[mask]).max() > 1e-2


def test_unsupported_configs_are_refused():
    base = transformers.MistralConfig(**COMMON, num_attention_heads=4, num_key_value_heads=2).to_dict()
    with pytest.raises(ValueError, match="sliding-window attention is not implemented"):
        hf_decoders.config_from_hf({**base, "sliding_window": 8})
    with pytest.raises(ValueError, match="architecture 'GemmaForCausalLM'"):
        hf_decoders.config_from_hf({**base, "architectures": ["GemmaForCausalLM"]})
    with pytest.raises(ValueError, match="unsupported rope_type 'yarn'"):
        hf_decoders.config_from_hf({**base, "sliding_window": None, "rope_parameters": {"rope_type": "yarn"}})
    cfg = hf_decoders.config_from_hf({**base, "sliding_window": None})
    with pytest.raises(ValueError, match="has no tensor 'layers.1.input_layernorm.weight'"):
        state = _fake_state(cfg)
        del state["model.layers.1.input_layernorm.weight"]
        hf_decoders.params_from_hf(state, cfg)


def _fake_state(cfg):
    params = jax.jit(model.init_params, static_argnums=1)(jax.random.key(0), cfg)
    return hf_decoders.hf_from_params(params, cfg)


@pytest.mark.parametrize(
    "name, count",
    [("llama3.2-1b", 1_235_814_400), ("llama3.2-3b", 3_212_749_824), ("llama3.1-8b", 8_030_261_248),
     ("mistral-7b-v0.3", 7_248_023_552), ("qwen2.5-0.5b", 494_032_768), ("gpt2", 124_439_808)],
)  # fmt: skip
def test_presets_have_the_released_parameter_counts(name, count):
    """The presets' shapes against the parameter counts the model cards publish (embeddings included)."""
    cfg = ModelConfig.preset(name)
    assert cfg.num_params == count
    shapes = jax.eval_shape(lambda: model.init_params(jax.random.key(0), cfg))
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == count


def test_kv_cache_decode_equals_full_forward_with_rope_and_gqa():
    """tiny-llama (RoPE, GQA 4 / 2, SwiGLU, RMSNorm): prefill a left-padded prompt, decode token by token,
    and every step's hidden state equals the full forward's at that position."""
    cfg = ModelConfig.preset("tiny-llama")
    params = model.init_params(jax.random.key(0), cfg)
    params["blocks"]["ln_1"]["scale"] = params["blocks"]["ln_1"]["scale"] * 1.5
    tokens, mask = _batch()
    tokens = tokens % cfg.vocab_size
    p = 6
    prompt_mask = mask[:2, :p] | (np.arange(p) >= 3)  # left-padded prompts
    full_mask = np.concatenate([prompt_mask, np.ones((2, T - p), bool)], axis=1)
    hidden_full = jax.jit(model.forward, static_argnums=3)(params, tokens[:2], full_mask, cfg)
    hidden, cache = jax.jit(model.prefill, static_argnums=(3, 4))(params, tokens[:2, :p], prompt_mask, cfg, T)
    decode = jax.jit(model.decode_step, static_argnums=3)
    np.testing.assert_allclose(
        np.asarray(hidden)[prompt_mask], np.asarray(hidden_full)[:, :p][prompt_mask], rtol=1e-5, atol=1e-5
    )
    assert cache.k[0].shape == (2 * cfg.kv_heads, T, cfg.head_dim)  # only the kv heads are cached
    for t in range(p, T):
        h, cache = decode(params, jnp.asarray(tokens[:2, t]), cache, cfg)
        np.testing.assert_allclose(np.asarray(h), np.asarray(hidden_full)[:, t], rtol=1e-5, atol=1e-5)
    assert np.asarray(ops.positions_from_mask(full_mask))[0, -1] == full_mask[0].sum() - 1


def test_sampling_a_llama_style_model_matches_its_teacher_forced_forward():
    """The sampler runs the new architectures unchanged: with a left-padded prompt, the recorded
    logprobs at T = 0.7 are log_softmax(logits / T) of the full forward over prompt + response."""
    from jaxrlhf import sampling
    from jaxrlhf.config import SampleConfig

    cfg = ModelConfig.preset("qwen3-0.6b", vocab_size=64, block_size=32, n_layer=2, n_head=4, n_kv_head=2,
                             n_embd=32, head_size=16, intermediate_size=48)  # fmt: skip
    params = jax.jit(model.init_params, static_argnums=1)(jax.random.key(3), cfg)
    prompt = jax.random.randint(jax.random.key(4), (3, 5), 0, 64)
    prompt_mask = jnp.arange(5)[None, :] >= jnp.array([0, 2, 4])[:, None]
    scfg = SampleConfig(max_new_tokens=6, temperature=0.7)
    r = sampling.sample(params, prompt, prompt_mask, cfg, scfg, key=jax.random.key(5))
    logits = jax.jit(model.logits_fn, static_argnums=3)(params, r.tokens, r.mask, cfg)[:, 4:-1]
    expected = jnp.take_along_axis(jax.nn.log_softmax(logits / 0.7, -1), r.response[..., None], -1)[..., 0]
    np.testing.assert_allclose(r.logprobs, expected, atol=1e-5)


def test_load_sharded_checkpoint_directory_onto_a_mesh(tmp_path):
    """save_pretrained's sharded safetensors (index + several files) load leaf by leaf, straight into the
    shardings asked for, with the logits of the model that wrote them; a bfloat16 checkpoint loads
    bit-exactly (the safetensors NumPy reader cannot read bfloat16; ours maps the bytes)."""
    from jaxrlhf import parallel

    m = _hf_model("llama")
    m.save_pretrained(tmp_path / "f32", max_shard_size="40KB")
    assert len(list((tmp_path / "f32").glob("model-*-of-*.safetensors"))) > 2
    assert (tmp_path / "f32" / "model.safetensors.index.json").is_file()
    cfg = hf_decoders.config_from_hf(m.config.to_dict())
    mesh = parallel.make_mesh(4, 2)
    shapes = jax.eval_shape(lambda: model.init_params(jax.random.key(0), cfg))
    shardings = parallel.tree_shardings(shapes, mesh)
    params, loaded_cfg = hf_decoders.load(tmp_path / "f32", shardings=shardings)
    assert loaded_cfg == cfg
    assert params["blocks"]["mlp"]["c_fc"]["kernel"].sharding == shardings["blocks"]["mlp"]["c_fc"]["kernel"]
    tokens, mask = _batch()
    ours = np.asarray(jax.jit(model.logits_fn, static_argnums=3)(params, tokens, mask, cfg))
    np.testing.assert_allclose(ours[mask], _hf_logits(m, tokens, mask)[mask], rtol=1e-4, atol=1e-4)

    m.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    bf16_cfg = ModelConfig(**{**cfg.__dict__, "param_dtype": "bfloat16"})
    params, _ = hf_decoders.load(tmp_path / "bf16", bf16_cfg)
    want = m.model.layers[1].mlp.up_proj.weight.detach().float().numpy().T
    got = np.asarray(params["blocks"]["mlp"]["c_fc"]["kernel"][1, :, cfg.mlp_dim :], np.float32)
    assert params["wte"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="cfg does not match"):
        hf_decoders.load(tmp_path / "bf16", ModelConfig(**{**cfg.__dict__, "n_kv_head": 4}))
