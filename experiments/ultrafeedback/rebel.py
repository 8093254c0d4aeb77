"""REBEL (or --rebel.algo dpo / ipo) on iteration t's fixed pairs, from the policy that sampled them;
checkpoints under <out>/rebel_t/, metrics in <out>/rebel_t.jsonl, <out>/rebel_t_summary.json.

    python -m experiments.ultrafeedback.rebel --init-from DIR --out runs/uf --iteration 1 [--resume]
"""

from __future__ import annotations

import sys

from experiments.ultrafeedback import common, stages


def main(argv=None) -> int:
    return common.main(
        stages.run_stages,
        argv,
        stages=["rebel"],
        description=__doc__,
        prog="python -m experiments.ultrafeedback.rebel",
    )


if __name__ == "__main__":
    sys.exit(main())
