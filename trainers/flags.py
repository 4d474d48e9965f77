"""Command-line options generated from the configuration dataclasses (STYLE rule 7).

    add_dataclass_args(parser, TrainConfig, "training")      # --steps, --lr, ... one per field
    cfg = from_args(TrainConfig, parser.parse_args())

    add_experiment_args(parser)                              # --rank, --targets, --bits, ... as overrides
    exp = replace(get_config("SADRA"), **experiment_overrides(args))

A new field is a new flag. Optional numbers take "none" (`--limit none`). Experiment
options override the named configuration's field only when given; their text forms
(module names or a regex, bit patterns, rank patterns) are read by trainers.configs, and
a value that does not parse is a ValueError naming the flag.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import re
import typing

from trainers.configs import (FIELD_FORMS, FIELD_PARSERS, FLAG_ALIASES, NOT_FLAGS, ExperimentConfig,
                              parse_optional_number)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(cls, name: str):
    """(the field's type without None, whether None is allowed)."""
    kind = typing.get_type_hints(cls)[name]
    args = typing.get_args(kind)
    if not args:
        return kind, False
    rest = [a for a in args if a is not type(None)]
    return (rest[0] if len(rest) == 1 else kind), type(None) in args


@functools.lru_cache(maxsize=None)
def field_comments(cls) -> dict[str, str]:
    """{field: its inline comment in the class source}, continuation comment lines joined: the
    dataclasses document every field where it is declared, and --help shows the same words."""
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):          # no source (a frozen build): flags keep their defaults only
        return {}
    comments: dict[str, str] = {}
    field = None
    for line in lines:
        declared = re.match(r"\s+(\w+)\s*:[^#]*?(?:#\s*(.*))?$", line)
        if declared and declared.group(1) in {f.name for f in dataclasses.fields(cls)}:
            field = declared.group(1)
            comments[field] = (declared.group(2) or "").strip()
        elif field and re.match(r"\s+#\s*(.*)$", line):
            comments[field] += " " + re.match(r"\s+#\s*(.*)$", line).group(1).strip()
        else:
            field = None
    return {k: v.replace("%", "%%") for k, v in comments.items() if v}   # argparse formats help with %


def _help(cls, name: str, tail: str, text: str = "") -> str:
    """`text` (else the field's comment in the source) followed by `tail`."""
    text = text or field_comments(cls).get(name, "")
    return f"{text} {tail}" if text else tail


def add_dataclass_args(parser: argparse.ArgumentParser, cls, title: str) -> None:
    """One `--field-name` option per dataclass field, typed from the annotation."""
    group = parser.add_argument_group(title)
    for f in dataclasses.fields(cls):
        base, optional = _base_type(cls, f.name)
        if base is bool:
            group.add_argument(_flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction, default=f.default,
                               help=_help(cls, f.name, f"(default {f.default})"))
            continue
        kind = base if base in (int, float) else str
        group.add_argument(_flag(f.name), dest=f.name, type=parse_optional_number(kind) if optional else kind,
                           default=f.default, metavar=f.name.upper(),
                           help=_help(cls, f.name, f"(default {f.default}{'; the word none gives None' if optional else ''})"))


def from_args(cls, args: argparse.Namespace):
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


EXPERIMENT_DEST = "experiment__"            # prefix of the override options' argparse names


def add_experiment_args(parser: argparse.ArgumentParser) -> None:
    """One option per ExperimentConfig field (but its name and description), each overriding the
    named configuration's value when given; read back with experiment_overrides."""
    group = parser.add_argument_group("the experiment (ExperimentConfig; given: replaces the config's value)")
    defaults = ExperimentConfig("defaults")
    for f in dataclasses.fields(ExperimentConfig):
        if f.name in NOT_FLAGS:
            continue
        flags = [_flag(f.name)] + ([FLAG_ALIASES[f.name]] if f.name in FLAG_ALIASES else [])
        form = FIELD_FORMS.get(f.name, "")       # a field with a text form is described the CLI's way
        group.add_argument(*flags, dest=EXPERIMENT_DEST + f.name, default=argparse.SUPPRESS, metavar="VALUE",
                           help=_help(ExperimentConfig, f.name, f"(default: the config's, e.g. "
                                      f"{getattr(defaults, f.name)!r}; trainers/configs.py)", form))


def experiment_overrides(args: argparse.Namespace) -> dict:
    """{field: value} of the experiment options given, parsed; ValueError naming a bad one."""
    out = {}
    for key, text in vars(args).items():
        if not key.startswith(EXPERIMENT_DEST):
            continue
        name = key[len(EXPERIMENT_DEST):]
        flag = FLAG_ALIASES.get(name, _flag(name))
        if name in FIELD_PARSERS:
            out[name] = FIELD_PARSERS[name](text)
            continue
        base, optional = _base_type(ExperimentConfig, name)
        kind = base if base in (int, float) else str
        try:
            out[name] = parse_optional_number(kind)(text) if optional else kind(text)
        except ValueError:
            raise ValueError(f"{flag}: expected {'an integer' if kind is int else 'a number'}"
                             f"{' or none' if optional else ''}, got {text!r}") from None
    return out
