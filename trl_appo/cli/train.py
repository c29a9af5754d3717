"""`trl-appo train`: train with APPO from a recipe YAML and/or flags.

The subcommand's own flags are `TrainCommand`'s fields; every other `--field value` is a training field, parsed
by `trl.TrlParser` over `APPOScriptArguments`, `APPOConfig` and `trl.ModelConfig` in `trl_appo.scripts` (the
wiring `recipes/train_appo.py` shares). Help lists the common training fields from `_train_fields` (generated
from those dataclasses by `scripts/gen_cli_docs.py`), so `--help` imports neither torch nor TRL.
"""

from __future__ import annotations

import os
import sys
import textwrap
from dataclasses import dataclass, field

from trl_appo.cli._args import EXIT_BAD_INPUT, BadInput, one_line

NAME = "train"
SUMMARY = "Train with APPO from a recipe YAML and/or flags."
USAGE = "trl-appo train --config RECIPE [--field value ...]"
TAKES_REST = True  # the training fields go on to TrlParser

COMMON_FIELDS = ("model_name_or_path", "dataset_name", "reward_funcs", "tools", "num_generations", "num_roots",
                 "num_branches", "branch_criterion", "branch_schedule", "tool_protocol")
"""Training fields `trl-appo train --help` explains (their help's first sentence, from `_train_fields`)."""
LISTED_FIELDS = ("output_dir", "max_steps", "learning_rate", "per_device_train_batch_size",
                 "gradient_accumulation_steps", "report_to", "project")
"""Training fields it names only (TRL's / transformers' own)."""

SHIPPED_RECIPES = ("cpu/demo.yaml, qwen2.5-7b-instruct/{lora,qlora,multi_gpu_vllm_server}.yaml, qwen3-8b/qlora.yaml, "
                   "llama-3.1-8b-instruct/qlora.yaml")


@dataclass
class TrainCommand:
    """Train with APPO. Every YAML key / --flag is a field of APPOScriptArguments (data, rewards, tools),
    APPOConfig (training + APPO) or trl.ModelConfig (model, PEFT); flags override the YAML.
    --model_name_or_path also takes `tiny` (random 30k-parameter model) or `tiny_warm` (the demo's
    SFT-warm-started 1M model, built once and cached).
    Example: trl-appo train --config cpu/demo.yaml --max_steps 20"""

    config: str | None = field(
        default=None, metadata={"metavar": "RECIPE", "help": "Recipe YAML: a path, or a shipped name such as "
                                "cpu/demo.yaml (see `trl-appo recipes`)."})
    help_all: bool = field(
        default=False, metadata={"help": "List every training field with its help text (imports TRL, a few "
                                 "seconds) and exit."})


FLAGS = TrainCommand
"""This subcommand's flags (`trl_appo.cli._args` parses them)."""


def epilog() -> str:
    """The common training fields, from the generated `_train_fields` table."""
    from trl_appo.cli._train_fields import TRAIN_FIELDS

    lines = ["common training fields (YAML key or --flag; every one: `trl-appo train --help_all`, docs/cli.md):"]
    for name in COMMON_FIELDS:
        owner, first_sentence = TRAIN_FIELDS[name]
        flag = f"  --{name}"
        lines += textwrap.wrap(f"{first_sentence} [{owner}]", width=116, initial_indent=f"{flag:<24}",
                               subsequent_indent=" " * 24)
    lines += textwrap.wrap(" ".join(f"--{n}" for n in LISTED_FIELDS), width=116, initial_indent="  ",
                           subsequent_indent="  ")
    lines += [""] + textwrap.wrap(f"shipped recipes (`trl-appo recipes` lists them, `--copy DIR` copies them): "
                                  f"{SHIPPED_RECIPES}", width=116)
    return "\n".join(lines) + "\n"


def _scripts():
    from trl_appo import scripts

    return scripts


def _prepare(argv: list[str]):
    """`scripts.prepare` with what third-party packages print while importing, parsing and wiring held back: on
    bad input the one-line error is all the user sees; otherwise it is passed on before training starts."""
    from trl_appo.runtime import held_stderr

    with held_stderr(discard_on=(BadInput,)):
        scripts = _scripts()
        try:
            return scripts.prepare(argv)
        except scripts.RecipeError as e:
            raise BadInput(str(e)) from e


def run(args: TrainCommand, rest: list[str]) -> int:
    if args.help_all:
        _scripts().make_parser(prog="trl-appo train").print_help()
        return 0
    if not args.config and not rest:
        raise BadInput("nothing to train: pass --config RECIPE (e.g. cpu/demo.yaml; `trl-appo recipes` lists them)")
    prepared = _prepare((["--config", args.config] if args.config else []) + rest)
    _scripts().run(*prepared)
    return 0


def train_script_main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Entry of `recipes/train_appo.py` and `python -m trl_appo.scripts`: as `trl-appo train`, with errors as
    `<prog>: error: ...` (one line, exit 2). Third-party output of the imports and wiring is held as in `run`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = prog or os.path.basename(sys.argv[0] or "train_appo")
    try:
        prepared = _prepare(argv)
    except BadInput as e:
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    _scripts().run(*prepared)
    return 0
