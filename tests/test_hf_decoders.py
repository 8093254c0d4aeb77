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

from jaxrlhf import (
    models,
    ops,  # noqa: E402
)
from jaxrlhf.models import (
    ModelConfig,  # noqa: E402
    hf,
)
from jaxrlhf.rollout import SampleConfig, sampler, scoring

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
def test_logits_match_transformers_and_save_loads_back(family, tmp_path):
    """Our forward on the converted weights equals transformers' on a batch with left- and right-padded
    rows; `hf.save` writes a directory that `from_pretrained` loads with the same logits, and `hf.load`
    reads it back to the same params (the architecture picked from config.json)."""
    m = _hf_model(family)
    cfg = hf.config_from_hf(m.config.to_dict())
    assert cfg.n_kv_head == FAMILIES[family][2]["num_key_value_heads"] and cfg.position == "rope"
    state = {k: v.numpy() for k, v in m.state_dict().items()}
    params = jax.tree.map(jnp.asarray, hf.params_from_hf(state, cfg))
    tokens, mask = _batch()
    ours = np.asarray(jax.jit(models.logits_fn, static_argnums=3)(params, tokens, mask, cfg))
    theirs = _hf_logits(m, tokens, mask)
    np.testing.assert_allclose(ours[mask], theirs[mask], rtol=1e-5, atol=1e-5)
    assert np.abs(theirs[mask]).max() > 1.0  # logits far from uniform: the comparison has teeth
    # Export: one file, or (Llama) shards + index.
    shard = 20_000 if family == "llama" else 2 << 30
    hf.save(params, cfg, tmp_path, max_shard_bytes=shard)
    assert (tmp_path / "model.safetensors.index.json").is_file() == (family == "llama")
    fresh = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(fresh) is type(m)
    np.testing.assert_allclose(_hf_logits(fresh, tokens, mask)[mask], theirs[mask], rtol=1e-5, atol=1e-5)
    again, again_cfg = hf.load(tmp_path)
    assert again_cfg == cfg
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_sampling_equals_transformers_generate(family):
    """Left-padded prompts of different lengths, greedy: the same tokens as generate(do_sample=False),
    rows that emit the end-of-text id stopping there and padded after it. Every token after the first comes
    from our KV-cache decode step, so this is also the cache against transformers for each family."""
    m = _hf_model(family)
    cfg = hf.config_from_hf(m.config.to_dict())
    params = hf.params_from_hf({k: v.numpy() for k, v in m.state_dict().items()}, cfg)
    P, R, pad = 6, 8, 0
    rng = np.random.default_rng(1)
    lengths = [6, 4, 1, 3]
    prompt = rng.integers(1, COMMON["vocab_size"], (len(lengths), P)).astype(np.int32)
    prompt_mask = np.arange(P)[None] >= P - np.array(lengths)[:, None]
    prompt[~prompt_mask] = pad
    # An end-of-text id the model does emit (row 0's first greedy token after step 0 that it has not
    # emitted before), so stopping is compared too.
    first = sampler.sample(params, prompt, prompt_mask, cfg, SampleConfig(max_new_tokens=R, temperature=0.0),
                            key=jax.random.key(0))  # fmt: skip
    row = np.asarray(first.response[0]).tolist()
    stop = next(j for j in range(1, R) if row[j] not in row[:j])
    eos = row[stop]
    scfg = SampleConfig(max_new_tokens=R, temperature=0.0, eos_id=eos, pad_id=pad)
    ours = sampler.sample(params, prompt, prompt_mask, cfg, scfg, key=jax.random.key(0))
    with torch.no_grad():
        out = m.generate(
            input_ids=torch.tensor(prompt, dtype=torch.long),
            attention_mask=torch.tensor(prompt_mask, dtype=torch.long),
            do_sample=False, max_new_tokens=R, eos_token_id=eos, pad_token_id=pad,
        ).numpy()[:, P:]  # fmt: skip
    assert bool(ours.finished[0]) and int(ours.response_length[0]) == stop + 1
    response = np.asarray(ours.response)
    np.testing.assert_array_equal(response[:, : out.shape[1]], out)
    assert np.all(response[:, out.shape[1] :] == pad)


def _reward_model(family):
    """A one-label sequence-classification model with randomised weights; pad id 0."""
    torch.manual_seed(0)
    if family == "gpt2":
        config = transformers.GPT2Config(vocab_size=97, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                         num_labels=1, pad_token_id=0, bos_token_id=None,
                                         eos_token_id=None)  # fmt: skip
        m = transformers.GPT2ForSequenceClassification(config)
    else:
        config_cls, _, extra = FAMILIES["llama"]
        m = transformers.LlamaForSequenceClassification(
            config_cls(**COMMON, **extra, num_labels=1, pad_token_id=0)
        )
    with torch.no_grad():
        for name, p in m.named_parameters():
            base = 1.0 if name.endswith(("norm.weight", "ln_1.weight", "ln_2.weight", "ln_f.weight")) else 0.0
            p.copy_(base + 0.2 * torch.randn_like(p))
    return m.eval()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_reward_model_scores_equal_transformers(family, tmp_path):
    """An HF *ForSequenceClassification reward model scores prompt + response rollouts (prompt left-padded,
    response right-padded, pad id 0) as transformers does, through `scoring.make_learned_reward`."""
    m = _reward_model(family)
    m.save_pretrained(tmp_path)
    params, cfg = hf.load_reward_model(tmp_path)
    rng = np.random.default_rng(2)
    B, P, R = 4, 5, 4
    prompt = rng.integers(1, 97, (B, P)).astype(np.int32)
    prompt_mask = np.arange(P)[None] >= np.array([0, 2, 4, 1])[:, None]
    response = rng.integers(1, 97, (B, R)).astype(np.int32)
    response_mask = np.arange(R)[None] < np.array([4, 2, 1, 3])[:, None]
    prompt[~prompt_mask], response[~response_mask] = 0, 0
    rollout = sampler.Rollout(prompt, prompt_mask, response, response_mask, np.zeros((B, R), np.float32),
                               np.ones(B, bool))  # fmt: skip
    ours = np.asarray(jax.jit(scoring.make_learned_reward(params, cfg))(rollout))
    tokens, mask = np.asarray(rollout.tokens), np.asarray(rollout.mask)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        theirs = m(
            input_ids=torch.tensor(tokens, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
            position_ids=torch.tensor(positions, dtype=torch.long),
        ).logits.numpy()[:, 0]
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
    assert np.std(theirs) > 0.1  # the rows score apart


def test_bad_checkpoints_are_one_line_errors(tmp_path):
    """Unsupported architectures (listing the supported ones), a reward model given to `load` and an LM to
    `load_reward_model`, a multi-label classifier, and weights that do not match their config.json (the
    tensor and both shapes named)."""
    import json

    m = _hf_model("qwen2")
    m.save_pretrained(tmp_path / "lm")
    config = json.loads((tmp_path / "lm" / "config.json").read_text())

    def variant(name, **changes):
        (tmp_path / name).mkdir()
        for f in (tmp_path / "lm").iterdir():
            (tmp_path / name / f.name).symlink_to(f)
        (tmp_path / name / "config.json").unlink()
        (tmp_path / name / "config.json").write_text(json.dumps({**config, **changes}))
        return tmp_path / name

    with pytest.raises(
        ValueError,
        match=r"'GemmaForCausalLM' is not supported; supported causal LMs: "
        r"GPT2LMHeadModel, GPT2Model, LlamaForCausalLM, .*Qwen3ForCausalLM",
    ):
        hf.load(variant("gemma", architectures=["GemmaForCausalLM"]))
    with pytest.raises(ValueError, match=r"a reward model, no LM head\): load it with hf.load_reward_model"):
        hf.load(variant("rm", architectures=["Qwen2ForSequenceClassification"]))
    with pytest.raises(ValueError, match="with 2 labels; a reward model has one score"):
        hf.load_reward_model(variant("rm2", architectures=["Qwen2ForSequenceClassification"],
                                     id2label={"0": "a", "1": "b"}))  # fmt: skip
    with pytest.raises(ValueError, match="a language model without a score head: load it with hf.load"):
        hf.load_reward_model(tmp_path / "lm")
    with pytest.raises(ValueError, match="no tensor 'score.weight'"):
        hf.load_reward_model(
            variant("rm1", architectures=["Qwen2ForSequenceClassification"], id2label={"0": "s"})
        )
    with pytest.raises(
        ValueError,
        match=r"tensor 'layers.0.mlp.gate_proj.weight' has shape \(56, 32\); "
        r"the config expects \(64, 32\)",
    ):
        hf.load(variant("wide", intermediate_size=64))
    assert hf.load(tmp_path / "lm")[1].family == "qwen2", "every family through one loader"


def test_llama3_rope_scaling_matters():
    """The scaled frequencies are what transformers uses: dropping the scaling moves the logits."""
    m = _hf_model("llama")
    cfg = hf.config_from_hf(m.config.to_dict())
    assert cfg.rope_scaling == (8.0, 1.0, 4.0, 16)
    state = {k: v.numpy() for k, v in m.state_dict().items()}
    params = hf.params_from_hf(state, cfg)
    tokens, mask = _batch()
    plain = ModelConfig(**{**cfg.__dict__, "rope_scaling": None})
    logits = jax.jit(models.logits_fn, static_argnums=3)
    a, b = np.asarray(logits(params, tokens, mask, cfg)), np.asarray(logits(params, tokens, mask, plain))
    assert np.abs(a[mask] - b[mask]).max() > 1e-2


def test_unsupported_configs_are_refused():
    base = transformers.MistralConfig(**COMMON, num_attention_heads=4, num_key_value_heads=2).to_dict()
    with pytest.raises(ValueError, match="sliding-window attention is not implemented"):
        hf.config_from_hf({**base, "sliding_window": 8})
    with pytest.raises(ValueError, match="architecture 'GemmaForCausalLM'"):
        hf.config_from_hf({**base, "architectures": ["GemmaForCausalLM"]})
    with pytest.raises(ValueError, match="unsupported rope_type 'yarn'"):
        hf.config_from_hf({**base, "sliding_window": None, "rope_parameters": {"rope_type": "yarn"}})
    cfg = hf.config_from_hf({**base, "sliding_window": None})
    with pytest.raises(ValueError, match="has no tensor 'layers.1.input_layernorm.weight'"):
        state = _fake_state(cfg)
        del state["model.layers.1.input_layernorm.weight"]
        hf.params_from_hf(state, cfg)


def _fake_state(cfg):
    params = jax.jit(models.init_params, static_argnums=1)(jax.random.key(0), cfg)
    return hf.hf_from_params(params, cfg)


@pytest.mark.parametrize(
    "name, count",
    [("llama3.2-1b", 1_235_814_400), ("llama3.2-3b", 3_212_749_824), ("llama3.1-8b", 8_030_261_248),
     ("mistral-7b-v0.3", 7_248_023_552), ("qwen2.5-0.5b", 494_032_768), ("gpt2", 124_439_808)],
)  # fmt: skip
def test_presets_have_the_released_parameter_counts(name, count):
    """The presets' shapes against the parameter counts the model cards publish (embeddings included)."""
    cfg = ModelConfig.preset(name)
    assert cfg.num_params == count
    shapes = jax.eval_shape(lambda: models.init_params(jax.random.key(0), cfg))
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == count


def test_kv_cache_decode_equals_full_forward_with_rope_and_gqa():
    """tiny-llama (RoPE, GQA 4 / 2, SwiGLU, RMSNorm): prefill a left-padded prompt, decode token by token,
    and every step's hidden state equals the full forward's at that position."""
    cfg = ModelConfig.preset("tiny-llama")
    params = models.init_params(jax.random.key(0), cfg)
    params["blocks"]["ln_1"]["scale"] = params["blocks"]["ln_1"]["scale"] * 1.5
    tokens, mask = _batch()
    tokens = tokens % cfg.vocab_size
    p = 6
    prompt_mask = mask[:2, :p] | (np.arange(p) >= 3)  # left-padded prompts
    full_mask = np.concatenate([prompt_mask, np.ones((2, T - p), bool)], axis=1)
    hidden_full = jax.jit(models.forward, static_argnums=3)(params, tokens[:2], full_mask, cfg)
    hidden, cache = jax.jit(models.prefill, static_argnums=(3, 4))(
        params, tokens[:2, :p], prompt_mask, cfg, T
    )
    decode = jax.jit(models.decode_step, static_argnums=3)
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
    from jaxrlhf.rollout import SampleConfig, sampler

    cfg = ModelConfig.preset("qwen3-0.6b", vocab_size=64, block_size=32, n_layer=2, n_head=4, n_kv_head=2,
                             n_embd=32, head_size=16, intermediate_size=48)  # fmt: skip
    params = jax.jit(models.init_params, static_argnums=1)(jax.random.key(3), cfg)
    prompt = jax.random.randint(jax.random.key(4), (3, 5), 0, 64)
    prompt_mask = jnp.arange(5)[None, :] >= jnp.array([0, 2, 4])[:, None]
    scfg = SampleConfig(max_new_tokens=6, temperature=0.7)
    r = sampler.sample(params, prompt, prompt_mask, cfg, scfg, key=jax.random.key(5))
    logits = jax.jit(models.logits_fn, static_argnums=3)(params, r.tokens, r.mask, cfg)[:, 4:-1]
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
    cfg = hf.config_from_hf(m.config.to_dict())
    mesh = parallel.make_mesh(4, 2)
    shapes = jax.eval_shape(lambda: models.init_params(jax.random.key(0), cfg))
    shardings = parallel.tree_shardings(shapes, mesh)
    params, loaded_cfg = hf.load(tmp_path / "f32", shardings=shardings)
    assert loaded_cfg == cfg
    assert params["blocks"]["mlp"]["c_fc"]["kernel"].sharding == shardings["blocks"]["mlp"]["c_fc"]["kernel"]
    tokens, mask = _batch()
    ours = np.asarray(jax.jit(models.logits_fn, static_argnums=3)(params, tokens, mask, cfg))
    np.testing.assert_allclose(ours[mask], _hf_logits(m, tokens, mask)[mask], rtol=1e-4, atol=1e-4)

    m.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    bf16_cfg = ModelConfig(**{**cfg.__dict__, "param_dtype": "bfloat16"})
    params, _ = hf.load(tmp_path / "bf16", bf16_cfg)
    want = m.model.layers[1].mlp.up_proj.weight.detach().float().numpy().T
    got = np.asarray(params["blocks"]["mlp"]["c_fc"]["kernel"][1, :, cfg.mlp_dim :], np.float32)
    assert params["wte"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="cfg does not match"):
        hf.load(tmp_path / "bf16", ModelConfig(**{**cfg.__dict__, "n_kv_head": 4}))


def test_bf16_compute_keeps_float32_logits_and_scores():
    """bfloat16 matmuls on the Llama family (RoPE and norms in float32): logits and scalar-head scores stay
    float32 and near transformers' float32 logits; the float32 forward is much nearer (the dtype acts)."""
    m = _hf_model("llama")
    cfg = hf.config_from_hf(m.config.to_dict())
    params = hf.params_from_hf({k: v.numpy() for k, v in m.state_dict().items()}, cfg)
    tokens, mask = _batch()
    bf16 = ModelConfig(**{**cfg.__dict__, "compute_dtype": "bfloat16"})
    logits = jax.jit(models.logits_fn, static_argnums=3)(params, tokens, mask, bf16)
    assert logits.dtype == jnp.float32
    theirs = _hf_logits(m, tokens, mask)[mask]
    err = np.abs(np.asarray(logits)[mask] - theirs).max()
    assert 1e-3 < err < 0.05 * np.abs(theirs).max(), err
    scalar = {"gpt": params, "head": models.init_scalar_head(jax.random.key(0), cfg, scale=1.0)}
    assert jax.jit(models.scalar_fn, static_argnums=3)(scalar, tokens, mask, bf16).dtype == jnp.float32


def _edited_checkpoint(tmp_path, name, *, config=None, tensors=None, dtype=None):
    """A tiny untied Llama saved by transformers, then its config.json / tensors edited as a careless copy
    or a mismatched download would have them."""
    import json  # noqa: PLC0415

    from safetensors.numpy import load_file, save_file  # noqa: PLC0415

    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False))  # fmt: skip
    if dtype is not None:
        m = m.to(dtype)
    out = tmp_path / name
    m.save_pretrained(out)
    if config:
        path = out / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    if tensors:
        path = str(out / "model.safetensors")
        save_file(tensors(load_file(path)), path, metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("case,edit,message", [
    ("fewer_layers_in_config", dict(config={"num_hidden_layers": 1}),
     r"holds tensors a 1-layer llama model of its config does not have: unexpected \['layers\.1\."),
    ("untied_without_head", dict(tensors=lambda t: {k: v for k, v in t.items() if k != "lm_head.weight"}),
     r"has no tensor 'lm_head\.weight'"),
    ("unknown_tensor", dict(tensors=lambda t: {**t, "model.extra.weight": np.zeros(3, np.float32)}),
     r"unexpected \['extra\.weight'\]"),
    ("tied_config_untied_file", dict(config={"tie_word_embeddings": True}), r"lm_head\.weight"),
])  # fmt: skip
def test_load_refuses_a_config_the_tensors_contradict(tmp_path, case, edit, message):
    """Issue #29: a 1-layer config over a 2-layer file loaded 1 layer, an untied config without
    lm_head.weight got the embeddings copied in, unknown tensors were ignored. Each is one line now."""
    path = _edited_checkpoint(tmp_path, case, **edit)
    with pytest.raises(ValueError, match=message) as err:
        hf.load(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_float16_weights_load_as_float16(tmp_path):
    """A float16 checkpoint keeps its dtype (as bfloat16 does), bit for bit."""
    path = _edited_checkpoint(tmp_path, "fp16", dtype=torch.float16)
    params, cfg = hf.load(path)
    leaves = jax.tree.leaves(params)
    assert {leaf.dtype for leaf in leaves} == {jnp.dtype(jnp.float16)}
    m = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float16)
    np.testing.assert_array_equal(np.asarray(params["wte"]), m.model.embed_tokens.weight.detach().numpy())
