"""The one way every `trl-appo` subcommand declares and parses its flags: a `@dataclass` whose fields carry
`metadata={"help": ...}`, as TRL's configs do.

`add_dataclass_arguments` follows `transformers.HfArgumentParser` (which `trl.TrlParser`, the parser of
`trl-appo train`'s training fields, builds on): `--field_name` plus the dashed spelling `--field-name`, `bool`
fields take an optional value (`--quick`, `--quick false`) and `True` ones get `--no_field`, `Literal[...]` gives
the choices, `list[X]` takes one or more values, a field without a default is required. It is written here rather
than imported because importing `transformers` costs seconds, and `trl-appo --help` / `eval --help` stay instant.
Two additions: `metadata={"positional": True}` makes a positional argument, `"metavar"` is passed to argparse.

Errors are one line: `ArgParser.error` raises `BadInput` (the CLI prints `<prog>: error: <message>` and exits 2).
Help shows each field's default after its help text; `field_rows` gives docs/cli.md the same data.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Literal

EXIT_BAD_INPUT = 2


class BadInput(Exception):
    """User error: reported as one line on stderr with exit code 2. `prog` names the command it concerns."""

    def __init__(self, message: str, prog: str | None = None):
        super().__init__(message)
        self.prog = prog


def one_line(text: Any) -> str:
    return " ".join(str(text).split())


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs as written; each option's default after its help (when it is not None/False)."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if ("%(default)" not in text and default is not None and default is not False
                and default is not argparse.SUPPRESS and action.option_strings
                and not isinstance(action, (argparse._HelpAction, argparse._StoreFalseAction))):  # noqa: SLF001
            text += " (default: %(default)s)"
        return text


class ArgParser(argparse.ArgumentParser):
    """argparse with one-line errors (`BadInput`) instead of usage + message, no abbreviated flags."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        raise BadInput(f"{message} (see `{self.prog} --help`)", prog=self.prog)


def string_to_bool(value) -> bool:
    """`--flag true/false/yes/no/1/0` (HfArgumentParser's rule)."""
    if isinstance(value, bool):
        return value
    if value.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if value.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def flag_names(name: str) -> list[str]:
    """`--max_tool_calls` and its dashed spelling `--max-tool-calls`."""
    names = [f"--{name}"]
    if "_" in name:
        names.append(f"--{name.replace('_', '-')}")
    return names


def _unwrap_optional(tp):
    """`X | None` -> X (a field that may stay unset); other types unchanged."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"only `X | None` unions are supported in CLI dataclasses, got {tp}")
        return args[0]
    return tp


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One argparse argument per field of the dataclass `cls` (see the module docstring for the rules)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        meta = dict(f.metadata)
        kwargs: dict[str, Any] = {"help": meta.pop("help", "").replace("%", "%%")}
        positional = meta.pop("positional", False)
        kwargs.update(meta)  # metavar, ...
        tp = _unwrap_optional(hints[f.name])
        default = _default(f)
        if typing.get_origin(tp) is Literal:
            kwargs["choices"] = list(typing.get_args(tp))
        elif tp is bool:
            kwargs.update(type=string_to_bool, nargs="?", const=True)
            kwargs.setdefault("metavar", "BOOL")
            default = False if default is dataclasses.MISSING else default
        elif typing.get_origin(tp) is list:
            kwargs.update(type=typing.get_args(tp)[0], nargs="+")
        else:
            kwargs["type"] = tp
        if positional:
            if default is not dataclasses.MISSING:
                kwargs.update(nargs="?", default=default)
            parser.add_argument(f.name, **kwargs)
            continue
        if default is dataclasses.MISSING:
            kwargs["required"] = True
        else:
            kwargs["default"] = default
        parser.add_argument(*flag_names(f.name), dest=f.name, **kwargs)
        if tp is bool and default is True:
            parser.add_argument(*flag_names(f"no_{f.name}"), dest=f.name, action="store_false",
                                help=f"Turn --{f.name} off.")


def add_help_last(parser: argparse.ArgumentParser) -> None:
    """`-h/--help` after the fields, so a subcommand's help lists its own first flag (train: `--config`) first."""
    parser.add_argument("-h", "--help", action="help", default=argparse.SUPPRESS, help="Show this help and exit.")


def command_parser(cls: type, prog: str, *, usage: str | None = None, epilog: str | None = None,
                   subparsers=None, name: str | None = None, summary: str | None = None) -> ArgParser:
    """The parser of one subcommand from its dataclass: standalone (`prog`), or added to `subparsers` as `name`."""
    kwargs = dict(description=description_of(cls), usage=usage, epilog=epilog, add_help=False)
    if subparsers is not None:
        parser = subparsers.add_parser(name, help=summary, **kwargs)
    else:
        parser = ArgParser(prog=prog, **kwargs)
    add_dataclass_arguments(parser, cls)
    add_help_last(parser)
    return parser


def from_namespace(cls: type, namespace: argparse.Namespace):
    """The dataclass `cls` built from the parsed namespace (its `__post_init__` checks run here)."""
    return cls(**{f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls) if f.init})


def description_of(cls: type) -> str:
    """A subcommand's description: its dataclass docstring, dedented."""
    import inspect

    return inspect.cleandoc(cls.__doc__ or "")


def field_rows(cls: type) -> list[dict[str, Any]]:
    """One row per field for the docs: flags (canonical first), type, default (or 'required'), help."""
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = _unwrap_optional(hints[f.name])
        if typing.get_origin(tp) is Literal:
            kind = " | ".join(map(str, typing.get_args(tp)))
        elif typing.get_origin(tp) is list:
            kind = f"{typing.get_args(tp)[0].__name__} ..."
        else:
            kind = tp.__name__
        default = _default(f)
        flags = [f.name.upper()] if f.metadata.get("positional") else flag_names(f.name)
        if tp is bool and default is True:
            flags += flag_names(f"no_{f.name}")
        rows.append({"name": f.name, "flags": flags, "type": kind,
                     "default": "required" if default is dataclasses.MISSING else default,
                     "help": f.metadata.get("help", "")})
    return rows
