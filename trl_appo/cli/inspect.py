"""`trl-appo inspect`: a saved rollout with its branch points marked (flags: `InspectCommand`)."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from trl_appo.cli._args import BadInput

NAME = "inspect"
SUMMARY = "Show a saved rollout with its branch points marked."
USAGE = None
TAKES_REST = False


@dataclass
class InspectCommand:
    """Read OUTPUT_DIR/branch_trees/*.jsonl (written with APPOConfig(log_branch_trees=True)) and print one root
    rollout with its branch points marked ⟨BPk⟩ (k = rank by Branching Score); tool output is dimmed. Optionally
    render it as HTML / PNG (trl_appo.viz)."""

    output_dir: str = field(metadata={"positional": True, "metavar": "OUTPUT_DIR", "help": "A training output_dir, "
                                      "its branch_trees folder, or one step_*.jsonl file."})
    step: int | None = field(default=None, metadata={"help": "Optimizer step to show (default: the last one "
                                                     "logged)."})
    index: int | None = field(default=None, metadata={"help": "Which root of that step (default: the most "
                                                      "informative: branches that changed the reward)."})
    html: str | None = field(default=None, metadata={"help": "Also write the trajectory as a standalone HTML file."})
    png: str | None = field(default=None, metadata={"help": "Also write the trajectory as a PNG (needs matplotlib)."})
    color: Literal["auto", "always", "never"] = field(default="auto", metadata={"help": "ANSI colours."})


FLAGS = InspectCommand
"""This subcommand's flags (`trl_appo.cli._args` parses them)."""


def run(args: InspectCommand, rest: list[str] | None = None) -> int:
    from trl_appo import demo, viz
    from trl_appo import records as tree_records

    try:
        records = viz.load_branch_trees(args.output_dir)
    except FileNotFoundError as e:
        raise BadInput(str(e)) from e
    except json.JSONDecodeError as e:
        raise BadInput(f"{args.output_dir} is not JSON lines ({e}); pass the output_dir of a run with "
                       "log_branch_trees=True") from e
    except (TypeError, AttributeError):  # a line that is JSON but not an object (viz indexes it as a dict)
        records = []
    records = [r for r in records if tree_records.is_record(r)]
    if not records:
        raise BadInput(f"no branch-tree records in {args.output_dir} (JSON lines with "
                       f"{', '.join(tree_records.REQUIRED_KEYS)}); pass "
                       "the output_dir of a run trained with APPOConfig(log_branch_trees=True)")
    steps = sorted({r.get("step", 0) for r in records})
    step = args.step if args.step is not None else steps[-1]
    chosen = [r for r in records if r.get("step", 0) == step]
    if not chosen:
        raise BadInput(f"no branch trees for step {step}; logged steps: {steps}")
    if args.index is not None:
        if not 0 <= args.index < len(chosen):
            raise BadInput(f"--index {args.index} out of range: step {step} has {len(chosen)} roots")
        record = chosen[args.index]
    else:
        record = demo.pick_record(chosen)
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty() and not os.environ.get("NO_COLOR"))
    print(f"step {step} ({len(chosen)} roots logged; steps available: {steps[0]}..{steps[-1]})")
    print(demo.format_trajectory(record, color=color))
    if args.html:
        Path(args.html).parent.mkdir(parents=True, exist_ok=True)
        Path(args.html).write_text(viz.render_trajectory_html(record, full_document=True))
        print(f"wrote {args.html}")
    if args.png:
        Path(args.png).parent.mkdir(parents=True, exist_ok=True)
        viz.render_trajectory_png(record, args.png)
        print(f"wrote {args.png}")
    return 0
