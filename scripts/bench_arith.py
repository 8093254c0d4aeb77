"""The arithmetic task's RL algorithms side by side over seeds: held-out accuracy after SFT and after RL.

    python scripts/bench_arith.py --out bench_arith.json
    python scripts/bench_arith.py --seeds 0 --algos grpo,rloo --quick --out quick.json   # a smoke run

Per seed, `python -m jaxrlhf.arith --stages sft` trains the SFT model once (--seed and --data.seed set to
the seed: another init, other training problems, other sampling keys); each algorithm then starts from a
copy of that run and `--resume` runs its RL stage only. Every run is scored on the same 1,000 held-out
problems (`jaxrlhf.arith`). Writes JSON (per seed and algorithm: greedy and sampled accuracy after SFT
and after RL, the RL stage's wall time, the process's peak RSS) and prints a Markdown table of mean and
spread (population standard deviation over seeds). Extra arguments after `--` go to every command.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import statistics
import subprocess
import sys
import time

# The algorithms' flags on top of the recipe's GRPO defaults (docs/algorithms.md names the sources).
ALGOS = {
    "grpo": [],
    "dr_grpo": ["--rl.grpo_scale_by_std", "false", "--rl.loss_agg", "constant"],
    "dapo": ["--rl.clip_eps_high", "0.28", "--rl.loss_agg", "token_mean", "--rl.kl_coef", "0",
             "--rl.dynamic_sampling_rounds", "2", "--rl.mask_truncated", "true"],
    "rloo": ["--rl.algo", "rloo"],
    "reinforce_pp": ["--rl.algo", "reinforce_pp"],
}  # fmt: skip


def run(cmd: list[str]) -> float:
    """Run a command (its output kept for a failure); its wall seconds."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def bench_seed(root: pathlib.Path, seed: int, algos: list[str], extra: list[str]) -> dict:
    base = [sys.executable, "-m", "jaxrlhf.arith", "--seed", str(seed), "--data.seed", str(seed),
            "--progress", "false", *extra]  # fmt: skip
    sft = root / f"seed{seed}" / "sft"
    if sft.exists():
        shutil.rmtree(sft)
    sft_s = run([*base, "--out", str(sft), "--stages", "sft"])
    out = {"sft_wall_s": round(sft_s, 1)}
    for algo in algos:
        dst = root / f"seed{seed}" / algo
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(sft, dst, ignore=shutil.ignore_patterns("*.lock"))
        wall = run([*base, "--out", str(dst), "--resume", *ALGOS[algo]])
        summary = json.loads((dst / "summary.json").read_text())
        acc = summary["accuracy"]
        out[algo] = {
            "sft_greedy": acc["sft"]["greedy"]["accuracy"], "sft_sampled": acc["sft"]["sampled"]["accuracy"],
            "rl_greedy": acc["rl"]["greedy"]["accuracy"], "rl_sampled": acc["rl"]["sampled"]["accuracy"],
            "rl_wall_s": round(wall, 1),
            "peak_rss_mb": summary["memory"]["end"]["peak_rss_mb"],
        }  # fmt: skip
        print(f"seed {seed} {algo}: {out[algo]}", flush=True)
    return out


def table(results: dict, algos: list[str]) -> str:
    """Mean and spread over seeds of each accuracy, and of each seed's gain (RL minus its own SFT: the
    seeds' SFT models differ far more than RL moves them)."""

    def cell(values):
        mean = statistics.fmean(values)
        return f"{mean:+.3f} ± {statistics.pstdev(values):.3f}" if len(values) > 1 else f"{mean:+.3f}"

    def plain(values):
        return cell(values).lstrip("+")

    rows = ["| algorithm | greedy after SFT | greedy after RL | gain | sampled after SFT | sampled after RL "
            "| gain | RL wall s | peak RSS MB |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for algo in algos:
        runs = [results[s][algo] for s in results]
        cells = []
        for how in ("greedy", "sampled"):
            sft, rl = [r[f"sft_{how}"] for r in runs], [r[f"rl_{how}"] for r in runs]
            cells += [plain(sft), plain(rl), cell([b - a for a, b in zip(sft, rl, strict=True)])]
        wall = statistics.fmean(r["rl_wall_s"] for r in runs)
        rows.append(f"| {algo} | " + " | ".join(cells) + f" | {wall:.0f} | "
                    f"{max(r['peak_rss_mb'] for r in runs):.0f} |")  # fmt: skip
    return "\n".join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--algos", default="grpo,dapo,rloo,reinforce_pp",
                        help=f"comma-separated, of {', '.join(ALGOS)}")  # fmt: skip
    parser.add_argument("--root", default="runs/bench_arith", help="where the runs go (replaced)")
    parser.add_argument("--out", default="bench_arith.json", help="the JSON results")
    parser.add_argument("--quick", action="store_true", help="each run with --quick (a smoke check)")
    args, extra = parser.parse_known_args(argv)
    extra = [a for a in extra if a != "--"] + (["--quick"] if args.quick else [])
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds {args.seeds!r}: comma-separated integers")
    algos = args.algos.split(",")
    unknown = [a for a in algos if a not in ALGOS]
    if unknown or any(s < 0 for s in seeds):
        parser.error(f"unknown algorithm {unknown} (use {', '.join(ALGOS)}) or a negative seed")
    root = pathlib.Path(args.root)
    results = {str(s): bench_seed(root, s, algos, extra) for s in seeds}
    record = {"seeds": seeds, "algos": algos, "extra": extra, "results": results,
              "table": table(results, algos)}  # fmt: skip
    pathlib.Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    print(record["table"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
