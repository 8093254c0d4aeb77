"""Frozen config dataclasses <-> command-line flags and config files: the one parser of every entry point.

A nested dataclass field becomes a dotted prefix: `TldrConfig.sft.optim.lr` is `--sft.optim.lr`. A field
declared with `metadata=FLATTEN` lends its fields to its parent's prefix: the RL stage's `rl: RLConfig` is
`--rl.kl_coef`, not `--rl.rl.kl_coef`. Top-level fields use dashes (`mesh_fsdp` is `--mesh-fsdp`;
`--mesh_fsdp` works too). The help text of a flag is the field's line in its class's `Attributes:`
docstring, its choices (a `Literal` annotation) and its default, so `--help` lists every field with its
meaning. Values parse by the annotation: int, float (finite only), str, bool (`--resume` alone means
true), `Literal[...]` and `X | None` ("none" means None).

`--config FILE` reads the same fields from YAML or JSON, nested as the flags are
({"rl": {"kl_coef": 0.1}, "mesh_fsdp": 2}); flags given on the command line override it, and every
value goes through the same parser and checks as a flag. A refused value is one line on stderr (exit 2)
naming the flag (or the file and key): a config's `field=value; fix` error becomes
`--path.field value; fix`. A flag an entry point renamed is refused with one line naming its new
spelling (`renamed`).

Why our own ~300 lines and not draccus (levanter's), tyro or simple_parsing: every error must be one
line naming the flag and the fix (theirs print the whole usage or a traceback), flags must be refused
when they do nothing for the chosen algorithm (`inactive`), renamed ones must name their successor, and
the package set is fixed (none of them is a dependency of jax, flax, optax, orbax or tfds).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import os
import re
import sys
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

FLATTEN = types.MappingProxyType({"flatten": True})  # field metadata: the nested config's flags lose a level
_FIELD_MESSAGE = re.compile(r"^(\w+)=(.*)$", re.DOTALL)


def flag_message(message: str, cls: type, flag: Callable[[str], str]) -> str:
    """A config error as its command-line flag says it.

    Configs word an error about one field as `field=value; what to do`; for a field of the dataclass `cls`
    this becomes `--flag value; what to do`, with `flag(field)` the flag's spelling (e.g. "--rl.top_k").
    Other messages are returned as they are.
    """
    match = _FIELD_MESSAGE.match(message)
    if match and match[1] in {f.name for f in dataclasses.fields(cls)}:
        return f"{flag(match[1])} {match[2]}"
    return message


def parse_bool(text: str) -> bool:
    """A boolean flag value: 1/true/yes/on or 0/false/no/off (any case); anything else is refused."""
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def parse_float(text: str) -> float:
    """A float flag value; inf and nan are refused (no config field means them)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not finite; use a finite number")
    return value


def parse_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def choices(annotation) -> tuple | None:
    """The values of a `Literal[...]` annotation (or of `Literal[...] | None`), else None."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (types.UnionType, typing.Union):
        inner = [a for a in args if a is not type(None)]
        return choices(inner[0]) if len(inner) == 1 else None
    return args if typing.get_origin(annotation) is typing.Literal else None


def flag_parser(annotation) -> Callable[[str], object]:
    """The command-line parser of a config field's annotation: int, float (finite), str, bool
    (`parse_bool`), `Literal[...]` (one of its values), or `X | None` ("none" / "null" give None)."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (types.UnionType, typing.Union) and type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        parse = flag_parser(inner)
        return lambda text: None if text.strip().lower() in ("none", "null") else parse(text)
    if typing.get_origin(annotation) is typing.Literal:
        allowed = [str(a) for a in args]

        def one_of(text: str):
            if text not in allowed:
                raise argparse.ArgumentTypeError(f"{text!r}; choose one of {', '.join(allowed)}")
            return args[allowed.index(text)]

        return one_of
    parsers = {bool: parse_bool, int: parse_int, float: parse_float, str: str}
    if annotation in parsers:
        return parsers[annotation]
    raise TypeError(f"no flag parser for annotation {annotation!r}")


_ATTRIBUTE_LINE = re.compile(r"^  (\w+(?:, \w+)*):\s?(.*)$")  # "  name: text" or "  a, b: text"


def attribute_docs(cls: type) -> dict[str, str]:
    """Field name -> its description in the `Attributes:` sections of the docstrings of `cls` and its
    bases (a subclass's line wins)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        docs.update(_own_attribute_docs(klass))
    return docs


def _own_attribute_docs(cls: type) -> dict[str, str]:
    doc = cls.__doc__ or ""
    if "Attributes:" not in doc:
        return {}
    doc = inspect.cleandoc(doc)
    docs: dict[str, str] = {}
    names: list[str] = []
    for line in doc.split("Attributes:", 1)[1].splitlines():
        match = _ATTRIBUTE_LINE.match(line)
        if match:
            names = [n.strip() for n in match[1].split(",")]
            for name in names:
                docs[name] = match[2].strip()
        elif line.startswith("    ") and names:  # a continuation line
            for name in names:
                docs[name] += " " + line.strip()
        elif line.strip():
            names = []
    return docs


@dataclasses.dataclass(frozen=True)
class Leaf:
    """A leaf field of a config class: where it lives (`path`), how its flag is spelled (`flag_path`:
    `path` without the names of flattened fields), its annotation and the class that declares it."""

    path: tuple[str, ...]
    flag_path: tuple[str, ...]
    field: dataclasses.Field
    annotation: Any
    owner: type


def leaves(cls: type, path: tuple[str, ...] = (), flag_path: tuple[str, ...] = ()) -> list[Leaf]:
    """Every non-dataclass field of a config class, depth first."""
    hints = typing.get_type_hints(cls)
    out = []
    for field in dataclasses.fields(cls):
        annotation = hints[field.name]
        if dataclasses.is_dataclass(annotation):
            inner = flag_path if field.metadata.get("flatten") else (*flag_path, field.name)
            out += leaves(annotation, (*path, field.name), inner)
        else:
            out.append(Leaf((*path, field.name), (*flag_path, field.name), field, annotation, cls))
    names = [leaf.flag_path for leaf in out]
    clash = {n for n in names if names.count(n) > 1}
    if clash:
        raise TypeError(f"{cls.__name__}: flattened fields collide on {sorted(clash)}")
    return out


def leaf_paths(config_cls: type) -> list[tuple[str, ...]]:
    """Every leaf field path of a config class (what `--help` must list)."""
    return [leaf.path for leaf in leaves(config_cls)]


def value_at(config: Any, path: tuple[str, ...]) -> Any:
    """The value of the field at `path` of a config (e.g. ("rl", "rl", "kl_coef"))."""
    return _get(config, path)


def _get(config: Any, path: tuple[str, ...]) -> Any:
    for name in path:
        config = getattr(config, name)
    return config


def flag_names(flag_path: tuple[str, ...]) -> list[str]:
    """The flag spellings of a field: `--mesh-fsdp` + `--mesh_fsdp`, or `--rl.kl_coef`."""
    if len(flag_path) == 1:
        dashed = "--" + flag_path[0].replace("_", "-")
        return [dashed] if "_" not in flag_path[0] else [dashed, "--" + flag_path[0]]
    return ["--" + ".".join(flag_path)]


def flag_of(config_cls: type, path: tuple[str, ...]) -> str:
    """The flag of the field at config `path` (e.g. ("rl", "rl", "kl_coef") -> "--rl.kl_coef")."""
    for leaf in leaves(config_cls):
        if leaf.path == tuple(path):
            return flag_names(leaf.flag_path)[0]
    raise KeyError(path)


def _help(leaf: Leaf, docs: str, default) -> str:
    allowed = choices(leaf.annotation)
    parts = [docs] if docs else []
    if allowed:
        parts.append(f"[choices: {', '.join(map(str, allowed))}]")
    parts.append(f"(default: {default!r})")
    return " ".join(parts).replace("%", "%%")


def add_config_flags(parser: argparse.ArgumentParser, defaults: Any) -> None:
    """One flag per leaf field of the dataclass instance `defaults`, showing its meaning and default."""
    docs_by_class: dict[type, dict[str, str]] = {}
    for leaf in leaves(type(defaults)):
        docs = docs_by_class.setdefault(leaf.owner, attribute_docs(leaf.owner))
        is_bool = leaf.annotation is bool
        parser.add_argument(
            *flag_names(leaf.flag_path),
            dest=".".join(leaf.path),
            type=flag_parser(leaf.annotation),
            default=argparse.SUPPRESS,  # only flags given on the command line override the defaults
            nargs="?" if is_bool else None,
            const=True if is_bool else None,
            metavar="BOOL" if is_bool else leaf.field.name.upper(),
            help=_help(leaf, docs.get(leaf.field.name, ""), _get(defaults, leaf.path)),
        )


def replace_paths(config: Any, overrides: dict[tuple[str, ...], Any], prefix: tuple[str, ...] = (),
                  root: type | None = None) -> Any:  # fmt: skip
    """`config` with every field at a path set, each dataclass rebuilt once with all of its new values:
    fields that are validated together (e.g. rl.algo and rl.group_size) never meet half-set. A config's
    `field=value; fix` ValueError is re-raised with every `field=value` of it (or of a flattened child)
    spelled as its flag, `--path.field value` (`prefix`: the path of `config`)."""
    root = root or type(config)
    changes = {path[0]: value for path, value in overrides.items() if len(path) == 1}
    for head in sorted({path[0] for path in overrides if len(path) > 1}):
        sub = {path[1:]: value for path, value in overrides.items() if len(path) > 1 and path[0] == head}
        changes[head] = replace_paths(getattr(config, head), sub, (*prefix, head), root)
    try:
        return dataclasses.replace(config, **changes)
    except ValueError as err:
        raise ValueError(spell_as_flags(str(err), root, prefix)) from None


def spell_as_flags(message: str, root: type, prefix: tuple[str, ...] = ()) -> str:
    """`message` with each `name=value` of a field of the config at `prefix` (its own fields and those of
    its flattened children) written as its flag, `--flag value`."""
    by_name = {}
    for leaf in leaves(root):
        rest = leaf.path[len(prefix) :]
        if leaf.path[: len(prefix)] != prefix or not rest:
            continue
        if len(rest) == 1 or (len(rest) == 2 and _flattened(root, (*prefix, rest[0]))):
            by_name.setdefault(rest[-1], flag_names(leaf.flag_path)[0])
    if not by_name:
        return message
    pattern = re.compile(r"(?<![\w.-])(" + "|".join(map(re.escape, by_name)) + r")=")
    return pattern.sub(lambda m: f"{by_name[m[1]]} ", message)


def _flattened(root: type, path: tuple[str, ...]) -> bool:
    cls = root
    for name in path[:-1]:
        cls = typing.get_type_hints(cls)[name]
    field = {f.name: f for f in dataclasses.fields(cls)}[path[-1]]
    return bool(field.metadata.get("flatten"))


class OneLineParser(argparse.ArgumentParser):
    """Errors as one line on stderr (exit 2): the usage of ~90 flags would bury them; --help lists them."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def make_parser(defaults: Any, *, description: str = "", prog: str | None = None) -> argparse.ArgumentParser:
    """A one-line-error parser with `--config FILE` and a flag per leaf field of the dataclass `defaults`."""
    parser = OneLineParser(
        prog=prog,
        usage="%(prog)s [--config FILE] [--FLAG VALUE ...]",
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config", metavar="FILE", default=None,
        help="a YAML or JSON file of these flags' values, nested as the flags are "
        "({'rl': {'kl_coef': 0.1}}); flags on the command line override it",
    )  # fmt: skip
    add_config_flags(parser, defaults)
    return parser


def _load_file(path: str) -> Mapping:
    """A config file's mapping (YAML, or JSON, which YAML reads too); one line naming the file if bad."""
    import yaml  # PyYAML: a dependency of orbax / tfds / flax

    try:
        with open(os.path.expanduser(path), encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as err:
        raise ValueError(f"--config {path}: {err.strerror or err}") from None
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        at = f" at line {where.line + 1} column {where.column + 1}" if where else ""
        raise ValueError(f"--config {path}: not valid YAML or JSON{at}") from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ValueError(
            f"--config {path}: expected a mapping of flag names to values, found {type(data).__name__}"
        )
    return data


def file_overrides(
    defaults: Any, path: str, renamed: Mapping[str, str] | None = None
) -> dict[tuple[str, ...], Any]:
    """config path -> value of every entry of a config file, each parsed as its flag would be.

    Raises:
      ValueError: one line naming the file and the key: an unknown key (a renamed one with its new name),
        a list where the flag takes one value, or a value its flag refuses.
    """
    by_flag = {leaf.flag_path: leaf for leaf in leaves(type(defaults))}
    out = {}

    def walk(node: Mapping, prefix: tuple[str, ...]):
        for key, value in node.items():
            name = str(key).replace("-", "_") if not prefix else str(key)
            here = (*prefix, name)
            if isinstance(value, Mapping):
                walk(value, here)
                continue
            leaf = by_flag.get(here)
            if leaf is None:
                new = _renamed_to("--" + ".".join(here), renamed or {})
                hint = f"; it is now {new}" if new else " (see --help)"
                raise ValueError(f"--config {path}: {'.'.join(here)!r} is no flag of this command{hint}")
            if isinstance(value, list | tuple | set):
                raise ValueError(
                    f"--config {path}: {'.'.join(here)}: {value!r} is a list; the flag takes one value"
                )
            text = (
                "none" if value is None else (str(value).lower() if isinstance(value, bool) else str(value))
            )
            try:
                out[leaf.path] = flag_parser(leaf.annotation)(text)
            except (argparse.ArgumentTypeError, ValueError) as err:
                raise ValueError(f"--config {path}: {'.'.join(here)}: {err}") from None

    walk(_load_file(path), ())
    return out


def _renamed_to(name: str, renamed: Mapping[str, str]) -> str | None:
    """The new spelling of flag `name` if an entry point renamed it (a key ending in "." is a prefix, the
    longest matching one applies: {"--ppo.rl.": "--rl.", "--ppo.": "--rl."} gives `--rl.kl_coef` for
    `--ppo.rl.kl_coef` and `--rl.iterations` for `--ppo.iterations`), else None."""
    if name in renamed:
        return renamed[name]
    for old in sorted((k for k in renamed if k.endswith(".")), key=len, reverse=True):
        if name.startswith(old):
            return renamed[old] + name[len(old) :]
    return None


def _refuse_renamed(parser: argparse.ArgumentParser, argv: Sequence[str], renamed: Mapping[str, str]) -> None:
    """Exit 2 with one line for the first flag of `argv` an entry point renamed."""
    for token in argv:
        name = str(token).split("=", 1)[0]
        new = _renamed_to(name, renamed) if name.startswith("--") else None
        if new is not None:
            parser.error(f"{name} is now {new}")


def parse_checked(defaults: Any, argv: Sequence[str] | None = None, **kwargs) -> Any:
    """`parse`'s config alone."""
    return parse(defaults, argv, **kwargs)[0]


def parse(
    defaults: Any,
    argv: Sequence[str] | None = None,
    *,
    check: Callable[[Any], None] | None = None,
    inactive: Callable[[Any, list[tuple[str, ...]]], str] | None = None,
    renamed: Mapping[str, str] | None = None,
    adjust: Callable[[dict], dict] | None = None,
    description: str = "",
    prog: str | None = None,
) -> Any:
    """Parse `--config FILE` and flags into a copy of `defaults`, then meet the checks a config cannot
    make alone.

    Args:
      defaults: the dataclass instance the file and flags override.
      argv: the command line (None: sys.argv[1:]).
      check: cfg -> None, raising a one-line ValueError (e.g. the model the flags make).
      inactive: (cfg, the field paths the file and command line set, in order) -> "" or a one-line error
        naming the flags that would do nothing with the rest of the config.
      renamed: old flag -> its new spelling (a key ending in "." renames a prefix); given, it is refused.
      adjust: overrides -> overrides: adds defaults that depend on other values (config path -> value)
        for paths not given; the given paths stay what the user set.
      description, prog: of `--help`.

    Returns:
      (the config, the field paths the file and the command line set).

    Raises:
      SystemExit: exit 2 with one line on stderr for a bad value or a refused combination.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = make_parser(defaults, description=description, prog=prog)
    _refuse_renamed(parser, argv, renamed or {})
    namespace = vars(parser.parse_args(_joined_negative_values(argv)))
    config_file = namespace.pop("config")
    overrides = {tuple(dest.split(".")): value for dest, value in namespace.items()}
    cli = set(overrides)
    try:
        from_file = file_overrides(defaults, config_file, renamed) if config_file else {}
        overrides = {**from_file, **overrides}
        cfg = replace_paths(defaults, adjust(dict(overrides)) if adjust is not None else overrides)
        # A file entry counts as given where it changes the config: a run's recorded config (every field,
        # `config_json`) is then not refused for the inactive fields it merely restates.
        given = [
            p for p in overrides if p not in from_file or p in cli or _changes(defaults, overrides, p, adjust)
        ]
        if check is not None:
            check(cfg)
    except (TypeError, ValueError) as err:
        parser.error(str(err))
    message = inactive(cfg, given) if inactive is not None else ""
    if message:
        parser.error(message)
    return cfg, given


def _changes(defaults: Any, overrides: dict, path: tuple[str, ...], adjust) -> bool:
    """Whether the entry `path` of `overrides` gives the config another value than the rest would."""
    rest = {p: v for p, v in overrides.items() if p != path}
    try:
        without = replace_paths(defaults, adjust(dict(rest)) if adjust is not None else rest)
    except (TypeError, ValueError):
        return True
    return _get(without, path) != overrides[path]


_NEGATIVE_VALUE = re.compile(r"^-(\d|\.\d|inf|nan)", re.IGNORECASE)


def _joined_negative_values(argv: Sequence[str]) -> list[str]:
    """`--flag -1e-3` / `--flag -inf` as `--flag=-1e-3`: argparse takes only plain negative numbers such as
    -1 or -0.5 for values, anything else starting with "-" for an option."""
    out, argv = [], list(argv)
    i = 0
    while i < len(argv):
        token = str(argv[i])
        if (
            token.startswith("--")
            and "=" not in token
            and i + 1 < len(argv)
            and _NEGATIVE_VALUE.match(str(argv[i + 1]))
        ):
            out.append(f"{token}={argv[i + 1]}")
            i += 2
            continue
        out.append(token)
        i += 1
    return out


def config_json(cfg: Any) -> dict:
    """A config as the JSON a `--config` file may hold (nested as the flags are), e.g. to record a run's
    flags beside its outputs."""
    out: dict = {}
    for leaf in leaves(type(cfg)):
        node = out
        for name in leaf.flag_path[:-1]:
            node = node.setdefault(name, {})
        node[leaf.flag_path[-1]] = _get(cfg, leaf.path)
    return json.loads(json.dumps(out))
