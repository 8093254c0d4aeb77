"""A reward for every answer of iteration t (--score.reward rm | hf | vader), shard by shard under
<out>/iter_t/score/.

    python -m experiments.ultrafeedback.score --init-from DIR --out runs/uf --iteration 1 [--resume]
"""

from __future__ import annotations

import sys

from experiments.ultrafeedback import common, stages


def main(argv=None) -> int:
    return common.main(
        stages.run_stages,
        argv,
        stages=["score"],
        description=__doc__,
        prog="python -m experiments.ultrafeedback.score",
    )


if __name__ == "__main__":
    sys.exit(main())
