"""GPT-2 <-> Hugging Face: logits parity with a tiny random `transformers` model built here."""

import os

# Nothing in this file may reach the network; set before transformers / huggingface_hub load.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import dataclasses  # noqa: E402
import json  # noqa: E402

import huggingface_hub  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from jaxrlhf.models import (
    ModelConfig,  # noqa: E402
    hf,  # noqa: E402
    logits_fn,  # noqa: E402
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HF_CONFIG = dict(n_layer=2, n_head=2, n_embd=32, vocab_size=101, n_positions=64)
T = 12
LENGTHS = (12, 7, 1, 4)  # real tokens per row; the rest is padding filled with random ids

jit_logits = jax.jit(logits_fn, static_argnums=3)


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**HF_CONFIG))
    # Default init leaves LayerNorms at (1, 0) and weights at std 0.02, where a misrouted LayerNorm
    # or bias would not show. Randomise every tensor so that any mapping error moves the logits.
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")) else 0.0
            p.copy_(base + 0.2 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def checkpoints(hf_model, tmp_path_factory):
    """{"safetensors": dir, "bin": dir}: save_pretrained's format, and a legacy pytorch_model.bin.

    The .bin one mimics the original hub "gpt2" files: bare GPT2Model names (no "transformer."), the
    attn.bias / attn.masked_bias buffers, and an lm_head.weight copy.
    """
    root = tmp_path_factory.mktemp("hf")
    hf_model.save_pretrained(root / "safetensors")
    assert (root / "safetensors" / "model.safetensors").is_file()
    hf_model.config.save_pretrained(root / "bin")
    state = {k.removeprefix("transformer."): v for k, v in hf_model.state_dict().items()}
    n = HF_CONFIG["n_positions"]
    for i in range(HF_CONFIG["n_layer"]):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n, dtype=torch.bool))[None, None]
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, root / "bin" / "pytorch_model.bin")
    return {"safetensors": root / "safetensors", "bin": root / "bin"}


def padded_batch(side: str, seed: int = 0):
    """tokens [B, T] int32 and mask [B, T] bool, padded on `side`."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, HF_CONFIG["vocab_size"], (len(LENGTHS), T)).astype(np.int32)
    mask = np.zeros((len(LENGTHS), T), bool)
    for row, n in enumerate(LENGTHS):
        mask[row, T - n :] = side == "left"
        mask[row, :n] = mask[row, :n] | (side == "right")
    assert (mask.sum(-1) == LENGTHS).all()
    return tokens, mask


def hf_logits(model, tokens, mask, side: str) -> np.ndarray:
    kwargs = dict(input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask))
    if side == "left":
        # HF numbers positions by column; ours count real tokens (see model.py). Give HF ours.
        positions = np.maximum(np.cumsum(mask, axis=-1) - 1, 0)
        kwargs["position_ids"] = torch.tensor(positions, dtype=torch.long)
    with torch.no_grad():
        return model(**kwargs).logits.numpy()


def test_config_from_checkpoint(checkpoints):
    _, cfg = hf.load(checkpoints["safetensors"])
    assert cfg == ModelConfig(
        vocab_size=101,
        block_size=64,
        n_layer=2,
        n_head=2,
        n_embd=32,
        embd_pdrop=0.1,
        resid_pdrop=0.1,
        attn_pdrop=0.1,
        ln_eps=1e-5,
    )


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_logits_match_hf(hf_model, checkpoints, fmt, side):
    params, cfg = hf.load(checkpoints[fmt])
    tokens, mask = padded_batch(side)
    ours = np.asarray(jit_logits(params, tokens, mask, cfg))
    theirs = hf_logits(hf_model, tokens, mask, side)
    assert np.abs(theirs[mask]).max() > 1.0  # logits large enough for 1e-5 to be a real test
    np.testing.assert_allclose(ours[mask], theirs[mask], atol=1e-5, rtol=0)


def test_both_formats_give_equal_params(checkpoints):
    a, _ = hf.load(checkpoints["safetensors"])
    b, _ = hf.load(checkpoints["bin"])
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_export_loads_in_transformers(hf_model, checkpoints, tmp_path):
    params, cfg = hf.load(checkpoints["safetensors"])
    hf.save(params, cfg, tmp_path)
    reloaded, info = transformers.GPT2LMHeadModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info  # no missing / unexpected / mismatched keys
    reloaded.eval()
    original = hf_model.state_dict()
    for name, value in reloaded.state_dict().items():
        torch.testing.assert_close(value, original[name], rtol=0, atol=0, msg=name)
    assert reloaded.lm_head.weight.data_ptr() == reloaded.transformer.wte.weight.data_ptr()
    assert reloaded.config.eos_token_id is None  # a 101-token vocabulary has no GPT-2 EOS
    for side in ("left", "right"):
        tokens, mask = padded_batch(side, seed=1)
        np.testing.assert_allclose(
            hf_logits(reloaded, tokens, mask, side)[mask],
            np.asarray(jit_logits(params, tokens, mask, cfg))[mask],
            atol=1e-5,
            rtol=0,
        )


def test_round_trip_params_are_equal(checkpoints, tmp_path):
    params, cfg = hf.load(checkpoints["safetensors"])
    hf.save(params, cfg, tmp_path, eos_token_id=100)
    assert transformers.GPT2Config.from_pretrained(tmp_path).eos_token_id == 100
    again, cfg_again = hf.load(tmp_path)
    assert cfg_again == cfg
    assert jax.tree.structure(again) == jax.tree.structure(params)
    jax.tree.map(np.testing.assert_array_equal, again, params)


def test_bfloat16_round_trip(checkpoints, tmp_path):
    _, file_cfg = hf.load(checkpoints["safetensors"])
    cfg = dataclasses.replace(file_cfg, param_dtype="bfloat16")
    params, _ = hf.load(checkpoints["safetensors"], cfg)
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(params))
    hf.save(params, cfg, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    again, _ = hf.load(tmp_path, cfg)
    jax.tree.map(np.testing.assert_array_equal, again, params)


def test_cfg_override_keeps_dtypes_and_cuts_positions(hf_model, checkpoints):
    _, file_cfg = hf.load(checkpoints["safetensors"])
    cfg = dataclasses.replace(file_cfg, block_size=16, embd_pdrop=0.0, remat=True)
    params, got_cfg = hf.load(checkpoints["safetensors"], cfg)
    assert got_cfg == cfg and params["wpe"].shape == (16, 32)
    tokens, mask = padded_batch("right")
    np.testing.assert_allclose(
        np.asarray(jit_logits(params, tokens, mask, cfg))[mask],
        hf_logits(hf_model, tokens, mask, "right")[mask],
        atol=1e-5,
        rtol=0,
    )
    with pytest.raises(ValueError, match="n_layer=3 vs 2"):
        hf.load(checkpoints["safetensors"], dataclasses.replace(file_cfg, n_layer=3))
    with pytest.raises(ValueError, match="block_size=128 > n_positions=64"):
        hf.load(checkpoints["safetensors"], dataclasses.replace(file_cfg, block_size=128))


def test_config_validation():
    base = {**HF_CONFIG, "activation_function": "gelu_new", "n_inner": None}
    assert hf.gpt2.config_from_hf({**base, "n_inner": 64}).mlp_ratio == 2
    assert hf.gpt2.config_from_hf({**base, "activation_function": "gelu_pytorch_tanh"}).n_layer == 2
    for bad, message in [
        ({"activation_function": "relu"}, "activation_function='relu'"),
        ({"activation_function": "gelu"}, "activation_function='gelu'"),  # exact erf GELU differs
        ({"n_inner": 50}, "n_inner=50"),
        ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
        ({"model_type": "gpt_neo"}, "model_type"),
        ({"tie_word_embeddings": False}, "tie_word_embeddings"),
    ]:
        with pytest.raises(ValueError, match=message):
            hf.gpt2.config_from_hf({**base, **bad})


def test_state_dict_validation(hf_model):
    cfg = hf.gpt2.config_from_hf(HF_CONFIG)
    state = {k: v.numpy() for k, v in hf_model.state_dict().items()}
    hf.params_from_hf(state, cfg)  # the full state dict, lm_head included, is accepted
    with pytest.raises(ValueError, match=r"missing \['h.1.ln_2.bias'\]"):
        hf.params_from_hf({k: v for k, v in state.items() if k != "transformer.h.1.ln_2.bias"}, cfg)
    with pytest.raises(ValueError, match=r"unexpected \['h.0.crossattention.c_attn.weight'\]"):
        hf.params_from_hf({**state, "h.0.crossattention.c_attn.weight": np.zeros(1)}, cfg)
    with pytest.raises(ValueError, match="tied"):
        hf.params_from_hf({**state, "lm_head.weight": state["lm_head.weight"] + 1}, cfg)
    with pytest.raises(ValueError, match="has shape"):
        hf.params_from_hf(state, dataclasses.replace(cfg, n_head=4, n_embd=64))


def test_hub_failure_is_one_line_error(monkeypatch):
    def offline(*args, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("cannot reach the hub\nsecond line")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(OSError, match="'gpt2' is not a local directory and could not be fetched") as e:
        hf.load("gpt2")
    assert "\n" not in str(e.value) and "LocalEntryNotFoundError" in str(e.value)
