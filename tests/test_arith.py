"""The arithmetic pipeline (`python -m jaxrlhf.arith`): its problems, its verifier against Python's own
arithmetic, and the README's quick command end to end, its accuracy re-measured by a greedy decoder
written here (full forward per token, no KV cache) on the exported policy."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf import arith, models
from jaxrlhf.rollout import Rollout
from jaxrlhf.text import CharTokenizer

REPO = pathlib.Path(__file__).resolve().parents[1]
TOK = CharTokenizer.from_corpus([arith.ALPHABET], eos=arith.EOS)


def _truth(problem: str) -> int:
    """The answer by Python's parser: "12-31=" -> -19 (an independent reading of the problem)."""
    return eval(problem.rstrip("="), {"__builtins__": {}})  # noqa: S307  (digits and one operator)


def test_check_answers_against_python():
    problems = ["12-31=", "7+5=", "0*9=", "99-99=", "3*40=", "5-5=", "10+0="]
    answers = ["-19", "12", "0", "0", "120", "-0", "010"]
    right, formed = arith.check_answers(problems, answers)
    assert right.tolist() == [str(_truth(p)) == a for p, a in zip(problems, answers, strict=True)]
    assert right.tolist() == [True, True, True, True, True, False, False]  # "-0", "010": not canonical
    assert formed.tolist() == [True] * 5 + [False, False]
    # Wrong, malformed, unfinished (None), empty: no exception, never right.
    right, formed = arith.check_answers(["1+1="] * 6, ["3", "2=", "", None, "+2", "2 "])
    assert not right.any() and formed.tolist() == [True, False, False, False, False, False]
    with pytest.raises(ValueError, match="not a problem"):
        arith.check_answers(["1+1"], ["2"])


def test_problems_split_and_encoding():
    dcfg = arith.DataConfig(digits=2, ops="+-*", train_problems=3000, heldout_problems=500)
    train = arith.draw_problems(3000, dcfg, heldout=False, seed=0)
    heldout = arith.draw_problems(500, dcfg, heldout=True, seed=arith.HELDOUT_SEED)
    as_text = lambda ps: {f"{a}{op}{b}" for a, op, b in ps}  # noqa: E731
    assert not as_text(train) & as_text(heldout)  # disjoint
    assert len(as_text(heldout)) == 500  # distinct: the held-out tenth holds 3,000 problems
    assert {op for _, op, _ in train} == set("+-*")
    assert all(0 <= a < 100 and 0 <= b < 100 for a, _, b in train + heldout)
    # Another seed draws other training problems from the same nine tenths.
    other = arith.draw_problems(3000, dcfg, heldout=False, seed=1)
    assert as_text(other) != as_text(train) and not as_text(other) & as_text(heldout)
    # About a tenth of all problems is held out.
    space = [f"{a}{op}{b}" for a in range(100) for b in range(100) for op in "+-*"]
    assert 0.09 < np.mean([arith.held_out(t) for t in space]) < 0.11

    rows = arith.encode_problems(TOK, heldout, dcfg)
    assert rows.prompt.shape == (500, dcfg.prompt_chars) and rows.answer.shape == (500, dcfg.answer_chars + 1)
    assert rows.prompt_mask[:, -1].all() and rows.answer_mask[:, 0].all()  # left / right padded
    prompts = TOK.decode_batch(rows.prompt, rows.prompt_mask)
    answers = TOK.decode_batch(rows.answer, rows.answer_mask)
    for p, a in zip(prompts, answers, strict=True):
        assert p.startswith(arith.EOS) and a.endswith(arith.EOS)
        assert int(a[:-1]) == _truth(p[1:])


def test_reward_scores_right_formed_and_unfinished():
    dcfg = arith.DataConfig()
    rows = arith.encode_problems(TOK, [(12, "-", 31), (7, "+", 5), (3, "+", 4), (9, "-", 1)], dcfg)
    r = dcfg.answer_chars + 1
    texts, finished = ["-19⏎", "13⏎", "7", "8+⏎"], [True, True, False, True]
    response = np.full((4, r), TOK.eos_id, np.int32)
    mask = np.zeros((4, r), bool)
    for i, t in enumerate(texts):
        ids = TOK.encode(t)
        response[i, : len(ids)], mask[i, : len(ids)] = ids, True
    ro = Rollout(rows.prompt, rows.prompt_mask, response, mask, np.zeros((4, r), np.float32),
                 np.array(finished))  # fmt: skip
    scores = arith.make_reward(TOK, 0.1)(ro)
    # right; wrong but well formed; right digits without the end mark; malformed
    np.testing.assert_allclose(scores, [1.0, 0.1, 0.0, 0.0])


def _greedy(params, cfg, prompts: list[str], n: int) -> list[str | None]:
    """Greedy decoding by a full forward over the whole left-padded sequence per token (no KV cache, no
    sampler): each row's answer up to its end mark, None where it has none within n tokens."""
    width = max(len(p) for p in prompts)
    ids = np.zeros((len(prompts), width), np.int32)
    mask = np.zeros((len(prompts), width), bool)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :], mask[i, width - len(p) :] = TOK.encode(p), True
    logits_fn = jax.jit(models.logits_fn, static_argnames="cfg")
    for _ in range(n):
        nxt = np.asarray(jnp.argmax(logits_fn(params, ids, mask, cfg=cfg)[:, -1], -1), np.int32)
        ids = np.concatenate([ids, nxt[:, None]], 1)
        mask = np.concatenate([mask, np.ones((len(ids), 1), bool)], 1)
    out = []
    for row in ids[:, width:]:
        text = TOK.decode(row)
        out.append(text.split(arith.EOS)[0] if arith.EOS in text else None)
    return out


def test_quick_run_as_the_readme_types_it(tmp_path):
    """`python -m jaxrlhf.arith --quick` (default relative --out), then its numbers checked: the held-out
    accuracy of the exported RL policy re-measured here; every logged sample's score re-scored."""
    path = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = dict(os.environ, PYTHONPATH=path, HOME=str(tmp_path))
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-m", "jaxrlhf.arith", "--quick", "--progress", "false"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "runs" / "arith"
    assert "held-out accuracy" in proc.stdout
    acc = json.loads((out / "accuracy.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["accuracy"] == acc and summary["memory"]["end"]["peak_rss_mb"] > 0
    for stage in ("sft", "rl"):
        for how in ("greedy", "sampled"):
            assert 0.0 <= acc[stage][how]["accuracy"] <= acc[stage][how]["well_formed"] <= 1.0

    # The exported policy, decoded greedily here on the same held-out problems.
    params, cfg = models.hf.load(out / "hf" / "policy")
    cfg_used = arith.QUICK
    dcfg = arith.DataConfig(digits=2, heldout_problems=cfg_used[("data", "heldout_problems")])
    heldout = arith.draw_problems(dcfg.heldout_problems, dcfg, heldout=True, seed=arith.HELDOUT_SEED)
    problems = [f"{a}{op}{b}=" for a, op, b in heldout]
    answers = _greedy(params, cfg, [arith.EOS + p for p in problems], dcfg.answer_chars + 1)
    mine = np.mean([a is not None and a == str(_truth(p)) for p, a in zip(problems, answers, strict=True)])
    assert mine == pytest.approx(acc["rl"]["greedy"]["accuracy"])

    # Every logged sample's score is the verifier's on its text (1 right, 0.1 well formed, else 0).
    records = [json.loads(line) for line in (out / "rl_samples.jsonl").read_text().splitlines()]
    assert records
    for rec in records:
        problem, answer = rec["prompt"].lstrip(arith.EOS), rec["answer"].split(arith.EOS)[0]
        want = 0.0
        if rec["finished"] and arith.ANSWER.fullmatch(answer):
            want = 1.0 if int(answer) == _truth(problem) else 0.1
        assert rec["score"] == pytest.approx(want), rec
