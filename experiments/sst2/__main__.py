"""`python -m experiments.sst2`: the SST-2 pipeline (see recipe.py, README.md)."""

import sys

from experiments.sst2.recipe import RECIPE
from jaxrlhf.stages import recipe

if __name__ == "__main__":
    sys.exit(recipe.main(RECIPE, prog="python -m experiments.sst2"))
