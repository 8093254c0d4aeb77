"""GRPO on GSM8K with a verifiable reward: `python -m experiments.gsm8k` (recipe.py)."""
