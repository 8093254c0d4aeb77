"""Llama-style decoder (RMSNorm, RoPE, SwiGLU, GQA) next to GPT-2 at the same size: train step and sampler.

Two random float32 models over GPT-2's 50257 ids, 12 layers of width 768 each:
  gpt2:  GPT-2 124M (LayerNorm, learned positions, GELU MLP 3072, 12 heads);
  llama: 12 query heads sharing 4 key / value heads, SwiGLU 2048 (the same MLP FLOPs as GELU 3072),
         RoPE theta 500000, no biases, tied embeddings.
For each: an AdamW LM step (`train.make_lm_step`, batch x 128 tokens; median ms of the timed steps after
compile; MFU = 3 x forward FLOPs / time against a float32 matmul peak measured in the same run) and
`sampler.sample` (8 prompts of 32 tokens, 32 new tokens at T = 1 with top-k 50; ms per call and new tokens
per second). The two models alternate rep by rep, so the ratios compare them in the same minutes of a
machine whose speed drifts.

  python scripts/bench_decoders.py --out bench_decoders.json [--reps 3] [--steps 3] [--batch 4]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_train_step import matmul_peak_gflops  # noqa: E402

from jaxrlhf import models, train  # noqa: E402
from jaxrlhf.models import ModelConfig  # noqa: E402
from jaxrlhf.rollout import SampleConfig, sampler

SEQ, PROMPT, NEW, SAMPLE_BATCH = 128, 32, 32, 8
CONFIGS = {
    "gpt2": ModelConfig.preset("gpt2", block_size=SEQ + 1, embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0),
    "llama": ModelConfig.preset(
        "tiny-llama", vocab_size=50257, block_size=SEQ + 1, n_layer=12, n_head=12, n_kv_head=4, n_embd=768,
        intermediate_size=2048, rope_theta=500000.0,
    ),
}  # fmt: skip


class Case:
    """One model's compiled train step and sampler, timed a rep at a time."""

    def __init__(self, name: str, cfg: ModelConfig, batch: int):
        self.name, self.cfg, self.batch = name, cfg, batch
        tx = train.make_optimizer(train.OptimConfig())
        self.params = models.init_params(jax.random.key(0), cfg)  # the sampler's (the step donates its own)
        self.state = train.init_train_state(jax.tree.map(jnp.copy, self.params), tx)
        tokens = jax.random.randint(jax.random.key(1), (batch, SEQ + 1), 0, cfg.vocab_size, jnp.int32)
        mask = jnp.ones(tokens.shape, bool)
        self.batch_data = train.LMBatch(tokens, mask, mask)
        step = jax.jit(train.make_lm_step(cfg, tx), donate_argnums=(0,))
        t0 = time.perf_counter()
        self.step = step.lower(self.state, self.batch_data).compile()
        self.train_compile_s = time.perf_counter() - t0
        self.prompt = jax.random.randint(
            jax.random.key(2), (SAMPLE_BATCH, PROMPT), 0, cfg.vocab_size, jnp.int32
        )
        self.scfg = SampleConfig(max_new_tokens=NEW, temperature=1.0, top_k=50)
        t0 = time.perf_counter()
        self.sample(0)
        self.sample_first_call_s = time.perf_counter() - t0
        self.step_times, self.sample_times = [], []

    def sample(self, i: int):
        mask = jnp.ones(self.prompt.shape, bool)
        return jax.block_until_ready(
            sampler.sample(self.params, self.prompt, mask, self.cfg, self.scfg, key=jax.random.key(i))
        )

    def rep(self, steps: int, calls: int, i: int) -> None:
        self.state, metrics = self.step(self.state, self.batch_data)  # warm
        jax.block_until_ready(self.state)
        for _ in range(steps):
            t0 = time.perf_counter()
            self.state, metrics = self.step(self.state, self.batch_data)
            jax.block_until_ready((self.state, metrics))
            self.step_times.append(time.perf_counter() - t0)
        for j in range(calls):
            t0 = time.perf_counter()
            self.sample(1000 * i + j + 1)
            self.sample_times.append(time.perf_counter() - t0)

    def summary(self, peak: float) -> dict:
        step_s, sample_s = statistics.median(self.step_times), statistics.median(self.sample_times)
        flops = 3 * self.cfg.flops_per_token(SEQ) * self.batch * SEQ
        return {
            "params": self.cfg.num_params,
            "train": {
                "batch": self.batch, "seq_len": SEQ, "ms_per_step": 1e3 * step_s,
                "ms_per_step_min": 1e3 * min(self.step_times), "tokens_per_s": self.batch * SEQ / step_s,
                "gflops_per_s": flops / step_s / 1e9, "mfu": flops / step_s / 1e9 / peak,
                "compile_s": self.train_compile_s, "timed_steps": len(self.step_times),
            },
            "sample": {
                "batch": SAMPLE_BATCH, "prompt_len": PROMPT, "max_new_tokens": NEW, "top_k": 50,
                "ms_per_call": 1e3 * sample_s, "ms_per_token_step": 1e3 * sample_s / NEW,
                "new_tokens_per_s": SAMPLE_BATCH * NEW / sample_s, "first_call_s": self.sample_first_call_s,
                "timed_calls": len(self.sample_times),
            },
        }  # fmt: skip


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_decoders.json")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3, help="timed train steps per rep")
    ap.add_argument("--calls", type=int, default=3, help="timed sampler calls per rep")
    ap.add_argument("--batch", type=int, default=4)
    args = ap.parse_args()
    peaks = [matmul_peak_gflops()[0]]
    cases = {name: Case(name, cfg, args.batch) for name, cfg in CONFIGS.items()}
    for i in range(args.reps):
        for case in cases.values():
            case.rep(args.steps, args.calls, i)
            print(f"rep {i} {case.name}: step {1e3 * case.step_times[-1]:.0f} ms, "
                  f"sample {1e3 * case.sample_times[-1]:.0f} ms", flush=True)  # fmt: skip
    peaks.append(matmul_peak_gflops()[0])
    peak = max(peaks)
    results = {name: case.summary(peak) for name, case in cases.items()}
    ratio = {
        "train_step_time_llama_over_gpt2": results["llama"]["train"]["ms_per_step"]
        / results["gpt2"]["train"]["ms_per_step"],
        "sample_time_llama_over_gpt2": results["llama"]["sample"]["ms_per_call"]
        / results["gpt2"]["sample"]["ms_per_call"],
    }
    out = {
        "models": results,
        "ratios": ratio,
        "configs": {
            name: {
                k: getattr(cfg, k)
                for k in ("n_layer", "n_head", "kv_heads", "n_embd", "mlp_dim", "vocab_size")
            }
            for name, cfg in CONFIGS.items()
        },
        "matmul_peak_gflops_f32_2048": peak,
        "jax": jax.__version__,
        "device": str(jax.devices()[0].device_kind),
        "cpus": os.cpu_count(),
        "loadavg": os.getloadavg(),
    }
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print(json.dumps({"ratios": ratio, "peak": peak}), f"wrote {args.out}")


if __name__ == "__main__":
    main()
