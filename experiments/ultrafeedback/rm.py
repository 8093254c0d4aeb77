"""A Bradley-Terry reward model on UltraFeedback's chosen / rejected pairs from the base model, with
held-out accuracy; checkpoints under <out>/rm/.

    python -m experiments.ultrafeedback.rm --init-from DIR --out runs/uf [--resume]
"""

from __future__ import annotations

import sys

from experiments.ultrafeedback import common, stages


def main(argv=None) -> int:
    return common.main(
        stages.run_stages,
        argv,
        stages=["rm"],
        description=__doc__,
        prog="python -m experiments.ultrafeedback.rm",
    )


if __name__ == "__main__":
    sys.exit(main())
