"""Benchmark the default HappyGPT run: time to quality per stage, MFU against a measured matmul peak.

    python scripts/bench_happy.py --data-dir ../shared/data/tweets --out bench_happy.json [happy flags...]

Runs `python -m jaxrlhf.happy` as a user does, in a child process, between two matmul-peak measurements
made in this process (whose memory would otherwise count in the run's peak). Writes JSON: per stage
wall / compile / steady step time, iterations/s, tokens/s, achieved GFLOP/s and MFU (model FLOPs: 6 N
per trained token plus attention, PaLM appendix B), the quality reached (validation losses, RL reward
and KL, distinct-2 before/after RL), the command's wall time, its peak RSS (the child's own high-water
mark, VmHWM, which starts afresh at its exec: `getrusage(RUSAGE_CHILDREN)` would also count this process's
peak, which a forked child inherits), and per stage its host memory (rss_start_mb /
rss_peak_mb / rss_end_mb, see jaxrlhf.memory; also under "rss_per_stage_mb") with RSS's two parts at
their sampled peaks: anonymous memory (heap, XLA's buffers and programs, Python) and file-backed pages
(the shared libraries' code, mostly jaxlib's). Extra arguments go to the command (e.g. --algo pg).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import jax
from bench_train_step import matmul_peak_gflops  # scripts/ is on sys.path when run as a script


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default="bench_happy.json")
    p.add_argument("--run-dir", default=None, help="where the run's outputs go (default: a temp dir)")
    args, extra = p.parse_known_args()

    from jaxrlhf.engine import memory

    memory.lean_cpu_compiles()  # the matmuls compiled as the command compiles its programs
    peak_before = matmul_peak_gflops()[0] * 1e9
    run_dir = args.run_dir or tempfile.mkdtemp(prefix="bench_happy_")
    if pathlib.Path(run_dir).exists():
        shutil.rmtree(run_dir)
    argv = (
        ["--out", run_dir, "--progress", "false"]
        + (["--data.data_dir", args.data_dir] if args.data_dir else [])
        + extra
    )
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "jaxrlhf.happy", *argv], check=True)
    wall = time.perf_counter() - t0
    summary = json.loads((pathlib.Path(run_dir) / "summary.json").read_text())
    child_peak_mb = summary["memory"]["end"]["peak_rss_mb"]  # the command's VmHWM (jaxrlhf.memory)
    peak_after = matmul_peak_gflops()[0] * 1e9
    peak = max(peak_before, peak_after)

    stages = summary["stages"]
    blocks = [*stages.values(), summary.get("memory", {}).get("setup", {})]
    for name in ("pretrain", "sft"):
        s = stages[name]
        if s.get("step_s"):
            s["gflops_per_s"] = round(s["flops_per_step"] / s["step_s"] / 1e9, 2)
            s["mfu"] = round(s["flops_per_step"] / s["step_s"] / peak, 4)
    result = {
        "machine": f"{platform.machine()} {platform.processor() or ''} {jax.device_count()} x "
        f"{jax.devices()[0].device_kind}, {os.cpu_count()} CPU threads".strip(),
        "jax": jax.__version__,
        "matmul_peak_gflops": round(peak / 1e9, 1),
        "matmul_peak_gflops_before_after": [round(peak_before / 1e9, 1), round(peak_after / 1e9, 1)],
        "wall_s_total": round(wall, 2),  # the command's, interpreter start and imports included
        "wall_s_pipeline": summary["wall_s"],  # from the data's loading to summary.json
        # The command's own, in MB of 2^20 bytes: `time -v`'s "Maximum resident set size" (kB) / 1024.
        "peak_rss_mb": child_peak_mb,
        "rss_per_stage_mb": {
            name: {
                k: stages[name].get(f"rss_{k}_mb") for k in ("start", "peak", "end", "anon_peak", "file_peak")
            }
            for name in stages
        },
        # RSS's parts over the run, each the highest sampled (every 50 ms) in any stage or the setup.
        "peak_rss_anon_mb": max(b.get("rss_anon_peak_mb") or 0 for b in blocks) or None,
        "peak_rss_file_mb": max(b.get("rss_file_peak_mb") or 0 for b in blocks) or None,
        "memory": summary.get("memory"),
        "stages": stages,
        "quality": {
            "pretrain_val_loss": stages["pretrain"].get("val_loss"),
            "sft_val_loss": stages["sft"].get("val_loss"),
            **summary["rl"],
        },
        "targets": {
            "wall_s_total<=180": wall <= 180,
            "peak_rss_mb<=600": child_peak_mb <= 600,
            "pretrain_val_loss<=1.66": (stages["pretrain"].get("val_loss") or 9) <= 1.66,
            "sft_val_loss<=1.55": (stages["sft"].get("val_loss") or 9) <= 1.55,
            "rl_reward>=0.85": (summary["rl"]["reward_last10"] or 0) >= 0.85,
            "rl_kl_per_token<=0.10": (summary["rl"]["kl_per_token_last10"] or 9) <= 0.10,
        },
        "config": summary["config"],
        "minrlhf_reference": {
            "pretrain": {"iters": 4290, "wall_s": 536, "val_loss": 1.65},
            "sft": {"iters": 804, "wall_s": 90, "val_loss": 1.54},
            "rl": {"iters": 100, "wall_s": 35, "reward": "0.83-0.88", "kl_per_token": "0.08-0.13"},
            "total_s": 672,
            "peak_rss_mb": 784,
        },
    }
    pathlib.Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("wall_s_total", "quality", "targets")}, indent=2))
    print(f"wrote {args.out}; per-stage numbers in it. Sample tweets: {run_dir}/samples.txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
