"""The `trl-appo` command: `train`, `eval`, `inspect`, `demo`.

    trl-appo demo [--quick] [--part a|b|all]             # offline CPU demo (see trl_appo.demo)
    trl-appo train --config recipes/cpu/demo.yaml [--field value ...]
    trl-appo eval --model PATH --dataset PATH [--k 4 --n 8 --protocol tags --tools python,search]
    trl-appo inspect OUTPUT_DIR [--step S] [--html out.html] [--png out.png]

`train` delegates to `recipes/train_appo.py` (TRL's parser over APPOScriptArguments, APPOConfig and ModelConfig)
when that script is found (repository checkout); otherwise it runs a minimal YAML -> APPOConfig path.
Heavy imports (torch, TRL) happen inside the subcommands, so `--help` is instant.

Exit codes: 0 success, 2 bad input (missing file, missing dataset columns, bad option), 1 anything else.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

EXIT_BAD_INPUT = 2


class BadInput(Exception):
    """User error: reported as one line on stderr with exit code 2."""


# ------------------------------------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trl-appo",
        description="APPO (Agentic Procedural Policy Optimization) for TRL: train, evaluate, inspect branch points.",
    )
    sub = parser.add_subparsers(dest="command", metavar="{train,eval,inspect,demo}")
    sub.required = True

    p = sub.add_parser(
        "train",
        help="Train with APPO from a recipe YAML and/or flags.",
        description="Train with APPO. Every YAML key / --flag is a field of APPOScriptArguments (data, rewards, "
        "tools), APPOConfig (training + APPO) or trl.ModelConfig (model, PEFT). Example: trl-appo train --config "
        "recipes/cpu/demo.yaml --max_steps 20. Flags after the known ones are passed through to the recipe parser.",
        add_help=False,
    )
    p.add_argument("-h", "--help", action="store_true", help="Show this help (and the recipe fields) and exit.")
    p.add_argument("--config", help="Recipe YAML (e.g. recipes/cpu/demo.yaml).")

    p = sub.add_parser(
        "eval",
        help="Pass@1 / Pass@k of a model on a dataset through the tool loop.",
        description="Roll out every prompt N times through the rollout engine (with tools) and report Pass@1 / "
        "Pass@K per data source. The dataset needs a `prompt` column (plain text or chat messages) and a gold "
        "column (`ground_truth`, `reward_model` or `solution`).",
    )
    p.add_argument("--model", required=True, help="A local model directory (save_pretrained output), or `smollm2`.")
    p.add_argument("--dataset", required=True, help="A .jsonl/.json/.parquet/.csv file, or task:tiny_arith / task:tool.")
    p.add_argument("--split", default=None, help="Split of a DatasetDict source (default: heldout/test/validation).")
    p.add_argument("--k", type=int, default=4, help="K of Pass@K (Pass@1 is always reported). Default 4.")
    p.add_argument("--n", type=int, default=8, help="Samples per prompt (>= K). Default 8.")
    p.add_argument("--limit", type=int, default=None, help="Evaluate only the first LIMIT rows.")
    p.add_argument("--protocol", choices=["tags", "chat"], default="tags", help="Tool-call protocol. Default tags.")
    p.add_argument("--tools", default="python", help="Comma-separated tools: python,search (or 'none').")
    p.add_argument("--reward", default="answer_type", help="Score: answer_type (default), format_answer_type, "
                   "format_f1, exact_match, f1, math_equivalence.")
    p.add_argument("--threshold", type=float, default=1.0, help="A rollout is correct when its score >= this.")
    p.add_argument("--max-completion-length", type=int, default=512, help="Token budget per rollout. Default 512.")
    p.add_argument("--max-tool-calls", type=int, default=4, help="Tool calls per rollout. Default 4.")
    p.add_argument("--temperature", type=float, default=1.0, help="Sampling temperature (0 = greedy). Default 1.0.")
    p.add_argument("--top-p", type=float, default=1.0, help="Nucleus sampling. Default 1.0.")
    p.add_argument("--batch-size", type=int, default=8, help="Prompts per generation batch. Default 8.")
    p.add_argument("--seed", type=int, default=0, help="Torch seed. Default 0.")
    p.add_argument("--output", default=None, help="Write the results table as JSON here (default: print only).")

    p = sub.add_parser(
        "inspect",
        help="Show a saved rollout with its branch points marked.",
        description="Read OUTPUT_DIR/branch_trees/*.jsonl (written with APPOConfig(log_branch_trees=True)) and print "
        "one root rollout with its branch points marked ⟨BPk⟩ (k = rank by Branching Score); tool output is dimmed. "
        "Optionally render it as HTML / PNG (trl_appo.viz).",
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
    return parser


# ------------------------------------------------------------------------------------------------ train


def _find_recipe_script() -> Path | None:
    candidates = [Path.cwd() / "recipes" / "train_appo.py", Path(__file__).resolve().parents[1] / "recipes" / "train_appo.py"]
    return next((c for c in candidates if c.exists()), None)


def _load_recipe_module(path: Path):
    spec = importlib.util.spec_from_file_location("trl_appo_recipe_train_appo", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    return module


def cmd_train(args, rest: list[str]) -> int:
    argv = (["--config", args.config] if args.config else []) + rest
    script = _find_recipe_script()
    if args.help:
        if script is not None:
            print("usage: trl-appo train [--config RECIPE.yaml] [--field value ...]\n")
            _load_recipe_module(script).make_parser().print_help()
        else:
            build_parser()._subparsers._group_actions[0].choices["train"].print_help()  # noqa: SLF001
            print("\nMinimal mode (recipes/train_appo.py not found): YAML keys = APPOConfig fields plus "
                  "model_name_or_path, dataset_name, reward_funcs, tools.")
        return 0
    if args.config and not Path(args.config).exists():
        raise BadInput(f"recipe not found: {args.config}")
    if script is not None:
        module = _load_recipe_module(script)
        if hasattr(module, "main"):
            module.main(argv)
            return 0
        parsed = module.parse_args(argv)
        recipe = module.build_from_args(*parsed)
        trainer = recipe.trainer()
        trainer.train()
        trainer.save_model(recipe.args.output_dir)
        return 0
    return _train_minimal(args.config, rest)


def _train_minimal(config_path: str | None, rest: list[str]) -> int:
    """YAML (+ `--field value` overrides) -> APPOConfig, for installs without the recipes/ folder."""
    import yaml

    cfg = dict(yaml.safe_load(Path(config_path).read_text()) or {}) if config_path else {}
    it = iter(rest)
    for token in it:
        if not token.startswith("--"):
            raise BadInput(f"unexpected argument {token!r}; overrides are --field value")
        key, _, value = token[2:].partition("=")
        if not value:
            value = next(it, None)
            if value is None:
                raise BadInput(f"--{key} needs a value")
        cfg[key.replace("-", "_")] = yaml.safe_load(value)
    model_name = cfg.pop("model_name_or_path", None)
    dataset_name = cfg.pop("dataset_name", "task:tiny_arith")
    reward_names = cfg.pop("reward_funcs", ["format_answer_type"])
    tool_names = cfg.pop("tools", ["python"])
    if not model_name:
        raise BadInput("the recipe needs model_name_or_path (a local model directory, or `tiny`)")
    from trl_appo.config import APPOConfig
    from trl_appo.trainer import APPOTrainer

    cfg.setdefault("output_dir", "appo-output")
    cfg.setdefault("tool_protocol", "tags")
    try:
        training_args = APPOConfig(**cfg)
    except TypeError as e:
        raise BadInput(f"unknown recipe key: {e}") from e
    train = _load_dataset(dataset_name, None, split_hint="train")
    model, tokenizer = _load_model(model_name)
    trainer = APPOTrainer(model=model, processing_class=tokenizer, args=training_args, train_dataset=train,
                          reward_funcs=[_reward(r) for r in (reward_names if isinstance(reward_names, list) else [reward_names])],
                          tools=_tools(tool_names if isinstance(tool_names, list) else str(tool_names).split(",")))
    trainer.train()
    trainer.save_model(training_args.output_dir)
    return 0


# ------------------------------------------------------------------------------------------------ eval


def _reward(name: str):
    from trl_appo import rewards

    short = {"answer_type": "answer_type_reward", "format_answer_type": "format_answer_type_reward",
             "format_f1": "format_f1_reward", "exact_match": "exact_match_reward", "f1": "f1_reward",
             "math_equivalence": "math_equivalence_reward"}
    fn = getattr(rewards, short.get(name, name), None)
    if fn is None:
        raise BadInput(f"unknown reward {name!r}; choose one of {sorted(short)}")
    return fn


def _tools(names) -> list:
    names = [n.strip() for n in names if n and n.strip() and n.strip() != "none"]
    out = []
    for name in names:
        if name == "python":
            from trl_appo.tools import PythonTool

            out.append(PythonTool())
        elif name == "search":
            from trl_appo.tools import SearchTool

            out.append(SearchTool())
        else:
            raise BadInput(f"unknown tool {name!r}; choose from python, search")
    return out


def _load_model(name: str):
    if name == "smollm2":
        from trl_appo.models import ModelNotAvailableError, load_smollm2

        try:
            return load_smollm2()
        except ModelNotAvailableError as e:
            raise BadInput(str(e)) from e
    if name == "tiny":
        from trl_appo.testing import build_tiny_model, build_tiny_tokenizer

        tok = build_tiny_tokenizer()
        return build_tiny_model(tok), tok
    path = Path(name)
    if not path.exists():
        raise BadInput(f"model not found: {name} (pass a local directory written by save_pretrained, or smollm2)")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    try:
        # Keeps a hand-made tokenizer's pipeline as saved (AutoTokenizer may rebuild it for qwen2 configs).
        tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    except Exception:  # noqa: BLE001 - fall back to the auto class (sentencepiece etc.)
        tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


GOLD_COLUMNS = ("ground_truth", "reward_model", "solution")


def _load_dataset(name: str, split: str | None, split_hint: str = "heldout"):
    if name.startswith("task:"):
        from trl_appo import tasks

        kind = name.split(":", 1)[1]
        if kind == "tiny_arith":
            dd = tasks.make_tiny_tasks(64, 64)
        elif kind == "tool":
            dd = tasks.make_tool_tasks(64, 64)
        else:
            raise BadInput(f"unknown task {name!r}; use task:tiny_arith or task:tool")
        return dd[split or split_hint]
    path = Path(name)
    if not path.exists():
        raise BadInput(f"dataset not found: {name}")
    import datasets as hf_datasets

    if path.is_dir():
        ds = hf_datasets.load_from_disk(str(path))
    else:
        fmt = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}.get(path.suffix)
        if fmt is None:
            raise BadInput(f"unsupported dataset file {path.name}: use .jsonl, .json, .parquet or .csv")
        ds = hf_datasets.load_dataset(fmt, data_files=str(path), split="train")
    if isinstance(ds, hf_datasets.DatasetDict):
        key = split or next((s for s in ("heldout", "test", "validation", "train") if s in ds), None)
        if key not in ds:
            raise BadInput(f"split {split!r} not in {list(ds)}")
        ds = ds[key]
    return ds


def _check_columns(ds) -> None:
    cols = list(ds.column_names)
    missing = []
    if "prompt" not in cols:
        missing.append("prompt")
    if not any(c in cols for c in GOLD_COLUMNS):
        missing.append("one of " + "/".join(GOLD_COLUMNS))
    if missing:
        raise BadInput(f"dataset is missing column(s): {', '.join(missing)} (it has: {', '.join(cols)})")


def cmd_eval(args) -> int:
    if args.n < 1 or args.k < 1 or args.k > args.n:
        raise BadInput(f"need 1 <= --k <= --n (got k={args.k}, n={args.n})")
    ds = _load_dataset(args.dataset, args.split)
    _check_columns(ds)
    if args.limit:
        ds = ds.select(range(min(args.limit, len(ds))))
    score_fn = _reward(args.reward)
    tools = _tools(args.tools.split(","))
    import torch

    from trl_appo.evaluation import evaluate, make_hf_generate_fn
    from trl_appo.rollout import ChatTemplateProtocol, TagProtocol

    torch.manual_seed(args.seed)
    model, tokenizer = _load_model(args.model)
    protocol = TagProtocol(tokenizer) if args.protocol == "tags" else ChatTemplateProtocol(tokenizer)
    result = evaluate(
        ds,
        generate_fn=make_hf_generate_fn(model, tokenizer, temperature=args.temperature, top_p=args.top_p),
        tokenizer=tokenizer, protocol=protocol, tools=tools, n=args.n, ks=(1, args.k), score_fn=score_fn,
        threshold=args.threshold, batch_size=args.batch_size, max_completion_length=args.max_completion_length,
        max_tool_calls=args.max_tool_calls, temperature=args.temperature, top_p=args.top_p, model_name=args.model,
        extra_settings={"protocol": args.protocol, "tools": args.tools, "dataset": args.dataset},
    )
    print(result.table())
    if args.output:
        path = result.save_json(args.output)
        print(f"saved {path}")
    return 0


# ------------------------------------------------------------------------------------------------ inspect


def cmd_inspect(args) -> int:
    from trl_appo import demo, viz

    try:
        records = viz.load_branch_trees(args.output_dir)
    except FileNotFoundError as e:
        raise BadInput(str(e)) from e
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


def main(argv: list[str] | None = None) -> int:
    """Entry point of `trl-appo`; returns the exit code (also when called from tests)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args, rest = parser.parse_known_args(argv)
    except SystemExit as e:  # --help at top level, or an argparse error (code 2)
        return int(e.code or 0)
    try:
        if args.command == "demo":
            from trl_appo import demo

            return demo.main((["--help"] if args.help else []) + rest)
        if args.command == "train":
            return cmd_train(args, rest)
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        return {"eval": cmd_eval, "inspect": cmd_inspect}[args.command](args)
    except SystemExit as e:
        return int(e.code or 0)
    except BadInput as e:
        print(f"trl-appo {args.command}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except json.JSONDecodeError as e:
        print(f"trl-appo {args.command}: error: bad JSON input: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
