"""InstructGPT on Reddit TL;DR: `python -m experiments.tldr` (recipe.py)."""
