"""`python -m experiments.ultrafeedback`: the UltraFeedback REBEL pipeline (see stages.py, README.md)."""

import sys

from experiments.ultrafeedback.stages import RECIPE
from jaxrlhf.stages import recipe

if __name__ == "__main__":
    sys.exit(recipe.main(RECIPE, prog="python -m experiments.ultrafeedback"))
