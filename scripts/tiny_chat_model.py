"""A tiny Llama "instruct" model as a local Hugging Face directory, for CPU smoke runs of the chat pipelines
(experiments/ultrafeedback) and their tests: no weights can be downloaded here.

The tokenizer is a byte-level BPE trained on the first 300 UltraFeedback rows, plus Llama 3's special tokens
(<|begin_of_text|>, <|eot_id|>, ...) and the real Llama 3.2 (or 3.1) chat template
(tests/fixtures/chat_templates); <|eot_id|> ends a turn and <|end_of_text|> pads. The model is tiny-llama
(2 layers, width 64, GQA 4 / 2) given `lm_steps` AdamW LM steps on chat-templated prompts followed by
answers cut to 3-12 tokens and <|eot_id|>, so that it ends its turns: a random model over 1,029 ids would
almost never emit <|eot_id|> within a short budget. It writes config.json, model.safetensors,
generation_config.json (eos ids: <|end_of_text|> and <|eot_id|>), tokenizer.json and tokenizer_config.json.

  python scripts/tiny_chat_model.py --out runs/tiny-chat --data-dir ../shared/data/ultrafeedback
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import jax
import numpy as np
import optax

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jaxrlhf import data, models, train  # noqa: E402
from jaxrlhf.models import ModelConfig, hf  # noqa: E402
from jaxrlhf.text import HFTokenizer, pad_batch  # noqa: E402

TEMPLATES = REPO / "tests" / "fixtures" / "chat_templates"
SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
DATE = "26 Jul 2024"


def tokenizer_dir(path, ultrafeedback_dir, *, vocab_size: int = 1024, template: str = "llama3.2") -> dict:
    """Write tokenizer.json, tokenizer_config.json (module doc) to `path`; return the special ids."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    lines = (pathlib.Path(ultrafeedback_dir) / "train_clean.jsonl").read_text().splitlines()[:300]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator([json.loads(x)["prompt"] + json.loads(x)["chosen"] for x in lines], trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    tok.save(str(path / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>",
        "pad_token": "<|end_of_text|>",
        "chat_template": (TEMPLATES / f"{template}.jinja").read_text(),
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return {t: tok.token_to_id(t) for t in SPECIAL}


def build(out, ultrafeedback_dir, *, cache_dir=None, lm_steps: int = 40, seed: int = 0) -> pathlib.Path:
    """Write the model directory (see the module doc) to `out`; returns its path."""
    out = pathlib.Path(out)
    ids = tokenizer_dir(out, ultrafeedback_dir)
    tok = HFTokenizer.from_dir(out)
    cfg = ModelConfig.preset("tiny-llama", vocab_size=tok.vocab_size)
    rows = data.load_ultrafeedback("train", ultrafeedback_dir, cache_dir=cache_dir)
    rng = np.random.default_rng(seed)
    seqs = []
    for r in rows[:200]:
        messages = [{"role": "user", "content": r["prompt"]}]
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True, date_string=DATE).ids[-40:]
        seqs.append(prompt + tok.encode(r["chosen"])[: int(rng.integers(3, 13))] + [tok.eos_id])
    tokens, mask = pad_batch(seqs, 56, pad_id=tok.pad_id, side="right")
    tx = optax.adam(3e-3)
    state = train.init_train_state(models.init_params(jax.random.key(seed), cfg), tx)
    step = jax.jit(train.make_lm_step(cfg, tx))
    for _ in range(lm_steps):
        idx = rng.integers(0, len(seqs), 16)
        state, _ = step(state, train.LMBatch(tokens[idx], mask[idx], mask[idx]))
    hf.save(state.params, cfg, out, bos_token_id=ids["<|begin_of_text|>"], eos_token_id=ids["<|eot_id|>"])
    eos = [ids["<|end_of_text|>"], ids["<|eot_id|>"]]
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": ids["<|begin_of_text|>"], "eos_token_id": eos})
    )
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="the model directory to write")
    parser.add_argument("--data-dir", required=True, help="UltraFeedback's folder (train_clean.jsonl)")
    parser.add_argument("--cache-dir", default=None, help="where TFDS prepares the data")
    parser.add_argument("--lm-steps", type=int, default=40)
    args = parser.parse_args(argv)
    if not (pathlib.Path(args.data_dir) / "train_clean.jsonl").is_file():
        parser.error(f"--data-dir {args.data_dir} has no train_clean.jsonl; pass UltraFeedback's folder")
    print(build(args.out, args.data_dir, cache_dir=args.cache_dir, lm_steps=args.lm_steps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
