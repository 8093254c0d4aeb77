"""experiments/ultrafeedback: empty and whitespace-only prompts are dropped where prompts are read and counted
apart from the over-long ones, both for the iterations' prompts (which the policy would answer) and for the
reward model's pairs. A 12-row copy of the shared sample with three blank prompts, read through the real
loader (TFDS prepared in tmp_path), and the tokenizer of scripts/tiny_chat_model.py (no model): seconds."""

import json
import pathlib
import sys
import types

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

from experiments.ultrafeedback import encoding  # noqa: E402
from experiments.ultrafeedback import stages as uf_stages  # noqa: E402
from jaxrlhf.engine import flags  # noqa: E402
from jaxrlhf.text import HFTokenizer  # noqa: E402

sys.path.insert(0, str(REPO / "scripts"))
import tiny_chat_model  # noqa: E402

BLANK = {2: "", 5: "   ", 9: " \n\t "}  # row -> its prompt
LIMIT = 256  # --data.max_prompt_tokens


@pytest.fixture(scope="module")
def uf_setup(shared_data, tmp_path_factory):
    """What `encoding` reads of a setup: the parsed config (data in a 12-row copy with the BLANK prompts,
    prompts of at most LIMIT tokens) and the tiny chat tokenizer."""
    tmp = tmp_path_factory.mktemp("uf_prompts")
    folder = tmp / "ultrafeedback"
    folder.mkdir()
    for name in ("train_clean.jsonl", "eval_clean.jsonl"):
        lines = (shared_data / "ultrafeedback" / name).read_text(encoding="utf-8").splitlines()[:12]
        rows = [json.loads(line) for line in lines]
        for i, prompt in BLANK.items():
            rows[i]["prompt"] = prompt
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tiny_chat_model.tokenizer_dir(tmp / "tok", shared_data / "ultrafeedback")
    argv = ["--model", "tiny-llama", "--data.tokenizer_dir", str(tmp / "tok"), "--data.data_dir", str(folder),
            "--data.cache_dir", str(tmp / "cache"), "--data.max_prompt_tokens", str(LIMIT),
            "--data.max_answer_tokens", "4096", "--generate.prompts", "0"]  # fmt: skip
    r = uf_stages.RECIPE
    cfg = flags.parse_checked(r.defaults, argv, check=r.check, inactive=r.inactive, renamed=r.renamed,
                              adjust=r.adjust)  # fmt: skip
    return types.SimpleNamespace(cfg=cfg, tokenizer=HFTokenizer.from_dir(tmp / "tok"))


def _too_long(setup, prompts) -> int:
    """An independent count of the non-blank prompts over LIMIT tokens (special tokens not counted)."""
    tok, n = setup.tokenizer, 0
    for text in prompts:
        ids = tok.encode(tok.render_chat([{"role": "user", "content": text}], add_generation_prompt=True,
                                         date_string=setup.cfg.data.date_string))  # fmt: skip
        n += sum(i not in tok.special_ids for i in ids) > LIMIT
    return n


def test_blank_prompts_are_dropped_and_counted_for_the_iterations(uf_setup):
    texts = [json.loads(x)["prompt"] for x in (pathlib.Path(uf_setup.cfg.data.data_dir) / "train_clean.jsonl")
             .read_text(encoding="utf-8").splitlines()]  # fmt: skip
    too_long = _too_long(uf_setup, [t for i, t in enumerate(texts) if i not in BLANK])
    prompts, counts = encoding.iteration_prompts(uf_setup, 1)
    assert counts == {"train_prompts": 12, "dropped_empty_prompt": 3, "dropped_long_prompt": too_long}
    assert 0 < too_long and len(prompts.index) == 12 - 3 - too_long > 0  # both kinds dropped, counted apart
    assert not set(prompts.index.tolist()) & set(BLANK) and all(t.strip() for t in prompts.texts)


def test_blank_prompts_are_not_paired_for_the_reward_model(uf_setup):
    pairs, counts = encoding.load_comparisons(uf_setup, "validation", 0)
    assert counts["rows"] == 12 and counts["dropped_empty_prompt"] == 3, counts
    kept = 12 - 3 - counts["dropped_long_prompt"] - counts["dropped_long_answer"]
    assert counts["pairs"] == len(pairs.prompt) == kept > 0, counts
    # No pair's prompt is the chat template around an empty user turn.
    empty = uf_setup.tokenizer.apply_chat_template(
        encoding.messages("", uf_setup.cfg.data),
        add_generation_prompt=True,
        date_string=uf_setup.cfg.data.date_string,
    ).ids
    real = [row[mask].tolist() for row, mask in zip(pairs.prompt, pairs.prompt_mask, strict=True)]
    assert empty not in real and np.all(pairs.prompt_mask[:, -1])
