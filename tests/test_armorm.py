"""ArmoRM (RLHFlow's LlamaForRewardModelWithGating) through `hf.load_reward_model`: a tiny random ArmoRM
written here as a torch module after the published modeling_custom.py's description (a transformers
LlamaModel, a bias-free regression layer to 19 objectives, a ReLU gating MLP read at the last assistant
header, a reward transform matrix), saved as safetensors + config.json, scores as the torch module does."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from jaxrlhf import models, parallel  # noqa: E402
from jaxrlhf.models import armorm, hf  # noqa: E402
from jaxrlhf.stages import batches  # noqa: E402

VOCAB, PAD = 97, 96
# The tiny vocabulary's "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n".
PATTERN = (91, 92, 93, 94, 95)
K, GATE_WIDTH, N_HIDDEN, TEMPERATURE, LOGIT_SCALE = 19, 24, 3, 4.0, 2.5
T = 16


class Gating(nn.Module):
    """N_HIDDEN ReLU layers (with biases), a linear layer to K (with bias); logit_scale * softmax(u / tau)."""

    def __init__(self, width, k, hidden, n_hidden, temperature):
        super().__init__()
        dims = [width] + [hidden] * n_hidden + [k]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True))
        self.logit_scale = nn.Parameter(torch.ones(1))
        self.temperature = temperature

    def forward(self, x):
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        return F.softmax(self.layers[-1](x) / self.temperature, dim=1) * self.logit_scale[0]


class TorchArmoRM(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.model = transformers.LlamaModel(config)
        self.regression_layer = nn.Linear(config.hidden_size, K, bias=False)
        self.reward_transform_matrix = nn.Parameter(torch.eye(K))
        self.gating = Gating(config.hidden_size, K, GATE_WIDTH, N_HIDDEN, TEMPERATURE)

    @staticmethod
    def gate_position(ids):
        """Start of the last occurrence of the pattern in the (padded) row, as the published search."""
        for j in range(len(ids) - len(PATTERN), -1, -1):
            if ids[j : j + len(PATTERN)] == list(PATTERN):
                return j
        raise ValueError("Token pattern not found in the list.")

    def forward(self, input_ids, attention_mask):
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        rows = torch.arange(input_ids.shape[0])
        last = (torch.eq(input_ids, PAD).int().argmax(-1) - 1) % input_ids.shape[-1]  # before the first pad
        rewards = self.regression_layer(hidden[rows, last])
        gate_at = [self.gate_position(ids.tolist()) for ids in input_ids]
        gating = self.gating(hidden[rows, gate_at])
        score = torch.sum(gating * (rewards @ self.reward_transform_matrix), dim=1)
        return score, rewards, gating


@pytest.fixture(scope="module")
def armo(tmp_path_factory):
    """(torch module, its directory, its state dict, its config.json) of a tiny random ArmoRM."""
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=56, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, pad_token_id=PAD,
        tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    )  # fmt: skip
    torch.manual_seed(0)
    m = TorchArmoRM(config)
    with torch.no_grad():  # every tensor random (norm scales around 1), so a misread one moves the outputs
        for name, p in m.named_parameters():
            base = 1.0 if name.endswith("norm.weight") else 0.0
            scale = 0.4 if name.startswith("gating.layers") else 0.2  # a gate far from uniform or one-hot
            p.copy_(base + scale * torch.randn_like(p))
        m.gating.logit_scale.fill_(LOGIT_SCALE)
    m.eval()
    out = tmp_path_factory.mktemp("armorm")
    state = {k: v.detach().contiguous() for k, v in m.state_dict().items()}
    save_file(state, out / "model.safetensors")
    hf_config = {
        **config.to_dict(), "architectures": ["LlamaForRewardModelWithGating"], "num_objectives": K,
        "gating_temperature": TEMPERATURE, "gating_hidden_dim": GATE_WIDTH, "gating_n_hidden": N_HIDDEN,
        "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0},
    }  # fmt: skip
    (out / "config.json").write_text(json.dumps(hf_config))
    return m, out, state, hf_config


def _ids(rng, n):
    return [int(i) for i in rng.integers(1, 90, n)]  # never a pattern id nor the pad


def _batch(rows):
    tokens = np.full((len(rows), T), PAD, np.int32)
    mask = np.zeros((len(rows), T), bool)
    for i, ids in enumerate(rows):
        tokens[i, : len(ids)], mask[i, : len(ids)] = ids, True
    return tokens, mask


def _torch(m, tokens, mask):
    with torch.no_grad():
        out = m(torch.tensor(tokens, dtype=torch.long), torch.tensor(mask, dtype=torch.long))
    return [x.numpy() for x in out]


OUTPUTS = jax.jit(models.armorm_outputs, static_argnums=3)


def test_armorm_scores_rewards_and_gate_equal_the_torch_module(armo):
    """Right-padded rows of lengths 16, 11, 9, 13 (one with two turns: the gate reads the last header):
    score, the 19 rewards and the gate at 1e-5; sum(g) = logit_scale; score = r . (g M^T); the gate does
    not move when only the answer changes; `models.sequence_scores` gives the same score, under the
    pipelines' sharded evaluation too."""
    m, path, _, _ = armo
    params, cfg = hf.load_reward_model(path, gating_pattern=PATTERN)
    assert set(params) == {"gpt", "armorm"} and cfg.family == "llama" and cfg.n_kv_head == 2
    assert len(armorm.OBJECTIVES) == K == params["armorm"]["regression"].shape[1]
    rng = np.random.default_rng(0)
    rows = [
        [*_ids(rng, 2), *PATTERN, *_ids(rng, 1), *PATTERN, *_ids(rng, 3)],  # two turns
        [*_ids(rng, 4), *PATTERN, *_ids(rng, 2)],
        [*_ids(rng, 2), *PATTERN, *_ids(rng, 2)],
        [*_ids(rng, 5), *PATTERN, *_ids(rng, 3)],
    ]
    assert [len(r) for r in rows] == [16, 11, 9, 13]
    tokens, mask = _batch(rows)
    score, rewards, gating = (np.asarray(x) for x in OUTPUTS(params, tokens, mask, cfg))
    want_score, want_rewards, want_gating = _torch(m, tokens, mask)
    np.testing.assert_allclose(rewards, want_rewards, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gating, want_gating, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(score, want_score, rtol=1e-5, atol=1e-5)
    # The comparison has teeth: scores apart, gates neither uniform nor one-hot (a saturated gate would
    # hide a misplaced gating position).
    assert np.ptp(want_score) > 0.1 and np.all(gating.max(-1) > 3 * gating.mean(-1))
    assert np.all(gating.max(-1) < 0.6 * LOGIT_SCALE)
    # Invariants.
    np.testing.assert_allclose(gating.sum(-1), LOGIT_SCALE, rtol=1e-5)
    transform = np.asarray(params["armorm"]["transform"])
    np.testing.assert_allclose(score, np.sum(rewards * (gating @ transform.T), -1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(transform, want := armo[2]["reward_transform_matrix"].numpy())
    assert not np.allclose(want, np.eye(K))
    # Another answer after the (last) pattern: the same gate, other rewards and scores.
    answers = [list(r) for r in rows]
    for r in answers:
        start = max(j for j in range(len(r) - 4) if tuple(r[j : j + 5]) == PATTERN) + 5
        r[start:] = _ids(rng, len(r) - start)
    tokens2, _ = _batch(answers)
    other = OUTPUTS(params, tokens2, mask, cfg)
    np.testing.assert_allclose(np.asarray(other.gating), gating, rtol=1e-6, atol=1e-6)
    assert np.abs(np.asarray(other.score) - score).min() > 1e-4
    # The generic reward-model scores, and the pipelines' sharded evaluation of them (2 x 2 mesh).
    scores = jax.jit(models.sequence_scores, static_argnums=3)(params, tokens, mask, cfg)
    np.testing.assert_allclose(np.asarray(scores), score, rtol=1e-6, atol=1e-6)
    mesh = parallel.make_mesh(2, 2, devices=jax.devices()[:4])
    fn = batches.jit_eval(lambda p, b: models.sequence_scores(p, b[0], b[1], cfg), mesh, params)
    sharded = batches.evaluate_rows(fn, parallel.put(params, mesh), (tokens, mask), 4, mesh)
    np.testing.assert_allclose(sharded, score, rtol=1e-5, atol=1e-5)


def test_armorm_refusals(armo, tmp_path):
    """A row without the assistant pattern (one line eagerly, NaN under jit; the published code raises
    too); config.json and tensors that disagree (one line naming the tensor); a pattern outside the
    vocabulary; ArmoRM given to `hf.load`, a scalar-head consumer, a pattern for another reward model."""
    m, path, state, hf_config = armo
    params, cfg = hf.load_reward_model(path, gating_pattern=PATTERN)
    rng = np.random.default_rng(1)
    tokens, mask = _batch([[*_ids(rng, 3), *PATTERN, *_ids(rng, 4)], _ids(rng, 12)])
    with pytest.raises(ValueError) as err:
        models.armorm_outputs(params, tokens, mask, cfg)
    assert "\n" not in str(err.value) and "1 of 2 sequences (row 1 first) have no assistant turn" in str(
        err.value
    )
    with pytest.raises(ValueError, match="Token pattern not found"):
        _torch(m, tokens, mask)
    jitted = OUTPUTS(params, np.pad(tokens, ((0, 2), (0, 0))), np.pad(mask, ((0, 2), (0, 0))), cfg)
    assert np.isfinite(jitted.score[0]) and np.isnan(jitted.score[1]) and np.isnan(jitted.gating[1]).all()

    def variant(name, tensors=None, drop=(), **fields):
        out = tmp_path / name
        out.mkdir()
        save_file({**state, **(tensors or {})}, out / "model.safetensors")
        config = {k: v for k, v in {**hf_config, **fields}.items() if k not in drop}
        (out / "config.json").write_text(json.dumps(config))
        return out

    def refused(directory, match, **kw):
        with pytest.raises(ValueError, match=match) as err:
            hf.load_reward_model(directory, **{"gating_pattern": PATTERN, **kw})
        assert "\n" not in str(err.value), err.value

    short = variant("short", {"regression_layer.weight": state["regression_layer.weight"][:18].contiguous()})
    refused(short, r"tensor 'regression_layer.weight' has shape \(18, 32\); config.json expects \(19, 32\)")
    refused(
        variant("objectives", num_objectives=18), r"tensor 'regression_layer.weight' has shape \(19, 32\)"
    )
    refused(
        variant("layers", gating_n_hidden=2),
        r"unexpected \['gating.layers.3.bias', 'gating.layers.3.weight'\]",
    )
    refused(variant("temp", gating_temperature=0), "gating_temperature=0; ArmoRM needs a number > 0")
    refused(path, r"gating pattern \(128009, .*below vocab_size=97", gating_pattern=None)
    with pytest.raises(ValueError, match=r"a reward model, no LM head\): load it with hf.load_reward_model"):
        hf.load(path)
    with pytest.raises(ValueError, match="is an ArmoRM"):
        models.check_scalar_model(params, cfg)
    # The config.json spelling of the pattern, and the published default temperature.
    loaded, _ = hf.load_reward_model(variant("default", gating_token_pattern=list(PATTERN)))
    assert np.asarray(loaded["armorm"]["pattern"]).tolist() == list(PATTERN)
    tau = variant("tau", drop=("gating_temperature",), gating_token_pattern=list(PATTERN))
    loaded, _ = hf.load_reward_model(tau)
    assert float(loaded["armorm"]["gating"]["temperature"]) == 10.0
