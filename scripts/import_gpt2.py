"""Import GPT-2 weights from Hugging Face into jaxrlhf's param layout.

  python scripts/import_gpt2.py gpt2 gpt2.safetensors          # a hub name (online once)
  python scripts/import_gpt2.py path/to/hf_checkpoint gpt2.npz  # a local transformers directory

The output holds our params flat, keyed by '/'-joined paths ("blocks/attn/c_attn/kernel"), and
the ModelConfig as JSON (safetensors metadata "config", or the npz entry "config"). `load_flat`
reads it back as (params, cfg).
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import jax
import numpy as np
import safetensors.numpy

from jaxrlhf.config import ModelConfig
from jaxrlhf.hf import load_gpt2


def save_flat(params, cfg: ModelConfig, path: str) -> None:
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    flat = {"/".join(k.key for k in keys): np.asarray(leaf) for keys, leaf in leaves}
    config = json.dumps(dataclasses.asdict(cfg))
    if path.endswith(".npz"):
        np.savez(path, config=np.array(config), **flat)
    else:
        safetensors.numpy.save_file(flat, path, metadata={"config": config})


def load_flat(path: str):
    """(params as nested dicts of numpy arrays, ModelConfig) from a file `save_flat` wrote."""
    if path.endswith(".npz"):
        with np.load(path) as data:
            flat = {k: data[k] for k in data.files}
        config = str(flat.pop("config"))
    else:
        with safetensors.safe_open(path, framework="numpy") as f:
            config = f.metadata()["config"]
        flat = safetensors.numpy.load_file(path)
    params: dict = {}
    for name, array in flat.items():
        *parents, leaf = name.split("/")
        node = params
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = array
    return params, ModelConfig(**json.loads(config))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("source", help="a local Hugging Face GPT-2 directory or a hub name (gpt2, ...)")
    parser.add_argument("out", help="output file: .safetensors or .npz")
    args = parser.parse_args(argv)
    params, cfg = load_gpt2(args.source)
    save_flat(params, cfg, args.out)
    print(f"wrote {args.out}: {cfg.num_params:,} params, {cfg}")


if __name__ == "__main__":
    main()
