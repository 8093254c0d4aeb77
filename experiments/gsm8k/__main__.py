"""`python -m experiments.gsm8k`: GRPO on GSM8K (see recipe.py, README.md)."""

import sys

from experiments.gsm8k.recipe import RECIPE
from jaxrlhf.stages import recipe

if __name__ == "__main__":
    sys.exit(recipe.main(RECIPE, prog="python -m experiments.gsm8k"))
