"""The peak RSS of the smallest processes that run one HappyGPT program: the floor under the whole run's peak.

    python scripts/bench_memory_floor.py --out bench_memory_floor.json [--steps 20]

Each case is a fresh Python process (with glibc's arenas capped at 2 and the heap trimmed after every
compile, as `python -m jaxrlhf.happy` runs) that imports jax and jaxrlhf's model code, makes gpt-micro's
params and optimizer state, compiles ONE program and runs it `--steps` times, recording RSS and the
peak so far (VmHWM) after each phase:
  pretrain-adamw   the pretraining / SFT step (64 x 32 tokens), AdamW
  pretrain-muon    the same step with Muon (HappyGPT's pretraining default)
  ppo-learn        the PPO iteration's experience + update (policy and value, 32 tweets; train.make_learn)
  sampler          the RL sampler (32 x 31 new tokens, top-k 30)
each with a cold persistent compile cache (a first run) and a warm one (the same program read back from
the cache, as a second run or a --resume does), and each with XLA:CPU's default fusion emitters and with
its classic ones (`memory.lean_cpu_compiles`, what `python -m jaxrlhf.happy` uses). No data set is
loaded; the inputs are random (so the sampler's early exit may stop before 31 tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

CASES = ("pretrain-adamw", "pretrain-muon", "ppo-learn", "sampler")


def _status() -> tuple[int, int]:
    """(RSS, peak RSS) in whole MB (jaxrlhf.memory's readers: importing it imports no jax)."""
    from jaxrlhf.engine import memory  # noqa: PLC0415

    return int(memory.rss_mb()), int(memory.peak_rss_mb())


def child(case: str, cache: str, steps: int, lean: bool) -> dict:
    phases = {}

    def mark(name):
        rss, peak = _status()
        phases[name] = {"rss_mb": rss, "peak_mb": peak}

    mark("python")
    if lean:  # before JAX's first computation (it imports jax)
        from jaxrlhf.engine import memory  # noqa: PLC0415

        assert memory.lean_cpu_compiles(), "the lean flag was not set"
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    mark("import jax")
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    from jaxrlhf import models, train  # noqa: PLC0415
    from jaxrlhf.engine import memory
    from jaxrlhf.models import ModelConfig  # noqa: PLC0415
    from jaxrlhf.rollout import SampleConfig, sampler

    mark("import jaxrlhf")
    jax.block_until_ready(jnp.ones(3) + 1)
    mark("first op")
    cfg = ModelConfig.preset("gpt-micro", vocab_size=100, block_size=32)
    params = models.init_params(jax.random.key(0), cfg)
    rng = np.random.default_rng(0)
    scfg = SampleConfig(max_new_tokens=31, temperature=1.0, top_k=30, eos_id=0)
    prompt, prompt_mask = jnp.zeros((32, 1), jnp.int32), jnp.ones((32, 1), bool)
    if case.startswith("pretrain"):
        tx = train.make_optimizer(train.OptimConfig(lr=4e-3, optimizer=case.split("-")[1]))
        state = train.init_train_state(params, tx)
        ids = rng.integers(0, 100, (64, 33)).astype(np.int32)
        batch = train.LMBatch(ids, np.ones_like(ids, bool), np.ones_like(ids, bool))
        lm_step = train.make_lm_step(cfg, tx)
        step = jax.jit(lambda s, b, k: lm_step(s, b, key=k), donate_argnums=0)
        run = lambda s, k: step(s, batch, k)[0]  # noqa: E731
    elif case == "ppo-learn":
        from jaxrlhf import happy  # noqa: PLC0415

        rlc = happy._rl_config(happy.HappyConfig())  # HappyGPT's PPO: 1 epoch x 1 minibatch, beta 0.05
        optim = train.OptimConfig(lr=3e-4, weight_decay=0.0, grad_clip=1.0)
        tx = train.make_per_model_optimizer({"policy": optim, "value": optim})
        copy = lambda t: jax.tree.map(jnp.copy, t)  # noqa: E731  (no buffer twice in a donated state)
        value = {"gpt": copy(params), "head": models.init_scalar_head(jax.random.key(1), cfg)}
        state = train.init_rl_state(train.init_rl_params(copy(params), value, rlc), tx, rlc)
        rollout = jax.block_until_ready(
            jax.jit(lambda k: sampler.sample_fn(params, prompt, prompt_mask, cfg, scfg, k))(
                jax.random.key(2)
            )
        )
        scores = jnp.asarray(rng.standard_normal(32), jnp.float32)
        learn = jax.jit(train.make_learn(cfg, tx, rlc, sample_cfg=scfg), donate_argnums=0)
        jax.clear_caches()  # only the learn program stays
        memory.malloc_trim()
        run = lambda s, k: learn(s, params, rollout, scores, key=k)[0]  # noqa: E731
    else:
        state = params
        sample = jax.jit(lambda p, k: sampler.sample_fn(p, prompt, prompt_mask, cfg, scfg, k))
        run = lambda s, k: (sample(s, k), s)[1]  # noqa: E731
    jax.block_until_ready(state)
    mark("params + optimizer state")
    # As in `python -m jaxrlhf.happy`: freed heap goes back to the OS after every compile.
    with memory.trim_after_compiles():
        t0 = time.perf_counter()
        state = jax.block_until_ready(run(state, jax.random.key(3)))
        compile_s = time.perf_counter() - t0
        mark("compile + first run")
        memory.malloc_trim()
        mark("after malloc_trim")
        t0 = time.perf_counter()
        for i in range(steps):
            state = run(state, jax.random.key(4 + i))
        jax.block_until_ready(state)
        ms = 1e3 * (time.perf_counter() - t0) / max(steps, 1)
        mark(f"{steps} more runs")
    return {"phases": phases, "first_run_s": compile_s, "ms_per_run": ms, "peak_mb": _status()[1]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench_memory_floor.json")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--cache", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--lean", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.cache, args.steps, args.lean)))
        return 0
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(MALLOC_ARENA_MAX="2", TF_CPP_MIN_LOG_LEVEL="3")
    results = {}
    for case in args.cases.split(","):
        if case not in CASES:
            raise SystemExit(f"--cases: unknown case {case!r}; choose from {', '.join(CASES)}")
        for emitters in ("default", "lean"):
            with tempfile.TemporaryDirectory() as cache:
                for cache_state in ("cold", "warm"):
                    tag = f"{case}/{emitters}/{cache_state}"
                    cmd = [
                        sys.executable,
                        __file__,
                        "--child",
                        case,
                        "--cache",
                        cache,
                        "--steps",
                        str(args.steps),
                    ]
                    proc = subprocess.run(
                        cmd + ["--lean"] * (emitters == "lean"), capture_output=True, text=True, env=env
                    )
                    if proc.returncode:
                        raise SystemExit(f"{tag} failed:\n{proc.stderr[-2000:]}")
                    results[tag] = r = json.loads(proc.stdout.strip().splitlines()[-1])
                    ph = r["phases"]
                    print(
                        f"{tag:28s} peak {r['peak_mb']} MB; import jax {ph['import jax']['rss_mb']}, ready "
                        f"{ph['params + optimizer state']['rss_mb']}, compile + run peak "
                        f"{ph['compile + first run']['peak_mb']}, trimmed "
                        f"{ph['after malloc_trim']['rss_mb']}, "
                        f"after {args.steps} runs {ph[f'{args.steps} more runs']['rss_mb']} MB; first run "
                        f"{r['first_run_s']:.1f} s, {r['ms_per_run']:.0f} ms/run",
                        flush=True,
                    )
    pathlib.Path(args.out).write_text(json.dumps({"malloc_arena_max": 2, "results": results}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
