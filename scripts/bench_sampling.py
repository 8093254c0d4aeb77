"""Benchmark `jaxrlhf.sampling.sample` (one jitted while_loop over a KV cache) on this machine.

Two cases, random init, float32:
  gpt-micro (vocab 100, block 64): 32 sequences x 32 new tokens, top-k 30, from a 1-token prompt;
  GPT-2-124M shape (vocab 50257): 8 sequences x 64 new tokens from an 8-token prompt.
Reports ms/call after compile (median of >= 20 calls, block_until_ready), the compile time (first call),
and checks that a second call with the same shapes and a new key does not recompile.

  python scripts/bench_sampling.py --out bench_sampling.json [--calls 20] [--skip_gpt2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp

from jaxrlhf import model, sampling
from jaxrlhf.config import ModelConfig, SampleConfig


def bench(name: str, cfg: ModelConfig, scfg: SampleConfig, batch: int, prompt_len: int, calls: int) -> dict:
    params = model.init_params(jax.random.key(0), cfg)
    prompt = jax.random.randint(jax.random.key(1), (batch, prompt_len), 0, cfg.vocab_size, jnp.int32)
    prompt_mask = jnp.ones(prompt.shape, bool)
    jax.block_until_ready((params, prompt))
    root = jax.random.key(2)

    def call(i):
        out = sampling.sample(params, prompt, prompt_mask, cfg, scfg, key=jax.random.fold_in(root, i))
        return jax.block_until_ready(out)

    size0 = sampling._sample_jit._cache_size()
    t0 = time.perf_counter()
    call(0)
    compile_s = time.perf_counter() - t0  # trace + compile + one run
    size1 = sampling._sample_jit._cache_size()
    t0 = time.perf_counter()
    out = call(1)
    second_s = time.perf_counter() - t0
    recompiled = sampling._sample_jit._cache_size() != size1
    times = []
    for i in range(calls):
        t0 = time.perf_counter()
        out = call(2 + i)
        times.append(time.perf_counter() - t0)
    ms = 1e3 * statistics.median(times)
    new_tokens = batch * scfg.max_new_tokens
    return {
        "case": name,
        "batch": batch,
        "prompt_len": prompt_len,
        "max_new_tokens": scfg.max_new_tokens,
        "top_k": scfg.top_k,
        "vocab_size": cfg.vocab_size,
        "ms_per_call": ms,
        "ms_per_call_min": 1e3 * min(times),
        "ms_per_decode_step": ms / scfg.max_new_tokens,
        "tokens_per_s": new_tokens / (ms / 1e3),
        "first_call_s": compile_s,
        "second_call_ms": 1e3 * second_s,
        "compiled_programs_added_by_first_call": size1 - size0,
        "recompiled_on_second_call": recompiled,
        "response_tokens_generated": int(jnp.sum(out.response_mask)),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_sampling.json")
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--skip_gpt2", action="store_true")
    args = ap.parse_args()
    calls = max(args.calls, 20)
    runs = []
    micro = ModelConfig.preset("gpt-micro", vocab_size=100, block_size=64)
    runs.append(bench("gpt-micro", micro, SampleConfig(max_new_tokens=32, top_k=30), 32, 1, calls))
    print(json.dumps(runs[-1]))
    if not args.skip_gpt2:
        gpt2 = ModelConfig.preset("gpt2", embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0)
        runs.append(bench("gpt2-124M-shape", gpt2, SampleConfig(max_new_tokens=64), 8, 8, calls))
        print(json.dumps(runs[-1]))
    out = {
        "runs": runs,
        "jax": jax.__version__,
        "device": str(jax.devices()[0].device_kind),
        "loadavg": os.getloadavg(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
