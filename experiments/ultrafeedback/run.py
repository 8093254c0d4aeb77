"""UltraFeedback REBEL, every stage: rm (when asked), then --iterations of generate -> score -> filter ->
rebel, iteration t sampling from the policy of iteration t - 1, all under --out.

    python -m experiments.ultrafeedback.run --init-from DIR --out runs/uf            # rm + 2 iterations
    python -m experiments.ultrafeedback.run ... --stages generate,score,filter,rebel --score.reward hf \
        --score.reward_model RM_DIR                                                  # an HF reward model
    python -m experiments.ultrafeedback.run ... --resume     # continue: finished stages are skipped

A stage that stops early (--stop-after STAGE_t:N, a kill, or SIGTERM) ends the run; rerun with --resume.
Every field of the config is a flag (--help); see common.py for the data layout.
"""

from __future__ import annotations

import sys

from experiments.ultrafeedback import common, stages


def main(argv=None) -> int:
    """The pipeline; exit code 0, 2 for a bad flag, 1 for a refusal (one line on stderr)."""
    return common.main(
        stages.run_stages, argv, description=__doc__, prog="python -m experiments.ultrafeedback.run"
    )


if __name__ == "__main__":
    sys.exit(main())
