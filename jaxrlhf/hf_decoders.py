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

import dataclasses
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_dtypes
import numpy as np

from jaxrlhf.config import ModelConfig
from jaxrlhf.model import Params

ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
# The same trunks with a one-label score head instead of the LM head (reward models).
SEQUENCE_CLASSIFICATION = {name.replace("ForCausalLM", "ForSequenceClassification"): family
                           for name, family in ARCHITECTURES.items()}  # fmt: skip
_PREFIX = "model."
SCORE = "score.weight"  # a *ForSequenceClassification's head: [num_labels, D], no bias


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
    family = ARCHITECTURES.get(architecture, SEQUENCE_CLASSIFICATION.get(architecture))
    if family is None:
        supported = [*ARCHITECTURES, *SEQUENCE_CLASSIFICATION]
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


def _leaf_builders(
    cfg: ModelConfig, has: Callable[[str], bool], dtype=np.float32
) -> dict[tuple[str, ...], Callable]:
    """Our param path -> build(get) -> that leaf as a NumPy array of `dtype`, where get(name, shape) reads one
    transformers tensor (names without the `model.` prefix). One leaf at a time, so a loader holds at most
    one stacked leaf on the host."""
    L, N, K, H, D, F = cfg.n_layer, cfg.n_head, cfg.kv_heads, cfg.head_dim, cfg.n_embd, cfg.mlp_dim

    def stacked(name, shape, transpose=False):
        def build(get, out=None):  # out: a [L, ..., width] slice of a concatenated leaf to fill
            if out is None:
                out = np.empty((L, *(shape[::-1] if transpose else shape)), dtype)
            for i in range(L):
                x = get(f"layers.{i}.{name}", shape)
                out[i] = x.T if transpose else x
            return out

        build.width = shape[0] if transpose else shape[-1]
        build.lead = shape[1:] if transpose else shape[:-1]
        return build

    def concat(*builders):
        """The builders' leaves side by side on the last axis, written into one array (no temporaries)."""

        def build(get):
            out = np.empty((L, *builders[0].lead, sum(b.width for b in builders)), dtype)
            start = 0
            for b in builders:
                b(get, out[..., start : start + b.width])
                start += b.width
            return out

        return build

    qkv = [("q_proj", N * H), ("k_proj", K * H), ("v_proj", K * H)]
    leaves = {
        ("wte",): lambda get: get("embed_tokens.weight", (cfg.vocab_size, D)).astype(dtype),
        ("ln_f", "scale"): lambda get: get("norm.weight", (D,)).astype(dtype),
        ("blocks", "ln_1", "scale"): stacked("input_layernorm.weight", (D,)),
        ("blocks", "ln_2", "scale"): stacked("post_attention_layernorm.weight", (D,)),
        ("blocks", "attn", "c_attn", "kernel"): concat(
            *[stacked(f"self_attn.{n}.weight", (o, D), transpose=True) for n, o in qkv]
        ),
        ("blocks", "attn", "c_proj", "kernel"): stacked(
            "self_attn.o_proj.weight", (D, N * H), transpose=True
        ),
        ("blocks", "mlp", "c_fc", "kernel"): concat(
            stacked("mlp.gate_proj.weight", (F, D), transpose=True),
            stacked("mlp.up_proj.weight", (F, D), transpose=True),
        ),
        ("blocks", "mlp", "c_proj", "kernel"): stacked("mlp.down_proj.weight", (D, F), transpose=True),
    }
    if cfg.has_qkv_bias:
        leaves[("blocks", "attn", "c_attn", "bias")] = concat(
            *[stacked(f"self_attn.{n}.bias", (o,)) for n, o in qkv]
        )
    if cfg.bias:
        leaves[("blocks", "attn", "c_proj", "bias")] = stacked("self_attn.o_proj.bias", (D,))
    if cfg.qk_norm:
        leaves[("blocks", "attn", "q_norm", "scale")] = stacked("self_attn.q_norm.weight", (H,))
        leaves[("blocks", "attn", "k_norm", "scale")] = stacked("self_attn.k_norm.weight", (H,))
    if not cfg.tie_embeddings:
        name = "lm_head.weight" if has("lm_head.weight") else "embed_tokens.weight"
        leaves[("lm_head",)] = lambda get: get(name, (cfg.vocab_size, D)).astype(dtype)
    return leaves


def _getter(read: Callable[[str], np.ndarray], has: Callable[[str], bool], cfg: ModelConfig, where: str):
    def get(name, shape):
        if not has(name):
            raise ValueError(f"{where} has no tensor {name!r} (expected for a {cfg.n_layer}-layer model)")
        x = read(name)  # its stored dtype; the builders cast
        if x.shape != tuple(shape):
            raise ValueError(
                f"{where}: tensor {name!r} has shape {x.shape}; the config expects {tuple(shape)}"
            )
        return x

    return get


def set_leaf(tree: dict, path: tuple[str, ...], value) -> None:
    """tree[path[0]][path[1]]... = value, creating the dicts on the way."""
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def params_from_hf(state: Mapping[str, np.ndarray], cfg: ModelConfig) -> Params:
    """Our param tree (float32 NumPy leaves) from a transformers state dict of NumPy arrays (`model.`-prefixed
    names, or bare LlamaModel names). Missing or misshapen tensors raise, naming them."""
    state = {(k[len(_PREFIX) :] if k.startswith(_PREFIX) else k): v for k, v in state.items()}
    get = _getter(lambda name: np.asarray(state[name], np.float32), state.__contains__, cfg, "the state dict")
    params: Params = {}
    for path, build in _leaf_builders(cfg, state.__contains__).items():
        set_leaf(params, path, build(get))
    return params


def read_json(path: str) -> dict:
    """A JSON object file (config.json, an index); missing, cut-short or corrupt files are one-line errors
    naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            out = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no {path}: a Hugging Face model directory holds config.json and model.safetensors"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        why = f"{err.msg}: line {err.lineno} column {err.colno}" if hasattr(err, "msg") else "not UTF-8"
        raise ValueError(
            f"{path}: not valid JSON ({why}): the file is truncated or corrupt; copy it again"
        ) from None
    if not isinstance(out, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return out


def tensor_views(directory: str) -> dict[str, Callable[[], np.ndarray]]:
    """name (without the `model.` prefix) -> a function reading that tensor, over every safetensors file of a
    checkpoint directory (model.safetensors, or the shards its index names)."""
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(index):
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: no weight_map object: not a safetensors index; copy it again")
        files = sorted(set(weight_map.values()))
    elif os.path.isfile(os.path.join(directory, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(
            f"no model.safetensors or model.safetensors.index.json in {directory}: save the model with "
            "save_pretrained(..., safe_serialization=True)"
        )
    tensors = {}
    for file in files:
        for name, view in _safetensors_views(os.path.join(directory, file)).items():
            tensors[name[len(_PREFIX) :] if name.startswith(_PREFIX) else name] = view
    return tensors


_ARCH_FIELDS = ("vocab_size", "n_layer", "n_head", "kv_heads", "head_dim", "n_embd", "mlp_dim", "norm",
                "position", "mlp", "bias", "has_qkv_bias", "qk_norm", "tie_embeddings")  # fmt: skip


def resolve_config(hf_config: Mapping, cfg: ModelConfig | None, where: str) -> ModelConfig:
    """The config to load a checkpoint into: config.json's, params in the checkpoint's dtype (cfg None), or
    `cfg` after checking it describes the same architecture (its dtypes, dropout, block size and remat
    are kept)."""
    file_cfg = config_from_hf(hf_config)
    if cfg is None:
        stored = hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32"
        return dataclasses.replace(
            file_cfg, param_dtype=stored if stored in ("float32", "bfloat16") else "float32"
        )
    check_architecture(cfg, file_cfg, where)
    return cfg


def architecture_differences(cfg: ModelConfig, file_cfg: ModelConfig) -> list[str]:
    """["field=ours vs theirs", ...] for every architecture field where the two configs differ."""
    return [f"{n}={getattr(cfg, n)} vs {getattr(file_cfg, n)}" for n in _ARCH_FIELDS
            if getattr(cfg, n) != getattr(file_cfg, n)]  # fmt: skip


def check_architecture(cfg: ModelConfig, file_cfg: ModelConfig, where: str) -> None:
    """Raise a one-line ValueError naming every architecture field where `cfg` differs from the
    config.json of `where` (`file_cfg`)."""
    bad = architecture_differences(cfg, file_cfg)
    if bad:
        raise ValueError(f"cfg does not match {where}/config.json ({'; '.join(bad)}); pass cfg=None")


def load(
    directory: str | os.PathLike, cfg: ModelConfig | None = None, *, shardings: Any = None
) -> tuple[Params, ModelConfig]:
    """Load a Llama / Mistral / Qwen2 / Qwen3 checkpoint directory (config.json + model.safetensors, or
    sharded model-0000k-of-0000n.safetensors + model.safetensors.index.json).

    Tensors are read one at a time from the files and each of our leaves, built in the params' dtype, goes
    to its device (or its sharding in `shardings`, a tree like the params, e.g. parallel.tree_shardings of
    `jax.eval_shape(init_params, ...)`) before the next is built: the host holds at most one leaf beyond
    the loaded params, never a second copy of the model.

    Args:
      directory: the checkpoint directory.
      cfg: None: from config.json, params in the checkpoint's dtype (float32 or bfloat16); otherwise it
        must describe the same architecture (its dtypes, dropout and remat are kept).
      shardings: optional tree of jax.sharding.Sharding for the params.

    Returns:
      (params as jax arrays in cfg.param_dtype, cfg).

    Raises:
      ValueError / FileNotFoundError: one line naming the file, or the tensor and both shapes.
    """
    directory = os.fspath(directory)
    cfg = resolve_config(read_json(os.path.join(directory, "config.json")), cfg, directory)
    return load_params(tensor_views(directory), cfg, directory, shardings=shardings), cfg


def load_params(
    tensors: Mapping[str, Callable[[], np.ndarray]], cfg: ModelConfig, where: str, *, shardings: Any = None
) -> Params:
    """Our params from `tensor_views`, leaf by leaf onto the devices (see `load`)."""
    get = _getter(lambda name: tensors[name](), tensors.__contains__, cfg, where)
    params: Params = {}
    for path, build in _leaf_builders(cfg, tensors.__contains__, np.dtype(cfg.pdtype)).items():
        host = build(get)
        if shardings is None:
            leaf = jax.device_put(host)  # one copy (jnp.asarray of a bfloat16 array makes two)
        else:
            sharding = shardings
            for name in path:
                sharding = sharding[name]
            leaf = jax.device_put(host, sharding)
        jax.block_until_ready(leaf)
        del host  # the host copy goes before the next leaf is built
        set_leaf(params, path, leaf)
    return params


def architecture_for(cfg: ModelConfig) -> str:
    """The transformers class whose layout `cfg` has: Qwen3 (qk-norm), Qwen2 (q / k / v biases only), else
    Llama."""
    if cfg.qk_norm:
        return "Qwen3ForCausalLM"
    if cfg.has_qkv_bias and not cfg.bias:
        return "Qwen2ForCausalLM"
    return "LlamaForCausalLM"


def save(
    params: Params,
    cfg: ModelConfig,
    out_dir: str | os.PathLike,
    *,
    architecture: str | None = None,
    max_shard_bytes: int = 2 << 30,
    **token_ids,
) -> None:
    """Write config.json + safetensors that `transformers.AutoModelForCausalLM.from_pretrained` loads.

    Weights keep the params' dtype. Layers are converted and written a shard at a time (several
    model-0000k-of-0000n.safetensors + an index once the model passes `max_shard_bytes`), so the host
    never holds a converted copy of the whole model.

    Args:
      params: the decoder's params (jax or NumPy arrays, sharded or not).
      cfg: their config.
      out_dir: the directory to write (created).
      architecture: a key of ARCHITECTURES; None: `architecture_for(cfg)`.
      max_shard_bytes: the largest shard file.
      **token_ids: bos_token_id / eos_token_id / pad_token_id for config.json.
    """
    architecture = architecture or architecture_for(cfg)
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture {architecture!r}; use one of {', '.join(ARCHITECTURES)}")
    config = config_to_hf(cfg, architecture, **token_ids)
    dtype = np.dtype(jax.tree.leaves(params)[0].dtype)
    config["dtype"] = "bfloat16" if dtype == ml_dtypes.bfloat16 else "float32"
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    shards, current, size = [], {}, 0
    for name, array in _export_tensors(params, cfg, dtype, tied_head=False):
        if current and size + array.nbytes > max_shard_bytes:
            shards.append(_write_shard(out_dir, len(shards), current))
            current, size = {}, 0
        current[name] = array
        size += array.nbytes
    shards.append(_write_shard(out_dir, len(shards), current))
    final = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    if len(shards) == 1:
        final = ["model.safetensors"]
    weight_map = {}
    for (tmp, names), name in zip(shards, final, strict=True):
        os.replace(tmp, os.path.join(out_dir, name))
        weight_map.update(dict.fromkeys(names, name))
    if len(shards) > 1:
        total = sum(os.path.getsize(os.path.join(out_dir, f)) for f in final)
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)


def _write_shard(out_dir: str, i: int, tensors: dict[str, np.ndarray]) -> tuple[str, list[str]]:
    import safetensors.numpy

    path = os.path.join(out_dir, f".shard-{i}.safetensors.tmp")
    safetensors.numpy.save_file(tensors, path, metadata={"format": "pt"})
    return path, list(tensors)


_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}  # fmt: skip


def _safetensors_views(path: str) -> dict[str, Callable[[], np.ndarray]]:
    """name -> a function that reads that tensor of the safetensors file `path` into a new NumPy array.

    The format is an 8-byte little-endian header length, a JSON header {name: {dtype, shape,
    data_offsets}} and the raw bytes. Reading it directly gives bfloat16 too (ml_dtypes), which the
    safetensors package's NumPy reader cannot, and reads only the tensor asked for, into memory that is
    freed with the array (no memory map whose pages would stay resident).
    """
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        try:
            header = json.loads(f.read(size))
            assert isinstance(header, dict)
        except (ValueError, AssertionError, MemoryError, OverflowError):
            raise ValueError(
                f"{path}: not a readable safetensors file (its header is cut or corrupt): an interrupted "
                "download? copy it again"
            ) from None
    header.pop("__metadata__", None)
    unknown = {info.get("dtype") for info in header.values()} - set(_SAFETENSORS_DTYPES)
    if unknown:
        raise ValueError(f"{path}: tensors of dtype {sorted(map(str, unknown))} are not supported")
    base = 8 + size

    def read(info):
        start, end = info["data_offsets"]
        out = np.empty(info["shape"], _SAFETENSORS_DTYPES[info["dtype"]])
        with open(path, "rb") as f:
            f.seek(base + start)
            if f.readinto(memoryview(out.reshape(-1).view(np.uint8))) != end - start:
                raise ValueError(f"{path} is truncated: tensor data ends early (re-download it)")
        return out

    return {name: (lambda info=info: read(info)) for name, info in header.items()}


def hf_from_params(params: Params, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """The transformers state dict (float32 NumPy, `model.`-prefixed, plus lm_head.weight) of our params."""
    return dict(_export_tensors(params, cfg, np.dtype(np.float32)))


def _export_tensors(params: Params, cfg: ModelConfig, dtype: np.dtype, tied_head: bool = True):
    """Yield (transformers name, NumPy array of `dtype`), one layer's slices at a time; `tied_head` False
    leaves out a tied lm_head.weight (as save_pretrained does)."""

    def host(x, i=None):
        return np.ascontiguousarray(np.asarray(x if i is None else x[i]).astype(dtype, copy=False))

    b = params["blocks"]
    N, K, H, F = cfg.n_head, cfg.kv_heads, cfg.head_dim, cfg.mlp_dim
    splits = [N * H, (N + K) * H]
    yield "model.embed_tokens.weight", host(params["wte"])
    yield "model.norm.weight", host(params["ln_f"]["scale"])
    if tied_head or not cfg.tie_embeddings:
        yield "lm_head.weight", host(params["wte" if cfg.tie_embeddings else "lm_head"])
    for i in range(cfg.n_layer):
        pre = f"model.layers.{i}."
        q, k, v = np.split(host(b["attn"]["c_attn"]["kernel"], i), splits, axis=-1)
        for name, w in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
            yield pre + f"self_attn.{name}.weight", np.ascontiguousarray(w.T)
        if cfg.has_qkv_bias:
            biases = np.split(host(b["attn"]["c_attn"]["bias"], i), splits)
            for name, w in zip(("q_proj", "k_proj", "v_proj"), biases, strict=True):
                yield pre + f"self_attn.{name}.bias", w
        yield pre + "self_attn.o_proj.weight", np.ascontiguousarray(host(b["attn"]["c_proj"]["kernel"], i).T)
        if cfg.bias:
            yield pre + "self_attn.o_proj.bias", host(b["attn"]["c_proj"]["bias"], i)
        if cfg.qk_norm:
            yield pre + "self_attn.q_norm.weight", host(b["attn"]["q_norm"]["scale"], i)
            yield pre + "self_attn.k_norm.weight", host(b["attn"]["k_norm"]["scale"], i)
        gate, up = np.split(host(b["mlp"]["c_fc"]["kernel"], i), [F], axis=-1)
        yield pre + "mlp.gate_proj.weight", np.ascontiguousarray(gate.T)
        yield pre + "mlp.up_proj.weight", np.ascontiguousarray(up.T)
        yield pre + "mlp.down_proj.weight", np.ascontiguousarray(host(b["mlp"]["c_proj"]["kernel"], i).T)
        yield pre + "input_layernorm.weight", host(b["ln_1"]["scale"], i)
        yield pre + "post_attention_layernorm.weight", host(b["ln_2"]["scale"], i)
