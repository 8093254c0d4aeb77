"""Bytes per device of each stage of the UltraFeedback REBEL pipeline (experiments/ultrafeedback) on a mesh.

Computed, not measured: the state from `jax.eval_shape` of the real code (models.init_params,
train.init_train_state with train.make_optimizer, models.init_cache), each leaf split as
parallel.leaf_sharding splits it; the activations from the formulas below. No array is allocated.

    python scripts/memory_plan.py --hardware v5e-16 --mu-dtype bfloat16 --out plan.json
    python scripts/memory_plan.py --hardware v5e-8,v4-8,gpu-8x80,v5e-16,v4-16 --xla

The stages run as separate programs, so each has the device to itself. Per device (b = rows on the device,
T positions, S cache slots, L layers, D width, N / K query / kv heads, H head dim, F MLP width, V vocab,
a = 2 bytes under --bf16, else 4; "layer params" = one block's params):

  generate  policy params (float32, FSDP-split) + max(decoding, teacher-forced logprobs):
              decoding     KV cache (models.init_cache: 2 L b K S H a) + prefill attention of one layer
                           b N P S (4 + a) + sampler logits b V 4 x 3
              logprobs     one layer's attention b N T^2 (4 + a) + the LM head on one slice of C positions
                           b C V 4 x 2 (models.lm_token_logprobs: the [b, T, V] logits never exist at once)
            + one layer's weights gathered (4 + a) x layer params.
  score     reward-model params (stored dtype, FSDP-split) + one layer's attention b N T^2 (4 + a) + its
            other activations b T (N H + 2 K H + N H + 3 F + 4 D) a + one layer gathered (2 x its dtype).
  rebel     params + gradients (float32) + Adam mu, nu (optimizer.init's dtypes)
            + the block inputs saved under --remat, L b T D a (without remat: L x one layer's activations)
            + one layer recomputed in the backward pass with its gradients: b N T^2 (4 + a + 4)
              + 2 b T (N H + 2 K H + N H + 3 F + 4 D) a
            + one layer gathered with its full gradient before the reduce-scatter: (4 + a + 4) x layer params
            + the LM head on one slice, logits, softmax and their gradient: b C V 4 x 3.

"Fits" means the total is at most --reserve (0.9) of the device's memory: the rest is for XLA's own scratch,
collectives and fragmentation, which no formula sees. `--xla` also compiles the real rebel and score programs
for the same mesh on fake CPU devices and reports XLA:CPU's buffer assignment (arguments + temporaries per
device). That is a cross-check, not a TPU / GPU figure: XLA:CPU schedules for speed, not memory, and keeps
several copies of the gradients and of one layer's attention alive (so it reads high). generate is left out
of --xla: its prefill is unrolled over the layers and XLA:CPU keeps each layer's attention alive.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import sys

import jax

GIB = 2**30
# name -> (devices, GiB of memory per device, what it is)
HARDWARE = {
    "v5e-8": (8, 16.0, "TPU v5e-8: 8 chips x 16 GiB HBM"),
    "v5e-16": (16, 16.0, "TPU v5e-16: 16 chips x 16 GiB HBM"),
    "v4-8": (4, 32.0, "TPU v4-8: 4 chips x 32 GiB HBM"),
    "v4-16": (8, 32.0, "TPU v4-16: 8 chips x 32 GiB HBM"),
    "gpu-8x80": (8, 79.6, "8 x H100 / A100 80 GB (79.6 GiB each as nvidia-smi reports)"),
    "gpu-1x80": (1, 79.6, "1 x H100 / A100 80 GB (79.6 GiB as nvidia-smi reports)"),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hardware", default="v5e-16", help=f"comma-separated: {', '.join(HARDWARE)}")
    p.add_argument("--preset", default="llama3.1-8b", help="policy shape (config.FAMILY_PRESETS)")
    p.add_argument(
        "--init-from", default=None, help="a local HF directory: its config.json instead of --preset"
    )
    p.add_argument("--rm-preset", default=None, help="reward-model shape (default: the policy's)")
    p.add_argument("--rm-dtype", default="bfloat16", help="the reward model's stored dtype (its config.json)")
    p.add_argument("--mesh-fsdp", type=int, default=0, help="fsdp axis size (0: every device)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--remat", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--max-prompt-tokens", type=int, default=1024, help="--data.max_prompt_tokens")
    p.add_argument("--max-answer-tokens", type=int, default=1024, help="--data.max_answer_tokens")
    p.add_argument("--template-tokens", type=int, default=6, help="chat template special tokens (Llama 3: 6)")
    p.add_argument("--score-len", type=int, default=0, help="reward-model row length (0: P + R + 32, to 64)")
    p.add_argument("--answers", type=int, default=5, help="--generate.answers")
    p.add_argument("--generate-batch", type=int, default=0, help="--generate.batch_size (0: the devices)")
    p.add_argument("--score-batch", type=int, default=0, help="--score.batch_size (0: 2 x the devices)")
    p.add_argument("--rebel-batch", type=int, default=0, help="--rebel.batch_size (0: the devices)")
    p.add_argument("--mu-dtype", default=None, help="--rebel.optim.mu_dtype (none, float32, bfloat16)")
    p.add_argument("--reserve", type=float, default=0.9, help="fraction of memory a plan may use")
    p.add_argument("--xla", action="store_true", help="also compile rebel and score on fake CPU devices")
    p.add_argument("--out", default=None, help="write the plan as JSON here")
    args = p.parse_args(argv)
    bad = [h for h in args.hardware.split(",") if h not in HARDWARE]
    if bad:
        p.error(f"--hardware {bad[0]}; use one of {', '.join(HARDWARE)}")
    if args.mu_dtype in ("none", "None"):
        args.mu_dtype = None
    return args


# ------------------------------------------------------------------------------------------ helpers


def shard_bytes(tree, mesh) -> int:
    """Bytes of one device's shard of every leaf of `tree` (arrays or ShapeDtypeStructs), each leaf split
    by parallel.leaf_sharding (what parallel.put and jit_step do)."""
    from jaxrlhf import parallel

    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = parallel.leaf_sharding(tuple(leaf.shape), mesh).shard_shape(tuple(leaf.shape))
        total += math.prod(shape) * leaf.dtype.itemsize
    return total


def adam_moments(opt_state) -> dict[str, list]:
    """The leaves of every optax ScaleByAdamState in `opt_state`, by field: {"mu": [...], "nu": [...]}."""
    import optax

    found = {"mu": [], "nu": []}
    is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)  # noqa: E731
    for node in jax.tree.leaves(opt_state, is_leaf=is_adam):
        if is_adam(node):
            found["mu"] += jax.tree.leaves(node.mu)
            found["nu"] += jax.tree.leaves(node.nu)
    return found


def layer_params(params) -> int:
    """Parameters of one transformer block (the stacked [L, ...] blocks / L)."""
    blocks = jax.tree.leaves(params["blocks"])
    return sum(math.prod(x.shape) for x in blocks) // blocks[0].shape[0]


def block_activations(cfg, rows: int, t: int, s: int, act: int, train: bool) -> dict[str, int]:
    """One block's activations for `rows` rows of `t` queries over `s` keys: the attention scores (float32)
    and probabilities (compute dtype), with their gradient when `train`; and the other [rows, t, width]
    tensors (q, k, v, attention output, SwiGLU gate | up and product, norms and residual adds)."""
    n, k, h, d, f = cfg.n_head, cfg.kv_heads, cfg.head_dim, cfg.n_embd, cfg.mlp_dim
    scores = rows * n * t * s * (4 + act + (4 if train else 0))
    other = rows * t * (2 * n * h + 2 * k * h + 3 * f + 4 * d) * act * (2 if train else 1)
    return {"attention": scores, "other": other}


def model_cfg(args, *, reward: bool = False):
    from jaxrlhf.models import ModelConfig, hf

    dtype = "bfloat16" if args.bf16 else "float32"
    length = max(p_len(args) + r_len(args), score_len(args))
    common = dict(block_size=length, compute_dtype=dtype, remat=args.remat)
    if reward:
        cfg = ModelConfig.preset(args.rm_preset, **common) if args.rm_preset else model_cfg(args)
        return dataclasses.replace(cfg, tie_embeddings=True, param_dtype=args.rm_dtype)  # no LM head
    if args.init_from:
        return dataclasses.replace(hf.read_config(args.init_from), **common)
    return ModelConfig.preset(args.preset, **common)


def p_len(args) -> int:
    """P: the pipeline's prompt width (common.prompt_budget)."""
    return args.max_prompt_tokens + args.template_tokens


def r_len(args) -> int:
    """R: the sampler's budget, the answer and its end-of-turn (UfConfig.response_len)."""
    return args.max_answer_tokens + 1


def score_len(args) -> int:
    """The reward model's row: re-rendered with its own template (a Llama 3.1 system header), padded to 64."""
    return args.score_len or -(-(p_len(args) + r_len(args) + 32) // 64) * 64


# ------------------------------------------------------------------------------------------- stages


def plan(args, hardware: str) -> dict:
    """Bytes per device of every component of generate, score and rebel on `hardware`."""
    import jax.numpy as jnp

    from jaxrlhf import models, parallel, train

    devices, hbm_gib, what = HARDWARE[hardware]
    fsdp = args.mesh_fsdp or devices
    mesh = parallel.make_mesh(devices // fsdp, fsdp, devices=jax.devices()[:devices])
    cfg, rm_cfg = model_cfg(args), model_cfg(args, reward=True)
    act = 2 if args.bf16 else 4
    P, R = p_len(args), r_len(args)
    T = P + R
    V, L, D = cfg.vocab_size, cfg.n_layer, cfg.n_embd
    key = jax.random.key(0)
    gen_prompts = args.generate_batch or devices
    score_rows = args.score_batch or 2 * devices
    pairs = args.rebel_batch or devices
    for name, size in (("generate", gen_prompts), ("score", score_rows), ("rebel", pairs)):
        if size % devices:
            raise SystemExit(
                f"--{name}-batch {size} is not a multiple of the {devices} devices of {hardware}"
            )
    chunk = lambda t: -(-t // -(-t // models.transformer.LOGPROB_CHUNK))  # noqa: E731  (lm_token_logprobs' slice)

    params = jax.eval_shape(functools.partial(models.init_params, cfg=cfg), key)
    policy = shard_bytes(params, mesh)
    per_layer = layer_params(params)

    # generate: b rows of the repeated prompts per device
    b = gen_prompts * args.answers // devices
    cache = jax.eval_shape(functools.partial(models.init_cache, cfg, b * devices, T))
    kv = sum(math.prod(x.shape) * x.dtype.itemsize for x in (*cache.k, *cache.v)) // devices
    prefill = block_activations(cfg, b, P, T, act, train=False)
    scoring = block_activations(cfg, b, T, T, act, train=False)
    decoding = kv + prefill["attention"] + prefill["other"] + b * V * 4 * 3
    logprobs = scoring["attention"] + scoring["other"] + b * chunk(T - 1) * V * 4 * 2
    generate = {
        "policy params": policy,
        "KV cache": kv,
        "prefill, one layer": prefill["attention"] + prefill["other"],
        "sampler logits": b * V * 4 * 3,
        "teacher-forced logprobs, one layer": scoring["attention"] + scoring["other"],
        "LM head on one slice": b * chunk(T - 1) * V * 4 * 2,
        "one layer gathered": per_layer * (4 + act),
        "total": policy + max(decoding, logprobs) + per_layer * (4 + act),
    }

    # score: the reward model's forward on score_rows / devices rows
    rm = jax.eval_shape(functools.partial(models.init_scalar_model, cfg=rm_cfg), key)
    rm_bytes = shard_bytes(rm, mesh)
    b_s, t_s = score_rows // devices, score_len(args)
    fwd = block_activations(rm_cfg, b_s, t_s, t_s, act, train=False)
    rm_item = jnp.dtype(rm_cfg.param_dtype).itemsize
    score = {
        "reward-model params": rm_bytes,
        "forward, one layer": fwd["attention"] + fwd["other"],
        "one layer gathered": layer_params(rm["gpt"]) * 2 * rm_item,
    }
    score["total"] = sum(score.values())

    # rebel: the TrainState of the real optimizer, pairs x 2 rows
    optim = train.OptimConfig(
        lr=3e-7, schedule="linear", min_lr_ratio=0.0, weight_decay=0.0, mu_dtype=args.mu_dtype
    )  # fmt: skip  (online.PairStageConfig's defaults)
    tx = train.make_optimizer(optim)
    state = jax.eval_shape(lambda k: train.init_train_state(models.init_params(k, cfg), tx), key)
    moments = adam_moments(state.opt_state)
    b_r = 2 * pairs // devices
    layer = block_activations(cfg, b_r, T, T, act, train=True)
    saved = (
        L * b_r * T * D * act
        if args.remat
        else L * sum(block_activations(cfg, b_r, T, T, act, False).values())
    )
    mu, nu = shard_bytes(moments["mu"], mesh), shard_bytes(moments["nu"], mesh)
    rebel = {
        "params (float32)": shard_bytes(state.params, mesh),
        "gradients": shard_bytes(state.params, mesh),
        f"Adam mu ({moments['mu'][0].dtype})": mu,
        f"Adam nu ({moments['nu'][0].dtype})": nu,
        "saved block inputs" if args.remat else "saved activations (no remat)": saved,
        "one layer recomputed + gradients": layer["attention"] + layer["other"],
        "one layer gathered + its gradient": per_layer * (4 + act + 4),
        "LM head on one slice": b_r * chunk(T - 1) * V * 4 * 3,
    }
    rebel["total"] = sum(rebel.values())
    budget = hbm_gib * GIB * args.reserve
    stages = {"generate": generate, "score": score, "rebel": rebel}
    out = {
        "hardware": hardware,
        "what": what,
        "devices": devices,
        "hbm_bytes": int(hbm_gib * GIB),
        "mesh": {"data": devices // fsdp, "fsdp": fsdp},
        "lengths": {"P": P, "R": R, "T": T, "score_T": t_s, "logprob_slice": chunk(T - 1)},
        "rows_per_device": {"generate": b, "score": b_s, "rebel": b_r},
        "batch": {
            "generate.batch_size": gen_prompts,
            "score.batch_size": score_rows,
            "rebel.batch_size": pairs,
        },  # fmt: skip
        "params": cfg.num_params,
        "stages": {name: {k: int(v) for k, v in s.items()} for name, s in stages.items()},
        "fits": {name: bool(s["total"] <= budget) for name, s in stages.items()},
    }
    if args.xla:
        out["xla_cpu"] = xla_check(args, cfg, rm_cfg, tx, mesh, pairs, score_rows, T, t_s)
    return out


def xla_check(args, cfg, rm_cfg, tx, mesh, pairs, score_rows, T, t_s) -> dict:
    """XLA:CPU's bytes per device (arguments + outputs not aliased to them + temporaries) of the real
    rebel step (parallel.jit_step of train.make_rebel_step, 4 epochs) and score program
    (batches.jit_eval of models.sequence_scores), compiled for `mesh` from abstract inputs."""
    import jax.numpy as jnp

    from jaxrlhf import models, parallel, train
    from jaxrlhf.stages import batches

    S = jax.ShapeDtypeStruct
    key = jax.random.key(0)

    def footprint(compiled) -> int:
        m = compiled.memory_analysis()
        return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                   + m.temp_size_in_bytes)  # fmt: skip

    state = jax.eval_shape(lambda k: train.init_train_state(models.init_params(k, cfg), tx), key)
    step = parallel.jit_step(train.make_rebel_step(cfg, tx, epochs=4), mesh, state)
    rows = (pairs, 2, T)
    batch = train.PrefBatch(S(rows, jnp.int32), S(rows, bool), S(rows, bool), S((pairs, 2), jnp.float32),
                            S((pairs, 2), jnp.float32), S((pairs,), bool))  # fmt: skip
    rebel = footprint(step.lower(state, batch, key).compile())
    rm = jax.eval_shape(functools.partial(models.init_scalar_model, cfg=rm_cfg), key)
    fn = batches.jit_eval(lambda p, b: models.sequence_scores(p, b[0], b[1], rm_cfg), mesh, rm)
    score = footprint(fn.lower(rm, (S((score_rows, t_s), jnp.int32), S((score_rows, t_s), bool))).compile())
    return {"rebel": rebel, "score": score}


# ------------------------------------------------------------------------------------------- output


def table(p: dict, reserve: float) -> str:
    hbm = p["hbm_bytes"] / GIB
    rows = ", ".join(f"{k} {v}" for k, v in p["rows_per_device"].items())
    lines = [
        f"{p['what']}: --mesh-fsdp {p['mesh']['fsdp']} (data {p['mesh']['data']}); P={p['lengths']['P']} "
        f"R={p['lengths']['R']}; rows per device: {rows}",
        f"  {'stage':<9}{'component':<38}{'GiB/device':>11}",
    ]
    for stage, parts in p["stages"].items():
        for i, (name, value) in enumerate(parts.items()):
            label = stage if i == 0 else ""
            if name != "total":
                lines.append(f"  {label:<9}{name:<38}{value / GIB:>11.2f}")
                continue
            verdict = "fits" if p["fits"][stage] else "does NOT fit"
            xla = p.get("xla_cpu", {}).get(stage)
            note = f"; XLA:CPU {xla / GIB:.2f}" if xla is not None else ""
            lines.append(
                f"  {label:<9}{'= total':<38}{value / GIB:>11.2f}  {verdict} in {reserve * hbm:.1f} "
                f"({reserve:.0%} of {hbm:.1f}){note}"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    names = args.hardware.split(",")
    jax.config.update("jax_num_cpu_devices", max(HARDWARE[h][0] for h in names))
    jax.config.update("jax_platforms", "cpu")
    plans = [plan(args, h) for h in names]
    for p in plans:
        print(table(p, args.reserve), end="\n\n")
    if args.out:
        settings = {k: v for k, v in vars(args).items() if k not in ("out", "hardware")}
        with open(args.out, "w") as f:
            json.dump({"settings": settings, "plans": plans}, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
