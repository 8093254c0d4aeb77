"""Iteration t's (best, worst) pairs after the length filter and deduplication, ties dropped;
<out>/iter_t/filter/pairs.npz, pairs.jsonl, and the counts in <out>/iter_t/filter.json.

    python -m experiments.ultrafeedback.filter --init-from DIR --out runs/uf --iteration 1 [--resume]
"""

from __future__ import annotations

import sys

from experiments.ultrafeedback import common, stages


def main(argv=None) -> int:
    return common.main(
        stages.run_stages,
        argv,
        stages=["filter"],
        description=__doc__,
        prog="python -m experiments.ultrafeedback.filter",
    )


if __name__ == "__main__":
    sys.exit(main())
