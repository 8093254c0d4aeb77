"""`python -m jaxrlhf.happy --quick` end to end in a subprocess: killed mid-run, resumed, finished.

Every run here goes through a relative `--out` (or the default one) as the README's command does: orbax
>= 0.12 refuses relative checkpoint paths, and absolute temporary paths hid that from the tests once.
"""

import hashlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from jaxrlhf import happy
from jaxrlhf.engine import flags

REPO = pathlib.Path(__file__).resolve().parents[1]


def _cmd(out, data_dir, *extra):
    return [sys.executable, "-m", "jaxrlhf.happy", "--quick", "--progress", "false", "--data.data_dir",
            str(data_dir), "--out", str(out), *extra]  # fmt: skip


def parse_args(argv):
    """HappyGPT's config from a command line, as `python -m jaxrlhf.happy` parses it."""
    r = happy.RECIPE
    return flags.parse_checked(r.defaults, argv, inactive=r.inactive, renamed=r.renamed, adjust=r.adjust)


def _tree(root):
    return {p.relative_to(root).as_posix(): p.is_file() and hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}  # fmt: skip


def _env(tmp_path):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    # Importable from any working directory, installed or not.
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env["JAXRLHF_CACHE_DIR"] = str(tmp_path / "cache")
    env["HOME"] = str(tmp_path)  # the persistent XLA cache goes under the test's own home
    return env


def test_happy_quick_kill_resume(tmp_path, shared_data):
    """The README's command as typed (default `--out`, a relative `--data.data_dir`), killed during SFT,
    refused without --resume, then resumed with `--out runs/happy` spelled out (relative)."""
    cwd = tmp_path / "work"
    cwd.mkdir()
    out = cwd / "runs" / "happy"  # where the default --out puts it
    data_dir = os.path.relpath(shared_data / "tweets", cwd)
    env = _env(tmp_path)
    base = [sys.executable, "-m", "jaxrlhf.happy", "--quick", "--data.data_dir", data_dir]
    # Kill the first run with SIGKILL once the SFT stage has its first checkpoint.
    proc = subprocess.Popen(base + ["--progress", "false"], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (out / "sft").is_dir() and any(p.name.isdigit() for p in (out / "sft").iterdir()):
            break
        time.sleep(0.2)
    assert proc.poll() is None, f"the run ended before it could be killed:\n{proc.stderr.read()[-3000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    pretrain_metrics = (out / "pretrain.jsonl").read_text()

    # Without --resume the existing stage is refused with a one-line error, and nothing is written (but
    # for the killed run's lock: its process is gone, so the lock is taken over, with a warning, and freed).
    before = _tree(out)
    again = subprocess.run(base + ["--progress", "false"], cwd=cwd, env=env, capture_output=True, text=True)
    assert again.returncode == 1 and "--resume" in again.stderr.strip().splitlines()[-1]
    assert "taking over the stale lock" in again.stderr
    assert _tree(out) == {k: v for k, v in before.items() if k != "run.lock"}

    # Resumed with progress bars and samples on, as a user sees it; PPO-ptx on for the RL stage (its
    # flags may change on --resume: that stage has not started).
    resume = base + ["--out", "runs/happy", "--resume", "--rl.ptx_coef", "0.05"]
    done = subprocess.run(resume, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1].endswith("outputs in runs/happy"), done.stdout[-500:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stages"]["pretrain"]["steps"] == 0  # pretraining was not redone
    assert "--xla_cpu_use_fusion_emitters=false" in summary["memory"]["xla_flags"]  # lean_cpu_compiles
    assert 0 < summary["stages"]["sft"]["steps"] < 10  # SFT continued from its checkpoint
    assert (out / "pretrain.jsonl").read_text() == pretrain_metrics
    for name in ("pretrain", "sft", "rl"):
        assert any(p.name.isdigit() for p in (out / name).iterdir()), name
        assert not [p for p in (out / name).iterdir() if "tmp" in p.name], "no half-written save is left"
        assert (out / f"{name}.jsonl").stat().st_size > 0
        assert (out / f"{name}.png").stat().st_size > 1000
    lines = (out / "samples.txt").read_text().splitlines()
    assert len([x for x in lines if x and not x.startswith("#")]) > 64
    rl_rows = [json.loads(x) for x in (out / "rl.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rl_rows] == list(range(1, len(rl_rows) + 1))
    assert all(r["ptx_loss"] > 0 for r in rl_rows)  # the pretraining loss is in every update
    rewards = [r["reward"] for r in rl_rows]
    assert all(abs(r) <= 1 for r in rewards)
    # RL raises the VADER reward above where the SFT model started.
    assert sum(rewards[-5:]) / 5 > sum(rewards[:3]) / 3, rewards
    assert summary["val_loss"]["sft"] < 4.0  # the SFT stage's final validation loss
    # TensorBoard (on by default): the events under <out>/tb/<stage>/ hold every JSONL record's scalars, for
    # the stage the killed run finished and for the one the resumed run ran.
    from _helpers import assert_series, read_events  # noqa: PLC0415  (tests/)

    for name in ("pretrain", "rl"):
        rows = [json.loads(x) for x in (out / f"{name}.jsonl").read_text().splitlines()]
        events = read_events(out / "tb" / name)
        for key in {k for r in rows for k in r} - {"step"}:
            assert_series(events[key], [(r["step"], r[key]) for r in rows if key in r])

    # The final policy under <out>/hf/policy, and the SFT model exported as docs/ shows it, load in
    # transformers with the same ids and the same logits.
    exported = subprocess.run([sys.executable, "-m", "jaxrlhf.export", "runs/happy", "sft", "sft_hf"],
                              cwd=cwd, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert exported.returncode == 0, exported.stderr[-2000:]
    _same_in_transformers(out, "rl", out / "hf" / "policy")
    _same_in_transformers(out, "sft", cwd / "sft_hf")

    # --resume on the finished run is a no-op: one line, every file as it was.
    before = _tree(out)
    noop = subprocess.run(resume, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert noop.returncode == 0 and noop.stderr.strip().splitlines()[-1].startswith("nothing to do"), (
        noop.stderr
    )
    assert _tree(out) == before


def _same_in_transformers(run_dir, stage, hf_dir):
    """transformers' model and tokenizer from `hf_dir` against the stage's checkpoint run by jaxrlhf."""
    import jax.numpy as jnp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    from jaxrlhf import export, models  # noqa: PLC0415
    from jaxrlhf.engine import checkpoint  # noqa: PLC0415
    from jaxrlhf.text import CharTokenizer  # noqa: PLC0415

    params, meta = checkpoint.restore_params(run_dir, stage)
    cfg = export.model_config(meta, stage)
    ours = CharTokenizer.load(run_dir / "tokenizer.json")
    theirs = transformers.AutoTokenizer.from_pretrained(hf_dir)
    text = "so happy today!! :)"  # within --quick's block_size of 32
    ids = ours.encode(text)
    assert theirs(text)["input_ids"] == ids and theirs.eos_token_id == ours.eos_id
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits.numpy()
    got = models.logits_fn(params.get("policy", params), jnp.array([ids]), jnp.ones((1, len(ids)), bool), cfg)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-4, rtol=1e-4)
    generation = json.loads((hf_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == ours.eos_id


def test_happy_help_and_missing_data(tmp_path):
    cmd = [sys.executable, "-m", "jaxrlhf.happy", "--help"]
    h = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert h.returncode == 0 and "--rl.kl_coef" in h.stdout and "--pretrain.optim.lr" in h.stdout
    env = _env(tmp_path)
    env.pop("JAXRLHF_DATA_DIR", None)
    bad = subprocess.run(_cmd(tmp_path / "o", tmp_path / "nowhere"), cwd=REPO, env=env, capture_output=True,
                         text=True)  # fmt: skip
    assert bad.returncode != 0
    last = bad.stderr.strip().splitlines()[-1]
    assert "error:" in last and "nowhere" in last


@pytest.mark.parametrize("flag", ["--rl.algo=sgd", "--reward=magic"])
def test_happy_rejects_unknown_choices(flag, tmp_path):
    r = subprocess.run(_cmd(tmp_path / "o", tmp_path, flag), cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2 and "choose" in r.stderr


@pytest.mark.parametrize(
    "algo,flag",
    [("pg", "--rl.epochs=2"), ("pg", "--rl.minibatches=2"), ("pg", "--rl.lam=0.9"),
     ("rebel", "--rl.kl_target=1"), ("dpo", "--rl.clip_eps=0.1"), ("rebel", "--rl.beta=0.2"),
     ("ppo", "--rl.eta=2"), ("ppo", "--rl.group_size=2"), ("rebel", "--rl.average_logprobs=true"),
     ("dpo", "--rl.ptx_coef=0.1"), ("dpo", "--rl.kl_coef=0.1"), ("ipo", "--rl.no_eos_penalty=-1"),
     ("rebel", "--rl.micro_batches=2")],
)  # fmt: skip
def test_happy_refuses_flags_the_algorithm_ignores(algo, flag, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(["--rl.algo", algo, flag])
    assert e.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert flag.split("=")[0] in last and f"--rl.algo {algo}" in last
    cfg = parse_args(["--rl.algo", "ppo", "--rl.epochs=2", "--rl.kl_coef=0.2"])  # where they act
    assert cfg.rl.rl.epochs == 2 and cfg.rl.rl.kl_coef == 0.2
    # DPO / IPO now make `epochs` passes over each iteration's pairs (train.make_pair_step), as REBEL does.
    assert parse_args(["--rl.algo", "dpo", "--rl.epochs=2"]).rl.rl.epochs == 2
    rebel = ["--rl.epochs=3", "--rl.minibatches=2", "--rl.kl_coef=0.1", "--rl.no_eos_penalty=-1"]
    cfg = parse_args(["--rl.algo", "rebel", *rebel])
    rc = cfg.rl.rl
    assert (rc.epochs, rc.minibatches, rc.kl_coef, rc.no_eos_penalty, cfg.rl.optim.lr) == (
        3,
        2,
        0.1,
        -1,
        3e-5,
    )
    # Unset, --rl.epochs / --rl.optim.lr are the algorithm's: REBEL's authors' 4 passes, HappyGPT's 1 for PPO.
    settings = [parse_args(["--rl.algo", a]) for a in ("rebel", "ppo")]
    assert [(c.rl.rl.epochs, c.rl.optim.lr) for c in settings] == [(4, 3e-5), (1, 3e-4)]
