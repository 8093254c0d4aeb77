"""UltraFeedback as token arrays for the recipe: chat-templated prompts left-padded to P, answers as the
model writes them (text tokens and the end-of-turn) right-padded, every length counted without the chat
template's special tokens; over-long prompts and answers are dropped and counted, never cut, as are empty or
whitespace-only prompts (nothing to answer: their answers would be noise, yet still paired)."""

from __future__ import annotations

import numpy as np

from jaxrlhf import data
from jaxrlhf.stages.batches import PromptAnswers
from jaxrlhf.stages.online import Prompts
from jaxrlhf.stages.reward import Comparisons
from jaxrlhf.stages.setup import Setup
from jaxrlhf.text import HFTokenizer, pad_batch


def template_special_tokens(tok: HFTokenizer, cfg) -> int:
    """Special tokens the template puts around one user turn and the assistant header."""
    enc = tok.apply_chat_template(messages("x", cfg), add_generation_prompt=True, date_string=cfg.date_string)
    return int(sum(enc.special_mask))


def messages(prompt: str, cfg) -> list[dict]:
    system = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt is not None else []
    return [*system, {"role": "user", "content": prompt}]


def prompt_budget(setup: Setup) -> int:
    """P, the width of the prompt arrays: the prompt budget and the template's special tokens."""
    return setup.cfg.data.max_prompt_tokens + template_special_tokens(setup.tokenizer, setup.cfg.data)


def encode_prompts(setup: Setup, texts: list[str], index: np.ndarray) -> tuple[Prompts, dict[str, int]]:
    """Chat-templated prompts (the generation prompt added) left-padded to P; empty or whitespace-only
    prompts and prompts of more than --data.max_prompt_tokens tokens (special tokens not counted) are
    dropped. Returns (the kept prompts, {"dropped_empty_prompt", "dropped_long_prompt"}: the numbers
    dropped)."""
    cfg, tok = setup.cfg.data, setup.tokenizer
    width = prompt_budget(setup)
    kept, kept_index, kept_texts = [], [], []
    empty = 0
    for text, i in zip(texts, index, strict=True):
        if not text.strip():
            empty += 1
            continue
        enc = tok.apply_chat_template(
            messages(text, cfg), add_generation_prompt=True, date_string=cfg.date_string
        )
        content = len(enc.ids) - sum(enc.special_mask)
        if content > cfg.max_prompt_tokens or len(enc.ids) > width:
            continue
        kept.append(enc.ids)
        kept_index.append(i)
        kept_texts.append(text)
    ids, mask = pad_batch(kept, width, pad_id=tok.pad_id, side="left") if kept else (
        np.zeros((0, width), np.int32), np.zeros((0, width), bool))  # fmt: skip
    dropped = {"dropped_empty_prompt": empty, "dropped_long_prompt": len(texts) - len(kept) - empty}
    return Prompts(ids.astype(np.int32), mask, np.asarray(kept_index, np.int64), kept_texts), dropped


def encode_answer_texts(
    setup: Setup, texts: list[str], budget: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Answers as the model writes them: the text's tokens and the end-of-turn (eos_id), right-padded to
    budget + 1. Returns (ids [N, budget + 1], mask, fits [N]: no more than `budget` tokens)."""
    tok = setup.tokenizer
    seqs = [ids + [tok.eos_id] for ids in tok.encode_many(texts)]
    fits = np.array([len(s) - 1 <= budget for s in seqs], bool)
    seqs = [s if f else s[: budget + 1] for s, f in zip(seqs, fits, strict=True)]
    ids, mask = pad_batch(seqs, budget + 1, pad_id=tok.pad_id, side="right")
    return ids.astype(np.int32), mask, fits


def load_rows(setup: Setup, split: str, limit: int) -> list[dict]:
    cfg = setup.cfg.data
    rows = data.load_ultrafeedback(split, cfg.data_dir, cache_dir=cfg.cache_dir)
    return rows[:limit] if limit else rows


def load_comparisons(setup: Setup, split: str, limit: int) -> tuple[Comparisons, dict]:
    """UltraFeedback's (chosen, rejected) pairs of `split` as token arrays, with the counts of pairs dropped
    for an empty or over-long prompt or an over-long answer: (Comparisons, {"rows", "pairs",
    "dropped_empty_prompt", "dropped_long_prompt", "dropped_long_answer"})."""
    rows = load_rows(setup, split, limit)
    prompts, dropped = encode_prompts(setup, [r["prompt"] for r in rows], np.arange(len(rows)))
    kept = [rows[i] for i in prompts.index]
    budget = setup.cfg.rm_answer_len - 1
    chosen, chosen_mask, chosen_fits = encode_answer_texts(setup, [r["chosen"] for r in kept], budget)
    rejected, rejected_mask, rejected_fits = encode_answer_texts(setup, [r["rejected"] for r in kept], budget)
    fits = chosen_fits & rejected_fits
    pairs = Comparisons(
        prompts.prompt[fits],
        prompts.prompt_mask[fits],
        np.stack([chosen, rejected], axis=1)[fits],
        np.stack([chosen_mask, rejected_mask], axis=1)[fits],
    )
    counts = {"rows": len(rows), "pairs": int(fits.sum()), **dropped,
              "dropped_long_answer": int((~fits).sum())}  # fmt: skip
    return pairs, counts


def chosen_rows(pairs: Comparisons) -> PromptAnswers:
    """The chosen answers as [prompt | answer] rows (the reward normalisation's reference)."""
    return PromptAnswers(pairs.prompt, pairs.prompt_mask, pairs.answers[:, 0], pairs.answers_mask[:, 0])


def iteration_prompts(setup: Setup, t: int) -> tuple[Prompts, dict]:
    """Iteration t's prompts: the training prompts that fit --data.max_prompt_tokens (chat-templated; the
    others, and empty ones, dropped and counted), --generate.prompts of them per iteration in order
    (wrapping; 0: all)."""
    cfg = setup.cfg
    rows = load_rows(setup, "train", 0)
    prompts, dropped = encode_prompts(setup, [r["prompt"] for r in rows], np.arange(len(rows)))
    n = len(prompts.index)
    k = min(cfg.generate.prompts or n, n)
    pick = (np.arange(k) + (t - 1) * k) % max(n, 1) if n else np.zeros(0, np.int64)
    picked = Prompts(prompts.prompt[pick], prompts.prompt_mask[pick], prompts.index[pick],
                     [prompts.texts[i] for i in pick])  # fmt: skip
    return picked, {"train_prompts": len(rows), **dropped}
