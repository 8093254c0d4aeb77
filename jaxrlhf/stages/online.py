"""The data stages of an online preference pipeline (the RLHF guide's REBEL pipeline): n answers per prompt
written as data, and their rewards; `pairs` has the pair selection and the update.

    generate   sharded sampling, one shard of prompts at a time (`run_generate`): <dir>/shard_K.npz holds the
               rows as token arrays (prompt left-padded, answer right-padded: the rollout layout
               [PAD]... PROMPT | ANSWER <stop> [PAD]...), the sampler's logprobs and the teacher-forced
               logprobs of the policy (REBEL's pi_t) and of the reference; shard_K.jsonl the text.
    score      a reward per answer, one shard at a time (`run_score`).
    filter     `pairs.filter_answers`: unfinished, too long / short, duplicates, ties dropped and counted.
    update     `pairs.run_pair_stage`: REBEL's regression (several passes per batch of pairs), DPO or IPO.

The data stages write through etils epath (local or gs://), each file at once (written under a .tmp name,
then renamed), so a kill leaves whole shards only and `--resume` starts at the first missing one; SIGTERM
or Ctrl-C (SIGINT) stops them at the next shard boundary with one line (exit code 143 / 130), as a step
loop (`loop.stop_requests`). A data stage is finished once its summary file is written; its meta (what
must match to resume) lies in <dir>/meta.json. A damaged shard of a finished stage is one line naming it
(`read_shards`): deleting it and the stage's summary makes `--resume` write that shard again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import time
import zipfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from tqdm.auto import tqdm

from jaxrlhf import parallel
from jaxrlhf.engine import loop
from jaxrlhf.rollout import SampleConfig
from jaxrlhf.rollout import pairs as pairs_lib
from jaxrlhf.stages import batches, handoff
from jaxrlhf.stages.handoff import StageError
from jaxrlhf.stages.setup import Setup
from jaxrlhf.validate import check_at_least

# ------------------------------------------------------------------------------------------- files


def write_npz(path: epath.Path, arrays: Mapping[str, np.ndarray]) -> None:
    """`arrays` as one .npz at `path`, written whole (a .tmp file, then renamed), from process 0."""
    if not handoff.main_process():
        return
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    _write_whole(path, buffer.getvalue())


def _write_whole(path: epath.Path, content: bytes) -> None:
    """`content` at `path` through a .tmp file renamed over it: a kill leaves the old file or the new one,
    whole (a shard's .jsonl left by a kill before its .npz, or a damaged shard's, is replaced)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / (path.name + ".tmp")
    tmp.write_bytes(content)
    tmp.replace(path)


def write_jsonl(path: epath.Path, records: Sequence[dict]) -> None:
    """One JSON record per line at `path`, written whole, from process 0."""
    if handoff.main_process():
        _write_whole(path, "".join(json.dumps(r) + "\n" for r in records).encode())


def read_npz(
    path: epath.Path, summary: epath.Path | None = None, again: str = "it again"
) -> dict[str, np.ndarray]:
    """The arrays of an .npz file (local or gs://).

    Args:
      path: the file.
      summary: the summary file of the finished stage that wrote it (named in the message: a --resume
        skips that stage while its summary is there).
      again: what that stage writes when it runs again (in the message).

    Raises:
      ValueError: the file is missing or not a readable .npz; one line naming it and the fix.
    """
    try:
        with np.load(io.BytesIO(path.read_bytes())) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        if summary is None:
            what = "is missing" if not path.exists() else f"is not a readable .npz ({type(err).__name__})"
            raise ValueError(f"{path} {what}: delete it and rerun with --resume") from None
        raise ValueError(_rewrite_message(path, "a readable .npz", summary, again)) from None


def _rewrite_message(path: epath.Path, kind: str, summary: epath.Path, again: str) -> str:
    """The one line for a missing or damaged file of a finished data stage: delete it and the stage's
    summary, and --resume runs the stage again, which writes the file again."""
    state = f"is not {kind}: delete it and" if path.exists() else "is missing: delete"
    return (
        f"{path} {state} {summary} (the stage's summary), then rerun with --resume: the stage writes {again}"
    )


def read_json(path: epath.Path) -> dict:
    return json.loads(path.read_text())


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, Mapping):
        out = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def check_data_stage(root: epath.Path, meta: dict, *, resume: bool, flag: str = "--out") -> None:
    """Refuse, before anything is written, a data stage at `root` that a run may not continue: data there
    without --resume, or data of another config.

    Raises:
      FileExistsError / ValueError: one line naming the folder and the fix.
    """
    meta_file = root / "meta.json"
    if not meta_file.exists():
        return
    if not resume:
        raise FileExistsError(
            f"{root} already holds data of this stage; pass --resume to continue it, or use another {flag}"
        )
    stored = _flat(read_json(meta_file).get("config", {}))
    expected = _flat(json.loads(json.dumps(meta.get("config", {}))))
    bad = [
        f"{k}: {stored.get(k)!r} -> {expected.get(k)!r}"
        for k in sorted(set(stored) | set(expected))
        if stored.get(k) != expected.get(k)
    ]
    if bad:
        raise ValueError(
            f"{root} was written with another config ({'; '.join(bad[:4])}); resume with the same flags or "
            f"use another {flag}"
        )


def start_data_stage(root: epath.Path, meta: dict) -> None:
    """Create `root` and its meta.json (once)."""
    if handoff.main_process():
        root.mkdir(parents=True, exist_ok=True)
        if not (root / "meta.json").exists():
            _write_whole(root / "meta.json", (json.dumps(meta, indent=2) + "\n").encode())


def done(summary_file: epath.Path) -> bool:
    return summary_file.exists()


def require(summary_file: epath.Path, what: str, fix: str) -> dict:
    """The summary of a finished data stage.

    Raises:
      StageError: it has not finished; the message says how to finish it.
    """
    if not summary_file.exists():
        raise StageError(f"{what} has not finished ({summary_file} is missing): {fix}")
    return read_json(summary_file)


def shard_path(root: epath.Path, k: int, suffix: str = ".npz") -> epath.Path:
    return root / f"shard_{k:05d}{suffix}"


SHARD_AGAIN = "that shard again from the same key and keeps the others"


def read_shard(root: epath.Path, k: int) -> dict[str, np.ndarray]:
    """Shard k of the data stage at `root`.

    Raises:
      ValueError: the shard is missing or damaged; one line naming it and the way out: delete it and the
        stage's summary <root>.json, then --resume writes that shard again (from the same key: the same
        rows) and keeps the others.
    """
    return read_npz(shard_path(root, k), root.parent / f"{root.name}.json", SHARD_AGAIN)


def read_shard_texts(root: epath.Path, k: int) -> list[dict]:
    """The records of shard k's .jsonl (`read_shard`'s one line for a missing or damaged file)."""
    path = shard_path(root, k, ".jsonl")
    try:
        return [json.loads(x) for x in path.read_text().splitlines()]
    except (OSError, ValueError):
        raise ValueError(
            _rewrite_message(path, "readable JSON lines", root.parent / f"{root.name}.json", SHARD_AGAIN)
        ) from None


def read_shards(root: epath.Path, n_shards: int) -> dict[str, np.ndarray]:
    """The rows of shards 0 .. n_shards - 1 concatenated (`read_shard`'s one line for a bad shard)."""
    parts = [read_shard(root, k) for k in range(n_shards)]
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


# ---------------------------------------------------------------------------------------- generate


@dataclasses.dataclass(frozen=True, kw_only=True)
class GenerateConfig:
    """N sampled answers per prompt from the current policy.

    Attributes:
      prompts: prompts per iteration (0: every training prompt): iteration t takes the next ones.
      answers: N, answers per prompt (at least 2: a pair needs two).
      batch_size: prompts per sampler call and per shard of the written data (a multiple of the data
        devices); the last shard is padded.
      temperature: sampling temperature (> 0: a pair needs different answers).
      top_k: top-k filter (0 = off).
      top_p: nucleus filter (1.0 = off).
    """

    prompts: int = 0
    answers: int = 5
    batch_size: int = 8
    temperature: float = 0.8
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        check_at_least(self, 0, "prompts", "top_k")
        check_at_least(self, 1, "batch_size")
        check_at_least(self, 2, "answers")
        if not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature}; sample with a temperature > 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p}; use a value in (0, 1] (1 = off)")


@dataclasses.dataclass(frozen=True)
class Prompts:
    """Prompts as token arrays with what they came from.

    Attributes:
      prompt: [B, P] int32, left-padded.   prompt_mask: [B, P] bool.
      index: [B] int64, the row of each prompt in its data set.
      texts: the B prompt texts (before the chat template).
    """

    prompt: np.ndarray
    prompt_mask: np.ndarray
    index: np.ndarray
    texts: list[str]


def params_fingerprint(params) -> str:
    """Which weights sampled a shard: sha256 over two integer sums per leaf, computed where the params lie
    (sharded or not, no copy to the host): the sum of the values' bit patterns and their sum weighted by
    2 x (flat position) + 1, both in uint32 arithmetic. Integer sums wrap exactly and do not depend on the
    order of the additions, so the digest is the same on any mesh, device count or thread schedule (a
    float sum is not: its rounding follows the reduction's split); a change of one value always changes
    the first sum, a reordering the second."""

    def sums(x):
        bits = _uint32_bits(x)
        position = jnp.zeros(bits.shape, jnp.uint32)
        strides = np.cumprod((1, *bits.shape[::-1]))[-2::-1] if bits.ndim else ()
        for axis, stride in enumerate(strides):
            position = position + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis) * jnp.uint32(stride)
        weighted = bits * (2 * position + 1)
        return jnp.stack([jnp.sum(bits, dtype=jnp.uint32), jnp.sum(weighted, dtype=jnp.uint32)])

    values = np.asarray(jax.device_get(jnp.stack([sums(x) for x in jax.tree.leaves(params)])), np.uint32)
    return hashlib.sha256(values.tobytes()).hexdigest()


def _uint32_bits(x: jax.Array) -> jax.Array:
    """The values' bit patterns as uint32 (float32 as is; 16-bit types widened; 64-bit types folded)."""
    x = jnp.asarray(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    width = x.dtype.itemsize
    if width == 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    if width == 2:
        return jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
    if width == 1:
        return jax.lax.bitcast_convert_type(x, jnp.uint8).astype(jnp.uint32)
    halves = jax.lax.bitcast_convert_type(x, jnp.uint32)  # [..., 2]
    return halves[..., 0] ^ (halves[..., 1] * jnp.uint32(0x9E3779B1))


def sync(tag: str) -> None:
    """Every process waits here (after process 0 wrote a file the others read); a no-op alone."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(tag)


def _bar(total: int, done_: int, name: str, progress: bool) -> tqdm:
    """A shard bar, on process 0 only."""
    return tqdm(total=total, initial=done_, desc=name, disable=not progress or not handoff.main_process(),
                dynamic_ncols=True)  # fmt: skip


def _stop_at_shard(requests: loop.StopRequests, root: epath.Path, k: int, n_shards: int, bar: tqdm) -> None:
    """Before shard k (k = n_shards: before the summary): stop if SIGTERM or Ctrl-C arrived (one line,
    `loop.Preempted`); the shards before k are whole on disk, so `--resume` goes on from k."""
    signum = loop.stop_requested(requests)
    if signum:
        bar.close()
        where = f"at shard {k} of {n_shards}" if k < n_shards else "after its last shard, before its summary"
        raise loop.preempted(signum, f"{root} {where} (the shards written are whole)")


def _write_shards(
    root: epath.Path, n_shards: int, write_shard: Callable[[int], None], *, progress: bool,
    stop_after: int | None,
) -> int | None:  # fmt: skip
    """`write_shard(k)` for every shard k not yet on disk, in order, with a bar; SIGTERM / Ctrl-C stop it at
    the next shard boundary (`_stop_at_shard`). Returns how many were written, or None when `stop_after`
    new shards stopped it first (tests of resume)."""
    todo = [k for k in range(n_shards) if not shard_path(root, k).exists()]
    bar = _bar(n_shards, n_shards - len(todo), root.name, progress)
    written = 0
    with loop.stop_requests() as requests:
        for k in todo:
            if stop_after is not None and written >= stop_after:
                bar.close()
                return None
            _stop_at_shard(requests, root, k, n_shards, bar)
            write_shard(k)
            sync(f"{root}:{k}")
            written += 1
            bar.update(1)
        _stop_at_shard(requests, root, n_shards, n_shards, bar)
    bar.close()
    return written


def make_generate(setup: Setup, params, sample_cfg: SampleConfig, n: int, reference=None):
    """jit of (params, reference, prompt, prompt_mask, key) -> rollout of B * n rows, the policy's and the
    reference's teacher-forced answer logprobs [B * n] (the reference's only with `reference`), both at the
    sampling temperature."""
    mesh, mcfg = setup.mesh, setup.model_cfg
    temperature = 1.0 if sample_cfg.greedy else sample_cfg.temperature  # the answers' pi_t (and reference)

    def gen(params, reference, prompt, prompt_mask, key):
        rollout = pairs_lib.generate_answers(params, prompt, prompt_mask, mcfg, sample_cfg, n, key=key)
        policy_lp = pairs_lib.rollout_logprobs(params, rollout, mcfg, temperature=temperature)
        ref_lp = policy_lp
        if reference is not None:
            ref_lp = pairs_lib.rollout_logprobs(reference, rollout, mcfg, temperature=temperature)
        return rollout, policy_lp, ref_lp

    shardings = parallel.tree_shardings(params, mesh)
    ref_shardings = None if reference is None else parallel.tree_shardings(reference, mesh)
    batch = parallel.batch_sharding(mesh)
    return jax.jit(
        parallel.on_mesh(gen, mesh),  # activations split over the batch, weights gathered (FSDP)
        in_shardings=(shardings, ref_shardings, batch, batch, parallel.replicated(mesh)),
        out_shardings=parallel.replicated(mesh),
    )


def run_generate(
    setup: Setup,
    gcfg: GenerateConfig,
    *,
    root: epath.Path,
    meta: dict,
    prompts: Prompts,
    params,
    reference,
    sample_cfg: SampleConfig,
    key: jax.Array,
    progress: bool = True,
    stop_after: int | None = None,
    summary: dict | None = None,
) -> dict | None:
    """Sample `gcfg.answers` answers to every prompt, a shard of `gcfg.batch_size` prompts at a time, and
    write each shard (see the module doc); shards already written are kept (a resume). Returns the
    summary (also written to <root>.json), or None when `stop_after` shards stopped it first.

    Args:
      setup: the run's setup.
      gcfg: the stage's config.
      root: the folder of the shards.
      meta: what must match to resume (meta.json).
      prompts: the prompts (at least one).
      params: the sampling policy (placed on the mesh here).
      reference: the frozen reference whose logprobs are stored too, or None (then the policy's).
      sample_cfg: the sampler settings (max_new_tokens, stop ids, ...).
      key: the stage's key; shard k samples with fold_in(key, k).
      progress: a tqdm bar.
      stop_after: write at most this many new shards (tests of resume).
      summary: extra fields of the summary.
    """
    n, b = gcfg.answers, gcfg.batch_size
    n_prompts = len(prompts.index)
    n_shards = -(-n_prompts // b)
    start_data_stage(root, meta)
    params = parallel.put(params, setup.mesh)
    digest = params_fingerprint(params)
    reference = None if reference is None else parallel.put(reference, setup.mesh)
    gen = make_generate(setup, params, sample_cfg, n, reference)
    tokenizer = setup.tokenizer
    special = np.zeros(max(setup.model_cfg.vocab_size, tokenizer.vocab_size), bool)
    special[list(getattr(tokenizer, "special_ids", ()) or ())] = True
    position = {int(i): j for j, i in enumerate(prompts.index)}
    t0 = time.perf_counter()

    def write_shard(k: int) -> None:
        idx = np.arange(k * b, (k + 1) * b)
        valid = idx < n_prompts
        idx = np.where(valid, idx, 0)
        batch = batches.put_batch((prompts.prompt[idx], prompts.prompt_mask[idx]), setup.mesh)
        rollout, policy_lp, ref_lp = gen(params, reference, *batch, jax.random.fold_in(key, k))
        rollout, policy_lp, ref_lp = jax.device_get((rollout, policy_lp, ref_lp))
        rows_valid = np.repeat(valid, n)
        arrays = dict(
            prompt_index=np.repeat(prompts.index[idx], n),
            prompt=np.asarray(rollout.prompt),
            prompt_mask=np.asarray(rollout.prompt_mask),
            response=np.asarray(rollout.response),
            response_mask=np.asarray(rollout.response_mask),
            finished=np.asarray(rollout.finished),
            sampler_logprobs=np.asarray(pairs_lib.sampler_logprobs(rollout)),
            policy_logprobs=np.asarray(policy_lp),
            ref_logprobs=np.asarray(ref_lp),
            valid=rows_valid,
        )
        arrays = {name: x[rows_valid] for name, x in arrays.items()}
        texts = []
        for i in range(0, len(arrays["response"]), n):
            answers = [
                tokenizer.decode(r[m & ~special[r]].tolist())
                for r, m in zip(
                    arrays["response"][i : i + n], arrays["response_mask"][i : i + n], strict=True
                )
            ]
            j = position[int(arrays["prompt_index"][i])]
            texts.append({"prompt_index": int(arrays["prompt_index"][i]), "prompt": prompts.texts[j],
                          "answers": answers})  # fmt: skip
        write_jsonl(shard_path(root, k, ".jsonl"), texts)
        write_npz(shard_path(root, k), arrays)  # last: a shard counts once its arrays are written

    written = _write_shards(root, n_shards, write_shard, progress=progress, stop_after=stop_after)
    if written is None:
        return None
    rows = read_shards(root, n_shards)
    lengths = (rows["response_mask"] & ~special[rows["response"]]).sum(1)
    record = {
        **(summary or {}),
        "prompts": n_prompts,
        "answers": int(len(rows["response"])),
        "answers_per_prompt": n,
        "shards": n_shards,
        "finished_fraction": float(rows["finished"].mean()),
        "mean_answer_tokens": float(lengths.mean()),
        "policy_fingerprint": digest,
        "wall_s_this_run": round(time.perf_counter() - t0, 3),
    }
    if written:
        record["answer_tokens_per_s_this_run"] = round(float(lengths.sum()) * written / n_shards
                                                       / max(time.perf_counter() - t0, 1e-9), 1)  # fmt: skip
    handoff.write_json(root.parent / f"{root.name}.json", record)
    return record


# ------------------------------------------------------------------------------------------- score


def run_score(
    *,
    root: epath.Path,
    answers_root: epath.Path,
    n_shards: int,
    meta: dict,
    scorer: Callable[[dict, list[dict]], np.ndarray],
    progress: bool = True,
    stop_after: int | None = None,
    summary: dict | None = None,
) -> dict | None:
    """A reward for every answer, shard by shard: `scorer(shard arrays, shard texts) -> [rows]` float;
    <root>/shard_K.npz holds {"scores"}. Non-finite scores are refused. Returns the summary (also
    <root>.json), or None when `stop_after` shards stopped it first.

    Raises:
      loop.NonFiniteError: a NaN / inf score (nothing is written for that shard).
    """
    start_data_stage(root, meta)

    def write_shard(k: int) -> None:
        arrays = read_shard(answers_root, k)
        texts = read_shard_texts(answers_root, k)
        scores = np.asarray(scorer(arrays, texts), np.float32)
        if scores.shape != (len(arrays["response"]),):
            raise ValueError(f"the scorer gave {scores.shape} scores for {len(arrays['response'])} answers")
        if not np.all(np.isfinite(scores)):
            rows = np.flatnonzero(~np.isfinite(scores))[:5].tolist()
            raise loop.NonFiniteError(
                f"{root.name} shard {k}: non-finite reward at rows {rows}; check the reward model "
                "(nothing was written for this shard)"
            )
        write_npz(shard_path(root, k), {"scores": scores})

    if _write_shards(root, n_shards, write_shard, progress=progress, stop_after=stop_after) is None:
        return None
    scores = read_shards(root, n_shards)["scores"]
    record = {**(summary or {}), "answers": int(len(scores)), "mean_score": float(scores.mean()),
              "std_score": float(scores.std())}  # fmt: skip
    handoff.write_json(root.parent / f"{root.name}.json", record)
    return record
