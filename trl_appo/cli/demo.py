"""`trl-appo demo` (and `python -m trl_appo.demo`): the offline CPU demo (flags: `DemoCommand`; the demo itself
is `trl_appo.demo`)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from trl_appo.cli._args import EXIT_BAD_INPUT, BadInput, ArgParser, command_parser, from_namespace, one_line

NAME = "demo"
SUMMARY = "Offline CPU demo: a real model's branch points + learning on a tiny model."
USAGE = None
TAKES_REST = False


@dataclass
class DemoCommand:
    """Offline APPO demo on 2 CPU cores (no downloads). Part B (default): a tiny model warm-started by SFT, then
    APPO and GRPO from the same start; held-out Pass@1 of both; the APPO model is saved. Part A (--part a):
    SmolLM2-135M-Instruct (real model) + LoRA, a few APPO steps, where branch points fall. Writes
    OUTPUT_DIR/report/."""

    part: Literal["a", "b", "all"] = field(default="b", metadata={
        "help": "Which part to run: b (learning, APPO beside GRPO); a: SmolLM2 branch points only."})
    quick: bool = field(default=False, metadata={"help": "Tiny sizes everywhere (~1 min; used by the tests)."})
    output_dir: str = field(default="appo-demo", metadata={"help": "Where runs and report/ go."})
    seed: int = field(default=0, metadata={"help": "Seed."})
    a_steps: int | None = field(default=None, metadata={"help": "APPO steps of Part A (default 6; quick 1)."})
    b_steps: int | None = field(default=None, metadata={
        "help": "RL steps of Part B, for APPO and for GRPO (default 150; quick 16)."})
    b_sft_steps: int | None = field(default=None, metadata={"help": "SFT warm-start steps of Part B (default 160)."})
    b_lr: float | None = field(default=None, metadata={"help": "APPO learning rate of Part B (default 1e-4)."})
    threads: int | None = field(default=None, metadata={
        "help": "Torch CPU threads. Default: OMP_NUM_THREADS when set, else all cores on an idle machine and fewer "
        "when other processes keep the CPUs busy (trl_appo.runtime.choose_threads: 2-thread OpenMP on 2 "
        "oversubscribed cores decodes ~20x slower than 1 thread)."})
    no_progress: bool = field(default=False, metadata={"help": "No progress bars."})
    color: Literal["auto", "always", "never"] = field(default="auto", metadata={"help": "ANSI colours."})


FLAGS = DemoCommand
"""This subcommand's flags (`trl_appo.cli._args` parses them)."""


def build_parser() -> ArgParser:
    """The demo's parser on its own (`python -m trl_appo.demo`), the same as `trl-appo demo`'s."""
    return command_parser(DemoCommand, prog="trl-appo demo")


def parse(argv: Sequence[str] | None = None) -> DemoCommand:
    """`DemoCommand` from argv; `--help` exits 0, a bad flag prints one line and exits 2."""
    try:
        return from_namespace(DemoCommand, build_parser().parse_args(argv))
    except BadInput as e:
        print(f"{e.prog or 'trl-appo demo'}: error: {one_line(e)}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def run(args: DemoCommand, rest: list[str] | None = None) -> int:
    from trl_appo import demo

    return demo.run(args)
