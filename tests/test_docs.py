"""The commands and code of README.md, docs/*.md and experiments/*/README.md, as a reader types them.

Every shell command in a fenced code block is found and classified; one this file does not know fails the
test, so a new command cannot slip in unchecked:

- `python -m <pipeline> --help` and `python -m jaxrlhf.export ...` run as typed, in a subprocess, from a
  temporary working directory beside a `shared -> <the shared data>` link (so `../shared/data/...`
  resolves as it does beside a checkout), on a run made here for the export;
- every other pipeline command (the long runs: the default HappyGPT run, smoke runs of minutes, GPU / TPU
  runs) is parsed by its recipe's own parser, as `python -m ...` parses it, so a renamed or unknown flag, a
  bad value or a flag the algorithm ignores fails here; a `--config FILE` is the YAML block the docs give;
- `pip install` names extras that pyproject.toml defines, the README's test command is CI's, a
  `python scripts/X.py` names an existing script and flags it defines, `tensorboard` reads `<out>/tb`;
- the README's losses example runs and prints a nonzero loss and gradient that agree with the unsharded
  ones and with the output the README quotes; docs/models.md's round trip runs.

The default HappyGPT run is not run here (tests/test_happy.py runs its entry point with --quick).
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys
import tomllib

import numpy as np
import pytest

from jaxrlhf.engine import flags

REPO = pathlib.Path(__file__).resolve().parents[1]
DOCS = sorted(
    [REPO / "README.md", *(REPO / "docs").glob("*.md"), *(REPO / "experiments").glob("*/README.md")]
)
RECIPES = {
    "jaxrlhf.happy": ("jaxrlhf.happy", "RECIPE"),
    "jaxrlhf.arith": ("jaxrlhf.arith", "RECIPE"),
    "experiments.tldr": ("experiments.tldr.recipe", "RECIPE"),
    "experiments.sst2": ("experiments.sst2.recipe", "RECIPE"),
    "experiments.ultrafeedback": ("experiments.ultrafeedback.stages", "RECIPE"),
    "experiments.gsm8k": ("experiments.gsm8k.recipe", "RECIPE"),
}
CI_TEST_COMMAND = "pip install -e '.[test]' -c constraints.txt && python -m pytest -n 2 tests"
NOT_RUN = ("huggingface-cli", "gcloud")  # need an account or a cloud project


def _blocks(path: pathlib.Path) -> list[tuple[str, str]]:
    """(language, text) of every fenced code block of a Markdown file (indented fences too)."""
    out, lang, lines, indent = [], None, [], ""
    for line in path.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if lang is None and stripped.startswith("```"):
            lang, lines, indent = stripped[3:].strip(), [], line[: len(line) - len(line.lstrip())]
        elif lang is not None and stripped.startswith("```"):
            out.append((lang, "\n".join(lines)))
            lang = None
        elif lang is not None:
            lines.append(line[len(indent) :] if line.startswith(indent) else line)
    return out


def _shell_commands(text: str) -> list[str]:
    """The commands of a shell block: continuation lines joined, comments dropped, `a && b` split."""
    joined = re.sub(r"\\\n\s*", " ", text)
    out = []
    for line in joined.splitlines():
        line = line.split(" # ")[0].strip()
        if line and not line.startswith("#"):
            out += [part.strip() for part in line.split("&&")]
    return out


def _all_commands() -> list[tuple[str, str]]:
    cmds = []
    for path in DOCS:
        for lang, text in _blocks(path):
            if lang in ("bash", "sh", "shell"):
                cmds += [(path.relative_to(REPO).as_posix(), c) for c in _shell_commands(text)]
    return cmds


COMMANDS = _all_commands()


def _split(command: str) -> tuple[dict, list[str]]:
    """(environment assignments, argv) of a command line."""
    argv = shlex.split(command)
    env = {}
    while argv and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", argv[0]):
        key, _, value = argv.pop(0).partition("=")
        env[key] = value
    return env, argv


def _kind(argv: list[str]) -> str:
    if argv[:2] == ["python", "-m"] and argv[2] in RECIPES:
        return "help" if argv[3:] == ["--help"] else "parse"
    if argv[:3] == ["python", "-m", "jaxrlhf.export"]:
        return "export"
    if argv[:3] == ["python", "-m", "pytest"]:
        return "pytest"
    if argv[:1] == ["python"] and argv[1:2] and argv[1].startswith("scripts/"):
        return "script"
    if argv[:2] == ["pip", "install"]:
        return "pip"
    if argv[:1] == ["tensorboard"]:
        return "tensorboard"
    if argv[:1] and argv[0] in NOT_RUN:
        return "not_run"
    return "unknown"


def _typed(argv: list[str]) -> list[str]:
    """argv as typed, `python` being this interpreter (the venv's)."""
    return [sys.executable, *argv[1:]] if argv[0] == "python" else argv


def _of_kind(kind: str) -> list[tuple[str, str]]:
    return [(where, c) for where, c in COMMANDS if _kind(_split(c)[1]) == kind]


def _recipe(module: str):
    import importlib  # noqa: PLC0415

    name, attr = RECIPES[module]
    return getattr(importlib.import_module(name), attr)


def _env(extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.update(JAX_NUM_CPU_DEVICES="1", HF_HUB_OFFLINE="1", **(extra or {}))
    return env


@pytest.fixture
def workdir(tmp_path, shared_data):
    """A working directory where `../shared/data` is the shared data, as beside a checkout."""
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "data").symlink_to(shared_data, target_is_directory=True)
    cwd = tmp_path / "work"
    cwd.mkdir()
    return cwd


# ------------------------------------------------------------------------------------- the inventory


def test_every_command_is_known_and_the_readme_shows_one_per_pipeline():
    unknown = [(where, c) for where, c in COMMANDS if _kind(_split(c)[1]) == "unknown"]
    assert not unknown, f"commands this test does not know how to check: {unknown}"
    readme = [c for where, c in COMMANDS if where == "README.md"]
    for module in RECIPES:
        assert any(f"python -m {module}" in c and "--help" not in c for c in readme), module
    shell_lines = [
        line for lang, text in _blocks(REPO / "README.md") if lang == "bash" for line in text.splitlines()
    ]
    assert CI_TEST_COMMAND in shell_lines  # CI runs it verbatim (.ci/run)
    assert len((REPO / "README.md").read_text(encoding="utf-8").splitlines()) <= 250


def test_the_readme_test_command_is_ci_s():
    assert CI_TEST_COMMAND in (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert _of_kind("pytest") == [("README.md", CI_TEST_COMMAND.split(" && ")[1])]


def test_pip_installs_name_existing_extras_and_constraints():
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    extras = set(project["optional-dependencies"])
    pips = _of_kind("pip")
    assert pips
    for where, command in pips:
        argv = _split(command)[1]
        assert "-e" in argv, (where, command)
        target = argv[argv.index("-e") + 1]
        match = re.fullmatch(r"\.(?:\[([a-z0-9_,-]+)\])?", target)
        assert match, (where, command)
        assert set(filter(None, (match.group(1) or "").split(","))) <= extras, (where, command)
        if "-c" in argv:
            assert (REPO / argv[argv.index("-c") + 1]).is_file(), (where, command)
    assert "tensorboard" in " ".join(project["optional-dependencies"]["test"])  # the viewer of `tensorboard`


def test_scripts_exist_with_the_flags_shown():
    for where, command in _of_kind("script"):
        argv = _split(command)[1]
        source = (REPO / argv[1]).read_text(encoding="utf-8")
        defined = set(re.findall(r"add_argument\(\s*\"(--[a-z0-9-]+)\"", source))
        used = {a for a in argv[2:] if a.startswith("--")}
        assert used <= defined, (where, command, used - defined)


def test_tensorboard_reads_a_runs_tb_folder():
    shown = _of_kind("tensorboard")
    assert shown
    for where, command in shown:
        argv = _split(command)[1]
        assert argv[1] == "--logdir" and argv[2].endswith("/tb"), (where, command)


# ------------------------------------------------------------------------------------------- parsed


def _yaml_files() -> dict[str, str]:
    """name -> text of the YAML blocks whose first line is `# <name>.yaml`."""
    out = {}
    for path in DOCS:
        for lang, text in _blocks(path):
            first = text.splitlines()[0] if text else ""
            if lang in ("yaml", "yml") and re.fullmatch(r"# \S+\.ya?ml", first.strip()):
                out[first.strip()[2:]] = text
    return out


@pytest.mark.parametrize(
    "where,command", [pytest.param(w, c, id=f"{w}:{i}") for i, (w, c) in enumerate(_of_kind("parse"))]
)
def test_pipeline_command_parses(where, command, tmp_path, monkeypatch, capsys):
    """Parsed as `python -m <pipeline>` parses it (flags, `--config`, renamed and ignored flags, values);
    the model and data checks that need the weights and files are left to the runs."""
    monkeypatch.chdir(tmp_path)
    for name, text in _yaml_files().items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    argv = _split(command)[1]
    r = _recipe(argv[2])
    try:
        cfg, _ = flags.parse(r.defaults, argv[3:], inactive=r.inactive, renamed=r.renamed, adjust=r.adjust)
    except SystemExit:
        pytest.fail(f"{where}: `{command}` is refused: {capsys.readouterr().err.strip()}")
    assert dataclasses.is_dataclass(cfg)


def test_the_config_example_sets_its_fields(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "happy.yaml").write_text(_yaml_files()["happy.yaml"], encoding="utf-8")
    command = next(c for _, c in _of_kind("parse") if "--config happy.yaml" in c)
    r = _recipe("jaxrlhf.happy")
    cfg, _ = flags.parse(r.defaults, _split(command)[1][3:], inactive=r.inactive, renamed=r.renamed,
                         adjust=r.adjust)  # fmt: skip
    assert cfg.data.data_dir == "../shared/data/tweets" and cfg.rl.rl.kl_coef == 0.1
    assert cfg.rl.iterations == 400  # the command line overrides the file


# ---------------------------------------------------------------------------------------- run as typed


def test_help_commands_run_as_typed(workdir):
    helps = _of_kind("help")
    assert {_split(c)[1][2] for _, c in helps} == set(RECIPES)
    procs = [(c, subprocess.Popen(_typed(shlex.split(c)), cwd=workdir, env=_env(), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)) for _, c in helps]  # fmt: skip
    for command, proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0 and out.startswith("usage: python -m "), (command, err[-2000:])
        assert "--config FILE" in out and "--resume" in out, command


def _tiny_happy_run(root: pathlib.Path) -> None:
    """A run directory with an `rl` checkpoint of a tiny character-level GPT, as HappyGPT writes it."""
    import jax  # noqa: PLC0415

    from jaxrlhf import models  # noqa: PLC0415
    from jaxrlhf.engine import checkpoint  # noqa: PLC0415
    from jaxrlhf.text import CharTokenizer  # noqa: PLC0415

    tokenizer = CharTokenizer.from_corpus(["a happy tweet", "another one!"], eos="⏎", unk="?")
    tokenizer.save(root.parent / "tokenizer")
    cfg = models.ModelConfig.preset("gpt-nano", vocab_size=tokenizer.vocab_size, block_size=32)
    params = models.init_params(jax.random.key(0), cfg)
    meta = {"step": 1, "model_config": json.loads(json.dumps(dataclasses.asdict(cfg))),
            "config": {"rl": {"temperature": 1.0, "top_k": 30, "top_p": 1.0}}}  # fmt: skip
    checkpoint.save(
        root, "rl", 1, {"params": {"policy": params}}, meta=meta, tokenizer=root.parent / "tokenizer"
    )


def test_export_runs_as_typed(workdir):
    exports = _of_kind("export")
    assert exports
    for where, command in exports:
        argv = _split(command)[1]
        run_dir, stage, dest = argv[3:6]
        assert stage == "rl", (where, command)  # the run made here
        if not (workdir / run_dir).exists():
            _tiny_happy_run(workdir / run_dir)
        proc = subprocess.run(
            _typed(argv), cwd=workdir, env=_env(), capture_output=True, text=True, timeout=180
        )
        assert proc.returncode == 0, (where, command, proc.stderr[-2000:])
        config = json.loads((workdir / dest / "config.json").read_text())
        assert config["architectures"] == ["GPT2LMHeadModel"], config
        assert (workdir / dest / "tokenizer.json").is_file()
        assert "top_k" in json.loads((workdir / dest / "generation_config.json").read_text())


# --------------------------------------------------------------------------------------- python blocks


def _python_blocks() -> list[tuple[str, str]]:
    return [(p.relative_to(REPO).as_posix(), t) for p in DOCS for lang, t in _blocks(p) if lang == "python"]


def test_every_python_block_compiles():
    blocks = _python_blocks()
    assert blocks
    for where, text in blocks:
        ast.parse(text, filename=where)


NUMBER = r"-?\d+\.\d+(?:e-?\d+)?"


def _printed(text: str) -> tuple[float, np.ndarray, float, np.ndarray]:
    """(sharded loss, sharded gradient, unsharded loss, unsharded gradient) of the example's output."""
    found = re.findall(rf"loss ({NUMBER}), gradient \[([^\]]*)\]", text)
    assert len(found) >= 2, text
    (loss, grad), (ref_loss, ref_grad) = found[:2]
    return float(loss), np.array(grad.split(), float), float(ref_loss), np.array(ref_grad.split(), float)


def test_the_losses_example_runs_and_is_not_trivial(tmp_path):
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    (code,) = [t for where, t in _python_blocks() if where == "README.md" and "shard_map" in t]
    (tmp_path / "example.py").write_text(code, encoding="utf-8")
    env = _env()
    env.pop("JAX_NUM_CPU_DEVICES")  # the example asks for its own 8 devices
    proc = subprocess.run(
        [sys.executable, "example.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    loss, grad, ref_loss, ref_grad = _printed(proc.stdout)
    assert abs(loss) > 1e-3 and np.all(np.abs(grad) > 1e-3), proc.stdout  # not the zero of a ratio of 1
    assert abs(loss - ref_loss) < 1e-6 and np.allclose(grad, ref_grad, atol=1e-6), proc.stdout
    assert proc.stdout.startswith("8 devices"), proc.stdout
    difference = float(re.search(rf"max difference: ({NUMBER})", proc.stdout).group(1))
    assert difference < 1e-6, proc.stdout
    q_loss, q_grad, q_ref_loss, q_ref_grad = _printed(readme[readme.index("It prints") :])  # what it quotes
    assert abs(q_loss - loss) < 1e-5 and np.allclose(q_grad, grad, atol=1e-5), (readme, proc.stdout)
    assert abs(q_ref_loss - ref_loss) < 1e-5 and np.allclose(q_ref_grad, ref_grad, atol=1e-5)


def test_the_models_round_trip_runs(tmp_path, monkeypatch):
    (code,) = [t for where, t in _python_blocks() if where == "docs/models.md" and "tiny-llama" in t]
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "docs/models.md", "exec"), {"__name__": "docs_models"})
    config = json.loads((tmp_path / "runs" / "tiny-mistral-hf" / "config.json").read_text())
    assert config["architectures"] == ["MistralForCausalLM"]
