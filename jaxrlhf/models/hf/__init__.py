"""Hugging Face `transformers` checkpoints (config.json + safetensors) in and out, for every family.

    load(dir_or_name, cfg=None)            a causal LM of any supported family -> (params, cfg)
    load_reward_model(dir, cfg=None)       a one-label *ForSequenceClassification -> ({"gpt", "head"}, cfg),
                                           ArmoRM's LlamaForRewardModelWithGating -> ({"gpt", "armorm"}, cfg)
    save(params, cfg, out_dir, **ids)      the family's *ForCausalLM (`cfg.hf_family`), safetensors sharded
    save_reward_model(params, cfg, out)    the family's *ForSequenceClassification
    read_config(dir), config_from_hf(d), config_to_hf(cfg), params_from_hf(state, cfg), hf_from_params(...)
    architecture_differences(cfg, file_cfg)   the one architecture check

Each family is a module with its config mapping and ONE name table (`tensors(cfg)`) that both import and
export run through (`convert`); `files` is the one safetensors / JSON reader. Adding a family is a module
here and a few ModelConfig fields (docs/models.md). `transformers` itself is never imported.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping
from types import ModuleType

import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf.models import transformer
from jaxrlhf.models.config import HUB_PRESETS, ModelConfig
from jaxrlhf.models.hf import armorm, files, gpt2, llama
from jaxrlhf.models.hf.convert import architecture_differences, params_from_tensors, tensors_from_params
from jaxrlhf.models.hf.files import read_json

__all__ = [
    "CAUSAL_LM",
    "REWARD_MODELS",
    "architecture_differences",
    "config_from_hf",
    "config_to_hf",
    "hf_from_params",
    "load",
    "load_reward_model",
    "params_from_hf",
    "read_config",
    "read_json",
    "save",
    "save_reward_model",
]

_MODULES = (gpt2, llama)
FAMILY_MODULES: dict[str, ModuleType] = {
    family: m for m in _MODULES for family in {*m.ARCHITECTURES.values(), *m.REWARD_ARCHITECTURES.values()}
}
CAUSAL_LM = tuple(name for m in _MODULES for name in m.ARCHITECTURES)
REWARD_MODELS = tuple(name for m in _MODULES for name in m.REWARD_ARCHITECTURES)
_BY_ARCH = {
    name: family for m in _MODULES for name, family in {**m.ARCHITECTURES, **m.REWARD_ARCHITECTURES}.items()
}
SCORE = "score.weight"  # a *ForSequenceClassification's head: [num_labels, D], no bias
SCORE_BIAS = "jaxrlhf_score_bias"  # config.json key of our head's bias, which transformers' score lacks
_DTYPES = ("float32", "bfloat16", "float16")


def architecture(hf_config: Mapping, where: str = "config.json") -> str:
    """The transformers class a config.json describes: its `architectures[0]`, else by `model_type`."""
    names = hf_config.get("architectures") or []
    if names:
        return str(names[0])
    by_type = {"gpt2": "GPT2LMHeadModel", **{f: n for n, f in llama.ARCHITECTURES.items()}}
    if hf_config.get("model_type") in by_type:
        return by_type[hf_config["model_type"]]
    raise ValueError(
        f"{where}: model_type={hf_config.get('model_type')!r} and no architectures; supported: "
        f"{', '.join(CAUSAL_LM + REWARD_MODELS)}"
    )


def _unsupported(arch: str, where: str) -> ValueError:
    return ValueError(
        f"{where}/config.json: architecture {arch!r} is not supported; supported causal LMs: "
        f"{', '.join(CAUSAL_LM)}; reward models: {', '.join(REWARD_MODELS)}"
    )


def _module(cfg_or_family) -> ModuleType:
    family = cfg_or_family if isinstance(cfg_or_family, str) else cfg_or_family.hf_family
    return FAMILY_MODULES[family]


def config_from_hf(hf_config: Mapping) -> ModelConfig:
    """The ModelConfig of a config.json dict of any supported architecture (its family recorded)."""
    arch = architecture(hf_config)
    if arch not in _BY_ARCH:
        raise ValueError(f"architecture {arch!r} is not supported; supported: {', '.join(_BY_ARCH)}")
    return _module(_BY_ARCH[arch]).config_from_hf(hf_config)


def config_to_hf(cfg: ModelConfig, *, reward_model: bool = False, **token_ids) -> dict:
    """The config.json dict of `cfg` as its family's *ForCausalLM (or *ForSequenceClassification)."""
    module = _module(cfg)
    names = module.REWARD_ARCHITECTURES if reward_model else module.ARCHITECTURES
    arch = next(name for name, family in names.items() if family == cfg.hf_family)
    out = module.config_to_hf(cfg, arch, **token_ids)
    if reward_model:
        out.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    return out


def read_config(directory: str | os.PathLike) -> ModelConfig:
    """The ModelConfig of the config.json of a local checkpoint directory (any supported architecture).

    Raises:
      FileNotFoundError / ValueError: one line naming the file: missing, not JSON, a field missing or of
        the wrong type, or an unsupported architecture.
    """
    path = os.path.join(directory, "config.json")
    hf_config = read_json(path, "a Hugging Face config.json")
    arch = architecture(hf_config, path)
    if arch not in _BY_ARCH:
        raise _unsupported(arch, os.fspath(directory))
    try:
        return config_from_hf(hf_config)
    except (ValueError, TypeError, KeyError) as err:
        raise ValueError(f"{path}: {err}") from None


def _resolve(directory: str, hf_config: Mapping, cfg: ModelConfig | None) -> ModelConfig:
    """The config to load a checkpoint into: config.json's with params in the checkpoint's stored dtype
    (float32, bfloat16 or float16), or `cfg` after checking it describes the same architecture (its
    dtypes, dropout, block size, remat and family are kept)."""
    try:
        file_cfg = config_from_hf(hf_config)
    except (ValueError, TypeError, KeyError) as err:
        raise ValueError(f"{directory}/config.json: {err}") from None
    if cfg is None:
        stored = hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32"
        return dataclasses.replace(file_cfg, param_dtype=stored if stored in _DTYPES else "float32")
    bad = architecture_differences(cfg, file_cfg)
    if bad:
        raise ValueError(f"cfg does not match {directory}/config.json ({'; '.join(bad)}); pass cfg=None")
    return cfg


@functools.cache
def _leaf_shapes(cfg: ModelConfig) -> dict[tuple, tuple]:
    shapes = jax.eval_shape(functools.partial(transformer.init_params, cfg=cfg), jax.random.key(0))
    return {tuple(k.key for k in path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]}  # fmt: skip


def _strip(names, prefix: str) -> dict[str, str]:
    """file name -> table name: the trunk prefix removed where a file carries it."""
    return {n: n[len(prefix) :] if n.startswith(prefix) else n for n in names}


def _read(views: Mapping, cfg: ModelConfig, where: str, *, extra=(), shardings=None):
    module = _module(cfg)
    views = {table: views[name] for name, table in _strip(views, module.PREFIX).items()}

    def skip(name: str) -> bool:
        try:
            return name in extra or module.skip(name, views)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None

    return params_from_tensors(
        module.tensors(cfg),
        cfg,
        views,
        _leaf_shapes(cfg),
        where,
        cfg.hf_family,
        skip=skip,
        shardings=shardings,
    )


def params_from_hf(state: Mapping[str, np.ndarray], cfg: ModelConfig) -> transformer.Params:
    """Our params from a transformers state dict of NumPy arrays (prefixed names or not), in
    cfg.param_dtype. Missing, misshapen and unexpected tensors raise, naming them."""
    return _read({k: (lambda v=v: np.asarray(v)) for k, v in state.items()}, cfg, "the state dict")


def hf_from_params(params: transformer.Params, cfg: ModelConfig, dtype=np.float32) -> dict[str, np.ndarray]:
    """The transformers state dict of our params (the family's prefixed names; an untied head as
    lm_head.weight), as NumPy arrays of `dtype`."""
    module = _module(cfg)
    return {_prefixed(module, n): x for n, x in tensors_from_params(module.tensors(cfg), cfg, params, dtype)}


def _prefixed(module, name: str) -> str:
    return name if name in ("lm_head.weight", SCORE) else module.PREFIX + name


def load(
    path_or_name: str | os.PathLike, cfg: ModelConfig | None = None, *, shardings=None
) -> tuple[transformer.Params, ModelConfig]:
    """Load a causal LM checkpoint of any supported family (CAUSAL_LM).

    Tensors are read one at a time and each of our leaves goes to its device (or its sharding in
    `shardings`, a tree like the params) before the next is built: the host holds at most one leaf beyond
    the loaded params.

    Args:
      path_or_name: a local directory (config.json + model.safetensors, sharded safetensors with their
        index, or a legacy pytorch_model.bin), or a GPT-2 hub name (downloaded: online only).
      cfg: None: config.json's architecture, params in the checkpoint's dtype (float32, bfloat16 or
        float16, as stored). Otherwise it must describe the same architecture; its dtypes, dropout,
        block size and remat are kept.
      shardings: optional tree of jax.sharding.Sharding like the params.

    Returns:
      (params, cfg).

    Raises:
      ValueError / FileNotFoundError: one line: an unsupported architecture (listing the supported ones),
        a reward model (use `load_reward_model`), a tensor missing, unexpected or of another shape than
        config.json implies, a tensor holding NaN or inf, files missing, cut short or corrupt.
    """
    directory = files.local_dir(path_or_name, HUB_PRESETS)
    hf_config = read_json(os.path.join(directory, "config.json"), "a Hugging Face config.json")
    arch = architecture(hf_config, directory)
    if arch in REWARD_MODELS:
        raise ValueError(
            f"{directory} holds a {arch} (a reward model, no LM head): load it with hf.load_reward_model"
        )
    if arch not in CAUSAL_LM:
        raise _unsupported(arch, directory)
    cfg = _resolve(directory, hf_config, cfg)
    return _read(files.tensor_views(directory), cfg, directory, shardings=shardings), cfg


def load_reward_model(
    path_or_name: str | os.PathLike,
    cfg: ModelConfig | None = None,
    *,
    shardings=None,
    gating_pattern: tuple[int, ...] | None = None,
) -> tuple[dict, ModelConfig]:
    """A one-label `*ForSequenceClassification` checkpoint (REWARD_MODELS) as a scalar model, or an ArmoRM.

    transformers scores a sequence with `score.weight` [1, D] (no bias) on the final hidden state of its
    last non-pad token; `models.sequence_scores` reads the same state at the last real token of the mask,
    so the scores agree whenever the mask marks the non-pad tokens.

    An ArmoRM (RLHFlow's `LlamaForRewardModelWithGating`) loads as {"gpt": trunk, "armorm": head}
    (`models.armorm`): `models.sequence_scores` gives its gated score, `models.armorm_outputs` the score,
    the per-objective rewards and the gate. `gating_pattern` (ArmoRM only): the token ids the gate reads
    the prompt at; default config.json's `gating_token_pattern`, else Llama 3's assistant header ids.

    Args:
      path_or_name: a local directory (see `load`).
      cfg: as in `load`; the trunk's LM head is unused, so the config has tie_embeddings=True.
      shardings: optional tree of shardings for the trunk; the head is replicated.

    Returns:
      ({"gpt": trunk params, "head": {"kernel": [D] float32, "bias": [] float32}}, cfg).
    """
    directory = files.local_dir(path_or_name)
    hf_config = read_json(os.path.join(directory, "config.json"), "a Hugging Face config.json")
    arch = architecture(hf_config, directory)
    if arch in CAUSAL_LM:
        raise ValueError(
            f"{directory} holds a {arch}, a language model without a score head: load it with hf.load "
            "(or train a reward model from it)"
        )
    if arch not in REWARD_MODELS:
        raise _unsupported(arch, directory)
    if arch == armorm.ARCHITECTURE:
        return _load_armorm(directory, hf_config, cfg, shardings, gating_pattern)
    if gating_pattern is not None:
        raise ValueError(
            f"gating_pattern is for ArmoRM ({armorm.ARCHITECTURE}) only; {directory} holds a {arch}"
        )
    labels = len(hf_config.get("id2label") or {}) or int(hf_config.get("num_labels", 2))
    if labels != 1:
        raise ValueError(
            f"{directory}/config.json: {arch} with {labels} labels; a reward model has one score "
            "(num_labels=1)"
        )
    cfg = _resolve(directory, {**hf_config, "tie_word_embeddings": True}, cfg)
    views = files.tensor_views(directory)
    if SCORE not in views:
        raise ValueError(
            f"{directory} has no tensor 'score.weight' (the {arch} head); copy the weights again"
        )
    score = views[SCORE]()
    if score.shape != (1, cfg.n_embd):
        raise ValueError(
            f"{directory}: tensor 'score.weight' has shape {score.shape}; the config expects "
            f"{(1, cfg.n_embd)}"
        )
    params = _read(views, cfg, directory, extra={SCORE}, shardings=shardings)
    head = {
        "kernel": jnp.asarray(np.asarray(score[0], np.float32)),
        "bias": jnp.asarray(float(hf_config.get(SCORE_BIAS, 0.0)), jnp.float32),
    }
    return {"gpt": params, "head": head}, cfg


def _load_armorm(directory: str, hf_config: dict, cfg, shardings, pattern) -> tuple[dict, ModelConfig]:
    """An ArmoRM directory: the Llama trunk (`model.*`) and the gated head (`hf.armorm`), both checked."""
    cfg = _resolve(directory, {**hf_config, "tie_word_embeddings": True}, cfg)
    views = files.tensor_views(directory)
    head = armorm.read_head(views, hf_config, directory, pattern)
    extra = {name for name in views if armorm.is_head_tensor(name)}
    return {"gpt": _read(views, cfg, directory, extra=extra, shardings=shardings), "armorm": head}, cfg


def _write(tensors, cfg: ModelConfig, config: dict, out_dir, dtype, max_shard_bytes: int) -> None:
    config["dtype"] = {np.dtype(jnp.bfloat16): "bfloat16", np.dtype(np.float16): "float16"}.get(
        np.dtype(dtype), "float32")  # fmt: skip
    out_dir = os.fspath(out_dir)
    files.write_safetensors(out_dir, tensors, max_shard_bytes=max_shard_bytes)
    files.write_json(os.path.join(out_dir, "config.json"), config)


def save(
    params: transformer.Params,
    cfg: ModelConfig,
    out_dir: str | os.PathLike,
    *,
    max_shard_bytes: int = 2 << 30,
    **token_ids,
) -> None:
    """Write config.json + safetensors that `transformers.AutoModelForCausalLM.from_pretrained` loads, as
    the family's class (`cfg.hf_family`: a Mistral is saved as MistralForCausalLM). Weights keep the
    params' dtype; a tied head is left out (as save_pretrained does); layers are converted and written a
    shard at a time (several files + an index past `max_shard_bytes`). `token_ids`: bos_token_id,
    eos_token_id, pad_token_id for config.json."""
    module = _module(cfg)
    dtype = np.dtype(jax.tree.leaves(params)[0].dtype)
    tensors = (
        (_prefixed(module, n), x) for n, x in tensors_from_params(module.tensors(cfg), cfg, params, dtype)
    )
    _write(tensors, cfg, config_to_hf(cfg, **token_ids), out_dir, dtype, max_shard_bytes)


def save_reward_model(
    params: dict, cfg: ModelConfig, out_dir: str | os.PathLike, *, max_shard_bytes: int = 2 << 30, **token_ids
) -> None:
    """Write a scalar model {"gpt", "head"} as the family's one-label *ForSequenceClassification. Its
    score has no bias: our head's bias goes to config.json (`jaxrlhf_score_bias`, read back by
    `load_reward_model`); transformers' scores are ours minus it (the same ranking)."""
    transformer.check_scalar_model(params, cfg)
    module = _module(cfg)
    trunk_cfg = dataclasses.replace(cfg, tie_embeddings=True)
    dtype = np.dtype(jax.tree.leaves(params["gpt"])[0].dtype)
    table = [t for t in module.tensors(trunk_cfg) if t.path != ("lm_head",)]

    def tensors():
        for n, x in tensors_from_params(table, trunk_cfg, params["gpt"], dtype):
            yield _prefixed(module, n), x
        yield SCORE, np.asarray(params["head"]["kernel"], dtype).reshape(1, -1)

    config = config_to_hf(trunk_cfg, reward_model=True, **token_ids)
    config[SCORE_BIAS] = float(params["head"]["bias"])
    _write(tensors(), trunk_cfg, config, out_dir, dtype, max_shard_bytes)
