"""Frozen config dataclasses <-> command-line flags, one flag per leaf field.

A nested dataclass field becomes a dotted prefix: `TldrConfig.ppo.rl.kl_coef` is `--ppo.rl.kl_coef`.
Top-level fields use dashes (`mesh_fsdp` is `--mesh-fsdp`; `--mesh_fsdp` works too). The help text of a
flag is the field's line in its class's `Attributes:` docstring, followed by its default, so `--help`
lists every field. Values parse by the field's annotation: int, float, str, bool (`--resume` alone means
true) and `X | None` ("none" means None). A refused value is one line on stderr (exit 2) naming the flag:
a config's `field=value; fix` error becomes `--path.field value; fix`.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import typing
from collections.abc import Callable, Sequence
from typing import Any

from jaxrlhf.config import flag_message, flag_parser

_ATTRIBUTE_LINE = re.compile(r"^  (\w+(?:, \w+)*):\s?(.*)$")  # "  name: text" or "  a, b: text"


def attribute_docs(cls: type) -> dict[str, str]:
    """Field name -> its description in the class docstring's `Attributes:` section."""
    doc = inspect.getdoc(cls) or ""
    if "Attributes:" not in doc:
        return {}
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


def _value_parser(annotation: Any) -> tuple[Callable[[str], Any], bool]:
    """(parse function, is_bool) for a field annotation (jaxrlhf.config.flag_parser)."""
    return flag_parser(annotation), annotation is bool


def _leaf_fields(cls: type, prefix: tuple[str, ...] = ()):
    """(path, field, annotation, owner class) for every non-dataclass field, depth first."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        annotation = hints[field.name]
        path = (*prefix, field.name)
        if dataclasses.is_dataclass(annotation):
            yield from _leaf_fields(annotation, path)
        else:
            yield path, field, annotation, cls


def _get(config: Any, path: tuple[str, ...]) -> Any:
    """The value at a field path of a config."""
    for name in path:
        config = getattr(config, name)
    return config


def flag_names(path: tuple[str, ...]) -> list[str]:
    """The flag spellings of a field path: `--mesh-fsdp` + `--mesh_fsdp`, or `--ppo.rl.kl_coef`."""
    if len(path) == 1:
        dashed = "--" + path[0].replace("_", "-")
        return [dashed] if "_" not in path[0] else [dashed, "--" + path[0]]
    return ["--" + ".".join(path)]


def add_config_flags(parser: argparse.ArgumentParser, defaults: Any) -> None:
    """One flag per leaf field of the dataclass instance `defaults`, showing its default."""
    docs_by_class: dict[type, dict[str, str]] = {}
    for path, field, annotation, owner in _leaf_fields(type(defaults)):
        docs = docs_by_class.setdefault(owner, attribute_docs(owner))
        parse, is_bool = _value_parser(annotation)
        default = _get(defaults, path)
        help_text = f"{docs.get(field.name, '')} (default: {default!r})".strip()
        parser.add_argument(
            *flag_names(path),
            dest=".".join(path),
            type=parse,
            default=argparse.SUPPRESS,  # only flags given on the command line override the defaults
            nargs="?" if is_bool else None,
            const=True if is_bool else None,
            metavar="BOOL" if is_bool else field.name.upper(),
            help=help_text.replace("%", "%%"),
        )


def parse_config(
    defaults: Any, argv: Sequence[str] | None = None, *, description: str = "", prog: str | None = None
) -> Any:
    """Parse flags into a copy of the dataclass `defaults`; a bad value exits with a one-line error."""
    parser = make_parser(defaults, description=description, prog=prog)
    namespace = parser.parse_args(argv)
    overrides = {tuple(dest.split(".")): value for dest, value in vars(namespace).items()}
    try:
        return replace_paths(defaults, overrides)
    except (TypeError, ValueError) as err:
        parser.error(str(err))


def replace_paths(config: Any, overrides: dict[tuple[str, ...], Any], prefix: tuple[str, ...] = ()) -> Any:
    """`config` with every field at a path set, each dataclass rebuilt once with all of its new values:
    fields that are validated together (e.g. rl.algo and rl.group_size) never meet half-set. A config's
    `field=value; fix` ValueError is re-raised as `--flag value; fix` (`prefix`: the path of `config`)."""
    changes = {path[0]: value for path, value in overrides.items() if len(path) == 1}
    for head in sorted({path[0] for path in overrides if len(path) > 1}):
        sub = {path[1:]: value for path, value in overrides.items() if len(path) > 1 and path[0] == head}
        changes[head] = replace_paths(getattr(config, head), sub, (*prefix, head))
    try:
        return dataclasses.replace(config, **changes)
    except ValueError as err:
        flag = lambda name: flag_names((*prefix, name))[0]  # noqa: E731
        raise ValueError(flag_message(str(err), type(config), flag)) from None


class OneLineParser(argparse.ArgumentParser):
    """Errors as one line on stderr (exit 2): the usage of ~90 flags would bury them; --help lists them."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def make_parser(defaults: Any, *, description: str = "", prog: str | None = None) -> argparse.ArgumentParser:
    """A one-line-error parser with a flag per leaf field of the dataclass instance `defaults`."""
    parser = OneLineParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_config_flags(parser, defaults)
    return parser


def parse_checked(
    defaults: Any,
    argv: Sequence[str] | None = None,
    *,
    check: Callable[[Any], None] | None = None,
    inactive: Callable[[Any, list[tuple[str, ...]]], str] | None = None,
    description: str = "",
    prog: str | None = None,
) -> Any:
    """Parse flags into a copy of `defaults`, then meet the checks a config cannot make alone.

    Args:
      defaults: the dataclass instance the flags override.
      argv: the command line (None: sys.argv[1:]).
      check: cfg -> None, raising a one-line ValueError (e.g. the model the flags make).
      inactive: (cfg, the field paths given on the command line, in order) -> "" or a one-line error
        naming the flags that would do nothing with the rest of the config.
      description, prog: of `--help`.

    Returns:
      The config.

    Raises:
      SystemExit: exit 2 with one line on stderr for a bad value or a refused combination.
    """
    parser = make_parser(defaults, description=description, prog=prog)
    overrides = {tuple(dest.split(".")): value for dest, value in vars(parser.parse_args(argv)).items()}
    try:
        cfg = replace_paths(defaults, overrides)
        if check is not None:
            check(cfg)
    except (TypeError, ValueError) as err:
        parser.error(str(err))
    message = inactive(cfg, list(overrides)) if inactive is not None else ""
    if message:
        parser.error(message)
    return cfg


def leaf_paths(config_cls: type) -> list[tuple[str, ...]]:
    """Every leaf field path of a config class (what `--help` must list)."""
    return [path for path, *_ in _leaf_fields(config_cls)]
