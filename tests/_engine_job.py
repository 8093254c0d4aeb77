"""Subprocess job for the engine tests: a tiny LM stage through loop.run_stage.

    python tests/_engine_job.py resume RUN_DIR OUT.npz [--kill-at N] [--term-at N] [--resume] [--width W]
    python tests/_engine_job.py multi PROCESS_ID PORT OUT.npz

`resume`: 12 steps, a checkpoint every 3; --kill-at sends SIGKILL to itself in the middle of that step,
--term-at SIGTERM (a preemption notice: the runner saves after that step and exits with code 143).
`multi`: one of 2 processes x 4 CPU devices (gloo), two LM steps on a global batch of 8 rows.
"""

import argparse
import os
import signal
import sys

import jax


def lm_setup(width=16):
    import numpy as np

    from jaxrlhf import models, train
    from jaxrlhf.models import ModelConfig

    cfg = ModelConfig(vocab_size=37, block_size=16, n_layer=2, n_head=2, n_embd=width, resid_pdrop=0.1)
    tx = train.make_optimizer(train.OptimConfig(lr=3e-3, warmup_steps=2, total_steps=12))
    state = train.init_train_state(models.init_params(jax.random.key(0), cfg), tx)
    rng = np.random.default_rng(0)
    data = rng.integers(1, 37, size=(96, 16)).astype(np.int32)
    return cfg, tx, state, data


def run_resume(args):
    import numpy as np

    from jaxrlhf import parallel, train
    from jaxrlhf.engine import loop

    cfg, tx, state, data = lm_setup(args.width)
    mesh = parallel.make_mesh()
    state = parallel.put(state, mesh)
    step = parallel.jit_step(train.make_lm_step(cfg, tx), mesh, state)

    def step_fn(state, i, key):
        rows = data[(i * 8) % 96 : (i * 8) % 96 + 8]
        mask = np.ones_like(rows, bool)
        if args.kill_at is not None and i == args.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if args.term_at is not None and i == args.term_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return step(state, parallel.shard_batch(train.LMBatch(rows, mask, mask), mesh), key)

    result = loop.run_stage(
        run_dir=args.run_dir,
        stage="pretrain",
        state=state,
        step_fn=step_fn,
        n_steps=12,
        root_key=jax.random.key(7),
        resume=args.resume,
        meta={"config": {"width": args.width}},
        ckpt_every=3,
        progress=False,
    )
    leaves = jax.tree.leaves(jax.device_get(result.state.params))
    np.savez(args.out, *leaves)


def run_multi(args):
    from jaxrlhf import parallel

    parallel.initialize_distributed(f"127.0.0.1:{args.port}", 2, args.process_id, local_device_count=4)
    import numpy as np

    from jaxrlhf import train

    assert jax.device_count() == 8 and jax.local_device_count() == 4
    cfg, tx, state, data = lm_setup()
    mesh = parallel.make_mesh(4, 2)  # data x fsdp across both processes
    state = parallel.put(state, mesh)
    step = parallel.jit_step(train.make_lm_step(cfg, tx), mesh, state)
    rows = data[:8]
    local = rows[args.process_id * 4 : (args.process_id + 1) * 4]
    mask = np.ones_like(local, bool)
    batch = parallel.shard_batch(train.LMBatch(local, mask, mask), mesh)
    losses = []
    for i in range(2):
        state, metrics = step(state, batch, jax.random.fold_in(jax.random.key(7), i))
        losses.append(float(parallel.to_host(metrics)["loss"]))
    params = parallel.to_host(state.params)
    if args.process_id == 0:
        np.savez(args.out, np.asarray(losses), *jax.tree.leaves(params))


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("resume")
    r.add_argument("run_dir")
    r.add_argument("out")
    r.add_argument("--kill-at", type=int)
    r.add_argument("--term-at", type=int)
    r.add_argument("--resume", action="store_true")
    r.add_argument("--width", type=int, default=16)
    m = sub.add_parser("multi")
    m.add_argument("process_id", type=int)
    m.add_argument("port", type=int)
    m.add_argument("out")
    args = p.parse_args()
    if args.cmd == "resume":
        jax.config.update("jax_num_cpu_devices", 2)
        run_resume(args)
    else:
        run_multi(args)


if __name__ == "__main__":
    sys.exit(main())
