"""HappyGPT pretraining levers: validation loss against tokens, and step time as a ratio to main's default.

    python scripts/bench_pretrain_levers.py --data-dir ../shared/data/tweets --out bench_pretrain_levers.json
    python scripts/bench_pretrain_levers.py ... --variants main,steps1500   # a subset

Each variant is a full pretraining schedule of HappyGPT's gpt-micro on all train tweets (the stage
`python -m jaxrlhf.happy` runs, same data order and seed), evaluated on the whole test split every
`--eval-every` steps. Its time is measured apart from its curve, so that the machine's drift (2x within an
hour here) cancels: after the curves, every variant's compiled step runs in round-robin blocks of
`--time-steps` steps, `--rounds` times, and the median block gives its ms per step. A variant's
time-to-quality is its number of steps x its ms per step; the JSON has both, and each as a ratio to
`main` (today's default: 2,500 steps of 64 tweets, lr 4e-3, 50 warmup steps, cosine to 0.1).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import jax
import numpy as np

from jaxrlhf import happy, models, parallel, train
from jaxrlhf.text import CharTokenizer

TARGET = 1.66  # issue #16's pretraining target (minRLHF's level)


def _adamw(lr, steps, warmup=50):
    """HappyGPT's pretraining optimizer as main had it: AdamW, cosine to 0.1 x lr, decay 0.1."""
    return train.make_optimizer(
        train.OptimConfig(lr=lr, warmup_steps=warmup, total_steps=steps, min_lr_ratio=0.1, weight_decay=0.1)
    )


def _muon(lr, adam_lr, steps, warmup=50):
    """Muon at `lr` on the kernels, AdamW at `adam_lr` on the rest, one schedule, no decay (the default
    `--pretrain.optimizer muon` at lr 0.02 / 4e-3)."""
    return train.make_optimizer(
        train.OptimConfig(
            optimizer="muon",
            muon_lr=lr,
            lr=adam_lr,
            warmup_steps=warmup,
            total_steps=steps,
            min_lr_ratio=0.1,
            weight_decay=0.0,
        )
    )


# name: (batch_size, steps, optimizer(steps)); main is today's default
VARIANTS = {
    "main": (64, 2500, lambda n: _adamw(4e-3, n)),
    "steps1500": (64, 1500, lambda n: _adamw(4e-3, n)),
    "steps1000_lr6e-3": (64, 1000, lambda n: _adamw(6e-3, n)),
    "bs128_steps750_lr6e-3": (128, 750, lambda n: _adamw(6e-3, n)),
    "bs32_steps2000_lr3e-3": (32, 2000, lambda n: _adamw(3e-3, n)),
    "muon_steps1000": (64, 1000, lambda n: _muon(0.02, 4e-3, n)),
    "muon_steps750": (64, 750, lambda n: _muon(0.02, 4e-3, n)),
    "muon_steps600_lr0.03": (64, 600, lambda n: _muon(0.03, 6e-3, n)),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default="bench_pretrain_levers.json")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--time-steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument(
        "--curves", default=None, help="variants trained to the end (default: all; the rest timed)"
    )
    args = ap.parse_args()
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        print(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}", file=sys.stderr)
        return 2

    train_rows, test_rows = happy.load_data(args.data_dir)
    tok = CharTokenizer.from_corpus([r["text"] for r in train_rows], eos=happy.EOS, unk="?")
    cfg = happy.HappyConfig()
    mcfg = happy.model_config(cfg, tok.vocab_size)
    L = cfg.block_size + 1
    ids, mask = happy.encode_rows(tok, [r["text"] for r in train_rows], L)
    val = happy.encode_rows(tok, [r["text"] for r in test_rows], L)
    mesh = parallel.make_mesh()
    evaluate = happy.make_evaluator(mcfg, val, mesh)
    init = models.init_params(jax.random.key(cfg.seed), mcfg)
    n = ids.shape[0]
    flops_per_row = 3 * mcfg.flops_per_token(L - 1) * (L - 1)

    def batch_at(i, bs):  # happy._lm_stage's order: a fresh permutation per epoch
        epoch, b = divmod(i, n // bs)
        rows = np.random.default_rng([cfg.seed, epoch]).permutation(n)[b * bs : (b + 1) * bs]
        return train.LMBatch(ids[rows], mask[rows], mask[rows])

    steps_fns, results = {}, {}
    for name in names:
        bs, steps, opt = VARIANTS[name]
        tx = opt(steps)
        step = parallel.jit_step(
            train.make_lm_step(mcfg, tx), mesh, parallel.put(train.init_train_state(init, tx), mesh)
        )
        steps_fns[name] = (step, tx, bs)
        rec = {"batch_size": bs, "steps": steps, "tokens": steps * bs * (L - 1)}
        rec["gflop"] = steps * bs * flops_per_row / 1e9
        if args.curves is None or name in args.curves.split(","):
            state = parallel.put(train.init_train_state(init, tx), mesh)
            key = jax.random.fold_in(jax.random.key(cfg.seed), 1)
            curve, t0 = [], time.perf_counter()
            for i in range(steps):
                state, _ = step(
                    state, parallel.shard_batch(batch_at(i, bs), mesh), jax.random.fold_in(key, i)
                )
                if (i + 1) % args.eval_every == 0 or i + 1 == steps:
                    curve.append((i + 1, (i + 1) * bs * (L - 1), evaluate(state.params)))
                    print(f"{name}: step {i + 1} val {curve[-1][2]:.4f}", flush=True)
            rec["curve"] = curve
            rec["val_loss"] = curve[-1][2]
            rec["curve_wall_s"] = time.perf_counter() - t0
            hit = [s for s, _, v in curve if v <= TARGET]
            rec["first_eval_at_target"] = hit[0] if hit else None
        results[name] = rec

    # Step times, round-robin so that drift hits every variant alike.
    times = {name: [] for name in names}
    states = {}
    for name, (step, tx, bs) in steps_fns.items():
        states[name] = parallel.put(train.init_train_state(init, tx), mesh)
        b = parallel.shard_batch(batch_at(0, bs), mesh)
        states[name], m = step(states[name], b, jax.random.key(0))
        jax.block_until_ready(m)
    for _ in range(args.rounds):
        for name, (step, _, bs) in steps_fns.items():
            batches = [parallel.shard_batch(batch_at(i, bs), mesh) for i in range(args.time_steps)]
            t0 = time.perf_counter()
            for i, b in enumerate(batches):
                states[name], m = step(states[name], b, jax.random.key(i))
            jax.block_until_ready((states[name], m))
            times[name].append((time.perf_counter() - t0) / args.time_steps)
    base = "main" if "main" in names else names[0]
    for name in names:
        rec = results[name]
        rec["ms_per_step"] = 1e3 * statistics.median(times[name])
        rec["gflops_per_s"] = rec["batch_size"] * flops_per_row / 1e9 / (rec["ms_per_step"] / 1e3)
        rec["est_wall_s"] = rec["steps"] * rec["ms_per_step"] / 1e3
    for name in names:
        rec = results[name]
        rec["step_time_ratio"] = rec["ms_per_step"] / results[base]["ms_per_step"]
        rec["wall_ratio"] = rec["est_wall_s"] / results[base]["est_wall_s"]
        rec["gflop_ratio"] = rec["gflop"] / results[base]["gflop"]
    report = {
        "target_val_loss": TARGET,
        "baseline": base,
        "jax": jax.__version__,
        "machine": platform.processor() or platform.machine(),
        "variants": results,
    }
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print("| variant | tokens (M) | val loss | ms/step | wall ratio |")
    for name, r in results.items():
        print(
            f"| {name} | {r['tokens'] / 1e6:.2f} | {r.get('val_loss', float('nan')):.4f} | "
            f"{r['ms_per_step']:.0f} ({r['step_time_ratio']:.2f}x) | {r['wall_ratio']:.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
