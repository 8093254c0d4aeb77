"""Benchmark `jaxrlhf.rollout.sample` (one jitted while_loop over a KV cache) on this machine.

Cases, random init, float32:
  gpt-micro (4 layers, 4 heads, width 128, vocab 100, block 64): 32 sequences x 32 new tokens, top-k 30,
    from a 1-token prompt;
  GPT-2-124M shape (vocab 50257): 8 sequences x 64 new tokens from an 8-token prompt (skip: --skip_gpt2).

For each case it reports ms per call and per new token after compile (median of >= 20 calls, of
--gpt2_calls for GPT-2 whose calls take seconds; block_until_ready), the first-call (compile) time, and
checks that a second call with the same shapes and a new key compiles nothing (the jit cache size and a
jax.monitoring count of backend compiles). From the compiled program it counts the HLO ops of one decode
step (the while body; bitcasts, tuples, parameters and constants left out), and a jax.profiler trace of a
few calls splits the op time into matmuls (dots and the fusions holding one), reductions, sorts, cache
updates, copies and elementwise ops. A loop that runs only the decode step's matmuls (same shapes, nothing
else) gives the floor the dots alone set.

With `--baseline REF` (e.g. `--baseline main`) the sampler of git revision REF (its jaxrlhf/sampler.py,
models.py, layers.py and ops.py, loaded as a second package in this process) runs on the same params and
keys: calls alternate old / new so machine drift hits both, the report gives new / old as a ratio, and it
checks the two rollouts are bitwise identical.

  python scripts/bench_sampling.py --out bench_sampling.json [--calls 20] [--skip_gpt2] [--baseline main]
      [--gpt2_calls 6] [--profile_calls 3]
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import importlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf import models
from jaxrlhf.models import ModelConfig
from jaxrlhf.rollout import SampleConfig, sampler

_BASELINE_MODULES = ("ops", "layers", "model", "sampling")


def load_baseline(ref: str, package: str = "jaxrlhf_baseline"):
    """The sampling module of git revision `ref`, imported as `package` (config.py stays the current one,
    so both samplers take the same config objects)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tmp = tempfile.mkdtemp(prefix="bench_sampling_")
    pkg = os.path.join(tmp, package)
    os.makedirs(pkg)
    open(os.path.join(pkg, "__init__.py"), "w").close()
    names = "|".join(_BASELINE_MODULES)
    for name in _BASELINE_MODULES:
        src = subprocess.run(
            ["git", "-C", root, "show", f"{ref}:jaxrlhf/{name}.py"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        # `from jaxrlhf import model, ops` and `from jaxrlhf.layers import ...` -> the baseline copies.
        src = re.sub(rf"from jaxrlhf import ((?:(?:{names})(?:, )?)+)\b", rf"from {package} import \1", src)
        src = re.sub(rf"from jaxrlhf\.({names}) import", rf"from {package}.\1 import", src)
        with open(os.path.join(pkg, f"{name}.py"), "w") as f:
            f.write(src)
    sys.path.insert(0, tmp)
    return importlib.import_module(f"{package}.sampling")


# ------------------------------------------------------------------------------------ HLO op counts

_FREE_OPS = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant"}


def _computations(hlo: str) -> dict[str, list[str]]:
    comps, cur = {}, None
    for line in hlo.splitlines():
        m = re.match(r"^(?:ENTRY )?%([\w.\-]+) \(", line)
        if m:
            cur = comps.setdefault(m.group(1), [])
        elif cur is not None and line.startswith(("  %", "  ROOT %")):
            cur.append(line.replace("ROOT ", "", 1))
    return comps


def _opcode(line: str) -> str:
    """The opcode of one HLO instruction line: `%name = SHAPE opcode(operands), ...`."""
    rest = line.split(" = ", 1)[1]
    if rest.startswith("("):  # a tuple shape: skip to its closing parenthesis
        depth = 0
        for i, ch in enumerate(rest):
            depth += {"(": 1, ")": -1}.get(ch, 0)
            if depth == 0:
                rest = rest[i + 1 :]
                break
    else:
        rest = rest.split(" ", 1)[1]
    return rest.strip().split("(", 1)[0]


def decode_step_ops(hlo: str) -> dict:
    """Ops in the body of the sampler's outer while loop (the decode step) of compiled HLO text.

    The sampling loop is the while whose state carries the most arrays (the KV cache); the Gumbel noise's
    own threefry loop, if any, is smaller. Each fusion counts as one op (one kernel launch on XLA:CPU).
    """
    comps = _computations(hlo)
    whiles = [ln for lines in comps.values() for ln in lines if _opcode(ln) == "while"]
    loop = max(whiles, key=lambda ln: ln.split(" while(")[0].count("["))
    body = re.search(r"body=%([\w.\-]+)", loop).group(1)
    counts = collections.Counter(_opcode(ln) for ln in comps[body])
    real = {k: v for k, v in counts.items() if k not in _FREE_OPS}
    kinds = collections.Counter()
    for ln in comps[body]:
        if _opcode(ln) == "fusion":
            kinds[re.search(r"kind=(\w+)", ln).group(1)] += 1
    return {"ops_per_decode_step": sum(real.values()), "by_opcode": dict(real), "fusion_kinds": dict(kinds)}


def op_categories(hlo: str) -> dict[str, str]:
    """Instruction name -> matmul / reduce / sort / update-slice / copy / elementwise / control.

    A fusion takes the category of what it holds, in that order (a fusion holding a dot is a matmul).
    """
    comps = _computations(hlo)
    inner = {name: {_opcode(ln) for ln in lines} for name, lines in comps.items()}
    order = (
        ("matmul", {"dot", "convolution"}),
        ("reduce", {"reduce", "reduce-window"}),
        ("sort", {"sort"}),
        ("update-slice", {"dynamic-update-slice", "scatter"}),
        ("copy", {"copy"}),
    )
    categories = {}
    for lines in comps.values():
        for ln in lines:
            name, op = ln.split("=")[0].strip().lstrip("%"), _opcode(ln)
            if op in ("while", "call", "conditional") or op in _FREE_OPS:
                categories[name] = "control"
                continue
            called = re.search(r"calls=%([\w.\-]+)", ln)
            ops = inner.get(called.group(1), set()) if op == "fusion" and called else {op}
            categories[name] = next((cat for cat, members in order if ops & members), "elementwise")
    return categories


def _step_names(hlo: str) -> set[str]:
    """Names of the instructions in the decode step (see `decode_step_ops`)."""
    comps = _computations(hlo)
    whiles = [ln for lines in comps.values() for ln in lines if _opcode(ln) == "while"]
    loop = max(whiles, key=lambda ln: ln.split(" while(")[0].count("["))
    body = re.search(r"body=%([\w.\-]+)", loop).group(1)
    return {ln.split("=")[0].strip().lstrip("%") for ln in comps[body]}


# ------------------------------------------------------------------------------------- profiling


def trace_events(run) -> list[dict]:
    """The events of a jax.profiler trace of `run()` (Perfetto's JSON: "X" events carry op names)."""
    with tempfile.TemporaryDirectory() as logdir:
        with jax.profiler.trace(logdir, create_perfetto_trace=True):
            run()
        (path,) = glob.glob(os.path.join(logdir, "**", "perfetto_trace.json.gz"), recursive=True)
        with gzip.open(path) as f:
            events = json.load(f)
    return events["traceEvents"] if isinstance(events, dict) else events


def profile(call, hlo: str, n_calls: int) -> dict:
    """Op time per call from a jax.profiler trace of `n_calls` calls, by category (`op_categories`).

    Op events carry the HLO instruction name; control flow (while, call, conditional) is left out, as its
    time is that of the ops inside. Times are summed over XLA:CPU's threads: with two busy cores the sum
    can exceed the wall time, and the wall time also holds the gaps between ops (dispatch, waiting).
    """
    categories, step = op_categories(hlo), _step_names(hlo)
    events = trace_events(lambda: [call(1000 + i) for i in range(n_calls)])
    by_category, by_op, n_step, in_step = collections.Counter(), collections.Counter(), 0, 0.0
    for e in events:
        name = e.get("name", "")
        if e.get("ph") != "X" or categories.get(name, "control") == "control":
            continue
        us = e.get("dur", 0.0) / n_calls
        by_category[categories[name]] += us
        by_op[name] += us
        if name in step:
            in_step += us
            n_step += 1
    total = sum(by_category.values())
    return {
        "op_time_ms_per_call": total / 1e3,
        "matmul_ms_per_call": by_category["matmul"] / 1e3,
        "matmul_share": by_category["matmul"] / total if total else 0.0,
        "ms_per_call_by_category": {k: round(v / 1e3, 3) for k, v in by_category.most_common()},
        "decode_step_op_ms_per_call": in_step / 1e3,
        "decode_step_op_events_per_call": n_step / n_calls,
        "top_ops_ms_per_call": {k: round(v / 1e3, 3) for k, v in by_op.most_common(12)},
    }


# ------------------------------------------------------------------------------------------ bench


class _CompileCounter:
    """Counts XLA backend compiles (jax.monitoring duration events) while active."""

    def __init__(self):
        self.n = 0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            self.n += 1


def _rollout_equal(a, b) -> bool:
    return all(
        np.array_equal(np.asarray(getattr(a, f)), np.asarray(getattr(b, f)))
        for f in ("response", "response_mask", "logprobs", "finished")
    )


def make_matmul_floor(params, cfg: ModelConfig, batch: int, cache_length: int, steps: int):
    """A jitted loop of `steps` decode steps that runs only the matmuls of one (same shapes: the four dense
    layers and two attention products per layer, the LM head) and no other math: a floor for the sampler,
    the time its dots alone take on this machine. Returns call(i) -> blocks until done."""
    B, D, N, H = batch, cfg.n_embd, cfg.n_head, cfg.head_dim
    blocks = models.kv_cache.unstack_blocks(params)["blocks"]
    kv = jnp.full((B * N, cache_length, H), 0.01, jnp.float32)

    def step(_, carry):
        x, acc = carry
        for p in blocks:
            qkv = x @ p["attn"]["c_attn"]["kernel"]  # [B, 3D]
            q = qkv[:, :D].reshape(B * N, 1, H)
            scores = jnp.einsum("xth,xsh->xts", q, kv)  # [B*N, 1, S]
            y = jnp.einsum("xts,xsh->xth", scores, kv).reshape(B, D)
            x = y @ p["attn"]["c_proj"]["kernel"]
            x = (x @ p["mlp"]["c_fc"]["kernel"]) @ p["mlp"]["c_proj"]["kernel"]
        logits = x @ params["wte"].T  # [B, V]
        return x, acc + logits[:, :1]

    fn = jax.jit(lambda x: jax.lax.fori_loop(0, steps, step, (x, jnp.zeros((B, 1))))[1])
    x0 = jnp.full((B, D), 0.1, jnp.float32)
    jax.block_until_ready(fn(x0))
    return lambda i: jax.block_until_ready(fn(x0))


def bench(
    name: str,
    cfg: ModelConfig,
    scfg: SampleConfig,
    batch: int,
    prompt_len: int,
    calls: int,
    compiles: _CompileCounter,
    baseline=None,
    profile_calls: int = 3,
) -> dict:
    params = models.init_params(jax.random.key(0), cfg)
    prompt = jax.random.randint(jax.random.key(1), (batch, prompt_len), 0, cfg.vocab_size, jnp.int32)
    prompt_mask = jnp.ones(prompt.shape, bool)
    jax.block_until_ready((params, prompt))
    root = jax.random.key(2)

    def caller(module):
        def call(i):
            out = module.sample(params, prompt, prompt_mask, cfg, scfg, key=jax.random.fold_in(root, i))
            return jax.block_until_ready(out)

        return call

    samplers = {"new": (sampler, caller(sampler))}
    if baseline is not None:
        samplers["old"] = (baseline, caller(baseline))
    result = {
        "case": name,
        "batch": batch,
        "prompt_len": prompt_len,
        "max_new_tokens": scfg.max_new_tokens,
        "top_k": scfg.top_k,
        "vocab_size": cfg.vocab_size,
    }
    first = {}
    for tag, (module, call) in samplers.items():
        n0 = compiles.n
        t0 = time.perf_counter()
        first[tag] = call(0)
        first_s = time.perf_counter() - t0  # trace + compile + one run
        size1, n1 = module._sample_jit._cache_size(), compiles.n
        t0 = time.perf_counter()
        call(1)
        second_s = time.perf_counter() - t0
        hlo = module._sample_jit.lower(params, prompt, prompt_mask, cfg, scfg, root).compile().as_text()
        result[tag] = {
            "first_call_s": first_s,
            "second_call_ms": 1e3 * second_s,
            "compiles_in_first_call": n1 - n0,
            "recompiled_on_second_call": module._sample_jit._cache_size() != size1 or compiles.n != n1,
            **decode_step_ops(hlo),
            "_hlo": hlo,
        }
    timed = {tag: call for tag, (_, call) in samplers.items()}
    if cfg.mlp == "gelu" and cfg.position == "learned":  # the GPT-2 layout make_matmul_floor assumes
        timed["matmul_floor"] = make_matmul_floor(
            params, cfg, batch, prompt_len + scfg.max_new_tokens, scfg.max_new_tokens
        )
    times = {tag: [] for tag in timed}
    for i in range(calls):
        for tag, call in timed.items() if i % 2 == 0 else reversed(timed.items()):
            t0 = time.perf_counter()
            call(2 + i)
            times[tag].append(time.perf_counter() - t0)
    new_tokens = batch * scfg.max_new_tokens
    if "matmul_floor" in times:
        ts = times.pop("matmul_floor")
        result["matmul_floor_ms_per_call"] = 1e3 * statistics.median(ts)
        result["matmul_floor_ms_per_call_min"] = 1e3 * min(ts)
    for tag, ts in times.items():
        ms = 1e3 * statistics.median(ts)
        hlo = result[tag].pop("_hlo")
        result[tag].update(
            ms_per_call=ms,
            ms_per_call_min=1e3 * min(ts),
            ms_per_decode_step=ms / scfg.max_new_tokens,
            ms_per_token=ms / new_tokens,
            tokens_per_s=new_tokens / (ms / 1e3),
            response_tokens_generated=int(jnp.sum(first[tag].response_mask)),
        )
        if profile_calls:
            result[tag]["profile"] = profile(samplers[tag][1], hlo, profile_calls)
    if baseline is not None:
        pairs = [n / o for n, o in zip(times["new"], times["old"], strict=True)]
        result["ratio_new_over_old_median_ms"] = result["new"]["ms_per_call"] / result["old"]["ms_per_call"]
        result["ratio_new_over_old_median_of_pairs"] = statistics.median(pairs)
        result["ratio_new_over_old_min_ms"] = (
            result["new"]["ms_per_call_min"] / result["old"]["ms_per_call_min"]
        )
        result["rollouts_bitwise_identical"] = _rollout_equal(first["new"], first["old"])
    return result


def _summary(r: dict) -> str:
    parts = [r["case"]]
    for tag in ("old", "new"):
        if tag in r:
            x = r[tag]
            prof = x.get("profile", {})
            parts.append(
                f"{tag}: {x['ms_per_call']:.1f} ms/call {1e3 * x['ms_per_token']:.1f} us/token "
                f"{x['ops_per_decode_step']} ops/step matmul {100 * prof.get('matmul_share', 0):.0f}% "
                f"recompiled={x['recompiled_on_second_call']}"
            )
    if "matmul_floor_ms_per_call" in r:
        parts.append(f"matmul-only loop {r['matmul_floor_ms_per_call']:.1f} ms")
    if "ratio_new_over_old_median_of_pairs" in r:
        parts.append(
            f"new/old {r['ratio_new_over_old_median_of_pairs']:.3f} "
            f"identical={r['rollouts_bitwise_identical']}"
        )
    return " | ".join(parts)


def write(path: str, runs: list, baseline: str | None) -> None:
    out = {
        "runs": runs,
        "baseline": baseline,
        "jax": jax.__version__,
        "device": str(jax.devices()[0].device_kind),
        "loadavg": os.getloadavg(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
    with open(path, "w") as f:
        json.dump(out, f, indent=2)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_sampling.json")
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--skip_gpt2", action="store_true")
    ap.add_argument("--gpt2_calls", type=int, default=6, help="timed calls of the GPT-2 case (seconds each)")
    ap.add_argument(
        "--baseline", default=None, help="git revision whose sampler to compare against, e.g. main"
    )
    ap.add_argument("--profile_calls", type=int, default=3, help="calls under jax.profiler (0 = no profile)")
    args = ap.parse_args()
    calls = max(args.calls, 20)
    compiles = _CompileCounter()
    baseline = load_baseline(args.baseline) if args.baseline else None
    runs = []
    micro = ModelConfig.preset("gpt-micro", vocab_size=100, block_size=64)
    micro_sample = SampleConfig(max_new_tokens=32, top_k=30)
    runs.append(bench("gpt-micro", micro, micro_sample, 32, 1, calls, compiles, baseline, args.profile_calls))
    print(_summary(runs[-1]))
    write(args.out, runs, args.baseline)  # after each case: the GPT-2 case takes minutes
    if not args.skip_gpt2:
        gpt2 = ModelConfig.preset("gpt2", embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0)
        gpt2_sample = SampleConfig(max_new_tokens=64)
        gpt2_calls, gpt2_profile = max(args.gpt2_calls, 2), min(args.profile_calls, 1)
        runs.append(
            bench("gpt2-124M-shape", gpt2, gpt2_sample, 8, 8, gpt2_calls, compiles, baseline, gpt2_profile)
        )
        print(_summary(runs[-1]))
    write(args.out, runs, args.baseline)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
