"""Hugging Face `transformers` checkpoints (config.json + safetensors) in and out.

`load` / `save` take any supported causal LM, picked from config.json's `architectures`: GPT-2 (here) and
Llama / Mistral / Qwen2 / Qwen3 (`jaxrlhf.hf_decoders`); `load_reward_model` reads a one-label
`*ForSequenceClassification` checkpoint as a scalar model ({"gpt", "head"}) for `rewards.make_learned_reward`
or a value model's initialisation. The rest of this module is GPT-2's mapping:

Hugging Face's GPT-2 stores each block under `h.{i}.` and its dense layers as `Conv1D`, whose weight
is already [D_in, D_out] (y = x @ W + b): they map onto our stacked [L, D_in, D_out] kernels with no
transpose, and the fused c_attn output splits into q, k, v in the same order as ours. LayerNorm
`weight` is our `scale`. The LM head is tied to `wte` on both sides. The `attn.bias` and
`attn.masked_bias` buffers (a causal mask and a constant that older versions saved) are skipped.

The pure functions `params_from_hf` / `hf_from_params` do the mapping; `load_gpt2` / `save_gpt2` are
the thin file (and hub) layer around them. `transformers` itself is never imported.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from jaxrlhf import hf_decoders
from jaxrlhf.config import ModelConfig
from jaxrlhf.hf_decoders import set_leaf as _set
from jaxrlhf.model import Params, init_params

_GPT2 = ("GPT2LMHeadModel", "GPT2Model")
CAUSAL_LM = (*_GPT2, *hf_decoders.ARCHITECTURES)
REWARD_MODELS = ("GPT2ForSequenceClassification", *hf_decoders.SEQUENCE_CLASSIFICATION)

# Activations that are GPT-2's tanh-approximate GELU (jax.nn.gelu(approximate=True)).
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")

# Our param path -> Hugging Face name; block entries are under h.{i}. and stacked on [L].
_TOP = {
    ("wte",): "wte.weight",
    ("wpe",): "wpe.weight",
    ("ln_f", "scale"): "ln_f.weight",
    ("ln_f", "bias"): "ln_f.bias",
}
_BLOCK = {
    ("ln_1", "scale"): "ln_1.weight",
    ("ln_1", "bias"): "ln_1.bias",
    ("attn", "c_attn", "kernel"): "attn.c_attn.weight",
    ("attn", "c_attn", "bias"): "attn.c_attn.bias",
    ("attn", "c_proj", "kernel"): "attn.c_proj.weight",
    ("attn", "c_proj", "bias"): "attn.c_proj.bias",
    ("ln_2", "scale"): "ln_2.weight",
    ("ln_2", "bias"): "ln_2.bias",
    ("mlp", "c_fc", "kernel"): "mlp.c_fc.weight",
    ("mlp", "c_fc", "bias"): "mlp.c_fc.bias",
    ("mlp", "c_proj", "kernel"): "mlp.c_proj.weight",
    ("mlp", "c_proj", "bias"): "mlp.c_proj.bias",
}
_BUFFERS = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")
# GPT2LMHeadModel names start with it; bare GPT2Model checkpoints (the hub's "gpt2") have none.
_PREFIX = "transformer."


# ------------------------------------------------------------------------------------------ configs


def config_from_hf(hf_config: Mapping) -> ModelConfig:
    """A ModelConfig from a GPT-2 config.json dict; raises if the architecture is not ours."""
    get = hf_config.get
    d = get("n_embd", 768)
    checks = [
        (get("model_type", "gpt2") == "gpt2", f"model_type={get('model_type')!r} (need 'gpt2')"),
        (
            get("activation_function", "gelu_new") in _TANH_GELUS,
            f"activation_function={get('activation_function')!r} (need one of {_TANH_GELUS})",
        ),
        (
            get("n_inner") is None or get("n_inner") % d == 0,
            f"n_inner={get('n_inner')} (need None or a multiple of n_embd={d})",
        ),
        (get("scale_attn_weights", True), "scale_attn_weights=False"),
        (not get("scale_attn_by_inverse_layer_idx", False), "scale_attn_by_inverse_layer_idx=True"),
        (not get("add_cross_attention", False), "add_cross_attention=True"),
        (get("tie_word_embeddings", True), "tie_word_embeddings=False"),
    ]
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


def config_to_hf(cfg: ModelConfig, eos_id: int | None = None) -> dict:
    """The config.json dict that `transformers.GPT2LMHeadModel` reads for `cfg`.

    `eos_id` becomes bos/eos_token_id (GPT-2 uses one id for both); None means 50256 for the
    50257-token GPT-2 vocabulary and null otherwise (transformers' default 50256 would not exist).
    """
    if eos_id is None and cfg.vocab_size == 50257:
        eos_id = 50256
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.block_size,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_embd": cfg.n_embd,
        "n_inner": None if cfg.mlp_ratio == 4 else cfg.mlp_dim,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": cfg.ln_eps,
        "embd_pdrop": cfg.embd_pdrop,
        "resid_pdrop": cfg.resid_pdrop,
        "attn_pdrop": cfg.attn_pdrop,
        "tie_word_embeddings": True,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "dtype": cfg.param_dtype,
    }


def check_compatible(cfg: ModelConfig, file_cfg: ModelConfig) -> None:
    """Raise a one-line ValueError if `cfg` cannot hold a checkpoint of config `file_cfg`."""
    names = ("vocab_size", "n_layer", "n_head", "n_embd", "mlp_ratio", "ln_eps")
    bad = [
        f"{n}={getattr(cfg, n)} vs {getattr(file_cfg, n)}"
        for n in names
        if getattr(cfg, n) != getattr(file_cfg, n)
    ]
    if cfg.block_size > file_cfg.block_size:
        bad.append(f"block_size={cfg.block_size} > n_positions={file_cfg.block_size}")
    if bad:
        raise ValueError(f"cfg does not match the checkpoint ({'; '.join(bad)}); pass cfg=None.")


# ------------------------------------------------------------------------------ the name mapping


def params_from_hf(state: Mapping[str, np.ndarray], cfg: ModelConfig) -> Params:
    """Our stacked params from a Hugging Face GPT-2 state dict, cast to cfg.param_dtype.

    Args:
      state: HF names -> arrays, with or without the "transformer." prefix; attention-mask buffers
        and an `lm_head.weight` equal to `wte` are allowed and skipped.
      cfg: the target config; `wpe` is cut to its first `cfg.block_size` rows.

    Returns:
      params in the layout of `jaxrlhf.model` (see its docstring).
    """
    state = {k.removeprefix(_PREFIX): v for k, v in state.items()}
    lm_head = state.pop("lm_head.weight", None)
    if lm_head is not None and not np.array_equal(lm_head, state.get("wte.weight")):
        raise ValueError("lm_head.weight differs from wte.weight; only tied LM heads are supported.")
    wanted = set(_TOP.values()) | {f"h.{i}.{n}" for i in range(cfg.n_layer) for n in _BLOCK.values()}
    unknown = sorted(k for k in state if k not in wanted and not _BUFFERS.fullmatch(k))
    missing = sorted(k for k in wanted if k not in state)
    if unknown or missing:
        raise ValueError(
            f"not a GPT-2 state dict for n_layer={cfg.n_layer}: missing {missing[:5]}, "
            f"unexpected {unknown[:5]}."
        )

    params: Params = {}
    for path, name in _TOP.items():
        array = state[name][: cfg.block_size] if path == ("wpe",) else state[name]
        _set(params, path, array)
    for path, name in _BLOCK.items():
        stacked = np.stack([state[f"h.{i}.{name}"] for i in range(cfg.n_layer)])  # [L, ...]
        _set(params, ("blocks", *path), stacked)

    got = _flatten(params)
    expected = _flatten(jax.eval_shape(functools.partial(init_params, cfg=cfg), jax.random.key(0)))
    wrong = {k: (got[k].shape, e.shape) for k, e in expected.items() if got[k].shape != e.shape}
    if wrong:
        raise ValueError(f"checkpoint shapes do not match cfg (got, want): {wrong}.")
    return jax.tree.map(lambda a: jnp.asarray(a, dtype=cfg.pdtype), params)


def hf_from_params(params: Params, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """A GPT2LMHeadModel state dict ("transformer.*" names; no lm_head, it is tied) of params."""
    host = jax.tree.map(np.asarray, params)
    state = {_PREFIX + name: _get(host, path) for path, name in _TOP.items()}
    for path, name in _BLOCK.items():
        stacked = _get(host, ("blocks", *path))  # [L, ...]
        for i in range(cfg.n_layer):
            state[f"{_PREFIX}h.{i}.{name}"] = np.ascontiguousarray(stacked[i])
    return state


def _get(tree: dict, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def _flatten(tree) -> dict[str, object]:
    """{"blocks/attn/c_attn/kernel": leaf, ...}"""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(k.key) for k in path): leaf for path, leaf in leaves}


# ------------------------------------------------------------------------------------- files, hub


def architecture(hf_config: Mapping, where: str = "config.json") -> str:
    """The transformers class a config.json describes: its `architectures[0]`, else by `model_type`."""
    names = hf_config.get("architectures") or []
    if names:
        return str(names[0])
    by_type = {"gpt2": "GPT2LMHeadModel", **{f: n for n, f in hf_decoders.ARCHITECTURES.items()}}
    if hf_config.get("model_type") in by_type:
        return by_type[hf_config["model_type"]]
    raise ValueError(
        f"{where}: model_type={hf_config.get('model_type')!r} and no architectures; supported: "
        f"{', '.join(CAUSAL_LM + REWARD_MODELS)}"
    )


def _local(path_or_name: str | os.PathLike) -> str:
    directory = os.fspath(path_or_name)
    return directory if os.path.isdir(directory) else _download(directory)


def _unsupported(arch: str, where: str) -> ValueError:
    return ValueError(
        f"{where}/config.json: architecture {arch!r} is not supported; supported causal LMs: "
        f"{', '.join(CAUSAL_LM)}; reward models: {', '.join(REWARD_MODELS)}"
    )


def load(
    path_or_name: str | os.PathLike, cfg: ModelConfig | None = None, *, shardings=None
) -> tuple[Params, ModelConfig]:
    """Load a causal LM checkpoint of any supported architecture (CAUSAL_LM).

    Args:
      path_or_name: a local directory (config.json + model.safetensors or sharded safetensors with their
        index; GPT-2 also pytorch_model.bin), or a hub name (downloaded: online only).
      cfg: None: config.json's architecture, params in the checkpoint's dtype (GPT-2: float32). Otherwise
        it must describe the same architecture; its dtypes, dropout, block size and remat are kept.
      shardings: optional tree of jax.sharding.Sharding like the params; Llama-style checkpoints go onto
        it tensor by tensor (see `hf_decoders.load`).

    Returns:
      (params, cfg).

    Raises:
      ValueError / FileNotFoundError: one line: an unsupported architecture (listing the supported ones),
        a reward model (use `load_reward_model`), a tensor whose shape does not match the config, files
        that are missing, cut short or corrupt.
    """
    directory = _local(path_or_name)
    hf_config = hf_decoders.read_json(os.path.join(directory, "config.json"))
    arch = architecture(hf_config, directory)
    if arch in REWARD_MODELS:
        raise ValueError(
            f"{directory} holds a {arch} (a reward model, no LM head): load it with hf.load_reward_model"
        )
    if arch in hf_decoders.ARCHITECTURES:
        return hf_decoders.load(directory, cfg, shardings=shardings)
    if arch not in _GPT2:
        raise _unsupported(arch, directory)
    params, cfg = load_gpt2(directory, cfg)
    if shardings is not None:
        params = jax.device_put(params, shardings)
    return params, cfg


def load_reward_model(
    path_or_name: str | os.PathLike, cfg: ModelConfig | None = None, *, shardings=None
) -> tuple[Params, ModelConfig]:
    """A one-label `*ForSequenceClassification` checkpoint (REWARD_MODELS) as a scalar model.

    transformers scores a sequence with `score.weight` [1, D] (no bias) on the final hidden state of its
    last non-pad token; `rewards.learned_scores` reads the same state at the last real token of the mask,
    so the scores agree whenever the mask marks the non-pad tokens.

    Args:
      path_or_name: a local directory or a hub name (see `load`).
      cfg: as in `load`; the trunk's LM head is unused, so the config has tie_embeddings=True (no
        lm_head leaf).
      shardings: optional tree of shardings for the trunk ({"gpt": ...}'s params); the head is
        replicated.

    Returns:
      ({"gpt": trunk params, "head": {"kernel": [D] float32, "bias": 0.0}}, cfg).

    Raises:
      ValueError: not a sequence-classification checkpoint, more than one label, or files / tensors as
        in `load`.
    """
    directory = _local(path_or_name)
    hf_config = hf_decoders.read_json(os.path.join(directory, "config.json"))
    arch = architecture(hf_config, directory)
    if arch in CAUSAL_LM:
        raise ValueError(
            f"{directory} holds a {arch}, a language model without a score head: load it with hf.load "
            "(or train a reward model from it)"
        )
    if arch not in REWARD_MODELS:
        raise _unsupported(arch, directory)
    labels = len(hf_config.get("id2label") or {}) or int(hf_config.get("num_labels", 2))
    if labels != 1:
        raise ValueError(
            f"{directory}/config.json: {arch} with {labels} labels; a reward model has one score "
            "(num_labels=1)"
        )
    if arch.startswith("GPT2"):
        state = _read_weights(directory)
        score = state.pop("score.weight", None)
        params, cfg = _gpt2_params(state, directory, cfg)
        if shardings is not None:
            params = jax.device_put(params, shardings)
    else:
        cfg = hf_decoders.resolve_config({**hf_config, "tie_word_embeddings": True}, cfg, directory)
        tensors = hf_decoders.tensor_views(directory)
        score = tensors[hf_decoders.SCORE]() if hf_decoders.SCORE in tensors else None
        params = hf_decoders.load_params(tensors, cfg, directory, shardings=shardings)
    if score is None:
        raise ValueError(
            f"{directory} has no tensor 'score.weight' (the {arch} head); copy the weights again"
        )
    if score.shape != (1, cfg.n_embd):
        raise ValueError(
            f"{directory}: tensor 'score.weight' has shape {score.shape}; the config expects "
            f"{(1, cfg.n_embd)}"
        )
    head = {"kernel": jnp.asarray(np.asarray(score[0], np.float32)), "bias": jnp.zeros((), jnp.float32)}
    return {"gpt": params, "head": head}, cfg


def save(params: Params, cfg: ModelConfig, out_dir: str | os.PathLike, **token_ids) -> None:
    """Write a causal LM for `transformers.AutoModelForCausalLM.from_pretrained`: GPT2LMHeadModel for
    learned positions (`save_gpt2`), else the Llama / Qwen2 / Qwen3 class of its layout
    (`hf_decoders.save`; `architecture="MistralForCausalLM"` to name another). `token_ids`: bos_token_id,
    eos_token_id, pad_token_id for config.json (GPT-2 takes eos_token_id only)."""
    if cfg.position == "learned":
        unknown = set(token_ids) - {"eos_token_id"}
        if unknown:
            raise ValueError(f"save: {sorted(unknown)} do not apply to GPT-2 (it takes eos_token_id only)")
        save_gpt2(params, cfg, out_dir, eos_id=token_ids.get("eos_token_id"))
    else:
        hf_decoders.save(params, cfg, out_dir, **token_ids)


def load_gpt2(path_or_name: str | os.PathLike, cfg: ModelConfig | None = None) -> tuple[Params, ModelConfig]:
    """Load a Hugging Face GPT-2 checkpoint.

    Args:
      path_or_name: a local directory with config.json and model.safetensors (or sharded
        safetensors, or pytorch_model.bin), or a hub name such as "gpt2" (downloaded: online only).
      cfg: None builds the config from config.json. Otherwise its architecture must match the
        checkpoint; dtypes, dropouts and remat are taken from it, and a smaller block_size keeps the
        first block_size position embeddings.

    Returns:
      (params in cfg.param_dtype, cfg).
    """
    directory = _local(path_or_name)
    arch = architecture(hf_decoders.read_json(os.path.join(directory, "config.json")), directory)
    if arch not in _GPT2:
        raise ValueError(f"{directory} holds a {arch}, not GPT-2: load it with hf.load")
    return _gpt2_params(_read_weights(directory), directory, cfg)


def _gpt2_params(state, directory: str, cfg: ModelConfig | None) -> tuple[Params, ModelConfig]:
    file_cfg = read_config(directory)
    if cfg is None:
        cfg = file_cfg
    else:
        check_compatible(cfg, file_cfg)
    return params_from_hf(state, cfg), cfg


def read_config(directory: str | os.PathLike) -> ModelConfig:
    """The ModelConfig of the config.json in a local checkpoint directory (any supported architecture).

    Raises:
      FileNotFoundError / ValueError: one line naming the file when it is missing, not JSON (cut short or
        corrupt), or not a supported architecture.
    """
    path = os.path.join(directory, "config.json")
    hf_config = hf_decoders.read_json(path)
    arch = architecture(hf_config, path)
    if arch not in CAUSAL_LM + REWARD_MODELS:
        raise _unsupported(arch, os.fspath(directory))
    try:
        if arch in _GPT2 or arch.startswith("GPT2"):
            return config_from_hf(hf_config)
        return hf_decoders.config_from_hf(hf_config)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{path}: {err}") from None


def save_gpt2(
    params: Params, cfg: ModelConfig, out_dir: str | os.PathLike, *, eos_id: int | None = None
) -> None:
    """Write config.json + model.safetensors for `transformers.GPT2LMHeadModel.from_pretrained`.

    Weights keep the params' dtype; the tied LM head is left out, as `save_pretrained` does.
    `eos_id` is the tokenizer's end-of-text id (see `config_to_hf` for the default).
    """
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config_to_hf(cfg, eos_id), f, indent=2)
    safetensors.numpy.save_file(
        hf_from_params(params, cfg),
        os.path.join(out_dir, "model.safetensors"),
        metadata={"format": "pt"},  # what save_pretrained writes; transformers 4.x checks it
    )


def _load_safetensors(path: str) -> dict[str, np.ndarray]:
    """A safetensors file's arrays; a cut-short or corrupt file is a one-line ValueError naming it."""
    try:
        return safetensors.numpy.load_file(path)
    except safetensors.SafetensorError as err:
        raise ValueError(
            f"{path}: not a readable safetensors file ({err}): it is truncated or corrupt (an interrupted "
            "download?); copy it again"
        ) from None


def _read_weights(directory: str) -> dict[str, np.ndarray]:
    single = os.path.join(directory, "model.safetensors")
    index = os.path.join(directory, "model.safetensors.index.json")
    torch_bin = os.path.join(directory, "pytorch_model.bin")
    if os.path.isfile(single):
        return _load_safetensors(single)
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(
                f"{index}: not a safetensors index ({type(err).__name__}: {err}); copy it again"
            ) from None
        state = {}
        for shard in shards:
            state.update(_load_safetensors(os.path.join(directory, shard)))
        return state
    if os.path.isfile(torch_bin):
        import torch  # only for legacy checkpoints; not a dependency otherwise

        state = torch.load(torch_bin, map_location="cpu", weights_only=True)
        return {k: (v.float() if v.is_floating_point() else v).numpy() for k, v in state.items()}
    raise FileNotFoundError(
        f"no weights in {directory}: expected model.safetensors, model.safetensors.index.json "
        "or pytorch_model.bin."
    )


def _download(name: str) -> str:
    """Snapshot a hub repo's config and safetensors weights; a one-line error when that fails."""
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(
            name, allow_patterns=["config.json", "*.safetensors", "model.safetensors.index.json"]
        )
    except Exception as err:
        cause = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise OSError(
            f"{name!r} is not a local directory and could not be fetched from the Hugging Face Hub "
            f"({type(err).__name__}: {cause[:200]}); pass a directory with config.json and "
            "model.safetensors, or run once online to fill the hub cache."
        ) from err
