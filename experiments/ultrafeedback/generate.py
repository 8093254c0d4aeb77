"""N chat-templated answers to each of iteration t's prompts from the policy of iteration t - 1,
written shard by shard under <out>/iter_t/generate/ (token arrays + text); resumable per shard.

    python -m experiments.ultrafeedback.generate --init-from DIR --out runs/uf --iteration 1 [--resume]
"""

from __future__ import annotations

import sys

from experiments.ultrafeedback import common, stages


def main(argv=None) -> int:
    return common.main(
        stages.run_stages,
        argv,
        stages=["generate"],
        description=__doc__,
        prog="python -m experiments.ultrafeedback.generate",
    )


if __name__ == "__main__":
    sys.exit(main())
