"""GSM8K: the builder on rows written here (and its refusals), the answer checker against hand-written cases,
the recipe's host reward (each rollout row scored against its own question's gold), and
`python -m experiments.gsm8k` end to end as its README types it, on a tiny random Llama "instruct" model
(a byte-level BPE trained here with Llama 3's special tokens and the real Llama 3.2 chat template, random
tiny-llama weights written by jaxrlhf's Hugging Face exporter: nothing downloaded)."""

import json
import os
import pathlib
import re
import subprocess
import sys
import types

import jax
import numpy as np
import pytest

from experiments.gsm8k import recipe as gsm
from jaxrlhf import data, models
from jaxrlhf.data import gsm8k
from jaxrlhf.models import ModelConfig, hf
from jaxrlhf.text import HFTokenizer

REPO = pathlib.Path(__file__).resolve().parents[1]
TEMPLATE = REPO / "tests" / "fixtures" / "chat_templates" / "llama3.2.jinja"
SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def _row(a: int, b: int) -> dict:
    """A GSM8K-format row: a question, a solution with a calculator note, the "#### <sum>" line."""
    return {
        "question": f"Tom has {a} apples and buys {b} more. How many apples does he have?",
        "answer": f"He has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}",
    }


TRAIN = [_row(a, b) for a in range(4) for b in range(4)]  # 16 questions, golds 0..6
TEST = [_row(a, 5) for a in range(4)] + [
    {"question": "A farm sells 1,000 eggs and 80 more. How many eggs?", "answer": "1000 + 80\n#### 1,080"},
    {"question": "It is 2 degrees and drops 7. What is the temperature?", "answer": "2 - 7\n#### -5"},
]


@pytest.fixture(scope="module")
def gsm_dir(tmp_path_factory) -> pathlib.Path:
    """A gsm8k/ folder with train.jsonl and test.jsonl (a blank line in train)."""
    root = tmp_path_factory.mktemp("gsm") / "gsm8k"
    root.mkdir()
    (root / "train.jsonl").write_text("\n".join(json.dumps(r) for r in TRAIN[:8]) + "\n\n"
                                      + "\n".join(json.dumps(r) for r in TRAIN[8:]) + "\n")  # fmt: skip
    (root / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TEST))
    return root


@pytest.fixture(scope="module")
def model_dir(gsm_dir, tmp_path_factory) -> pathlib.Path:
    """The tiny Llama "instruct" directory (module doc): tokenizer.json, tokenizer_config.json with the
    chat template, config.json + model.safetensors, generation_config.json."""
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, trainers
    from tokenizers import models as tok_models

    out = tmp_path_factory.mktemp("model")
    tok = Tokenizer(tok_models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = [r["question"] + r["answer"] for r in TRAIN + TEST] + [TEMPLATE.read_text(), gsm.INSTRUCTION]
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(texts, trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    tok.save(str(out / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in SPECIAL}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
              "eos_token": "<|eot_id|>", "pad_token": "<|end_of_text|>",
              "chat_template": TEMPLATE.read_text()}  # fmt: skip
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    cfg = ModelConfig.preset("tiny-llama", vocab_size=tok.get_vocab_size())
    params = models.init_params(jax.random.key(0), cfg)
    hf.save(params, cfg, out, bos_token_id=ids["<|begin_of_text|>"], eos_token_id=ids["<|eot_id|>"])
    stops = [ids["<|end_of_text|>"], ids["<|eot_id|>"]]
    generation = {"bos_token_id": ids["<|begin_of_text|>"], "eos_token_id": stops}
    (out / "generation_config.json").write_text(json.dumps(generation))
    return out


# ------------------------------------------------------------------------------------------ builder


def test_builder_reads_rows_in_order_with_the_canonical_final(gsm_dir, tmp_path, monkeypatch):
    train = data.load_gsm8k("train", gsm_dir, cache_dir=tmp_path / "cache")
    assert [r["question"] for r in train] == [r["question"] for r in TRAIN]
    assert [r["answer"] for r in train] == [r["answer"] for r in TRAIN]
    assert [r["final"] for r in train] == [str(int(r["answer"].split("#### ")[1])) for r in TRAIN]
    test = data.load_gsm8k("test", gsm_dir, cache_dir=tmp_path / "cache")
    assert [r["final"] for r in test] == ["5", "6", "7", "8", "1080", "-5"]
    # $JAXRLHF_DATA_DIR holding a gsm8k/ subfolder is found too.
    monkeypatch.setenv("JAXRLHF_DATA_DIR", str(gsm_dir.parent))
    assert data.load_gsm8k("test", cache_dir=tmp_path / "cache2") == test


def test_the_download_is_pinned_to_a_commit_and_hashed():
    for name, (url, sha256) in gsm8k.DOWNLOADS.items():
        assert re.fullmatch(r"https://raw\.githubusercontent\.com/openai/grade-school-math/[0-9a-f]{40}/"
                            rf"grade_school_math/data/{name}", url), url  # fmt: skip
        assert re.fullmatch(r"[0-9a-f]{64}", sha256)
    assert set(gsm8k.DOWNLOADS) == {"train.jsonl", "test.jsonl"}


@pytest.mark.parametrize(
    "line, why",
    [
        ("{not json", "not a JSON object"),
        ('["a list"]', "expected a JSON object"),
        ('{"question": "q"}', "field 'answer' must be text (missing)"),
        ('{"question": null, "answer": "#### 1"}', "field 'question' must be text (NoneType)"),
        ('{"question": "q", "answer": "it is 4"}', "no '#### <number>' line"),
        ('{"question": "q", "answer": "#### four"}', "'four' is not a number"),
    ],
)
def test_a_bad_row_names_the_file_and_line(line, why, tmp_path):
    folder = tmp_path / "gsm8k"
    folder.mkdir()
    (folder / "train.jsonl").write_text(json.dumps(TRAIN[0]) + "\n" + line + "\n")
    (folder / "test.jsonl").write_text(json.dumps(TEST[0]) + "\n")
    with pytest.raises(data.DataFormatError) as err:
        data.load_gsm8k("train", folder, cache_dir=tmp_path / "cache")
    assert "train.jsonl:2: " in str(err.value) and why in str(err.value), str(err.value)


# ------------------------------------------------------------------------------------------ checker


@pytest.mark.parametrize(
    "text, want",
    [
        ("48 + 24 = 72 clips.\n#### 72", "72"),
        ("#### 1,234", "1234"),  # thousands commas
        ("The total is $1,234,567.", "1234567"),  # "$", commas, the sentence's period
        ("It drops to -5 degrees.", "-5"),  # negative
        ("#### -$5", "-5"),
        ("#### \u22127", "-7"),  # a Unicode minus
        ("So 72.00 dollars", "72"),  # a decimal equal to an integer
        ("#### 0.50", "0.5"),
        ("#### -0", "0"),
        ("#### 007", "7"),
        ("pages 3-4", "4"),  # a hyphen between numbers is no minus
        ("10 - 3 leaves 7 and then 12 - 5", "5"),  # a spaced minus is no sign either
        ("1,2345 items", "2345"),  # not a thousands group: two numbers
        ("buy 1,234, then 5", "5"),
        ("#### 18 is the answer, not 20", "18"),  # the number right after ####
        ("#### 5\nwait, recheck.\n#### 6", "6"),  # the last #### wins
        ("Answer: 12. Check: 3 * 4 = 12.", "12"),  # no ####: the last number
        ("#### twelve", None),  # a malformed answer line
        ("no numbers here", None),
        ("", None),
        (None, None),
    ],
)
def test_extract_answer(text, want):
    assert data.extract_answer(text) == want


def test_gsm8k_reward_scores_right_answers_one_and_everything_else_zero():
    texts = ["... #### 72", "so 72.00", "#### 1,080.", "#### 71", "#### ", "", "#### -5", "it is 5", None]
    golds = ["72", "72", "1,080", "72", "72", "3", "-5", "-5", "1"]
    scores = data.gsm8k_reward(texts, golds)
    assert scores.dtype == np.float32
    np.testing.assert_array_equal(scores, [1, 1, 1, 0, 0, 0, 1, 0, 0])
    # A whole gold solution reads as its #### line.
    solution = "48 + 24 = <<48+24=72>>72 clips.\n#### 72"
    np.testing.assert_array_equal(data.gsm8k_reward(["#### 72", "#### 24"], [solution] * 2), [1, 0])
    assert data.gsm8k_reward([], []).shape == (0,)
    with pytest.raises(ValueError, match="2 texts but 1 golds"):
        data.gsm8k_reward(["a", "b"], ["1"])
    with pytest.raises(ValueError, match="holds no number"):
        data.gsm8k_reward(["#### 1"], ["n/a"])


# ------------------------------------------------------------------------------------------- recipe


def _encode(tok: HFTokenizer, text: str) -> list[int]:
    return tok.encode(text) + [tok.eos_id]


def test_the_host_reward_scores_each_row_against_its_own_question(gsm_dir, model_dir, tmp_path):
    tok = HFTokenizer.from_dir(model_dir)
    cfg = gsm.DataConfig(max_prompt_tokens=224)
    rows = data.load_gsm8k("test", gsm_dir, cache_dir=tmp_path / "cache")
    prompts, golds = gsm.encode_prompts(tok, rows, cfg)
    assert golds == [r["final"] for r in rows]
    # The prompt: the template's text around the question and the instruction, left-padded.
    text = tok.decode(prompts.prompt[4][prompts.prompt_mask[4]])
    assert text.startswith("<|begin_of_text|><|start_header_id|>system") and rows[4]["question"] in text
    assert gsm.INSTRUCTION in text and text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert prompts.prompt_mask[:, -1].all()
    reward = gsm.make_reward(tok, [(prompts, golds)])
    # Rows in another order than the prompts, with other pad widths: row i answers prompt order[i].
    order = [5, 4, 0, 4, 1]
    answers = ["#### -5", "the eggs: 1,080.", "#### 6", "#### 5", "#### 6"]  # right, right, wrong, ...
    seqs = [_encode(tok, a) for a in answers]
    width = max(map(len, seqs)) + 2
    response = np.full((5, width), tok.pad_id, np.int32)
    response_mask = np.zeros((5, width), bool)
    for i, s in enumerate(seqs):
        response[i, : len(s)], response_mask[i, : len(s)] = s, True
    pad = np.zeros((5, 3), bool)
    batch = types.SimpleNamespace(
        prompt=np.concatenate([np.full((5, 3), tok.pad_id), prompts.prompt[order]], axis=1),
        prompt_mask=np.concatenate([pad, prompts.prompt_mask[order]], axis=1),
        response=response, response_mask=response_mask,
    )  # fmt: skip
    np.testing.assert_array_equal(reward.score(batch), [1, 1, 0, 0, 1])
    other = gsm.encode_prompts(tok, [{"question": "Unknown?", "final": "1"}], cfg)[0]
    batch.prompt, batch.prompt_mask = other.prompt[[0] * 5], other.prompt_mask[[0] * 5]
    with pytest.raises(ValueError, match="no GSM8K question of the run"):
        reward.score(batch)


def test_end_to_end_as_the_readme_types_it(gsm_dir, model_dir, tmp_path):
    readme = (REPO / "experiments" / "gsm8k" / "README.md").read_text()
    assert "python -m experiments.gsm8k --init-from" in readme
    out = os.path.relpath(tmp_path / "run", REPO)  # relative to the repository root, as a user's --out
    args = [
        "--init-from", model_dir, "--out", out, "--progress", "false", "--compile-cache", "",
        "--data.data_dir", gsm_dir, "--data.cache_dir", tmp_path / "cache",
        "--data.max_prompt_tokens", 224, "--data.max_answer_tokens", 12,
        "--rl.iterations", 2, "--rl.batch_size", 8, "--rl.group_size", 4, "--rl.eval_every", 0,
        "--rl.eval_batches", 1, "--rl.sample_every", 1, "--rl.ckpt_every", 2, "--rl.optim.lr", 1e-3,
    ]  # fmt: skip
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": "1", "HF_HUB_OFFLINE": "1", "JAXRLHF_DATA_DIR": ""}
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.gsm8k", *map(str, args)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = tmp_path / "run"
    summary = json.loads((run / "rl_summary.json").read_text())
    assert summary["algo"] == "grpo" and summary["train_prompts"] == 16 and summary["val_prompts"] == 6
    assert summary["train_counts"] == {"rows": 16, "dropped_long_prompt": 0}
    log = [json.loads(x) for x in (run / "rl.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r or "reward" in r][-1] == 2, log
    initial = json.loads((run / "rl_initial_eval.json").read_text())
    assert 0.0 <= initial["val_score"] <= 1.0 and "val_kl" in json.dumps(initial)
    # Every logged sample's score is the verifier's on its own text against its question's gold.
    gold_of = {r["question"]: r["answer"].split("#### ")[1] for r in TRAIN + TEST}
    records = [json.loads(x) for x in (run / "rl_samples.jsonl").read_text().splitlines()]
    assert {r["split"] for r in records} == {"train", "val"} and len(records) >= 8
    for r in records:
        question = next(q for q in gold_of if q in r["prompt"])
        assert gsm.INSTRUCTION in r["prompt"]
        assert r["score"] == data.gsm8k_reward([r["solution"]], [gold_of[question]])[0], r
    exported = run / "hf" / "policy"
    assert (exported / "config.json").is_file() and list(exported.glob("*.safetensors"))
