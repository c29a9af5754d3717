"""The `trl-appo` command: `train`, `eval`, `inspect`, `demo`, `recipes`.

    trl-appo train --config cpu/demo.yaml [--field value ...]          # a path or a shipped recipe name
    trl-appo eval --model PATH --dataset PATH [--k 4 --n 8 --protocol tags --tools python,search]
    trl-appo inspect OUTPUT_DIR [--step S] [--html out.html] [--png out.png]
    trl-appo demo [--quick] [--part a|b|all]                           # offline CPU demo (see trl_appo.demo)
    trl-appo recipes [--copy DIR]                                      # list / copy the shipped recipe YAMLs

One module per subcommand (`train.py`, `eval.py`, `inspect.py`, `demo.py`, `recipes.py`), each declaring its flags
as one `@dataclass` with `field(metadata={"help": ...})` and a `run(args, rest)`; `_args.py` turns every one of
them into argparse the same way (HfArgumentParser's rules: `--field_name` and `--field-name`, one-line errors).
`train`'s other flags are training fields, parsed by TRL's `TrlParser` in `trl_appo.scripts` (the wiring
`recipes/train_appo.py` also uses); the recipes ship inside the package, so the command works from any directory.
`--help` and docs/cli.md (`scripts/gen_cli_docs.py`) are generated from the fields. Heavy imports (torch, TRL)
happen inside `run`, so `--help` is instant.

Exit codes: 0 success, 2 bad input (one line on stderr naming the fix), 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import sys

from trl_appo.cli import demo, eval, inspect, recipes, train  # noqa: A004 - subcommand modules, named as the commands
from trl_appo.cli._args import EXIT_BAD_INPUT, ArgParser, BadInput, command_parser, from_namespace, one_line
from trl_appo.cli.eval import EVAL_MAX_COMPLETION_LENGTH
from trl_appo.cli.train import train_script_main

__all__ = ["COMMANDS", "EVAL_MAX_COMPLETION_LENGTH", "EXIT_BAD_INPUT", "BadInput", "build_parser", "main",
           "train_script_main"]

COMMANDS = {m.NAME: m for m in (train, eval, inspect, demo, recipes)}
"""Subcommand name -> its module (NAME, SUMMARY, USAGE, TAKES_REST, FLAGS: its flags dataclass, run)."""


def build_parser() -> argparse.ArgumentParser:
    parser = ArgParser(
        prog="trl-appo",
        description="APPO (Agentic Procedural Policy Optimization) for TRL: train, evaluate, inspect branch points.",
    )
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}", parser_class=ArgParser)
    sub.required = True
    for name, module in COMMANDS.items():
        command_parser(module.FLAGS, prog=f"trl-appo {name}", usage=module.USAGE,
                       epilog=module.epilog() if hasattr(module, "epilog") else None,
                       subparsers=sub, name=name, summary=module.SUMMARY)
    return parser


def _underscore_to_dash(argv: list[str]) -> list[str]:
    """`--output_dir X` -> `--output-dir X`. Kept for callers of the old API: every subcommand now takes both
    spellings itself (`trl_appo.cli._args.flag_names`)."""
    out = []
    for token in argv:
        if token.startswith("--") and "_" in token:
            flag, eq, value = token.partition("=")
            token = flag.replace("_", "-") + eq + value
        out.append(token)
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point of `trl-appo`; returns the exit code (also when called from tests)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = "trl-appo"
    try:
        try:
            namespace, rest = build_parser().parse_known_args(argv)
        except SystemExit as e:  # --help
            return int(e.code or 0)
        command = f"trl-appo {namespace.command}"
        module = COMMANDS[namespace.command]
        if rest and not module.TAKES_REST:
            raise BadInput(f"unrecognized arguments: {' '.join(rest)} (see `{command} --help`)")
        args = from_namespace(module.FLAGS, namespace)
        return module.run(args, rest)
    except SystemExit as e:
        return int(e.code or 0) if isinstance(e.code, int) or e.code is None else EXIT_BAD_INPUT
    except BadInput as e:
        print(f"{e.prog or command}: error: {one_line(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except json.JSONDecodeError as e:
        print(f"{command}: error: bad JSON input: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
