"""Peak host memory of importing a Hugging Face Llama-style checkpoint with `jaxrlhf.hf_decoders.load`.

Writes a random LlamaForCausalLM of about --gb GB (bfloat16, sharded safetensors as save_pretrained
writes them), then loads it in a fresh process twice: with `hf.load` (memory-mapped, one leaf at a
time) and, for comparison, by reading the whole state dict first (`safetensors.torch.load_file` of every
shard, then `params_from_hf`), the naive way. Reports each process's peak RSS above its RSS after
`import jax` (VmHWM - VmRSS) against the checkpoint's size on disk.

  python scripts/bench_hf_import.py --out bench_hf_import.json [--gb 1.0] [--dir /tmp/bench_hf_ckpt]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CHILD = r"""
import json, sys, time
import jax, jax.numpy as jnp
def status_mb(field):  # VmHWM, not ru_maxrss: that one carries the parent's peak across fork + exec
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
base = status_mb("VmRSS")
from jaxrlhf.models import hf
t0 = time.perf_counter()
if sys.argv[2] == "load":
    params, cfg = hf.load(sys.argv[1])
else:
    import glob, safetensors.torch
    state = {}
    for f in sorted(glob.glob(sys.argv[1] + "/model-*.safetensors")):
        state.update({k: v.float().numpy() for k, v in safetensors.torch.load_file(f).items()})
    cfg = hf.config_from_hf(json.load(open(sys.argv[1] + "/config.json")))
    params = jax.tree.map(lambda x: jnp.asarray(x, cfg.pdtype), hf.params_from_hf(state, cfg))
    del state
jax.block_until_ready(params)
seconds = time.perf_counter() - t0
peak = status_mb("VmHWM")
n = sum(x.size for x in jax.tree.leaves(params))
print(json.dumps({"baseline_rss_mb": base, "peak_rss_mb": peak, "seconds": seconds, "params": int(n)}))
"""


def write_checkpoint(directory: str, gb: float) -> dict:
    import torch
    import transformers

    # Width 1024, GQA 16 / 4 heads, SwiGLU 2816, vocab 32000: ~49M params per 4 layers + 66M embeddings.
    per_layer = 1024 * (1024 + 2 * 256) + 1024 * 1024 + 3 * 1024 * 2816 + 2 * 1024
    n_layer = max(1, round((gb * 1e9 / 2 - 2 * 32000 * 1024) / per_layer))
    config = transformers.LlamaConfig(
        vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=n_layer,
        num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=False,
        max_position_embeddings=2048,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device("cpu"):
        m = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    m.save_pretrained(directory, max_shard_size="200MB")
    del m
    files = [f for f in os.listdir(directory) if f.endswith(".safetensors")]
    size = sum(os.path.getsize(os.path.join(directory, f)) for f in files)
    return {"n_layer": n_layer, "files": len(files), "checkpoint_mb": size / 2**20}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench_hf_import.json")
    p.add_argument("--gb", type=float, default=1.0)
    p.add_argument("--dir", default="/tmp/bench_hf_ckpt")
    args = p.parse_args()
    ckpt = write_checkpoint(args.dir, args.gb)
    results = {"checkpoint": ckpt, "when": time.strftime("%Y-%m-%d %H:%M")}
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    for how in ("load", "state_dict_first"):
        out = subprocess.run(
            [sys.executable, "-c", CHILD, args.dir, how], env=env, capture_output=True, text=True
        )
        if out.returncode:
            raise SystemExit(f"{how} failed: {out.stderr[-2000:]}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        r["peak_above_baseline_mb"] = r["peak_rss_mb"] - r["baseline_rss_mb"]
        r["ratio_to_checkpoint"] = r["peak_above_baseline_mb"] / ckpt["checkpoint_mb"]
        results[how] = r
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
