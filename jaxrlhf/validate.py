"""The checks every config and entry point shares, each raising a one-line `field=value; what to do`.

A config's `__post_init__` words an error about one of its fields as `field=value; fix`; the flag parser
(`engine.flags`) turns that into `--path.field value; fix`. Numbers are checked with `not value >= low`
rather than `value < low`, so NaN is refused with the same line as a value out of range, and a float
must be finite unless a check says otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Iterable


def _finite(value) -> bool:
    return not isinstance(value, float) or math.isfinite(value)


def check_at_least(cfg, minimum: float, *names: str) -> None:
    """Refuse the first of `cfg`'s fields `names` that is below `minimum`, NaN or infinite (None passes)."""
    for name in names:
        value = getattr(cfg, name)
        if value is None:
            continue
        if not _finite(value):
            raise ValueError(f"{name}={value}; use a finite number >= {minimum}")
        if not value >= minimum:
            raise ValueError(f"{name}={value}; it must be >= {minimum}")


def check_positive(cfg, *names: str) -> None:
    """Refuse the first of `cfg`'s fields `names` that is not a finite number > 0 (None passes)."""
    for name in names:
        value = getattr(cfg, name)
        if value is not None and not (_finite(value) and value > 0):
            raise ValueError(f"{name}={value}; use a finite number > 0")


def check_finite(cfg, *names: str) -> None:
    """Refuse the first of `cfg`'s float fields `names` that is NaN or infinite (None passes)."""
    for name in names:
        value = getattr(cfg, name)
        if value is not None and not _finite(value):
            raise ValueError(f"{name}={value}; use a finite number")


def check_range(cfg, name: str, low: float, high: float, *, low_open=False, high_open=False) -> None:
    """Refuse field `name` outside [low, high] (an open end excludes it), NaN included (None passes)."""
    value = getattr(cfg, name)
    if value is None:
        return
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    if not (above and below):
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        raise ValueError(f"{name}={value}; use a value in {left}{low}, {high}{right}")


def check_choice(cfg, name: str, choices: Iterable[str]) -> None:
    """Refuse field `name` unless it is one of `choices`."""
    choices = tuple(choices)
    if getattr(cfg, name) not in choices:
        raise ValueError(f"{name}={getattr(cfg, name)!r}; use one of {', '.join(choices)}")
