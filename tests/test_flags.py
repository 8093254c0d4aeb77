"""The one command-line parser (`jaxrlhf.engine.flags`) as a user meets it through HappyGPT's and TL;DR's
flags: `--config` files (YAML and JSON), flattened RL flags, choices, non-finite floats, renamed flags, the
`given` paths and the `config_json` round trip. Every expectation is a value written here (or read back
from a file), never one the parser computed."""

import json
import re
import typing

import pytest

from experiments.tldr import recipe as tldr  # noqa: E402
from jaxrlhf import happy  # noqa: E402
from jaxrlhf.engine import flags  # noqa: E402

HAPPY = happy.RECIPE
PROG = "happy"
# RLConfig.algo's Literal, as written in the source
RL_ALGOS = "ppo, pg, grpo, rloo, reinforce_pp, rebel, dpo, ipo"


def parse(argv, *, inactive=True):
    """(config, given) as `python -m jaxrlhf.happy` parses `argv`."""
    return flags.parse(HAPPY.defaults, argv, inactive=HAPPY.inactive if inactive else None,
                       renamed=HAPPY.renamed, adjust=HAPPY.adjust, prog=PROG)  # fmt: skip


def parse_tldr(argv):
    r = tldr.RECIPE
    return flags.parse_checked(r.defaults, argv, check=r.check, inactive=r.inactive, renamed=r.renamed,
                               adjust=r.adjust, prog="tldr")  # fmt: skip


def refused(capsys, argv, parse_fn=parse) -> str:
    """The one stderr line of a command line the parser refuses with exit code 2."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        parse_fn(argv)
    assert e.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert captured.out == ""
    return lines[0]


def write(tmp_path, name, text) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# ---------------------------------------------------------------------------------------- --config


YAML_FILE = """\
seed: 7
mesh-fsdp: 1
progress: false
sft:
  optim:
    lr: 0.001
rl:
  algo: grpo
  kl_coef: 0.1
  kl_kind: null
data:
  block_size: 24
"""
JSON_FILE = json.dumps({
    "seed": 7, "mesh_fsdp": 1, "progress": False, "sft": {"optim": {"lr": 0.001}},
    "rl": {"algo": "grpo", "kl_coef": 0.1, "kl_kind": None}, "data": {"block_size": 24},
})  # fmt: skip
FILE_PATHS = {("seed",), ("mesh_fsdp",), ("progress",), ("sft", "optim", "lr"), ("rl", "rl", "algo"),
              ("rl", "rl", "kl_coef"), ("rl", "rl", "kl_kind"), ("data", "block_size")}  # fmt: skip


@pytest.mark.parametrize("name,text", [("c.yaml", YAML_FILE), ("c.json", JSON_FILE)])
def test_config_file_sets_nested_and_flattened_fields(tmp_path, name, text):
    cfg, given = parse(["--config", write(tmp_path, name, text)])
    assert cfg.seed == 7 and cfg.mesh_fsdp == 1 and cfg.progress is False
    assert cfg.sft.optim.lr == 0.001
    assert cfg.rl.rl.algo == "grpo" and cfg.rl.rl.kl_coef == 0.1 and cfg.rl.rl.kl_kind is None
    assert cfg.data.block_size == 24
    assert cfg.rl.rl.group_size == 4  # HappyGPT's grpo setting, for a field the file left unset
    assert cfg.pretrain == HAPPY.defaults.pretrain and cfg.rm == HAPPY.defaults.rm  # untouched
    # A file entry that restates the value the rest gives (mesh_fsdp 1, kl_kind None) is not counted as
    # given: a run's recorded config must not be refused for the inactive fields it merely restates.
    assert set(given) == FILE_PATHS - {("mesh_fsdp",), ("rl", "rl", "kl_kind")}


@pytest.mark.parametrize("where", ["before", "after"])
def test_command_line_overrides_the_file_wherever_it_stands(tmp_path, where):
    """flags.py: `overrides = {**file_overrides(...), **overrides}`: the command line wins, before or
    after --config; the file's other values stay."""
    path = write(tmp_path, "c.yaml", "seed: 7\nrl:\n  kl_coef: 0.1\n  iterations: 9\n")
    cli = ["--seed", "3", "--rl.iterations=5"]
    argv = [*cli, "--config", path] if where == "before" else ["--config", path, *cli]
    cfg, given = parse(argv)
    assert (cfg.seed, cfg.rl.iterations, cfg.rl.rl.kl_coef) == (3, 5, 0.1)
    assert set(given) == {("seed",), ("rl", "iterations"), ("rl", "rl", "kl_coef")}


@pytest.mark.parametrize(
    "text,names",
    [
        ("rl:\n  kl_cof: 0.1\n", ["rl.kl_cof", "no flag"]),  # a typo
        ("nosuch: 1\n", ["nosuch", "no flag"]),
        (
            "rl:\n  rl:\n    kl_coef: 0.1\n",
            ["rl.rl.kl_coef", "no flag"],
        ),  # nested as the flags are, not the classes
        ("pretrain:\n  warmup_steps: 5\n", ["pretrain.warmup_steps", "no flag"]),  # a renamed flag's old key
        ("rl:\n  iterations: 2.5\n", ["rl.iterations", "whole number"]),
        ("rl:\n  iterations: true\n", ["rl.iterations", "whole number"]),
        ("progress: maybe\n", ["progress", "true or false"]),
        ("rl:\n  kl_coef: abc\n", ["rl.kl_coef", "expected a number"]),
        ("rl:\n  algo: sgd\n", ["rl.algo", f"choose one of {RL_ALGOS}"]),
        ("rl:\n  kl_coef: .nan\n", ["rl.kl_coef", "not finite"]),
        ("rl:\n  kl_coef: .inf\n", ["rl.kl_coef", "not finite"]),
        ("sft:\n  optim:\n    lr: -.inf\n", ["sft.optim.lr", "not finite"]),
        ("rl:\n  kl_coef: nan\n", ["rl.kl_coef", "not finite"]),
        ('{"rl": {"kl_coef": NaN}}', ["rl.kl_coef", "not finite"]),
        ('{"rl": {"ptx_coef": Infinity}}', ["rl.ptx_coef", "not finite"]),
        ('{"dropout": -Infinity}', ["dropout", "not finite"]),
    ],
)
def test_config_file_refusals_are_one_line_naming_file_and_key(tmp_path, capsys, text, names):
    path = write(tmp_path, "bad.yaml", text)
    line = refused(capsys, ["--config", path])
    assert line.startswith(f"{PROG}: error: --config {path}: ")
    for name in names:
        assert name in line


@pytest.mark.parametrize(
    "text,words",
    [
        ("- a\n- b\n", ["expected a mapping", "list"]),
        ("rl: {kl_coef: [\n", ["not valid YAML or JSON", "line"]),
        (None, ["No such file"]),
    ],
)
def test_unreadable_config_files_are_one_line(tmp_path, capsys, text, words):
    path = write(tmp_path, "c.yaml", text) if text is not None else str(tmp_path / "missing.yaml")
    line = refused(capsys, ["--config", path])
    assert f"--config {path}" in line
    for word in words:
        assert word in line


def test_a_config_class_refusal_is_spelled_as_the_flag_from_a_file_too(tmp_path, capsys):
    """DataConfig refuses block_size=1; the line names the flag and the value, wherever it came from."""
    line = refused(capsys, ["--config", write(tmp_path, "c.json", '{"data": {"block_size": 1}}')])
    assert "--data.block_size 1;" in line and "use >= 2" in line
    assert "--data.block_size 1;" in refused(capsys, ["--data.block_size", "1"])
    assert refused(capsys, ["--rl.kl_coef=-1"]) == f"{PROG}: error: --rl.kl_coef -1.0; it must be >= 0"


def test_a_list_for_a_string_field_is_refused(tmp_path, capsys):
    line = refused(capsys, ["--config", write(tmp_path, "c.yaml", "out: [runs/a, runs/b]\n")])
    assert "out" in line


# ------------------------------------------------------------------------------ flags and --help


def test_flattened_rl_flags_reach_the_rl_config():
    cfg, given = parse(["--rl.algo", "grpo", "--rl.kl_coef", "0.1", "--rl.iterations=3"])
    assert cfg.rl.rl.algo == "grpo" and cfg.rl.rl.kl_coef == 0.1 and cfg.rl.iterations == 3
    assert (
        cfg.rl.rl.group_size == 4 and cfg.rl.rl.epochs == 1
    )  # the algorithm's settings (happy.ALGO_SETTINGS)
    assert given == [("rl", "rl", "algo"), ("rl", "rl", "kl_coef"), ("rl", "iterations")]


def test_the_class_nesting_is_not_a_flag(capsys):
    line = refused(capsys, ["--rl.rl.kl_coef", "0.1"])
    assert "unrecognized arguments: --rl.rl.kl_coef" in line


@pytest.mark.parametrize(
    "flag,value,choices",
    [
        ("--rl.algo", "sgd", RL_ALGOS),
        ("--reward", "magic", "vader, learned"),
        ("--rl.kl_kind", "k4", "k1, k2, k3"),  # Literal[...] | None
        ("--rl.value_from", "critic", "reward_model, policy"),
        ("--rl.algo", "PPO", RL_ALGOS),  # choices are case-sensitive
    ],
)
def test_literal_flags_refuse_other_values(capsys, flag, value, choices):
    line = refused(capsys, [flag, value])
    assert line == f"{PROG}: error: argument {flag}: {value!r}; choose one of {choices}"


def test_optional_literal_takes_none():
    cfg, _ = parse(["--rl.kl_kind", "none"])
    assert cfg.rl.rl.kl_kind is None


def test_help_starts_with_a_short_usage_line_and_lists_choices(capsys):
    with pytest.raises(SystemExit) as e:
        parse(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    first = out.splitlines()[0]
    assert first == f"usage: {PROG} [--config FILE] [--FLAG VALUE ...]"
    text = " ".join(out.split())  # argparse wraps help to the terminal's width
    assert f"[choices: {RL_ALGOS}] (default: 'ppo')" in text
    assert "[choices: vader, learned] (default: 'vader')" in text
    for flag in ("--config FILE", "--rl.kl_coef", "--pretrain.optim.lr", "--mesh-fsdp", "--mesh_fsdp",
                 "--data.block_size", "--tensorboard [BOOL]", "--wandb"):  # fmt: skip
        assert flag in text, flag


def test_bool_flags_alone_mean_true_and_take_words():
    cfg, given = parse(["--resume", "--progress", "off", "--tensorboard=no", "--bf16", "YES"])
    assert (cfg.resume, cfg.progress, cfg.tensorboard, cfg.bf16) == (True, False, False, True)
    assert given == [("resume",), ("progress",), ("tensorboard",), ("bf16",)]


# ------------------------------------------------------------------------------ non-finite floats


def _is_float(annotation) -> bool:
    return annotation is float or set(typing.get_args(annotation)) == {float, type(None)}


FLOAT_FLAGS = [flags.flag_names(leaf.flag_path)[0] for leaf in flags.leaves(type(HAPPY.defaults))
               if _is_float(leaf.annotation)]  # fmt: skip


def test_the_float_flags_found_include_the_known_ones():
    """The walk over `flags.leaves` below covers float fields of every section (guards the walk itself)."""
    assert len(FLOAT_FLAGS) > 30
    for flag in ("--dropout", "--pretrain.optim.lr", "--sft.optim.muon_lr", "--rl.kl_coef", "--rl.top_p",
                 "--rl.gamma", "--rl.value_lr", "--rm.optim.grad_clip"):  # fmt: skip
        assert flag in FLOAT_FLAGS


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN", "Infinity"])
@pytest.mark.parametrize("flag", FLOAT_FLAGS)
def test_every_float_flag_refuses_non_finite_values(capsys, flag, value):
    line = refused(capsys, [f"{flag}={value}"])
    assert line == f"{PROG}: error: argument {flag}: {value!r} is not finite; use a finite number"


def test_a_spaced_negative_infinity_is_refused_too(capsys):
    """`--rl.kl_coef -inf` (a space, not `=`) reaches the flag's own check (argparse alone would take
    `-inf` for an option): one line, exit 2."""
    assert (
        refused(capsys, ["--rl.kl_coef", "-inf"])
        == f"{PROG}: error: argument --rl.kl_coef: '-inf' is not finite; use a finite number"
    )


def test_a_spaced_negative_exponent_is_a_value():
    cfg, _ = parse(["--rl.no_eos_penalty", "-1e-1"])
    assert cfg.rl.rl.no_eos_penalty == -0.1


# ---------------------------------------------------------------------------------------- renamed


@pytest.mark.parametrize(
    "argv,new",
    [
        (["--pretrain.warmup_steps", "3"], "--pretrain.optim.warmup_steps"),
        (["--pretrain.warmup_steps=3"], "--pretrain.optim.warmup_steps"),
        (["--seed", "1", "--algo", "grpo"], "--rl.algo"),
        (["--fsdp", "2"], "--mesh-fsdp"),
        (["--rl.iters", "3"], "--rl.iterations"),
        (["--rl.lr", "0.1"], "--rl.optim.lr"),
        (["--quiet"], "--progress false"),
    ],
)
def test_happy_renamed_flags_name_their_successor(capsys, argv, new):
    old = next(a for a in argv if a.split("=")[0] in HAPPY.renamed).split("=")[0]
    assert refused(capsys, argv) == f"{PROG}: error: {old} is now {new}"


@pytest.mark.parametrize(
    "argv,new",
    [
        (["--ppo.kl_coef", "0.1"], "--rl.kl_coef"),
        (["--ppo.rl.kl_coef=0.1"], "--rl.kl_coef"),  # the longest prefix applies
        (["--ppo.iterations", "3"], "--rl.iterations"),
        (["--mesh_fsdp", "1"], "--mesh-fsdp"),
    ],
)
def test_tldr_renamed_prefixes_name_their_successor(capsys, argv, new):
    old = argv[0].split("=")[0]
    assert refused(capsys, argv, parse_tldr) == f"tldr: error: {old} is now {new}"


def test_the_new_spellings_work():
    cfg, _ = parse(["--pretrain.optim.warmup_steps", "3", "--mesh-fsdp", "1", "--rl.iterations", "4"])
    assert (cfg.pretrain.optim.warmup_steps, cfg.mesh_fsdp, cfg.rl.iterations) == (3, 1, 4)
    cfg = parse_tldr(["--rl.kl_coef", "0.25", "--rl.iterations", "3"])
    assert (cfg.rl.rl.kl_coef, cfg.rl.iterations) == (0.25, 3)


# A value the successor of each of HappyGPT's renamed flags takes, by its field's name (types as in the
# source: OptimConfig, RLConfig, DataConfig, RecipeConfig).
SUCCESSOR_VALUES = {
    "mesh-fsdp": "1", "data_dir": "some/dir", "progress": "false", "algo": "rloo", "block_size": "16",
    "iterations": "3", "group_size": "4", "beta": "0.2", "lr": "0.002", "optimizer": "adamw",
    "muon_lr": "0.01", "warmup_steps": "3", "weight_decay": "0.2", "min_lr_ratio": "0.2",
}  # fmt: skip


@pytest.mark.parametrize("old,new", sorted(HAPPY.renamed.items()))
def test_every_happy_successor_is_a_flag_and_the_old_one_is_not(capsys, old, new):
    flag = new.split()[0]
    value = new.split()[1] if " " in new else SUCCESSOR_VALUES[flag.split(".")[-1].lstrip("-")]
    extra = []
    if flag == "--rl.group_size":
        extra = ["--rl.algo", "grpo"]  # RLConfig: ppo takes no groups
    elif flag.endswith(".muon_lr"):
        extra = [flag.replace("muon_lr", "optimizer"), "muon"]  # OptimConfig: adamw takes no muon_lr
    cfg, given = parse([*extra, flag, value], inactive=False)
    assert len(given) == 1 + bool(extra) and flags.flag_of(type(cfg), given[-1]) == flag
    got = cfg
    for name in given[-1]:
        got = getattr(got, name)
    assert str(got).lower() == value.lower() or got == float(value)
    refused(capsys, [old, value])


# --------------------------------------------------------------------------- round trip and given


ROUND_TRIP_ARGV = ["--quick", "--rl.algo", "grpo", "--seed", "5", "--data.data_dir", "some/dir",
                   "--rl.kl_kind", "k2", "--rl.no_eos_penalty=-1.5", "--progress", "false"]  # fmt: skip


def _as_flags(node: dict, prefix: str = "") -> list[str]:
    """A config_json dict as `--path=value` flags (top-level names dashed, None as "none")."""
    out = []
    for key, value in node.items():
        name = f"{prefix}.{key}" if prefix else key.replace("_", "-")
        if isinstance(value, dict):
            out += _as_flags(value, name)
        else:
            text = "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
            out.append(f"--{name}={text}")
    return out


def test_config_json_is_nested_as_the_flags_are():
    cfg, _ = parse(ROUND_TRIP_ARGV)
    record = flags.config_json(cfg)
    assert json.loads(json.dumps(record)) == record
    assert record["seed"] == 5 and record["quick"] is True and record["data"]["data_dir"] == "some/dir"
    assert record["rl"]["algo"] == "grpo" and record["rl"]["group_size"] == 4  # RLConfig flattened
    assert record["rl"]["kl_kind"] == "k2" and record["rl"]["no_eos_penalty"] == -1.5
    assert "rl" not in record["rl"]
    assert (
        record["pretrain"]["steps"] == 40 and record["pretrain"]["optim"]["optimizer"] == "adamw"
    )  # --quick's
    assert record["mesh_fsdp"] == 1 and record["rl"]["kl_target"] is None


def test_config_json_round_trips_through_a_file_and_through_flags(tmp_path):
    cfg, _ = parse(ROUND_TRIP_ARGV)
    assert cfg != HAPPY.defaults
    path = write(tmp_path, "run.json", json.dumps(flags.config_json(cfg)))
    again, given = parse(["--config", path], inactive=False)
    assert again == cfg
    # Given: the entries that change the config (a restated default is not), here what ROUND_TRIP_ARGV set.
    assert set(given) <= {leaf.path for leaf in flags.leaves(type(cfg))}
    assert all(flags.value_at(cfg, p) != flags.value_at(HAPPY.defaults, p) for p in given if p != ("quick",))
    from_flags, _ = parse(_as_flags(flags.config_json(cfg)), inactive=False)
    assert from_flags == cfg


def test_a_recorded_run_config_is_accepted_by_its_own_command(tmp_path):
    """run.json's "flags" (flags.config_json) fed back as --config to the same command."""
    cfg, _ = parse(["--rl.algo", "grpo"])
    path = write(tmp_path, "run.json", json.dumps(flags.config_json(cfg)))
    assert parse(["--config", path])[0] == cfg


def test_spell_as_flags_rewrites_field_messages():
    cls = type(HAPPY.defaults)
    assert flags.spell_as_flags("kl_coef=-1; use >= 0 and top_k=3", cls, ("rl",)) == (
        "--rl.kl_coef -1; use >= 0 and --rl.top_k 3"
    )
    assert flags.spell_as_flags("mesh_fsdp=0; it must be >= 1", cls) == "--mesh-fsdp 0; it must be >= 1"
    assert flags.spell_as_flags("lr=nan; x", cls, ("sft", "optim")) == "--sft.optim.lr nan; x"
    assert flags.spell_as_flags("no field here", cls, ("rl",)) == "no field here"


@pytest.mark.parametrize(
    "argv,paths",
    [
        ([], set()),
        (["--quick"], {("quick",)}),  # --quick's settings are not "given"
        (["--mesh_fsdp", "1", "--rl.top_k=5"], {("mesh_fsdp",), ("rl", "top_k")}),
        (["--rl.algo", "rebel"], {("rl", "rl", "algo")}),  # nor are the algorithm's
        (
            ["--data.data_dir", "none", "--sft.optim.lr", "0.01"],
            {("data", "data_dir"), ("sft", "optim", "lr")},
        ),
        (["--seed", "1", "--seed", "2"], {("seed",)}),  # the last wins
    ],
)
def test_given_holds_exactly_the_paths_the_user_gave(argv, paths):
    cfg, given = parse(argv)
    assert set(given) == paths and len(given) == len(paths)
    if argv[-2:] == ["--seed", "2"]:
        assert cfg.seed == 2


def test_given_merges_file_and_command_line(tmp_path):
    path = write(tmp_path, "c.yaml", "quick: true\nrl:\n  kl_coef: 0.1\n")
    cfg, given = parse(["--config", path, "--rl.kl_coef", "0.2", "--seed=4"])
    assert cfg.rl.rl.kl_coef == 0.2 and cfg.quick and cfg.pretrain.steps == 40  # --quick from the file acts
    assert set(given) == {("quick",), ("rl", "rl", "kl_coef"), ("seed",)} and len(given) == 3


def test_refused_inactive_flags_name_the_flag(capsys):
    line = refused(capsys, ["--rl.algo", "pg", "--rl.lam=0.9"])
    assert re.fullmatch(rf"{PROG}: error: --rl\.lam does nothing under --rl\.algo pg: drop it", line)
