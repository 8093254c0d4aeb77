"""`python -m experiments.tldr`: the TL;DR pipeline (see recipe.py, README.md)."""

import sys

from experiments.tldr.recipe import RECIPE
from jaxrlhf.stages import recipe

if __name__ == "__main__":
    sys.exit(recipe.main(RECIPE, prog="python -m experiments.tldr"))
