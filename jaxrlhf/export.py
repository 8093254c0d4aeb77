"""Any stage checkpoint as a Hugging Face directory that `transformers` loads:

    python -m jaxrlhf.export RUN_DIR STAGE DEST [--step N]

A policy or language model (pretrain, sft, rl, rebel_t, ...) becomes the family's *ForCausalLM
(config.json + safetensors), a reward model (rm) the family's *ForSequenceClassification; the tokenizer
saved with the checkpoint goes beside it as a fast tokenizer (HappyGPT's characters included), with a
generation_config.json of its stop ids (and, for an RL stage, its sampling settings). Every pipeline
exports its final policy (and reward model) this way under <out>/hf/ when its last stage finishes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile

from jaxrlhf.engine import checkpoint, flags
from jaxrlhf.models import ModelConfig, hf
from jaxrlhf.text import load_tokenizer, save_for_transformers


def model_config(meta: dict, where: str) -> ModelConfig:
    """The ModelConfig a checkpoint's params are for (its meta's "model_config")."""
    if "model_config" not in meta:
        raise ValueError(
            f"{where} has no model_config in its meta (a checkpoint of an older version): retrain it"
        )
    fields = dict(meta["model_config"])
    if fields.get("rope_scaling") is not None:
        fields["rope_scaling"] = tuple(fields["rope_scaling"])
    return ModelConfig(**fields)


def generation_config(tokenizer, meta: dict) -> dict:
    """generation_config.json: the stop ids (a chat model's end of turn too), pad and bos ids, and the RL
    stage's sampling settings when the checkpoint is one."""
    stops = list(tokenizer.stop_ids)
    out = {"eos_token_id": stops[0] if len(stops) == 1 else stops, "pad_token_id": tokenizer.pad_id}
    if getattr(tokenizer, "bos_id", None) is not None:
        out["bos_token_id"] = tokenizer.bos_id
    sampling = meta.get("config", {}).get("rl", {})
    if {"temperature", "top_k", "top_p"} <= set(sampling):
        out.update(do_sample=sampling["temperature"] > 0, temperature=sampling["temperature"] or 1.0,
                   top_k=sampling["top_k"], top_p=sampling["top_p"])  # fmt: skip
    return out


def export(run_dir: str, stage: str, dest: str, *, step: int | None = None) -> str:
    """Write stage `stage` of `run_dir` (its step `step`, default the last) as a Hugging Face directory at
    `dest`. Returns "policy" or "reward_model".

    Raises:
      FileNotFoundError / ValueError / checkpoint.DamagedCheckpointError: one line naming the checkpoint.
    """
    params, meta = checkpoint.restore_params(run_dir, stage, step=step)
    where = f"{checkpoint.resolve(run_dir) / stage} step {meta['step']}"
    cfg = dataclasses.replace(model_config(meta, where), embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = load_tokenizer(checkpoint.restore_tokenizer(run_dir, stage, tmp, step=meta["step"]))
    ids = {"eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
    if getattr(tokenizer, "bos_id", None) is not None and cfg.hf_family != "gpt2":
        ids["bos_token_id"] = tokenizer.bos_id
    if {"gpt", "head"} <= set(params):
        hf.save_reward_model(params, cfg, dest, **ids)
        kind = "reward_model"
    else:
        hf.save(params.get("policy", params), cfg, dest, **ids)
        kind = "policy"
    save_for_transformers(tokenizer, dest)
    with open(os.path.join(dest, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump(generation_config(tokenizer, meta), f, indent=2)
    return kind


def main(argv=None) -> int:
    parser = flags.OneLineParser(prog="python -m jaxrlhf.export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("run_dir", help="the run directory (a pipeline's --out)")
    parser.add_argument(
        "stage", help="the stage whose checkpoint to export (pretrain, sft, rm, rl, rebel_1, ...)"
    )
    parser.add_argument("dest", help="the directory to write (created)")
    parser.add_argument("--step", type=int, default=None, help="the checkpoint step (default: the last)")
    args = parser.parse_args(argv)
    try:
        kind = export(args.run_dir, args.stage, args.dest, step=args.step)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {args.dest}: the {kind} of {args.run_dir} stage {args.stage}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
