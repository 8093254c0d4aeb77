"""The RLHF guide's REBEL pipeline on UltraFeedback: rm, then iterations of generate -> score -> filter ->
rebel (see common.py). Each stage is a command: python -m experiments.ultrafeedback.<stage>."""
