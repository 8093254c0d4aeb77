"""Where HappyGPT's RL iteration spends its time: the VADER host path, the same iteration with a learned
reward as separate programs, and the fused program (sample + score + experience + update in one jit).

    python scripts/bench_rl_iteration.py --from runs/happy --out bench_rl_iteration.json [--rounds 12]

`--from` is a happy run with a finished SFT stage: its policy samples real tweets (they stop at their first
"⏎", so the sampler's early exit acts as in a run). The learned reward model is the SFT trunk with a random
scalar head: a reward model's cost does not depend on its weights. The PPO state, optimizer and sampling
config are `python -m jaxrlhf.happy`'s defaults.

Paths, each timed per iteration in every round, in alternating order so that drift hits all alike, and
every one from a fresh copy of the same state with the same key (so all sample the same tweets):
  vader_host       sample (jit) -> VADER on the host -> learn (jit)                    (happy's default)
  learned_split    sample (jit) -> learned reward (jit) -> learn (jit)                 (the same math fused)
  fused            one jit of train.make_fused_iteration (happy's --reward learned)
  fused_rm_args    the same, the reward model's params passed as arguments, not closed over as constants
Each part of the split paths is timed on its own; `fused - learned_split` is what fusing costs or saves.
A jax.profiler trace of `--profile_calls` iterations of each path splits op time (summed over XLA:CPU's
threads) by category and by region: inside while loops (the sampler's; any loop XLA kept), and the rest.
The fused program's outputs are checked against the split path's (same key: equal up to rounding).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pathlib
import re
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_sampling  # noqa: E402  (its HLO parsing and trace reader)

from jaxrlhf import happy, models, text, train  # noqa: E402
from jaxrlhf.engine import checkpoint
from jaxrlhf.rollout import (
    SampleConfig,  # noqa: E402
    sampler,
    scoring,
)


def load_sft(run_dir: str):
    """(params, tokenizer) of a happy run's last SFT checkpoint, read without a target structure."""
    step = checkpoint.latest_step(run_dir, "sft")
    if step is None:
        raise SystemExit(f"--from {run_dir}: no sft checkpoint there; run python -m jaxrlhf.happy first")
    state_dir = checkpoint.resolve(run_dir) / "sft" / str(step) / "state"
    with ocp.StandardCheckpointer() as ckptr:
        state = ckptr.restore(state_dir)
    params = jax.tree.map(jnp.asarray, state["params"])
    tok_dir = checkpoint.restore_tokenizer(run_dir, "sft", tempfile.mkdtemp(prefix="bench_rl_it_"))
    return params, text.load_tokenizer(tok_dir)


def while_regions(hlo: str) -> dict[str, str]:
    """Instruction name -> "in loops" for every op inside a while loop's body (the sampler's decode loop
    and the loops nested in it; also any other loop XLA kept, such as a PPO epochs scan), else "rest"."""
    comps = bench_sampling._computations(hlo)
    bodies = set()
    for lines in comps.values():
        for ln in lines:
            if bench_sampling._opcode(ln) == "while":
                bodies.add(re.search(r"body=%([\w.\-]+)", ln).group(1))
    # computations called from a body (fusions, nested loops) belong to it too
    changed = True
    while changed:
        changed = False
        for name in list(bodies):
            for ln in comps.get(name, []):
                for callee in re.findall(r"(?:calls|body|condition|to_apply)=%([\w.\-]+)", ln):
                    if callee not in bodies:
                        bodies.add(callee)
                        changed = True
    return {
        ln.split("=")[0].strip().lstrip("%"): ("in loops" if comp in bodies else "rest")
        for comp, lines in comps.items()
        for ln in lines
    }


def profile(calls: list, hlos: list[str], n: int) -> dict:
    """Op time per iteration by category and region, from a trace of `n` runs of the programs `calls`."""
    categories, regions = {}, {}
    for tag, hlo in enumerate(hlos):
        categories.update({(tag, k): v for k, v in bench_sampling.op_categories(hlo).items()})
        regions.update({(tag, k): v for k, v in while_regions(hlo).items()})
    events = bench_sampling.trace_events(lambda: [call(1000 + i) for i in range(n) for call in calls])
    by_cat, by_region, by_op = collections.Counter(), collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") != "X":
            continue
        name = e.get("name", "")
        # op names are unique within a program, not across them: take the first program naming it
        key = next(((t, name) for t in range(len(hlos)) if (t, name) in categories), None)
        if key is None or categories[key] == "control":
            continue
        us = e.get("dur", 0.0) / n
        by_cat[categories[key]] += us
        by_region[regions.get(key, "rest")] += us
        by_op[name] += us
    return {
        "op_time_ms": round(sum(by_cat.values()) / 1e3, 2),
        "ms_by_category": {k: round(v / 1e3, 2) for k, v in by_cat.most_common()},
        "ms_by_region": {k: round(v / 1e3, 2) for k, v in by_region.most_common()},
        "top_ops_ms": {k: round(v / 1e3, 2) for k, v in by_op.most_common(10)},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--from", dest="src", required=True, help="a happy run with a finished sft stage")
    ap.add_argument("--out", default="bench_rl_iteration.json")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--profile_calls", type=int, default=3)
    args = ap.parse_args()

    sft_params, tok = load_sft(args.src)
    cfg = happy.HappyConfig()
    mcfg = happy._rl_model_cfg(happy.model_config(cfg, tok.vocab_size))
    rc = happy.rl_settings(cfg)
    rlc = happy._rl_config(cfg)
    optim = train.OptimConfig(lr=rc.lr, weight_decay=0.0, grad_clip=1.0)
    tx = train.make_per_model_optimizer({"policy": optim, "value": optim})
    scfg = SampleConfig(
        max_new_tokens=mcfg.block_size - 1, temperature=rc.temperature, top_k=rc.top_k, eos_id=tok.eos_id
    )
    b = rc.batch_size
    prompt = jnp.full((b, 1), tok.eos_id, jnp.int32)
    prompt_mask = jnp.ones((b, 1), bool)
    value = {"gpt": sft_params, "head": models.init_scalar_head(jax.random.key(1), mcfg)}
    state0 = train.init_rl_state(train.init_rl_params(sft_params, value, rlc), tx, rlc)
    ref = sft_params
    rm = {"gpt": jax.tree.map(jnp.copy, sft_params), "head": models.init_scalar_head(jax.random.key(2), mcfg)}

    vader = scoring.make_text_reward(tok, scoring.vader_scores)
    reward_const = scoring.make_learned_reward(rm, mcfg)

    def reward_args(rm_params, ro):
        return models.sequence_scores(rm_params, ro.tokens, ro.mask, mcfg)

    sample = jax.jit(lambda p, k: sampler.sample_fn(p, prompt, prompt_mask, mcfg, scfg, k))
    score = jax.jit(reward_const)
    learn = jax.jit(train.make_learn(mcfg, tx, rlc, sample_cfg=scfg), donate_argnums=0)
    fused_c = train.make_fused_iteration(mcfg, scfg, tx, rlc, reward_const)
    fused = jax.jit(lambda s, k: fused_c(s, ref, prompt, prompt_mask, key=k), donate_argnums=0)

    def fused_a_fn(s, rm_params, k):
        it = train.make_fused_iteration(mcfg, scfg, tx, rlc, lambda ro: reward_args(rm_params, ro))
        return it(s, ref, prompt, prompt_mask, key=k)

    fused_a = jax.jit(fused_a_fn, donate_argnums=0)
    root = jax.random.key(7)
    fresh = lambda: jax.block_until_ready(jax.tree.map(jnp.copy, state0))  # noqa: E731

    parts = collections.defaultdict(list)  # "path/part" -> seconds

    def timed(tag, fn, *a, **kw):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(*a, **kw))
        parts[tag].append(time.perf_counter() - t0)
        return out

    def run_split(path, i, host: bool):
        s = fresh()
        k_sample, k_learn = jax.random.split(jax.random.fold_in(root, i))
        t0 = time.perf_counter()
        ro = timed(f"{path}/sample", sample, s.params["policy"], k_sample)
        if host:
            sc = jnp.asarray(timed(f"{path}/score (host VADER)", vader, ro))
        else:
            sc = timed(f"{path}/score (jit)", score, ro)
        s, m = timed(f"{path}/learn", learn, s, ref, ro, sc, key=k_learn)
        parts[f"{path}/total"].append(time.perf_counter() - t0)
        return s, m

    def run_fused(path, i, fn, *extra):
        s = fresh()
        # the fused iteration splits its key the same way: same tweets, same update
        out = timed(f"{path}/total", fn, s, *extra, jax.random.fold_in(root, i))
        return out[0], out[1]

    paths = {
        "vader_host": lambda i: run_split("vader_host", i, True),
        "learned_split": lambda i: run_split("learned_split", i, False),
        "fused": lambda i: run_fused("fused", i, fused),
        "fused_rm_args": lambda i: run_fused("fused_rm_args", i, fused_a, rm),
    }
    compile_s = {}
    first = {}
    for tag, fn in paths.items():
        t0 = time.perf_counter()
        first[tag] = fn(0)
        compile_s[tag] = time.perf_counter() - t0
    parts.clear()
    order = list(paths)
    for r in range(args.rounds):
        for tag in order if r % 2 == 0 else reversed(order):
            paths[tag](1 + r)

    # the fused iteration against the split one: same tweets, same reward, same update
    ps, pf = first["learned_split"][0].params, first["fused"][0].params
    max_diff = max(
        float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(ps), jax.tree.leaves(pf), strict=True)
    )
    ms, mf = first["learned_split"][1], first["fused"][1]
    same_reward = float(abs(ms["reward"] - mf["reward"]))

    ms_of = {k: 1e3 * statistics.median(v) for k, v in parts.items()}
    result = {
        "from": args.src,
        "rounds": args.rounds,
        "batch": b,
        "compile_and_first_s": compile_s,
        "ms_median": {k: round(v, 2) for k, v in sorted(ms_of.items())},
        "ms_min": {k: round(1e3 * min(v), 2) for k, v in sorted(parts.items())},
        "fused_over_learned_split": ms_of["fused/total"] / ms_of["learned_split/total"],
        "fused_over_vader_host": ms_of["fused/total"] / ms_of["vader_host/total"],
        "fused_rm_args_over_fused": ms_of["fused_rm_args/total"] / ms_of["fused/total"],
        "fused_vs_split_max_param_diff": max_diff,
        "fused_vs_split_reward_diff": same_reward,
        "mean_response_length": float(first["fused"][1]["response_length"]),
    }

    if args.profile_calls:
        key = jax.random.key(3)
        s = fresh()
        ro = sample(s.params["policy"], key)
        sc = score(ro)
        hlo = lambda f, *a: f.lower(*a).compile().as_text()  # noqa: E731
        h_sample, h_score = hlo(sample, s.params["policy"], key), hlo(score, ro)
        h_learn = learn.lower(s, ref, ro, sc, key=key).compile().as_text()
        h_fused = hlo(fused, s, key)

        def split_calls():
            box = {}

            def c_sample(i):
                box["s"] = fresh()
                box["ro"] = jax.block_until_ready(sample(box["s"].params["policy"], jax.random.key(i)))

            def c_score(i):
                box["sc"] = jax.block_until_ready(score(box["ro"]))

            def c_learn(i):
                jax.block_until_ready(learn(box["s"], ref, box["ro"], box["sc"], key=jax.random.key(i)))

            return [c_sample, c_score, c_learn]

        def c_fused(i):
            jax.block_until_ready(fused(fresh(), jax.random.key(i)))

        result["profile"] = {
            "learned_split": profile(split_calls(), [h_sample, h_score, h_learn], args.profile_calls),
            "fused": profile([c_fused], [h_fused], args.profile_calls),
        }
        result["hlo_ops"] = {
            name: sum(1 for ln in h.splitlines() if ln.startswith(("  %", "  ROOT %")))
            for name, h in {"sample": h_sample, "score": h_score, "learn": h_learn, "fused": h_fused}.items()
        }

    pathlib.Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "profile"}, indent=2))
    for tag, p in result.get("profile", {}).items():
        print(tag, json.dumps(p))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
