"""Padding token lists into arrays, and deterministic epoch orders.

Everything here is NumPy on the host: the arrays feed a jitted step. Randomness comes from a
`numpy.random.Generator` seeded by (seed, epoch), never from global state, so a resumed run
replays the same order by passing the same seed and epoch (and `start_batch`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np


def pad_batch(
    seqs: Sequence[Sequence[int]],
    length: int,
    *,
    pad_id: int = 0,
    side: str = "right",
    truncate: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Pads token lists to one width.

    Args:
      seqs: B token lists.
      length: T, the output width.
      pad_id: the id written at padded positions.
      side: "right" puts the padding after the tokens (responses, SFT text); "left" before them
        (prompts, so generation starts at the same column for every row).
      truncate: what to do with a sequence longer than `length`: None raises; "left" drops
        tokens from the start (keeps the last `length`); "right" drops tokens from the end.

    Returns:
      ids: int32 [B, T]; mask: bool [B, T], True at real tokens.

    Raises:
      ValueError: a sequence is longer than `length` and `truncate` is None, or a bad
        `side` / `truncate`.
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    if truncate not in (None, "left", "right"):
        raise ValueError(f"truncate must be None, 'left' or 'right', got {truncate!r}")
    ids = np.full((len(seqs), length), pad_id, dtype=np.int32)  # [B, T]
    mask = np.zeros((len(seqs), length), dtype=bool)  # [B, T]
    for row, seq in enumerate(seqs):
        seq = list(seq)
        if len(seq) > length:
            if truncate is None:
                raise ValueError(
                    f"sequence {row} has {len(seq)} tokens, more than length {length}; "
                    "pass truncate='left' or 'right' to cut it"
                )
            seq = seq[len(seq) - length :] if truncate == "left" else seq[:length]
        n = len(seq)
        start = length - n if side == "left" else 0
        ids[row, start : start + n] = seq
        mask[row, start : start + n] = True
    return ids, mask


def num_batches(n_rows: int, batch_size: int, *, drop_remainder: bool = True) -> int:
    """How many batches `iterate_batches` yields per epoch."""
    if drop_remainder:
        return n_rows // batch_size
    return -(-n_rows // batch_size)


def epoch_permutation(n_rows: int, *, seed: int, epoch: int) -> np.ndarray:
    """One epoch's row order: a permutation of range(n_rows) fixed by (seed, epoch). int64 [N]."""
    return np.random.default_rng([seed, epoch]).permutation(n_rows)


def iterate_batches(
    n_rows: int,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    drop_remainder: bool = True,
    shuffle: bool = True,
    start_batch: int = 0,
) -> Iterator[np.ndarray]:
    """Yields the row indices of each batch of one epoch, in an order fixed by (seed, epoch).

    Args:
      n_rows: number of rows in the data set.
      batch_size: rows per batch.
      seed: the run's data seed.
      epoch: the epoch number; each epoch has its own permutation.
      drop_remainder: drop the last partial batch (keeps shapes static for jit).
      shuffle: False yields rows in order (evaluation).
      start_batch: skip the first batches, to resume mid-epoch.

    Yields:
      int64 [batch_size] index arrays (the last may be shorter when drop_remainder is False).
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    order = epoch_permutation(n_rows, seed=seed, epoch=epoch) if shuffle else np.arange(n_rows)
    for b in range(start_batch, num_batches(n_rows, batch_size, drop_remainder=drop_remainder)):
        yield order[b * batch_size : (b + 1) * batch_size]


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
