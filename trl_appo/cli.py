"""The `trl-appo` command: `train`, `eval`, `inspect`, `demo`, `recipes`.

    trl-appo train --config cpu/demo.yaml [--field value ...]          # a path or a shipped recipe name
    trl-appo eval --model PATH --dataset PATH [--k 4 --n 8 --protocol tags --tools python,search]
    trl-appo inspect OUTPUT_DIR [--step S] [--html out.html] [--png out.png]
    trl-appo demo [--quick] [--part a|b|all]                           # offline CPU demo (see trl_appo.demo)
    trl-appo recipes [--copy DIR]                                      # list / copy the shipped recipe YAMLs

`train` runs `trl_appo.scripts` (the wiring `recipes/train_appo.py` also uses: TRL's parser over
APPOScriptArguments, APPOConfig and ModelConfig) in this process; the recipes ship inside the package
(`trl_appo.recipes`), so the installed command works from any directory.
Flags are TRL's style, with underscores (`--max_steps`, `--max_completion_length`); the dashed spellings of the
older eval/demo flags still work. Heavy imports (torch, TRL) happen inside the subcommands, so `--help` is instant.

Exit codes: 0 success, 2 bad input (one line on stderr naming the fix), 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

EXIT_BAD_INPUT = 2
EVAL_MAX_COMPLETION_LENGTH = 512
"""`trl-appo eval`'s token budget when the model does not record the one it was trained with."""


class BadInput(Exception):
    """User error: reported as one line on stderr with exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse errors as one line (`BadInput`) instead of usage + message."""

    def error(self, message):
        raise BadInput(f"{message} (see `{self.prog} --help`)")


# ------------------------------------------------------------------------------------------------ parser

TRAIN_COMMON_FIELDS = """common fields (YAML key or --flag; every one: `trl-appo train --help_all`):
  --model_name_or_path  a hub id, a local path, `tiny` (random 30k-parameter model) or `tiny_warm` (the demo's
                        SFT-warm-started 1M model, built once and cached)
  --dataset_name        task:tiny_arith | task:tool | an ARPO parquet/folder | a .jsonl/.json/.parquet/.csv file
  --reward_funcs        format_f1 format_answer_type answer_type f1 exact_match math_equivalence, and TRL's
                        accuracy think_format (or a dotted path pkg.module.fn)
  --tools               python search (or python,search)
  --output_dir --max_steps --learning_rate --per_device_train_batch_size --gradient_accumulation_steps
  --num_generations --num_roots --num_branches --branch_criterion --branch_schedule --tool_protocol
  --report_to --project (trackio project; the GPU recipes log to trackio, `pip install 'trl-appo[track]'`)

shipped recipes (`trl-appo recipes` lists them, `--copy DIR` copies them): cpu/demo.yaml,
qwen2.5-7b-instruct/{lora,qlora,multi_gpu_vllm_server}.yaml, qwen3-8b/qlora.yaml, llama-3.1-8b-instruct/qlora.yaml
"""


def _alias(*names: str) -> list[str]:
    """`--max_completion_length` plus its old dashed spelling `--max-completion-length`."""
    out = []
    for name in names:
        out.append(name)
        dashed = "--" + name[2:].replace("_", "-")
        if dashed != name:
            out.append(dashed)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="trl-appo",
        description="APPO (Agentic Procedural Policy Optimization) for TRL: train, evaluate, inspect branch points.",
        allow_abbrev=False,
    )
    sub = parser.add_subparsers(dest="command", metavar="{train,eval,inspect,demo,recipes}", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser(
        "train",
        help="Train with APPO from a recipe YAML and/or flags.",
        description="Train with APPO. Every YAML key / --flag is a field of APPOScriptArguments (data, rewards,\n"
        "tools), APPOConfig (training + APPO) or trl.ModelConfig (model, PEFT); flags override the YAML.\n"
        "Example: trl-appo train --config cpu/demo.yaml --max_steps 20",
        usage="trl-appo train --config RECIPE [--field value ...]",
        epilog=TRAIN_COMMON_FIELDS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=False,
        allow_abbrev=False,
    )
    p.add_argument("--config", metavar="RECIPE",
                   help="Recipe YAML: a path, or a shipped name such as cpu/demo.yaml (see `trl-appo recipes`).")
    p.add_argument("-h", "--help", action="store_true", help="Show this help and exit.")
    p.add_argument("--help_all", "--help-all", action="store_true",
                   help="List every field with its help text (imports TRL, a few seconds) and exit.")

    p = sub.add_parser(
        "eval",
        help="Pass@1 / Pass@k of a model on a dataset through the tool loop.",
        description="Roll out every prompt N times through the rollout engine (with tools) and report Pass@1 / "
        "Pass@K per data source. The dataset needs a `prompt` column (plain text or chat messages) and a gold "
        "column (`ground_truth`, `reward_model` or `solution`).",
        allow_abbrev=False,
    )
    p.add_argument("--model", required=True, help="A local model directory (save_pretrained output), `tiny`, `tiny_warm` or "
                   "`smollm2`.")
    p.add_argument("--dataset", required=True,
                   help="A .jsonl/.json/.parquet/.csv file, or task:tiny_arith / task:tool.")
    p.add_argument("--split", default=None, help="Split of a DatasetDict source (default: heldout/test/validation).")
    p.add_argument("--k", type=int, default=4, help="K of Pass@K (Pass@1 is always reported). Default 4.")
    p.add_argument("--n", type=int, default=8, help="Samples per prompt (>= K). Default 8.")
    p.add_argument("--limit", type=int, default=None, help="Evaluate only the first LIMIT rows.")
    p.add_argument("--protocol", choices=["tags", "chat"], default="tags", help="Tool-call protocol. Default tags.")
    p.add_argument("--tools", nargs="+", default=["python"],
                   help="Tools: python search (or python,search; 'none' for none). Default python.")
    p.add_argument("--reward", default="answer_type", help="Score: answer_type (default), format_answer_type, "
                   "format_f1, exact_match, f1, math_equivalence, accuracy (TRL), or pkg.module.fn.")
    p.add_argument("--threshold", type=float, default=1.0, help="A rollout is correct when its score >= this.")
    p.add_argument(*_alias("--max_completion_length"), dest="max_completion_length", type=int, default=None,
                   help="Token budget per rollout. Default: the max_completion_length the model was trained with "
                   f"(recorded next to a model saved by `trl-appo train`/APPOTrainer), else {EVAL_MAX_COMPLETION_LENGTH}.")
    p.add_argument(*_alias("--max_tool_calls"), dest="max_tool_calls", type=int, default=4,
                   help="Tool calls per rollout. Default 4.")
    p.add_argument("--temperature", type=float, default=1.0, help="Sampling temperature (0 = greedy). Default 1.0.")
    p.add_argument(*_alias("--top_p"), dest="top_p", type=float, default=1.0, help="Nucleus sampling. Default 1.0.")
    p.add_argument(*_alias("--batch_size"), dest="batch_size", type=int, default=8,
                   help="Prompts per generation batch. Default 8.")
    p.add_argument("--seed", type=int, default=0, help="Torch seed. Default 0.")
    p.add_argument("--output", default=None, help="Write the results table as JSON here (default: print only).")
    p.add_argument("--progress", choices=["auto", "always", "never"], default="auto",
                   help="Progress bar on stderr (auto: when stderr is a terminal). Default auto.")

    p = sub.add_parser(
        "inspect",
        help="Show a saved rollout with its branch points marked.",
        description="Read OUTPUT_DIR/branch_trees/*.jsonl (written with APPOConfig(log_branch_trees=True)) and print "
        "one root rollout with its branch points marked ⟨BPk⟩ (k = rank by Branching Score); tool output is dimmed. "
        "Optionally render it as HTML / PNG (trl_appo.viz).",
        allow_abbrev=False,
    )
    p.add_argument("output_dir", help="A training output_dir, its branch_trees folder, or one step_*.jsonl file.")
    p.add_argument("--step", type=int, default=None, help="Optimizer step to show (default: the last one logged).")
    p.add_argument("--index", type=int, default=None,
                   help="Which root of that step (default: the most informative: branches that changed the reward).")
    p.add_argument("--html", default=None, help="Also write the trajectory as a standalone HTML file.")
    p.add_argument("--png", default=None, help="Also write the trajectory as a PNG (needs matplotlib).")
    p.add_argument("--color", choices=["auto", "always", "never"], default="auto", help="ANSI colours. Default auto.")

    p = sub.add_parser(
        "demo",
        help="Offline CPU demo: a real model's branch points + learning on a tiny model.",
        description="Run the offline APPO demo (no downloads, 2 CPU cores). See `python -m trl_appo.demo --help`.",
        add_help=False,
    )
    p.add_argument("-h", "--help", action="store_true", help="Show the demo's options and exit.")

    p = sub.add_parser(
        "recipes",
        help="List the shipped recipe YAMLs, or copy them into a folder.",
        description="The recipes ship inside the package (trl_appo/recipes): `trl-appo train --config NAME` finds "
        "them from any directory; --copy writes editable copies (training and accelerate YAMLs).",
        allow_abbrev=False,
    )
    p.add_argument("--copy", metavar="DIR", default=None, help="Copy every recipe into DIR/<setting>/<variant>.yaml.")
    p.add_argument("--overwrite", action="store_true", help="With --copy: replace files that exist.")
    p.add_argument("--path", action="store_true", help="Print the folder holding the shipped recipes and exit.")
    return parser


# ------------------------------------------------------------------------------------------------ train


def _scripts():
    from trl_appo import scripts

    return scripts


def cmd_train(args, rest: list[str]) -> int:
    if args.help:
        build_parser()._subparsers._group_actions[0].choices["train"].print_help()  # noqa: SLF001
        return 0
    if args.help_all:
        _scripts().make_parser(prog="trl-appo train").print_help()
        return 0
    if not args.config and not rest:
        raise BadInput("nothing to train: pass --config RECIPE (e.g. cpu/demo.yaml; `trl-appo recipes` lists them)")
    argv = (["--config", args.config] if args.config else []) + rest
    from trl_appo.runtime import held_stderr

    # What third-party packages print while importing, parsing and wiring is held back: on bad input the one-line
    # error is all the user sees; otherwise it is passed on before training starts.
    with held_stderr(discard_on=(BadInput,)):
        scripts = _scripts()
        try:
            prepared = scripts.prepare(argv)
        except scripts.RecipeError as e:
            raise BadInput(str(e)) from e
    scripts.run(*prepared)
    return 0


def train_script_main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Entry of `recipes/train_appo.py` and `python -m trl_appo.scripts`: as `trl-appo train`, with errors as
    `<prog>: error: ...` (one line, exit 2). Third-party output of the imports and wiring is held as in cmd_train."""
    from trl_appo.runtime import held_stderr

    argv = list(sys.argv[1:] if argv is None else argv)
    prog = prog or os.path.basename(sys.argv[0] or "train_appo")
    try:
        with held_stderr(discard_on=(BadInput,)):
            scripts = _scripts()
            try:
                prepared = scripts.prepare(argv)
            except scripts.RecipeError as e:
                raise BadInput(str(e)) from e
    except BadInput as e:
        print(f"{prog}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_BAD_INPUT
    scripts.run(*prepared)
    return 0


# ------------------------------------------------------------------------------------------------ recipes


def cmd_recipes(args) -> int:
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


# ------------------------------------------------------------------------------------------------ eval


def _with_progress(engine, total_prompts: int, enabled: bool):
    """Wrap `engine.run` so each evaluation batch advances a tqdm bar (prompts done / total)."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total_prompts, desc="eval", unit="prompt", disable=not enabled, file=sys.stderr)
    run = engine.run

    def run_with_progress(prompt_ids, *a, group_size=1, **kw):
        out = run(prompt_ids, *a, group_size=group_size, **kw)
        bar.update(len(prompt_ids) // max(1, group_size))
        return out

    engine.run = run_with_progress
    return bar


def cmd_eval(args) -> int:
    if args.n < 1 or args.k < 1 or args.k > args.n:
        raise BadInput(f"need 1 <= --k <= --n (got k={args.k}, n={args.n})")
    from trl_appo.runtime import held_stderr

    with held_stderr(discard_on=(BadInput,)):  # third-party noise never joins a one-line error (see cmd_train)
        scripts = _scripts()
        try:
            ds = scripts.load_eval_dataset(args.dataset, args.split)
            if args.limit:
                ds = ds.select(range(min(args.limit, len(ds))))
            score_fn = scripts.reward_by_name(args.reward)
            tools = scripts.make_tools(args.tools)
            model, tokenizer = scripts.load_pretrained(args.model, seed=args.seed)
        except scripts.RecipeError as e:
            raise BadInput(str(e)) from e
        if args.max_completion_length is None:
            args.max_completion_length = scripts.trained_max_completion_length(args.model) or EVAL_MAX_COMPLETION_LENGTH
    print(scripts.set_cpu_threads()[1], file=sys.stderr, flush=True)
    import torch

    from trl_appo.evaluation import evaluate, make_hf_generate_fn
    from trl_appo.rollout import build_engine, eos_token_ids_of

    torch.manual_seed(args.seed)
    tools_names = [t.name for t in tools] or ["none"]
    # Training's engine rules (trl_appo.rollout.build_engine): evaluation stops where training does.
    engine = build_engine(
        make_hf_generate_fn(model, tokenizer, temperature=args.temperature, top_p=args.top_p), tokenizer, tools,
        protocol=args.protocol, max_completion_length=args.max_completion_length, max_tool_calls=args.max_tool_calls,
        eos_token_ids=eos_token_ids_of(model, tokenizer),
    )
    show = args.progress == "always" or (args.progress == "auto" and sys.stderr.isatty())
    bar = _with_progress(engine, len(ds), show)
    try:
        result = evaluate(
            ds, engine, n=args.n, ks=(1, args.k), score_fn=score_fn, threshold=args.threshold,
            batch_size=args.batch_size, max_completion_length=args.max_completion_length,
            max_tool_calls=args.max_tool_calls, temperature=args.temperature, top_p=args.top_p,
            model_name=args.model, extra_settings={"protocol": args.protocol, "tools": ",".join(tools_names),
                                                   "dataset": args.dataset},
        )
    finally:
        bar.close()
    print(result.table())
    if args.output:
        path = result.save_json(args.output)
        print(f"saved {path}")
    return 0


# ------------------------------------------------------------------------------------------------ inspect


def cmd_inspect(args) -> int:
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


# ------------------------------------------------------------------------------------------------ main


def _underscore_to_dash(argv: list[str]) -> list[str]:
    """`--output_dir X` -> `--output-dir X` for the demo's dashed flags (one flag style across subcommands)."""
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
    parser = build_parser()
    command = "trl-appo"
    try:
        try:
            args, rest = parser.parse_known_args(argv)
        except SystemExit as e:  # --help at top level or of eval/inspect/recipes
            return int(e.code or 0)
        command = f"trl-appo {args.command}"
        if args.command == "demo":
            from trl_appo import demo

            return demo.main((["--help"] if args.help else []) + _underscore_to_dash(rest))
        if args.command == "train":
            return cmd_train(args, rest)
        if rest:
            raise BadInput(f"unrecognized arguments: {' '.join(rest)} (see `{command} --help`)")
        return {"eval": cmd_eval, "inspect": cmd_inspect, "recipes": cmd_recipes}[args.command](args)
    except SystemExit as e:
        return int(e.code or 0) if isinstance(e.code, int) or e.code is None else EXIT_BAD_INPUT
    except BadInput as e:
        print(f"{command}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except json.JSONDecodeError as e:
        print(f"{command}: error: bad JSON input: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
