"""Positive movie-review continuations on SST-2: `python -m experiments.sst2` (recipe.py)."""
