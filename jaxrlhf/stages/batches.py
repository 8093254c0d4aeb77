"""Rows as fixed-shape token arrays, batch selection (epochs fixed by the step number), sharded host
batches and jitted evaluation over a whole row set.

Row layout (every stage): a prompt is left-padded to P tokens and an answer right-padded to S, so a row
is [prompt | answer] of T = P + S tokens, exactly the layout of an RL rollout.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf import parallel, train
from jaxrlhf.text import pad_batch

# --------------------------------------------------------------------------------------------- rows


class PromptAnswers(NamedTuple):
    """Prompts with one answer each, as token arrays (SFT data, RL prompts, reference rows).

    Attributes:
      prompt: [N, P] int32, left-padded.   prompt_mask: [N, P] bool.
      answer: [N, S] int32, right-padded.   answer_mask: [N, S] bool.
    """

    prompt: np.ndarray
    prompt_mask: np.ndarray
    answer: np.ndarray
    answer_mask: np.ndarray


def encode_answers(tokenizer, texts: list[str], max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """ " " + text + end-of-text, cut to `max_tokens` keeping the end-of-text, right-padded. [N, S]."""
    seqs = [
        ids[: max_tokens - 1] + [tokenizer.eos_id] for ids in tokenizer.encode_many(" " + t for t in texts)
    ]
    return pad_batch(seqs, max_tokens, pad_id=tokenizer.eos_id, side="right")


def lm_batch(rows: tuple, idx: np.ndarray, valid: np.ndarray | None = None) -> train.LMBatch:
    """[prompt | answer] rows `idx` of a (prompt, prompt_mask, answer, answer_mask) tuple (e.g.
    `PromptAnswers`) with the loss on answer tokens (and only on `valid` rows)."""
    prompt, prompt_mask, answer, answer_mask = rows[:4]
    loss_mask = np.concatenate([np.zeros_like(prompt_mask[idx]), answer_mask[idx]], axis=1)
    if valid is not None:
        loss_mask &= valid[:, None]
    return train.LMBatch(
        tokens=np.concatenate([prompt[idx], answer[idx]], axis=1),
        mask=np.concatenate([prompt_mask[idx], answer_mask[idx]], axis=1),
        loss_mask=loss_mask,
    )


def subset(rows: tuple, idx: np.ndarray) -> tuple:
    """Rows `idx` of every array of a tuple or NamedTuple of row arrays, as the same type."""
    picked = [x[idx] for x in rows]
    return tuple(picked) if type(rows) is tuple else type(rows)(*picked)


# ----------------------------------------------------------------------------------------- batching


def train_rows(n_rows: int, batch_size: int, step: int, seed: int) -> np.ndarray:
    """Global row indices of `step`'s batch: epochs of (seed, epoch)-fixed permutations, so the data
    position is the step number and a resumed run reads the same batches.

    Raises:
      ValueError: fewer rows than one batch.
    """
    per_epoch = n_rows // batch_size
    if per_epoch == 0:
        raise ValueError(f"{n_rows} rows are fewer than one batch of {batch_size}; lower the batch size")
    epoch, b = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(
        n_rows
    )  # the epoch's order, fixed by (seed, epoch)
    return order[b * batch_size : (b + 1) * batch_size]


def eval_rows(n_rows: int, batch_size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Every row once in fixed-size batches: (indices [B], valid [B]); the last batch is padded with
    row 0 marked invalid, so one compiled program evaluates the whole set."""
    batches = []
    for start in range(0, n_rows, batch_size):
        idx = np.arange(start, start + batch_size)
        valid = idx < n_rows
        batches.append((np.where(valid, idx, 0), valid))
    return batches


def local(batch: Any) -> Any:
    """This process's contiguous share of a global host batch (every process holds all the data)."""
    n, i = jax.process_count(), jax.process_index()
    return jax.tree.map(lambda x: x[i * (len(x) // n) : (i + 1) * (len(x) // n)], batch)


def put_batch(batch: Any, mesh) -> Any:
    """A global host batch split over the mesh's data devices."""
    return parallel.shard_batch(local(batch), mesh)


def jit_eval(fn, mesh, params) -> Any:
    """jax.jit of `fn(params, batch) -> outputs` with params sharded like a train state and the
    batch split over the mesh (its activations too: `parallel.on_mesh`); outputs replicated."""
    return jax.jit(
        parallel.on_mesh(fn, mesh),
        in_shardings=(parallel.tree_shardings(params, mesh), parallel.batch_sharding(mesh)),
        out_shardings=parallel.replicated(mesh),
    )


def evaluate_rows(evaluate, params, rows: tuple, batch_size: int, mesh, make_batch=subset) -> np.ndarray:
    """`evaluate(params, batch) -> [B] per-row outputs` over every row of `rows` once, in fixed-size
    batches `make_batch(rows, idx)` (the last padded with row 0, its outputs dropped): [N]."""
    out = []
    for idx, valid in eval_rows(len(rows[0]), batch_size):
        out.append(np.asarray(evaluate(params, put_batch(make_batch(rows, idx), mesh)))[valid])
    return np.concatenate(out)


def evaluate_sums(evaluate, params, rows: tuple, make_batch, batch_size: int, mesh) -> tuple[float, float]:
    """Sum of `evaluate(params, batch) -> (total, count)` over every row of `rows` once, in fixed-size
    batches `make_batch(rows, idx, valid)` (padding rows marked invalid)."""
    total, count = 0.0, 0.0
    for idx, valid in eval_rows(len(rows[0]), batch_size):
        batch_total, batch_count = evaluate(params, put_batch(make_batch(rows, idx, valid), mesh))
        total, count = total + float(batch_total), count + float(batch_count)
    return total, count


def train_val_split(n_rows: int, val_size: int | float, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Splits range(n_rows) into sorted train and validation indices, fixed by `seed`.

    Args:
      n_rows: number of rows.
      val_size: number of validation rows, or a fraction in (0, 1).
      seed: fixes which rows go to validation.

    Returns:
      train_indices, val_indices: sorted int64 arrays that partition range(n_rows).
    """
    n_val = int(round(val_size * n_rows)) if isinstance(val_size, float) else int(val_size)
    if not 0 <= n_val <= n_rows:
        raise ValueError(f"val_size {val_size} gives {n_val} rows, outside [0, {n_rows}]")
    order = np.random.default_rng(seed).permutation(n_rows)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def to_bf16(params: Any) -> Any:
    """Float leaves cast to bfloat16 (frozen models under --bf16: half the memory)."""
    return jax.tree.map(
        lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x, params
    )
