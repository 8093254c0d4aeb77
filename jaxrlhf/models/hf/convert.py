"""Hugging Face tensors <-> our params through a family's name table, the one architecture check.

A family's table (`gpt2.tensors(cfg)`, `llama.tensors(cfg)`) lists, for each of our leaves, the
transformers tensors it is made of; the same table reads a checkpoint (`params_from_tensors`) and writes
one (`tensors_from_params`), so import and export cannot disagree. Names are written without the family's
trunk prefix ("transformer." / "model."), which files may or may not carry; "{i}" stands for the layer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np

from jaxrlhf.models.config import ModelConfig

Params = dict


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One leaf of ours and the transformers tensors it is made of.

    Attributes:
      path: our leaf, e.g. ("blocks", "attn", "c_attn", "kernel").
      names: transformers names; with "{i}" the leaf is stacked over the L layers. Several names are
        concatenated along our last axis, in order (Llama's q / k / v into one c_attn kernel).
      transpose: transformers stores the tensor [out, in] (torch.nn.Linear); ours is [in, out].
      split: the widths of the concatenated tensors along our last axis (with several names).
      rows: keep the first `rows(cfg)` rows of the tensor (GPT-2's position table cut to block_size).
    """

    path: tuple[str, ...]
    names: tuple[str, ...]
    transpose: bool = False
    split: Callable[[ModelConfig], tuple[int, ...]] | None = None
    rows: Callable[[ModelConfig], int] | None = None

    @property
    def layered(self) -> bool:
        return "{i}" in self.names[0]


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def expected_shapes(table: list[Tensor], cfg: ModelConfig, leaf_shapes: Mapping) -> dict[str, tuple]:
    """transformers name (layer 0's for stacked leaves) -> the shape the config expects of it."""
    out = {}
    for t in table:
        shape = tuple(leaf_shapes[t.path])
        if t.layered:
            shape = shape[1:]
        widths = _widths(t, cfg, shape)
        for name, width in zip(t.names, widths, strict=True):
            part = (*shape[:-1], width) if len(shape) else shape
            out[name.format(i=0)] = tuple(part[::-1]) if t.transpose else tuple(part)
    return out


def _widths(t: Tensor, cfg: ModelConfig, shape: tuple) -> tuple[int, ...]:
    if len(t.names) == 1:
        return (shape[-1] if shape else None,)
    return t.split(cfg)


def params_from_tensors(
    table: list[Tensor],
    cfg: ModelConfig,
    read: Mapping[str, Callable[[], np.ndarray]],
    leaf_shapes: Mapping[tuple, tuple],
    where: str,
    family: str,
    *,
    skip: Callable[[str], bool] = lambda name: False,
    shardings: Any = None,
    dtype=None,
) -> Params:
    """Our params from a checkpoint's tensors, one leaf at a time onto the devices.

    Every tensor is checked: a missing one, one of another shape, and one that no entry of the table
    reads (a file with more layers than the config, an untied head the config ties, ...) are one-line
    ValueErrors naming it. Each leaf is built on the host in `dtype` (default: the config's param dtype),
    placed (on its sharding from `shardings`, a tree like the params, if given) and its host copy freed
    before the next is built: the host never holds a second copy of the model.

    Args:
      table: the family's name table for `cfg`.
      cfg: the config the params are for.
      read: transformers name (without the trunk prefix) -> a function returning the tensor.
      leaf_shapes: our leaf path -> its shape (from `jax.eval_shape(init_params, ...)`).
      where: the file or directory, for messages.
      family: the family's name, for messages.
      skip: names the caller reads itself or that carry nothing (buffers, a score head).
      shardings: optional shardings of the params.
      dtype: the leaves' dtype.
    """
    dtype = np.dtype(cfg.pdtype if dtype is None else dtype)
    wanted = {
        n.format(i=i) for t in table for n in t.names for i in (range(cfg.n_layer) if t.layered else [0])
    }
    missing = sorted(n for n in wanted if n not in read)
    if missing:
        raise ValueError(
            f"{where} has no tensor {missing[0]!r} (expected for a {cfg.n_layer}-layer {family} model of "
            f"its config; missing {missing[:5]})"
        )
    unexpected = sorted(n for n in read if n not in wanted and not skip(n))
    if unexpected:
        raise ValueError(
            f"{where} holds tensors a {cfg.n_layer}-layer {family} model of its config does not have: "
            f"unexpected {unexpected[:5]}; the weights and config.json disagree (num_hidden_layers / "
            "n_layer, tie_word_embeddings?)"
        )
    shapes = expected_shapes(table, cfg, leaf_shapes)

    def get(t: Tensor, name: str, i: int) -> np.ndarray:
        """The tensor `name` of layer i, its rows cut (`t.rows`), checked against the config's shape."""
        x = read[name.format(i=i)]()
        cut = x[: t.rows(cfg)] if t.rows is not None else x
        want = shapes[name.format(i=0)]
        if cut.shape != want:
            raise ValueError(
                f"{where}: tensor {name.format(i=i)!r} has shape {x.shape}; the config expects {want}"
            )
        return cut.T if t.transpose else cut

    params: Params = {}
    for t in table:
        host = np.empty(tuple(leaf_shapes[t.path]), dtype)
        for i in range(cfg.n_layer) if t.layered else [None]:
            out = host if i is None else host[i]
            if len(t.names) == 1:
                out[...] = get(t, t.names[0], i or 0)
                continue
            start = 0
            for name in t.names:
                x = get(t, name, i or 0)
                out[..., start : start + x.shape[-1]] = x
                start += x.shape[-1]
        if shardings is None:
            leaf = jax.device_put(host)  # one copy (jnp.asarray of a bfloat16 array makes two)
        else:
            leaf = jax.device_put(host, _get(shardings, t.path))
        jax.block_until_ready(leaf)
        del host
        _set(params, t.path, leaf)
    return params


def tensors_from_params(
    table: list[Tensor], cfg: ModelConfig, params: Params, dtype=None
) -> Iterator[tuple[str, np.ndarray]]:
    """(transformers name without the trunk prefix, NumPy array) for every tensor of the table, one
    layer's slice at a time, in `dtype` (default: the params' own)."""
    for t in table:
        leaf = _get(params, t.path)
        layers = range(cfg.n_layer) if t.layered else [None]
        for i in layers:
            x = np.asarray(leaf if i is None else leaf[i])
            if dtype is not None:
                x = x.astype(dtype, copy=False)
            widths = _widths(t, cfg, x.shape)
            parts = [x] if len(t.names) == 1 else np.split(x, np.cumsum(widths)[:-1], axis=-1)
            for name, part in zip(t.names, parts, strict=True):
                yield name.format(i=i or 0), np.ascontiguousarray(part.T if t.transpose else part)


# The fields that make an architecture: a checkpoint loads into a config only where they all agree (dtypes,
# dropout, block size, remat and the export family may differ).
ARCH_FIELDS = ("vocab_size", "n_layer", "n_head", "kv_heads", "head_dim", "n_embd", "mlp_dim", "norm",
               "position", "mlp", "bias", "has_qkv_bias", "qk_norm", "tie_embeddings", "rope_theta",
               "rope_scaling", "ln_eps")  # fmt: skip


def architecture_differences(cfg: ModelConfig, file_cfg: ModelConfig) -> list[str]:
    """["field=ours vs the file's", ...] for every architecture field where `cfg` cannot hold weights of
    `file_cfg` (learned positions: a block size beyond the file's position table too)."""
    bad = [f"{n}={getattr(cfg, n)} vs {getattr(file_cfg, n)}" for n in ARCH_FIELDS
           if getattr(cfg, n) != getattr(file_cfg, n)]  # fmt: skip
    if cfg.position == "learned" and cfg.block_size > file_cfg.block_size:
        bad.append(f"block_size={cfg.block_size} > n_positions={file_cfg.block_size}")
    return bad
