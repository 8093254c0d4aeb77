"""Benchmark the gpt-micro LM train step (AdamW, `train.make_lm_step`) on this machine.

Writes JSON with ms/step (median of >= 20 steps after compile), tokens/s, GFLOP/s (train = 3x forward
FLOPs, `ModelConfig.flops_per_token`), MFU against a float32 2048x2048 matmul peak measured in the same run,
and the compile time, for batch sizes 64 and 128 at T = 32.

  python scripts/bench_train_step.py --out bench_train_step.json [--steps 30] [--compute_dtype float32]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp

from jaxrlhf import models, train
from jaxrlhf.models import ModelConfig


def matmul_peak_gflops(n: int = 2048, reps: int = 20) -> tuple[float, float]:
    """(best, median) GFLOP/s of a float32 n x n @ n x n matmul. The best run is the peak: on a shared
    machine the median mostly measures the other jobs."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    mm = jax.jit(jnp.matmul)
    mm(a, b).block_until_ready()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        mm(a, b).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / min(times) / 1e9, 2 * n**3 / statistics.median(times) / 1e9


def bench_step(cfg: ModelConfig, batch: int, seq: int, steps: int) -> dict:
    tx = train.make_optimizer(train.OptimConfig())
    params = models.init_params(jax.random.key(0), cfg)
    state = train.init_train_state(params, tx)
    tokens = jax.random.randint(jax.random.key(1), (batch, seq + 1), 0, cfg.vocab_size, jnp.int32)
    mask = jnp.ones(tokens.shape, bool)
    lm_batch = train.LMBatch(tokens, mask, mask)
    step = jax.jit(lambda s, b: train.make_lm_step(cfg, tx)(s, b), donate_argnums=(0,))

    t0 = time.perf_counter()
    compiled = step.lower(state, lm_batch).compile()
    compile_s = time.perf_counter() - t0
    for _ in range(3):  # warm-up
        state, metrics = compiled(state, lm_batch)
    jax.block_until_ready(state)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, lm_batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t0)
    sec = statistics.median(times)
    flops = 3 * cfg.flops_per_token(seq) * batch * seq
    return {
        "batch": batch,
        "seq_len": seq,
        "ms_per_step": 1e3 * sec,
        "ms_per_step_min": 1e3 * min(times),
        "tokens_per_s": batch * seq / sec,
        "gflops_per_s": flops / sec / 1e9,
        "train_flops_per_step": flops,
        "compile_s": compile_s,
        "loss": float(metrics["loss"]),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_train_step.json")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batches", default="64,128")
    ap.add_argument("--compute_dtype", default="float32")
    args = ap.parse_args()
    cfg = ModelConfig.preset("gpt-micro", vocab_size=100, block_size=32, compute_dtype=args.compute_dtype)
    peak_before, median_before = matmul_peak_gflops()
    runs = [
        bench_step(cfg, b, cfg.block_size, max(args.steps, 20)) for b in map(int, args.batches.split(","))
    ]
    peak_after, median_after = matmul_peak_gflops()
    peak = max(peak_before, peak_after)
    for r in runs:
        r["mfu"] = r["gflops_per_s"] / peak
        print(json.dumps(r))
    out = {
        "model": "gpt-micro",
        "config": {k: getattr(cfg, k) for k in ("n_layer", "n_head", "n_embd", "vocab_size", "block_size")},
        "compute_dtype": args.compute_dtype,
        "matmul_peak_gflops_f32_2048": peak,
        "matmul_median_gflops_f32_2048": [median_before, median_after],
        "runs": runs,
        "jax": jax.__version__,
        "device": str(jax.devices()[0].device_kind),
        "loadavg": os.getloadavg(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print(f"peak {peak:.0f} GFLOP/s; wrote {args.out}")


if __name__ == "__main__":
    main()
