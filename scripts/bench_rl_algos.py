"""PPO, PG, GRPO, RLOO, REBEL, DPO and IPO side by side on HappyGPT, each from the same SFT checkpoint.

    python scripts/bench_rl_algos.py --from runs/happy --data-dir ../shared/data/tweets --out bench_rl.json

`--from` is a finished (or at least SFT-finished) `python -m jaxrlhf.happy` run: it is copied without its
RL stage into a fresh directory per algorithm, and `--resume` then runs only the RL stage. Writes
JSON with, per algorithm: mean reward over the last 10 iterations, per-token KL to the SFT model,
distinct-2 of 32 samples before and after RL, RL wall time and steady iteration time. `--rewards` adds the
learned-reward run (whole RL iteration as one jitted program) next to VADER for PPO.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import subprocess
import sys
import tempfile


def run_algo(src: pathlib.Path, work: pathlib.Path, algo: str, reward: str, data_dir, extra) -> dict:
    dst = work / f"{algo}_{reward}"
    if dst.exists():
        shutil.rmtree(dst)
    # The run as it stood after SFT (its run.json and tokenizer too); `--resume` then runs the RL stage
    # (and, for the learned reward, the reward model's stage first if the source has none).
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(
        "rl", "rl.*", "rl_summary.json", "summary.json", "samples.txt", "hf", "tb", "*.png", "*.lock"
    ))  # fmt: skip
    cmd = [sys.executable, "-m", "jaxrlhf.happy", "--out", str(dst), "--resume", "--progress", "false",
           "--rl.algo", algo, "--reward", reward, *extra]  # fmt: skip
    if data_dir:
        cmd += ["--data.data_dir", data_dir]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    summary = json.loads((dst / "summary.json").read_text())
    rl = summary["stages"]["rl"]
    out = {
        **summary["rl"],
        "rl_wall_s": rl["wall_s"],
        "rl_compile_s": rl["compile_s"],
        "rl_iter_s": rl["step_s"],
    }
    if "reward_model_accuracy" in summary:
        out["reward_model_accuracy"] = summary["reward_model_accuracy"]
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="src", required=True, help="a happy run with pretrain/ and sft/ stages")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default="bench_rl.json")
    p.add_argument("--algos", default="ppo,pg,grpo,rloo,rebel,dpo,ipo")
    p.add_argument("--rewards", default="vader", help="comma list: vader,learned")
    args, extra = p.parse_known_args()
    src = pathlib.Path(args.src)
    work = pathlib.Path(tempfile.mkdtemp(prefix="bench_rl_"))
    results = {}
    for reward in args.rewards.split(","):
        algos = args.algos.split(",") if reward == "vader" else ["ppo"]
        for algo in algos:
            results[f"{algo}/{reward}"] = r = run_algo(src, work, algo, reward, args.data_dir, extra)
            print(algo, reward, json.dumps(r), flush=True)
    pathlib.Path(args.out).write_text(json.dumps({"from": str(src), "results": results}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
