"""`trl-appo recipes`: list the shipped recipe YAMLs, or copy them into a folder (flags: `RecipesCommand`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

NAME = "recipes"
SUMMARY = "List the shipped recipe YAMLs, or copy them into a folder."
USAGE = None
TAKES_REST = False


@dataclass
class RecipesCommand:
    """The recipes ship inside the package (trl_appo/recipes): `trl-appo train --config NAME` finds them from any
    directory; --copy writes editable copies (training and accelerate YAMLs)."""

    copy: str | None = field(default=None, metadata={"metavar": "DIR", "help": "Copy every recipe into "
                                                     "DIR/<setting>/<variant>.yaml."})
    overwrite: bool = field(default=False, metadata={"help": "With --copy: replace files that exist."})
    path: bool = field(default=False, metadata={"help": "Print the folder holding the shipped recipes and exit."})


FLAGS = RecipesCommand
"""This subcommand's flags (`trl_appo.cli._args` parses them)."""


def run(args: RecipesCommand, rest: list[str] | None = None) -> int:
    from trl_appo import recipes

    if args.path:
        print(recipes.recipes_dir())
        return 0
    if args.copy:
        written = recipes.copy_recipes(args.copy, overwrite=args.overwrite)
        kept = len(recipes.list_recipes(include_accelerate=True)) - len(written)
        print(f"copied {len(written)} recipe files to {args.copy}" + (f" ({kept} existing kept; --overwrite "
              "replaces them)" if kept else ""))
        print(f"train with: trl-appo train --config {Path(args.copy) / 'cpu' / 'demo.yaml'}")
        return 0
    root = recipes.recipes_dir()
    for name in recipes.list_recipes(include_accelerate=True):
        first = next((line[2:].strip() for line in (root / name).read_text().splitlines() if line.startswith("# ")), "")
        print(f"{name:48s} {first[:100]}")
    print(f"\n(in {root}; `trl-appo train --config cpu/demo.yaml`, or `trl-appo recipes --copy DIR` to edit them)")
    return 0
